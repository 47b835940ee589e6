//! Hot reload end to end: the proxy started from a config file in a temporary directory, its
//! plugin directory changed underneath it the ways ops change files (atomic rename, in-place
//! write, delete, editor leftovers, bursts, a Kubernetes `..data` symlink swap), the config file
//! edited, and the admin API and metrics checked. Versions of the `probe` plugin are made by
//! patching its version marker ([`probe_version`]); its `version` mode reports the version in
//! both phases, so a request served half by one version and half by another would show.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bff_proxy_tests::plugins::{probe_version, test_plugins, version_string};
use bff_proxy_tests::{TestProxy, Upstream, get, request, sha256_hex_bytes};

/// Upper bound for a change to show: generous, since a debug build compiles plugins slowly.
const SHOW_WITHIN: Duration = Duration::from_secs(120);

/// A config file and a plugin directory in a fresh temporary directory.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        std::fs::create_dir(dir.path().join("plugins")).expect("create the plugin directory");
        Self { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("bff.toml")
    }

    fn plugins(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn plugin(&self, name: &str) -> PathBuf {
        self.plugins().join(format!("{name}.wasm"))
    }

    /// Writes the config: the common head (loopback listeners, this setup's plugin and cache
    /// directories) followed by `body`.
    fn write_config(&self, body: &str) {
        write_atomic(&self.config(), &config_text(body).into_bytes());
    }
}

fn config_text(body: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[plugins]
dir = "plugins"
cache_dir = "cache"

[access_log]
enabled = false

{body}
"#
    )
}

/// One service `up`, client `web` (the default) and a route `/v` running `probe` in `version`
/// mode (plus `extra` TOML).
fn version_route(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[identity]
default_client = "web"

[services.up]
urls = ["{upstream}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[routes]]
id = "v"
path = "/v"
service = "up"
chain = [{{ plugin = "probe", config = {{ mode = "reject-on-version", version = "{refused}" }} }}]
{extra}
"#,
        refused = version_string('D')
    )
}

/// A route `/vr` running `probe` in `version` mode with reused instances (for [`version_route`]'s
/// `extra`).
const REUSED_ROUTE: &str = r#"
[[routes]]
id = "vr"
path = "/vr"
service = "up"
chain = [{ plugin = "probe", instances = "reused", config = { mode = "version" } }]
"#;

/// Writes a file the safe way ops do: a temporary name in the same directory, then a rename.
fn write_atomic(path: &Path, bytes: &[u8]) {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write the temporary file");
    std::fs::rename(&tmp, path).expect("rename it into place");
}

/// Polls `check` every 10 ms until it holds; panics after [`SHOW_WITHIN`]. Returns the wait.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SHOW_WITHIN,
            "{what}: not within {SHOW_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The version answering `/v` (both phases must agree), or the failure.
async fn version_at(proxy: &TestProxy) -> Result<String, String> {
    version_on(proxy, "/v").await
}

/// The version answering `path` (both phases must agree), or the failure.
async fn version_on(proxy: &TestProxy, path: &str) -> Result<String, String> {
    let resp = get(proxy.addr(), path, &[]).await;
    if resp.status != 200 {
        return Err(format!("{}: {}", resp.status, resp.text()));
    }
    let request_phase = resp.echo().header("x-probe-version").map(str::to_owned);
    let response_phase = resp.header("x-probe-version").map(str::to_owned);
    match (request_phase, response_phase) {
        (Some(a), Some(b)) if a == b => Ok(a),
        other => Err(format!("versions differ between phases: {other:?}")),
    }
}

async fn serves(proxy: &TestProxy, tag: char) -> bool {
    version_at(proxy).await.as_deref() == Ok(version_string(tag).as_str())
}

/// A client sending `path` until `stop` (at most `requests`, and 300 s), pausing `pause` between
/// requests; the count of answers that agreed between phases, and the failures.
fn load_loop(
    proxy: Arc<TestProxy>,
    path: &'static str,
    stop: Arc<AtomicBool>,
    requests: u64,
    pause: Duration,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let deadline = Instant::now() + Duration::from_secs(300);
    tokio::spawn(async move {
        let (mut ok, mut failures) = (0u64, Vec::new());
        for _ in 0..requests {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                break;
            }
            match version_on(&proxy, path).await {
                Ok(_) => ok += 1,
                Err(e) => failures.push(e),
            }
            tokio::time::sleep(pause).await;
        }
        (ok, failures)
    })
}

