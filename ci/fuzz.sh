#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and turns any crash into a
# failing regression test.
#
#   bash ci/fuzz.sh [SECONDS] [TARGET...]   SECONDS per target (default 60); all targets
#                                           (`cargo fuzz list`) unless some are named
#
# Stable toolchain (--sanitizer none), one fuzzing job at a time, RAYON_NUM_THREADS=1
# (the inputs are tiny: a thread pool costs more than it saves). Installs cargo-fuzz
# from crates.io if it is missing. Each target starts from its committed seed corpus
# fuzz/corpus/<target>/ plus every committed crash input; what the fuzzer discovers goes
# to a scratch folder, so the committed seeds stay small and unchanged.
#
# A crash (panic, abort, timeout > 10 s, > 2 GiB; case_file: > 2 s, > 512 MiB) fails the run, and its input is copied
# to fuzz/regressions/<target>/: commit it there. From then on it fails every later run
# of this script until fixed (libFuzzer executes every input of the corpus folders it is
# given before fuzzing, and regressions/<target>/ is one of them), and `cargo test` in
# fuzz/ (stable, no libFuzzer) replays every file under fuzz/regressions/ and
# fuzz/corpus/ and fails on it too.
# To reproduce one: `cd fuzz && cargo fuzz run --sanitizer none TARGET FILE`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"
per_target="${1:-60}"
shift || true
case "$per_target" in '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, got $per_target" >&2; exit 2 ;; esac
say() { echo "fuzz.sh: $*" >&2; }
# cargo fuzz keeps its own target dir (fuzz/target, git-ignored).
unset CARGO_TARGET_DIR
export CARGO_TERM_COLOR=never RAYON_NUM_THREADS=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
say "building ${targets[*]}"
cargo fuzz build --sanitizer none

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target/corpus" "$scratch/$target/artifacts" "regressions/$target"
  seeds=("corpus/$target")
  [ -d "corpus/$target" ] || seeds=()
  log="$scratch/$target/log"
  say "$target: ${per_target} s"
  status=0
  # Per-input budget: case_file inputs are a few KB and the harness refuses any case
  # its data does not justify (Case::check_budget), so each must finish in 2 s and no
  # single allocation may pass 64 MB; the other targets keep the general bound.
  budget=(-timeout=10 -rss_limit_mb=2048)
  [ "$target" = case_file ] && budget=(-timeout=2 -rss_limit_mb=512 -malloc_limit_mb=64)
  cargo fuzz run --sanitizer none "$target" "$scratch/$target/corpus" "${seeds[@]}" "regressions/$target" -- \
    -max_total_time="$per_target" "${budget[@]}" -print_final_stats=1 \
    -artifact_prefix="$scratch/$target/artifacts/" >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    for crash in "$scratch/$target/artifacts"/*; do
      [ -e "$crash" ] || continue
      cp "$crash" "regressions/$target/"
      say "$target: crash input kept as fuzz/regressions/$target/$(basename "$crash"): commit it"
    done
    failed+=("$target")
    summary+=("$target: FAILED (exit $status) after ${runs:-?} runs")
  else
    summary+=("$target: ${runs:-?} runs in ${secs:-?} s (${rate:-?} exec/s), no crash")
  fi
done

echo "== fuzz summary ($(date -u +%Y-%m-%d), $(nproc) cores)"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
