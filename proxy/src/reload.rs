//! Hot reload: builds a complete new [`Snapshot`] off the request path, validates it, and swaps
//! it in; requests in flight finish on the snapshot they started with.
//!
//! Every trigger (the first load at startup, a file change seen by `watch`, `SIGHUP`,
//! `POST /admin/reload`) runs [`Reloader::reload`], one at a time:
//!
//! 1. read the config file again (if the proxy was started from one) and validate all of it;
//!    an invalid config is rejected as a whole;
//! 2. load the plugins the routes use (`plugins::load_chains`): unchanged files are reused by
//!    content hash, new ones compiled on a blocking thread (or taken from the compile cache), and
//!    a plugin whose new file is refused keeps its serving version, the problem recorded;
//! 3. build the snapshot (upstream pools are reused when `services` did not change) and swap it.
//!
//! Settings bound at startup (`listen`, `admin`, `server`, `access_log.output`, and the plugin
//! runtime's pool, compilers and compile cache: `PluginsConfig::restart_only_changes`) need a
//! restart; a reload that changes them applies the rest and says so in its warnings. Each
//! reload is kept in a bounded history (`GET /admin/reloads`) and counted in the metrics.
//!
//! Rollbacks are reloads too ([`Reloader::roll_back`]): told to refuse a plugin's serving
//! version, the load serves the version it replaced again. [`watch_plugin_health`] asks for one
//! when a new version fails far more than the one it replaced (`plugins.rollback`); the admin
//! API asks for one on request.

mod health;
mod watch;

pub(crate) use health::watch_plugin_health;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigPath, Problems, check_duration, check_range};
use crate::metrics::Metrics;
use crate::plugins::{
    Catalog, CompileStats, Compiler, LoadError, LoadIssue, ProblemKind, Rollbacks, Runtime,
    load_chains,
};
use crate::server::StartError;
use crate::state::{Shared, Snapshot};

pub(crate) use self::watch::watch;

/// `[reload]`: how file changes become reloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Watch the config file and the plugin directory and reload when they change.
    pub watch: bool,
    /// Quiet time after the last file event before reloading: a burst of writes (a copy, an
    /// editor's save, a Kubernetes volume update) becomes one reload.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// Reloads kept for `GET /admin/reloads`.
    pub history: usize,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: Duration::from_millis(50),
            history: 50,
        }
    }
}

impl ReloadConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        check_duration(
            self.debounce,
            Duration::from_millis(1)..=Duration::from_secs(60),
            &at.key("debounce"),
            problems,
        );
        check_range(self.history, 1..=10_000, &at.key("history"), problems);
    }
}

/// The shortest time a plugin file that fails to load is given to settle before its failure
/// is reported.
const SETTLE_MIN: Duration = Duration::from_secs(1);

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Trigger {
    Startup,
    Watch,
    Signal,
    Admin,
    /// A plugin version rolled back (by the health watch or the admin API).
    Rollback,
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// A new snapshot serves.
    Applied,
    /// Nothing changed; the snapshot was kept.
    Unchanged,
    /// The new config or a plugin without a serving version was invalid; nothing changed.
    Rejected,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
        }
    }
}

/// A plugin whose serving version a reload changed.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PluginChange {
    pub(crate) plugin: String,
    /// The change is to the plugin's canary (`plugins.canary`), not its serving version.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) canary: bool,
    /// The version that served before (`null`: newly loaded).
    pub(crate) from: Option<String>,
    /// The version serving now (`null`: unloaded).
    pub(crate) to: Option<String>,
}

/// One reload, as `GET /admin/reloads` and `POST /admin/reload` show it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReloadRecord {
    pub(crate) id: u64,
    pub(crate) trigger: Trigger,
    pub(crate) outcome: Outcome,
    /// RFC 3339.
    pub(crate) started_at: String,
    pub(crate) duration_ms: f64,
    pub(crate) config_changed: bool,
    pub(crate) plugins: Vec<PluginChange>,
    /// Where the plugin components came from: compiled, on-disk cache, memory.
    pub(crate) compile: CompileStats,
    /// Why it was rejected.
    pub(crate) errors: Vec<String>,
    /// Applied, but: plugin files refused (serving versions kept), settings needing a restart.
    pub(crate) warnings: Vec<String>,
    /// A plugin file was still being written; the watcher loads again once it settles.
    #[serde(skip)]
    pub(crate) retry: bool,
}

/// The reloader's own state, guarded so that reloads run one at a time.
#[derive(Debug)]
struct State {
    /// Created by the first load whose config uses plugins, then kept (compiled plugins
    /// belong to its engine).
    runtime: Option<(Arc<Runtime>, Compiler)>,
}

