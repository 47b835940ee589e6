//! What a plugin instance can reach: its store data ([`HostState`]) and the host imports of the
//! WIT contract (`log`, `config`, `send`/`wait`, shared values), with the limits that bound them.
//!
//! Sits inside the request and response phases: every call a plugin makes into the proxy lands
//! here. Upstream calls from `send` run as Tokio tasks, so the calls of one plugin overlap and the
//! guest only blocks in `wait`; every call still running when the request ends is aborted.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::PluginLimits;
use super::bindings::bff::plugin::{host, types};
use crate::body::{
    self,
    decode::{self, ReadError},
};
use crate::metrics::{Caller, PluginSeries};
use crate::upstream::{UpstreamError, Upstreams};

/// Bytes of stdout/stderr kept per instance; writes beyond fail in the guest.
const STDIO_CAPACITY: usize = 64 * 1024;
/// Largest key + value a plugin may store with `set-value`, and how many it may store.
const MAX_VALUE_BYTES: usize = 4096;
const MAX_VALUES: usize = 64;

/// Request-wide facts and state, shared by every plugin instance of one request.
#[derive(Debug)]
pub(crate) struct RequestScope {
    pub(crate) upstreams: Arc<Upstreams>,
    /// Services the route lets its plugins call.
    pub(crate) egress: Arc<[Arc<str>]>,
    pub(crate) request_id: HeaderValue,
    pub(crate) request_id_header: HeaderName,
    pub(crate) client_header: HeaderName,
    pub(crate) client_value: HeaderValue,
    /// `traceparent` of the request's trace.
    pub(crate) traceparent: HeaderValue,
    /// The request's counters (bytes from upstreams, upstream time).
    pub(crate) stats: Arc<crate::observe::RequestStats>,
    /// Cap on each upstream call (the service's own timeout applies too).
    pub(crate) upstream_timeout: Duration,
    /// `get-value`/`set-value` store of the request.
    pub(crate) values: Mutex<HashMap<String, String>>,
}

impl RequestScope {
    /// The request id as text, for logs (`""` if the header value is not visible ASCII).
    pub(crate) fn request_id_str(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }
}

/// The result of one `send`, produced by its task.
type CallResult = Result<types::Response, types::PluginError>;

/// Store data of one plugin instance.
pub(crate) struct HostState {
    /// Built on the guest's first WASI call: most hops make none (an SDK plugin that neither
    /// prints, panics nor asks for randomness), and building one costs a few µs per instance.
    wasi: Option<Wasi>,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) meter: Arc<CpuMeter>,
    pub(crate) plugin: Arc<str>,
    config_json: Arc<str>,
    limits: PluginLimits,
    /// `None` while the plugin is being loaded (`init`): no request, so no `send`.
    scope: Option<Arc<RequestScope>>,
    calls: Vec<Option<AbortOnDropHandle<CallResult>>>,
    /// How much of stdout/stderr has been logged already.
    logged: (usize, usize),
    /// The plugin version's metrics (`None` while loading).
    series: Option<Arc<PluginSeries>>,
    _alive: Alive,
}

/// Counts a store in `bff_plugin_instances_active` for as long as it exists.
struct Alive(prometheus::IntGauge);

