//! Config loading: defaults, every problem reported at once, and the files under `config/`.

use super::*;

fn problems(text: &str) -> Vec<String> {
    match Config::from_toml(text, "t.toml") {
        Ok(_) => Vec::new(),
        Err(e) => e
            .problems()
            .iter()
            .map(|p| match p.line_col {
                Some((l, c)) => format!("{l}:{c} {}: {}", p.path, p.message),
                None => format!("{}: {}", p.path, p.message),
            })
            .collect(),
    }
}

const MINIMAL: &str = r#"
[services.users]
urls = ["http://127.0.0.1:7101"]

[[clients]]
name = "web"

[[routes]]
id = "all"
path = "/{*rest}"
service = "users"
"#;

#[test]
fn minimal_config_gets_defaults() {
    let cfg = Config::from_toml(MINIMAL, "t.toml").expect("minimal config is valid");
    assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(cfg.admin, AdminConfig::default());
    assert_eq!(cfg.server, ServerConfig::default());
    assert_eq!(cfg.headers.client, "x-bff-client");
    assert_eq!(cfg.services["users"].protocol, Protocol::Http1);
    assert_eq!(cfg.routes[0].chain, Vec::new());
}

#[test]
fn every_problem_is_reported_with_its_line() {
    let text = r#"
listen = "127.0.0.1:9901"
typo = true

[services.users]
urls = []
request_timeout = "soon"

[[clients]]
name = "Web"
identify = [{ header = "x-client" }, { api_key_header = "x-key", sha256 = ["abc"] }]

[[routes]]
id = "home"
clients = ["web"]
path = "/home/{*rest}/more"
service = "users"
"#;
    assert_eq!(
        problems(text),
        [
            "2:1 listen: must differ from the admin listener (`admin.listen` = 127.0.0.1:9901)",
            "3:1 typo: unknown field `typo`, expected one of `listen`, `admin`, `server`, `tls`, `headers`, `identity`, `services`, `clients`, `routes`, `plugins`, `reload`, `access_log`, `tracing`",
            "6:1 services.users.urls: a service needs at least one URL",
            "7:1 services.users.request_timeout: invalid value: string \"soon\", expected a duration",
            "10:1 clients[0].name: names start with a lowercase letter and use only lowercase letters, digits, `-` and `_` (at most 64 characters)",
            "11:13 clients[0].identify[0]: a rule needs exactly one of `equals` or `regex` (with `header`, `client_cert` or `jwt_claim`), `user_agent`, `host` or `api_key_header` (with `sha256`)",
            "11:38 clients[0].identify[1]: `abc` is not a SHA-256 digest (64 hex characters)",
            "15:12 routes[0].clients[0]: unknown client `web`",
            "16:1 routes[0].path: `{*rest}` must be the last segment",
        ]
    );
}

#[test]
fn syntax_errors_point_at_the_position() {
    let got = problems("listen = \"127.0.0.1:1\"\n[server\n");
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("2:8 (syntax): "), "{got:?}");
}

#[test]
fn references_are_checked() {
    let text = r#"
[identity]
default_client = "ghost"

[services.users]
urls = ["http://127.0.0.1:1"]

[[clients]]
name = "web"

[[routes]]
id = "a"
path = "/a/{id}"
service = "nope"
rewrite = "/b/{other}"

[[routes]]
id = "a"
path = "/b"

[[routes]]
id = "c"
path = "/c"
service = "users"
egress = ["users", "ghost"]
[[routes.chain]]
plugin = "Fields"
on_error = "explode"
limits = { cpu_budget = "0s", max_memory_bytes = 1 }
"#;
    let got = problems(text);
    let want = [
        "3:1 identity.default_client: unknown client `ghost`",
        "14:1 routes[0].service: unknown service `nope`",
        "15:1 routes[0].rewrite: `{other}` is not captured by the path `/a/{id}`",
        "18:1 routes[1].id: duplicate route id `a`",
        "18:1 routes[1].id: the route has no `service` and no `chain`: nothing would answer it",
        "25:20 routes[2].egress[1]: unknown service `ghost`",
        "28:1 routes[2].chain[0].on_error: unknown variant `explode`, expected `fail-closed` or `fail-open`",
        "29:12 routes[2].chain[0].limits.cpu_budget: must be between 1ms and 1m",
        "29:31 routes[2].chain[0].limits.max_memory_bytes: must be between 1048576 and 67108864",
        "27:1 routes[2].chain[0].plugin: names start with a lowercase letter and use only lowercase letters, digits, `-` and `_` (at most 64 characters)",
    ];
    for w in want {
        assert!(got.iter().any(|g| g == w), "missing {w:?} in {got:#?}");
    }
}

