//! End-to-end test harness: the real [`bff_proxy::Proxy`] on real loopback sockets, in process.
//!
//! Three pieces, in the spirit of linkerd's integration tests:
//!
//! - [`Upstream`]: a scriptable in-process hyper server on `127.0.0.1:0`. Routes (by path prefix)
//!   answer with a [`Reply`]: an [`Echo`] of what arrived, a fixed response, a delayed or gated
//!   answer, a byte-counting sink, a large generated stream, or an abrupt close. It records every
//!   request head it receives. [`UpstreamBuilder::http2_only`] makes it an h2c-only server.
//! - [`TestProxy`]: parses a TOML config (with `{name}` placeholders filled by [`fill`]), forces
//!   both listeners to `127.0.0.1:0`, binds and runs the proxy, and shuts it down on request.
//! - Clients: [`get`] / [`request`] (one fresh HTTP/1.1 connection per call), [`H1Conn`] (a
//!   keep-alive connection), [`H2Client`] (h2c prior knowledge), and [`RawConn`] / [`raw`] for
//!   bytes no client library would send.
//!
//! Every network wait is bounded ([`IO_TIMEOUT`]), so a broken proxy fails a test instead of
//! hanging it. Set `BFF_TEST_LOG=debug` to see the proxy's logs.

pub mod plugins;
pub mod tls;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Upper bound for any single network operation in the harness (connect, request, read).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The boxed error type used by bodies in the harness.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request body type of the harness clients.
pub type ClientBody = BoxBody<Bytes, BoxError>;

/// Response body type of [`Upstream`].
type UpstreamBody = BoxBody<Bytes, Infallible>;

const LOOPBACK_0: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Installs the proxy's log subscriber once when `BFF_TEST_LOG` is set (e.g. `debug`).
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = std::env::var("BFF_TEST_LOG") {
            // Another subscriber may already be installed; logging is best effort here.
            let _ = bff_proxy::telemetry::init(bff_proxy::telemetry::LogFormat::Text, &filter);
        }
    });
}

/// Locks a mutex, ignoring poisoning (a panicking test must not cascade into others).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `fut` with the harness timeout; panics with `what` if it takes longer.
pub(crate) async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(IO_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {IO_TIMEOUT:?}"),
    }
}

// ============================================================================================
// Config helpers
// ============================================================================================

/// The config most tests need: `server` lines (may be empty) under `[server]`, one service
/// `main` at `upstream_url`, one client `web` (also the default, and matched by
/// `x-client: web`) and a catch-all route `all`.
pub fn catch_all_config(server: &str, upstream_url: &str) -> String {
    format!(
        r#"
[server]
{server}

[identity]
default_client = "web"

[services.main]
urls = ["{upstream_url}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[routes]]
id = "all"
path = "/{{*rest}}"
service = "main"
"#
    )
}

/// Replaces each `{name}` placeholder in `template` with its value.
///
/// Only the names given are replaced, so route patterns like `{id}` are left alone. Panics if
/// a name does not occur in the template (a typo would otherwise test the wrong thing).
pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in vars {
        let placeholder = format!("{{{name}}}");
        assert!(
            out.contains(&placeholder),
            "placeholder {placeholder} is not in the config template"
        );
        out = out.replace(&placeholder, value);
    }
    out
}

/// Writes `config` to `path` and loads it as `bff-proxy run` would (paths relative to the
/// file); returns every problem it is refused with. Panics if it loads.
pub fn config_file_problems(path: &std::path::Path, config: &str) -> String {
    std::fs::write(path, config).expect("write config");
    bff_proxy::Config::load(path)
        .expect_err("the config should be refused")
        .to_string()
}

/// Panics naming the first of `expected` that the problem text `text` does not mention.
pub fn assert_mentions(text: &str, expected: &[&str]) {
    for e in expected {
        assert!(text.contains(e), "missing `{e}` in:\n{text}");
    }
}

/// Lowercase hex SHA-256 of `key`: what the config stores for an API key.
pub fn sha256_hex(key: &str) -> String {
    sha256_hex_bytes(key.as_bytes())
}

