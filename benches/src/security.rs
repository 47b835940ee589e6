//! The security benchmark (`cargo bench -p bff-proxy-benches --bench security`): what TLS
//! termination and JWT identification cost through bff-proxy.
//!
//! One in-process upstream answering a 1 KB JSON body, and three bff-proxy instances in front of
//! it with the proxy bench's config (same route, same worker count, same pinning): as it is
//! (cleartext), with `[tls]` (an ECDSA P-256 certificate for `localhost` from a throwaway CA),
//! and with `[identity.jwt]` (one ES256 key) plus a client identified by a `jwt_claim` rule.
//! The built-in load generator drives them with a client shaped per [`Scenario`]: TLS,
//! bearer tokens (one, or a rotation through more distinct tokens than the proxy's token cache
//! holds), a new connection per request. Before measuring, the run proves that the proxy
//! verifies tokens (an invalid one is refused, a valid one identifies the `bench` client) and
//! that each new connection is a full TLS handshake.
//!
//! The scenarios are measured in interleaved rounds; the median round (by requests/s) is
//! reported with the proxy's CPU time per request, the steadier figure on a shared machine.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use crate::bff::BffProxy;
use crate::cpu;
use crate::load::{self, ClientShape, LoadSpec, Measurement, RotatingHeader, TlsClient};
use crate::pin;
use crate::report::TargetResult;
use crate::upstream::{Upstream, json_body};

/// What one measured load looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The proxy bench's config, keep-alive connections: the baseline.
    Cleartext,
    /// `[tls]`, keep-alive connections (the handshakes happen once, before measuring).
    Https,
    /// `[identity.jwt]`, every request with the same valid token (cache hits).
    Jwt,
    /// `[identity.jwt]`, requests rotating through more distinct valid tokens than the cache
    /// holds: every request verifies a signature.
    JwtUncached,
    /// `[tls]`, every request on a new connection: connect, full handshake, one request, close.
    HttpsNewConn,
}

impl Scenario {
    /// Every scenario, in the order each round measures them.
    pub const ALL: [Self; 5] = [
        Self::Cleartext,
        Self::Https,
        Self::Jwt,
        Self::JwtUncached,
        Self::HttpsNewConn,
    ];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cleartext => "cleartext",
            Self::Https => "https",
            Self::Jwt => "jwt",
            Self::JwtUncached => "jwt-uncached",
            Self::HttpsNewConn => "https-new-conn",
        }
    }
}

/// Settings of the security benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityOptions {
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
    /// Distinct tokens `jwt-uncached` rotates through; more than [`PROXY_TOKEN_CACHE`].
    pub uncached_tokens: usize,
    /// Pin the generator and the servers to separate CPUs ([`pin`]) when `taskset` is there.
    pub pin: bool,
    /// Where to write the JSON results (`None`: nowhere).
    pub json_out: Option<PathBuf>,
}

impl Default for SecurityOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: 3,
            connections: 32,
            workers: 1,
            uncached_tokens: 40_000,
            pin: true,
            json_out: Some(crate::default_json_path().with_file_name("bench-security.json")),
        }
    }
}

/// Entries bff-proxy's token cache holds per verifier. When it is full it drops the expired
/// entries, then everything: with strict rotation through more distinct tokens than this, a
/// token is always gone by the time it comes round again, so every request is a miss.
pub const PROXY_TOKEN_CACHE: usize = bff_proxy::config::TOKEN_CACHE_ENTRIES;

/// The `jwt-uncached` pool in `--quick` runs: just over [`PROXY_TOKEN_CACHE`] (the rotation
/// still misses every time, see there), so that signing them up front stays short.
pub const QUICK_UNCACHED_TOKENS: usize = 17_000;

/// Usage text for `--help`.
pub const USAGE: &str = "\
cargo bench -p bff-proxy-benches --bench security [-- OPTIONS]

