//! The wasmtime engines of the process and the `Linker` every plugin is type-checked against.
//!
//! Built once at startup (before any plugin loads) and kept across reloads: compiled plugins
//! belong to an engine, and the instance pools and the epoch ticker are process-wide.
//!
//! Two tiers (docs/dev/0003): the **optimized** engine (Cranelift) runs every plugin in the
//! steady state; with `plugins.tiered_compilation` a new plugin version is first compiled by
//! the **baseline** engine (Winch, a single-pass compiler, several times faster to compile)
//! so it serves within milliseconds of its file settling, while Cranelift compiles it in the
//! background (`tier_up`); the optimized code then replaces the baseline code in place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig,
    Strategy,
};

use super::bindings;
use super::cache::DiskCache;
use super::host::HostState;
use super::load::LoadedPlugin;
use super::{MEMORIES_PER_INSTANCE, PluginsConfig};

/// How often the epoch advances. A running plugin is checked (and yields to other requests)
/// once per tick, so this is the granularity of CPU budgets and of fairness between requests.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(2);

/// Nice value of the threads that compile plugins (`0` is normal, `19` the lowest priority):
/// a reload compiles on the cores that serve traffic, and must yield to it.
const COMPILE_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`COMPILE_NICE`] (Linux: per thread). Best
/// effort: where it cannot be changed, compilation runs at normal priority.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, COMPILE_NICE) {
        tracing::debug!(error = %e, "cannot lower the compile thread's priority");
    }
}

/// Compiling runs on rayon's global pool (wasmtime's parallel compilation): start it with
/// low-priority threads before wasmtime first uses it. Once per process.
fn low_priority_compile_pool() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let built = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("bff-compile-{i}"))
            .start_handler(|_| lower_priority())
            .build_global();
        if let Err(e) = built {
            tracing::debug!(error = %e, "the compile pool was already started");
        }
    });
}

/// Why the plugin runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the plugin runtime")]
pub struct RuntimeError(#[source] wasmtime::Error);

/// Which compiler produced a plugin's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    /// Winch: compiled fast, runs slower; replaced by [`Tier::Optimized`] once that is ready.
    Baseline,
    /// Cranelift: the steady state.
    Optimized,
}

impl Tier {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Optimized => "optimized",
        }
    }
}

/// The plugin engines, their linkers and the epoch ticker.
pub struct Runtime {
    /// The optimized tier's engine: the one the compile cache, contract checks and every
    /// plugin in the steady state use.
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    /// The baseline tier, when `plugins.tiered_compilation` is on (x86-64 only).
    pub(crate) baseline: Option<(Engine, Linker<HostState>)>,
    /// Background Cranelift compiles of plugins that serve on baseline code, by file hash.
    pub(crate) tier_ups: Arc<TierUps>,
    /// The tier-up worker's queue (with a baseline tier only).
    tier_up_queue: Option<mpsc::Sender<Job>>,
    pub(crate) config: PluginsConfig,
    /// Plugin metrics: every loaded version gets its series from here, and every store's
    /// [`HostState`] raises and lowers `instances_active`.
    pub(crate) metrics: crate::metrics::PluginFamilies,
    ticker: Arc<AtomicBool>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates the engine (sized from `[plugins]`) and starts the epoch ticker thread.
    pub(crate) fn new(
        config: &PluginsConfig,
        metrics: &crate::metrics::PluginFamilies,
    ) -> Result<Self, RuntimeError> {
        low_priority_compile_pool();
        let (engine, linker) = engine_and_linker(config, Tier::Optimized)?;
        let baseline = if config.tiered() {
            Some(engine_and_linker(config, Tier::Baseline)?)
        } else {
            None
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engines: Vec<Engine> = std::iter::once(engine.clone())
            .chain(baseline.iter().map(|(e, _)| e.clone()))
            .collect();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("bff-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for e in &ticker_engines {
                        e.increment_epoch();
                    }
                }
            })
            .map_err(|e| RuntimeError(wasmtime::Error::from(e)))?;
        metrics.instances_max.set(i64::from(config.max_instances));
        let tier_ups = Arc::<TierUps>::default();
        let tier_up_queue = match &baseline {
            Some(_) => Some(start_tier_up_worker(
                engine.clone(),
                linker.clone(),
                tier_ups.clone(),
                metrics
                    .compile
                    .with_label_values(&[Tier::Optimized.as_str()]),
            )?),
            None => None,
        };
        Ok(Self {
            engine,
            linker,
            baseline,
            tier_ups,
            tier_up_queue,
            config: config.clone(),
            metrics: metrics.clone(),
            ticker: stop,
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.store(true, Ordering::Relaxed);
    }
}

