// Kernels of the CUDA math backward (the five matrix products run in cuBLAS, in acc_t:
// f64 for f64, else f32). DESIGN.md "Backward", with s = scale q k^T (+ additive mask;
// bool mask and causal to -inf), P = exp(s - lse) (0 where lse = -inf), Z the forward's
// Philox keep bits replayed at the same flat indices, W = P Z / (1 - p):
//   convert  q, k, v or dout of any strides -> a contiguous acc_t copy (cuBLAS takes no
//            16-bit A with an f32 B, so every product runs on f32 copies: exact widening);
//   grad     per query row: reads the raw q.k and dout.v^T products, sums
//            D = rowsum(P dP), writes dS = P (dP - D) over the first and W over the
//            second, and adds dS into the dmask accumulator (atomics, acc_t) for an
//            additive mask;
//   round    dst = to_elem(factor * src): each gradient rounded once from acc_t.
//
// Compile-time: SDPA_DTYPE, SDPA_KERNEL_CONVERT, SDPA_KERNEL_GRAD, SDPA_KERNEL_ROUND.
#include "common/dtype.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"

#if SDPA_DTYPE == 0
__device__ __forceinline__ double acc_neg_inf() { return -__longlong_as_double(0x7ff0000000000000LL); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
#else
__device__ __forceinline__ float acc_neg_inf() { return SDPA_NEG_INF; }
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
#endif

// which: 0 q [B, Hq, L, E], 1 k [B, Hkv, S, E], 2 v [B, Hkv, S, Ev], 3 dout
// [B, Hq, L, Ev] (unit last stride, checked on the host). No GQA expansion: the host
// runs the products per kv head over the group's query rows.
extern "C" __global__ void SDPA_KERNEL_CONVERT(const BwdParams p, int which, u64 dst) {
    const bool per_q = which == 0 || which == 3;
    const int heads = per_q ? p.heads_q : p.heads_kv;
    const int rows = per_q ? p.len_q : p.len_kv;
    const int cols = which >= 2 ? p.head_dim_v : p.head_dim;
    const elem_t* src =
        (const elem_t*)(which == 0 ? p.q : which == 1 ? p.k : which == 2 ? p.v : p.dout);
    const i64 sb = which == 0 ? p.q_stride_b : which == 1 ? p.k_stride_b : which == 2 ? p.v_stride_b : p.dout_stride_b;
    const i64 sh = which == 0 ? p.q_stride_h : which == 1 ? p.k_stride_h : which == 2 ? p.v_stride_h : p.dout_stride_h;
    const i64 sl = which == 0 ? p.q_stride_l : which == 1 ? p.k_stride_l : which == 2 ? p.v_stride_l : p.dout_stride_l;
    const i64 se = which == 0 ? p.q_stride_e : which == 1 ? p.k_stride_e : which == 2 ? p.v_stride_e : 1;
    const u64 total = (u64)p.batch * heads * rows * cols;
    acc_t* out = (acc_t*)dst;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (u64)gridDim.x * blockDim.x) {
        const int c = (int)(idx % cols);
        const int r = (int)((idx / cols) % rows);
        const int h = (int)((idx / ((u64)cols * rows)) % heads);
        const int b = (int)(idx / ((u64)cols * rows * heads));
        out[idx] = load_elem(src + b * sb + h * sh + r * sl + c * se);
    }
}

// Whether row i reads key j (causal and window range, bool mask), and the additive mask's
// entry.
__device__ __forceinline__ bool key_visible(const BwdParams& p, int b, int h, int i, int j, acc_t& add) {
    add = 0;
    if (!key_seen(p, i, j, p.len_q, p.len_kv)) return false;
    if (p.mask_kind == MASK_NONE) return true;
    const i64 at = mask_offset(p, b, h, i, j);
    if (p.mask_kind == MASK_BOOL) return ((const unsigned char*)p.mask)[at] != 0;
    add = load_elem((const elem_t*)p.mask + at);
    return true;
}

// Z / (1 - p) of score (b, h, i, j) at flat index idx: the keep factor, 1 without dropout.
__device__ __forceinline__ acc_t keep_factor(const BwdParams& p, u64 idx) {
    if (!p.dropout) return (acc_t)1;
    return dropout_keep1(p.dropout_seed, p.dropout_offset, p.dropout_threshold, idx) ? (acc_t)p.keep_scale
                                                                                      : (acc_t)0;
}

// exp(s - lse) of a visible score from its raw q.k, with s = softcap(scale q.k) + ALiBi
// + the additive mask, and the softcap's factor 1 - tanh^2 on dS (1 without one).
__device__ __forceinline__ acc_t score_prob(const BwdParams& p, const ScoreMods<acc_t>& mods, int i, int j,
                                            acc_t qk, acc_t add, acc_t lse, acc_t& factor) {
    acc_t t;
    const acc_t s = mods.apply(qk * (acc_t)p.scale, i, j, t) + add;
    factor = ScoreMods<acc_t>::grad_factor(t);
    // A fully masked row has lse -inf and every s -inf: P is 0, not exp(NaN). An
    // additive -inf gives exp(-inf) = 0 on its own.
    return lse == acc_neg_inf() ? (acc_t)0 : acc_exp(s - lse);
}

