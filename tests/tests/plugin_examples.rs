//! The example plugins (`plugins/`: aggregate, fields, headers, voice), built from source, running in the
//! real proxy: the example configs load them, `aggregate` really calls its services at once and
//! reports partial and required failures, `fields` and `voice` reshape proxied responses,
//! `headers` rewrites header fields both ways while the body streams past, and `py-summary`,
//! written in Python and built by componentize-py, runs like the Rust ones.
//! (Their own unit tests, on the SDK's native harness, live in `plugins/`.)

use bff_proxy::{Config, check_plugins};
use bff_proxy_tests::plugins::{example_plugins, python_plugins};
use bff_proxy_tests::{Gate, Reply, TestProxy, Upstream, closed_port_url, get};
use serde_json::json;

fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test]
async fn example_configs_load_their_plugins() {
    for (file, uses) in [("config/demo.toml", 6), ("config/full.toml", 2)] {
        let mut config = Config::load(&repo().join(file)).expect("valid config");
        assert!(config.uses_plugins(), "{file}");
        config.plugins.dir = example_plugins().to_path_buf();
        let loaded = check_plugins(&config)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(loaded, uses, "{file}");
    }
}

fn json_reply(body: serde_json::Value) -> Reply {
    Reply::fixed(200, &body.to_string()).header("content-type", "application/json")
}

/// A config with services `a`, `b`, `c` at the given URLs and the given routes.
fn config(urls: [&str; 3], routes: &str) -> String {
    format!(
        r#"
[identity]
default_client = "web"

[services.a]
urls = ["{}"]
[services.b]
urls = ["{}"]
[services.c]
urls = ["{}"]
request_timeout = "2s"

[[clients]]
name = "web"
attributes = {{ tier = "gold" }}

[plugins]
dir = {dir:?}
{routes}
"#,
        urls[0],
        urls[1],
        urls[2],
        dir = example_plugins().display().to_string()
    )
}

const AGGREGATE: &str = r#"
[[routes]]
id = "home"
path = "/home/{id}"
egress = ["a", "b", "c"]
[[routes.chain]]
plugin = "aggregate"
[routes.chain.config.calls.one]
service = "a"
path = "/users/{param.id}?tier={attr.tier}"
[routes.chain.config.calls.two]
service = "b"
path = "/orders/{param.id}"
[routes.chain.config.calls.three]
service = "c"
path = "/recs/{param.id}"
required = false
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_calls_its_services_at_once() {
    // Every service holds its answer until all three calls have arrived: calls made one after
    // another would never all arrive, and the test would fail at the bound below.
    let gate = Gate::new();
    let a = Upstream::builder("a")
        .route("/", json_reply(json!({"name": "Ada"})).gated(&gate))
        .start()
        .await;
    let b = Upstream::builder("b")
        .route("/", json_reply(json!({"orders": [1]})).gated(&gate))
        .start()
        .await;
    let c = Upstream::builder("c")
        .route("/", json_reply(json!({"items": ["p"]})).gated(&gate))
        .start()
        .await;
    let proxy = TestProxy::start(&config([&a.url(), &b.url(), &c.url()], AGGREGATE)).await;
    let addr = proxy.addr();
    let pending = tokio::spawn(async move { get(addr, "/home/u-1", &[]).await });
    for up in [&a, &b, &c] {
        up.wait_for_requests(1).await;
    }
    gate.open();
    let resp = pending.await.expect("request task");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        resp.json(),
        json!({"one": {"name": "Ada"}, "two": {"orders": [1]}, "three": {"items": ["p"]}})
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));
    assert_eq!(resp.header("x-bff-partial"), None);
    // Templates filled from the route's params and the client's attributes; identity kept.
    let one = &a.received()[0];
    assert_eq!(one.uri, "/users/u-1?tier=gold");
    assert_eq!(
        one.headers
            .get("x-bff-client")
            .and_then(|v| v.to_str().ok()),
        Some("web")
    );
    assert_eq!(b.received()[0].uri, "/orders/u-1");
}

/// A call whose path needs a value from another call's answer starts once that call has
/// answered; calls that need nothing still go out together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_calls_that_need_another_calls_answer_wait_for_it() {
    let gate = Gate::new();
    let a = Upstream::builder("a")
        .route(
            "/",
            json_reply(json!({"account": {"id": "acc-9"}})).gated(&gate),
        )
        .start()
        .await;
    let b = Upstream::echo("b").await;
    let c = Upstream::builder("c")
        .route("/", json_reply(json!({"items": ["p"]})).gated(&gate))
        .start()
        .await;
    let routes = r#"
