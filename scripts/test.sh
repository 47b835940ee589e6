#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test in the workspace.
# This is the README's test command, and CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# These machines set RUSTUP_AUTO_INSTALL=0, so rust-toolchain.toml alone installs nothing:
# add the plugin target explicitly (idempotent).
rustup target add wasm32-wasip2

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
