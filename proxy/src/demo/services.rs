//! The demo's upstream microservices: `users`, `orders`, `catalog` and `recommendations` of a
//! small outdoor-gear shop, each a tiny hyper server on loopback that the demo proxy routes to.
//!
//! Sits behind the proxy in `bff-proxy demo` and in the demo end-to-end test. Every service
//! answers `GET` (and `HEAD`) for a fixed set of paths with the JSON documents embedded from
//! `data/<service>.json` (a map of path → document, ids linking across services: user
//! `u-1001` → orders `o-5001`, `o-5002` → products `p-2001`...). Unknown paths get a 404 JSON
//! error, other methods a 405. Each response ends with a small `meta` object naming the service
//! and the client the proxy identified (its `x-bff-client` header), which shows identity
//! propagation; nothing else from the request is echoed. The catalog's documents are cacheable
//! (`cache-control: public, max-age=30`, `vary: x-bff-client` since `meta` names the client),
//! which the demo config's response cache for that service uses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The demo services, in start order, with their embedded data.
const DATA: [(&str, &str); 4] = [
    ("users", include_str!("data/users.json")),
    ("orders", include_str!("data/orders.json")),
    ("catalog", include_str!("data/catalog.json")),
    ("recommendations", include_str!("data/recommendations.json")),
];

/// Names of the demo services, in start order.
pub const SERVICE_NAMES: [&str; 4] = [DATA[0].0, DATA[1].0, DATA[2].0, DATA[3].0];

/// Header the proxy states the identified client in (`[headers] client`, default).
const CLIENT_HEADER: &str = "x-bff-client";

/// How long [`DemoServices::stop`] waits for open connections to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// One service's documents, parsed once per process.
#[derive(Debug)]
struct ServiceData {
    name: &'static str,
    /// Path → the document without its closing `}` (the `meta` field goes there).
    docs: HashMap<String, String>,
}

static SERVICES: LazyLock<Vec<Arc<ServiceData>>> = LazyLock::new(|| {
    DATA.iter()
        .map(|(name, text)| Arc::new(parse(name, text)))
        .collect()
});

fn parse(name: &'static str, text: &'static str) -> ServiceData {
    let raw: HashMap<String, &RawValue> = serde_json::from_str(text)
        .expect("embedded demo data is a JSON object of documents (checked by tests)");
    let docs = raw
        .into_iter()
        .map(|(path, doc)| {
            let doc = dedent(doc.get());
            let open = doc
                .trim_end()
                .strip_suffix('}')
                .expect("every embedded demo document is a JSON object (checked by tests)");
            (path, open.trim_end().to_owned())
        })
        .collect();
    ServiceData { name, docs }
}

/// The data files are pretty-printed with two-space indents, so a document nested in the
/// top-level map is indented two spaces too deep: undo that, so responses read like a
/// stand-alone pretty-printed document. (JSON strings cannot contain raw newlines, so
/// working line by line is safe.)
fn dedent(doc: &str) -> String {
    let mut out = String::with_capacity(doc.len());
    for (i, line) in doc.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(line.strip_prefix("  ").unwrap_or(line));
    }
    out
}

/// Running demo services. Dropping this stops them (without waiting); [`DemoServices::stop`]
/// also waits for open connections to close.
#[derive(Debug)]
pub struct DemoServices {
    addrs: Vec<(&'static str, SocketAddr)>,
    token: CancellationToken,
    tracker: TaskTracker,
}

impl DemoServices {
    /// Starts every demo service at its given address (`(name, addr)`, names from
    /// [`SERVICE_NAMES`]). All are bound before any starts serving, so on an error nothing
    /// keeps running. Must be called inside a Tokio runtime.
    pub(crate) async fn start_at(addrs: &[(&'static str, SocketAddr)]) -> io::Result<Self> {
        let mut listeners = Vec::with_capacity(addrs.len());
        for &(name, addr) in addrs {
            let data = SERVICES
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("`{name}` is not a demo service"),
                    )
                })?
                .clone();
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| bind_error(name, addr, &e))?;
            listeners.push((data, listener));
        }
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut bound = Vec::with_capacity(listeners.len());
        for (data, listener) in listeners {
            bound.push((data.name, listener.local_addr()?));
            tracker.spawn(accept_loop(listener, data, token.clone(), tracker.clone()));
        }
        Ok(Self {
            addrs: bound,
            token,
            tracker,
        })
    }

    /// Every service's name and the address it actually listens on, in start order.
    pub fn addrs(&self) -> &[(&'static str, SocketAddr)] {
        &self.addrs
    }

    /// The address of one service.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, addr)| addr)
    }

    /// Stops accepting, closes idle connections, and waits (up to two seconds) for requests in
    /// flight to finish.
    pub async fn stop(self) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("demo services: connections still open after {STOP_TIMEOUT:?}");
        }
    }
}

