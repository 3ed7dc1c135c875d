#!/usr/bin/env bash
# Mutation testing of the CPU side (issue 7): cargo-mutants on sdpa-core and sdpa-ref.
# Not part of CI (hours on 2 cores); run it by hand and record the result in
# VERIFICATION.md.
#
#   bash ci/mutants.sh [OUT_DIR]      default OUT_DIR: target/mutants (git-ignored)
#
# Two passes, so that each mutant is built and tested as cheaply as it can be killed:
#   1. every mutant of a crate against that crate's own tests (sdpa-core: its unit
#      tests; sdpa-ref: its unit tests and tests/): one small crate to rebuild;
#   2. the mutants pass 1 missed (or that timed out) against the workspace tests that
#      matter: sdpa-core, sdpa-ref and sdpa-harness (unit, property and golden tests).
# A mutant killed in pass 1 would be killed in pass 2 too, so the union is what a single
# pass over the full test set gives. Doctests are left out (each compiles separately).
# PROPTEST_CASES defaults to 32 here. -j1: the machine has 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT="${1:-$ROOT/target/mutants}"
export PROPTEST_CASES="${PROPTEST_CASES:-32}" CARGO_TERM_COLOR=never
# cargo-mutants builds in its own copy of the tree; a shared target dir would make
# every mutant's build clash with everyone else's.
unset CARGO_TARGET_DIR
if ! cargo mutants --version >/dev/null 2>&1; then
  cargo install cargo-mutants --locked
fi
mkdir -p "$OUT"
# Test timeouts scale from the unmutated baseline (a mutant that loops forever, as some
# in Dropout::fill_keep_row do, is cut off at 60 s rather than waited for).
common=(--jobs 1 --no-shuffle --cargo-test-arg=--lib --cargo-test-arg=--tests --minimum-test-timeout 60 --build-timeout 900)

for crate in sdpa-core sdpa-ref; do
  echo "== pass 1: $crate against its own tests"
  cargo mutants "${common[@]}" --package "$crate" --test-package "$crate" \
    --output "$OUT/$crate" || true
done

# The mutants pass 1 did not kill, as an exact-match regex over their names.
survivors="$OUT/pass1-survivors.txt"
cat "$OUT"/sdpa-core/mutants.out/missed.txt "$OUT"/sdpa-ref/mutants.out/missed.txt \
  "$OUT"/sdpa-core/mutants.out/timeout.txt "$OUT"/sdpa-ref/mutants.out/timeout.txt \
  2>/dev/null | sort -u >"$survivors"
echo "== pass 1: $(wc -l <"$survivors") survivors"
if [ -s "$survivors" ]; then
  regex=$(python3 -c 'import re,sys; print("^(" + "|".join(re.escape(l.rstrip("\n")) for l in open(sys.argv[1]) if l.strip()) + ")$")' "$survivors")
  echo "== pass 2: survivors against sdpa-core, sdpa-ref, sdpa-harness tests"
  cargo mutants "${common[@]}" --package sdpa-core --package sdpa-ref \
    --test-package sdpa-core --test-package sdpa-ref --test-package sdpa-harness \
    --re "$regex" --output "$OUT/pass2" || true
fi

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def lines(path):
    try:
        return [l.rstrip("\n") for l in open(path) if l.strip()]
    except FileNotFoundError:
        return []
total, caught1, unviable = 0, 0, 0
for crate in ("sdpa-core", "sdpa-ref"):
    d = os.path.join(out, crate, "mutants.out")
    caught1 += len(lines(os.path.join(d, "caught.txt")))
    unviable += len(lines(os.path.join(d, "unviable.txt")))
    total += len(lines(os.path.join(d, "caught.txt"))) + len(lines(os.path.join(d, "missed.txt"))) \
        + len(lines(os.path.join(d, "timeout.txt"))) + len(lines(os.path.join(d, "unviable.txt")))
d2 = os.path.join(out, "pass2", "mutants.out")
caught2 = len(lines(os.path.join(d2, "caught.txt")))
missed = lines(os.path.join(d2, "missed.txt"))
timeouts = lines(os.path.join(d2, "timeout.txt"))
viable = total - unviable
killed = caught1 + caught2
print(f"mutants: {total}, unviable (do not compile): {unviable}, viable: {viable}")
print(f"killed: {killed} (pass 1: {caught1}, pass 2: {caught2}); timeouts in pass 2: {len(timeouts)}")
if viable:
    print(f"kill rate: {100.0 * killed / viable:.1f}% of viable mutants (timeouts count as not killed)")
print("missed:")
for m in missed + [t + "  [timeout]" for t in timeouts]:
    print("  " + m)
PY
