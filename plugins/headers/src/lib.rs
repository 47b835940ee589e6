//! `headers`: sets and removes header fields per client, on the request to the upstream and on
//! the response to the client, without touching bodies: tag upstream calls with who asked
//! (`x-tenant = "{attr.tenant}"`), give a client its caching policy (`cache-control`), and hide
//! what the internal services say about themselves (`server`, `x-powered-by`, `x-internal-*`).
//!
//! Each phase removes first, then sets, so `remove = ["x-debug-*"]` with
//! `set = { x-debug-client = "{client}" }` keeps only the value set here. Values are templates:
//! `{client}`, `{route}`, `{request_id}`, `{param.NAME}` (a route path parameter) and
//! `{attr.NAME}` (a client attribute); a placeholder with no value (a parameter the route does
//! not capture, an attribute the client lacks) becomes empty text.
//!
//! Names and values are checked when the plugin loads, so a typo fails the reload, not a
//! request. The response phase is only called when `response` has something to do.

use std::collections::BTreeMap;

use bff_plugin_sdk::template::{self, Part};
use bff_plugin_sdk::{Action, Capabilities, Context, Error, Headers, Plugin, Request, Response};
use serde::Deserialize;

/// The plugin's config: what to do on each phase.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Changes to the request before it goes upstream.
    #[serde(default)]
    pub request: PhaseConfig,
    /// Changes to the response before it goes to the client.
    #[serde(default)]
    pub response: PhaseConfig,
}

/// The changes on one phase.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseConfig {
    /// Field names to remove; a name ending in `*` removes every field starting with the rest.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Fields to set (replacing every value the field had) to a template.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
}

/// Fields neither phase may set: the proxy owns framing and routing.
const RESERVED: [&str; 4] = ["content-length", "transfer-encoding", "host", "connection"];

/// The `headers` plugin.
#[derive(Debug)]
pub struct HeaderRules {
    request: Phase,
    response: Phase,
}

/// One phase's checked changes.
#[derive(Debug, Default)]
struct Phase {
    remove: Vec<Match>,
    set: Vec<(String, Vec<Value>)>,
}

/// A `remove` entry.
#[derive(Debug)]
enum Match {
    Exact(String),
    Prefix(String),
}

/// A piece of a `set` template.
#[derive(Debug)]
enum Value {
    Text(String),
    Client,
    Route,
    RequestId,
    Param(String),
    Attribute(String),
}

impl Match {
    fn matches(&self, name: &str) -> bool {
        match self {
            Match::Exact(n) => name.eq_ignore_ascii_case(n),
            Match::Prefix(p) => name
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
        }
    }
}

impl Phase {
    fn new(config: PhaseConfig, phase: &str, problems: &mut Vec<String>) -> Self {
        let mut remove = Vec::with_capacity(config.remove.len());
        for entry in config.remove {
            let (name, prefix) = match entry.strip_suffix('*') {
                Some(p) => (p, true),
                None => (entry.as_str(), false),
            };
            if prefix && name.is_empty() {
                problems.push(format!(
                    "{phase}.remove: `*` would remove every field; name them"
                ));
                continue;
            }
            if !is_token(name) {
                problems.push(format!("{phase}.remove: `{entry}` is not a header name"));
                continue;
            }
            let name = name.to_ascii_lowercase();
            remove.push(if prefix {
                Match::Prefix(name)
            } else {
                Match::Exact(name)
            });
        }
        let mut set = Vec::with_capacity(config.set.len());
        for (name, value) in config.set {
            let lower = name.to_ascii_lowercase();
            if !is_token(&name) {
                problems.push(format!("{phase}.set: `{name}` is not a header name"));
            } else if RESERVED.contains(&lower.as_str()) {
                problems.push(format!(
                    "{phase}.set: `{name}` is managed by the proxy and cannot be set"
                ));
            } else {
                match parse_value(&value) {
                    Ok(parts) => set.push((lower, parts)),
                    Err(why) => problems.push(format!("{phase}.set.{name}: {why}")),
                }
            }
        }
        Phase { remove, set }
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }

    fn apply(&self, ctx: &Context, headers: &mut Headers) {
        if !self.remove.is_empty() {
            headers
                .0
                .retain(|(name, _)| !self.remove.iter().any(|m| m.matches(name)));
        }
        for (name, parts) in &self.set {
            headers.set(name, render(parts, ctx));
        }
    }
}

/// RFC 9110 `token`: the characters a field name may have.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_value(value: &str) -> Result<Vec<Value>, String> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("a value cannot hold control characters (CR, LF, ...)".into());
    }
    let parts = template::parse(value).map_err(|e| e.message)?;
    parts
        .into_iter()
        .map(|part| match part {
            Part::Text(t) => Ok(Value::Text(t.to_owned())),
            Part::Placeholder("client") => Ok(Value::Client),
            Part::Placeholder("route") => Ok(Value::Route),
            Part::Placeholder("request_id") => Ok(Value::RequestId),
            Part::Placeholder(p) => match (p.strip_prefix("param."), p.strip_prefix("attr.")) {
                (Some(name), _) if !name.is_empty() => Ok(Value::Param(name.to_owned())),
                (_, Some(name)) if !name.is_empty() => Ok(Value::Attribute(name.to_owned())),
                _ => Err(format!(
                    "unknown placeholder `{{{p}}}` in `{value}` (known: client, route, \
                     request_id, param.NAME, attr.NAME)"
                )),
            },
        })
        .collect()
}

