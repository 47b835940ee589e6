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
# The SDK's Wasm side (bindings, exports) only compiles for the plugin target.
cargo clippy -p bff-plugin-sdk --target wasm32-wasip2 --locked -- -D warnings
cargo test --workspace --locked

# The example plugins: their own workspace, unit-tested natively with the SDK's harness (the
# proxy tests above already built them for wasm32-wasip2 and ran them end to end).
for ws in plugins tests/plugins; do
  cargo fmt --manifest-path "$ws/Cargo.toml" --all --check
done
cargo clippy --manifest-path plugins/Cargo.toml --all-targets --locked -- -D warnings
cargo clippy --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --locked -- -D warnings
cargo test --manifest-path plugins/Cargo.toml --locked
