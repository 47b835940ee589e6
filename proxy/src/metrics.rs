//! Prometheus metrics: one [`Metrics`] (and its registry) created at startup, passed to what
//! records, and served at `GET /metrics` on the admin listener. It lives outside the snapshot,
//! so counters survive reloads.
//!
//! Label values come only from config (client, route, service and plugin names, plugin versions
//! of loaded files) and fixed sets (status class, phase, outcome, error code). A request no
//! client or route matched is counted as `other`, so random paths or spoofed identity headers
//! can never grow the series count.
//!
//! The request path never looks a series up by label: each snapshot pre-resolves the series of
//! every client × route pair (`RequestTable`), each upstream service its own (`ServiceSeries`)
//! and each plugin use its own (`PluginSeries`), so recording is a few atomic adds.

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The label value of anything not named in the config.
pub(crate) const OTHER: &str = "other";

/// `status_class` label values, by `status / 100 - 1`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into [`STATUS_CLASSES`].
pub(crate) fn status_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5) - 1
}

/// Latency buckets (seconds) shared by request, upstream and plugin histograms: from 250 µs
/// (a plugin hop, a loopback upstream) to 30 s (the default upstream timeout).
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Every metric the proxy exports, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: RequestFamilies,
    pub(crate) upstreams: UpstreamFamilies,
    pub(crate) plugins: PluginFamilies,
    pub(crate) reloads: ReloadFamilies,
    pub(crate) connections: ConnectionFamilies,
    /// `bff_access_log_dropped_total`: access log lines dropped because the writer fell behind.
    pub(crate) access_log_dropped: IntCounter,
}

/// Registers `c` and returns it (metric names are unique by construction).
fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique in the registry");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

impl Metrics {
    /// Creates the registry and every metric in it.
    pub fn new() -> Self {
        let registry = Registry::new();
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "bff_build_info",
                    "Always 1; the running version as a label.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            requests: RequestFamilies::register(&registry),
            upstreams: UpstreamFamilies::register(&registry),
            plugins: PluginFamilies::register(&registry),
            reloads: ReloadFamilies::register(&registry),
            connections: ConnectionFamilies::register(&registry),
            access_log_dropped: counter(
                &registry,
                "bff_access_log_dropped_total",
                "Access log lines dropped because the log writer could not keep up.",
            ),
            registry,
        }
    }

    /// The registry, for callers that add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// === Requests ===

/// Data-plane requests, by client and route.
#[derive(Debug, Clone)]
pub(crate) struct RequestFamilies {
    total: IntCounterVec,
    duration: HistogramVec,
    pub(crate) in_flight: IntGauge,
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    upstream_bytes: IntCounterVec,
    errors: IntCounterVec,
}

impl RequestFamilies {
    fn register(r: &Registry) -> Self {
        let by = &["client", "route"];
        Self {
            total: counter_vec(
                r,
                "bff_requests_total",
                "Requests answered, by client, route and status class (`other`: no client or route matched).",
                &["client", "route", "status_class"],
            ),
            duration: histogram_vec(
                r,
                "bff_request_duration_seconds",
                "Time from the request head to the last byte of the response, by client and route.",
                LATENCY_BUCKETS,
                by,
            ),
            in_flight: gauge(
                r,
                "bff_requests_in_flight",
                "Requests being served (until their response body is sent).",
            ),
            request_bytes: counter_vec(
                r,
                "bff_request_body_bytes_total",
                "Request body bytes received from clients.",
                by,
            ),
            response_bytes: counter_vec(
                r,
                "bff_response_body_bytes_total",
                "Response body bytes sent to clients.",
                by,
            ),
            upstream_bytes: counter_vec(
                r,
                "bff_upstream_response_body_bytes_total",
                "Response body bytes received from upstream services for these requests (plugin calls included): 1 - sent/received is what the client's BFF saves.",
                by,
            ),
            errors: counter_vec(
                r,
                "bff_proxy_errors_total",
                "Requests the proxy answered with an error of its own, by error code (the `code` of the JSON error body).",
                &["code"],
            ),
        }
    }

