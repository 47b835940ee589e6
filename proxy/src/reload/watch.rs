//! Reload triggers that come from outside the admin API: file changes (`notify`) and `SIGHUP`.
//!
//! The watcher observes, non-recursively, the config file's directory, (when some route runs
//! plugins) the plugin directory, and the directories of the key files (TLS, JWKS) of the live
//! config, re-targeted after every reload, so a config that adds plugins or moves `plugins.dir`
//! is followed. Events that matter: the config file itself, `*.wasm` files in the plugin
//! directory, the TLS certificate, key and client CA files and the JWKS (rotated keys are
//! picked up without a signal), and Kubernetes volume updates, which swap a `..data` symlink
//! (any name starting with `..`).
//! Editor leftovers (`.#x`, `#x#`, `x~`, `.x.swp`, `4913`) and reads are ignored.
//!
//! Events are debounced: a reload starts once no relevant event came for `reload.debounce`
//! (capped, so a file written forever still gets reloaded), so a copy, an editor save or a
//! volume swap becomes one reload. If a plugin file was still being written when it was read,
//! the load is retried after another quiet period.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Reloader, Trigger, lock};

/// Longest a burst of events may postpone a reload, in debounce periods.
const MAX_POSTPONE: u32 = 40;
/// File timestamps can lag the clock by a scheduler tick: mtimes this close before the first
/// load count as possibly after it.
const MTIME_SLACK: Duration = Duration::from_secs(1);
/// Reloads retried while a plugin file keeps changing under the reader.
const MAX_RETRIES: u32 = 100;

/// What the watcher callback needs to tell relevant events from noise.
#[derive(Debug, Default, Clone)]
struct Targets {
    config_dir: Option<PathBuf>,
    config_name: Option<std::ffi::OsString>,
    plugin_dir: Option<PathBuf>,
    /// Key material the config names: the TLS certificate, key and client CA, the JWKS, the
    /// services' CAs and client certificates (rotation without a signal).
    key_files: Vec<PathBuf>,
}

impl Targets {
    fn of(reloader: &Reloader) -> Self {
        let live = reloader.shared().live.load();
        let config = &live.config;
        let source = config.source.as_deref().map(absolute);
        Self {
            config_dir: source
                .as_deref()
                .and_then(Path::parent)
                .map(Path::to_path_buf),
            config_name: source
                .as_deref()
                .and_then(Path::file_name)
                .map(ToOwned::to_owned),
            // Only when some route runs plugins; a config reload that adds one re-targets.
            plugin_dir: config.uses_plugins().then(|| absolute(&config.plugins.dir)),
            key_files: config
                .tls
                .iter()
                .flat_map(|t| t.files().map(Some))
                .chain([config.identity.jwt.as_ref().map(|j| &j.jwks)])
                .chain(
                    config
                        .services
                        .values()
                        .filter_map(|s| s.tls.as_ref())
                        .flat_map(|t| [t.ca.as_ref(), t.cert.as_ref(), t.key.as_ref()]),
                )
                .flatten()
                .map(|p| absolute(p))
                .collect(),
        }
    }

    fn dirs(&self) -> BTreeSet<PathBuf> {
        self.config_dir
            .iter()
            .chain(self.plugin_dir.iter())
            .cloned()
            .chain(
                self.key_files
                    .iter()
                    .filter_map(|f| f.parent().map(Path::to_path_buf)),
            )
            .collect()
    }

    fn relevant(&self, path: &Path) -> bool {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return false;
        };
        let name_str = name.to_string_lossy();
        if is_editor_noise(&name_str) {
            return false;
        }
        let kube = name_str.starts_with("..");
        let config = self.config_dir.as_deref() == Some(dir)
            && (kube || self.config_name.as_deref() == Some(name));
        let plugin =
            self.plugin_dir.as_deref() == Some(dir) && (kube || name_str.ends_with(".wasm"));
        let key = self
            .key_files
            .iter()
            .any(|f| f == path || (kube && f.parent() == Some(dir)));
        config || plugin || key
    }
}

fn is_editor_noise(name: &str) -> bool {
    name.starts_with(".#")
        || (name.starts_with('#') && name.ends_with('#'))
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".tmp")
        || name == "4913"
}

/// Changes that can alter what a reload reads; reads and metadata-only changes cannot.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        _ => true,
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Watches files (if `reload.watch`) and `SIGHUP` until `stop`; each trigger reloads. `SIGHUP`
/// is registered before this returns (so before the proxy reports ready), the rest when the
/// returned future first runs.
pub(crate) fn watch(
    reloader: Arc<Reloader>,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let hup = register_hangup();
    watch_loop(reloader, stop, hup)
}

