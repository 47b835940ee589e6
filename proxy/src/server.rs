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

use crate::admin::Admin;
use crate::config::Config;
use crate::error::ProxyError;
use crate::listener::ServerConfig;
use crate::listener::{ConnSettings, Peer, Refusal, TlsSettings, accept_loop};
use crate::metrics::Metrics;
use crate::observe::access_log::AccessLog;
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
    /// Span export (`[tracing]`) could not be set up.
    #[error("cannot export spans: {0}")]
    Tracing(String),
    /// The access log output could not be opened.
    #[error("cannot open the access log `{output}`")]
    AccessLog {
        /// `access_log.output`.
        output: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
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

fn bound_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .expect("a bound TCP listener has a local address")
}

/// The admin listener, serving from the moment it is bound: while plugins load it answers
/// `/healthz` (200), `/readyz` (503) and `/metrics`.
#[derive(Debug)]
struct AdminServer {
    state: Arc<Admin>,
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl AdminServer {
    fn start(listener: TcpListener, state: Arc<Admin>, server: &ServerConfig) -> Self {
        let addr = bound_addr(&listener);
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let settings = ConnSettings {
            builder: Arc::new(hyper_util::server::conn::auto::Builder::new(
                hyper_util::rt::TokioExecutor::new(),
            )),
            idle_timeout: server.idle_timeout,
            force_close: stop.clone(),
            metrics: None,
            tls: None,
        };
        let service_state = state.clone();
        let make_admin = move |_peer: Peer, _refusal: Option<Refusal>| {
            let state = service_state.clone();
            hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(&state, req).await) }
            })
        };
        // The admin listener has its own small budget so probes work while the data plane is full.
        let task = tokio::spawn(accept_loop(
            listener,
            settings,
            64,
            make_admin,
            stop.clone(),
            tracker.clone(),
        ));
        Self {
            state,
            addr,
            task: Some(task),
            stop,
            tracker,
        }
    }

    /// Stops accepting and waits for open admin connections to close.
    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        // A proxy that never ran (its load failed) must not leave its admin listener behind.
        self.stop.cancel();
    }
}

/// Listeners bound, admin serving, plugins not loaded yet: see [`Proxy::listen`].
#[derive(Debug)]
pub struct Starting {
    config: Config,
    data: TcpListener,
    admin: AdminServer,
}

impl Starting {
    /// The data-plane address bound (not accepting until [`Proxy::run`]).
    pub fn local_addr(&self) -> SocketAddr {
        bound_addr(&self.data)
    }

    /// The admin address, already answering probes.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    /// Loads plugins and builds the first snapshot (the same path every reload takes); a bad
    /// plugin fails startup like a bad config. Opens the access log.
    pub async fn load(self) -> Result<Proxy, StartError> {
        let Self {
            config,
            data,
            admin,
        } = self;
        let metrics = admin.state.metrics.clone();
        let (snapshot, first) = crate::reload::first_load(&config, &metrics).await?;
        let access_log =
            AccessLog::start(&config.access_log).map_err(|source| StartError::AccessLog {
                output: config.access_log.output.clone(),
                source,
            })?;
        let tracing = config
            .tracing
            .as_ref()
            .map(crate::observe::otel::Tracing::start)
            .transpose()
            .map_err(StartError::Tracing)?;
        let shared = Arc::new(Shared::new(
            &config,
            snapshot,
            metrics.clone(),
            access_log,
            tracing,
        ));
        let reloader = Arc::new(Reloader::new(shared.clone(), metrics, first));
        admin.state.loaded(reloader.clone());
        Ok(Proxy {
            data,
            admin,
            shared,
            reloader,
        })
    }
}

/// A bound, not yet serving, proxy.
#[derive(Debug)]
pub struct Proxy {
    data: TcpListener,
    admin: AdminServer,
    shared: Arc<Shared>,
    reloader: Arc<Reloader>,
}