/// `/admin/plugins`' entry for `name`.
async fn plugin_entry(proxy: &TestProxy, name: &str) -> Option<serde_json::Value> {
    proxy.admin_json("/admin/plugins").await["plugins"]
        .as_array()
        .expect("a plugin list")
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

async fn reload_count(proxy: &TestProxy) -> usize {
    proxy.admin_json("/admin/reloads").await["reloads"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_swaps_under_load_fail_nothing_and_never_mix_versions() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    // `/vr` reuses instances: an idle one must never serve a request of a later snapshot.
    setup.write_config(&version_route(&up.url(), REUSED_ROUTE));
    let proxy = Arc::new(TestProxy::start_file(&setup.config()).await);
    assert!(serves(&proxy, 'A').await);
    // Both versions compiled once before the load starts: compiling runs at low priority, and a
    // debug build's compile starved by a saturating load would only test patience.
    for tag in ['B', 'A'] {
        write_atomic(&setup.plugin("probe"), &probe_version(tag));
        eventually(&format!("warm-up to {tag}"), || serves(&proxy, tag)).await;
    }

    // Continuous load: 3 clients, each bounded in requests and time, paced so that the other
    // tests of this binary (compiling plugins at low priority) are not starved.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = ["/v", "/v", "/vr"]
        .into_iter()
        .map(|path| {
            load_loop(
                proxy.clone(),
                path,
                stop.clone(),
                200_000,
                Duration::from_millis(1),
            )
        })
        .collect();

    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let tag = if i % 2 == 0 { 'B' } else { 'A' };
        write_atomic(&setup.plugin("probe"), &probe_version(tag));
        let took = eventually(&format!("swap {i} to {tag}"), || serves(&proxy, tag)).await;
        slowest = slowest.max(took);
        // The snapshot that serves `/v` the new version serves `/vr` with it too.
        assert_eq!(
            version_on(&proxy, "/vr").await,
            Ok(version_string(tag)),
            "swap {i}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    for task in load {
        let (o, f) = task.await.expect("load task");
        ok += o;
        failures.extend(f);
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the swaps, e.g. {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 50, "the load loop ran ({ok} requests)");
    eprintln!("50 swaps under load: {ok} requests, all 2xx; slowest swap showed after {slowest:?}");

    let reloads = proxy.admin_json("/admin/reloads").await;
    let applied = reloads["reloads"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|r| r["outcome"] == "applied")
        .count();
    assert!(applied >= 2, "{reloads}");
}

#[tokio::test]
async fn a_bad_file_never_replaces_the_serving_version() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    let good = probe_version('A');
    write_atomic(&setup.plugin("probe"), &good);
    setup.write_config(&version_route(&up.url(), ""));
    let proxy = TestProxy::start_file(&setup.config()).await;
    let sha_a = plugin_entry(&proxy, "probe").await.expect("probe loaded")["sha256"].clone();

    let old_contract =
        std::fs::read(test_plugins().join("old_contract.wasm")).expect("old_contract.wasm");
    let cases: Vec<(&str, Option<Vec<u8>>, &str, &str)> = vec![
        (
            "garbage",
            Some(b"this is not wasm".to_vec()),
            "rejected",
            "not a valid WebAssembly component",
        ),
        (
            "truncated",
            Some(probe_version('C')[..good.len() / 2].to_vec()),
            "rejected",
            "not a valid WebAssembly component",
        ),
        (
            "core module",
            Some(b"\0asm\x01\0\0\0".to_vec()),
            "rejected",
            "not a valid WebAssembly component",
        ),
        ("other contract", Some(old_contract), "rejected", "contract"),
        (
            "rejects its config",
            Some(probe_version('D')),
            "rejected",
            "refuses this config",
        ),
        ("deleted", None, "file_missing", "does not exist"),
    ];
    for (case, bytes, status, reason) in cases {
        let errors_before = proxy
            .metric("bff_plugin_load_errors_total{plugin=\"probe\"}")
            .await;
        match &bytes {
            Some(b) => write_atomic(&setup.plugin("probe"), b),
            None => std::fs::remove_file(setup.plugin("probe")).expect("delete probe.wasm"),
        }
        eventually(&format!("{case}: reported in /admin/plugins"), || async {
            plugin_entry(&proxy, "probe")
                .await
                .is_some_and(|p| p["status"] == status)
        })
        .await;
        let entry = plugin_entry(&proxy, "probe").await.expect("still loaded");
        assert_eq!(
            entry["sha256"], sha_a,
            "{case}: the serving version changed"
        );
        let message = entry["last_error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{case}: {entry}");
        assert_eq!(version_at(&proxy).await, Ok(version_string('A')), "{case}");
        assert_eq!(
            proxy
                .metric("bff_plugin_load_errors_total{plugin=\"probe\"}")
                .await,
            errors_before + 1.0,
            "{case}: counted once"
        );

        // Putting the good file back clears the problem.
        write_atomic(&setup.plugin("probe"), &good);
        eventually(&format!("{case}: recovered"), || async {
            plugin_entry(&proxy, "probe")
                .await
                .is_some_and(|p| p["status"] == "ok")
        })
        .await;
    }

    // A good new version after all that goes live.
    write_atomic(&setup.plugin("probe"), &probe_version('E'));
    eventually("a good new version serves", || serves(&proxy, 'E')).await;
    let reloads = proxy.admin_json("/admin/reloads").await;
    assert!(
        reloads["reloads"]
            .as_array()
            .expect("a list")
            .iter()
            .any(|r| r["warnings"].as_array().is_some_and(|w| w
                .iter()
                .any(|w| w.as_str().unwrap_or_default().contains("keeps serving")))),
        "reloads that kept a version say so: {reloads}"
    );
}

/// With `plugins.sha256` pinning a build, only that build serves: a new file with another hash
/// is refused like a broken one (the pinned version keeps serving), a config moving the pin
/// switches to the newly pinned file, and a pin no file matches is refused as a whole.
#[tokio::test]
async fn pinned_plugins_serve_only_the_pinned_build() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    let (a, b) = (probe_version('A'), probe_version('B'));
    let pinned = |bytes: &[u8]| {
        let routes = version_route(&up.url(), "");
        format!(
            "{routes}\n[plugins.sha256]\nprobe = \"{}\"\n",
            sha256_hex_bytes(bytes)
        )
    };
    write_atomic(&setup.plugin("probe"), &a);
    setup.write_config(&pinned(&a));
    let proxy = TestProxy::start_file(&setup.config()).await;
    assert_eq!(version_at(&proxy).await, Ok(version_string('A')));

    // Another build appears: refused, A keeps serving.
    write_atomic(&setup.plugin("probe"), &b);
    eventually("the unpinned build is refused", || async {
        plugin_entry(&proxy, "probe")
            .await
            .is_some_and(|p| p["status"] == "rejected")
    })
    .await;
    let entry = plugin_entry(&proxy, "probe").await.expect("still loaded");
    let message = entry["last_error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("has SHA-256 {}", sha256_hex_bytes(&b)))
            && message.contains("`plugins.sha256.probe` pins"),
        "{entry}"
    );
    assert_eq!(version_at(&proxy).await, Ok(version_string('A')));

    // Ops pin B: it serves.
    setup.write_config(&pinned(&b));
    eventually("the newly pinned build serves", || serves(&proxy, 'B')).await;

    // A pin no file matches: the whole config is refused, B keeps serving.
    setup.write_config(&pinned(b"some other build"));
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 422, "{record}");
    assert!(record["errors"].to_string().contains("pins"), "{record}");
    assert_eq!(version_at(&proxy).await, Ok(version_string('B')));
}

