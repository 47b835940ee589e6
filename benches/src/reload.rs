//! The hot-reload benchmark (`cargo bench -p bff-proxy-benches --bench reload`), three parts:
//!
//! 1. **Swap**: a new version of the `voice` example plugin (a ~210 KB component) is renamed into
//!    the watched plugin directory; the time until a request is served by it (seen in the
//!    `x-bff-plugin-versions` header) is measured, for versions never seen before (each is
//!    compiled; the on-disk cache is off) and for versions coming back (already compiled).
//! 2. **Storm**: latency of a route running that plugin under steady load, with and without a
//!    new version being shipped every 100 ms (each compiled on the same two cores that serve).
//! 3. **Startup**: `Proxy::bind` to ready with 10 plugins, with the compile cache cold and warm
//!    (`Proxy::bind` runs the first load; the listeners accept as soon as it returns).
//!
//! Distinct versions of one plugin are made by appending a custom section (a valid component
//! with another SHA-256), so nothing but the file's identity changes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::bff::BffProxy;
use crate::load::{self, Generator, LoadSpec, Measurement};
use crate::upstream::{Upstream, json_body};

/// Settings of the reload benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadOptions {
    /// Swaps measured per kind in part 1.
    pub swaps: usize,
    /// Measured time per phase (steady, storm) per round in part 2.
    pub duration: Duration,
    /// Interleaved steady/storm rounds; the median is reported.
    pub rounds: usize,
    /// Warm restarts measured in part 3.
    pub restarts: usize,
    /// Plugins in part 3's config.
    pub startup_plugins: usize,
    /// Where to write the JSON results (`None`: nowhere).
    pub json_out: Option<PathBuf>,
    /// Use the built-in load generator even if wrk is installed.
    pub builtin: bool,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        Self {
            swaps: 20,
            duration: Duration::from_secs(5),
            rounds: 3,
            restarts: 5,
            startup_plugins: 10,
            json_out: Some(crate::default_json_path().with_file_name("bench-reload.json")),
            builtin: false,
        }
    }
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
cargo bench -p bff-proxy-benches --bench reload [-- OPTIONS]

Measures hot reload: time from a new plugin file settling to it serving, request latency
during a reload storm vs steady state, and startup with 10 plugins (compile cache cold/warm).

  --quick           smoke run: 3 swaps, 1 s phases, 1 round, 2 restarts with 2 plugins
  --swaps N         swaps measured per kind (default 20)
  --duration SECS   measured time per phase per round (default 5)
  --rounds N        interleaved steady/storm rounds, median reported (default 3)
  --json PATH       results file (default target/bench-reload.json); --no-json to skip
  --builtin         use the built-in load generator even if wrk is installed
";

impl ReloadOptions {
    /// Parses arguments; `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut o = Self::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match a.as_str() {
                "--help" | "-h" => return Ok(None),
                "--bench" => {}
                "--quick" => o.quick(),
                "--swaps" => o.swaps = value("--swaps")?.parse()?,
                "--duration" => {
                    o.duration = Duration::from_secs_f64(value("--duration")?.parse()?);
                }
                "--rounds" => o.rounds = value("--rounds")?.parse()?,
                "--json" => o.json_out = Some(value("--json")?.into()),
                "--no-json" => o.json_out = None,
                "--builtin" => o.builtin = true,
                other => anyhow::bail!("unknown option `{other}` (see --help)"),
            }
        }
        anyhow::ensure!(o.rounds >= 1, "--rounds must be at least 1");
        anyhow::ensure!(o.swaps >= 1, "--swaps must be at least 1");
        Ok(Some(o))
    }

    /// The smallest run that exercises every part.
    pub fn quick(&mut self) {
        self.swaps = 3;
        self.duration = Duration::from_secs(1);
        self.rounds = 1;
        self.restarts = 2;
        self.startup_plugins = 2;
    }
}

/// Milliseconds: median, 90th percentile and max of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Spread {
    fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
            ms.get(i).copied().unwrap_or(0.0)
        };
        Self {
            p50_ms: at(0.5),
            p90_ms: at(0.9),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }

    fn to_json(self) -> Value {
        json!({ "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "max_ms": self.max_ms })
    }
}

/// Everything the reload benchmark measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadReport {
    /// Size of the plugin file swapped.
    pub plugin_bytes: usize,
    /// The proxy's `reload.debounce` (part of every swap time).
    pub debounce_ms: u64,
    /// Part 1: never-seen versions (compiled), until they serve.
    pub swap_new: Spread,
    /// Part 1: the same, until they serve on optimized code (equal to `swap_new` without
    /// tiered compilation).
    pub swap_optimized: Spread,
    /// Part 1: versions compiled before (from memory).
    pub swap_known: Spread,
    /// Load generator of part 2.
    pub generator: String,
    /// Part 2: median round without reloads.
    pub steady: Measurement,
    /// Part 2: median round with a new version every 100 ms.
    pub storm: Measurement,
    /// Part 2: reloads applied during the storm rounds.
    pub storm_reloads: usize,
    /// Part 3: first start, nothing cached.
    pub startup_cold: Duration,
    /// Part 3: restarts with every plugin in the compile cache.
    pub startup_warm: Spread,
    /// Part 3: how many warm restarts.
    pub restarts: usize,
    /// Part 3: plugins loaded at each start.
    pub startup_plugins: usize,
}

