//! The upstream response cache end to end (`[services.NAME.cache]`): what is stored and what
//! is not, freshness and revalidation, one fetch for concurrent misses, stale copies when the
//! service fails, the size bounds, purging, and the cache surviving reloads.

use std::time::Duration;

use bff_proxy_tests::{
    Reply, Switch, TestProxy, Upstream, assert_mentions, body, catch_all_config,
    config_file_problems, get, read_log_lines, request,
};

const BODY: &str = r#"{"products":[1,2,3]}"#;

/// The catch-all config with a cache on its one service; `cache` holds extra cache settings.
fn config(url: &str, cache: &str) -> String {
    format!(
        "{}\n[services.main.cache]\n{cache}\n",
        catch_all_config("", url)
    )
}

async fn start(up: &Upstream, cache: &str) -> TestProxy {
    TestProxy::start(&config(&up.url(), cache)).await
}

fn requests_to(up: &Upstream, path: &str) -> usize {
    up.received()
        .iter()
        .filter(|r| r.uri.split('?').next() == Some(path))
        .count()
}

fn fresh(seconds: u32) -> Reply {
    Reply::fixed(200, BODY)
        .header("content-type", "application/json")
        .header("cache-control", &format!("max-age={seconds}"))
}

async fn cache_results(proxy: &TestProxy, result: &str) -> f64 {
    proxy
        .metric(&format!(
            r#"bff_upstream_cache_total{{result="{result}",service="main"}}"#
        ))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_response_is_served_from_memory() {
    let up = Upstream::builder("main")
        .route("/products", fresh(60))
        .start()
        .await;
    let proxy = start(&up, "").await;

    let first = get(proxy.addr(), "/products", &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.text(), BODY);
    assert_eq!(
        first.header("cache-status"),
        Some("bff-proxy; fwd=uri-miss; fwd-status=200; stored")
    );

    let second = get(proxy.addr(), "/products", &[]).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.text(), BODY);
    assert_eq!(second.header("content-type"), Some("application/json"));
    let status = second.header("cache-status").expect("cache-status");
    assert!(status.starts_with("bff-proxy; hit; ttl="), "{status}");
    let age: u64 = second
        .header("age")
        .expect("a stored copy carries age")
        .parse()
        .expect("age is a number");
    assert!(age <= 1, "age {age}");
    assert_eq!(
        requests_to(&up, "/products"),
        1,
        "the second GET never left"
    );

    // Another query string is another resource.
    let other = get(proxy.addr(), "/products?page=2", &[]).await;
    assert_eq!(other.status, 200);
    assert_eq!(requests_to(&up, "/products"), 2);

    assert_eq!(cache_results(&proxy, "hit").await, 1.0);
    assert_eq!(cache_results(&proxy, "miss").await, 2.0);
    assert_eq!(
        proxy
            .metric(r#"bff_upstream_cache_entries{service="main"}"#)
            .await,
        2.0
    );
    let bytes = proxy
        .metric(r#"bff_upstream_cache_bytes{service="main"}"#)
        .await;
    assert!(bytes > (2 * BODY.len()) as f64, "{bytes}");
    // A hit is not an upstream call.
    assert_eq!(
        proxy
            .metric(r#"bff_upstream_requests_total{caller="route",outcome="2xx",service="main"}"#)
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_tells_calls_the_cache_answered() {
    let up = Upstream::builder("main")
        .route("/products", fresh(60))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let log = dir.path().join("access.log");
    let config = format!(
        "{}\n[access_log]\nformat = \"json\"\noutput = {:?}\n",
        config(&up.url(), ""),
        log.display().to_string()
    );
    let proxy = TestProxy::start(&config).await;
    get(proxy.addr(), "/products", &[]).await;
    get(proxy.addr(), "/products", &[]).await;
    let lines = read_log_lines(&log, 2).await;
    let field = |line: &str, name: &str| {
        serde_json::from_str::<serde_json::Value>(line).expect("a JSON line")[name].clone()
    };
    assert_eq!(field(&lines[0], "upstream_calls"), 1, "{}", lines[0]);
    assert_eq!(field(&lines[0], "cached"), 0, "{}", lines[0]);
    assert_eq!(field(&lines[1], "upstream_calls"), 0, "{}", lines[1]);
    assert_eq!(field(&lines[1], "cached"), 1, "{}", lines[1]);
    assert_eq!(field(&lines[1], "upstream_bytes"), 0, "{}", lines[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_shared_cache_must_not_store_is_fetched_every_time() {
    let up = Upstream::builder("main")
        .route(
            "/no-store",
            Reply::fixed(200, BODY).header("cache-control", "no-store"),
        )
        .route(
            "/private",
            Reply::fixed(200, BODY).header("cache-control", "private, max-age=60"),
        )
        .route(
            "/no-cache",
            Reply::fixed(200, BODY).header("cache-control", "no-cache, max-age=60"),
        )
        .route("/cookie", fresh(60).header("set-cookie", "session=abc"))
        .route("/no-freshness", Reply::fixed(200, BODY))
        .route("/vary-star", fresh(60).header("vary", "*"))
        .route(
            "/error",
            Reply::fixed(500, BODY).header("cache-control", "max-age=60"),
        )
        .route(
            "/created",
            Reply::fixed(201, BODY).header("cache-control", "max-age=60"),
        )
        .route("/personal", fresh(60))
        .route(
            "/shared",
            Reply::fixed(200, BODY).header("cache-control", "public, max-age=60"),
        )
        .start()
        .await;
    let proxy = start(&up, "").await;

    for path in [
        "/no-store",
        "/private",
        "/no-cache",
        "/cookie",
        "/no-freshness",
        "/vary-star",
        "/error",
        "/created",
    ] {
        for _ in 0..2 {
            let resp = get(proxy.addr(), path, &[]).await;
            assert_eq!(
                resp.header("cache-status"),
                Some(
                    format!(
                        "bff-proxy; fwd=uri-miss; fwd-status={}",
                        resp.status.as_u16()
                    )
                    .as_str()
                ),
                "{path}"
            );
        }
        assert_eq!(requests_to(&up, path), 2, "{path} was stored");
    }

    // With credentials: only an answer that says it is shared may be stored.
    let auth = [("authorization", "Bearer token-of-one-user")];
    for _ in 0..2 {
        get(proxy.addr(), "/personal", &auth).await;
        get(proxy.addr(), "/shared", &auth).await;
    }
    assert_eq!(requests_to(&up, "/personal"), 2);
    assert_eq!(requests_to(&up, "/shared"), 1);
    // ...and only a shared copy may answer them: the copy an anonymous request stored is not
    // given to a request with a session cookie, nor replaced by its answer.
    get(proxy.addr(), "/personal", &[]).await;
    let with_cookie = get(proxy.addr(), "/personal", &[("cookie", "session=u1")]).await;
    assert_eq!(
        with_cookie.header("cache-status"),
        Some("bff-proxy; fwd=request; fwd-status=200")
    );
    let anonymous = get(proxy.addr(), "/personal", &[]).await;
    assert!(
        anonymous
            .header("cache-status")
            .expect("status")
            .contains("hit")
    );
    assert_eq!(requests_to(&up, "/personal"), 4);
    let shared = get(proxy.addr(), "/shared", &[("cookie", "session=u1")]).await;
    assert!(
        shared
            .header("cache-status")
            .expect("status")
            .contains("hit")
    );

    // Other methods, bodies and ranges pass through.
    let post = request(proxy.addr(), "POST", "/shared", &[], body("x")).await;
    assert_eq!(
        post.header("cache-status"),
        Some("bff-proxy; fwd=method; fwd-status=200")
    );
    let ranged = get(proxy.addr(), "/shared", &[("range", "bytes=0-3")]).await;
    assert_eq!(
        ranged.header("cache-status"),
        Some("bff-proxy; fwd=request; fwd-status=200")
    );
    assert_eq!(requests_to(&up, "/shared"), 3);
    assert_eq!(cache_results(&proxy, "bypass").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_and_key_headers_keep_variants_apart() {
    let up = Upstream::builder("main")
        .route("/greeting", fresh(60).header("vary", "Accept-Language"))
        .route("/me", fresh(60))
        .start()
        .await;
    let proxy = start(&up, r#"key_headers = ["x-user-id"]"#).await;

    let lang = |l: &'static str| [("accept-language", l)];
    get(proxy.addr(), "/greeting", &lang("en")).await;
    let en = get(proxy.addr(), "/greeting", &lang("en")).await;
    assert!(en.header("cache-status").expect("status").contains("hit"));
    // Another language is not served the English copy: it replaces it.
    let fr = get(proxy.addr(), "/greeting", &lang("fr")).await;
    assert_eq!(
        fr.header("cache-status"),
        Some("bff-proxy; fwd=vary-miss; fwd-status=200; stored")
    );
    let fr = get(proxy.addr(), "/greeting", &lang("fr")).await;
    assert!(fr.header("cache-status").expect("status").contains("hit"));
    assert_eq!(requests_to(&up, "/greeting"), 2);

    // `key_headers`: one copy per user, even though the upstream does not say `vary`.
    for user in ["alice", "bob", "alice", "bob"] {
        get(proxy.addr(), "/me", &[("x-user-id", user)]).await;
    }
    get(proxy.addr(), "/me", &[]).await;
    assert_eq!(requests_to(&up, "/me"), 3, "alice, bob and nobody");
}

/// A credential header named in `key_headers` keys the copies instead of blocking them: one
/// copy per session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_in_key_headers_gets_copies_per_value() {
    let up = Upstream::builder("main")
        .route("/", fresh(60))
        .start()
        .await;
    let proxy = start(&up, r#"key_headers = ["cookie"]"#).await;
    for session in ["session=u1", "session=u2", "session=u1", "session=u2"] {
        get(proxy.addr(), "/cart", &[("cookie", session)]).await;
    }
    assert_eq!(up.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_copy_is_revalidated_with_its_etag() {
    let up = Upstream::builder("main")
        .route("/catalog", fresh(1).header("etag", "\"v1\"").revalidates())
        .start()
        .await;
    let proxy = start(&up, "").await;

    get(proxy.addr(), "/catalog", &[]).await;
    // A client that already has it gets a 304 from the copy.
    let conditional = get(proxy.addr(), "/catalog", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(conditional.status, 304);
    assert!(conditional.body.is_empty());
    assert_eq!(conditional.header("etag"), Some("\"v1\""));
    assert_eq!(requests_to(&up, "/catalog"), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(proxy.addr(), "/catalog", &[]).await;
    assert_eq!(revalidated.status, 200);
    assert_eq!(revalidated.text(), BODY, "the stored body, not the 304's");
    assert_eq!(
        revalidated.header("cache-status"),
        Some("bff-proxy; fwd=stale; fwd-status=304")
    );
    let sent = up.received();
    let last = sent.last().expect("a revalidation request");
    assert_eq!(
        last.headers
            .get("if-none-match")
            .map(|v| v.to_str().expect("ASCII")),
        Some("\"v1\"")
    );
    // Fresh again after the 304.
    let again = get(proxy.addr(), "/catalog", &[]).await;
    assert!(
        again
            .header("cache-status")
            .expect("status")
            .contains("hit")
    );
    assert_eq!(requests_to(&up, "/catalog"), 2);
    assert_eq!(cache_results(&proxy, "revalidated").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_request() {
    let up = Upstream::builder("main")
        .route("/slow", fresh(60).after(Duration::from_millis(300)))
        .route(
            "/uncacheable",
            Reply::fixed(200, BODY)
                .header("cache-control", "no-store")
                .after(Duration::from_millis(100)),
        )
        .start()
        .await;
    let proxy = start(&up, "").await;
    let addr = proxy.addr();

    let burst = |path: &'static str| {
        (0..8)
            .map(|_| tokio::spawn(async move { get(addr, path, &[]).await }))
            .collect::<Vec<_>>()
    };
    for task in burst("/slow") {
        let resp = task.await.expect("request task");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), BODY);
    }
    assert_eq!(requests_to(&up, "/slow"), 1, "one fetch served all eight");
    assert_eq!(cache_results(&proxy, "collapsed").await, 7.0);

    // An answer that may not be stored releases the waiters, which then fetch for themselves.
    for task in burst("/uncacheable") {
        assert_eq!(task.await.expect("request task").status, 200);
    }
    assert_eq!(requests_to(&up, "/uncacheable"), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_is_served_while_the_service_fails() {
    let switch = Switch::new(fresh(1));
    let strict = Switch::new(fresh(1).header("cache-control", "must-revalidate"));
    let up = Upstream::builder("main")
        .route("/home", switch.reply())
        .route("/strict", strict.reply())
        .start()
        .await;
    let proxy = start(&up, r#"stale_if_error = "1m""#).await;

    get(proxy.addr(), "/home", &[]).await;
    get(proxy.addr(), "/strict", &[]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    switch.set(Reply::fixed(503, r#"{"error":"down"}"#));
    strict.set(Reply::fixed(503, r#"{"error":"down"}"#));
    let resp = get(proxy.addr(), "/home", &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), BODY);
    assert_eq!(
        resp.header("cache-status"),
        Some("bff-proxy; fwd=stale; detail=stale-if-error")
    );
    // `must-revalidate` forbids it.
    assert_eq!(get(proxy.addr(), "/strict", &[]).await.status, 503);

    // A broken connection too.
    switch.set(Reply::Abort);
    let resp = get(proxy.addr(), "/home", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), BODY);
    assert_eq!(cache_results(&proxy, "stale").await, 2.0);

    // Once the service is back, its new answer replaces the copy.
    switch.set(Reply::fixed(200, r#"{"products":[]}"#).header("cache-control", "max-age=60"));
    assert_eq!(
        get(proxy.addr(), "/home", &[]).await.text(),
        r#"{"products":[]}"#
    );
    assert_eq!(
        get(proxy.addr(), "/home", &[]).await.text(),
        r#"{"products":[]}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_over_max_object_bytes_pass_through_unstored() {
    let big = "x".repeat(20_000);
    let up = Upstream::builder("main")
        .route(
            "/big",
            Reply::fixed(200, &big).header("cache-control", "max-age=60"),
        )
        .route("/small", fresh(60))
        .start()
        .await;
    let proxy = start(&up, "max_bytes = 65536\nmax_object_bytes = 16384").await;

    for _ in 0..2 {
        let resp = get(proxy.addr(), "/big", &[]).await;
        assert_eq!(resp.body.len(), 20_000);
        assert_eq!(
            resp.header("cache-status"),
            Some("bff-proxy; fwd=uri-miss; fwd-status=200")
        );
    }
    assert_eq!(requests_to(&up, "/big"), 2);
    get(proxy.addr(), "/small", &[]).await;
    get(proxy.addr(), "/small", &[]).await;
    assert_eq!(requests_to(&up, "/small"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_purge_drops_stored_copies() {
    let up = Upstream::builder("main")
        .route("/", fresh(60))
        .start()
        .await;
    let proxy = start(&up, "").await;
    for path in ["/a/1", "/a/2", "/b"] {
        get(proxy.addr(), path, &[]).await;
    }

    let purge = |json: &'static str| {
        request(
            proxy.admin_addr(),
            "POST",
            "/admin/cache/purge",
            &[("content-type", "application/json")],
            body(json),
        )
    };
    let resp = purge(r#"{"service": "main", "prefix": "/a/"}"#).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["purged"], 2);
    for path in ["/a/1", "/a/2", "/b"] {
        get(proxy.addr(), path, &[]).await;
    }
    assert_eq!(
        up.received().len(),
        5,
        "/a/* fetched again, /b still stored"
    );

    assert_eq!(purge(r#"{"service": "main"}"#).await.json()["purged"], 3);
    let unknown = purge(r#"{"service": "nope"}"#).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "no_cache");
    let invalid = purge(r#"{"prefix": "/a"}"#).await;
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["error"]["code"], "invalid_body");
    let get_purge = get(proxy.admin_addr(), "/admin/cache/purge", &[]).await;
    assert_eq!(get_purge.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_cache_unless_the_service_changes() {
    let up = Upstream::builder("main")
        .route("/", fresh(60))
        .start()
        .await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bff.toml");
    let base = config(&up.url(), "");
    std::fs::write(&path, &base).expect("write config");
    let proxy = TestProxy::start_file(&path).await;
    get(proxy.addr(), "/x", &[]).await;

    // Another service added: this one's copies stay.
    std::fs::write(
        &path,
        format!("{base}\n[services.other]\nurls = [\"{}\"]\n", up.url()),
    )
    .expect("write config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["outcome"], "applied", "{record}");
    let resp = get(proxy.addr(), "/x", &[]).await;
    assert!(resp.header("cache-status").expect("status").contains("hit"));
    assert_eq!(up.received().len(), 1);

    // Its cache settings changed: a new, empty cache.
    std::fs::write(&path, config(&up.url(), r#"max_ttl = "1h""#)).expect("write config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    get(proxy.addr(), "/x", &[]).await;
    assert_eq!(up.received().len(), 2);
}

#[test]
fn bad_cache_settings_are_reported_together() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let problems = config_file_problems(
        &dir.path().join("bff.toml"),
        &config(
            "http://127.0.0.1:1",
            r#"max_bytes = 1048576
max_object_bytes = 524288
default_ttl = "0s"
max_ttl = "0s"
key_headers = ["x user"]"#,
        ),
    );
    assert_mentions(
        &problems,
        &[
            "services.main.cache.max_object_bytes",
            "a quarter of max_bytes",
            "services.main.cache.default_ttl",
            "services.main.cache.max_ttl",
            "services.main.cache.key_headers[0]",
            "`x user` is not a valid header name",
        ],
    );
    let unknown = config_file_problems(
        &dir.path().join("bff.toml"),
        &config("http://127.0.0.1:1", "ttl = \"1m\""),
    );
    assert_mentions(&unknown, &["services.main.cache", "ttl"]);
}
