#!/usr/bin/env bash
# Runs the demo: demo upstream services + the example plugins + bff-proxy with config/demo.toml
# on the default ports (data plane 127.0.0.1:8080, admin 127.0.0.1:9901). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

# These machines set RUSTUP_AUTO_INSTALL=0: add the plugin target explicitly (idempotent).
rustup target add wasm32-wasip2

# The demo's plugin chains run the example plugins: build them for the plugin target first
# (from plugins/, so its .cargo/config.toml applies).
(cd plugins && cargo build --release --locked --target wasm32-wasip2)

exec cargo run --release --locked -p bff-proxy -- demo "$@"