    /// The series of one client × route pair.
    pub(crate) fn series(&self, client: &str, route: &str) -> RequestSeries {
        RequestSeries {
            by_class: STATUS_CLASSES.map(|c| self.total.with_label_values(&[client, route, c])),
            duration: self.duration.with_label_values(&[client, route]),
            request_bytes: self.request_bytes.with_label_values(&[client, route]),
            response_bytes: self.response_bytes.with_label_values(&[client, route]),
            upstream_bytes: self.upstream_bytes.with_label_values(&[client, route]),
        }
    }

    /// Counts an error response by its stable code.
    pub(crate) fn error(&self, code: &str) {
        self.errors.with_label_values(&[code]).inc();
    }
}

/// The pre-resolved series of one client × route pair.
#[derive(Debug)]
pub(crate) struct RequestSeries {
    by_class: [IntCounter; 5],
    duration: Histogram,
    request_bytes: IntCounter,
    response_bytes: IntCounter,
    upstream_bytes: IntCounter,
}

/// What one finished request adds to its series.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestSample {
    pub(crate) status: u16,
    pub(crate) duration: Duration,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) upstream_bytes: u64,
}

impl RequestSeries {
    pub(crate) fn record(&self, s: &RequestSample) {
        self.by_class[status_class(s.status)].inc();
        self.duration.observe(s.duration.as_secs_f64());
        // Most requests have no body: skip the atomic add of a zero.
        for (counter, n) in [
            (&self.request_bytes, s.bytes_in),
            (&self.response_bytes, s.bytes_out),
            (&self.upstream_bytes, s.upstream_bytes),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }
}

/// The request series of every client × route pair one config can produce, looked up by index.
#[derive(Debug)]
pub(crate) struct RequestTable {
    /// Routes + 1: the last route slot is "no route matched".
    stride: usize,
    /// `[client slot * stride + route slot]`; the last client slot is "no client".
    slots: Vec<Option<RequestSeries>>,
}

impl RequestTable {
    /// Series for every client with each route that serves it, plus `other` for no route
    /// and no client. `routes` gives each route's id and the clients it lists (none = all).
    pub(crate) fn build(
        families: &RequestFamilies,
        clients: &[&str],
        routes: &[(&str, &[String])],
    ) -> Self {
        let stride = routes.len() + 1;
        let mut slots: Vec<Option<RequestSeries>> = Vec::new();
        slots.resize_with((clients.len() + 1) * stride, || None);
        for (c, client) in clients.iter().enumerate() {
            for (r, (route, serves)) in routes.iter().enumerate() {
                if serves.is_empty() || serves.iter().any(|s| s == client) {
                    slots[c * stride + r] = Some(families.series(client, route));
                }
            }
            slots[c * stride + routes.len()] = Some(families.series(client, OTHER));
        }
        slots[clients.len() * stride + routes.len()] = Some(families.series(OTHER, OTHER));
        Self { stride, slots }
    }

    /// The series of a request identified as `client` and routed to `route` (indices into
    /// the config's lists; `None` when that phase did not match).
    pub(crate) fn get(&self, client: Option<usize>, route: Option<usize>) -> &RequestSeries {
        let clients = self.slots.len() / self.stride;
        let c = client.filter(|&c| c < clients - 1).unwrap_or(clients - 1);
        let r = route
            .filter(|&r| r < self.stride - 1)
            .unwrap_or(self.stride - 1);
        self.slots[c * self.stride + r]
            .as_ref()
            .or(self.slots[c * self.stride + self.stride - 1].as_ref())
            .or(self.slots.last().and_then(Option::as_ref))
            .expect("the other/other slot always exists")
    }
}

// === Upstreams ===

/// Who made an upstream call: the route itself, or a plugin's `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    Route = 0,
    Plugin = 1,
}

const CALLERS: [&str; 2] = ["route", "plugin"];

impl Caller {
    pub(crate) fn as_str(self) -> &'static str {
        CALLERS[self as usize]
    }
}

/// Upstream calls by service.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamFamilies {
    total: IntCounterVec,
    duration: HistogramVec,
    cache_total: IntCounterVec,
    cache_bytes: IntGaugeVec,
    cache_entries: IntGaugeVec,
}

