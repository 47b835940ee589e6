//! Observability end to end: metrics after scripted traffic, a series count that random paths
//! and identity headers cannot grow, the access log line, trace context propagation, `/readyz`
//! before the first load, and the admin token. Real proxy, real loopback sockets.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bff_proxy_tests::plugins::test_plugins;
use bff_proxy_tests::{Reply, TestProxy, Upstream, body, get, read_log_lines, request, sha256_hex};

const PARTNER_KEY: &str = "partner-key-9f2c";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Two named clients (`web` by header, `partner` by API key), no default client, a plain
/// route, a route whose plugin answers from two upstream calls, a trapping plugin route and a
/// fail-open one. `extra` is appended at the top level (before the routes).
fn config(up: &str, small: &str, extra: &str) -> String {
    format!(
        r#"
{extra}

[services.up]
urls = ["{up}"]

[services.small]
urls = ["{small}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[clients]]
name = "partner"
identify = [{{ api_key_header = "x-api-key", sha256 = ["{key}"] }}]

[plugins]
dir = {dir:?}

[[routes]]
id = "plain"
path = "/plain/{{*rest}}"
service = "up"

[[routes]]
id = "fan"
clients = ["web"]
path = "/fan"
egress = ["small"]
chain = [{{ plugin = "probe", config = {{ mode = "fanout", calls = [{{ service = "small", path = "/a" }}, {{ service = "small", path = "/b" }}] }} }}]

[[routes]]
id = "trap"
path = "/trap"
service = "up"
chain = [{{ plugin = "probe", config = {{ mode = "trap" }} }}]

[[routes]]
id = "open"
path = "/open"
service = "up"
chain = [{{ plugin = "probe", on_error = "fail-open", config = {{ mode = "error" }} }}]
"#,
        key = sha256_hex(PARTNER_KEY),
        dir = test_plugins().display().to_string()
    )
}

/// A 1000-byte JSON document the `small` service answers every path with.
fn big_document() -> String {
    let filler = "x".repeat(1000 - r#"{"pad":""}"#.len());
    format!(r#"{{"pad":"{filler}"}}"#)
}

async fn small_service() -> Upstream {
    Upstream::builder("small")
        .route("/", Reply::fixed(200, &big_document()))
        .start()
        .await
}

/// Every sample line of a metrics text: `name{labels}` → value.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(text: &str, series: &str) -> f64 {
    samples(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map_or(0.0, |(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_scripted_traffic() {
    let up = Upstream::echo("up").await;
    let small = small_service().await;
    let proxy = TestProxy::start(&config(&up.url(), &small.url(), "")).await;
    let addr = proxy.addr();

    // 3 × web plain, 2 × partner plain (one with a 100-byte body), 2 × web fan (plugin
    // answers from two 1000-byte upstream calls), 1 × trap, 1 × fail-open, 1 × 404 for web,
    // 1 × unidentified (401), 1 × wrong API key (401).
    let mut plain_out = 0;
    for _ in 0..3 {
        let r = get(addr, "/plain/x", &[("x-client", "web")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        plain_out += r.body.len();
    }
    let mut partner_out = 0;
    let r = get(addr, "/plain/y", &[("x-api-key", PARTNER_KEY)]).await;
    assert_eq!(r.status, 200);
    partner_out += r.body.len();
    let r = request(
        addr,
        "POST",
        "/plain/y",
        &[("x-api-key", PARTNER_KEY)],
        body(vec![b'a'; 100]),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().body_len, 100);
    partner_out += r.body.len();
    let mut fan_out = 0;
    for _ in 0..2 {
        let r = get(addr, "/fan", &[("x-client", "web")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        fan_out += r.body.len();
    }
    assert_eq!(get(addr, "/trap", &[("x-client", "web")]).await.status, 502);
    assert_eq!(get(addr, "/open", &[("x-client", "web")]).await.status, 200);
    get(addr, "/nope", &[("x-client", "web")])
        .await
        .assert_error(404, "route_not_found");
    get(addr, "/plain/x", &[])
        .await
        .assert_error(401, "unauthenticated");
    get(addr, "/plain/x", &[("x-api-key", "wrong")])
        .await
        .assert_error(401, "invalid_api_key");

    // The log phase runs when a body ends: give the last one a moment to be recorded.
    wait_for(&proxy, "bff_requests_in_flight 0").await;
    // ... and the server to see the last connection closed.
    let text = wait_for(&proxy, "bff_connections_open 0").await;
    let m = |s: &str| value(&text, s);

    // Requests by client, route and status class; `other` for what matched nothing.
    assert_eq!(
        m(r#"bff_requests_total{client="web",route="plain",status_class="2xx"}"#),
        3.0
    );
    assert_eq!(
        m(r#"bff_requests_total{client="partner",route="plain",status_class="2xx"}"#),
        2.0
    );
    assert_eq!(
        m(r#"bff_requests_total{client="web",route="fan",status_class="2xx"}"#),
        2.0
    );
    assert_eq!(
        m(r#"bff_requests_total{client="web",route="trap",status_class="5xx"}"#),
        1.0
    );
    assert_eq!(
        m(r#"bff_requests_total{client="web",route="open",status_class="2xx"}"#),
        1.0
    );
    assert_eq!(
        m(r#"bff_requests_total{client="web",route="other",status_class="4xx"}"#),
        1.0
    );
    assert_eq!(
        m(r#"bff_requests_total{client="other",route="other",status_class="4xx"}"#),
        2.0
    );
    // The fan route lists only web: no partner series exists for it.
    assert!(!text.contains(r#"client="partner",route="fan""#), "{text}");
    assert_eq!(
        m(r#"bff_request_duration_seconds_count{client="web",route="plain"}"#),
        3.0
    );
    assert!(m(r#"bff_request_duration_seconds_sum{client="web",route="plain"}"#) > 0.0);
    assert_eq!(m(r#"bff_proxy_errors_total{code="route_not_found"}"#), 1.0);
    assert_eq!(m(r#"bff_proxy_errors_total{code="unauthenticated"}"#), 1.0);
    assert_eq!(m(r#"bff_proxy_errors_total{code="invalid_api_key"}"#), 1.0);
    assert_eq!(m(r#"bff_proxy_errors_total{code="plugin_trap"}"#), 1.0);

    // Payload: bytes sent are exactly what the client read; a streamed route passes the
    // upstream's bytes through, the plugin route answers from 2 × 1000 upstream bytes.
    assert_eq!(
        m(r#"bff_response_body_bytes_total{client="web",route="plain"}"#),
        plain_out as f64
    );
    assert_eq!(
        m(r#"bff_upstream_response_body_bytes_total{client="web",route="plain"}"#),
        plain_out as f64
    );
    assert_eq!(
        m(r#"bff_response_body_bytes_total{client="partner",route="plain"}"#),
        partner_out as f64
    );
    assert_eq!(
        m(r#"bff_request_body_bytes_total{client="partner",route="plain"}"#),
        100.0
    );
    assert_eq!(
        m(r#"bff_upstream_response_body_bytes_total{client="web",route="fan"}"#),
        4000.0
    );
    assert_eq!(
        m(r#"bff_response_body_bytes_total{client="web",route="fan"}"#),
        fan_out as f64
    );

    // Upstream calls by service, caller and outcome.
    assert_eq!(
        m(r#"bff_upstream_requests_total{caller="route",outcome="2xx",service="up"}"#),
        6.0
    );
    assert_eq!(
        m(r#"bff_upstream_requests_total{caller="plugin",outcome="2xx",service="small"}"#),
        4.0
    );
    assert_eq!(
        m(r#"bff_upstream_request_duration_seconds_count{caller="plugin",service="small"}"#),
        4.0
    );

    // Plugin calls by plugin, version, phase and outcome.
    let version = &bff_proxy_tests::sha256_hex_bytes(
        &std::fs::read(test_plugins().join("probe.wasm")).expect("read probe.wasm"),
    )[..12];
    let inv = |phase: &str, outcome: &str| {
        m(&format!(
            r#"bff_plugin_invocations_total{{outcome="{outcome}",phase="{phase}",plugin="probe",version="{version}"}}"#
        ))
    };
    // fan ×2 answered in the request phase; open failed (skipped) → no response phase for it.
    assert_eq!(inv("request", "ok"), 2.0);
    assert_eq!(inv("request", "trap"), 1.0);
    assert_eq!(inv("request", "error"), 1.0);
    assert_eq!(
        m(&format!(
            r#"bff_plugin_duration_seconds_count{{phase="request",plugin="probe",version="{version}"}}"#
        )),
        4.0
    );
    assert_eq!(
        m(r#"bff_plugin_cpu_budget_used_ratio_count{phase="request",plugin="probe"}"#),
        4.0
    );
    assert_eq!(
        m(r#"bff_plugin_fail_open_skips_total{plugin="probe"}"#),
        1.0
    );
    assert_eq!(m("bff_plugin_instances_active"), 0.0);
    assert_eq!(m("bff_plugin_instances_max"), 1000.0);

    // Connections and reloads.
    assert_eq!(
        m("bff_connections_accepted_total"),
        12.0,
        "one connection per request"
    );
    assert_eq!(m("bff_connections_open"), 0.0);
    assert_eq!(m(r#"bff_reloads_total{outcome="applied"}"#), 1.0);
    assert!(m("bff_last_reload_success_timestamp_seconds") > 1.7e9);
    assert_eq!(m(r#"bff_build_info{version="0.1.0"}"#), 1.0);
}

/// Polls `/metrics` until it contains `needle` (bounded); the text.
async fn wait_for(proxy: &TestProxy, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = proxy.metrics().await;
        if text.lines().any(|l| l == needle) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small xorshift generator: reproducible random paths and headers without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn string(&mut self, alphabet: &[u8], max: usize) -> String {
        let len = 1 + (self.next() as usize) % max;
        (0..len)
            .map(|_| alphabet[(self.next() as usize) % alphabet.len()] as char)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_count_is_constant_under_random_paths_and_identities() {
    let up = Upstream::echo("up").await;
    let small = small_service().await;
    let proxy = TestProxy::start(&config(&up.url(), &small.url(), "")).await;
    let addr = proxy.addr();
    let series =
        |text: &str| -> BTreeSet<String> { samples(text).into_iter().map(|(s, _)| s).collect() };

    // Each request: a random path (some under /plain, with dots, escapes and doubled
    // slashes), a random method, and a random x-client value or API key.
    let run = |seed: u64, n: usize| async move {
        let mut rng = Rng(seed);
        let mut statuses = BTreeSet::new();
        let mut conn = bff_proxy_tests::H1Conn::connect(addr).await;
        for i in 0..n {
            let mut path = if rng.next().is_multiple_of(3) {
                "/plain/".to_owned()
            } else {
                "/".to_owned()
            };
            path.push_str(&rng.string(b"abcxyz019-._~%2F/", 40));
            if path.contains("%") {
                path = path.replace('%', "%2e");
            }
            let method = ["GET", "POST", "DELETE", "PATCH", "BREW"][(rng.next() % 5) as usize];
            // A third are identified (so random paths reach the router), the rest carry a
            // random identity.
            let ident = match rng.next() % 3 {
                0 => "web".to_owned(),
                _ => rng.string(b"abcdefghijklmnopqrstuvwxyz0123456789-", 24),
            };
            let header = if ident == "web" || rng.next().is_multiple_of(2) {
                "x-client"
            } else {
                "x-api-key"
            };
            let headers = [(header, ident.as_str()), ("x-request-id", "r")];
            let resp = conn
                .request(method, &path, &headers, bff_proxy_tests::empty())
                .await;
            statuses.insert(resp.status.as_u16());
            // A fresh connection now and then (a refused request may close it).
            if i % 500 == 499 || resp.headers.get("connection").is_some_and(|v| v == "close") {
                conn = bff_proxy_tests::H1Conn::connect(addr).await;
            }
        }
        statuses
    };

    // Warm up with the same kind of traffic, so every bounded label value has appeared.
    let warm = run(7, 300).await;
    let before = series(&wait_for(&proxy, "bff_requests_in_flight 0").await);
    let started = Instant::now();
    let (a, b) = tokio::join!(run(11, 5_000), run(13, 5_000));
    let after = series(&wait_for(&proxy, "bff_requests_in_flight 0").await);
    let text = proxy.metrics().await;
    let total: f64 = samples(&text)
        .iter()
        .filter(|(s, _)| s.starts_with("bff_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 10_300.0, "every request is counted");
    // Identified requests with random paths were routed (or not) as `web`.
    assert!(
        value(
            &text,
            r#"bff_requests_total{client="web",route="other",status_class="4xx"}"#
        ) > 0.0
    );
    assert!(
        value(
            &text,
            r#"bff_requests_total{client="web",route="plain",status_class="2xx"}"#
        ) > 0.0
    );
    let new: Vec<&String> = after.difference(&before).collect();
    assert!(
        new.is_empty(),
        "10,000 random requests (statuses {warm:?} {a:?} {b:?}, {:?}) added series: {new:#?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_have_every_field_and_no_secrets() {
    let up = Upstream::echo("up").await;
    let small = small_service().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("access.log");
    let extra = format!(
        "[access_log]\nformat = \"json\"\noutput = {:?}\n",
        log.display().to_string()
    );
    let proxy = TestProxy::start(&config(&up.url(), &small.url(), &extra)).await;
    let addr = proxy.addr();

    let resp = request(
        addr,
        "POST",
        "/plain/a//b/./c?q=1",
        &[
            ("x-api-key", PARTNER_KEY),
            ("authorization", "Bearer secret-bearer-123"),
            ("cookie", "session=secret-cookie-456"),
            ("user-agent", "ShopApp/1 \"quoted\""),
            ("traceparent", TRACEPARENT),
            ("tracestate", "vendor=1"),
        ],
        body(vec![b'z'; 321]),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let request_id = resp
        .header("x-request-id")
        .expect("a request id")
        .to_owned();
    // The client's trace context reaches the upstream unchanged.
    let echo = resp.echo();
    assert_eq!(echo.header("traceparent"), Some(TRACEPARENT));
    assert_eq!(echo.header("tracestate"), Some("vendor=1"));

    // A request without trace context starts a trace: its plugin's upstream calls share it.
    let fan = get(
        addr,
        "/fan",
        &[("x-client", "web"), ("tracestate", "orphan=1")],
    )
    .await;
    assert_eq!(fan.status, 200, "{}", fan.text());
    let small_seen: Vec<_> = small.received();
    let tp: BTreeSet<String> = small_seen
        .iter()
        .map(|r| {
            r.headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        tp.len(),
        1,
        "both calls of one request carry one traceparent: {tp:?}"
    );
    let fan_trace = tp.into_iter().next().expect("one traceparent");
    assert!(
        fan_trace.starts_with("00-") && fan_trace.len() == 55,
        "{fan_trace}"
    );
    // The proxy generated the request id, and the new trace id is that same value.
    assert_eq!(fan.header("x-request-id"), Some(&fan_trace[3..35]));
    assert!(
        small_seen
            .iter()
            .all(|r| r.headers.get("tracestate").is_none())
    );
    get(addr, "/nope", &[("x-client", "web")])
        .await
        .assert_error(404, "route_not_found");

    let lines = read_log_lines(&log, 3).await;
    let text = std::fs::read_to_string(&log).expect("read the log");
    for secret in ["secret-bearer-123", "secret-cookie-456", PARTNER_KEY] {
        assert!(
            !text.contains(secret),
            "the access log leaks `{secret}`:\n{text}"
        );
    }
    let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("a JSON line");
    let keys: BTreeSet<&str> = first
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    for k in [
        "ts",
        "request_id",
        "trace_id",
        "client",
        "route",
        "method",
        "path",
        "protocol",
        "tls",
        "peer",
        "user_agent",
        "status",
        "error",
        "duration_ms",
        "upstream_ms",
        "upstream_calls",
        "plugin_ms",
        "bytes_in",
        "bytes_out",
        "upstream_bytes",
    ] {
        assert!(keys.contains(k), "missing `{k}` in {first}");
    }
    assert_eq!(first["request_id"], request_id.as_str());
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["client"], "partner");
    assert_eq!(first["route"], "plain");
    assert_eq!(first["method"], "POST");
    assert_eq!(
        first["path"], "/plain/a/b/c",
        "the normalized path, no query"
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["error"], serde_json::Value::Null);
    assert_eq!(first["bytes_in"], 321);
    assert_eq!(first["bytes_out"], resp.body.len());
    assert_eq!(first["upstream_bytes"], resp.body.len());
    assert_eq!(first["upstream_calls"], 1);
    assert_eq!(first["user_agent"], "ShopApp/1 \"quoted\"");
    assert_eq!(first["peer"], "127.0.0.1");
    let duration = first["duration_ms"].as_f64().expect("a number");
    let upstream = first["upstream_ms"].as_f64().expect("a number");
    assert!(
        duration > 0.0 && upstream > 0.0 && upstream <= duration,
        "{first}"
    );

    let second: serde_json::Value = serde_json::from_str(&lines[1]).expect("a JSON line");
    assert_eq!(second["route"], "fan");
    assert_eq!(second["trace_id"], &fan_trace[3..35]);
    assert_eq!(second["upstream_calls"], 2);
    assert_eq!(second["upstream_bytes"], 2000);
    assert!(
        second["plugin_ms"].as_f64().expect("a number") > 0.0,
        "{second}"
    );

    let third: serde_json::Value = serde_json::from_str(&lines[2]).expect("a JSON line");
    assert_eq!(third["status"], 404);
    assert_eq!(third["error"], "route_not_found");
    assert_eq!(third["route"], serde_json::Value::Null);
    assert_eq!(third["path"], "/nope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_access_log_escapes_what_the_client_sent() {
    let up = Upstream::echo("up").await;
    let small = small_service().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("access.log");
    let extra = format!("[access_log]\noutput = {:?}\n", log.display().to_string());
    let proxy = TestProxy::start(&config(&up.url(), &small.url(), &extra)).await;
    // A request id with a quote and a user agent with a tab: both quoted and escaped.
    let resp = get(
        proxy.addr(),
        "/plain/x",
        &[
            ("x-client", "web"),
            ("x-request-id", "id\"1"),
            ("user-agent", "a\tb \"c\""),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    let lines = read_log_lines(&log, 1).await;
    let line = &lines[0];
    assert!(line.contains(r#" request_id="id\"1" "#), "{line}");
    assert!(line.contains(r#" user_agent="a\x09b \"c\"""#), "{line}");
    assert!(
        line.contains(" client=web route=plain method=GET path=\"/plain/x\" status=200 error=- "),
        "{line}"
    );
    assert!(line.contains(" protocol=HTTP/1.1 tls=- "), "{line}");
    assert!(!line.contains('\t'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_loaded_and_serving() {
    let up = Upstream::echo("up").await;
    let small = small_service().await;
    let mut config = bff_proxy::Config::from_toml(&config(&up.url(), &small.url(), ""), "test")
        .expect("valid config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin.listen = "127.0.0.1:0".parse().expect("addr");
    config.access_log.enabled = false;
    let starting =
        bff_proxy::Proxy::listen(&config, std::sync::Arc::new(bff_proxy::Metrics::new()))
            .await
            .expect("listeners bind");
    let admin = starting.admin_addr();

    // Bound, plugins not loaded: live, not ready, metrics served, state not yet.
    assert_eq!(get(admin, "/healthz", &[]).await.status, 200);
    let ready = get(admin, "/readyz", &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "loading");
    assert_eq!(get(admin, "/metrics", &[]).await.status, 200);
    assert_admin_error(&get(admin, "/admin/plugins", &[]).await, 503, "loading");

    // Loaded, not serving yet: still not ready.
    let proxy = starting.load().await.expect("plugins load");
    let ready = get(admin, "/readyz", &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "not_ready");
    assert_eq!(get(admin, "/admin/plugins", &[]).await.status, 200);

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(admin, "/readyz", &[]).await.status != 200 {
        assert!(Instant::now() < deadline, "/readyz never became 200");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("stops")
        .expect("runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_releases_the_admin_listener() {
    let mut config = bff_proxy::Config::from_toml(
        &format!(
            r#"
[services.up]
urls = ["http://127.0.0.1:9"]
[[clients]]
name = "web"
[identity]
default_client = "web"
[plugins]
dir = {dir:?}
[[routes]]
id = "r"
path = "/"
service = "up"
chain = [{{ plugin = "probe", config = {{ mode = "reject-config" }} }}]
"#,
            dir = test_plugins().display().to_string()
        ),
        "test",
    )
    .expect("valid config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.admin.listen = "127.0.0.1:0".parse().expect("addr");
    let starting =
        bff_proxy::Proxy::listen(&config, std::sync::Arc::new(bff_proxy::Metrics::new()))
            .await
            .expect("listeners bind");
    let admin = starting.admin_addr();
    assert!(
        starting.load().await.is_err(),
        "a plugin that rejects its config fails startup"
    );
    // The admin listener stops with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(admin).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the admin listener is still accepting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_everything_but_the_probes() {
    let up = Upstream::echo("up").await;
    let small = small_service().await;
    let token = "adm1n-t0ken";
    let extra = format!("[admin]\ntoken_sha256 = \"{}\"\n", sha256_hex(token));
    let proxy = TestProxy::start(&config(&up.url(), &small.url(), &extra)).await;
    let admin = proxy.admin_addr();
    let bearer = format!("Bearer {token}");
    let good = [("authorization", bearer.as_str())];

    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(admin, path, &[]).await.status,
            200,
            "{path} needs no token"
        );
    }
    for path in [
        "/metrics",
        "/admin/config",
        "/admin/plugins",
        "/admin/reloads",
    ] {
        let r = get(admin, path, &[]).await;
        assert_admin_error(&r, 401, "unauthorized");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"bff-proxy admin\"")
        );
        for wrong in ["Bearer wrong", token, "Basic YWRtaW46YWRtaW4="] {
            let r = get(admin, path, &[("authorization", wrong)]).await;
            assert_admin_error(&r, 401, "unauthorized");
        }
        assert_eq!(
            get(admin, path, &good).await.status,
            200,
            "{path} with the token"
        );
    }
    let r = request(
        admin,
        "POST",
        "/admin/reload",
        &[],
        bff_proxy_tests::empty(),
    )
    .await;
    assert_admin_error(&r, 401, "unauthorized");
    let r = request(
        admin,
        "POST",
        "/admin/reload",
        &good,
        bff_proxy_tests::empty(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The effective config: defaults filled in, secrets redacted.
    let config = get(admin, "/admin/config", &good).await;
    assert_eq!(config.status, 200);
    let text = config.text();
    assert!(!text.contains(&sha256_hex(token)), "{text}");
    assert!(!text.contains(&sha256_hex(PARTNER_KEY)), "{text}");
    let v = config.json();
    assert_eq!(v["admin"]["token_sha256"], "[redacted]");
    assert_eq!(v["clients"][1]["identify"][0]["sha256"][0], "[redacted]");
    assert_eq!(v["routes"][1]["id"], "fan");
    assert_eq!(v["server"]["max_connections"], 10000);
    // Reading the config is not a mutation: POST is refused.
    let r = request(
        admin,
        "POST",
        "/admin/config",
        &good,
        bff_proxy_tests::empty(),
    )
    .await;
    assert_admin_error(&r, 405, "method_not_allowed");
}

/// An admin error: `status` with `{"error": {"code", "message"}}`.
fn assert_admin_error(r: &bff_proxy_tests::TestResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_early_is_logged_as_499() {
    use tokio::io::AsyncWriteExt;

    let up = Upstream::builder("up")
        .route("/plain/slow", Reply::Echo.after(Duration::from_secs(3)))
        .start()
        .await;
    let small = small_service().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("access.log");
    let extra = format!(
        "[access_log]\nformat = \"json\"\noutput = {:?}\n",
        log.display().to_string()
    );
    let proxy = TestProxy::start(&config(&up.url(), &small.url(), &extra)).await;

    let mut conn = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect("connect");
    conn.write_all(b"GET /plain/slow HTTP/1.1\r\nhost: t\r\nx-client: web\r\n\r\n")
        .await
        .expect("write the request");
    up.wait_for_requests(1).await;
    drop(conn);

    let lines = read_log_lines(&log, 1).await;
    let line: serde_json::Value = serde_json::from_str(&lines[0]).expect("a JSON line");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["error"], "client_closed");
    assert_eq!(line["route"], "plain");
    let text = wait_for(&proxy, "bff_requests_in_flight 0").await;
    assert_eq!(
        value(
            &text,
            r#"bff_requests_total{client="web",route="plain",status_class="4xx"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&text, r#"bff_proxy_errors_total{code="client_closed"}"#),
        1.0
    );
}
