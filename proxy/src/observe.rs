//! The log phase and what feeds it. Every request ends here, whatever happened to it:
//!
//! ```text
//! accept ─▶ … phases … ─▶ response head ─▶ body streamed ─▶ [log phase: metrics + access log]
//!                                                      └─ client went away ─┘
//! ```
//!
//! - [`RequestStats`]: per-request counters shared by the request task, its plugin instances and
//!   their upstream calls (bytes in, bytes from upstreams, upstream and plugin time).
//! - [`Counted`]: a body wrapper that adds each frame's bytes to one of those counters.
//! - [`Finish`]: what the log phase needs, carried inside the response body ([`Logged`]) so the
//!   request is recorded once its last byte is sent (or the client goes away), with its real
//!   duration and size.
//! - `access_log`: the access log line and its writer; `trace`: W3C `traceparent`; `otel`:
//!   span export to an OpenTelemetry collector (`[tracing]`).

pub(crate) mod access_log;
pub(crate) mod otel;
pub(crate) mod trace;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Version};
use http_body::{Frame, SizeHint};

use crate::body::{Body, BoxError};
use crate::metrics::RequestSample;
use crate::state::{Shared, Snapshot};

// === RequestStats ===

/// Per-request counters, shared (`Arc`) with plugin `send` tasks that may outlive a phase.
#[derive(Debug, Default)]
pub(crate) struct RequestStats {
    /// Request body bytes received from the client.
    bytes_in: AtomicU64,
    /// Response body bytes received from upstream services (plugin calls included).
    upstream_bytes: AtomicU64,
    /// Time plugins ran (their CPU-budget meter: waiting on upstream calls excluded).
    plugin_nanos: AtomicU64,
    /// Upstream calls a service's response cache answered (no exchange with the service).
    cached: AtomicU32,
    /// The request's span, with `[tracing]`: its upstream and plugin calls are its children.
    otel: Option<otel::RequestSpan>,
    upstream: Mutex<UpstreamClock>,
}

/// Wall time during which at least one upstream call was waiting for its response head:
/// concurrent calls of a fan-out count once.
#[derive(Debug, Default)]
struct UpstreamClock {
    outstanding: u32,
    since: Option<Instant>,
    total: Duration,
    calls: u32,
}

/// Which counter a [`Counted`] body adds to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    /// The client's request body.
    In,
    /// An upstream response body.
    Upstream,
}

impl RequestStats {
    fn counter(&self, d: Direction) -> &AtomicU64 {
        match d {
            Direction::In => &self.bytes_in,
            Direction::Upstream => &self.upstream_bytes,
        }
    }

