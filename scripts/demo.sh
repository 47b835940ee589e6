#!/usr/bin/env bash
# Runs the demo: demo upstream services + bff-proxy with config/demo.toml on the default ports
# (data plane 127.0.0.1:8080, admin 127.0.0.1:9901). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

# These machines set RUSTUP_AUTO_INSTALL=0: add the plugin target explicitly (idempotent).
rustup target add wasm32-wasip2

exec cargo run --release --locked -p bff-proxy -- demo "$@"
