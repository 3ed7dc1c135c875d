// What the tensor-core backward kernels share (attn_bwd_tc.cu, attn_bwd_wgmma.cu): the
// pre kernel (SDPA_KERNEL_PRE, defined by the includer), dq's vector reductions and the
// first query block a key block sees.
#pragma once
#include "common/dtype.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"

// Grid (ceil(L / 4), Hq, B), 128 threads: one warp per query row, D = rowsum(dout * out)
// at row (b, h, i) of the [B, Hq, L] softmax_d and the row's lse in log2 units at the
// same row of the [B, Hq, L] after it.
extern "C" __global__ void __launch_bounds__(128) SDPA_KERNEL_PRE(const BwdParams p) {
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const SeqLens seq(p, b);
    const int i = blockIdx.x * 4 + warp;
    if (i >= seq.len_q) return;
    const elem_t* o = (const elem_t*)p.out + b * p.out_stride_b + h * p.out_stride_h + (seq.start_q + i) * p.out_stride_l;
    const elem_t* g = (const elem_t*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + (seq.start_q + i) * p.dout_stride_l;
    float acc = 0.f;
    for (int d = lane; d < p.head_dim_v; d += 32) acc = fmaf(load_elem(o + d), load_elem(g + d), acc);
    acc = warp_sum(acc);
    if (lane == 0) {
        const i64 row = ((i64)b * p.heads_q + h) * p.len_q + i;
        const float* lse = (const float*)p.lse + b * p.lse_stride_b + h * p.lse_stride_h + seq.start_q * p.lse_stride_l;
        const float x = lse[i * p.lse_stride_l];
        ((float*)p.softmax_d)[row] = acc;
        ((float*)p.softmax_d)[(i64)p.batch * p.heads_q * p.len_q + row] =
            x == SDPA_NEG_INF ? -SDPA_NEG_INF : x * SDPA_LOG2E;
    }
}

// dst[0..4] += (a, b, c, d) in one vector reduction on sm_90 (16-byte aligned dst), when
// `on` (a predicate, not a branch: the dq loop has none).
__device__ __forceinline__ void red_add4(float* dst, float a, float b, float c, float d, bool on) {
#if !defined(SDPA_EMU) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{ .reg .pred p; setp.ne.b32 p, %5, 0;\n"
        "@p red.global.add.v4.f32 [%0], {%1, %2, %3, %4}; }" ::"l"(dst),
        "f"(a), "f"(b), "f"(c), "f"(d), "r"((int)on)
        : "memory");
#else
    if (on) {
        atomicAdd(dst, a);
        atomicAdd(dst + 1, b);
        atomicAdd(dst + 2, c);
        atomicAdd(dst + 3, d);
    }
#endif
}

// A plain read-modify-write of four values: no kernel calls it; the planted-bug catalogue
// (ci/planted_bugs.py, bwd-tc-dq-race) swaps it in for red_add4 to plant a race.
__device__ __forceinline__ void red_add4_plain(float* dst, float a, float b, float c, float d, bool on) {
    if (on) {
        dst[0] += a;
        dst[1] += b;
        dst[2] += c;
        dst[3] += d;
    }
}

// The first block of ROWS query rows with a row that sees key n0 (key limits grow with
// the row).
template <int ROWS>
__device__ __forceinline__ int first_query_block(const BwdParams& p, const SeqLens& seq, int n0, int n_m) {
    int m = 0;
    while (m < n_m && key_limit(p.causal, min(m * ROWS + ROWS, seq.len_q) - 1, seq.len_q, seq.len_k) <= n0) ++m;
    return m;
}
