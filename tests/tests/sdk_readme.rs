//! The SDK README is enough to write, test, build and deploy a plugin: this test takes the
//! `greet` plugin and its tests exactly as `plugin-sdk/README.md` shows them (plus every other
//! Rust snippet there), makes the crate its step 1 describes, runs `cargo test` on it natively,
//! builds it for wasm32-wasip2, and serves it from the proxy with the route its step 4 shows.

use std::path::Path;

use bff_proxy_tests::plugins::{TARGET, cargo, example_plugins, repo_root};
use bff_proxy_tests::{Reply, TestProxy, Upstream, get};

/// The fenced code blocks of `markdown` with the given info string, in order.
fn blocks<'a>(markdown: &'a str, lang: &str) -> Vec<&'a str> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = markdown;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("\n```").expect("every code block is closed");
        out.push(&body[..=end]);
        rest = &body[end + 4..];
    }
    out
}

fn run(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_readme_plugin_builds_tests_and_serves() {
    let repo = repo_root();
    let readme = std::fs::read_to_string(repo.join("plugin-sdk/README.md")).expect("SDK README");
    let tomls = blocks(&readme, "toml");
    let rust = blocks(&readme, "rust");
    let manifest = tomls
        .iter()
        .find(|b| b.contains("[package]"))
        .expect("step 1 shows Cargo.toml");
    let cargo_config = tomls
        .iter()
        .find(|b| b.contains("[target.wasm32-wasip2]"))
        .expect("step 1 shows .cargo/config.toml");
    let route = tomls
        .iter()
        .find(|b| b.contains("[[routes]]"))
        .expect("step 4 shows a route");
    let plugin = rust
        .iter()
        .find(|b| b.contains("export!(Greet)"))
        .expect("step 2 shows the plugin");
    let tests = rust
        .iter()
        .find(|b| b.contains("#[cfg(test)]"))
        .expect("step 3 shows its tests");
    let snippets: Vec<&&str> = rust
        .iter()
        .filter(|b| !std::ptr::eq(**b, *plugin) && !std::ptr::eq(**b, *tests))
        .collect();
    assert!(snippets.len() >= 2, "the call and JSON snippets");

    // Step 1, with the SDK path pointing at this checkout. Its own workspace; the example
    // plugins' lock file and target dir, so nothing new is downloaded or rebuilt.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-readme-greet");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("src")).expect("crate dir");
    let sdk = repo.join("plugin-sdk");
    let manifest = manifest.replace(
        "path = \"../plugin-sdk\"",
        &format!("path = {:?}", sdk.display().to_string()),
    );
    assert!(manifest.contains(&sdk.display().to_string()), "{manifest}");
    std::fs::write(dir.join("Cargo.toml"), format!("{manifest}\n[workspace]\n")).expect("write");
    std::fs::copy(repo.join("plugins/Cargo.lock"), dir.join("Cargo.lock")).expect("lock file");
    std::fs::create_dir_all(dir.join(".cargo")).expect(".cargo dir");
    std::fs::write(dir.join(".cargo/config.toml"), cargo_config).expect("write");
    let mut lib = format!("{plugin}\n{tests}\n");
    for (i, s) in snippets.iter().enumerate() {
        // The JSON snippet asserts what its comments say: run it.
        let test = if s.contains("fn reshape()") {
            "#[test]\nfn runs() { reshape().expect(\"the JSON snippet runs\"); }\n"
        } else {
            ""
        };
        lib.push_str(&format!(
            "\n#[allow(dead_code)]\nmod readme_snippet_{i} {{\n{s}{test}}}\n"
        ));
    }
    assert!(lib.contains("fn runs()"), "the JSON snippet");
    std::fs::write(dir.join("src/lib.rs"), lib).expect("write lib.rs");
    let target_dir = repo.join("plugins/target");

    // Step 3: native tests.
    let out = run(
        cargo(&dir)
            .args(["test", "--offline"])
            .env("CARGO_TARGET_DIR", &target_dir),
        "cargo test of the README plugin",
    );
    assert!(out.contains("test result: ok. 4 passed"), "{out}");

    // Step 4: build, deploy next to the example plugins, serve.
    run(
        cargo(&dir)
            .args(["build", "--offline", "--release", "--target", TARGET])
            .env("CARGO_TARGET_DIR", &target_dir),
        "wasm build of the README plugin",
    );
    let wasm = target_dir.join(TARGET).join("release").join("greet.wasm");
    assert!(wasm.is_file(), "{}", wasm.display());
    assert_eq!(wasm.parent(), Some(example_plugins()));

    let users = Upstream::builder("users")
        .route(
            "/users/u-1",
            Reply::fixed(200, r#"{"display_name": "Maya"}"#)
                .header("content-type", "application/json"),
        )
        .start()
        .await;
    let config = format!(
        r#"
[identity]
default_client = "web"
[services.users]
urls = ["{}"]
[[clients]]
name = "web"
[plugins]
dir = {:?}
{route}"#,
        users.url(),
        example_plugins().display().to_string(),
    );
    let proxy = TestProxy::start(&config).await;
    let resp = get(proxy.addr(), "/hello/u-1", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json(), serde_json::json!({"message": "Hej, Maya!"}));
    let resp = get(proxy.addr(), "/hello/nobody", &[]).await;
    assert_eq!(resp.json(), serde_json::json!({"message": "Hej, nobody!"}));
}
