#!/usr/bin/env bash
# Instructions bff-proxy executes per proxied request, counted by callgrind: deterministic where
# req/s on a shared VM is not, so it shows what a change to the request path costs.
#
#   benches/callgrind.sh [N]        (needs valgrind, nginx and curl; N defaults to 2000)
#
# nginx serves a static 1000-byte file; the release `bff-proxy run` (one worker, access log
# off) proxies to it under callgrind; curl sends requests on one keep-alive connection. The
# figure is (instructions with 500 + N requests - instructions with 500) / N, so startup and
# shutdown cancel out.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
for tool in valgrind nginx curl python3; do
  command -v "$tool" > /dev/null || { echo "error: $tool is not installed" >&2; exit 2; }
done
cargo build --release --locked -p bff-proxy
BIN=$PWD/target/release/bff-proxy

DIR=$(mktemp -d)
trap 'kill $(cat "$DIR/nginx.pid" 2> /dev/null) 2> /dev/null || true; rm -rf "$DIR"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
UP=$(free_port); LISTEN=$(free_port); ADMIN=$(free_port)

mkdir -p "$DIR/www"
python3 -c "print('{\"pad\":\"' + 'x' * 989 + '\"}', end='')" > "$DIR/www/bench"
cat > "$DIR/nginx.conf" <<EOF
worker_processes 1;
master_process off;
pid $DIR/nginx.pid;
error_log $DIR/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $DIR/cb; proxy_temp_path $DIR/p; fastcgi_temp_path $DIR/f;
  uwsgi_temp_path $DIR/u; scgi_temp_path $DIR/s;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; root $DIR/www; default_type application/json; }
}
EOF
nginx -c "$DIR/nginx.conf"

cat > "$DIR/bff.toml" <<EOF
listen = "127.0.0.1:$LISTEN"
[admin]
listen = "127.0.0.1:$ADMIN"
[server]
worker_threads = 1
[identity]
default_client = "web"
[services.upstream]
urls = ["http://127.0.0.1:$UP"]
[[clients]]
name = "web"
[[routes]]
id = "bench"
methods = ["GET"]
path = "/bench"
service = "upstream"
[access_log]
enabled = false
EOF

# Total instructions of one bff-proxy run that serves $1 requests.
instructions() {
  local out="$DIR/callgrind.$1.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" --log warn run --config "$DIR/bff.toml" \
    > "$DIR/valgrind.$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$LISTEN/bench?[1-$1]" > /dev/null
  kill -INT "$pid"
  wait "$pid" || true
  sed -n 's/^summary: //p' "$out"
}

BASE=$(instructions 500)
FULL=$(instructions $((500 + N)))
echo "instructions per proxied request (1000-byte body, $N requests): $(((FULL - BASE) / N))"
