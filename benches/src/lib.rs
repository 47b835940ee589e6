//! The proxy benchmark: requests/s and p50/p99 latency of one upstream measured directly, through
//! bff-proxy and through nginx, in the same run, on loopback.
//!
//! `cargo bench -p bff-proxy-benches --bench proxy` runs [`run`] with [`Options::parse`]d
//! arguments; `benches/README.md` has the options and the numbers. The pieces:
//!
//! - [`upstream`]: in-process hyper server answering a pre-built JSON body,
//! - [`bff`]: bff-proxy in-process (library API) with N worker threads,
//! - [`nginx`]: nginx as a child process with N workers (skipped when not installed),
//! - [`hyper_min`]: optional minimal hyper proxy, the floor for bff-proxy's stack,
//! - [`load`]: `wrk` when installed, else a built-in closed-loop generator,
//! - [`report`]: tables, verdicts, JSON.
//!
//! The other benchmarks: [`plugins`] (what Wasm plugins cost), [`reload`] (hot reload),
//! [`security`] (what TLS termination and JWT identification cost) and [`cache`] (what the
//! response cache saves).

pub mod bff;
pub mod cache;
pub mod cpu;
pub mod hyper_min;
pub mod load;
pub mod nginx;
pub mod pin;
pub mod plugins;
pub mod reload;
pub mod report;
pub mod security;
pub mod upstream;

use std::io::{Read as _, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::load::{Generator, LoadSpec, Measurement};
use crate::report::{BFF, DIRECT, HYPER_MIN, NGINX, Report, SizeReport, TargetResult};

/// The path every target is asked for (the bff-proxy route; nginx and the upstream answer any).
pub const PATH: &str = "/bench";

/// Which load generator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeneratorChoice {
    /// `wrk` when installed, else built-in.
    Auto,
    /// Always the built-in generator.
    Builtin,
    /// `wrk`, failing when it is missing.
    Wrk,
}

/// Benchmark settings. [`Options::default`] is the full run, [`Options::quick`] a smoke run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Measured time per target per round.
    pub duration: Duration,
    /// Unmeasured load per target before its first round.
    pub warmup: Duration,
    /// Keep-alive connections the generator holds open.
    pub connections: usize,
    /// Load generator threads.
    pub load_threads: usize,
    /// bff-proxy Tokio worker threads, and nginx worker processes.
    pub proxy_workers: usize,
    /// Upstream Tokio worker threads.
    pub upstream_threads: usize,
    /// Response body sizes, bytes (approximate: realistic JSON a little over each).
    pub sizes: Vec<usize>,
    /// Rounds per target (interleaved direct, bff-proxy, nginx); the median round is reported.
    pub rounds: usize,
    /// Include nginx when it is installed.
    pub nginx: bool,
    /// Configure nginx to do bff-proxy's header work too (request id, forwarded headers);
    /// `false` (`--nginx-plain`) makes it a bare pass-through.
    pub nginx_same_headers: bool,
    /// Also measure the minimal hyper proxy ([`hyper_min`]).
    pub hyper_min: bool,
    /// Both proxies write an access log to a file (`--access-log`); off by default, as in
    /// most published proxy benchmarks.
    pub access_log: bool,
    /// Pin the generator and the servers to separate CPUs ([`pin`]) when `taskset` is there.
    pub pin: bool,
    /// Load generator.
    pub generator: GeneratorChoice,
    /// Where to write the JSON results (`None`: nowhere).
    pub json_out: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 32,
            load_threads: 1,
            proxy_workers: 1,
            upstream_threads: 1,
            sizes: vec![1024, 20 * 1024],
            rounds: 3,
            nginx: true,
            nginx_same_headers: true,
            hyper_min: false,
            access_log: false,
            pin: true,
            generator: GeneratorChoice::Auto,
            json_out: Some(default_json_path()),
        }
    }
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
cargo bench -p bff-proxy-benches --bench proxy [-- OPTIONS]

