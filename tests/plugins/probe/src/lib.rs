//! `probe`: the test suite's plugin. Its `mode` (from the plugin config) picks a behaviour, from
//! well-behaved (tag headers, answer directly, fan out, rewrite bodies) to hostile (spin forever,
//! eat memory, panic, trap, send where it may not, flood sends, return invalid output).
//! Written against the raw WIT so it can do what the SDK would never let a plugin do.

wit_bindgen::generate!({ path: "../../../plugin-sdk/wit", world: "plugin" });

use bff::plugin::host;
use bff::plugin::types::{
    Action, Capabilities, Context, ErrorKind, PluginError, Request, Response,
};
use serde_json::{Value, json};

struct Probe;

/// The build's version marker. The hot-reload tests make a second version of this plugin by
/// patching these bytes in the `.wasm` file (same length), so it must be read from memory at
/// run time, never folded into the code.
static VERSION: [u8; 24] = *b"probe-version:AAAAAAAAAA";

/// Requests this instance has seen in the request phase (`tag` mode): 1 on every request when
/// each gets a fresh instance, counting up when instances are reused.
static SERVED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// The same for the response phase.
static ANSWERED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn version() -> String {
    let bytes: &[u8; 24] = std::hint::black_box(&VERSION);
    String::from_utf8_lossy(&bytes[14..]).into_owned()
}

fn config() -> Value {
    serde_json::from_str(&host::config()).unwrap_or(Value::Null)
}

fn mode(cfg: &Value) -> &str {
    cfg["mode"].as_str().unwrap_or("tag")
}

fn name(cfg: &Value) -> String {
    cfg["name"].as_str().unwrap_or("probe").to_owned()
}

fn flag(cfg: &Value, key: &str, default: bool) -> bool {
    cfg[key].as_bool().unwrap_or(default)
}

fn err(kind: ErrorKind, message: &str) -> PluginError {
    PluginError {
        kind,
        message: message.to_owned(),
    }
}

fn json_response(status: u16, value: &Value) -> Response {
    Response {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: value.to_string().into_bytes(),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn append_order(headers: &mut Vec<(String, String)>, key: &str, name: &str) {
    let order = match header(headers, key) {
        Some(prev) => format!("{prev},{name}"),
        None => name.to_owned(),
    };
    headers.retain(|(k, _)| k != key);
    headers.push((key.to_owned(), order));
}

/// Sends every call of `calls`, then waits for all of them.
fn fan_out(calls: &[Value]) -> Vec<Value> {
    let started: Vec<Result<u32, PluginError>> = calls
        .iter()
        .map(|c| {
            let req = Request {
                method: "GET".into(),
                uri: c["path"].as_str().unwrap_or("/").to_owned(),
                headers: vec![("x-probe-call".into(), "1".into())],
                body: Vec::new(),
            };
            let timeout = c["timeout_ms"].as_u64().map(|t| t as u32);
            host::send(c["service"].as_str().unwrap_or(""), &req, timeout)
        })
        .collect();
    started
        .into_iter()
        .map(|r| match r.and_then(host::wait) {
            Ok(resp) => json!({
                "status": resp.status,
                "body": serde_json::from_slice::<Value>(&resp.body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&resp.body).into_owned())),
                "client_header": header(&resp.headers, "x-seen-client"),
            }),
            Err(e) => json!({ "error": format!("{:?}", e.kind).to_lowercase(), "message": e.message }),
        })
        .collect()
}

#[inline(never)]
fn spin() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

fn eat_memory() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        chunk[0] = 1;
        hoard.push(std::hint::black_box(chunk));
    }
}

impl exports::bff::plugin::hooks::Guest for Probe {
    fn init(config: String) -> Result<Capabilities, PluginError> {
        let cfg: Value = serde_json::from_str(&config)
            .map_err(|e| err(ErrorKind::InvalidConfig, &format!("not JSON: {e}")))?;
        match mode(&cfg) {
            "reject-config" => {
                return Err(err(
                    ErrorKind::InvalidConfig,
                    "mode `reject-config` rejects every config",
                ));
            }
            // A version that refuses a config its predecessor accepted.
            "reject-on-version" if cfg["version"].as_str() == Some(version().as_str()) => {
                return Err(err(
                    ErrorKind::InvalidConfig,
                    &format!("version {} refuses this config", version()),
                ));
            }
            "spin-init" => spin(),
            _ => {}
        }
        Ok(Capabilities {
            handles_request: flag(&cfg, "handles_request", true),
            reads_request_body: flag(&cfg, "reads_request_body", false),
            reads_response_body: flag(&cfg, "reads_response_body", false),
            handles_response: flag(&cfg, "handles_response", true),
        })
    }