[[routes]]
id = "deps"
path = "/deps/{id}"
egress = ["a", "b", "c"]
[[routes.chain]]
plugin = "aggregate"
[routes.chain.config.calls.user]
service = "a"
path = "/users/{param.id}"
[routes.chain.config.calls.orders]
service = "b"
path = "/accounts/{call.user.account.id}/orders"
[routes.chain.config.calls.recs]
service = "c"
path = "/recs/{param.id}"
"#;
    let proxy = TestProxy::start(&config([&a.url(), &b.url(), &c.url()], routes)).await;
    let addr = proxy.addr();
    let pending = tokio::spawn(async move { get(addr, "/deps/u-1", &[]).await });
    // `user` and `recs` are both in flight before either answers; `orders` waits for `user`.
    a.wait_for_requests(1).await;
    c.wait_for_requests(1).await;
    assert!(
        b.received().is_empty(),
        "orders went out before user answered"
    );
    gate.open();
    let resp = pending.await.expect("request task");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["user"]["account"]["id"], "acc-9", "{body}");
    assert_eq!(body["recs"]["items"][0], "p", "{body}");
    assert_eq!(b.received()[0].uri, "/accounts/acc-9/orders");
}

#[tokio::test]
async fn aggregate_reports_partial_and_required_failures() {
    let a = Upstream::builder("a")
        .route("/", json_reply(json!({"name": "Ada"})))
        .start()
        .await;
    let b = Upstream::builder("b")
        .route("/orders/broken", Reply::fixed(500, "{}"))
        .route("/", json_reply(json!({"orders": []})))
        .start()
        .await;
    // `c` (optional) is down.
    let down = closed_port_url();
    let proxy = TestProxy::start(&config([&a.url(), &b.url(), &down], AGGREGATE)).await;

    let partial = get(proxy.addr(), "/home/u-1", &[]).await;
    assert_eq!(partial.status, 200, "{}", partial.text());
    assert_eq!(partial.header("x-bff-partial"), Some("three"));
    let body = partial.json();
    assert_eq!(body["one"]["name"], "Ada");
    assert_eq!(body["errors"]["three"]["code"], "unavailable", "{body}");
    assert!(body.get("three").is_none());

    // `two` is required: its 500 fails the whole answer, with the request id to look it up.
    let failed = get(proxy.addr(), "/home/broken", &[]).await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    let body = failed.json();
    assert_eq!(body["error"]["code"], "aggregate_failed", "{body}");
    assert_eq!(body["error"]["failed"]["two"]["status"], 500);
    assert_eq!(
        body["error"]["request_id"].as_str(),
        failed.header("x-request-id")
    );
}

#[tokio::test]
async fn fields_and_voice_reshape_a_proxied_response() {
    let doc = json!({
        "user": {"name": {"first": "Ada", "last": "Lovelace"}, "email": "ada@example.com"},
        "orders": [{"id": "o-1", "status": "in_transit", "lines": [1, 2, 3]}]
    });
    let a = Upstream::builder("a")
        .route("/", json_reply(doc))
        .start()
        .await;
    let routes = r#"
[[routes]]
id = "slim"
path = "/slim"
service = "a"
[[routes.chain]]
plugin = "fields"
config = { allow = ["user.name.first", "orders[].id", "orders[].status"], rename = { "orders[].status" = "state" } }

[[routes]]
id = "say"
path = "/say"
service = "a"
[[routes.chain]]
plugin = "voice"
config = { sentences = ["Hi {user.name.first}.", "Order {orders[0].id} is {orders[0].status}.", "Missing {nope}."] }
"#;
    let proxy = TestProxy::start(&config([&a.url(), &a.url(), &a.url()], routes)).await;

    let slim = get(proxy.addr(), "/slim", &[]).await;
    assert_eq!(slim.status, 200, "{}", slim.text());
    assert_eq!(
        slim.json(),
        json!({"user": {"name": {"first": "Ada"}}, "orders": [{"id": "o-1", "state": "in_transit"}]})
    );
    // The proxy fixed the length of the rewritten body.
    assert_eq!(
        slim.header("content-length"),
        Some(slim.body.len().to_string().as_str())
    );
    // A plugin that reads the response body gets it unencoded.
    assert_eq!(
        a.received()[0]
            .headers
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("identity")
    );

    let say = get(proxy.addr(), "/say", &[]).await;
    assert_eq!(say.status, 200, "{}", say.text());
    assert_eq!(
        say.json(),
        json!({"speech": "Hi Ada. Order o-1 is in transit."})
    );
}

