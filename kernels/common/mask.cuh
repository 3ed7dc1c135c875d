// What a query may see: the key range causal alignment (and the sequence's key count)
// leaves a row or a block of rows, and the attention mask's entries.
#pragma once
#include "common/dtype.cuh"
#include "common/params.cuh"

// Keys j with lo <= j < hi take part: what causal alignment, the sliding window and the
// sequence's key count leave query row i. lo and hi are non-decreasing in i; a row with
// lo >= hi sees no key (output 0, lse -inf).
struct KeyRange {
    int lo, hi;
};

// sdpa_core::Causal::key_limit: keys j < limit take part for query i.
__device__ __forceinline__ int key_limit(int causal, int i, int len_q, int len_kv) {
    if (causal == 1) return min(i + 1, len_kv);
    if (causal == 2) {
        const i64 limit = (i64)i + 1 + (i64)len_kv - (i64)len_q;
        return (int)max((i64)0, min((i64)len_kv, limit));
    }
    return len_kv;
}

// The keys query row i of a sequence of len_q queries and len_k keys sees: causal (either
// alignment) ANDed with the window (DESIGN.md: i + S - L - window_left <= j <= i + S - L +
// window_right, bottom-right aligned, -1 unbounded).
__device__ __forceinline__ KeyRange row_keys(const FwdParams& p, int i, int len_q, int len_k) {
    int lo = 0, hi = key_limit(p.causal, i, len_q, len_k);
    const i64 diag = (i64)i + (i64)len_k - (i64)len_q;
    if (p.window_left >= 0) lo = (int)max((i64)0, min((i64)len_k, diag - p.window_left));
    if (p.window_right >= 0) hi = (int)max((i64)0, min((i64)hi, diag + p.window_right + 1));
    return KeyRange{lo, hi};
}
// Whether row i sees key j (i inside the sequence).
__device__ __forceinline__ bool key_seen(const FwdParams& p, int i, int j, int len_q, int len_k) {
    const KeyRange r = row_keys(p, i, len_q, len_k);
    return j >= r.lo && j < r.hi;
}

// Query rows first..last of a block: the keys some row sees (the key tiles the block
// visits) and the keys every row sees (tiles inside need no bound check; lo >= hi when
// there are none). A row's range moves right with the row, so the first and the last row
// give both.
__device__ __forceinline__ KeyRange block_keys_any(const FwdParams& p, int first, int last, int len_q, int len_k) {
    return KeyRange{row_keys(p, first, len_q, len_k).lo, row_keys(p, last, len_q, len_k).hi};
}
__device__ __forceinline__ KeyRange block_keys_all(const FwdParams& p, int first, int last, int len_q, int len_k) {
    return KeyRange{row_keys(p, last, len_q, len_k).lo, row_keys(p, first, len_q, len_k).hi};
}
// Whether keys [n0, n0 + n) lie inside `all` (a tile that needs no bound check).
__device__ __forceinline__ bool tile_inside(KeyRange all, int n0, int n) { return n0 >= all.lo && n0 + n <= all.hi; }

// The key tiles of `block` keys a block of rows visits: tiles first .. end - 1 (none when
// the rows see no key).
struct TileSpan {
    int first, end;
};
__device__ __forceinline__ TileSpan key_tiles(KeyRange any, int block) {
    if (any.hi <= any.lo) return TileSpan{0, 0};
    return TileSpan{any.lo / block, (any.hi + block - 1) / block};
}

// The query blocks of `rows` rows (of n_m) with a row that sees some key of [n0, n0 + n):
// blocks begin .. end - 1 (both bounds move right with the keys, as the rows' ranges do).
struct BlockSpan {
    int begin, end;
};
__device__ __forceinline__ BlockSpan query_blocks(const FwdParams& p, int len_q, int len_k, int n0, int n, int rows,
                                                  int n_m) {
    int m = 0;
    while (m < n_m && row_keys(p, min(m * rows + rows, len_q) - 1, len_q, len_k).hi <= n0) ++m;
    int end = m;
    while (end < n_m && row_keys(p, end * rows, len_q, len_k).lo < n0 + n) ++end;
    return BlockSpan{m, end};
}

