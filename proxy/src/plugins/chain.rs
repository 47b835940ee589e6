//! Runs a route's chain for one request: the request phase in chain order, the upstream (unless a
//! plugin answered), then the response phase in reverse order.
//!
//! Every plugin gets a fresh instance per request (the same instance serves both phases; a
//! response-only plugin gets it when the response phase reaches it), so no data of one request
//! can leak into another; only a use with `instances = "reused"` takes an idle instance from
//! its `IdlePool` instead, and gives it back after a request whose calls to it all succeeded. Bodies are buffered only when a plugin declared it reads them;
//! otherwise they stream straight through as on a route without plugins. Whatever a plugin
//! returns is validated (method, path, header names and values, status) before use.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use tracing::Instrument;
use wasmtime::{Store, UpdateDeadline};

use super::backtrace::GuestTrace;
use super::bindings::Plugin as Instance;
use super::bindings::bff::plugin::types;
use super::host::{HostState, Metered, RequestScope, headers_from_wit, headers_to_wit};
use super::load::{Code, LastFailure, LoadedPlugin};
use super::reuse::{IdlePool, Reusable};
use super::runtime::Tier;
use super::{PluginLimits, Runtime};
use crate::body::decode::{self, ReadError};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::metrics::{Caller, Phase, PluginSeries};
use crate::observe::{Counted, RequestStats};
use crate::router::OnError;
use crate::upstream::{UpstreamBody, UpstreamError, Upstreams};

/// The client's request body as the pipeline hands it over (counted as it is read).
pub(crate) type ClientBody = Counted<hyper::body::Incoming>;

/// A plugin use of a chain, loaded and initialized.
#[derive(Debug)]
pub(crate) struct Step {
    pub(crate) plugin: Arc<LoadedPlugin>,
    pub(crate) config_json: Arc<str>,
    pub(crate) on_error: OnError,
    pub(crate) limits: PluginLimits,
    pub(crate) caps: types::Capabilities,
    /// This plugin version's metrics.
    pub(crate) series: Arc<PluginSeries>,
    /// Idle instances, for a use with `instances = "reused"`.
    pub(crate) reuse: Option<IdlePool>,
}

/// A route's loaded chain.
#[derive(Debug)]
pub(crate) struct Chain {
    route: Arc<str>,
    steps: Vec<Step>,
    egress: Arc<[Arc<str>]>,
    runtime: Arc<Runtime>,
    /// `[plugins] version_header` and its value (`name=version` of each step), when set.
    versions: Option<(http::HeaderName, HeaderValue)>,
    /// The same chain with a plugin's candidate version, for the requests in its cohort.
    canary: Option<Canary>,
}

/// A chain's canary cohort (`plugins.canary`): which requests run `chain`, the chain with the
/// candidate version of `plugin`.
#[derive(Debug)]
pub(crate) struct Canary {
    chain: Arc<Chain>,
    plugin: Arc<str>,
    percent: u8,
    clients: Box<[String]>,
    sticky_header: Option<http::HeaderName>,
}

impl Canary {
    pub(crate) fn new(chain: Arc<Chain>, plugin: &str, config: &super::CanaryConfig) -> Self {
        Self {
            chain,
            plugin: plugin.into(),
            percent: config.percent,
            clients: config.clients.clone().into_boxed_slice(),
            sticky_header: config
                .sticky_header
                .as_deref()
                .and_then(|h| http::HeaderName::try_from(h).ok()),
        }
    }

    /// Whether this request is in the cohort: a client in scope, and a hash of the sticky
    /// header's value (else of the request id) among the first `percent` of 100 buckets.
    fn picks(&self, client: &str, headers: &HeaderMap, request_id: &str) -> bool {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        if self.percent == 0
            || !(self.clients.is_empty() || self.clients.iter().any(|c| c == client))
        {
            return false;
        }
        let key = self
            .sticky_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .map_or(request_id.as_bytes(), HeaderValue::as_bytes);
        // A fixed-key hash: the same key lands in the same bucket on every process.
        let bucket =
            BuildHasherDefault::<DefaultHasher>::default().hash_one((&*self.plugin, key)) % 100;
        bucket < u64::from(self.percent)
    }
}

