//! The response-cache benchmark (`cargo bench -p bff-proxy-benches --bench cache`): what
//! `[services.NAME.cache]` saves, through bff-proxy, in one run.
//!
//! Two in-process upstreams answer the 1 KB JSON body with `cache-control: max-age=600`: one
//! at once, one after 20 ms ([`SLOW_DELAY`]); each counts the requests it receives. Four
//! bff-proxy instances with the proxy bench's config (same route, worker count and pinning) sit
//! in front of them, with and without a `[services.upstream.cache]` section:
//!
//! | scenario | upstream | cache |
//! |---|---|---|
//! | `passthrough` | at once | off: the baseline |
//! | `hit` | at once | on: after the warm-up every request is a hit |
//! | `slow-upstream` | 20 ms | off |
//! | `slow-upstream-cached` | 20 ms | on: hits |
//!
//! The built-in load generator measures each scenario in interleaved rounds (the median round
//! by requests/s is reported, with the proxy's CPU time per request). Before every measured
//! round of a cached scenario the run checks that the proxy answers with `cache-status:
//! bff-proxy; hit`, and after it that the upstream received no request during the round; either
//! failing fails the run.
//!
//! Then **collapse**: a [`Burst`] of N concurrent `GET`s (one per connection, all opened up
//! front) of a path nobody has asked for yet, on the 20 ms upstream with the cache on, repeated
//! for R rounds with a new path each; the upstream must see exactly one request per round.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http::{HeaderName, HeaderValue, header};
use serde_json::{Value, json};

use crate::bff::BffProxy;
use crate::cpu;
use crate::load::{self, Burst, BurstAnswer, ClientShape, LoadSpec, Measurement};
use crate::pin;
use crate::report::TargetResult;
use crate::upstream::{Answer, Upstream, json_body};

/// How long the slow upstream takes to answer.
pub const SLOW_DELAY: Duration = Duration::from_millis(20);

/// What both upstreams say about their answers: fresh for 10 minutes, which the cached rounds
/// must fit in (a copy gone stale is fetched again by the check before the next round).
pub const CACHE_CONTROL: &str = "max-age=600";

/// The freshness [`CACHE_CONTROL`] gives; one measured round must be shorter.
const MAX_AGE: Duration = Duration::from_secs(600);

/// How a `cache-status` answered from a fresh copy starts.
pub const HIT: &str = "bff-proxy; hit";

/// The header the proxy reports what its cache did in (RFC 9211).
const CACHE_STATUS: &str = "cache-status";

/// The route prefix the collapse rounds ask under (a new path below it each round).
const COLLAPSE_PREFIX: &str = "/collapse/";

/// What one measured load looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// No cache, the upstream answers at once: the baseline.
    Passthrough,
    /// The cache on, the upstream answers at once: every measured request is a hit.
    Hit,
    /// No cache, the upstream takes [`SLOW_DELAY`].
    SlowUpstream,
    /// The cache on, the upstream takes [`SLOW_DELAY`]: every measured request is a hit.
    SlowUpstreamCached,
}

impl Scenario {
    /// Every scenario, in the order each round measures them.
    pub const ALL: [Self; 4] = [
        Self::Passthrough,
        Self::Hit,
        Self::SlowUpstream,
        Self::SlowUpstreamCached,
    ];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Hit => "hit",
            Self::SlowUpstream => "slow-upstream",
            Self::SlowUpstreamCached => "slow-upstream-cached",
        }
    }

    /// Whether its proxy has the cache on.
    pub fn cached(self) -> bool {
        matches!(self, Self::Hit | Self::SlowUpstreamCached)
    }

    /// Whether its upstream takes [`SLOW_DELAY`].
    pub fn slow(self) -> bool {
        matches!(self, Self::SlowUpstream | Self::SlowUpstreamCached)
    }

    /// Name of its proxy's threads (each proxy's own, so that CPU time is counted for the
    /// proxy under load only; none is a prefix of another, `/proc` keeps 15 bytes).
    fn threads(self) -> &'static [&'static str] {
        match self {
            Self::Passthrough => &["bench-cache-pt"],
            Self::Hit => &["bench-cache-hit"],
            Self::SlowUpstream => &["bench-cache-sp"],
            Self::SlowUpstreamCached => &["bench-cache-sc"],
        }
    }
}