/// One tier's engine and its linker: the host imports and a deny-by-default WASI p2.
fn engine_and_linker(
    config: &PluginsConfig,
    tier: Tier,
) -> Result<(Engine, Linker<HostState>), RuntimeError> {
    let engine = Engine::new(&engine_config(config, tier)).map_err(RuntimeError)?;
    let mut linker = Linker::new(&engine);
    // Deny-by-default WASI p2: components built by other languages' toolchains import it;
    // what each import can reach is decided by the `WasiCtx` in `HostState::new`.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError)?;
    bindings::Plugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)
        .map_err(RuntimeError)?;
    Ok((engine, linker))
}

/// Epoch interruption and a pooling allocator: instances come from pre-reserved slots with
/// copy-on-write memory images, so a fresh instance per request is cheap. The optimized tier
/// compiles with Cranelift, the baseline tier with Winch; each tier has its own pool (address
/// space is reserved twice, memory is only touched by the instances that run).
fn engine_config(plugins: &PluginsConfig, tier: Tier) -> Config {
    let n = plugins.max_instances;
    let memory = usize::try_from(plugins.instance_memory_bytes).unwrap_or(usize::MAX);
    let mut pool = PoolingAllocationConfig::new();
    // Components built from Rust or other toolchains carry a few small helper core modules
    // (shims for the canonical ABI) next to the main one, hence several per component.
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(8))
        .max_core_instances_per_component(16)
        .total_memories(n.saturating_mul(MEMORIES_PER_INSTANCE))
        .max_memories_per_component(MEMORIES_PER_INSTANCE)
        .total_tables(n.saturating_mul(4))
        .max_tables_per_component(8)
        .total_stacks(n)
        .max_memory_size(memory)
        // Keep the first 512 KiB of each slot resident (zeroed by memset on reuse) so a fresh
        // instance's stack and first heap pages do not fault back in; measured with
        // `cargo bench --bench plugins -- --only hop`: 64 KiB and 1 MiB were both slower.
        .linear_memory_keep_resident(512 * 1024)
        .table_keep_resident(64 * 1024)
        // Where the kernel can say which pages an instance dirtied (Linux 6.7+), reset only
        // those: a plugin built with a 1 MiB stack no longer pays for resetting all it could
        // have touched (`--only hop` with such a plugin: ~52 → ~19 µs per fresh instance).
        .pagemap_scan(Enabled::Auto);

    let mut config = Config::new();
    match tier {
        Tier::Optimized => config.cranelift_opt_level(OptLevel::Speed),
        Tier::Baseline => config.strategy(Strategy::Winch),
    };
    let (reservation, guard) = plugins.memory_slot(tier);
    config
        .epoch_interruption(true)
        .memory_init_cow(true)
        .memory_reservation(reservation)
        .memory_guard_size(guard)
        .memory_reservation_for_growth(0)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// Plugins serving on baseline code, each waiting for its optimized compile; and compiles
/// done but not yet taken by the [`Compiler`](super::load::Compiler)'s memory cache.
#[derive(Debug, Default)]
pub(crate) struct TierUps {
    jobs: Mutex<HashMap<String, TierUp>>,
}

#[derive(Debug)]
enum TierUp {
    /// Queued or compiling; these plugins (of that file hash) get the code when it is ready.
    Running(Vec<Weak<LoadedPlugin>>),
    /// Compiled.
    Done(Component),
}

/// One optimized compile for the tier-up worker.
struct Job {
    sha256: String,
    name: Arc<str>,
    bytes: Arc<[u8]>,
    disk: Option<DiskCache>,
}