/// Why a plugin call failed. Each has its own error code (see `error.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FailureKind {
    #[error("returned an error ({kind:?}): {message}")]
    Error {
        kind: types::ErrorKind,
        message: String,
    },
    #[error("panicked: {0}")]
    Panic(String),
    #[error("trapped: {0}{1}")]
    Trap(String, GuestTrace),
    #[error("used up its CPU budget{0}")]
    CpuBudget(GuestTrace),
    #[error("went over its memory limit{0}")]
    Memory(GuestTrace),
    #[error("did not finish within its call timeout")]
    Timeout,
    #[error("returned invalid output: {0}")]
    InvalidOutput(String),
    #[error("needs a body larger than its limit")]
    BodyTooLarge,
    #[error("needs the body but the upstream sent it in a coding the proxy does not decode ({0})")]
    EncodedBody(String),
    #[error("could not be instantiated: {0}")]
    Unavailable(String),
}

impl FailureKind {
    /// The `outcome` label of `bff_plugin_invocations_total`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Error { .. } => "error",
            Self::Panic(_) | Self::Trap(..) => "trap",
            Self::CpuBudget(_) => "cpu_limit",
            Self::Memory(_) => "memory_limit",
            Self::Timeout => "timeout",
            Self::InvalidOutput(_) => "invalid_output",
            Self::BodyTooLarge => "body_limit",
            Self::EncodedBody(_) => "encoded_body",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// A failed plugin use that ends the request (`on_error = "fail-closed"`).
#[derive(Debug, thiserror::Error)]
#[error("plugin `{plugin}` {kind}")]
pub(crate) struct PluginFailure {
    pub(crate) plugin: Arc<str>,
    pub(crate) kind: FailureKind,
}

/// The epoch callback's error when a call's CPU budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("CPU budget exceeded")]
struct CpuBudgetExceeded;

/// What the pipeline hands the chain: the request as it would go upstream.
#[derive(Debug)]
pub(crate) struct ChainInput {
    /// Method, headers (already cleaned and with the proxy's headers) of the upstream request.
    pub(crate) parts: http::request::Parts,
    pub(crate) body: ClientBody,
    /// Upstream path (route rewrite applied) and raw query.
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) service: Option<Arc<str>>,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) ctx: types::Context,
    pub(crate) scope: ScopeParts,
    pub(crate) max_request_body: u64,
    pub(crate) upstream_timeout: Duration,
    pub(crate) chain_timeout: Duration,
}

/// Header names and values plugins' upstream calls carry.
#[derive(Debug)]
pub(crate) struct ScopeParts {
    pub(crate) request_id: HeaderValue,
    pub(crate) request_id_header: http::HeaderName,
    pub(crate) client_header: http::HeaderName,
    pub(crate) client_value: HeaderValue,
    /// `traceparent` of the request's trace (set on every upstream call).
    pub(crate) traceparent: HeaderValue,
    pub(crate) stats: Arc<RequestStats>,
}

/// A fresh store and instance of `plugin`'s `code` (its current code, baseline or optimized,
/// see `LoadedPlugin::code`), with the use's limits. The store is returned even when
/// instantiating fails, so the caller can tell a memory limit from other failures.
pub(crate) async fn new_instance(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    code: &Code,
    config_json: Arc<str>,
    limits: PluginLimits,
    scope: Option<Arc<RequestScope>>,
    series: Option<Arc<PluginSeries>>,
) -> (Store<HostState>, wasmtime::Result<Instance>) {
    let mut store = new_store(
        runtime,
        code.pre.engine(),
        plugin,
        config_json,
        limits,
        scope,
        series,
    );
    // Instantiating runs the component's start functions (a module's `_initialize`): bounded
    // like a hook call, by the CPU budget (metered) and the call timeout (start code that
    // waits spends no CPU).
    let meter = store.data().meter.clone();
    meter.reset();
    let instance = tokio::time::timeout(
        limits.call_timeout,
        Metered::new(code.pre.instantiate_async(&mut store), meter),
    )
    .await
    .unwrap_or_else(|_| Err(InstantiationTimedOut.into()));
    (store, instance)
}