impl UpstreamFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            total: counter_vec(
                r,
                "bff_upstream_requests_total",
                "Calls to upstream services, by service, caller (`route` or `plugin` send) and outcome (status class, `timeout`, `connect_error`, `error`).",
                &["service", "caller", "outcome"],
            ),
            duration: histogram_vec(
                r,
                "bff_upstream_request_duration_seconds",
                "Time from sending an upstream request to its response head.",
                LATENCY_BUCKETS,
                &["service", "caller"],
            ),
            cache_total: counter_vec(
                r,
                "bff_upstream_cache_total",
                "Calls to services with a response cache, by service and result (`hit`, `collapsed` onto another request's fetch, `revalidated` by a 304, `stale` served because the service failed, `miss`, `bypass` for requests the cache does not handle).",
                &["service", "result"],
            ),
            cache_bytes: gauge_vec(
                r,
                "bff_upstream_cache_bytes",
                "Memory held by a service's stored responses (bodies, headers, keys), against its `cache.max_bytes`.",
                &["service"],
            ),
            cache_entries: gauge_vec(
                r,
                "bff_upstream_cache_entries",
                "Responses stored in a service's cache.",
                &["service"],
            ),
        }
    }

    /// The cache series of one service (every result pre-created, so they export at 0).
    pub(crate) fn cache_series(&self, service: &str) -> CacheSeries {
        CacheSeries {
            results: crate::upstream::CACHE_OUTCOMES
                .map(|r| self.cache_total.with_label_values(&[service, r])),
            bytes: self.cache_bytes.with_label_values(&[service]),
            entries: self.cache_entries.with_label_values(&[service]),
        }
    }

    /// The series of one service.
    pub(crate) fn series(&self, service: &str) -> ServiceSeries {
        ServiceSeries {
            by_class: CALLERS.map(|caller| {
                STATUS_CLASSES.map(|c| self.total.with_label_values(&[service, caller, c]))
            }),
            duration: CALLERS.map(|caller| self.duration.with_label_values(&[service, caller])),
            total: self.total.clone(),
            service: service.into(),
        }
    }
}

/// The pre-resolved cache series of one upstream service.
#[derive(Debug)]
pub(crate) struct CacheSeries {
    results: [IntCounter; 6],
    bytes: IntGauge,
    entries: IntGauge,
}

impl CacheSeries {
    pub(crate) fn count(&self, outcome: crate::upstream::CacheOutcome) {
        self.results[outcome as usize].inc();
    }

    pub(crate) fn resize(&self, bytes: u64, entries: usize) {
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}

/// The pre-resolved series of one upstream service.
#[derive(Debug)]
pub(crate) struct ServiceSeries {
    by_class: [[IntCounter; 5]; 2],
    duration: [Histogram; 2],
    /// For failures (rare): looked up by label when they happen.
    total: IntCounterVec,
    service: Box<str>,
}

impl ServiceSeries {
    /// Records one call: a response with `status`, or a failure (`timeout`, ...).
    pub(crate) fn record(&self, caller: Caller, outcome: Result<u16, &str>, took: Duration) {
        let c = caller as usize;
        match outcome {
            Ok(status) => {
                self.by_class[c][status_class(status)].inc();
                self.duration[c].observe(took.as_secs_f64());
            }
            Err(failure) => self
                .total
                .with_label_values(&[&*self.service, CALLERS[c], failure])
                .inc(),
        }
    }
}

// === Plugins ===

/// Which hook a plugin call ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Request = 0,
    Response = 1,
}

const PHASES: [&str; 2] = ["request", "response"];

impl Phase {
    pub(crate) fn as_str(self) -> &'static str {
        PHASES[self as usize]
    }
}

/// Budget-used buckets: the share of a call's CPU budget it used.
const RATIO_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0];

/// Plugin compile times: tens of milliseconds (Winch, small plugins) to seconds (Cranelift).
const COMPILE_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Plugin calls, by plugin and version.
#[derive(Debug, Clone)]
pub(crate) struct PluginFamilies {
    invocations: IntCounterVec,
    duration: HistogramVec,
    cpu_ratio: HistogramVec,
    memory_ratio: HistogramVec,
    fail_open_skips: IntCounterVec,
    send_refusals: IntCounterVec,
    /// `bff_plugin_instances_active`: plugin instances alive now.
    pub(crate) instances_active: IntGauge,
    /// `bff_plugin_instances_idle`: instances of `reused` plugin uses waiting for a request.
    pub(crate) instances_idle: IntGauge,
    /// `bff_plugin_instances_max`: the instance pool's size.
    pub(crate) instances_max: IntGauge,
    /// `bff_plugin_compile_seconds{tier}`: compiles from the `.wasm` file (not from a cache).
    pub(crate) compile: HistogramVec,
}

