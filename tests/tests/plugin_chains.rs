//! Plugin chains end to end, with the test plugins built from source (`tests/plugins/`): chain
//! order and the onion response phase, answering without the upstream, fan-out with the egress
//! allow-list, hostile plugins (CPU, memory, panic, errors, invalid output, start code that spins
//! or sleeps) failing one request cleanly while others keep working, fail-open, and load-time
//! refusals.

use bff_proxy_tests::plugins::test_plugins;
use std::time::Duration;

use bff_proxy_tests::{Gate, Reply, TestProxy, Upstream, get, request};
use http_body_util::BodyExt;

/// A config with the test plugins' dir, one service `up` and the given routes.
fn config(upstream: &str, routes: &str) -> String {
    config_with(upstream, routes, "")
}

/// [`config`] with more `[plugins]` keys.
fn config_with(upstream: &str, routes: &str, plugins: &str) -> String {
    format!(
        r#"
[identity]
default_client = "web"

[services.up]
urls = ["{upstream}"]

[[clients]]
name = "web"
attributes = {{ tier = "gold" }}
identify = [{{ header = "x-client", equals = "web" }}]

[plugins]
dir = {dir:?}
{plugins}

[[routes]]
id = "good"
path = "/good"
service = "up"
chain = [{{ plugin = "probe", config = {{ name = "g" }} }}]
{routes}
"#,
        dir = test_plugins().display().to_string()
    )
}

