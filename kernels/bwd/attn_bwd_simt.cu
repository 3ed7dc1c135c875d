// The efficient backend's backward: two fused scalar (CUDA-core) kernels, f32 arithmetic
// for every dtype, no L x S buffer, no atomics on dq, dk or dv (each is summed by the one
// warp that owns it, in a fixed order: bitwise repeatable run to run). DESIGN.md
// "Backward", with x = scale log2(e) q.k (+ mask log2(e)) the score in log2 units,
// P = exp2(x - lse log2(e)) from the forward's lse, Z the forward's Philox keep bits at
// the same flat index, dP = (dout.v) Z / (1 - p), D = rowsum(P dP), dS = P (dP - D):
//
//   dq kernel  (query-major, SDPA_KERNEL_DQ) one warp per query row, lanes over a tile of
//              keys: a first pass over the row's keys sums D (written to softmax_d), a
//              second computes dS, accumulates dq = scale sum_j dS k_j in registers
//              (lanes over head dims) and adds dS into the dmask accumulator (atomics,
//              f32, broadcast strides) for an additive mask.
//   dk/dv kernel (key-major, SDPA_KERNEL_DKDV, after the dq kernel) one warp per key row,
//              lanes over a tile of query rows of each query head of the key's group:
//              dv = sum_i P Z/(1-p) dout_i and dk = scale sum_i dS q_i in registers, so
//              GQA's sum over the group's heads happens in the accumulator.
//
// D is rowsum(P dP), the exact equal of rowsum(dout * out) that carries no rounding of a
// 16-bit out (the reference's D); out is not read. Keys a row does not read (causal, bool
// mask false) contribute exactly 0 whatever D is; a row with no key (lse -inf) has P = 0.
// Tiles whose rows see none of the block's keys (causal) are skipped.
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

// The broadcast offset of (b, h, i, j) in the dmask accumulator.
__device__ __forceinline__ i64 dmask_at(const BwdParams& p, int b, int h, int i, int j) {
    return b * p.dmask_stride_b + h * p.dmask_stride_h + i * p.dmask_stride_l + j * p.dmask_stride_s;
}