impl Proxy {
    /// Binds the data-plane and admin listeners of a validated config and loads its plugins.
    /// Must be called inside a Tokio runtime. Port 0 picks a free port; see
    /// [`Proxy::local_addr`].
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        Self::bind_with(config, Arc::new(Metrics::new())).await
    }

    /// Like [`Proxy::bind`], recording into `metrics` (served at the admin `/metrics`).
    pub async fn bind_with(config: &Config, metrics: Arc<Metrics>) -> Result<Self, StartError> {
        Self::listen(config, metrics).await?.load().await
    }

    /// The first half of [`Proxy::bind_with`]: binds both listeners and starts answering
    /// probes on the admin one (`/readyz` is 503 until the proxy runs), before the possibly
    /// slow plugin load of [`Starting::load`].
    pub async fn listen(config: &Config, metrics: Arc<Metrics>) -> Result<Starting, StartError> {
        let bind = |addr: SocketAddr, what| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, what, source })
        };
        let data = bind(config.listen, "data plane").await?;
        let admin = bind(config.admin.listen, "admin").await?;
        let state = Arc::new(Admin::new(&config.admin, metrics));
        Ok(Starting {
            config: config.clone(),
            data,
            admin: AdminServer::start(admin, state, &config.server),
        })
    }

    /// The data-plane address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        bound_addr(&self.data)
    }

    /// The admin address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// for up to `server.drain_timeout`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let Self {
            data,
            mut admin,
            shared,
            reloader,
        } = self;
        // Two signals for the data plane, in the order shutdown uses them: stop it (graceful
        // close of every connection), then force-close what is left at the drain deadline.
        // The admin listener stops last, so `/readyz` answers 503 throughout the drain.
        let stop_data = CancellationToken::new();
        let force_close = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = shared.server.clone();
        // TLS or not is decided at startup (a reload that adds or removes `[tls]` is refused
        // that part); the certificate comes from the live snapshot, so a reload rotates it.
        let tls = shared.live.load().config.tls.is_some().then(|| {
            let shared = shared.clone();
            TlsSettings {
                current: Arc::new(move || {
                    let live = shared.live.load();
                    let loaded = live.config.tls.as_ref()?.loaded.as_ref()?;
                    Some(loaded.server.clone())
                }),
                handshake_timeout: server.header_read_timeout,
            }
        });
        let data_settings = ConnSettings {
            builder: Arc::new(server.builder()),
            idle_timeout: server.idle_timeout,
            force_close: force_close.clone(),
            metrics: Some(shared.metrics.connections.clone()),
            tls,
        };

        let listen = data
            .local_addr()
            .expect("a bound TCP listener has an address");
        let data_shared = shared.clone();
        let make_data = move |peer: Peer, refusal: Option<Refusal>| {
            let shared = data_shared.clone();
            let conn = Arc::new(ConnInfo::new(peer));
            hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let conn = conn.clone();
                async move {
                    let error = match refusal {
                        None => {
                            return Ok::<_, Infallible>(pipeline::handle(shared, conn, req).await);
                        }
                        Some(Refusal::ConnectionLimit) => {
                            tracing::warn!(peer = %conn.peer, "connection over the limit refused");
                            ProxyError::ConnectionLimit
                        }
                        Some(Refusal::HttpsRequired) => {
                            tracing::debug!(peer = %conn.peer, "cleartext request on the HTTPS port");
                            ProxyError::HttpsRequired
                        }
                    };
                    Ok(pipeline::refuse(&shared, &req, error))
                }
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
        // File changes and SIGHUP become reloads until shutdown begins.
        let stop_reloads = CancellationToken::new();
        let watcher = tokio::spawn(crate::reload::watch(reloader.clone(), stop_reloads.clone()));
        // New plugin versions that fail far more than the ones they replaced are rolled back.
        let health = tokio::spawn(crate::reload::watch_plugin_health(
            reloader.clone(),
            stop_reloads.clone(),
        ));
        shared.ready.store(true, Ordering::Release);
        // Logged only once `/readyz` answers 200, so whoever waits for this line can rely on it.
        tracing::info!(listen = %listen, admin = %admin.addr, "proxy ready");

        shutdown.await;
        shared.ready.store(false, Ordering::Release);
        stop_reloads.cancel();
        let _ = watcher.await;
        let _ = health.await;
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
        if let Some(t) = &shared.tracing {
            t.shutdown().await;
        }
        admin.stop().await;
    }
}