/// The error of an instantiation that did not finish within the call timeout.
#[derive(Debug, thiserror::Error)]
#[error("instantiation timed out")]
struct InstantiationTimedOut;

/// Why instantiating failed: its start code over the CPU budget, the memory limit or the call
/// timeout, or another reason (its first line).
pub(crate) fn instantiation_failure(store: &Store<HostState>, e: &wasmtime::Error) -> FailureKind {
    if e.downcast_ref::<CpuBudgetExceeded>().is_some() {
        FailureKind::CpuBudget(GuestTrace::of(e))
    } else if e.downcast_ref::<InstantiationTimedOut>().is_some() {
        FailureKind::Timeout
    } else if store.data().limiter.hit {
        FailureKind::Memory(GuestTrace::of(e))
    } else {
        FailureKind::Unavailable(super::load::first_line(e))
    }
}

/// Creates a store for one instance of `plugin` with its limits and the epoch callback that
/// enforces the CPU budget and yields to other requests once per tick.
fn new_store(
    runtime: &Runtime,
    engine: &wasmtime::Engine,
    plugin: &LoadedPlugin,
    config_json: Arc<str>,
    limits: PluginLimits,
    scope: Option<Arc<RequestScope>>,
    series: Option<Arc<PluginSeries>>,
) -> Store<HostState> {
    let state = HostState::new(
        plugin.name.clone(),
        config_json,
        limits,
        scope,
        series,
        runtime.metrics.instances_active.clone(),
    );
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    let budget = limits.cpu_budget;
    store.epoch_deadline_callback(move |ctx| {
        if ctx.data().meter.used() > budget {
            return Err(CpuBudgetExceeded.into());
        }
        Ok(UpdateDeadline::Yield(1))
    });
    // A new store's deadline is the current epoch: without this, the first Wasm code that runs
    // (component instantiation runs some) would call the callback above at once and yield.
    store.set_epoch_deadline(1);
    store
}

/// Runs one hook call with the use's limits: CPU budget (metered per poll), call timeout, and
/// a classification of any failure. Expands inside an async fn; `$call` borrows `$store`.
macro_rules! guarded {
    ($store:expr, $limits:expr, $call:expr) => {{
        let meter = $store.data().meter.clone();
        meter.reset();
        $store.set_epoch_deadline(1);
        let res = tokio::time::timeout(
            $limits.call_timeout,
            $crate::plugins::host::Metered::new($call, meter),
        )
        .await;
        $crate::plugins::chain::finish(&mut $store, res)
    }};
}
pub(crate) use guarded;

/// Classifies the outcome of a guarded call.
pub(crate) fn finish<T>(
    store: &mut Store<HostState>,
    res: Result<wasmtime::Result<Result<T, types::PluginError>>, tokio::time::error::Elapsed>,
) -> Result<T, FailureKind> {
    let stderr = store.data_mut().flush_stdio();
    match res {
        Err(_) => Err(FailureKind::Timeout),
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(FailureKind::Error {
            kind: e.kind,
            message: e.message,
        }),
        Ok(Err(trap)) => {
            if trap.downcast_ref::<CpuBudgetExceeded>().is_some() {
                Err(FailureKind::CpuBudget(GuestTrace::of(&trap)))
            } else if store.data().limiter.hit {
                Err(FailureKind::Memory(GuestTrace::of(&trap)))
            } else if let Some(msg) = panic_message(&stderr) {
                Err(FailureKind::Panic(msg))
            } else {
                let trap_code = trap
                    .downcast_ref::<wasmtime::Trap>()
                    .map_or_else(|| trap.to_string(), ToString::to_string);
                Err(FailureKind::Trap(
                    trap_code.lines().next().unwrap_or_default().to_owned(),
                    GuestTrace::of(&trap),
                ))
            }
        }
    }
}