impl Alive {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A store dropped while serving a request (a fresh instance done with it, or a failed one)
/// records its memory use; a reused instance did so when its request ended.
impl Drop for HostState {
    fn drop(&mut self) {
        self.observe_memory();
    }
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("plugin", &self.plugin)
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

/// An instance's WASI context and the pipes its stdout and stderr write to.
struct Wasi {
    ctx: WasiCtx,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
}

impl Wasi {
    /// Deny by default: no args, env, preopened directories or sockets; the wall clock is
    /// pinned to the epoch so a plugin cannot observe time except by the monotonic clock.
    fn deny_by_default() -> Self {
        let stdout = MemoryOutputPipe::new(STDIO_CAPACITY);
        let stderr = MemoryOutputPipe::new(STDIO_CAPACITY);
        let ctx = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(FrozenWallClock)
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        Self {
            ctx,
            stdout,
            stderr,
        }
    }
}

impl HostState {
    pub(crate) fn new(
        plugin: Arc<str>,
        config_json: Arc<str>,
        limits: PluginLimits,
        scope: Option<Arc<RequestScope>>,
        series: Option<Arc<PluginSeries>>,
        instances: prometheus::IntGauge,
    ) -> Self {
        Self {
            wasi: None,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes: usize::try_from(limits.max_memory_bytes).unwrap_or(usize::MAX),
                hit: false,
                peak_bytes: 0,
            },
            meter: Arc::new(CpuMeter::new(limits.cpu_budget)),
            plugin,
            config_json,
            limits,
            scope,
            calls: Vec::new(),
            logged: (0, 0),
            series,
            _alive: Alive::new(instances),
        }
    }

    /// Hands a reused instance the request it serves next.
    pub(crate) fn begin_request(&mut self, scope: Arc<RequestScope>) {
        self.scope = Some(scope);
    }

    /// Ends the request this instance served: upstream calls still running are aborted and the
    /// request's values and call ids are forgotten. Returns whether the instance may serve
    /// another request: not if it went over its memory limit (a guest may survive a refused
    /// `memory.grow`) or filled half of its stdout/stderr buffers, which only grow.
    pub(crate) fn end_request(&mut self) -> bool {
        self.observe_memory();
        self.scope = None;
        self.calls.clear();
        let stdio_room =
            self.wasi.is_none() || self.logged.0.max(self.logged.1) < STDIO_CAPACITY / 2;
        !self.limiter.hit && stdio_room
    }

    /// Records in the plugin's metrics how much memory the instance reached, if it is serving
    /// a request: once per request (an instance made at load, or idle, serves none).
    fn observe_memory(&self) {
        if let (Some(_), Some(series)) = (&self.scope, &self.series) {
            series.memory_used(self.limiter.peak_bytes, self.limiter.max_bytes);
        }
    }

    /// Logs what the guest wrote to stdout/stderr since the last flush, one event per line.
    /// Returns the stderr text of this flush (a Rust panic message lands there).
    pub(crate) fn flush_stdio(&mut self) -> String {
        let Some(wasi) = &self.wasi else {
            return String::new();
        };
        let out = wasi.stdout.contents();
        let err = wasi.stderr.contents();
        let new_out = &out[self.logged.0.min(out.len())..];
        let new_err = &err[self.logged.1.min(err.len())..];
        let request_id = self.request_id();
        for line in String::from_utf8_lossy(new_out)
            .lines()
            .filter(|l| !l.is_empty())
        {
            tracing::info!(plugin = %self.plugin, request_id, stream = "stdout", line, "plugin output");
        }
        let err_text = String::from_utf8_lossy(new_err).into_owned();
        for line in err_text.lines().filter(|l| !l.is_empty()) {
            tracing::warn!(plugin = %self.plugin, request_id, stream = "stderr", line, "plugin output");
        }
        self.logged = (out.len(), err.len());
        err_text
    }

    /// Counts a `send` refused before any request was made.
    fn refused(&self, reason: &str) {
        if let Some(series) = &self.series {
            series.send_refused(reason);
        }
    }

    fn request_id(&self) -> &str {
        self.scope.as_ref().map_or("", |s| s.request_id_str())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.get_or_insert_with(Wasi::deny_by_default).ctx,
            table: &mut self.table,
        }
    }
}