/// Settings of the cache benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheOptions {
    /// Measured time per scenario per round.
    pub duration: Duration,
    /// Unmeasured load per scenario before the first round.
    pub warmup: Duration,
    /// Interleaved rounds; the median round is reported.
    pub rounds: usize,
    /// Closed-loop connections of the load generator.
    pub connections: usize,
    /// bff-proxy Tokio worker threads.
    pub workers: usize,
    /// Concurrent `GET`s of one new key per collapse round.
    pub collapse: usize,
    /// Collapse rounds, each with a new key.
    pub collapse_rounds: usize,
    /// Pin the generator and the servers to separate CPUs ([`pin`]) when `taskset` is there.
    pub pin: bool,
    /// Where to write the JSON results (`None`: nowhere).
    pub json_out: Option<PathBuf>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: 3,
            connections: 32,
            workers: 1,
            collapse: 64,
            collapse_rounds: 20,
            pin: true,
            json_out: Some(crate::default_json_path().with_file_name("bench-cache.json")),
        }
    }
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
cargo bench -p bff-proxy-benches --bench cache [-- OPTIONS]

Measures what the response cache ([services.NAME.cache]) saves through bff-proxy (1 KB JSON
body with cache-control: max-age=600, built-in load generator): passthrough (no cache), hit
(every request answered from memory), slow-upstream and slow-upstream-cached (the upstream
takes 20 ms), and collapse (N concurrent GETs of a new key reach the 20 ms upstream once).
Fails if a cached scenario is not answered from memory or a collapse round reaches the
upstream more than once.

  --quick               smoke run: 0.5 s per scenario, 0.1 s warm-up (at least 0.2 s),
                        1 round, 4 connections, collapse 16 GETs x 3 rounds
  --duration SECS       measured time per scenario per round (default 5; under 600)
  --warmup SECS         warm-up per scenario                  (default 1)
  --rounds N            interleaved rounds, median reported   (default 3)
  --connections N       closed-loop connections               (default 32)
  --workers N           bff-proxy worker threads              (default 1)
  --collapse N          concurrent GETs per collapse round    (default 64)
  --collapse-rounds R   collapse rounds, a new key each       (default 20)
  --no-pin              let the scheduler place threads (default: generator on the first CPU,
                        upstreams and proxies on the others, via taskset)
  --json PATH           results file (default target/bench-cache.json); --no-json to skip

BENCH_QUICK=1, BENCH_DURATION=N and BENCH_ROUNDS=N work too.
";

impl CacheOptions {
    /// Parses arguments (and `BENCH_*` variables); `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut o = Self::default();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if env("BENCH_QUICK").is_some_and(|v| !matches!(v.as_str(), "0" | "false" | "no")) {
            o.quick();
        }
        if let Some(d) = env("BENCH_DURATION") {
            o.duration = crate::parse_secs(&d).context("BENCH_DURATION")?;
        }
        if let Some(r) = env("BENCH_ROUNDS") {
            o.rounds = crate::parse_count(&r).context("BENCH_ROUNDS")?;
        }
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match a.as_str() {
                "--help" | "-h" => return Ok(None),
                "--bench" => {}
                "--quick" => o.quick(),
                "--duration" => o.duration = crate::parse_secs(&value("--duration")?)?,
                "--warmup" => o.warmup = crate::parse_secs(&value("--warmup")?)?,
                "--rounds" => o.rounds = crate::parse_count(&value("--rounds")?)?,
                "--connections" => o.connections = crate::parse_count(&value("--connections")?)?,
                "--workers" => o.workers = crate::parse_count(&value("--workers")?)?,
                "--collapse" => o.collapse = crate::parse_count(&value("--collapse")?)?,
                "--collapse-rounds" => {
                    o.collapse_rounds = crate::parse_count(&value("--collapse-rounds")?)?;
                }
                "--no-pin" => o.pin = false,
                "--json" => o.json_out = Some(value("--json")?.into()),
                "--no-json" => o.json_out = None,
                other => bail!("unknown option `{other}` (see --help)"),
            }
        }
        anyhow::ensure!(
            o.duration < MAX_AGE,
            "--duration must be under {} s: a measured round must fit in the copy's freshness \
             ({CACHE_CONTROL})",
            MAX_AGE.as_secs()
        );
        anyhow::ensure!(
            o.collapse <= 1024,
            "--collapse opens one connection per GET: at most 1024"
        );
        anyhow::ensure!(o.collapse_rounds <= 1000, "--collapse-rounds: at most 1000");
        Ok(Some(o))
    }

    fn quick(&mut self) {
        self.duration = Duration::from_millis(500);
        self.warmup = Duration::from_millis(100);
        self.rounds = 1;
        self.connections = 4;
        self.collapse = 16;
        self.collapse_rounds = 3;
    }
}

