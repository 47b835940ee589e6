//! Lifecycle end to end: graceful drain, the drain timeout, health endpoints, idle timeout.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use bff_proxy_tests::{Gate, RawConn, Reply, TestProxy, Upstream, empty, fill, get, request};
use tokio::net::TcpStream;

/// Routes only `/api/...`, so other paths on the data plane are 404 (unlike the admin's).
const CONFIG: &str = r#"
[server]
{server}

[identity]
default_client = "web"

[services.main]
urls = ["{main}"]

[[clients]]
name = "web"

[[routes]]
id = "api"
path = "/api/{*rest}"
service = "main"
"#;

async fn start(up: &Upstream, server: &str) -> TestProxy {
    TestProxy::start(&fill(CONFIG, &[("server", server), ("main", &up.url())])).await
}

/// Connects until the connection is refused (bounded); panics if it never is.
async fn wait_until_refused(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            // Accepted by the kernel just before the listener closed, then reset: try again.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the listener still accepts connections 3 s after shutdown began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_drain_finishes_in_flight_requests() {
    let gate = Gate::new();
    let up = Upstream::builder("main")
        .route("/api/slow", Reply::Echo.gated(&gate))
        .start()
        .await;
    let mut proxy = start(&up, "").await;
    let addr = proxy.addr();

    // An idle keep-alive connection, and a request in flight.
    let mut idle = RawConn::connect(addr).await;
    idle.write(b"GET /api/x HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    assert_eq!(
        idle.read_response(false).await.expect("a response").status,
        200
    );
    let in_flight = tokio::spawn(async move { get(addr, "/api/slow", &[]).await });
    up.wait_for_requests(2).await;

    proxy.begin_shutdown();

    // New connections are refused while the in-flight request is still running.
    wait_until_refused(addr).await;
    assert!(
        !in_flight.is_finished(),
        "the in-flight request is still waiting upstream"
    );
    // Idle connections do not hold up the drain: they are closed right away.
    assert!(
        idle.closed_within(Duration::from_secs(2)).await.is_some(),
        "an idle keep-alive connection was not closed on shutdown"
    );
    // run() keeps draining while the request is in flight.
    assert!(
        !proxy.stopped_within(Duration::from_millis(200)).await,
        "run() returned with a request still in flight"
    );
    // Orchestrators see the drain: the admin listener stays up and /readyz says 503.
    let ready = get(proxy.admin_addr(), "/readyz", &[]).await;
    assert_eq!(ready.status, 503, "/readyz while draining");
    let live = get(proxy.admin_addr(), "/healthz", &[]).await;
    assert_eq!(live.status, 200, "/healthz while draining");

    gate.open();
    let resp = in_flight.await.expect("in-flight request task");
    assert_eq!(
        resp.echo().uri,
        "/api/slow",
        "the in-flight request completed"
    );
    assert!(
        proxy.stopped_within(Duration::from_secs(5)).await,
        "run() returns once drained"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_shutdown() {
    let gate = Gate::new(); // never opened: the upstream never answers
    let up = Upstream::builder("main")
        .route("/api/stuck", Reply::Echo.gated(&gate))
        .start()
        .await;
    let mut proxy = start(&up, r#"drain_timeout = "200ms""#).await;
    let addr = proxy.addr();

    let _stuck = tokio::spawn(async move { get(addr, "/api/stuck", &[]).await });
    up.wait_for_requests(1).await;

    let started = Instant::now();
    proxy.begin_shutdown();
    assert!(
        proxy.stopped_within(Duration::from_secs(3)).await,
        "run() did not return within 3 s with drain_timeout = 200ms"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(150),
        "run() returned after {took:?}: it did not wait for the in-flight request at all"
    );
}

/// The drain timeout is where draining ends: the connections still open then are closed
/// (the log says "closing remaining connections"), so that no request outlives `run()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_remaining_connections() {
    let gate = Gate::new(); // never opened: the upstream never answers
    let up = Upstream::builder("main")
        .route("/api/stuck", Reply::Echo.gated(&gate))
        .start()
        .await;
    let mut proxy = start(&up, r#"drain_timeout = "200ms""#).await;
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.write(b"GET /api/stuck HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    up.wait_for_requests(1).await;

    proxy.begin_shutdown();
    assert!(proxy.stopped_within(Duration::from_secs(3)).await);
    assert!(
        conn.closed_within(Duration::from_secs(2)).await.is_some(),
        "a connection still in flight at the drain timeout stays open after run() returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_on_the_admin_listener() {
    let up = Upstream::echo("main").await;
    let proxy = start(&up, "").await;
    let admin = proxy.admin_addr();

    let resp = get(admin, "/healthz", &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["status"], "live");

    // Ready once serving (polled briefly: run() flips readiness right after it starts).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let resp = get(admin, "/readyz", &[]).await;
        if resp.status == 200 {
            assert_eq!(resp.json()["status"], "ready");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never became 200: {}",
            resp.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let resp = request(admin, "HEAD", "/healthz", &[], empty()).await;
    assert_eq!(resp.status, 200);
    let resp = request(admin, "POST", "/healthz", &[], empty()).await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("GET, HEAD"));
    assert_eq!(get(admin, "/nope", &[]).await.status, 404);

    // Admin endpoints are not on the data plane, and data traffic is not on the admin port.
    get(proxy.addr(), "/healthz", &[])
        .await
        .assert_error(404, "route_not_found");
    assert_eq!(get(admin, "/api/x", &[]).await.status, 404);
    assert!(up.received().is_empty());

    assert!(proxy.shutdown().await < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let up = Upstream::builder("main")
        .route("/api/slow", Reply::Echo.after(Duration::from_millis(900)))
        .start()
        .await;
    let proxy = start(&up, r#"idle_timeout = "400ms""#).await;
    let req = b"GET /api/x HTTP/1.1\r\nHost: test\r\n\r\n";

    // After a response, an idle keep-alive connection is closed after about idle_timeout.
    let mut conn = RawConn::connect(proxy.addr()).await;
    conn.write(req).await;
    assert_eq!(
        conn.read_response(false).await.expect("a response").status,
        200
    );
    let closed_after = conn
        .closed_within(Duration::from_secs(3))
        .await
        .expect("the idle connection was not closed within 3 s (idle_timeout = 400ms)");
    assert!(
        closed_after >= Duration::from_millis(150),
        "closed after {closed_after:?}, before the idle timeout"
    );

    // A connection that never sends anything is closed too.
    let mut silent = RawConn::connect(proxy.addr()).await;
    assert!(
        silent.closed_within(Duration::from_secs(3)).await.is_some(),
        "a silent connection was not closed within 3 s"
    );

    // Idle means idle: a connection used every 80 ms outlives the timeout.
    let mut busy = RawConn::connect(proxy.addr()).await;
    let started = Instant::now();
    for _ in 0..8 {
        busy.write(req).await;
        let resp = busy
            .read_response(false)
            .await
            .expect("a busy connection is not closed as idle");
        assert_eq!(resp.status, 200);
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(600));

    // A request waiting on a slow upstream longer than the idle timeout still completes.
    let mut slow = RawConn::connect(proxy.addr()).await;
    slow.write(b"GET /api/slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    let resp = slow
        .read_response(false)
        .await
        .expect("a request in flight is not cut off by the idle timeout");
    assert_eq!(resp.status, 200);
}
