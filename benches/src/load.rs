//! Load generators: `wrk` as a subprocess when it is installed, else a built-in closed-loop
//! generator (N keep-alive HTTP/1.1 connections, each sending its next request as soon as the
//! previous response body has been read).
//!
//! Both report the same [`Measurement`]: requests completed, failures, requests/s and latency
//! percentiles.
//!
//! The built-in generator can also take a [`ClientShape`] ([`run_shaped`], for the security
//! bench): TLS on every connection, a header whose value rotates per request (bearer tokens),
//! or a new connection for every request.
//!
//! [`Burst`] is the opposite of a steady load: N connections opened up front, each sending one
//! request at the same moment (the cache bench's collapsed misses).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderName, HeaderValue, Request, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

/// How to install wrk when it is missing (Debian/Ubuntu).
pub const INSTALL_HINT: &str = "apt-get install -y wrk";

/// Which generator drives the load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generator {
    /// The `wrk` binary at this path.
    Wrk(PathBuf),
    /// The built-in Rust generator.
    Builtin,
}

impl Generator {
    /// `wrk` if it is on `PATH` (or `$WRK`), else the built-in one.
    pub fn detect() -> Self {
        std::env::var_os("WRK")
            .map(PathBuf::from)
            .or_else(|| crate::which("wrk"))
            .map_or(Self::Builtin, Self::Wrk)
    }

    /// A short name for the report.
    pub fn name(&self) -> String {
        match self {
            Self::Wrk(p) => format!("wrk ({})", p.display()),
            Self::Builtin => "built-in (hyper client, closed loop)".into(),
        }
    }
}

/// One load run's shape.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Open keep-alive connections.
    pub connections: usize,
    /// Generator threads.
    pub threads: usize,
    /// How long to measure.
    pub duration: Duration,
    /// CPUs to pin the generator to (`taskset -c` list), if any.
    pub pin: Option<String>,
}

/// What one load run measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measurement {
    /// Responses completed (any status).
    pub requests: u64,
    /// Responses whose status was not 2xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors.
    pub errors: u64,
    /// Completed requests per second.
    pub rps: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub p99_us: f64,
    /// Response body bytes read (built-in generator only; 0 for wrk, which reports totals).
    pub body_bytes: u64,
    /// CPU time the proxy under test spent per request, microseconds (filled in by the caller).
    pub proxy_cpu_us: Option<f64>,
    /// CPU time the upstream spent per request, microseconds (filled in by the caller).
    pub upstream_cpu_us: Option<f64>,
    /// CPUs kept busy by processes outside the benchmark during the run (filled in by the caller).
    pub other_cpus: Option<f64>,
}

/// Drives `GET {path}` at `addr` with `generator` for `spec.duration`.
pub fn run(
    generator: &Generator,
    addr: SocketAddr,
    path: &str,
    spec: &LoadSpec,
) -> anyhow::Result<Measurement> {
    match generator {
        Generator::Wrk(bin) => run_wrk(bin, addr, path, spec),
        Generator::Builtin => run_builtin(addr, path, spec),
    }
}

// ---------------------------------------------------------------------------------------------
// wrk

fn run_wrk(
    bin: &Path,
    addr: SocketAddr,
    path: &str,
    spec: &LoadSpec,
) -> anyhow::Result<Measurement> {
    let secs = spec.duration.as_secs().max(1);
    let connections = spec.connections.max(1);
    let threads = spec.threads.clamp(1, connections);
    let mut child = crate::pin::command(bin, spec.pin.as_deref())
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("--latency")
        .arg(format!("http://{addr}{path}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Bounded: wrk stops itself after `secs`; give it generous slack, then kill it.
    let limit = Duration::from_secs(secs + 15);
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("parsing wrk output:\n{stdout}"))
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> anyhow::Result<Measurement> {
    let mut m = Measurement::default();
    let (mut rps, mut p50, mut p99) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rps = Some(rest.trim().parse::<f64>()?);
        } else if line.starts_with("50%") {
            p50 = words.nth(1).map(parse_wrk_duration_us).transpose()?;
        } else if line.starts_with("99%") {
            p99 = words.nth(1).map(parse_wrk_duration_us).transpose()?;
        } else if line.contains(" requests in ") {
            m.requests = words.next().unwrap_or("0").parse()?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            m.non_2xx = rest.trim().parse()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in rest.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    m.errors += n.parse::<u64>()?;
                }
            }
        }
    }
    m.rps = rps.context("no `Requests/sec:` line")?;
    m.p50_us = p50.context("no `50%` latency line (was --latency passed?)")?;
    m.p99_us = p99.context("no `99%` latency line (was --latency passed?)")?;
    Ok(m)
}