Measures what TLS termination and JWT identification cost through bff-proxy (1 KB JSON body,
built-in load generator): cleartext, https (keep-alive), jwt (one token, cache hits),
jwt-uncached (more distinct tokens than the token cache holds: every request verified) and
https-new-conn (a new TLS connection with a full handshake per request).

  --quick             smoke run: 0.5 s per scenario, 0.1 s warm-up, 1 round, 4 connections,
                      17000 uncached tokens
  --duration SECS     measured time per scenario per round (default 5)
  --warmup SECS       warm-up per scenario                  (default 1)
  --rounds N          interleaved rounds, median reported   (default 3)
  --connections N     closed-loop connections               (default 32)
  --workers N         bff-proxy worker threads              (default 1)
  --tokens N          distinct tokens for jwt-uncached, more than 16384 (default 40000)
  --no-pin            let the scheduler place threads (default: generator on the first CPU,
                      upstream and proxies on the others, via taskset)
  --json PATH         results file (default target/bench-security.json); --no-json to skip

BENCH_QUICK=1, BENCH_DURATION=N and BENCH_ROUNDS=N work too.
";

impl SecurityOptions {
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
                "--duration" => o.duration = crate::parse_secs(&value("--duration")?)?,
                "--warmup" => o.warmup = crate::parse_secs(&value("--warmup")?)?,
                "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds")?,
                "--connections" => {
                    o.connections = value("--connections")?.parse().context("--connections")?;
                }
                "--workers" => o.workers = value("--workers")?.parse().context("--workers")?,
                "--tokens" => {
                    o.uncached_tokens = value("--tokens")?.parse().context("--tokens")?;
                }
                "--no-pin" => o.pin = false,
                "--json" => o.json_out = Some(value("--json")?.into()),
                "--no-json" => o.json_out = None,
                other => bail!("unknown option `{other}` (see --help)"),
            }
        }
        anyhow::ensure!(o.rounds >= 1, "--rounds must be at least 1");
        anyhow::ensure!(o.connections >= 1, "--connections must be at least 1");
        anyhow::ensure!(o.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(
            o.uncached_tokens > PROXY_TOKEN_CACHE,
            "--tokens must be more than the proxy's token cache ({PROXY_TOKEN_CACHE}), or \
             jwt-uncached would hit the cache"
        );
        Ok(Some(o))
    }

    fn quick(&mut self) {
        self.duration = Duration::from_millis(500);
        self.warmup = Duration::from_millis(100);
        self.rounds = 1;
        self.connections = 4;
        self.uncached_tokens = QUICK_UNCACHED_TOKENS;
    }
}

// === Tokens ===

/// `iss` of every token, and the only issuer the proxy accepts.
const ISSUER: &str = "https://auth.bench.test";
/// `aud` of every token, and the only audience the proxy accepts.
const AUDIENCE: &str = "bff";
/// The claim the `bench` client's rule reads, and its value.
const CLIENT_CLAIM: (&str, &str) = ("client_type", "bench");
/// How long the tokens stay valid: longer than any run.
const TOKEN_LIFETIME: Duration = Duration::from_secs(4 * 3600);

/// An ES256 signing key and its public half as a JWK (the way `tests/tests/jwt.rs` makes them).
struct SigningKey {
    encoding: EncodingKey,
    jwk: Value,
}

/// The key id every token names.
const KID: &str = "bench-1";

