//! Errors of the request path, and the one place they become HTTP responses.
//!
//! Every failure a request can meet is a [`ProxyError`]; [`ProxyError::into_response`] maps it to
//! a status and a stable `code`, with a fixed message that never includes internal addresses or
//! error chains. Server-side faults are logged once by the pipeline with their full cause.

use http::{HeaderValue, Response, StatusCode, header};

use std::borrow::Cow;
use std::sync::Arc;

use crate::body::{self, Body};
use crate::identity::IdentityError;
use crate::plugins::{FailureKind, PluginFailure};
use crate::router::RouteError;
use crate::router::path::PathError;
use crate::upstream::UpstreamError;

/// Status, code and the public description of a plugin failure. The message names the plugin
/// (ops and frontend teams need to know whose code failed) but never its internals.
fn plugin_parts(kind: &FailureKind) -> (StatusCode, &'static str, &'static str) {
    use FailureKind::*;
    match kind {
        Error { .. } => (StatusCode::BAD_GATEWAY, "plugin_error", "returned an error"),
        Panic(_) => (StatusCode::BAD_GATEWAY, "plugin_panic", "panicked"),
        Trap(..) => (StatusCode::BAD_GATEWAY, "plugin_trap", "crashed"),
        CpuBudget(_) => (
            StatusCode::BAD_GATEWAY,
            "plugin_cpu_limit",
            "used up its CPU budget",
        ),
        Memory(_) => (
            StatusCode::BAD_GATEWAY,
            "plugin_memory_limit",
            "went over its memory limit",
        ),
        Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "plugin_timeout",
            "did not finish in time",
        ),
        InvalidOutput(_) => (
            StatusCode::BAD_GATEWAY,
            "plugin_invalid_output",
            "returned an invalid request or response",
        ),
        BodyTooLarge => (
            StatusCode::BAD_GATEWAY,
            "plugin_body_too_large",
            "needs a body larger than its limit",
        ),
        EncodedBody(_) => (
            StatusCode::BAD_GATEWAY,
            "plugin_encoded_body",
            "needs a body the upstream sent in a coding the proxy does not decode",
        ),
        Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "plugin_unavailable",
            "could not be started; retry later",
        ),
    }
}

/// Displays an error with its causes (`a: b: c`): for the one log line a server fault gets,
/// and for startup errors on stderr.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// Whose fault a failed request was: decides the log level and, later, metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The client sent something we refuse (4xx). Not logged as an error.
    Client,
    /// An upstream service failed or was too slow (502/504).
    Upstream,
    /// The proxy is protecting itself (503 when at a limit).
    Overload,
    /// A plugin failed (fail-closed) or the chain could not produce a response.
    Plugin,
}