/// A component with a custom section `bench-version` appended: a distinct file (and version)
/// of the same plugin.
pub fn variant(component: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"bench-version";
    let mut payload = Vec::new();
    leb(name.len(), &mut payload);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0);
    leb(payload.len(), &mut out);
    out.extend_from_slice(&payload);
    out
}

fn short_sha(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex[..12].to_owned()
}

/// Writes `bytes` next to `path` and renames it into place (what a deploy should do).
fn ship(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("wasm.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

const VERSION_HEADER: &str = "x-bff-plugin-versions";
/// How often part 1 asks whether the new version serves.
const POLL: Duration = Duration::from_millis(2);
/// How long a shipped version may take to serve before the run fails: a bound against hanging,
/// not a target (a release build takes ~130 ms; the debug-built smoke test, sharing two cores
/// with the other benchmarks' load, has needed more than 30 s).
const SERVE_BOUND: Duration = Duration::from_secs(120);

/// A config with `routes` (TOML), the plugin dir, the given cache setting and debounce.
fn config(
    upstream: SocketAddr,
    admin: u16,
    plugins: &Path,
    cache: Option<&Path>,
    routes: &str,
) -> String {
    let cache = match cache {
        Some(dir) => format!("cache_dir = {:?}", dir.display().to_string()),
        None => "compile_cache = false".to_owned(),
    };
    format!(
        r#"listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:{admin}"
[server]
worker_threads = 1
drain_timeout = "1s"
[identity]
default_client = "web"
[services.up]
urls = ["http://{upstream}"]
[[clients]]
name = "web"
[plugins]
dir = {dir:?}
{cache}
version_header = "{VERSION_HEADER}"
{routes}
"#,
        dir = plugins.display().to_string()
    )
}

fn voice_route(id: &str, plugin: &str) -> String {
    format!(
        r#"[[routes]]
id = "{id}"
path = "/{id}"
service = "up"
[[routes.chain]]
plugin = "{plugin}"
config = {{ sentences = ["You have {{total}} products, the first is {{items[0].name}}."], fallback = "sorry" }}
"#
    )
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "bff-bench-reload-{tag}-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ships `bytes` and waits until `/v` is served by it; the time from the rename to then.
fn swap_and_wait(
    proxy: SocketAddr,
    file: &Path,
    bytes: &[u8],
    plugin: &str,
) -> anyhow::Result<Duration> {
    let want = format!("{plugin}={}", short_sha(bytes));
    ship(file, bytes)?;
    let settled = Instant::now();
    loop {
        if crate::http_get_header(proxy, "/v", VERSION_HEADER)?.as_deref() == Some(want.as_str()) {
            return Ok(settled.elapsed());
        }
        anyhow::ensure!(
            settled.elapsed() < SERVE_BOUND,
            "version {want} did not serve within {} s",
            SERVE_BOUND.as_secs()
        );
        // Every 2 ms: fine enough for figures in the hundreds of ms, and light enough not to
        // take the CPU from the (low-priority) compile it is waiting for.
        std::thread::sleep(POLL);
    }
}

/// Waits until `/admin/plugins` lists no plugin on baseline code (tiered compilation's
/// background compile done), polling every 5 ms; how long that took.
fn until_optimized(admin: u16) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], admin));
    loop {
        let (_, body) = crate::http_get(addr, "/admin/plugins")?;
        if !body.contains(r#""tier":"baseline""#) {
            anyhow::ensure!(body.contains(r#""tier":"optimized""#), "no tier in {body}");
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "still on baseline code after 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn median_by(items: &[Measurement], key: impl Fn(&Measurement) -> f64) -> Measurement {
    let mut v = items.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2].clone()
}

/// Runs the three parts, writing progress to `log`.
pub fn run(opts: &ReloadOptions, log: &mut dyn Write) -> anyhow::Result<ReloadReport> {
    writeln!(
        log,
        "building the example plugins (plugins/, release, wasm32-wasip2)..."
    )?;
    let examples = bff_proxy_tests::plugins::example_plugins();
    let voice = std::fs::read(examples.join("voice.wasm")).context("reading voice.wasm")?;
    let upstream = Upstream::start(json_body(1024), 1, None)?;
    let generator = if opts.builtin {
        Generator::Builtin
    } else {
        Generator::detect()
    };

    // Part 1: swaps.
    let dir = TempDir::new("swap")?;
    let file = dir.0.join("voice.wasm");
    ship(&file, &voice)?;
    let admin = crate::free_port()?;
    let text = config(
        upstream.addr(),
        admin,
        &dir.0,
        None,
        &voice_route("v", "voice"),
    );
    let proxy = BffProxy::start_config(&text, 1, None)?;
    let debounce_ms = bff_proxy::config::ReloadConfig::default()
        .debounce
        .as_millis() as u64;
    writeln!(
        log,
        "swap: {} new versions of voice.wasm ({} B), then {} known ones...",
        opts.swaps,
        voice.len(),
        opts.swaps
    )?;
    let known = [variant(&voice, "known-a"), variant(&voice, "known-b")];
    for k in &known {
        swap_and_wait(proxy.addr(), &file, k, "voice")?;
    }
    // Versions coming back first: both are still among the compiled components kept.
    let mut back = Vec::new();
    for i in 0..opts.swaps {
        back.push(swap_and_wait(proxy.addr(), &file, &known[i % 2], "voice")?);
        // Let the next measurement start from a quiet proxy.
        std::thread::sleep(Duration::from_millis(100));
    }
    // Never-seen versions: serving once the baseline compile is done, then on optimized code
    // once the background compile is (the next swap starts from a quiet proxy).
    let (mut new, mut optimized) = (Vec::new(), Vec::new());
    for i in 0..opts.swaps {
        let v = variant(&voice, &format!("new-{i}"));
        let serving = swap_and_wait(proxy.addr(), &file, &v, "voice")?;
        new.push(serving);
        optimized.push(serving + until_optimized(admin)?);
        std::thread::sleep(Duration::from_millis(100));
    }

    // Part 2: steady vs storm, interleaved.
    writeln!(
        log,
        "storm: /v under load ({}), steady vs a new version every 100 ms...",
        generator.name()
    )?;
    let spec = LoadSpec {
        connections: 16,
        threads: 1,
        duration: opts.duration,
        pin: None,
    };
    let _warm = load::run(
        &generator,
        proxy.addr(),
        "/v",
        &LoadSpec {
            duration: Duration::from_secs(1),
            ..spec.clone()
        },
    )?;
    let (mut steady, mut storm) = (Vec::new(), Vec::new());
    let mut storm_reloads = 0;
    for round in 0..opts.rounds {
        steady.push(load::run(&generator, proxy.addr(), "/v", &spec)?);
        let stop = Arc::new(AtomicBool::new(false));
        let shipper = {
            let (stop, file, voice) = (stop.clone(), file.clone(), voice.clone());
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 10_000 {
                    ship(&file, &variant(&voice, &format!("storm-{round}-{n}")))?;
                    n += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(n)
            })
        };
        let m = load::run(&generator, proxy.addr(), "/v", &spec);
        stop.store(true, Ordering::Relaxed);
        storm_reloads += shipper
            .join()
            .map_err(|_| anyhow::anyhow!("the shipping thread panicked"))??;
        storm.push(m?);
    }
    for m in steady.iter().chain(&storm) {
        anyhow::ensure!(
            m.non_2xx == 0 && m.errors == 0 && m.requests > 0,
            "/v failed under load: {m:?}"
        );
    }
    drop(proxy);

    // Part 3: startup with 10 plugins, cold then warm.
    let n = opts.startup_plugins.max(1);
    writeln!(log, "startup: {n} plugins, compile cache cold then warm...")?;
    let dir = TempDir::new("startup")?;
    let cache = dir.0.join("cache");
    let mut routes = String::new();
    for i in 0..n {
        ship(
            &dir.0.join(format!("p{i}.wasm")),
            &variant(&voice, &format!("plugin-{i}")),
        )?;
        routes.push_str(&voice_route(&format!("r{i}"), &format!("p{i}")));
    }
    let start = || -> anyhow::Result<Duration> {
        let admin = crate::free_port()?;
        let text = config(upstream.addr(), admin, &dir.0, Some(&cache), &routes);
        let started = Instant::now();
        let proxy = BffProxy::start_config(&text, 1, None)?;
        let ready = started.elapsed();
        let last = format!("/r{}", n - 1);
        anyhow::ensure!(
            crate::http_get_header(proxy.addr(), &last, VERSION_HEADER)?.is_some(),
            "the last plugin serves"
        );
        // The compile cache holds optimized code only: a cold start fills it in the background.
        until_optimized(admin)?;
        Ok(ready)
    };
    let startup_cold = start()?;
    let mut warm = Vec::new();
    for _ in 0..opts.restarts {
        warm.push(start()?);
    }

    let report = ReloadReport {
        plugin_bytes: voice.len(),
        debounce_ms,
        swap_new: Spread::of(&new),
        swap_optimized: Spread::of(&optimized),
        swap_known: Spread::of(&back),
        generator: generator.name(),
        steady: median_by(&steady, |m| m.p99_us),
        storm: median_by(&storm, |m| m.p99_us),
        storm_reloads,
        startup_cold,
        startup_warm: Spread::of(&warm),
        restarts: warm.len(),
        startup_plugins: n,
    };
    if let Some(path) = &opts.json_out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(log, "results written to {}", path.display())?;
    }
    Ok(report)
}

