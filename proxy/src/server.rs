//! [`Proxy`]: binds the listeners, serves until told to stop, then drains.
//!
//! `main`, the demo, the end-to-end tests and the benchmarks all build this same type, so what
//! is tested is what ships.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::ProxyError;
use crate::listener::{ConnSettings, accept_loop};
use crate::metrics::Metrics;
use crate::pipeline::{self, ConnInfo};
use crate::reload::Reloader;
use crate::state::Shared;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The plugin engine could not be created.
    #[error(transparent)]
    PluginRuntime(#[from] crate::plugins::RuntimeError),
    /// Plugins the config uses could not be loaded or initialized.
    #[error(transparent)]
    Plugins(#[from] crate::plugins::LoadError),
}

/// Loads and initializes every plugin `config` uses, as `run` would, without binding anything:
/// what `bff-proxy check` runs after the config itself is valid. Returns how many plugin uses
/// were initialized.
pub async fn check_plugins(config: &Config) -> Result<usize, StartError> {
    if !config.uses_plugins() {
        return Ok(0);
    }
    crate::reload::first_load(config, &Metrics::new()).await?;
    Ok(config.routes.iter().map(|r| r.chain.len()).sum())
}

/// A bound, not yet serving, proxy.
#[derive(Debug)]
pub struct Proxy {
    data: TcpListener,
    admin: TcpListener,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
}

impl Proxy {
    /// Binds the data-plane and admin listeners of a validated config. Must be called inside a
    /// Tokio runtime. Port 0 picks a free port; see [`Proxy::local_addr`].
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        Self::bind_with(config, Arc::new(Metrics::new())).await
    }

    /// Like [`Proxy::bind`], recording into `metrics` (served at the admin `/metrics`).
    pub async fn bind_with(config: &Config, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        let bind = |addr: SocketAddr, what| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, what, source })
        };
        // Plugins load before anything is bound: a bad plugin fails startup like a bad config.
        // The first load is the same path every reload takes.
        let (snapshot, first) = crate::reload::first_load(config, &metrics).await?;
        let data = bind(config.listen, "data plane").await?;
        let admin = bind(config.admin.listen, "admin").await?;
        let shared = Arc::new(Shared::new(config, snapshot));
        let reloader = Arc::new(Reloader::new(shared.clone(), metrics, first));
        Ok(Self {
            data,
            admin,
            shared,
            reloader,
        })
    }

    /// The data-plane address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.data
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound TCP listener has a local address")
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// for up to `server.drain_timeout`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Self {
            data,
            admin,
            shared,
            reloader,
        } = self;
        // Three signals, in the order shutdown uses them: stop the data plane (graceful close
        // of every connection), force-close what is left at the drain deadline, and only
        // then stop the admin listener, so `/readyz` answers 503 throughout the drain.
        let stop_data = CancellationToken::new();
        let force_close = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = shared.server.clone();
        let data_settings = ConnSettings {
            builder: Arc::new(server.builder()),
            idle_timeout: server.idle_timeout,
            force_close: force_close.clone(),
        };
        let admin_settings = ConnSettings {
            builder: Arc::new(hyper_util::server::conn::auto::Builder::new(
                hyper_util::rt::TokioExecutor::new(),
            )),
            idle_timeout: server.idle_timeout,
            force_close: stop_admin.clone(),
        };

        let addr = |l: &TcpListener| l.local_addr().expect("a bound TCP listener has an address");
        let (listen, admin_addr) = (addr(&data), addr(&admin));
        let data_shared = shared.clone();
        let make_data = move |peer: SocketAddr, over_limit: bool| {
            let shared = data_shared.clone();
            let conn = Arc::new(ConnInfo::new(peer));
            hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let conn = conn.clone();
                async move {
                    if over_limit {
                        tracing::warn!(peer = %conn.peer, "connection over the limit refused");
                        return Ok::<_, Infallible>(pipeline::refuse(
                            &shared,
                            &req,
                            ProxyError::ConnectionLimit,
                        ));
                    }
                    Ok(pipeline::handle(shared, conn, req).await)
                }
            })
        };
        let admin_reloader = reloader.clone();
        let make_admin = move |_peer: SocketAddr, _over_limit: bool| {
            let reloader = admin_reloader.clone();
            hyper::service::service_fn(move |req| {
                let reloader = reloader.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(&reloader, req).await) }
            })
        };

        let data_loop = tokio::spawn(accept_loop(
            data,
            data_settings,
            server.max_connections,
            make_data,
            stop_data.clone(),
            tracker.clone(),
        ));
        // The admin listener has its own small budget so probes work while the data plane is full.
        let admin_tracker = TaskTracker::new();
        let admin_loop = tokio::spawn(accept_loop(
            admin,
            admin_settings,
            64,
            make_admin,
            stop_admin.clone(),
            admin_tracker.clone(),
        ));
        // File changes and SIGHUP become reloads until shutdown begins.
        let stop_reloads = CancellationToken::new();
        let watcher = tokio::spawn(crate::reload::watch(reloader.clone(), stop_reloads.clone()));
        shared.ready.store(true, Ordering::Release);
        // Logged only once `/readyz` answers 200, so whoever waits for this line can rely on it.
        tracing::info!(listen = %listen, admin = %admin_addr, "proxy ready");

        shutdown.await;
        shared.ready.store(false, Ordering::Release);
        stop_reloads.cancel();
        let _ = watcher.await;
        tracing::info!(
            connections = tracker.len(),
            drain_timeout = ?server.drain_timeout,
            "shutting down: draining in-flight requests"
        );
        stop_data.cancel();
        let _ = data_loop.await;
        tracker.close();
        if tokio::time::timeout(server.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "drain timeout reached; closing remaining connections"
            );
            force_close.cancel();
            tracker.wait().await;
        } else {
            tracing::info!("drained");
        }
        stop_admin.cancel();
        let _ = admin_loop.await;
        admin_tracker.close();
        admin_tracker.wait().await;
    }
}
