// The efficient backend's backward: two fused scalar (CUDA-core) kernels, f32 arithmetic
// for every dtype, no L x S buffer, no atomics on dq, dk or dv (each is summed by the one
// warp that owns it, in a fixed order: bitwise repeatable run to run). DESIGN.md
// "Backward", with s = scale q.k (+ mask) the score, P = exp(s - lse) / z from the
// forward's lse renormalised by its row sum z (the lse is f32: z is 1 up to its
// rounding), Z the forward's Philox keep bits at the same flat index,
// dP = (dout.v) Z / (1 - p), D = rowsum(P dP), dS = P (dP - D):
//
//   dq kernel  (query-major, SDPA_KERNEL_DQ) one warp per query row, lanes over a tile of
//              keys: a first pass over the row's keys sums z and D (both written to
//              softmax_d: D of every row, then 1 / z of every row), a
//              second computes dS, accumulates dq = scale sum_j dS k_j in registers
//              (lanes over head dims) and adds dS into the dmask accumulator (atomics,
//              f32, broadcast strides) for an additive mask.
//   dk/dv kernel (key-major, SDPA_KERNEL_DKDV, after the dq kernel) one warp per key row,
//              lanes over a tile of query rows of each query head of the key's group:
//              dv = sum_i P Z/(1-p) dout_i and dk = scale sum_i dS q_i in registers, so
//              GQA's sum over the group's heads happens in the accumulator; each tile's
//              rows are summed apart and then added (blocked: f32 rounding of a sum of
//              TILE + G L / TILE terms, not of G L).
//
// D is rowsum(P dP), the exact equal of rowsum(dout * out) that carries no rounding of a
// 16-bit out (the reference's D); out is not read. Keys a row does not read (causal,
// window, bool mask false) contribute exactly 0 whatever D is; a row with no key (lse
// -inf) has P = 0. Tiles whose rows see none of the block's keys (causal, window) are
// skipped. With a softcap, dq and dk take dS (1 - tanh^2) (DESIGN.md "Backward").
//
// Compile-time: SDPA_DTYPE (f32, f16, bf16), SDPA_DV_CHUNKS (ceil(max(E, Ev) / 32)
// bucket: 2, 4, 8), SDPA_KERNEL_DQ, SDPA_KERNEL_DKDV. Mask and dropout always compiled in.
#include "common/dtype.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"

#define WARPS 4
#define MAX_DIM (32 * SDPA_DV_CHUNKS)
// Rows of the shared tile the lanes split: 16 at dims over 128 keeps the two padded
// tiles under the 48 KB of static shared memory.
#define TILE (MAX_DIM > 128 ? 16 : 32)

// exp(s - lse) (P before the row's renormalisation), the keep factor Z / (1 - p) and dP
// of score (b, h, i, j) for a key inside the row's causal and window range: `qk` and `dov`
// the raw dot products q.k and dout.v, `lse` the row's (natural-log) lse. In natural
// units, as the reference: s = softcap(scale q.k) + ALiBi + mask, one rounding fewer than
// the forward's log2 units.
// A key a bool mask hides is not read (DESIGN.md's NaN rule): all three are 0 whatever
// q.k and dout.v hold. A row with no key has lse -inf and P = 0 (not exp(NaN)); an
// additive -inf gives P = 0 on its own. Returns whether the key is read.
// With a softcap, `factor` is 1 - tanh^2 of the capped score (dS's factor on its way to dq
// and dk; the additive mask's gradient is dS itself), else 1. ALiBi (`mods`) is added
// after the softcap.
__device__ __forceinline__ bool score_grad(const BwdParams& p, const ScoreMods<float>& mods, int b, int h, int i,
                                           int j, float qk, float dov, float lse, float& prob, float& keep,
                                           float& grad_p, float& factor) {
    float t;
    float x = mods.apply(qk * (float)p.scale, i, j, t);
    factor = ScoreMods<float>::grad_factor(t);
    if (p.mask_kind == MASK_BOOL) {
        if (((const unsigned char*)p.mask)[mask_offset(p, b, h, i, j)] == 0) {
            prob = keep = grad_p = 0.f;
            return false;
        }
    } else if (p.mask_kind == MASK_ADDITIVE) {
        x += load_elem((const elem_t*)p.mask + mask_offset(p, b, h, i, j));
    }
    prob = lse == SDPA_NEG_INF ? 0.f : expf(x - lse);
    keep = 1.f;
    if (p.dropout) {
        keep = dropout_keep1(p.dropout_seed, p.dropout_offset, p.dropout_threshold, dropout_index(p, b, h, i, j))
                   ? (float)p.keep_scale
                   : 0.f;
    }
    // Multiplied (not selected): a NaN in a dropped key still reaches the row.
    grad_p = dov * keep;
    return true;
}

