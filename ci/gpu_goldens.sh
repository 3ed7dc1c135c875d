#!/usr/bin/env bash
# GPU goldens (issue 3 part 5, issue 5 part 3): libtorch 2.11's CUDA results, made on a
# machine with an NVIDIA GPU and torch 2.11 but no Rust.
#
#   bash ci/gpu_goldens.sh --build   here (no GPU needed): build the CUDA-linked
#                                    generator (ci/golden.sh --device cuda --build-only,
#                                    full torch wheel in $SDPA_GOLDEN_VENV, default
#                                    /work/golden-cuda-venv, outside the repo) and put it,
#                                    stripped, in target/golden-gpu/ (a few MB; no libs)
#   bash ci/gpu_goldens.sh           on the GPU machine, from the repo root, with
#                                    target/golden-gpu carried: writes
#                                      golden/cuda/NAME.BACKEND.safetensors + manifest.json
#                                      (tools/sdpa-golden --device cuda: every f32/f16/bf16
#                                      case up to MAX_OUT_BYTES, one file per PyTorch
#                                      backend that accepts it: flash, efficient, cudnn,
#                                      math; card, driver, date in the manifest)
#                                      golden/nested/cuda/ (ci/golden_nested.py --device
#                                      cuda: causal jagged SDPA and module cases)
#                                    and tars both into $OUT/golden-cuda.tar (or
#                                    target/golden-gpu/golden-cuda.tar without $OUT).
#
# On the GPU machine it needs a python with torch 2.11 ($TORCH_PYTHON, else python3):
# libtorch's libraries come from that python's site-packages (torch/lib and
# nvidia/*/lib), the same files the binary was built against here.
# After the run, here: tar -xf golden-cuda.tar (from the repo root) and commit golden/cuda
# and golden/nested/cuda.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
say() { echo "gpu_goldens.sh: $*" >&2; }
start=$SECONDS

if [ "${1:-}" = --build ]; then
  export SDPA_GOLDEN_VENV=${SDPA_GOLDEN_VENV:-/work/golden-cuda-venv}
  bin=$(bash ci/golden.sh --device cuda --build-only | tail -1)
  mkdir -p target/golden-gpu
  cp "$bin" target/golden-gpu/sdpa-golden
  strip target/golden-gpu/sdpa-golden
  ls -la target/golden-gpu
  exit 0
fi
case "${1:-}" in
  "") ;;
  *) echo "gpu_goldens.sh: unknown argument $1 (--build, or nothing on the GPU machine)" >&2; exit 2 ;;
esac

BIN=$ROOT/target/golden-gpu/sdpa-golden
[ -x "$BIN" ] || { say "no $BIN: build it with bash ci/gpu_goldens.sh --build and carry target/golden-gpu"; exit 1; }
PY=${TORCH_PYTHON:-python3}

# torch's site-packages: the python's purelib, else wherever a torch/ with lib/ is.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
if [ ! -f "$site/torch/lib/libtorch_cuda.so" ]; then
  site=$(find /opt/torch /usr/local/lib /usr/lib -maxdepth 6 -path '*-packages/torch/lib/libtorch_cuda.so' 2>/dev/null \
           | head -1 | sed 's|/torch/lib/libtorch_cuda.so$||')
fi
[ -n "$site" ] && [ -f "$site/torch/lib/libtorch_cuda.so" ] || { say "no torch with libtorch_cuda.so found (set TORCH_PYTHON)"; exit 1; }
have=$(sed -n "s/^__version__ = '\(.*\)'$/\1/p" "$site/torch/version.py")
case "$have" in 2.11.0*) ;; *) say "expected torch 2.11.0 in $site, found '$have'"; exit 1 ;; esac
libs=$site/torch/lib
for d in "$site"/nvidia/*/lib "$site"/nvidia/*/*/lib; do
  [ -d "$d" ] && libs=$libs:$d
done
say "torch $have in $site"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true

# 1. Dense: the tch binary (inputs from the same fixed seed as the committed CPU cases).
mkdir -p golden/cuda
find golden/cuda -maxdepth 1 \( -name '*.safetensors' -o -name manifest.json \) -delete
env LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MKL_CBWR=COMPATIBLE \
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
  "$BIN" --device cuda --out golden
say "golden/cuda: $(find golden/cuda -name '*.safetensors' | wc -l) files, $(du -sh golden/cuda | cut -f1) ($((SECONDS - start)) s)"

# 2. Nested: torch.nested on CUDA.
nested_rc=0
OMP_NUM_THREADS=1 "$PY" ci/golden_nested.py --device cuda --out golden/nested/cuda || nested_rc=$?
[ "$nested_rc" = 0 ] || say "ci/golden_nested.py --device cuda failed (rc $nested_rc); golden/cuda is still packed"

# 3. One file back.
dest=${OUT:-$ROOT/target/golden-gpu}
mkdir -p "$dest"
parts=(golden/cuda)
[ "$nested_rc" = 0 ] && [ -d golden/nested/cuda ] && parts+=(golden/nested/cuda)
tar -cf "$dest/golden-cuda.tar" "${parts[@]}"
say "$dest/golden-cuda.tar: $(du -h "$dest/golden-cuda.tar" | cut -f1) (${parts[*]}) ($((SECONDS - start)) s)"
