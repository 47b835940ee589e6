//! The admin listener: health endpoints for orchestrators, apart from the data plane so that
//! probes never compete with (or get routed like) client traffic.
//!
//! - `GET /healthz`: 200 while the process is up (liveness).
//! - `GET /readyz`: 200 once config is loaded and the data plane accepts, 503 before that and
//!   while draining (readiness).
//! - `GET /metrics`: Prometheus text format.
//! - `GET /admin/plugins`: loaded plugins: version (SHA-256), size, loaded-at, the routes and
//!   clients using each, status and the last problem with its file.
//! - `GET /admin/reloads`: recent reloads with trigger, outcome, duration, errors, warnings.
//! - `POST /admin/reload`: reload now; 200 with the record, 422 if it was rejected.
//!
//! Mutations only by `POST`; every other method gets 405 with `Allow`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::{self, Body};
use crate::config::{ConfigPath, Problems};
use crate::reload::{Outcome, Reloader, Trigger, rfc3339};
use crate::state::Snapshot;

/// Default admin listen address: loopback, since the admin API has no auth yet.
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";

/// `[admin]`: the admin listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("DEFAULT_ADMIN_LISTEN is a valid socket address"),
        }
    }
}

impl AdminConfig {
    pub(crate) fn validate(&self, _at: &ConfigPath, _problems: &mut Problems) {
        if !self.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %self.listen,
                "the admin listener is bound beyond loopback and has no authentication"
            );
        }
    }
}

/// Answers one admin request.
pub(crate) async fn handle(reloader: &Arc<Reloader>, req: Request<Incoming>) -> Response<Body> {
    let shared = reloader.shared();
    let path = req.uri().path();
    let allowed: &'static str = match path {
        "/admin/reload" => "POST",
        "/healthz" | "/readyz" | "/metrics" | "/admin/plugins" | "/admin/reloads" => "GET, HEAD",
        _ => {
            return error(StatusCode::NOT_FOUND, "not_found", "unknown admin endpoint");
        }
    };
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
    match path {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "live"})),
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
        "/metrics" => {
            let mut r = Response::new(body::full(reloader.metrics().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/admin/plugins" => json(StatusCode::OK, &plugins(&shared.live.load())),
        "/admin/reloads" => json(
            StatusCode::OK,
            &serde_json::json!({ "reloads": reloader.history() }),
        ),
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

/// `GET /admin/plugins`: every loaded plugin, its serving version and any problem with its file.
fn plugins(snapshot: &Snapshot) -> serde_json::Value {
    let list: Vec<serde_json::Value> = snapshot
        .catalog
        .entries
        .iter()
        .map(|(name, e)| {
            let p = &e.serving;
            let (status, last_error) = match &e.problem {
                None => ("ok", serde_json::Value::Null),
                Some(problem) => (
                    problem.kind.as_str(),
                    serde_json::json!({
                        "message": problem.message,
                        "file_sha256": problem.sha256,
                        "since": rfc3339(problem.since),
                    }),
                ),
            };
            serde_json::json!({
                "name": &**name,
                "version": p.short_version(),
                "sha256": p.sha256,
                "size": p.size,
                "file": e.file.display().to_string(),
                "loaded_at": rfc3339(p.loaded_at),
                "routes": e.routes,
                "clients": e.clients,
                "status": status,
                "last_error": last_error,
            })
        })
        .collect();
    serde_json::json!({ "plugins": list })
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
