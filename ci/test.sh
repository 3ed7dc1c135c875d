#!/usr/bin/env bash
# The test command (README, .ci/run): formatting, lints, every workspace test, the
# golden regeneration check, the NVRTC compile check of every kernel, the backward
# kernels run on a CPU emulator (ci/emu.sh), and a bounded fuzzing run. Runs on a fresh
# machine with no GPU; installs what it needs from the package registries (the torch
# wheel, the NVRTC wheel, cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# Property suites: 256 cases each in CI (about a minute); raise locally, e.g.
# PROPTEST_CASES=5000 ci/test.sh.
export PROPTEST_CASES="${PROPTEST_CASES:-256}"
start=$(date +%s)
step() { echo "== $1 ($(($(date +%s) - start)) s)"; }

step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test --workspace (PROPTEST_CASES=$PROPTEST_CASES)"
cargo test --workspace
step "goldens: regenerate through libtorch 2.11 and compare bytes (ci/golden.sh --check)"
bash ci/golden.sh --check
step "crates: docs without warnings, the library crates packaged and built from their packages (cargo package)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# cargo package verifies each crate against the others through a local registry whose
# sources cargo extracts under $CARGO_HOME/registry/src/<hash of its path>/ and never
# refreshes: a run from a clone at the same path would build the workspace crates of an
# earlier run (seen 2026-12-08: sdpa-dist against an sdpa-ref without its new module).
# None of ours is on crates.io, so every sdpa-* there is such a leftover.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/sdpa-*
cargo package --workspace --exclude sdpa-cli --exclude sdpa-python --quiet
step "python: the sdpa_rs wheel built with maturin, its pytest suite on the CPU (ci/python.sh)"
bash ci/python.sh
step "kernels: generated wgmma wrappers current, planted-bug catalogue applies (ci/planted_bugs.py)"
python3 ci/gen_wgmma.py | cmp - kernels/common/wgmma.cuh
python3 ci/planted_bugs.py check kernels
step "kernels: compile every variant with NVRTC for sm_80 and sm_90, the Hopper kernel for sm_90a (ci/nvrtc.sh)"
bash ci/nvrtc.sh
step "kernels: the backward kernels run on the CPU emulator against an f64 backward (ci/emu.sh)"
bash ci/emu.sh | tail -3
# 30 s a target keeps the whole run under CI's 30 minutes on 2 cores; longer runs:
# `bash ci/fuzz.sh 600` (VERIFICATION.md).
step "fuzz: 30 s per target (ci/fuzz.sh)"
bash ci/fuzz.sh 30
step "done"