/// Everything that can end a request early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("client identification failed")]
    Identity(#[from] IdentityError),
    #[error("invalid request path")]
    Path(#[from] PathError),
    #[error("routing failed")]
    Route(#[from] RouteError),
    #[error("upstream request failed")]
    Upstream(#[from] UpstreamError),
    #[error("request headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("request has more than {limit} headers")]
    TooManyHeaders { limit: usize },
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// A plugin reads the request body and the client sent it in a coding the proxy does not
    /// decode.
    #[error("request body is encoded as `{coding}`, which the proxy does not decode")]
    BodyEncoding { coding: String },
    /// The request body broke off, or does not decode as its `content-encoding` says.
    #[error("request body could not be read: {why}")]
    BodyUnreadable { why: String },
    #[error("too many requests in flight")]
    Overloaded,
    #[error("too many open connections")]
    ConnectionLimit,
    /// The client is over its `rate_limit`.
    #[error("the client is over its rate limit")]
    RateLimited { retry_after: std::time::Duration },
    /// Cleartext HTTP on a port that speaks HTTPS.
    #[error("a cleartext request on the HTTPS port")]
    HttpsRequired,
    #[error(transparent)]
    Plugin(#[from] PluginFailure),
    #[error("the plugin chain did not finish in time")]
    ChainTimeout,
    #[error("no plugin of route `{route}`'s chain answered and the route has no service")]
    ChainNoResponse { route: Arc<str> },
}

impl ProxyError {
    /// Status, stable code and a public message safe to show any client.
    fn parts(&self) -> (StatusCode, &'static str, Cow<'static, str>) {
        use ProxyError::*;
        if let Plugin(PluginFailure { plugin, kind }) = self {
            let (status, code, what) = plugin_parts(kind);
            return (status, code, format!("plugin `{plugin}` {what}").into());
        }
        let (status, code, message) = match self {
            Identity(IdentityError::Unidentified) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the request does not identify a known client",
            ),
            Identity(IdentityError::InvalidApiKey) => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is not valid",
            ),
            Identity(IdentityError::InvalidToken) => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the bearer token is not valid (signature, issuer, audience or expiry)",
            ),
            Path(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_path",
                "the request path is malformed or ambiguous",
            ),
            Route(RouteError::NotFound) => (
                StatusCode::NOT_FOUND,
                "route_not_found",
                "no route matches this request for this client",
            ),
            Route(RouteError::MethodNotAllowed { .. }) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the route does not accept this method",
            ),
            Upstream(UpstreamError::Connect { .. }) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the upstream service could not be reached",
            ),
            Upstream(UpstreamError::Timeout { .. }) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream service did not answer in time",
            ),
            Upstream(UpstreamError::Failed { .. }) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the upstream service failed to answer",
            ),
            Upstream(UpstreamError::RequestBodyTooLarge) | BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than allowed",
            ),
            BodyEncoding { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_encoding",
                "the request body's content-encoding is not one the proxy decodes (gzip, deflate, br, zstd)",
            ),
            BodyUnreadable { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "the request body ended early or does not decode as its content-encoding says",
            ),
            HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "the request headers are larger than allowed",
            ),
            TooManyHeaders { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too_many_headers",
                "the request has more headers than allowed",
            ),
            Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the proxy is at its concurrency limit; retry later",
            ),
            ConnectionLimit => (
                StatusCode::SERVICE_UNAVAILABLE,
                "connection_limit",
                "the proxy is at its connection limit; retry later",
            ),
            RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this client is over its rate limit; retry later",
            ),
            HttpsRequired => (
                StatusCode::BAD_REQUEST,
                "https_required",
                "this port speaks HTTPS; the request was sent in cleartext",
            ),
            ChainTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "plugin_chain_timeout",
                "the route's plugins did not finish in time",
            ),
            ChainNoResponse { .. } => (
                StatusCode::BAD_GATEWAY,
                "plugin_no_response",
                "no plugin of the route answered the request",
            ),
            Plugin(_) => unreachable!("handled above"),
        };
        (status, code, Cow::Borrowed(message))
    }

    pub(crate) fn fault(&self) -> Fault {
        match self {
            Self::Plugin(_) | Self::ChainTimeout | Self::ChainNoResponse { .. } => Fault::Plugin,
            Self::Upstream(UpstreamError::RequestBodyTooLarge) => Fault::Client,
            Self::Upstream(_) => Fault::Upstream,
            Self::Overloaded | Self::ConnectionLimit => Fault::Overload,
            _ => Fault::Client,
        }
    }

    /// The stable error code (also used in logs).
    pub(crate) fn code(&self) -> &'static str {
        self.parts().1
    }

    /// The JSON error response: `{"error": {"code", "message", "request_id"}}`.
    pub(crate) fn into_response(self, request_id: &str) -> Response<Body> {
        let (status, code, message) = self.parts();
        let json = serde_json::json!({
            "error": { "code": code, "message": message, "request_id": request_id }
        });
        let mut resp = Response::new(body::full(json.to_string()));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Self::Route(RouteError::MethodNotAllowed { allow }) => {
                if let Ok(v) = HeaderValue::from_str(&allow) {
                    h.insert(header::ALLOW, v);
                }
            }
            Self::Overloaded | Self::ConnectionLimit => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                if matches!(self, Self::ConnectionLimit) {
                    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
            }
            Self::HttpsRequired => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            // Whole seconds (RFC 9110), rounded up so a client that waits is admitted.
            Self::RateLimited { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            // RFC 6750, 3.1.
            Self::Identity(IdentityError::InvalidToken) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::Identity(_) => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("ApiKey"));
            }
            // RFC 9110, 15.5.16: say which codings would have worked.
            Self::BodyEncoding { .. } => {
                h.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static(crate::body::decode::DECODED_CODINGS),
                );
            }
            _ => {}
        }
        resp
    }
}