fn plugin_error(kind: types::ErrorKind, message: impl Into<String>) -> types::PluginError {
    types::PluginError {
        kind,
        message: message.into(),
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.plugin;
        let request_id = self.request_id();
        match level {
            types::LogLevel::Trace => {
                tracing::trace!(plugin, request_id, text = message, "plugin log")
            }
            types::LogLevel::Debug => {
                tracing::debug!(plugin, request_id, text = message, "plugin log")
            }
            types::LogLevel::Info => {
                tracing::info!(plugin, request_id, text = message, "plugin log")
            }
            types::LogLevel::Warn => {
                tracing::warn!(plugin, request_id, text = message, "plugin log")
            }
            types::LogLevel::Error => {
                tracing::error!(plugin, request_id, text = message, "plugin log")
            }
        }
        Ok(())
    }

    fn config(&mut self) -> wasmtime::Result<String> {
        Ok(self.config_json.to_string())
    }

    fn send(
        &mut self,
        service: String,
        request: types::Request,
        timeout_ms: Option<u32>,
    ) -> wasmtime::Result<Result<types::CallId, types::PluginError>> {
        use types::ErrorKind::*;
        let Some(scope) = self.scope.clone() else {
            return Ok(Err(plugin_error(
                Internal,
                "send is not available while the plugin loads",
            )));
        };
        let Some(service) = scope.egress.iter().find(|s| ***s == *service).cloned() else {
            self.refused("egress");
            tracing::warn!(plugin = %self.plugin, service, "plugin send refused: service not in the route's egress");
            return Ok(Err(plugin_error(
                Forbidden,
                format!("this route does not allow calling service `{service}`"),
            )));
        };
        if self.calls.len() >= self.limits.max_sends as usize {
            self.refused("max_sends");
            return Ok(Err(plugin_error(
                Limit,
                format!(
                    "at most {} upstream calls per request",
                    self.limits.max_sends
                ),
            )));
        }
        let (path, query, req) = match build_send_request(request, &scope) {
            Ok(r) => r,
            Err(msg) => {
                self.refused("invalid_request");
                return Ok(Err(plugin_error(BadInput, msg)));
            }
        };
        let timeout = timeout_ms.map_or(scope.upstream_timeout, |ms| {
            Duration::from_millis(ms.into()).min(scope.upstream_timeout)
        });
        let max_body = self.limits.max_body_bytes;
        // A plugin that asked for a coding gets the body as sent; otherwise it gets it decoded.
        let decode_body = !req.headers().contains_key(http::header::ACCEPT_ENCODING);
        // The call runs as its own task, inside the span of the plugin call that made it.
        let span = tracing::Span::current();
        let task = tokio::spawn(
            async move {
                let resp = scope
                    .upstreams
                    .send(
                        &service,
                        &path,
                        query.as_deref(),
                        req,
                        timeout,
                        crate::upstream::CallFor {
                            caller: Caller::Plugin,
                            stats: &scope.stats,
                        },
                    )
                    .await
                    .map_err(|e| match e {
                        UpstreamError::Timeout { .. } => plugin_error(
                            Upstream,
                            format!("service `{service}` did not answer in time"),
                        ),
                        _ => plugin_error(Upstream, format!("service `{service}` failed: {e}")),
                    })?;
                let (mut parts, incoming) = resp.into_parts();
                let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
                let read = if decode_body {
                    decode::read_decoded(incoming, &mut parts.headers, limit).await
                } else {
                    decode::read_whole(incoming, limit).await
                };
                let body = match read {
                    Ok(body) => body,
                    Err(ReadError::TooLarge) => {
                        return Err(plugin_error(
                            Limit,
                            format!("the response of `{service}` is larger than {max_body} bytes"),
                        ));
                    }
                    Err(e) => {
                        return Err(plugin_error(
                            Upstream,
                            format!("the response body of `{service}` is {e}"),
                        ));
                    }
                };
                Ok(types::Response {
                    status: parts.status.as_u16(),
                    headers: headers_to_wit(&parts.headers),
                    body: body.into(),
                })
            }
            .instrument(span),
        );
        self.calls.push(Some(AbortOnDropHandle::new(task)));
        Ok(Ok(u32::try_from(self.calls.len() - 1).unwrap_or(u32::MAX)))
    }

    async fn wait(&mut self, call: types::CallId) -> Result<types::Response, types::PluginError> {
        let Some(handle) = self.calls.get_mut(call as usize).and_then(Option::take) else {
            return Err(plugin_error(
                types::ErrorKind::BadInput,
                format!("call id {call} is unknown or was already waited on"),
            ));
        };
        match handle.await {
            Ok(result) => result,
            Err(_) => Err(plugin_error(
                types::ErrorKind::Internal,
                "the upstream call was cancelled",
            )),
        }
    }

    fn get_value(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.scope.as_ref().and_then(|s| {
            s.values
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&key)
                .cloned()
        }))
    }

    fn set_value(
        &mut self,
        key: String,
        value: String,
    ) -> wasmtime::Result<Result<(), types::PluginError>> {
        let Some(scope) = &self.scope else {
            return Ok(Err(plugin_error(
                types::ErrorKind::Internal,
                "values are not available while the plugin loads",
            )));
        };
        if key.len() + value.len() > MAX_VALUE_BYTES {
            return Ok(Err(plugin_error(
                types::ErrorKind::Limit,
                format!("key and value together must be at most {MAX_VALUE_BYTES} bytes"),
            )));
        }
        let mut values = scope
            .values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if values.len() >= MAX_VALUES && !values.contains_key(&key) {
            return Ok(Err(plugin_error(
                types::ErrorKind::Limit,
                format!("at most {MAX_VALUES} values per request"),
            )));
        }
        values.insert(key, value);
        Ok(Ok(()))
    }
}

