//! The request path, phase by phase:
//!
//! ```text
//! accept ─▶ limits ─▶ identify client ─▶ normalize path ─▶ route ─▶ upstream ─▶ respond + log
//!            431/413      401               400              404/405    502/504
//! ```
//!
//! [`handle`] loads the live snapshot once, so a request runs entirely on the config it started
//! with even if a reload swaps the snapshot meanwhile. Each phase either continues or ends the
//! request with a [`ProxyError`], which is turned into a response in exactly one place
//! (`error.rs`). The last phase (`observe::Finish`: metrics and the access log) always runs and
//! sees the outcome, error included, once the response body has been sent.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use serde::Deserialize;
use tracing::Instrument;

use crate::body::{self, Body};
use crate::config::{ConfigPath, Problems};
use crate::error::{ErrorChain, Fault, ProxyError};
use crate::identity::{Identified, Presenting, Verified};
use crate::listener::tls::ClientCert;
use crate::listener::{Peer, ServerConfig, TlsInfo};
use crate::metrics::Caller;
use crate::observe::trace::TraceContext;
use crate::observe::{Counted, Direction, Finish, Logged};
use crate::router::path::normalize;
use crate::state::{Shared, Snapshot};

/// `[headers]`: headers the proxy manages on upstream requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// Header that tells upstreams which client a request was identified as. Any copy the
    /// client sent is removed first, so a client cannot claim another identity.
    pub client: String,
    /// Request id header: propagated when the client sends a sane one, generated otherwise,
    /// and echoed on the response.
    pub request_id: String,
    /// Add `x-forwarded-for`, `x-forwarded-proto`, `x-forwarded-host` and `forwarded`.
    pub forwarded: bool,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        Self {
            client: "x-bff-client".into(),
            request_id: "x-request-id".into(),
            forwarded: true,
        }
    }
}

impl HeadersConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        for (key, name) in [("client", &self.client), ("request_id", &self.request_id)] {
            match HeaderName::from_bytes(name.as_bytes()) {
                Err(_) => {
                    problems.push(at.key(key), format!("`{name}` is not a valid header name"))
                }
                Ok(h) if is_hop_by_hop(&h) || h == header::HOST => problems.push(
                    at.key(key),
                    format!("`{name}` is managed by the proxy and cannot be used here"),
                ),
                Ok(_) => {}
            }
        }
    }
}

/// Header names resolved once per snapshot.
#[derive(Debug)]
pub(crate) struct HeaderNames {
    pub(crate) client: HeaderName,
    pub(crate) request_id: HeaderName,
    forwarded: bool,
}

impl HeaderNames {
    pub(crate) fn build(cfg: &HeadersConfig) -> Self {
        Self {
            client: HeaderName::from_bytes(cfg.client.as_bytes()).expect("validated header name"),
            request_id: HeaderName::from_bytes(cfg.request_id.as_bytes())
                .expect("validated header name"),
            forwarded: cfg.forwarded,
        }
    }
}

/// Facts about the connection a request arrived on, worked out once per connection so the
/// requests on it only copy them.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    /// The peer's address as an `x-forwarded-for` element.
    xff_element: HeaderValue,
    /// The peer as a `forwarded` element (RFC 7239): `for=192.0.2.1;proto=http`, IPv6 quoted.
    forwarded_element: String,
    /// What the TLS handshake established, on a TLS connection.
    pub(crate) tls: Option<TlsInfo>,
}

impl ConnInfo {
    pub(crate) fn new(peer: Peer) -> Self {
        let ip = peer.addr.ip();
        let xff = ip.to_string();
        let proto = if peer.tls.is_some() { "https" } else { "http" };
        let forwarded_element = if ip.is_ipv6() {
            format!("for=\"[{ip}]\";proto={proto}")
        } else {
            format!("for={ip};proto={proto}")
        };
        Self {
            peer: peer.addr,
            xff_element: HeaderValue::from_str(&xff)
                .expect("an IP address is a valid header value"),
            forwarded_element,
            tls: peer.tls,
        }
    }

    /// `x-forwarded-proto`: `https` on a TLS connection.
    fn proto(&self) -> HeaderValue {
        HeaderValue::from_static(if self.tls.is_some() { "https" } else { "http" })
    }

    /// The verified TLS client certificate of the connection, if any.
    pub(crate) fn client_cert(&self) -> Option<&ClientCert> {
        self.tls.as_ref()?.client_cert.as_deref()
    }
}