/// The proxy bench's config with the cache on for its service (the defaults: 64 MiB, 1 MiB
/// objects), and a route `GET /collapse/{*rest}` to the same service for the collapse rounds.
pub fn cached_config(base: &str) -> String {
    format!(
        r#"{base}
[services.upstream.cache]

[[routes]]
id = "collapse"
methods = ["GET"]
path = "{COLLAPSE_PREFIX}{{*rest}}"
service = "upstream"
"#
    )
}

// === Checks ===

/// The `cache-status` of a `GET path` at `proxy` (on a new connection; it must be a 200).
fn cache_status(proxy: SocketAddr, path: &str) -> anyhow::Result<Option<String>> {
    crate::http_get_header(proxy, path, CACHE_STATUS)
}

/// Makes sure `proxy` answers `GET path` from a fresh copy: a first `GET` (a miss that stores
/// the answer when there is no copy yet, or it went stale), then, unless that was already a
/// hit, a second one that must be. Returns the hit's `cache-status`.
fn check_hit(proxy: SocketAddr, path: &str) -> anyhow::Result<String> {
    let first = cache_status(proxy, path)?;
    if let Some(status) = first.as_ref().filter(|s| s.starts_with(HIT)) {
        return Ok(status.clone());
    }
    let second = cache_status(proxy, path)?;
    match second {
        Some(status) if status.starts_with(HIT) => Ok(status),
        other => bail!(
            "GET {path} at {proxy} was not answered from the cache: cache-status {other:?} \
             (the GET before it: {first:?}); expected `{HIT}; ...`"
        ),
    }
}

/// Makes sure `proxy` has no cache: its answer carries no `cache-status`.
fn check_no_cache(proxy: SocketAddr, path: &str) -> anyhow::Result<()> {
    if let Some(status) = cache_status(proxy, path)? {
        bail!("GET {path} at {proxy} has cache-status `{status}`, but its cache should be off");
    }
    Ok(())
}

// === Results ===

/// One scenario's result.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioResult {
    /// The median round, the rounds' requests/s, failures.
    pub result: TargetResult,
    /// Requests measured, over all rounds.
    pub requests: u64,
    /// Requests the upstream received during the measured rounds (0 for a cached scenario:
    /// checked).
    pub upstream_requests: u64,
    /// Requests the upstream received during the checks and the warm-up.
    pub warmup_upstream_requests: u64,
}

/// One collapse round.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseRound {
    /// Requests the upstream received during the round (1: checked).
    pub upstream_requests: u64,
    /// Median latency of the round's requests, microseconds.
    pub p50_us: f64,
    /// Slowest request of the round, microseconds.
    pub max_us: f64,
    /// Answers fetched from the upstream (`cache-status: ...; fwd=uri-miss; ...`).
    pub misses: usize,
    /// Answers that waited for another request's fetch (`...; collapsed`).
    pub collapsed: usize,
    /// Answers from the stored copy (`bff-proxy; hit; ...`): asked after it was stored.
    pub hits: usize,
}

