//! The Grafana dashboard (`dashboards/bff-proxy.json`) against the real proxy: the file is a
//! well-formed dashboard, and every metric its queries name is one the proxy exports, with the
//! right type. The proxy runs a plain route and a plugin chain, and traffic makes the labelled
//! series appear (the registry leaves a labelled family out of `/metrics` until it has a series):
//! a 404, a plugin that traps, a fail-open step, a refused send and a plugin file refused at load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use bff_proxy_tests::plugins::test_plugins;
use bff_proxy_tests::{TestProxy, Upstream, body, get, request};

/// Grafana's own variables that may appear in a query.
const GRAFANA_BUILTINS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// The suffixes Prometheus adds to a histogram's name.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

/// How long the refused plugin file may take to show in the metrics.
const LOAD_ERROR_WITHIN: Duration = Duration::from_secs(20);

fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("dashboards")
        .join("bff-proxy.json")
}

fn load_dashboard() -> Value {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, rows' nested (collapsed) panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
        for p in panels {
            out.push(p);
            if let Some(nested) = p.get("panels").and_then(Value::as_array) {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"]
            .as_array()
            .expect("`panels` is an array"),
        &mut out,
    );
    out
}

/// A templating variable's query text: a string, or an object with a `query` string.
fn variable_query(var: &Value) -> Option<&str> {
    match &var["query"] {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("query").and_then(Value::as_str),
        _ => None,
    }
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Every identifier `bff_[a-z0-9_]+` in a PromQL expression (whole identifiers only).
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_ident = i == 0 || !is_ident_byte(bytes[i - 1]);
        if starts_ident && bytes[i..].starts_with(b"bff_") {
            let mut end = i + 4;
            while end < bytes.len()
                && (bytes[end].is_ascii_lowercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            if end > i + 4 {
                out.push(expr[i..end].to_owned());
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Every variable (`$name` or `${name}` / `${name:format}`) referenced in a string.
fn variables_used(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let braced = bytes.get(i + 1) == Some(&b'{');
        let start = if braced { i + 2 } else { i + 1 };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if end > start {
            out.push(text[start..end].to_owned());
        }
        i = end.max(i + 1);
    }
    out
}

/// `name -> type` from the `# TYPE name type` lines of a Prometheus text exposition.
fn exported_types(metrics: &str) -> BTreeMap<String, String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| {
            let mut parts = rest.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// What the dashboard queries: each metric name with where it is used (panel titles).
#[derive(Debug, Default)]
struct Uses(BTreeMap<String, BTreeSet<String>>);

impl Uses {
    fn add(&mut self, expr: &str, place: &str) {
        for name in metric_names(expr) {
            self.0.entry(name).or_default().insert(place.to_owned());
        }
    }
}

/// Checks the dashboard's structure (panicking with every problem at once) and returns the
/// metric names its queries use.
fn check_structure(dashboard: &Value) -> Uses {
    let mut problems: Vec<String> = Vec::new();
    for key in ["title", "uid"] {
        if dashboard[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("top-level `{key}` is not a non-empty string"));
        }
    }
    if dashboard["uid"] != "bff-proxy" {
        problems.push(format!(
            "uid is {}, expected the stable \"bff-proxy\"",
            dashboard["uid"]
        ));
    }
    if !dashboard["schemaVersion"].is_number() {
        problems.push("top-level `schemaVersion` is not a number".into());
    }
    if !dashboard["panels"].is_array() {
        panic!("top-level `panels` is not an array");
    }

    // Templating: the variables, and the metrics their queries use.
    let mut uses = Uses::default();
    let mut variables: BTreeSet<String> = BTreeSet::new();
    let vars = dashboard["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for var in vars {
        let name = var["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            problems.push(format!("a templating variable has no name: {var}"));
            continue;
        }
        if !variables.insert(name.to_owned()) {
            problems.push(format!("templating variable `{name}` is defined twice"));
        }
        for query in [variable_query(var), var["definition"].as_str()]
            .into_iter()
            .flatten()
        {
            uses.add(query, &format!("variable `{name}`"));
        }
    }
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    match var("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        other => problems.push(format!(
            "expected a `datasource` variable of type `datasource` with query `prometheus`, got {other:?}"
        )),
    }
    for (name, query) in [
        ("client", "label_values(bff_requests_total, client)"),
        (
            "plugin",
            "label_values(bff_plugin_invocations_total, plugin)",
        ),
    ] {
        match var(name) {
            Some(v) if v["type"] == "query" && variable_query(v) == Some(query) => {
                if v["multi"] != true || v["includeAll"] != true {
                    problems.push(format!("variable `{name}` should be multi with includeAll"));
                }
            }
            other => problems.push(format!(
                "expected a query variable `{name}` with `{query}`, got {other:?}"
            )),
        }
    }

    // Panels.
    let panels = all_panels(dashboard);
    let mut ids: BTreeSet<i64> = BTreeSet::new();
    let mut rows = Vec::new();
    // Grid cells taken by non-row panels, to find overlaps: (x, y) -> panel title.
    let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("<untitled>").to_owned();
        match panel["id"].as_i64() {
            Some(id) if !ids.insert(id) => problems.push(format!("panel id {id} is not unique")),
            Some(_) => {}
            None => problems.push(format!("panel `{title}` has no numeric `id`")),
        }
        let Some(kind) = panel["type"].as_str().filter(|t| !t.is_empty()) else {
            problems.push(format!("panel `{title}` has no `type`"));
            continue;
        };
        let pos = &panel["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| pos[k].as_i64());
        let (Some(h), Some(w), Some(x), Some(y)) = (h, w, x, y) else {
            problems.push(format!(
                "panel `{title}`: gridPos needs numeric h, w, x, y: {pos}"
            ));
            continue;
        };
        if h <= 0 || w <= 0 || x < 0 || y < 0 || x + w > 24 {
            problems.push(format!(
                "panel `{title}`: gridPos {pos} is outside the 24-column grid"
            ));
        }
        if kind == "row" {
            rows.push(title.clone());
            if panel
                .get("targets")
                .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
            {
                problems.push(format!("row `{title}` has targets"));
            }
            continue;
        }
        // A row is the only kind of panel that may exist without queries.
        if panel.get("collapsed").is_some() {
            problems.push(format!(
                "panel `{title}` has `collapsed` but is not of type \"row\""
            ));
        }
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.clone()) {
                    problems.push(format!(
                        "panels `{other}` and `{title}` overlap at x={cx}, y={cy}"
                    ));
                }
            }
        }
        if panel["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "panel `{title}`: datasource should use the `datasource` variable, got {}",
                panel["datasource"]
            ));
        }
        if panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problems.push(format!("panel `{title}` has no fieldConfig.defaults.unit"));
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel `{title}` has no targets"));
        }
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            match target["refId"].as_str() {
                Some(r) if !r.is_empty() => {
                    if !ref_ids.insert(r) {
                        problems.push(format!("panel `{title}`: refId {r} is used twice"));
                    }
                }
                _ => problems.push(format!("panel `{title}`: a target has no refId")),
            }
            let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                problems.push(format!("panel `{title}`: a target has no expr: {target}"));
                continue;
            };
            if metric_names(expr).is_empty() {
                problems.push(format!("panel `{title}`: `{expr}` names no bff_ metric"));
            }
            for v in variables_used(expr) {
                if !variables.contains(&v) && !GRAFANA_BUILTINS.contains(&v.as_str()) {
                    problems.push(format!(
                        "panel `{title}`: `{expr}` uses an undefined variable `${v}`"
                    ));
                }
            }
            uses.add(expr, &format!("panel `{title}`"));
        }
    }
    for row in ["Per client", "Plugins", "Upstreams", "Proxy"] {
        if !rows.iter().any(|r| r == row) {
            problems.push(format!("no row panel titled `{row}` (rows: {rows:?})"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} is not a well-formed dashboard:\n  {}",
        dashboard_path().display(),
        problems.join("\n  ")
    );
    uses
}

/// The histogram base name, if `name` ends in one of a histogram's suffixes.
fn histogram_base(name: &str) -> Option<&str> {
    HISTOGRAM_SUFFIXES
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
}

/// Checks every used metric against the exported types; returns the problems, one per name.
fn check_against(uses: &Uses, types: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, places) in &uses.0 {
        let places = places.iter().cloned().collect::<Vec<_>>().join(", ");
        if let Some(base) = histogram_base(name) {
            match types.get(base).map(String::as_str) {
                Some("histogram") => {}
                Some(other) => problems.push(format!(
                    "{name}: {base} is exported as a {other}, not a histogram (used by {places})"
                )),
                None => problems.push(format!(
                    "{name}: histogram {base} is not exported (used by {places})"
                )),
            }
            continue;
        }
        match types.get(name).map(String::as_str) {
            None => problems.push(format!("{name}: not exported (used by {places})")),
            Some("histogram") => problems.push(format!(
                "{name}: is a histogram; query {name}_bucket, _sum or _count (used by {places})"
            )),
            Some(t) if name.ends_with("_total") && t != "counter" => problems.push(format!(
                "{name}: exported as a {t}, expected a counter (used by {places})"
            )),
            Some(_) => {}
        }
    }
    problems
}