/// Serves one request on the current snapshot. Never fails: errors become JSON responses. The
/// log phase (metrics, access log) runs when the returned body ends, see [`Finish`].
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Logged> {
    let snapshot = shared.live.load_full();
    let (request_id, generated) = request_id(req.headers(), &snapshot.headers.request_id);
    let trace = TraceContext::from_request(req.headers(), generated.then_some(&request_id));
    let mut ctx = Box::new(Finish::start(
        shared.clone(),
        snapshot.clone(),
        request_id,
        trace,
        &req,
        conn.peer.ip(),
        conn.tls.as_ref().map(|t| t.version),
    ));
    // A DEBUG span: with a fmt subscriber an enabled span formats its fields up front, which
    // at INFO would cost every request about as much as the rest of the pipeline. Events at
    // WARN and above carry the request id, client and route themselves.
    let span = tracing::debug_span!(
        "request",
        method = %req.method(),
        request_id = ctx.request_id.to_str().unwrap_or_default(),
        trace_id = ctx.trace.trace_id(),
        client = tracing::field::Empty,
        route = tracing::field::Empty,
    );

    let result = async {
        // Load shedding comes first: an overloaded proxy should spend nothing on the request.
        let _permit = shared
            .request_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProxyError::Overloaded)?;
        proxy(&snapshot, &shared.server, &conn, &mut ctx, req).await
    }
    .instrument(span.clone())
    .await;

    // Respond: errors become JSON responses, logged once with their fields.
    let _enter = span.enter();
    let request_id = ctx.request_id.to_str().unwrap_or_default();
    let client = ctx.client.as_ref().map_or("", |c| &*c.1);
    let route = ctx.route.as_ref().map_or("", |r| &*r.1);
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => {
            match err.fault() {
                Fault::Client => {
                    tracing::debug!(code = err.code(), error = %err, "request refused");
                }
                Fault::Overload => tracing::warn!(code = err.code(), request_id, "request shed"),
                Fault::Plugin => tracing::warn!(
                    code = err.code(),
                    request_id,
                    client,
                    route,
                    error = %ErrorChain(&err),
                    "plugin chain failed"
                ),
                Fault::Upstream => tracing::warn!(
                    code = err.code(),
                    request_id,
                    client,
                    route,
                    service = ctx.service.as_deref().unwrap_or(""),
                    error = %ErrorChain(&err),
                    "upstream failed"
                ),
            }
            ctx.error = Some(err.code());
            err.into_response(request_id)
        }
    };
    resp.headers_mut()
        .insert(snapshot.headers.request_id.clone(), ctx.request_id.clone());
    ctx.status = Some(resp.status().as_u16());
    drop(_enter);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Logged::new(body, ctx))
}

/// Answers a request the proxy refuses before the pipeline runs (over the connection limit),
/// with the same request-id handling as every other response. Counted as an error, not as a
/// request of a client (nothing about it was looked at).
pub(crate) fn refuse(
    shared: &Shared,
    req: &Request<Incoming>,
    err: ProxyError,
) -> Response<Logged> {
    let snapshot = shared.live.load();
    let (id, _) = request_id(req.headers(), &snapshot.headers.request_id);
    shared.metrics.requests.error(err.code());
    let mut resp = err.into_response(id.to_str().unwrap_or_default());
    resp.headers_mut()
        .insert(snapshot.headers.request_id.clone(), id);
    resp.map(Logged::bare)
}

