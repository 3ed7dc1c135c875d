// Where a block's sequence starts and how long it is, for dense and varlen batches alike:
// built once per block from the params, so no kernel repeats the cu_seqlens decoding.
#pragma once
#include "common/dtype.cuh"
#include "common/params.cuh"

// Sequence b's first row and length: from cu_seqlens in varlen mode (its rows of the
// packed [total, H, E] storage), else row 0 (the batch stride does the job) and the
// dense length.
__device__ __forceinline__ void seq_extent(int varlen, u64 cu_seqlens, int b, int dense_len,
                                           i64& start, int& len) {
    if (varlen == 0) {
        start = 0;
        len = dense_len;
    } else if (varlen == 1) {
        const u32* cu = (const u32*)cu_seqlens;
        start = cu[b];
        len = (int)(cu[b + 1] - cu[b]);
    } else {
        const int* cu = (const int*)cu_seqlens;
        start = cu[b];
        len = cu[b + 1] - cu[b];
    }
}

struct SeqLens {
    i64 start_q, start_k;  // first query and key row of the sequence
    int len_q, len_k;      // its query and key counts
    __device__ __forceinline__ SeqLens(const FwdParams& p, int b) {
        seq_extent(p.varlen, p.cu_seqlens_q, b, p.len_q, start_q, len_q);
        seq_extent(p.varlen, p.cu_seqlens_k, b, p.len_kv, start_k, len_k);
    }
};