#[test]
fn scanners_find_names_and_variables() {
    assert_eq!(
        metric_names(
            "1 - sum(rate(bff_a_total{x=~\"$client\"}[$__rate_interval])) / xbff_no + bff_b_bucket"
        ),
        ["bff_a_total", "bff_b_bucket"]
    );
    assert_eq!(
        variables_used("a{c=~\"$client\", d=\"${plugin:regex}\"}[$__rate_interval] $"),
        ["client", "plugin", "__rate_interval"]
    );
    assert_eq!(
        histogram_base("bff_x_seconds_bucket"),
        Some("bff_x_seconds")
    );
    assert_eq!(histogram_base("bff_x_total"), None);
}

#[test]
fn the_dashboard_is_well_formed() {
    let uses = check_structure(&load_dashboard());
    assert!(
        uses.0.len() >= 20,
        "the dashboard queries only {} metrics",
        uses.0.len()
    );
}

/// A route with a plugin chain and a plain route on one upstream, plus routes that make the
/// rarer labelled series appear: a trap, a fail-open skip and a send the egress list refuses.
fn proxy_config(upstream: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[access_log]
enabled = false

[identity]
default_client = "web"

[services.up]
urls = ["{upstream}"]

[services.other]
urls = ["{upstream}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[clients]]
name = "mobile"
identify = [{{ header = "x-client", equals = "mobile" }}]

[plugins]
dir = "plugins"

[[routes]]
id = "plain"
path = "/plain"
service = "up"

[[routes]]
id = "chain"
path = "/chain"
service = "up"
chain = [{{ plugin = "probe", config = {{ name = "a" }} }}, {{ plugin = "probe", config = {{ name = "b" }} }}]

[[routes]]
id = "open"
path = "/open"
service = "up"
chain = [{{ plugin = "probe", on_error = "fail-open", config = {{ mode = "error" }} }}, {{ plugin = "probe", config = {{ name = "after" }} }}]

[[routes]]
id = "trap"
path = "/trap"
service = "up"
chain = [{{ plugin = "probe", config = {{ mode = "trap" }} }}]

[[routes]]
id = "fan"
path = "/fan"
egress = ["up"]
chain = [{{ plugin = "probe", config = {{ mode = "fanout", calls = [{{ service = "up", path = "/one" }}, {{ service = "other", path = "/two" }}] }} }}]
"#
    )
}