/// `512.34us`, `1.20ms`, `2.00s`, `1.00m` → microseconds.
fn parse_wrk_duration_us(s: &str) -> anyhow::Result<f64> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("`{s}` has no unit"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a duration"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1_000.0,
        "s" => 1_000_000.0,
        "m" => 60_000_000.0,
        "h" => 3_600_000_000.0,
        _ => bail!("`{s}`: unknown unit `{unit}`"),
    };
    Ok(n * scale)
}

// ---------------------------------------------------------------------------------------------
// Built-in generator

/// Name of the built-in generator's threads.
const THREAD_PREFIX: &str = "bench-load";

/// Per-connection tallies, merged at the end.
struct Tally {
    hist: Histogram<u64>,
    requests: u64,
    non_2xx: u64,
    errors: u64,
    body_bytes: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("static histogram bounds are valid"),
            requests: 0,
            non_2xx: 0,
            errors: 0,
            body_bytes: 0,
        }
    }
}

/// Time one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn run_builtin(addr: SocketAddr, path: &str, spec: &LoadSpec) -> anyhow::Result<Measurement> {
    run_shaped(addr, path, spec, &ClientShape::default())
}

/// What the built-in generator's connections do beyond plain keep-alive HTTP/1.1. The default
/// is the plain client [`run`] uses.
#[derive(Debug, Clone, Default)]
pub struct ClientShape {
    /// Speak TLS on every connection.
    pub tls: Option<TlsClient>,
    /// A header every request carries, its value the next one of a rotation shared by all
    /// connections.
    pub header: Option<RotatingHeader>,
    /// Each request on a new connection: connect, TLS handshake (with [`ClientShape::tls`]),
    /// one request with `connection: close`, close. Requests/s is then connections (and
    /// handshakes) per second, and the latency includes connecting.
    pub connection_per_request: bool,
}

/// TLS for the generator's connections.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// Roots, ALPN, resumption: whatever the run needs.
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent as SNI and checked against the server's certificate.
    pub server_name: ServerName<'static>,
}

/// A header whose value rotates through a list: the n-th request sent with it, counted across
/// all connections (and runs: clones share the rotation), gets value `n % len`.
#[derive(Clone)]
pub struct RotatingHeader {
    name: HeaderName,
    values: Arc<[HeaderValue]>,
    next: Arc<AtomicUsize>,
}

impl RotatingHeader {
    /// `name: values[0]`, `name: values[1]`, ..., then from the start again.
    ///
    /// # Panics
    ///
    /// If `values` is empty.
    pub fn new(name: HeaderName, values: Vec<HeaderValue>) -> Self {
        assert!(
            !values.is_empty(),
            "a rotating header needs at least one value"
        );
        Self {
            name,
            values: values.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// How many distinct values it rotates through.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Always false: [`RotatingHeader::new`] refuses an empty list.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    fn next_value(&self) -> &HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.values[n % self.values.len()]
    }
}

impl std::fmt::Debug for RotatingHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the values: there may be tens of thousands of tokens.
        f.debug_struct("RotatingHeader")
            .field("name", &self.name)
            .field("values", &self.values.len())
            .finish_non_exhaustive()
    }
}

