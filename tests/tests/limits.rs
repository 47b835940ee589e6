//! Limits end to end: 413 body_too_large (declared and streamed), 431 headers_too_large and
//! too_many_headers, 503 overloaded and connection_limit, 429 rate_limited per client, each
//! with its stable JSON error.

use std::time::{Duration, Instant};

use bff_proxy_tests::{
    Gate, H1Conn, RawConn, Reply, TestProxy, Upstream, assert_mentions, body, catch_all_config,
    get, raw, request,
};

const LIMITS: &str = "max_request_body_bytes = 1024
max_headers = 20
max_header_bytes = 1024";

async fn start(up: &Upstream, extra: &str) -> TestProxy {
    TestProxy::start(&catch_all_config(&format!("{LIMITS}\n{extra}"), &up.url())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_body_over_the_limit_is_413() {
    let up = Upstream::builder("main")
        .route("/", Reply::Sink)
        .start()
        .await;
    let proxy = start(&up, "").await;

    // At the limit: fine.
    let resp = request(proxy.addr(), "POST", "/b", &[], body(vec![0u8; 1024])).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["bytes"], 1024);

    // One byte over, declared in content-length: refused before anything goes upstream.
    let resp = request(proxy.addr(), "POST", "/b", &[], body(vec![0u8; 1025])).await;
    resp.assert_error(413, "body_too_large");
    // Declared but not even sent: the proxy does not wait for it.
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.write(b"POST /b HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000000\r\n\r\n")
        .await;
    conn.read_response(false)
        .await
        .expect("a response")
        .assert_error(413, "body_too_large");
    assert_eq!(
        up.received().len(),
        1,
        "only the in-limit request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413_while_streaming() {
    let up = Upstream::builder("main")
        .route("/", Reply::Sink)
        .start()
        .await;
    let proxy = start(&up, "").await;

    let chunk = "x".repeat(600);
    let chunked = |chunks: usize| {
        let mut req = String::from(
            "POST /b HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        );
        for _ in 0..chunks {
            req.push_str(&format!("258\r\n{chunk}\r\n"));
        }
        req.push_str("0\r\n\r\n");
        req
    };
    // 600 bytes: under the limit.
    let resp = raw(proxy.addr(), &chunked(1)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["bytes"], 600);
    // 1800 bytes, no length declared: found out while streaming.
    raw(proxy.addr(), &chunked(3))
        .await
        .assert_error(413, "body_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_is_431() {
    let up = Upstream::echo("main").await;
    let proxy = start(&up, "").await;

    let names: Vec<String> = (0..25).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    get(proxy.addr(), "/h", &many)
        .await
        .assert_error(431, "too_many_headers");
    // 19 + host = 20: at the limit.
    let resp = get(proxy.addr(), "/h", &many[..19]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_too_large_is_431() {
    let up = Upstream::echo("main").await;
    let proxy = start(&up, "").await;

    let big = "v".repeat(600);
    get(proxy.addr(), "/h", &[("x-a", &big), ("x-b", &big)])
        .await
        .assert_error(431, "headers_too_large");
    let resp = get(proxy.addr(), "/h", &[("x-a", &big)]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_are_503_overloaded() {
    let gate = Gate::new();
    let up = Upstream::builder("main")
        .route("/slow", Reply::Echo.gated(&gate))
        .start()
        .await;
    let proxy = start(&up, "max_concurrent_requests = 1").await;
    let addr = proxy.addr();

    let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    up.wait_for_requests(1).await;

    let resp = get(addr, "/fast", &[]).await;
    resp.assert_error(503, "overloaded");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(
        up.received().len(),
        1,
        "the shed request never reached the upstream"
    );

    gate.open();
    let first = in_flight.await.expect("in-flight request task");
    assert_eq!(first.echo().uri, "/slow");
    // The permit is back.
    assert_eq!(get(addr, "/fast", &[]).await.status, 200);
}

/// With `max_connections = 1` and one connection open, a second connection must get the
/// documented `503 connection_limit` JSON (with `connection: close`) and then be closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_over_the_limit_gets_503_connection_limit() {
    let up = Upstream::echo("main").await;
    let proxy = start(&up, "max_connections = 1").await;

    // Connection A takes the only slot (a completed request proves it was accepted).
    let mut a = H1Conn::connect(proxy.addr()).await;
    assert_eq!(a.request("GET", "/a", &[], body("")).await.status, 200);

    // The admin listener has its own budget: probes work while the data plane is full.
    assert_eq!(get(proxy.admin_addr(), "/healthz", &[]).await.status, 200);

    // Connection B is over the limit.
    let mut b = RawConn::connect(proxy.addr()).await;
    b.write(b"GET /b HTTP/1.1\r\nHost: test\r\n\r\n").await;
    let resp = b.read_response(false).await.unwrap_or_else(|| {
        panic!(
            "the proxy closed the over-limit connection without sending \
             `503 connection_limit`"
        )
    });
    resp.assert_error(503, "connection_limit");
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(
        b.closed_within(Duration::from_secs(3)).await.is_some(),
        "the over-limit connection is closed after the 503"
    );
    assert_eq!(up.received().len(), 1, "B never reached the upstream");

    // Closing A frees the slot.
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let resp = get(proxy.addr(), "/c", &[]).await;
        if resp.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot was never freed: {}",
            resp.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `kiosk` (by header) may send 2 requests at once, then 1 per 10 minutes; `web` is unlimited.
const RATE_LIMITED: &str = r#"
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[access_log]
enabled = false

[reload]
watch = false

[identity]
default_client = "web"

[services.main]
urls = ["{url}"]

[[clients]]
name = "kiosk"
identify = [{ header = "x-client", equals = "kiosk" }]
rate_limit = { requests = 1, per = "10m", burst = 2 }

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "main"
"#;

#[tokio::test]
async fn a_client_over_its_rate_limit_gets_429_and_others_do_not_notice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Upstream::echo("main").await;
    let config = RATE_LIMITED.replace("{url}", &up.url());
    let path = dir.path().join("bff.toml");
    std::fs::write(&path, &config).expect("write config");
    let proxy = TestProxy::start_file(&path).await;
    let kiosk = [("x-client", "kiosk")];

    for _ in 0..2 {
        assert_eq!(get(proxy.addr(), "/a", &kiosk).await.status, 200);
    }
    let resp = get(proxy.addr(), "/a", &kiosk).await;
    resp.assert_error(429, "rate_limited");
    // One request per 10 minutes: the next is about 600 s away, in whole seconds.
    let retry: u64 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a retry-after in seconds");
    assert!((590..=600).contains(&retry), "retry-after {retry}");
    assert_eq!(
        up.received().len(),
        2,
        "a refused request reached the upstream"
    );
    for _ in 0..20 {
        assert_eq!(get(proxy.addr(), "/a", &[]).await.status, 200);
    }
    assert_eq!(
        proxy
            .metric(r#"bff_requests_total{client="kiosk",route="all",status_class="4xx"}"#)
            .await,
        1.0
    );

    // A reload that leaves the limit alone keeps its state: no fresh burst.
    std::fs::write(&path, config.replace("id = \"all\"", "id = \"everything\""))
        .expect("write config");
    let (status, record) = proxy.reload().await;
    assert_eq!(
        (status, record["outcome"].as_str()),
        (200, Some("applied")),
        "{record}"
    );
    get(proxy.addr(), "/a", &kiosk)
        .await
        .assert_error(429, "rate_limited");
    // A new limit starts afresh.
    std::fs::write(&path, config.replace("burst = 2", "burst = 3")).expect("write config");
    let (status, _) = proxy.reload().await;
    assert_eq!(status, 200);
    assert_eq!(get(proxy.addr(), "/a", &kiosk).await.status, 200);
}

#[test]
fn rate_limit_settings_are_checked() {
    let config = RATE_LIMITED.replace("{url}", "http://127.0.0.1:1").replace(
        "requests = 1, per = \"10m\", burst = 2",
        "requests = 0, per = \"0s\", burst = 0, typo = 1",
    );
    let err = bff_proxy::Config::from_toml(&config, "t").expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("rate_limit.typo: unknown field"), "{text}");
    // Decoding stopped at the unknown field; without it every range is checked.
    let config = RATE_LIMITED.replace("{url}", "http://127.0.0.1:1").replace(
        "requests = 1, per = \"10m\", burst = 2",
        "requests = 0, per = \"0s\", burst = 0",
    );
    let text = bff_proxy::Config::from_toml(&config, "t")
        .expect_err("invalid")
        .to_string();
    assert_mentions(
        &text,
        &[
            "clients[0].rate_limit.requests: must be between 1 and 1000000",
            "clients[0].rate_limit.per: must be between",
            "clients[0].rate_limit.burst: must be between 1 and 1000000",
        ],
    );
}