/// A snapshot built and validated, ready to swap in.
struct Built {
    snapshot: Snapshot,
    issues: Vec<LoadIssue>,
    warnings: Vec<String>,
    retry: bool,
    compile: CompileStats,
}

/// Builds a snapshot from `config`. `current` is the live snapshot (none at startup): its
/// plugins are kept when their new files are refused, and its upstream pools are reused when
/// `services` did not change.
async fn build(
    state: &mut State,
    mut config: Config,
    current: Option<&Snapshot>,
    rollbacks: &Rollbacks,
    metrics: &Metrics,
) -> Result<Built, LoadError> {
    let mut warnings = Vec::new();
    if let Some(cur) = current {
        let old = &cur.config;
        for (changed, what) in [
            (old.listen != config.listen, "listen"),
            (old.admin != config.admin, "admin"),
            (old.server != config.server, "server"),
            (
                old.access_log.output != config.access_log.output,
                "access_log.output",
            ),
            (old.tracing != config.tracing, "tracing"),
        ] {
            if changed {
                warnings.push(format!("`{what}` changed: it takes effect after a restart"));
            }
        }
        // The listener speaks TLS or cleartext from startup on; a reload that adds or removes
        // `[tls]` keeps what serves (a certificate change within `[tls]` applies).
        if old.tls.is_some() != config.tls.is_some() {
            warnings.push(
                "`tls` added or removed: it takes effect after a restart (the listener keeps \
                 serving as it started)"
                    .into(),
            );
            config.tls.clone_from(&old.tls);
        }
    }
    let empty = Catalog::default();
    let previous = current.map_or(&empty, |c| &c.catalog);
    let loaded = if config.uses_plugins() {
        if state.runtime.is_none() {
            let runtime = Arc::new(Runtime::new(&config.plugins, &metrics.plugins).map_err(
                |e| LoadError {
                    problems: vec![crate::ErrorChain(&e).to_string()],
                    retry: false,
                },
            )?);
            let compiler = Compiler::new(&runtime, config.plugins.cache_dir().as_deref());
            state.runtime = Some((runtime, compiler));
        }
        let (runtime, compiler) = state.runtime.as_mut().expect("just created");
        let pool = &runtime.config;
        for what in pool.restart_only_changes(&config.plugins) {
            warnings.push(format!("`{what}` changed: it takes effect after a restart"));
        }
        let mut problems = Vec::new();
        for (i, r) in config.routes.iter().enumerate() {
            for (j, step) in r.chain.iter().enumerate() {
                let limit = config.plugins.limits.with(&step.limits).max_memory_bytes;
                if limit > pool.instance_memory_bytes {
                    problems.push(format!(
                        "routes[{i}].chain[{j}]: max_memory_bytes {limit} is above the running instance pool's {} (restart to raise it)",
                        pool.instance_memory_bytes
                    ));
                }
            }
        }
        // The config's own check used its `max_instances`; the running pool's may be smaller.
        let reused = config
            .routes
            .iter()
            .flat_map(|r| &r.chain)
            .filter(|s| s.instances == crate::plugins::Instances::Reused)
            .count();
        if pool.max_instances < config.plugins.max_instances
            && let Some(why) = config.plugins.idle_overcommit(reused, pool.max_instances)
        {
            problems.push(format!(
                "{why} (the running pool's size; restart to raise it)"
            ));
        }
        if !problems.is_empty() {
            return Err(LoadError {
                problems,
                retry: false,
            });
        }
        // A file that does not load while younger than this may still be being written: it
        // is retried, not reported (a genuinely bad file is reported once it is this old).
        let settle = (config.reload.debounce * 4).max(SETTLE_MIN);
        Some(load_chains(runtime, &config, previous, rollbacks, compiler, settle).await?)
    } else {
        None
    };
    let (chains, catalog, issues, retry, compile) = match loaded {
        Some(l) => (l.chains, l.catalog, l.issues, l.retry, l.stats),
        None => (
            Vec::new(),
            Catalog::default(),
            Vec::new(),
            false,
            CompileStats::default(),
        ),
    };
    for issue in &issues {
        let serving = catalog.entries[&issue.plugin].serving.short_version();
        warnings.push(if issue.canary {
            format!(
                "plugin `{}` canary: {} (version {serving} serves every request)",
                issue.plugin, issue.problem.message
            )
        } else {
            format!(
                "plugin `{}`: {} (version {serving} keeps serving)",
                issue.plugin, issue.problem.message
            )
        });
    }
    Ok(Built {
        snapshot: Snapshot::assemble(config, chains, catalog, current, metrics),
        issues,
        warnings,
        retry,
        compile,
    })
}

