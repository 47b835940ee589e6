//! Upstream services: the phase after routing. Each named service has one or more base URLs
//! (round-robin), its own connections and its own timeouts: HTTP/1.1 services a keep-alive
//! [`pool`] per URL, HTTP/2 services hyper-util's multiplexing client (docs/dev/0002).
//! `https://` services connect with TLS ([`tls`]: rustls, the service's CAs or the system's,
//! optionally the proxy's own certificate), in the pool's connect step or hyper-rustls's.
//!
//! A service with a `cache` section answers cacheable `GET`s from memory ([`cache`]), for the
//! route's own call and plugins' `send`s alike.
//!
//! Requests and responses stream through: nothing here buffers a body (the cache keeps a copy
//! of a storable response as it streams by).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use http_body::{Body as _, Frame};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Deserialize;

use tracing::Instrument;

mod cache;
mod pool;
pub(crate) mod tls;
pub use cache::CacheConfig;
use cache::{Cache, Lookup, RequestFacts};
pub(crate) use cache::{OUTCOMES as CACHE_OUTCOMES, Outcome as CacheOutcome};
use pool::Pool;
pub use tls::UpstreamTlsConfig;

use crate::body::Body;
use crate::config::{ConfigPath, Problems, is_valid_name};
use crate::metrics::{Caller, ServiceSeries, UpstreamFamilies};
use crate::observe::{Counted, Direction, RequestStats};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_MAX_IDLE: usize = 64;
/// Idle pooled connections are closed after this long; below common upstream keep-alive
/// timeouts (nginx 75 s, Node 5 s is the outlier), so we rarely reuse a socket the peer closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// `[services.NAME]`: one upstream service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Base URLs (`http://host:port[/base/path]`, or all `https://`); requests go round-robin
    /// among them.
    pub urls: Vec<String>,
    /// Wire protocol to the service: `http1`, or `http2` (prior knowledge in cleartext, ALPN
    /// over TLS).
    pub protocol: Protocol,
    /// How `https://` URLs are verified and which certificate the proxy presents to them
    /// (set, with defaults, for every `https://` service when the config loads).
    pub tls: Option<UpstreamTlsConfig>,
    /// Time to establish a TCP connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending the request to receiving the response head.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Idle keep-alive connections kept per URL.
    pub max_idle_connections: usize,
    /// Keep the service's cacheable `GET` responses in memory (RFC 9111 shared cache).
    pub cache: Option<CacheConfig>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            protocol: Protocol::Http1,
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_idle_connections: DEFAULT_MAX_IDLE,
            cache: None,
        }
    }
}

/// Upstream wire protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext TCP (h2c, prior knowledge).
    Http2,
}

impl ServiceConfig {
    /// True if the service's URLs are all `https://` (a mix is a config problem).
    pub(crate) fn uses_tls(&self) -> bool {
        !self.urls.is_empty() && self.urls.iter().all(|u| u.starts_with("https://"))
    }

    /// Gives an `https://` service its TLS settings (defaults when the file has none) and
    /// loads them; problems go under `at`.
    pub(crate) fn load_tls(&mut self, at: &ConfigPath, problems: &mut Problems) {
        if self.uses_tls() {
            self.tls
                .get_or_insert_default()
                .load(&at.key("tls"), problems);
        }
    }

    pub(crate) fn validate(&self, name: &str, at: &ConfigPath, problems: &mut Problems) {
        if !is_valid_name(name) {
            problems.push(at.clone(), crate::config::NAME_RULE);
        }
        if self.urls.is_empty() {
            problems.push(at.key("urls"), "a service needs at least one URL");
        }
        let mut schemes = Vec::new();
        for (i, url) in self.urls.iter().enumerate() {
            match Endpoint::parse(url) {
                Ok(ep) => schemes.push(ep.scheme),
                Err(e) => problems.push(at.key("urls").index(i), e),
            }
        }
        let tls = schemes.iter().filter(|s| **s == Scheme::HTTPS).count();
        if tls > 0 && tls < schemes.len() {
            problems.push(
                at.key("urls"),
                "mix of http:// and https:// URLs: a service's URLs are all one or the other",
            );
        }
        if tls == 0
            && self
                .tls
                .as_ref()
                .is_some_and(|t| *t != UpstreamTlsConfig::default())
        {
            problems.push(
                at.key("tls"),
                "applies to https:// URLs; this service has none",
            );
        }
        crate::config::check_duration(
            self.connect_timeout,
            Duration::from_millis(1)..=Duration::from_secs(60),
            &at.key("connect_timeout"),
            problems,
        );
        crate::config::check_duration(
            self.request_timeout,
            Duration::from_millis(1)..=Duration::from_secs(3600),
            &at.key("request_timeout"),
            problems,
        );
        if self.max_idle_connections > 10_000 {
            problems.push(at.key("max_idle_connections"), "must be at most 10000");
        }
        if let Some(cache) = &self.cache {
            cache.validate(&at.key("cache"), problems);
        }
    }
}