#[tokio::test]
async fn a_half_written_file_is_never_loaded() {
    use std::io::Write as _;
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    setup.write_config(&version_route(&up.url(), ""));
    let proxy = TestProxy::start_file(&setup.config()).await;

    // An in-place write that stalls halfway for far longer than the debounce.
    let next = probe_version('C');
    let mut f = std::fs::File::create(setup.plugin("probe")).expect("open probe.wasm in place");
    f.write_all(&next[..next.len() / 2])
        .expect("write the first half");
    f.flush().expect("flush");
    // Shorter than the 1 s a failing file is given to settle.
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_millis(600) {
        assert_eq!(
            version_at(&proxy).await,
            Ok(version_string('A')),
            "while the file is half written, the old version serves"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.write_all(&next[next.len() / 2..])
        .expect("write the rest");
    drop(f);
    eventually("the completed file serves", || serves(&proxy, 'C')).await;
    let entry = plugin_entry(&proxy, "probe").await.expect("loaded");
    assert_eq!(entry["status"], "ok", "{entry}");
    // The half-written state was retried, never reported as a bad file.
    assert_eq!(
        proxy
            .metric("bff_plugin_load_errors_total{plugin=\"probe\"}")
            .await,
        0.0
    );
    let reloads = proxy.admin_json("/admin/reloads").await;
    assert!(
        !reloads
            .to_string()
            .contains("not a valid WebAssembly component"),
        "{reloads}"
    );
}

#[tokio::test]
async fn editor_leftovers_are_ignored_and_bursts_coalesce() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    setup.write_config(&version_route(&up.url(), ""));
    let proxy = TestProxy::start_file(&setup.config()).await;
    let before = reload_count(&proxy).await;

    for noise in [
        ".probe.wasm.swp",
        "probe.wasm~",
        ".#probe.wasm",
        "4913",
        "notes.txt",
    ] {
        std::fs::write(setup.plugins().join(noise), b"noise").expect("write an editor file");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        reload_count(&proxy).await,
        before,
        "editor files caused a reload"
    );

    // A burst of 20 writes within ~100 ms becomes a few reloads, and the last write wins.
    for i in 0..20 {
        let tag = if i == 19 {
            'F'
        } else if i % 2 == 0 {
            'B'
        } else {
            'C'
        };
        write_atomic(&setup.plugin("probe"), &probe_version(tag));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eventually("the last write of the burst serves", || serves(&proxy, 'F')).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reloads = reload_count(&proxy).await - before;
    assert!(
        (1..=4).contains(&reloads),
        "20 writes in a burst gave {reloads} reloads"
    );
}

#[tokio::test]
async fn config_reload_adds_removes_and_changes_and_rejects_invalid_as_a_whole() {
    let up1 = Upstream::echo("one").await;
    let up2 = Upstream::echo("two").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    let v1 = |url: &str| {
        format!(
            r#"
[identity]
default_client = "web"

[services.main]
urls = ["{url}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[clients]]
name = "mobile"
identify = [{{ header = "x-client", equals = "mobile" }}]

[[routes]]
id = "home"
path = "/home"
service = "main"

[[routes]]
id = "old"
path = "/old"
service = "main"
"#
        )
    };
    setup.write_config(&v1(&up1.url()));
    let proxy = TestProxy::start_file(&setup.config()).await;
    assert_eq!(get(proxy.addr(), "/old", &[]).await.status, 200);
    assert_eq!(
        proxy.admin_json("/admin/plugins").await["plugins"],
        serde_json::json!([])
    );

    // v2: `main` moves to another upstream, `old` goes, a `voice` client with its own
    // plugin route arrives (the plugin runtime starts on this reload).
    let v2 = format!(
        r#"
[identity]
default_client = "web"

[services.main]
urls = ["{url}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[clients]]
name = "mobile"
identify = [{{ header = "x-client", equals = "mobile" }}]

[[clients]]
name = "voice"
identify = [{{ header = "x-client", equals = "voice" }}]

[[routes]]
id = "voice-home"
clients = ["voice"]
path = "/home"
service = "main"
chain = [{{ plugin = "probe", config = {{ mode = "version" }} }}]

[[routes]]
id = "home"
path = "/home"
service = "main"
"#,
        url = up2.url()
    );
    setup.write_config(&v2);
    eventually("the config change serves", || async {
        get(proxy.addr(), "/old", &[]).await.status == 404
    })
    .await;
    let home = get(proxy.addr(), "/home", &[("x-client", "mobile")]).await;
    assert_eq!(home.echo().upstream, "two", "the service URL changed");
    let voice = get(proxy.addr(), "/home", &[("x-client", "voice")]).await;
    assert_eq!(voice.status, 200, "{}", voice.text());
    assert_eq!(
        voice.header("x-probe-version"),
        Some(version_string('A').as_str())
    );
    let entry = plugin_entry(&proxy, "probe")
        .await
        .expect("probe loaded by the reload");
    assert_eq!(entry["routes"], serde_json::json!(["voice-home"]));
    assert_eq!(entry["clients"], serde_json::json!(["voice"]));

    // Settings of the plugin runtime (pool, compilers, cache) apply on restart only: the
    // reload applies the rest and names each of them.
    let runtime_changed = config_text(&v2).replace(
        "cache_dir = \"cache\"",
        "cache_dir = \"cache\"\ntiered_compilation = false\nmax_instances = 500",
    );
    std::fs::write(setup.config(), runtime_changed).expect("write the config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["outcome"], "applied");
    let warnings = record["warnings"].to_string();
    for name in ["plugins.tiered_compilation", "plugins.max_instances"] {
        assert!(
            warnings.contains(&format!(
                "`{name}` changed: it takes effect after a restart"
            )),
            "{warnings}"
        );
    }
    assert!(!warnings.contains("plugins.cache_dir"), "{warnings}");

    // Idle instances of `reused` plugin uses may hold at most half the instance pool: the
    // running one (1000), not the size a restart would give (2000).
    let reusing = config_text(&v2.replace(
        "plugin = \"probe\", config",
        "plugin = \"probe\", instances = \"reused\", config",
    ))
    .replace(
        "cache_dir = \"cache\"",
        "cache_dir = \"cache\"\nmax_instances = 2000\nreuse = { max_idle = 600 }",
    );
    std::fs::write(setup.config(), reusing).expect("write the config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 422, "{record}");
    let errors = record["errors"].to_string();
    assert!(
        errors.contains("may keep 600 idle instances")
            && errors.contains("instance pool's 1000")
            && errors.contains("restart to raise it"),
        "{errors}"
    );

    // An invalid config is rejected as a whole, every problem listed; v2 keeps serving.
    let rejected_before = proxy
        .metric("bff_reloads_total{outcome=\"rejected\"}")
        .await;
    let broken = v2
        .replace(
            "[[routes]]\nid = \"home\"",
            "[[routes]]\nid = \"home\"\ntypo = 1",
        )
        .replace("equals = \"voice\"", "regex = \"(\"");
    std::fs::write(setup.config(), config_text(&broken)).expect("write the broken config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 422, "{record}");
    assert_eq!(record["outcome"], "rejected");
    let errors = record["errors"].to_string();
    assert!(
        errors.contains("typo") && errors.contains("regex"),
        "{errors}"
    );
    assert!(
        proxy
            .metric("bff_reloads_total{outcome=\"rejected\"}")
            .await
            > rejected_before
    );
    let voice = get(proxy.addr(), "/home", &[("x-client", "voice")]).await;
    assert_eq!(voice.status, 200, "v2 still serves: {}", voice.text());
    let last = proxy.admin_json("/admin/reloads").await["reloads"]
        .as_array()
        .and_then(|r| r.last().cloned())
        .expect("a reload");
    assert_eq!(last["outcome"], "rejected");

    // Back to v1 (admin-triggered): the plugin no route uses any more is unloaded.
    std::fs::write(setup.config(), config_text(&v1(&up1.url()))).expect("write v1");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["outcome"], "applied");
    assert_eq!(record["trigger"], "admin");
    assert_eq!(
        record["plugins"],
        serde_json::json!([{ "plugin": "probe", "from": entry["version"], "to": null }])
    );
    assert_eq!(
        proxy.admin_json("/admin/plugins").await["plugins"],
        serde_json::json!([])
    );
    assert_eq!(get(proxy.addr(), "/old", &[]).await.echo().upstream, "one");
    // Nothing changed since: the next reload says so and swaps nothing.
    let (_, record) = proxy.reload().await;
    assert_eq!(record["outcome"], "unchanged");
}

/// Kubernetes mounts ConfigMaps and Secrets as `name -> ..data/name` with `..data` a symlink to
/// a timestamped directory; an update writes a new directory and renames a new `..data` over
/// the old one.
#[cfg(unix)]
#[tokio::test]
async fn kubernetes_volume_updates_of_config_and_plugins() {
    use std::os::unix::fs::symlink;
    let up = Upstream::echo("up").await;
    let root = tempfile::tempdir().expect("temp dir");
    let (config_dir, plugin_dir) = (root.path().join("config"), root.path().join("plugins"));
    // One "volume" directory with the given files, switched to atomically like the kubelet.
    let publish = |volume: &Path, generation: u32, files: &[(&str, Vec<u8>)]| {
        let data = volume.join(format!("..2026_12_01_{generation}"));
        std::fs::create_dir_all(&data).expect("create the data directory");
        for (name, bytes) in files {
            std::fs::write(data.join(name), bytes).expect("write a volume file");
            let link = volume.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(name), &link).expect("link the file");
            }
        }
        let tmp = volume.join("..data_tmp");
        symlink(data.file_name().expect("a name"), &tmp).expect("link ..data_tmp");
        std::fs::rename(&tmp, volume.join("..data")).expect("swap ..data");
    };
    let config = |route_mode: &str| {
        config_text(&format!(
            r#"
[identity]
default_client = "web"

[services.up]
urls = ["{url}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[routes]]
id = "v"
path = "/v"
service = "up"
chain = [{{ plugin = "probe", config = {{ mode = "{route_mode}" }} }}]
"#,
            url = up.url()
        ))
        .replace(
            "dir = \"plugins\"",
            &format!("dir = {:?}", plugin_dir.display().to_string()),
        )
    };
    std::fs::create_dir_all(&config_dir).expect("config volume");
    std::fs::create_dir_all(&plugin_dir).expect("plugin volume");
    publish(&plugin_dir, 1, &[("probe.wasm", probe_version('A'))]);
    publish(
        &config_dir,
        1,
        &[("bff.toml", config("version").into_bytes())],
    );
    let proxy = TestProxy::start_file(&config_dir.join("bff.toml")).await;
    assert!(serves(&proxy, 'A').await);

    publish(&plugin_dir, 2, &[("probe.wasm", probe_version('B'))]);
    eventually("the plugin volume update serves", || serves(&proxy, 'B')).await;

    // The config volume update switches the route to `respond` mode (answers itself).
    publish(
        &config_dir,
        2,
        &[("bff.toml", config("respond").into_bytes())],
    );
    eventually("the config volume update serves", || async {
        get(proxy.addr(), "/v", &[]).await.json()["plugin"] == "probe"
    })
    .await;
}

/// Waits until `name` runs optimized code (its background compile done), serving throughout.
async fn until_optimized(proxy: &TestProxy, name: &str, tag: char) {
    eventually(&format!("{name} on optimized code"), || async {
        assert!(
            serves(proxy, tag).await,
            "serves {tag} while it moves tiers"
        );
        plugin_entry(proxy, name).await.expect("listed")["tier"] == "optimized"
    })
    .await;
}

#[tokio::test]
async fn restarts_use_the_compile_cache_and_ignore_a_corrupt_entry() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    setup.write_config(&version_route(&up.url(), ""));
    // The startup record's compile stats, and the tier `probe` started on; shuts the proxy down
    // once its optimized code (the only code the disk cache holds) is in.
    let startup_compile = |proxy: TestProxy| async move {
        let reloads = proxy.admin_json("/admin/reloads").await;
        assert!(serves(&proxy, 'A').await);
        let tier = plugin_entry(&proxy, "probe").await.expect("listed")["tier"].clone();
        until_optimized(&proxy, "probe", 'A').await;
        proxy.shutdown().await;
        let first = reloads["reloads"][0].clone();
        assert_eq!(first["trigger"], "startup", "{reloads}");
        (first["compile"].clone(), tier)
    };

    // Cold: Winch compiles it (it may already have moved on by the time we look), Cranelift
    // follows in the background and fills the cache.
    let (cold, _) = startup_compile(TestProxy::start_file(&setup.config()).await).await;
    assert_eq!(
        cold,
        serde_json::json!({"compiled": 1, "baseline": 1, "from_disk_cache": 0, "from_memory": 0})
    );
    let entries: Vec<PathBuf> = std::fs::read_dir(setup.cache())
        .expect("the cache directory exists")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");

    // Warm: optimized code from the disk cache at once.
    let (warm, tier) = startup_compile(TestProxy::start_file(&setup.config()).await).await;
    assert_eq!(
        warm,
        serde_json::json!({"compiled": 0, "baseline": 0, "from_disk_cache": 1, "from_memory": 0})
    );
    assert_eq!(tier, "optimized");

    // A corrupted entry is never loaded: it is compiled again (and the entry replaced).
    let mut bytes = std::fs::read(&entries[0]).expect("read the entry");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&entries[0], &bytes).expect("corrupt the entry");
    let (again, _) = startup_compile(TestProxy::start_file(&setup.config()).await).await;
    assert_eq!(
        again,
        serde_json::json!({"compiled": 1, "baseline": 1, "from_disk_cache": 0, "from_memory": 0})
    );
    let (warm, _) = startup_compile(TestProxy::start_file(&setup.config()).await).await;
    assert_eq!(warm["from_disk_cache"], 1, "the entry was rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_versions_serve_on_baseline_code_and_move_to_optimized_code_in_place() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    let extra = format!("[reload]\ndebounce = \"20ms\"\n{REUSED_ROUTE}");
    setup.write_config(&version_route(&up.url(), &extra));
    let proxy = Arc::new(TestProxy::start_file(&setup.config()).await);
    until_optimized(&proxy, "probe", 'A').await;

    // Requests keep flowing while B is deployed and moves from Winch to Cranelift code, also
    // on `/vr`, whose idle instances of B's baseline code give way to optimized ones.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = ["/v", "/vr"]
        .into_iter()
        .map(|path| {
            load_loop(
                proxy.clone(),
                path,
                stop.clone(),
                100_000,
                Duration::from_millis(2),
            )
        })
        .collect();
    write_atomic(&setup.plugin("probe"), &probe_version('B'));
    eventually("B serves", || serves(&proxy, 'B')).await;
    let reloads_before = reload_count(&proxy).await;
    let last = proxy.admin_json("/admin/reloads").await["reloads"]
        .as_array()
        .expect("a list")
        .last()
        .cloned()
        .expect("a reload");
    assert_eq!(last["compile"]["baseline"], 1, "{last}");
    let version = plugin_entry(&proxy, "probe").await.expect("listed")["sha256"].clone();
    until_optimized(&proxy, "probe", 'B').await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let (ok, failures) = task.await.expect("load task");
        assert!(failures.is_empty(), "{failures:?}");
        assert!(ok > 0);
    }

    // Both versions were compiled by both tiers, each compile timed.
    for tier in ["baseline", "optimized"] {
        let n = proxy
            .metric(&format!(
                "bff_plugin_compile_seconds_count{{tier=\"{tier}\"}}"
            ))
            .await;
        assert_eq!(n, 2.0, "{tier} compiles");
    }

    // Moving tiers is not a reload and not a new version.
    assert_eq!(reload_count(&proxy).await, reloads_before);
    let entry = plugin_entry(&proxy, "probe").await.expect("listed");
    assert_eq!(entry["sha256"], version);
    assert_eq!(entry["status"], "ok");

    // Back to A: compiled before, so its optimized code is reused at once.
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    eventually("A serves again", || serves(&proxy, 'A')).await;
    let entry = plugin_entry(&proxy, "probe").await.expect("listed");
    assert_eq!(entry["tier"], "optimized", "{entry}");
}

#[tokio::test]
async fn without_tiered_compilation_new_versions_start_on_optimized_code() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    let text = config_text(&version_route(&up.url(), "")).replace(
        "cache_dir = \"cache\"",
        "cache_dir = \"cache\"\ntiered_compilation = false",
    );
    write_atomic(&setup.config(), text.as_bytes());
    let proxy = TestProxy::start_file(&setup.config()).await;
    assert!(serves(&proxy, 'A').await);
    let first = proxy.admin_json("/admin/reloads").await["reloads"][0].clone();
    assert_eq!(
        first["compile"],
        serde_json::json!({"compiled": 1, "baseline": 0, "from_disk_cache": 0, "from_memory": 0})
    );
    let entry = plugin_entry(&proxy, "probe").await.expect("listed");
    assert_eq!(entry["tier"], "optimized", "{entry}");
    let compiles = |tier: &str| format!("bff_plugin_compile_seconds_count{{tier=\"{tier}\"}}");
    assert_eq!(proxy.metric(&compiles("optimized")).await, 1.0);
    assert_eq!(proxy.metric(&compiles("baseline")).await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn optional_version_header_and_admin_methods() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    let bytes = probe_version('A');
    write_atomic(&setup.plugin("probe"), &bytes);
    setup.write_config(&version_route(&up.url(), ""));
    // The header is off by default.
    let proxy = TestProxy::start_file(&setup.config()).await;
    assert_eq!(
        get(proxy.addr(), "/v", &[])
            .await
            .header("x-bff-plugin-versions"),
        None
    );

    let with_header = config_text(&version_route(&up.url(), "")).replace(
        "cache_dir = \"cache\"",
        "cache_dir = \"cache\"\nversion_header = \"x-bff-plugin-versions\"",
    );
    std::fs::write(setup.config(), with_header).expect("write the config");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    let sha = bff_proxy_tests::sha256_hex_bytes(&bytes);
    assert_eq!(
        get(proxy.addr(), "/v", &[])
            .await
            .header("x-bff-plugin-versions"),
        Some(format!("probe={}", &sha[..12]).as_str())
    );

    // Mutations only by POST; reads only by GET.
    let resp = get(proxy.admin_addr(), "/admin/reload", &[]).await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("POST"));
    let resp = request(
        proxy.admin_addr(),
        "POST",
        "/admin/plugins",
        &[],
        bff_proxy_tests::empty(),
    )
    .await;
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("GET, HEAD"));
    let metrics = proxy.metrics().await;
    for name in [
        "bff_reloads_total",
        "bff_reload_duration_seconds",
        "bff_last_reload_success_timestamp_seconds",
        "bff_plugins_loaded",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
}

/// A route `/v` running `probe` in `fail-on-version` mode: the build tagged `bad` fails every
/// request, the others answer with their version; `rollback` holds `[plugins.rollback]` keys.
fn failing_version_route(upstream: &str, bad: char, rollback: &str) -> String {
    format!(
        r#"
[identity]
default_client = "web"

[services.up]
urls = ["{upstream}"]

[[clients]]
name = "web"
identify = [{{ header = "x-client", equals = "web" }}]

[[routes]]
id = "v"
path = "/v"
service = "up"
chain = [{{ plugin = "probe", config = {{ mode = "fail-on-version", version = "{bad}" }} }}]

[plugins.rollback]
{rollback}
"#,
        bad = version_string(bad)
    )
}

async fn rollback_count(proxy: &TestProxy, trigger: &str) -> f64 {
    proxy
        .metric(&format!(
            r#"bff_plugin_rollbacks_total{{plugin="probe",slot="serving",trigger="{trigger}"}}"#
        ))
        .await
}

/// Ops ship a version that fails every request: the health watch notices within seconds and
/// serves the version it replaced again, without anyone touching the files. The bad file stays
/// refused (a reload does not bring it back) until a new file replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_new_version_is_rolled_back_automatically() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    setup.write_config(&failing_version_route(
        &up.url(),
        'B',
        "min_calls = 5\nmax_failure_ratio = 0.5",
    ));
    let proxy = TestProxy::start_file(&setup.config()).await;
    for _ in 0..10 {
        assert!(serves(&proxy, 'A').await);
    }

    let bad = probe_version('B');
    write_atomic(&setup.plugin("probe"), &bad);
    eventually("version B serves (and fails)", || async {
        version_at(&proxy)
            .await
            .is_err_and(|e| e.contains("plugin_error"))
    })
    .await;
    // Requests keep coming; the failing version gives way to A.
    eventually("version A serves again", || serves(&proxy, 'A')).await;

    let entry = plugin_entry(&proxy, "probe").await.expect("probe loaded");
    assert_eq!(entry["status"], "rolled_back", "{entry}");
    assert_eq!(
        entry["last_error"]["file_sha256"],
        sha256_hex_bytes(&bad),
        "{entry}"
    );
    let why = entry["last_error"]["message"].as_str().expect("a reason");
    assert!(
        why.contains("failed") && why.contains("against 0%"),
        "{why}"
    );
    assert!(entry["previous"].is_null(), "{entry}");
    assert_eq!(rollback_count(&proxy, "automatic").await, 1.0);
    let reloads = proxy.admin_json("/admin/reloads").await;
    assert!(
        reloads["reloads"]
            .as_array()
            .expect("reloads")
            .iter()
            .any(|r| r["trigger"] == "rollback" && r["outcome"] == "applied"),
        "{reloads}"
    );

    // The bad file is still there: a reload keeps refusing it.
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert!(serves(&proxy, 'A').await);
    assert_eq!(
        plugin_entry(&proxy, "probe").await.expect("probe")["status"],
        "rolled_back"
    );

    // A new file is a new version: it serves, with A kept as its previous.
    write_atomic(&setup.plugin("probe"), &probe_version('C'));
    eventually("version C serves", || serves(&proxy, 'C')).await;
    let entry = plugin_entry(&proxy, "probe").await.expect("probe loaded");
    assert_eq!(entry["status"], "ok", "{entry}");
    assert_eq!(
        entry["previous"]["sha256"],
        sha256_hex_bytes(&probe_version('A'))
    );
}

