#!/usr/bin/env bash
# run.sh of the GPU test bundle (built by ci/gpu.sh): runs on a Linux CUDA machine with
# no Rust. Steps: device info, CPU unit tests, GPU tests (property tests of each backend
# against the reference, dropout bit-identity, varlen, strided views, errors, disk
# cache), compute-sanitizer memcheck + racecheck on the small set, then benchmarks of
# ours and PyTorch's backends on the same card. Summary printed last.
# `nn` (also part of `all`): the nested-batch and module GPU tests, then the module
# benchmarks (issues 5 and 6) beside PyTorch and the module's CUDA profile.
# `cli` (also part of `all`): the sdpa command's tutorial, check and bench on CUDA.
# `bench-compare`: this bench and bin/sdpa-cuda-bench-before (BEFORE_BENCH in ci/gpu.sh)
# alternately, and a before/after table.
# `bwd` (also part of `all`): the backward on the device: both CUDA backwards against the
# reference, compute-sanitizer on the small backward set, the module's backward on CUDA,
# the training demo with the attention on CUDA, the backward benchmarks beside PyTorch's.
# `decode` (also part of `all`): the KV-cache decode kernels against the reference,
# compute-sanitizer on their small set, and the decode benchmark beside PyTorch's SDPA.
# `python` (also part of `all`): the sdpa_rs wheel installed into the machine's Python with
# torch, its pytest suite against PyTorch's CUDA backends, the call overhead from Python.
# `sweep` (not part of `all`): the forward and backward sweeps of ours and PyTorch's and
# their charts (sdpa chart) into $LOGS/charts.
# Usage: run.sh [tests|sanitize|bench|bench-compare|nn|cli|bwd|decode|python|sweep|all]   (default all)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
LOGS=${OUT:-$HERE/results}
mkdir -p "$LOGS"
WHAT=${1:-all}
BIN=$HERE/bin
export SDPA_CUDA_CACHE=${SDPA_CUDA_CACHE:-$HERE/.kernel-cache}

# The CUDA libraries cudarc loads: the driver's libcuda, and libnvrtc / libcublas from
# the toolkit or the nvidia wheels (PyTorch's venv has them).
. "$HERE/gpu_env.sh"

declare -a SUMMARY
step() { # name, command...
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - start ))
  local counts
  counts=$(grep -E "^test result:" "$LOGS/$name.log" | tail -1)
  SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$secs" "$counts")")
  tail -5 "$LOGS/$name.log"
  return $rc
}

GPU_TESTS=$BIN/sdpa-cuda-gpu
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvidia-smi | grep -o "CUDA Version: [0-9.]*"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} > "$LOGS/device.txt" 2>&1
cat "$LOGS/device.txt"

if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
  step unit "$BIN/sdpa-cuda-unit"
  step nvrtc "$BIN/sdpa-cuda-nvrtc" --ignored
  step gpu "$GPU_TESTS" --ignored --test-threads=1
  # Many processes on a cold kernel cache, device out-of-memory, a context on the
  # caller's stream over borrowed memory, shared memory read from the kernels.
  step limits "$BIN/sdpa-cuda-device_limits" --ignored --test-threads=1
  # The NaN rule on every backend against the reference.
  step nan "$BIN/sdpa-cuda-nan_rule_gpu" --ignored --test-threads=1 --nocapture
  # The facade's CUDA example: host arrays and device tensors, every backend.
  step facade "$BIN/sdpa-example-cuda"
  # Every golden case through every CUDA backend (tests/golden_gpu.rs). Goldens from the
  # working tree the bundle sits in (target/gpu-bundle), so a golden/cuda/ made earlier
  # on this machine (ci/gpu_goldens.sh) counts; else the bundle's copy.
  if [ -x "$BIN/sdpa-cuda-golden_gpu" ]; then
    if [ -z "${SDPA_GOLDEN_DIR:-}" ]; then
      if [ -f "$HERE/../../golden/manifest.json" ]; then
        SDPA_GOLDEN_DIR=$(cd "$HERE/../../golden" && pwd)
      else
        SDPA_GOLDEN_DIR=$HERE/golden
      fi
      export SDPA_GOLDEN_DIR
    fi
    step golden "$BIN/sdpa-cuda-golden_gpu" --ignored --test-threads=1 --nocapture
  fi