// x . y over n floats of shared memory, in four interleaved partial sums (error growth
// and dependency chains a quarter of one running sum's).
__device__ __forceinline__ float dot(const float* x, const float* y, int n) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int d = 0;
    for (; d + 3 < n; d += 4) {
        a0 = fmaf(x[d], y[d], a0);
        a1 = fmaf(x[d + 1], y[d + 1], a1);
        a2 = fmaf(x[d + 2], y[d + 2], a2);
        a3 = fmaf(x[d + 3], y[d + 3], a3);
    }
    for (; d < n; ++d) a0 = fmaf(x[d], y[d], a0);
    return (a0 + a1) + (a2 + a3);
}

__device__ __forceinline__ float row_lse(const BwdParams& p, int b, int h, i64 row) {
    return ((const float*)p.lse)[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_l];
}

// softmax_d holds D for every row [B, Hq, L], then 1 / z (the row's renormalisation).
__device__ __forceinline__ i64 rows_of(const BwdParams& p) { return (i64)p.batch * p.heads_q * p.len_q; }

// Grid (ceil(L / WARPS), Hq, B), WARPS warps: warp w owns query row blockIdx.x * WARPS + w.
extern "C" __global__ void __launch_bounds__(32 * WARPS) SDPA_KERNEL_DQ(const BwdParams p) {
    __shared__ float s_q[WARPS][MAX_DIM];
    __shared__ float s_do[WARPS][MAX_DIM];
    __shared__ float s_k[TILE][MAX_DIM + 1];
    __shared__ float s_v[TILE][MAX_DIM + 1];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.z;
    const int h = blockIdx.y;
    const SeqLens seq(p, b);
    const int first = blockIdx.x * WARPS;
    if (first >= seq.len_q) return;  // the whole block: before any barrier
    const int i = first + warp;
    const bool row_ok = i < seq.len_q;
    const int hk = h / p.group;
    // A row's key range moves right with the row: the block's first row's start and last
    // row's end bound the keys any row reads.
    const KeyRange block = block_keys_any(p, first, min(first + WARPS, seq.len_q) - 1, seq.len_q, seq.len_k);
    const int block_limit = block.hi;
    const KeyRange keys = row_keys(p, i, seq.len_q, seq.len_k);
    const int limit = row_ok ? keys.hi : 0;
    const ScoreMods<float> mods(p, b, h, seq.len_q, seq.len_k, 1.f);

    const elem_t* k = (const elem_t*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const elem_t* v = (const elem_t*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    if (row_ok) {
        const elem_t* q = (const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + (seq.start_q + i) * p.q_stride_l;
        const elem_t* g = (const elem_t*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + (seq.start_q + i) * p.dout_stride_l;
        for (int d = lane; d < p.head_dim; d += 32) s_q[warp][d] = load_elem(q + d * p.q_stride_e);
        for (int d = lane; d < p.head_dim_v; d += 32) s_do[warp][d] = load_elem(g + d);
    }
    const float lse = row_ok ? row_lse(p, b, h, seq.start_q + i) : SDPA_NEG_INF;

    float dq[SDPA_DV_CHUNKS];
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) dq[c] = 0.f;
    float partial = 0.f, partial_z = 0.f;
    float d_row = 0.f, inv_z = 0.f;
    // Pass 0 sums D over the row's keys, pass 1 uses it.
    for (int pass = 0; pass < 2; ++pass) {
        for (int j0 = block.lo < block.hi ? block.lo - block.lo % TILE : block_limit; j0 < block_limit; j0 += TILE) {
            __syncthreads();  // the previous tile is no longer read
            for (int r = warp; r < TILE; r += WARPS) {
                const int j = j0 + r;
                const bool in = j < seq.len_k;
                for (int d = lane; d < p.head_dim; d += 32)
                    s_k[r][d] = in ? load_elem(k + (i64)j * p.k_stride_l + d * p.k_stride_e) : 0.f;
                for (int d = lane; d < p.head_dim_v; d += 32)
                    s_v[r][d] = in ? load_elem(v + (i64)j * p.v_stride_l + d * p.v_stride_e) : 0.f;
            }
            __syncthreads();
            if (!row_ok || j0 >= limit || j0 + TILE <= keys.lo) continue;  // no barrier until the loop's top
            const int j = j0 + lane;
            float ds = 0.f;
            if (lane < TILE && j >= keys.lo && j < limit) {
                const float qk = dot(s_q[warp], s_k[lane], p.head_dim);
                const float dov = dot(s_do[warp], s_v[lane], p.head_dim_v);
                float prob, keep, grad_p, factor;
                const bool read = score_grad(p, mods, b, h, i, j, qk, dov, lse, prob, keep, grad_p, factor);
                if (pass == 0) {
                    partial = fmaf(prob, grad_p, partial);
                    partial_z += prob;
                } else if (read) {
                    ds = prob * inv_z * (grad_p - d_row);
                    if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0)
                        atomicAdd((float*)p.dmask + dmask_at(p, b, h, i, j), ds);
                    ds *= factor;
                }
            }
            if (pass == 1) {
                // The tile's sum first, then into the row's (blocked summation, see
                // the dk/dv kernel).
                float tile[SDPA_DV_CHUNKS];
#pragma unroll
                for (int c = 0; c < SDPA_DV_CHUNKS; ++c) tile[c] = 0.f;
                const int count = min(TILE, limit - j0);
                for (int jj = 0; jj < count; ++jj) {
                    const float w = __shfl_sync(0xffffffffu, ds, jj);
                    if (w == 0.f) continue;  // warp-uniform
#pragma unroll
                    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
                        const int d = lane + 32 * c;
                        if (d < p.head_dim) tile[c] = fmaf(w, s_k[jj][d], tile[c]);
                    }
                }
#pragma unroll
                for (int c = 0; c < SDPA_DV_CHUNKS; ++c) dq[c] += tile[c];
            }
        }
        if (pass == 0) {
            // P = exp(s - lse) / z: renormalised by its row sum (1 up to the f32 lse's
            // rounding), as the reference; D = rowsum(P dP).
            const float z = warp_sum(partial_z);
            inv_z = z != 0.f ? 1.f / z : 0.f;
            d_row = warp_sum(partial) * inv_z;
            if (row_ok && lane == 0) {
                const i64 row = ((i64)b * p.heads_q + h) * p.len_q + i;
                ((float*)p.softmax_d)[row] = d_row;
                ((float*)p.softmax_d)[rows_of(p) + row] = inv_z;
            }
        }
    }
    if (!row_ok) return;
    elem_t* out = (elem_t*)p.dq + b * p.dq_stride_b + h * p.dq_stride_h + (seq.start_q + i) * p.dq_stride_l;
    const float scale = (float)p.scale;
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
        const int d = lane + 32 * c;
        if (d < p.head_dim) out[d] = to_elem(dq[c] * scale);
    }
}

