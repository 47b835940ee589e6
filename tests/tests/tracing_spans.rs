//! What the request path tells a subscriber, recorded by a layer: the spans it opens (one
//! `request` span per request, with its request id and trace id; a `plugin` span per plugin call
//! inside it; an `upstream` span per upstream call, inside the plugin call that made it for a
//! plugin's `send`), and the log line of a failed plugin (where the plugin was). This binary
//! installs its own global subscriber, shared by its tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use bff_proxy_tests::plugins::test_plugins;
use bff_proxy_tests::{Reply, TestProxy, Upstream, get};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as opened: its name, its parent's id, and its fields (recorded later ones included).
#[derive(Debug, Clone)]
struct Seen {
    id: u64,
    name: &'static str,
    parent: Option<u64>,
    fields: BTreeMap<String, String>,
}

/// What the layer saw: spans, and events (their `message` among their fields).
#[derive(Debug, Clone, Default)]
struct Recorded {
    spans: Arc<Mutex<Vec<Seen>>>,
    events: Arc<Mutex<Vec<BTreeMap<String, String>>>>,
}

impl Recorded {
    /// The events logged for the request with `request_id`, in order.
    fn events_for(&self, request_id: &str) -> Vec<BTreeMap<String, String>> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.get("request_id").map(String::as_str) == Some(request_id))
            .cloned()
            .collect()
    }
}

/// The recorder, installed as the global subscriber by the first test that asks.
fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorded = Recorded::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::registry().with(recorded.clone()),
        )
        .expect("the only subscriber of this test binary");
        recorded
    })
}

