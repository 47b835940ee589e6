//! `fields`: trims and reshapes JSON responses for a client, in the response phase: keep only
//! the fields a screen uses (`allow`), drop some (`deny`), rename keys (`rename`) and lift nested
//! objects up (`flatten`). Paths reach into nested objects and arrays (`orders[].total.amount`);
//! see [`bff_plugin_sdk::json`] for the syntax.
//!
//! The steps run in that order on 2xx JSON responses; other responses pass through untouched.
//! A 2xx response that says it is JSON but is not fails the plugin (a filter that hides fields
//! must not pass them through by accident).

use std::collections::BTreeMap;

use bff_plugin_sdk::json::{Path, Selection, omit};
use bff_plugin_sdk::{Capabilities, Context, Error, Plugin, Response, debug};
use serde::Deserialize;
use serde_json::Value;

/// The plugin's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Keep only these paths (all fields if absent).
    #[serde(default)]
    pub allow: Option<Vec<Path>>,
    /// Remove these paths.
    #[serde(default)]
    pub deny: Vec<Path>,
    /// Path → new name of the key it ends with (applied after `allow` and `deny`).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Objects to lift into their parent (applied last, so paths use renamed keys).
    #[serde(default)]
    pub flatten: Vec<Flatten>,
}

/// One `flatten` entry: a path, or a path and a prefix for the lifted keys.
#[derive(Debug, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Flatten {
    /// Lift the object's keys as they are.
    Path(Path),
    /// Lift the object's keys with `prefix` before each.
    WithPrefix {
        /// The object to lift.
        path: Path,
        /// Put before every lifted key.
        prefix: String,
    },
}

/// The `fields` plugin.
#[derive(Debug)]
pub struct Fields {
    allow: Option<Selection>,
    deny: Vec<Path>,
    rename: Vec<(Path, String)>,
    flatten: Vec<(Path, String)>,
}

impl Fields {
    /// Applies every step to `doc`.
    pub fn reshape(&self, doc: Value) -> Value {
        let mut doc = match &self.allow {
            Some(allow) => allow.pick(&doc),
            None => doc,
        };
        omit(&mut doc, &self.deny);
        for (path, to) in &self.rename {
            path.rename(&mut doc, to);
        }
        for (path, prefix) in &self.flatten {
            path.flatten(&mut doc, prefix);
        }
        doc
    }
}

fn is_json(resp: &Response) -> bool {
    resp.headers.get("content-type").is_some_and(|ct| {
        let ct = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        ct == "application/json" || ct.ends_with("+json")
    })
}

impl Plugin for Fields {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        if config.allow.is_none()
            && config.deny.is_empty()
            && config.rename.is_empty()
            && config.flatten.is_empty()
        {
            return Err(Error::invalid_config(
                "nothing to do: set at least one of allow, deny, rename, flatten",
            ));
        }
        let mut rename = Vec::with_capacity(config.rename.len());
        for (from, to) in config.rename {
            let path: Path = from
                .parse()
                .map_err(|e: Error| Error::invalid_config(format!("rename: {}", e.message)))?;
            if path.last_key().is_none() {
                return Err(Error::invalid_config(format!(
                    "rename.{from}: the path must end with a key"
                )));
            }
            if to.is_empty() {
                return Err(Error::invalid_config(format!(
                    "rename.{from}: empty new name"
                )));
            }
            rename.push((path, to));
        }
        let mut flatten = Vec::with_capacity(config.flatten.len());
        for f in config.flatten {
            let (path, prefix) = match f {
                Flatten::Path(p) => (p, String::new()),
                Flatten::WithPrefix { path, prefix } => (path, prefix),
            };
            if path.last_key().is_none() {
                return Err(Error::invalid_config(format!(
                    "flatten: `{path}` must end with a key"
                )));
            }
            flatten.push((path, prefix));
        }
        Ok(Self {
            allow: config.allow.as_deref().map(Selection::new),
            deny: config.deny,
            rename,
            flatten,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.reads_response_body().response_only()
    }

    fn on_response(&self, _ctx: &Context, mut response: Response) -> Result<Response, Error> {
        if !response.is_success() || !is_json(&response) {
            debug!(
                "fields: left a {} non-JSON or non-2xx response alone",
                response.status
            );
            return Ok(response);
        }
        let doc: Value = response.json_body()?;
        response.set_json(&self.reshape(doc))?;
        Ok(response)
    }
}

bff_plugin_sdk::export!(Fields);

#[cfg(test)]
mod tests {
    use super::*;
    use bff_plugin_sdk::testing::Harness;
    use bff_plugin_sdk::{ErrorKind, Request};
    use serde_json::json;