/// With `automatic = false` a failing version keeps serving; `POST /admin/plugins/rollback`
/// serves the previous one on request, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_rolls_back_on_request() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    setup.write_config(&failing_version_route(
        &up.url(),
        'B',
        "automatic = false\nmin_calls = 5",
    ));
    let proxy = TestProxy::start_file(&setup.config()).await;
    let rollback = |plugin: &'static str| {
        request(
            proxy.admin_addr(),
            "POST",
            "/admin/plugins/rollback",
            &[],
            bff_proxy_tests::body(format!(r#"{{"plugin": "{plugin}"}}"#)),
        )
    };
    // Nothing replaced yet: nothing to roll back to.
    let resp = rollback("probe").await;
    assert_eq!(resp.status, 409, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "no_previous_version");
    let resp = rollback("nope").await;
    assert_eq!(resp.status, 404, "{}", resp.text());

    write_atomic(&setup.plugin("probe"), &probe_version('B'));
    eventually("version B serves (and fails)", || async {
        version_at(&proxy).await.is_err()
    })
    .await;
    for _ in 0..20 {
        assert!(version_at(&proxy).await.is_err());
    }
    // Past a health check or two: still B.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(version_at(&proxy).await.is_err());
    assert_eq!(rollback_count(&proxy, "automatic").await, 0.0);

    let resp = rollback("probe").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["reload"]["trigger"], "rollback");
    assert!(serves(&proxy, 'A').await);
    let entry = plugin_entry(&proxy, "probe").await.expect("probe loaded");
    assert_eq!(entry["status"], "rolled_back", "{entry}");
    assert_eq!(
        entry["last_error"]["message"],
        "rolled back through the admin API"
    );
    assert_eq!(rollback_count(&proxy, "admin").await, 1.0);
    assert_eq!(rollback("probe").await.status, 409, "only one step back");
}

