//! The `bff-proxy` binary's command line: `check` output and exit codes, and `run` refusing a
//! bad config. (Lives in the proxy crate because only its tests can locate the built binary.)

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bff-proxy"));
    c.env_remove("RUST_LOG").current_dir(repo());
    c
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A temp dir for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bff-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A valid config without plugins (the example configs use plugins, which the tests crate
/// builds and checks: tests/tests/plugin_examples.rs).
const PLAIN: &str = r#"
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[services.none]
urls = ["http://127.0.0.1:9"]
[[clients]]
name = "web"
[[clients]]
name = "partner"
identify = [{ api_key_header = "x-api-key", sha256 = ["5f7b2ed74a9736a538a6fb5a5a1a76afdcdd0d177d7fc6e79c6b6843527d848d"] }]
[[routes]]
id = "all"
path = "/{*rest}"
service = "none"
"#;

#[test]
fn check_accepts_valid_files_with_a_summary() {
    let dir = TempDir::new("valid");
    let cfg = dir.write("proxy.toml", PLAIN);
    let out = bin()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run bff-proxy");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with(&format!(
            "{}: ok: 1 service(s), 2 client(s) (1 by API key), 1 route(s)",
            cfg.display()
        )),
        "{stdout}"
    );
}

/// `check` loads the plugins a config uses, resolving `plugins.dir` against the config file:
/// a copy of config/full.toml whose plugin dir has no plugins must report each missing file
/// (with the resolved path) and exit 64.
#[test]
fn check_loads_plugins_relative_to_the_config_file() {
    let dir = TempDir::new("plugins");
    let full = std::fs::read_to_string(repo().join("config/full.toml")).expect("read full.toml");
    let text = full.replace(
        "dir = \"../plugins/target/wasm32-wasip2/release\"",
        "dir = \"no-plugins-here\"",
    );
    assert_ne!(text, full, "config/full.toml sets plugins.dir");
    let cfg = dir.write("full.toml", &text);
    let out = bin()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run bff-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "stderr: {stderr}");
    for plugin in ["fields", "aggregate"] {
        let missing = dir.0.join("no-plugins-here").join(format!("{plugin}.wasm"));
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{plugin}: {stderr}"
        );
    }
}

#[test]
fn check_lists_every_problem_and_exits_64() {
    let out = bin()
        .args(["check", "--config", "config/invalid/bad-references.toml"])
        .output()
        .expect("run bff-proxy");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = std::fs::read_to_string(repo().join("config/invalid/bad-references.err"))
        .expect("expected problems file");
    assert_eq!(stderr, format!("error: {expected}"));
}

#[test]
fn missing_file_exits_66() {
    let out = bin()
        .args(["check", "--config", "config/does-not-exist.toml"])
        .output()
        .expect("run bff-proxy");
    assert_eq!(out.status.code(), Some(66));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read config file config/does-not-exist.toml"),
        "{stderr}"
    );
}

#[test]
fn run_refuses_an_invalid_config_before_binding() {
    let out = bin()
        .args(["run", "--config", "config/invalid/unknown-keys.toml"])
        .output()
        .expect("run bff-proxy");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("8 problems found"));
}

#[test]
fn bad_usage_exits_2() {
    let out = bin().args(["serve"]).output().expect("run bff-proxy");
    assert_eq!(out.status.code(), Some(2));
    let out = bin()
        .args(["--log", "[[[", "check", "--config", "config/full.toml"])
        .output()
        .expect("run bff-proxy");
    assert_eq!(out.status.code(), Some(2));
}

/// Spawns `bff-proxy run` with JSON logs and waits for "proxy ready"; returns the child and
/// its admin address.
fn spawn_ready(cfg: &std::path::Path) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};

    let mut child = bin()
        .args(["--log-format", "json", "run", "--config"])
        .arg(cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn bff-proxy");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut admin = None;
    let mut line = String::new();
    while admin.is_none() && stderr.read_line(&mut line).expect("read log") > 0 {
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        // "proxy ready" is logged after the ready flag is set, so /readyz must answer 200.
        if v["message"] == "proxy ready" {
            admin = v["admin"].as_str().map(str::to_owned);
        }
        line.clear();
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let admin = admin.expect("the proxy logs its admin address when ready");
    (child, admin)
}

/// `GET path` on `addr` with a bounded wait; the raw response.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("set a read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits (bounded) for the child to exit; its exit code.
fn exit_code(child: &mut std::process::Child) -> Option<i32> {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bff-proxy did not exit after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_serves_then_exits_0_on_sigterm() {
    let dir = TempDir::new("run");
    let cfg = dir.write("proxy.toml", PLAIN);
    let (mut child, admin) = spawn_ready(&cfg);
    let resp = http_get(&admin, "/readyz");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    signal(&child, "-TERM");
    assert_eq!(exit_code(&mut child), Some(0));
}

/// `SIGHUP` reloads the config file (file watching is off here, so only the signal can).
#[test]
fn sighup_reloads_the_config() {
    use std::time::{Duration, Instant};

    let dir = TempDir::new("hup");
    let quiet = format!("{PLAIN}\n[reload]\nwatch = false\n");
    let cfg = dir.write("proxy.toml", &quiet);
    let (mut child, admin) = spawn_ready(&cfg);
    dir.write(
        "proxy.toml",
        &quiet.replace(
            "[[routes]]\nid = \"all\"",
            "[[routes]]\nid = \"everything\"",
        ),
    );
    signal(&child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http_get(&admin, "/admin/reloads");
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
        if body.contains(r#""trigger":"signal""#) {
            assert!(body.contains(r#""outcome":"applied""#), "{body}");
            assert!(body.contains(r#""config_changed":true"#), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "no reload after SIGHUP: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&child, "-TERM");
    assert_eq!(exit_code(&mut child), Some(0));
}

#[test]
fn an_access_log_that_cannot_be_opened_fails_startup_with_73() {
    let dir = TempDir::new("access-log");
    let missing = dir.0.join("no-such-dir").join("access.log");
    let cfg = dir.write(
        "bff.toml",
        &format!(
            "{PLAIN}\n[access_log]\noutput = {:?}\n",
            missing.display().to_string()
        ),
    );
    let out = bin()
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .expect("run bff-proxy");
    assert_eq!(out.status.code(), Some(73));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot open the access log") && stderr.contains("no-such-dir"),
        "{stderr}"
    );
}
