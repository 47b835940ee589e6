//! The plugin benchmark (`cargo bench -p bff-proxy-benches --bench plugins`): what Wasm plugins
//! cost, in three parts, each in one run.
//!
//! 1. **Hop**: one `fields` reshape of a 1 KB and a 20 KB JSON body, done natively in the host
//!    (the plugin crate's own `Fields::reshape`, linked as a Rust library: parse, reshape,
//!    serialize), as the isolated Wasm hop a request pays (fresh instance from the pool,
//!    config parsed, body copied in, the same reshape, body copied out), and as the hop of a
//!    use with `instances = "reused"` (an idle instance, no instantiation or reset), alternating
//!    every 2 ms so all three see the same machine state.
//! 2. **Chain**: requests/s and latency through bff-proxy for a route with three body-reading
//!    plugins, the same with reused instances, and the same route without plugins (same
//!    upstream, same load).
//! 3. **Aggregation**: `aggregate` calling three services that each answer after 20 ms; the
//!    latency should be about 20 ms, not the 60 ms of calling them one after another.
//!
//! The example plugins are built from source first (`plugins/`, release, wasm32-wasip2).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bff_plugin_sdk::Plugin as _;
use bff_proxy::plugins::Instances;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::bff::BffProxy;
use crate::load::{self, Generator, LoadSpec, Measurement};
use crate::upstream::{Upstream, json_body};

/// Settings of the plugin benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginOptions {
    /// Measured time per target per round.
    pub duration: Duration,
    /// Unmeasured time per target first.
    pub warmup: Duration,
    /// Interleaved rounds per part; the median round is reported.
    pub rounds: usize,
    /// Where to write the JSON results (`None`: nowhere).
    pub json_out: Option<PathBuf>,
    /// Run only this part (`hop`, `chain` or `aggregate`), e.g. for profiling.
    pub only: Option<String>,
    /// Use the built-in load generator even if wrk is installed.
    pub builtin: bool,
}

impl Default for PluginOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: 3,
            json_out: Some(crate::default_json_path().with_file_name("bench-plugins.json")),
            only: None,
            builtin: false,
        }
    }
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
cargo bench -p bff-proxy-benches --bench plugins [-- OPTIONS]

Measures the cost of Wasm plugins: one fields reshape natively vs as an isolated Wasm hop vs
on a reused instance (265 B, 1 KB and 20 KB JSON), a three-plugin chain (fresh and reused
instances) vs no plugins through bff-proxy, and aggregate over three services that each take
20 ms.

  --quick           smoke run: 0.5 s per target, 0.1 s warm-up, 1 round
  --duration SECS   measured time per target per round (default 5)
  --rounds N        interleaved rounds, median reported (default 3)
  --json PATH       results file (default target/bench-plugins.json); --no-json to skip
  --only PART       run one part: hop, chain or aggregate (prints that part only)
  --builtin         use the built-in load generator even if wrk is installed

BENCH_QUICK=1, BENCH_DURATION=N and BENCH_ROUNDS=N work too.
";

impl PluginOptions {
    /// Parses arguments (and `BENCH_*` variables); `Ok(None)` for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut o = Self::default();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if env("BENCH_QUICK").is_some() {
            o.quick();
        }
        if let Some(d) = env("BENCH_DURATION") {
            o.duration = Duration::from_secs_f64(d.parse().context("BENCH_DURATION")?);
        }
        if let Some(r) = env("BENCH_ROUNDS") {
            o.rounds = r.parse().context("BENCH_ROUNDS")?;
        }
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match a.as_str() {
                "--help" | "-h" => return Ok(None),
                "--bench" => {}
                "--quick" => o.quick(),
                "--duration" => {
                    o.duration = Duration::from_secs_f64(value("--duration")?.parse()?);
                }
                "--rounds" => o.rounds = value("--rounds")?.parse()?,
                "--json" => o.json_out = Some(value("--json")?.into()),
                "--no-json" => o.json_out = None,
                "--builtin" => o.builtin = true,
                "--only" => {
                    let part = value("--only")?;
                    anyhow::ensure!(
                        ["hop", "chain", "aggregate"].contains(&part.as_str()),
                        "--only takes hop, chain or aggregate, not `{part}`"
                    );
                    o.only = Some(part);
                }
                other => anyhow::bail!("unknown option `{other}` (see --help)"),
            }
        }
        anyhow::ensure!(o.rounds >= 1, "--rounds must be at least 1");
        Ok(Some(o))
    }

    fn quick(&mut self) {
        self.duration = Duration::from_millis(500);
        self.warmup = Duration::from_millis(100);
        self.rounds = 1;
    }
}

