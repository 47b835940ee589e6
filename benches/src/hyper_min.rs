//! `hyper-min`: the smallest reverse proxy built from the same parts as bff-proxy (hyper 1
//! HTTP/1.1 server, hyper-util's pooled legacy client, a multi-thread Tokio runtime with the same
//! worker count), with none of bff-proxy's pipeline. Optional target (`--hyper-min`): the gap
//! between it and bff-proxy is what the pipeline costs, the gap between it and nginx is what the
//! hyper/Tokio stack costs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Name prefix of hyper-min's threads (for CPU accounting).
pub const THREAD_PREFIX: &str = "bench-hyper";

/// A running minimal proxy. Dropping it stops it and joins its thread.
#[derive(Debug)]
pub struct HyperMin {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HyperMin {
    /// Starts it in front of `upstream` with `worker_threads` Tokio workers, pinned to the CPU
    /// list `pin` if given.
    pub fn start(
        upstream: SocketAddr,
        worker_threads: usize,
        pool: usize,
        pin: Option<&str>,
    ) -> anyhow::Result<Self> {
        // The same runtime shape bff-proxy gets for this many workers, so the comparison is
        // about the request path only.
        let mut builder = bff_proxy::runtime_builder(worker_threads.max(1));
        builder.thread_name("bench-hyper-min");
        crate::pin::runtime(&mut builder, pin);
        let rt = builder.build().context("building the hyper-min runtime")?;
        let pin = pin.map(str::to_owned);
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding hyper-min")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop, mut stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-hyper-min-main".into())
            .spawn(move || {
                crate::pin::this_thread(pin.as_deref());
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                        return;
                    };
                    let mut connector = HttpConnector::new();
                    connector.set_nodelay(true);
                    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
                        .pool_max_idle_per_host(pool)
                        .build(connector);
                    loop {
                        let (stream, _) = tokio::select! {
                            _ = &mut stopped => return,
                            accepted = listener.accept() => match accepted {
                                Ok(a) => a,
                                Err(_) => continue,
                            },
                        };
                        let _ = stream.set_nodelay(true);
                        let client = client.clone();
                        tokio::spawn(async move {
                            let service = hyper::service::service_fn(move |req| {
                                forward(client.clone(), upstream, req)
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawning the hyper-min thread")?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn forward(
    client: Client<HttpConnector, Body>,
    upstream: SocketAddr,
    req: Request<Incoming>,
) -> Result<http::Response<Body>, Infallible> {
    let (mut parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    parts.uri = format!("http://{upstream}{pq}")
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.headers.remove(http::header::HOST);
    let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
        Err(_) => {
            let mut r = http::Response::new(
                Empty::new()
                    .map_err(|never: Infallible| match never {})
                    .boxed_unsync(),
            );
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            r
        }
    })
}

impl Drop for HyperMin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
