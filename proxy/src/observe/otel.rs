//! Span export to an OpenTelemetry collector (`[tracing]`), beside the log phase: one `server`
//! span per request (from accept to the response's last byte), a `client` span per upstream
//! call (route or plugin `send`; its id is the `traceparent` parent the service sees) and an
//! `internal` span per plugin hook call, exported over OTLP/HTTP by the SDK's batch processor
//! on its own thread.
//!
//! ```text
//! client ──traceparent──▶ [server: GET home-web]
//!                            ├─ [internal: plugin aggregate request]
//!                            ├─ [client: GET users]  ──traceparent──▶ users service
//!                            ├─ [client: GET orders] ──traceparent──▶ orders service
//!                            └─ [internal: plugin fields response]
//! ```
//!
//! A plugin's `send`s are children of the request span (attribute `bff.caller = plugin`),
//! overlapping the plugin call that made them.
//!
//! A client's valid `traceparent` makes the request span its child (its sampled flag is
//! followed); otherwise the request starts a trace, sampled at `sample_ratio`. Nothing here
//! runs without `[tracing]`: the request path only checks an `Option`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use serde::Deserialize;

use crate::config::{ConfigPath, Problems};

/// `[tracing]`: export spans to an OpenTelemetry collector over OTLP/HTTP. Bound at startup.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP traces URL (`http://127.0.0.1:4318/v1/traces`, or https).
    pub otlp_endpoint: String,
    /// `http/protobuf` (the OTLP default) or `http/json`.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Share of the traces the proxy starts that are recorded (0 to 1); a client's
    /// `traceparent` decides for the traces it continues.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Headers sent to the collector (an API key of a hosted backend, say).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Time an export to the collector may take.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "bff-proxy".into()
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

/// OTLP/HTTP encodings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum OtlpProtocol {
    /// Protobuf (`application/x-protobuf`).
    #[default]
    #[serde(rename = "http/protobuf")]
    Protobuf,
    /// JSON (`application/json`).
    #[serde(rename = "http/json")]
    Json,
}

impl TracingConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        match self.otlp_endpoint.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() => {}
            _ => problems.push(
                at.key("otlp_endpoint"),
                "must be an http:// or https:// URL (`http://127.0.0.1:4318/v1/traces`)",
            ),
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            problems.push(at.key("sample_ratio"), "must be between 0 and 1");
        }
        if self.service_name.is_empty() {
            problems.push(at.key("service_name"), "must not be empty");
        }
        for name in self.headers.keys() {
            if http::HeaderName::try_from(name.as_str()).is_err() {
                problems.push(at.key("headers").key(name), "is not a valid header name");
            }
        }
        crate::config::check_duration(
            self.export_timeout,
            Duration::from_millis(100)..=Duration::from_secs(120),
            &at.key("export_timeout"),
            problems,
        );
    }
}

/// The process's span pipeline: provider (sampler, batch processor, exporter) and tracer.
#[derive(Debug)]
pub(crate) struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// Starts the export pipeline. Must run inside a Tokio runtime: exports are sent on it.
    pub(crate) fn start(config: &TracingConfig) -> Result<Self, String> {
        let client = Collector::new(config.export_timeout)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(config.otlp_endpoint.clone())
            .with_protocol(match config.protocol {
                OtlpProtocol::Protobuf => opentelemetry_otlp::Protocol::HttpBinary,
                OtlpProtocol::Json => opentelemetry_otlp::Protocol::HttpJson,
            })
            .with_timeout(config.export_timeout)
            .with_headers(config.headers.clone().into_iter().collect())
            .build()
            .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .with_batch_exporter(exporter)
            .build();
        let tracer = provider.tracer("bff-proxy");
        Ok(Self { provider, tracer })
    }

    /// Starts a request's span: the child of the client's span if it sent a valid
    /// `traceparent` (`parent`), else the root of a new trace.
    pub(crate) fn request_span(
        &self,
        method: &http::Method,
        parent: Option<SpanContext>,
    ) -> RequestSpan {
        let parent_cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new(
                "http.request.method",
                method.as_str().to_owned(),
            )])
            .start_with_context(&self.tracer, &parent_cx);
        RequestSpan {
            tracer: self.tracer.clone(),
            cx: parent_cx.with_span(span),
        }
    }

    /// Exports what is buffered and stops (on shutdown, after the drain). The SDK blocks
    /// while its thread exports, and exports run on this runtime: off its workers.
    pub(crate) async fn shutdown(&self) {
        let provider = self.provider.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || provider.shutdown()).await {
            tracing::warn!(error = %e, "span export did not shut down cleanly");
        }
    }
}

