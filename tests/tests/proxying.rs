//! Proxying end to end: header hygiene (hop-by-hop, forwarded, request id, client header),
//! bodies, HTTP/2 on either side, round-robin, and upstream failures (502/504).
//! Large streamed bodies and memory are in `streaming.rs` (their own process, for RSS).

use std::time::{Duration, Instant};

use bff_proxy_tests::{
    H2Client, PatternBody, RawConn, Reply, TestProxy, Upstream, body, catch_all_config,
    closed_port_url, empty, fill, get, raw, request,
};

async fn proxy_to(upstream: &Upstream) -> TestProxy {
    TestProxy::start(&catch_all_config("", &upstream.url())).await
}

fn is_generated_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_removed() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;

    let resp = raw(
        proxy.addr(),
        "POST /h HTTP/1.1\r\n\
         Host: test\r\n\
         Connection: keep-alive, X-Hop-A\r\n\
         Connection: x-hop-b\r\n\
         Keep-Alive: timeout=5\r\n\
         X-Hop-A: 1\r\n\
         X-Hop-B: 2\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Trailer: x-checksum\r\n\
         X-End-To-End: kept\r\n\
         Transfer-Encoding: chunked\r\n\
         \r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let echo = resp.echo();
    for gone in [
        "connection",
        "keep-alive",
        "x-hop-a",
        "x-hop-b",
        "proxy-connection",
        "trailer",
    ] {
        assert_eq!(echo.header(gone), None, "`{gone}` reached the upstream");
    }
    assert_eq!(
        echo.header("te"),
        Some("trailers"),
        "`te: trailers` is kept"
    );
    assert_eq!(echo.header("x-end-to-end"), Some("kept"));
    assert_eq!(echo.body_len, 11, "the chunked body arrived whole");
    assert!(
        echo.header_all("transfer-encoding").len() <= 1,
        "at most one transfer-encoding (the proxy's own): {:?}",
        echo.header_all("transfer-encoding")
    );

    // Any other `te` is removed entirely; so is `upgrade`.
    let resp = raw(
        proxy.addr(),
        "GET /h HTTP/1.1\r\nHost: test\r\nTE: gzip\r\nUpgrade: websocket\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    let echo = resp.echo();
    assert_eq!(echo.header("te"), None);
    assert_eq!(echo.header("upgrade"), None);
    assert_eq!(echo.header("connection"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let up = Upstream::builder("main")
        .route(
            "/fixed",
            Reply::fixed(200, "hi")
                .header("connection", "x-hop-r")
                .header("x-hop-r", "secret")
                .header("keep-alive", "timeout=5")
                .header("proxy-connection", "keep-alive")
                .header("upgrade", "foo/1")
                .header("trailer", "x-checksum")
                .header("x-end-to-end", "kept"),
        )
        .route("/stream", Reply::Stream(100_000))
        .start()
        .await;
    let proxy = proxy_to(&up).await;

    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.write(b"GET /fixed HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    let resp = conn.read_response(false).await.expect("a response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hi");
    for gone in [
        "x-hop-r",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "trailer",
    ] {
        assert_eq!(resp.header(gone), None, "`{gone}` reached the client");
    }
    assert!(
        resp.header("connection")
            .is_none_or(|c| !c.to_ascii_lowercase().contains("x-hop-r")),
        "connection header: {:?}",
        resp.header("connection")
    );
    assert_eq!(resp.header("x-end-to-end"), Some("kept"));

    // A chunked upstream response is re-framed once by the proxy, on the same connection.
    conn.write(b"GET /stream HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    let resp = conn.read_response(false).await.expect("a response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), 100_000);
    assert_eq!(
        resp.headers.get_all("transfer-encoding").iter().count(),
        1,
        "exactly one transfer-encoding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_added() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;

    // Nothing forwarded yet: the proxy starts the chain.
    let echo = get(proxy.addr(), "/f", &[]).await.echo();
    let host = proxy.addr().to_string();
    assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(echo.header("x-forwarded-proto"), Some("http"));
    assert_eq!(echo.header("x-forwarded-host"), Some(host.as_str()));
    assert_eq!(
        echo.header("forwarded"),
        Some(format!("for=127.0.0.1;proto=http;host=\"{host}\"").as_str())
    );
    // The upstream's own `host` is its authority, not the client's.
    assert_eq!(echo.header("host"), Some(up.addr().to_string().as_str()));

    // Earlier hops are kept and ours appended; proto and host are ours to state.
    let echo = get(
        proxy.addr(),
        "/f",
        &[
            ("host", "shop.example:8443"),
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await
    .echo();
    assert_eq!(
        echo.header_all("x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"]
    );
    assert_eq!(echo.header_all("x-forwarded-proto"), ["http"]);
    assert_eq!(echo.header_all("x-forwarded-host"), ["shop.example:8443"]);
    assert_eq!(
        echo.header_all("forwarded"),
        ["for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=\"shop.example:8443\""]
    );
    assert_eq!(echo.header("host"), Some(up.addr().to_string().as_str()));
}

/// A client-sent `x-forwarded-host` must never reach the upstream as if the proxy had set it.
/// The proxy only overwrites it when it has a usable host of its own; without a `Host`
/// (HTTP/1.0) or with one it will not quote (`"`), the client's value goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_x_forwarded_host_is_never_passed_through() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;

    let no_host = raw(
        proxy.addr(),
        "GET /f HTTP/1.0\r\nX-Forwarded-Host: admin.internal\r\n\r\n",
    )
    .await
    .echo();
    let odd_host = raw(
        proxy.addr(),
        "GET /f HTTP/1.1\r\nHost: a\"b\r\nX-Forwarded-Host: admin.internal\r\n\
         Connection: close\r\n\r\n",
    )
    .await
    .echo();
    let mut spoofed = Vec::new();
    for (what, echo) in [("no host", no_host), ("host with a quote", odd_host)] {
        assert_eq!(echo.header("x-forwarded-for"), Some("127.0.0.1"), "{what}");
        if echo.header("x-forwarded-host") == Some("admin.internal") {
            spoofed.push(what);
        }
    }
    assert!(
        spoofed.is_empty(),
        "the client's x-forwarded-host reached the upstream as if the proxy had set it \
         (request with {spoofed:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_generated_or_propagated_and_echoed() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;

    // Generated: 32 hex, the same upstream and on the response, new per request.
    let resp = get(proxy.addr(), "/r", &[]).await;
    let id = resp
        .header("x-request-id")
        .expect("x-request-id on the response")
        .to_owned();
    assert!(is_generated_id(&id), "generated id {id:?}");
    assert_eq!(resp.echo().header_all("x-request-id"), [id.as_str()]);
    let other = get(proxy.addr(), "/r", &[]).await;
    assert_ne!(other.header("x-request-id"), Some(id.as_str()));

    // Propagated when sane.
    let resp = get(proxy.addr(), "/r", &[("x-request-id", "abc-123_XYZ")]).await;
    assert_eq!(resp.header("x-request-id"), Some("abc-123_XYZ"));
    assert_eq!(resp.echo().header_all("x-request-id"), ["abc-123_XYZ"]);

    // Replaced when not: spaces, too long.
    let long = "a".repeat(129);
    for bad in ["has space", long.as_str()] {
        let resp = get(proxy.addr(), "/r", &[("x-request-id", bad)]).await;
        let id = resp
            .header("x-request-id")
            .expect("x-request-id")
            .to_owned();
        assert!(
            is_generated_id(&id),
            "{bad:?} was replaced by a generated id, got {id:?}"
        );
        assert_eq!(resp.echo().header_all("x-request-id"), [id.as_str()]);
    }

    // Error responses carry it too, in the header and the body.
    let resp = get(proxy.addr(), "/r%2F", &[("x-request-id", "err-id-1")]).await;
    resp.assert_error(400, "invalid_path");
    assert_eq!(resp.json()["error"]["request_id"], "err-id-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_and_methods_are_forwarded() {
    let up = Upstream::builder("main")
        .route("/sink", Reply::Sink)
        .start()
        .await;
    let proxy = proxy_to(&up).await;

    // Declared length stays declared upstream.
    let echo = request(proxy.addr(), "PUT", "/e", &[], body(vec![7u8; 1000]))
        .await
        .echo();
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.body_len, 1000);
    assert_eq!(echo.header("content-length"), Some("1000"));
    assert_eq!(echo.header("transfer-encoding"), None);

    // A chunked body arrives intact.
    let resp = request(
        proxy.addr(),
        "POST",
        "/sink",
        &[],
        PatternBody::chunked(300_000).into_client_body(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.json(),
        serde_json::json!({"bytes": 300_000, "intact": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_and_bodies_pass_through() {
    let up = Upstream::builder("main")
        .route(
            "/teapot",
            Reply::fixed(418, "short and stout").header("x-upstream", "yes"),
        )
        .route("/down", Reply::fixed(503, r#"{"upstream":"down"}"#))
        .start()
        .await;
    let proxy = proxy_to(&up).await;

    let resp = get(proxy.addr(), "/teapot", &[]).await;
    assert_eq!(resp.status, 418);
    assert_eq!(resp.text(), "short and stout");
    assert_eq!(resp.header("x-upstream"), Some("yes"));
    assert!(resp.header("x-request-id").is_some());

    // An upstream's error is its own: passed through, not rewritten into a proxy error.
    let resp = get(proxy.addr(), "/down", &[]).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.text(), r#"{"upstream":"down"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_client_to_the_proxy() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;
    let h2 = H2Client::new();

    let resp = h2
        .get(proxy.addr(), "/over-h2?x=1", &[("x-client", "web")])
        .await;
    assert_eq!(resp.version, http::Version::HTTP_2);
    assert!(resp.header("x-request-id").is_some());
    let echo = resp.echo();
    assert_eq!(echo.uri, "/over-h2?x=1");
    assert_eq!(echo.version, "HTTP/1.1", "the upstream speaks HTTP/1.1");
    assert_eq!(echo.header_all("x-bff-client"), ["web"]);
    let authority = proxy.addr().to_string();
    assert_eq!(echo.header("x-forwarded-host"), Some(authority.as_str()));

    // Bodies and errors over h2 too, several streams on one connection.
    let resp = h2
        .request(proxy.addr(), "POST", "/post", &[], body(vec![1u8; 5000]))
        .await;
    assert_eq!(resp.echo().body_len, 5000);
    h2.get(proxy.addr(), "/bad%2Fpath", &[])
        .await
        .assert_error(400, "invalid_path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream() {
    let up = Upstream::builder("h2-only").http2_only().start().await;
    let config = r#"
[identity]
default_client = "web"

[services.h2svc]
urls = ["{up}/prefix"]
protocol = "http2"

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "h2svc"
"#;
    let proxy = TestProxy::start(&fill(config, &[("up", &up.url())])).await;

    // Connection-specific headers from the client must not break the h2 leg.
    let resp = request(
        proxy.addr(),
        "POST",
        "/a/b?c=d",
        &[
            ("connection", "x-foo"),
            ("x-foo", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
        ],
        body("payload"),
    )
    .await;
    let echo = resp.echo();
    assert_eq!(echo.upstream, "h2-only");
    assert_eq!(echo.version, "HTTP/2.0");
    assert_eq!(echo.uri, "/prefix/a/b?c=d");
    assert_eq!(echo.body_len, 7);
    assert_eq!(echo.header_all("x-bff-client"), ["web"]);
    assert_eq!(echo.header("x-foo"), None);
    // And h2 on both legs.
    let echo = H2Client::new().get(proxy.addr(), "/x", &[]).await.echo();
    assert_eq!(echo.version, "HTTP/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_service_urls() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let config = r#"
[identity]
default_client = "web"

[services.pair]
urls = ["{a}", "{b}"]

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "pair"
"#;
    let proxy = TestProxy::start(&fill(config, &[("a", &a.url()), ("b", &b.url())])).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(get(proxy.addr(), "/rr", &[]).await.echo().upstream);
    }
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "requests alternate between the URLs: {seen:?}"
    );
    assert_eq!(a.received().len(), 3);
    assert_eq!(b.received().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_upstream_unavailable() {
    let config = r#"
[identity]
default_client = "web"

[services.ghost-svc]
urls = ["{dead}"]
connect_timeout = "1s"

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "ghost-svc"
"#;
    let dead = closed_port_url();
    let proxy = TestProxy::start(&fill(config, &[("dead", &dead)])).await;
    let resp = get(proxy.addr(), "/anything", &[]).await;
    resp.assert_error(502, "upstream_unavailable");
    let port = dead.rsplit(':').next().expect("a port");
    assert!(!resp.text().contains(port), "body leaks the upstream port");
    assert!(
        !resp.text().contains("ghost"),
        "body leaks the service name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_closes_without_answering_is_502_upstream_error() {
    let up = Upstream::builder("main")
        .route("/abort", Reply::Abort)
        .start()
        .await;
    let proxy = proxy_to(&up).await;
    get(proxy.addr(), "/abort", &[])
        .await
        .assert_error(502, "upstream_error");
    // The proxy is fine afterwards.
    assert_eq!(get(proxy.addr(), "/ok", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_upstream_timeout() {
    let up = Upstream::builder("slow-svc")
        .route("/slow", Reply::Echo.after(Duration::from_secs(5)))
        .start()
        .await;

    // The service's own timeout.
    let config = r#"
[identity]
default_client = "web"

[services.slow-svc]
urls = ["{up}"]
request_timeout = "300ms"

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "slow-svc"
"#;
    let proxy = TestProxy::start(&fill(config, &[("up", &up.url())])).await;
    let started = Instant::now();
    let resp = get(proxy.addr(), "/slow", &[]).await;
    let took = started.elapsed();
    resp.assert_error(504, "upstream_timeout");
    assert!(
        !resp.text().contains("slow-svc"),
        "body leaks the service name"
    );
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "answered after {took:?}, expected about 300ms"
    );
    // Fast requests on the same service are unaffected.
    assert_eq!(get(proxy.addr(), "/fast", &[]).await.status, 200);

    // `server.request_timeout` caps every service (the smaller one wins).
    let config = r#"
[server]
request_timeout = "300ms"

[identity]
default_client = "web"

[services.slow-svc]
urls = ["{up}"]
request_timeout = "30s"

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "slow-svc"
"#;
    let proxy = TestProxy::start(&fill(config, &[("up", &up.url())])).await;
    let started = Instant::now();
    get(proxy.addr(), "/slow", &[])
        .await
        .assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_requests_get_no_body_upstream() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;
    let echo = request(proxy.addr(), "DELETE", "/d", &[], empty())
        .await
        .echo();
    assert_eq!(echo.body_len, 0);
    assert_eq!(
        echo.header("transfer-encoding"),
        None,
        "no chunked framing for an empty body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let up = Upstream::echo("main").await;
    let proxy = proxy_to(&up).await;
    // Sequential requests (including bodyless HEAD and a POST with a body) share one upstream
    // connection: each goes back to the pool when its response ends.
    for i in 0..20 {
        let resp = match i % 3 {
            0 => get(proxy.addr(), "/a", &[]).await,
            1 => request(proxy.addr(), "HEAD", "/b", &[], empty()).await,
            _ => request(proxy.addr(), "POST", "/c", &[], body("hello")).await,
        };
        assert_eq!(resp.status, 200, "request {i}");
    }
    assert_eq!(up.received().len(), 20);
    assert_eq!(
        up.connections(),
        1,
        "one keep-alive connection serves them all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_open_more_connections_and_all_succeed() {
    let up = Upstream::builder("main")
        .route("/slow", Reply::Echo.after(Duration::from_millis(50)))
        .start()
        .await;
    let proxy = proxy_to(&up).await;
    let addr = proxy.addr();
    let tasks: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { get(addr, "/slow", &[]).await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    let opened = up.connections();
    assert!(
        (2..=8).contains(&opened),
        "{opened} connections for 8 concurrent requests"
    );
    // Afterwards the pooled connections are reused, not replaced.
    for _ in 0..8 {
        assert_eq!(get(addr, "/slow", &[]).await.status, 200);
    }
    assert_eq!(up.connections(), opened, "idle connections were reused");
}

/// An upstream that answers each connection's first request as keep-alive and then closes
/// the socket: the proxy must notice (or, in the race, resend the unsent request on a new
/// connection) rather than fail the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_idle_connections_never_fails_a_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // No `connection: close`, yet the socket closes: a keep-alive timeout firing.
            });
        }
    });
    let proxy = TestProxy::start(&catch_all_config("", &url)).await;
    for i in 0..10 {
        let resp = get(proxy.addr(), "/x", &[]).await;
        assert_eq!(resp.status, 200, "request {i}: {:?}", resp.body);
        assert_eq!(&resp.body[..], b"ok");
        if i % 2 == 0 {
            // Give the FIN time to arrive on some iterations, and race it on the others.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 10);
    server.abort();
}