/// Every `outcome` of a plugin call (see `FailureKind::label`).
pub(crate) const PLUGIN_OUTCOMES: &[&str] = &[
    "ok",
    "error",
    "trap",
    "cpu_limit",
    "memory_limit",
    "timeout",
    "invalid_output",
    "body_limit",
    "encoded_body",
    "unavailable",
];

impl PluginFamilies {
    fn register(r: &Registry) -> Self {
        Self {
            invocations: counter_vec(
                r,
                "bff_plugin_invocations_total",
                "Plugin hook calls, by plugin, version (first 12 hex of the file's SHA-256), phase and outcome.",
                &["plugin", "version", "phase", "outcome"],
            ),
            duration: histogram_vec(
                r,
                "bff_plugin_duration_seconds",
                "Wall time of plugin hook calls (time waiting on its upstream calls included).",
                LATENCY_BUCKETS,
                &["plugin", "version", "phase"],
            ),
            cpu_ratio: histogram_vec(
                r,
                "bff_plugin_cpu_budget_used_ratio",
                "Share of the call's CPU budget a plugin hook call used (1 = stopped at the limit).",
                RATIO_BUCKETS,
                &["plugin", "phase"],
            ),
            memory_ratio: histogram_vec(
                r,
                "bff_plugin_memory_used_ratio",
                "Share of its memory limit a plugin instance's linear memory reached while serving a request (1 = at the limit).",
                RATIO_BUCKETS,
                &["plugin"],
            ),
            fail_open_skips: counter_vec(
                r,
                "bff_plugin_fail_open_skips_total",
                "Failed plugin calls skipped because the use is `on_error = \"fail-open\"`.",
                &["plugin"],
            ),
            send_refusals: counter_vec(
                r,
                "bff_plugin_send_refusals_total",
                "Plugin `send` calls refused before any request was made, by reason (`egress`, `max_sends`, `invalid_request`).",
                &["plugin", "reason"],
            ),
            instances_active: gauge(
                r,
                "bff_plugin_instances_active",
                "Plugin instances alive now (one per plugin of each request in a chain, plus idle instances of `reused` plugin uses).",
            ),
            instances_idle: gauge(
                r,
                "bff_plugin_instances_idle",
                "Idle instances of plugin uses with `instances = \"reused\"`, waiting for their next request.",
            ),
            instances_max: gauge(
                r,
                "bff_plugin_instances_max",
                "Plugin instances the pool can hold at once (`plugins.max_instances`).",
            ),
            compile: histogram_vec(
                r,
                "bff_plugin_compile_seconds",
                "Time to compile a plugin file (caches missed), by tier: `baseline` (Winch, before the version serves), `optimized` (Cranelift; in the background after a baseline compile).",
                COMPILE_BUCKETS,
                &["tier"],
            ),
        }
    }

    /// The series of one plugin version.
    pub(crate) fn series(&self, plugin: &str, version: &str) -> PluginSeries {
        PluginSeries {
            ok: PHASES.map(|p| {
                self.invocations
                    .with_label_values(&[plugin, version, p, "ok"])
            }),
            duration: PHASES.map(|p| self.duration.with_label_values(&[plugin, version, p])),
            cpu_ratio: PHASES.map(|p| self.cpu_ratio.with_label_values(&[plugin, p])),
            memory_ratio: self.memory_ratio.with_label_values(&[plugin]),
            fail_open: self.fail_open_skips.with_label_values(&[plugin]),
            invocations: self.invocations.clone(),
            send_refusals: self.send_refusals.clone(),
            plugin: plugin.into(),
            version: version.into(),
        }
    }

    /// Drops the series of a plugin version no longer loaded (its counters stop growing; a
    /// request still running on it records into detached handles).
    pub(crate) fn forget(&self, plugin: &str, version: &str) {
        for phase in PHASES {
            for outcome in PLUGIN_OUTCOMES {
                let _ = self
                    .invocations
                    .remove_label_values(&[plugin, version, phase, outcome]);
            }
            let _ = self.duration.remove_label_values(&[plugin, version, phase]);
        }
    }
}