/// Lowercase hex SHA-256 of `bytes` (a plugin file's version).
pub fn sha256_hex_bytes(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The first `n` lines of the access log at `path`, once it has them (waits up to 10 s: the
/// log is written by its own thread).
pub async fn read_log_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} access log lines after 10 s:\n{text}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `http://127.0.0.1:PORT` URL on which nothing listens (bound, then released).
pub fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind(LOOPBACK_0).expect("bind an ephemeral port");
    let port = listener
        .local_addr()
        .expect("bound listener has an address")
        .port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// Resident set size of this process in bytes (Linux `/proc/self/status` `VmRSS`).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line in /proc/self/status");
    kb * 1024
}

// ============================================================================================
// TestProxy
// ============================================================================================

/// The real proxy, bound to ephemeral loopback ports and running on the test's runtime.
#[derive(Debug)]
pub struct TestProxy {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Parses `config_toml` (panicking with every problem if it is invalid), forces `listen`
    /// and `admin.listen` to `127.0.0.1:0`, binds and starts serving.
    pub async fn start(config_toml: &str) -> Self {
        let config = bff_proxy::Config::from_toml(config_toml, "test")
            .unwrap_or_else(|e| panic!("the test config is invalid:\n{e}\n---\n{config_toml}"));
        Self::start_config(config).await
    }

    /// Loads the config file at `path` (as `bff-proxy run` does, so reloads read it again) and
    /// starts the proxy. The file should set `listen` and `admin.listen` to `127.0.0.1:0` so a
    /// reload does not see them change.
    pub async fn start_file(path: &std::path::Path) -> Self {
        let config = bff_proxy::Config::load(path)
            .unwrap_or_else(|e| panic!("the test config {} is invalid:\n{e}", path.display()));
        Self::start_config(config).await
    }

    /// `GET` on the admin listener, parsed as JSON (panics if it is not).
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let resp = get(self.admin_addr, path, &[]).await;
        assert_eq!(resp.status, 200, "GET {path}: {}", resp.text());
        resp.json()
    }

    /// `GET /metrics` on the admin listener.
    pub async fn metrics(&self) -> String {
        let resp = get(self.admin_addr, "/metrics", &[]).await;
        assert_eq!(resp.status, 200, "GET /metrics: {}", resp.text());
        resp.text()
    }

    /// The value of one sample in `/metrics` (`name{labels}` exactly as exported), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// `POST /admin/reload`: the status and the reload record.
    pub async fn reload(&self) -> (u16, serde_json::Value) {
        let resp = request(self.admin_addr, "POST", "/admin/reload", &[], empty()).await;
        (resp.status.as_u16(), resp.json()["reload"].clone())
    }

    /// Like [`TestProxy::start`] for an already parsed config.
    pub async fn start_config(mut config: bff_proxy::Config) -> Self {
        init_logging();
        config.listen = LOOPBACK_0;
        config.admin.listen = LOOPBACK_0;
        // A line per request on the test binary's stderr helps nobody; tests of the access
        // log write it to a file. (Config files, which reloads read again, say so themselves.)
        if config.source.is_none() && config.access_log.output == "stderr" {
            config.access_log.enabled = false;
        }
        let proxy = bff_proxy::Proxy::bind(&config)
            .await
            .expect("bind the proxy on loopback");
        let addr = proxy.local_addr();
        let admin_addr = proxy.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let run = tokio::spawn(proxy.run(async move {
            // A dropped sender (test ended) also means "stop".
            let _ = rx.await;
        }));
        Self {
            addr,
            admin_addr,
            shutdown: Some(tx),
            run: Some(run),
        }
    }

    /// The data-plane address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin listener address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Resolves the proxy's shutdown future (what SIGTERM does) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits up to `within` for `run()` to return; true if it did.
    pub async fn stopped_within(&mut self, within: Duration) -> bool {
        let Some(run) = self.run.as_mut() else {
            return true;
        };
        match tokio::time::timeout(within, run).await {
            Ok(res) => {
                res.expect("Proxy::run panicked");
                self.run = None;
                true
            }
            Err(_) => false,
        }
    }

    /// Triggers shutdown and returns once `run()` returned (panics after 30 s). Returns how
    /// long that took.
    pub async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        self.begin_shutdown();
        assert!(
            self.stopped_within(Duration::from_secs(30)).await,
            "Proxy::run did not return within 30 s of shutdown"
        );
        started.elapsed()
    }
}

// ============================================================================================
// Upstream
// ============================================================================================

