//! Live state: one immutable [`Snapshot`] of everything config-derived (clients, routes,
//! upstream clients, loaded plugin chains), published through a single atomic pointer.
//!
//! The request path loads the snapshot once per request and keeps that `Arc` to the end, so a
//! later swap never changes a request mid-flight. `reload` builds new snapshots and swaps them
//! in. Process-wide things that must outlive a reload
//! (limits' semaphores, readiness) live in [`Shared`], outside the snapshot.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::config::{AccessLogConfig, Config};
use crate::identity::Identifier;
use crate::listener::ServerConfig;
use crate::metrics::{Metrics, RequestTable};
use crate::observe::access_log::AccessLog;
use crate::pipeline::HeaderNames;
use crate::plugins::{Catalog, Chain};
use crate::ratelimit::RateLimits;
use crate::router::Router;
use crate::upstream::Upstreams;

/// Everything the request path needs, built from one validated [`Config`].
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) identifier: Identifier,
    pub(crate) router: Router,
    /// Shared with plugin `send` tasks, which may outlive the request phase that started them,
    /// and with the next snapshot when `services` did not change (its pools stay warm).
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) headers: HeaderNames,
    /// `[plugins] chain_timeout`.
    pub(crate) chain_timeout: std::time::Duration,
    /// The loaded plugins by name, with their versions and problems (`/admin/plugins`).
    pub(crate) catalog: Catalog,
    /// Per-client rate limits, by client index.
    pub(crate) rate_limits: RateLimits,
    /// The request series of every client × route pair of this config.
    pub(crate) request_metrics: RequestTable,
    /// `[access_log]` (the output itself is bound at startup, in [`Shared`]).
    pub(crate) access_log: AccessLogConfig,
    /// The config it was built from (the next reload compares against it).
    pub(crate) config: Arc<Config>,
}

impl Snapshot {
    /// Puts a snapshot together from a validated config and its loaded chains (by route
    /// index). What `current` (the live snapshot) built from equal settings is kept: its
    /// upstream pools (idle connections stay warm), its token verifier (its cache of verified
    /// tokens stays), the response cache of each service whose URLs and cache settings are
    /// unchanged and its clients' rate limiters (no fresh burst on reload). Needs a Tokio runtime (upstream clients spawn their connection
    /// tasks on it).
    pub(crate) fn assemble(
        config: Config,
        chains: Vec<Option<Arc<Chain>>>,
        catalog: Catalog,
        current: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Self {
        let credentials = credential_headers(&config);
        let upstreams = current
            .filter(|c| {
                c.config.services == config.services && c.upstreams.credentials() == &*credentials
            })
            .map(|c| c.upstreams.clone());
        let verifier = current
            .filter(|c| c.config.identity.jwt == config.identity.jwt)
            .and_then(|c| c.identifier.verifier());
        let clients: Vec<&str> = config.clients.iter().map(|c| c.name.as_str()).collect();
        let routes: Vec<(&str, &[String])> = config
            .routes
            .iter()
            .map(|r| (r.id.as_str(), r.clients.as_slice()))
            .collect();
        let request_metrics = RequestTable::build(&metrics.requests, &clients, &routes);
        metrics.connections.tls_cert_expiry.set(
            config
                .tls
                .as_ref()
                .and_then(|t| t.loaded.as_ref())
                .map_or(0, |l| l.not_after),
        );
        Self {
            rate_limits: RateLimits::build(
                &config.clients,
                current.map(|c| (&c.rate_limits, c.config.clients.as_slice())),
            ),
            identifier: Identifier::build(
                &config.identity,
                &config.clients,
                config.tls.as_ref(),
                verifier,
            ),
            router: Router::build(&config, chains),
            upstreams: upstreams.unwrap_or_else(|| {
                Arc::new(Upstreams::build(
                    &config.services,
                    &metrics.upstreams,
                    current.map(|c| &*c.upstreams),
                    credentials,
                ))
            }),
            headers: HeaderNames::build(&config.headers),
            chain_timeout: config.plugins.chain_timeout,
            catalog,
            request_metrics,
            access_log: config.access_log.clone(),
            config: Arc::new(config),
        }
    }
}

/// The request headers the proxy fills with a user's identity for upstreams (the JWT
/// `claim_headers`, `x-forwarded-client-cert`): response caches treat them as credentials.
fn credential_headers(config: &Config) -> Box<[http::HeaderName]> {
    let claims = config
        .identity
        .jwt
        .iter()
        .flat_map(|j| j.claim_headers.keys())
        .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok());
    let xfcc = config
        .tls
        .as_ref()
        .filter(|t| t.forward_client_cert)
        .map(|_| http::HeaderName::from_static("x-forwarded-client-cert"));
    claims.chain(xfcc).collect()
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
    /// The process's metrics (they survive reloads).
    pub(crate) metrics: Arc<Metrics>,
    /// The access log writer (its output is bound at startup).
    pub(crate) access_log: AccessLog,
    /// Span export (`[tracing]`, bound at startup).
    pub(crate) tracing: Option<crate::observe::otel::Tracing>,
}

impl Shared {
    pub(crate) fn new(
        config: &Config,
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
        tracing: Option<crate::observe::otel::Tracing>,
    ) -> Self {
        Self {
            live: ArcSwap::from_pointee(snapshot),
            server: config.server.clone(),
            request_permits: Arc::new(Semaphore::new(config.server.max_concurrent_requests)),
            ready: AtomicBool::new(false),
            metrics,
            access_log,
            tracing,
        }
    }
}