/// The phases between accept and respond.
async fn proxy(
    snap: &Snapshot,
    server: &ServerConfig,
    conn: &ConnInfo,
    ctx: &mut Finish,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    // Limits: checked before anything looks at the headers.
    check_header_limits(req.headers(), server)?;
    let declared_len = req.body().size_hint().exact();
    if let Some(len) = declared_len.filter(|&l| l > server.max_request_body_bytes) {
        tracing::debug!(len, "declared body too large");
        return Err(ProxyError::BodyTooLarge {
            limit: server.max_request_body_bytes,
        });
    }

    // Identify: once per request.
    let identified = snap.identifier.identify(Presenting {
        headers: req.headers(),
        uri: req.uri(),
        cert: conn.client_cert(),
    })?;
    let (client_idx, client) = (identified.index, identified.profile);
    tracing::Span::current().record("client", &*client.name);
    ctx.client = Some((client_idx, client.name.clone()));

    // Route on the normalized path; the upstream gets that same path.
    // A cheap clone (shared bytes) so the routed path can outlive `req` being taken apart.
    let uri = req.uri().clone();
    let path = normalize(uri.path())?;
    if snap.access_log.enabled {
        ctx.path = Some(path.clone().into_owned());
    }
    let (route, params) = snap.router.find(client_idx, req.method(), &path)?;
    tracing::Span::current().record("route", &*route.id);
    if let Some(span) = ctx.stats.span() {
        span.routed(ctx.method.as_str(), &route.id);
    }
    ctx.route = Some((route.index, route.id.clone()));
    ctx.service = route.service.clone();
    // Rate limit: before any plugin instance or upstream call is spent on the request.
    snap.rate_limits
        .check(client_idx)
        .map_err(|retry_after| ProxyError::RateLimited { retry_after })?;
    let upstream_path = route.upstream_path(&path, &params);

    // Upstream request: same method, cleaned headers, streamed body (counted as it passes).
    let query = uri.query();
    let (mut parts, incoming) = req.into_parts();
    let incoming = Counted::new(incoming, ctx.stats.clone(), Direction::In);
    prepare_upstream_headers(&mut parts, snap, conn, ctx, &identified);

    if let Some(chain) = &route.chain {
        // Boxed: the chain's future is large, and inline it would make every request's future
        // (moved by hyper and by each `async` layer) that large too.
        return Box::pin(chain.run(crate::plugins::ChainInput {
            parts,
            body: incoming,
            path: upstream_path.into_owned(),
            query: query.map(str::to_owned),
            service: route.service.clone(),
            upstreams: snap.upstreams.clone(),
            ctx: crate::plugins::context(client, &route.id, &params, &ctx.request_id),
            scope: crate::plugins::ScopeParts {
                request_id: ctx.request_id.clone(),
                request_id_header: snap.headers.request_id.clone(),
                client_header: snap.headers.client.clone(),
                client_value: snap.identifier.name_value(client_idx).clone(),
                traceparent: ctx.trace.traceparent().clone(),
                stats: ctx.stats.clone(),
            },
            max_request_body: server.max_request_body_bytes,
            upstream_timeout: server.request_timeout,
            chain_timeout: snap.chain_timeout,
        }))
        .await;
    }
    let service = route
        .service
        .clone()
        .expect("routes without a chain have a service (validated)");
    let body = if incoming.is_end_stream() {
        body::empty()
    } else {
        body::stream(http_body_util::Limited::new(
            incoming,
            usize::try_from(server.max_request_body_bytes).unwrap_or(usize::MAX),
        ))
    };
    let upstream_req = Request::from_parts(parts, body);
    let resp = snap
        .upstreams
        .send(
            &service,
            &upstream_path,
            query,
            upstream_req,
            server.request_timeout,
            crate::upstream::CallFor {
                caller: Caller::Route,
                stats: &ctx.stats,
            },
        )
        .await?;

    // Response: strip hop-by-hop headers, stream the body back.
    let (mut parts, incoming) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body::stream(incoming)))
}

fn check_header_limits(headers: &HeaderMap, server: &ServerConfig) -> Result<(), ProxyError> {
    if headers.len() > server.max_headers {
        return Err(ProxyError::TooManyHeaders {
            limit: server.max_headers,
        });
    }
    // Same accounting as HTTP/2's SETTINGS_MAX_HEADER_LIST_SIZE: name + value + 32 per field.
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    if size > server.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            limit: server.max_header_bytes,
        });
    }
    Ok(())
}

/// Uses the client's request id when it is short and printable, otherwise makes a new one
/// (32 random lowercase hex digits); the flag says which.
fn request_id(headers: &HeaderMap, name: &HeaderName) -> (HeaderValue, bool) {
    if let Some(v) = headers.get(name) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return (v.clone(), false);
        }
    }
    let id = uuid::Uuid::new_v4();
    let mut buf = [0u8; uuid::fmt::Simple::LENGTH];
    let value = HeaderValue::from_str(id.simple().encode_lower(&mut buf))
        .expect("hex is a valid header value");
    (value, true)
}

const HOP_BY_HOP_COUNT: usize = 7;

/// RFC 9110 §7.6.1: connection-specific fields a proxy must not forward.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_index(name.as_str()).is_some()
}

/// The field's place in [`HOP_BY_HOP`]. A `match` on the lowercase name rejects most fields on
/// their length alone, where comparing `HeaderName`s costs a few dozen instructions per pair
/// (this runs on every field of every request and response).
fn hop_by_hop_index(name: &str) -> Option<usize> {
    match name {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "te" => Some(3),
        "trailer" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        _ => None,
    }
}