// Element offset of the mask's entry (b, h, i, j) through its broadcast strides.
__device__ __forceinline__ i64 mask_offset(const FwdParams& p, int b, int h, int i, int j) {
    return b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_l + j * p.mask_stride_s;
}

// A score in log2 units (the fused kernels' exp2 domain) with the mask's entry (b, h, i,
// j) applied: -inf where a bool mask is false, else plus the additive mask times log2(e).
__device__ __forceinline__ float masked_log2(const FwdParams& p, int b, int h, int i, int j, float x) {
    const i64 at = mask_offset(p, b, h, i, j);
    if (p.mask_kind == 1) {
        if (((const unsigned char*)p.mask)[at] == 0) x = SDPA_NEG_INF;
    } else {
        x += load_elem((const elem_t*)p.mask + at) * SDPA_LOG2E;
    }
    return x;
}

// The broadcast offset of (b, h, i, j) in a backward's dmask accumulator (contiguous in
// the mask's own shape; 0 strides on the axes the mask broadcasts along).
__device__ __forceinline__ i64 dmask_at(const BwdParams& p, int b, int h, int i, int j) {
    return b * p.dmask_stride_b + h * p.dmask_stride_h + i * p.dmask_stride_l + j * p.dmask_stride_s;
}

// tanh in the accumulator's precision (f64 for the f64 math path).
__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }
// tanh on the MUFU unit (relative error about 2^-11): the 16-bit tensor-core kernels'
// softcap, whose scores and weights are rounded to f16/bf16 anyway.
__device__ __forceinline__ float fast_tanh(float x) {
#ifdef SDPA_EMU
    return tanhf(x);
#else
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// Softcap and ALiBi of one (batch, query head), DESIGN.md's order: scale, softcap, ALiBi,
// then the masks. Scores are in `unit`s of the natural log (log2(e) for the fused kernels'
// exp2 domain, 1 for the math paths): with c the softcap, x = scale q.k in those units
// becomes C tanh(x / C) with C = c unit, then minus slope unit |i + S - L - j|. `t` keeps
// tanh for the backward (dS' = dS (1 - t^2)). FAST: tanh on the MUFU unit (fast_tanh;
// the f16/bf16 tensor-core kernels), else the accurate one.
template <class T, bool FAST = false>
struct ScoreMods {
    T cap, inv_cap;  // C and 1 / C; cap 0: no softcap
    T slope;         // the ALiBi slope times unit; 0: none
    int diag;        // len_k - len_q
    __device__ __forceinline__ ScoreMods(const FwdParams& p, int b, int h, int len_q, int len_k, T unit) {
        cap = p.softcap > 0 ? (T)(p.softcap * unit) : (T)0;
        inv_cap = p.softcap > 0 ? (T)1 / cap : (T)0;
        slope = p.alibi ? (T)((const float*)p.alibi)[b * p.alibi_stride_b + h] * unit : (T)0;
        diag = len_k - len_q;
    }
    __device__ __forceinline__ bool active() const { return cap != (T)0 || slope != (T)0; }
    __device__ __forceinline__ T apply(T x, int i, int j, T& t) const {
        t = 0;
        if (cap != (T)0) {
            t = FAST ? (T)fast_tanh((float)(x * inv_cap)) : acc_tanh(x * inv_cap);
            x = cap * t;
        }
        if (slope != (T)0) {
            const int dist = i + diag - j;
            x -= slope * (T)(dist < 0 ? -dist : dist);
        }
        return x;
    }
    __device__ __forceinline__ T apply(T x, int i, int j) const {
        T t;
        return apply(x, i, j, t);
    }
    // The softcap's factor on dS: 1 - t^2 (1 without a softcap, where t is 0).
    __device__ __forceinline__ static T grad_factor(T t) { return (T)1 - t * t; }
};
