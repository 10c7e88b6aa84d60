#!/usr/bin/env bash
# CI's fuzz step: builds every target with cargo-fuzz (libFuzzer + AddressSanitizer) on the
# stable toolchain and runs each for a bounded time from a copy of its seed corpus. Fails on
# a crash, a panic or a failed check (libFuzzer exits non-zero), a hang (-timeout: one input
# running longer than 10 s) or unbounded memory (-rss_limit_mb). The failing input is left in
# fuzz/artifacts/NAME/ and printed as hex. See fuzz/README.md.
#
#   fuzz/run.sh                 # every target, FUZZ_SECONDS (default 20) each
#   FUZZ_SECONDS=300 fuzz/run.sh proxy_header   # one target, longer
#   fuzz/run.sh ipc_lines       # one target
set -euo pipefail
cd "$(dirname "$0")"

# 20 s x 5 targets keeps CI's fuzz step to the build (the long part: every crate once with
# ASan) plus under two minutes of fuzzing; longer runs are done by hand (fuzz/README.md).
seconds="${FUZZ_SECONDS:-20}"
# Stable rustc accepts cargo-fuzz's -Zsanitizer=address only with this set.
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Cargo caches rustc's answers per set of flags in target/.rustc_info.json, and that cache
# ignores RUSTC_BOOTSTRAP: one earlier build without it leaves a cached refusal of -Z behind.
rm -f target/.rustc_info.json

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

started=$(date +%s)
cargo fuzz build
echo "fuzz: built ${#targets[@]} targets in $(( $(date +%s) - started )) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  # New inputs go to the first directory (scratch); the checked-in seeds are only read.
  if ! cargo fuzz run "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
      -print_final_stats=1 > "$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log"
    for a in artifacts/"$t"/*; do
      [ -f "$a" ] && { echo "fuzz: failing input $a:"; od -A x -t x1z "$a" | head -n 40; }
    done
    echo "fuzz: $t FAILED"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1 || true)
  corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$work/$t.log" | tail -n 1 || true)
  echo "fuzz: $t ok: ${seconds} s, ${runs} runs, ${cov:-cov: ?}, ${corp:-corp: ?}, no finding"
done
echo "fuzz: all ${#targets[@]} targets ran without a finding in $(( $(date +%s) - started )) s"