    fn on_request(ctx: Context, mut req: Request) -> Result<Action, PluginError> {
        let cfg = config();
        let me = name(&cfg);
        match mode(&cfg) {
            "respond" => {
                let trail = host::get_value("trail");
                let body = json!({
                    "client": ctx.client,
                    "attributes": ctx.attributes,
                    "route": ctx.route,
                    "params": ctx.params,
                    "request_id": ctx.request_id,
                    "trail": trail,
                    "uri": req.uri,
                    "plugin": me,
                });
                Ok(Action::Respond(json_response(200, &body)))
            }
            "fanout" => {
                let calls = cfg["calls"].as_array().cloned().unwrap_or_default();
                let results = fan_out(&calls);
                Ok(Action::Respond(json_response(
                    200,
                    &json!({ "results": results }),
                )))
            }
            "send-flood" => {
                let mut sent = 0;
                let error = loop {
                    let r = Request {
                        method: "GET".into(),
                        uri: "/".into(),
                        headers: vec![],
                        body: vec![],
                    };
                    match host::send(cfg["service"].as_str().unwrap_or(""), &r, None) {
                        Ok(_) => sent += 1,
                        Err(e) => break format!("{:?}", e.kind).to_lowercase(),
                    }
                    if sent > 10_000 {
                        break "none".to_owned();
                    }
                };
                Ok(Action::Respond(json_response(
                    200,
                    &json!({ "sent": sent, "error": error }),
                )))
            }
            "wait-twice" => {
                let r = Request {
                    method: "GET".into(),
                    uri: "/".into(),
                    headers: vec![],
                    body: vec![],
                };
                let id = host::send(cfg["service"].as_str().unwrap_or(""), &r, None)?;
                let first = host::wait(id).map(|r| r.status);
                let second = host::wait(id).map_err(|e| format!("{:?}", e.kind).to_lowercase());
                Ok(Action::Respond(json_response(
                    200,
                    &json!({ "first": first.ok(), "second": second.err() }),
                )))
            }
            // A regression to roll back: the build with the configured version fails every
            // request; other builds behave like `version`.
            "fail-on-version" if cfg["version"].as_str() == Some(version().as_str()) => Err(err(
                ErrorKind::Internal,
                &format!("version {} fails", version()),
            )),
            "version" | "reject-on-version" | "fail-on-version" => {
                // Both phases report the version that ran them: a request served half by one
                // version and half by another would show two different values.
                req.headers.push(("x-probe-version".into(), version()));
                Ok(Action::Forward(req))
            }
            "upper-request-body" => {
                req.body = req.body.to_ascii_uppercase();
                Ok(Action::Forward(req))
            }
            // Answers with the request body as the plugin got it.
            "echo-request-body" => Ok(Action::Respond(Response {
                status: 200,
                headers: vec![("x-probe-body-len".into(), req.body.len().to_string())],
                body: req.body,
            })),
            "rewrite-uri" => {
                req.uri = cfg["uri"].as_str().unwrap_or("/").to_owned();
                Ok(Action::Forward(req))
            }
            "spin" => spin(),
            "membomb" => eat_memory(),
            "panic" => panic!("probe panicked on purpose"),
            "trap" => std::process::abort(),
            "error" => Err(err(ErrorKind::BadInput, "probe refuses this request")),
            "bad-header" => {
                req.headers.push(("bad header".into(), "x".into()));
                Ok(Action::Forward(req))
            }
            "bad-status" => Ok(Action::Respond(Response {
                status: 1000,
                headers: vec![],
                body: vec![],
            })),
            "spoof-client" => {
                req.headers.push(("x-bff-client".into(), "admin".into()));
                Ok(Action::Forward(req))
            }
            "log" => {
                host::log(bff::plugin::types::LogLevel::Info, "probe says hello");
                println!("probe stdout line");
                eprintln!("probe stderr line");
                Ok(Action::Forward(req))
            }
            _ => {
                // "tag": mark the request, record the order plugins saw it in. A request with
                // `x-probe-fail` fails it.
                let served = SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if header(&req.headers, "x-probe-fail").is_some() {
                    return Err(err(ErrorKind::BadInput, "asked to fail"));
                }
                req.headers
                    .push((format!("x-probe-{me}-served"), served.to_string()));
                req.headers.push((format!("x-probe-{me}"), "seen".into()));
                append_order(&mut req.headers, "x-probe-order", &me);
                let trail = host::get_value("trail").map_or(me.clone(), |t| format!("{t},{me}"));
                host::set_value("trail", &trail)?;
                Ok(Action::Forward(req))
            }
        }
    }

    fn on_response(_ctx: Context, mut resp: Response) -> Result<Response, PluginError> {
        let cfg = config();
        let me = name(&cfg);
        let response_mode = match mode(&cfg) {
            "version" | "reject-on-version" | "fail-on-version" => "version",
            _ => cfg["response_mode"].as_str().unwrap_or("tag"),
        };
        match response_mode {
            "upper-body" => {
                resp.body = resp.body.to_ascii_uppercase();
                Ok(resp)
            }
            "spin" => spin(),
            "panic" => panic!("probe panicked on purpose in on-response"),
            "error" => Err(err(ErrorKind::Internal, "probe fails the response")),
            "bad-header" => {
                resp.headers.push(("x-ok".into(), "line\nbreak".into()));
                Ok(resp)
            }
            "version" => {
                resp.headers.push(("x-probe-version".into(), version()));
                Ok(resp)
            }
            "set-status" => {
                resp.status = cfg["status"].as_u64().unwrap_or(200) as u16;
                Ok(resp)
            }
            _ => {
                let answered = ANSWERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                resp.headers
                    .push((format!("x-probe-{me}-answered"), answered.to_string()));
                resp.headers
                    .push((format!("x-probe-{me}-response"), "seen".into()));
                append_order(&mut resp.headers, "x-probe-response-order", &me);
                Ok(resp)
            }
        }
    }
}

export!(Probe);
