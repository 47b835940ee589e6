//! The upstream every target ends at: an in-process hyper HTTP/1.1 server on loopback that
//! answers every request with the same pre-built JSON body, optionally after a fixed delay and
//! with extra response headers ([`Answer`]), and counts the requests it receives.
//!
//! It runs on its own Tokio runtime on its own OS thread, so it competes for the CPU exactly the
//! same way in the direct, bff-proxy and nginx runs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::oneshot;

/// Builds realistic JSON (a page of catalog products) of at least `target_bytes` bytes.
///
/// The result is a little over `target_bytes` (by less than one product); its exact length is
/// what the report shows.
pub fn json_body(target_bytes: usize) -> Bytes {
    const TAGS: [&str; 6] = ["new", "sale", "eco", "bestseller", "limited", "outdoor"];
    const COLORS: [&str; 5] = ["black", "white", "navy", "olive", "sand"];
    let mut items = Vec::new();
    let mut i: u64 = 0;
    loop {
        let idx = usize::try_from(i).unwrap_or(0);
        items.push(json!({
            "id": format!("prd_{:08x}", 0x5eed_0000_u64 + i * 7919),
            "sku": format!("SKU-{:05}-{}", 10_000 + i, COLORS[idx % COLORS.len()].to_uppercase()),
            "name": format!("Trail runner {} (size {})", i + 1, 38 + i % 10),
            "price": { "amount": 4_999 + i * 250, "currency": "EUR" },
            "in_stock": !i.is_multiple_of(3),
            "rating": 3.5 + f64::from(u32::try_from(i % 15).unwrap_or(0)) / 10.0,
            "tags": [TAGS[idx % TAGS.len()], TAGS[(idx + 2) % TAGS.len()]],
            "image": format!("https://img.example.com/p/{i}/main.jpg"),
        }));
        let page = json!({
            "page": 1,
            "per_page": items.len(),
            "total": 1_000,
            "items": items,
        });
        let text = serde_json::to_vec(&page).expect("a JSON value serializes");
        if text.len() >= target_bytes {
            return Bytes::from(text);
        }
        i += 1;
    }
}

/// Name prefix of the upstream's threads (for CPU accounting).
pub const THREAD_PREFIX: &str = "bench-upstream";

/// How the upstream answers, beyond its body (the default: at once, `content-type` only).
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// Wait this long before answering (a slow service; the wait is a timer, so concurrent
    /// requests wait together).
    pub delay: Duration,
    /// Response headers added to `content-type: application/json`, e.g.
    /// `cache-control: max-age=600`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A running upstream. Dropping it stops the server and joins its thread.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    body_len: usize,
    requests: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Starts an upstream on `127.0.0.1:0` that answers `body` with `worker_threads` Tokio
    /// worker threads, pinned to the CPU list `pin` if given.
    pub fn start(body: Bytes, worker_threads: usize, pin: Option<&str>) -> anyhow::Result<Self> {
        Self::start_delayed(body, Duration::ZERO, worker_threads, pin)
    }

    /// Like [`Upstream::start`], answering each request only after `delay` (a slow service;
    /// the wait is a timer, so concurrent requests wait together).
    pub fn start_delayed(
        body: Bytes,
        delay: Duration,
        worker_threads: usize,
        pin: Option<&str>,
    ) -> anyhow::Result<Self> {
        let answer = Answer {
            delay,
            ..Answer::default()
        };
        Self::start_answering(body, answer, worker_threads, pin)
    }

    /// Like [`Upstream::start`], answering as `answer` says (delay, extra headers).
    pub fn start_answering(
        body: Bytes,
        answer: Answer,
        worker_threads: usize,
        pin: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(worker_threads.max(1))
            .thread_name(THREAD_PREFIX)
            .enable_all();
        crate::pin::runtime(&mut builder, pin);
        let rt = builder.build().context("building the upstream runtime")?;
        let pin = pin.map(str::to_owned);
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("binding the upstream on 127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let body_len = body.len();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("bench-upstream-main".into())
            .spawn(move || {
                crate::pin::this_thread(pin.as_deref());
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("upstream: cannot register listener: {e}");
                            return;
                        }
                    };
                    serve(listener, body, answer, counter, stopped).await;
                });
                // Kills the keep-alive connections still open (the proxies' pools).
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawning the upstream thread")?;
        Ok(Self {
            addr,
            body_len,
            requests,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Length of the body it answers with, in bytes.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Requests received so far (counted as each arrives, before any delay).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    body: Bytes,
    answer: Answer,
    requests: Arc<AtomicU64>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in answer.headers {
        headers.append(name, value);
    }
    let delay = answer.delay;
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("upstream: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let headers = headers.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                requests.fetch_add(1, Ordering::Relaxed);
                let mut resp = Response::new(Full::new(body.clone()));
                *resp.headers_mut() = headers.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