// One warp per query row (b, h, i) of [B, Hq, L]: `scores` holds the row's q.k
// (unscaled) and becomes dS, `dp` holds dout.v^T and becomes W. Two passes over the row:
// the first sums the row's weights z = sum exp(s - lse) and P dP with dP = dW Z / (1 - p);
// with P = exp(s - lse) / z (renormalised: the lse is f32) and D = rowsum(P dP) (the exact
// equal of rowsum(dout * out), without out's rounding: the reference's D), the second
// recomputes P and dP from the raw products it then overwrites, and writes
// dS = P (dP - D) (1 - tanh^2 with a softcap) and W = P Z / (1 - p). Keys the row does not
// read (causal, window, bool mask false) get exactly 0 in both, whatever D is. D goes to
// p.softmax_d. The flat index of a score is the dropout stream's index.
extern "C" __global__ void __launch_bounds__(256) SDPA_KERNEL_GRAD(const BwdParams p, u64 scores, u64 dp) {
    const int lane = threadIdx.x & 31;
    const u64 rows = (u64)p.batch * p.heads_q * p.len_q;
    const u64 warps = (u64)gridDim.x * (blockDim.x >> 5);
    acc_t* d_out = (acc_t*)p.softmax_d;
    const float* lse_base = (const float*)p.lse;
    for (u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += warps) {
        const int i = (int)(row % p.len_q);
        const int h = (int)((row / p.len_q) % p.heads_q);
        const int b = (int)(row / ((u64)p.len_q * p.heads_q));
        acc_t* ds = (acc_t*)scores + row * p.len_kv;
        acc_t* w = (acc_t*)dp + row * p.len_kv;
        const acc_t lse = (acc_t)lse_base[b * p.lse_stride_b + h * p.lse_stride_h + i * p.lse_stride_l];
        const ScoreMods<acc_t> mods(p, b, h, p.len_q, p.len_kv, (acc_t)1);
        acc_t partial = 0, z = 0;
        for (int j = lane; j < p.len_kv; j += 32) {
            acc_t add, factor;
            if (!key_visible(p, b, h, i, j, add)) continue;
            const acc_t prob = score_prob(p, mods, i, j, ds[j], add, lse, factor);
            // Multiplied (not selected) so that a NaN in a dropped key still reaches the
            // row (a dropped key was read).
            const acc_t grad_p = w[j] * keep_factor(p, row * p.len_kv + j);
            partial += prob * grad_p;
            z += prob;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            partial += __shfl_xor_sync(0xffffffffu, partial, off);
            z += __shfl_xor_sync(0xffffffffu, z, off);
        }
        // P renormalised by its row sum z (1 up to the f32 lse's rounding, which would
        // otherwise put ~1e-7 relative error into an f64 backward): the reference's P.
        const acc_t inv_z = z != 0 ? (acc_t)1 / z : (acc_t)0;
        const acc_t d = partial * inv_z;
        if (lane == 0) d_out[row] = d;
        for (int j = lane; j < p.len_kv; j += 32) {
            acc_t add, factor;
            if (!key_visible(p, b, h, i, j, add)) {
                ds[j] = 0;
                w[j] = 0;
                continue;
            }
            const acc_t keep = keep_factor(p, row * p.len_kv + j);
            const acc_t prob = score_prob(p, mods, i, j, ds[j], add, lse, factor) * inv_z;
            // dS before the softcap's factor is the additive mask's gradient (the mask is
            // added after the softcap); dq and dk take it times the factor.
            const acc_t grad_s = prob * (w[j] * keep - d);
            ds[j] = grad_s * factor;
            w[j] = prob * keep;
            if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0) {
                atomicAdd((acc_t*)p.dmask + dmask_at(p, b, h, i, j), grad_s);
            }
        }
    }
}

// dst[n] = to_elem(factor * (src[n] + src[total + n] + ...)) over `splits` slices summed
// in slice order (the tensor-core backward's deterministic dq), for n < total: a
// gradient's one rounding.
extern "C" __global__ void SDPA_KERNEL_ROUND(u64 src, u64 splits, u64 dst, u64 total, double factor) {
    const acc_t* from = (const acc_t*)src;
    elem_t* to = (elem_t*)dst;
    const acc_t f = (acc_t)factor;
    for (u64 n = (u64)blockIdx.x * blockDim.x + threadIdx.x; n < total; n += (u64)gridDim.x * blockDim.x) {
        acc_t sum = from[n];
        for (u64 s = 1; s < splits; ++s) sum += from[s * total + n];
        to[n] = to_elem(f * sum);
    }
}