/// Removes hop-by-hop fields, including any the `connection` header names.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, or only `connection: keep-alive`: one pass over the names
    // finds which are present, so absent ones cost no lookups.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name.as_str()) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // Other fields the `connection` header lists (`close` is an option, not a field).
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|h| t.eq_ignore_ascii_case(h.as_str()))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    // `te: trailers` is end-to-end in practice (gRPC needs it); keep only that value.
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    for name in &listed {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Turns the client's request head into the upstream's: hop-by-hop fields and `host` removed,
/// identity and request id stated by the proxy, forwarding headers appended.
fn prepare_upstream_headers(
    parts: &mut http::request::Parts,
    snap: &Snapshot,
    conn: &ConnInfo,
    ctx: &Finish,
    identified: &Identified<'_>,
) {
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    // The upstream client sets `host` from the service URL (`:authority` on HTTP/2); the
    // original is kept for the forwarding headers.
    let host = headers.remove(header::HOST);
    snap.identifier.state_upstream(
        headers,
        &Verified {
            claims: identified.claims.as_deref(),
            cert: conn.client_cert(),
        },
    );
    let client_idx = identified.index;
    let names = &snap.headers;
    // Identity is ours to state: drop every copy the client sent, then set ours.
    headers.remove(&names.client);
    headers.insert(
        names.client.clone(),
        snap.identifier.name_value(client_idx).clone(),
    );
    headers.insert(names.request_id.clone(), ctx.request_id.clone());
    ctx.trace.apply(headers);

    if !names.forwarded {
        return;
    }
    // Only the proxy states the original host; a client-sent copy could spoof it.
    headers.remove(X_FORWARDED_HOST);
    // HTTP/2 and absolute-form requests carry the host in the URI, HTTP/1.1 in `host`.
    let host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => host,
    }
    .filter(|h| {
        h.as_bytes()
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"')
    });

    let xff = match headers.get(X_FORWARDED_FOR) {
        Some(prev) => element_value(prev.as_bytes(), conn.xff_element.as_bytes(), None),
        None => Some(conn.xff_element.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, conn.proto());

    let host_param = host.as_ref().map(|h| h.as_bytes());
    let forwarded = match headers.get(header::FORWARDED) {
        Some(prev) => element_value(
            prev.as_bytes(),
            conn.forwarded_element.as_bytes(),
            host_param,
        ),
        None => element_value(&[], conn.forwarded_element.as_bytes(), host_param),
    };
    if let Some(v) = forwarded {
        headers.insert(header::FORWARDED, v);
    }
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h);
    }
}

/// `[prefix, ]element[;host="HOST"]` as a header value, built in one allocation; `None` if
/// it would not be a valid one.
fn element_value(prefix: &[u8], element: &[u8], host: Option<&[u8]>) -> Option<HeaderValue> {
    let host_len = host.map_or(0, |h| h.len() + 8);
    let mut v = Vec::with_capacity(prefix.len() + 2 + element.len() + host_len);
    if !prefix.is_empty() {
        v.extend_from_slice(prefix);
        v.extend_from_slice(b", ");
    }
    v.extend_from_slice(element);
    if let Some(h) = host {
        v.extend_from_slice(b";host=\"");
        v.extend_from_slice(h);
        v.push(b'"');
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
    }

    #[test]
    fn hop_by_hop_index_agrees_with_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i), "{name}");
        }
        for name in ["content-type", "host", "connectionx", "t", ""] {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn connection_close_and_absent_fields_are_harmless() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);

        let mut untouched = HeaderMap::new();
        untouched.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut untouched);
        assert_eq!(untouched.len(), 1);
    }

    #[test]
    fn forwarded_elements_per_address_family() {
        let peer = |addr: &str, tls| Peer {
            addr: addr.parse().expect("addr"),
            tls,
        };
        let v4 = ConnInfo::new(peer("192.0.2.1:5000", None));
        assert_eq!(v4.xff_element, "192.0.2.1");
        assert_eq!(v4.forwarded_element, "for=192.0.2.1;proto=http");
        let v6 = ConnInfo::new(peer("[2001:db8::1]:5000", None));
        assert_eq!(v6.xff_element, "2001:db8::1");
        assert_eq!(v6.forwarded_element, "for=\"[2001:db8::1]\";proto=http");
        let tls = ConnInfo::new(peer("192.0.2.1:5000", Some(TlsInfo::default())));
        assert_eq!(tls.forwarded_element, "for=192.0.2.1;proto=https");
        assert_eq!(tls.proto(), "https");

        let prev = HeaderValue::from_static("for=198.51.100.2");
        let v = element_value(
            prev.as_bytes(),
            v4.forwarded_element.as_bytes(),
            Some(b"shop"),
        );
        assert_eq!(
            v.expect("valid"),
            "for=198.51.100.2, for=192.0.2.1;proto=http;host=\"shop\""
        );
        assert!(element_value(b"", b"for=x", Some(b"bad\nhost")).is_none());
    }

    #[test]
    fn request_id_is_propagated_or_generated() {
        let name = HeaderName::from_static("x-request-id");
        let mut h = HeaderMap::new();
        h.insert(name.clone(), HeaderValue::from_static("abc-123"));
        assert_eq!(
            request_id(&h, &name),
            (HeaderValue::from_static("abc-123"), false)
        );
        h.insert(name.clone(), HeaderValue::from_static("has space"));
        let (generated, is_new) = request_id(&h, &name);
        assert!(is_new);
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, request_id(&HeaderMap::new(), &name).0);
    }
}
