#!/usr/bin/env bash
# CI without a GPU: installs NVRTC from the nvidia-cuda-nvrtc wheel (13.0, the CUDA of
# the H100/H200 machines' driver) into a venv and compiles every kernel variant the
# dispatcher can ask for, for sm_80 and sm_90, failing on any error or warning
# (crates/sdpa-cuda/tests/nvrtc.rs). Called by ci/test.sh; about 1-2 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=13.0.88
VENV=${NVRTC_VENV:-target/nvrtc-venv}
if [ ! -f "$VENV/.nvrtc-$VERSION" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc==$VERSION"
  touch "$VENV/.nvrtc-$VERSION"
fi
LIB=$(find "$VENV" -name 'libnvrtc.so.13' -print -quit)
if [ -z "$LIB" ]; then
  echo "ci/nvrtc.sh: libnvrtc.so.13 not found in $VENV" >&2
  exit 1
fi
# Absolute: cargo runs the test binary from the crate's folder, not from here.
LIBDIR=$(cd "$(dirname "$LIB")" && pwd)
LD_LIBRARY_PATH="$LIBDIR:${LD_LIBRARY_PATH:-}" \
  cargo test -p sdpa-cuda --test nvrtc -- --ignored --nocapture