/// Turns a plugin's `send` request into an upstream request: the path split from the query,
/// headers validated, hop-by-hop fields dropped, and the proxy's request id and client header set
/// (a plugin cannot make a call claim another client).
fn build_send_request(
    request: types::Request,
    scope: &RequestScope,
) -> Result<(String, Option<String>, Request<body::Body>), String> {
    let method = Method::from_bytes(request.method.as_bytes())
        .map_err(|_| format!("invalid method `{}`", request.method))?;
    if !request.uri.starts_with('/') {
        return Err(format!(
            "the uri must be a path starting with `/`, got `{}`",
            request.uri
        ));
    }
    let (path, query) = match request.uri.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (request.uri.clone(), None),
    };
    // Validates the characters; the host still normalizes nothing here: the path is the
    // plugin's choice within the service it may call.
    http::uri::PathAndQuery::try_from(request.uri.as_str())
        .map_err(|_| format!("invalid uri `{}`", request.uri))?;
    let mut headers = headers_from_wit(request.headers)?;
    super::chain::strip_managed(&mut headers);
    headers.insert(scope.request_id_header.clone(), scope.request_id.clone());
    headers.insert(scope.client_header.clone(), scope.client_value.clone());
    headers.insert(
        crate::observe::trace::TRACEPARENT,
        scope.traceparent.clone(),
    );
    let mut req = Request::new(if request.body.is_empty() {
        body::empty()
    } else {
        body::full(Bytes::from(request.body))
    });
    *req.method_mut() = method;
    *req.headers_mut() = headers;
    Ok((path, query, req))
}

/// Header fields as the WIT contract carries them (names are lowercase already).
pub(crate) fn headers_to_wit(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Header fields from a plugin, validated.
pub(crate) fn headers_from_wit(fields: Vec<(String, String)>) -> Result<http::HeaderMap, String> {
    let mut headers = http::HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name `{}`", name.escape_debug()))?;
        let v =
            HeaderValue::from_str(&value).map_err(|_| format!("invalid value for header `{n}`"))?;
        headers.append(n, v);
    }
    Ok(headers)
}

// === Limits ===

/// Caps linear memory growth and remembers whether the last grow was refused, so a trap that
/// follows (a Rust guest aborts when allocation fails) is reported as the memory limit, not a
/// generic trap. Only the last attempt counts: an allocator that asks for a big step first and
/// then for just what it needs (the SDK's does) has not hit the limit when the second succeeds.
/// Also keeps the largest size it allowed a memory (its initial size included), for
/// `bff_plugin_memory_used_ratio`.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    max_bytes: usize,
    pub(crate) hit: bool,
    peak_bytes: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.hit = desired > self.max_bytes;
        if !self.hit {
            self.peak_bytes = self.peak_bytes.max(desired);
        }
        Ok(!self.hit)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// CPU time a plugin call has used, for its CPU budget and the plugin metrics.
