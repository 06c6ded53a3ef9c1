#!/usr/bin/env bash
# Builds the cargo-fuzz targets and runs each one for a bounded time, one after another, then
# prints executions, coverage and any crash per target. Not part of CI (.ci/run never calls it).
#
#   fuzz/run.sh [TARGET...]            every target (or the named ones), FUZZ_SECONDS each
#
# Environment:
#   FUZZ_SECONDS=60      seconds per target (libFuzzer -max_total_time)
#   FUZZ_REV=<git rev>   fuzz the crate as of that revision (exported to a temporary tree)
#                        instead of the working tree, e.g. while src/ is mid-edit
#   FUZZ_ARGS="..."      extra libFuzzer flags (e.g. "-max_len=65536" or "-seed=1")
#
# Works on the stable toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer=address and
# sanitizer-coverage), which stable rustc accepts with RUSTC_BOOTSTRAP=1.
#
# Seeds are read from corpus/<target>/ and never written to; what the fuzzer learns goes to
# work/<target>/ (ignored by git). Crashes land in artifacts/<target>/; regressions/<target>/
# holds crashing inputs worth keeping, and they are replayed first.
# Exit status: 0 when no target crashed, 1 otherwise.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
EXTRA_ARGS=(${FUZZ_ARGS:-})
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$FUZZ_DIR/target"
export CARGO_TERM_COLOR=never

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

BUILD_DIR="$FUZZ_DIR"
if [ -n "${FUZZ_REV:-}" ]; then
  BUILD_DIR="$(mktemp -d)/courier"
  mkdir -p "$BUILD_DIR/fuzz"
  git -C "$FUZZ_DIR/.." archive "$FUZZ_REV" | tar -x -C "$BUILD_DIR"
  cp -r "$FUZZ_DIR/Cargo.toml" "$FUZZ_DIR/src" "$FUZZ_DIR/fuzz_targets" "$BUILD_DIR/fuzz/"
  [ -f "$FUZZ_DIR/Cargo.lock" ] && cp "$FUZZ_DIR/Cargo.lock" "$BUILD_DIR/fuzz/"
  echo "== fuzzing courier at $(git -C "$FUZZ_DIR/.." rev-parse --short "$FUZZ_REV") (tree in $BUILD_DIR)"
fi
cd "$BUILD_DIR/fuzz"

if [ "$#" -gt 0 ]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo fuzz list)
fi

# -O: optimised; -a: debug assertions and overflow checks stay on (an overflow is a finding).
BUILD_FLAGS=(-O -a)
echo "== cargo fuzz build ${BUILD_FLAGS[*]} (RUSTC_BOOTSTRAP=1, rustc $(rustc --version | cut -d' ' -f2))"
cargo fuzz build "${BUILD_FLAGS[@]}"

mkdir -p "$FUZZ_DIR/logs"
summary=()
failed=0
for target in "${TARGETS[@]}"; do
  work="$FUZZ_DIR/work/$target"
  artifacts="$FUZZ_DIR/artifacts/$target"
  log="$FUZZ_DIR/logs/$target.log"
  mkdir -p "$work" "$artifacts" "$FUZZ_DIR/corpus/$target"
  : >"$log"

  if compgen -G "$FUZZ_DIR/regressions/$target/*" >/dev/null; then
    echo "== $target: replaying regressions/$target"
    if ! cargo fuzz run "${BUILD_FLAGS[@]}" "$target" "$FUZZ_DIR/regressions/$target" -- \
      -runs=0 -artifact_prefix="$artifacts/" >>"$log" 2>&1; then
      echo "   a regression input still fails (see $log)"
    fi
  fi

  echo "== $target: fuzzing for ${SECONDS_PER_TARGET}s"
  status=0
  # One process, one thread (no -jobs/-fork): the targets run one after another.
  cargo fuzz run "${BUILD_FLAGS[@]}" "$target" "$work" "$FUZZ_DIR/corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 -rss_limit_mb=2048 \
    -timeout=10 -artifact_prefix="$artifacts/" "${EXTRA_ARGS[@]}" >>"$log" 2>&1 || status=$?

  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  rss=$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 || true)
  if [ "$status" -eq 0 ]; then
    result="no crash"
  else
    failed=1
    result="CRASH (exit $status)"
    echo "   $target crashed; log tail:"
    grep -E 'panicked|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY|Test unit written|Base64' "$log" | head -20 | sed 's/^/   /'
  fi
  summary+=("$(printf '%-18s execs %-11s exec/s %-8s peak RSS %-6s %-40s %s' \
    "$target" "${execs:-?}" "${rate:-?}" "${rss:-?}MB" "${cov:-cov: ?}" "$result")")
done

echo
echo "== summary (${SECONDS_PER_TARGET}s per target; logs in fuzz/logs/)"
printf '%s\n' "${summary[@]}"
exit "$failed"
