// The one parameter struct every attention kernel takes, mirrored field for field by
// `sdpa_cuda::params::SdpaParams` (`#[repr(C)]`). Change both together: the Rust unit
// test `params_layout_matches_cuh` parses this file and compares the field order, and the
// static_assert below pins the size.
#pragma once

struct SdpaParams {
    // Device addresses. `out` and `lse` are written; `mask`, `cu_seqlens_q` and
    // `cu_seqlens_k` are 0 when absent.
    unsigned long long q;
    unsigned long long k;
    unsigned long long v;
    unsigned long long out;
    unsigned long long lse;
    unsigned long long mask;
    unsigned long long cu_seqlens_q;
    unsigned long long cu_seqlens_k;
    // Element strides over [B, H, L, E]. In varlen mode the batch stride is 0 and a
    // sequence starts at row cu_seqlens[b] (packed [total, H, E] storage).
    long long q_stride_b;
    long long q_stride_h;
    long long q_stride_l;
    long long q_stride_e;
    long long k_stride_b;
    long long k_stride_h;
    long long k_stride_l;
    long long k_stride_e;
    long long v_stride_b;
    long long v_stride_h;
    long long v_stride_l;
    long long v_stride_e;
    long long out_stride_b;
    long long out_stride_h;
    long long out_stride_l;
    long long lse_stride_b;
    long long lse_stride_h;
    long long lse_stride_l;
    // Broadcast strides of the mask over [B, Hq, L, S] (0 on broadcast axes).
    long long mask_stride_b;
    long long mask_stride_h;
    long long mask_stride_l;
    long long mask_stride_s;
    // Philox4x32-10 dropout stream (sdpa-core's `Dropout`): keep iff word >= threshold;
    // threshold is 2^32 when p == 1.
    unsigned long long dropout_seed;
    unsigned long long dropout_offset;
    unsigned long long dropout_threshold;
    double scale;       // softmax scale (may be negative); f64 so the f64 math path keeps it
    double keep_scale;  // 1 / (1 - p), 0 when p == 1
    int batch;
    int heads_q;
    int heads_kv;
    int group;       // heads_q / heads_kv
    int len_q;       // L (the longest sequence in varlen mode: the padded dropout index space)
    int len_kv;      // S (likewise)
    int head_dim;    // E (actual, before padding)
    int head_dim_v;  // Ev
    float scale_log2;  // scale * log2(e), for the f32 kernels' exp2
    int causal;        // 0 none, 1 top-left, 2 bottom-right
    int mask_kind;     // 0 none, 1 bool (u8), 2 additive (element type)
    int dropout;       // 1 when dropout is active
    int varlen;        // 0 dense, 1 cu_seqlens are u32, 2 cu_seqlens are i32
    int vec_ok;        // 1 when q/k/v rows may be read with 16-byte vector loads
};

static_assert(sizeof(SdpaParams) == 336, "SdpaParams must match sdpa_cuda::params::SdpaParams");
