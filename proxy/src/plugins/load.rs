//! Loading: from `<dir>/<name>.wasm` to a type-checked, initialized plugin, off the request path.
//!
//! Part of building a snapshot, at startup and on every reload (the same code for both). Each
//! plugin a route uses is read (and refused while it is still being written), hashed, checked
//! against the contract version, compiled on a blocking thread (or taken from the in-memory or
//! on-disk cache by content hash) and pre-instantiated against the linker once (`PluginPre`):
//! that is the type-check, so a plugin that imports something the proxy does not provide fails
//! here, never on a request. Then every use of it in a chain is initialized with that use's
//! config (`init`), so a config the plugin rejects fails the load too.
//!
//! A reload never replaces a working plugin with a broken one: if the new file of a plugin that
//! is serving is missing, unreadable, half-written, not a valid component, of another contract,
//! or rejects a use's config, the serving version is kept (if it still accepts the new config),
//! and the problem is recorded in the [`Catalog`] for `/admin/plugins`. Only a plugin with no
//! serving version, or one the new config breaks, fails the load; every problem is collected.
//!
//! When a load replaces a serving version, the catalog keeps the replaced one as `previous`
//! for `plugins.rollback.window`: a rollback (the reloader's health watch, or the admin API)
//! is a load told to refuse the new version's hash ([`Rollbacks`]), which then serves the
//! previous version again and records the refusal (`rolled_back`) until the file changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::{self, bff::plugin::types};
use super::cache::DiskCache;
use super::chain::{Chain, FailureKind, Step, instantiation_failure, new_instance};
use super::reuse::IdlePool;
use super::runtime::Tier;
use super::{PluginLimits, Runtime};
use crate::config::Config;

/// The contract version this host implements: `package bff:plugin@CONTRACT_VERSION` in
/// `plugin-sdk/wit/plugin.wit` (a test keeps the two equal).
pub(crate) const CONTRACT_VERSION: (u64, u64, u64) = (0, 2, 0);
const HOOKS_EXPORT: &str = "bff:plugin/hooks";

/// Components compiled but not serving kept in memory (a rollback to one is instant).
const SPARE_COMPILED: usize = 8;

/// Plugins that could not be loaded, every problem listed.
#[derive(Debug, thiserror::Error)]
#[error("{} plugin problem(s):\n  {}", .problems.len(), .problems.join("\n  "))]
pub struct LoadError {
    /// One line per problem: where (route and chain step, or plugin file) and what.
    pub problems: Vec<String>,
    /// Some plugin file was still being written: loading again once it settles may succeed.
    pub retry: bool,
}

/// A compiled, type-checked plugin file.
pub(crate) struct LoadedPlugin {
    pub(crate) name: Arc<str>,
    /// Hex SHA-256 of the file: the plugin's version.
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// Its code, pre-instantiated: baseline code is replaced by optimized code of the same file
    /// once that is compiled (`Runtime::tier_up`); each instance keeps the code it started with.
    code: arc_swap::ArcSwap<Code>,
    /// When this version started serving.
    pub(crate) loaded_at: SystemTime,
    /// Its last failed use on a request, for `GET /admin/plugins`.
    pub(crate) last_failure: Mutex<Option<LastFailure>>,
    /// Hook calls on requests (instantiations that failed included), and how many failed:
    /// what the rollback watch compares between a new version and the one it replaced.
    calls: AtomicU64,
    failed: AtomicU64,
}

/// A plugin's last failed use: what a plugin author looks at first (`GET /admin/plugins`).
#[derive(Debug, Clone)]
pub(crate) struct LastFailure {
    pub(crate) at: SystemTime,
    pub(crate) route: Arc<str>,
    pub(crate) phase: &'static str,
    /// The `outcome` label of `bff_plugin_invocations_total`.
    pub(crate) outcome: &'static str,
    /// What the failure's log line says (where the plugin was, for a trap or a limit).
    pub(crate) message: String,
    pub(crate) request_id: String,
    /// Skipped under `on_error = "fail-open"` (else the request failed).
    pub(crate) skipped: bool,
}

/// One tier's compiled code of a plugin, type-checked against that tier's linker.
pub(crate) struct Code {
    pub(crate) pre: bindings::PluginPre<super::host::HostState>,
    pub(crate) tier: Tier,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// The short form of the version used in logs and headers.
    pub(crate) fn short_version(&self) -> &str {
        &self.sha256[..12]
    }