/// Every metric the dashboard uses is exported by a proxy that has served some traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exported() {
    let uses = check_structure(&load_dashboard());

    let up = Upstream::echo("up").await;
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).expect("create the plugin directory");
    std::fs::copy(
        test_plugins().join("probe.wasm"),
        plugins.join("probe.wasm"),
    )
    .expect("copy probe.wasm");
    let config = dir.path().join("bff.toml");
    std::fs::write(&config, proxy_config(&up.url())).expect("write the config");
    let proxy = TestProxy::start_file(&config).await;
    let addr = proxy.addr();

    for client in ["web", "mobile"] {
        let h = [("x-client", client)];
        assert_eq!(get(addr, "/plain", &h).await.status, 200);
        let post = request(addr, "POST", "/plain", &h, body("a request body")).await;
        assert_eq!(post.status, 200, "{}", post.text());
        let chain = get(addr, "/chain", &h).await;
        assert_eq!(chain.status, 200, "{}", chain.text());
    }
    let open = get(addr, "/open", &[]).await;
    assert_eq!(open.status, 200, "fail-open: {}", open.text());
    assert_eq!(open.echo().header("x-probe-after"), Some("seen"));
    let trap = get(addr, "/trap", &[]).await;
    assert_eq!(trap.status, 502, "{}", trap.text());
    let fan = get(addr, "/fan", &[]).await;
    assert_eq!(fan.status, 200, "{}", fan.text());
    assert_eq!(fan.json()["results"][1]["error"], "errorkind::forbidden");
    assert_eq!(get(addr, "/nope", &[]).await.status, 404);

    // A plugin file refused at load (the serving version is kept): the watcher or the explicit
    // reload counts it. Wait for the series, bounded; if it never shows, the check below says so.
    let tmp = plugins.join(".probe.wasm.tmp");
    std::fs::write(&tmp, b"this is not wasm").expect("write the bad plugin");
    std::fs::rename(&tmp, plugins.join("probe.wasm")).expect("rename it into place");
    let _ = proxy.reload().await;
    let started = Instant::now();
    while !proxy
        .metrics()
        .await
        .contains("bff_plugin_load_errors_total{")
        && started.elapsed() < LOAD_ERROR_WITHIN
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The old version still serves.
    assert_eq!(get(addr, "/chain", &[]).await.status, 200);

    let metrics = proxy.metrics().await;
    let types = exported_types(&metrics);
    let problems = check_against(&uses, &types);
    assert!(
        problems.is_empty(),
        "{} metric(s) the dashboard uses are missing from /metrics or have the wrong type:\n  {}\n\
         exported: {:?}",
        problems.len(),
        problems.join("\n  "),
        types
    );

    // Not a failure: exported metrics no panel shows yet.
    let used_bases: BTreeSet<&str> = uses
        .0
        .keys()
        .map(|n| histogram_base(n).unwrap_or(n))
        .collect();
    let unused: Vec<&String> = types
        .keys()
        .filter(|n| n.starts_with("bff_") && !used_bases.contains(n.as_str()))
        .collect();
    if !unused.is_empty() {
        eprintln!("exported but not on the dashboard: {unused:?}");
    }
}