impl TierUps {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TierUp>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The optimized component of `sha256`, if its background compile is done.
    pub(crate) fn done(&self, sha256: &str) -> Option<Component> {
        match self.lock().get(sha256) {
            Some(TierUp::Done(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// Forgets finished compiles of files not in `keep` (queued ones finish and upgrade
    /// their plugins first).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock()
            .retain(|sha, t| matches!(t, TierUp::Running(_)) || keep(sha));
    }
}

/// Starts the thread that compiles queued tier-ups one at a time, at low priority. It ends
/// when the runtime (the queue's sender) is dropped.
fn start_tier_up_worker(
    engine: Engine,
    linker: Linker<HostState>,
    tier_ups: Arc<TierUps>,
    compile_time: prometheus::Histogram,
) -> Result<mpsc::Sender<Job>, RuntimeError> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("bff-tier-up".into())
        .spawn(move || {
            lower_priority();
            while let Ok(job) = rx.recv() {
                tier_up(&engine, &linker, &tier_ups, &compile_time, job);
            }
        })
        .map_err(|e| RuntimeError(wasmtime::Error::from(e)))?;
    Ok(tx)
}

/// Compiles one job with Cranelift, stores it in the compile cache, and swaps the code into
/// the plugins waiting for it. A version replaced before its turn (no plugin of that file left
/// alive, as in a burst of deploys) is skipped.
fn tier_up(
    engine: &Engine,
    linker: &Linker<HostState>,
    tier_ups: &TierUps,
    compile_time: &prometheus::Histogram,
    job: Job,
) {
    let alive = match tier_ups.lock().get(&job.sha256) {
        Some(TierUp::Running(w)) => w.iter().any(|p| p.strong_count() > 0),
        _ => false,
    };
    if !alive {
        tier_ups.lock().remove(&job.sha256);
        return;
    }
    let started = Instant::now();
    let compiled = super::cache::compile(engine, &job.bytes, &job.sha256, job.disk.as_ref());
    compile_time.observe(started.elapsed().as_secs_f64());
    let version = &job.sha256[..12];
    let mut jobs = tier_ups.lock();
    let waiting = match jobs.remove(&job.sha256) {
        Some(TierUp::Running(w)) => w,
        _ => Vec::new(),
    };
    match compiled {
        Ok(c) => {
            jobs.insert(job.sha256.clone(), TierUp::Done(c.clone()));
            drop(jobs);
            let upgraded = upgrade(linker, &c, &waiting);
            tracing::info!(
                plugin = %job.name,
                version,
                compile_ms = started.elapsed().as_secs_f64() * 1000.0,
                upgraded,
                "plugin moved to optimized code"
            );
        }
        Err(e) => {
            drop(jobs);
            tracing::warn!(
                plugin = %job.name,
                version,
                error = %e,
                "optimized compile failed; the plugin keeps its baseline code"
            );
        }
    }
}

impl Runtime {
    /// The linker of `tier` (the optimized one if there is no baseline tier).
    pub(crate) fn linker(&self, tier: Tier) -> &Linker<HostState> {
        match (tier, &self.baseline) {
            (Tier::Baseline, Some((_, l))) => l,
            _ => &self.linker,
        }
    }

    /// Moves `plugin` (serving baseline code) to optimized code: queues a Cranelift compile of
    /// `bytes` (once per file hash, however many plugins wait on it) for the tier-up worker,
    /// which stores it in the compile cache and swaps the new code into every waiting plugin
    /// still alive. Requests already running keep the instance they have.
    pub(crate) fn tier_up(
        &self,
        plugin: &Arc<LoadedPlugin>,
        bytes: Arc<[u8]>,
        disk: Option<DiskCache>,
    ) {
        let Some(queue) = &self.tier_up_queue else {
            return;
        };
        let sha256 = plugin.sha256.clone();
        let mut jobs = self.tier_ups.lock();
        match jobs.get_mut(&sha256) {
            Some(TierUp::Running(waiting)) => waiting.push(Arc::downgrade(plugin)),
            Some(TierUp::Done(c)) => {
                let c = c.clone();
                drop(jobs);
                upgrade(&self.linker, &c, &[Arc::downgrade(plugin)]);
            }
            None => {
                jobs.insert(
                    sha256.clone(),
                    TierUp::Running(vec![Arc::downgrade(plugin)]),
                );
                drop(jobs);
                let job = Job {
                    sha256,
                    name: plugin.name.clone(),
                    bytes,
                    disk,
                };
                if queue.send(job).is_err() {
                    self.tier_ups.lock().remove(&plugin.sha256);
                    tracing::warn!(
                        "the tier-up worker is gone; the plugin keeps its baseline code"
                    );
                }
            }
        }
    }
}

/// Swaps optimized code built from `component` into each plugin of `waiting` still alive;
/// returns how many.
fn upgrade(
    linker: &Linker<HostState>,
    component: &Component,
    waiting: &[Weak<LoadedPlugin>],
) -> usize {
    let alive: Vec<Arc<LoadedPlugin>> = waiting.iter().filter_map(Weak::upgrade).collect();
    if alive.is_empty() {
        return 0;
    }
    match super::load::pre(linker, component) {
        Ok(pre) => {
            for p in &alive {
                p.set_code(pre.clone(), Tier::Optimized);
            }
            alive.len()
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "optimized code does not fit the host; the plugin keeps its baseline code"
            );
            0
        }
    }
}