impl CollapseRound {
    /// Tallies a round's answers; fails unless every one is a 200 with the whole body.
    fn of(
        answers: &[BurstAnswer],
        body_bytes: usize,
        upstream_requests: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!answers.is_empty(), "a burst without answers");
        for a in answers {
            anyhow::ensure!(
                a.status == 200 && a.body_bytes == body_bytes,
                "an answer of the burst: status {}, {} of {body_bytes} body bytes",
                a.status,
                a.body_bytes
            );
        }
        let mut us: Vec<f64> = answers
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1e6)
            .collect();
        us.sort_by(f64::total_cmp);
        let count = |f: &dyn Fn(&str) -> bool| {
            answers
                .iter()
                .filter(|a| f(a.header.as_deref().unwrap_or("")))
                .count()
        };
        Ok(Self {
            upstream_requests,
            p50_us: us[(us.len() - 1) / 2],
            max_us: us[us.len() - 1],
            misses: count(&|s| s.contains("fwd=uri-miss") && !s.contains("collapsed")),
            collapsed: count(&|s| s.contains("collapsed")),
            hits: count(&|s| s.starts_with(HIT)),
        })
    }
}

/// The collapse part.
#[derive(Debug, Clone, PartialEq)]
pub struct CollapseResult {
    /// Concurrent `GET`s per round.
    pub concurrency: usize,
    /// Every round, in order.
    pub rounds: Vec<CollapseRound>,
}

/// The median and the largest of `values` (`0.0` for none).
fn median_max(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    match values.last() {
        None => (0.0, 0.0),
        Some(&max) => (values[(values.len() - 1) / 2], max),
    }
}

impl CollapseResult {
    /// The fewest and most upstream requests in a round.
    pub fn upstream_range(&self) -> (u64, u64) {
        let per = self.rounds.iter().map(|r| r.upstream_requests);
        (per.clone().min().unwrap_or(0), per.max().unwrap_or(0))
    }

    /// Median and worst over the rounds of each round's p50, microseconds.
    pub fn p50_us(&self) -> (f64, f64) {
        median_max(self.rounds.iter().map(|r| r.p50_us).collect())
    }

    /// Median and worst over the rounds of each round's slowest request, microseconds.
    pub fn max_us(&self) -> (f64, f64) {
        median_max(self.rounds.iter().map(|r| r.max_us).collect())
    }
}

/// Everything the cache benchmark measured.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheReport {
    /// The load generator.
    pub generator: String,
    /// Upstream response body length.
    pub body_bytes: usize,
    /// The `cache-status` of the first hit check (the hit scenario's).
    pub hit_status: String,
    /// Duration, rounds, connections, workers, pinning, delay.
    pub settings: Value,
    /// One result per scenario, in [`Scenario::ALL`] order.
    pub scenarios: Vec<ScenarioResult>,
    /// The collapse rounds.
    pub collapse: CollapseResult,
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

fn opt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{u:.1}"))
}

impl CacheReport {
    /// The result of `scenario`, if it was measured.
    pub fn get(&self, scenario: Scenario) -> Option<&ScenarioResult> {
        self.scenarios
            .iter()
            .find(|s| s.result.target == scenario.name())
    }

    fn median(&self, scenario: Scenario) -> Option<&Measurement> {
        self.get(scenario).map(|s| &s.result.median)
    }

    /// Proxy CPU per request of `a` over that of `b`.
    fn cpu_ratio(&self, a: Scenario, b: Scenario) -> Option<f64> {
        let a = self.median(a)?.proxy_cpu_us?;
        let b = self.median(b)?.proxy_cpu_us?;
        (b > 0.0).then(|| a / b)
    }

    /// Failed requests over every measured round of every scenario.
    pub fn failures(&self) -> u64 {
        self.scenarios
            .iter()
            .map(|s| s.result.non_2xx + s.result.errors)
            .sum()
    }

