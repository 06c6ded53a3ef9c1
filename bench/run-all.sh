#!/usr/bin/env bash
# Runs every figure in bench/README.md. Server pinned to cpu 0, load generator to cpu 1, unless
# a line says otherwise. Results (JSON + SVG) land in bench/results/. Takes ~20 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
# COURIER_BIN: the server binary under test (default: this tree's release build).
COURIER_BIN="${COURIER_BIN:-target/release/courier}"
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p courier-bench
[ -x "$COURIER_BIN" ] || cargo build --release -q -p courier
B="target/release/courier-bench"
bench() { echo "## $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg): courier-bench $*" >&2; "$@"; }
P="bench taskset -c 1 $B"
B="bench $B"
S1="--shards 1 --server-cpus 0 --server-bin $COURIER_BIN"
S2="--server-bin $COURIER_BIN"
R=bench/results
mkdir -p $R
runs="${RUNS:-3}"
only="${1:-all}"
want() { [ "$only" = all ] || [ "$only" = "$1" ]; }

if want connect; then
  for n in 1000 5000 10000 19000; do
    for r in $(seq 1 "$runs"); do
      $P connect --n $n $S1 --hold 1 --json $R/connect-s1-$n-$r.json --svg $R/connect-s1-$n-$r.svg
    done
  done
  for r in $(seq 1 "$runs"); do
    $B connect --n 19000 --shards 2 $S2 --hold 1 --json $R/connect-s2-19000-$r.json
    $P connect --target nats --n 19000 --server-cpus 0 --hold 1 --json $R/connect-nats-19000-$r.json
  done
fi

if want fanout; then
  for r in $(seq 1 "$runs"); do
    $P fanout $S1 --rate 0 --json $R/fanout-s1-max-$r.json --svg $R/fanout-s1-max-$r.svg
    $P fanout --target nats --server-cpus 0 --rate 0 --json $R/fanout-nats-max-$r.json --svg $R/fanout-nats-max-$r.svg
    $B fanout --shards 2 $S2 --rate 0 --json $R/fanout-s2-max-$r.json
  done
fi

if want half; then
  # HALF_* are half the median max send rates measured by the `fanout` part.
  for r in $(seq 1 "$runs"); do
    $P fanout $S1 --rate "${HALF_S1:?}" --json $R/fanout-s1-half-$r.json --svg $R/fanout-s1-half-$r.svg
    $P fanout --target nats --server-cpus 0 --rate "${HALF_NATS:?}" --json $R/fanout-nats-half-$r.json --svg $R/fanout-nats-half-$r.svg
    $B fanout --shards 2 $S2 --rate "${HALF_S2:?}" --json $R/fanout-s2-half-$r.json
  done
fi

if want catchup; then
  $P catchup $S1 --events 100000 --runs "$runs" --json $R/catchup-s1.json --svg $R/catchup-s1.svg
  $B catchup --shards 2 $S2 --events 100000 --runs "$runs" --json $R/catchup-s2.json
fi

if want group; then
  $P group $S1 --sizes 10,100,1024 --delivery-rate 20000 --json $R/group-s1-20k.json --svg $R/group-s1-20k
  $P group $S1 --sizes 10,100,1024 --delivery-rate 0 --json $R/group-s1-max.json --svg $R/group-s1-max
fi

if want compare; then
  $P compare --n 10000 $S1 --json $R/compare.json
fi

# ejabberd (bench/peers/ejabberd.sh installs it): pinned to cpu 0 like the others.
if want ejabberd; then
  for n in 1000 5000 10000; do
    for r in $(seq 1 "$runs"); do
      $P connect --target ejabberd --n $n --server-cpus 0 --hold 1 --json $R/connect-ejabberd-$n-$r.json
    done
  done
  for r in $(seq 1 "$runs"); do
    $P fanout --target ejabberd --server-cpus 0 --rate 0 --json $R/fanout-ejabberd-max-$r.json --svg $R/fanout-ejabberd-max-$r.svg
  done
fi
if want ejabberd-half; then
  # HALF_EJABBERD: half the median max send rate of the `ejabberd` part.
  for r in $(seq 1 "$runs"); do
    $P fanout --target ejabberd --server-cpus 0 --rate "${HALF_EJABBERD:?}" --json $R/fanout-ejabberd-half-$r.json --svg $R/fanout-ejabberd-half-$r.svg
  done
fi
if want compare-ejabberd; then
  $P compare --n 10000 $S1 --peers nats,ejabberd --json $R/compare-ejabberd.json
fi