#[tokio::test]
async fn request_phase_in_order_response_phase_reversed() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "two"
path = "/two"
service = "up"
chain = [{ plugin = "probe", config = { name = "a" } }, { plugin = "probe", config = { name = "b" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let resp = get(proxy.addr(), "/two", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-probe-response-order"), Some("b,a"));
    let echo = resp.echo();
    assert_eq!(echo.header("x-probe-order"), Some("a,b"));
    assert_eq!(echo.header("x-probe-a"), Some("seen"));
    assert_eq!(echo.header("x-bff-client"), Some("web"));
}

/// The sum of `bff_plugin_invocations_total` samples (all versions) of `plugin` in `phase` with
/// `outcome`.
async fn invocations(proxy: &TestProxy, plugin: &str, phase: &str, outcome: &str) -> f64 {
    let prefix = format!(
        r#"bff_plugin_invocations_total{{outcome="{outcome}",phase="{phase}",plugin="{plugin}","#
    );
    proxy
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The probe plugin's successful calls in `phase`.
async fn probe_calls(proxy: &TestProxy, phase: &str) -> f64 {
    invocations(proxy, "probe", phase, "ok").await
}

#[tokio::test]
async fn response_only_plugins_skip_the_request_phase() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "ro"
path = "/ro"
service = "up"
chain = [{ plugin = "probe", config = { name = "a", handles_request = false } }, { plugin = "probe", config = { name = "b" } }, { plugin = "probe", config = { name = "c", handles_request = false } }]

[[routes]]
id = "ro-answer"
path = "/ro-answer"
chain = [{ plugin = "probe", config = { name = "a", handles_request = false } }, { plugin = "probe", config = { mode = "respond" } }, { plugin = "probe", config = { name = "never", handles_request = false } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    for _ in 0..3 {
        let resp = get(proxy.addr(), "/ro", &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let echo = resp.echo();
        assert_eq!(
            echo.header("x-probe-order"),
            Some("b"),
            "only b handles requests"
        );
        assert_eq!(echo.header("x-probe-a"), None);
        // Every step still runs in the response phase, in reverse order.
        assert_eq!(resp.header("x-probe-response-order"), Some("c,b,a"));
    }
    assert_eq!(probe_calls(&proxy, "request").await, 3.0);
    assert_eq!(probe_calls(&proxy, "response").await, 9.0);

    // A plugin that answers ends the chain; response-only steps before it still run.
    let resp = get(proxy.addr(), "/ro-answer", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-probe-response-order"), Some("a"));
    assert_eq!(
        up.received().len(),
        3,
        "the answered request never reached the upstream"
    );
}

#[tokio::test]
async fn a_plugin_can_answer_with_context_and_shared_values() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "answer"
path = "/answer/{id}"
chain = [{ plugin = "probe", config = { name = "a" } }, { plugin = "probe", config = { mode = "respond" } }, { plugin = "probe", config = { name = "never" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let resp = get(proxy.addr(), "/answer/42", &[("x-request-id", "req-7")]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["client"], "web");
    assert_eq!(body["route"], "answer");
    assert_eq!(body["params"], serde_json::json!([["id", "42"]]));
    assert_eq!(body["attributes"], serde_json::json!([["tier", "gold"]]));
    assert_eq!(body["request_id"], "req-7");
    assert_eq!(body["trail"], "a");
    // The response phase ran for the plugin before the responder only.
    assert_eq!(resp.header("x-probe-response-order"), Some("a"));
    assert!(up.received().is_empty(), "the upstream must not be called");
}

#[tokio::test]
async fn instances_are_fresh_per_request() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "answer"
path = "/answer"
chain = [{ plugin = "probe", config = { name = "a" } }, { plugin = "probe", config = { mode = "respond" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    for _ in 0..20 {
        let resp = get(proxy.addr(), "/answer", &[]).await;
        assert_eq!(resp.json()["trail"], "a", "state leaked between requests");
    }
}

/// A plugin's `send`s share the service's response cache with the routes: two calls to a
/// cacheable resource in one fan-out, and the same call in the next request, reach the service
/// once; the plugin sees the stored copy with its `cache-status`.
#[tokio::test]
async fn plugin_sends_share_the_service_cache() {
    let catalog = Upstream::builder("catalog")
        .route(
            "/products",
            Reply::fixed(200, r#"{"products":[1,2]}"#).header("cache-control", "max-age=60"),
        )
        .start()
        .await;
    let routes = format!(
        r#"
[services.catalog]
urls = ["{catalog}"]
cache = {{}}

[[routes]]
id = "home"
path = "/home"
egress = ["catalog"]
chain = [{{ plugin = "probe", config = {{ mode = "fanout", calls = [{{ service = "catalog", path = "/products" }}, {{ service = "catalog", path = "/products" }}] }} }}]
"#,
        catalog = catalog.url()
    );
    let up = Upstream::echo("up").await;
    let proxy = TestProxy::start(&config(&up.url(), &routes)).await;
    for _ in 0..2 {
        let resp = get(proxy.addr(), "/home", &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let results = &resp.json()["results"];
        for r in results.as_array().expect("results") {
            assert_eq!(
                r["body"]["products"],
                serde_json::json!([1, 2]),
                "{results}"
            );
        }
    }
    assert_eq!(catalog.received().len(), 1, "one fetch for four sends");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(r#"bff_upstream_cache_total{result="collapsed",service="catalog"} 1"#)
            || metrics.contains(r#"bff_upstream_cache_total{result="hit",service="catalog"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn fan_out_respects_the_egress_list() {
    let up = Upstream::echo("up").await;
    let other = Upstream::echo("other").await;
    let routes = format!(
        r#"
[services.other]
urls = ["{other}"]

[[routes]]
id = "fan"
path = "/fan"
egress = ["up"]
chain = [{{ plugin = "probe", config = {{ mode = "fanout", calls = [{{ service = "up", path = "/one" }}, {{ service = "other", path = "/two" }}] }} }}]
"#,
        other = other.url()
    );
    let proxy = TestProxy::start(&config(&up.url(), &routes)).await;
    let resp = get(proxy.addr(), "/fan", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let results = &resp.json()["results"];
    assert_eq!(results[0]["status"], 200, "{results}");
    assert_eq!(results[1]["error"], "errorkind::forbidden", "{results}");
    assert_eq!(up.received().len(), 1);
    assert!(
        other.received().is_empty(),
        "a forbidden send must never reach the service"
    );
}

/// Each hostile mode fails only its own request, with its own code; the good route keeps working.
/// Each hostile mode fails its request with its own code while `/good` keeps serving; returns
/// the tier `probe` was on before and after all had run.
async fn hostile_plugins_fail_cleanly(plugins: &str) -> (String, String) {
    let up = Upstream::echo("up").await;
    let cases = [
        ("spin", "plugin_cpu_limit", 502),
        ("membomb", "plugin_memory_limit", 502),
        ("panic", "plugin_panic", 502),
        ("trap", "plugin_trap", 502),
        ("error", "plugin_error", 502),
        ("bad-header", "plugin_invalid_output", 502),
        ("bad-status", "plugin_invalid_output", 502),
    ];
    let mut routes = String::new();
    for (mode, _, _) in cases {
        // The CPU budget is metered in time polled, which a loaded CI machine stretches: give the
        // memory bomb room so it always meets its memory cap first.
        let limits = if mode == "membomb" {
            ", limits = { cpu_budget = \"10s\" }"
        } else {
            ""
        };
        routes.push_str(&format!(
            "[[routes]]\nid = \"{mode}\"\npath = \"/{mode}\"\nservice = \"up\"\nchain = [{{ plugin = \"probe\", config = {{ mode = \"{mode}\" }}{limits} }}]\n"
        ));
    }
    let proxy = TestProxy::start(&config_with(&up.url(), &routes, plugins)).await;
    let tier = || async {
        proxy.admin_json("/admin/plugins").await["plugins"][0]["tier"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let before = tier().await;
    assert_eq!(
        proxy.admin_json("/admin/plugins").await["plugins"][0]["last_failure"],
        serde_json::Value::Null
    );
    for (mode, code, status) in cases {
        // `get` is bounded: a plugin that hung the request would fail the test there.
        let resp = get(proxy.addr(), &format!("/{mode}"), &[]).await;
        assert_eq!(resp.status, status, "{mode}: {}", resp.text());
        let err = &resp.json()["error"];
        assert_eq!(err["code"], code, "{mode}");
        assert!(
            err["message"]
                .as_str()
                .unwrap_or_default()
                .contains("`probe`"),
            "{mode}: {err}"
        );
        let good = get(proxy.addr(), "/good", &[]).await;
        assert_eq!(good.status, 200, "after {mode}: {}", good.text());
        // The admin API shows the plugin's last failure: this one.
        let last = &proxy.admin_json("/admin/plugins").await["plugins"][0]["last_failure"];
        assert_eq!(last["route"], mode, "{last}");
        assert_eq!(last["phase"], "request", "{last}");
        assert_eq!(
            last["request_id"].as_str(),
            resp.header("x-request-id"),
            "{last}"
        );
        assert_eq!(last["skipped"], false, "{last}");
        if mode == "spin" {
            assert_eq!(last["outcome"], "cpu_limit", "{last}");
            let message = last["message"].as_str().unwrap_or_default();
            assert!(message.contains("at probe::spin <- "), "{last}");
        }
    }
    // A call whose output the proxy refuses counts as such, not as a call that went well.
    assert_eq!(
        invocations(&proxy, "probe", "request", "invalid_output").await,
        2.0
    );
    (before, tier().await)
}

#[tokio::test]
async fn hostile_plugins_fail_cleanly_on_optimized_code() {
    let tiers = hostile_plugins_fail_cleanly("tiered_compilation = false").await;
    assert_eq!(tiers, ("optimized".into(), "optimized".into()));
}

/// Winch's code must enforce the same limits: without the compile cache, tiered compilation
/// serves a fresh proxy's plugins on baseline code until Cranelift's code is ready.
#[tokio::test]
async fn hostile_plugins_fail_cleanly_on_baseline_code() {
    let (before, after) = hostile_plugins_fail_cleanly("compile_cache = false").await;
    // Cranelift compiles in the background, several times slower than Winch: the proxy is
    // ready well before. By the last case it may have finished (then the later cases ran on
    // optimized code).
    assert_eq!(before, "baseline");
    eprintln!("hostile cases started on baseline code; probe was on {after} code at the end");
}

#[tokio::test]
async fn fail_open_skips_the_plugin() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "open"
path = "/open"
service = "up"
chain = [{ plugin = "probe", on_error = "fail-open", config = { mode = "spin" } }, { plugin = "probe", config = { name = "after" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let resp = get(proxy.addr(), "/open", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.echo().header("x-probe-after"), Some("seen"));
    let last = &proxy.admin_json("/admin/plugins").await["plugins"][0]["last_failure"];
    assert_eq!(last["outcome"], "cpu_limit", "{last}");
    assert_eq!(last["skipped"], true, "{last}");
    assert_eq!(last["route"], "open", "{last}");
}

/// A plugin may send the request to another path of the route's service: the path it returns is
/// normalized like a client's, and one a client could not send (encoded separators, not
/// starting with `/`) is invalid output.
#[tokio::test]
async fn a_plugin_can_rewrite_the_upstream_path_within_the_rules() {
    let up = Upstream::echo("up").await;
    let mut routes = String::new();
    let cases = [
        ("plain", "/other/path?x=1", Some("/other/path?x=1")),
        ("dots", "/a/./b/../c", Some("/a/c")),
        ("encoded-slash", "/a%2Fb", None),
        ("relative", "no-slash", None),
        ("nul", "/a%00b", None),
    ];
    for (id, uri, _) in cases {
        routes.push_str(&format!(
            "[[routes]]\nid = \"{id}\"\npath = \"/{id}\"\nservice = \"up\"\n\
             chain = [{{ plugin = \"probe\", config = {{ mode = \"rewrite-uri\", uri = \"{uri}\" }} }}]\n"
        ));
    }
    let proxy = TestProxy::start(&config(&up.url(), &routes)).await;
    for (id, uri, upstream_saw) in cases {
        let resp = get(proxy.addr(), &format!("/{id}"), &[]).await;
        match upstream_saw {
            Some(path) => {
                assert_eq!(resp.status, 200, "{uri}: {}", resp.text());
                assert_eq!(resp.echo().uri, path, "{uri}");
            }
            None => {
                assert_eq!(resp.status, 502, "{uri}: {}", resp.text());
                assert_eq!(
                    resp.json()["error"]["code"],
                    "plugin_invalid_output",
                    "{uri}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_plugin_cannot_claim_another_client() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "spoof"
path = "/spoof"
service = "up"
chain = [{ plugin = "probe", config = { mode = "spoof-client" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let resp = get(proxy.addr(), "/spoof", &[]).await;
    assert_eq!(resp.echo().header_all("x-bff-client"), ["web"]);
}

#[tokio::test]
async fn chain_without_service_that_only_forwards_is_a_502() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "nowhere"
path = "/nowhere"
chain = [{ plugin = "probe", config = { name = "a" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let resp = get(proxy.addr(), "/nowhere", &[]).await;
    assert_eq!(resp.status, 502);
    assert_eq!(resp.json()["error"]["code"], "plugin_no_response");
}

/// `bff_plugin_memory_used_ratio` records, once per request per instance, how close the
/// instance's linear memory came to its limit: a plugin that ran into it is at the top.
#[tokio::test]
async fn memory_use_is_observed_against_the_limit() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "membomb"
path = "/membomb"
service = "up"
chain = [{ plugin = "probe", config = { mode = "membomb" }, limits = { cpu_budget = "10s" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let series = |suffix: &str| format!("bff_plugin_memory_used_ratio_{suffix}{{plugin=\"probe\"");
    let sample = async |name: String| -> f64 {
        let metrics = proxy.metrics().await;
        metrics
            .lines()
            .find(|l| l.starts_with(&name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    // `/good`: one probe instance serves both phases, far below its 32 MiB.
    assert_eq!(get(proxy.addr(), "/good", &[]).await.status, 200);
    assert_eq!(sample(series("count")).await, 1.0);
    assert_eq!(
        sample(format!("{},le=\"0.25\"}}", series("bucket"))).await,
        1.0
    );
    let small = sample(series("sum")).await;
    assert!(small > 0.0 && small < 0.25, "{small}");
    // The memory bomb grows its memory until the limit refuses: above 90 %.
    assert_eq!(get(proxy.addr(), "/membomb", &[]).await.status, 502);
    assert_eq!(sample(series("count")).await, 2.0);
    assert_eq!(
        sample(format!("{},le=\"0.9\"}}", series("bucket"))).await,
        1.0
    );
}

/// An answer is checked as the output of the plugin that gave it: an invalid one names that
/// plugin, and follows that use's `on_error` (fail-open: skipped, the upstream answers).
#[tokio::test]
async fn an_invalid_answer_is_the_answering_plugins_failure() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "answers"
path = "/answers"
service = "up"
chain = [{ plugin = "slow_start", config = { start = "none" } }, { plugin = "probe", config = { mode = "bad-status" } }]

[[routes]]
id = "skipped"
path = "/skipped"
service = "up"
chain = [{ plugin = "slow_start", config = { start = "none" } }, { plugin = "probe", on_error = "fail-open", config = { mode = "bad-status" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let resp = get(proxy.addr(), "/answers", &[]).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let err = &resp.json()["error"];
    assert_eq!(err["code"], "plugin_invalid_output");
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("`probe`"),
        "{err}"
    );
    let skipped = get(proxy.addr(), "/skipped", &[]).await;
    assert_eq!(skipped.status, 200, "{}", skipped.text());
    assert_eq!(skipped.echo().uri, "/skipped");
}

/// Problems found while loading plugins, as `bff-proxy check` and startup report them.
async fn load_problems(routes: &str) -> String {
    load_problems_with(routes, "").await
}

/// [`load_problems`] with more `[plugins]` keys.
async fn load_problems_with(routes: &str, plugins: &str) -> String {
    let text = config_with("http://127.0.0.1:1", routes, plugins);
    let cfg = bff_proxy::Config::from_toml(&text, "test").expect("valid config");
    match bff_proxy::check_plugins(&cfg).await {
        Ok(n) => panic!("expected a load failure, {n} uses loaded"),
        Err(e) => bff_proxy::ErrorChain(&e).to_string(),
    }
}

#[tokio::test]
async fn bad_plugins_fail_the_load_with_clear_reasons() {
    let missing =
        load_problems("[[routes]]\nid = \"m\"\npath = \"/m\"\nchain = [{ plugin = \"nosuch\" }]\n")
            .await;
    assert!(missing.contains("nosuch.wasm"), "{missing}");

    let old = load_problems(
        "[[routes]]\nid = \"o\"\npath = \"/o\"\nchain = [{ plugin = \"old_contract\" }]\n",
    )
    .await;
    assert!(
        old.contains("built against plugin contract bff:plugin@0.1.0")
            && old.contains("this proxy implements bff:plugin@0.2.0"),
        "{old}"
    );

    let idle = load_problems(
        "[[routes]]\nid = \"i\"\npath = \"/i\"\nchain = [{ plugin = \"probe\", config = { handles_request = false, handles_response = false } }]\n",
    )
    .await;
    assert!(idle.contains("routes[1].chain[0]"), "{idle}");
    assert!(idle.contains("would never be called"), "{idle}");

    let rejected = load_problems(
        "[[routes]]\nid = \"r\"\npath = \"/r\"\nchain = [{ plugin = \"probe\", config = { mode = \"reject-config\" } }]\n",
    )
    .await;
    assert!(rejected.contains("routes[1].chain[0]"), "{rejected}");
    assert!(rejected.contains("rejects every config"), "{rejected}");

    let spinning = load_problems(
        "[[routes]]\nid = \"s\"\npath = \"/s\"\nchain = [{ plugin = \"probe\", config = { mode = \"spin-init\" } }]\n",
    )
    .await;
    assert!(spinning.contains("CPU budget"), "{spinning}");
    // The failure names where the plugin was: its spinning function, from its `name` section.
    assert!(
        spinning.contains("CPU budget at probe::spin <- "),
        "{spinning}"
    );

    // A plugin whose file is not the pinned build does not load.
    let unpinned = load_problems_with(
        "",
        &format!("sha256 = {{ probe = \"{}\" }}", "0".repeat(64)),
    )
    .await;
    assert!(
        unpinned.contains("plugin `probe`") && unpinned.contains("`plugins.sha256.probe` pins"),
        "{unpinned}"
    );
}

/// A component runs code while it is instantiated (its start function), before any hook: the
/// proxy bounds that as it bounds a hook call, by the CPU budget and the call timeout.
#[tokio::test]
async fn code_that_runs_at_instantiation_is_bounded_like_a_hook() {
    // One chain step on its own route; the load must end, whatever the step does.
    let problems = async |step: &str| {
        let routes = format!("[[routes]]\nid = \"s\"\npath = \"/s\"\nchain = [{step}]\n");
        tokio::time::timeout(Duration::from_secs(60), load_problems(&routes))
            .await
            .expect("start code does not hang the load")
    };
    let spin = problems(r#"{ plugin = "slow_start", config = { start = "spin" } }"#).await;
    assert!(spin.contains("routes[1].chain[0]"), "{spin}");
    assert!(
        spin.contains("its instantiation used up its CPU budget"),
        "{spin}"
    );
    let sleep = problems(
        r#"{ plugin = "slow_start", config = { start = "sleep" }, limits = { call_timeout = "300ms" } }"#,
    )
    .await;
    assert!(sleep.contains("routes[1].chain[0]"), "{sleep}");
    assert!(
        sleep.contains("its instantiation did not finish within its call timeout"),
        "{sleep}"
    );

    // A start function that returns is fine, and the plugin serves. One that waits only on
    // requests loads, and each request's instantiation ends at the call timeout (not the
    // chain's, 10 s by default): fail-closed answers 504 `plugin_timeout`, fail-open skips it.
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "quick"
path = "/quick"
service = "up"
chain = [{ plugin = "slow_start", config = { start = "none" } }]

[[routes]]
id = "waits"
path = "/waits"
service = "up"
chain = [{ plugin = "slow_start", config = { start = "sleep-on-request" }, limits = { call_timeout = "200ms" } }]

[[routes]]
id = "skipped"
path = "/skipped"
service = "up"
chain = [{ plugin = "slow_start", on_error = "fail-open", config = { start = "sleep-on-request" }, limits = { call_timeout = "200ms" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    assert_eq!(get(proxy.addr(), "/quick", &[]).await.status, 200);
    let waits = get(proxy.addr(), "/waits", &[]).await;
    assert_eq!(waits.status, 504, "{}", waits.text());
    assert_eq!(waits.json()["error"]["code"], "plugin_timeout");
    assert_eq!(get(proxy.addr(), "/skipped", &[]).await.status, 200);
    assert_eq!(
        invocations(&proxy, "slow_start", "request", "timeout").await,
        2.0
    );
}

/// `instances = "reused"`: one instance serves request after request (what the plugin keeps in
/// its memory carries over, which `probe` counts), in either phase, but never a request's values
/// into the next, and never two requests at once; it is replaced after a failed call and after
/// `max_uses` requests, and at most `max_idle` wait. By default every request gets a fresh
/// instance.
#[tokio::test]
async fn reused_instances_carry_over_only_what_the_plugin_keeps() {
    let gate = Gate::new();
    let up = Upstream::builder("up")
        .route("/held", Reply::Echo.gated(&gate))
        .start()
        .await;
    let routes = r#"
[[routes]]
id = "reused"
path = "/reused"
service = "up"
chain = [{ plugin = "probe", instances = "reused", on_error = "fail-open", config = { name = "a" } }]

[[routes]]
id = "response-only"
path = "/response-only"
service = "up"
chain = [{ plugin = "probe", instances = "reused", config = { name = "o", handles_request = false } }]

[[routes]]
id = "values"
path = "/values"
chain = [{ plugin = "probe", instances = "reused", config = { name = "v" } }, { plugin = "probe", config = { name = "r", mode = "respond" } }]

[[routes]]
id = "held"
path = "/held"
service = "up"
chain = [{ plugin = "probe", instances = "reused", config = { name = "h" } }]
"#;
    let proxy = TestProxy::start(&config_with(
        &up.url(),
        routes,
        "reuse = { max_uses = 3, max_idle = 2 }",
    ))
    .await;
    let counts = async |path: &str, header: &str, n: usize| {
        let mut seen = Vec::new();
        for _ in 0..n {
            let resp = get(proxy.addr(), path, &[]).await;
            assert_eq!(resp.status, 200, "{}", resp.text());
            let value = match resp.header(header) {
                Some(v) => Some(v.to_owned()),
                None => resp.echo().header(header).map(str::to_owned),
            };
            seen.push(value.unwrap_or_else(|| "-".to_owned()));
        }
        seen.join(",")
    };
    let idle = async || proxy.metric("bff_plugin_instances_idle").await;

    // The default: a fresh instance per request.
    assert_eq!(counts("/good", "x-probe-g-served", 3).await, "1,1,1");
    // Reused: counts up to max_uses, then a fresh instance starts again at 1; the same in the
    // response phase of a response-only use.
    assert_eq!(counts("/reused", "x-probe-a-served", 4).await, "1,2,3,1");
    assert_eq!(idle().await, 1.0);
    assert_eq!(
        counts("/response-only", "x-probe-o-answered", 4).await,
        "1,2,3,1"
    );
    assert_eq!(idle().await, 2.0);
    // A failed call (skipped: fail-open) discards its instance.
    let failed = get(proxy.addr(), "/reused", &[("x-probe-fail", "1")]).await;
    assert_eq!(failed.status, 200, "{}", failed.text());
    assert_eq!(failed.echo().header("x-probe-a-served"), None);
    assert_eq!(counts("/reused", "x-probe-a-served", 1).await, "1");
    // Values set by a reused instance belong to its request only.
    for n in 1..=2 {
        let resp = get(proxy.addr(), "/values", &[]).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.json()["trail"], "v", "request {n}");
    }
    assert_eq!(idle().await, 3.0);

    // Concurrent requests each get their own instance (all start at 1), and only max_idle of
    // them wait for the next request.
    let addr = proxy.addr();
    let held: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { get(addr, "/held", &[]).await }))
        .collect();
    up.wait_for_requests(up.received().len() + 4).await;
    gate.open();
    for h in held {
        let resp = h.await.expect("request task");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.echo().header("x-probe-h-served"), Some("1"));
    }
    assert_eq!(idle().await, 5.0);
}

#[tokio::test]
async fn sends_are_capped_per_request_and_a_call_is_waited_on_once() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "flood"
path = "/flood"
egress = ["up"]
chain = [{ plugin = "probe", limits = { max_sends = 3 }, config = { mode = "send-flood", service = "up" } }]

[[routes]]
id = "twice"
path = "/twice"
egress = ["up"]
chain = [{ plugin = "probe", config = { mode = "wait-twice", service = "up" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let flood = get(proxy.addr(), "/flood", &[]).await;
    assert_eq!(flood.status, 200, "{}", flood.text());
    assert_eq!(
        flood.json(),
        serde_json::json!({"sent": 3, "error": "errorkind::limit"})
    );
    // The cap is per request: the next request may send again.
    let again = get(proxy.addr(), "/flood", &[]).await;
    assert_eq!(again.json()["sent"], 3);
    assert!(up.received().len() <= 6, "never more calls than allowed");

    let twice = get(proxy.addr(), "/twice", &[]).await;
    assert_eq!(
        twice.json(),
        serde_json::json!({"first": 200, "second": "errorkind::badinput"})
    );
}

#[tokio::test]
async fn slow_upstream_calls_time_out_without_holding_the_plugin() {
    let up = Upstream::builder("up")
        .route("/slow", Reply::Echo.after(Duration::from_secs(3)))
        .start()
        .await;
    let routes = r#"
[[routes]]
id = "bounded"
path = "/bounded"
egress = ["up"]
chain = [{ plugin = "probe", config = { mode = "fanout", calls = [{ service = "up", path = "/slow", timeout_ms = 100 }, { service = "up", path = "/fast" }] } }]

[[routes]]
id = "unbounded"
path = "/unbounded"
egress = ["up"]
chain = [{ plugin = "probe", limits = { call_timeout = "200ms" }, config = { mode = "fanout", calls = [{ service = "up", path = "/slow" }] } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    // The plugin's own timeout on one call: that call fails, the other succeeds.
    let bounded = get(proxy.addr(), "/bounded", &[]).await;
    assert_eq!(bounded.status, 200, "{}", bounded.text());
    let results = &bounded.json()["results"];
    assert_eq!(results[0]["error"], "errorkind::upstream", "{results}");
    assert_eq!(results[1]["status"], 200, "{results}");
    // No timeout of its own: the use's call_timeout ends the hook, waiting included.
    let unbounded = get(proxy.addr(), "/unbounded", &[]).await;
    assert_eq!(unbounded.status, 504, "{}", unbounded.text());
    assert_eq!(unbounded.json()["error"]["code"], "plugin_timeout");
}

/// `bytes`, gzipped.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("in memory");
    e.finish().expect("in memory")
}

/// A fixed JSON reply, gzipped, with `content-encoding: gzip`.
fn gzipped(json: &str) -> Reply {
    Reply::Fixed {
        status: 200,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-encoding".into(), "gzip".into()),
        ],
        body: gzip(json.as_bytes()).into(),
    }
}

/// A plugin that reads the request body gets it whole, decoded if the client compressed it,
/// and what it forwards is what the upstream gets (without the client's `content-encoding`);
/// a body in a coding the proxy does not decode is `415`, one that does not decode `400`, one
/// over the plugin's limit `413`.
#[tokio::test]
async fn request_bodies_reach_plugins_whole_and_decoded() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "echo"
path = "/echo"
service = "up"
chain = [{ plugin = "probe", limits = { max_body_bytes = 4096 }, config = { mode = "echo-request-body", reads_request_body = true } }]

[[routes]]
id = "upper"
path = "/upper"
service = "up"
chain = [{ plugin = "probe", config = { mode = "upper-request-body", reads_request_body = true } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let post = async |path: &str, headers: &[(&str, &str)], body: Vec<u8>| {
        request(
            proxy.addr(),
            "POST",
            path,
            headers,
            http_body_util::Full::new(bytes::Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .await
    };
    let plain = post("/echo", &[], b"hello plugins".to_vec()).await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(plain.text(), "hello plugins");
    let gz = post(
        "/echo",
        &[("content-encoding", "gzip")],
        gzip(b"hello plugins"),
    )
    .await;
    assert_eq!(gz.status, 200, "{}", gz.text());
    assert_eq!(gz.text(), "hello plugins");

    let br = post("/echo", &[("content-encoding", "compress")], b"xx".to_vec()).await;
    assert_eq!(br.status, 415, "{}", br.text());
    assert_eq!(br.json()["error"]["code"], "unsupported_content_encoding");
    assert_eq!(
        br.header("accept-encoding"),
        Some("gzip, deflate, br, zstd")
    );
    let corrupt = post(
        "/echo",
        &[("content-encoding", "gzip")],
        b"not gzip".to_vec(),
    )
    .await;
    assert_eq!(corrupt.status, 400, "{}", corrupt.text());
    assert_eq!(corrupt.json()["error"]["code"], "invalid_body");
    // 4 KiB limit: a gzip body that inflates past it is refused like a big one.
    let bomb = post(
        "/echo",
        &[("content-encoding", "gzip")],
        gzip(&vec![b'a'; 64 * 1024]),
    )
    .await;
    assert_eq!(bomb.status, 413, "{}", bomb.text());
    assert_eq!(bomb.json()["error"]["code"], "body_too_large");

    // Forwarded: the plugin's body, unencoded, with its own length.
    let upper = post(
        "/upper",
        &[("content-encoding", "gzip"), ("content-type", "text/plain")],
        gzip(b"hello upstream"),
    )
    .await;
    assert_eq!(upper.status, 200, "{}", upper.text());
    let echo = upper.echo();
    assert_eq!(echo.body_len, 14);
    assert_eq!(echo.header("content-encoding"), None);
    assert_eq!(echo.header("content-length"), Some("14"));
}

/// An upstream that encodes a body a plugin reads (though asked for `identity`, or not asked
/// at all for a `send`): the body reaches the plugin decoded (gzip here; every coding is tested
/// in `body/decode.rs`); a coding the proxy does not decode is `plugin_encoded_body`; a body
/// that does not decode is the upstream's failure.
#[tokio::test]
async fn encoded_bodies_reach_plugins_decoded() {
    let up = Upstream::builder("up")
        .route("/gz", gzipped(r#"{"name":"ada"}"#))
        .route(
            "/br",
            Reply::fixed(200, "not really LZW").header("content-encoding", "compress"),
        )
        .route(
            "/corrupt",
            Reply::fixed(200, "not gzip at all").header("content-encoding", "gzip"),
        )
        .start()
        .await;
    let mut routes = String::new();
    for doc in ["gz", "br", "corrupt"] {
        routes.push_str(&format!(
            "[[routes]]\nid = \"{doc}\"\npath = \"/{doc}\"\nservice = \"up\"\n\
             chain = [{{ plugin = \"probe\", config = {{ reads_response_body = true, response_mode = \"upper-body\" }} }}]\n"
        ));
    }
    routes.push_str(
        r#"
[[routes]]
id = "fan"
path = "/fan"
egress = ["up"]
chain = [{ plugin = "probe", config = { mode = "fanout", calls = [{ service = "up", path = "/gz" }, { service = "up", path = "/br" }] } }]
"#,
    );
    let proxy = TestProxy::start(&config(&up.url(), &routes)).await;

    let gz = get(proxy.addr(), "/gz", &[]).await;
    assert_eq!(gz.status, 200, "{}", gz.text());
    assert_eq!(gz.text(), r#"{"NAME":"ADA"}"#);
    assert_eq!(gz.header("content-encoding"), None);
    assert_eq!(gz.header("content-length"), Some("14"));

    let br = get(proxy.addr(), "/br", &[]).await;
    assert_eq!(br.status, 502, "{}", br.text());
    assert_eq!(br.json()["error"]["code"], "plugin_encoded_body");

    let broken = get(proxy.addr(), "/corrupt", &[]).await;
    assert_eq!(broken.status, 502, "{}", broken.text());
    assert_eq!(broken.json()["error"]["code"], "upstream_error");

    // A plugin's `send`: decoded; what cannot be decoded is an error of that call only.
    let fan = get(proxy.addr(), "/fan", &[]).await;
    assert_eq!(fan.status, 200, "{}", fan.text());
    let results = &fan.json()["results"];
    assert_eq!(results[0]["status"], 200, "{results}");
    assert_eq!(results[0]["body"]["name"], "ada", "{results}");
    assert_eq!(results[1]["error"], "errorkind::upstream", "{results}");
    assert!(
        results[1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("encoded as `compress`"),
        "{results}"
    );
}

#[tokio::test]
async fn response_phase_rewrites_bodies_and_fails_cleanly() {
    let up = Upstream::builder("up")
        .route(
            "/doc",
            Reply::fixed(200, r#"{"name":"ada"}"#).header("content-type", "application/json"),
        )
        .start()
        .await;
    let cases = [
        ("spin", 502, "plugin_cpu_limit"),
        ("panic", 502, "plugin_panic"),
        ("error", 502, "plugin_error"),
        ("bad-header", 502, "plugin_invalid_output"),
    ];
    let mut routes = String::from(
        r#"
[[routes]]
id = "upper"
path = "/upper"
service = "up"
rewrite = "/doc"
chain = [{ plugin = "probe", config = { reads_response_body = true, response_mode = "upper-body" } }]

[[routes]]
id = "status"
path = "/status"
service = "up"
rewrite = "/doc"
chain = [{ plugin = "probe", config = { handles_response = true, response_mode = "set-status", status = 1000 } }]
"#,
    );
    for (mode, _, _) in cases {
        routes.push_str(&format!(
            "[[routes]]\nid = \"r-{mode}\"\npath = \"/r-{mode}\"\nservice = \"up\"\nrewrite = \"/doc\"\n\
             chain = [{{ plugin = \"probe\", config = {{ handles_response = true, response_mode = \"{mode}\" }} }}]\n"
        ));
    }
    let proxy = TestProxy::start(&config(&up.url(), &routes)).await;

    let upper = get(proxy.addr(), "/upper", &[("accept-encoding", "gzip")]).await;
    assert_eq!(upper.status, 200, "{}", upper.text());
    assert_eq!(upper.text(), r#"{"NAME":"ADA"}"#);
    assert_eq!(upper.header("content-length"), Some("14"));
    // The plugin reads the body, so the upstream was asked for it unencoded.
    let asked = up.received().pop().expect("upstream called");
    assert_eq!(
        asked
            .headers
            .get("accept-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("identity")
    );

    let status = get(proxy.addr(), "/status", &[]).await;
    assert_eq!(status.status, 502);
    assert_eq!(status.json()["error"]["code"], "plugin_invalid_output");
    for (mode, code, name) in cases {
        let resp = get(proxy.addr(), &format!("/r-{mode}"), &[]).await;
        assert_eq!(resp.status, code, "{mode}: {}", resp.text());
        assert_eq!(resp.json()["error"]["code"], name, "{mode}");
        let good = get(proxy.addr(), "/good", &[]).await;
        assert_eq!(good.status, 200, "after {mode}");
    }
}

/// Many requests at once through a chain, one of them hostile each time: every instance is its
/// own, the pool never runs dry, and the good ones all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_through_chains() {
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "spin"
path = "/spin"
service = "up"
chain = [{ plugin = "probe", config = { mode = "spin" } }]
"#;
    let proxy = TestProxy::start(&config(&up.url(), routes)).await;
    let addr = proxy.addr();
    let mut tasks = Vec::new();
    for i in 0..50 {
        tasks.push(tokio::spawn(async move {
            let path = if i % 10 == 0 { "/spin" } else { "/good" };
            (path, get(addr, path, &[]).await)
        }));
    }
    let mut good = 0;
    for t in tasks {
        let (path, resp) = t.await.expect("request task");
        if path == "/good" {
            assert_eq!(resp.status, 200, "{}", resp.text());
            assert_eq!(resp.echo().header("x-probe-g"), Some("seen"));
            good += 1;
        } else {
            assert_eq!(resp.json()["error"]["code"], "plugin_cpu_limit");
        }
    }
    assert_eq!(good, 45);
}
