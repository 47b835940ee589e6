//! The admin listener: health endpoints for orchestrators, metrics and the proxy's live state,
//! apart from the data plane so that probes never compete with (or get routed like) client
//! traffic. It answers from the moment it is bound, before plugins are loaded.
//!
//! - `GET /healthz`: 200 while the process is up (liveness).
//! - `GET /readyz`: 200 once config and plugins are loaded and the data plane accepts; 503
//!   before that and while draining (readiness).
//! - `GET /metrics`: Prometheus text format.
//! - `GET /admin/config`: the effective config (defaults filled in), secrets redacted.
//! - `GET /admin/plugins`: loaded plugins: version (SHA-256), size, loaded-at, the routes and
//!   clients using each, status and the last problem with its file, and the serving version's
//!   last failed use on a request (when, where, which outcome, the message with where the
//!   plugin was, the request id).
//! - `GET /admin/reloads`: recent reloads with trigger, outcome, duration, errors, warnings.
//! - `POST /admin/reload`: reload now; 200 with the record, 422 if it was rejected.
//! - `POST /admin/plugins/rollback`: serve a plugin's previous version again (`{"plugin": NAME}`),
//!   while one is kept (`plugins.rollback.window` after a reload replaced it).
//! - `POST /admin/cache/purge`: drop a service's stored responses, all of them or those whose
//!   path starts with a prefix (`{"service": "catalog", "prefix": "/products/"}`).
//!
//! Mutations only by `POST`; every other method gets 405 with `Allow`. With
//! `admin.token_sha256` set, everything but the two probes needs `Authorization: Bearer <token>`.

mod redact;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::body::{self, Body};
use crate::config::{ConfigPath, Problems};
use crate::metrics::Metrics;
use crate::plugins::LoadedPlugin;
use crate::reload::{Outcome, Reloader, RollbackBy, RollbackError, Trigger, rfc3339};
use crate::state::Snapshot;

/// Default admin listen address: loopback.
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";

/// `[admin]`: the admin listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
    /// Hex SHA-256 of the bearer token the admin API requires (`printf %s TOKEN | sha256sum`).
    /// Unset: no token (fine on loopback; bound beyond it, the proxy warns).
    pub token_sha256: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("DEFAULT_ADMIN_LISTEN is a valid socket address"),
            token_sha256: None,
        }
    }
}

impl AdminConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        match &self.token_sha256 {
            Some(t) if parse_sha256(t).is_none() => problems.push(
                at.key("token_sha256"),
                "must be 64 hex digits: the SHA-256 of the token (`printf %s TOKEN | sha256sum`)",
            ),
            Some(_) => {}
            None if !self.listen.ip().is_loopback() => tracing::warn!(
                listen = %self.listen,
                "the admin listener is bound beyond loopback without a token (set admin.token_sha256)"
            ),
            None => {}
        }
    }
}

fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut out).ok()?;
    Some(out)
}

/// What the admin endpoints serve from: the metrics from the start, the reloader (and through
/// it the live snapshot) once the first load is done.
#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) metrics: Arc<Metrics>,
    reloader: OnceLock<Arc<Reloader>>,
    token: Option<[u8; 32]>,
}

impl Admin {
    pub(crate) fn new(config: &AdminConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            reloader: OnceLock::new(),
            token: config.token_sha256.as_deref().and_then(parse_sha256),
        }
    }

    /// The first load is done: serve the live state.
    pub(crate) fn loaded(&self, reloader: Arc<Reloader>) {
        let _ = self.reloader.set(reloader);
    }

    /// True if the request carries the admin token (or none is required).
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        presented.is_some_and(|t| {
            let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
            bool::from(digest.ct_eq(expected))
        })
    }
}

