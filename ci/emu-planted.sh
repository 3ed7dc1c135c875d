#!/usr/bin/env bash
# The planted bugs the emulator can run (ci/planted_bugs.py: those in kernels/bwd/, in
# the mma.sync forward and in kernels/common/, not the Hopper kernels' files, which the
# emulator has no wgmma for) against the CPU
# emulator of ci/emu.sh: each bug's patched kernels compiled and run; caught = the
# emulated gradients leave the bound. Races (a missing atomic) need the GPU's racecheck
# or luck: the emulator runs one block at a time. Prints a line a bug and a count.
#   bash ci/emu-planted.sh [BUG_ID ...]      default: every such bug
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then ids=("$@"); else
  mapfile -t ids < <(for id in $(python3 ci/planted_bugs.py list); do
    case "$(python3 ci/planted_bugs.py file "$id")" in *wgmma*) ;; bwd/*|fwd/attn_fwd_tc.cu|common/*|decode/*) echo "$id" ;; esac; done)
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
caught=0
for id in "${ids[@]}"; do
  python3 ci/planted_bugs.py apply "$id" kernels "$work/$id"
  if EMU_KERNELS="$work/$id" EMU_OUT="$work/out-$id" timeout 600 bash ci/emu.sh > "$work/$id.log" 2>&1; then
    echo "$id: MISSED ($(tail -1 "$work/$id.log"))"
  else
    caught=$((caught + 1))
    echo "$id: caught ($(grep -c '^FAIL' "$work/$id.log") failing gradients; $(tail -1 "$work/$id.log"))"
  fi
done
echo "emulator: $caught of ${#ids[@]} planted bugs caught"