Measures requests/s and p50/p99 latency of one in-process upstream directly, through bff-proxy
and through nginx (one worker each by default), for each body size, on 127.0.0.1.

  --quick               smoke run: 1 s per target, 0.2 s warm-up, 8 connections, 1 round
  --duration SECS       measured time per target per round      (default 10)
  --warmup SECS         warm-up per target                       (default 2)
  --connections N       keep-alive connections                   (default 32)
  --threads N           load generator threads                   (default 1)
  --workers N           bff-proxy worker threads = nginx workers (default 1)
  --upstream-threads N  upstream worker threads                  (default 1)
  --sizes LIST          body sizes, e.g. 1k,20k or 512,4096      (default 1k,20k)
  --rounds N            interleaved rounds, median reported      (default 3)
  --no-nginx            skip nginx
  --nginx-plain         nginx as a bare pass-through (default: it also sets the request-id
                        and forwarded headers bff-proxy sets, so both do the same work)
  --hyper-min           also measure a minimal hyper proxy (same stack, no pipeline)
  --access-log          both proxies write an access log to a file (bff-proxy text, nginx combined)
  --no-pin              let the scheduler place threads (default: generator on the first
                        CPU, upstream and proxy on the others, via taskset)
  --builtin             use the built-in generator even if wrk is installed
  --wrk                 require wrk
  --json PATH           results file (default target/bench-proxy.json); --no-json to skip

Every option can also be given as an environment variable BENCH_<NAME> (BENCH_DURATION=5,
BENCH_QUICK=1, BENCH_NO_NGINX=1, ...); command-line arguments win.
";

impl Options {
    /// The smoke settings: ~1 s per target, few connections, one round.
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            connections: 8,
            rounds: 1,
            ..Self::default()
        }
    }

    /// Builds options from `BENCH_*` environment variables, then `args` (without the program
    /// name). `--bench`, which `cargo bench` passes, is ignored. `Ok(None)` means `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut words: Vec<String> = Vec::new();
        for (name, value) in std::env::vars() {
            let Some(opt) = name.strip_prefix("BENCH_") else {
                continue;
            };
            let flag = format!("--{}", opt.to_lowercase().replace('_', "-"));
            if !VALUE_OPTIONS.contains(&flag.as_str()) && !is_switch(&flag) {
                continue; // Some other tool's BENCH_ variable.
            }
            if is_switch(&flag) {
                if !matches!(value.as_str(), "" | "0" | "false" | "no") {
                    words.push(flag);
                }
            } else {
                words.push(flag);
                words.push(value);
            }
        }
        words.extend(args);
        // `--quick` sets the base; the other options apply on top, wherever they appear.
        let mut opts = if words.iter().any(|w| w == "--quick") {
            Self::quick()
        } else {
            Self::default()
        };
        let mut it = words.into_iter();
        while let Some(flag) = it.next() {
            let mut value = |what: &str| {
                it.next()
                    .with_context(|| format!("{flag} needs a value ({what})"))
            };
            match flag.as_str() {
                "--help" | "-h" => return Ok(None),
                "--bench" | "--quick" => {}
                "--duration" => opts.duration = parse_secs(&value("seconds")?)?,
                "--warmup" => opts.warmup = parse_secs(&value("seconds")?)?,
                "--connections" => opts.connections = parse_count(&value("a number")?)?,
                "--threads" => opts.load_threads = parse_count(&value("a number")?)?,
                "--workers" => opts.proxy_workers = parse_count(&value("a number")?)?,
                "--upstream-threads" => opts.upstream_threads = parse_count(&value("a number")?)?,
                "--rounds" => opts.rounds = parse_count(&value("a number")?)?,
                "--sizes" => {
                    opts.sizes = value("a list like 1k,20k")?
                        .split(',')
                        .map(parse_size)
                        .collect::<anyhow::Result<_>>()?;
                }
                "--no-nginx" => opts.nginx = false,
                "--hyper-min" => opts.hyper_min = true,
                "--access-log" => opts.access_log = true,
                "--nginx-plain" => opts.nginx_same_headers = false,
                "--no-pin" => opts.pin = false,
                "--builtin" => opts.generator = GeneratorChoice::Builtin,
                "--wrk" => opts.generator = GeneratorChoice::Wrk,
                "--json" => opts.json_out = Some(PathBuf::from(value("a path")?)),
                "--no-json" => opts.json_out = None,
                other => bail!("unknown option `{other}`\n\n{USAGE}"),
            }
        }
        if opts.sizes.is_empty() {
            bail!("--sizes needs at least one size");
        }
        Ok(Some(opts))
    }
}

/// Options that take a value.
const VALUE_OPTIONS: [&str; 9] = [
    "--duration",
    "--warmup",
    "--connections",
    "--threads",
    "--workers",
    "--upstream-threads",
    "--rounds",
    "--sizes",
    "--json",
];