/// Answers one admin request.
pub(crate) async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let allowed: &'static str = match path {
        "/admin/reload" | "/admin/cache/purge" | "/admin/plugins/rollback" => "POST",
        "/healthz" | "/readyz" | "/metrics" | "/admin/config" | "/admin/plugins"
        | "/admin/reloads" => "GET, HEAD",
        _ => {
            return error(StatusCode::NOT_FOUND, "not_found", "unknown admin endpoint");
        }
    };
    let probe = matches!(path, "/healthz" | "/readyz");
    if !probe && !admin.authorized(&req) {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this admin endpoint needs `Authorization: Bearer <token>`",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"bff-proxy admin\""),
        );
        return r;
    }
    let method_ok = match allowed {
        "POST" => req.method() == Method::POST,
        _ => req.method() == Method::GET || req.method() == Method::HEAD,
    };
    if !method_ok {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this admin endpoint",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allowed));
        return r;
    }
    if path == "/healthz" {
        return json(StatusCode::OK, &serde_json::json!({"status": "live"}));
    }
    if path == "/metrics" {
        let mut r = Response::new(body::full(admin.metrics.render()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return r;
    }
    let Some(reloader) = admin.reloader.get() else {
        // Still loading plugins: nothing to show yet, and not ready.
        return match path {
            "/readyz" => json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "loading"}),
            ),
            _ => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "loading",
                "the proxy is still loading its config and plugins",
            ),
        };
    };
    let shared = reloader.shared();
    match path {
        "/readyz" => {
            if shared.ready.load(Ordering::Acquire) {
                json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"status": "not_ready"}),
                )
            }
        }
        "/admin/config" => json(
            StatusCode::OK,
            &redact::effective_config(&shared.live.load().config),
        ),
        "/admin/plugins" => json(StatusCode::OK, &plugins(&shared.live.load())),
        "/admin/reloads" => json(
            StatusCode::OK,
            &serde_json::json!({ "reloads": reloader.history() }),
        ),
        "/admin/cache/purge" => purge(&shared.live.load(), req).await,
        "/admin/plugins/rollback" => rollback(reloader, req).await,
        _ => {
            // POST /admin/reload: runs now (after any reload in progress) and reports.
            let record = reloader.reload(Trigger::Admin).await;
            let status = match record.outcome {
                Outcome::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
                Outcome::Applied | Outcome::Unchanged => StatusCode::OK,
            };
            json(status, &serde_json::json!({ "reload": record }))
        }
    }
}

/// Reads a small JSON request body into `T`, or the `400 invalid_body` answer.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    expected: &str,
) -> Result<T, Response<Body>> {
    const MAX_BODY: usize = 64 << 10;
    let bytes =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(req.into_body(), MAX_BODY))
            .await
            .map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the body must be a JSON object of at most 64 KiB",
                )
            })?
            .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            &format!("expected {expected}: {e}"),
        )
    })
}

/// `POST /admin/plugins/rollback` with `{"plugin": NAME}` (or `"canary": true` to stop its
/// canary): 200 with the reload record, 404 for an unknown plugin, 409 when no previous version
/// is kept (or no canary serves), 422 if the reload failed.
async fn rollback(reloader: &Reloader, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rollback {
        plugin: String,
        #[serde(default)]
        canary: bool,
    }
    let ask: Rollback = match json_body(req, r#"{"plugin": NAME, "canary": false}"#).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let reason = "rolled back through the admin API".to_owned();
    match reloader
        .roll_back(&ask.plugin, ask.canary, reason, RollbackBy::Admin)
        .await
    {
        Ok(record) => json(StatusCode::OK, &serde_json::json!({ "reload": record })),
        Err(e) => {
            let (status, code) = match &e {
                RollbackError::UnknownPlugin(_) => (StatusCode::NOT_FOUND, "unknown_plugin"),
                RollbackError::NoPrevious(_) => (StatusCode::CONFLICT, "no_previous_version"),
                RollbackError::NoCanary(_) => (StatusCode::CONFLICT, "no_canary"),
                RollbackError::NotApplied(_) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "rollback_failed")
                }
            };
            error(status, code, &e.to_string())
        }
    }
}