impl ReloadReport {
    /// p99 latency during the storm over steady state.
    pub fn p99_ratio(&self) -> f64 {
        self.storm.p99_us / self.steady.p99_us.max(1.0)
    }

    /// A Markdown summary with the goals.
    pub fn render(&self) -> String {
        let ms = |us: f64| format!("{:.2} ms", us / 1000.0);
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        format!(
            "\n## Hot reload ({} B plugin, debounce {} ms)\n\n\
             | measure | p50 | p90 | max | goal |\n|---|---:|---:|---:|---|\n\
             | new version serving after the file settles (compiled) | {:.1} ms | {:.1} ms | {:.1} ms | < 300 ms: {} |\n\
             | ... and on optimized code (background compile done) | {:.1} ms | {:.1} ms | {:.1} ms | |\n\
             | earlier version back (already compiled) | {:.1} ms | {:.1} ms | {:.1} ms | |\n\
             | startup to ready, {} plugins, cache warm ({} restarts) | {:.1} ms | {:.1} ms | {:.1} ms | < 100 ms with 10: {} |\n\n\
             Startup with the cache cold: {:.1} ms.\n\n\
             | load on /v ({}) | req/s | p50 | p99 |\n|---|---:|---:|---:|\n\
             | steady | {:.0} | {} | {} |\n\
             | new version every 100 ms ({} shipped) | {:.0} | {} | {} |\n\n\
             p99 during the storm / steady: {:.2}x (goal < 2x: {})\n",
            self.plugin_bytes,
            self.debounce_ms,
            self.swap_new.p50_ms,
            self.swap_new.p90_ms,
            self.swap_new.max_ms,
            verdict(self.swap_new.p90_ms < 300.0),
            self.swap_optimized.p50_ms,
            self.swap_optimized.p90_ms,
            self.swap_optimized.max_ms,
            self.swap_known.p50_ms,
            self.swap_known.p90_ms,
            self.swap_known.max_ms,
            self.startup_plugins,
            self.restarts,
            self.startup_warm.p50_ms,
            self.startup_warm.p90_ms,
            self.startup_warm.max_ms,
            verdict(self.startup_plugins >= 10 && self.startup_warm.p50_ms < 100.0),
            self.startup_cold.as_secs_f64() * 1e3,
            self.generator,
            self.steady.rps,
            ms(self.steady.p50_us),
            ms(self.steady.p99_us),
            self.storm_reloads,
            self.storm.rps,
            ms(self.storm.p50_us),
            ms(self.storm.p99_us),
            self.p99_ratio(),
            verdict(self.p99_ratio() < 2.0),
        )
    }

    /// The figures as JSON.
    pub fn to_json(&self) -> Value {
        let m = |m: &Measurement| json!({ "rps": m.rps, "p50_us": m.p50_us, "p99_us": m.p99_us, "requests": m.requests });
        json!({
            "plugin_bytes": self.plugin_bytes,
            "debounce_ms": self.debounce_ms,
            "swap_new": self.swap_new.to_json(),
            "swap_optimized": self.swap_optimized.to_json(),
            "swap_known": self.swap_known.to_json(),
            "generator": self.generator,
            "steady": m(&self.steady),
            "storm": m(&self.storm),
            "storm_reloads": self.storm_reloads,
            "p99_ratio": self.p99_ratio(),
            "startup_plugins": self.startup_plugins,
            "startup_cold_ms": self.startup_cold.as_secs_f64() * 1e3,
            "startup_warm": self.startup_warm.to_json(),
        })
    }
}
