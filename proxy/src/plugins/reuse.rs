//! The idle instances of a plugin use with `instances = "reused"`: where such a use's instance
//! comes from when a request's chain reaches it, and where it goes back when the request is
//! done with it.
//!
//! An instance serves one request at a time (both phases of it). It goes back only after a
//! request whose every call to it succeeded, with the request forgotten
//! ([`HostState::end_request`]); a failed, timed-out or cancelled call drops it with its store.
//! Instances are kept per plugin use (one step of one route), so they never serve another
//! client's route, and the pool belongs to the config snapshot: a reload starts with none, and
//! the old snapshot's idle instances go when its last request does.

use std::sync::Mutex;

use wasmtime::Store;

use super::bindings::Plugin as Instance;
use super::host::HostState;
use super::runtime::Tier;

/// An instance that served `uses` requests, made from `tier`'s code.
pub(crate) struct Reusable {
    pub(crate) store: Store<HostState>,
    pub(crate) instance: Instance,
    pub(crate) uses: u32,
    pub(crate) tier: Tier,
}

/// Idle instances of one plugin use, most recently used first out (its memory is likeliest to
/// be in cache).
pub(crate) struct IdlePool {
    idle: Mutex<Vec<Reusable>>,
    max_idle: usize,
    max_uses: u32,
    /// `bff_plugin_instances_idle`.
    gauge: prometheus::IntGauge,
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool")
            .field("idle", &self.lock().len())
            .field("max_idle", &self.max_idle)
            .field("max_uses", &self.max_uses)
            .finish()
    }
}

impl IdlePool {
    pub(crate) fn new(config: super::ReuseConfig, gauge: prometheus::IntGauge) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle: config.max_idle as usize,
            max_uses: config.max_uses,
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Reusable>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An idle instance made from `tier`'s code, if there is one. Instances of an older tier
    /// (baseline code, since replaced by optimized code) are dropped on the way.
    pub(crate) fn take(&self, tier: Tier) -> Option<Reusable> {
        let mut stale = Vec::new();
        let mut idle = self.lock();
        let found = loop {
            match idle.pop() {
                Some(r) if r.tier == tier => break Some(r),
                Some(old) => stale.push(old),
                None => break None,
            }
        };
        drop(idle);
        let taken = stale.len() + usize::from(found.is_some());
        self.gauge.sub(i64::try_from(taken).unwrap_or(0));
        // Outside the lock: dropping a store resets its memory.
        drop(stale);
        found
    }

    /// Ends `r`'s current request and keeps it for the next one, unless it may not serve again
    /// (see [`HostState::end_request`]), has served `max_uses` requests, or `max_idle`
    /// instances are idle already: then it is dropped (outside the lock: dropping resets its
    /// memory).
    pub(crate) fn put(&self, mut r: Reusable) {
        r.uses += 1;
        if !r.store.data_mut().end_request() || r.uses >= self.max_uses {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.max_idle {
            idle.push(r);
            drop(idle);
            self.gauge.inc();
        } else {
            drop(idle);
            drop(r);
        }
    }
}

impl Drop for IdlePool {
    fn drop(&mut self) {
        let idle = self.lock().len();
        self.gauge.sub(i64::try_from(idle).unwrap_or(0));
    }
}