/// A config with one client `web`, the test plugins, a service per upstream (named like it) and
/// `routes`.
fn config(upstreams: &[&Upstream], routes: &str) -> String {
    let mut services = String::new();
    for up in upstreams {
        services.push_str(&format!(
            "[services.{}]\nurls = [\"{}\"]\n",
            up.name(),
            up.url()
        ));
    }
    format!(
        "[identity]\ndefault_client = \"web\"\n{services}[[clients]]\nname = \"web\"\n[plugins]\ndir = {dir:?}\n{routes}",
        dir = test_plugins().display().to_string()
    )
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorded {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.id().into_u64());
        self.spans.lock().expect("lock").push(Seen {
            id: id.into_u64(),
            name: attrs.metadata().name(),
            parent,
            fields: fields.0,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut spans = self.spans.lock().expect("lock");
        if let Some(s) = spans.iter_mut().rev().find(|s| s.id == id.into_u64()) {
            s.fields.extend(fields.0);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.events.lock().expect("lock").push(fields.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_plugin_and_upstream_spans_nest() {
    let recorded = recorded();

    let up = Upstream::echo("up").await;
    let small = Upstream::builder("small")
        .route("/", Reply::fixed(200, "{}"))
        .start()
        .await;
    let routes = r#"
[[routes]]
id = "fan"
path = "/fan"
egress = ["small"]
chain = [{ plugin = "probe", config = { mode = "fanout", calls = [{ service = "small", path = "/a" }, { service = "small", path = "/b" }] } }]
[[routes]]
id = "plain"
path = "/plain"
service = "up"
"#;
    let proxy = TestProxy::start(&config(&[&up, &small], routes)).await;

    let fan = get(proxy.addr(), "/fan", &[("x-request-id", "fan-1")]).await;
    assert_eq!(fan.status, 200, "{}", fan.text());
    let plain = get(proxy.addr(), "/plain", &[("x-request-id", "plain-1")]).await;
    assert_eq!(plain.status, 200, "{}", plain.text());

    let seen = recorded.spans.lock().expect("lock").clone();
    let request = |id: &str| {
        seen.iter()
            .find(|s| {
                s.name == "request" && s.fields.get("request_id").map(String::as_str) == Some(id)
            })
            .unwrap_or_else(|| panic!("no request span for {id}: {seen:#?}"))
            .clone()
    };
    let children = |parent: u64, name: &str| -> Vec<Seen> {
        seen.iter()
            .filter(|s| s.parent == Some(parent) && s.name == name)
            .cloned()
            .collect()
    };

    // The plugin route: request → plugin (request phase) → two upstream calls (its sends).
    let req = request("fan-1");
    assert_eq!(req.fields["method"], "GET");
    assert_eq!(req.fields["client"], "web");
    assert_eq!(req.fields["route"], "fan");
    assert_eq!(req.fields["trace_id"].len(), 32, "{req:?}");
    let plugins = children(req.id, "plugin");
    assert_eq!(plugins.len(), 1, "{seen:#?}");
    assert_eq!(plugins[0].fields["plugin"], "probe");
    assert_eq!(plugins[0].fields["phase"], "request");
    assert_eq!(plugins[0].fields["version"].len(), 12);
    let sends = children(plugins[0].id, "upstream");
    assert_eq!(sends.len(), 2, "{seen:#?}");
    assert!(
        sends
            .iter()
            .all(|s| s.fields["service"] == "small" && s.fields["caller"] == "plugin")
    );

    // A plain route: request → upstream.
    let req = request("plain-1");
    let calls = children(req.id, "upstream");
    assert_eq!(calls.len(), 1, "{seen:#?}");
    assert_eq!(calls[0].fields["service"], "up");
    assert_eq!(calls[0].fields["caller"], "route");
}

/// A plugin that traps, spins or runs out of memory is logged with where it was: the
/// innermost functions of its Wasm backtrace, by name (the test plugins keep their `name`
/// section), past the Rust runtime's abort path. The client's answer names none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_failures_are_logged_with_where_the_plugin_was() {
    let recorded = recorded();
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "trap"
path = "/trap"
service = "up"
chain = [{ plugin = "probe", config = { mode = "trap" } }]
[[routes]]
id = "spin"
path = "/spin"
service = "up"
chain = [{ plugin = "probe", config = { mode = "spin" } }]
[[routes]]
id = "membomb"
path = "/membomb"
service = "up"
chain = [{ plugin = "probe", config = { mode = "membomb" }, limits = { cpu_budget = "10s" } }]
[[routes]]
id = "skipped"
path = "/skipped"
service = "up"
chain = [{ plugin = "probe", on_error = "fail-open", config = { mode = "trap" } }]
"#;
    let proxy = TestProxy::start(&config(&[&up], routes)).await;

    // (path, status, the failure's log line, what its error must say)
    let cases = [
        (
            "/trap",
            502,
            "plugin chain failed",
            "trapped: wasm trap: wasm `unreachable` instruction executed at abort <- … <- <probe::Probe as probe::exports::bff::plugin::hooks::Guest>::on_request <- ",
        ),
        (
            "/spin",
            502,
            "plugin chain failed",
            "used up its CPU budget at probe::spin <- <probe::Probe as probe::exports::bff::plugin::hooks::Guest>::on_request <- ",
        ),
        (
            "/membomb",
            502,
            "plugin chain failed",
            "went over its memory limit at abort <- … <- probe::eat_memory <- ",
        ),
        (
            "/skipped",
            200,
            "plugin failed; skipped (fail-open)",
            "trapped: wasm trap: wasm `unreachable` instruction executed at abort <- … <- <probe::Probe",
        ),
    ];
    for (path, status, line, says) in cases {
        let id = format!("fail{}", path.replace('/', "-"));
        let resp = get(proxy.addr(), path, &[("x-request-id", &id)]).await;
        assert_eq!(resp.status, status, "{path}: {}", resp.text());
        assert!(!resp.text().contains("probe::"), "{path}: {}", resp.text());
        let events = recorded.events_for(&id);
        let event = events
            .iter()
            .find(|e| e.get("message").map(String::as_str) == Some(line))
            .unwrap_or_else(|| panic!("{path}: no `{line}` event for {id}: {events:#?}"));
        assert!(event["error"].contains(says), "{path}: {event:#?}");
    }
}

/// What a plugin logs (`log`) and prints (stdout, stderr) reaches the proxy's log as events
/// tagged with the plugin and the request id, the text in its own field (never in place of the
/// event's constant message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_logs_and_output_reach_the_proxy_log() {
    let recorded = recorded();
    let up = Upstream::echo("up").await;
    let routes = r#"
[[routes]]
id = "talk"
path = "/talk"
service = "up"
chain = [{ plugin = "probe", config = { mode = "log" } }]
"#;
    let proxy = TestProxy::start(&config(&[&up], routes)).await;
    let resp = get(proxy.addr(), "/talk", &[("x-request-id", "talk-1")]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let ours: Vec<BTreeMap<String, String>> = recorded
        .events_for("talk-1")
        .into_iter()
        .filter(|e| e.get("plugin").map(String::as_str) == Some("probe"))
        .collect();
    let has = |message: &str, key: &str, value: &str| {
        ours.iter().any(|e| {
            e.get("message").map(String::as_str) == Some(message)
                && e.get(key).map(String::as_str) == Some(value)
        })
    };
    assert!(has("plugin log", "text", "probe says hello"), "{ours:#?}");
    assert!(
        has("plugin output", "line", "probe stdout line")
            && ours
                .iter()
                .any(|e| e.get("stream").map(String::as_str) == Some("stdout")),
        "{ours:#?}"
    );
    assert!(
        has("plugin output", "line", "probe stderr line"),
        "{ours:#?}"
    );
}
