//! Plugin chains: the phases between routing and the upstream (request phase, in chain order)
//! and between the upstream and the client (response phase, in reverse order).
//!
//! ```text
//! route ─▶ on-request(p1) ─▶ on-request(p2) ─▶ upstream ─▶ on-response(p2) ─▶ on-response(p1) ─▶ respond
//!                 └──── respond(resp) skips the rest and the upstream ──┘
//! ```
//!
//! This is the only module that knows about wasmtime. The rest of the proxy sees three things:
//! [`PluginsConfig`] (the `[plugins]` section and the per-use limits), [`Runtime`] (one engine
//! for the process), and `Chain` (a route's loaded plugins, run by `Chain::run`).
//!
//! - `runtime`: the engines (optimized and, for a fast first serve, baseline; pooling
//!   allocators, epoch ticker), the `Linker` with the host imports and a deny-by-default WASI
//!   p2, and the background tier-up from baseline to optimized code.
//! - `load`: reads `<dir>/<name>.wasm`, checks the contract version, compiles and type-checks
//!   it once (`PluginPre`), and calls `init` for every use so a bad config fails the load; on a
//!   reload, keeps the serving version of a plugin whose new file is refused (`Catalog`).
//! - `cache`: compiled plugins on disk by content hash and engine, for fast restarts.
//! - `host`: per-request store data and the host imports (`send`/`wait`, `log`, shared values),
//!   with the limits and the egress allow-list.
//! - `chain`: runs a route's chain for one request with a fresh instance per plugin (or, for a
//!   use with `instances = "reused"`, an idle one from `reuse`).
//! - `reuse`: the idle instances of a `reused` plugin use.
//! - `backtrace`: where a failed plugin was (its innermost functions), for the failure's log.
//! - `hop` (`test-util` only): one plugin's response phase on its own, for the benchmark.

mod backtrace;
mod bindings;
mod cache;
mod chain;
#[cfg(feature = "test-util")]
mod hop;
mod host;
mod load;
mod reuse;
mod runtime;

use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigPath, Problems, check_duration, check_range};

pub(crate) use self::chain::{Chain, ChainInput, FailureKind, PluginFailure, ScopeParts};
#[cfg(feature = "test-util")]
pub use self::hop::Hop;
pub use self::load::LoadError;
pub(crate) use self::load::{
    CanaryEntry, Catalog, CompileStats, Compiler, FileProblem, LoadIssue, LoadedPlugin,
    ProblemKind, Rollbacks, load_chains,
};
pub use self::runtime::{Runtime, RuntimeError};

/// The `context` record plugins get: who the client is and where the request was routed.
pub(crate) fn context(
    client: &crate::identity::ClientProfile,
    route: &str,
    params: &crate::router::Params,
    request_id: &http::HeaderValue,
) -> bindings::bff::plugin::types::Context {
    bindings::bff::plugin::types::Context {
        client: client.name.to_string(),
        attributes: client.attributes.to_vec(),
        route: route.to_owned(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        request_id: request_id.to_str().unwrap_or_default().to_owned(),
    }
}

/// `[plugins]`: where plugins come from and the limits every plugin use gets by default.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directory holding the plugins, one `<name>.wasm` component per plugin. Relative paths are
    /// resolved against the config file's directory.
    pub dir: std::path::PathBuf,
    /// Plugin instances that can be alive at once across all requests (a request holds one per
    /// plugin of its chain). Each reserves `instance_memory_bytes` of address space (not RAM).
    pub max_instances: u32,
    /// The largest linear memory any plugin use may be given (sizes the instance pool).
    pub instance_memory_bytes: u64,
    /// Address space each instance memory reserves: `full` (4 GiB, so compiled plugins need no
    /// bounds checks) or `capped` (`instance_memory_bytes`, checked on every access).
    pub memory_reservation: MemoryReservation,
    /// Wall-clock cap on all plugin phases of one request together, upstream calls included.
    #[serde(with = "humantime_serde")]
    pub chain_timeout: Duration,
    /// Defaults for every plugin use; a chain step can override each.
    pub limits: PluginLimits,
    /// Compile a new plugin version with the fast baseline compiler (Winch) first, so it serves
    /// within milliseconds of its file settling, and move it to optimized code (Cranelift,
    /// compiled in the background) when that is ready. x86-64 only; elsewhere, and when off,
    /// new versions serve once Cranelift has compiled them.
    pub tiered_compilation: bool,
    /// Keep compiled plugins on disk (by content hash and engine) so restarts skip compiling.
    pub compile_cache: bool,
    /// Where the compile cache lives. Default: `$XDG_CACHE_HOME/bff-proxy/plugins`, else
    /// `$HOME/.cache/bff-proxy/plugins`. Relative paths are resolved against the config file.
    pub cache_dir: Option<std::path::PathBuf>,
    /// If set, responses of routes with a chain carry this header listing the plugin versions
    /// that served them (`name=<first 12 hex of SHA-256>, ...`). Off by default.
    pub version_header: Option<String>,
    /// How plugin uses with `instances = "reused"` keep their idle instances.
    pub reuse: ReuseConfig,
    /// Pins: plugin name → the SHA-256 (hex) its file must have. A file with another hash is
    /// refused like an invalid one (at startup the proxy does not start; on a reload the
    /// serving version stays, if it matches the pin), so only the build ops approved can run.
    pub sha256: std::collections::BTreeMap<String, String>,
    /// Refuse a config in which a plugin a route uses has no pin in `sha256`.
    pub require_sha256: bool,
    /// Watching a new plugin version after it replaces another, and rolling back to that one
    /// when the new version fails.
    pub rollback: RollbackConfig,
    /// Candidate versions: plugin name → a second file that serves a share of the requests.
    pub canary: std::collections::BTreeMap<String, CanaryConfig>,
}