    /// Adds a plugin call's running time.
    pub(crate) fn add_plugin_time(&self, d: Duration) {
        self.plugin_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Marks an upstream call started; the returned guard marks it answered (or failed).
    pub(crate) fn upstream_call(self: &Arc<Self>) -> UpstreamCall {
        self.waiting(true)
    }

    /// Marks a wait for an upstream answer (counted as upstream time) that is not a call of
    /// its own: a cache miss waiting for another request's fetch of the same resource.
    pub(crate) fn upstream_wait(self: &Arc<Self>) -> UpstreamCall {
        self.waiting(false)
    }

    fn waiting(self: &Arc<Self>, call: bool) -> UpstreamCall {
        let mut c = lock(&self.upstream);
        if c.outstanding == 0 {
            c.since = Some(Instant::now());
        }
        c.outstanding += 1;
        c.calls += u32::from(call);
        UpstreamCall(self.clone())
    }

    /// The request's span, when spans are exported.
    pub(crate) fn span(&self) -> Option<&otel::RequestSpan> {
        self.otel.as_ref()
    }

    /// Counts an upstream call answered by a response cache.
    pub(crate) fn served_from_cache(&self) {
        self.cached.fetch_add(1, Ordering::Relaxed);
    }

    /// Upstream wall time and number of calls so far.
    fn upstream_time(&self) -> (Duration, u32) {
        let c = lock(&self.upstream);
        let running = c.since.filter(|_| c.outstanding > 0).map(|s| s.elapsed());
        (c.total + running.unwrap_or_default(), c.calls)
    }
}

/// An upstream call in progress (see [`RequestStats::upstream_call`]).
#[derive(Debug)]
pub(crate) struct UpstreamCall(Arc<RequestStats>);

impl Drop for UpstreamCall {
    fn drop(&mut self) {
        let mut c = lock(&self.0.upstream);
        c.outstanding = c.outstanding.saturating_sub(1);
        if c.outstanding == 0
            && let Some(since) = c.since.take()
        {
            c.total += since.elapsed();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === Counted ===

pin_project_lite::pin_project! {
    /// A body that counts the data bytes passing through into the request's [`RequestStats`].
    #[derive(Debug)]
    pub(crate) struct Counted<B> {
        #[pin]
        inner: B,
        stats: Arc<RequestStats>,
        direction: Direction,
    }
}

impl<B> Counted<B> {
    pub(crate) fn new(inner: B, stats: Arc<RequestStats>, direction: Direction) -> Self {
        Self {
            inner,
            stats,
            direction,
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.stats
                .counter(*this.direction)
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === Finish: the log phase ===

/// What the log phase records about one request. Created when the request arrives, filled in
/// by the phases, and recorded exactly once when dropped: at the end of the response body, or
/// earlier if the client goes away (then with status 499, as nginx logs it).
#[derive(Debug)]
pub(crate) struct Finish {
    pub(crate) shared: Arc<Shared>,
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) stats: Arc<RequestStats>,
    pub(crate) started: Instant,
    pub(crate) request_id: HeaderValue,
    pub(crate) trace: trace::TraceContext,
    pub(crate) method: Method,
    pub(crate) version: Version,
    pub(crate) peer: IpAddr,
    /// The connection's TLS version, `None` in cleartext.
    pub(crate) tls: Option<&'static str>,
    pub(crate) user_agent: Option<HeaderValue>,
    /// The normalized path once known, else the raw one.
    pub(crate) path: Option<String>,
    pub(crate) raw_path: http::Uri,
    /// Index of the identified client in the config, and its name.
    pub(crate) client: Option<(usize, Arc<str>)>,
    /// Index of the matched route in the config, and its id.
    pub(crate) route: Option<(usize, Arc<str>)>,
    /// The route's upstream service, for error logs.
    pub(crate) service: Option<Arc<str>>,
    /// Response status; `None` until the response head exists.
    pub(crate) status: Option<u16>,
    /// The stable error code when the proxy answered with an error.
    pub(crate) error: Option<&'static str>,
    bytes_out: u64,
}

impl Finish {
    /// Starts the record of a request (counted in flight until recorded).
    pub(crate) fn start(
        shared: Arc<Shared>,
        snapshot: Arc<Snapshot>,
        request_id: HeaderValue,
        mut trace: trace::TraceContext,
        req: &http::Request<hyper::body::Incoming>,
        peer: IpAddr,
        tls: Option<&'static str>,
    ) -> Self {
        shared.metrics.requests.in_flight.inc();
        // With `[tracing]`: the request's span, the client's span its parent; upstream calls
        // carry its ids from now on.
        let span = shared.tracing.as_ref().map(|t| {
            let parent = trace.client_traceparent().and_then(otel::remote_parent);
            let span = t.request_span(req.method(), parent);
            trace.adopt(otel::traceparent(&span.span_context()));
            span
        });
        Self {
            shared,
            snapshot,
            stats: Arc::new(RequestStats {
                otel: span,
                ..RequestStats::default()
            }),
            started: Instant::now(),
            request_id,
            trace,
            method: req.method().clone(),
            version: req.version(),
            peer,
            tls,
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            path: None,
            raw_path: req.uri().clone(),
            client: None,
            route: None,
            service: None,
            status: None,
            error: None,
            bytes_out: 0,
        }
    }

    fn record(&mut self) {
        let metrics = &self.shared.metrics;
        metrics.requests.in_flight.dec();
        let status = self.status.unwrap_or(499);
        let duration = self.started.elapsed();
        let sample = RequestSample {
            status,
            duration,
            bytes_in: self.stats.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out,
            upstream_bytes: self.stats.upstream_bytes.load(Ordering::Relaxed),
        };
        self.snapshot
            .request_metrics
            .get(
                self.client.as_ref().map(|c| c.0),
                self.route.as_ref().map(|r| r.0),
            )
            .record(&sample);
        let error = match (self.status, self.error) {
            (None, _) => Some("client_closed"),
            (_, e) => e,
        };
        if let Some(code) = error {
            metrics.requests.error(code);
        }
        if let Some(span) = self.stats.span() {
            use opentelemetry::KeyValue;
            let mut attributes = vec![
                KeyValue::new(
                    "url.path",
                    self.path
                        .clone()
                        .unwrap_or_else(|| self.raw_path.path().to_owned()),
                ),
                KeyValue::new("client.address", self.peer.to_string()),
                KeyValue::new("network.protocol.name", "http"),
                KeyValue::new(
                    "bff.request_id",
                    self.request_id.to_str().unwrap_or_default().to_owned(),
                ),
            ];
            if let Some((_, client)) = &self.client {
                attributes.push(KeyValue::new("bff.client", client.to_string()));
            }
            if let Some((_, route)) = &self.route {
                attributes.push(KeyValue::new("bff.route", route.to_string()));
            }
            span.finish(status, attributes, error);
        }
        let settings = &self.snapshot.access_log;
        if settings.enabled {
            let (upstream, upstream_calls) = self.stats.upstream_time();
            let line = access_log::Line {
                request_id: self.request_id.to_str().unwrap_or_default(),
                trace_id: self.trace.trace_id(),
                client: self.client.as_ref().map(|c| &*c.1),
                route: self.route.as_ref().map(|r| &*r.1),
                method: self.method.as_str(),
                path: self.path.as_deref().unwrap_or(self.raw_path.path()),
                protocol: protocol(self.version),
                tls: self.tls,
                peer: self.peer,
                user_agent: self.user_agent.as_ref().map(|v| v.as_bytes()),
                status,
                error,
                duration,
                upstream,
                upstream_calls,
                cached: self.stats.cached.load(Ordering::Relaxed),
                plugin: Duration::from_nanos(self.stats.plugin_nanos.load(Ordering::Relaxed)),
                bytes_in: sample.bytes_in,
                bytes_out: sample.bytes_out,
                upstream_bytes: sample.upstream_bytes,
            };
            self.shared
                .access_log
                .write(&line.render(settings.format), &metrics.access_log_dropped);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.record();
    }
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

pin_project_lite::pin_project! {
    /// The response body the data plane sends: counts bytes out and runs the log phase when
    /// the body ends or is dropped.
    #[derive(Debug)]
    pub(crate) struct Logged {
        #[pin]
        inner: Body,
        finish: Option<Box<Finish>>,
    }
}

impl Logged {
    /// A response whose request is recorded by `finish`.
    pub(crate) fn new(inner: Body, finish: Box<Finish>) -> Self {
        Self {
            inner,
            finish: Some(finish),
        }
    }

    /// A response that is not a request of its own (a connection refused over the limit).
    pub(crate) fn bare(inner: Body) -> Self {
        Self {
            inner,
            finish: None,
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), this.finish.as_mut()) {
                    f.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut f) = this.finish.take() {
                    f.error = Some("response_body_failed");
                }
            }
            // The end of the body is the end of the request.
            Poll::Ready(None) => drop(this.finish.take()),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