impl SigningKey {
    fn new() -> anyhow::Result<Self> {
        let pair = rcgen::KeyPair::generate().context("generating a P-256 key")?;
        // Uncompressed point: 0x04 || x || y.
        let raw = pair.public_key_raw();
        anyhow::ensure!(
            raw.len() == 65 && raw[0] == 4,
            "not an uncompressed P-256 point"
        );
        Ok(Self {
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": KID, "alg": "ES256", "use": "sig",
                "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&raw[33..]),
            }),
        })
    }

    /// `Bearer <token>` for user `n`: valid, distinct for each `n`, identifying `bench`.
    fn bearer(&self, n: usize, now: u64) -> anyhow::Result<HeaderValue> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KID.into());
        let claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": format!("bench-user-{n}"),
            CLIENT_CLAIM.0: CLIENT_CLAIM.1,
            "iat": now,
            "exp": now + TOKEN_LIFETIME.as_secs(),
        });
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding).context("signing")?;
        HeaderValue::try_from(format!("Bearer {token}")).context("a token is a header value")
    }

    /// `count` distinct tokens (users `first..first + count`), signed on every CPU.
    fn bearers(&self, first: usize, count: usize) -> anyhow::Result<Vec<HeaderValue>> {
        let now = unix_now();
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(count.max(1));
        let per_thread = count.div_ceil(threads);
        let chunks: Vec<anyhow::Result<Vec<HeaderValue>>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let from = first + t * per_thread;
                    let to = (first + (t + 1) * per_thread).min(first + count);
                    s.spawn(move || -> anyhow::Result<Vec<HeaderValue>> {
                        (from..to).map(|n| self.bearer(n, now)).collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a signing thread panicked")))
                })
                .collect()
        });
        let mut all = Vec::with_capacity(count);
        for chunk in chunks {
            all.extend(chunk?);
        }
        Ok(all)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// === Configs ===

/// Name prefixes of each proxy's threads (runtime and main thread), so CPU time is counted
/// for the proxy under load only. `/proc` keeps 15 bytes of a thread name.
const PLAIN_THREADS: &[&str] = &["bench-sec-plain"];
const TLS_THREADS: &[&str] = &["bench-sec-tls"];
const JWT_THREADS: &[&str] = &["bench-sec-jwt"];

/// The proxy bench's config with `[tls]` serving `cert` and `key`.
pub fn tls_config(base: &str, cert: &Path, key: &Path) -> String {
    format!(
        "{base}\n[tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// The proxy bench's config with `[identity.jwt]` (keys from `jwks`, [`ISSUER`] and
/// [`AUDIENCE`] required) and a second client, `bench`, identified by a verified claim.
pub fn jwt_config(base: &str, jwks: &Path) -> String {
    format!(
        r#"{base}
[identity.jwt]
jwks = {jwks:?}
issuers = ["{ISSUER}"]
audiences = ["{AUDIENCE}"]

[[clients]]
name = "bench"
identify = [{{ jwt_claim = "{claim}", equals = "{value}" }}]
"#,
        jwks = jwks.display().to_string(),
        claim = CLIENT_CLAIM.0,
        value = CLIENT_CLAIM.1,
    )
}

// === Checks ===

/// Time a check request may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// What one check request got.
struct Fetched {
    status: u16,
    body: Bytes,
    /// Protocol version, key exchange, cipher suite, ALPN and handshake kind, over TLS.
    tls: Option<String>,
}

/// One `GET path` on a new connection (over TLS with `tls`), with `authorization` if given.
fn fetch(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    path: &str,
    authorization: Option<&HeaderValue>,
) -> anyhow::Result<Fetched> {
    let mut req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .context("building a check request")?;
    if let Some(value) = authorization {
        req.headers_mut()
            .insert(header::AUTHORIZATION, value.clone());
    }
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (status, body, tls) = match tls {
            None => {
                let (status, body) = send(tcp, req).await?;
                (status, body, None)
            }
            Some(tls) => {
                let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name.clone(), tcp)
                    .await?;
                let (_, session) = stream.get_ref();
                let version = match session.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_owned(),
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_owned(),
                    other => format!("{other:?}"),
                };
                let handshake = match session.handshake_kind() {
                    Some(rustls::HandshakeKind::Full) => "full handshake",
                    Some(rustls::HandshakeKind::FullWithHelloRetryRequest) => {
                        "full handshake after a HelloRetryRequest"
                    }
                    Some(rustls::HandshakeKind::Resumed) => "resumed session",
                    None => "handshake kind unknown",
                };
                let info = format!(
                    "{version}, {:?}, {:?}, ALPN {}, {handshake}",
                    session
                        .negotiated_key_exchange_group()
                        .context("no key exchange group")?
                        .name(),
                    session
                        .negotiated_cipher_suite()
                        .context("no cipher suite")?
                        .suite(),
                    String::from_utf8_lossy(session.alpn_protocol().unwrap_or(b"none")),
                );
                let (status, body) = send(stream, req).await?;
                (status, body, Some(info))
            }
        };
        anyhow::Ok(Fetched { status, body, tls })
    };
    rt.block_on(async { tokio::time::timeout(CHECK_TIMEOUT, exchange).await })
        .with_context(|| format!("GET {path} at {addr} took over {CHECK_TIMEOUT:?}"))?
}