/// The pre-resolved series of one plugin version.
#[derive(Debug)]
pub(crate) struct PluginSeries {
    ok: [IntCounter; 2],
    duration: [Histogram; 2],
    cpu_ratio: [Histogram; 2],
    memory_ratio: Histogram,
    fail_open: IntCounter,
    invocations: IntCounterVec,
    send_refusals: IntCounterVec,
    plugin: Box<str>,
    version: Box<str>,
}

impl PluginSeries {
    /// Records one hook call: its outcome label, wall time and CPU used against its budget.
    pub(crate) fn record(
        &self,
        phase: Phase,
        outcome: &str,
        wall: Duration,
        cpu: Duration,
        budget: Duration,
    ) {
        let p = phase as usize;
        self.count(phase, outcome);
        self.duration[p].observe(wall.as_secs_f64());
        let ratio = cpu.as_secs_f64() / budget.as_secs_f64().max(f64::MIN_POSITIVE);
        self.cpu_ratio[p].observe(ratio.min(1.0));
    }

    /// Counts a call by outcome only: one that failed before the plugin ran (no instance, a
    /// body over the limit) has no duration to observe.
    pub(crate) fn count(&self, phase: Phase, outcome: &str) {
        let p = phase as usize;
        if outcome == "ok" {
            self.ok[p].inc();
        } else {
            self.invocations
                .with_label_values(&[&*self.plugin, &*self.version, PHASES[p], outcome])
                .inc();
        }
    }

    /// Records the most linear memory an instance had while serving a request, against its
    /// limit.
    pub(crate) fn memory_used(&self, peak_bytes: usize, limit_bytes: usize) {
        let ratio = peak_bytes as f64 / (limit_bytes as f64).max(1.0);
        self.memory_ratio.observe(ratio.min(1.0));
    }

    /// Counts a failed call skipped under `fail-open`.
    pub(crate) fn skipped(&self) {
        self.fail_open.inc();
    }

    /// Counts a `send` refused before any request was made.
    pub(crate) fn send_refused(&self, reason: &str) {
        self.send_refusals
            .with_label_values(&[&*self.plugin, reason])
            .inc();
    }
}

// === Reloads ===

/// Config and plugin reloads.
#[derive(Debug, Clone)]
pub(crate) struct ReloadFamilies {
    /// `bff_reloads_total{outcome}`: reloads by outcome (`applied`, `unchanged`, `rejected`).
    pub(crate) total: IntCounterVec,
    /// `bff_reload_duration_seconds`: time to build and validate a snapshot.
    pub(crate) duration: Histogram,
    /// `bff_last_reload_success_timestamp_seconds`: Unix time of the last applied or unchanged reload.
    pub(crate) last_success: Gauge,
    /// `bff_plugin_load_errors_total{plugin}`: plugin files refused (the serving version kept).
    pub(crate) plugin_load_errors: IntCounterVec,
    /// `bff_plugins_loaded`: plugins in the live snapshot.
    pub(crate) plugins_loaded: IntGauge,
    /// `bff_plugin_rollbacks_total{plugin, slot, trigger}`: versions rolled back.
    pub(crate) rollbacks: IntCounterVec,
}

impl ReloadFamilies {
    fn register(r: &Registry) -> Self {
        let total = counter_vec(
            r,
            "bff_reloads_total",
            "Config and plugin reloads (startup included), by outcome.",
            &["outcome"],
        );
        for outcome in ["applied", "unchanged", "rejected"] {
            total.with_label_values(&[outcome]);
        }
        Self {
            total,
            duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "bff_reload_duration_seconds",
                        "Time to read, compile, validate and swap in a new snapshot.",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            last_success: register(
                r,
                Gauge::new(
                    "bff_last_reload_success_timestamp_seconds",
                    "Unix time of the last reload that was applied or found nothing to change.",
                )
                .expect("valid metric"),
            ),
            plugin_load_errors: counter_vec(
                r,
                "bff_plugin_load_errors_total",
                "Plugin files refused at load (invalid, incompatible, missing, config rejected); the serving version is kept.",
                &["plugin"],
            ),
            plugins_loaded: gauge(r, "bff_plugins_loaded", "Plugins in the live snapshot."),
            rollbacks: counter_vec(
                r,
                "bff_plugin_rollbacks_total",
                "Plugin versions rolled back, by plugin, slot (`serving`: back to the version it replaced; `canary`: the candidate stopped) and trigger (`automatic`: the health watch; `admin`: POST /admin/plugins/rollback).",
                &["plugin", "slot", "trigger"],
            ),
        }
    }
}