    fn doc() -> Value {
        json!({
            "user": {"id": "u-1", "email": "a@x", "name": {"first": "Ada", "display": "Ada L."},
                     "loyalty": {"tier": "gold", "points": 10, "benefits": ["x"]}},
            "orders": {"orders": [
                {"id": "o-1", "status": "shipped", "total": {"amount": 5, "formatted": "€5"}, "thumbnail": "t1"},
                {"id": "o-2", "status": "delivered", "total": {"amount": 6, "formatted": "€6"}, "thumbnail": "t2"}
            ], "total_count": 2}
        })
    }

    fn run(config: Value, resp: Response) -> Response {
        let h = Harness::<Fields>::new(config).expect("valid config");
        h.on_response(resp).expect("on_response")
    }

    #[test]
    fn allow_deny_rename_flatten_in_order() {
        let cfg = json!({
            "allow": ["user.name.display", "user.loyalty", "orders.orders[].id", "orders.orders[].status", "orders.orders[].total.formatted"],
            "deny": ["user.loyalty.benefits"],
            "rename": {"user.name.display": "name", "orders.orders[].total": "price"},
            "flatten": ["user.name", {"path": "user.loyalty", "prefix": "loyalty_"}],
        });
        let out = run(cfg, Response::json(200, &doc()).expect("json"));
        assert_eq!(
            out.json_body::<Value>().expect("json"),
            json!({
                // display → name inside `name`, then `name` lifted into `user`.
                "user": {"name": "Ada L.", "loyalty_tier": "gold", "loyalty_points": 10},
                "orders": {"orders": [
                    {"id": "o-1", "status": "shipped", "price": {"formatted": "€5"}},
                    {"id": "o-2", "status": "delivered", "price": {"formatted": "€6"}}
                ]}
            })
        );
    }

    #[test]
    fn only_2xx_json_is_touched() {
        let cfg = json!({"deny": ["user"]});
        let err = Response::json(500, &doc()).expect("json");
        assert_eq!(run(cfg.clone(), err.clone()), err);
        let text = Response::text(200, "{\"user\": 1}");
        assert_eq!(run(cfg.clone(), text.clone()), text);
        let problem = Response::json(200, &json!({"user": 1, "x": 2}))
            .expect("json")
            .with_header("content-type", "application/problem+json");
        let out = run(cfg, problem);
        assert_eq!(out.json_body::<Value>().expect("json"), json!({"x": 2}));
    }

    #[test]
    fn broken_json_fails_instead_of_leaking() {
        let h = Harness::<Fields>::new(json!({"deny": ["secret"]})).expect("valid");
        let mut resp = Response::json(200, &json!({})).expect("json");
        resp.body = b"{\"secret\": ".to_vec();
        assert_eq!(
            h.on_response(resp).expect_err("broken").kind,
            ErrorKind::BadInput
        );
    }

    #[test]
    fn runs_as_a_response_phase_plugin() {
        let h = Harness::<Fields>::new(json!({"allow": ["a"]})).expect("valid");
        assert!(h.capabilities().reads_response_body);
        assert!(
            !h.capabilities().handles_request,
            "never called in the request phase"
        );
        let out = h
            .request(Request::get("/x"), |_| {
                Response::json(200, &json!({"a": 1, "b": 2})).expect("json")
            })
            .expect("request");
        assert_eq!(out.body, br#"{"a":1}"#);
    }

    #[test]
    fn bad_configs_are_refused_at_load() {
        for (cfg, want) in [
            (json!({}), "nothing to do"),
            (json!({"allow": ["a..b"]}), "empty key"),
            (json!({"rename": {"a[0]": "b"}}), "must end with a key"),
            (json!({"rename": {"a": ""}}), "empty new name"),
            (json!({"flatten": ["a[]"]}), "must end with a key"),
            (json!({"allow": "a"}), "allow"),
            (json!({"keep": ["a"]}), "unknown field `keep`"),
        ] {
            let err = Harness::<Fields>::new(cfg).expect_err(want);
            assert_eq!(err.kind, ErrorKind::InvalidConfig);
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }
}