fn is_switch(flag: &str) -> bool {
    matches!(
        flag,
        "--quick"
            | "--no-nginx"
            | "--nginx-plain"
            | "--hyper-min"
            | "--access-log"
            | "--no-pin"
            | "--builtin"
            | "--wrk"
            | "--no-json"
            | "--help"
    )
}

/// `SECS` (fractions allowed, an optional `s`) or `MSms`.
pub(crate) fn parse_secs(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse().with_context(|| format!("`{s}`"))?)
    } else {
        Duration::from_secs_f64(
            s.trim_end_matches('s')
                .parse()
                .with_context(|| format!("`{s}` is not a number of seconds"))?,
        )
    };
    Ok(d)
}

pub(crate) fn parse_count(s: &str) -> anyhow::Result<usize> {
    let n: usize = s
        .trim()
        .parse()
        .with_context(|| format!("`{s}` is not a number"))?;
    if n == 0 {
        bail!("counts must be at least 1");
    }
    Ok(n)
}

fn parse_size(s: &str) -> anyhow::Result<usize> {
    let s = s.trim().to_lowercase();
    let (num, scale) = match s.strip_suffix("kb").or_else(|| s.strip_suffix('k')) {
        Some(n) => (n, 1024),
        None => (s.as_str(), 1),
    };
    let n: usize = num
        .trim()
        .parse()
        .with_context(|| format!("`{s}` is not a size"))?;
    Ok(n * scale)
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// `$CARGO_TARGET_DIR/bench-proxy.json`, else the workspace's `target/bench-proxy.json`.
pub fn default_json_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let benches = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            benches.parent().unwrap_or(benches).join("target")
        })
        .join("bench-proxy.json")
}