// === Connections ===

/// Data-plane connections.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionFamilies {
    /// `bff_connections_open`.
    pub(crate) open: IntGauge,
    /// `bff_connections_accepted_total`.
    pub(crate) accepted: IntCounter,
    /// `bff_connections_rejected_total`: over `server.max_connections`.
    pub(crate) rejected: IntCounter,
    /// `bff_tls_handshakes_total{result}`: `ok` or why it failed (a bounded set, see
    /// `listener::tls::failure_reason`).
    pub(crate) tls_handshakes: IntCounterVec,
    /// `bff_tls_certificate_expiry_timestamp_seconds`: the serving certificate's `notAfter`.
    pub(crate) tls_cert_expiry: IntGauge,
}

impl ConnectionFamilies {
    /// Every `result` of `bff_tls_handshakes_total`, exported from the start (at 0) so a rate
    /// over them works before the first failure of a kind.
    pub(crate) const TLS_RESULTS: [&'static str; 8] = [
        "ok",
        "cleartext",
        "timeout",
        "no_client_cert",
        "bad_client_cert",
        "incompatible",
        "protocol",
        "io",
    ];

    fn register(r: &Registry) -> Self {
        let families = Self {
            open: gauge(
                r,
                "bff_connections_open",
                "Data-plane connections open now.",
            ),
            accepted: counter(
                r,
                "bff_connections_accepted_total",
                "Data-plane connections accepted (within the connection limit).",
            ),
            rejected: counter(
                r,
                "bff_connections_rejected_total",
                "Data-plane connections over `server.max_connections` (answered 503 or closed).",
            ),
            tls_handshakes: counter_vec(
                r,
                "bff_tls_handshakes_total",
                "TLS handshakes on the data plane, by result: ok, cleartext (HTTP sent to the \
                 HTTPS port, answered 400), timeout, no_client_cert, bad_client_cert, \
                 incompatible, protocol, io.",
                &["result"],
            ),
            tls_cert_expiry: gauge(
                r,
                "bff_tls_certificate_expiry_timestamp_seconds",
                "When the data plane's serving certificate expires (Unix time); 0 without TLS.",
            ),
        };
        for result in Self::TLS_RESULTS {
            families.tls_handshakes.with_label_values(&[result]);
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_maps_unmatched_phases_to_other() {
        let m = Metrics::new();
        let serves_web = vec!["web".to_owned()];
        let table = RequestTable::build(
            &m.requests,
            &["web", "mobile"],
            &[("home", &[]), ("web-only", &serves_web)],
        );
        let sample = RequestSample {
            status: 404,
            duration: Duration::from_millis(1),
            bytes_in: 0,
            bytes_out: 10,
            upstream_bytes: 0,
        };
        table.get(Some(1), Some(1)).record(&sample); // mobile never routes to web-only
        table.get(None, None).record(&sample);
        table.get(Some(0), Some(1)).record(&sample);
        let text = m.render();
        assert!(
            text.contains(
                r#"bff_requests_total{client="mobile",route="other",status_class="4xx"} 1"#
            )
        );
        assert!(
            text.contains(
                r#"bff_requests_total{client="other",route="other",status_class="4xx"} 1"#
            )
        );
        assert!(
            text.contains(
                r#"bff_requests_total{client="web",route="web-only",status_class="4xx"} 1"#
            )
        );
        assert!(!text.contains(r#"client="mobile",route="web-only""#));
    }

    #[test]
    fn status_classes() {
        assert_eq!(STATUS_CLASSES[status_class(101)], "1xx");
        assert_eq!(STATUS_CLASSES[status_class(204)], "2xx");
        assert_eq!(STATUS_CLASSES[status_class(599)], "5xx");
    }
}