async fn send<IO>(io: IO, req: Request<Empty<Bytes>>) -> anyhow::Result<(u16, Bytes)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    drop(sender);
    let _ = conn.await;
    Ok((status, body))
}

/// The value of the sample `name` (with its labels, exactly as exported) in the proxy's
/// `/metrics` at `admin`; 0 when it is not exported yet.
fn metric(rt: &tokio::runtime::Runtime, admin: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let got = fetch(rt, admin, None, "/metrics", None)?;
    anyhow::ensure!(got.status == 200, "GET /metrics: {}", got.status);
    let text = String::from_utf8_lossy(&got.body);
    for line in text.lines() {
        if let Some(value) = line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) {
            return value
                .trim()
                .parse()
                .with_context(|| format!("{name}: `{value}`"));
        }
    }
    Ok(0.0)
}

/// Requests the proxy answered 2xx for the `bench` client on the `bench` route.
const BENCH_CLIENT_2XX: &str =
    r#"bff_requests_total{client="bench",route="bench",status_class="2xx"}"#;

/// Successful TLS handshakes (full or resumed).
const TLS_HANDSHAKES_OK: &str = r#"bff_tls_handshakes_total{result="ok"}"#;

/// Proves the JWT proxy verifies tokens and identifies by them: a token signed by a key
/// outside the JWKS (same `kid`) is refused with 401, a valid one is served and counted for
/// the `bench` client, and so is one token of the uncached pool.
fn check_jwt(
    rt: &tokio::runtime::Runtime,
    proxy: SocketAddr,
    admin: SocketAddr,
    valid: &[&HeaderValue],
    forged: &HeaderValue,
) -> anyhow::Result<()> {
    let got = fetch(rt, proxy, None, crate::PATH, Some(forged))?;
    anyhow::ensure!(
        got.status == 401,
        "a token signed by an unknown key got {}, not 401: is the token verified?",
        got.status
    );
    for token in valid {
        let before = metric(rt, admin, BENCH_CLIENT_2XX)?;
        let got = fetch(rt, proxy, None, crate::PATH, Some(token))?;
        anyhow::ensure!(got.status == 200, "a valid token got {}", got.status);
        let after = metric(rt, admin, BENCH_CLIENT_2XX)?;
        anyhow::ensure!(
            after - before >= 1.0,
            "a valid token was served but not counted for the `bench` client \
             ({BENCH_CLIENT_2XX}: {before} -> {after})"
        );
    }
    Ok(())
}

// === The run ===

/// One proxy under test.
struct Target {
    proxy: BffProxy,
    admin: SocketAddr,
    threads: &'static [&'static str],
}

/// Starts bff-proxy with `config(base)`, where `base` is the proxy bench's config.
fn start_proxy(
    upstream: SocketAddr,
    opts: &SecurityOptions,
    pin: Option<&str>,
    threads: &'static [&'static str],
    config: impl FnOnce(String) -> String,
) -> anyhow::Result<Target> {
    let pool = opts.connections.max(64);
    let (proxy, admin) =
        BffProxy::start_edited(upstream, opts.workers, pool, pin, threads[0], config)?;
    Ok(Target {
        proxy,
        admin,
        threads,
    })
}

/// Everything the security benchmark measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SecurityReport {
    /// The load generator.
    pub generator: String,
    /// Upstream response body length.
    pub body_bytes: usize,
    /// What the TLS check connection negotiated.
    pub tls: String,
    /// Distinct tokens `jwt-uncached` rotated through.
    pub uncached_tokens: usize,
    /// Time to sign each of them up front (the generator's side), microseconds.
    pub signing_us: f64,
    /// Duration, rounds, connections, workers, pinning.
    pub settings: Value,
    /// One result per scenario, in [`Scenario::ALL`] order.
    pub scenarios: Vec<TargetResult>,
}

