#!/usr/bin/env bash
# Pipeline sweep of the tensor-core decode split, run from the GPU bundle (ci/gpu.sh
# copies it there):
#   bash target/gpu-bundle/decode-sweep.sh SHAPES STAGES [STAGES ...]
# SHAPES: indices into the decode bench's shapes (bench::decode_shapes), comma-separated.
# STAGES: the D = 128 pipeline depth a warp keeps (the kernel's default is 3). Each value
# runs the decode bench over a copy of kernels/ with that depth (SDPA_KERNEL_DIR), the
# default first; one line per (stages, shape): median us, K/V GB/s, splits.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/gpu_env.sh"
export SDPA_CUDA_CACHE=${SDPA_CUDA_CACHE:-$HERE/.kernel-cache}
shapes=$1; shift
for stages in default "$@"; do
  if [ "$stages" = default ]; then
    unset SDPA_KERNEL_DIR
  else
    dir=$(mktemp -d)
    cp -r "$HERE/kernels/." "$dir/"
    sed -i "s/^#define STAGES (EMAX <= 64 ? 6 : 3)$/#define STAGES (EMAX <= 64 ? 6 : $stages)/" "$dir/decode/attn_decode_tc.cu"
    grep -q "? 6 : $stages)" "$dir/decode/attn_decode_tc.cu" || { echo "stages $stages: the STAGES line did not match"; continue; }
    export SDPA_KERNEL_DIR=$dir
  fi
  SDPA_BENCH_SHAPES=$shapes "$HERE/bin/sdpa-cuda-bench" --decode 2>&1 | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        r = json.loads(line)
    except ValueError:
        print("  " + line.rstrip()); continue
    s = r["shape"]
    cache = "dense" if s["block_size"] == 0 else "paged %d" % s["block_size"]
    shape = "B={} {}/{} Lq={} S={} {}".format(s["batch"], s["heads_q"], s["heads_kv"], s["len_q"], s["len_kv"], cache)
    print("stages {:<8} {:<36} {:8.1f} us {:6.0f} GB/s splits {}".format(sys.argv[1], shape, r["median_us"], r["kv_gbs"], r["splits"]))
' "$stages"
done
