//! The results: one table per body size (direct, bff-proxy, nginx, each with its ratio to
//! direct), one verdict line per size, and the same numbers as JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::load::Measurement;

/// Name of the baseline target.
pub const DIRECT: &str = "direct";
/// Name of the proxy under test.
pub const BFF: &str = "bff-proxy";
/// Name of the reference proxy.
pub const NGINX: &str = "nginx";
/// Name of the optional minimal hyper proxy.
pub const HYPER_MIN: &str = "hyper-min";

/// One target's result at one body size: the median round by requests/s.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetResult {
    /// `direct`, `bff-proxy` or `nginx`.
    pub target: String,
    /// The median round.
    pub median: Measurement,
    /// Requests/s of every round, in run order.
    pub rounds_rps: Vec<f64>,
    /// Sum over all rounds of non-2xx responses.
    pub non_2xx: u64,
    /// Sum over all rounds of connection/IO errors.
    pub errors: u64,
    /// The most CPUs other processes kept busy during any round.
    pub max_other_cpus: Option<f64>,
}

impl TargetResult {
    /// Picks the median round (by requests/s) of `rounds`; `None` when there are none.
    pub fn from_rounds(target: &str, rounds: &[Measurement]) -> Option<Self> {
        let mut sorted: Vec<&Measurement> = rounds.iter().collect();
        sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        let median = (*sorted.get(sorted.len() / 2)?).clone();
        Some(Self {
            target: target.to_owned(),
            median,
            rounds_rps: rounds.iter().map(|m| m.rps).collect(),
            non_2xx: rounds.iter().map(|m| m.non_2xx).sum(),
            errors: rounds.iter().map(|m| m.errors).sum(),
            max_other_cpus: rounds
                .iter()
                .filter_map(|m| m.other_cpus)
                .fold(None, |acc: Option<f64>, x| {
                    Some(acc.map_or(x, |a| a.max(x)))
                }),
        })
    }
}

/// Every target at one body size.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeReport {
    /// `1 KB`, `20 KB`, ...
    pub label: String,
    /// Exact response body length.
    pub body_bytes: usize,
    /// Direct first, then the proxies.
    pub targets: Vec<TargetResult>,
}

impl SizeReport {
    /// The result of `target`, if it was measured.
    pub fn get(&self, target: &str) -> Option<&TargetResult> {
        self.targets.iter().find(|t| t.target == target)
    }

    /// `target`'s requests/s as a fraction of direct's.
    pub fn ratio(&self, target: &str) -> Option<f64> {
        let direct = self.get(DIRECT)?.median.rps;
        let t = self.get(target)?.median.rps;
        (direct > 0.0).then(|| t / direct)
    }

    /// `target`'s p99 minus direct's, microseconds.
    pub fn p99_overhead_us(&self, target: &str) -> Option<f64> {
        Some(self.get(target)?.median.p99_us - self.get(DIRECT)?.median.p99_us)
    }

    /// Whether bff-proxy kept at least nginx's share of direct throughput (`None` without nginx).
    pub fn bff_at_least_nginx(&self) -> Option<bool> {
        Some(self.ratio(BFF)? >= self.ratio(NGINX)?)
    }
}

/// The whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Which load generator ran.
    pub generator: String,
    /// nginx version, or why nginx was skipped.
    pub nginx: String,
    /// Connections, threads, duration, rounds.
    pub settings: Value,
    /// One entry per body size.
    pub sizes: Vec<SizeReport>,
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

fn us(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{u:.1} µs"))
}

