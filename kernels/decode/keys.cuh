// Where the decode kernels (attn_decode.cu, attn_decode_tc.cu) find a key in the cache.
#pragma once
#include "decode/params.cuh"

// Where key j of batch row b lives: page block_table[b][j / block_size] at slot
// j % block_size, or (dense) page b at slot j. Looked up once a key, for K and V both.
struct KeyAt {
    int page, slot;
};
__device__ __forceinline__ KeyAt key_at(const DecodeParams& p, int b, int j) {
    if (!p.block_table) return KeyAt{b, j};
    return KeyAt{((const int*)p.block_table)[(i64)b * p.table_stride + j / p.block_size], j % p.block_size};
}
// Element offset of kv head h's row at `at` in a cache of strides (page, slot, head).
__device__ __forceinline__ i64 key_offset(KeyAt at, i64 sp, i64 ss, i64 sh, int h) {
    return (i64)at.page * sp + (i64)at.slot * ss + (i64)h * sh;
}

// The keys the query rows of batch row b see, after the append: n keys, query row i at
// position i + off (causal is bottom-right); row i sees [lo(i), hi(i)), both
// non-decreasing in i (DESIGN.md's window, causal as a right window of 0).
struct RowKeys {
    int n, off, wl, wr;
    __device__ __forceinline__ int lo(int i) const { return wl < 0 ? 0 : max(0, i + off - wl); }
    __device__ __forceinline__ int hi(int i) const { return wr < 0 ? n : max(0, min(n, i + off + wr + 1)); }
};
__device__ __forceinline__ RowKeys row_keys(const DecodeParams& p, int b) {
    const int n = ((const int*)p.seqlens)[b] + p.len_new;
    return RowKeys{n, n - p.len_q, p.window_left, p.causal ? 0 : p.window_right};
}

// The keys split `split` of a tile covers. The tile's packed rows r0 .. r0 + rows - 1
// (group query heads a position) see [lo, hi) between them; each of the p.splits splits
// takes an equal share of it rounded up to whole blocks of `block` keys, so the last
// splits may be short or empty.
struct KeySpan {
    int begin, end;
};
__device__ __forceinline__ KeySpan split_keys(const DecodeParams& p, const RowKeys& keys, int r0, int rows,
                                              int split, int block) {
    const int lo = keys.lo(r0 / p.group), hi = keys.hi((r0 + rows - 1) / p.group);
    const int len = max(0, hi - lo);
    const int per = ((len + p.splits - 1) / p.splits + block - 1) / block * block;
    const int begin = lo + split * per;
    return KeySpan{begin, min(hi, begin + per)};
}
