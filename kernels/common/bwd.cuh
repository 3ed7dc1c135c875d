// What the tensor-core backward kernels share (attn_bwd_tc.cu, attn_bwd_wgmma.cu): the
// pre kernel (SDPA_KERNEL_PRE, defined by the includer), dq's vector reductions and the
// dropout keep bits of a thread's scores (common/mask.cuh's query_blocks gives the query
// blocks a key block sees).
#pragma once
#include "common/dtype.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"
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

// The forward's keep bits of this thread's BM / 2 score elements in the accumulator layout
// both kernels share (mma.sync's m16n8 C fragments, wgmma's per warp): bit 4 c + e is
// query row m0 + 8 c + 2 t4 + (e & 1) and key key0 + 8 (e >> 1), key0 the thread's first
// key (a row group of 16 plus g). Where every row of the dropout stream starts at a
// multiple of 4 (S % 4 == 0), four keys of a row share one Philox block: the four lanes
// that hold keys 4a .. 4a + 3 (lanes 4 apart) each draw one of their four (key half,
// query) blocks and trade words, a quarter of the Philox work of one draw per element.
template <int BM>
__device__ __forceinline__ u64 replay_keep_bits(const BwdParams& p, int b, int h, int m0, int key0, int lane) {
    const int g = lane >> 2;
    const int t4 = lane & 3;
    u64 keep_bits = ~0ull;
    if ((p.len_kv & 3) == 0) {
        const int c = g & 3;
        const int lane0 = lane - 4 * c;
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
            const int i = m0 + nt * 8 + 2 * t4 + (c & 1);
            const int j0 = key0 - g + (g & ~3) + 8 * (c >> 1);
            const uint4 w = philox_block(p.dropout_seed, p.dropout_offset, dropout_index(p, b, h, i, j0) >> 2);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int k = (c + r) & 3;
                const u32 word = __shfl_sync(0xffffffffu, pick_word(w, (u32)(c - r) & 3u), lane0 + 4 * k);
                if ((u64)word < p.dropout_threshold) keep_bits &= ~(1ull << (nt * 4 + k));
            }
        }
    } else {
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = m0 + nt * 8 + 2 * t4 + (e & 1);
                const int j = key0 + 8 * (e >> 1);
                if (!dropout_keep1(p.dropout_seed, p.dropout_offset, p.dropout_threshold, dropout_index(p, b, h, i, j)))
                    keep_bits &= ~(1ull << (nt * 4 + e));
            }
    }
    return keep_bits;
}