/// `[plugins.canary.NAME]`: a candidate version of plugin NAME, loaded beside the serving one,
/// that serves `percent` of the requests of `clients` on every route using NAME. A request is
/// in the canary cohort for all of its chain, or not at all; the cohort is chosen by a hash of
/// `sticky_header`'s value (the same user, the same version) or else of the request id. A
/// candidate that does not load serves nothing (the serving version takes every request), and
/// the rollback watch stops a candidate that fails far more than the serving version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The candidate's file name in `plugins.dir` (e.g. `voice-next.wasm`).
    pub file: String,
    /// Share of the requests in scope the candidate serves, 0 to 100.
    pub percent: u8,
    /// Clients whose requests are in scope; empty: every client's.
    #[serde(default)]
    pub clients: Vec<String>,
    /// Request header whose value picks the cohort (a user id from `claim_headers`, say);
    /// requests without it are picked by their request id.
    #[serde(default)]
    pub sticky_header: Option<String>,
}

impl CanaryConfig {
    fn validate(&self, name: &str, at: &ConfigPath, problems: &mut Problems) {
        let file = &self.file;
        if !file.ends_with(".wasm")
            || file.contains(['/', '\\'])
            || file.starts_with('.')
            || *file == format!("{name}.wasm")
        {
            problems.push(
                at.key("file"),
                format!(
                    "must be a `.wasm` file name in `plugins.dir` other than `{name}.wasm` (no directories)"
                ),
            );
        }
        check_range(self.percent, 0..=100, &at.key("percent"), problems);
        if let Some(h) = &self.sticky_header
            && http::HeaderName::try_from(h.as_str()).is_err()
        {
            problems.push(at.key("sticky_header"), "is not a valid header name");
        }
    }
}

/// `[plugins.rollback]`: for `window` after a reload replaces a plugin's serving version, the
/// version it replaced is kept loaded; if the new version fails (error result, trap, panic,
/// limit, invalid output) at least `max_failure_ratio` of at least `min_calls` hook calls, and
/// at least twice as often as the old one did, the old version serves again and the new file
/// is refused until it changes. `POST /admin/plugins/rollback` does the same on request.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackConfig {
    /// Roll back automatically (the admin endpoint works either way while a previous version
    /// is kept).
    pub automatic: bool,
    /// How long after a swap the previous version is kept and the new one watched.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Hook calls of the new version before its failure ratio counts.
    pub min_calls: u64,
    /// Failed share of the new version's calls that rolls it back (0 to 1).
    pub max_failure_ratio: f64,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        Self {
            automatic: true,
            window: Duration::from_secs(300),
            min_calls: 20,
            max_failure_ratio: 0.25,
        }
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dir: "plugins".into(),
            max_instances: 1000,
            instance_memory_bytes: 64 << 20,
            memory_reservation: MemoryReservation::Full,
            chain_timeout: Duration::from_secs(10),
            limits: PluginLimits::default(),
            tiered_compilation: true,
            compile_cache: true,
            cache_dir: None,
            version_header: None,
            reuse: ReuseConfig::default(),
            sha256: std::collections::BTreeMap::new(),
            require_sha256: false,
            rollback: RollbackConfig::default(),
            canary: std::collections::BTreeMap::new(),
        }
    }
}

