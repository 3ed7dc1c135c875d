// Scalar (CUDA-core) attention forward for the efficient backend in f32: one warp per
// query row, f32 arithmetic throughout, online softmax, any mask read through its
// broadcast strides. Lanes split the keys for the scores and the value dims for the
// output; scores never leave registers.
//
// Compile-time: SDPA_DTYPE, SDPA_DV_CHUNKS (ceil(Ev / 32) bucket), SDPA_EXTRAS (mask,
// dropout, softcap and ALiBi compiled in, chosen at run time), SDPA_KERNEL. The window
// (run time) bounds the keys a row visits in both variants. Head dims up to 32 * SDPA_DV_CHUNKS.
#include "common/dtype.cuh"
#include "common/epilogue.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"

#define WARPS 4
#define MAX_DIM (32 * SDPA_DV_CHUNKS)

extern "C" __global__ void __launch_bounds__(32 * WARPS) SDPA_KERNEL(const FwdParams p) {
    __shared__ float s_q[WARPS][MAX_DIM];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const int i = blockIdx.x * WARPS + warp;

    const SeqLens seq(p, b);
    if (i >= seq.len_q) return;

    const int hk = h / p.group;
    const elem_t* q = (const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + (seq.start_q + i) * p.q_stride_l;
    const elem_t* k = (const elem_t*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const elem_t* v = (const elem_t*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    for (int d = lane; d < p.head_dim; d += 32) s_q[warp][d] = load_elem(q + d);
    __syncwarp();

    const KeyRange keys = row_keys(p, i, seq.len_q, seq.len_k);
    const int limit = keys.hi;
#if SDPA_EXTRAS
    const ScoreMods<float> mods(p, b, h, seq.len_q, seq.len_k, SDPA_LOG2E);
#endif
    float o[SDPA_DV_CHUNKS];
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) o[c] = 0.f;
    float row_max = SDPA_NEG_INF;
    float lane_sum = 0.f;

    // Keys from the window's start (rounded down to 32, so the first chunk is partial).
    for (int j0 = keys.lo < limit ? keys.lo & ~31 : limit; j0 < limit; j0 += 32) {
        const int j = j0 + lane;
        const bool in = j >= keys.lo && j < limit;
        float x = SDPA_NEG_INF;
        if (in) {
            const elem_t* k_row = k + (i64)j * p.k_stride_l;
            float dot = 0.f;
            for (int d = 0; d < p.head_dim; ++d) dot = fmaf(s_q[warp][d], load_elem(k_row + d), dot);
            x = dot * p.scale_log2;
#if SDPA_EXTRAS
            x = mods.apply(x, i, j);
            if (p.mask_kind != 0) x = masked_log2(p, b, h, i, j, x);
#endif
        }
        const float new_max = fmaxf(row_max, warp_max(x));
        const float base = exp_base(new_max);
        const float alpha = exp2f(row_max - base);
        row_max = new_max;
        float weight = exp2f(x - base);
        lane_sum = lane_sum * alpha + weight;
#if SDPA_EXTRAS
        if (p.dropout && in) {
            const u64 n = dropout_index(p, b, h, i, j);
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
    const float inv = out_scale(sum, p.keep_scale);
    elem_t* out = (elem_t*)p.out + b * p.out_stride_b + h * p.out_stride_h + (seq.start_q + i) * p.out_stride_l;
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
        const int d = lane + 32 * c;
        if (d < p.head_dim_v) out[d] = to_elem(o[c] * inv);
    }
    if (lane == 0) {
        float* lse = (float*)p.lse + b * p.lse_stride_b + h * p.lse_stride_h + (seq.start_q + i) * p.lse_stride_l;
        *lse = row_lse(sum, row_max);
    }
}