#[tokio::test]
async fn headers_rewrites_fields_both_ways_and_leaves_the_body_alone() {
    let body = "x".repeat(200_000);
    let a = Upstream::builder("a")
        .route(
            "/",
            Reply::fixed(200, &body)
                .header("server", "orders/1.4")
                .header("x-internal-host", "10.0.3.7")
                .header("cache-control", "no-store"),
        )
        .start()
        .await;
    let routes = r#"
[[routes]]
id = "tagged"
path = "/items/{id}"
service = "a"
[[routes.chain]]
plugin = "headers"
[routes.chain.config]
request.remove = ["cookie"]
request.set = { "x-tenant" = "{client}:{attr.tier}", "x-item" = "{param.id}" }
response.remove = ["server", "x-internal-*"]
response.set = { "cache-control" = "private, max-age=30" }
"#;
    let proxy = TestProxy::start(&config([&a.url(), &a.url(), &a.url()], routes)).await;
    let resp = get(proxy.addr(), "/items/p-7", &[("cookie", "session=secret")]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), body.len(), "the body passed through whole");
    assert_eq!(resp.header("server"), None);
    assert_eq!(resp.header("x-internal-host"), None);
    assert_eq!(resp.header("cache-control"), Some("private, max-age=30"));
    let seen = &a.received()[0];
    let field = |name: &str| seen.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(field("x-tenant"), Some("web:gold"));
    assert_eq!(field("x-item"), Some("p-7"));
    assert_eq!(field("cookie"), None);
    // Headers only: the upstream was not asked for an unencoded body.
    assert_eq!(field("accept-encoding"), None);
}

/// A plugin from another toolchain: `py-summary` is Python, built by componentize-py against the
/// same WIT. It loads (its config checked by its own `init`), reshapes a proxied answer, gets a
/// fresh instance per request (its module state starts over) unless the use reuses instances,
/// and an uncaught Python exception fails only its request (componentize-py's runtime panics,
/// the traceback goes to the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_runs_like_a_rust_one() {
    let dir = python_plugins();
    let up = Upstream::builder("up")
        .route("/", json_reply(json!({"name": "Ada", "langs": ["en"]})))
        .start()
        .await;
    let text = |routes: &str| {
        format!(
            "[identity]\ndefault_client = \"web\"\n[services.up]\nurls = [\"{}\"]\n\
             [[clients]]\nname = \"web\"\n[plugins]\ndir = {:?}\n{routes}",
            up.url(),
            dir.display().to_string()
        )
    };
    let bad = text(
        "[[routes]]\nid = \"r\"\npath = \"/r\"\nservice = \"up\"\n\
         chain = [{ plugin = \"py-summary\", config = { label = 7 } }]\n",
    );
    let refused = check_plugins(&Config::from_toml(&bad, "bad").expect("valid config"))
        .await
        .expect_err("py-summary refuses a label that is not a string");
    assert!(
        bff_proxy::ErrorChain(&refused)
            .to_string()
            .contains("label: must be a string"),
        "{refused:?}"
    );

    let routes = r#"
[[routes]]
id = "fresh"
path = "/fresh"
service = "up"
chain = [{ plugin = "py-summary", config = { label = "from-python" } }]
[[routes]]
id = "reused"
path = "/reused"
service = "up"
chain = [{ plugin = "py-summary", instances = "reused", config = { label = "again" } }]
[[routes]]
id = "fails"
path = "/fails"
service = "up"
chain = [{ plugin = "py-summary", config = { fail = true } }]
"#;
    let proxy = TestProxy::start(&text(routes)).await;
    for _ in 0..3 {
        let resp = get(proxy.addr(), "/fresh", &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(
            resp.json(),
            json!({"name": "Ada", "langs": ["en"], "summary": {
                "label": "from-python", "keys": ["langs", "name"], "client": "web",
                "served_by_this_instance": 1,
            }})
        );
    }
    // One request at a time on a reused use: the same instance, its module state carried over.
    let mut served = Vec::new();
    for _ in 0..3 {
        let resp = get(proxy.addr(), "/reused", &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        served.push(resp.json()["summary"]["served_by_this_instance"].clone());
    }
    assert_eq!(served, [json!(1), json!(2), json!(3)]);

    let fails = get(proxy.addr(), "/fails", &[]).await;
    assert_eq!(fails.status, 502, "{}", fails.text());
    assert_eq!(fails.json()["error"]["code"], "plugin_panic");
    assert_eq!(get(proxy.addr(), "/fresh", &[]).await.status, 200);
}