impl Drop for DemoServices {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Starts every demo service on `bind_ip` with an OS-assigned port (for tests and tools).
pub async fn start_services(bind_ip: IpAddr) -> io::Result<DemoServices> {
    let addrs: Vec<_> = SERVICE_NAMES
        .iter()
        .map(|&name| (name, SocketAddr::new(bind_ip, 0)))
        .collect();
    DemoServices::start_at(&addrs).await
}

fn bind_error(name: &str, addr: SocketAddr, e: &io::Error) -> io::Error {
    let why = match e.kind() {
        io::ErrorKind::AddrInUse => {
            "address in use (is another `bff-proxy demo` running?)".to_owned()
        }
        io::ErrorKind::AddrNotAvailable => "address not available on this machine".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    };
    io::Error::new(
        e.kind(),
        format!("cannot listen on {addr} for demo service {name}: {why}"),
    )
}

async fn accept_loop(
    listener: TcpListener,
    data: Arc<ServiceData>,
    token: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let stream = tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(service = data.name, error = %e, "demo service: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve(stream, builder.clone(), data.clone(), token.clone()));
    }
}

async fn serve(
    stream: TcpStream,
    builder: Arc<auto::Builder<TokioExecutor>>,
    data: Arc<ServiceData>,
    token: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let resp = respond(&data, &req);
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "demo service: connection ended with an error");
            }
            return;
        }
        () = token.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// Answers one request from the service's documents.
fn respond<B>(data: &ServiceData, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the demo services are read-only",
            data.name,
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let Some(doc) = data.docs.get(req.uri().path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{} has nothing at {}", data.name, req.uri().path()),
            data.name,
        );
    };
    let client = req
        .headers()
        .get(CLIENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "null".to_owned(), json_string);
    let body = format!(
        "{doc},\n  \"meta\": {{ \"served_by\": \"{}\", \"client\": {client} }}\n}}\n",
        data.name
    );
    let mut resp = json_response(StatusCode::OK, body);
    if data.name == "catalog" {
        let headers = resp.headers_mut();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=30"),
        );
        headers.insert(header::VARY, HeaderValue::from_static(CLIENT_HEADER));
    }
    resp
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

fn error(status: StatusCode, code: &str, message: &str, service: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "error": { "code": code, "message": message, "service": service }
    });
    json_response(status, format!("{body}\n"))
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use serde_json::Value;

    use super::*;

    fn docs(service: &str) -> BTreeMap<String, Value> {
        let (_, text) = DATA
            .iter()
            .find(|(n, _)| *n == service)
            .expect("a demo service");
        serde_json::from_str(text).expect("demo data parses")
    }

    fn get(service: &str, path: &str, client: Option<&str>) -> (StatusCode, Value) {
        let data = SERVICES
            .iter()
            .find(|s| s.name == service)
            .expect("a demo service");
        let mut req = Request::get(path);
        if let Some(c) = client {
            req = req.header(CLIENT_HEADER, c);
        }
        let resp = respond(data, &req.body(()).expect("a valid request"));
        let status = resp.status();
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            resp.into_body(),
        ))
        .expect("a full body is ready")
        .expect("infallible")
        .to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("{service} {path}: {e}: {}", String::from_utf8_lossy(&body))
        });
        (status, json)
    }

    #[test]
    fn every_document_is_served_as_valid_json_with_meta() {
        for (name, _) in DATA {
            for (path, original) in docs(name) {
                assert!(original.is_object(), "{name} {path}");
                let (status, mut served) = get(name, &path, Some("mobile"));
                assert_eq!(status, StatusCode::OK, "{name} {path}");
                let meta = served
                    .as_object_mut()
                    .and_then(|o| o.remove("meta"))
                    .expect("meta");
                assert_eq!(meta["served_by"], name);
                assert_eq!(meta["client"], "mobile");
                assert_eq!(served, original, "{name} {path}");
            }
        }
        let (_, direct) = get("users", "/users/u-1001", None);
        assert_eq!(direct["meta"]["client"], Value::Null);
    }

    #[test]
    fn unknown_paths_and_methods_are_json_errors() {
        let (status, body) = get("catalog", "/v1/products/p-9999", None);
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "not_found");
        let data = &SERVICES[0];
        let resp = respond(
            data,
            &Request::post("/users/u-1001")
                .body(())
                .expect("a valid request"),
        );
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    /// Every id mentioned anywhere resolves in its service, and product cards repeat the
    /// catalog's name and price: the data tells one consistent story.
    #[test]
    fn ids_link_across_services() {
        let users = docs("users");
        let orders = docs("orders");
        let catalog = docs("catalog");
        let mut seen = HashSet::new();
        let mut stack: Vec<Value> = DATA
            .iter()
            .flat_map(|(n, _)| docs(n).into_values())
            .collect();
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) => {
                    let is_id = |p: &str| {
                        s.strip_prefix(p)
                            .is_some_and(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()))
                    };
                    if is_id("u-") {
                        assert!(users.contains_key(&format!("/users/{s}")), "{s}");
                    } else if is_id("o-") {
                        assert!(orders.contains_key(&format!("/orders/{s}")), "{s}");
                    } else if is_id("p-") {
                        assert!(catalog.contains_key(&format!("/v1/products/{s}")), "{s}");
                    }
                    seen.insert(s);
                }
                Value::Array(a) => stack.extend(a),
                Value::Object(o) => {
                    if let Some(Value::String(id)) = o.get("product_id") {
                        let product = &catalog[&format!("/v1/products/{id}")];
                        if let Some(name) = o.get("name") {
                            assert_eq!(name, &product["name"], "{id}");
                        }
                        if let Some(price) = o.get("price").or_else(|| o.get("unit_price")) {
                            assert_eq!(price, &product["price"], "{id}");
                        }
                    }
                    stack.extend(o.into_iter().map(|(_, v)| v));
                }
                _ => {}
            }
        }
        for id in ["u-1001", "o-5002", "p-2001"] {
            assert!(seen.contains(id), "{id} is never referenced");
        }
    }
}