/// One base URL of a service.
#[derive(Debug, Clone)]
struct Endpoint {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing slash (`""` for the root).
    base_path: String,
    /// The HTTP/1 `host` field for this URL: the host, and the port unless it is the scheme's
    /// default. Built once
    /// here; hyper-util's client would otherwise format it for every request.
    host: HeaderValue,
    /// `host:port` to connect to.
    target: Arc<str>,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("`{url}` is not a valid URL: {e}"))?;
        let (scheme, default_port) = match uri.scheme_str() {
            Some("http") => (Scheme::HTTP, 80),
            Some("https") => (Scheme::HTTPS, 443),
            _ => {
                return Err(format!(
                    "`{url}`: the URL must start with http:// or https://"
                ));
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{url}`: credentials in URLs are not supported"));
        }
        if uri.query().is_some() || url.contains('#') {
            return Err(format!(
                "`{url}`: a base URL cannot have a query or fragment"
            ));
        }
        // Validation refused credentials, so the authority is `host[:port]`.
        let host = match authority.port_u16() {
            Some(p) if p == default_port => authority.host(),
            _ => authority.as_str(),
        };
        let host =
            HeaderValue::from_str(host).map_err(|_| format!("`{url}` has an invalid host"))?;
        let target = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(default_port)
        );
        Ok(Self {
            scheme,
            host,
            target: target.into(),
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl Endpoint {
    /// The name a TLS connection to this URL verifies: `server_name` if set, else the host
    /// (a DNS name or an IP address).
    fn server_name(
        &self,
        tls: Option<&UpstreamTlsConfig>,
    ) -> rustls::pki_types::ServerName<'static> {
        let host = tls.and_then(|t| t.server_name.clone()).unwrap_or_else(|| {
            let host = self.authority.host();
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
                .to_owned()
        });
        rustls::pki_types::ServerName::try_from(host)
            .expect("a URL's host and a validated server_name are valid server names")
    }
}

/// Why an upstream call failed. The request path maps these to 502/504 in `error`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// No connection could be made (refused, unreachable, connect timeout).
    #[error("cannot connect to upstream service `{service}`")]
    Connect {
        service: Arc<str>,
        #[source]
        source: BoxError,
    },
    /// The response head did not arrive in time.
    #[error("upstream service `{service}` did not answer within {timeout:?}")]
    Timeout {
        service: Arc<str>,
        timeout: Duration,
    },
    /// The request body was larger than allowed (found while streaming it).
    #[error("request body exceeds the limit")]
    RequestBodyTooLarge,
    /// The exchange broke after the connection was made.
    #[error("upstream service `{service}` failed")]
    Failed {
        service: Arc<str>,
        #[source]
        source: BoxError,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a service's requests reach it.
#[derive(Debug)]
enum Transport {
    /// One pool of keep-alive connections per URL, in `endpoints` order.
    Http1(Vec<Arc<Pool>>),
    /// hyper-util's client: one multiplexed connection per URL (h2c, or h2 over TLS).
    Http2(Box<Client<HttpsConnector<HttpConnector>, Body>>),
}

/// A failed exchange of either transport, before it is told apart by cause.
struct SendError {
    /// No connection was made: the upstream cannot have seen the request.
    connect: bool,
    source: BoxError,
}

impl From<pool::PoolError> for SendError {
    fn from(e: pool::PoolError) -> Self {
        Self {
            connect: e.is_connect(),
            source: e.into(),
        }
    }
}

impl From<hyper_util::client::legacy::Error> for SendError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        Self {
            connect: e.is_connect(),
            source: e.into(),
        }
    }
}

#[derive(Debug)]
struct Service {
    name: Arc<str>,
    /// The URLs it was built from: a service keeps its cache across reloads while these and
    /// its cache settings stay the same.
    urls: Vec<String>,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    transport: Transport,
    timeout: Duration,
    series: ServiceSeries,
    cache: Option<Arc<Cache>>,
}

/// Whose upstream call it is: the call is counted in the caller's metrics and its request's
/// stats (upstream time, bytes from upstreams).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallFor<'a> {
    pub(crate) caller: Caller,
    pub(crate) stats: &'a Arc<RequestStats>,
}

/// An upstream response body: from the wire (counted into its request's bytes from upstreams;
/// recorded for the cache when storable), or a stored copy.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    Wire(Counted<Incoming>),
    /// Boxed: only a storable miss carries one.
    Recorded(Counted<Incoming>, Box<cache::Recording>),
    Stored(Option<Bytes>),
}

impl UpstreamBody {
    fn stored(response: Response<Bytes>) -> Response<Self> {
        response.map(|b| Self::Stored(Some(b)))
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Wire(body) => Pin::new(body).poll_frame(cx),
            Self::Recorded(body, recording) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                recording.observe(&polled, body.is_end_stream());
                polled
            }
            Self::Stored(data) => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Wire(body) | Self::Recorded(body, _) => body.is_end_stream(),
            Self::Stored(data) => data.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Wire(body) | Self::Recorded(body, _) => body.size_hint(),
            Self::Stored(data) => {
                http_body::SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Every upstream service of one snapshot.
#[derive(Debug)]
pub(crate) struct Upstreams {
    services: HashMap<Arc<str>, Service>,
    /// Request headers the proxy fills with a user's identity (see [`cache`]).
    credentials: Box<[HeaderName]>,
}

impl Upstreams {
    /// Builds clients from validated service configs. A service of `previous` with the same
    /// URLs and cache settings lends its cache (its stored responses stay). Must run inside a
    /// Tokio runtime.
    pub(crate) fn build<'a>(
        services: impl IntoIterator<Item = (&'a String, &'a ServiceConfig)>,
        metrics: &UpstreamFamilies,
        previous: Option<&Upstreams>,
        credentials: Box<[HeaderName]>,
    ) -> Self {
        let services = services
            .into_iter()
            .map(|(name, cfg)| {
                let name: Arc<str> = name.as_str().into();
                let cache = cfg.cache.as_ref().map(|c| {
                    previous
                        .and_then(|p| p.services.get(&name))
                        .filter(|old| old.urls == cfg.urls)
                        .and_then(|old| old.cache.clone())
                        .filter(|old| old.config() == c)
                        .unwrap_or_else(|| Arc::new(Cache::new(c, metrics.cache_series(&name))))
                });
                let endpoints: Vec<Endpoint> = cfg
                    .urls
                    .iter()
                    .map(|u| Endpoint::parse(u).expect("service URLs were validated"))
                    .collect();
                let tls = cfg.tls.as_ref().and_then(|t| t.loaded.as_ref());
                let transport = match cfg.protocol {
                    Protocol::Http1 => Transport::Http1(
                        endpoints
                            .iter()
                            .map(|ep| {
                                let connector = tls.map(|t| {
                                    tls::Connector::http1(t, ep.server_name(cfg.tls.as_ref()))
                                });
                                Pool::new(
                                    ep.target.clone(),
                                    cfg.max_idle_connections,
                                    POOL_IDLE_TIMEOUT,
                                    cfg.connect_timeout,
                                    connector,
                                )
                            })
                            .collect(),
                    ),
                    Protocol::Http2 => {
                        let mut http = HttpConnector::new();
                        http.set_connect_timeout(Some(cfg.connect_timeout));
                        http.set_nodelay(true);
                        http.enforce_http(false);
                        // Cleartext services never use the TLS config; an empty one will do.
                        let tls_config = tls.map_or_else(
                            || {
                                rustls::ClientConfig::builder_with_provider(Arc::new(
                                    rustls::crypto::aws_lc_rs::default_provider(),
                                ))
                                .with_safe_default_protocol_versions()
                                .expect("the default provider supports the default versions")
                                .with_root_certificates(rustls::RootCertStore::empty())
                                .with_no_client_auth()
                            },
                            |t| (***t).clone(),
                        );
                        let builder = hyper_rustls::HttpsConnectorBuilder::new()
                            .with_tls_config(tls_config)
                            .https_or_http();
                        let builder = match cfg.tls.as_ref().and_then(|t| t.server_name.clone()) {
                            Some(name) => builder.with_server_name_resolver(
                                hyper_rustls::FixedServerNameResolver::new(
                                    rustls::pki_types::ServerName::try_from(name)
                                        .expect("server names were validated"),
                                ),
                            ),
                            None => builder,
                        };
                        let connector = builder.enable_http2().wrap_connector(http);
                        let mut builder = Client::builder(TokioExecutor::new());
                        builder
                            .pool_timer(TokioTimer::new())
                            .timer(TokioTimer::new())
                            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                            .pool_max_idle_per_host(cfg.max_idle_connections)
                            .http2_only(true);
                        Transport::Http2(Box::new(builder.build(connector)))
                    }
                };
                let service = Service {
                    name: name.clone(),
                    urls: cfg.urls.clone(),
                    endpoints,
                    next: AtomicUsize::new(0),
                    transport,
                    timeout: cfg.request_timeout,
                    series: metrics.series(&name),
                    cache,
                };
                (name, service)
            })
            .collect();
        Self {
            services,
            credentials,
        }
    }

    /// The identity headers it was built with: a snapshot reuses these upstreams only if its
    /// own are the same.
    pub(crate) fn credentials(&self) -> &[HeaderName] {
        &self.credentials
    }

    /// Sends `req` to `service`. `path` is the upstream path (already rewritten) and `query` the
    /// raw query string; the service's base URL is put in front. A service with a cache may
    /// answer from it.
    pub(crate) async fn send(
        &self,
        service: &str,
        path: &str,
        query: Option<&str>,
        req: Request<Body>,
        deadline: Duration,
        by: CallFor<'_>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let svc = self
            .services
            .get(service)
            .expect("routes only name services of the same snapshot");
        match &svc.cache {
            Some(cache) => {
                let credentialed = cache.credentialed(req.headers(), &self.credentials);
                svc.send_cached(path, query, req, deadline, by, credentialed)
                    .await
            }
            None => {
                let resp = svc.exchange(path, query, req, deadline, by).await?;
                Ok(resp.map(|b| UpstreamBody::Wire(by.counted(b))))
            }
        }
    }

    /// Drops the stored responses of `service` whose path starts with `prefix` (all of them
    /// with `None`). `None` if the service does not exist or has no cache.
    pub(crate) fn purge(&self, service: &str, prefix: Option<&str>) -> Option<usize> {
        let cache = self.services.get(service)?.cache.as_ref()?;
        Some(cache.purge(prefix))
    }
}

impl CallFor<'_> {
    /// A response body from the wire, counted into the request's bytes from upstreams.
    fn counted(&self, body: Incoming) -> Counted<Incoming> {
        Counted::new(body, self.stats.clone(), Direction::Upstream)
    }
}

/// Appends our entry to a response's `cache-status`.
fn append_cache_status(headers: &mut HeaderMap, fwd: &str, status: StatusCode, stored: bool) {
    let stored = if stored { "; stored" } else { "" };
    let value = format!(
        "bff-proxy; fwd={fwd}; fwd-status={}{stored}",
        status.as_u16()
    );
    headers.append(
        cache::CACHE_STATUS.clone(),
        HeaderValue::try_from(value).expect("ASCII"),
    );
}

impl Service {
    /// The cache's part of the upstream phase: answer from a stored copy, wait for another
    /// request already fetching this one, revalidate a stale copy, or fetch and record.
    async fn send_cached(
        &self,
        path: &str,
        query: Option<&str>,
        mut req: Request<Body>,
        deadline: Duration,
        by: CallFor<'_>,
        credentialed: bool,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let cache = self
            .cache
            .as_ref()
            .expect("only services with a cache are sent to this way");
        let stored = |response: Response<Bytes>| {
            by.stats.served_from_cache();
            UpstreamBody::stored(response)
        };
        let eligible = req.method() == Method::GET
            && req.body().is_end_stream()
            && !req.headers().contains_key(header::RANGE);
        if !eligible {
            cache.count(CacheOutcome::Bypass);
            let fwd = if req.method() == Method::GET {
                "request"
            } else {
                "method"
            };
            let (mut parts, body) = self
                .exchange(path, query, req, deadline, by)
                .await?
                .into_parts();
            append_cache_status(&mut parts.headers, fwd, parts.status, false);
            return Ok(Response::from_parts(
                parts,
                UpstreamBody::Wire(by.counted(body)),
            ));
        }
        let started = Instant::now();
        let key = cache.key(path, query, req.headers());
        let mut stale = None;
        let mut fwd = "uri-miss";
        match cache.lookup(&key, req.headers(), credentialed, started) {
            Lookup::Fresh(entry) => {
                return Ok(stored(cache.serve(
                    &entry,
                    req.headers(),
                    cache::Served::Hit,
                    started,
                )));
            }
            Lookup::Stale(entry) => {
                stale = Some(entry);
                fwd = "stale";
            }
            Lookup::OtherVariant => fwd = "vary-miss",
            Lookup::NotShared => fwd = "request",
            Lookup::Missing => {}
        }
        let leader = match cache.lead(&key) {
            Ok(leader) => Some(leader),
            Err(mut done) => {
                // Another request is fetching it: wait for that (within this call's deadline),
                // then use what it stored, or fetch independently.
                let waiting = by.stats.upstream_wait();
                let _ = tokio::time::timeout(deadline.min(self.timeout), done.changed()).await;
                drop(waiting);
                let now = Instant::now();
                if let Lookup::Fresh(entry) = cache.lookup(&key, req.headers(), credentialed, now) {
                    return Ok(stored(cache.serve(
                        &entry,
                        req.headers(),
                        cache::Served::Collapsed,
                        now,
                    )));
                }
                None
            }
        };
        let remaining = deadline.saturating_sub(started.elapsed());
        let facts = RequestFacts::of(req.headers(), credentialed);
        let revalidating = stale.as_ref().filter(|e| e.has_validator());
        if let Some(entry) = revalidating {
            // Our own validators replace the caller's; the caller's are answered from the copy.
            let headers = req.headers_mut();
            headers.remove(header::IF_NONE_MATCH);
            headers.remove(header::IF_MODIFIED_SINCE);
            entry.add_validators(headers);
        }
        let result = self.exchange(path, query, req, remaining, by).await;
        let now = Instant::now();
        let on_error = |failed: bool| {
            stale
                .as_ref()
                .filter(|e| failed && e.servable_on_error(now))
                .map(|e| stored(cache.serve(e, facts.headers(), cache::Served::Stale, now)))
        };
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                let failed = !matches!(e, UpstreamError::RequestBodyTooLarge);
                return on_error(failed).ok_or(e);
            }
        };
        if let Some(entry) = revalidating
            && resp.status() == StatusCode::NOT_MODIFIED
        {
            let entry = cache.refresh(&key, entry, resp.headers(), &facts, now);
            drop(leader);
            return Ok(stored(cache.serve(
                &entry,
                facts.headers(),
                cache::Served::Revalidated,
                now,
            )));
        }
        if matches!(resp.status().as_u16(), 500 | 502 | 503 | 504)
            && let Some(served) = on_error(true)
        {
            return Ok(served);
        }
        cache.count(CacheOutcome::Miss);
        let (mut parts, body) = resp.into_parts();
        let recording = cache.admit(key, &parts, &facts, leader);
        append_cache_status(&mut parts.headers, fwd, parts.status, recording.is_some());
        let body = by.counted(body);
        let body = match recording {
            Some(mut recording) if body.is_end_stream() => {
                recording.finish();
                UpstreamBody::Wire(body)
            }
            Some(recording) => UpstreamBody::Recorded(body, recording),
            None => UpstreamBody::Wire(body),
        };
        Ok(Response::from_parts(parts, body))
    }

    /// One exchange with the service (round-robin over its URLs), recorded in its metrics and
    /// the request's upstream time.
    async fn exchange(
        &self,
        path: &str,
        query: Option<&str>,
        mut req: Request<Body>,
        deadline: Duration,
        by: CallFor<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let CallFor { caller, stats } = by;
        let svc = self;
        let n = svc.next.fetch_add(1, Ordering::Relaxed) % svc.endpoints.len();
        let ep = &svc.endpoints[n];
        let mut pq = String::with_capacity(
            ep.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&ep.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::from_maybe_shared(pq)
            .expect("normalized paths and the original query form a valid path-and-query");

        let timeout = deadline.min(svc.timeout);
        let span = tracing::debug_span!("upstream", service = %svc.name, caller = caller.as_str());
        // With `[tracing]`: a client span, whose id the service sees as its parent.
        let otel = stats.span().map(|s| {
            use opentelemetry::KeyValue;
            let child = s.child(
                format!("{} {}", req.method(), svc.name),
                opentelemetry::trace::SpanKind::Client,
                vec![
                    KeyValue::new("http.request.method", req.method().as_str().to_owned()),
                    KeyValue::new("server.address", ep.authority.host().to_owned()),
                    KeyValue::new("url.path", pq.path().to_owned()),
                    KeyValue::new("bff.service", svc.name.to_string()),
                    KeyValue::new("bff.caller", caller.as_str()),
                ],
            );
            req.headers_mut()
                .insert(crate::observe::trace::TRACEPARENT, child.traceparent());
            child
        });
        let call = stats.upstream_call();
        let started = std::time::Instant::now();
        let exchange = async {
            match &svc.transport {
                Transport::Http1(pools) => {
                    // Origin form on the wire; the caller removed the client's `host`.
                    *req.uri_mut() = Uri::from(pq);
                    *req.version_mut() = Version::HTTP_11;
                    req.headers_mut().insert(header::HOST, ep.host.clone());
                    pools[n].send(req).await.map_err(SendError::from)
                }
                Transport::Http2(client) => {
                    *req.uri_mut() = Uri::from_parts({
                        let mut parts = http::uri::Parts::default();
                        parts.scheme = Some(ep.scheme.clone());
                        parts.authority = Some(ep.authority.clone());
                        parts.path_and_query = Some(pq);
                        parts
                    })
                    .expect("scheme, authority and path are all set");
                    *req.version_mut() = Version::HTTP_2;
                    client.request(req).await.map_err(SendError::from)
                }
            }
        };
        let result = tokio::time::timeout(timeout, exchange)
            .instrument(span)
            .await;
        drop(call);
        let outcome = match &result {
            Ok(Ok(resp)) => Ok(resp.status().as_u16()),
            Err(_) => Err("timeout"),
            Ok(Err(e)) if e.connect => Err("connect_error"),
            Ok(Err(_)) => Err("error"),
        };
        svc.series.record(caller, outcome, started.elapsed());
        if let Some(span) = otel {
            match outcome {
                Ok(status) => span.end(
                    vec![opentelemetry::KeyValue::new(
                        "http.response.status_code",
                        i64::from(status),
                    )],
                    (status >= 500).then_some("server_error"),
                ),
                Err(failure) => span.end(Vec::new(), Some(failure)),
            }
        }
        match result {
            Err(_) => Err(UpstreamError::Timeout {
                service: svc.name.clone(),
                timeout,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if caused_by_body_limit(&*e.source) => {
                Err(UpstreamError::RequestBodyTooLarge)
            }
            Ok(Err(e)) if e.connect => Err(UpstreamError::Connect {
                service: svc.name.clone(),
                source: e.source,
            }),
            Ok(Err(e)) => Err(UpstreamError::Failed {
                service: svc.name.clone(),
                source: e.source,
            }),
        }
    }
}

fn caused_by_body_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn host_field_omits_the_default_port() {
        let host = |url: &str| Endpoint::parse(url).expect("a valid URL").host;
        assert_eq!(host("http://users.internal"), "users.internal");
        assert_eq!(host("http://users.internal:80/v1"), "users.internal");
        assert_eq!(host("http://127.0.0.1:8081"), "127.0.0.1:8081");
        assert_eq!(host("http://[::1]:9000/api/"), "[::1]:9000");
    }
}
