#!/usr/bin/env bash
# The Python package (bindings/python, import name sdpa_rs): builds the abi3 wheel with
# maturin, installs it into a venv with torch, and runs its pytest suite on the CPU
# (tests/test_cuda.py skips itself where torch sees no GPU). The install is the README's:
# `pip install ./bindings/python`.
#
#   bash ci/python.sh              build, install, test
#   bash ci/python.sh --build-only build the wheel; print its path last
#
# What it needs: python3 (venv + pip) reaching PyPI, cargo. What it downloads into the
# venv (target/pyvenv, or $SDPA_PY_VENV): torch 2.11.0 with its dependencies (~3 GB,
# about a minute here), numpy, pytest, maturin; the wheel builds the workspace's crates
# in release (the same target folder as cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV="${SDPA_PY_VENV:-$ROOT/target/pyvenv}"
WHEELS="$ROOT/target/wheels"
BUILD_ONLY=0
[ "${1:-}" = "--build-only" ] && BUILD_ONLY=1
say() { echo "python.sh: $*" >&2; }
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV"
  python3 -m venv "$VENV"
fi
if [ "$BUILD_ONLY" = 1 ]; then
  "$VENV/bin/python" -c 'import maturin' 2>/dev/null || pip_install "maturin==1.15.0"
  rm -rf "$WHEELS"
  (cd bindings/python && "$VENV/bin/maturin" build --release --quiet -o "$WHEELS" >&2)
  ls "$WHEELS"/sdpa_rs-*.whl
  exit 0
fi
"$VENV/bin/python" -c 'import torch, numpy, pytest' 2>/dev/null \
  || pip_install "torch==2.11.0" "numpy>=1.24" "pytest>=8"
# Installed as the README says (`pip install ./bindings/python`: pip builds the wheel
# through maturin in an isolated build environment), not from the wheel above.
(cd "$ROOT" && pip_install --force-reinstall --no-deps ./bindings/python)
# From a folder outside the source tree, so `import sdpa_rs` is the installed wheel, and
# with no bytecode written into the tests' folder.
cd "$(mktemp -d)"
export PYTHONDONTWRITEBYTECODE=1
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/bindings/python/tests"