/// [`failing_version_route`] with a second client `beta` (`x-client: beta`) and `canary` as
/// `[plugins.canary.probe]` (file `probe-next.wasm`).
fn canary_route(upstream: &str, bad: char, canary: &str, rollback: &str) -> String {
    let route = failing_version_route(upstream, bad, rollback);
    format!(
        r#"{route}
[[clients]]
name = "beta"
identify = [{{ header = "x-client", equals = "beta" }}]

[plugins.canary.probe]
file = "probe-next.wasm"
{canary}
"#
    )
}

/// The version that answered `/v` for a request with `headers` (an error text if it failed).
async fn version_with(proxy: &TestProxy, headers: &[(&str, &str)]) -> String {
    let resp = get(proxy.addr(), "/v", headers).await;
    if resp.status != 200 {
        return resp.status.as_u16().to_string();
    }
    resp.header("x-probe-version").unwrap_or("none").to_owned()
}

/// A canary serves its share of requests beside the serving version: the clients it names,
/// a percentage picked per user by a sticky header, and nothing at all when its file is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_serves_its_cohort_beside_the_serving_version() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    write_atomic(&setup.plugin("probe-next"), &probe_version('B'));
    setup.write_config(&canary_route(
        &up.url(),
        'Z',
        "percent = 100\nclients = [\"beta\"]",
        "",
    ));
    let proxy = TestProxy::start_file(&setup.config()).await;
    let (a, b) = (version_string('A'), version_string('B'));
    for _ in 0..5 {
        assert_eq!(version_with(&proxy, &[("x-client", "web")]).await, a);
        assert_eq!(version_with(&proxy, &[("x-client", "beta")]).await, b);
    }
    let entry = plugin_entry(&proxy, "probe").await.expect("probe loaded");
    assert_eq!(
        entry["version"],
        &sha256_hex_bytes(&probe_version('A'))[..12]
    );
    assert_eq!(entry["canary"]["status"], "ok", "{entry}");
    assert_eq!(
        entry["canary"]["sha256"],
        sha256_hex_bytes(&probe_version('B'))
    );
    assert_eq!(entry["canary"]["calls"], 10, "{entry}");

    // Half of everyone, by user: a user always gets the same version.
    setup.write_config(&canary_route(
        &up.url(),
        'Z',
        "percent = 50\nsticky_header = \"x-user\"",
        "",
    ));
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    let mut seen = std::collections::BTreeMap::new();
    for user in 0..40 {
        let user = format!("user-{user}");
        let first = version_with(&proxy, &[("x-user", &user)]).await;
        for _ in 0..2 {
            assert_eq!(
                version_with(&proxy, &[("x-user", &user)]).await,
                first,
                "{user}"
            );
        }
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec![a.clone(), b.clone()],
        "{seen:?}"
    );

    // The candidate file gone: the serving version takes every request.
    std::fs::remove_file(setup.plugin("probe-next")).expect("remove the canary");
    let (status, record) = proxy.reload().await;
    assert_eq!(status, 200, "{record}");
    assert!(
        record["warnings"].to_string().contains("canary"),
        "{record}"
    );
    for user in 0..10 {
        let user = format!("user-{user}");
        assert_eq!(version_with(&proxy, &[("x-user", &user)]).await, a);
    }
    let entry = plugin_entry(&proxy, "probe").await.expect("probe loaded");
    assert_eq!(entry["canary"]["status"], "file_missing", "{entry}");
}