/// The built-in generator with connections shaped by `shape`: `GET {path}` at `addr` for
/// `spec.duration` (`spec.threads` runtime threads, `spec.connections` closed loops).
pub fn run_shaped(
    addr: SocketAddr,
    path: &str,
    spec: &LoadSpec,
    shape: &ClientShape,
) -> anyhow::Result<Measurement> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(spec.threads.max(1))
        .thread_name(THREAD_PREFIX)
        .enable_all();
    crate::pin::runtime(&mut builder, spec.pin.as_deref());
    let rt = builder
        .build()
        .context("building the load generator runtime")?;
    let path = path.to_owned();
    let duration = spec.duration;
    let connections = spec.connections;
    let shape = shape.clone();
    let result = rt.block_on(async move {
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> = (0..connections.max(1))
            .map(|_| tokio::spawn(connection_loop(addr, path.clone(), deadline, shape.clone())))
            .collect();
        let mut total = Tally::new();
        for t in tasks {
            let tally = t.await.context("a load connection task panicked")?;
            total.hist.add(&tally.hist).context("merging histograms")?;
            total.requests += tally.requests;
            total.non_2xx += tally.non_2xx;
            total.errors += tally.errors;
            total.body_bytes += tally.body_bytes;
        }
        let elapsed = start.elapsed().as_secs_f64();
        anyhow::Ok(Measurement {
            requests: total.requests,
            non_2xx: total.non_2xx,
            errors: total.errors,
            rps: lossy_f64(total.requests) / elapsed,
            p50_us: lossy_f64(total.hist.value_at_quantile(0.50)),
            p99_us: lossy_f64(total.hist.value_at_quantile(0.99)),
            body_bytes: total.body_bytes,
            ..Measurement::default()
        })
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

#[allow(clippy::cast_precision_loss)]
fn lossy_f64(n: u64) -> f64 {
    n as f64
}

/// One closed loop sending requests back to back until `deadline`: on one keep-alive
/// connection (reconnecting after an error, which is counted), or with
/// `shape.connection_per_request` on a new connection each.
async fn connection_loop(
    addr: SocketAddr,
    path: String,
    deadline: Instant,
    shape: ClientShape,
) -> Tally {
    let mut tally = Tally::new();
    let host = addr.to_string();
    'connect: while Instant::now() < deadline {
        let connecting = Instant::now();
        let (mut sender, conn) =
            match tokio::time::timeout(REQUEST_TIMEOUT, connect(addr, shape.tls.as_ref())).await {
                Ok(Ok(s)) => s,
                _ => {
                    tally.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue 'connect;
                }
            };
        while Instant::now() < deadline {
            let mut req = Request::get(path.as_str())
                .header(header::HOST, host.as_str())
                .body(Empty::<Bytes>::new())
                .expect("a GET with a path and a host header is a valid request");
            if let Some(rotating) = &shape.header {
                req.headers_mut()
                    .insert(rotating.name.clone(), rotating.next_value().clone());
            }
            // A new connection per request: the latency includes connecting and the handshake.
            let started = if shape.connection_per_request {
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                connecting
            } else {
                Instant::now()
            };
            let exchange = async {
                sender.ready().await?;
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>((status, body.len()))
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok((status, len))) => {
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    tally.hist.saturating_record(us.max(1));
                    tally.requests += 1;
                    tally.body_bytes += u64::try_from(len).unwrap_or(u64::MAX);
                    if !status.is_success() {
                        tally.non_2xx += 1;
                    }
                }
                _ => {
                    tally.errors += 1;
                    continue 'connect;
                }
            }
            if shape.connection_per_request {
                // Close (TLS close_notify, FIN) before the next connect, so each loop holds at
                // most one connection.
                drop(sender);
                if !matches!(
                    tokio::time::timeout(REQUEST_TIMEOUT, conn).await,
                    Ok(Ok(()))
                ) {
                    tally.errors += 1;
                }
                continue 'connect;
            }
        }
    }
    tally
}

/// A connection to `addr` (over TLS with `tls`) ready for HTTP/1.1 requests, and the task
/// driving it (it ends when the connection closes).
async fn connect(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
) -> anyhow::Result<(SendRequest<Empty<Bytes>>, JoinHandle<()>)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    match tls {
        None => http1_handshake(stream).await,
        Some(tls) => {
            let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
                .connect(tls.server_name.clone(), stream)
                .await?;
            http1_handshake(stream).await
        }
    }
}

async fn http1_handshake<IO>(io: IO) -> anyhow::Result<(SendRequest<Empty<Bytes>>, JoinHandle<()>)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, task))
}

// ---------------------------------------------------------------------------------------------
// Bursts

/// `n` keep-alive HTTP/1.1 connections, opened up front and kept open, on which [`Burst::fire`]
/// sends one `GET` per connection at the same moment.
pub struct Burst {
    rt: tokio::runtime::Runtime,
    senders: Vec<SendRequest<Empty<Bytes>>>,
    host: String,
}