/// Runs reloads and remembers them.
#[derive(Debug)]
pub(crate) struct Reloader {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    state: tokio::sync::Mutex<State>,
    history: Mutex<VecDeque<ReloadRecord>>,
    next_id: AtomicU64,
    /// When the first load started: files changed after that may not be in the snapshot.
    first_load_at: SystemTime,
    /// Rollbacks asked for, applied by the next reload.
    rollbacks: Mutex<Rollbacks>,
}

/// Why a rollback could not be done.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RollbackError {
    #[error("no plugin `{0}` is loaded")]
    UnknownPlugin(String),
    #[error(
        "plugin `{0}` has no previous version to roll back to (none replaced within `plugins.rollback.window`)"
    )]
    NoPrevious(String),
    #[error("plugin `{0}` has no canary serving")]
    NoCanary(String),
    #[error("the rollback reload did not apply: {}", .0.errors.join("; "))]
    NotApplied(Box<ReloadRecord>),
}

/// Who asked for a rollback (the `trigger` label of `bff_plugin_rollbacks_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RollbackBy {
    /// The health watch (`plugins.rollback.automatic`).
    Automatic,
    /// `POST /admin/plugins/rollback`.
    Admin,
}

impl RollbackBy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Automatic => "automatic",
            Self::Admin => "admin",
        }
    }
}

/// The first load, before anything is bound: the same path as every reload, but a failure
/// fails startup. Returns the snapshot and what the reloader keeps.
pub(crate) async fn first_load(
    config: &Config,
    metrics: &Metrics,
) -> Result<(Snapshot, FirstLoad), StartError> {
    let started = Instant::now();
    let at = SystemTime::now();
    let mut state = State { runtime: None };
    let built = match build(&mut state, config.clone(), None, &Rollbacks::new(), metrics).await {
        Ok(b) => b,
        Err(e) => {
            metrics.reloads.total.with_label_values(&["rejected"]).inc();
            return Err(StartError::Plugins(e));
        }
    };
    let record = ReloadRecord {
        id: 1,
        trigger: Trigger::Startup,
        outcome: Outcome::Applied,
        started_at: rfc3339(at),
        duration_ms: ms(started.elapsed()),
        config_changed: true,
        plugins: changes(&Catalog::default(), &built.snapshot.catalog),
        compile: built.compile,
        errors: Vec::new(),
        warnings: built.warnings,
        retry: false,
    };
    observe(metrics, &record, &built.snapshot);
    Ok((
        built.snapshot,
        FirstLoad {
            state,
            record,
            started: at,
        },
    ))
}

/// What [`first_load`] hands the [`Reloader`].
#[derive(Debug)]
pub(crate) struct FirstLoad {
    state: State,
    record: ReloadRecord,
    started: SystemTime,
}