/// Per-operation timing of a loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OpStats {
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
}

/// Per-call times of one operation, and the time spent in it.
struct OpTimer {
    hist: Histogram<u64>,
    busy: Duration,
}

impl OpTimer {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"),
            busy: Duration::ZERO,
        }
    }

    /// Runs `op` until `slice` has passed, timing each call.
    fn run_for(&mut self, slice: Duration, op: &mut dyn FnMut()) {
        let start = Instant::now();
        while start.elapsed() < slice {
            let t = Instant::now();
            op();
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ = self.hist.record(ns.max(1));
        }
        self.busy += start.elapsed();
    }

    fn stats(&self) -> OpStats {
        OpStats {
            ops_per_sec: self.hist.len() as f64 / self.busy.as_secs_f64(),
            p50_us: self.hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_us: self.hist.value_at_quantile(0.99) as f64 / 1000.0,
        }
    }
}

/// Runs each of `ops` for `duration`, taking turns every 2 ms so all see the same machine:
/// this VM switches between a fast and a slow state every few seconds, which back-to-back
/// runs of each would turn into a ratio of states instead of a ratio of costs.
fn time_interleaved(duration: Duration, ops: &mut [&mut dyn FnMut()]) -> Vec<OpStats> {
    const SLICE: Duration = Duration::from_millis(2);
    let mut timers: Vec<OpTimer> = ops.iter().map(|_| OpTimer::new()).collect();
    while timers.iter().any(|t| t.busy < duration) {
        for (t, op) in timers.iter_mut().zip(ops.iter_mut()) {
            t.run_for(SLICE, op);
        }
    }
    timers.iter().map(OpTimer::stats).collect()
}

/// The median (by the key) of `items`.
fn median_by<T: Clone>(items: &[T], key: impl Fn(&T) -> f64) -> T {
    let mut v: Vec<T> = items.to_vec();
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2].clone()
}

/// The `fields` config of the hop part: keep a few fields of every product, rename one.
pub fn hop_config() -> Value {
    json!({
        "allow": ["total", "items[].id", "items[].name", "items[].price.amount", "items[].in_stock"],
        "rename": {"items[].price": "cost"},
    })
}

/// Part 1 for one body.
#[derive(Debug, Clone, PartialEq)]
pub struct HopResult {
    /// Input body length.
    pub body_bytes: usize,
    /// Output body length (the same for both).
    pub out_bytes: usize,
    /// The transform in the host.
    pub native: OpStats,
    /// The isolated Wasm hop (a fresh instance per call).
    pub wasm: OpStats,
    /// The Wasm hop of a use with `instances = "reused"`.
    pub reused: OpStats,
}

impl HopResult {
    /// Median isolated Wasm hop time over median native time.
    pub fn ratio(&self) -> f64 {
        self.wasm.p50_us / self.native.p50_us
    }

    /// Median reused-instance hop time over median native time.
    pub fn reused_ratio(&self) -> f64 {
        self.reused.p50_us / self.native.p50_us
    }
}

fn hop(plugins: &Path, size: usize, opts: &PluginOptions) -> anyhow::Result<HopResult> {
    let body = json_body(size).to_vec();
    let native = fields::Fields::new(serde_json::from_value(hop_config())?)
        .map_err(|e| anyhow::anyhow!("fields config: {e}"))?;
    let native_op = |body: &[u8]| -> Vec<u8> {
        let doc: Value = serde_json::from_slice(body).expect("bench body is JSON");
        serde_json::to_vec(&native.reshape(doc)).expect("serializes")
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let load = |instances| {
        rt.block_on(bff_proxy::plugins::Hop::load(
            plugins,
            "fields",
            &hop_config(),
            instances,
        ))
        .map_err(|e| anyhow::anyhow!("loading fields.wasm: {e}"))
    };
    let fresh = load(Instances::PerRequest)?;
    let reused = load(Instances::Reused)?;
    let wasm_op = |hop: &bff_proxy::plugins::Hop, body: &[u8]| -> Vec<u8> {
        rt.block_on(hop.on_response(body.to_vec()))
            .expect("the fields hop succeeds")
    };
    let expected = native_op(&body);
    for hop in [&fresh, &reused] {
        anyhow::ensure!(
            wasm_op(hop, &body) == expected,
            "the Wasm hop and the native transform disagree"
        );
    }
    let mut native_loop = || drop(native_op(&body));
    let mut fresh_loop = || drop(wasm_op(&fresh, &body));
    let mut reused_loop = || drop(wasm_op(&reused, &body));
    let mut ops: [&mut dyn FnMut(); 3] = [&mut native_loop, &mut fresh_loop, &mut reused_loop];
    let _ = time_interleaved(opts.warmup, &mut ops);
    let mut rounds = Vec::new();
    for _ in 0..opts.rounds {
        rounds.push(time_interleaved(opts.duration, &mut ops));
    }
    let median = |k: usize| {
        let of_k: Vec<OpStats> = rounds.iter().map(|r| r[k]).collect();
        median_by(&of_k, |s| s.p50_us)
    };
    Ok(HopResult {
        body_bytes: body.len(),
        out_bytes: expected.len(),
        native: median(0),
        wasm: median(1),
        reused: median(2),
    })
}

/// Part 2: the same upstream and load without plugins and through a three-plugin chain.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainResult {
    /// Upstream body length.
    pub body_bytes: usize,
    /// Response body length through the chain.
    pub chain_out_bytes: u64,
    /// `GET /pass`: no plugins.
    pub passthrough: Measurement,
    /// `GET /chain3`: three `fields` uses that read and rewrite the body.
    pub chain: Measurement,
    /// `GET /chain3-reused`: the same with `instances = "reused"`.
    pub chain_reused: Measurement,
}