/// The template's text for this request. Values the proxy hands over are valid field values
/// (names, ids, path segments), so the result is one too.
fn render(parts: &[Value], ctx: &Context) -> String {
    let mut out = String::new();
    for part in parts {
        out.push_str(match part {
            Value::Text(t) => t,
            Value::Client => &ctx.client,
            Value::Route => &ctx.route,
            Value::RequestId => &ctx.request_id,
            Value::Param(name) => ctx.param(name).unwrap_or(""),
            Value::Attribute(name) => ctx.attribute(name).unwrap_or(""),
        });
    }
    out
}

impl Plugin for HeaderRules {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        let mut problems = Vec::new();
        let request = Phase::new(config.request, "request", &mut problems);
        let response = Phase::new(config.response, "response", &mut problems);
        if problems.is_empty() && request.is_empty() && response.is_empty() {
            problems.push("nothing to do: give `request` or `response` a `set` or `remove`".into());
        }
        if !problems.is_empty() {
            return Err(Error::invalid_config(problems.join("; ")));
        }
        Ok(HeaderRules { request, response })
    }

    fn capabilities(&self) -> Capabilities {
        match (self.request.is_empty(), self.response.is_empty()) {
            (_, true) => Capabilities::NONE,
            // Headers only: the body streams past the plugin.
            (false, false) => Capabilities::NONE.handles_response(),
            (true, false) => Capabilities::NONE.handles_response().response_only(),
        }
    }

    fn on_request(&self, ctx: &Context, mut request: Request) -> Result<Action, Error> {
        self.request.apply(ctx, &mut request.headers);
        Ok(Action::Forward(request))
    }

    fn on_response(&self, ctx: &Context, mut response: Response) -> Result<Response, Error> {
        self.response.apply(ctx, &mut response.headers);
        Ok(response)
    }
}

bff_plugin_sdk::export!(HeaderRules);

#[cfg(test)]
mod tests {
    use super::*;
    use bff_plugin_sdk::testing::Harness;
    use serde_json::json;

    fn harness(config: serde_json::Value) -> Harness<HeaderRules> {
        let mut h = Harness::new(config).expect("a valid config");
        h.context(
            Context::new("mobile")
                .with_route("home")
                .with_param("id", "u-1")
                .with_attribute("tenant", "acme"),
        );
        h
    }

    #[test]
    fn request_fields_are_removed_then_set_from_templates() {
        let h = harness(json!({"request": {
            "remove": ["cookie", "X-Debug-*"],
            "set": {"x-tenant": "{attr.tenant}", "x-debug-who": "{client}/{route}/{param.id}",
                    "x-missing": "[{attr.none}]"}
        }}));
        assert_eq!(h.capabilities(), Capabilities::NONE, "no response phase");
        let req = Request::get("/api/home")
            .with_header("cookie", "session=1")
            .with_header("x-debug-trace", "1")
            .with_header("x-debug-who", "forged")
            .with_header("accept", "application/json");
        let Action::Forward(req) = h.on_request(req).expect("ok") else {
            panic!("forwards")
        };
        let fields: Vec<(&str, &str)> = req.headers.iter().collect();
        assert_eq!(
            fields,
            [
                ("accept", "application/json"),
                ("x-debug-who", "mobile/home/u-1"),
                ("x-missing", "[]"),
                ("x-tenant", "acme"),
            ]
        );
    }

    #[test]
    fn response_fields_hide_the_upstream() {
        let h = harness(json!({"response": {
            "remove": ["server", "x-powered-by", "x-internal-*"],
            "set": {"cache-control": "private, max-age=60"}
        }}));
        assert_eq!(
            h.capabilities(),
            Capabilities::NONE.handles_response().response_only(),
            "no request phase"
        );
        let resp = Response::text(200, "hi")
            .with_header("server", "orders/1.4 (internal-7)")
            .with_header("x-internal-host", "10.0.3.7")
            .with_header("X-Internal-Trace", "abc")
            .with_header("cache-control", "no-store")
            .with_header("x-internalish", "kept");
        let resp = h.on_response(resp).expect("ok");
        assert!(
            resp.body.is_empty(),
            "the body streams past: the plugin never gets it"
        );
        assert_eq!(resp.headers.get("server"), None);
        assert_eq!(resp.headers.get("x-internal-host"), None);
        assert_eq!(resp.headers.get("x-internal-trace"), None);
        assert_eq!(resp.headers.get("x-internalish"), Some("kept"));
        assert_eq!(
            resp.headers.get_all("cache-control").collect::<Vec<_>>(),
            ["private, max-age=60"]
        );
    }

    #[test]
    fn bad_configs_are_refused_at_load_with_every_problem() {
        let Err(err) = Harness::<HeaderRules>::new(json!({
            "request": {"remove": ["bad name", "*"], "set": {"host": "x", "x-a": "{nope}",
                        "x-b": "a\r\nb", "x-c": "{param.id"}},
            "response": {"set": {"Content-Length": "1"}}
        })) else {
            panic!("an invalid config was accepted");
        };
        for part in [
            "request.remove: `bad name` is not a header name",
            "`*` would remove every field",
            "`host` is managed by the proxy",
            "unknown placeholder `{nope}`",
            "control characters",
            "unclosed `{`",
            "response.set: `Content-Length` is managed by the proxy",
        ] {
            assert!(err.message.contains(part), "{part}: {}", err.message);
        }
        for bad in [json!({}), json!({"request": {}}), json!({"requests": {}})] {
            assert!(Harness::<HeaderRules>::new(bad.clone()).is_err(), "{bad}");
        }
    }
}
