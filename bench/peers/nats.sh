#!/usr/bin/env bash
# Installs Debian's nats-server (if missing) and runs it with a WebSocket listener on loopback.
#   bench/peers/nats.sh [WS_PORT] [CPUS]     (defaults: 8080, no pinning)
# Prints `listening on 127.0.0.1:WS_PORT`; stop it with Ctrl-C or SIGTERM.
# `courier-bench --target nats` starts its own nats-server when given no --url; this script
# is for running one by hand: courier-bench fanout --target nats --url ws://127.0.0.1:8080 --server-pid PID
set -euo pipefail
port="${1:-8080}"
cpus="${2:-}"
if ! command -v nats-server >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
  else
    echo "nats-server is not installed: sudo apt-get install nats-server" >&2
    exit 1
  fi
fi
dir="$(mktemp -d /tmp/nats-peer.XXXXXX)"
trap 'rm -rf "$dir"' EXIT
cat >"$dir/nats.conf" <<CONF
listen: 127.0.0.1:-1
max_connections: 100000
max_pending: 67108864
websocket {
  listen: "127.0.0.1:${port}"
  no_tls: true
  compression: false
}
CONF
echo "nats-server $(nats-server --version 2>&1 | head -1); listening on 127.0.0.1:${port}"
if [ -n "$cpus" ]; then
  taskset -c "$cpus" nats-server -c "$dir/nats.conf"
else
  nats-server -c "$dir/nats.conf"
fi