/// Runs the whole benchmark, writing progress lines to `log`, and returns the report.
pub fn run(opts: &Options, log: &mut dyn Write) -> anyhow::Result<Report> {
    let generator = match opts.generator {
        GeneratorChoice::Auto => Generator::detect(),
        GeneratorChoice::Builtin => Generator::Builtin,
        GeneratorChoice::Wrk => match Generator::detect() {
            w @ Generator::Wrk(_) => w,
            Generator::Builtin => bail!(
                "--wrk given but wrk is not installed ({})",
                load::INSTALL_HINT
            ),
        },
    };
    writeln!(log, "load generator: {}", generator.name())?;
    if generator == Generator::Builtin && opts.generator == GeneratorChoice::Auto {
        writeln!(log, "  (wrk not found; `{}` to use it)", load::INSTALL_HINT)?;
    }
    let nginx_bin = if opts.nginx { nginx::find() } else { None };
    let nginx_note = match (&nginx_bin, opts.nginx) {
        (_, false) => "skipped (--no-nginx)".to_owned(),
        (None, true) => {
            let note = format!(
                "skipped: nginx is not installed (`{}`, or set NGINX=/path/to/nginx)",
                nginx::INSTALL_HINT
            );
            writeln!(log, "nginx: {note}")?;
            note
        }
        (Some(p), true) => p.display().to_string(),
    };
    if let Some(load) = loadavg() {
        writeln!(log, "load average before start: {load}")?;
    }
    let layout = pin_layout(opts.pin, log)?;
    let servers_cpus = layout.as_ref().map(|l| l.servers.clone());
    let spec = LoadSpec {
        connections: opts.connections,
        threads: opts.load_threads,
        duration: opts.duration,
        pin: layout.as_ref().map(|l| l.generator.clone()),
    };
    let warm = LoadSpec {
        duration: opts.warmup,
        ..spec.clone()
    };
    let pool = opts.connections.max(64);
    let mut nginx_version = nginx_note;
    let mut sizes = Vec::new();
    for &size in &opts.sizes {
        let label = size_label(size);
        let body = upstream::json_body(size);
        let pin = servers_cpus.as_deref();
        let up = upstream::Upstream::start(body, opts.upstream_threads, pin)?;
        let log_dir = std::env::temp_dir().join(format!(
            "bff-bench-access-{}-{}",
            std::process::id(),
            unique()
        ));
        let bff_log = opts.access_log.then(|| log_dir.join("bff-proxy.log"));
        if opts.access_log {
            std::fs::create_dir_all(&log_dir)?;
        }
        let bff =
            bff::BffProxy::start(up.addr(), opts.proxy_workers, pool, pin, bff_log.as_deref())?;
        let ngx = match &nginx_bin {
            Some(bin) => {
                let n = nginx::Nginx::start(
                    bin,
                    up.addr(),
                    pool,
                    opts.proxy_workers,
                    opts.nginx_same_headers,
                    opts.access_log,
                    servers_cpus.as_deref(),
                )?;
                nginx_version = n.version().to_owned();
                Some(n)
            }
            None => None,
        };
        let hmin = if opts.hyper_min {
            Some(hyper_min::HyperMin::start(
                up.addr(),
                opts.proxy_workers,
                pool,
                pin,
            )?)
        } else {
            None
        };
        let nginx_pid = ngx.as_ref().map(nginx::Nginx::pid);
        let mut targets: Vec<(&str, SocketAddr, cpu::Source)> = vec![
            (DIRECT, up.addr(), cpu::Source::None),
            (BFF, bff.addr(), cpu::Source::Threads(bff::THREAD_PREFIXES)),
        ];
        if let Some(n) = &ngx {
            targets.push((NGINX, n.addr(), cpu::Source::Process(n.pid())));
        }
        if let Some(h) = &hmin {
            targets.push((
                HYPER_MIN,
                h.addr(),
                cpu::Source::Threads(&[hyper_min::THREAD_PREFIX]),
            ));
        }
        writeln!(
            log,
            "\n{label} body ({} bytes): upstream {}, bff-proxy {}{}",
            up.body_len(),
            up.addr(),
            bff.addr(),
            ngx.as_ref()
                .map(|n| format!(", nginx {}", n.addr()))
                .unwrap_or_default()
        )?;
        for &(name, addr, _) in &targets {
            wait_ready(addr, Duration::from_secs(10))
                .with_context(|| format!("{name} at {addr} is not answering"))?;
            if !opts.warmup.is_zero() {
                load::run(&generator, addr, PATH, &warm)
                    .with_context(|| format!("warming up {name}"))?;
            }
        }
        let mut rounds: Vec<Vec<Measurement>> = vec![Vec::new(); targets.len()];
        for round in 1..=opts.rounds {
            for (i, (name, addr, source)) in targets.iter().enumerate() {
                let before = cpu::snapshot(source, nginx_pid);
                let mut m = load::run(&generator, *addr, PATH, &spec)
                    .with_context(|| format!("measuring {name}"))?;
                let usage = before.usage_until(&cpu::snapshot(source, nginx_pid));
                let per_req = |s: Option<f64>| {
                    s.filter(|_| m.requests > 0)
                        .map(|s| s * 1e6 / lossy_f64(m.requests))
                };
                m.proxy_cpu_us = per_req(usage.target_s).filter(|_| *name != DIRECT);
                m.upstream_cpu_us = per_req(usage.upstream_s);
                m.other_cpus = usage.other_cpus;
                writeln!(
                    log,
                    "  round {round}/{}: {name:<9} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  \
                     CPU/req proxy {} upstream {}  other load {}{}",
                    opts.rounds,
                    m.rps,
                    m.p50_us / 1000.0,
                    m.p99_us / 1000.0,
                    opt_us(m.proxy_cpu_us),
                    opt_us(m.upstream_cpu_us),
                    m.other_cpus
                        .map_or_else(|| "?".into(), |c| format!("{:.0}%", c * 100.0)),
                    if m.non_2xx + m.errors > 0 {
                        format!("  ({} non-2xx, {} errors)", m.non_2xx, m.errors)
                    } else {
                        String::new()
                    }
                )?;
                rounds[i].push(m);
            }
        }
        let results = targets
            .iter()
            .zip(&rounds)
            .filter_map(|((name, _, _), r)| TargetResult::from_rounds(name, r))
            .collect();
        sizes.push(SizeReport {
            label,
            body_bytes: up.body_len(),
            targets: results,
        });
        // Stop the proxies before their upstream.
        drop(hmin);
        drop(ngx);
        drop(bff);
        drop(up);
    }
    let report = Report {
        generator: generator.name(),
        nginx: nginx_version,
        settings: json!({
            "duration_s": opts.duration.as_secs_f64(),
            "warmup_s": opts.warmup.as_secs_f64(),
            "connections": opts.connections,
            "load_threads": opts.load_threads,
            "proxy_workers": opts.proxy_workers,
            "hyper_min": opts.hyper_min,
            "access_log": opts.access_log,
            "nginx_same_headers": opts.nginx_same_headers,
            "pinning": layout.as_ref().map(pin::Layout::describe),
            "upstream_threads": opts.upstream_threads,
            "rounds": opts.rounds,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        }),
        sizes,
    };
    if let Some(path) = &opts.json_out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        writeln!(log, "\nresults written to {}", path.display())?;
    }
    Ok(report)
}

