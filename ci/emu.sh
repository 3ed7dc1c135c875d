#!/usr/bin/env bash
# The CUDA kernels on the CPU: compiles kernels/bwd/attn_bwd_simt.cu (two head-dim
# buckets), kernels/bwd/math_bwd.cu and the mma.sync forward kernels/fwd/attn_fwd_tc.cu
# (f16, head dim 64, -DSDPA_EMU: ldmatrix, mma.sync and cp.async emulated lane by lane)
# and the mma.sync backward kernels/bwd/attn_bwd_tc.cu (f16, two tile shapes)
# and the decode kernels kernels/decode/attn_decode.cu and attn_decode_tc.cu (f16, head-dim class 64; ci/emu/decode_emu.cpp)
# with g++ against ci/emu/cuda_emu.h (block threads as OS threads, barriers and shuffles
# as std::barrier) and runs them against a plain f64 backward (ci/emu/bwd_emu.cpp) and
# forward (ci/emu/fwd_tc_emu.cpp) and backward (ci/emu/bwd_tc_emu.cpp). Catches logic errors of the kernels with no
# GPU; not their races or their speed (the GPU bundle's racecheck and benches do that).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${EMU_OUT:-target/emu}
mkdir -p "$OUT"
# Every compile runs in the background; `waitall` fails if any of them failed (a bare
# `wait` would not, and a stale object from an earlier run would be linked).
waitall() { local rc=0; for pid in $(jobs -p); do wait "$pid" || rc=1; done; return $rc; }
rm -f "$OUT"/*.o
CXX=${CXX:-g++}
KERNELS=${EMU_KERNELS:-kernels}
FLAGS=(-std=c++20 -O2 -pthread -Wall -Wno-unused-function -Wno-unknown-pragmas -I "$KERNELS" -I ci/emu -DSDPA_EMU -DSDPA_DTYPE=1)
"$CXX" "${FLAGS[@]}" -DSDPA_DV_CHUNKS=2 -DSDPA_KERNEL_DQ=emu_dq_c2 -DSDPA_KERNEL_DKDV=emu_dkdv_c2 \
  -c ci/emu/simt_tu.cpp -o "$OUT/simt2.o" &
"$CXX" "${FLAGS[@]}" -DSDPA_DV_CHUNKS=8 -DSDPA_KERNEL_DQ=emu_dq_c8 -DSDPA_KERNEL_DKDV=emu_dkdv_c8 \
  -c ci/emu/simt_tu.cpp -o "$OUT/simt8.o" &
"$CXX" "${FLAGS[@]}" -DSDPA_KERNEL_CONVERT=emu_math_convert -DSDPA_KERNEL_GRAD=emu_math_grad \
  -DSDPA_KERNEL_ROUND=emu_math_round -c ci/emu/math_tu.cpp -o "$OUT/math.o" &
"${CXX}" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=0}" -DSDPA_KERNEL_CONVERT=emu_math_convert_f64 \
  -DSDPA_KERNEL_GRAD=emu_math_grad_f64 -DSDPA_KERNEL_ROUND=emu_math_round_f64 -c ci/emu/math_tu.cpp -o "$OUT/math64.o" &
"$CXX" "${FLAGS[@]}" -c ci/emu/bwd_emu.cpp -o "$OUT/main.o" &
TC=(-DSDPA_HEAD_DIM=64 -DSDPA_WARPS=4 -DSDPA_BLOCK_N=64 -DSDPA_ROW_FRAGS=2 -DSDPA_MIN_BLOCKS=1 -DSDPA_EXTRAS=1 -DSDPA_KERNEL=emu_fwd_tc)
# (-w: g++ warns that the kernel's `extern "C" __constant__` symbol is initialised.)
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -w "${TC[@]}" -c ci/emu/tc_tu.cpp -o "$OUT/tc.o" &
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -c ci/emu/fwd_tc_emu.cpp -o "$OUT/tc_main.o" &
# The mma.sync backward at two tile shapes (f16, mask and dropout compiled in).
BTC=(-DSDPA_MIN_BLOCKS=1 -DSDPA_EXTRAS=1)
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -w "${BTC[@]}" -DSDPA_HEAD_DIM=64 -DSDPA_WARPS=4 -DSDPA_BLOCK_M=64 \
  -DSDPA_KERNEL_PRE=w4m64_pre -DSDPA_KERNEL=w4m64_main -DSDPA_EMU_TAG=w4m64 -c ci/emu/bwd_tc_tu.cpp -o "$OUT/btc_a.o" &
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -w "${BTC[@]}" -DSDPA_HEAD_DIM=128 -DSDPA_WARPS=8 -DSDPA_BLOCK_M=32 \
  -DSDPA_KERNEL_PRE=w8m32_pre -DSDPA_KERNEL=w8m32_main -DSDPA_EMU_TAG=w8m32 -c ci/emu/bwd_tc_tu.cpp -o "$OUT/btc_b.o" &
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -c ci/emu/bwd_tc_emu.cpp -o "$OUT/btc_main.o" &
# The decode kernels (f16, head-dim class 64, blocks of 64 keys, every tile size).
DEC=(-DSDPA_HEAD_DIM=64 -DSDPA_BLOCK_N=64 -DSDPA_KERNEL_APPEND=emu_decode_append -DSDPA_KERNEL_COMBINE=emu_decode_combine
  -DSDPA_KERNEL_SPLIT1=emu_decode_split1 -DSDPA_KERNEL_SPLIT4=emu_decode_split4 -DSDPA_KERNEL_SPLIT8=emu_decode_split8
  -DSDPA_KERNEL_SPLIT16=emu_decode_split16)
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -w "${DEC[@]}" -c ci/emu/decode_tu.cpp -o "$OUT/dec.o" &
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -w -DSDPA_HEAD_DIM=64 -DSDPA_KERNEL_SPLIT_TC=emu_decode_split_tc \
  -c ci/emu/decode_tc_tu.cpp -o "$OUT/dec_tc.o" &
"$CXX" "${FLAGS[@]/-DSDPA_DTYPE=1/-DSDPA_DTYPE=2}" -c ci/emu/decode_emu.cpp -o "$OUT/dec_main.o" &
waitall
"$CXX" -pthread "$OUT/simt2.o" "$OUT/simt8.o" "$OUT/math.o" "$OUT/math64.o" "$OUT/main.o" -o "$OUT/bwd_emu"
"$CXX" -pthread "$OUT/tc.o" "$OUT/tc_main.o" -o "$OUT/fwd_tc_emu"
"$CXX" -pthread "$OUT/btc_a.o" "$OUT/btc_b.o" "$OUT/btc_main.o" -o "$OUT/bwd_tc_emu"
"$CXX" -pthread "$OUT/dec.o" "$OUT/dec_tc.o" "$OUT/dec_main.o" -o "$OUT/decode_emu"
"$OUT/bwd_emu"
"$OUT/fwd_tc_emu"
"$OUT/bwd_tc_emu"
"$OUT/decode_emu"