/// A canary that fails far more than the serving version is stopped by the health watch; the
/// admin API can stop one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_stopped() {
    let up = Upstream::echo("up").await;
    let setup = Setup::new();
    write_atomic(&setup.plugin("probe"), &probe_version('A'));
    write_atomic(&setup.plugin("probe-next"), &probe_version('B'));
    setup.write_config(&canary_route(
        &up.url(),
        'B',
        "percent = 100\nclients = [\"beta\"]",
        "min_calls = 5",
    ));
    let proxy = TestProxy::start_file(&setup.config()).await;
    let a = version_string('A');
    for _ in 0..5 {
        assert_eq!(version_with(&proxy, &[("x-client", "web")]).await, a);
    }
    assert_eq!(version_with(&proxy, &[("x-client", "beta")]).await, "502");
    eventually("the canary is stopped", || async {
        version_with(&proxy, &[("x-client", "beta")]).await == a
    })
    .await;
    let entry = plugin_entry(&proxy, "probe").await.expect("probe loaded");
    assert_eq!(entry["canary"]["status"], "rolled_back", "{entry}");
    assert!(
        entry["canary"]["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("canary version")),
        "{entry}"
    );
    assert_eq!(
        proxy
            .metric(
                r#"bff_plugin_rollbacks_total{plugin="probe",slot="canary",trigger="automatic"}"#
            )
            .await,
        1.0
    );
    // Stays stopped across reloads while the file is that build.
    let (status, _) = proxy.reload().await;
    assert_eq!(status, 200);
    assert_eq!(version_with(&proxy, &[("x-client", "beta")]).await, a);

    // A new candidate serves again; the admin API stops it on request.
    write_atomic(&setup.plugin("probe-next"), &probe_version('C'));
    eventually("the new canary serves", || async {
        version_with(&proxy, &[("x-client", "beta")]).await == version_string('C')
    })
    .await;
    let stop = || {
        request(
            proxy.admin_addr(),
            "POST",
            "/admin/plugins/rollback",
            &[],
            bff_proxy_tests::body(r#"{"plugin": "probe", "canary": true}"#),
        )
    };
    let resp = stop().await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(version_with(&proxy, &[("x-client", "beta")]).await, a);
    let resp = stop().await;
    assert_eq!(resp.status, 409, "{}", resp.text());
    assert_eq!(resp.json()["error"]["code"], "no_canary");
}