#[test]
fn names_are_label_safe() {
    assert!(is_valid_name("mobile-app_2"));
    for bad in ["", "Mobile", "2fa", "a b", "a.b", &"x".repeat(65)] {
        assert!(!is_valid_name(bad), "{bad:?}");
    }
}

/// Every file in `config/` loads; every file in `config/invalid/` fails with exactly the
/// problems in its `.err` twin. `UPDATE_EXPECT=1 cargo test` rewrites the `.err` files.
#[test]
fn config_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut valid = 0;
    for entry in std::fs::read_dir(&root).expect("config/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = Config::load(&path) {
                panic!("{} should be valid:\n{e}", path.display());
            }
            valid += 1;
        }
    }

    let invalid = root.join("invalid");
    let mut checked = 0;
    for entry in std::fs::read_dir(&invalid).expect("config/invalid/ exists") {
        let path = entry.expect("readable dir entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("readable file");
        let err = Config::from_toml(&text, &format!("config/invalid/{name}"))
            .expect_err(&format!("{name} must be invalid"));
        let got = format!("{err}\n");
        let expect_path = path.with_extension("err");
        if std::env::var_os("UPDATE_EXPECT").is_some() {
            std::fs::write(&expect_path, &got).expect("write .err");
        }
        let want = std::fs::read_to_string(&expect_path).unwrap_or_else(|_| {
            panic!(
                "missing {}; run with UPDATE_EXPECT=1",
                expect_path.display()
            )
        });
        assert_eq!(
            got,
            want,
            "{name}: problems differ from {}",
            expect_path.display()
        );
        checked += 1;
    }
    assert!(checked >= 3, "expected several invalid examples");
    assert!(
        valid >= 2,
        "expected config/full.toml and config/demo.toml at least"
    );
}

/// Every ```toml block in the README and docs is a complete, valid config: examples that users
/// copy must work.
#[test]
fn documentation_examples_load() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut docs = vec![root.join("README.md")];
    for dir in ["docs", "docs/dev"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            docs.extend(
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "md")),
            );
        }
    }
    let mut blocks = 0;
    for doc in docs {
        let text = std::fs::read_to_string(&doc).expect("readable doc");
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```toml\n") {
            let body = &rest[start + 8..];
            let end = body.find("```").expect("closed code block");
            let origin = format!("{} (block {})", doc.display(), blocks + 1);
            if let Err(e) = Config::from_toml(&body[..end], &origin) {
                panic!("{e}");
            }
            blocks += 1;
            rest = &body[end + 3..];
        }
    }
    assert!(blocks >= 1, "the README shows a full config example");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let full = std::fs::read_to_string(root.join("config/full.toml")).expect("full.toml");
    assert!(
        readme.contains(&format!("```toml\n{full}```")),
        "the README's configuration reference must be config/full.toml verbatim"
    );
}

#[test]
fn plugin_pools_stay_within_the_address_space_limit() {
    // The defaults fit; 4 GiB reservations bound `max_instances` well below its range, and
    // capped reservations lift that bound.
    assert_eq!(problems(MINIMAL), Vec::<String>::new());
    let full = format!("{MINIMAL}\n[plugins]\nmax_instances = 5000\n");
    let found = problems(&full);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("plugins.max_instances: 5000 instances would reserve")
            && found[0].contains("memory_reservation = \"capped\""),
        "{found:?}"
    );
    let capped = format!("{full}memory_reservation = \"capped\"\n");
    assert_eq!(problems(&capped), Vec::<String>::new());
    let wrong = format!("{MINIMAL}\n[plugins]\nmemory_reservation = \"huge\"\n");
    assert!(problems(&wrong)[0].contains("memory_reservation"));
}

#[test]
fn reused_instances_leave_most_of_the_pool_to_fresh_ones() {
    let reused = |steps: usize, plugins: &str| {
        let chain = vec![r#"{ plugin = "fields", instances = "reused" }"#; steps].join(", ");
        format!("{MINIMAL}chain = [{chain}]\n\n[plugins]\nmax_instances = 64\n{plugins}")
    };
    // 4 uses × the default 8 idle = 32: half of 64, fine; a fifth use is one too many.
    assert_eq!(problems(&reused(4, "")), Vec::<String>::new());
    let found = problems(&reused(5, ""));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("12:31 routes[0].chain[0].instances: 5 plugin uses")
            && found[0].contains("may keep 40 idle instances"),
        "{found:?}"
    );
    assert_eq!(
        problems(&reused(5, "reuse = { max_idle = 6 }")),
        Vec::<String>::new()
    );
    let bad = problems(&reused(1, "reuse = { max_idle = 0, max_uses = 0 }"));
    assert_eq!(bad.len(), 2, "{bad:?}");
    let typo = problems(&format!(
        "{MINIMAL}chain = [{{ plugin = \"fields\", instances = \"shared\" }}]\n"
    ));
    assert!(
        typo[0].contains("unknown variant `shared`, expected `per-request` or `reused`"),
        "{typo:?}"
    );
}