    /// Counts one hook call on a request (or a failed instantiation for one).
    pub(crate) fn count_call(&self, failed: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hook calls so far and how many failed.
    pub(crate) fn calls(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// The code new instances are made from.
    pub(crate) fn code(&self) -> Arc<Code> {
        self.code.load_full()
    }

    pub(crate) fn set_code(&self, pre: bindings::PluginPre<super::host::HostState>, tier: Tier) {
        self.code.store(Arc::new(Code { pre, tier }));
    }
}

/// Type-checks `component` against `linker`: every import provided, the plugin world exported.
pub(crate) fn pre(
    linker: &wasmtime::component::Linker<super::host::HostState>,
    component: &Component,
) -> Result<bindings::PluginPre<super::host::HostState>, String> {
    let pre = linker.instantiate_pre(component).map_err(|e| {
        format!(
            "does not fit the bff-proxy host: {}",
            crate::ErrorChain(e.as_ref())
        )
    })?;
    bindings::PluginPre::new(pre).map_err(|e| {
        format!(
            "does not implement the plugin world: {}",
            crate::ErrorChain(e.as_ref())
        )
    })
}

/// The plugins of the live snapshot by name, with what the last load learned about each.
/// Replaced as a whole when a reload is applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct Catalog {
    pub(crate) entries: BTreeMap<Arc<str>, CatalogEntry>,
}

impl Catalog {
    /// True if both record the same problems for the same plugins.
    pub(crate) fn same_problems(&self, other: &Catalog) -> bool {
        self.entries.len() == other.entries.len()
            && self.entries.iter().all(|(name, e)| {
                other.entries.get(name).is_some_and(|o| {
                    let key = |p: &FileProblem| (p.kind, p.message.clone(), p.sha256.clone());
                    let canary = |e: &CatalogEntry| {
                        e.canary.as_ref().and_then(|c| c.problem.as_ref()).map(key)
                    };
                    o.problem.as_ref().map(key) == e.problem.as_ref().map(key)
                        && canary(o) == canary(e)
                })
            })
    }
}

/// One loaded plugin.
#[derive(Debug, Clone)]
pub(crate) struct CatalogEntry {
    /// The version serving requests.
    pub(crate) serving: Arc<LoadedPlugin>,
    /// The version `serving` replaced, kept for `plugins.rollback.window` after the swap.
    pub(crate) previous: Option<Previous>,
    /// The candidate version of `plugins.canary`, if one is configured.
    pub(crate) canary: Option<CanaryEntry>,
    pub(crate) file: PathBuf,
    /// The newest problem with this plugin's file, if the file on disk is not what serves.
    pub(crate) problem: Option<FileProblem>,
    /// Route ids using it, in config order.
    pub(crate) routes: Vec<String>,
    /// Clients those routes serve (`*` for a route serving every client).
    pub(crate) clients: Vec<String>,
}

/// A version replaced by a reload, kept loaded so that a rollback to it is instant.
#[derive(Debug, Clone)]
pub(crate) struct Previous {
    pub(crate) plugin: Arc<LoadedPlugin>,
    /// When it stopped serving.
    pub(crate) replaced_at: std::time::Instant,
    pub(crate) replaced_at_wall: SystemTime,
}

/// Rollbacks a load must apply: (plugin name, whether it is the canary) → (SHA-256 of the
/// version to refuse, why).
pub(crate) type Rollbacks = HashMap<(String, bool), (String, String)>;

/// A plugin's canary (`plugins.canary`): the candidate version and what became of its file.
#[derive(Debug, Clone)]
pub(crate) struct CanaryEntry {
    /// The candidate, serving its share, if its file loaded.
    pub(crate) plugin: Option<Arc<LoadedPlugin>>,
    pub(crate) file: PathBuf,
    /// Why the file is not serving, if it is not.
    pub(crate) problem: Option<FileProblem>,
}

/// Why the plugin file on disk is not the version serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileProblem {
    pub(crate) kind: ProblemKind,
    pub(crate) message: String,
    /// SHA-256 of the rejected file, when it could be read.
    pub(crate) sha256: Option<String>,
    pub(crate) since: SystemTime,
}

/// The status shown for a plugin whose file is not serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProblemKind {
    /// The file is gone; the loaded version keeps serving the routes that use it.
    Missing,
    /// The file was read but refused (invalid, incompatible, or rejects its config).
    Rejected,
    /// The file is a version that was rolled back (it failed after it replaced the previous
    /// one, or an operator asked): refused until the file changes.
    RolledBack,
}

impl ProblemKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "file_missing",
            Self::Rejected => "rejected",
            Self::RolledBack => "rolled_back",
        }
    }
}

/// Compiled components by file hash, kept across reloads, backed by the on-disk cache.
#[derive(Debug, Default)]
pub(crate) struct Compiler {
    /// Component, its tier, and the generation it was last used in.
    memory: HashMap<String, (Component, Tier, u64)>,
    /// Files known not to be valid components, by hash: not compiled again.
    invalid: HashMap<String, String>,
    disk: Option<DiskCache>,
    /// The runtime's background optimized compiles (see `Runtime::tier_up`).
    tier_ups: Arc<super::runtime::TierUps>,
    /// Plugins of the current load on baseline code: queued for their optimized compile when
    /// the load is over, so Cranelift does not compete with the load's own compiles.
    tier_ups_due: Vec<(Arc<LoadedPlugin>, Arc<[u8]>)>,
    generation: u64,
    /// Where the components of the current load came from.
    pub(crate) stats: CompileStats,
}

/// Where the plugins of one load came from (shown per reload in `/admin/reloads`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct CompileStats {
    /// Compiled from the `.wasm` file.
    pub(crate) compiled: u32,
    /// Of those, compiled by the baseline tier (moved to optimized code in the background).
    pub(crate) baseline: u32,
    /// Deserialized from the on-disk compile cache.
    pub(crate) from_disk_cache: u32,
    /// Already compiled in this process (an earlier version coming back).
    pub(crate) from_memory: u32,
}

