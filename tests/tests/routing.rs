//! Routing end to end: per-client routes, path params and rewrites, route order, methods,
//! 404/405, service base paths and query strings, and path normalization before routing.

use bff_proxy_tests::{TestProxy, Upstream, empty, fill, get, raw, raw_get, request};

const CONFIG: &str = r#"
[identity]
default_client = "web"

[services.alpha]
urls = ["{alpha}"]

[services.beta]
urls = ["{beta}"]

[services.based]
urls = ["{based}"]

[[clients]]
name = "mobile"
identify = [{ header = "x-client", equals = "mobile" }]

[[clients]]
name = "web"
identify = [{ header = "x-client", equals = "web" }]

# Same URL, different backend per client: mobile's route comes first and lists only mobile.
[[routes]]
id = "mobile-user"
clients = ["mobile"]
methods = ["GET"]
path = "/api/users/{id}"
service = "alpha"
rewrite = "/v2/users/{id}/summary"

[[routes]]
id = "user"
methods = ["GET", "PATCH"]
path = "/api/users/{id}"
service = "beta"
rewrite = "/v2/users/{id}"

[[routes]]
id = "catalog"
path = "/api/catalog/{*rest}"
service = "beta"
rewrite = "/products/{rest}"

# Route order: the literal route first, then the param route that also matches it.
[[routes]]
id = "orders-special"
path = "/api/orders/special"
service = "alpha"

[[routes]]
id = "orders"
path = "/api/orders/{id}"
service = "beta"

# The reverse: a param route first shadows a later literal one.
[[routes]]
id = "things"
path = "/api/things/{id}"
service = "alpha"

[[routes]]
id = "things-special"
path = "/api/things/special"
service = "beta"

[[routes]]
id = "home"
methods = ["GET"]
path = "/api/home"
service = "alpha"

[[routes]]
id = "tilde"
path = "/api/~user"
service = "alpha"

[[routes]]
id = "post-only"
methods = ["POST", "PUT"]
path = "/api/submit"
service = "alpha"

[[routes]]
id = "based"
path = "/svc/{*rest}"
service = "based"
rewrite = "/{rest}"

[[routes]]
id = "based-plain"
path = "/plain/{a}/{b}"
service = "based"
"#;

struct Fixture {
    proxy: TestProxy,
    alpha: Upstream,
    beta: Upstream,
    _based: Upstream,
}

async fn fixture() -> Fixture {
    let alpha = Upstream::echo("alpha").await;
    let beta = Upstream::echo("beta").await;
    let based = Upstream::echo("based").await;
    let based_url = format!("{}/base/", based.url());
    let proxy = TestProxy::start(&fill(
        CONFIG,
        &[
            ("alpha", &alpha.url()),
            ("beta", &beta.url()),
            ("based", &based_url),
        ],
    ))
    .await;
    Fixture {
        proxy,
        alpha,
        beta,
        _based: based,
    }
}

