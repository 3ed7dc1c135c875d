#!/usr/bin/env bash
# Regenerates the golden cases through libtorch 2.11 (tch 0.24), or checks that the
# committed ones still come out byte for byte.
#
#   bash ci/golden.sh                  regenerate golden/ (CPU cases + manifest.json, the
#                                      module cases in golden/module/ and the backward
#                                      cases in golden/backward/)
#   bash ci/golden.sh --out DIR        regenerate into DIR instead
#   bash ci/golden.sh --check          regenerate into a scratch folder; fail if any byte
#                                      differs from the committed golden/, golden/module/,
#                                      golden/backward/ and golden/kvcache/
#                                      (golden/cuda/ is produced on a GPU by
#                                      ci/gpu_goldens.sh, golden/nested/ by
#                                      ci/golden_nested.py: not checked here)
#   bash ci/golden.sh --device cuda    on a machine with an NVIDIA GPU: full torch wheel
#                                      with its CUDA libraries, a binary that links
#                                      libtorch_cuda, results into golden/cuda/
#   --build-only                       stop after the build; print the binary's path
#
# What it needs: python3 (venv + pip) reaching PyPI, cargo reaching crates.io, a C++
# compiler (tch compiles its C++ shim against libtorch's headers).
#
# What it downloads (CPU): the torch==2.11.0 wheel (~530 MB; manylinux x86_64, CUDA 13
# build) with --no-deps, plus the two CUDA runtime wheels libtorch_cpu.so is linked
# against (libcudart.so.13, libcupti.so.13; ~10 MB together). libtorch_cpu.so loads with
# just those; nothing CUDA is initialised. The wheel's other dependencies (cuDNN, cuBLAS,
# NCCL, ... ~3 GB) are needed only by libtorch_cuda.so, hence only by --device cuda.
#
# Why LIBTORCH=<wheel>/torch and not LIBTORCH_USE_PYTORCH=1 on the CPU: with the latter,
# torch-sys's build script runs `python -c "import torch"` to find the paths, and
# importing torch loads libtorch_python -> libtorch -> libtorch_cuda, i.e. the whole CUDA
# stack. The headers and libraries are the same files either way; the version is checked
# below from the wheel's version.py (torch-sys checks it only in the python mode).
# --device cuda installs the full wheel and builds with LIBTORCH_USE_PYTORCH=1.
#
# Reproducibility. The inputs come from a fixed seed through integer arithmetic (see
# tools/sdpa-golden). libtorch's arithmetic is pinned by the environment below: one
# thread (OpenMP and MKL), MKL's conditional numerical reproducibility mode
# (MKL_CBWR=COMPATIBLE: MKL is linked statically into libtorch_cpu.so and would otherwise
# pick its code path from the CPU), and ATen's and oneDNN's own CPU dispatch pinned to
# AVX2, which every x86-64 machine this project runs on has, so an AVX-512 machine runs
# the same vector code as an AVX2-only one. With these pinned the check compares bytes:
# no 1-ulp slack, because no CPU has been seen to differ; if one ever does, that is a
# pin missing here, to be found, not a tolerance to add.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CRATE="$ROOT/tools/sdpa-golden"
# Under the crate's target/, which .gitignore keeps out of git.
VENV="${SDPA_GOLDEN_VENV:-$CRATE/target/venv}"
TORCH_VERSION=2.11.0

check=0
out="$ROOT/golden"
device=cpu
build_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --check) check=1 ;;
    --out) out="$2"; shift ;;
    --device) device="$2"; shift ;;
    --build-only) build_only=1 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "golden.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$device" in cpu|cuda) ;; *) echo "golden.sh: --device cpu or cuda, got $device" >&2; exit 2 ;; esac

say() { echo "golden.sh: $*" >&2; }
start=$SECONDS

# 1. The venv and the wheel.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
if [ "$device" = cpu ]; then
  pip_install --no-deps "torch==$TORCH_VERSION" \
    "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*"
else
  pip_install "torch==$TORCH_VERSION"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TORCH_DIR="$site/torch"
