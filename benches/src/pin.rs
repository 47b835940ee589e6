//! CPU pinning with `taskset` (util-linux), so every run gets the same layout: the load
//! generator on CPU 0, the upstream and the proxy under test sharing the other CPUs.
//!
//! Without pinning, on a 2-core machine the scheduler decides per run which of the three busy
//! threads share a core, and requests/s and even CPU per request swing by ±25 % between
//! identical runs. With the upstream and the proxy on the same core, the proxy's cost per
//! request directly lowers requests/s, which is what the ratio is meant to show.
//!
//! `taskset` works on thread ids too, so no `unsafe` `sched_setaffinity` call is needed.

use std::process::{Command, Stdio};

use anyhow::Context as _;

/// The layout, when pinning is possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// CPU list for the load generator (`taskset -c` syntax).
    pub generator: String,
    /// CPU list for the upstream and the proxies.
    pub servers: String,
}

impl Layout {
    /// Generator on the first CPU this process may use, servers on the others; `None` with
    /// fewer than 2 CPUs or without `taskset`.
    pub fn detect() -> Option<Self> {
        crate::which("taskset")?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
        Self::from_allowed(&parse_cpu_list(list)?)
    }

    fn from_allowed(cpus: &[usize]) -> Option<Self> {
        let (first, rest) = cpus.split_first()?;
        if rest.is_empty() {
            return None;
        }
        let servers: Vec<String> = rest.iter().map(ToString::to_string).collect();
        Some(Self {
            generator: first.to_string(),
            servers: servers.join(","),
        })
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "load generator on CPU {}, upstream and proxy on CPU {}",
            self.generator, self.servers
        )
    }
}

/// Parses a kernel CPU list (`0-3,5,7-8`).
fn parse_cpu_list(list: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse().ok()?),
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    Some(cpus)
}

/// Pins the calling thread to `cpus` (found through `/proc/thread-self`). Called by each
/// benchmark thread itself as it starts, so no thread is missed or pinned late.
pub fn current_thread(cpus: &str) -> anyhow::Result<()> {
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link
        .file_name()
        .context("/proc/thread-self has no thread id")?
        .to_owned();
    let status = Command::new("taskset")
        .arg("-pc")
        .arg(cpus)
        .arg(&tid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(
        status.success(),
        "taskset -pc {cpus} {} failed",
        tid.to_string_lossy()
    );
    Ok(())
}

/// Applies `cpus` (if any) to the runtime's threads as each starts, and pins the calling
/// thread too. Pinning failures are reported on stderr, not fatal.
pub fn runtime(builder: &mut tokio::runtime::Builder, cpus: Option<&str>) {
    let Some(cpus) = cpus.map(str::to_owned) else {
        return;
    };
    builder.on_thread_start(move || {
        if let Err(e) = current_thread(&cpus) {
            eprintln!("warning: cannot pin a benchmark thread: {e:#}");
        }
    });
}

/// Pins the calling thread to `cpus` if given; failures are reported on stderr, not fatal.
pub fn this_thread(cpus: Option<&str>) {
    if let Some(cpus) = cpus
        && let Err(e) = current_thread(cpus)
    {
        eprintln!("warning: cannot pin a benchmark thread: {e:#}");
    }
}

/// `command` wrapped as `taskset -c CPUS command...` when `cpus` is given. `taskset` execs the
/// program, so the child's pid is the program's.
pub fn command(program: &std::path::Path, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(program);
            c
        }
        None => Command::new(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_from_cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("2,4-5"), Some(vec![2, 4, 5]));
        let l = Layout::from_allowed(&[2, 4, 5]).expect("three CPUs");
        assert_eq!(l.generator, "2");
        assert_eq!(l.servers, "4,5");
        assert_eq!(Layout::from_allowed(&[0]), None);
    }
}
