#!/usr/bin/env bash
# Window, softcap and ALiBi on the flash path against the plain flash forward (issue 17's
# target: within 10% at the same work, the window counted by the keys it keeps), run from
# the GPU bundle (ci/gpu.sh copies it there):
#   bash target/gpu-bundle/mods-bench.sh
# Each line is `sdpa bench --json` of one problem on CUDA (every backend it takes;
# flash's row is the one the target reads). The windowed problems (left W - 1, right 0)
# keep min(i + 1, W) keys a row; their same-work peers are the plain problem with S = W
# (every row keeps W keys) and the causal problem at L = S = W.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/gpu_env.sh"
export SDPA_CUDA_CACHE=${SDPA_CUDA_CACHE:-$HERE/.kernel-cache}
bench() { "$HERE/bin/sdpa" bench --device cuda --repeats 20 --json "$@" 2>&1 | python3 -c '
import json, sys
text = sys.stdin.read()
try:
    rows = json.loads(text)
except ValueError:
    print("  " + text.strip().replace("\n", "\n  ")); sys.exit()
for r in rows:
    if r["backend"] in ("flash", "efficient"):
        t = r.get("median_ms")
        print("%-9s %-72s %s" % (r["backend"], r["problem"], ("%.3f ms  %.0f TFLOP/s" % (t, r["tflops"])) if t is not None else r.get("unavailable", "")))
'; }
for dtype in f16 bf16; do
  for e in 64 128; do
    base=(--batch 4 --heads 16 --len-q 4096 --head-dim "$e" --dtype "$dtype")
    echo "== $dtype E=$e B=4 H=16 L=4096"
    bench "${base[@]}"
    bench "${base[@]}" --softcap 30
    bench "${base[@]}" --alibi
    bench "${base[@]}" --softcap 30 --alibi
    bench "${base[@]}" --window-left 1023 --window-right 0
    bench "${base[@]}" --len-kv 1024
    bench "${base[@]}" --window-left 511 --window-right 512
    bench "${base[@]}" --causal
    bench "${base[@]}" --causal --softcap 30
  done
done
echo "== backward, f16 E=128 B=4 H=16 L=4096"
base=(--batch 4 --heads 16 --len-q 4096 --head-dim 128 --dtype f16 --backward)
bench "${base[@]}"
bench "${base[@]}" --softcap 30
bench "${base[@]}" --window-left 1023 --window-right 0
bench "${base[@]}" --len-kv 1024
