//! Accept: the first phase. Owns the TCP listeners, connection limits and per-connection
//! timeouts, and hands each request to the pipeline (data plane) or the admin service.
//!
//! One port serves HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN `h2` over TLS) via
//! hyper-util's auto builder; with `[tls]` the port is HTTPS (`tls`: the handshake comes
//! first, bounded by the header-read timeout).
//! Every connection is bounded: a header-read timeout, an idle timeout (no bytes either way),
//! and a graceful close on shutdown that lets the request in flight finish.

mod idle;
pub(crate) mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::config::{ConfigPath, Problems, check_duration, check_range};

pub(crate) use self::tls::TlsInfo;

/// `[server]`: limits, timeouts and lifecycle of the data-plane listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Tokio worker threads; 0 means one per CPU core.
    pub worker_threads: usize,
    /// Time a client has to send the complete request head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Upper bound on the wait for an upstream response head (each service's
    /// `request_timeout` applies too; the smaller wins).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A connection with no bytes read or written for this long is closed (gracefully).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Largest request head (sum of name + value + 32 per header) before `431`.
    pub max_header_bytes: usize,
    /// Most request headers before `431`.
    pub max_headers: usize,
    /// Largest request body before `413` (checked on `content-length` and while streaming).
    pub max_request_body_bytes: u64,
    /// Open client connections; further ones get a `503` and are closed.
    pub max_connections: usize,
    /// Requests in flight; further ones get a `503` (load shedding).
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams per client connection.
    pub http2_max_concurrent_streams: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            worker_threads: 0,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_request_body_bytes: 10 * 1024 * 1024,
            max_connections: 10_000,
            max_concurrent_requests: 10_000,
            http2_max_concurrent_streams: 256,
        }
    }
}

impl ServerConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        check_range(
            self.worker_threads,
            0..=1024,
            &at.key("worker_threads"),
            problems,
        );
        check_duration(
            self.header_read_timeout,
            ms(1)..=s(300),
            &at.key("header_read_timeout"),
            problems,
        );
        check_duration(
            self.request_timeout,
            ms(1)..=s(3600),
            &at.key("request_timeout"),
            problems,
        );
        check_duration(
            self.idle_timeout,
            ms(1)..=s(3600),
            &at.key("idle_timeout"),
            problems,
        );
        check_duration(
            self.drain_timeout,
            ms(0)..=s(600),
            &at.key("drain_timeout"),
            problems,
        );
        check_range(
            self.max_header_bytes,
            1024..=1024 * 1024,
            &at.key("max_header_bytes"),
            problems,
        );
        check_range(self.max_headers, 1..=1000, &at.key("max_headers"), problems);
        check_range(
            self.max_request_body_bytes,
            0..=1 << 40,
            &at.key("max_request_body_bytes"),
            problems,
        );
        check_range(
            self.max_connections,
            1..=1_000_000,
            &at.key("max_connections"),
            problems,
        );
        check_range(
            self.max_concurrent_requests,
            1..=1_000_000,
            &at.key("max_concurrent_requests"),
            problems,
        );
        check_range(
            self.http2_max_concurrent_streams,
            1..=10_000,
            &at.key("http2_max_concurrent_streams"),
            problems,
        );
    }

    /// The hyper connection builder for these limits. hyper's own limits sit above ours so
    /// that ours (with JSON errors) trigger first; hyper's are the backstop against abuse.
    pub(crate) fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size((self.max_header_bytes * 2).max(8192 + 1024))
            .max_headers(self.max_headers * 2);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(self.max_header_bytes * 2).unwrap_or(u32::MAX));
        b
    }
}

/// Connection-level settings for one listener.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) builder: Arc<auto::Builder<TokioExecutor>>,
    pub(crate) idle_timeout: Duration,
    /// Cancelled when the drain timeout runs out: connections still open are dropped.
    pub(crate) force_close: CancellationToken,
    /// Connection metrics (the data plane's; the admin listener has none).
    pub(crate) metrics: Option<crate::metrics::ConnectionFamilies>,
    /// TLS termination, if this listener serves HTTPS.
    pub(crate) tls: Option<TlsSettings>,
}

/// How a listener terminates TLS.
#[derive(Clone)]
pub(crate) struct TlsSettings {
    /// The acceptor config for a new connection: the live snapshot's, so a reload that
    /// rotates the certificate applies to the next handshake.
    pub(crate) current: Arc<dyn Fn() -> Option<Arc<rustls::ServerConfig>> + Send + Sync>,
    /// Time a client has to complete the handshake (`server.header_read_timeout`).
    pub(crate) handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a connection is answered with one error response and closed instead of being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Over `server.max_connections`.
    ConnectionLimit,
    /// Cleartext HTTP sent to the HTTPS port.
    HttpsRequired,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    /// Set on a TLS connection once its handshake completed.
    pub(crate) tls: Option<TlsInfo>,
}

