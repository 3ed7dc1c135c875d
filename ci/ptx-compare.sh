#!/usr/bin/env bash
# Compiles every kernel variant to PTX (NVRTC, no -lineinfo) from the working tree's
# kernels/ and from REV's, and compares the kernel bodies (crates/sdpa-cuda/tests/
# ptx_compare.rs): a refactoring of the kernel sources must leave them byte-identical.
#   bash ci/ptx-compare.sh [REV]     REV defaults to HEAD; PTX lands in target/ptx-compare/
# Needs the NVRTC venv of ci/nvrtc.sh (run that once first). Unset the tile overrides
# (SDPA_CUDA_TC_TILES, SDPA_CUDA_WG_TILES) to compare the default variants.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD}
VENV=${NVRTC_VENV:-target/nvrtc-venv}
LIB=$(find "$VENV" -name 'libnvrtc.so.13' -print -quit 2>/dev/null || true)
if [ -z "$LIB" ]; then
  echo "ci/ptx-compare.sh: libnvrtc.so.13 not found in $VENV (run ci/nvrtc.sh first)" >&2
  exit 1
fi
LIBDIR=$(cd "$(dirname "$LIB")" && pwd)
BASE=$(mktemp -d)
trap 'rm -rf "$BASE"' EXIT
git archive "$REV" kernels | tar -x -C "$BASE"
OUT=$(pwd)/target/ptx-compare
rm -rf "$OUT"
SDPA_PTX_BASELINE="$BASE/kernels" SDPA_PTX_OUT="$OUT" LD_LIBRARY_PATH="$LIBDIR:${LD_LIBRARY_PATH:-}" \
  cargo test -p sdpa-cuda --test ptx_compare -- --ignored --nocapture
