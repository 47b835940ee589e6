//! The one wasmtime `Engine` of the process and the `Linker` every plugin is type-checked against.
//!
//! Built once at startup (before any plugin loads) and kept across reloads: compiled plugins
//! belong to an engine, and the instance pool and the epoch ticker are process-wide.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use super::PluginsConfig;
use super::bindings;
use super::host::HostState;

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

/// The plugin engine, its linker and the epoch ticker.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
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
        let engine = Engine::new(&engine_config(config)).map_err(RuntimeError)?;
        let mut linker = Linker::new(&engine);
        // Deny-by-default WASI p2: components built by other languages' toolchains import it;
        // what each import can reach is decided by the `WasiCtx` in `HostState::new`.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError)?;
        bindings::Plugin::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(RuntimeError)?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        std::thread::Builder::new()
            .name("bff-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| RuntimeError(wasmtime::Error::from(e)))?;
        metrics.instances_max.set(i64::from(config.max_instances));
        Ok(Self {
            engine,
            linker,
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

/// Cranelift, epoch interruption, and a pooling allocator: instances come from pre-reserved
/// slots with copy-on-write memory images, so a fresh instance per request is cheap.
fn engine_config(plugins: &PluginsConfig) -> Config {
    let n = plugins.max_instances;
    let memory = usize::try_from(plugins.instance_memory_bytes).unwrap_or(usize::MAX);
    let mut pool = PoolingAllocationConfig::new();
    // Components built from Rust or other toolchains carry a few small helper core modules
    // (shims for the canonical ABI) next to the main one, hence several per component.
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(8))
        .max_core_instances_per_component(16)
        .total_memories(n.saturating_mul(2))
        .max_memories_per_component(2)
        .total_tables(n.saturating_mul(4))
        .max_tables_per_component(8)
        .total_stacks(n)
        .max_memory_size(memory)
        // Keep the first 256 KiB of each slot resident (zeroed by memset on reuse) so a fresh
        // instance's stack and first heap pages do not fault back in; measured with
        // `cargo bench --bench plugins -- --only hop`: 64 KiB and 1 MiB were both slower.
        .linear_memory_keep_resident(512 * 1024)
        .table_keep_resident(64 * 1024);

    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .cranelift_opt_level(OptLevel::Speed)
        .memory_init_cow(true)
        // Reserve only what the cap allows, not wasmtime's default 4 GiB per memory: keeps the
        // pool's address space proportional to `max_instances * instance_memory_bytes`.
        // (4 GiB reservations would let Cranelift drop bounds checks: ~13% faster on a 20 KB
        // reshape, no change at 1 KB, for ~4 TiB of address space per 1000 instances.)
        .memory_reservation(plugins.instance_memory_bytes)
        .memory_guard_size(64 * 1024)
        .memory_reservation_for_growth(0)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}
