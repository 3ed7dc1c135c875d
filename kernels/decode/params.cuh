// The decode kernels' parameters (mirrored by sdpa_cuda::DecodeParams, field for field;
// 8-byte fields first). One copy: the decode kernels (kernels/decode/attn_decode.cu,
// attn_decode_tc.cu) and the CPU emulator's harness (ci/emu/decode_emu.cpp) include it.
#pragma once
#include "common/dtype.cuh"

struct DecodeParams {
    u64 q, k, v, out, lse, part_out, part_lse, block_table, seqlens, alibi, k_new, v_new;
    i64 q_stride_b, q_stride_h, q_stride_l;
    i64 k_stride_page, k_stride_slot, k_stride_h;
    i64 v_stride_page, v_stride_slot, v_stride_h;
    i64 kn_stride_b, kn_stride_h, kn_stride_l;
    i64 vn_stride_b, vn_stride_h, vn_stride_l;
    int batch, heads_q, heads_kv, group;
    int len_q, head_dim, head_dim_v, len_new;
    // 0 block_table: dense (page = b, slot = j).
    int block_size, table_stride, causal, window_left;
    // window_* -1: unbounded. alibi_stride_b: 0 for slopes [Hq], Hq for [B, Hq].
    int window_right, alibi_stride_b, splits, row_tiles;
    // vec16: every cache row (and q row) starts 16-byte aligned, so cp.async can read it.
    int vec16, pad0;
    float scale;
    // 0: no softcap.
    float softcap;
};