///
/// Metered per poll of the call's future (the guest running, or host code it called), so time
/// waiting on upstream calls never counts. A poll ends at the latest at the first epoch tick after
/// it starts (the epoch callback yields), so it runs the guest for at most about one tick. Polls
/// are therefore counted by wall time capped at [`UNMEASURED_POLL_CAP`], which costs nothing and
/// keeps a thread that the OS preempted mid-poll from charging the plugin for the wait; once a
/// call has used [`MEASURE_AFTER`], its polls are measured with the thread's own CPU clock
/// (`CLOCK_THREAD_CPUTIME_ID`, a system call, so only for calls that run that long; from the
/// first poll when the budget itself is within the cap). A loaded machine then slows a plugin
/// down but does not fail it for CPU it did not use.
#[derive(Debug)]
pub(crate) struct CpuMeter {
    base: Instant,
    /// Use of the call after which polls are measured with the CPU clock.
    measure_after: u64,
    used_nanos: AtomicU64,
    /// Start of the poll in progress, in nanoseconds since `base`; `u64::MAX` when idle.
    poll_start: AtomicU64,
    /// The thread's CPU clock at the start of the poll in progress, when it is measured;
    /// `u64::MAX` otherwise.
    poll_cpu_start: AtomicU64,
}

/// Most a poll counts when its CPU time is not measured: the epoch callback ends every poll
/// about one [`EPOCH_TICK`](super::runtime::EPOCH_TICK) after it starts; twice that allows for a
/// late ticker.
const UNMEASURED_POLL_CAP: u64 = 2 * tick_nanos();
/// A call that has used this much gets its polls measured with the thread's CPU clock.
const MEASURE_AFTER: u64 = tick_nanos();

const fn tick_nanos() -> u64 {
    super::runtime::EPOCH_TICK.as_nanos() as u64
}