/// (upstream name, upstream path+query) of a GET.
async fn served(f: &Fixture, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let echo = get(f.proxy.addr(), path, headers).await.echo();
    (echo.upstream, echo.uri)
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_url_reaches_a_different_upstream_per_client() {
    let f = fixture().await;
    let mobile = [("x-client", "mobile")];
    assert_eq!(
        served(&f, "/api/users/42", &mobile).await,
        pair("alpha", "/v2/users/42/summary")
    );
    assert_eq!(
        served(&f, "/api/users/42", &[("x-client", "web")]).await,
        pair("beta", "/v2/users/42")
    );
    // The default client (web) gets web's route.
    assert_eq!(
        served(&f, "/api/users/7", &[]).await,
        pair("beta", "/v2/users/7")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn params_and_prefix_rewrite() {
    let f = fixture().await;
    assert_eq!(
        served(&f, "/api/catalog/shoes/trail/42", &[]).await,
        pair("beta", "/products/shoes/trail/42")
    );
    assert_eq!(
        served(&f, "/api/catalog/x", &[]).await,
        pair("beta", "/products/x")
    );
    // `{*rest}` also matches nothing at all.
    assert_eq!(
        served(&f, "/api/catalog", &[]).await,
        pair("beta", "/products/")
    );
    // `{id}` takes exactly one segment.
    get(f.proxy.addr(), "/api/users/42/extra", &[])
        .await
        .assert_error(404, "route_not_found");
    get(f.proxy.addr(), "/api/users/", &[])
        .await
        .assert_error(404, "route_not_found");
    // Without a rewrite the upstream gets the request path.
    assert_eq!(
        served(&f, "/plain/one/two", &[]).await,
        pair("based", "/base/plain/one/two")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_matching_route_wins() {
    let f = fixture().await;
    assert_eq!(
        served(&f, "/api/orders/special", &[]).await,
        pair("alpha", "/api/orders/special")
    );
    assert_eq!(
        served(&f, "/api/orders/17", &[]).await,
        pair("beta", "/api/orders/17")
    );
    // The param route is listed first, so the later literal route is never reached.
    assert_eq!(
        served(&f, "/api/things/special", &[]).await,
        pair("alpha", "/api/things/special")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_405_with_allow_and_head_on_get_routes() {
    let f = fixture().await;
    let addr = f.proxy.addr();

    // GET-only route: POST is 405 listing GET and HEAD.
    let resp = request(addr, "POST", "/api/home", &[], empty()).await;
    resp.assert_error(405, "method_not_allowed");
    assert_eq!(resp.header("allow"), Some("GET, HEAD"));

    // Both user routes match the path for mobile; the allow header lists every method of both.
    let resp = request(
        addr,
        "DELETE",
        "/api/users/1",
        &[("x-client", "mobile")],
        empty(),
    )
    .await;
    resp.assert_error(405, "method_not_allowed");
    assert_eq!(resp.header("allow"), Some("GET, HEAD, PATCH"));

    // A route that does not allow the method falls through to the next matching route.
    let echo = request(
        addr,
        "PATCH",
        "/api/users/1",
        &[("x-client", "mobile")],
        empty(),
    )
    .await
    .echo();
    assert_eq!(
        (echo.upstream.as_str(), echo.uri.as_str()),
        ("beta", "/v2/users/1")
    );
    assert_eq!(echo.method, "PATCH");

    // Route without GET: no HEAD either.
    let resp = request(addr, "GET", "/api/submit", &[], empty()).await;
    resp.assert_error(405, "method_not_allowed");
    assert_eq!(resp.header("allow"), Some("POST, PUT"));
    let echo = request(addr, "PUT", "/api/submit", &[], empty())
        .await
        .echo();
    assert_eq!(echo.method, "PUT");

    // HEAD on a GET route is served (as HEAD) with no body.
    let resp = request(addr, "HEAD", "/api/home", &[], empty()).await;
    assert_eq!(resp.status, 200);
    assert!(resp.body.is_empty(), "HEAD response has no body");
    let head = raw(
        addr,
        "HEAD /api/home HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 200);
    let alpha_saw: Vec<String> = f
        .alpha
        .received()
        .iter()
        .map(|r| r.method.to_string())
        .collect();
    assert!(
        alpha_saw.iter().filter(|m| *m == "HEAD").count() == 2,
        "the upstream got HEAD: {alpha_saw:?}"
    );

    // A route without methods takes any method.
    let echo = request(addr, "OPTIONS", "/api/catalog/x", &[], empty())
        .await
        .echo();
    assert_eq!(echo.method, "OPTIONS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_is_404_route_not_found() {
    let f = fixture().await;
    for path in ["/", "/nope", "/api", "/api/homes", "/API/home"] {
        get(f.proxy.addr(), path, &[])
            .await
            .assert_error(404, "route_not_found");
    }
    // Upstream paths are not routes.
    get(
        f.proxy.addr(),
        "/v2/users/1/summary",
        &[("x-client", "mobile")],
    )
    .await
    .assert_error(404, "route_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_base_path_and_query_string_are_kept() {
    let f = fixture().await;
    assert_eq!(
        served(&f, "/svc/items/9?b=2&a=1&q=a%20b&slash=%2F", &[]).await,
        pair("based", "/base/items/9?b=2&a=1&q=a%20b&slash=%2F")
    );
    assert_eq!(
        served(&f, "/api/catalog/a?x=1&x=2", &[]).await,
        pair("beta", "/products/a?x=1&x=2")
    );
    assert_eq!(
        served(&f, "/api/users/5?expand=orders", &[("x-client", "mobile")]).await,
        pair("alpha", "/v2/users/5/summary?expand=orders")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_before_routing_and_upstream_gets_the_normal_form() {
    let f = fixture().await;
    let cases = [
        ("/api//home", "/api/home"),
        ("//api///home", "/api/home"),
        ("/api/./home", "/api/home"),
        ("/x/../api/home", "/api/home"),
        ("/../../api/home", "/api/home"),
        ("/api/x/%2e%2e/home", "/api/home"),
        ("/api/x/%2E%2E/home", "/api/home"),
        ("/api/%2e/home", "/api/home"),
        ("/%61pi/home", "/api/home"),
        ("/api/%7Euser", "/api/~user"),
        ("/api/%7euser", "/api/~user"),
    ];
    for (sent, want) in cases {
        let resp = raw_get(f.proxy.addr(), sent, &[]).await;
        let echo = resp.echo();
        assert_eq!(echo.upstream, "alpha", "{sent} reached the wrong route");
        assert_eq!(
            echo.uri, want,
            "{sent} reached the upstream as {}",
            echo.uri
        );
    }
    // With a rewrite, the captured param is the normalized segment.
    let echo = raw_get(f.proxy.addr(), "/api//users/./%7Eann", &[])
        .await
        .echo();
    assert_eq!(echo.uri, "/v2/users/~ann");
    // A `..` cannot climb out of a prefix route into another one.
    let echo = raw_get(f.proxy.addr(), "/svc/a/../../api/home", &[])
        .await
        .echo();
    assert_eq!(
        (echo.upstream.as_str(), echo.uri.as_str()),
        ("alpha", "/api/home")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_separators_are_400_invalid_path() {
    let f = fixture().await;
    for path in [
        "/api%2Fhome",
        "/api%2fhome",
        "/svc/a%2F..%2F..%2Fapi/home",
        "/api%5Chome",
        "/api%5chome",
        "/api/%00",
        "/api/%zz",
    ] {
        raw_get(f.proxy.addr(), path, &[])
            .await
            .assert_error(400, "invalid_path");
    }
    assert!(
        f.alpha.received().is_empty() && f.beta.received().is_empty(),
        "rejected paths never reach an upstream"
    );
}
