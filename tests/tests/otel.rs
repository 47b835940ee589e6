//! Span export (`[tracing]`) end to end: an in-process OTLP/HTTP collector receives the spans of
//! requests through the proxy, and the trace they describe is the one the upstream saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bff_proxy_tests::plugins::test_plugins;
use bff_proxy_tests::{TestProxy, Upstream, get};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

/// A collector: every OTLP/HTTP JSON export it receives, answered 200.
struct Collector {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().expect("address");
        let exports = Arc::new(Mutex::new(Vec::new()));
        let kept = exports.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let kept = kept.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                                    kept.lock().expect("lock").push(v);
                                }
                                Ok::<_, Infallible>(http::Response::new(Full::new(
                                    Bytes::from_static(b"{}"),
                                )))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            exports,
            task,
        }
    }

    /// Every span received, flattened.
    fn spans(&self) -> Vec<Value> {
        self.exports
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|e| e["resourceSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn service_names(&self) -> Vec<Value> {
        self.exports
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|e| e["resourceSpans"].as_array().cloned().unwrap_or_default())
            .filter_map(|r| attribute(&r["resource"], "service.name"))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of attribute `key` of a span or resource (string or integer).
fn attribute(span: &Value, key: &str) -> Option<Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| {
            let v = &a["value"];
            v.get("stringValue")
                .cloned()
                .or_else(|| v.get("intValue").cloned())
                .unwrap_or(Value::Null)
        })
}

fn span_named<'a>(spans: &'a [Value], name: &str, trace: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["name"] == name && s["traceId"] == trace)
        .unwrap_or_else(|| panic!("no span `{name}` in trace {trace}: {spans:#?}"))
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_requests_plugins_and_upstream_calls_reach_the_collector() {
    let collector = Collector::start().await;
    let up = Upstream::echo("main").await;
    let config = format!(
        r#"
[identity]
default_client = "web"

[services.main]
urls = ["{up}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[plugins]
dir = {dir:?}

[[routes]]
id = "plugged"
path = "/plugged"
service = "main"
chain = [{{ plugin = "probe", config = {{ name = "p" }} }}]

[[routes]]
id = "all"
path = "/{{*rest}}"
service = "main"

[tracing]
otlp_endpoint = "http://{collector}/v1/traces"
protocol = "http/json"
service_name = "bff-test"
"#,
        up = up.url(),
        dir = test_plugins().display().to_string(),
        collector = collector.addr,
    );
    let proxy = TestProxy::start(&config).await;

    // A client in a trace: the proxy's span is its child, the upstream's parent.
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let resp = get(proxy.addr(), "/continued", &[("traceparent", &traceparent)]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen_continued = resp
        .echo()
        .header("traceparent")
        .expect("traceparent")
        .to_owned();
    // A request starting a trace, through a plugin.
    let resp = get(proxy.addr(), "/plugged", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen_new = resp
        .echo()
        .header("traceparent")
        .expect("traceparent")
        .to_owned();
    // Shutting down exports what is buffered.
    proxy.shutdown().await;

    let spans = collector.spans();
    assert!(
        collector.service_names().iter().all(|n| n == "bff-test"),
        "{:?}",
        collector.service_names()
    );
    let server = span_named(&spans, "GET all", CLIENT_TRACE);
    assert_eq!(server["parentSpanId"], CLIENT_SPAN, "{server:#}");
    assert_eq!(server["kind"], 2, "a server span: {server:#}");
    // OTLP's JSON writes 64-bit integers as strings.
    assert_eq!(
        attribute(server, "http.response.status_code"),
        Some("200".into())
    );
    assert_eq!(attribute(server, "bff.client"), Some("web".into()));
    assert_eq!(attribute(server, "bff.route"), Some("all".into()));
    assert_eq!(attribute(server, "url.path"), Some("/continued".into()));
    let call = span_named(&spans, "GET main", CLIENT_TRACE);
    assert_eq!(call["parentSpanId"], server["spanId"], "{call:#}");
    assert_eq!(call["kind"], 3, "a client span: {call:#}");
    assert_eq!(attribute(call, "bff.caller"), Some("route".into()));
    assert_eq!(
        seen_continued,
        format!(
            "00-{CLIENT_TRACE}-{}-01",
            call["spanId"].as_str().expect("span id")
        ),
        "the upstream's parent is the proxy's call span"
    );

    // The new trace: rooted at the proxy, the plugin's calls inside it.
    let trace = &seen_new[3..35];
    let root = span_named(&spans, "GET plugged", trace);
    assert!(
        root["parentSpanId"].as_str().is_none_or(str::is_empty),
        "{root:#}"
    );
    for phase in ["request", "response"] {
        let plugin = span_named(&spans, &format!("plugin probe {phase}"), trace);
        assert_eq!(plugin["parentSpanId"], root["spanId"]);
        assert_eq!(attribute(plugin, "bff.plugin.outcome"), Some("ok".into()));
        assert!(attribute(plugin, "bff.plugin.version").is_some());
    }
    let call = span_named(&spans, "GET main", trace);
    assert_eq!(&seen_new[36..52], call["spanId"].as_str().expect("span id"));
}

#[test]
fn tracing_settings_are_checked() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let problems = bff_proxy_tests::config_file_problems(
        &dir.path().join("bff.toml"),
        &format!(
            "{}\n[tracing]\notlp_endpoint = \"collector:4318\"\nsample_ratio = 1.5\nservice_name = \"\"\nheaders = {{ \"bad header\" = \"x\" }}\n",
            bff_proxy_tests::catch_all_config("", "http://127.0.0.1:1")
        ),
    );
    bff_proxy_tests::assert_mentions(
        &problems,
        &[
            "tracing.otlp_endpoint: must be an http:// or https:// URL",
            "tracing.sample_ratio: must be between 0 and 1",
            "tracing.service_name: must not be empty",
            "tracing.headers.\"bad header\": is not a valid header name",
        ],
    );
}

/// A collector that is down costs the requests nothing: they are served, and shutdown still
/// completes (the export fails on the exporter's thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_affect_requests() {
    let up = Upstream::echo("main").await;
    let config = format!(
        "{}\n[tracing]\notlp_endpoint = \"{}/v1/traces\"\n",
        bff_proxy_tests::catch_all_config("", &up.url()),
        bff_proxy_tests::closed_port_url()
    );
    let proxy = TestProxy::start(&config).await;
    for _ in 0..20 {
        let resp = get(proxy.addr(), "/x", &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let seen = resp
            .echo()
            .header("traceparent")
            .expect("traceparent")
            .to_owned();
        assert!(seen.ends_with("-01"), "sampled by default: {seen}");
    }
    proxy.shutdown().await;
}