/// A plugin file that failed to load this time.
#[derive(Debug, Clone)]
pub(crate) struct LoadIssue {
    pub(crate) plugin: Arc<str>,
    /// The plugin's canary file (then the serving version takes every request).
    pub(crate) canary: bool,
    pub(crate) problem: FileProblem,
    /// False when the same file was already reported by an earlier load (log and count once).
    pub(crate) new: bool,
}

/// A successful load: the routes' chains and the catalog that goes with them.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// Per route (in config order), its chain, or `None` for routes without one.
    pub(crate) chains: Vec<Option<Arc<Chain>>>,
    pub(crate) catalog: Catalog,
    /// Plugins whose file was refused while their serving version was kept.
    pub(crate) issues: Vec<LoadIssue>,
    /// Some plugin file was still being written: load again once it settles.
    pub(crate) retry: bool,
    pub(crate) stats: CompileStats,
}

impl Compiler {
    /// A compiler with the on-disk cache at `dir` (none if `None` or it cannot be created).
    pub(crate) fn new(runtime: &Runtime, dir: Option<&Path>) -> Self {
        Self {
            disk: dir.and_then(|d| DiskCache::open(d, &runtime.engine)),
            tier_ups: runtime.tier_ups.clone(),
            ..Self::default()
        }
    }

    /// The component for this file content and its tier: from memory (an optimized compile
    /// finished in the background replaces a baseline one), from disk, or compiled on a
    /// low-priority thread: by the baseline tier if there is one (the optimized compile is then
    /// queued by [`load_chains`] when the load is over), else by the optimized tier and stored
    /// on disk.
    async fn component(
        &mut self,
        runtime: &Runtime,
        path: &Path,
        bytes: Arc<[u8]>,
        sha256: &str,
    ) -> Result<(Component, Tier), String> {
        let generation = self.generation;
        if let Some(c) = runtime.tier_ups.done(sha256) {
            self.memory
                .insert(sha256.to_owned(), (c, Tier::Optimized, generation));
        }
        if let Some((c, tier, used)) = self.memory.get_mut(sha256) {
            *used = generation;
            self.stats.from_memory += 1;
            return Ok((c.clone(), *tier));
        }
        if let Some(e) = self.invalid.get(sha256) {
            return Err(e.clone());
        }
        let engine = runtime.engine.clone();
        let baseline = runtime.baseline.as_ref().map(|(e, _)| e.clone());
        let disk = self.disk.clone();
        let sha = sha256.to_owned();
        let shown = path.display().to_string();
        // Compiling takes milliseconds to seconds: never on a runtime worker, and at low
        // priority, so a reload under load slows itself down, not the requests.
        let compile_time = runtime.metrics.compile.clone();
        let compiled = on_compile_thread(move || {
            if let Some(c) = disk.as_ref().and_then(|d| d.get(&engine, &sha)) {
                return Ok((c, Tier::Optimized, true));
            }
            let started = std::time::Instant::now();
            let timed = |tier: Tier| {
                compile_time
                    .with_label_values(&[tier.as_str()])
                    .observe(started.elapsed().as_secs_f64());
            };
            let invalid = |e: wasmtime::Error| {
                format!(
                    "{shown} is not a valid WebAssembly component: {}",
                    first_line(&e)
                )
            };
            // A file Winch cannot compile (a proposal it lacks) goes straight to Cranelift,
            // whose verdict on an invalid file is the one reported.
            if let Some(Ok(c)) = baseline.map(|b| Component::new(&b, &bytes)) {
                timed(Tier::Baseline);
                return Ok((c, Tier::Baseline, false));
            }
            super::cache::compile(&engine, &bytes, &sha, disk.as_ref())
                .map_err(invalid)
                .map(|c| {
                    timed(Tier::Optimized);
                    (c, Tier::Optimized, false)
                })
        })
        .await?;
        match &compiled {
            Ok((c, tier, from_disk)) => {
                if *from_disk {
                    self.stats.from_disk_cache += 1;
                } else {
                    self.stats.compiled += 1;
                    self.stats.baseline += u32::from(*tier == Tier::Baseline);
                }
                self.memory
                    .insert(sha256.to_owned(), (c.clone(), *tier, generation));
            }
            Err(e) => {
                if self.invalid.len() >= 64 {
                    self.invalid.clear();
                }
                self.invalid.insert(sha256.to_owned(), e.clone());
            }
        }
        compiled.map(|(c, tier, _)| (c, tier))
    }

    /// Forgets compiled components neither serving in `catalog` nor among the most recent spares.
    fn retain(&mut self, catalog: &Catalog) {
        let serving: std::collections::HashSet<&str> = catalog
            .entries
            .values()
            .flat_map(|e| {
                let canary = e.canary.as_ref().and_then(|c| c.plugin.as_ref());
                std::iter::once(&e.serving).chain(canary)
            })
            .map(|p| p.sha256.as_str())
            .collect();
        let mut spares: Vec<(u64, String)> = self
            .memory
            .iter()
            .filter(|(sha, _)| !serving.contains(sha.as_str()))
            .map(|(sha, (_, _, used))| (*used, sha.clone()))
            .collect();
        if spares.len() > SPARE_COMPILED {
            spares.sort();
            for (_, sha) in &spares[..spares.len() - SPARE_COMPILED] {
                self.memory.remove(sha);
            }
        }
        self.tier_ups.retain(|sha| self.memory.contains_key(sha));
        self.generation += 1;
    }
}