impl SecurityReport {
    /// The result of `scenario`, if it was measured.
    pub fn get(&self, scenario: Scenario) -> Option<&TargetResult> {
        self.scenarios.iter().find(|t| t.target == scenario.name())
    }

    /// `scenario`'s proxy CPU per request over cleartext's.
    pub fn cpu_ratio(&self, scenario: Scenario) -> Option<f64> {
        let base = self.get(Scenario::Cleartext)?.median.proxy_cpu_us?;
        let this = self.get(scenario)?.median.proxy_cpu_us?;
        (base > 0.0).then(|| this / base)
    }

    /// Proxy CPU per request of `a` minus that of `b`, microseconds.
    fn cpu_diff(&self, a: Scenario, b: Scenario) -> Option<f64> {
        Some(self.get(a)?.median.proxy_cpu_us? - self.get(b)?.median.proxy_cpu_us?)
    }

    /// Failed requests over every round of every scenario.
    pub fn failures(&self) -> u64 {
        self.scenarios.iter().map(|t| t.non_2xx + t.errors).sum()
    }

    /// The Markdown table, then what the differences mean.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let workers = self.settings["workers"].as_u64().unwrap_or(1);
        let connections = self.settings["connections"].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "\n### TLS termination and JWT identification through bff-proxy ({workers} worker{}, \
             {connections} connections, {} B JSON body)\n",
            if workers == 1 { "" } else { "s" },
            self.body_bytes
        );
        let _ = writeln!(
            out,
            "| scenario | req/s | p50 | p99 | proxy CPU/req (µs) | CPU/req vs cleartext |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for (scenario, t) in Scenario::ALL
            .iter()
            .filter_map(|&s| Some((s, self.get(s)?)))
        {
            let _ = writeln!(
                out,
                "| {} | {:.0} | {:.3} ms | {:.3} ms | {} | {} |",
                t.target,
                t.median.rps,
                t.median.p50_us / 1000.0,
                t.median.p99_us / 1000.0,
                t.median
                    .proxy_cpu_us
                    .map_or_else(|| "-".into(), |u| format!("{u:.1}")),
                self.cpu_ratio(scenario)
                    .map_or_else(|| "-".into(), |r| format!("{r:.2}×")),
            );
        }
        let _ = writeln!(
            out,
            "\nTLS: {} (ECDSA P-256 certificate); https-new-conn: a full handshake per request \
             (the client keeps no session to resume).",
            self.tls
        );
        let _ = writeln!(
            out,
            "jwt-uncached: {} distinct ES256 tokens in rotation, more than the proxy's \
             {PROXY_TOKEN_CACHE}-entry cache, so every request verifies a signature.",
            self.uncached_tokens
        );
        let diffs = [
            (
                "TLS on a keep-alive connection (https - cleartext)",
                Scenario::Https,
                Scenario::Cleartext,
            ),
            (
                "a new TLS connection: accept, full handshake, close (https-new-conn - https)",
                Scenario::HttpsNewConn,
                Scenario::Https,
            ),
            (
                "a cached token: hash, lookup, claim rule (jwt - cleartext)",
                Scenario::Jwt,
                Scenario::Cleartext,
            ),
            (
                "verifying a token: ES256 signature, claims (jwt-uncached - jwt)",
                Scenario::JwtUncached,
                Scenario::Jwt,
            ),
        ];
        let _ = writeln!(
            out,
            "\nProxy CPU per request, differences of the column above:"
        );
        for (what, a, b) in diffs {
            if let Some(d) = self.cpu_diff(a, b) {
                let _ = writeln!(out, "- {what}: {d:+.1} µs");
            }
        }
        crate::report::write_other_load(&mut out, self.scenarios.iter().map(|t| t.max_other_cpus));
        if self.failures() == 0 {
            let _ = writeln!(
                out,
                "\nEvery measured request got a 2xx (no errors, no other status)."
            );
        } else {
            for t in self.scenarios.iter().filter(|t| t.non_2xx + t.errors > 0) {
                let _ = writeln!(
                    out,
                    "\nWARNING: {}: {} non-2xx responses, {} errors (all rounds)",
                    t.target, t.non_2xx, t.errors
                );
            }
        }
        out
    }

    /// The figures as JSON (`target/bench-security.json`).
    pub fn to_json(&self) -> Value {
        let scenarios: Vec<Value> = Scenario::ALL
            .iter()
            .filter_map(|&s| Some((s, self.get(s)?)))
            .map(|(s, t)| {
                json!({
                    "scenario": t.target,
                    "rps": t.median.rps,
                    "p50_us": t.median.p50_us,
                    "p99_us": t.median.p99_us,
                    "requests": t.median.requests,
                    "proxy_cpu_us_per_request": t.median.proxy_cpu_us,
                    "upstream_cpu_us_per_request": t.median.upstream_cpu_us,
                    "cpu_ratio_vs_cleartext": self.cpu_ratio(s),
                    "max_other_load_cpus": t.max_other_cpus,
                    "rounds_rps": t.rounds_rps,
                    "non_2xx": t.non_2xx,
                    "errors": t.errors,
                })
            })
            .collect();
        json!({
            "generator": self.generator,
            "body_bytes": self.body_bytes,
            "tls": self.tls,
            "uncached_tokens": self.uncached_tokens,
            "proxy_token_cache": PROXY_TOKEN_CACHE,
            "signing_us_per_token": self.signing_us,
            "settings": self.settings,
            "scenarios": scenarios,
        })
    }
}