/// `POST /admin/cache/purge` with `{"service": NAME, "prefix": "/path"}` (`prefix` optional).
async fn purge(snapshot: &Snapshot, req: Request<Incoming>) -> Response<Body> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Purge {
        service: String,
        prefix: Option<String>,
    }
    let purge: Purge = match json_body(req, r#"{"service": NAME, "prefix": "/path"}"#).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    match snapshot
        .upstreams
        .purge(&purge.service, purge.prefix.as_deref())
    {
        Some(purged) => {
            tracing::info!(service = %purge.service, prefix = purge.prefix.as_deref().unwrap_or(""), purged, "cache purged");
            json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
        }
        None => error(
            StatusCode::NOT_FOUND,
            "no_cache",
            &format!(
                "no service `{}` with a cache in the live config",
                purge.service.escape_debug()
            ),
        ),
    }
}

/// `GET /admin/plugins`: every loaded plugin, its serving version and any problem with its file.
fn plugins(snapshot: &Snapshot) -> serde_json::Value {
    let list: Vec<serde_json::Value> = snapshot
        .catalog
        .entries
        .iter()
        .map(|(name, e)| {
            let p = &e.serving;
            let (status, last_error) = file_status(e.problem.as_ref());
            serde_json::json!({
                "name": &**name,
                "version": p.short_version(),
                "sha256": p.sha256,
                "size": p.size,
                "file": e.file.display().to_string(),
                "loaded_at": rfc3339(p.loaded_at),
                "tier": p.code().tier.as_str(),
                "routes": e.routes,
                "clients": e.clients,
                "status": status,
                "last_error": last_error,
                "last_failure": last_failure(p),
                "calls": p.calls().0,
                "failed_calls": p.calls().1,
                "canary": e.canary.as_ref().map(|c| canary(c, snapshot.config.plugins.canary.get(&**name))),
                "previous": e.previous.as_ref().map(|prev| serde_json::json!({
                    "version": prev.plugin.short_version(),
                    "sha256": prev.plugin.sha256,
                    "replaced_at": rfc3339(prev.replaced_at_wall),
                })),
            })
        })
        .collect();
    serde_json::json!({ "plugins": list })
}

/// A plugin file's `status` and `last_error` in `GET /admin/plugins`.
fn file_status(problem: Option<&crate::plugins::FileProblem>) -> (&'static str, serde_json::Value) {
    match problem {
        None => ("ok", serde_json::Value::Null),
        Some(problem) => (
            problem.kind.as_str(),
            serde_json::json!({
                "message": problem.message,
                "file_sha256": problem.sha256,
                "since": rfc3339(problem.since),
            }),
        ),
    }
}

/// A plugin's canary in `GET /admin/plugins`.
fn canary(
    c: &crate::plugins::CanaryEntry,
    config: Option<&crate::plugins::CanaryConfig>,
) -> serde_json::Value {
    let (status, last_error) = file_status(c.problem.as_ref());
    let p = c.plugin.as_ref();
    serde_json::json!({
        "file": c.file.display().to_string(),
        "version": p.map(|p| p.short_version()),
        "sha256": p.map(|p| &p.sha256),
        "percent": config.map(|c| c.percent),
        "clients": config.map(|c| &c.clients),
        "status": status,
        "last_error": last_error,
        "calls": p.map(|p| p.calls().0),
        "failed_calls": p.map(|p| p.calls().1),
        "last_failure": p.map(|p| last_failure(p)),
    })
}

/// The serving version's last failed use on a request, or `null`.
fn last_failure(plugin: &LoadedPlugin) -> serde_json::Value {
    let last = plugin
        .last_failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    last.map_or(serde_json::Value::Null, |f| {
        serde_json::json!({
            "at": rfc3339(f.at),
            "route": &*f.route,
            "phase": f.phase,
            "outcome": f.outcome,
            "message": f.message,
            "request_id": f.request_id,
            "skipped": f.skipped,
        })
    })
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body::full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message}}),
    )
}