    /// The Markdown tables, then what they show.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let workers = self.settings["workers"].as_u64().unwrap_or(1);
        let connections = self.settings["connections"].as_u64().unwrap_or(0);
        let delay = self.settings["slow_delay_ms"].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            out,
            "\n### Response cache through bff-proxy ({workers} worker{}, {connections} \
             connections, {} B JSON body, `cache-control: {CACHE_CONTROL}`)\n",
            if workers == 1 { "" } else { "s" },
            self.body_bytes
        );
        let _ = writeln!(
            out,
            "| scenario | req/s | p50 | p99 | proxy CPU/req (µs) | upstream CPU/req (µs) | \
             upstream requests / requests measured |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for s in &self.scenarios {
            let m = &s.result.median;
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} | {} | {} | {} | {} / {} |",
                s.result.target,
                m.rps,
                ms(m.p50_us),
                ms(m.p99_us),
                opt_us(m.proxy_cpu_us),
                opt_us(m.upstream_cpu_us),
                s.upstream_requests,
                s.requests,
            );
        }
        let c = &self.collapse;
        let (lo, hi) = c.upstream_range();
        let (p50_med, p50_worst) = c.p50_us();
        let (max_med, max_worst) = c.max_us();
        let upstream = if lo == hi {
            format!("{lo} (every round)")
        } else {
            format!("{lo}-{hi}")
        };
        let _ = writeln!(
            out,
            "\n| collapse: concurrent GETs of a new key, {delay:.0} ms upstream | rounds | \
             upstream requests per round | round p50 (median / worst round) | round max \
             (median / worst round) | answers: fetched / collapsed / hit |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
        let _ = writeln!(
            out,
            "| {} | {} | {upstream} | {} / {} | {} / {} | {} / {} / {} |",
            c.concurrency,
            c.rounds.len(),
            ms(p50_med),
            ms(p50_worst),
            ms(max_med),
            ms(max_worst),
            c.rounds.iter().map(|r| r.misses).sum::<usize>(),
            c.rounds.iter().map(|r| r.collapsed).sum::<usize>(),
            c.rounds.iter().map(|r| r.hits).sum::<usize>(),
        );
        let _ = writeln!(
            out,
            "\nChecked before every measured round of a cached scenario: `cache-status: {}`; \
             after it: the upstream received no request during the round.",
            self.hit_status
        );
        if let Some(r) = self.cpu_ratio(Scenario::Hit, Scenario::Passthrough) {
            let _ = writeln!(
                out,
                "- hit vs passthrough: proxy CPU/req {r:.2}×{}",
                match (
                    self.median(Scenario::Hit),
                    self.median(Scenario::Passthrough)
                ) {
                    (Some(h), Some(p)) if p.rps > 0.0 => format!(", req/s {:.2}×", h.rps / p.rps),
                    _ => String::new(),
                }
            );
        }
        if let (Some(slow), Some(cached)) = (
            self.median(Scenario::SlowUpstream),
            self.median(Scenario::SlowUpstreamCached),
        ) {
            let _ = writeln!(
                out,
                "- {delay:.0} ms upstream: p50 {} without the cache, {} with it (p99 {} / {})",
                ms(slow.p50_us),
                ms(cached.p50_us),
                ms(slow.p99_us),
                ms(cached.p99_us)
            );
        }
        crate::report::write_other_load(
            &mut out,
            self.scenarios.iter().map(|s| s.result.max_other_cpus),
        );
        if self.failures() == 0 {
            let _ = writeln!(
                out,
                "\nEvery measured request got a 2xx (no errors, no other status)."
            );
        } else {
            for s in self
                .scenarios
                .iter()
                .filter(|s| s.result.non_2xx + s.result.errors > 0)
            {
                let _ = writeln!(
                    out,
                    "\nWARNING: {}: {} non-2xx responses, {} errors (all rounds)",
                    s.result.target, s.result.non_2xx, s.result.errors
                );
            }
        }
        out
    }

    /// The figures as JSON (`target/bench-cache.json`).
    pub fn to_json(&self) -> Value {
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|s| {
                let t = &s.result;
                json!({
                    "scenario": t.target,
                    "rps": t.median.rps,
                    "p50_us": t.median.p50_us,
                    "p99_us": t.median.p99_us,
                    "requests_median_round": t.median.requests,
                    "proxy_cpu_us_per_request": t.median.proxy_cpu_us,
                    "upstream_cpu_us_per_request": t.median.upstream_cpu_us,
                    "max_other_load_cpus": t.max_other_cpus,
                    "rounds_rps": t.rounds_rps,
                    "requests_all_rounds": s.requests,
                    "upstream_requests_all_rounds": s.upstream_requests,
                    "upstream_requests_warmup": s.warmup_upstream_requests,
                    "non_2xx": t.non_2xx,
                    "errors": t.errors,
                })
            })
            .collect();
        let rounds: Vec<Value> = self
            .collapse
            .rounds
            .iter()
            .map(|r| {
                json!({
                    "upstream_requests": r.upstream_requests,
                    "p50_us": r.p50_us,
                    "max_us": r.max_us,
                    "fetched": r.misses,
                    "collapsed": r.collapsed,
                    "hits": r.hits,
                })
            })
            .collect();
        json!({
            "generator": self.generator,
            "body_bytes": self.body_bytes,
            "cache_control": CACHE_CONTROL,
            "hit_status": self.hit_status,
            "settings": self.settings,
            "scenarios": scenarios,
            "collapse": { "concurrency": self.collapse.concurrency, "rounds": rounds },
        })
    }
}