/// A chain step's `instances`: where the instance that serves a request comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Instances {
    /// A fresh instance per request: nothing one request leaves in the plugin's memory can
    /// reach another.
    #[default]
    PerRequest,
    /// An instance that served an earlier request of this use, if one is idle; else a fresh
    /// one. It serves one request at a time. It skips instantiating, resetting memory and the
    /// plugin's own start-up work (parsing its config), but whatever the plugin keeps in
    /// memory outlives the request: for plugins you trust not to keep one request's data
    /// for the next. Memory, CPU and time limits still apply per call; an instance whose
    /// call failed is discarded, never reused.
    Reused,
}

/// `[plugins.reuse]`: bounds on the idle instances of `instances = "reused"` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReuseConfig {
    /// Idle instances kept per plugin use; more are dropped when their request ends. Each
    /// holds an instance pool slot (see `max_instances`) and its memory.
    pub max_idle: u32,
    /// Requests an instance serves before it is dropped and replaced by a fresh one, so
    /// whatever a plugin accumulates (fragmented or leaked memory) is bounded.
    pub max_uses: u32,
}

impl Default for ReuseConfig {
    fn default() -> Self {
        Self {
            max_idle: 8,
            max_uses: 10_000,
        }
    }
}

/// `plugins.memory_reservation`: how much address space (not memory: only the pages an
/// instance touches become memory) each plugin instance's linear memory reserves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryReservation {
    /// 4 GiB, all a 32-bit memory can address, plus a 32 MiB guard region: the compiled code
    /// needs no bounds check on loads and stores (the guard pages catch what is out of
    /// bounds). wasmtime's own default; about 8 TiB of address space at the default
    /// `max_instances`.
    #[default]
    Full,
    /// `instance_memory_bytes` plus a 64 KiB guard: the least address space, for hosts that
    /// limit it (`ulimit -v`); the compiled code checks bounds on every memory access.
    Capped,
}

/// Linear memories a pool slot set aside per instance: components built by some toolchains
/// carry a second memory (e.g. the WASI adapter's) next to the main one.
pub(crate) const MEMORIES_PER_INSTANCE: u32 = 2;
/// [`MemoryReservation::Full`]'s reservation and guard.
const FULL_RESERVATION: u64 = 4 << 30;
const FULL_GUARD: u64 = 32 << 20;
/// The guard after a [`MemoryReservation::Capped`] memory.
const CAPPED_GUARD: u64 = 64 << 10;
/// The most address space the instance pools may reserve: a quarter of x86-64's 128 TiB of
/// user address space, so a process (or a test binary running several proxies) never runs
/// out of it.
const MAX_RESERVED_ADDRESS_SPACE: u64 = 32 << 40;

/// Limits of one plugin use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// CPU time per hook call. Time spent waiting on upstream calls does not count.
    #[serde(with = "humantime_serde")]
    pub cpu_budget: Duration,
    /// Wall-clock time per hook call, waiting included.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Linear memory cap of the plugin's instance.
    pub max_memory_bytes: u64,
    /// Upstream calls (`send`) per request.
    pub max_sends: u32,
    /// The largest body (request, response or `send` response) handed to the plugin.
    pub max_body_bytes: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            cpu_budget: Duration::from_millis(50),
            call_timeout: Duration::from_secs(5),
            max_memory_bytes: 32 << 20,
            max_sends: 16,
            max_body_bytes: 1 << 20,
        }
    }
}