// P, the keep factor Z / (1 - p) and dP of score (b, h, i, j) for a key inside the row's
// causal range: `qk` and `dov` the raw dot products q.k and dout.v, `lse2` the row's lse
// in log2 units. A key a bool mask hides is not read (DESIGN.md's NaN rule): all three
// are 0 whatever q.k and dout.v hold. A row with no key has lse -inf and P = 0 (not
// exp2(NaN)); an additive -inf gives P = 0 on its own.
// Returns whether the key is read.
__device__ __forceinline__ bool score_grad(const BwdParams& p, int b, int h, int i, int j, float qk, float dov,
                                           float lse2, float& prob, float& keep, float& grad_p) {
    float x = qk * p.scale_log2;
    if (p.mask_kind == MASK_BOOL) {
        if (((const unsigned char*)p.mask)[mask_offset(p, b, h, i, j)] == 0) {
            prob = keep = grad_p = 0.f;
            return false;
        }
    } else if (p.mask_kind == MASK_ADDITIVE) {
        x += load_elem((const elem_t*)p.mask + mask_offset(p, b, h, i, j)) * SDPA_LOG2E;
    }
    prob = lse2 == SDPA_NEG_INF ? 0.f : exp2f(x - lse2);
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

__device__ __forceinline__ float row_lse2(const BwdParams& p, int b, int h, i64 row) {
    const float lse = ((const float*)p.lse)[b * p.lse_stride_b + h * p.lse_stride_h + row * p.lse_stride_l];
    return lse == SDPA_NEG_INF ? SDPA_NEG_INF : lse * SDPA_LOG2E;
}

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
    // key_limit grows with the row: the block's last row bounds the keys any row reads.
    const int block_limit = key_limit(p.causal, min(first + WARPS, seq.len_q) - 1, seq.len_q, seq.len_k);
    const int limit = row_ok ? key_limit(p.causal, i, seq.len_q, seq.len_k) : 0;

    const elem_t* k = (const elem_t*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const elem_t* v = (const elem_t*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    if (row_ok) {
        const elem_t* q = (const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + (seq.start_q + i) * p.q_stride_l;
        const elem_t* g = (const elem_t*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + (seq.start_q + i) * p.dout_stride_l;
        for (int d = lane; d < p.head_dim; d += 32) s_q[warp][d] = load_elem(q + d * p.q_stride_e);
        for (int d = lane; d < p.head_dim_v; d += 32) s_do[warp][d] = load_elem(g + d);
    }
    const float lse2 = row_ok ? row_lse2(p, b, h, seq.start_q + i) : SDPA_NEG_INF;

    float dq[SDPA_DV_CHUNKS];
#pragma unroll
    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) dq[c] = 0.f;
    float partial = 0.f;
    float d_row = 0.f;
    // Pass 0 sums D over the row's keys, pass 1 uses it.
    for (int pass = 0; pass < 2; ++pass) {
        for (int j0 = 0; j0 < block_limit; j0 += TILE) {
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
            if (!row_ok || j0 >= limit) continue;  // no barrier until the loop's top
            const int j = j0 + lane;
            float ds = 0.f;
            if (lane < TILE && j < limit) {
                float qk = 0.f, dov = 0.f;
                for (int d = 0; d < p.head_dim; ++d) qk = fmaf(s_q[warp][d], s_k[lane][d], qk);
                for (int d = 0; d < p.head_dim_v; ++d) dov = fmaf(s_do[warp][d], s_v[lane][d], dov);
                float prob, keep, grad_p;
                const bool read = score_grad(p, b, h, i, j, qk, dov, lse2, prob, keep, grad_p);
                if (pass == 0) {
                    partial = fmaf(prob, grad_p, partial);
                } else if (read) {
                    ds = prob * (grad_p - d_row);
                    if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0)
                        atomicAdd((float*)p.dmask + dmask_at(p, b, h, i, j), ds);
                }
            }
            if (pass == 1) {
                const int count = min(TILE, limit - j0);
                for (int jj = 0; jj < count; ++jj) {
                    const float w = __shfl_sync(0xffffffffu, ds, jj);
                    if (w == 0.f) continue;  // warp-uniform
#pragma unroll
                    for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
                        const int d = lane + 32 * c;
                        if (d < p.head_dim) dq[c] = fmaf(w, s_k[jj][d], dq[c]);
                    }
                }
            }
        }
        if (pass == 0) {
            d_row = warp_sum(partial);
            if (row_ok && lane == 0) {
                ((float*)p.softmax_d)[((i64)b * p.heads_q + h) * p.len_q + i] = d_row;
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
    __shared__ float s_lse2[TILE];
    __shared__ float s_d[TILE];
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
        const elem_t* q = (const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + seq.start_q * p.q_stride_l;
        const elem_t* gr = (const elem_t*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + seq.start_q * p.dout_stride_l;
        for (int i0 = 0; i0 < seq.len_q; i0 += TILE) {
            // No row of the tile reads a key past the last row's limit (it grows with
            // the row): a tile whose last row's limit is <= first is skipped.
            const int last = min(i0 + TILE, seq.len_q) - 1;
            if (key_limit(p.causal, last, seq.len_q, seq.len_k) <= first) continue;  // block-uniform
            __syncthreads();  // the previous tile is no longer read
            for (int r = warp; r < TILE; r += WARPS) {
                const int i = i0 + r;
                const bool in = i < seq.len_q;
                for (int d = lane; d < p.head_dim; d += 32)
                    s_q[r][d] = in ? load_elem(q + (i64)i * p.q_stride_l + d * p.q_stride_e) : 0.f;
                for (int d = lane; d < p.head_dim_v; d += 32)
                    s_do[r][d] = in ? load_elem(gr + (i64)i * p.dout_stride_l + d) : 0.f;
                if (lane == 0) {
                    s_lse2[r] = in ? row_lse2(p, b, h, seq.start_q + i) : SDPA_NEG_INF;
                    s_d[r] = in ? ((const float*)p.softmax_d)[((i64)b * p.heads_q + h) * p.len_q + i] : 0.f;
                }
            }
            __syncthreads();
            if (!key_ok) continue;  // no barrier until the loop's top
            const int i = i0 + lane;
            float w = 0.f, ds = 0.f;
            if (lane < TILE && i < seq.len_q && j < key_limit(p.causal, i, seq.len_q, seq.len_k)) {
                float qk = 0.f, dov = 0.f;
                for (int d = 0; d < p.head_dim; ++d) qk = fmaf(s_q[lane][d], s_k[warp][d], qk);
                for (int d = 0; d < p.head_dim_v; ++d) dov = fmaf(s_do[lane][d], s_v[warp][d], dov);
                float prob, keep, grad_p;
                if (score_grad(p, b, h, i, j, qk, dov, s_lse2[lane], prob, keep, grad_p)) {
                    ds = prob * (grad_p - s_d[lane]);
                    w = prob * keep;
                }
            }
            const int count = min(TILE, seq.len_q - i0);
            for (int ii = 0; ii < count; ++ii) {
                const float wi = __shfl_sync(0xffffffffu, w, ii);
                const float si = __shfl_sync(0xffffffffu, ds, ii);
                if (wi == 0.f && si == 0.f) continue;  // warp-uniform
#pragma unroll
                for (int c = 0; c < SDPA_DV_CHUNKS; ++c) {
                    const int d = lane + 32 * c;
                    if (d < p.head_dim_v) dv[c] = fmaf(wi, s_do[ii][d], dv[c]);
                    if (d < p.head_dim) dk[c] = fmaf(si, s_q[ii][d], dk[c]);
                }
            }
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
