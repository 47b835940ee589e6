//! Live state: one immutable [`Snapshot`] of everything config-derived (clients, routes,
//! upstream clients, loaded plugin chains), published through a single atomic pointer.
//!
//! The request path loads the snapshot once per request and keeps that `Arc` to the end, so a
//! later swap never changes a request mid-flight. Process-wide things that must outlive a reload
//! (limits' semaphores, readiness) live in [`Shared`], outside the snapshot.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::identity::Identifier;
use crate::listener::ServerConfig;
use crate::pipeline::HeaderNames;
use crate::plugins::{LoadError, Runtime, load_chains};
use crate::router::Router;
use crate::upstream::Upstreams;

/// Everything the request path needs, built from one validated [`Config`].
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) identifier: Identifier,
    pub(crate) router: Router,
    /// Shared with plugin `send` tasks, which may outlive the request phase that started them.
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) headers: HeaderNames,
    /// `[plugins] chain_timeout`.
    pub(crate) chain_timeout: std::time::Duration,
}

impl Snapshot {
    /// Builds a snapshot, loading every plugin the routes use (off the request path: compiling
    /// runs on blocking threads). The config must have passed validation. Needs a Tokio runtime
    /// (upstream clients spawn their connection tasks on it).
    pub(crate) async fn build(
        config: &Config,
        plugins: Option<&Arc<Runtime>>,
    ) -> Result<Self, LoadError> {
        let chains = match plugins {
            Some(rt) => load_chains(rt, config).await?,
            None => Vec::new(),
        };
        Ok(Self {
            identifier: Identifier::build(&config.identity, &config.clients),
            router: Router::build(config, chains),
            upstreams: Arc::new(Upstreams::build(&config.services)),
            headers: HeaderNames::build(&config.headers),
            chain_timeout: config.plugins.chain_timeout,
        })
    }
}

/// State shared by every connection for the life of the process.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The current snapshot.
    pub(crate) live: ArcSwap<Snapshot>,
    /// Server limits (bound at startup: sockets and semaphores are sized from them).
    pub(crate) server: ServerConfig,
    /// One permit per request in flight (load shedding beyond that).
    pub(crate) request_permits: Arc<Semaphore>,
    /// False until serving and again once draining (`/readyz`).
    pub(crate) ready: AtomicBool,
    /// The plugin engine, if any route uses plugins. Chains hold it too; kept here because a
    /// reload must compile new plugins with the same engine.
    #[expect(dead_code, reason = "read by hot reload (issue #4)")]
    pub(crate) plugins: Option<Arc<Runtime>>,
}

impl Shared {
    pub(crate) fn new(config: &Config, snapshot: Snapshot, plugins: Option<Arc<Runtime>>) -> Self {
        Self {
            live: ArcSwap::from_pointee(snapshot),
            plugins,
            server: config.server.clone(),
            request_permits: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            ready: AtomicBool::new(false),
        }
    }
}
