//! Builds Wasm plugins from source inside the test run (no binary `.wasm` is committed): the
//! test plugins in `tests/plugins/` (hostile ones included) and the examples in `plugins/`.
//!
//! Each workspace is built once per test process with the same cargo that runs the tests; cargo's
//! own lock serializes test binaries building at the same time, and an unchanged workspace is a
//! no-op build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The wasm target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// A `cargo` command run in `dir`, with the same cargo that runs the tests and none of the
/// outer build's settings (the outer `cargo test` may set these for the host build).
pub fn cargo(dir: &Path) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// Builds the cargo workspace at `dir` for [`TARGET`] in release mode and returns the directory
/// holding the `.wasm` files. Panics with cargo's output if the build fails.
fn build(dir: &Path) -> PathBuf {
    let out = cargo(dir)
        .args(["build", "--release", "--locked", "--target", TARGET])
        .output()
        .expect("run cargo to build the plugins");
    assert!(
        out.status.success(),
        "building the plugins in {} failed (is the target installed? `rustup target add {TARGET}`):\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("target").join(TARGET).join("release")
}

/// The directory with the test plugins (`probe.wasm`, `old_contract.wasm`, `slow_start.wasm`),
/// built on first use.
pub fn test_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build(&repo_root().join("tests").join("plugins")))
}

/// The directory with the example plugins (`aggregate.wasm`, `fields.wasm`, `voice.wasm`),
/// built on first use.
pub fn example_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build(&repo_root().join("plugins")))
}

/// The marker the `probe` plugin reports as its version (`VERSION` in its source).
const PROBE_VERSION_MARKER: &[u8] = b"probe-version:AAAAAAAAAA";

/// The `probe` plugin as a distinct version: its version marker patched to ten `tag`
/// characters (`'A'` is the build as is). Different tags give different files (hashes) whose
/// `version` mode reports the tag.
pub fn probe_version(tag: char) -> Vec<u8> {
    assert!(
        tag.is_ascii_alphanumeric(),
        "tags are one ASCII letter or digit"
    );
    let mut bytes = std::fs::read(test_plugins().join("probe.wasm")).expect("read probe.wasm");
    let at = bytes
        .windows(PROBE_VERSION_MARKER.len())
        .position(|w| w == PROBE_VERSION_MARKER)
        .expect("probe.wasm carries its version marker");
    let start = at + PROBE_VERSION_MARKER.len() - 10;
    bytes[start..at + PROBE_VERSION_MARKER.len()].fill(tag as u8);
    bytes
}

/// What [`probe_version`]'s `version` mode reports for `tag`.
pub fn version_string(tag: char) -> String {
    std::iter::repeat_n(tag, 10).collect()
}

/// The directory with the Python example plugin (`py-summary.wasm`, from `plugins/py-summary/`),
/// built on first use by componentize-py at the version `plugins/py-summary/requirements.txt`
/// pins, installed from PyPI into a virtualenv under `target/py-plugins/` (kept between runs).
pub fn python_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = repo_root();
        let src = root.join("plugins").join("py-summary");
        let work = root.join("target").join("py-plugins");
        let venv = work.join("venv");
        let out = work.join("out");
        let run = |cmd: &mut Command, what: &str| {
            let output = cmd
                .output()
                .unwrap_or_else(|e| panic!("{what}: cannot run it: {e}"));
            assert!(
                output.status.success(),
                "{what} failed:\n{}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        };
        if !venv.join("bin").join("pip").exists() {
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv (the Python plugin's toolchain)",
            );
        }
        // Quick and offline once the pinned version is installed.
        run(
            Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(src.join("requirements.txt")),
            "pip install componentize-py",
        );
        std::fs::create_dir_all(&out).expect("create target/py-plugins/out");
        // Built from a copy: componentize-py leaves `__pycache__` next to the sources it imports.
        let copy = work.join("src");
        std::fs::create_dir_all(&copy).expect("create target/py-plugins/src");
        std::fs::copy(src.join("app.py"), copy.join("app.py")).expect("copy app.py");
        run(
            Command::new(venv.join("bin").join("componentize-py"))
                .arg("-d")
                .arg(root.join("plugin-sdk").join("wit"))
                .args(["-w", "plugin", "componentize", "-p"])
                .arg(&copy)
                .arg("app")
                .arg("-o")
                .arg(out.join("py-summary.wasm")),
            "componentize-py (building plugins/py-summary)",
        );
        out
    })
}
