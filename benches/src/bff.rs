//! bff-proxy under test, built in-process through the library API (`Config::from_toml`,
//! `Proxy::bind`, `Proxy::run`): what the benchmark measures is the code that ships.
//!
//! It gets its own multi-thread Tokio runtime with `worker_threads` workers (1 by default, to
//! match nginx's single worker process) on its own OS thread.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::oneshot;

/// The bench config: one service (the upstream), one client that is also the default (so no
/// identifying header is needed), one route `GET /bench` → the service.
pub fn config_toml(
    upstream: SocketAddr,
    admin_port: u16,
    worker_threads: usize,
    pool: usize,
) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:{admin_port}"

[server]
worker_threads = {worker_threads}
drain_timeout = "1s"

[identity]
default_client = "web"

[services.upstream]
urls = ["http://{upstream}"]
protocol = "http1"
max_idle_connections = {pool}

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[routes]]
id = "bench"
methods = ["GET"]
path = "/bench"
service = "upstream"
"#
    )
}

/// Name prefixes of bff-proxy's threads (for CPU accounting): the runtime's, and the access
/// log writer's.
pub const THREAD_PREFIXES: &[&str] = &["bench-bff", "bff-access-log"];

/// A running bff-proxy. Dropping it asks it to drain and joins its thread.
#[derive(Debug)]
pub struct BffProxy {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BffProxy {
    /// Starts bff-proxy in front of `upstream` with `worker_threads` Tokio workers and an
    /// upstream keep-alive pool of `pool` connections, pinned to the CPU list `pin` if given.
    /// With `access_log`, it writes its access log (text) to that file.
    pub fn start(
        upstream: SocketAddr,
        worker_threads: usize,
        pool: usize,
        pin: Option<&str>,
        access_log: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let workers = worker_threads.max(1);
        let admin_port = crate::free_port().context("finding a port for the admin listener")?;
        let mut text = config_toml(upstream, admin_port, workers, pool);
        if let Some(path) = access_log {
            text.push_str(&format!(
                "\n[access_log]\noutput = {:?}\n",
                path.display().to_string()
            ));
        }
        Self::start_config(&text, workers, pin)
    }

    /// Starts bff-proxy with `edit` applied to the bench config ([`config_toml`]: in front of
    /// `upstream`, `worker_threads` workers, an upstream pool of `pool`), its threads named
    /// `threads` (see [`BffProxy::start_named`]), pinned to `pin` if given. Returns it with
    /// its admin listener's address.
    pub fn start_edited(
        upstream: SocketAddr,
        worker_threads: usize,
        pool: usize,
        pin: Option<&str>,
        threads: &str,
        edit: impl FnOnce(String) -> String,
    ) -> anyhow::Result<(Self, SocketAddr)> {
        let workers = worker_threads.max(1);
        let admin_port = crate::free_port().context("finding a port for the admin listener")?;
        let text = edit(config_toml(upstream, admin_port, workers, pool));
        let proxy = Self::start_named(&text, workers, pin, threads, threads)
            .with_context(|| format!("starting bff-proxy ({threads})"))?;
        Ok((proxy, SocketAddr::from(([127, 0, 0, 1], admin_port))))
    }

    /// Starts bff-proxy with the config `text` (its `server.worker_threads` should be
    /// `worker_threads`), pinned to the CPU list `pin` if given.
    pub fn start_config(
        text: &str,
        worker_threads: usize,
        pin: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_named(
            text,
            worker_threads,
            pin,
            "bench-bff-proxy",
            "bench-bff-main",
        )
    }

    /// Like [`BffProxy::start_config`], naming the runtime's threads `threads` and the thread
    /// that drives it `main_thread`, so that several proxies in one process can be told apart
    /// in `/proc` (which keeps the first 15 bytes of a name).
    pub fn start_named(
        text: &str,
        worker_threads: usize,
        pin: Option<&str>,
        threads: &str,
        main_thread: &str,
    ) -> anyhow::Result<Self> {
        let workers = worker_threads.max(1);
        let mut config = bff_proxy::Config::from_toml(text, "bench")
            .map_err(|e| anyhow::anyhow!("bench config rejected: {e}"))?;
        // An access log to stderr is turned off, like `access_log off;` in the nginx config
        // it is compared with (and a line per request would drown the benchmark's output);
        // `--access-log` gives both proxies a file instead.
        if config.access_log.output == "stderr" {
            config.access_log.enabled = false;
        }
        // The same runtime `bff-proxy run` builds for this many workers.
        let mut builder = bff_proxy::runtime_builder(workers);
        builder.thread_name(threads);
        crate::pin::runtime(&mut builder, pin);
        let rt = builder.build().context("building the bff-proxy runtime")?;
        let pin = pin.map(str::to_owned);
        let proxy = rt
            .block_on(bff_proxy::Proxy::bind(&config))
            .context("binding bff-proxy")?;
        let addr = proxy.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(main_thread.to_owned())
            .spawn(move || {
                crate::pin::this_thread(pin.as_deref());
                rt.block_on(proxy.run(async move {
                    let _ = stopped.await;
                }));
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .context("spawning the bff-proxy thread")?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The data-plane address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for BffProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