fi
if [ "$WHAT" = all ] || [ "$WHAT" = sanitize ]; then
  for tool in memcheck racecheck; do
    step "$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 "$GPU_TESTS" --ignored --exact sanitize_small_set
    SUMMARY+=("           $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/$tool.log" | tail -1)")
  done
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bwd ]; then
  step backward "$BIN/sdpa-cuda-gpu_backward" --ignored --test-threads=1 --nocapture
  for tool in memcheck racecheck; do
    step "bwd-$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 "$BIN/sdpa-cuda-gpu_backward" --ignored --exact sanitize_backward_small
    SUMMARY+=("           $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/bwd-$tool.log" | tail -1)")
  done
  step module-bwd "$BIN/sdpa-nn-cuda" --ignored --exact module_backward_on_cuda_matches_the_cpu
  step train "$BIN/sdpa-nn-train" --device cuda
  cat "$LOGS/train.log"
  step bench-bwd-ours "$BIN/sdpa-cuda-bench" --backward
  step bench-bwd-torch env PYTHONUNBUFFERED=1 python3 "$HERE/bench_torch_bwd.py" --ours "$LOGS/bench-bwd-ours.log" --json "$LOGS/bench-bwd-torch.json"
  cat "$LOGS/bench-bwd-torch.log"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = decode ]; then
  step decode "$BIN/sdpa-cuda-gpu_decode" --ignored --test-threads=1 --nocapture
  for tool in memcheck racecheck; do
    step "decode-$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 "$BIN/sdpa-cuda-gpu_decode" --ignored --exact sanitize_decode_paged_append_and_splits
    SUMMARY+=("           $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/decode-$tool.log" | tail -1)")
  done
  step bench-decode-ours "$BIN/sdpa-cuda-bench" --decode
  step bench-decode-torch env PYTHONUNBUFFERED=1 python3 "$HERE/bench_torch_decode.py" "$LOGS/bench-decode-ours.log" --json "$LOGS/bench-decode-torch.json"
  cat "$LOGS/bench-decode-torch.log"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
  step bench-ours "$BIN/sdpa-cuda-bench" --json
  cp "$LOGS/bench-ours.log" "$LOGS/bench-ours.jsonl"
  step bench-torch env PYTHONUNBUFFERED=1 python3 "$HERE/bench_torch.py" --ours "$LOGS/bench-ours.jsonl" --json "$LOGS/bench-torch.json"
  cat "$LOGS/bench-torch.log"