/// Opens on demand: a [`Reply::Gated`] answer waits until [`Gate::open`] is called.
#[derive(Debug, Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }

    /// Lets every waiting (and future) request through.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.0.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` holds it.
        let _ = rx.wait_for(|open| *open).await;
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

/// What an [`Upstream`] route answers.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with an [`Echo`] JSON of the request; the body is counted, not buffered.
    Echo,
    /// A fixed response.
    Fixed {
        /// Status code.
        status: u16,
        /// Extra response headers.
        headers: Vec<(String, String)>,
        /// Response body.
        body: Bytes,
    },
    /// Sleeps, then answers with the inner reply.
    Delay(Duration, Box<Reply>),
    /// Waits for the gate to open, then answers with the inner reply.
    Gated(Gate, Box<Reply>),
    /// Reads the request body chunk by chunk without keeping it and answers
    /// `{"bytes": N, "intact": bool}`; `intact` says whether it was the [`PatternBody`] pattern.
    Sink,
    /// 200 with a chunked [`PatternBody`] of this many bytes.
    Stream(u64),
    /// Closes the connection without answering.
    Abort,
    /// Answers `304` (with the inner reply's `etag` and `cache-control`) to a request whose
    /// `if-none-match` names the inner [`Reply::Fixed`]'s `etag`; otherwise the inner reply.
    Revalidates(Box<Reply>),
    /// Whatever the [`Switch`] holds when the request arrives.
    Switch(Switch),
}

/// A reply a test changes while the upstream runs (e.g. from a good answer to a `503`).
#[derive(Debug, Clone)]
pub struct Switch(Arc<Mutex<Reply>>);

impl Switch {
    /// Starts with `reply`.
    pub fn new(reply: Reply) -> Self {
        Self(Arc::new(Mutex::new(reply)))
    }

    /// Requests from now on get `reply`.
    pub fn set(&self, reply: Reply) {
        *lock(&self.0) = reply;
    }

    /// A [`Reply`] that answers whatever this switch holds.
    pub fn reply(&self) -> Reply {
        Reply::Switch(self.clone())
    }
}

impl Reply {
    /// A fixed response with no extra headers.
    pub fn fixed(status: u16, body: &str) -> Self {
        Self::Fixed {
            status,
            headers: Vec::new(),
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    /// Adds a response header to a [`Reply::Fixed`] (panics on other variants).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match &mut self {
            Self::Fixed { headers, .. } => headers.push((name.into(), value.into())),
            other => panic!("Reply::header needs Reply::Fixed, not {other:?}"),
        }
        self
    }

    /// This reply after a delay.
    pub fn after(self, delay: Duration) -> Self {
        Self::Delay(delay, Box::new(self))
    }

    /// This reply once `gate` opens.
    pub fn gated(self, gate: &Gate) -> Self {
        Self::Gated(gate.clone(), Box::new(self))
    }

    /// This [`Reply::Fixed`], answering `304` to a request that already has its `etag`.
    pub fn revalidates(self) -> Self {
        Self::Revalidates(Box::new(self))
    }
}

/// What [`Reply::Echo`] answers: the request as the upstream saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// Name of the upstream that answered.
    pub upstream: String,
    /// Request method.
    pub method: String,
    /// Path and query as received.
    pub uri: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Every header with all its values, in arrival order per name.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Request body length in bytes.
    pub body_len: u64,
}

impl Echo {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Every value of a header (empty if absent).
    pub fn header_all(&self, name: &str) -> &[String] {
        self.headers.get(name).map_or(&[], Vec::as_slice)
    }
}

/// A request head as an [`Upstream`] received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// HTTP version.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The TLS client certificate the connection presented (HTTPS upstreams).
    pub client_cert: Option<rustls::pki_types::CertificateDer<'static>>,
}