#[test]
fn plugin_pins_are_hashes_of_plugins_in_use_and_can_be_required() {
    let pin = "a".repeat(64);
    let with =
        |chain: &str, plugins: &str| format!("{MINIMAL}chain = [{chain}]\n\n[plugins]\n{plugins}");
    let fields = r#"{ plugin = "fields" }"#;
    let both = r#"{ plugin = "fields" }, { plugin = "voice" }"#;
    assert_eq!(
        problems(&with(fields, &format!("sha256 = {{ fields = \"{pin}\" }}"))),
        Vec::<String>::new()
    );
    // Upper-case hex is a hash too.
    assert_eq!(
        problems(&with(
            fields,
            &format!("sha256 = {{ fields = \"{}\" }}", pin.to_uppercase())
        )),
        Vec::<String>::new()
    );
    let found = problems(&with(
        fields,
        &format!("sha256 = {{ fields = \"abc\", feilds = \"{pin}\" }}"),
    ));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found
            .iter()
            .any(|p| p.contains("plugins.sha256.fields: must be a SHA-256 in hex")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("plugins.sha256.feilds: no route's chain uses plugin `feilds`")),
        "{found:?}"
    );
    let required = problems(&with(
        both,
        &format!("require_sha256 = true\nsha256 = {{ fields = \"{pin}\" }}"),
    ));
    assert_eq!(required.len(), 1, "{required:?}");
    assert!(
        required[0].contains("routes[0].chain[1].plugin: `plugins.require_sha256` is on and plugin `voice` has no pin"),
        "{required:?}"
    );
}

#[test]
fn canaries_name_used_unpinned_plugins_known_clients_and_one_per_chain() {
    let with =
        |chain: &str, plugins: &str| format!("{MINIMAL}chain = [{chain}]\n\n[plugins]\n{plugins}");
    let fields = r#"{ plugin = "fields" }"#;
    let good = r#"canary = { fields = { file = "fields-next.wasm", percent = 10, clients = ["web"], sticky_header = "x-user-id" } }"#;
    assert_eq!(problems(&with(fields, good)), Vec::<String>::new());
    let bad = problems(&with(
        fields,
        r#"canary = { fields = { file = "../fields.wasm", percent = 101, clients = ["tv"], sticky_header = "x user" }, voice = { file = "voice-2.wasm", percent = 5 } }"#,
    ));
    for expected in [
        "plugins.canary.fields.file: must be a `.wasm` file name in `plugins.dir` other than `fields.wasm`",
        "plugins.canary.fields.percent: must be between 0 and 100",
        "plugins.canary.fields.sticky_header: is not a valid header name",
        "plugins.canary.fields.clients[0]: unknown client `tv`",
        "plugins.canary.voice: no route's chain uses plugin `voice`",
    ] {
        assert!(
            bad.iter().any(|p| p.contains(expected)),
            "{expected}: {bad:?}"
        );
    }
    assert_eq!(bad.len(), 5, "{bad:?}");
    let same_file = problems(&with(
        fields,
        r#"canary = { fields = { file = "fields.wasm", percent = 10 } }"#,
    ));
    assert_eq!(same_file.len(), 1, "{same_file:?}");
    let pinned = problems(&with(
        fields,
        &format!(
            "sha256 = {{ fields = \"{}\" }}\ncanary = {{ fields = {{ file = \"f2.wasm\", percent = 10 }} }}",
            "a".repeat(64)
        ),
    ));
    assert!(
        pinned[0].contains("plugins.canary.fields: plugin `fields` is pinned"),
        "{pinned:?}"
    );
    let two = problems(&with(
        r#"{ plugin = "fields" }, { plugin = "voice" }"#,
        r#"canary = { fields = { file = "f2.wasm", percent = 10 }, voice = { file = "v2.wasm", percent = 10 } }"#,
    ));
    assert_eq!(two.len(), 1, "{two:?}");
    assert!(
        two[0].contains("routes[0].chain: plugins `fields`, `voice` all have a canary"),
        "{two:?}"
    );
}