/// Per-use overrides of [`PluginLimits`] (`limits = { cpu_budget = "20ms" }` in a chain step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimitsOverride {
    /// See [`PluginLimits::cpu_budget`].
    #[serde(default, with = "humantime_serde")]
    pub cpu_budget: Option<Duration>,
    /// See [`PluginLimits::call_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub call_timeout: Option<Duration>,
    /// See [`PluginLimits::max_memory_bytes`].
    pub max_memory_bytes: Option<u64>,
    /// See [`PluginLimits::max_sends`].
    pub max_sends: Option<u32>,
    /// See [`PluginLimits::max_body_bytes`].
    pub max_body_bytes: Option<u64>,
}

impl PluginLimits {
    /// These limits with `o`'s values where it sets one.
    pub(crate) fn with(self, o: &PluginLimitsOverride) -> Self {
        Self {
            cpu_budget: o.cpu_budget.unwrap_or(self.cpu_budget),
            call_timeout: o.call_timeout.unwrap_or(self.call_timeout),
            max_memory_bytes: o.max_memory_bytes.unwrap_or(self.max_memory_bytes),
            max_sends: o.max_sends.unwrap_or(self.max_sends),
            max_body_bytes: o.max_body_bytes.unwrap_or(self.max_body_bytes),
        }
    }

    pub(crate) fn validate(&self, memory_cap: u64, at: &ConfigPath, problems: &mut Problems) {
        check_duration(
            self.cpu_budget,
            Duration::from_millis(1)..=Duration::from_secs(60),
            &at.key("cpu_budget"),
            problems,
        );
        check_duration(
            self.call_timeout,
            Duration::from_millis(1)..=Duration::from_secs(300),
            &at.key("call_timeout"),
            problems,
        );
        check_range(
            self.max_memory_bytes,
            (1 << 20)..=memory_cap,
            &at.key("max_memory_bytes"),
            problems,
        );
        check_range(self.max_sends, 0..=1024, &at.key("max_sends"), problems);
        check_range(
            self.max_body_bytes,
            0..=(1 << 30),
            &at.key("max_body_bytes"),
            problems,
        );
    }
}

