#!/usr/bin/env bash
# Planted kernel bugs (issue 7), on a CUDA machine, from the GPU test bundle (ci/gpu.sh
# copies this as planted-bugs.sh beside run.sh, with ci/planted_bugs.py and kernels/):
#
#   bash target/gpu-bundle/planted-bugs.sh [BUG_ID ...]      default: every bug
#
# A bug in kernels/decode/ runs the decode GPU tests (sdpa-cuda-gpu_decode).
# A bug in kernels/bwd/ runs the backward GPU tests instead (sdpa-cuda-gpu_backward:
# the efficient tests for the fused kernels, the math ones for math_bwd.cu);
# PLANTED_BACKWARD=1 makes the unpatched run the backward tests (for a run of backward
# bugs only).
#
# For each bug of the catalogue (ci/planted_bugs.py): a copy of kernels/ with the bug
# applied, then the bundle's GPU tests (sdpa-cuda-gpu: property tests of flash,
# efficient and math against the reference, dropout bit-identity, NaN-poisoned outputs,
# varlen, strided views) with SDPA_KERNEL_DIR pointing at the copy, so the kernels are
# compiled from the patched sources with no rebuild. A bug in the "missing barrier"
# category also gets compute-sanitizer racecheck on the small set. Caught = some test
# failed (or the sanitizer reported a hazard). First the unpatched kernels, which must
# pass. Bugs run PLANTED_JOBS at a time (separate processes; the GPU is shared).
# Results: $OUT/planted/ (or the bundle's results/planted/): one log a bug, results.tsv,
# table.md (the table VERIFICATION.md carries).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
LOGS=${OUT:-$HERE/results}/planted
mkdir -p "$LOGS"
BIN=$HERE/bin
. "$HERE/gpu_env.sh"
export SDPA_CUDA_CACHE=$HERE/.kernel-cache
export PROPTEST_CASES=${PROPTEST_CASES:-32}
# A failing property test stops at its first failure: no shrinking (minutes of GPU calls).
export PROPTEST_MAX_SHRINK_ITERS=0
JOBS=${PLANTED_JOBS:-6}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# One bug (or "none"): exit status 0 when caught, 1 when missed; a line of results.tsv.
run_one() {
  local id=$1 dir=$WORK/$1 log=$LOGS/$1.log
  if [ "$id" = none ]; then
    cp -r "$HERE/kernels" "$dir"
  else
    python3 "$HERE/planted_bugs.py" apply "$id" "$HERE/kernels" "$dir" || return 2
  fi
  local start=$(date +%s)
  # A bug in the backward's kernels runs the backward tests (the fused kernels': the
  # efficient ones; math_bwd.cu's: the math ones; the tensor-core kernels': all of them,
  # as flash and efficient both run them), and its racecheck their small set.
  local file tests sanitize
  file=$([ "$id" = none ] && echo "none${PLANTED_BACKWARD:+-bwd}" || python3 "$HERE/planted_bugs.py" file "$id")
  case "$file" in
    bwd/attn_bwd_simt.cu) tests=("$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=2 efficient) ;;
    bwd/math_bwd.cu)      tests=("$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=2 math_backward) ;;
    bwd/attn_bwd_tc.cu)   tests=("$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=2) ;;
    bwd/attn_bwd_wgmma.cu) tests=("$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=2) ;;
    common/bwd.cuh)       tests=("$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=2) ;;
    none-bwd)             tests=("$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=2) ;;
    decode/*)             tests=("$BIN/sdpa-cuda-gpu_decode" --ignored --test-threads=1) ;;
    *)                    tests=("$BIN/sdpa-cuda-gpu" --ignored --test-threads=2 --skip second_context_reads_kernels_from_the_disk_cache) ;;
  esac
  case "$file" in
    bwd/*|common/bwd.cuh|none-bwd) sanitize=("$BIN/sdpa-cuda-gpu_backward" --ignored --exact sanitize_backward_small) ;;
    decode/*)       sanitize=("$BIN/sdpa-cuda-gpu_decode" --ignored --exact sanitize_decode_paged_append_and_splits) ;;
    *)              sanitize=("$BIN/sdpa-cuda-gpu" --ignored --exact sanitize_small_set) ;;
  esac
  # The mma.sync backward's bugs run with the Hopper kernels off, so that every flash
  # case of the tests reaches it on sm_90 too.
  local keep_mma=()
  [ "$file" = bwd/attn_bwd_tc.cu ] && keep_mma=(SDPA_CUDA_WGMMA=0)
  SDPA_KERNEL_DIR=$dir timeout 600 env "${keep_mma[@]}" "${tests[@]}" > "$log" 2>&1
  local rc=$?
  local failed
  failed=$(grep -E "^test .* \.\.\. FAILED" "$log" | sed -E 's/^test (.*) \.\.\. FAILED/\1/' | tr '\n' ' ')
  local by=""
  [ -n "$failed" ] && by="tests: ${failed% }"
  [ $rc -ne 0 ] && [ -z "$failed" ] && by="tests: exit $rc (crash or timeout)"
  if python3 "$HERE/planted_bugs.py" category "$id" 2>/dev/null | grep -q "missing barrier"; then
    SDPA_KERNEL_DIR=$dir timeout 600 compute-sanitizer --tool racecheck --error-exitcode 9 \
      "${sanitize[@]}" > "$LOGS/$id.racecheck.log" 2>&1
    local rrc=$?
    local summary
    summary=$(grep -E "RACECHECK SUMMARY" "$LOGS/$id.racecheck.log" | tail -1)
    if [ $rrc -ne 0 ]; then
      by="${by:+$by; }racecheck: ${summary:-exit $rrc}"
      rc=1
    else
      by="${by:+$by; }racecheck: clean"
    fi
  fi
  local secs=$(( $(date +%s) - start ))
  local verdict
  if [ "$id" = none ]; then
    verdict=$([ $rc -eq 0 ] && echo "passes" || echo "FAILS")
  else
    verdict=$([ $rc -ne 0 ] && echo "caught" || echo "MISSED")
  fi
  printf '%s\t%s\t%s\t%ss\n' "$id" "$verdict" "${by:-no test failed}" "$secs" >> "$LOGS/results.tsv"
  echo "$id: $verdict ${by} (${secs}s)"
}
export -f run_one
export HERE LOGS BIN WORK

: > "$LOGS/results.tsv"
# PLANTED_SKIP_NONE=1: the unpatched tests already passed in this same device call (the
# caller says so); their run is not repeated.
if [ -z "${PLANTED_SKIP_NONE:-}" ]; then
  run_one none
else
  printf 'none\tpasses\tskipped: the unpatched tests ran earlier in the same call\t0s\n' >> "$LOGS/results.tsv"
fi
if ! grep -q "^none	passes" "$LOGS/results.tsv"; then
  echo "the unpatched kernels fail the tests: planted-bug results would mean nothing" >&2
  exit 1
fi
if [ $# -gt 0 ]; then ids=("$@"); else mapfile -t ids < <(python3 "$HERE/planted_bugs.py" list); fi
printf '%s\n' "${ids[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}
python3 "$HERE/planted_bugs.py" table "$LOGS/results.tsv" | tee "$LOGS/table.md"
missed=$(grep -c "	MISSED	" "$LOGS/results.tsv")
echo "planted bugs: $(( ${#ids[@]} - missed )) of ${#ids[@]} caught"
[ "$missed" -eq 0 ]
