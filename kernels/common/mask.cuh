// What a query may see: the key range causal alignment (and the sequence's key count)
// leaves a row or a block of rows, and the attention mask's entries.
#pragma once
#include "common/dtype.cuh"
#include "common/params.cuh"

// Keys j with lo <= j < hi take part. Causal and varlen reduce to this per query row, and
// a sliding window will too. lo is 0 until then, so the kernels bound-check hi alone.
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

// The keys query row i of a sequence of len_q queries and len_k keys sees.
__device__ __forceinline__ KeyRange row_keys(int causal, int i, int len_q, int len_k) {
    return KeyRange{0, key_limit(causal, i, len_q, len_k)};
}

// Query rows first..last of a block: the keys some row sees (the key tiles the block
// visits) and the keys every row sees (tiles inside need no bound check). The range of a
// row moves right with the row, so the first and the last row give both.
__device__ __forceinline__ KeyRange block_keys_any(int causal, int first, int last, int len_q, int len_k) {
    return KeyRange{row_keys(causal, first, len_q, len_k).lo, row_keys(causal, last, len_q, len_k).hi};
}
__device__ __forceinline__ KeyRange block_keys_all(int causal, int first, int last, int len_q, int len_k) {
    return KeyRange{row_keys(causal, last, len_q, len_k).lo, row_keys(causal, first, len_q, len_k).hi};
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