/// Builds an [`Upstream`].
#[derive(Debug)]
pub struct UpstreamBuilder {
    name: String,
    routes: Vec<(String, Reply)>,
    http2_only: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl UpstreamBuilder {
    /// Requests whose path starts with `prefix` get `reply` (first matching route wins;
    /// unmatched requests get [`Reply::Echo`]).
    pub fn route(mut self, prefix: &str, reply: Reply) -> Self {
        self.routes.push((prefix.to_owned(), reply));
        self
    }

    /// Speak only HTTP/2 (h2c, prior knowledge); HTTP/1.1 requests fail.
    pub fn http2_only(mut self) -> Self {
        self.http2_only = true;
        self
    }

    /// Serve HTTPS with this config (see [`tls::Issued::server_config`]); [`Upstream::url`]
    /// is then `https://localhost:PORT`.
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(self) -> Upstream {
        let listener = TcpListener::bind(LOOPBACK_0)
            .await
            .expect("bind upstream on loopback");
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let state = Arc::new(UpstreamState {
            name: self.name.clone(),
            routes: self.routes,
            http2_only: self.http2_only,
            tls: self.tls,
            received: Mutex::new(Vec::new()),
            connections: std::sync::atomic::AtomicUsize::new(0),
        });
        let task = tokio::spawn(upstream_accept_loop(listener, state.clone()));
        Upstream {
            name: self.name,
            addr,
            state,
            task,
        }
    }
}

#[derive(Debug)]
struct UpstreamState {
    name: String,
    routes: Vec<(String, Reply)>,
    http2_only: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    received: Mutex<Vec<Received>>,
    connections: std::sync::atomic::AtomicUsize,
}

/// A scriptable in-process upstream server. Dropping it stops it.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts building an upstream; `name` is reported in [`Echo::upstream`].
    pub fn builder(name: &str) -> UpstreamBuilder {
        UpstreamBuilder {
            name: name.to_owned(),
            routes: Vec::new(),
            http2_only: false,
            tls: None,
        }
    }

