//! `GET /admin/config`: the effective config as JSON, with secrets redacted.
//!
//! TLS files are shown by path; their content (the private key) never is.
//!
//! Redacted: API key hashes and the admin token hash (hashes of secrets still let an attacker
//! test guesses offline), `equals` values of identification rules on headers that carry
//! credentials, and any key of a plugin's own config whose name says it holds a secret.

use serde_json::{Value, json};

use crate::config::Config;

const REDACTED: &str = "[redacted]";

/// The config `c` as JSON with every default filled in and secrets redacted.
pub(super) fn effective_config(c: &Config) -> Value {
    let mut v = json!({
        "source": c.source.as_ref().map(|p| p.display().to_string()),
        "listen": c.listen,
        "admin": c.admin,
        "server": c.server,
        "tls": c.tls,
        "headers": c.headers,
        "identity": c.identity,
        "services": c.services,
        "clients": c.clients,
        "routes": c.routes,
        "plugins": c.plugins,
        "reload": c.reload,
        "access_log": c.access_log,
    });
    redact(&mut v);
    v
}

fn redact(v: &mut Value) {
    if let Some(t) = v.pointer_mut("/admin/token_sha256")
        && !t.is_null()
    {
        *t = REDACTED.into();
    }
    if let Some(clients) = v.get_mut("clients").and_then(Value::as_array_mut) {
        for rule in clients
            .iter_mut()
            .filter_map(|c| c.get_mut("identify").and_then(Value::as_array_mut))
            .flatten()
        {
            if let Some(hashes) = rule.get_mut("sha256").and_then(Value::as_array_mut) {
                hashes.iter_mut().for_each(|h| *h = REDACTED.into());
            }
            let secret_header = rule
                .get("header")
                .and_then(Value::as_str)
                .is_some_and(is_secret_name);
            if secret_header && let Some(eq) = rule.get_mut("equals").filter(|e| !e.is_null()) {
                *eq = REDACTED.into();
            }
        }
    }
    if let Some(routes) = v.get_mut("routes").and_then(Value::as_array_mut) {
        for step in routes
            .iter_mut()
            .filter_map(|r| r.get_mut("chain").and_then(Value::as_array_mut))
            .flatten()
        {
            if let Some(config) = step.get_mut("config") {
                redact_secret_keys(config);
            }
        }
    }
}

/// Replaces the value of every key (at any depth) whose name says it is a secret.
fn redact_secret_keys(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if is_secret_name(k) {
                    *val = REDACTED.into();
                } else {
                    redact_secret_keys(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_secret_keys),
        _ => {}
    }
}

/// Names that usually hold credentials: `authorization`, `cookie`, `x-api-key`, `token`,
/// `client_secret`, `password`, `private_key`...
fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('-', "_");
    [
        "authorization",
        "cookie",
        "secret",
        "token",
        "password",
        "passwd",
        "api_key",
        "apikey",
        "credential",
        "private_key",
        "signing_key",
    ]
    .iter()
    .any(|s| n.contains(s))
        || n == "key"
        || n.ends_with("_key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_kept() {
        let config = Config::from_toml(
            r#"
            [admin]
            token_sha256 = "5f7b2ed74a9736a538a6fb5a5a1a76afdcdd0d177d7fc6e79c6b6843527d848d"
            [services.api]
            urls = ["http://127.0.0.1:1"]
            [[clients]]
            name = "partner"
            identify = [
              { api_key_header = "x-api-key", sha256 = ["5f7b2ed74a9736a538a6fb5a5a1a76afdcdd0d177d7fc6e79c6b6843527d848d"] },
              { header = "x-partner-token", equals = "s3cret" },
              { header = "x-client", equals = "partner" },
            ]
            [[routes]]
            id = "feed"
            path = "/feed"
            service = "api"
            chain = [{ plugin = "p", config = { fields = ["a"], auth = { client_secret = "x", region = "eu" }, signing_key = "k" } }]
            "#,
            "test",
        )
        .expect("valid config");
        let v = effective_config(&config);
        let text = v.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!text.contains("5f7b2ed7"), "{text}");
        assert_eq!(v["admin"]["token_sha256"], REDACTED);
        assert_eq!(v["clients"][0]["identify"][0]["sha256"][0], REDACTED);
        assert_eq!(
            v["clients"][0]["identify"][0]["api_key_header"],
            "x-api-key"
        );
        assert_eq!(v["clients"][0]["identify"][1]["equals"], REDACTED);
        assert_eq!(v["clients"][0]["identify"][2]["equals"], "partner");
        let step = &v["routes"][0]["chain"][0]["config"];
        assert_eq!(step["fields"][0], "a");
        assert_eq!(step["auth"]["client_secret"], REDACTED);
        assert_eq!(step["auth"]["region"], "eu");
        assert_eq!(step["signing_key"], REDACTED);
        // Defaults are filled in.
        assert_eq!(v["server"]["max_connections"], 10000);
        assert_eq!(v["access_log"]["enabled"], true);
    }
}