// === The run ===

/// One proxy under test and the upstream behind it.
struct Target<'a> {
    scenario: Scenario,
    proxy: BffProxy,
    upstream: &'a Upstream,
}

/// Runs the benchmark, writing progress lines to `log`.
pub fn run(opts: &CacheOptions, log: &mut dyn Write) -> anyhow::Result<CacheReport> {
    let generator = "built-in (hyper client, closed loop)".to_owned();
    writeln!(log, "load generator: {generator}")?;
    let layout = crate::pin_layout(opts.pin, log)?;
    let servers = layout.as_ref().map(|l| l.servers.as_str());
    let generator_cpu = layout.as_ref().map(|l| l.generator.clone());

    let body = json_body(1024);
    let answer = |delay| Answer {
        delay,
        headers: vec![(
            header::CACHE_CONTROL,
            HeaderValue::from_static(CACHE_CONTROL),
        )],
    };
    let fast = Upstream::start_answering(body.clone(), answer(Duration::ZERO), 1, servers)?;
    let slow = Upstream::start_answering(body, answer(SLOW_DELAY), 1, servers)?;
    let pool = opts.connections.max(opts.collapse).max(64);
    let targets: Vec<Target<'_>> = Scenario::ALL
        .iter()
        .map(|&scenario| {
            let upstream = if scenario.slow() { &slow } else { &fast };
            let (proxy, _admin) = BffProxy::start_edited(
                upstream.addr(),
                opts.workers,
                pool,
                servers,
                scenario.threads()[0],
                |c| {
                    if scenario.cached() {
                        cached_config(&c)
                    } else {
                        c
                    }
                },
            )?;
            Ok(Target {
                scenario,
                proxy,
                upstream,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    writeln!(
        log,
        "upstreams: at once {}, {} ms {} ({} B body, cache-control: {CACHE_CONTROL})",
        fast.addr(),
        SLOW_DELAY.as_millis(),
        slow.addr(),
        fast.body_len()
    )?;
    for t in &targets {
        writeln!(
            log,
            "  {:<21} bff-proxy {}",
            t.scenario.name(),
            t.proxy.addr()
        )?;
    }

    let spec = LoadSpec {
        connections: opts.connections,
        threads: 1,
        duration: opts.duration,
        pin: generator_cpu.clone(),
    };
    let plain = ClientShape::default();

    // Checks and warm-up: a cached proxy answers from memory, the others have no cache; every
    // warm-up request gets a 2xx.
    let warm = LoadSpec {
        duration: opts.warmup.max(Duration::from_millis(200)),
        ..spec.clone()
    };
    let mut hit_status = String::new();
    let mut warmup_upstream = Vec::with_capacity(targets.len());
    for t in &targets {
        let name = t.scenario.name();
        let before = t.upstream.requests();
        if t.scenario.cached() {
            let status = check_hit(t.proxy.addr(), crate::PATH)
                .with_context(|| format!("checking {name}"))?;
            writeln!(log, "{name}: cache-status: {status}")?;
            if hit_status.is_empty() {
                hit_status = status;
            }
        } else {
            check_no_cache(t.proxy.addr(), crate::PATH)
                .with_context(|| format!("checking {name}"))?;
        }
        let m = load::run_shaped(t.proxy.addr(), crate::PATH, &warm, &plain)
            .with_context(|| format!("warming up {name}"))?;
        anyhow::ensure!(
            m.requests > 0 && m.non_2xx == 0 && m.errors == 0,
            "warming up {name}: {} requests, {} non-2xx, {} errors",
            m.requests,
            m.non_2xx,
            m.errors
        );
        let reached = t.upstream.requests() - before;
        writeln!(
            log,
            "{name} warm-up: {} requests, {reached} reached the upstream (checks included)",
            m.requests
        )?;
        warmup_upstream.push(reached);
    }

    let mut rounds: Vec<Vec<Measurement>> = vec![Vec::new(); targets.len()];
    let mut upstream_requests = vec![0_u64; targets.len()];
    for round in 1..=opts.rounds {
        for (i, t) in targets.iter().enumerate() {
            let name = t.scenario.name();
            if t.scenario.cached() {
                check_hit(t.proxy.addr(), crate::PATH)
                    .with_context(|| format!("checking {name} before round {round}"))?;
            }
            let source = cpu::Source::Threads(t.scenario.threads());
            let upstream_before = t.upstream.requests();
            let before = cpu::snapshot(&source, None);
            let mut m = load::run_shaped(t.proxy.addr(), crate::PATH, &spec, &plain)
                .with_context(|| format!("measuring {name}"))?;
            let usage = before.usage_until(&cpu::snapshot(&source, None));
            let reached = t.upstream.requests() - upstream_before;
            if t.scenario.cached() && reached > 0 {
                bail!(
                    "{name}, round {round}: the upstream received {reached} requests during the \
                     measured load, which should all have been cache hits"
                );
            }
            upstream_requests[i] += reached;
            let requests = m.requests as f64;
            let per_req = |s: Option<f64>| s.filter(|_| requests > 0.0).map(|s| s * 1e6 / requests);
            m.proxy_cpu_us = per_req(usage.target_s);
            m.upstream_cpu_us = per_req(usage.upstream_s);
            m.other_cpus = usage.other_cpus;
            writeln!(
                log,
                "  round {round}/{}: {name:<20} {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  \
                 CPU/req proxy {} upstream {} us  upstream requests {reached}  other load {}{}",
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
    let scenarios = targets
        .iter()
        .zip(&rounds)
        .zip(upstream_requests.iter().zip(&warmup_upstream))
        .filter_map(|((t, r), (&upstream, &warmup))| {
            Some(ScenarioResult {
                result: TargetResult::from_rounds(t.scenario.name(), r)?,
                requests: r.iter().map(|m| m.requests).sum(),
                upstream_requests: upstream,
                warmup_upstream_requests: warmup,
            })
        })
        .collect();

    let collapse_target = targets
        .iter()
        .find(|t| t.scenario == Scenario::SlowUpstreamCached)
        .context("the slow cached proxy")?;
    let collapse = collapse(collapse_target, opts, generator_cpu.as_deref(), log)?;

    let report = CacheReport {
        generator,
        body_bytes: fast.body_len(),
        hit_status,
        settings: json!({
            "duration_s": opts.duration.as_secs_f64(),
            "warmup_s": opts.warmup.as_secs_f64(),
            "rounds": opts.rounds,
            "connections": opts.connections,
            "workers": opts.workers,
            "slow_delay_ms": SLOW_DELAY.as_secs_f64() * 1000.0,
            "collapse": opts.collapse,
            "collapse_rounds": opts.collapse_rounds,
            "pinning": layout.as_ref().map(pin::Layout::describe),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        }),
        scenarios,
        collapse,
    };
    // Stop the proxies before their upstreams.
    drop(targets);
    drop((fast, slow));
    if let Some(path) = &opts.json_out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&report.to_json())?)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(log, "\nresults written to {}", path.display())?;
    }
    Ok(report)
}

/// The collapse rounds on `target` (the slow upstream, cache on): each round fires
/// `opts.collapse` simultaneous `GET`s of a path not asked for before; fails if the upstream
/// receives anything but exactly one request in a round.
fn collapse(
    target: &Target<'_>,
    opts: &CacheOptions,
    generator_cpu: Option<&str>,
    log: &mut dyn Write,
) -> anyhow::Result<CollapseResult> {
    let mut burst = Burst::open(target.proxy.addr(), opts.collapse, generator_cpu)
        .context("opening the collapse connections")?;
    let status = HeaderName::from_static(CACHE_STATUS);
    let mut rounds = Vec::with_capacity(opts.collapse_rounds);
    for round in 1..=opts.collapse_rounds {
        let path = format!("{COLLAPSE_PREFIX}round-{round}");
        let before = target.upstream.requests();
        let answers = burst
            .fire(&path, &status)
            .with_context(|| format!("collapse round {round}"))?;
        let reached = target.upstream.requests() - before;
        anyhow::ensure!(
            reached == 1,
            "collapse round {round}: {} concurrent GETs of {path} reached the upstream {reached} \
             times, not once",
            opts.collapse
        );
        let r = CollapseRound::of(&answers, target.upstream.body_len(), reached)
            .with_context(|| format!("collapse round {round}"))?;
        writeln!(
            log,
            "  collapse {round}/{}: {} GETs, upstream requests {reached}, p50 {:.3} ms, max \
             {:.3} ms, fetched {} collapsed {} hit {}",
            opts.collapse_rounds,
            answers.len(),
            r.p50_us / 1000.0,
            r.max_us / 1000.0,
            r.misses,
            r.collapsed,
            r.hits
        )?;
        rounds.push(r);
    }
    Ok(CollapseResult {
        concurrency: opts.collapse,
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> CacheOptions {
        CacheOptions::parse(args.iter().map(|s| (*s).to_owned()))
            .expect("valid options")
            .expect("not --help")
    }

    #[test]
    fn parses_options() {
        let o = parse(&["--bench", "--duration", "2", "--collapse", "8"]);
        assert_eq!(o.duration, Duration::from_secs(2));
        assert_eq!(o.collapse, 8);
        assert_eq!(o.collapse_rounds, 20);
        let q = parse(&["--quick", "--connections", "2"]);
        assert_eq!(q.duration, Duration::from_millis(500));
        assert_eq!(q.rounds, 1);
        assert_eq!(q.connections, 2);
        assert_eq!(q.collapse_rounds, 3);
        assert!(CacheOptions::parse(["--duration".to_owned(), "600".to_owned()]).is_err());
        assert!(CacheOptions::parse(["--collapse".to_owned(), "0".to_owned()]).is_err());
        assert!(CacheOptions::parse(["--nope".to_owned()]).is_err());
        assert!(
            CacheOptions::parse(["--help".to_owned()])
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn cached_config_is_accepted_by_bff_proxy() {
        let up: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let text = cached_config(&crate::bff::config_toml(up, 9, 1, 64));
        let cfg = bff_proxy::Config::from_toml(&text, "bench").expect("valid config");
        assert_eq!(cfg.routes.len(), 2);
        let service = &cfg.services["upstream"];
        assert_eq!(
            service.cache,
            Some(bff_proxy::config::CacheConfig::default())
        );
    }

    #[test]
    fn collapse_rounds_are_tallied() {
        let answer = |ms: u64, status: &str| BurstAnswer {
            status: 200,
            latency: Duration::from_millis(ms),
            body_bytes: 10,
            header: Some(status.to_owned()),
        };
        let answers = [
            answer(20, "bff-proxy; fwd=uri-miss; fwd-status=200; stored"),
            answer(21, "bff-proxy; fwd=uri-miss; collapsed"),
            answer(22, "bff-proxy; fwd=uri-miss; collapsed"),
            answer(1, "bff-proxy; hit; ttl=599"),
        ];
        let r = CollapseRound::of(&answers, 10, 1).expect("all 200");
        assert_eq!((r.misses, r.collapsed, r.hits), (1, 2, 1));
        assert!((r.p50_us - 20_000.0).abs() < 1.0, "{}", r.p50_us);
        assert!((r.max_us - 22_000.0).abs() < 1.0, "{}", r.max_us);
        assert!(CollapseRound::of(&answers, 11, 1).is_err());
        assert_eq!(median_max(vec![3.0, 1.0, 2.0]), (2.0, 3.0));
    }
}