    /// An HTTP/1.1 + h2c upstream that echoes every request.
    pub async fn echo(name: &str) -> Self {
        Self::builder(name).start().await
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://localhost:PORT` when serving TLS), for a service's
    /// `urls`.
    pub fn url(&self) -> String {
        match self.state.tls {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// Every request head received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.received).clone()
    }

    /// How many TCP connections it has accepted (to check keep-alive reuse).
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (bounded by [`IO_TIMEOUT`]) until at least `n` requests have arrived.
    pub async fn wait_for_requests(&self, n: usize) {
        bounded(
            &format!("upstream {} waiting for {n} request(s)", self.name),
            async {
                while lock(&self.state.received).len() < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
        )
        .await;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn upstream_accept_loop(listener: TcpListener, state: Arc<UpstreamState>) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while conns.try_join_next().is_some() {}
        state
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        conns.spawn(async move {
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if state.http2_only {
                builder = builder.http2_only();
            }
            match state.tls.clone() {
                None => {
                    let svc = hyper::service::service_fn(move |req| {
                        upstream_handle(state.clone(), None, req)
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(config) => {
                    let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(stream).await
                    else {
                        return;
                    };
                    let client_cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .cloned();
                    let svc = hyper::service::service_fn(move |req| {
                        upstream_handle(state.clone(), client_cert.clone(), req)
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
            }
        });
    }
}

async fn upstream_handle(
    state: Arc<UpstreamState>,
    client_cert: Option<rustls::pki_types::CertificateDer<'static>>,
    req: Request<Incoming>,
) -> Result<Response<UpstreamBody>, BoxError> {
    let path = req.uri().path().to_owned();
    let uri = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), ToString::to_string);
    lock(&state.received).push(Received {
        method: req.method().clone(),
        uri: uri.clone(),
        version: req.version(),
        headers: req.headers().clone(),
        client_cert,
    });
    let mut reply = state
        .routes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map_or(Reply::Echo, |(_, r)| r.clone());
    let reply = loop {
        reply = match reply {
            Reply::Delay(d, inner) => {
                tokio::time::sleep(d).await;
                *inner
            }
            Reply::Gated(gate, inner) => {
                gate.wait().await;
                *inner
            }
            Reply::Switch(switch) => lock(&switch.0).clone(),
            Reply::Revalidates(inner) => {
                let Reply::Fixed { headers, .. } = &*inner else {
                    panic!("Reply::revalidates needs Reply::Fixed, not {inner:?}");
                };
                let kept = |name: &str| {
                    headers
                        .iter()
                        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                        .cloned()
                        .collect::<Vec<_>>()
                };
                let etag = kept("etag");
                let presented = req
                    .headers()
                    .get_all(http::header::IF_NONE_MATCH)
                    .iter()
                    .any(|v| etag.iter().any(|(_, e)| v.as_bytes() == e.as_bytes()));
                if presented {
                    break Reply::Fixed {
                        status: 304,
                        headers: [etag, kept("cache-control")].concat(),
                        body: Bytes::new(),
                    };
                }
                *inner
            }
            other => break other,
        };
    };
    let full = |status: StatusCode, body: Vec<u8>| {
        let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    };
    match reply {
        Reply::Echo => {
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in req.headers() {
                headers
                    .entry(k.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            let method = req.method().to_string();
            let version = format!("{:?}", req.version());
            let mut check = PatternCheck::default();
            drain_body(req.into_body(), &mut check).await?;
            let echo = Echo {
                upstream: state.name.clone(),
                method,
                uri,
                version,
                headers,
                body_len: check.len(),
            };
            Ok(full(StatusCode::OK, serde_json::to_vec(&echo)?))
        }
        Reply::Sink => {
            let mut check = PatternCheck::default();
            drain_body(req.into_body(), &mut check).await?;
            let json = serde_json::json!({"bytes": check.len(), "intact": check.intact()});
            Ok(full(StatusCode::OK, serde_json::to_vec(&json)?))
        }
        Reply::Fixed {
            status,
            headers,
            body,
        } => {
            let mut resp = Response::new(Full::new(body).boxed());
            *resp.status_mut() = StatusCode::from_u16(status)?;
            for (k, v) in headers {
                resp.headers_mut().append(
                    HeaderName::from_bytes(k.as_bytes())?,
                    HeaderValue::from_str(&v)?,
                );
            }
            Ok(resp)
        }
        Reply::Stream(n) => Ok(Response::new(PatternBody::chunked(n).boxed())),
        Reply::Abort => Err("scripted abort".into()),
        Reply::Delay(..) | Reply::Gated(..) | Reply::Switch(..) | Reply::Revalidates(..) => {
            unreachable!("unwrapped above")
        }
    }
}

async fn drain_body(mut body: Incoming, check: &mut PatternCheck) -> Result<(), BoxError> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            check.feed(&data);
        }
    }
    Ok(())
}

// ============================================================================================
// Pattern bodies (large streams without large buffers)
// ============================================================================================

/// Byte `i` of every pattern stream is `i % 251`; one chunk is a whole number of periods, so
/// every chunk can be the same shared buffer.
static PATTERN: LazyLock<Bytes> = LazyLock::new(|| {
    (0..251u32 * 256)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
});

/// A body of `len` pattern bytes, produced in 64 KB chunks that share one buffer, so streaming
/// even gigabytes allocates nothing per chunk.
#[derive(Debug, Clone)]
pub struct PatternBody {
    remaining: u64,
    declared: bool,
}

impl PatternBody {
    /// Declares its length (`content-length`).
    pub fn sized(len: u64) -> Self {
        Self {
            remaining: len,
            declared: true,
        }
    }

    /// Does not declare its length (`transfer-encoding: chunked` on HTTP/1.1).
    pub fn chunked(len: u64) -> Self {
        Self {
            remaining: len,
            declared: false,
        }
    }

    /// Boxed as a client request body.
    pub fn into_client_body(self) -> ClientBody {
        self.map_err(|never| match never {}).boxed()
    }
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(PATTERN.len());
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(PATTERN.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.declared {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// Counts bytes of a stream and checks they follow the [`PatternBody`] pattern.
#[derive(Debug, Clone)]
pub struct PatternCheck {
    len: u64,
    intact: bool,
}

impl Default for PatternCheck {
    fn default() -> Self {
        Self {
            len: 0,
            intact: true,
        }
    }
}

impl PatternCheck {
    /// Takes the next chunk of the stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let start = usize::try_from(self.len % 251).expect("small");
            let n = chunk.len().min(PATTERN.len() - start);
            if self.intact && chunk[..n] != PATTERN[start..start + n] {
                self.intact = false;
            }
            self.len += n as u64;
            chunk = &chunk[n..];
        }
    }

    /// Bytes seen.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing was seen.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if every byte matched the pattern.
    pub fn intact(&self) -> bool {
        self.intact
    }
}

// ============================================================================================
// Clients
// ============================================================================================

/// A complete body of bytes.
pub fn body(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> ClientBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct TestResponse {
    /// Status.
    pub status: StatusCode,
    /// HTTP version of the response.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl TestResponse {
    /// A header's first value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The body as an upstream [`Echo`], after checking the status is 200.
    pub fn echo(&self) -> Echo {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "expected an upstream echo, got: {}",
            self.text()
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not an echo ({e}): {}", self.text()))
    }

    /// Asserts this is one of the proxy's error responses: the status, `application/json`,
    /// exactly `{"error": {"code", "message", "request_id"}}` with the given code, the
    /// `request_id` equal to the `x-request-id` header, and nothing internal (addresses,
    /// library errors) in the body.
    pub fn assert_error(&self, status: u16, code: &str) -> &Self {
        let text = self.text();
        assert_eq!(
            self.status.as_u16(),
            status,
            "status (expected `{code}`); body: {text}"
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "error content-type; body: {text}"
        );
        let v = self.json();
        let top = v.as_object().expect("error body is a JSON object");
        assert_eq!(top.len(), 1, "only `error` at the top level: {text}");
        let err = v["error"].as_object().expect("`error` is an object");
        let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["code", "message", "request_id"],
            "error keys: {text}"
        );
        assert_eq!(err["code"], code, "error code: {text}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error message is a non-empty string: {text}"
        );
        let header_id = self
            .header("x-request-id")
            .expect("error responses carry x-request-id");
        assert!(!header_id.is_empty(), "x-request-id is not empty");
        assert_eq!(
            err["request_id"], header_id,
            "body request_id equals the x-request-id header"
        );
        let lower = text.to_ascii_lowercase();
        for leak in [
            "127.0.0.1",
            "localhost",
            "http://",
            "hyper",
            "refused",
            "os error",
            "tcp",
            "error trying",
            "timed out",
        ] {
            assert!(
                !lower.contains(leak),
                "error body leaks internal detail `{leak}`: {text}"
            );
        }
        self
    }
}

pub(crate) fn build_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: ClientBody,
) -> Request<ClientBody> {
    let mut req = Request::new(body);
    *req.method_mut() = Method::from_bytes(method.as_bytes()).expect("valid method");
    *req.uri_mut() = path.parse().expect("valid request target");
    let h = req.headers_mut();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("valid header name"),
            HeaderValue::from_str(v).expect("valid header value"),
        );
    }
    if !h.contains_key(http::header::HOST) {
        h.insert(
            http::header::HOST,
            HeaderValue::from_str(&addr.to_string()).expect("an address is a valid host"),
        );
    }
    req
}

/// Reads a streamed response to the end (bounded by [`IO_TIMEOUT`]).
pub async fn read_response(resp: Response<Incoming>) -> TestResponse {
    let (parts, body) = resp.into_parts();
    let body = bounded("reading the response body", body.collect())
        .await
        .expect("response body arrives complete")
        .to_bytes();
    TestResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

/// A keep-alive HTTP/1.1 client connection.
#[derive(Debug)]
pub struct H1Conn {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<ClientBody>,
}

impl H1Conn {
    /// Connects and does the (client-side) HTTP/1.1 handshake.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = bounded("connect", TcpStream::connect(addr))
            .await
            .expect("connect to the proxy");
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { addr, sender }
    }

    /// Sends a request and returns the response head with its body still streaming.
    pub async fn send(&mut self, req: Request<ClientBody>) -> Response<Incoming> {
        bounded("response head", async {
            self.sender.ready().await.expect("connection is usable");
            self.sender.send_request(req).await.expect("response head")
        })
        .await
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ClientBody,
    ) -> TestResponse {
        let req = build_request(self.addr, method, path, headers, body);
        read_response(self.send(req).await).await
    }

    /// True once the server has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Sends one request on a fresh HTTP/1.1 connection and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: ClientBody,
) -> TestResponse {
    H1Conn::connect(addr)
        .await
        .request(method, path, headers, body)
        .await
}

/// `GET path` on a fresh HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> TestResponse {
    request(addr, "GET", path, headers, empty()).await
}

/// An HTTP/2 prior-knowledge (h2c) client: hyper-util's pooled client with `http2_only`.
#[derive(Debug, Clone)]
pub struct H2Client {
    client: Client<HttpConnector, ClientBody>,
}

impl H2Client {
    /// A new client with its own connection pool.
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// Sends a request to `addr` and reads the whole response.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: ClientBody,
    ) -> TestResponse {
        let mut req = build_request(addr, method, path, headers, body);
        // HTTP/2 carries the authority in the URI (`:authority`), not in `host`.
        req.headers_mut().remove(http::header::HOST);
        *req.uri_mut() = format!("http://{addr}{path}")
            .parse()
            .expect("valid absolute URI");
        let resp = bounded("h2 response head", self.client.request(req))
            .await
            .expect("h2 response head");
        read_response(resp).await
    }

    /// `GET path` over h2c.
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> TestResponse {
        self.request(addr, "GET", path, headers, empty()).await
    }
}

impl Default for H2Client {
    fn default() -> Self {
        Self::new()
    }
}

// ============================================================================================
// Raw TCP
// ============================================================================================

/// A raw TCP connection: write any bytes, parse HTTP/1.1 responses by hand.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects (bounded).
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = bounded("connect", TcpStream::connect(addr))
            .await
            .expect("connect to the proxy");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes bytes as they are.
    pub async fn write(&mut self, bytes: &[u8]) {
        bounded("write", self.stream.write_all(bytes))
            .await
            .expect("write to the proxy");
    }

    /// Reads more bytes into the buffer; false on EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    async fn read_line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return Ok(line);
            }
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn read_exact_buf(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one response. `None` if the server closed (or reset) the connection before
    /// sending any byte of it. Set `head_request` for a response to `HEAD` (no body).
    pub async fn read_response(&mut self, head_request: bool) -> Option<TestResponse> {
        bounded("raw response", self.read_response_inner(head_request)).await
    }

    async fn read_response_inner(&mut self, head_request: bool) -> Option<TestResponse> {
        while self.buf.is_empty() {
            match self.fill().await {
                Ok(true) => {}
                Ok(false) | Err(_) => return None,
            }
        }
        let status_line = self.read_line().await.expect("status line");
        let mut parts = status_line.splitn(3, ' ');
        let version = match parts.next() {
            Some("HTTP/1.1") => Version::HTTP_11,
            Some("HTTP/1.0") => Version::HTTP_10,
            other => panic!("not an HTTP/1 status line: {other:?} in {status_line:?}"),
        };
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = HeaderMap::new();
        loop {
            let line = self.read_line().await.expect("header line");
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            headers.append(
                HeaderName::from_bytes(k.trim().as_bytes()).expect("header name"),
                HeaderValue::from_str(v.trim()).expect("header value"),
            );
        }
        let chunked = headers
            .get(http::header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let length = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let body = if head_request || status < 200 || status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            let mut out = Vec::new();
            loop {
                let size_line = self.read_line().await.expect("chunk size");
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .expect("hex chunk size");
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.read_line().await.expect("trailer").is_empty() {}
                    break;
                }
                out.extend(self.read_exact_buf(size).await.expect("chunk data"));
                self.read_exact_buf(2).await.expect("chunk CRLF");
            }
            out
        } else if let Some(n) = length {
            self.read_exact_buf(n).await.expect("body")
        } else {
            while self.fill().await.unwrap_or(false) {}
            std::mem::take(&mut self.buf)
        };
        Some(TestResponse {
            status: StatusCode::from_u16(status).expect("valid status"),
            version,
            headers,
            body: body.into(),
        })
    }

    /// Waits up to `within` for the server to close the connection (EOF or reset); returns
    /// how long that took, or `None` if it stayed open. Bytes that arrive meanwhile are kept.
    pub async fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        let until_closed = async {
            loop {
                match self.fill().await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => return,
                }
            }
        };
        tokio::time::timeout(within, until_closed)
            .await
            .ok()
            .map(|()| started.elapsed())
    }
}

/// Sends raw request bytes on a fresh connection and reads one response.
/// Panics if the connection closes without a response.
pub async fn raw(addr: SocketAddr, request: &str) -> TestResponse {
    let mut conn = RawConn::connect(addr).await;
    conn.write(request.as_bytes()).await;
    conn.read_response(request.starts_with("HEAD "))
        .await
        .unwrap_or_else(|| panic!("connection closed without a response to {request:?}"))
}

/// `GET path` as raw bytes (`Host: test`, `Connection: close`) plus extra header lines,
/// for paths a client library would normalize or refuse.
pub async fn raw_get(addr: SocketAddr, path: &str, extra_headers: &[&str]) -> TestResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in extra_headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(addr, &req).await
}
