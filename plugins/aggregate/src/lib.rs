//! `aggregate`: answers a request by calling several upstream services at once and merging their
//! JSON into one document, so a screen needs one round trip instead of several.
//!
//! Each configured call has an output key, a service, a path template (`{param.id}`,
//! `{attr.tier}`, `{header.x-user}`, `{query.page}`), an optional timeout and a `required` flag.
//! All calls start together ([`fan_out`]), so the total time is that of the slowest call. A
//! failed optional call is reported in an `errors` section and the `x-bff-partial` header; a
//! failed required call makes the answer a 502 `aggregate_failed`.

use std::collections::BTreeMap;
use std::time::Duration;

use bff_plugin_sdk::template::Part;
use bff_plugin_sdk::{
    Action, Call, Context, Error, ErrorKind, Plugin, Request, Response, fan_out, warn,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The header listing the keys of failed optional calls.
pub const PARTIAL_HEADER: &str = "x-bff-partial";

/// The plugin's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Output key → the call whose JSON goes there.
    pub calls: BTreeMap<String, CallConfig>,
    /// Request headers copied onto every call (e.g. `accept-language`).
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// The key of the section listing failed optional calls.
    #[serde(default = "default_errors_key")]
    pub errors_key: String,
}

fn default_errors_key() -> String {
    "errors".to_owned()
}

/// One upstream call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallConfig {
    /// The service's name in the proxy config (the route must list it in `egress`).
    pub service: String,
    /// Path (and query) on the service, with `{param.X}`, `{attr.X}`, `{header.X}` and
    /// `{query.X}` placeholders.
    pub path: String,
    /// HTTP method (default `GET`).
    #[serde(default = "default_method")]
    pub method: String,
    /// Bound on the wait for this call's response head, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// If this call fails, the whole answer fails (default true).
    #[serde(default = "default_required")]
    pub required: bool,
}

fn default_method() -> String {
    "GET".to_owned()
}

fn default_required() -> bool {
    true
}

/// A piece of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(String),
    Attr(String),
    Header(String),
    Query(String),
}

/// A parsed call.
#[derive(Debug)]
struct Planned {
    key: String,
    service: String,
    method: String,
    path: Vec<Piece>,
    timeout: Option<Duration>,
    required: bool,
}

/// The `aggregate` plugin.
#[derive(Debug)]
pub struct Aggregate {
    calls: Vec<Planned>,
    forward_headers: Vec<String>,
    errors_key: String,
}

fn parse_template(key: &str, template: &str) -> Result<Vec<Piece>, Error> {
    let bad = |why: String| Error::invalid_config(format!("calls.{key}.path: {why}"));
    if !template.starts_with('/') {
        return Err(bad(format!("must start with `/`, got `{template}`")));
    }
    let parts = bff_plugin_sdk::template::parse(template).map_err(|e| bad(e.message))?;
    parts
        .into_iter()
        .map(|part| {
            let name = match part {
                Part::Text(t) => return Ok(Piece::Text(t.to_owned())),
                Part::Placeholder(name) => name,
            };
            let (source, field) = name.split_once('.').ok_or_else(|| {
                bad(format!(
                    "`{{{name}}}` must be `{{param.X}}`, `{{attr.X}}`, `{{header.X}}` or `{{query.X}}`"
                ))
            })?;
            if field.is_empty() {
                return Err(bad(format!("`{{{name}}}` names no field")));
            }
            Ok(match source {
                "param" => Piece::Param(field.to_owned()),
                "attr" => Piece::Attr(field.to_owned()),
                "header" => Piece::Header(field.to_ascii_lowercase()),
                "query" => Piece::Query(field.to_owned()),
                other => {
                    return Err(bad(format!(
                        "unknown placeholder source `{other}` in `{{{name}}}`"
                    )));
                }
            })
        })
        .collect()
}

/// Percent-encodes a value for a path segment or query value: everything but RFC 3986
/// unreserved characters, so a value can never add a segment, a query or a fragment.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Planned {
    /// The path with every placeholder filled in, or which value is missing.
    fn render(&self, ctx: &Context, req: &Request) -> Result<String, String> {
        let mut out = String::new();
        for piece in &self.path {
            let (what, value) = match piece {
                Piece::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Piece::Param(n) => (format!("param.{n}"), ctx.param(n).map(str::to_owned)),
                Piece::Attr(n) => (format!("attr.{n}"), ctx.attribute(n).map(str::to_owned)),
                Piece::Header(n) => (format!("header.{n}"), req.headers.get(n).map(str::to_owned)),
                Piece::Query(n) => (format!("query.{n}"), req.query_param(n)),
            };
            match value {
                // `.` and `..` would climb the service's path: never a valid id.
                Some(v) if !v.is_empty() && v != "." && v != ".." => out.push_str(&encode(&v)),
                _ => return Err(format!("no usable value for `{{{what}}}`")),
            }
        }
        Ok(out)
    }
}

/// Why a call produced no section, for the `errors` section.
fn failure(status: Option<u16>, code: &str, message: String) -> Value {
    json!({ "status": status, "code": code, "message": message })
}