/// The message of a Rust panic from what the guest wrote to stderr
/// (`thread '<unnamed>' panicked at src/lib.rs:3:5:\nthe message`).
fn panic_message(stderr: &str) -> Option<String> {
    let at = stderr.find("panicked at")?;
    let mut lines = stderr[at..].lines();
    let location = lines.next().unwrap_or_default();
    let message = lines.next().unwrap_or_default();
    let text = format!("{message} ({})", location.trim_end_matches(':'));
    Some(text.chars().take(512).collect())
}

/// Removes headers the proxy manages from a plugin's request or response head.
pub(crate) fn strip_managed(headers: &mut HeaderMap) {
    crate::pipeline::remove_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
}

/// An instance alive for this request.
struct Live {
    store: Store<HostState>,
    instance: Instance,
    step: usize,
    /// Requests it served before this one (0 unless reused).
    uses: u32,
    tier: Tier,
}

/// A step the response phase will call: its instance from the request phase, or, for a
/// response-only step (no `handles-request`), none yet: it is created when the response phase
/// reaches the step, so it holds no memory while the upstream answers.
enum Pending {
    Live(Live),
    Deferred(usize),
}

impl Pending {
    fn step(&self) -> usize {
        match self {
            Self::Live(l) => l.step,
            Self::Deferred(i) => *i,
        }
    }
}

/// Done with `l` for this request, every call to it having succeeded: a reused use keeps it for
/// a later request; otherwise it is dropped (its memory reset for the pool's next instance).
fn release(step: &Step, l: Live) {
    if let Some(pool) = &step.reuse {
        pool.put(Reusable {
            store: l.store,
            instance: l.instance,
            uses: l.uses,
            tier: l.tier,
        });
    }
}

impl Chain {
    pub(crate) fn new(
        route: Arc<str>,
        steps: Vec<Step>,
        egress: Arc<[Arc<str>]>,
        runtime: Arc<Runtime>,
        version_header: Option<http::HeaderName>,
    ) -> Self {
        let versions = version_header.and_then(|name| {
            let value = steps
                .iter()
                .map(|s| format!("{}={}", s.plugin.name, s.plugin.short_version()))
                .collect::<Vec<_>>()
                .join(", ");
            Some((name, HeaderValue::try_from(value).ok()?))
        });
        Self {
            route,
            steps,
            egress,
            runtime,
            versions,
            canary: None,
        }
    }

    /// Sends the requests `canary` picks to its chain.
    pub(crate) fn set_canary(&mut self, canary: Canary) {
        self.canary = Some(canary);
    }