// Grid (ceil(S / WARPS), Hkv, B), WARPS warps: warp w owns key row blockIdx.x * WARPS + w
// and sums over every query row of every query head of its group. Reads the D the dq
// kernel wrote.
extern "C" __global__ void __launch_bounds__(32 * WARPS) SDPA_KERNEL_DKDV(const BwdParams p) {
    __shared__ float s_k[WARPS][MAX_DIM];
    __shared__ float s_v[WARPS][MAX_DIM];
    __shared__ float s_q[TILE][MAX_DIM + 1];
    __shared__ float s_do[TILE][MAX_DIM + 1];
    __shared__ float s_lse[TILE];
    __shared__ float s_d[TILE];
    __shared__ float s_iz[TILE];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const SeqLens seq(p, b);
    const int first = blockIdx.x * WARPS;
    if (first >= seq.len_k) return;  // the whole block: before any barrier
    const int j = first + warp;
    const bool key_ok = j < seq.len_k;
    if (key_ok) {
        const elem_t* k = (const elem_t*)p.k + b * p.k_stride_b + hk * p.k_stride_h + (seq.start_k + j) * p.k_stride_l;
        const elem_t* v = (const elem_t*)p.v + b * p.v_stride_b + hk * p.v_stride_h + (seq.start_k + j) * p.v_stride_l;
        for (int d = lane; d < p.head_dim; d += 32) s_k[warp][d] = load_elem(k + d * p.k_stride_e);
        for (int d = lane; d < p.head_dim_v; d += 32) s_v[warp][d] = load_elem(v + d * p.v_stride_e);
    }
    float dk[SDPA_DV_CHUNKS], dv[SDPA_DV_CHUNKS];
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) dk[c] = dv[c] = 0.f;

    for (int g = 0; g < p.group; ++g) {
        const int h = hk * p.group + g;
        const ScoreMods<float> mods(p, b, h, seq.len_q, seq.len_k, 1.f);
        const elem_t* q = (const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + seq.start_q * p.q_stride_l;
        const elem_t* gr = (const elem_t*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + seq.start_q * p.dout_stride_l;
        for (int i0 = 0; i0 < seq.len_q; i0 += TILE) {
            // Row ranges move right with the row: no row of the tile reads a key past the
            // last row's end or before the first row's start, so a tile that ends before
            // this block's keys or starts after them is skipped.
            const int last = min(i0 + TILE, seq.len_q) - 1;
            const KeyRange tile_keys = block_keys_any(p, i0, last, seq.len_q, seq.len_k);
            if (tile_keys.hi <= first || tile_keys.lo >= first + WARPS) continue;  // block-uniform
            __syncthreads();  // the previous tile is no longer read
            for (int r = warp; r < TILE; r += WARPS) {
                const int i = i0 + r;
                const bool in = i < seq.len_q;
                for (int d = lane; d < p.head_dim; d += 32)
                    s_q[r][d] = in ? load_elem(q + (i64)i * p.q_stride_l + d * p.q_stride_e) : 0.f;
                for (int d = lane; d < p.head_dim_v; d += 32)
                    s_do[r][d] = in ? load_elem(gr + (i64)i * p.dout_stride_l + d) : 0.f;
                if (lane == 0) {
                    const i64 row = ((i64)b * p.heads_q + h) * p.len_q + i;
                    s_lse[r] = in ? row_lse(p, b, h, seq.start_q + i) : SDPA_NEG_INF;
                    s_d[r] = in ? ((const float*)p.softmax_d)[row] : 0.f;
                    s_iz[r] = in ? ((const float*)p.softmax_d)[rows_of(p) + row] : 0.f;
                }
            }
            __syncthreads();
            if (!key_ok) continue;  // no barrier until the loop's top
            const int i = i0 + lane;
            float w = 0.f, ds = 0.f;
            if (lane < TILE && i < seq.len_q && key_seen(p, i, j, seq.len_q, seq.len_k)) {
                const float qk = dot(s_q[lane], s_k[warp], p.head_dim);
                const float dov = dot(s_do[lane], s_v[warp], p.head_dim_v);
                float prob, keep, grad_p, factor;
                if (score_grad(p, mods, b, h, i, j, qk, dov, s_lse[lane], prob, keep, grad_p, factor)) {
                    prob *= s_iz[lane];
                    ds = prob * (grad_p - s_d[lane]) * factor;
                    w = prob * keep;
                }
            }
            // The tile's TILE rows summed on their own, then added to the key's sums:
            // one chain over all G x L rows of the group (GQA) rounds like a sum of
            // G x L terms, where PyTorch's per-head products and sum over the heads round
            // like L + G; the blocked sum rounds like TILE + G x L / TILE.
            float tdk[SDPA_DV_CHUNKS], tdv[SDPA_DV_CHUNKS];
#pragma unroll
            for (int c = 0; c < SDPA_DV_CHUNKS; ++c) tdk[c] = tdv[c] = 0.f;
            const int count = min(TILE, seq.len_q - i0);
            for (int ii = 0; ii < count; ++ii) {
                const float wi = __shfl_sync(0xffffffffu, w, ii);
                const float si = __shfl_sync(0xffffffffu, ds, ii);
                if (wi == 0.f && si == 0.f) continue;  // warp-uniform
#pragma unroll
                for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < p.head_dim_v) tdv[c] = fmaf(wi, s_do[ii][d], tdv[c]);
                    if (d < p.head_dim) tdk[c] = fmaf(si, s_q[ii][d], tdk[c]);
                }
            }
#pragma unroll
            for (int c = 0; c < SDPA_DV_CHUNKS; ++c) dk[c] += tdk[c], dv[c] += tdv[c];
        }
    }
    if (!key_ok) return;
    elem_t* dk_row = (elem_t*)p.dk + b * p.dk_stride_b + hk * p.dk_stride_h + (seq.start_k + j) * p.dk_stride_l;
    elem_t* dv_row = (elem_t*)p.dv + b * p.dv_stride_b + hk * p.dv_stride_h + (seq.start_k + j) * p.dv_stride_l;
    const float scale = (float)p.scale;
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
        const int d = lane + 32 * c;
        if (d < p.head_dim) dk_row[d] = to_elem(dk[c] * scale);
        if (d < p.head_dim_v) dv_row[d] = to_elem(dv[c]);
    }
}
