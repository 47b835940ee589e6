//! The spans the request path opens, recorded by a subscriber layer: one `request` span per
//! request (with its request id and trace id), a `plugin` span per plugin call inside it, and an
//! `upstream` span per upstream call, inside the plugin call that made it for a plugin's
//! `send`. This binary installs its own global subscriber, so it holds this one test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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

#[derive(Debug, Clone, Default)]
struct Spans(Arc<Mutex<Vec<Seen>>>);

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

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .map(|p| p.id().into_u64());
        self.0.lock().expect("lock").push(Seen {
            id: id.into_u64(),
            name: attrs.metadata().name(),
            parent,
            fields: fields.0,
        });
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut spans = self.0.lock().expect("lock");
        if let Some(s) = spans.iter_mut().rev().find(|s| s.id == id.into_u64()) {
            s.fields.extend(fields.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_plugin_and_upstream_spans_nest() {
    let spans = Spans::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .expect("the only subscriber of this test binary");

    let up = Upstream::echo("up").await;
    let small = Upstream::builder("small")
        .route("/", Reply::fixed(200, "{}"))
        .start()
        .await;
    let proxy = TestProxy::start(&format!(
        r#"
[identity]
default_client = "web"
[services.up]
urls = ["{up}"]
[services.small]
urls = ["{small}"]
[[clients]]
name = "web"
[plugins]
dir = {dir:?}
[[routes]]
id = "fan"
path = "/fan"
egress = ["small"]
chain = [{{ plugin = "probe", config = {{ mode = "fanout", calls = [{{ service = "small", path = "/a" }}, {{ service = "small", path = "/b" }}] }} }}]
[[routes]]
id = "plain"
path = "/plain"
service = "up"
"#,
        up = up.url(),
        small = small.url(),
        dir = test_plugins().display().to_string()
    ))
    .await;

    let fan = get(proxy.addr(), "/fan", &[("x-request-id", "fan-1")]).await;
    assert_eq!(fan.status, 200, "{}", fan.text());
    let plain = get(proxy.addr(), "/plain", &[("x-request-id", "plain-1")]).await;
    assert_eq!(plain.status, 200, "{}", plain.text());

    let seen = spans.0.lock().expect("lock").clone();
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