    /// Runs the chain and the upstream call. Errors are fail-closed plugin failures, upstream
    /// failures and request-body limits, each mapped to a response by `error.rs`.
    pub(crate) async fn run(&self, input: ChainInput) -> Result<Response<Body>, ProxyError> {
        if let Some(canary) = &self.canary
            && canary.picks(
                &input.ctx.client,
                &input.parts.headers,
                &input.ctx.request_id,
            )
        {
            return Box::pin(canary.chain.run(input)).await;
        }
        let timeout = input.chain_timeout;
        let mut resp = match tokio::time::timeout(timeout, self.run_inner(input)).await {
            Ok(r) => r?,
            Err(_) => return Err(ProxyError::ChainTimeout),
        };
        if let Some((name, value)) = &self.versions {
            resp.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(resp)
    }

    async fn run_inner(&self, input: ChainInput) -> Result<Response<Body>, ProxyError> {
        let ChainInput {
            mut parts,
            body: incoming,
            path,
            query,
            service,
            upstreams,
            ctx,
            scope,
            max_request_body,
            upstream_timeout,
            chain_timeout: _,
        } = input;
        let scope = Arc::new(RequestScope {
            upstreams: upstreams.clone(),
            egress: self.egress.clone(),
            request_id: scope.request_id,
            request_id_header: scope.request_id_header,
            client_header: scope.client_header,
            client_value: scope.client_value,
            traceparent: scope.traceparent,
            stats: scope.stats,
            upstream_timeout,
            values: Default::default(),
        });

        // Buffer the request body only if some plugin reads it.
        let body_limit = self
            .steps
            .iter()
            .filter(|s| s.caps.reads_request_body)
            .map(|s| s.limits.max_body_bytes)
            .min();
        let mut req_body = RequestBody::Stream(incoming);
        if let Some(limit) = body_limit {
            let limit = limit.min(max_request_body);
            let RequestBody::Stream(incoming) = req_body else {
                unreachable!("just built as a stream")
            };
            // Plugins and the upstream get the body as the client meant it.
            let size = usize::try_from(limit).unwrap_or(usize::MAX);
            let bytes = decode::read_decoded(incoming, &mut parts.headers, size)
                .await
                .map_err(|e| match e {
                    ReadError::TooLarge => ProxyError::BodyTooLarge { limit },
                    ReadError::Unsupported(coding) => ProxyError::BodyEncoding { coding },
                    ReadError::Broken(why) => ProxyError::BodyUnreadable { why },
                })?;
            req_body = RequestBody::Buffered(bytes);
        }

        // Request phase.
        let mut uri = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut pending: Vec<Pending> = Vec::with_capacity(self.steps.len());
        let mut answered: Option<(http::response::Parts, Bytes)> = None;
        for (i, step) in self.steps.iter().enumerate() {
            if !step.caps.handles_request {
                // Response-only: no instance until the response phase reaches it.
                pending.push(Pending::Deferred(i));
                continue;
            }
            let Some(mut l) = self.instantiate(i, step, &scope, Phase::Request).await? else {
                continue;
            };
            let req = types::Request {
                method: parts.method.to_string(),
                uri: uri.clone(),
                headers: headers_to_wit(&parts.headers),
                body: match (&req_body, step.caps.reads_request_body) {
                    (RequestBody::Buffered(b), true) => b.to_vec(),
                    _ => Vec::new(),
                },
            };
            // The plugin's output is validated inside the recorded call, so an invalid one
            // counts as `invalid_output`, not `ok`.
            let outcome = call(step, Phase::Request, &mut l, &scope.stats, async |l| {
                let hooks = l.instance.bff_plugin_hooks();
                let action = guarded!(
                    l.store,
                    step.limits,
                    hooks.call_on_request(&mut l.store, &ctx, &req)
                )?;
                match action {
                    types::Action::Forward(r) => apply_forward(
                        r,
                        step.caps.reads_request_body,
                        &mut parts,
                        &mut uri,
                        &scope,
                    )
                    .map(|new_body| {
                        if let Some(b) = new_body {
                            req_body = RequestBody::Buffered(b);
                        }
                        None
                    }),
                    types::Action::Respond(resp) => response_from_wit(resp)
                        .map(Some)
                        .map_err(FailureKind::InvalidOutput),
                }
            })
            .await;
            match outcome {
                Ok(None) if step.caps.handles_response => pending.push(Pending::Live(l)),
                Ok(None) => release(step, l),
                Ok(Some(resp)) => {
                    release(step, l);
                    answered = Some(resp);
                    break;
                }
                Err(kind) => self.skip_or_fail(step, &scope, Phase::Request, kind)?,
            }
        }

        // Upstream (unless a plugin answered), then the response phase in reverse order.
        let reads_response = pending
            .iter()
            .any(|p| self.steps[p.step()].caps.reads_response_body);
        let (mut head, mut resp_body) = match answered {
            Some((head, body)) => (head, ResponseBody::Buffered(body)),
            None => {
                let Some(service) = service.clone() else {
                    return Err(ProxyError::ChainNoResponse {
                        route: self.route.clone(),
                    });
                };
                if reads_response {
                    parts.headers.insert(
                        header::ACCEPT_ENCODING,
                        HeaderValue::from_static("identity"),
                    );
                }
                let body = match req_body {
                    RequestBody::Buffered(b) if b.is_empty() => body::empty(),
                    RequestBody::Buffered(b) => body::full(b),
                    RequestBody::Stream(s) if s.is_end_stream() => body::empty(),
                    RequestBody::Stream(s) => body::stream(http_body_util::Limited::new(
                        s,
                        usize::try_from(max_request_body).unwrap_or(usize::MAX),
                    )),
                };
                let (path, query) = match uri.split_once('?') {
                    Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                    None => (uri.clone(), None),
                };
                let resp = upstreams
                    .send(
                        &service,
                        &path,
                        query.as_deref(),
                        Request::from_parts(parts, body),
                        upstream_timeout,
                        crate::upstream::CallFor {
                            caller: Caller::Route,
                            stats: &scope.stats,
                        },
                    )
                    .await?;
                let (mut head, incoming) = resp.into_parts();
                crate::pipeline::remove_hop_by_hop(&mut head.headers);
                (head, ResponseBody::Stream(incoming))
            }
        };

        for p in pending.into_iter().rev() {
            let step = &self.steps[p.step()];
            let reads = step.caps.reads_response_body;
            if reads && let ResponseBody::Stream(incoming) = resp_body {
                let limit = usize::try_from(step.limits.max_body_bytes).unwrap_or(usize::MAX);
                match decode::read_decoded(incoming, &mut head.headers, limit).await {
                    Ok(bytes) => resp_body = ResponseBody::Buffered(bytes),
                    // The upstream's fault, not the plugin's: it never ran.
                    Err(ReadError::Broken(why)) => {
                        return Err(ProxyError::Upstream(UpstreamError::Failed {
                            service: service.clone().unwrap_or_default(),
                            source: why.into(),
                        }));
                    }
                    Err(e) => {
                        let kind = match e {
                            ReadError::Unsupported(coding) => FailureKind::EncodedBody(coding),
                            _ => FailureKind::BodyTooLarge,
                        };
                        step.series.count(Phase::Response, kind.label());
                        // Fails closed whatever `on_error` says: part of the body is consumed.
                        self.note_failure(step, &scope, Phase::Response, &kind, false);
                        return Err(self.failure(step, kind));
                    }
                }
            }
            // A response-only step gets its instance once the body is in: it holds none while
            // the body arrives.
            let mut l = match p {
                Pending::Live(l) => l,
                Pending::Deferred(i) => {
                    match self.instantiate(i, step, &scope, Phase::Response).await? {
                        Some(l) => l,
                        None => continue,
                    }
                }
            };
            let resp = types::Response {
                status: head.status.as_u16(),
                headers: headers_to_wit(&head.headers),
                body: match (&resp_body, reads) {
                    (ResponseBody::Buffered(b), true) => b.to_vec(),
                    _ => Vec::new(),
                },
            };
            let outcome = call(step, Phase::Response, &mut l, &scope.stats, async |l| {
                let hooks = l.instance.bff_plugin_hooks();
                let r = guarded!(
                    l.store,
                    step.limits,
                    hooks.call_on_response(&mut l.store, &ctx, &resp)
                )?;
                response_from_wit(r).map_err(FailureKind::InvalidOutput)
            })
            .await;
            match outcome {
                Ok((new_head, new_body)) => {
                    release(step, l);
                    head.status = new_head.status;
                    head.headers = new_head.headers;
                    if reads {
                        resp_body = ResponseBody::Buffered(new_body);
                    }
                }
                Err(kind) => self.skip_or_fail(step, &scope, Phase::Response, kind)?,
            }
        }

        let body = match resp_body {
            ResponseBody::Buffered(b) => {
                // The body may have changed: the length is ours to state (hyper sets it from
                // the full body), and it is no longer in whatever encoding it was.
                head.headers.remove(header::CONTENT_LENGTH);
                body::full(b)
            }
            ResponseBody::Stream(s) => body::stream(s),
        };
        Ok(Response::from_parts(head, body))
    }

    /// An instance of step `i` for `phase`: an idle one if the use reuses instances and one is
    /// idle, else a fresh one. If it cannot be made, the failure is counted and the step
    /// skipped (`None`, fail-open) or the request ended (fail-closed).
    async fn instantiate(
        &self,
        i: usize,
        step: &Step,
        scope: &Arc<RequestScope>,
        phase: Phase,
    ) -> Result<Option<Live>, ProxyError> {
        let code = step.plugin.code();
        if let Some(mut r) = step.reuse.as_ref().and_then(|p| p.take(code.tier)) {
            r.store.data_mut().begin_request(scope.clone());
            return Ok(Some(Live {
                store: r.store,
                instance: r.instance,
                step: i,
                uses: r.uses,
                tier: r.tier,
            }));
        }
        let (store, instance) = new_instance(
            &self.runtime,
            &step.plugin,
            &code,
            step.config_json.clone(),
            step.limits,
            Some(scope.clone()),
            Some(step.series.clone()),
        )
        .await;
        match instance {
            Ok(instance) => Ok(Some(Live {
                store,
                instance,
                step: i,
                uses: 0,
                tier: code.tier,
            })),
            Err(e) => {
                let kind = instantiation_failure(&store, &e);
                step.series.count(phase, kind.label());
                step.plugin.count_call(true);
                self.skip_or_fail(step, scope, phase, kind).map(|()| None)
            }
        }
    }

    fn failure(&self, step: &Step, kind: FailureKind) -> ProxyError {
        ProxyError::Plugin(PluginFailure {
            plugin: step.plugin.name.clone(),
            kind,
        })
    }

    /// Keeps the failure as its plugin's last, for `GET /admin/plugins`.
    fn note_failure(
        &self,
        step: &Step,
        scope: &RequestScope,
        phase: Phase,
        kind: &FailureKind,
        skipped: bool,
    ) {
        let failure = LastFailure {
            at: std::time::SystemTime::now(),
            route: self.route.clone(),
            phase: phase.as_str(),
            outcome: kind.label(),
            message: kind.to_string(),
            request_id: scope.request_id_str().to_owned(),
            skipped,
        };
        let mut last = step
            .plugin
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *last = Some(failure);
    }

    /// `fail-open`: log and go on without the plugin. `fail-closed`: end the request.
    fn skip_or_fail(
        &self,
        step: &Step,
        scope: &RequestScope,
        phase: Phase,
        kind: FailureKind,
    ) -> Result<(), ProxyError> {
        self.note_failure(
            step,
            scope,
            phase,
            &kind,
            step.on_error == OnError::FailOpen,
        );
        match step.on_error {
            OnError::FailOpen => {
                step.series.skipped();
                tracing::warn!(
                    plugin = %step.plugin.name,
                    request_id = scope.request_id_str(),
                    route = %self.route,
                    error = %kind,
                    "plugin failed; skipped (fail-open)"
                );
                Ok(())
            }
            OnError::FailClosed => Err(self.failure(step, kind)),
        }
    }
}

enum RequestBody {
    Stream(ClientBody),
    Buffered(Bytes),
}

enum ResponseBody {
    Stream(UpstreamBody),
    Buffered(Bytes),
}

/// Runs one hook call of `step` on its live instance inside a `plugin` span, and records it:
/// outcome, wall time and CPU used in the plugin's metrics, CPU in the request's plugin time.
async fn call<T>(
    step: &Step,
    phase: Phase,
    live: &mut Live,
    stats: &RequestStats,
    hook: impl AsyncFnOnce(&mut Live) -> Result<T, FailureKind>,
) -> Result<T, FailureKind> {
    let span = tracing::debug_span!(
        "plugin",
        plugin = %step.plugin.name,
        version = step.plugin.short_version(),
        phase = phase.as_str(),
    );
    // With `[tracing]`: an internal span per hook call.
    let otel = stats.span().map(|s| {
        use opentelemetry::KeyValue;
        s.child(
            format!("plugin {} {}", step.plugin.name, phase.as_str()),
            opentelemetry::trace::SpanKind::Internal,
            vec![
                KeyValue::new("bff.plugin", step.plugin.name.to_string()),
                KeyValue::new("bff.plugin.version", step.plugin.short_version().to_owned()),
                KeyValue::new("bff.plugin.phase", phase.as_str()),
            ],
        )
    });
    let started = Instant::now();
    let result = hook(&mut *live).instrument(span).await;
    let cpu = live.store.data().meter.used();
    stats.add_plugin_time(cpu);
    let outcome = result.as_ref().err().map_or("ok", FailureKind::label);
    if let Some(span) = otel {
        span.end(
            vec![
                opentelemetry::KeyValue::new("bff.plugin.outcome", outcome),
                opentelemetry::KeyValue::new(
                    "bff.plugin.cpu_us",
                    i64::try_from(cpu.as_micros()).unwrap_or(i64::MAX),
                ),
            ],
            result.is_err().then_some(outcome),
        );
    }
    step.plugin.count_call(result.is_err());
    step.series.record(
        phase,
        outcome,
        started.elapsed(),
        cpu,
        step.limits.cpu_budget,
    );
    result
}

/// Applies a plugin's `forward(request)`. Returns the new body if the plugin reads bodies.
fn apply_forward(
    r: types::Request,
    reads_body: bool,
    parts: &mut http::request::Parts,
    uri: &mut String,
    scope: &RequestScope,
) -> Result<Option<Bytes>, FailureKind> {
    let method = Method::from_bytes(r.method.as_bytes()).map_err(|_| {
        FailureKind::InvalidOutput(format!("invalid method `{}`", r.method.escape_debug()))
    })?;
    let (path, query) = match r.uri.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (r.uri.as_str(), None),
    };
    let normalized = crate::router::path::normalize(path).map_err(|_| {
        FailureKind::InvalidOutput(format!("invalid uri `{}`", r.uri.escape_debug()))
    })?;
    let new_uri = match query {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized.into_owned(),
    };
    http::uri::PathAndQuery::try_from(new_uri.as_str()).map_err(|_| {
        FailureKind::InvalidOutput(format!("invalid uri `{}`", r.uri.escape_debug()))
    })?;
    let mut headers = headers_from_wit(r.headers).map_err(FailureKind::InvalidOutput)?;
    strip_managed(&mut headers);
    // Identity and the request id are the proxy's to state, whatever the plugin returned.
    headers.insert(scope.request_id_header.clone(), scope.request_id.clone());
    headers.insert(scope.client_header.clone(), scope.client_value.clone());
    headers.insert(
        crate::observe::trace::TRACEPARENT,
        scope.traceparent.clone(),
    );
    parts.method = method;
    parts.headers = headers;
    *uri = new_uri;
    Ok(reads_body.then(|| Bytes::from(r.body)))
}

/// Validates a plugin's response: a final status (200-599) and valid header fields.
fn response_from_wit(r: types::Response) -> Result<(http::response::Parts, Bytes), String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .ok_or_else(|| format!("invalid status {}", r.status))?;
    let mut headers = headers_from_wit(r.headers)?;
    crate::pipeline::remove_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    let (mut head, ()) = Response::new(()).into_parts();
    head.status = status;
    head.headers = headers;
    Ok((head, Bytes::from(r.body)))
}