impl std::fmt::Debug for Burst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Burst")
            .field("connections", &self.senders.len())
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// One request of a burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BurstAnswer {
    /// Response status.
    pub status: u16,
    /// From just before the request was written to the last byte of its body.
    pub latency: Duration,
    /// Body bytes read.
    pub body_bytes: usize,
    /// The value of the header [`Burst::fire`] was asked to keep, if the response had it.
    pub header: Option<String>,
}

impl Burst {
    /// Opens `n` connections to `addr`, from one generator thread pinned to `pin` if given.
    pub fn open(addr: SocketAddr, n: usize, pin: Option<&str>) -> anyhow::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(1)
            .thread_name(THREAD_PREFIX)
            .enable_all();
        crate::pin::runtime(&mut builder, pin);
        let rt = builder.build().context("building the burst runtime")?;
        let senders = rt.block_on(async {
            let mut senders = Vec::with_capacity(n);
            for _ in 0..n.max(1) {
                let (sender, _conn) = tokio::time::timeout(REQUEST_TIMEOUT, connect(addr, None))
                    .await
                    .with_context(|| format!("connecting to {addr} took over {REQUEST_TIMEOUT:?}"))?
                    .with_context(|| format!("connecting to {addr}"))?;
                senders.push(sender);
            }
            anyhow::Ok(senders)
        })?;
        Ok(Self {
            rt,
            senders,
            host: addr.to_string(),
        })
    }

    /// Sends `GET path` on every connection at once (each waits until all are ready, then
    /// writes its request) and returns every answer, keeping the value of `keep` from each.
    /// Fails if any request errs or takes over 5 s.
    pub fn fire(&mut self, path: &str, keep: &HeaderName) -> anyhow::Result<Vec<BurstAnswer>> {
        let senders = std::mem::take(&mut self.senders);
        let start = Arc::new(tokio::sync::Barrier::new(senders.len()));
        let host = self.host.clone();
        let (senders, answers) = self.rt.block_on(async {
            let tasks: Vec<_> = senders
                .into_iter()
                .map(|mut sender| {
                    let req = Request::get(path)
                        .header(header::HOST, host.as_str())
                        .body(Empty::<Bytes>::new());
                    let start = start.clone();
                    let keep = keep.clone();
                    tokio::spawn(async move {
                        let exchange = async {
                            let req = req?;
                            sender.ready().await?;
                            start.wait().await;
                            let sent = Instant::now();
                            let resp = sender.send_request(req).await?;
                            let status = resp.status().as_u16();
                            let header = resp
                                .headers()
                                .get(&keep)
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                            let body = resp.into_body().collect().await?.to_bytes();
                            anyhow::Ok(BurstAnswer {
                                status,
                                latency: sent.elapsed(),
                                body_bytes: body.len(),
                                header,
                            })
                        };
                        let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                            .await
                            .unwrap_or_else(|_| {
                                Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))
                            });
                        (sender, answer)
                    })
                })
                .collect();
            let mut senders = Vec::with_capacity(tasks.len());
            let mut answers = Vec::with_capacity(tasks.len());
            for task in tasks {
                let (sender, answer) = task.await.context("a burst request task panicked")?;
                senders.push(sender);
                answers.push(answer);
            }
            anyhow::Ok((senders, answers))
        })?;
        self.senders = senders;
        answers
            .into_iter()
            .collect::<anyhow::Result<_>>()
            .with_context(|| format!("a request of the burst GET {path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 10s test @ http://127.0.0.1:8080/bench
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.34us  100.00us   5.00ms   90.00%
    Req/Sec    60.00k     2.00k   65.00k    70.00%
  Latency Distribution
     50%  500.00us
     75%  550.00us
     90%  600.00us
     99%    1.20ms
  600123 requests in 10.00s, 700.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  60012.30
Transfer/sec:     70.00MB
";

    #[test]
    fn parses_wrk_latency_output() {
        let m = parse_wrk(SAMPLE).expect("sample parses");
        assert_eq!(m.requests, 600_123);
        assert_eq!(m.non_2xx, 5);
        assert_eq!(m.errors, 3);
        assert!((m.rps - 60_012.3).abs() < 1e-6);
        assert!((m.p50_us - 500.0).abs() < 1e-6);
        assert!((m.p99_us - 1_200.0).abs() < 1e-6);
    }

    #[test]
    fn wrk_output_without_latency_is_an_error() {
        assert!(parse_wrk("Requests/sec: 10.0\n").is_err());
    }
}