impl Report {
    /// The Markdown tables and verdict lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for size in &self.sizes {
            let _ = writeln!(
                out,
                "\n### {} JSON body ({} bytes)\n",
                size.label, size.body_bytes
            );
            let _ = writeln!(
                out,
                "| target | req/s | p50 | p99 | req/s vs direct | p99 overhead | proxy CPU/req | upstream CPU/req |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
            for t in &size.targets {
                let (ratio, overhead) = if t.target == DIRECT {
                    ("1.000".to_owned(), "-".to_owned())
                } else {
                    (
                        size.ratio(&t.target)
                            .map_or_else(|| "-".into(), |r| format!("{r:.3}")),
                        size.p99_overhead_us(&t.target)
                            .map_or_else(|| "-".into(), |o| format!("{:+.3} ms", o / 1000.0)),
                    )
                };
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                    t.target,
                    t.median.rps,
                    ms(t.median.p50_us),
                    ms(t.median.p99_us),
                    ratio,
                    overhead,
                    us(t.median.proxy_cpu_us),
                    us(t.median.upstream_cpu_us),
                );
            }
            write_other_load(&mut out, size.targets.iter().map(|t| t.max_other_cpus));
            let failures: u64 = size.targets.iter().map(|t| t.non_2xx + t.errors).sum();
            if failures > 0 {
                for t in size.targets.iter().filter(|t| t.non_2xx + t.errors > 0) {
                    let _ = writeln!(
                        out,
                        "\nWARNING: {}: {} non-2xx responses, {} errors",
                        t.target, t.non_2xx, t.errors
                    );
                }
            }
        }
        out.push('\n');
        for size in &self.sizes {
            let line = match (size.ratio(BFF), size.ratio(NGINX)) {
                (Some(b), Some(n)) => format!(
                    "{}: bff-proxy keeps {:.1}% of direct req/s, nginx {:.1}% -> bff-proxy ratio >= nginx: {}",
                    size.label,
                    b * 100.0,
                    n * 100.0,
                    if b >= n { "YES" } else { "NO" }
                ),
                (Some(b), None) => format!(
                    "{}: bff-proxy keeps {:.1}% of direct req/s (nginx not measured)",
                    size.label,
                    b * 100.0
                ),
                _ => format!("{}: incomplete", size.label),
            };
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// Machine-readable form (`target/bench-proxy.json`).
    pub fn to_json(&self) -> Value {
        let sizes: Vec<Value> = self
            .sizes
            .iter()
            .map(|s| {
                let targets: Vec<Value> = s
                    .targets
                    .iter()
                    .map(|t| {
                        json!({
                            "target": t.target,
                            "rps": t.median.rps,
                            "p50_us": t.median.p50_us,
                            "p99_us": t.median.p99_us,
                            "requests": t.median.requests,
                            "ratio_vs_direct": s.ratio(&t.target),
                            "p99_overhead_us": s.p99_overhead_us(&t.target),
                            "proxy_cpu_us_per_request": t.median.proxy_cpu_us,
                            "upstream_cpu_us_per_request": t.median.upstream_cpu_us,
                            "max_other_load_cpus": t.max_other_cpus,
                            "rounds_rps": t.rounds_rps,
                            "non_2xx": t.non_2xx,
                            "errors": t.errors,
                        })
                    })
                    .collect();
                json!({
                    "label": s.label,
                    "body_bytes": s.body_bytes,
                    "targets": targets,
                    "bff_ratio_at_least_nginx": s.bff_at_least_nginx(),
                })
            })
            .collect();
        json!({
            "generator": self.generator,
            "nginx": self.nginx,
            "settings": self.settings,
            "sizes": sizes,
        })
    }
}

/// The "other load" line under a table: the most CPU that work outside the benchmark took in
/// any round, with a warning when it was enough to disturb the figures.
pub(crate) fn write_other_load(out: &mut String, others: impl Iterator<Item = Option<f64>>) {
    let Some(other) = others.flatten().reduce(f64::max) else {
        return;
    };
    let _ = writeln!(
        out,
        "\nOther load on the machine during these rounds: at most {:.0}% of one CPU{}",
        other * 100.0,
        if other > 0.1 {
            " (the numbers above were disturbed; rerun on an idle machine)"
        } else {
            ""
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rps: f64, p99_us: f64) -> Measurement {
        Measurement {
            requests: 10,
            rps,
            p50_us: p99_us / 2.0,
            p99_us,
            ..Measurement::default()
        }
    }

    #[test]
    fn median_round_and_ratios() {
        let direct =
            TargetResult::from_rounds(DIRECT, &[m(90.0, 1.0), m(100.0, 2.0), m(80.0, 3.0)])
                .expect("three rounds");
        assert!((direct.median.rps - 90.0).abs() < f64::EPSILON);
        let size = SizeReport {
            label: "1 KB".into(),
            body_bytes: 1024,
            targets: vec![
                direct,
                TargetResult::from_rounds(BFF, &[m(45.0, 1500.0)]).expect("one round"),
                TargetResult::from_rounds(NGINX, &[m(30.0, 1000.0)]).expect("one round"),
            ],
        };
        assert_eq!(size.ratio(BFF), Some(0.5));
        assert_eq!(size.bff_at_least_nginx(), Some(true));
        assert_eq!(size.p99_overhead_us(NGINX), Some(999.0));
        let report = Report {
            generator: "test".into(),
            nginx: "test".into(),
            settings: Value::Null,
            sizes: vec![size],
        };
        let text = report.render();
        assert!(text.contains("| bff-proxy | 45 |"), "{text}");
        assert!(text.contains("ratio >= nginx: YES"), "{text}");
        assert_eq!(
            report.to_json()["sizes"][0]["bff_ratio_at_least_nginx"],
            true
        );
    }
}