/// Runs `f` on a fresh low-priority thread (see `runtime::lower_priority`) and awaits it.
async fn on_compile_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bff-compile".into())
        .spawn(move || {
            super::runtime::lower_priority();
            let _ = tx.send(f());
        })
        .map_err(|e| format!("cannot start a compile thread: {e}"))?;
    rx.await
        .map_err(|_| "compiling was interrupted (the compile thread panicked)".to_owned())
}

/// A plugin file as read from disk.
enum FileState {
    Read {
        bytes: Arc<[u8]>,
        sha256: String,
        /// Modified within the settle window: if it does not load, it may still be being written.
        young: bool,
    },
    Missing,
    /// Its size or modification time changed while it was read.
    Changing,
    Unreadable(String),
}

impl FileState {
    /// Why a file that was not read (missing, changing, unreadable) cannot serve.
    fn problem(self, file: &Path) -> FileProblem {
        let (kind, message) = match self {
            Self::Read { .. } => unreachable!("a file that was read has no problem of its own"),
            Self::Missing => (
                ProblemKind::Missing,
                format!("{} does not exist", file.display()),
            ),
            Self::Changing => (
                ProblemKind::Rejected,
                format!(
                    "{} changed while it was read (still being written?)",
                    file.display()
                ),
            ),
            Self::Unreadable(e) => (ProblemKind::Rejected, e),
        };
        FileProblem::new(kind, message, None)
    }
}

impl FileProblem {
    fn new(kind: ProblemKind, message: String, sha256: Option<String>) -> Self {
        Self {
            kind,
            message,
            sha256,
            since: SystemTime::now(),
        }
    }

    /// The version a recorded rollback refuses (hash, why), if this problem is one.
    fn rolled_back(&self) -> Option<(String, String)> {
        (self.kind == ProblemKind::RolledBack).then_some(())?;
        Some((self.sha256.clone()?, self.message.clone()))
    }
}

/// Reads a plugin file, refusing one that changes while it is read.
fn read_file(path: &Path, settle: Duration) -> FileState {
    let stat = |p: &Path| std::fs::metadata(p).map(|m| (m.len(), m.modified().ok()));
    let before = match stat(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FileState::Missing,
        Err(e) => return FileState::Unreadable(format!("cannot read {}: {e}", path.display())),
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FileState::Missing,
        Err(e) => return FileState::Unreadable(format!("cannot read {}: {e}", path.display())),
    };
    match stat(path) {
        Ok(after) if after == before && after.0 == bytes.len() as u64 => {}
        _ => return FileState::Changing,
    }
    let young = before
        .1
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age < settle);
    FileState::Read {
        sha256: hex::encode(Sha256::digest(&bytes)),
        bytes: bytes.into(),
        young,
    }
}

/// One use of a plugin in a route's chain.
struct Use {
    route: usize,
    step: usize,
    config_json: Arc<str>,
    limits: PluginLimits,
}

/// What loading one plugin name came to.
enum Resolution {
    Ready {
        plugin: Arc<LoadedPlugin>,
        /// Per use, in the order of the uses.
        caps: Vec<types::Capabilities>,
        issue: Option<FileProblem>,
    },
    Failed(Vec<String>),
}

/// Loads every plugin the config's routes use and initializes each use, keeping the serving
/// version (from `previous`) of any plugin whose new file is refused.
pub(crate) async fn load_chains(
    runtime: &Arc<Runtime>,
    config: &Config,
    previous: &Catalog,
    rollbacks: &Rollbacks,
    compiler: &mut Compiler,
    settle: Duration,
) -> Result<Loaded, LoadError> {
    let loaded = load_all(runtime, config, previous, rollbacks, compiler, settle).await;
    // A rejected load's plugins serve nothing; a later load using the same file (its baseline
    // component is kept in memory) queues the tier-up then.
    let due = std::mem::take(&mut compiler.tier_ups_due);
    if loaded.is_ok() {
        for (plugin, bytes) in due {
            runtime.tier_up(&plugin, bytes, compiler.disk.clone());
        }
    }
    loaded
}

