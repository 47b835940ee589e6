//! `aggregate`: answers a request by calling several upstream services at once and merging their
//! JSON into one document, so a screen needs one round trip instead of several.
//!
//! Each configured call has an output key, a service, a path template (`{param.id}`,
//! `{attr.tier}`, `{header.x-user}`, `{query.page}`, or `{call.user.account.id}`: a value from
//! another call's JSON), an optional timeout and a `required` flag. Calls that need no other
//! call's result start together, so the total time is that of the slowest; a call that needs
//! one starts once that one has answered (dependencies form no cycle: checked at load). A
//! failed optional call is reported in an `errors` section and the `x-bff-partial` header; a
//! failed required call makes the answer a 502 `aggregate_failed`.

use std::collections::BTreeMap;
use std::time::Duration;

use bff_plugin_sdk::json::Path;
use bff_plugin_sdk::template::Part;
use bff_plugin_sdk::{
    Action, Context, Error, ErrorKind, Pending, Plugin, Request, Response, send, send_with_timeout,
    warn,
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
    /// Path (and query) on the service, with `{param.X}`, `{attr.X}`, `{header.X}`,
    /// `{query.X}` and `{call.KEY.PATH}` placeholders.
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
    /// A scalar from the JSON of another call (its index once keys are resolved; `None` for
    /// that call's whole document).
    Call {
        name: String,
        key: String,
        call: usize,
        path: Option<Path>,
    },
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
    /// The calls whose results its path needs (indices, no repeats).
    deps: Vec<usize>,
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
                    "`{{{name}}}` must be `{{param.X}}`, `{{attr.X}}`, `{{header.X}}`, `{{query.X}}` or `{{call.KEY.PATH}}`"
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
                "call" => {
                    // The call's key runs to the first `.` or `[`; the rest is a JSON path.
                    let split = field.find(['.', '[']).unwrap_or(field.len());
                    let (call_key, rest) = field.split_at(split);
                    let rest = rest.strip_prefix('.').unwrap_or(rest);
                    let path = if rest.is_empty() {
                        None
                    } else {
                        Some(rest.parse::<Path>().map_err(|e| bad(e.message))?)
                    };
                    Piece::Call {
                        name: name.to_owned(),
                        key: call_key.to_owned(),
                        call: usize::MAX,
                        path,
                    }
                }
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

/// What a call came to: its section of the answer, or its entry in the errors section.
type Outcome = Result<Value, Value>;

/// A JSON scalar as a path value (strings as they are); `None` for anything else.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Planned {
    /// The path with every placeholder filled in, or which value is missing. `done` holds the
    /// outcome of every call this one depends on.
    fn render(
        &self,
        ctx: &Context,
        req: &Request,
        done: &[Option<Outcome>],
    ) -> Result<String, String> {
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
                Piece::Call {
                    name, call, path, ..
                } => {
                    let doc = match done.get(*call) {
                        Some(Some(Ok(doc))) => Some(doc),
                        _ => None,
                    };
                    let value = doc.and_then(|d| match path {
                        Some(p) => p.get(d),
                        None => Some(d),
                    });
                    (name.clone(), value.and_then(scalar))
                }
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

/// Points every `{call.KEY...}` placeholder at its call and fills in `deps`; refuses a key
/// that is no call, a call that needs itself, and calls that need each other in a cycle.
fn resolve_dependencies(calls: &mut [Planned]) -> Result<(), Error> {
    let index: BTreeMap<String, usize> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| (c.key.clone(), i))
        .collect();
    for (i, call) in calls.iter_mut().enumerate() {
        for piece in &mut call.path {
            let Piece::Call {
                name,
                key,
                call: at,
                ..
            } = piece
            else {
                continue;
            };
            let bad =
                |why: String| Error::invalid_config(format!("calls.{}.path: {why}", call.key));
            *at = *index
                .get(key.as_str())
                .ok_or_else(|| bad(format!("`{{{name}}}` names no call `{key}`")))?;
            if *at == i {
                return Err(bad(format!("`{{{name}}}` is the call's own result")));
            }
            if !call.deps.contains(at) {
                call.deps.push(*at);
            }
        }
    }
    // Depth-first search for a cycle: a call met again while on the current path closes one.
    fn visit(
        i: usize,
        calls: &[Planned],
        done: &mut [bool],
        path: &mut Vec<usize>,
    ) -> Result<(), Error> {
        if done[i] {
            return Ok(());
        }
        if let Some(start) = path.iter().position(|&p| p == i) {
            let mut names: Vec<&str> = path[start..]
                .iter()
                .map(|&p| calls[p].key.as_str())
                .collect();
            names.push(&calls[i].key);
            return Err(Error::invalid_config(format!(
                "calls.{}.path: the calls need each other's results in a cycle: {}",
                calls[i].key,
                names.join(" -> ")
            )));
        }
        path.push(i);
        for &d in &calls[i].deps {
            visit(d, calls, done, path)?;
        }
        path.pop();
        done[i] = true;
        Ok(())
    }
    let mut done = vec![false; calls.len()];
    for i in 0..calls.len() {
        visit(i, calls, &mut done, &mut Vec::new())?;
    }
    Ok(())
}

/// Why a call produced no section, for the `errors` section.
fn failure(status: Option<u16>, code: &str, message: String) -> Value {
    json!({ "status": status, "code": code, "message": message })
}

impl Aggregate {
    /// Sends call `i`, its path rendered with `done` (which holds what it depends on), or says
    /// why it cannot be sent: a dependency failed, a placeholder has no value, or the proxy
    /// refused the call.
    fn start(
        &self,
        i: usize,
        ctx: &Context,
        request: &Request,
        done: &[Option<Outcome>],
    ) -> Result<Pending, Value> {
        let call = &self.calls[i];
        if let Some(&d) = call.deps.iter().find(|&&d| matches!(done[d], Some(Err(_)))) {
            let message = format!("`{}` needs `{}`, which failed", call.key, self.calls[d].key);
            return Err(failure(None, "dependency_failed", message));
        }
        let path = call
            .render(ctx, request, done)
            .map_err(|why| failure(None, "bad_request", why))?;
        let mut req = Request::new(call.method.clone(), path);
        for name in &self.forward_headers {
            for value in request.headers.get_all(name) {
                req.headers.append(name, value);
            }
        }
        req.headers.set("accept", "application/json");
        match call.timeout {
            Some(t) => send_with_timeout(&call.service, &req, t),
            None => send(&call.service, &req),
        }
        .map_err(|e| self.finish_error(i, e))
    }

    /// The outcome of call `i` from its response.
    fn finish(&self, i: usize, result: Result<Response, Error>) -> Outcome {
        let call = &self.calls[i];
        match result {
            Ok(resp) if resp.is_success() => resp
                .json_body::<Value>()
                .map_err(|e| self.failed(i, failure(Some(resp.status), "invalid_json", e.message))),
            Ok(resp) => Err(self.failed(
                i,
                failure(
                    Some(resp.status),
                    "upstream_status",
                    format!("`{}` answered {}", call.service, resp.status),
                ),
            )),
            Err(e) => Err(self.finish_error(i, e)),
        }
    }

    /// The errors-section entry of call `i` that got no response.
    fn finish_error(&self, i: usize, e: Error) -> Value {
        let code = match e.kind {
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Limit => "limit",
            _ => "unavailable",
        };
        self.failed(i, failure(None, code, e.message))
    }

    /// Logs a call that failed at its service (or at the proxy), and passes its entry on.
    fn failed(&self, i: usize, why: Value) -> Value {
        let call = &self.calls[i];
        warn!(
            "aggregate call `{}` to `{}` failed: {}",
            call.key, call.service, why["message"]
        );
        why
    }
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
                deps: Vec::new(),
            });
        }
        resolve_dependencies(&mut calls)?;
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
        let n = self.calls.len();
        let mut done: Vec<Option<Outcome>> = vec![None; n];
        let mut running: Vec<Option<Pending>> = (0..n).map(|_| None).collect();
        let mut started = vec![false; n];
        loop {
            // Start every call whose dependencies are done (a failed start may make more
            // ready, so until none is).
            while let Some(i) = (0..n)
                .find(|&i| !started[i] && self.calls[i].deps.iter().all(|&d| done[d].is_some()))
            {
                started[i] = true;
                match self.start(i, ctx, &request, &done) {
                    Ok(pending) => running[i] = Some(pending),
                    Err(why) => done[i] = Some(Err(why)),
                }
            }
            // Wait for a running call, first one a call not started yet depends on: calls
            // start as soon as the calls they need have been waited for.
            let needed = |i: usize| (0..n).any(|j| !started[j] && self.calls[j].deps.contains(&i));
            let Some(i) = (0..n)
                .filter(|&i| running[i].is_some())
                .min_by_key(|&i| !needed(i))
            else {
                break;
            };
            let Some(pending) = running[i].take() else {
                break;
            };
            done[i] = Some(self.finish(i, pending.wait()));
        }

        let mut doc = Map::new();
        let mut errors = Map::new();
        let mut required_failed = Vec::new();
        for (call, outcome) in self.calls.iter().zip(done) {
            match outcome {
                Some(Ok(section)) => {
                    doc.insert(call.key.clone(), section);
                }
                Some(Err(why)) => {
                    if call.required {
                        required_failed.push(call.key.clone());
                    }
                    errors.insert(call.key.clone(), why);
                }
                None => unreachable!("every call is started and waited for"),
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

    /// `user` first, then `orders` with the account id from `user`'s answer; `recs` needs
    /// nothing and is optional.
    fn dependent() -> Harness<Aggregate> {
        let mut h = Harness::<Aggregate>::new(json!({
            "calls": {
                "user": { "service": "users", "path": "/users/{param.id}" },
                "orders": { "service": "orders", "path": "/accounts/{call.user.account.id}/orders?n={call.user.limits[0]}" },
                "recs": { "service": "recs", "path": "/users/{param.id}/recs", "required": false },
            }
        }))
        .expect("valid config");
        h.context(bff_plugin_sdk::Context::new("web").with_param("id", "u-1"));
        h.upstream(
            "users",
            "/users/u-1",
            ok(json!({"name": "Ada", "account": {"id": "a 7"}, "limits": [5]})),
        );
        h.upstream_fn("orders", |r| Response::json(200, &json!({"uri": r.uri})));
        h.upstream("recs", "/users/u-1/recs", ok(json!({"items": []})));
        h
    }

    #[test]
    fn a_call_can_use_values_from_another_calls_answer() {
        let h = dependent();
        let r = respond(&h, Request::get("/home"));
        assert_eq!(r.status, 200, "{:?}", body(&r));
        let b = body(&r);
        assert_eq!(b["orders"]["uri"], "/accounts/a%207/orders?n=5");
        assert_eq!(b["user"]["name"], "Ada");
        // Calls that need nothing go out first, together; `orders` once `user` has answered.
        let order: Vec<String> = h.sent().into_iter().map(|(s, _)| s).collect();
        assert_eq!(order, ["recs", "users", "orders"]);
    }

    #[test]
    fn a_failed_or_unusable_dependency_fails_the_calls_that_need_it() {
        // `user` fails: `orders` is never sent, and says why.
        let mut h = dependent();
        h.upstream(
            "users",
            "/users/u-1",
            Response::json(503, &json!({})).expect("json"),
        );
        let r = respond(&h, Request::get("/home"));
        assert_eq!(r.status, 502);
        let failed = &body(&r)["error"]["failed"];
        assert_eq!(failed["user"]["code"], "upstream_status");
        assert_eq!(failed["orders"]["code"], "dependency_failed");
        assert_eq!(
            failed["orders"]["message"],
            "`orders` needs `user`, which failed"
        );
        assert!(h.sent().iter().all(|(s, _)| s != "orders"));

        // `user` answers without the value (or with one that is not a scalar): bad_request.
        for user in [
            json!({"account": {}}),
            json!({"account": {"id": {"deep": 1}}, "limits": [5]}),
        ] {
            let mut h = dependent();
            h.upstream("users", "/users/u-1", ok(user));
            let r = respond(&h, Request::get("/home"));
            assert_eq!(r.status, 502);
            let failed = &body(&r)["error"]["failed"];
            assert_eq!(failed["orders"]["code"], "bad_request", "{failed}");
            assert!(
                failed["orders"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("{call.user.account.id}"),
                "{failed}"
            );
        }
    }

    #[test]
    fn dependency_chains_run_in_order() {
        let mut h = Harness::<Aggregate>::new(json!({
            "calls": {
                "c": { "service": "s", "path": "/c/{call.b.next}" },
                "b": { "service": "s", "path": "/b/{call.a.next}" },
                "a": { "service": "s", "path": "/a" },
            }
        }))
        .expect("valid config");
        h.upstream_fn("s", |r| {
            let next = format!("{}x", r.uri.rsplit('/').next().unwrap_or_default());
            Response::json(200, &json!({"next": next}))
        });
        let r = respond(&h, Request::get("/"));
        assert_eq!(r.status, 200);
        let uris: Vec<String> = h.sent().into_iter().map(|(_, r)| r.uri).collect();
        assert_eq!(uris, ["/a", "/b/ax", "/c/axx"]);
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
            (
                json!({"calls": {"a": {"service": "s", "path": "/{call.b.id}"}}}),
                "calls.a.path: `{call.b.id}` names no call `b`",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/{call.a.id}"}}}),
                "calls.a.path: `{call.a.id}` is the call's own result",
            ),
            (
                json!({"calls": {
                    "a": {"service": "s", "path": "/{call.b.id}"},
                    "b": {"service": "s", "path": "/{call.c.id}"},
                    "c": {"service": "s", "path": "/{call.a.id}"},
                }}),
                "the calls need each other's results in a cycle: a -> b -> c -> a",
            ),
            (
                json!({"calls": {"a": {"service": "s", "path": "/{call.b.x[}"}, "b": {"service": "s", "path": "/"}}}),
                "calls.a.path: invalid JSON path `x[`",
            ),
        ] {
            let err = Harness::<Aggregate>::new(cfg).expect_err(want);
            assert_eq!(err.kind, ErrorKind::InvalidConfig);
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }
}