impl PluginsConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        check_range(
            self.max_instances,
            1..=100_000,
            &at.key("max_instances"),
            problems,
        );
        check_range(
            self.instance_memory_bytes,
            (1 << 20)..=(4 << 30),
            &at.key("instance_memory_bytes"),
            problems,
        );
        check_duration(
            self.chain_timeout,
            Duration::from_millis(1)..=Duration::from_secs(3600),
            &at.key("chain_timeout"),
            problems,
        );
        let reserved = self.reserved_address_space();
        if reserved > MAX_RESERVED_ADDRESS_SPACE {
            let hint = match self.memory_reservation {
                MemoryReservation::Full => "lower it, or set `memory_reservation = \"capped\"`",
                MemoryReservation::Capped => "lower it or `instance_memory_bytes`",
            };
            problems.push(
                at.key("max_instances"),
                format!(
                    "{} instances would reserve {:.1} TiB of address space (at most {} TiB): {hint}",
                    self.max_instances,
                    reserved as f64 / (1u64 << 40) as f64,
                    MAX_RESERVED_ADDRESS_SPACE >> 40
                ),
            );
        }
        self.limits
            .validate(self.instance_memory_bytes, &at.key("limits"), problems);
        check_range(
            self.reuse.max_idle,
            1..=1024,
            &at.key("reuse").key("max_idle"),
            problems,
        );
        check_range(
            self.reuse.max_uses,
            1..=10_000_000,
            &at.key("reuse").key("max_uses"),
            problems,
        );
        check_duration(
            self.rollback.window,
            Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600),
            &at.key("rollback").key("window"),
            problems,
        );
        check_range(
            self.rollback.min_calls,
            1..=1_000_000,
            &at.key("rollback").key("min_calls"),
            problems,
        );
        if !(self.rollback.max_failure_ratio > 0.0 && self.rollback.max_failure_ratio <= 1.0) {
            problems.push(
                at.key("rollback").key("max_failure_ratio"),
                "must be above 0 and at most 1",
            );
        }
        for (name, canary) in &self.canary {
            canary.validate(name, &at.key("canary").key(name), problems);
        }
        if let Some(h) = &self.version_header
            && http::HeaderName::try_from(h.as_str()).is_err()
        {
            problems.push(at.key("version_header"), "is not a valid header name");
        }
        for (name, pin) in &self.sha256 {
            if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(
                    at.key("sha256").key(name),
                    "must be a SHA-256 in hex, 64 characters (`sha256sum plugin.wasm`)",
                );
            }
        }
    }

    /// The SHA-256 `plugin`'s file must have, if it is pinned (lowercase hex).
    pub(crate) fn pin(&self, plugin: &str) -> Option<String> {
        self.sha256.get(plugin).map(|p| p.to_ascii_lowercase())
    }

    /// Why `reused_uses` plugin uses with `instances = "reused"` may not fit an instance pool
    /// of `max_instances`: their idle instances, at most `reuse.max_idle` each, may hold at
    /// most half the pool, so requests always find slots for fresh instances.
    pub(crate) fn idle_overcommit(&self, reused_uses: usize, max_instances: u32) -> Option<String> {
        let idle = u64::try_from(reused_uses)
            .unwrap_or(u64::MAX)
            .saturating_mul(u64::from(self.reuse.max_idle));
        (idle > u64::from(max_instances / 2)).then(|| {
            format!(
                "{reused_uses} plugin uses with `instances = \"reused\"` may keep {idle} idle instances (`plugins.reuse.max_idle` = {} each), more than half of the instance pool's {max_instances}: lower `max_idle` or raise `plugins.max_instances`",
                self.reuse.max_idle
            )
        })
    }

    /// Whether new plugin versions start on baseline code (see `tiered_compilation`).
    pub(crate) fn tiered(&self) -> bool {
        self.tiered_compilation && cfg!(target_arch = "x86_64")
    }

    /// Address space the instance pools reserve: the optimized tier's memories as
    /// `memory_reservation` says, and, with tiered compilation, the baseline tier's, always
    /// capped (it serves a version only until its optimized code is ready).
    pub(crate) fn reserved_address_space(&self) -> u64 {
        let memories = u64::from(MEMORIES_PER_INSTANCE) * u64::from(self.max_instances);
        let slot = |tier| {
            let (reservation, guard) = self.memory_slot(tier);
            memories * (reservation + guard)
        };
        let baseline = if self.tiered() {
            slot(runtime::Tier::Baseline)
        } else {
            0
        };
        slot(runtime::Tier::Optimized) + baseline
    }

    /// The address space each instance memory of `tier` reserves, and its guard region after it.
    ///
    /// With [`MemoryReservation::Full`] the optimized tier reserves all 4 GiB a 32-bit memory can
    /// address, plus a guard, so Cranelift drops the bounds check on every load and store (and the
    /// guard catches what would be out of bounds): about 20% faster on a 20 KB reshape. The
    /// baseline tier serves only until its plugin's optimized code is ready, so it stays capped
    /// and the address space reserved is counted once, not twice (see
    /// [`Self::reserved_address_space`]).
    pub(crate) fn memory_slot(&self, tier: runtime::Tier) -> (u64, u64) {
        match (self.memory_reservation, tier) {
            (MemoryReservation::Full, runtime::Tier::Optimized) => (FULL_RESERVATION, FULL_GUARD),
            _ => (self.instance_memory_bytes, CAPPED_GUARD),
        }
    }

    /// The settings of `new` that differ from these (the running runtime's) and take effect
    /// only when the plugin runtime starts: the instance pool, the compilers, the compile cache.
    pub(crate) fn restart_only_changes(&self, new: &Self) -> Vec<&'static str> {
        [
            (
                self.max_instances != new.max_instances,
                "plugins.max_instances",
            ),
            (
                self.instance_memory_bytes != new.instance_memory_bytes,
                "plugins.instance_memory_bytes",
            ),
            (
                self.memory_reservation != new.memory_reservation,
                "plugins.memory_reservation",
            ),
            (
                self.tiered_compilation != new.tiered_compilation,
                "plugins.tiered_compilation",
            ),
            (
                self.compile_cache != new.compile_cache,
                "plugins.compile_cache",
            ),
            (self.cache_dir != new.cache_dir, "plugins.cache_dir"),
        ]
        .into_iter()
        .filter_map(|(changed, name)| changed.then_some(name))
        .collect()
    }

    /// The compile cache directory in use, if any.
    pub(crate) fn cache_dir(&self) -> Option<std::path::PathBuf> {
        if !self.compile_cache {
            return None;
        }
        self.cache_dir.clone().or_else(cache::default_dir)
    }
}