/// Runs the accept loop until `shutdown`, spawning one task per connection on `tracker`.
///
/// `make_service(peer, refusal)` builds the per-connection service once the connection is
/// ready for HTTP (after its TLS handshake). With a [`Refusal`] it is a service that answers
/// one error with `connection: close`: a 503 for connections beyond `max_connections`, a 400
/// for cleartext HTTP on the HTTPS port.
pub(crate) async fn accept_loop<F, S, B>(
    listener: TcpListener,
    settings: ConnSettings,
    max_connections: usize,
    make_service: F,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    F: Fn(Peer, Option<Refusal>) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let make_service = Arc::new(make_service);
    let permits = Arc::new(Semaphore::new(max_connections));
    // Over-limit connections are answered with a 503, but that costs a task each: cap them too.
    let overflow = Arc::new(Semaphore::new(max_connections / 8 + 16));
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (permit, over_limit) = match permits.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => {
                if let Some(m) = &settings.metrics {
                    m.rejected.inc();
                }
                match overflow.clone().try_acquire_owned() {
                    Ok(p) => (p, true),
                    Err(_) => {
                        tracing::warn!(%peer, "connection dropped: over the connection limit");
                        continue;
                    }
                }
            }
        };
        let open = settings.metrics.as_ref().filter(|_| !over_limit).map(|m| {
            m.accepted.inc();
            OpenConnection::new(m.open.clone())
        });
        let make_service = make_service.clone();
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let peer = Peer {
                addr: peer,
                tls: None,
            };
            let over_limit = over_limit.then_some(Refusal::ConnectionLimit);
            match settings.tls.clone() {
                None => {
                    let service = make_service(peer, over_limit);
                    serve_connection(stream, service, settings, shutdown).await;
                }
                Some(tls) => match handshake(stream, &tls, &settings, &shutdown).await {
                    Handshake::Done(stream, info) => {
                        let peer = Peer {
                            tls: Some(info),
                            ..peer
                        };
                        let service = make_service(peer, over_limit);
                        serve_connection(stream, service, settings, shutdown).await;
                    }
                    // An answer a person can read beats a reset: curl http:// on an
                    // https port says what went wrong.
                    Handshake::Cleartext(stream) => {
                        let service = make_service(peer, Some(Refusal::HttpsRequired));
                        serve_connection(stream, service, settings, shutdown).await;
                    }
                    Handshake::Failed => {}
                },
            }
            drop(open);
            drop(permit);
        });
    }
}

/// How a TLS handshake ended.
enum Handshake {
    /// Boxed: a TLS session is over a kilobyte, the other outcomes a few words.
    Done(Box<tokio_rustls::server::TlsStream<TcpStream>>, TlsInfo),
    /// The client spoke cleartext HTTP: the stream, nothing read from it yet.
    Cleartext(TcpStream),
    Failed,
}

/// A TLS record starts with its content type; a handshake's is 22.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The server side of a TLS handshake, bounded by the handshake timeout and cut short by
/// shutdown. `Failed` when it did not complete (counted and logged at debug: a port scanner or
/// a client that distrusts the certificate is not the proxy's problem).
async fn handshake(
    stream: TcpStream,
    tls: &TlsSettings,
    settings: &ConnSettings,
    shutdown: &CancellationToken,
) -> Handshake {
    let Some(config) = (tls.current)() else {
        return Handshake::Failed;
    };
    let count = |result: &str| {
        if let Some(m) = &settings.metrics {
            m.tls_handshakes.with_label_values(&[result]).inc();
        }
    };
    // One byte, peeked: a ClientHello starts with a handshake record; anything else is
    // probably a cleartext request, answered as one. Peek and handshake share one timeout.
    let steps = async {
        let mut first = [0u8; 1];
        if let Ok(1..) = stream.peek(&mut first).await
            && first[0] != TLS_HANDSHAKE_RECORD
        {
            return Err(stream);
        }
        // A peek that failed fails the handshake too, counted as `io` below.
        Ok(tokio_rustls::TlsAcceptor::from(config).accept(stream).await)
    };
    let done = tokio::select! {
        r = tokio::time::timeout(tls.handshake_timeout, steps) => r,
        () = shutdown.cancelled() => return Handshake::Failed,
    };
    match done {
        Ok(Err(cleartext)) => {
            count("cleartext");
            Handshake::Cleartext(cleartext)
        }
        Ok(Ok(Ok(stream))) => {
            count("ok");
            let info = TlsInfo::of(stream.get_ref().1);
            Handshake::Done(Box::new(stream), info)
        }
        Ok(Ok(Err(e))) => {
            let reason = tls::failure_reason(&e);
            count(reason);
            tracing::debug!(reason, error = %e, "TLS handshake failed");
            Handshake::Failed
        }
        Err(_) => {
            count("timeout");
            tracing::debug!("TLS handshake timed out");
            Handshake::Failed
        }
    }
}

/// Counts a connection in `bff_connections_open` while it exists.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn serve_connection<I, S, B>(
    stream: I,
    service: S,
    settings: ConnSettings,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (io, activity) = idle::IdleIo::new(stream);
    let conn = settings.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // Over-limit connections need no special casing here: their one response carries
    // `connection: close`, so hyper closes them after it.
    let mut closing = false;
    loop {
        let idle_deadline = activity.last() + settings.idle_timeout;
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            () = settings.force_close.cancelled() => {
                tracing::debug!("connection closed at the drain deadline");
                break;
            }
            () = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = tokio::time::sleep_until(idle_deadline.into()), if !closing => {
                if activity.last() + settings.idle_timeout <= std::time::Instant::now() {
                    tracing::debug!("closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
