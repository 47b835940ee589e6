//! Per-client rate limits: the phase right after routing, before any plugin or upstream work.
//!
//! A client's `rate_limit = { requests = 100, per = "1s", burst = 20 }` admits that many
//! requests per period on average and up to `burst` at once; a request over it is answered
//! `429 rate_limited` with `retry-after`, without costing a plugin instance or an upstream
//! call. The limit is one budget per client for this proxy process (not per user or per
//! instance of a fleet).
//!
//! Each limiter is the generic cell rate algorithm (GCRA): one atomic "theoretical arrival
//! time" per client, advanced by compare-and-swap, so admitting a request is a clock read and
//! one uncontended CAS, with no lock and no timer. Limiters live in the snapshot and are
//! carried into the next one when the client's limit did not change, so a reload does not
//! hand every client a fresh burst.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigPath, Problems, check_duration, check_range};
use crate::identity::ClientConfig;

/// `[[clients]] rate_limit`: how many requests the client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests admitted per `per`, on average.
    pub requests: u32,
    /// The period `requests` are counted over (`"1s"`, `"1m"`).
    #[serde(with = "humantime_serde")]
    pub per: Duration,
    /// Requests admitted at once, above the average rate (default: `requests`).
    pub burst: Option<u32>,
}

impl RateLimit {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        check_range(self.requests, 1..=1_000_000, &at.key("requests"), problems);
        check_duration(
            self.per,
            Duration::from_millis(1)..=Duration::from_secs(86_400),
            &at.key("per"),
            problems,
        );
        if let Some(burst) = self.burst {
            check_range(burst, 1..=1_000_000, &at.key("burst"), problems);
        }
    }
}

/// One client's admission state.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: RateLimit,
    /// Time between two admissions at the average rate, nanoseconds.
    interval: u64,
    /// How far ahead of now the theoretical arrival time may run: `burst - 1` intervals.
    tolerance: u64,
    /// Theoretical arrival time of the next request, nanoseconds since `epoch`.
    tat: AtomicU64,
    epoch: Instant,
}

impl Limiter {
    fn new(limit: RateLimit) -> Self {
        let per = u64::try_from(limit.per.as_nanos()).unwrap_or(u64::MAX);
        let interval = (per / u64::from(limit.requests.max(1))).max(1);
        let burst = u64::from(limit.burst.unwrap_or(limit.requests).max(1));
        Self {
            limit,
            interval,
            tolerance: interval.saturating_mul(burst - 1),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Admits a request now, or says how long until one would be admitted.
    pub(crate) fn check(&self) -> Result<(), Duration> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            let ahead = start - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(ahead - self.tolerance));
            }
            match self.tat.compare_exchange_weak(
                tat,
                start.saturating_add(self.interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// The limiters of one snapshot, by client index.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    by_client: Vec<Option<Arc<Limiter>>>,
}

impl RateLimits {
    /// Limiters for `clients`; a client whose limit is the same in `current` keeps its
    /// limiter (and the state in it).
    pub(crate) fn build(
        clients: &[ClientConfig],
        current: Option<(&RateLimits, &[ClientConfig])>,
    ) -> Self {
        let by_client = clients
            .iter()
            .map(|c| {
                let limit = c.rate_limit?;
                let kept = current.and_then(|(limits, old)| {
                    let i = old.iter().position(|o| o.name == c.name)?;
                    limits.by_client[i]
                        .as_ref()
                        .filter(|l| l.limit == limit)
                        .cloned()
                });
                Some(kept.unwrap_or_else(|| Arc::new(Limiter::new(limit))))
            })
            .collect();
        Self { by_client }
    }

    /// Admits a request of the client at `client`, or says when to retry.
    pub(crate) fn check(&self, client: usize) -> Result<(), Duration> {
        match self.by_client.get(client) {
            Some(Some(limiter)) => limiter.check(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, per_ms: u64, burst: Option<u32>) -> Limiter {
        Limiter::new(RateLimit {
            requests,
            per: Duration::from_millis(per_ms),
            burst,
        })
    }

    #[test]
    fn a_burst_is_admitted_then_the_average_rate() {
        // 10 per second: one every 100 ms, 3 at once.
        let l = limiter(10, 1000, Some(3));
        for _ in 0..3 {
            assert_eq!(l.check(), Ok(()));
        }
        let wait = l.check().expect_err("over the burst");
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Pretend a whole interval passed: exactly one more is admitted.
        l.tat.fetch_sub(100_000_000, Ordering::Relaxed);
        assert_eq!(l.check(), Ok(()));
        assert!(l.check().is_err());
    }

    #[test]
    fn the_burst_defaults_to_the_requests_per_period() {
        let l = limiter(5, 60_000, None);
        for _ in 0..5 {
            assert_eq!(l.check(), Ok(()));
        }
        let wait = l.check().expect_err("over");
        // One request every 12 s.
        assert!(wait > Duration::from_secs(11), "{wait:?}");
    }

    #[test]
    fn concurrent_checks_admit_exactly_the_burst() {
        let l = Arc::new(limiter(1, 3_600_000, Some(50)));
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if l.check().is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 50);
    }
}