/// Runs the benchmark, writing progress lines to `log`.
pub fn run(opts: &SecurityOptions, log: &mut dyn Write) -> anyhow::Result<SecurityReport> {
    let generator = "built-in (hyper client, closed loop; tokio-rustls for TLS)".to_owned();
    writeln!(log, "load generator: {generator}")?;
    let layout = crate::pin_layout(opts.pin, log)?;
    let servers = layout.as_ref().map(|l| l.servers.as_str());
    let check_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the checks' runtime")?;

    // The files the proxies read: a server certificate from a throwaway CA, and the JWKS.
    let dir = tempfile::tempdir().context("creating a temp dir for the certificate and JWKS")?;
    let ca = bff_proxy_tests::tls::Ca::new("bff-proxy bench CA");
    ca.server("localhost").write(dir.path(), "server");
    let key = SigningKey::new()?;
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({ "keys": [key.jwk] }).to_string()).context("writing the JWKS")?;
    let tls = tls_client(&ca.pem())?;

    // Tokens are signed up front, so the generator only picks the next one per request.
    let signing = Instant::now();
    let cached = key.bearer(0, unix_now())?;
    let pool = key.bearers(1, opts.uncached_tokens)?;
    let signing_us = signing.elapsed().as_secs_f64() * 1e6 / (pool.len() + 1) as f64;
    writeln!(
        log,
        "signed {} ES256 tokens in {:.2} s ({signing_us:.1} µs each)",
        pool.len() + 1,
        signing.elapsed().as_secs_f64()
    )?;
    let forged = SigningKey::new()?.bearer(0, unix_now())?;

    let up = Upstream::start(json_body(1024), 1, servers)?;
    let plain = start_proxy(up.addr(), opts, servers, PLAIN_THREADS, |c| c)?;
    let https = start_proxy(up.addr(), opts, servers, TLS_THREADS, |c| {
        tls_config(
            &c,
            &dir.path().join("server.crt"),
            &dir.path().join("server.key"),
        )
    })?;
    let jwt = start_proxy(up.addr(), opts, servers, JWT_THREADS, |c| {
        jwt_config(&c, &jwks)
    })?;
    writeln!(
        log,
        "upstream {} ({} B body); bff-proxy cleartext {}, https {}, jwt {}",
        up.addr(),
        up.body_len(),
        plain.proxy.addr(),
        https.proxy.addr(),
        jwt.proxy.addr()
    )?;

    check_jwt(
        &check_rt,
        jwt.proxy.addr(),
        jwt.admin,
        &[&cached, &pool[0]],
        &forged,
    )?;
    writeln!(
        log,
        "jwt: a forged token is refused (401), valid ones identify the `bench` client"
    )?;
    let probe = fetch(&check_rt, https.proxy.addr(), Some(&tls), crate::PATH, None)?;
    anyhow::ensure!(probe.status == 200, "GET over TLS: {}", probe.status);
    let tls_info = probe.tls.unwrap_or_default();
    writeln!(log, "https: {tls_info}")?;

    let shape = |s: Scenario| -> (&Target, ClientShape) {
        let bearer =
            |values: Vec<HeaderValue>| Some(RotatingHeader::new(header::AUTHORIZATION, values));
        match s {
            Scenario::Cleartext => (&plain, ClientShape::default()),
            Scenario::Https => (
                &https,
                ClientShape {
                    tls: Some(tls.clone()),
                    ..ClientShape::default()
                },
            ),
            Scenario::Jwt => (
                &jwt,
                ClientShape {
                    header: bearer(vec![cached.clone()]),
                    ..ClientShape::default()
                },
            ),
            Scenario::JwtUncached => (
                &jwt,
                ClientShape {
                    header: bearer(pool.clone()),
                    ..ClientShape::default()
                },
            ),
            Scenario::HttpsNewConn => (
                &https,
                ClientShape {
                    tls: Some(tls.clone()),
                    connection_per_request: true,
                    ..ClientShape::default()
                },
            ),
        }
    };
    // Built once: the uncached rotation then carries on across rounds.
    let shapes: Vec<(Scenario, &Target, ClientShape)> = Scenario::ALL
        .iter()
        .map(|&s| {
            let (target, shape) = shape(s);
            (s, target, shape)
        })
        .collect();
    let spec = LoadSpec {
        connections: opts.connections,
        threads: 1,
        duration: opts.duration,
        pin: layout.as_ref().map(|l| l.generator.clone()),
    };

    // Warm-up, which also checks that every scenario is served: all 2xx, no errors.
    let warm = LoadSpec {
        duration: opts.warmup.max(Duration::from_millis(200)),
        ..spec.clone()
    };
    for (scenario, target, shape) in &shapes {
        let new_conn = *scenario == Scenario::HttpsNewConn;
        let handshakes = if new_conn {
            metric(&check_rt, target.admin, TLS_HANDSHAKES_OK)?
        } else {
            0.0
        };
        let m = load::run_shaped(target.proxy.addr(), crate::PATH, &warm, shape)
            .with_context(|| format!("warming up {}", scenario.name()))?;
        anyhow::ensure!(
            m.requests > 0 && m.non_2xx == 0 && m.errors == 0,
            "warming up {}: {} requests, {} non-2xx, {} errors",
            scenario.name(),
            m.requests,
            m.non_2xx,
            m.errors
        );
        if new_conn {
            let handshakes = metric(&check_rt, target.admin, TLS_HANDSHAKES_OK)? - handshakes;
            anyhow::ensure!(
                handshakes >= m.requests as f64,
                "https-new-conn: {handshakes} TLS handshakes for {} requests",
                m.requests
            );
            writeln!(
                log,
                "https-new-conn warm-up: {} requests, {handshakes} TLS handshakes",
                m.requests
            )?;
        }
    }

    let mut rounds: Vec<Vec<Measurement>> = vec![Vec::new(); shapes.len()];
    for round in 1..=opts.rounds {
        for ((scenario, target, shape), runs) in shapes.iter().zip(rounds.iter_mut()) {
            let source = cpu::Source::Threads(target.threads);
            let before = cpu::snapshot(&source, None);
            let mut m = load::run_shaped(target.proxy.addr(), crate::PATH, &spec, shape)
                .with_context(|| format!("measuring {}", scenario.name()))?;
            let usage = before.usage_until(&cpu::snapshot(&source, None));
            let requests = m.requests as f64;
            let per_req = |s: Option<f64>| s.filter(|_| requests > 0.0).map(|s| s * 1e6 / requests);
            m.proxy_cpu_us = per_req(usage.target_s);
            m.upstream_cpu_us = per_req(usage.upstream_s);
            m.other_cpus = usage.other_cpus;
            writeln!(
                log,
                "  round {round}/{}: {:<14} {:>8.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  \
                 CPU/req proxy {} upstream {}  other load {}{}",
                opts.rounds,
                scenario.name(),
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
            runs.push(m);
        }
    }
    let scenarios = shapes
        .iter()
        .zip(&rounds)
        .filter_map(|((s, _, _), r)| TargetResult::from_rounds(s.name(), r))
        .collect();
    let report = SecurityReport {
        generator,
        body_bytes: up.body_len(),
        tls: tls_info,
        uncached_tokens: pool.len(),
        signing_us,
        settings: json!({
            "duration_s": opts.duration.as_secs_f64(),
            "warmup_s": opts.warmup.as_secs_f64(),
            "rounds": opts.rounds,
            "connections": opts.connections,
            "workers": opts.workers,
            "pinning": layout.as_ref().map(pin::Layout::describe),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        }),
        scenarios,
    };
    // Stop the proxies before their upstream.
    drop(shapes);
    drop((plain, https, jwt));
    drop(up);
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

/// The generator's TLS client: trusts only `ca_pem`, offers only `http/1.1`, and never resumes
/// a session, so every new connection is a full handshake.
fn tls_client(ca_pem: &str) -> anyhow::Result<TlsClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("the CA certificate")?)
        .context("the CA as a root")?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsClient {
        config: Arc::new(config),
        server_name: ServerName::try_from("localhost").context("a server name")?,
    })
}

