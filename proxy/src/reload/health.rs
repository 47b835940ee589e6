//! The plugin health watch: beside the request path, once a second, it compares each plugin
//! version that replaced another within `plugins.rollback.window` with the version it
//! replaced, and rolls back one that fails far more ([`Reloader::roll_back`]).
//!
//! A new version is rolled back when, over at least `min_calls` hook calls on requests, the
//! share that failed (error result, trap, panic, CPU/memory/time limit, invalid output) is at
//! least `max_failure_ratio` and at least twice the previous version's share over its own
//! serving life: a failure rate both versions share (an upstream outage failing both) is not
//! the new version's fault. Pinned plugins are never rolled back automatically: only the pinned
//! build may run. A canary (`plugins.canary`) is judged the same way against the serving
//! version, for as long as it serves; rolling it back stops it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Reloader, RollbackBy};
use crate::plugins::RollbackConfig;

/// How often versions are compared.
const PERIOD: Duration = Duration::from_secs(1);

/// Runs until `stop` is cancelled.
pub(crate) async fn watch_plugin_health(reloader: Arc<Reloader>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Rollbacks that failed (logged by `roll_back`), by plugin, slot and version: not tried
    // again every second.
    let mut failed: HashSet<(String, bool, String)> = HashSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (plugin, canary, version, reason) in regressions(&reloader) {
            let attempt = (plugin, canary, version);
            if failed.contains(&attempt) {
                continue;
            }
            if reloader
                .roll_back(&attempt.0, canary, reason, RollbackBy::Automatic)
                .await
                .is_err()
            {
                failed.insert(attempt);
            }
        }
    }
}

/// The plugins of the live snapshot whose serving version (`false`) or canary (`true`) should
/// be rolled back: plugin, slot, the version's SHA-256, and why.
fn regressions(reloader: &Reloader) -> Vec<(String, bool, String, String)> {
    let live = reloader.shared().live.load();
    let config = &live.config.plugins;
    if !config.rollback.automatic {
        return Vec::new();
    }
    // A canary is compared with the serving version for as long as it serves.
    let canaries = live.catalog.entries.iter().filter_map(|(name, entry)| {
        let candidate = entry.canary.as_ref()?.plugin.as_ref()?;
        let reason = verdict(&config.rollback, candidate.calls(), entry.serving.calls())?;
        Some((
            name.to_string(),
            true,
            candidate.sha256.clone(),
            format!(
                "canary version {} {reason} of serving version {}",
                candidate.short_version(),
                entry.serving.short_version()
            ),
        ))
    });
    live.catalog
        .entries
        .iter()
        .filter(|(name, _)| config.pin(name).is_none())
        .filter_map(|(name, entry)| {
            let previous = entry.previous.as_ref()?;
            let since = previous.replaced_at.elapsed();
            if since >= config.rollback.window {
                return None;
            }
            let reason = verdict(
                &config.rollback,
                entry.serving.calls(),
                previous.plugin.calls(),
            )?;
            Some((
                name.to_string(),
                false,
                entry.serving.sha256.clone(),
                format!(
                    "version {} {reason} within {}s of replacing version {}",
                    entry.serving.short_version(),
                    since.as_secs(),
                    previous.plugin.short_version()
                ),
            ))
        })
        .chain(canaries)
        .collect()
}

/// Whether a new version with `(calls, failed)` should give way to the previous version with
/// its own `(calls, failed)`; the reason if so.
fn verdict(config: &RollbackConfig, new: (u64, u64), old: (u64, u64)) -> Option<String> {
    let ratio = |(calls, failed): (u64, u64)| {
        if calls == 0 {
            0.0
        } else {
            failed as f64 / calls as f64
        }
    };
    let (calls, failed) = new;
    let (new_ratio, old_ratio) = (ratio(new), ratio(old));
    (calls >= config.min_calls
        && new_ratio >= config.max_failure_ratio
        && new_ratio >= 2.0 * old_ratio)
        .then(|| {
            format!(
                "failed {failed} of {calls} calls ({:.0}%, against {:.0}%)",
                new_ratio * 100.0,
                old_ratio * 100.0
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_rolled_back_only_when_it_fails_clearly_more() {
        let config = RollbackConfig {
            automatic: true,
            window: Duration::from_secs(60),
            min_calls: 10,
            max_failure_ratio: 0.25,
        };
        // Too few calls to judge.
        assert!(verdict(&config, (9, 9), (100, 0)).is_none());
        // Fails often, the old one never did.
        let why = verdict(&config, (10, 3), (100, 0)).expect("rolled back");
        assert!(
            why.contains("failed 3 of 10 calls (30%, against 0%)"),
            "{why}"
        );
        // Below the threshold.
        assert!(verdict(&config, (100, 24), (100, 0)).is_none());
        // Both fail alike: not the new version's fault.
        assert!(verdict(&config, (100, 50), (100, 30)).is_none());
        assert!(verdict(&config, (100, 60), (100, 30)).is_some());
        // An old version that never served counts as never failing.
        assert!(verdict(&config, (10, 10), (0, 0)).is_some());
    }
}
