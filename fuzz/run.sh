#!/usr/bin/env bash
# Run every fuzz target for a number of executions, grow its corpus in
# corpus/TARGET, then minimise the corpus so the repository keeps only the
# inputs that add coverage. Prints executions and coverage per target.
#
#   fuzz/run.sh                      # every target, 10 million runs each
#   RUNS=100000 fuzz/run.sh config   # one target, fewer runs
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and
# cargo-fuzz (`cargo install cargo-fuzz`). A crash is saved under
# artifacts/TARGET/ and the script exits non-zero; `cargo test --test
# fuzz_corpus` then replays it on stable until it is fixed.
#
# Environment:
#   RUNS       executions per target (default 10000000)
#   SANITIZER  none (default) or address. The fuzzed code is safe Rust, so
#              AddressSanitizer finds little that a panic would not, at
#              about half the speed.
#   MAX_TIME   optional cap in seconds per target
#   MINIMIZE   1 (default) to run `cargo fuzz cmin` after each target
set -euo pipefail
cd "$(dirname "$0")"

RUNS="${RUNS:-10000000}"
SANITIZER="${SANITIZER:-none}"
MINIMIZE="${MINIMIZE:-1}"
TOOLCHAIN="${TOOLCHAIN:-+nightly}"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo "$TOOLCHAIN" fuzz list)
fi

extra=()
[ -n "${MAX_TIME:-}" ] && extra+=("-max_total_time=$MAX_TIME")

summary=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="$(mktemp)"
  echo "== $t: $RUNS runs"
  start=$(date +%s)
  if ! cargo "$TOOLCHAIN" fuzz run --release -s "$SANITIZER" "$t" "corpus/$t" -- \
      -runs="$RUNS" -print_final_stats=1 "${extra[@]}" 2>&1 | tee "$log" | grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|ERROR|panicked'; then
    :
  fi
  secs=$(( $(date +%s) - start ))
  # libFuzzer's final line: "#N DONE cov: C ft: F corp: K/..."
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  if [ -z "$done_line" ]; then
    echo "!! $t did not finish: see artifacts/$t/ and the log above"
    tail -30 "$log"
    status=1
    summary+=("$t|failed|-|-|-|${secs}")
    rm -f "$log"
    continue
  fi
  execs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$done_line")
  cov=$(sed -E 's/.*cov: ([0-9]+).*/\1/' <<<"$done_line")
  ft=$(sed -E 's/.*ft: ([0-9]+).*/\1/' <<<"$done_line")
  rm -f "$log"
  if [ "$MINIMIZE" = 1 ]; then
    cargo "$TOOLCHAIN" fuzz cmin --release -s "$SANITIZER" "$t" "corpus/$t" >/dev/null 2>&1 ||
      echo "!! cmin failed for $t (corpus kept as it is)"
  fi
  kept=$(find "corpus/$t" -type f | wc -l)
  summary+=("$t|$execs|$cov|$ft|$kept|$secs")
done

echo
printf '%-22s %12s %8s %8s %8s %8s\n' target executions cov features corpus seconds
for row in "${summary[@]}"; do
  IFS='|' read -r t e c f k s <<<"$row"
  printf '%-22s %12s %8s %8s %8s %8s\n' "$t" "$e" "$c" "$f" "$k" "$s"
done
exit $status
