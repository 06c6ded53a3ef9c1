#!/usr/bin/env bash
# Browser tests of the demo client and the dashboard, from a fresh machine that has Rust, gcc,
# python3 and node/npm: installs Debian's Chromium if missing and playwright-core from npm, builds
# the server (the web files are embedded in the binary), starts it in dev mode on free ports
# with a temporary data dir, runs the tests in headless Chromium, and stops the server.
#
#   bash web/tests/run.sh                       # everything
#   COURIER_BIN=path/to/courier bash web/tests/run.sh   # skip the build, use this binary
#   bash web/tests/run.sh --test-name-pattern=typing    # extra arguments go to `node --test`
#   bash web/tests/run.sh --screenshots         # then retake docs/demo.png and docs/dashboard.png
set -euo pipefail

shots="${SCREENSHOTS_DIR:-}"
if [ "${1:-}" = "--screenshots" ]; then
  shift
  shots="${shots:-$(cd "$(dirname "$0")/../.." && pwd)/docs}"
fi

start_dir="$(pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$here"

log() { echo "== $*"; }

# --- Chromium (Debian's package; test tools must not download a browser of their own)
chromium_bin="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium_bin" ]; then
  log "installing chromium"
  sudo_cmd=()
  if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q chromium
fi
export CHROMIUM="$chromium_bin"

# --- Node.js and npm (on this project's machines already; Debian's packages otherwise)
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  log "installing nodejs and npm"
  sudo_cmd=()
  if [ "$(id -u)" != 0 ]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q nodejs npm
fi

# --- playwright-core (never its browser download: it is only the driver)
log "npm ci (playwright-core)"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi

# --- the server
if [ -n "${COURIER_BIN:-}" ]; then
  case "$COURIER_BIN" in
    /*) bin="$COURIER_BIN" ;;
    *) bin="$start_dir/$COURIER_BIN" ;;
  esac
else
  log "cargo build --release"
  (cd "$root" && cargo build --release --quiet)
  bin="$root/target/release/courier"
fi
[ -x "$bin" ] || { echo "no server binary at $bin" >&2; exit 1; }

# glommio needs at least 512 KiB of lockable memory for io_uring.
if [ "$(ulimit -l)" != "unlimited" ] && [ "$(ulimit -l)" -lt 1024 ]; then
  ulimit -l 1024 || echo "warning: RLIMIT_MEMLOCK is $(ulimit -l) KiB; the server may refuse to start"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/courier-web-tests.XXXXXX")"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A client-token secret (to test sign-in with a JWT) and an admin token (the dashboard asks for it).
COURIER_AUTH_SECRET="$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
COURIER_ADMIN_TOKEN="$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
export COURIER_AUTH_SECRET COURIER_ADMIN_TOKEN

log "starting $bin"
MIMALLOC_ALLOW_THP=0 "$bin" serve --dev --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --data-dir "$work/data" >"$work/stdout" 2>"$work/stderr" &
server_pid=$!

client_addr=""
admin_addr=""
for _ in $(seq 300); do
  client_addr="$(sed -n 's/^listening on \(.*\)$/\1/p' "$work/stdout" | head -n1)"
  admin_addr="$(sed -n 's/^admin listening on \(.*\)$/\1/p' "$work/stdout" | head -n1)"
  if [ -n "$client_addr" ] && [ -n "$admin_addr" ]; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if [ -z "$client_addr" ] || [ -z "$admin_addr" ]; then
  echo "the server did not print both 'listening on' and 'admin listening on':" >&2
  cat "$work/stdout" "$work/stderr" >&2
  exit 1
fi
export COURIER_WEB_URL="http://$client_addr"
export COURIER_ADMIN_URL="http://$admin_addr"
log "client port $client_addr, admin port $admin_addr"

status=0
node --test --test-concurrency=1 client.test.mjs dashboard.test.mjs "$@" || status=$?
if [ "$status" = 0 ] && [ -n "$shots" ]; then
  log "screenshots into $shots"
  node screenshots.mjs "$shots" || status=$?
fi
if [ "$status" != 0 ]; then
  echo "-- server stderr (last 60 lines)" >&2
  tail -n 60 "$work/stderr" >&2
fi
exit "$status"