fn opt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{u:.1} us"))
}

#[allow(clippy::cast_precision_loss)]
fn lossy_f64(n: u64) -> f64 {
    n as f64
}

/// Waits until `GET /bench` at `addr` answers 2xx.
fn wait_ready(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !http_get_ok(addr, PATH, Duration::from_millis(500)) {
        if start.elapsed() > limit {
            bail!("no 2xx answer within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// One blocking `GET path` with `Connection: close`; true when the status is 2xx.
pub(crate) fn http_get_ok(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 2") || head.starts_with(b"HTTP/1.0 2"))
    };
    attempt().unwrap_or(false)
}

/// `GET path` on a fresh connection: the head and body of a 200 response.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok((head.to_owned(), body.to_owned()))
}

/// `GET path` on a fresh connection; the value of `header` in a 200 response.
pub(crate) fn http_get_header(
    addr: SocketAddr,
    path: &str,
    header: &str,
) -> anyhow::Result<Option<String>> {
    let (head, _) = http_get(addr, path)?;
    Ok(head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(header)
            .then(|| v.trim().to_owned())
    }))
}

/// A port that was free a moment ago on 127.0.0.1 (for listeners configured by port number).
/// The CPU layout to pin to (`None` with `--no-pin` or where pinning is not possible), said in
/// `log`.
pub(crate) fn pin_layout(pin: bool, log: &mut dyn Write) -> std::io::Result<Option<pin::Layout>> {
    let layout = if pin { pin::Layout::detect() } else { None };
    match (&layout, pin) {
        (Some(l), _) => writeln!(log, "pinning: {}", l.describe())?,
        (None, true) => writeln!(
            log,
            "pinning: off (needs `taskset` from util-linux and at least 2 CPUs)"
        )?,
        (None, false) => writeln!(log, "pinning: off (--no-pin)")?,
    }
    Ok(layout)
}

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A number unique within this process (temp directory names).
pub(crate) fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `name` found on `PATH`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The 1/5/15-minute load averages, when the OS tells them.
fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        Options::parse(args.iter().map(|s| (*s).to_owned()))
            .expect("valid options")
            .expect("not --help")
    }

    #[test]
    fn parses_options() {
        let o = parse(&[
            "--bench",
            "--duration",
            "5",
            "--sizes",
            "1k,20KB,300",
            "--no-nginx",
        ]);
        assert_eq!(o.duration, Duration::from_secs(5));
        assert_eq!(o.sizes, [1024, 20 * 1024, 300]);
        assert!(!o.nginx);
        let q = parse(&["--connections", "3", "--quick"]);
        assert_eq!(q.connections, 3);
        assert_eq!(q.duration, Duration::from_secs(1));
        assert_eq!(
            parse(&["--warmup", "250ms"]).warmup,
            Duration::from_millis(250)
        );
        assert!(Options::parse(["--nope".to_owned()]).is_err());
        assert!(Options::parse(["--help".to_owned()]).expect("ok").is_none());
    }

    #[test]
    fn json_bodies_are_valid_and_sized() {
        for size in [1024, 20 * 1024] {
            let body = upstream::json_body(size);
            assert!(
                body.len() >= size && body.len() < size + 400,
                "{}",
                body.len()
            );
            let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
            assert!(v["items"].as_array().is_some_and(|a| !a.is_empty()));
        }
    }

    #[test]
    fn nginx_config_has_one_worker_and_keepalive() {
        let up: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let c = nginx::config(std::path::Path::new("/tmp/x"), 8081, up, 64, 1, true, false);
        assert!(c.contains("worker_processes 1;"));
        assert!(c.contains("master_process off;"));
        assert!(c.contains("keepalive 64;"));
        assert!(c.contains("listen 127.0.0.1:8081;"));
        assert!(c.contains("X-Request-Id $request_id"));
        let plain = nginx::config(std::path::Path::new("/tmp/x"), 8081, up, 64, 1, false, true);
        assert!(!plain.contains("X-Request-Id"));
    }

    #[test]
    fn bench_config_is_accepted_by_bff_proxy() {
        let up: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let text = bff::config_toml(up, 9, 1, 64);
        let cfg = bff_proxy::Config::from_toml(&text, "bench").expect("valid config");
        assert_eq!(cfg.server.worker_threads, 1);
        assert_eq!(cfg.routes.len(), 1);
    }
}