impl Plugin for Aggregate {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        if config.calls.is_empty() {
            return Err(Error::invalid_config("calls: at least one call is needed"));
        }
        let mut calls = Vec::with_capacity(config.calls.len());
        for (key, c) in config.calls {
            if key == config.errors_key {
                return Err(Error::invalid_config(format!(
                    "calls.{key}: the key is taken by the errors section (see `errors_key`)"
                )));
            }
            if c.service.is_empty() {
                return Err(Error::invalid_config(format!(
                    "calls.{key}.service is empty"
                )));
            }
            calls.push(Planned {
                path: parse_template(&key, &c.path)?,
                method: c.method.to_ascii_uppercase(),
                timeout: c.timeout_ms.map(Duration::from_millis),
                required: c.required,
                service: c.service,
                key,
            });
        }
        Ok(Self {
            calls,
            forward_headers: config
                .forward_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            errors_key: config.errors_key,
        })
    }

    fn on_request(&self, ctx: &Context, request: Request) -> Result<Action, Error> {
        let mut errors = Map::new();
        let mut required_failed = Vec::new();
        // Calls whose path renders run; the others fail before any request is made.
        let mut planned = Vec::new();
        let mut to_send = Vec::new();
        for call in &self.calls {
            match call.render(ctx, &request) {
                Ok(path) => {
                    let mut req = Request::new(call.method.clone(), path);
                    for name in &self.forward_headers {
                        for value in request.headers.get_all(name) {
                            req.headers.append(name, value);
                        }
                    }
                    req.headers.set("accept", "application/json");
                    let mut c = Call::new(call.service.clone(), req);
                    c.timeout = call.timeout;
                    planned.push(call);
                    to_send.push(c);
                }
                Err(why) => {
                    if call.required {
                        required_failed.push(call.key.clone());
                    }
                    errors.insert(call.key.clone(), failure(None, "bad_request", why));
                }
            }
        }
        let mut doc = Map::new();
        for (call, result) in planned.into_iter().zip(fan_out(&to_send)) {
            let section = match result {
                Ok(resp) if resp.is_success() => resp
                    .json_body::<Value>()
                    .map_err(|e| failure(Some(resp.status), "invalid_json", e.message)),
                Ok(resp) => Err(failure(
                    Some(resp.status),
                    "upstream_status",
                    format!("`{}` answered {}", call.service, resp.status),
                )),
                Err(e) => Err(failure(
                    None,
                    match e.kind {
                        ErrorKind::Forbidden => "forbidden",
                        ErrorKind::Limit => "limit",
                        _ => "unavailable",
                    },
                    e.message,
                )),
            };
            match section {
                Ok(v) => {
                    doc.insert(call.key.clone(), v);
                }
                Err(why) => {
                    warn!(
                        "aggregate call `{}` to `{}` failed: {}",
                        call.key, call.service, why["message"]
                    );
                    if call.required {
                        required_failed.push(call.key.clone());
                    }
                    errors.insert(call.key.clone(), why);
                }
            }
        }
        if !required_failed.is_empty() {
            let body = json!({
                "error": {
                    "code": "aggregate_failed",
                    "message": format!("required upstream calls failed: {}", required_failed.join(", ")),
                    "request_id": ctx.request_id,
                    "failed": errors,
                }
            });
            return Ok(Action::Respond(Response::json(502, &body)?));
        }
        let partial: Vec<&str> = errors.keys().map(String::as_str).collect();
        let partial = partial.join(",");
        if !errors.is_empty() {
            doc.insert(self.errors_key.clone(), Value::Object(errors));
        }
        let mut resp = Response::json(200, &Value::Object(doc))?;
        if !partial.is_empty() {
            resp.headers.set(PARTIAL_HEADER, partial);
        }
        Ok(Action::Respond(resp))
    }
}

bff_plugin_sdk::export!(Aggregate);

#[cfg(test)]
mod tests {
    use super::*;
    use bff_plugin_sdk::testing::Harness;

    fn home() -> Value {
        json!({
            "calls": {
                "user": { "service": "users", "path": "/users/{param.id}" },
                "orders": { "service": "orders", "path": "/users/{param.id}/orders?lang={header.accept-language}", "timeout_ms": 300 },
                "recommendations": { "service": "recs", "path": "/users/{param.id}/recs", "required": false },
            },
            "forward_headers": ["accept-language"],
        })
    }

    fn harness() -> Harness<Aggregate> {
        let mut h = Harness::<Aggregate>::new(home()).expect("valid config");
        h.context(bff_plugin_sdk::Context::new("web").with_param("id", "u-1"));
        h.upstream("users", "/users/u-1", ok(json!({"name": "Ada"})));
        h.upstream("orders", "/users/u-1/orders", ok(json!({"orders": [1, 2]})));
        h.upstream("recs", "/users/u-1/recs", ok(json!({"items": ["p-1"]})));
        h
    }

    fn ok(v: Value) -> Response {
        Response::json(200, &v).expect("json")
    }