async fn watch_loop(reloader: Arc<Reloader>, stop: CancellationToken, hup: Hangup) {
    let wake = Arc::new(Notify::new());
    let targets = Arc::new(Mutex::new(Targets::of(&reloader)));
    let watcher = if reloader.shared().live.load().config.reload.watch {
        let (wake, targets) = (wake.clone(), targets.clone());
        let made = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if !changes_content(&event.kind) {
                return;
            }
            let t = lock(&targets);
            if event.paths.iter().any(|p| t.relevant(p)) || event.need_rescan() {
                wake.notify_one();
            }
        });
        match made {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP or POST /admin/reload");
                None
            }
        }
    } else {
        None
    };
    let mut watched = Watched {
        watcher,
        dirs: BTreeSet::new(),
        failed: BTreeSet::new(),
    };
    watched.sync(&lock(&targets).dirs());
    // A file changed between the first load and now raised no event anyone saw: catch up.
    let first = reloader.first_load_at();
    let since = first.checked_sub(MTIME_SLACK).unwrap_or(first);
    let targets_now = lock(&targets).clone();
    if tokio::task::spawn_blocking(move || changed_since(&targets_now, since))
        .await
        .unwrap_or(true)
    {
        wake.notify_one();
    }

    let hangup = hangups(hup, wake.clone(), stop.clone());
    let hangup_requested = hangup.1;
    tokio::spawn(hangup.0);

    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified() => {}
        }
        let debounce = reloader.shared().live.load().config.reload.debounce;
        if !quiet_period(&wake, debounce, &stop).await {
            return;
        }
        let trigger = if hangup_requested.swap(false, std::sync::atomic::Ordering::AcqRel) {
            Trigger::Signal
        } else {
            Trigger::Watch
        };
        let mut record = reloader.reload(trigger).await;
        let mut retries = 0;
        while record.retry && retries < MAX_RETRIES {
            retries += 1;
            if !quiet_period(&wake, debounce, &stop).await {
                return;
            }
            record = reloader.reload(trigger).await;
        }
        let now = Targets::of(&reloader);
        watched.sync(&now.dirs());
        *lock(&targets) = now;
    }
}

/// True if a relevant file in the watched directories was modified at or after `since` (the
/// file or, for symlinks, the link itself).
fn changed_since(targets: &Targets, since: std::time::SystemTime) -> bool {
    targets.dirs().iter().any(|dir| {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.filter_map(Result::ok).any(|e| {
            let path = e.path();
            targets.relevant(&path)
                && [std::fs::symlink_metadata(&path), std::fs::metadata(&path)]
                    .into_iter()
                    .filter_map(|m| m.ok()?.modified().ok())
                    .any(|m| m >= since)
        })
    })
}

/// Waits until no wake-up came for `debounce` (at most [`MAX_POSTPONE`] periods). False if
/// stopped meanwhile.
async fn quiet_period(wake: &Notify, debounce: Duration, stop: &CancellationToken) -> bool {
    let give_up = Instant::now() + debounce * MAX_POSTPONE;
    loop {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(debounce) => return true,
            () = wake.notified() => {
                if Instant::now() >= give_up {
                    return true;
                }
            }
        }
    }
}

/// The directories being watched.
struct Watched {
    watcher: Option<RecommendedWatcher>,
    dirs: BTreeSet<PathBuf>,
    /// Directories that could not be watched (warned about once).
    failed: BTreeSet<PathBuf>,
}

impl Watched {
    fn sync(&mut self, want: &BTreeSet<PathBuf>) {
        let Some(w) = &mut self.watcher else { return };
        for gone in self.dirs.difference(want).cloned().collect::<Vec<_>>() {
            let _ = w.unwatch(&gone);
            self.dirs.remove(&gone);
        }
        for dir in want.difference(&self.dirs.clone()) {
            match w.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), "watching for changes");
                    self.failed.remove(dir);
                    self.dirs.insert(dir.clone());
                }
                Err(e) => {
                    if self.failed.insert(dir.clone()) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; changes there need SIGHUP or POST /admin/reload");
                    }
                }
            }
        }
    }
}

/// `SIGHUP`, registered when the watcher is created: from then on the signal no longer has its
/// default effect (ending the process).
#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn register_hangup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// A task turning `SIGHUP` into wake-ups (the flag tells the loop the trigger was a signal).
fn hangups(
    hup: Hangup,
    wake: Arc<Notify>,
    stop: CancellationToken,
) -> (
    impl Future<Output = ()> + Send + 'static,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = flag.clone();
    let task = async move {
        #[cfg(unix)]
        {
            let Some(mut hup) = hup else { return };
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    got = hup.recv() => {
                        if got.is_none() {
                            return;
                        }
                        tracing::info!(signal = "SIGHUP", "reload requested");
                        set.store(true, std::sync::atomic::Ordering::Release);
                        wake.notify_one();
                    }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (hup, wake, stop, set);
        }
    };
    (task, flag)
}