have=$(sed -n "s/^__version__ = '\(.*\)'$/\1/p" "$TORCH_DIR/version.py")
case "$have" in
  "$TORCH_VERSION"|"$TORCH_VERSION"+*) ;;
  *) say "expected torch $TORCH_VERSION in $VENV, found '$have'"; exit 1 ;;
esac
say "torch $have ready ($((SECONDS - start)) s)"

# 2. The generator.
if [ "$device" = cpu ]; then
  target="$CRATE/target"
  LIBTORCH="$TORCH_DIR" LIBTORCH_CXX11_ABI=1 \
    cargo build --release --locked --manifest-path "$CRATE/Cargo.toml" --target-dir "$target"
else
  # A separate target dir: this build links libtorch_cuda (build.rs) and finds libtorch
  # through python, and must not overwrite the CPU binary.
  target="$CRATE/target/cuda"
  VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" LIBTORCH_USE_PYTORCH=1 SDPA_GOLDEN_CUDA=1 \
    cargo build --release --locked --manifest-path "$CRATE/Cargo.toml" --target-dir "$target"
fi
bin="$target/release/sdpa-golden"
say "built $bin ($((SECONDS - start)) s)"
if [ "$build_only" = 1 ]; then
  echo "$bin"
  exit 0
fi

# 3. The cases.
run_generator() {
  env LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MKL_CBWR=COMPATIBLE \
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
    "$bin" --device "$device" "$@"
}

if [ "$check" = 1 ]; then
  if [ "$device" != cpu ]; then say "--check is for the CPU goldens"; exit 2; fi
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  run_generator --out "$scratch"
  committed="$ROOT/golden"
  differ=0
  while IFS= read -r name; do
    if [ ! -f "$scratch/$name" ]; then
      say "committed golden/$name is not produced any more"; differ=1
    elif [ ! -f "$committed/$name" ]; then
      say "golden/$name is produced but not committed"; differ=1
    elif ! cmp -s "$committed/$name" "$scratch/$name"; then
      say "golden/$name differs from what the generator writes now"; differ=1
    fi
  done < <( (cd "$committed" && find . -maxdepth 1 -type f -printf '%P\n'; \
             { find module backward kvcache -maxdepth 1 -type f -printf '%p\n' 2>/dev/null || true; }; \
             cd "$scratch" && find . -maxdepth 1 -type f -printf '%P\n'; \
             { find module backward kvcache -maxdepth 1 -type f -printf '%p\n' 2>/dev/null || true; }) | sort -u)
  if [ "$differ" = 1 ]; then
    say "FAILED: golden/ is not what the generator produces; regenerate with bash ci/golden.sh and review the diff"
    exit 1
  fi
  count=$(find "$committed" -maxdepth 1 -name '*.safetensors' | wc -l)
  modules=$(find "$committed/module" -maxdepth 1 -name '*.safetensors' 2>/dev/null | wc -l)
  backwards=$(find "$committed/backward" -maxdepth 1 -name '*.safetensors' 2>/dev/null | wc -l)
  kvs=$(find "$committed/kvcache" -maxdepth 1 -name '*.safetensors' 2>/dev/null | wc -l)
  say "golden/ reproduced byte for byte: $count case files + manifest.json, module/: $modules case files + manifest.json, backward/: $backwards case files + manifest.json, kvcache/: $kvs case files ($((SECONDS - start)) s)"
else
  if [ "$device" = cpu ]; then
    mkdir -p "$out" "$out/module" "$out/backward" "$out/kvcache"
    # Stale cases of an earlier generator must not linger.
    find "$out" "$out/module" "$out/backward" "$out/kvcache" -maxdepth 1 \( -name '*.safetensors' -o -name manifest.json \) -delete
  else
    mkdir -p "$out/cuda"
    find "$out/cuda" -maxdepth 1 \( -name '*.safetensors' -o -name manifest.json \) -delete
  fi
  run_generator --out "$out"
  say "done ($((SECONDS - start)) s)"
fi