fn opt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "-".into(), |u| format!("{u:.1} us"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> SecurityOptions {
        SecurityOptions::parse(args.iter().map(|s| (*s).to_owned()))
            .expect("valid options")
            .expect("not --help")
    }

    #[test]
    fn parses_options() {
        let o = parse(&["--bench", "--duration", "2", "--connections", "8"]);
        assert_eq!(o.duration, Duration::from_secs(2));
        assert_eq!(o.connections, 8);
        let q = parse(&["--quick", "--workers", "2"]);
        assert_eq!(q.duration, Duration::from_millis(500));
        assert_eq!(q.rounds, 1);
        assert_eq!(q.workers, 2);
        assert!(q.uncached_tokens > PROXY_TOKEN_CACHE);
        assert!(SecurityOptions::parse(["--tokens".to_owned(), "100".to_owned()]).is_err());
        assert!(SecurityOptions::parse(["--nope".to_owned()]).is_err());
        assert!(
            SecurityOptions::parse(["--help".to_owned()])
                .expect("ok")
                .is_none()
        );
    }

    #[test]
    fn tls_and_jwt_configs_are_accepted_by_bff_proxy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = bff_proxy_tests::tls::Ca::new("test CA");
        ca.server("localhost").write(dir.path(), "server");
        let key = SigningKey::new().expect("a key");
        let jwks = dir.path().join("jwks.json");
        std::fs::write(&jwks, json!({ "keys": [key.jwk] }).to_string()).expect("write JWKS");
        let up: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let base = crate::bff::config_toml(up, 9, 1, 64);
        let tls = tls_config(
            &base,
            &dir.path().join("server.crt"),
            &dir.path().join("server.key"),
        );
        let cfg = bff_proxy::Config::from_toml(&tls, "bench").expect("valid TLS config");
        assert!(cfg.tls.is_some());
        let jwt = jwt_config(&base, &jwks);
        let cfg = bff_proxy::Config::from_toml(&jwt, "bench").expect("valid JWT config");
        assert_eq!(cfg.clients.len(), 2);
    }

    #[test]
    fn tokens_are_distinct() {
        let key = SigningKey::new().expect("a key");
        let tokens = key.bearers(5, 7).expect("signed");
        assert_eq!(tokens.len(), 7);
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        assert_eq!(distinct.len(), 7);
        assert!(tokens[0].to_str().expect("ascii").starts_with("Bearer ey"));
    }
}