async fn load_all(
    runtime: &Arc<Runtime>,
    config: &Config,
    previous: &Catalog,
    rollbacks: &Rollbacks,
    compiler: &mut Compiler,
    settle: Duration,
) -> Result<Loaded, LoadError> {
    compiler.stats = CompileStats::default();
    let mut uses: BTreeMap<&str, Vec<Use>> = BTreeMap::new();
    for (i, r) in config.routes.iter().enumerate() {
        for (j, step) in r.chain.iter().enumerate() {
            uses.entry(step.plugin.as_str()).or_default().push(Use {
                route: i,
                step: j,
                config_json: serde_json::to_string(&step.config)
                    .unwrap_or_else(|_| "{}".into())
                    .into(),
                limits: config.plugins.limits.with(&step.limits),
            });
        }
    }

    let mut problems = Vec::new();
    let mut retry = false;
    let mut issues = Vec::new();
    let mut catalog = Catalog::default();
    // Per (route, step): the use, its plugin and its capabilities.
    let mut ready: HashMap<(usize, usize), (&Use, Arc<LoadedPlugin>, types::Capabilities)> =
        HashMap::new();
    // Per (route, step) of a plugin with a loaded canary: the candidate and its capabilities.
    let mut canary_ready: HashMap<(usize, usize), (Arc<LoadedPlugin>, types::Capabilities)> =
        HashMap::new();
    for (name, uses) in &uses {
        let file = config.plugins.dir.join(format!("{name}.wasm"));
        let prev = previous.entries.get(*name);
        // A rolled-back version stays refused while the file is that version.
        let rollback = rollbacks
            .get(&(name.to_string(), false))
            .cloned()
            .or_else(|| prev?.problem.as_ref()?.rolled_back());
        let (resolution, changing) = resolve(
            runtime,
            config,
            name,
            Target {
                file: &file,
                uses,
                prev,
                rollback: rollback.as_ref(),
            },
            compiler,
            settle,
        )
        .await;
        retry |= changing;
        match resolution {
            Resolution::Ready {
                plugin,
                caps,
                issue,
            } => {
                for (u, c) in uses.iter().zip(caps) {
                    ready.insert((u.route, u.step), (u, plugin.clone(), c));
                }
                let name: Arc<str> = Arc::from(*name);
                if let Some(p) = &issue
                    && !changing
                {
                    let seen = prev
                        .and_then(|e| e.problem.as_ref())
                        .is_some_and(|old| old.sha256 == p.sha256 && old.message == p.message);
                    issues.push(LoadIssue {
                        plugin: name.clone(),
                        canary: false,
                        problem: p.clone(),
                        new: !seen,
                    });
                }
                // While the file is being written its state says nothing yet; an unchanged
                // problem keeps the time it was first seen.
                let problem = if changing {
                    prev.and_then(|e| e.problem.clone())
                } else {
                    match (issue, prev.and_then(|e| e.problem.as_ref())) {
                        (Some(p), Some(old))
                            if old.sha256 == p.sha256 && old.message == p.message =>
                        {
                            Some(old.clone())
                        }
                        (p, _) => p,
                    }
                };
                let mut routes = Vec::new();
                let mut clients = Vec::new();
                for u in uses {
                    let r = &config.routes[u.route];
                    if !routes.contains(&r.id) {
                        routes.push(r.id.clone());
                    }
                    let serves: Vec<String> = if r.clients.is_empty() {
                        vec!["*".to_owned()]
                    } else {
                        r.clients.clone()
                    };
                    for c in serves {
                        if !clients.contains(&c) {
                            clients.push(c);
                        }
                    }
                }
                // A new version keeps the one it replaced (not when it is the previous one
                // coming back); an unchanged one keeps its previous until the window ends.
                let now = std::time::Instant::now();
                let kept_previous = match prev {
                    Some(p) if p.serving.sha256 != plugin.sha256 => p
                        .previous
                        .as_ref()
                        .is_none_or(|old| old.plugin.sha256 != plugin.sha256)
                        .then(|| Previous {
                            plugin: p.serving.clone(),
                            replaced_at: now,
                            replaced_at_wall: SystemTime::now(),
                        }),
                    Some(p) => p.previous.clone().filter(|old| {
                        now.duration_since(old.replaced_at) < config.plugins.rollback.window
                    }),
                    None => None,
                };
                let canary = match config.plugins.canary.get(&*name) {
                    Some(c) => {
                        let prev_canary = prev.and_then(|e| e.canary.as_ref());
                        let refused = rollbacks.get(&(name.to_string(), true));
                        let (entry, loaded) = load_canary(
                            runtime,
                            config,
                            &name,
                            c,
                            (uses, prev_canary, refused),
                            compiler,
                            settle,
                        )
                        .await;
                        if let Some(p) = &entry.problem {
                            let seen = prev_canary
                                .and_then(|c| c.problem.as_ref())
                                .is_some_and(|old| old.since == p.since);
                            issues.push(LoadIssue {
                                plugin: name.clone(),
                                canary: true,
                                problem: p.clone(),
                                new: !seen,
                            });
                        }
                        if let (Some(plugin), Some(caps)) = (&entry.plugin, loaded) {
                            for (u, c) in uses.iter().zip(caps) {
                                canary_ready.insert((u.route, u.step), (plugin.clone(), c));
                            }
                        }
                        Some(entry)
                    }
                    None => None,
                };
                catalog.entries.insert(
                    name,
                    CatalogEntry {
                        serving: plugin,
                        previous: kept_previous,
                        canary,
                        file,
                        problem,
                        routes,
                        clients,
                    },
                );
            }
            Resolution::Failed(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(LoadError { problems, retry });
    }

    let version_header = config
        .plugins
        .version_header
        .as_deref()
        .and_then(|h| http::HeaderName::try_from(h).ok());
    let mut chains = Vec::with_capacity(config.routes.len());
    // One series handle per plugin version, shared by its uses.
    let mut series: HashMap<String, Arc<crate::metrics::PluginSeries>> = HashMap::new();
    for (i, r) in config.routes.iter().enumerate() {
        if r.chain.is_empty() {
            chains.push(None);
            continue;
        }
        let mut step = |j: usize, plugin: Arc<LoadedPlugin>, caps: types::Capabilities| {
            let use_ = &r.chain[j];
            let u = ready
                .get(&(i, j))
                .expect("every use of a loaded plugin was initialized")
                .0;
            let series = series
                .entry(plugin.sha256.clone())
                .or_insert_with(|| {
                    Arc::new(runtime.metrics.series(&plugin.name, plugin.short_version()))
                })
                .clone();
            Step {
                plugin,
                config_json: u.config_json.clone(),
                on_error: use_.on_error,
                limits: u.limits,
                caps,
                series,
                reuse: (use_.instances == super::Instances::Reused).then(|| {
                    IdlePool::new(config.plugins.reuse, runtime.metrics.instances_idle.clone())
                }),
            }
        };
        let serving = |j: usize| {
            let (_, plugin, caps) = &ready[&(i, j)];
            (plugin.clone(), *caps)
        };
        let stable: Vec<Step> = (0..r.chain.len())
            .map(|j| {
                let (plugin, caps) = serving(j);
                step(j, plugin, caps)
            })
            .collect();
        // The chain as the canary cohort runs it: the candidate where the plugin has one.
        let candidate: Option<(Vec<Step>, &str)> = (0..r.chain.len())
            .find(|j| canary_ready.contains_key(&(i, *j)))
            .map(|with| {
                let steps = (0..r.chain.len())
                    .map(|j| {
                        let (plugin, caps) = canary_ready
                            .get(&(i, j))
                            .map_or_else(|| serving(j), |(p, c)| (p.clone(), *c));
                        step(j, plugin, caps)
                    })
                    .collect();
                (steps, r.chain[with].plugin.as_str())
            });
        let egress: Arc<[Arc<str>]> = r.egress.iter().map(|s| Arc::from(s.as_str())).collect();
        let new_chain = |steps| {
            Chain::new(
                r.id.as_str().into(),
                steps,
                egress.clone(),
                runtime.clone(),
                version_header.clone(),
            )
        };
        let mut chain = new_chain(stable);
        if let Some((steps, plugin)) = candidate {
            let c = &config.plugins.canary[plugin];
            chain.set_canary(super::chain::Canary::new(
                Arc::new(new_chain(steps)),
                plugin,
                c,
            ));
        }
        chains.push(Some(Arc::new(chain)));
    }
    compiler.retain(&catalog);
    Ok(Loaded {
        chains,
        catalog,
        issues,
        retry,
        stats: compiler.stats,
    })
}

/// One plugin name to load: its file, its uses, what served it before, and the version to
/// refuse if it is being rolled back (hash, why).
struct Target<'a> {
    file: &'a Path,
    uses: &'a [Use],
    prev: Option<&'a CatalogEntry>,
    rollback: Option<&'a (String, String)>,
}

/// Loads one plugin name for all its uses. Returns the resolution and whether its file was
/// (possibly) still being written.
async fn resolve(
    runtime: &Runtime,
    config: &Config,
    name: &str,
    target: Target<'_>,
    compiler: &mut Compiler,
    settle: Duration,
) -> (Resolution, bool) {
    let Target {
        file,
        uses,
        prev,
        rollback,
    } = target;
    let path = file.to_path_buf();
    let state = tokio::task::spawn_blocking(move || read_file(&path, settle))
        .await
        .unwrap_or_else(|e| FileState::Unreadable(format!("reading was interrupted: {e}")));
    let mut changing = false;
    let pin = config.plugins.pin(name);
    let candidate: Result<Arc<LoadedPlugin>, FileProblem> = match state {
        FileState::Read { sha256, .. } if rollback.is_some_and(|(sha, _)| *sha == sha256) => {
            let why = rollback.map(|(_, why)| why.clone()).unwrap_or_default();
            Err(FileProblem::new(ProblemKind::RolledBack, why, Some(sha256)))
        }
        FileState::Read { sha256, .. } if pin.as_ref().is_some_and(|p| *p != sha256) => {
            Err(FileProblem::new(
                ProblemKind::Rejected,
                format!(
                    "{} has SHA-256 {sha256}, not the one `plugins.sha256.{name}` pins ({})",
                    file.display(),
                    pin.as_deref().unwrap_or_default()
                ),
                Some(sha256),
            ))
        }
        FileState::Read {
            bytes,
            sha256,
            young,
        } => match prev {
            Some(p) if p.serving.sha256 == sha256 => Ok(p.serving.clone()),
            _ => match compile(runtime, compiler, name, file, bytes, &sha256).await {
                Ok(p) => Ok(p),
                Err(e) => {
                    changing = young;
                    Err(FileProblem::new(ProblemKind::Rejected, e, Some(sha256)))
                }
            },
        },
        other => {
            changing = matches!(other, FileState::Changing);
            Err(other.problem(file))
        }
    };
    let label = |u: &Use| use_label(config, name, u);
    // A pinned plugin keeps serving an earlier version only if that is the pinned build. A
    // rollback of the serving version falls back to the one it replaced.
    let prev_serving = prev
        .map(|p| match (rollback, &p.previous) {
            (Some((sha, _)), Some(old)) if p.serving.sha256 == *sha => old.plugin.clone(),
            _ => p.serving.clone(),
        })
        .filter(|p| pin.as_ref().is_none_or(|pin| *pin == p.sha256));
    let resolution = match candidate {
        Ok(plugin) => match init_all(runtime, &plugin, uses, &label).await {
            Ok(caps) => Resolution::Ready {
                plugin,
                caps,
                issue: None,
            },
            Err(problems) => match prev_serving.filter(|p| p.sha256 != plugin.sha256) {
                // The new version rejects a use's config: keep the serving one if it accepts.
                Some(old) => match init_all(runtime, &old, uses, &label).await {
                    Ok(caps) => Resolution::Ready {
                        plugin: old,
                        caps,
                        issue: Some(FileProblem::new(
                            ProblemKind::Rejected,
                            problems.join("; "),
                            Some(plugin.sha256.clone()),
                        )),
                    },
                    Err(_) => Resolution::Failed(problems),
                },
                None => Resolution::Failed(problems),
            },
        },
        Err(issue) => match prev_serving {
            Some(old) => match init_all(runtime, &old, uses, &label).await {
                Ok(caps) => Resolution::Ready {
                    plugin: old,
                    caps,
                    issue: Some(issue),
                },
                Err(problems) => Resolution::Failed(problems),
            },
            None => Resolution::Failed(vec![format!("plugin `{name}`: {}", issue.message)]),
        },
    };
    (resolution, changing)
}

/// Where a use is, for problems: `routes[i].chain[j] (route `id`, plugin `name`)`.
fn use_label(config: &Config, name: &str, u: &Use) -> String {
    format!(
        "routes[{}].chain[{}] (route `{}`, plugin `{name}`)",
        u.route, u.step, config.routes[u.route].id
    )
}

/// Loads the canary file of plugin `name` for all its uses: the entry for the catalog, and
/// each use's capabilities when it loaded. A candidate that fails any step (or is being rolled
/// back) serves nothing; the problem is recorded. `context` holds the uses, the canary entry of
/// the live catalog (its candidate is reused while the file is unchanged) and a rollback asked
/// for it.
async fn load_canary(
    runtime: &Runtime,
    config: &Config,
    name: &str,
    canary: &super::CanaryConfig,
    context: (&[Use], Option<&CanaryEntry>, Option<&(String, String)>),
    compiler: &mut Compiler,
    settle: Duration,
) -> (CanaryEntry, Option<Vec<types::Capabilities>>) {
    let (uses, prev, refused) = context;
    let file = config.plugins.dir.join(&canary.file);
    let path = file.clone();
    let state = tokio::task::spawn_blocking(move || read_file(&path, settle))
        .await
        .unwrap_or_else(|e| FileState::Unreadable(format!("reading was interrupted: {e}")));
    let refused = refused
        .cloned()
        .or_else(|| prev?.problem.as_ref()?.rolled_back());
    let candidate = match state {
        FileState::Read { sha256, .. } if refused.as_ref().is_some_and(|(s, _)| *s == sha256) => {
            let why = refused.map(|(_, why)| why).unwrap_or_default();
            Err(FileProblem::new(ProblemKind::RolledBack, why, Some(sha256)))
        }
        FileState::Read { bytes, sha256, .. } => {
            match prev
                .and_then(|p| p.plugin.as_ref())
                .filter(|p| p.sha256 == sha256)
            {
                Some(p) => Ok(p.clone()),
                None => compile(runtime, compiler, name, &file, bytes, &sha256)
                    .await
                    .map_err(|e| FileProblem::new(ProblemKind::Rejected, e, Some(sha256))),
            }
        }
        other => Err(other.problem(&file)),
    };
    let label = |u: &Use| use_label(config, name, u);
    let (plugin, caps, issue) = match candidate {
        Ok(plugin) => match init_all(runtime, &plugin, uses, &label).await {
            Ok(caps) => (Some(plugin), Some(caps), None),
            Err(problems) => {
                let sha = Some(plugin.sha256.clone());
                (
                    None,
                    None,
                    Some(FileProblem::new(
                        ProblemKind::Rejected,
                        problems.join("; "),
                        sha,
                    )),
                )
            }
        },
        Err(p) => (None, None, Some(p)),
    };
    // An unchanged problem keeps the time it was first seen.
    let issue = match (issue, prev.and_then(|p| p.problem.as_ref())) {
        (Some(p), Some(old)) if old.sha256 == p.sha256 && old.message == p.message => {
            Some(old.clone())
        }
        (p, _) => p,
    };
    (
        CanaryEntry {
            plugin,
            file,
            problem: issue,
        },
        caps,
    )
}

/// Initializes every use; all problems, or each use's capabilities.
async fn init_all(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    uses: &[Use],
    label: &(dyn Fn(&Use) -> String + Sync),
) -> Result<Vec<types::Capabilities>, Vec<String>> {
    let mut caps = Vec::with_capacity(uses.len());
    let mut problems = Vec::new();
    for u in uses {
        match init(runtime, plugin, u.config_json.clone(), u.limits).await {
            Ok(c) => caps.push(c),
            Err(e) => problems.push(format!("{}: {e}", label(u))),
        }
    }
    if problems.is_empty() {
        Ok(caps)
    } else {
        Err(problems)
    }
}

/// Checks and type-checks a component for `name`. Baseline code starts its tier-up.
async fn compile(
    runtime: &Runtime,
    compiler: &mut Compiler,
    name: &str,
    path: &Path,
    bytes: Arc<[u8]>,
    sha256: &str,
) -> Result<Arc<LoadedPlugin>, String> {
    let size = bytes.len() as u64;
    let (component, tier) = compiler
        .component(runtime, path, bytes.clone(), sha256)
        .await?;
    check_contract(&component)?;
    let linker = runtime.linker(tier);
    let plugin = Arc::new(LoadedPlugin {
        name: name.into(),
        sha256: sha256.to_owned(),
        size,
        code: arc_swap::ArcSwap::from_pointee(Code {
            pre: pre(linker, &component)?,
            tier,
        }),
        loaded_at: SystemTime::now(),
        last_failure: Mutex::new(None),
        calls: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    if tier == Tier::Baseline {
        compiler.tier_ups_due.push((plugin.clone(), bytes));
    }
    Ok(plugin)
}

/// Reads, checks and compiles one plugin file without any cache (the benchmark's `Hop`).
#[cfg(feature = "test-util")]
pub(crate) async fn load_file(
    runtime: &Runtime,
    dir: &Path,
    name: &str,
) -> Result<Arc<LoadedPlugin>, String> {
    let path = dir.join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    compile(
        runtime,
        &mut Compiler::default(),
        name,
        &path,
        bytes.into(),
        &sha256,
    )
    .await
}

/// Refuses a component built against an incompatible contract version, naming both versions.
fn check_contract(component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let found: Vec<String> = ty
        .exports(component.engine())
        .map(|(name, _)| name.to_owned())
        .filter(|n| n.starts_with(HOOKS_EXPORT))
        .collect();
    let (ours_major, ours_minor, _) = CONTRACT_VERSION;
    let ours = format!("{ours_major}.{ours_minor}.{}", CONTRACT_VERSION.2);
    let Some(export) = found.first() else {
        return Err(format!(
            "does not export `{HOOKS_EXPORT}`: not a bff-proxy plugin (build it with bff-plugin-sdk, contract {ours})"
        ));
    };
    let version = export
        .split_once('@')
        .map(|(_, v)| v)
        .ok_or_else(|| format!("exports `{export}` without a version"))?;
    let parsed: Vec<u64> = version
        .split('.')
        .map(|p| {
            p.split(['-', '+'])
                .next()
                .unwrap_or(p)
                .parse()
                .unwrap_or(u64::MAX)
        })
        .collect();
    let (major, minor) = (parsed.first().copied(), parsed.get(1).copied());
    let compatible = match (major, minor) {
        (Some(0), Some(m)) => ours_major == 0 && m == ours_minor,
        (Some(m), Some(_)) => m == ours_major,
        _ => false,
    };
    if !compatible {
        return Err(format!(
            "built against plugin contract bff:plugin@{version}, but this proxy implements bff:plugin@{ours}; rebuild it with a matching bff-plugin-sdk"
        ));
    }
    Ok(())
}

/// Calls `init` on a fresh instance with one use's config.
pub(crate) async fn init(
    runtime: &Runtime,
    plugin: &LoadedPlugin,
    config_json: Arc<str>,
    limits: PluginLimits,
) -> Result<types::Capabilities, String> {
    let (mut store, instance) = new_instance(
        runtime,
        plugin,
        &plugin.code(),
        config_json.clone(),
        limits,
        None,
        None,
    )
    .await;
    let instance = instance.map_err(|e| match instantiation_failure(&store, &e) {
        FailureKind::Unavailable(why) => format!("cannot be instantiated: {why}"),
        other => format!("its instantiation {other}"),
    })?;
    let hooks = instance.bff_plugin_hooks();
    let caps = super::chain::guarded!(store, limits, hooks.call_init(&mut store, &config_json))
        .map_err(|f| match f {
            FailureKind::Error {
                kind: types::ErrorKind::InvalidConfig,
                message,
            } => format!("config rejected by the plugin: {message}"),
            other => format!("init failed: {other}"),
        })?;
    effective(caps)
}

/// The capabilities the chain goes by: reading a phase's body implies handling that phase
/// (whatever toolchain built the plugin), and a plugin must handle at least one phase.
fn effective(mut caps: types::Capabilities) -> Result<types::Capabilities, String> {
    caps.handles_request |= caps.reads_request_body;
    caps.handles_response |= caps.reads_response_body;
    if !caps.handles_request && !caps.handles_response {
        return Err(
            "declares neither handles-request nor handles-response: it would never be called"
                .into(),
        );
    }
    Ok(caps)
}

/// The first line of `e`'s message (wasmtime appends backtraces on the next lines).
pub(crate) fn first_line(e: &wasmtime::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(flags: (bool, bool, bool, bool)) -> types::Capabilities {
        types::Capabilities {
            handles_request: flags.0,
            reads_request_body: flags.1,
            handles_response: flags.2,
            reads_response_body: flags.3,
        }
    }

    fn flags(c: types::Capabilities) -> (bool, bool, bool, bool) {
        (
            c.handles_request,
            c.reads_request_body,
            c.handles_response,
            c.reads_response_body,
        )
    }

    #[test]
    fn reading_a_body_implies_its_phase_and_some_phase_is_required() {
        let both = effective(caps((false, true, false, true))).expect("both phases");
        assert_eq!(flags(both), (true, true, true, true));
        let response = effective(caps((false, false, true, false))).expect("response only");
        assert_eq!(flags(response), (false, false, true, false));
        let none = effective(caps((false, false, false, false))).expect_err("never called");
        assert!(none.contains("never be called"), "{none}");
    }

    #[test]
    fn contract_version_matches_the_wit() {
        let wit = include_str!("../../../plugin-sdk/wit/plugin.wit");
        let (a, b, c) = CONTRACT_VERSION;
        assert!(wit.contains(&format!("package bff:plugin@{a}.{b}.{c};")));
    }
}
