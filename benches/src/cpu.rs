//! CPU accounting from `/proc` (Linux; elsewhere every reading is `None`): how much CPU the
//! proxy under test and the upstream spent per request, and how busy the machine was with work
//! that is not part of the benchmark.
//!
//! On a 2-core machine the generator, the proxy and the upstream compete for the CPUs, so
//! requests/s moves with scheduling and with whatever else runs. CPU time per request is the
//! steadier measure of a proxy's cost; "other load" says when a round was disturbed.

use std::time::Instant;

/// Which process or threads a target's CPU time is read from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Threads of this process whose name starts with one of these prefixes.
    Threads(&'static [&'static str]),
    /// Another process and its direct children (nginx's master and workers).
    Process(u32),
    /// Nothing to read (the direct target has no proxy).
    None,
}

impl Source {
    fn ticks(&self) -> Option<u64> {
        match self {
            Self::Threads(prefixes) => threads_ticks(prefixes),
            Self::Process(pid) => tree_ticks(*pid),
            Self::None => Some(0),
        }
    }
}

/// CPU counters at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    machine_busy: Option<u64>,
    machine_total: Option<u64>,
    own: Option<ProcTicks>,
    target: Option<u64>,
    upstream: Option<u64>,
    nginx: Option<u64>,
}

/// What happened between two snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU seconds the target proxy used.
    pub target_s: Option<f64>,
    /// CPU seconds the upstream used.
    pub upstream_s: Option<f64>,
    /// CPU seconds used by everything else on the machine (not this process, its waited-for
    /// children such as wrk, or nginx), as a fraction of one CPU over the interval.
    pub other_cpus: Option<f64>,
}

/// Takes a snapshot; `nginx` is read too so that its CPU is not counted as "other".
pub fn snapshot(target: &Source, nginx: Option<u32>) -> Snapshot {
    let (busy, total) = machine_ticks().unzip();
    Snapshot {
        at: Instant::now(),
        machine_busy: busy,
        machine_total: total,
        own: proc_ticks("/proc/self/stat"),
        target: target.ticks(),
        upstream: threads_ticks(&[crate::upstream::THREAD_PREFIX]),
        nginx: nginx.and_then(|pid| Source::Process(pid).ticks()),
    }
}

impl Snapshot {
    /// Usage from `self` to `later`.
    pub fn usage_until(&self, later: &Snapshot) -> Usage {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        // /proc counts in USER_HZ ticks; derive the rate from the machine total over the wall
        // time instead of assuming 100.
        let hz = match (self.machine_total, later.machine_total) {
            (Some(a), Some(b)) if wall > 0.0 && b > a => {
                let raw = ticks_f64(b - a) / (wall * f64::from(u32::try_from(cpus).unwrap_or(1)));
                (raw / 10.0).round() * 10.0
            }
            _ => 100.0,
        };
        let secs = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(ticks_f64(b.saturating_sub(a)) / hz),
            _ => None,
        };
        let other = match (
            secs(self.machine_busy, later.machine_busy),
            self.own.as_ref().zip(later.own.as_ref()),
        ) {
            (Some(busy), Some((a, b))) => {
                let ours = ticks_f64(b.own.saturating_sub(a.own))
                    + ticks_f64(b.children.saturating_sub(a.children));
                let nginx = secs(self.nginx, later.nginx).unwrap_or(0.0);
                Some(((busy - ours / hz - nginx) / wall).max(0.0))
            }
            _ => None,
        };
        Usage {
            target_s: secs(self.target, later.target),
            upstream_s: secs(self.upstream, later.upstream),
            other_cpus: other,
        }
    }
}

#[allow(clippy::cast_precision_loss)]
fn ticks_f64(t: u64) -> f64 {
    t as f64
}

/// `(busy, total)` ticks of all CPUs, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// A process's own and its waited-for children's CPU ticks.
#[derive(Debug, Clone, Copy)]
struct ProcTicks {
    own: u64,
    children: u64,
}

/// Parses `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`.
fn proc_ticks(path: &str) -> Option<ProcTicks> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_stat(&text).map(|(_, t)| t)
}

/// `(comm, ticks)` from a `stat` line: fields after the `)` that closes the name, from field
/// 3 (state); utime, stime, cutime, cstime are fields 14-17.
fn parse_stat(text: &str) -> Option<(&str, ProcTicks)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?;
    let f: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    Some((
        comm,
        ProcTicks {
            own: n(11)? + n(12)?,
            children: n(13)? + n(14)?,
        },
    ))
}

/// CPU ticks of process `pid` plus those of its live children.
fn tree_ticks(pid: u32) -> Option<u64> {
    let mut sum = proc_ticks(&format!("/proc/{pid}/stat"))?.own;
    let parent = pid.to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == parent || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = text
            .rfind(')')
            .and_then(|i| text.get(i + 1..))
            .and_then(|rest| rest.split_whitespace().nth(1));
        if ppid == Some(parent.as_str())
            && let Some((_, t)) = parse_stat(&text)
        {
            sum += t.own;
        }
    }
    Some(sum)
}

/// Summed CPU ticks of this process's live threads whose name starts with `prefix`.
fn threads_ticks(prefixes: &[&str]) -> Option<u64> {
    let mut sum = 0;
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(entry) = entry else { continue };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, t)) = parse_stat(&text)
            && prefixes.iter().any(|p| comm.starts_with(p))
        {
            sum += t.own;
        }
    }
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_lines_with_odd_names() {
        let line = "1234 (bench-bff (x) y) S 1 2 3 4 5 6 7 8 9 10 120 30 7 3 20 0 1 0";
        let (comm, t) = parse_stat(line).expect("parses");
        assert_eq!(comm, "bench-bff (x) y");
        assert_eq!(t.own, 150);
        assert_eq!(t.children, 10);
    }

    #[test]
    fn own_threads_are_found() {
        if std::fs::metadata("/proc/self/task").is_err() {
            return; // not Linux
        }
        assert!(threads_ticks(&[""]).is_some());
        assert!(machine_ticks().is_some());
    }
}