/// The chain part's proxy config.
fn chain_config(upstream: std::net::SocketAddr, plugins: &Path, admin: u16) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:{admin}"
[server]
worker_threads = 1
drain_timeout = "1s"
[identity]
default_client = "web"
[services.upstream]
urls = ["http://{upstream}"]
protocol = "http1"
max_idle_connections = 64
[[clients]]
name = "web"
[plugins]
dir = {dir:?}

[[routes]]
id = "pass"
path = "/pass"
service = "upstream"

{chain3}
{chain3_reused}"#,
        dir = plugins.display().to_string(),
        chain3 = chain3_route("chain3", "per-request"),
        chain3_reused = chain3_route("chain3-reused", "reused"),
    )
}

/// A route `/<id>` with three `fields` uses that each read and rewrite the body.
fn chain3_route(id: &str, instances: &str) -> String {
    let step = |config: &str| {
        format!(
            "[[routes.chain]]\nplugin = \"fields\"\ninstances = \"{instances}\"\nconfig = {config}\n"
        )
    };
    format!(
        "[[routes]]\nid = \"{id}\"\npath = \"/{id}\"\nservice = \"upstream\"\n{}{}{}\n",
        step(r#"{ rename = { "items[].name" = "title" } }"#),
        step(r#"{ deny = ["items[].tags", "items[].image"] }"#),
        step(
            r#"{ allow = ["total", "items[].id", "items[].name", "items[].price", "items[].sku"] }"#
        ),
    )
}

fn chain(
    plugins: &Path,
    opts: &PluginOptions,
    generator: &Generator,
) -> anyhow::Result<ChainResult> {
    let up = Upstream::start(json_body(1024), 1, None)?;
    let admin = crate::free_port()?;
    let proxy = BffProxy::start_config(&chain_config(up.addr(), plugins, admin), 1, None)?;
    let spec = |duration| LoadSpec {
        connections: 32,
        threads: 1,
        duration,
        pin: None,
    };
    // Warm-up also checks every route answers 2xx.
    for path in ["/pass", "/chain3", "/chain3-reused"] {
        let m = load::run(
            &Generator::Builtin,
            proxy.addr(),
            path,
            &spec(opts.warmup.max(Duration::from_millis(200))),
        )?;
        anyhow::ensure!(
            m.requests > 0 && m.non_2xx == 0 && m.errors == 0,
            "{path}: {m:?}"
        );
    }
    let probe = load::run(
        &Generator::Builtin,
        proxy.addr(),
        "/chain3",
        &LoadSpec {
            connections: 1,
            ..spec(Duration::from_millis(100))
        },
    )?;
    let chain_out_bytes = probe.body_bytes / probe.requests.max(1);
    let paths = ["/pass", "/chain3", "/chain3-reused"];
    let mut rounds: Vec<Vec<Measurement>> = vec![Vec::new(); paths.len()];
    for _ in 0..opts.rounds {
        for (path, runs) in paths.iter().zip(rounds.iter_mut()) {
            runs.push(load::run(
                generator,
                proxy.addr(),
                path,
                &spec(opts.duration),
            )?);
        }
    }
    let median = |k: usize| median_by(&rounds[k], |m| m.rps);
    Ok(ChainResult {
        body_bytes: up.body_len(),
        chain_out_bytes,
        passthrough: median(0),
        chain: median(1),
        chain_reused: median(2),
    })
}

/// Part 3: aggregate over three services that each take [`SERVICE_DELAY`].
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateResult {
    /// One request at a time.
    pub sequential: Measurement,
    /// 16 connections.
    pub concurrent: Measurement,
}

/// How long each aggregated service takes to answer.
pub const SERVICE_DELAY: Duration = Duration::from_millis(20);

fn aggregate(plugins: &Path, opts: &PluginOptions) -> anyhow::Result<AggregateResult> {
    let body = bytes::Bytes::from_static(br#"{"ok":true}"#);
    let ups = [
        Upstream::start_delayed(body.clone(), SERVICE_DELAY, 1, None)?,
        Upstream::start_delayed(body.clone(), SERVICE_DELAY, 1, None)?,
        Upstream::start_delayed(body, SERVICE_DELAY, 1, None)?,
    ];
    let admin = crate::free_port()?;
    let text = format!(
        r#"listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:{admin}"
[server]
worker_threads = 1
drain_timeout = "1s"
[identity]
default_client = "web"
[services.a]
urls = ["http://{a}"]
[services.b]
urls = ["http://{b}"]
[services.c]
urls = ["http://{c}"]
[[clients]]
name = "web"
[plugins]
dir = {dir:?}
[[routes]]
id = "agg"
path = "/agg"
egress = ["a", "b", "c"]
[[routes.chain]]
plugin = "aggregate"
config = {{ calls = {{ a = {{ service = "a", path = "/a" }}, b = {{ service = "b", path = "/b" }}, c = {{ service = "c", path = "/c" }} }} }}
"#,
        a = ups[0].addr(),
        b = ups[1].addr(),
        c = ups[2].addr(),
        dir = plugins.display().to_string()
    );
    let proxy = BffProxy::start_config(&text, 1, None)?;
    let spec = |connections, duration| LoadSpec {
        connections,
        threads: 1,
        duration,
        pin: None,
    };
    let warm = load::run(
        &Generator::Builtin,
        proxy.addr(),
        "/agg",
        &spec(4, opts.warmup.max(Duration::from_millis(200))),
    )?;
    anyhow::ensure!(
        warm.requests > 0 && warm.non_2xx == 0 && warm.errors == 0,
        "/agg: {warm:?}"
    );
    let mut seq = Vec::new();
    let mut conc = Vec::new();
    for _ in 0..opts.rounds {
        seq.push(load::run(
            &Generator::Builtin,
            proxy.addr(),
            "/agg",
            &spec(1, opts.duration),
        )?);
        conc.push(load::run(
            &Generator::Builtin,
            proxy.addr(),
            "/agg",
            &spec(16, opts.duration),
        )?);
    }
    Ok(AggregateResult {
        sequential: median_by(&seq, |m| m.p50_us),
        concurrent: median_by(&conc, |m| m.rps),
    })
}

/// Everything the plugin benchmark measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginReport {
    /// Load generator of parts 2 and 3.
    pub generator: String,
    /// Part 1, per body size.
    pub hops: Vec<HopResult>,
    /// Part 2.
    pub chain: Option<ChainResult>,
    /// Part 3.
    pub aggregate: Option<AggregateResult>,
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

impl PluginReport {
    /// Markdown tables with the goals and whether they are met.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.hops.is_empty() {
            out.push_str(
                "\n### Plugin hop: fields reshape, native vs isolated Wasm hop (the goal) vs reused instance (median per operation)\n\n",
            );
            out.push_str("| body in → out | native p50 / p99 | Wasm hop p50 / p99 | Wasm / native (p50) | goal ≤ 2× | reused instance p50 / p99 | reused / native |\n|---|---:|---:|---:|---|---:|---:|\n");
            for h in &self.hops {
                out.push_str(&format!(
                    "| {} → {} B | {:.1} / {:.1} µs | {:.1} / {:.1} µs | {:.2}× | {} | {:.1} / {:.1} µs | {:.2}× |\n",
                    h.body_bytes,
                    h.out_bytes,
                    h.native.p50_us,
                    h.native.p99_us,
                    h.wasm.p50_us,
                    h.wasm.p99_us,
                    h.ratio(),
                    if h.ratio() <= 2.0 { "met" } else { "not met" },
                    h.reused.p50_us,
                    h.reused.p99_us,
                    h.reused_ratio(),
                ));
            }
        }
        if let Some(c) = &self.chain {
            out.push_str(&format!(
            "\n### Three-plugin chain through bff-proxy (1 worker, 32 connections, {} B upstream body)\n\n\
             | route | req/s | p50 | p99 |\n|---|---:|---:|---:|\n\
             | no plugins | {:.0} | {} | {} |\n\
             | fields ×3 (each reads and rewrites the body; {} B out) | {:.0} ({:.2}×) | {} | {} |\n\
             | the same, `instances = \"reused\"` | {:.0} ({:.2}×) | {} | {} |\n",
            c.body_bytes,
            c.passthrough.rps,
            ms(c.passthrough.p50_us),
            ms(c.passthrough.p99_us),
            c.chain_out_bytes,
            c.chain.rps,
            c.chain.rps / c.passthrough.rps,
            ms(c.chain.p50_us),
            ms(c.chain.p99_us),
            c.chain_reused.rps,
            c.chain_reused.rps / c.passthrough.rps,
            ms(c.chain_reused.p50_us),
            ms(c.chain_reused.p99_us),
        ));
        }
        if let Some(a) = &self.aggregate {
            let goal = SERVICE_DELAY.as_secs_f64() * 1e6;
            out.push_str(&format!(
            "\n### aggregate over three services that each take {} ms\n\n\
             | load | req/s | p50 | p99 | goal: p50 within a few ms of {} ms (not {} ms) |\n|---|---:|---:|---:|---|\n\
             | 1 request at a time | {:.0} | {} | {} | {} |\n\
             | 16 connections | {:.0} | {} | {} | |\n",
            SERVICE_DELAY.as_millis(),
            SERVICE_DELAY.as_millis(),
            SERVICE_DELAY.as_millis() * 3,
            a.sequential.rps,
            ms(a.sequential.p50_us),
            ms(a.sequential.p99_us),
            if a.sequential.p50_us < goal + 5_000.0 { "met" } else { "not met" },
            a.concurrent.rps,
            ms(a.concurrent.p50_us),
            ms(a.concurrent.p99_us),
        ));
        }
        out
    }

    /// The figures as JSON.
    pub fn to_json(&self) -> Value {
        let ops = |s: &OpStats| json!({"ops_per_sec": s.ops_per_sec, "p50_us": s.p50_us, "p99_us": s.p99_us});
        let m = |m: &Measurement| json!({"rps": m.rps, "p50_us": m.p50_us, "p99_us": m.p99_us, "requests": m.requests, "non_2xx": m.non_2xx, "errors": m.errors});
        json!({
            "generator": self.generator,
            "hops": self.hops.iter().map(|h| json!({
                "body_bytes": h.body_bytes, "out_bytes": h.out_bytes,
                "native": ops(&h.native), "wasm": ops(&h.wasm), "ratio_p50": h.ratio(),
                "reused": ops(&h.reused), "reused_ratio_p50": h.reused_ratio(),
            })).collect::<Vec<_>>(),
            "chain": self.chain.as_ref().map(|c| json!({
                "body_bytes": c.body_bytes, "chain_out_bytes": c.chain_out_bytes,
                "passthrough": m(&c.passthrough), "chain3": m(&c.chain),
                "chain3_reused": m(&c.chain_reused),
            })),
            "aggregate": self.aggregate.as_ref().map(|a| json!({
                "service_delay_ms": SERVICE_DELAY.as_millis(),
                "sequential": m(&a.sequential),
                "concurrent16": m(&a.concurrent),
            })),
        })
    }
}

/// Runs the three parts, writing progress to `log`.
pub fn run(opts: &PluginOptions, log: &mut dyn Write) -> anyhow::Result<PluginReport> {
    writeln!(
        log,
        "building the example plugins (plugins/, release, wasm32-wasip2)..."
    )?;
    let plugins = bff_proxy_tests::plugins::example_plugins();
    let generator = if opts.builtin {
        Generator::Builtin
    } else {
        Generator::detect()
    };
    let wanted = |part: &str| opts.only.as_deref().is_none_or(|o| o == part);
    let mut hops = Vec::new();
    if wanted("hop") {
        for size in [1, 1024, 20 * 1024] {
            writeln!(
                log,
                "hop: fields, native vs Wasm, body of at least {size} B..."
            )?;
            hops.push(hop(plugins, size, opts)?);
        }
    }
    let chain = if wanted("chain") {
        writeln!(
            log,
            "chain: no plugins vs three plugins ({})...",
            generator.name()
        )?;
        Some(chain(plugins, opts, &generator)?)
    } else {
        None
    };
    let aggregate = if wanted("aggregate") {
        let ms = SERVICE_DELAY.as_millis();
        writeln!(log, "aggregate: three services of {ms} ms each...")?;
        Some(aggregate(plugins, opts)?)
    } else {
        None
    };
    let report = PluginReport {
        generator: generator.name(),
        hops,
        chain,
        aggregate,
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
