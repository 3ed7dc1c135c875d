#!/usr/bin/env bash
# Tile sweep of the Hopper kernel, run from the GPU bundle (ci/gpu.sh copies it there):
#   bash target/gpu-bundle/tile-sweep.sh SHAPES "TILES" ["TILES" ...]
# SHAPES: indices into the bench's five shapes (0: (32,32,1024,32) ... 4), comma-separated.
# TILES: an SDPA_CUDA_WG_TILES value, e.g. "32:1,64,3,2" (dim:warpgroups,block_n,min_blocks,m_tiles).
# Times the flash backend once per TILES value (the default tiles first) and prints one
# line per (tiles, shape): median ms and TFLOP/s (kernels/NOTES.md records the sweeps).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/gpu_env.sh"
export SDPA_CUDA_CACHE=${SDPA_CUDA_CACHE:-$HERE/.kernel-cache}
shapes=$1; shift
for tiles in default "$@"; do
  if [ "$tiles" = default ]; then unset SDPA_CUDA_WG_TILES; else export SDPA_CUDA_WG_TILES=$tiles; fi
  SDPA_BENCH_BACKENDS=flash SDPA_BENCH_SHAPES=$shapes "$HERE/bin/sdpa-cuda-bench" --json 2>&1 \
    | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print("  " + line.rstrip()); continue
    s = r["shape"]
    shape = "({},{},{},{}) {} causal={}".format(s["batch"], s["heads"], s["len"], s["head_dim"], s["dtype"], s["causal"])
    print("{:<22} {}: {:.3f} ms {:.1f} TFLOP/s".format(sys.argv[1], shape, r["median_ms"], r["tflops"]))
' "$tiles"
done
