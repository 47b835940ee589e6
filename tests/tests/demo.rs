//! The `bff-proxy demo` setup end to end: the demo services and the real proxy with the demo
//! config, on real loopback sockets with OS-assigned ports, driven by an HTTP client.
//!
//! Checks what the demo banner promises: the same URL reaches a different route per client,
//! params and rewrites work, errors are JSON with stable codes, and every printed example
//! answers the status the banner says.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bff_proxy::demo::{self, EXAMPLES, PARTNER_API_KEY};
use bff_proxy::{Config, ConfigError, Proxy};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::oneshot;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `GET path` with `headers`: the status and the raw body.
async fn get_bytes(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Bytes) {
    let (parts, body) = fetch(client, addr, path, headers).await;
    (parts.status, body)
}

/// `GET path` with `headers`: the whole response head and the raw body, within 10 s.
async fn fetch(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::response::Parts, Bytes) {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Empty::new()).expect("valid request")),
    )
    .await
    .expect("answered in time")
    .expect("request sent");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    (parts, body)
}

/// `GET path` with `headers`: the status and the body as JSON.
async fn get(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (status, body) = get_bytes(client, addr, path, headers).await;
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{path} {headers:?}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_each_client_its_own_route() {
    let services = demo::start_services(Ipv4Addr::LOCALHOST.into())
        .await
        .expect("demo services start");
    assert_eq!(services.addrs().len(), 4);
    let config = demo::config_for(&services, bff_proxy_tests::plugins::example_plugins());
    let proxy = Proxy::bind(&config).await.expect("proxy binds");
    let addr = proxy.local_addr();
    let admin = proxy.admin_addr();
    assert_ne!(addr.port(), 0);
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // Same URL, four clients, four backends: plugin chains for web, mobile and voice.
    let home = |headers: &'static [(&'static str, &'static str)]| {
        let client = client.clone();
        async move { get(&client, addr, "/api/home", headers).await }
    };
    let (status, web) = home(&[("x-client", "web")]).await;
    assert_eq!(status, StatusCode::OK, "{web}");
    // aggregate: three services in one document, each section as its service answered it.
    assert_eq!(web["user"]["id"], "u-1001", "{web}");
    assert_eq!(web["user"]["meta"]["served_by"], "users");
    assert_eq!(web["user"]["meta"]["client"], "web");
    assert_eq!(web["orders"]["meta"]["served_by"], "orders");
    assert_eq!(
        web["recommendations"]["meta"]["served_by"],
        "recommendations"
    );
    assert!(web.get("errors").is_none(), "{web}");

    let (status, mobile) = home(&[("x-client", "mobile")]).await;
    assert_eq!(status, StatusCode::OK, "{mobile}");
    // headers (first in the chain, so last on the way back): the app's caching policy.
    let (head, _) = fetch(&client, addr, "/api/home", &[("x-client", "mobile")]).await;
    let field = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(field("cache-control"), Some("private, max-age=30"));
    assert_eq!(field("x-bff-platform"), Some("mobile"));
    // fields: the same aggregate, trimmed, renamed and flattened for the app.
    assert_eq!(mobile["user"]["name"], "Maya L.", "{mobile}");
    assert_eq!(mobile["user"]["loyalty"]["tier"], "gold");
    assert!(mobile["user"]["avatar_thumbnail"].is_string(), "{mobile}");
    assert!(mobile["user"].get("email").is_none(), "{mobile}");
    assert_eq!(mobile["orders"]["orders"][0]["id"], "o-5002");
    assert!(mobile["orders"]["orders"][0]["price"]["formatted"].is_string());
    assert!(mobile["orders"]["orders"][0].get("thumbnail").is_none());
    let bytes = |v: &Value| serde_json::to_vec(v).expect("serializes").len();
    assert!(
        bytes(&mobile) * 2 <= bytes(&web),
        "mobile gets at most half the web payload: {} vs {} bytes",
        bytes(&mobile),
        bytes(&web)
    );

    let (status, voice) = home(&[("x-client", "voice")]).await;
    assert_eq!(status, StatusCode::OK, "{voice}");
    // voice: one answer to read out, made from the aggregate.
    assert_eq!(
        voice,
        serde_json::json!({"speech": "Hi Maya. Your latest order, o-5002, is out for delivery, \
            arriving 2024-10-17. You have 2340 Trailhead Rewards points."})
    );

    let (status, partner) = home(&[("x-api-key", PARTNER_API_KEY)]).await;
    assert_eq!(status, StatusCode::OK, "{partner}");
    assert_eq!(partner["type"], "product_feed");
    assert_eq!(partner["meta"]["served_by"], "catalog");
    assert_eq!(partner["meta"]["client"], "partner");

    // The user agent rule identifies the mobile app too; no header at all is web (the default).
    let (_, by_ua) = home(&[("user-agent", "ShopApp/412 (iOS 18.1; iPhone15,2)")]).await;
    assert_eq!(by_ua, mobile);
    let (_, anonymous) = home(&[]).await;
    assert_eq!(anonymous["user"]["meta"]["client"], "web");
    // A client cannot claim another identity by sending the upstream header itself, not even
    // through a plugin's own upstream calls.
    let (_, spoofed) = home(&[("x-client", "web"), ("x-bff-client", "partner")]).await;
    assert_eq!(spoofed["user"]["meta"]["client"], "web");
    assert_eq!(spoofed["orders"]["meta"]["client"], "web");

    // Path params and rewrites.
    let (status, user) = get(&client, addr, "/api/users/u-1002", &[]).await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["type"], "user");
    assert_eq!(user["id"], "u-1002");
    let (_, user_mobile) = get(
        &client,
        addr,
        "/api/users/u-1002",
        &[("x-client", "mobile")],
    )
    .await;
    assert_eq!(user_mobile["type"], "user_summary");
    assert_eq!(user_mobile["id"], "u-1002");
    let (status, orders) = get(&client, addr, "/api/users/u-1001/orders", &[]).await;
    assert_eq!(status, StatusCode::OK, "{orders}");
    let first = orders["orders"][0]["id"].as_str().expect("an order id");
    let (status, order) = get(&client, addr, &format!("/api/orders/{first}"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["user_id"], "u-1001");
    let product_id = order["items"][0]["product_id"]
        .as_str()
        .expect("a product id");
    let (status, product) = get(
        &client,
        addr,
        &format!("/api/products/{product_id}"),
        &[("x-api-key", PARTNER_API_KEY)],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{product}");
    assert_eq!(product["id"], product_id);
    assert_eq!(product["name"], order["items"][0]["name"]);
    // The catalog is cacheable and the demo caches it: the same request again is a hit.
    let (again, body) = fetch(
        &client,
        addr,
        &format!("/api/products/{product_id}"),
        &[("x-api-key", PARTNER_API_KEY)],
    )
    .await;
    let status = again
        .headers
        .get("cache-status")
        .map(|v| v.to_str().expect("ASCII"));
    assert!(
        status.is_some_and(|s| s.starts_with("bff-proxy; hit")),
        "{status:?}"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("JSON"),
        product
    );
    let (status, recs) = get(
        &client,
        addr,
        "/api/users/u-1001/recommendations",
        &[("x-client", "mobile")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{recs}");
    assert_eq!(recs["user_id"], "u-1001");

    // Errors.
    let (status, wrong_key) = home(&[("x-api-key", "wrong-key")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong_key["error"]["code"], "invalid_api_key", "{wrong_key}");
    let (status, unknown) = get(&client, addr, "/api/nope", &[("x-client", "web")]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(unknown["error"]["code"], "route_not_found", "{unknown}");
    let (status, partner_user) = get(
        &client,
        addr,
        "/api/users/u-1001",
        &[("x-api-key", PARTNER_API_KEY)],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(partner_user["error"]["code"], "route_not_found");
    let (status, missing) = get(&client, addr, "/api/products/p-9999", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "not_found");
    assert_eq!(missing["error"]["service"], "catalog");

    // Every example the banner prints answers what the banner says.
    for (_, examples) in EXAMPLES {
        for e in *examples {
            let (status, body) = get(&client, addr, e.path, e.headers).await;
            assert_eq!(status.as_u16(), e.status, "{e:?}: {body}");
        }
    }
    let banner = demo::banner(addr, admin, &services);
    assert!(banner.contains(&format!(
        "curl -s http://{addr}/api/home -H 'x-client: web'"
    )));
    assert!(banner.contains(&format!("curl -s http://{admin}/readyz")));
    assert!(banner.contains(&format!("curl -s http://{admin}/metrics | grep")));

    // The admin metrics show per-client traffic and what the mobile BFF saves: the upstream
    // bytes its plugins received against the (trimmed) bytes sent to the app.
    let (status, metrics) = get_bytes(&client, admin, "/metrics", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = String::from_utf8(metrics.to_vec()).expect("text");
    let sample = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{metrics}"))
    };
    for client in ["web", "mobile", "voice", "partner"] {
        let route = format!("home-{client}");
        assert!(
            sample(&format!(
                r#"bff_requests_total{{client="{client}",route="{route}",status_class="2xx"}}"#
            )) >= 1.0
        );
    }
    let sent = sample(r#"bff_response_body_bytes_total{client="mobile",route="home-mobile"}"#);
    let received =
        sample(r#"bff_upstream_response_body_bytes_total{client="mobile",route="home-mobile"}"#);
    assert!(
        sent > 0.0 && sent * 2.0 < received,
        "mobile payload savings: {sent} bytes sent for {received} received"
    );

    drop(client);
    stop.send(()).expect("proxy still running");
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("proxy drained in time")
        .expect("proxy task did not panic");
    tokio::time::timeout(Duration::from_secs(5), services.stop())
        .await
        .expect("demo services stopped in time");
}

#[test]
fn demo_config_file_is_valid() {
    let config = Config::load(&repo().join("config/demo.toml")).expect("config/demo.toml loads");
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9901");
    for name in demo::SERVICE_NAMES {
        assert!(config.services.contains_key(name), "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(repo().join("config/demo.toml")).expect("read"),
        demo::DEMO_CONFIG
    );
}

/// A demo config with every port replaced by `port_for(original_port)`, in a temp file.
fn temp_config(tag: &str, port_for: impl Fn(u16) -> u16) -> PathBuf {
    let mut text = demo::DEMO_CONFIG.to_owned();
    for port in [8080, 9901, 7101, 7102, 7103, 7104] {
        text = text.replace(
            &format!("127.0.0.1:{port}\""),
            &format!("127.0.0.1:{}\"", port_for(port)),
        );
        text = text.replace(
            &format!("127.0.0.1:{port}/"),
            &format!("127.0.0.1:{}/", port_for(port)),
        );
    }
    // The copy lives in a temp dir: point it at the example plugins, built for this run.
    let plugins = bff_proxy_tests::plugins::example_plugins();
    text = text.replace(
        "dir = \"../plugins/target/wasm32-wasip2/release\"",
        &format!("dir = {:?}", plugins.display().to_string()),
    );
    let path = std::env::temp_dir().join(format!("bff-demo-{tag}-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write temp config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_until_shutdown_then_returns_ok() {
    let path = temp_config("ok", |_| 0);
    let result = demo::run(
        Some(path.clone()),
        tokio::time::sleep(Duration::from_millis(300)),
    )
    .await;
    let _ = std::fs::remove_file(&path);
    result.expect("demo ran and stopped cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_a_busy_service_port_clearly() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let busy_port = busy.local_addr().expect("bound").port();
    let path = temp_config("busy", |p| if p == 7101 { busy_port } else { 0 });
    let result = demo::run(Some(path.clone()), std::future::pending()).await;
    let _ = std::fs::remove_file(&path);
    let err = result.expect_err("the users port is taken");
    let message = format!("{err:#}");
    assert!(
        message.starts_with(&format!(
            "cannot listen on 127.0.0.1:{busy_port} for demo service users: address in use"
        )),
        "{message}"
    );
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_says_how_to_build_missing_plugins() {
    let path = temp_config("noplugins", |_| 0);
    let empty = std::env::temp_dir().join(format!("bff-demo-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("temp dir");
    let plugins = bff_proxy_tests::plugins::example_plugins()
        .display()
        .to_string();
    let text = std::fs::read_to_string(&path).expect("read").replace(
        &format!("{plugins:?}"),
        &format!("{:?}", empty.display().to_string()),
    );
    std::fs::write(&path, text).expect("write");
    let result = demo::run(Some(path.clone()), std::future::pending()).await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&empty);
    let message = format!("{:#}", result.expect_err("no plugins there"));
    assert!(message.contains("aggregate.wasm"), "{message}");
    assert!(
        message.contains("cd plugins && cargo build --release --target wasm32-wasip2"),
        "{message}"
    );
}

#[tokio::test]
async fn run_returns_config_errors_as_config_error() {
    let err = demo::run(
        Some(repo().join("config/invalid/unknown-keys.toml")),
        std::future::pending(),
    )
    .await
    .expect_err("invalid config");
    assert!(err.downcast_ref::<ConfigError>().is_some(), "{err:#}");
    let err = demo::run(
        Some(repo().join("config/does-not-exist.toml")),
        std::future::pending(),
    )
    .await
    .expect_err("missing config");
    assert!(
        matches!(
            err.downcast_ref::<ConfigError>(),
            Some(ConfigError::Read { .. })
        ),
        "{err:#}"
    );
}
