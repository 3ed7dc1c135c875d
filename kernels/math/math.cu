// Kernels of the CUDA math backend (the two matrix products run in cuBLAS):
// `gather` copies q, k or v of any strides (GQA heads expanded) into a contiguous
// [B, Hq, rows, cols] buffer when cuBLAS cannot read it in place; `softmax` turns one
// row of the materialised scores into probabilities in place, with scale, softcap, ALiBi,
// mask, causal, window and dropout, and writes the log-sum-exp.
//
// Compile-time: SDPA_DTYPE, SDPA_KERNEL_GATHER, SDPA_KERNEL_SOFTMAX. Scores are acc_t
// (f64 for f64, else f32); probabilities are elem_t, written over the scores row with the
// same byte pitch (row `i` of P starts where row `i` of the scores starts).
#include "common/dtype.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"

// which: 0 q [B, Hq, L, E], 1 k [B, Hq, S, E] (head h reads kv head h / group),
// 2 v [B, Hq, S, Ev].
extern "C" __global__ void SDPA_KERNEL_GATHER(const FwdParams p, int which, u64 dst) {
    const int heads = p.heads_q;
    const int rows = which == 0 ? p.len_q : p.len_kv;
    const int cols = which == 2 ? p.head_dim_v : p.head_dim;
    const elem_t* src = (const elem_t*)(which == 0 ? p.q : which == 1 ? p.k : p.v);
    const i64 sb = which == 0 ? p.q_stride_b : which == 1 ? p.k_stride_b : p.v_stride_b;
    const i64 sh = which == 0 ? p.q_stride_h : which == 1 ? p.k_stride_h : p.v_stride_h;
    const i64 sl = which == 0 ? p.q_stride_l : which == 1 ? p.k_stride_l : p.v_stride_l;
    const i64 se = which == 0 ? p.q_stride_e : which == 1 ? p.k_stride_e : p.v_stride_e;
    const int group = which == 0 ? 1 : p.group;
    const u64 total = (u64)p.batch * heads * rows * cols;
    elem_t* out = (elem_t*)dst;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (u64)gridDim.x * blockDim.x) {
        const int c = (int)(idx % cols);
        const int r = (int)((idx / cols) % rows);
        const int h = (int)((idx / ((u64)cols * rows)) % heads);
        const int b = (int)(idx / ((u64)cols * rows * heads));
        out[idx] = src[b * sb + (h / group) * sh + r * sl + c * se];
    }
}

#if SDPA_DTYPE == 0
__device__ __forceinline__ double acc_neg_inf() { return -__longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
#else
__device__ __forceinline__ float acc_neg_inf() { return SDPA_NEG_INF; }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
#endif

__device__ __forceinline__ acc_t block_reduce(acc_t x, bool is_max, acc_t* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const acc_t y = __shfl_xor_sync(0xffffffffu, x, o);
        x = is_max ? (y > x ? y : x) : x + y;
    }
    __syncthreads();  // scratch may still be read by the previous reduction
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = scratch[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
        const acc_t y = scratch[w];
        x = is_max ? (y > x ? y : x) : x + y;
    }
    return x;
}

__device__ __forceinline__ acc_t masked_score(const FwdParams& p, const acc_t* row, int b, int h,
                                              int i, int j, KeyRange keys, const ScoreMods<acc_t>& mods) {
    if (j < keys.lo || j >= keys.hi) return acc_neg_inf();
    acc_t x = mods.apply(row[j] * (acc_t)p.scale, i, j);
    if (p.mask_kind != 0) {
        const i64 at = mask_offset(p, b, h, i, j);
        if (p.mask_kind == 1) {
            if (((const unsigned char*)p.mask)[at] == 0) x = acc_neg_inf();
        } else {
            x += load_elem((const elem_t*)p.mask + at);
        }
    }
    return x;
}

// One block per row (i, h, b) = (blockIdx.x, blockIdx.y, blockIdx.z).
extern "C" __global__ void __launch_bounds__(256) SDPA_KERNEL_SOFTMAX(const FwdParams p, u64 scores) {
    __shared__ acc_t scratch[32];
    const int i = blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int len = p.len_kv;
    const u64 row_index = ((u64)b * p.heads_q + h) * p.len_q + i;
    acc_t* row = (acc_t*)scores + row_index * len;
    elem_t* probs = (elem_t*)row;
    const KeyRange limit = row_keys(p, i, p.len_q, len);
    const ScoreMods<acc_t> mods(p, b, h, p.len_q, len, (acc_t)1);

    acc_t mx = acc_neg_inf();
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const acc_t x = masked_score(p, row, b, h, i, j, limit, mods);
        mx = x > mx ? x : mx;
    }
    mx = block_reduce(mx, true, scratch);
    const acc_t base = mx == acc_neg_inf() ? (acc_t)0 : mx;
    acc_t sum = 0;
    for (int j = threadIdx.x; j < len; j += blockDim.x) sum += acc_exp(masked_score(p, row, b, h, i, j, limit, mods) - base);
    sum = block_reduce(sum, false, scratch);
    // sum is 0 for a fully masked row (output 0, lse -inf) and NaN for a row that read a
    // NaN, which must stay NaN in the weights and the lse (sdpa_core's NaN rule).
    const acc_t inv = sum != 0 ? (acc_t)p.keep_scale / sum : (acc_t)0;
    if (threadIdx.x == 0) {
        float* lse = (float*)p.lse + b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_l;
        *lse = sum != 0 ? (float)(base + acc_log(sum)) : SDPA_NEG_INF;
    }
    const u64 first = row_index * (u64)len;
    // In place, a chunk at a time: every thread reads its score before any thread writes,
    // and a probability never lands past the scores its chunk has read.
    for (int j0 = 0; j0 < len; j0 += blockDim.x) {
        const int j = j0 + threadIdx.x;
        acc_t w = 0;
        if (j < len) {
            w = acc_exp(masked_score(p, row, b, h, i, j, limit, mods) - base) * inv;
            if (p.dropout && !dropout_keep1(p.dropout_seed, p.dropout_offset, p.dropout_threshold, first + j)) w = 0;
        }
        __syncthreads();
        if (j < len) probs[j] = to_elem(w);
        __syncthreads();
    }
}
