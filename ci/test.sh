#!/usr/bin/env bash
# The test command (README, .ci/run): formatting, lints, every workspace test, then the
# golden regeneration check and the NVRTC compile check of every kernel. Runs on a
# fresh machine with no GPU; installs what it needs from the package registries.
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
for extra in ci/golden.sh ci/nvrtc.sh; do
  if [ -f "$extra" ]; then
    step "$extra"
    case "$extra" in
      ci/golden.sh) bash ci/golden.sh --check ;;
      *) bash "$extra" ;;
    esac
  fi
done
step "done"
