#!/usr/bin/env bash
# Owns the ejabberd peer of courier-bench: installs Debian's ejabberd (if missing and allowed),
# writes a private config and spool in a temp dir, and runs one ejabberd VM on loopback with an
# XMPP-over-WebSocket listener (RFC 7395) plus the HTTP API the bench registers its users with.
#   bench/peers/ejabberd.sh [--no-install] [WS_PORT] [CPUS]     (defaults: 5280, no pinning)
# Prints `pid PID` (the beam.smp to read /proc from) and then `listening on 127.0.0.1:WS_PORT`
# once the listener accepts. SIGTERM/SIGINT stop the VM cleanly (init:stop) and remove the dir.
# `courier-bench --target ejabberd` runs this same script (compiled in) with --no-install when
# given no --url; by hand:
#   courier-bench fanout --target ejabberd --url ws://127.0.0.1:5280 --server-pid PID
# Nothing of the system-wide install is used or changed besides the package's files: not
# /etc/ejabberd, /var/lib/ejabberd, /var/log/ejabberd, nor the init script; no epmd either.
set -euo pipefail
install=1
if [ "${1:-}" = "--no-install" ]; then
  install=0
  shift
fi
port="${1:-5280}"
cpus="${2:-}"

# Debian puts ejabberd's code under the multiarch lib dir, its dependencies under the OTP root.
libs="$(dirname "$(ls -d /usr/lib/*/ejabberd-[0-9]* 2>/dev/null | head -1)" 2>/dev/null || true)"
if [ ! -x /usr/bin/erl ] || [ ! -d "$libs" ] || [ "$libs" = "." ]; then
  if [ "$install" = 1 ] && [ "$(id -u)" = 0 ]; then
    # The package's postinst starts the system-wide daemon unless policy-rc.d says no; deny it
    # for the install only (when no policy exists) so installing leaves no ejabberd running.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ejabberd >&2 || rc=$?
    [ "$added_policy" = 1 ] && rm -f "$policy"
    [ -z "${rc:-}" ] || exit "$rc"
    libs="$(dirname "$(ls -d /usr/lib/*/ejabberd-[0-9]* | head -1)")"
  else
    echo "ejabberd is not installed: run bench/peers/ejabberd.sh as root (apt-get install ejabberd)" >&2
    exit 3
  fi
fi
version="$(basename "$(ls -d "$libs"/ejabberd-[0-9]* | head -1)")"

dir="$(mktemp -d /tmp/ejabberd-peer.XXXXXX)"
vm=""
cleanup() {
  if [ -n "$vm" ] && kill -0 "$vm" 2>/dev/null; then
    kill -TERM "$vm" 2>/dev/null || true
    # init:stop closes every session first; give it time, then stop waiting.
    for _ in $(seq 1 150); do kill -0 "$vm" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$vm" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# Why each setting:
# - loopback only; one `ejabberd_http` listener carries both /ws (RFC 7395) and /api (the bench
#   registers its users through mod_http_api's `register` command: one HTTP request per user,
#   far cheaper than one `ejabberdctl register` VM start per user).
# - backlog 4096 (= net.core.somaxconn here): connect opens 128 handshakes at a time per worker.
# - auth internal + plain password storage: real accounts (mod_offline needs them) and SASL
#   PLAIN with no SCRAM key derivation per login or per registration.
# - shapers off (c2s_shaper none, max_fsm_queue raised): the default `normal` shaper (3,000 B/s)
#   and the 10,000-stanza queue limit would throttle a benchmark, not measure the server.
# - max_user_sessions / offline limits raised; registration_timeout off is irrelevant for the
#   HTTP API but keeps in-band registration usable too.
# - mod_carboncopy (ejabberd's XEP-0280 message carbons) for multi-device, mod_offline for storage, mod_ping answers the
#   bench's flow-control pings; mod_stream_mgmt is left out (the bench does not resume).
cat >"$dir/ejabberd.yml" <<CONF
hosts:
  - localhost
loglevel: warning
log_rotate_count: 0
auth_method: internal
auth_password_format: plain
max_fsm_queue: 10000000
registration_timeout: infinity
websocket_timeout: 3600
websocket_ping_interval: 3600
listen:
  -
    port: ${port}
    ip: "127.0.0.1"
    module: ejabberd_http
    backlog: 4096
    request_handlers:
      /ws: ejabberd_http_ws
      /api: mod_http_api
acl:
  loopback:
    ip:
      - 127.0.0.0/8
access_rules:
  c2s:
    allow: all
  local:
    allow: all
api_permissions:
  "bench on loopback":
    from:
      - mod_http_api
    who:
      ip: 127.0.0.0/8
    what:
      - register
      - status
      - connected_users_number
shaper_rules:
  c2s_shaper: none
  max_user_sessions: 1000
  max_user_offline_messages: 100000
modules:
  mod_carboncopy: {}
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_ping: {}
  mod_http_api: {}
CONF

# The VM runs as the package's unprivileged user when we are root (ejabberdctl insists on
# that too); the private dir is its spool, log dir and HOME.
run_as=()
if [ "$(id -u)" = 0 ] && getent passwd ejabberd >/dev/null; then
  chown -R ejabberd: "$dir"
  run_as=(setpriv --reuid ejabberd --regid ejabberd --init-groups --)
fi
pin=()
[ -z "$cpus" ] || pin=(taskset -c "$cpus")

# `erl` execs erlexec, which execs beam.smp: the pid of this background job is the VM itself.
# No -sname: a node without distribution needs no epmd and opens no other port.
# +sbwt none: schedulers do not spin when idle, so the CPU the bench reads is work, not
# busy-waiting. +P/+Q: room for 20,000+ connections (one process and one port each).
cd "$dir"
env HOME="$dir" \
  ERL_LIBS="$libs" \
  EJABBERD_CONFIG_PATH="$dir/ejabberd.yml" \
  EJABBERD_LOG_PATH="$dir/ejabberd.log" \
  ERL_CRASH_DUMP="$dir/erl_crash.dump" \
  ERL_CRASH_DUMP_BYTES=0 \
  "${pin[@]}" "${run_as[@]}" \
  /usr/bin/erl -noinput -noshell +K true +P 1000000 +Q 262144 \
  +sbwt none +sbwtdcpu none +sbwtdio none \
  -mnesia dir "\"$dir/spool\"" -s ejabberd </dev/null &
vm=$!
echo "pid $vm"
up=0
for _ in $(seq 1 600); do
  if ! kill -0 "$vm" 2>/dev/null; then
    echo "ejabberd exited during start; log:" >&2
    tail -20 "$dir/ejabberd.log" >&2 2>/dev/null || true
    exit 1
  fi
  # Listeners start after the modules, so an accepting port means /ws and /api are served.
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    up=1
    break
  fi
  sleep 0.1
done
if [ "$up" = 0 ]; then
  echo "ejabberd did not listen on 127.0.0.1:${port} within 60 s; log:" >&2
  tail -20 "$dir/ejabberd.log" >&2 2>/dev/null || true
  exit 1
fi
echo "${version} (Erlang/OTP $(cat /usr/lib/erlang/releases/*/OTP_VERSION 2>/dev/null | head -1))"
echo "listening on 127.0.0.1:${port}"
wait "$vm" || true
vm=""