/// The calling thread's CPU time in nanoseconds (`None` where there is no such clock).
fn thread_cpu_nanos() -> Option<u64> {
    #[cfg(unix)]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        let secs = u64::try_from(t.tv_sec).ok()?;
        let nanos = u64::try_from(t.tv_nsec).ok()?;
        secs.checked_mul(1_000_000_000)?.checked_add(nanos)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

impl CpuMeter {
    /// A meter for calls with `budget`.
    fn new(budget: Duration) -> Self {
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
        Self {
            base: Instant::now(),
            measure_after: if budget <= UNMEASURED_POLL_CAP {
                0
            } else {
                MEASURE_AFTER
            },
            used_nanos: AtomicU64::new(0),
            poll_start: AtomicU64::new(u64::MAX),
            poll_cpu_start: AtomicU64::new(u64::MAX),
        }
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Starts a new call's budget.
    pub(crate) fn reset(&self) {
        self.used_nanos.store(0, Ordering::Relaxed);
    }

    /// CPU used by the current call so far, the poll in progress included. Called on the
    /// polling thread (the epoch callback) or between polls.
    pub(crate) fn used(&self) -> Duration {
        Duration::from_nanos(self.used_nanos.load(Ordering::Relaxed) + self.in_poll())
    }

    /// What the poll in progress has used so far (0 between polls).
    fn in_poll(&self) -> u64 {
        let start = self.poll_start.load(Ordering::Relaxed);
        if start == u64::MAX {
            return 0;
        }
        let cpu_start = self.poll_cpu_start.load(Ordering::Relaxed);
        // The CPU clock is a system call: read only for a poll measured by it.
        let cpu_now = (cpu_start != u64::MAX).then(thread_cpu_nanos).flatten();
        match cpu_now {
            Some(cpu) => cpu.saturating_sub(cpu_start),
            None => self
                .now_nanos()
                .saturating_sub(start)
                .min(UNMEASURED_POLL_CAP),
        }
    }

    fn start_poll(&self) {
        let cpu_start = if self.used_nanos.load(Ordering::Relaxed) >= self.measure_after {
            thread_cpu_nanos().unwrap_or(u64::MAX)
        } else {
            u64::MAX
        };
        self.poll_cpu_start.store(cpu_start, Ordering::Relaxed);
        self.poll_start.store(self.now_nanos(), Ordering::Relaxed);
    }

    fn end_poll(&self) {
        let spent = self.in_poll();
        self.poll_start.store(u64::MAX, Ordering::Relaxed);
        self.used_nanos.fetch_add(spent, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// Wraps a plugin call so [`CpuMeter`] sees each poll.
    pub(crate) struct Metered<F> {
        #[pin]
        inner: F,
        meter: Arc<CpuMeter>,
    }
}

impl<F> Metered<F> {
    pub(crate) fn new(inner: F, meter: Arc<CpuMeter>) -> Self {
        Self { inner, meter }
    }
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.meter.start_poll();
        let out = this.inner.poll(cx);
        this.meter.end_poll();
        out
    }
}

/// A wall clock stuck at the Unix epoch: plugins get no real time of day (they have the
/// monotonic clock for durations), so their output cannot depend on it.
struct FrozenWallClock;

impl wasmtime_wasi::HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls a future that runs `f` once, inside the meter, as one poll of a plugin call.
    fn poll_once(meter: &Arc<CpuMeter>, f: impl FnOnce()) {
        let mut f = Some(f);
        let call = std::future::poll_fn(move |_| {
            if let Some(f) = f.take() {
                f();
            }
            Poll::Ready(())
        });
        let mut metered = std::pin::pin!(Metered::new(call, meter.clone()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(metered.as_mut().poll(&mut cx).is_ready());
    }

    /// Uses `cpu` of this thread's CPU time (by its CPU clock: however long that takes).
    fn burn(cpu: Duration) {
        let clock = || thread_cpu_nanos().expect("a thread CPU clock");
        let until = clock() + u64::try_from(cpu.as_nanos()).expect("small");
        let mut x = 0u64;
        while clock() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_short_poll_is_charged_its_wall_time_capped() {
        let meter = Arc::new(CpuMeter::new(50 * MS));
        poll_once(&meter, || burn(MS));
        let used = meter.used();
        assert!(used >= MS, "{used:?}");
        // Preempted (here: asleep) for 60 ms: charged at most the cap, not the wait.
        meter.reset();
        poll_once(&meter, || std::thread::sleep(60 * MS));
        let used = meter.used();
        assert!(
            used <= Duration::from_nanos(UNMEASURED_POLL_CAP),
            "{used:?}"
        );
    }

    #[test]
    fn a_long_call_is_charged_the_cpu_it_used() {
        let meter = Arc::new(CpuMeter::new(50 * MS));
        // 5 ms in the first poll: charged the cap, enough to measure the next polls.
        poll_once(&meter, || burn(5 * MS));
        let before = meter.used();
        assert!(before.as_nanos() >= u128::from(MEASURE_AFTER), "{before:?}");
        let m = meter.clone();
        poll_once(&meter, move || {
            std::thread::sleep(60 * MS);
            burn(10 * MS);
            // What the epoch callback sees mid-poll.
            let so_far = m.used() - before;
            assert!(so_far >= 10 * MS && so_far < 40 * MS, "{so_far:?}");
        });
        let charged = meter.used() - before;
        assert!(charged >= 10 * MS && charged < 40 * MS, "{charged:?}");
    }

    #[test]
    fn a_budget_within_the_cap_is_measured_from_the_first_poll() {
        let meter = Arc::new(CpuMeter::new(MS));
        poll_once(&meter, || {
            std::thread::sleep(20 * MS);
            burn(MS / 2);
        });
        let used = meter.used();
        assert!(used >= MS / 2 && used < MS, "{used:?}");
    }
}
