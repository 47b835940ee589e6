//! Live state: one immutable [`Snapshot`] of everything config-derived (clients, routes,
//! upstream clients), published through a single atomic pointer.
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
use crate::router::Router;
use crate::upstream::Upstreams;

/// Everything the request path needs, built from one validated [`Config`].
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) identifier: Identifier,
    pub(crate) router: Router,
    pub(crate) upstreams: Upstreams,
    pub(crate) headers: HeaderNames,
}

impl Snapshot {
    /// Builds a snapshot. The config must have passed validation. Needs a Tokio runtime
    /// (upstream clients spawn their connection tasks on it).
    pub(crate) fn build(config: &Config) -> Self {
        Self {
            identifier: Identifier::build(&config.identity, &config.clients),
            router: Router::build(config),
            upstreams: Upstreams::build(&config.services),
            headers: HeaderNames::build(&config.headers),
        }
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
}

impl Shared {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            live: ArcSwap::from_pointee(Snapshot::build(config)),
            server: config.server.clone(),
            request_permits: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            ready: AtomicBool::new(false),
        }
    }
}