fi
if [ "$WHAT" = bench-compare ] && [ -x "$BIN/sdpa-cuda-bench-before" ]; then
  # This revision's bench and an earlier one's, alternately, twice each.
  for i in 1 2; do
    step "after$i" "$BIN/sdpa-cuda-bench" --json
    step "before$i" "$BIN/sdpa-cuda-bench-before" --json
  done
  python3 "$HERE/bench_compare.py" "$LOGS/after1.log" "$LOGS/before1.log" "$LOGS/after2.log" "$LOGS/before2.log" | tee "$LOGS/bench-compare.md"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = nn ]; then
  step nested "$BIN/sdpa-nested-cuda" --ignored --test-threads=1
  step module "$BIN/sdpa-nn-cuda" --ignored --test-threads=1
  if [ -x "$BIN/sdpa-nn-golden_module" ]; then
    GOLDEN=${SDPA_GOLDEN_DIR:-$HERE/golden}
    [ -f "$HERE/../../golden/manifest.json" ] && GOLDEN=$(cd "$HERE/../../golden" && pwd)
    SDPA_GOLDEN_DIR=$GOLDEN step module-golden "$BIN/sdpa-nn-golden_module" --ignored --exact module_goldens_pass_on_cuda --nocapture
  fi
  step nn-bench-ours "$BIN/sdpa-nn-bench" --json "$LOGS/nn-bench-ours.json"
  cat "$LOGS/nn-bench-ours.log"
  step nn-bench-torch env PYTHONUNBUFFERED=1 python3 "$HERE/bench_torch_module.py" --ours "$LOGS/nn-bench-ours.json"
  cat "$LOGS/nn-bench-torch.log"
  step profile "$BIN/sdpa" profile --device cuda --trace "$LOGS/profile-trace.json"
  cat "$LOGS/profile.log"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = cli ]; then
  # The `sdpa` command as a user runs it on this machine: the tutorial (CUDA found by
  # `auto`), every golden case through every CUDA backend, the benchmark table.
  step tutorial "$BIN/sdpa"
  cat "$LOGS/tutorial.log"
  GOLDEN=${SDPA_GOLDEN_DIR:-$HERE/golden}
  [ -f "$HERE/../../golden/manifest.json" ] && GOLDEN=$(cd "$HERE/../../golden" && pwd)
  step check "$BIN/sdpa" check --device cuda "$GOLDEN"
  tail -3 "$LOGS/check.log"
  step bench-cli "$BIN/sdpa" bench --device cuda
  cat "$LOGS/bench-cli.log"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = python ]; then
  # The Python package as a user gets it: the wheel built here installed with --no-deps
  # into this machine's Python with torch, then its pytest suite against PyTorch's CUDA
  # backends and the call overhead beside PyTorch's SDPA, without this bundle's
  # LD_LIBRARY_PATH (sdpa_rs finds NVRTC and cuBLAS in torch's nvidia wheels itself).
  PY=${SDPA_PYTHON:-python3}
  [ -x /opt/torch/.venv/bin/python ] && PY=${SDPA_PYTHON:-/opt/torch/.venv/bin/python}
  step py-install "$PY" -m pip install --no-deps --force-reinstall --no-index "$HERE"/python/sdpa_rs-*.whl
  step py-test env -u LD_LIBRARY_PATH PYTHONUNBUFFERED=1 "$PY" -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$LOGS/py-test.xml" "$HERE/python/tests"
  tail -3 "$LOGS/py-test.log"
  step py-overhead env -u LD_LIBRARY_PATH "$PY" "$HERE/python/overhead.py" "$LOGS/py-overhead.json"
  cat "$LOGS/py-overhead.log"
fi
if [ "$WHAT" = sweep ]; then
  # The charts of BENCHMARKS.md: ours and PyTorch's backends over sequence length and head
  # dim (FlashAttention's layout: 16k tokens, hidden 2048), forward and backward, then
  # the SVGs (sdpa chart) into $LOGS/charts.
  step sweep-fwd "$BIN/sdpa" bench --sweep --device cuda --sweep-backends flash,efficient \
    --repeats 5 --out "$LOGS/sweep-fwd.json"
  step sweep-fwd-torch env PYTHONUNBUFFERED=1 python3 "$HERE/bench_torch_sweep.py" --out "$LOGS/sweep-fwd-torch.json"
  step sweep-bwd "$BIN/sdpa" bench --sweep --backward --device cuda --sweep-backends flash,efficient \
    --repeats 2 --out "$LOGS/sweep-bwd.json"
  step sweep-bwd-torch env PYTHONUNBUFFERED=1 python3 "$HERE/bench_torch_sweep.py" --backward --out "$LOGS/sweep-bwd-torch.json"
  step charts "$BIN/sdpa" chart "$LOGS"/sweep-*.json --out "$LOGS/charts"
  cat "$LOGS/charts.log"
fi

echo
echo "== summary =="
cat "$LOGS/device.txt"
for line in "${SUMMARY[@]}"; do echo "$line"; done