impl Reloader {
    pub(crate) fn new(shared: Arc<Shared>, metrics: Arc<Metrics>, first: FirstLoad) -> Self {
        let mut history = VecDeque::new();
        history.push_back(first.record);
        Self {
            shared,
            metrics,
            state: tokio::sync::Mutex::new(first.state),
            history: Mutex::new(history),
            next_id: AtomicU64::new(2),
            first_load_at: first.started,
            rollbacks: Mutex::new(Rollbacks::new()),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn first_load_at(&self) -> SystemTime {
        self.first_load_at
    }

    /// Rolls `plugin` back: its serving version to the version that one replaced, or (with
    /// `canary`) its canary off so the serving version takes every request. A reload told to
    /// refuse that version's file; the catalog and the log say why.
    pub(crate) async fn roll_back(
        &self,
        plugin: &str,
        canary: bool,
        reason: String,
        by: RollbackBy,
    ) -> Result<ReloadRecord, RollbackError> {
        let live = self.shared.live.load_full();
        let entry = live
            .catalog
            .entries
            .get(plugin)
            .ok_or_else(|| RollbackError::UnknownPlugin(plugin.to_owned()))?;
        let (refused, to) = if canary {
            let candidate = entry
                .canary
                .as_ref()
                .and_then(|c| c.plugin.as_ref())
                .ok_or_else(|| RollbackError::NoCanary(plugin.to_owned()))?;
            (candidate.clone(), entry.serving.clone())
        } else {
            let previous = entry
                .previous
                .as_ref()
                .ok_or_else(|| RollbackError::NoPrevious(plugin.to_owned()))?;
            (entry.serving.clone(), previous.plugin.clone())
        };
        let (from, to) = (
            refused.short_version().to_owned(),
            to.short_version().to_owned(),
        );
        lock(&self.rollbacks).insert(
            (plugin.to_owned(), canary),
            (refused.sha256.clone(), reason.clone()),
        );
        drop(live);
        let record = self.reload(Trigger::Rollback).await;
        let applied = self
            .shared
            .live
            .load()
            .catalog
            .entries
            .get(plugin)
            .is_some_and(|e| match &e.canary {
                _ if !canary => e.serving.short_version() == to,
                Some(c) => c.plugin.is_none(),
                None => true,
            });
        let slot = if canary { "canary" } else { "serving" };
        if !applied {
            tracing::error!(plugin, slot, from, to, errors = %record.errors.join("; "), "plugin rollback failed; the serving version is kept");
            return Err(RollbackError::NotApplied(Box::new(record)));
        }
        self.metrics
            .reloads
            .rollbacks
            .with_label_values(&[plugin, slot, by.as_str()])
            .inc();
        tracing::warn!(plugin, slot, from, to, by = by.as_str(), reason = %reason, "plugin version rolled back");
        Ok(record)
    }

    /// Recent reloads, oldest first.
    pub(crate) fn history(&self) -> Vec<ReloadRecord> {
        lock(&self.history).iter().cloned().collect()
    }

    /// Reloads config and plugins and swaps in the result if it is valid. Never fails: the
    /// outcome and every problem are in the returned record (and the history, log, metrics).
    pub(crate) async fn reload(&self, trigger: Trigger) -> ReloadRecord {
        let mut state = self.state.lock().await;
        let started = Instant::now();
        let at = SystemTime::now();
        let current = self.shared.live.load_full();
        let config = match &current.config.source {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || Config::load(&path))
                    .await
                    .map_err(|e| vec![format!("reading the config was interrupted: {e}")])
                    .and_then(|r| r.map_err(|e| config_errors(&e)))
            }
            None => Ok((*current.config).clone()),
        };
        let rollbacks = std::mem::take(&mut *lock(&self.rollbacks));
        let built = match config {
            Ok(config) => build(
                &mut state,
                config,
                Some(&current),
                &rollbacks,
                &self.metrics,
            )
            .await
            .map_err(|e| (e.problems, e.retry)),
            Err(errors) => Err((errors, false)),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut record = ReloadRecord {
            id,
            trigger,
            outcome: Outcome::Rejected,
            started_at: rfc3339(at),
            duration_ms: 0.0,
            config_changed: false,
            plugins: Vec::new(),
            compile: CompileStats::default(),
            errors: Vec::new(),
            warnings: Vec::new(),
            retry: false,
        };
        match built {
            Ok(built) => {
                for issue in built
                    .issues
                    .iter()
                    .filter(|i| i.new && i.problem.kind != ProblemKind::RolledBack)
                {
                    let file = built.snapshot.catalog.entries.get(&issue.plugin).map(|e| {
                        match (&e.canary, issue.canary) {
                            (Some(c), true) => c.file.display().to_string(),
                            _ => e.file.display().to_string(),
                        }
                    });
                    tracing::error!(
                        plugin = %issue.plugin,
                        canary = issue.canary,
                        file = file.as_deref().unwrap_or_default(),
                        problem = issue.problem.kind.as_str(),
                        reason = %issue.problem.message,
                        "plugin file refused; the serving version is kept"
                    );
                    self.metrics
                        .reloads
                        .plugin_load_errors
                        .with_label_values(&[&*issue.plugin])
                        .inc();
                }
                record.config_changed = built.snapshot.config != current.config;
                record.plugins = changes(&current.catalog, &built.snapshot.catalog);
                record.warnings = built.warnings;
                record.retry = built.retry;
                record.compile = built.compile;
                let same = !record.config_changed
                    && record.plugins.is_empty()
                    && built.snapshot.catalog.same_problems(&current.catalog);
                if same {
                    record.outcome = Outcome::Unchanged;
                } else {
                    record.outcome = Outcome::Applied;
                    self.shared.live.store(Arc::new(built.snapshot));
                    // Versions no longer served (as serving version or canary) stop being
                    // exported.
                    let live = self.shared.live.load();
                    let still_used = |plugin: &str, version: &str| {
                        live.catalog.entries.get(plugin).is_some_and(|e| {
                            e.serving.short_version() == version
                                || e.canary
                                    .as_ref()
                                    .and_then(|c| c.plugin.as_ref())
                                    .is_some_and(|p| p.short_version() == version)
                        })
                    };
                    for c in &record.plugins {
                        if let Some(old) = &c.from
                            && !still_used(&c.plugin, old)
                        {
                            self.metrics.plugins.forget(&c.plugin, old);
                        }
                    }
                }
            }
            Err((errors, retry)) => {
                record.errors = errors;
                record.retry = retry;
            }
        }
        record.duration_ms = ms(started.elapsed());
        drop(state);
        // A reload (`SIGHUP` from logrotate, typically) also reopens an access log file.
        self.shared.access_log.reopen();
        self.log(&record);
        observe(&self.metrics, &record, &self.shared.live.load());
        // A deferred attempt (a file still being written, nothing swapped) is not history yet,
        // and a file event that changed nothing (a `touch`, the startup catch-up) is noise.
        if (record.retry && record.outcome != Outcome::Applied)
            || (trigger == Trigger::Watch && record.outcome == Outcome::Unchanged)
        {
            return record;
        }
        let mut history = lock(&self.history);
        let keep = self.shared.live.load().config.reload.history;
        history.push_back(record.clone());
        while history.len() > keep {
            history.pop_front();
        }
        record
    }

    fn log(&self, r: &ReloadRecord) {
        match r.outcome {
            Outcome::Applied => tracing::info!(
                trigger = ?r.trigger,
                duration_ms = r.duration_ms,
                config_changed = r.config_changed,
                plugins = %r.plugins.iter().map(|p| format!("{}{}:{}", p.plugin, if p.canary { "(canary)" } else { "" }, p.to.as_deref().unwrap_or("unloaded"))).collect::<Vec<_>>().join(","),
                warnings = r.warnings.len(),
                "reload applied"
            ),
            Outcome::Unchanged => {
                tracing::debug!(trigger = ?r.trigger, "reload found nothing to change")
            }
            Outcome::Rejected if r.retry => tracing::debug!(
                trigger = ?r.trigger,
                errors = %r.errors.join("; "),
                "reload deferred: a file is still being written"
            ),
            Outcome::Rejected => tracing::error!(
                trigger = ?r.trigger,
                errors = %r.errors.join("\n  "),
                "reload rejected; the previous config and plugins keep serving"
            ),
        }
        for w in &r.warnings {
            if !w.starts_with("plugin `") {
                tracing::warn!(warning = %w, "reload warning");
            }
        }
    }
}

/// Records a finished reload in the metrics.
fn observe(metrics: &Metrics, r: &ReloadRecord, live: &Snapshot) {
    // A deferred reload (file still being written, nothing swapped) is not an outcome yet.
    if r.retry && r.outcome != Outcome::Applied {
        return;
    }
    let m = &metrics.reloads;
    m.total.with_label_values(&[r.outcome.as_str()]).inc();
    m.duration.observe(r.duration_ms / 1000.0);
    if r.outcome != Outcome::Rejected {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        m.last_success.set(now.as_secs_f64());
    }
    m.plugins_loaded
        .set(i64::try_from(live.catalog.entries.len()).unwrap_or(i64::MAX));
}

/// Which plugins' serving (and canary) versions differ between two catalogs.
fn changes(old: &Catalog, new: &Catalog) -> Vec<PluginChange> {
    let version = |c: &Catalog, name: &str| {
        c.entries
            .get(name)
            .map(|e| e.serving.short_version().to_owned())
    };
    let canary = |c: &Catalog, name: &str| {
        c.entries
            .get(name)
            .and_then(|e| e.canary.as_ref()?.plugin.as_ref())
            .map(|p| p.short_version().to_owned())
    };
    let mut names: Vec<&str> = old
        .entries
        .keys()
        .chain(new.entries.keys())
        .map(|k| &**k)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .flat_map(|name| {
            let serving = (version(old, name), version(new, name));
            let candidate = (canary(old, name), canary(new, name));
            [(false, serving), (true, candidate)]
                .into_iter()
                .filter(|(_, (from, to))| from != to)
                .map(|(canary, (from, to))| PluginChange {
                    plugin: name.to_owned(),
                    canary,
                    from,
                    to,
                })
        })
        .collect()
}

fn config_errors(e: &crate::ConfigError) -> Vec<String> {
    match e {
        crate::ConfigError::Read { path, source } => {
            vec![format!("cannot read config file {path}: {source}")]
        }
        crate::ConfigError::Invalid { origin, problems } => {
            problems.iter().map(|p| p.display_with(origin)).collect()
        }
    }
}

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