    fn respond(h: &Harness<Aggregate>, req: Request) -> Response {
        match h.on_request(req).expect("on_request") {
            Action::Respond(r) => r,
            Action::Forward(_) => panic!("aggregate always answers"),
        }
    }

    fn body(r: &Response) -> Value {
        r.json_body().expect("JSON body")
    }

    #[test]
    fn merges_every_call_and_forwards_headers() {
        let h = harness();
        let r = respond(
            &h,
            Request::get("/home").with_header("accept-language", "sv"),
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            body(&r),
            json!({"user": {"name": "Ada"}, "orders": {"orders": [1, 2]}, "recommendations": {"items": ["p-1"]}})
        );
        assert_eq!(r.headers.get(PARTIAL_HEADER), None);
        let sent = h.sent();
        assert_eq!(sent.len(), 3);
        let (_, orders) = sent
            .iter()
            .find(|(s, _)| s == "orders")
            .expect("orders call");
        assert_eq!(orders.uri, "/users/u-1/orders?lang=sv");
        assert_eq!(orders.headers.get("accept-language"), Some("sv"));
    }

    #[test]
    fn optional_failure_is_explicit() {
        let mut h = harness();
        h.upstream(
            "recs",
            "/users/u-1/recs",
            Response::json(503, &json!({})).expect("json"),
        );
        let r = respond(
            &h,
            Request::get("/home").with_header("accept-language", "sv"),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.headers.get(PARTIAL_HEADER), Some("recommendations"));
        let b = body(&r);
        assert_eq!(b["user"]["name"], "Ada");
        assert_eq!(b["errors"]["recommendations"]["status"], 503);
        assert_eq!(b["errors"]["recommendations"]["code"], "upstream_status");
        assert!(b.get("recommendations").is_none());
        assert!(h.logs().iter().any(|(_, m)| m.contains("recommendations")));
    }

    #[test]
    fn required_failure_is_a_502() {
        let mut h = harness();
        h.upstream_error(
            "users",
            "/users/u-1",
            Error::upstream("service `users` did not answer in time"),
        );
        let r = respond(
            &h,
            Request::get("/home").with_header("accept-language", "sv"),
        );
        assert_eq!(r.status, 502);
        let b = body(&r);
        assert_eq!(b["error"]["code"], "aggregate_failed");
        assert_eq!(b["error"]["request_id"], "test-request");
        assert_eq!(b["error"]["failed"]["user"]["code"], "unavailable");
    }

    #[test]
    fn a_missing_template_value_fails_that_call_without_sending_it() {
        let h = harness();
        // No accept-language header: the required orders call cannot be built.
        let r = respond(&h, Request::get("/home"));
        assert_eq!(r.status, 502);
        assert_eq!(body(&r)["error"]["failed"]["orders"]["code"], "bad_request");
        assert!(h.sent().iter().all(|(s, _)| s != "orders"));
    }

    #[test]
    fn values_are_encoded_and_dot_segments_refused() {
        let mut h = Harness::<Aggregate>::new(
            json!({"calls": {"u": {"service": "users", "path": "/users/{param.id}"}}}),
        )
        .expect("valid");
        h.upstream_fn("users", |_| Response::json(200, &json!({})));
        h.context(bff_plugin_sdk::Context::new("web").with_param("id", "a/b?c#d e"));
        respond(&h, Request::get("/"));
        assert_eq!(h.sent()[0].1.uri, "/users/a%2Fb%3Fc%23d%20e");
        h.context(bff_plugin_sdk::Context::new("web").with_param("id", ".."));
        assert_eq!(respond(&h, Request::get("/")).status, 502);
    }

    #[test]
    fn non_json_and_forbidden_calls_are_reported() {
        let mut h = harness();
        h.egress(&["users", "orders"]);
        h.upstream(
            "orders",
            "/users/u-1/orders",
            Response::text(200, "not json"),
        );
        let r = respond(
            &h,
            Request::get("/home").with_header("accept-language", "sv"),
        );
        let b = body(&r);
        assert_eq!(b["error"]["failed"]["orders"]["code"], "invalid_json");
        assert_eq!(b["error"]["failed"]["recommendations"]["code"], "forbidden");
    }

    #[test]
    fn bad_configs_are_refused_at_load_with_the_field() {
        for (cfg, want) in [
            (json!({"calls": {}}), "at least one call"),
            (
                json!({"calls": {"a": {"service": "s", "path": "users"}}}),
                "calls.a.path: must start with `/`",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/u/{id}"}}}),
                "must be `{param.X}`",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/u/{cookie.x}"}}}),
                "unknown placeholder source `cookie`",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/u/{param.x"}}}),
                "unclosed",
            ),
            (
                json!({"calls": {"errors": {"service": "s", "path": "/"}}}),
                "taken by the errors section",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/", "timeout_ms": "x"}}}),
                "calls.a.timeout_ms",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/", "retries": 3}}}),
                "unknown field `retries`",
            ),
        ] {
            let err = Harness::<Aggregate>::new(cfg).expect_err(want);
            assert_eq!(err.kind, ErrorKind::InvalidConfig);
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }
}