/// A request's span and the tracer its children are made by.
#[derive(Debug, Clone)]
pub(crate) struct RequestSpan {
    tracer: SdkTracer,
    cx: Context,
}

impl RequestSpan {
    /// The ids the request's upstream calls carry (when they make no span of their own).
    pub(crate) fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    /// A child span of the request (an upstream call, a plugin call).
    pub(crate) fn child(&self, name: String, kind: SpanKind, attributes: Vec<KeyValue>) -> Child {
        Child(
            self.tracer
                .span_builder(name)
                .with_kind(kind)
                .with_attributes(attributes)
                .start_with_context(&self.tracer, &self.cx),
        )
    }

    /// Names the request span after its route once routed (`GET home-web`).
    pub(crate) fn routed(&self, method: &str, route: &str) {
        self.cx.span().update_name(format!("{method} {route}"));
    }

    /// Ends the request span with what the log phase knows.
    pub(crate) fn finish(
        &self,
        status: u16,
        attributes: Vec<KeyValue>,
        error: Option<&'static str>,
    ) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        for kv in attributes {
            span.set_attribute(kv);
        }
        if let Some(code) = error {
            span.set_attribute(KeyValue::new("error.type", code));
        }
        if status >= 500 {
            span.set_status(Status::error(error.unwrap_or("server error")));
        }
        span.end();
    }
}

/// A span under a request; ended by [`Child::end`] (or when dropped).
#[derive(Debug)]
pub(crate) struct Child(opentelemetry_sdk::trace::Span);

impl Child {
    /// The `traceparent` that makes what this call reaches a child of this span.
    pub(crate) fn traceparent(&self) -> HeaderValue {
        traceparent(self.0.span_context())
    }

    /// Ends it with these attributes; `failed` marks it an error.
    pub(crate) fn end(mut self, attributes: Vec<KeyValue>, failed: Option<&str>) {
        for kv in attributes {
            self.0.set_attribute(kv);
        }
        if let Some(why) = failed {
            self.0
                .set_attribute(KeyValue::new("error.type", why.to_owned()));
            self.0.set_status(Status::error(why.to_owned()));
        }
        self.0.end();
    }
}

/// `00-<trace id>-<span id>-<flags>` for `sc`.
pub(crate) fn traceparent(sc: &SpanContext) -> HeaderValue {
    let value = format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    HeaderValue::try_from(value).expect("hex is a valid header value")
}

/// The span a valid `traceparent` names, as a remote parent.
pub(crate) fn remote_parent(traceparent: &HeaderValue) -> Option<SpanContext> {
    let v = traceparent.to_str().ok()?;
    let trace = TraceId::from_hex(v.get(3..35)?).ok()?;
    let span = SpanId::from_hex(v.get(36..52)?).ok()?;
    let flags = u8::from_str_radix(v.get(53..55)?, 16).ok()?;
    let sc = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// The exporter's HTTP client: hyper-util on the proxy's Tokio runtime. The SDK's batch
/// processor exports from its own thread, which has no runtime: each export is spawned onto
/// the runtime captured at startup and awaited from there.
#[derive(Debug)]
struct Collector {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl Collector {
    fn new(timeout: Duration) -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "span export needs a Tokio runtime".to_owned())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS for the collector: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            runtime,
            timeout,
        })
    }
}

/// The largest collector answer read (they are small status messages).
const MAX_ANSWER: usize = 64 << 10;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Collector {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(Response::from_parts(parts, body))
        };
        match self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, exchange).await })
            .await
        {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("the collector did not answer within {timeout:?}").into()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_invalid_ones_are_refused() {
        let v = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let sc = remote_parent(&v).expect("valid");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(traceparent(&sc), v);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(
                remote_parent(&HeaderValue::from_static(bad)).is_none(),
                "{bad}"
            );
        }
    }
}
