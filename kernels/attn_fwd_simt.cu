// Scalar (CUDA-core) attention forward for the efficient backend in f32: one warp per
// query row, f32 arithmetic throughout, online softmax, any mask read through its
// broadcast strides. Lanes split the keys for the scores and the value dims for the
// output; scores never leave registers.
//
// Compile-time: SDPA_DTYPE, SDPA_DV_CHUNKS (ceil(Ev / 32) bucket), SDPA_EXTRAS (mask and
// dropout compiled in, chosen at run time), SDPA_KERNEL. Head dims up to 32 * SDPA_DV_CHUNKS.
#include "common.cuh"
#include "sdpa_params.cuh"

#define WARPS 4
#define MAX_DIM (32 * SDPA_DV_CHUNKS)

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

extern "C" __global__ void __launch_bounds__(32 * WARPS) SDPA_KERNEL(const SdpaParams p) {
    __shared__ float s_q[WARPS][MAX_DIM];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int i = blockIdx.x * WARPS + warp;

    i64 start_q, start_k;
    int len_q, len_k;
    seq_extent(p.varlen, p.cu_seqlens_q, b, p.len_q, start_q, len_q);
    seq_extent(p.varlen, p.cu_seqlens_k, b, p.len_kv, start_k, len_k);
    if (i >= len_q) return;

    const int hk = h / p.group;
    const elem_t* q = (const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + (start_q + i) * p.q_stride_l;
    const elem_t* k = (const elem_t*)p.k + b * p.k_stride_b + hk * p.k_stride_h + start_k * p.k_stride_l;
    const elem_t* v = (const elem_t*)p.v + b * p.v_stride_b + hk * p.v_stride_h + start_k * p.v_stride_l;
    for (int d = lane; d < p.head_dim; d += 32) s_q[warp][d] = load_elem(q + d);
    __syncwarp();

    const int limit = key_limit(p.causal, i, len_q, len_k);
    float o[SDPA_DV_CHUNKS];
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) o[c] = 0.f;
    float row_max = SDPA_NEG_INF;
    float lane_sum = 0.f;

    for (int j0 = 0; j0 < limit; j0 += 32) {
        const int j = j0 + lane;
        float x = SDPA_NEG_INF;
        if (j < limit) {
            const elem_t* k_row = k + (i64)j * p.k_stride_l;
            float dot = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot = fmaf(s_q[warp][d], load_elem(k_row + d), dot);
            x = dot * p.scale_log2;
#if SDPA_EXTRAS
            if (p.mask_kind != 0) {
                const i64 at = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_l + j * p.mask_stride_s;
                if (p.mask_kind == 1) {
                    if (((const unsigned char*)p.mask)[at] == 0) x = SDPA_NEG_INF;
                } else {
                    x += load_elem((const elem_t*)p.mask + at) * SDPA_LOG2E;
                }
            }
#endif
        }
        const float new_max = fmaxf(row_max, warp_max(x));
        const float base = (new_max == SDPA_NEG_INF) ? 0.f : new_max;
        const float alpha = exp2f(row_max - base);
        row_max = new_max;
        float weight = exp2f(x - base);
        lane_sum = lane_sum * alpha + weight;
#if SDPA_EXTRAS
        if (p.dropout && j < limit) {
            const u64 n = (((u64)b * p.heads_q + h) * (u64)p.len_q + (u64)i) * (u64)p.len_kv + (u64)j;
            if (!dropout_keep1(p.dropout_seed, p.dropout_offset, p.dropout_threshold, n)) weight = 0.f;
        }
#endif
#pragma unroll
        for (int c = 0; c < SDPA_DV_CHUNKS; ++c) o[c] *= alpha;
        const int count = min(32, limit - j0);
        for (int jj = 0; jj < count; ++jj) {
            const float w = __shfl_sync(0xffffffffu, weight, jj);
            if (w == 0.f) continue;  // warp-uniform: w is the same in every lane
            const elem_t* v_row = v + (i64)(j0 + jj) * p.v_stride_l;
#pragma unroll
            for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
                const int d = lane + 32 * c;
                if (d < p.head_dim_v) o[c] = fmaf(w, load_elem(v_row + d), o[c]);
            }
        }
    }

    const float sum = warp_sum(lane_sum);
    const float inv = sum > 0.f ? (float)p.keep_scale / sum : 0.f;
    elem_t* out = (elem_t*)p.out + b * p.out_stride_b + h * p.out_stride_h + (start_q + i) * p.out_stride_l;
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
        const int d = lane + 32 * c;
        if (d < p.head_dim_v) out[d] = to_elem(o[c] * inv);
    }
    if (lane == 0) {
        float* lse = (float*)p.lse + b * p.lse_stride_b + h * p.lse_stride_h + (start_q + i) * p.lse_stride_l;
        *lse = sum > 0.f ? row_max * SDPA_LN2 + logf(sum) : SDPA_NEG_INF;
    }
}
