//! The admin listener: health endpoints for orchestrators, apart from the data plane so that
//! probes never compete with (or get routed like) client traffic.
//!
//! - `GET /healthz`: 200 while the process is up (liveness).
//! - `GET /readyz`: 200 once config is loaded and the data plane accepts, 503 before that and
//!   while draining (readiness).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::{self, Body};
use crate::config::{ConfigPath, Problems};
use crate::state::Shared;

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
pub(crate) fn handle(shared: &Arc<Shared>, req: &Request<Incoming>) -> Response<Body> {
    let json = |status: StatusCode, value: serde_json::Value| {
        let mut r = Response::new(body::full(value.to_string()));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": {"code": "method_not_allowed", "message": "admin endpoints accept GET"}}),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "live"})),
        "/readyz" => {
            if shared.ready.load(Ordering::Acquire) {
                json(StatusCode::OK, serde_json::json!({"status": "ready"}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "not_ready"}),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": {"code": "not_found", "message": "unknown admin endpoint"}}),
        ),
    }
}
