// The one parameter struct every attention kernel takes, mirrored field for field by
// `sdpa_cuda::params::FwdParams` (`#[repr(C)]`). Change both together: the Rust unit
// test `params_layout_matches_cuh` parses this file and compares the field order, and the
// static_assert below pins the size.
#pragma once

// The run-time switches, as sdpa_cuda::params writes them (#[repr(i32)] enums there).
enum CausalCode : int { CAUSAL_NONE = 0, CAUSAL_TOP_LEFT = 1, CAUSAL_BOTTOM_RIGHT = 2 };
enum MaskCode : int { MASK_NONE = 0, MASK_BOOL = 1, MASK_ADDITIVE = 2 };
enum SeqlenCode : int { SEQLEN_DENSE = 0, SEQLEN_VARLEN_U32 = 1, SEQLEN_VARLEN_I32 = 2 };

struct FwdParams {
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
    int causal;        // CausalCode
    int mask_kind;     // MaskCode: bool is one byte an element, additive the element type
    int dropout;       // 1 when dropout is active
    int varlen;        // SeqlenCode
    int vec_ok;        // 1 when q/k/v rows may be read with 16-byte vector loads
    // DESIGN.md "Inference": ALiBi slopes (f32 [Hq] or [B, Hq]; 0 when absent) and their
    // batch stride (0 for [Hq]); the softcap c (0 when off); the sliding window
    // (bottom-right aligned, -1 unbounded), common/mask.cuh's row_keys.
    unsigned long long alibi;
    long long alibi_stride_b;
    double softcap;
    int window_left;
    int window_right;
};

static_assert(sizeof(FwdParams) == 368, "FwdParams must match sdpa_cuda::params::FwdParams");

// The backward's parameters: the forward's (the problem, q, k, v, out, lse) and the
// gradients'. softmax_d is the row sum D = rowsum(dout * out) [B, Hq, L] in acc_t (f32,
// f64 for f64); dq_accum an acc_t [B, Hq, L, E] accumulator for dq; dmask (0 without an
// additive mask) an acc_t accumulator in the mask's own shape, rounded to the mask's
// dtype afterwards. Mirrored by sdpa_cuda::params::BwdParams.
struct BwdParams : FwdParams {
    unsigned long long dout;
    unsigned long long dq;
    unsigned long long dk;
    unsigned long long dv;
    unsigned long long dmask;
    unsigned long long dq_accum;
    unsigned long long softmax_d;
    long long dout_stride_b;
    long long dout_stride_h;
    long long dout_stride_l;
    long long dq_stride_b;
    long long dq_stride_h;
    long long dq_stride_l;
    long long dk_stride_b;
    long long dk_stride_h;
    long long dk_stride_l;
    long long dv_stride_b;
    long long dv_stride_h;
    long long dv_stride_l;
    // Broadcast strides over [B, Hq, L, S] of the dmask accumulator (contiguous in the
    // mask's own shape, 0 on the axes the mask broadcasts along).
    long long dmask_stride_b;
    long long dmask_stride_h;
    long long dmask_stride_l;
    long long dmask_stride_s;
    // 0: every CTA of the tensor-core backward adds into one dq accumulator (atomics,
    // order not fixed). > 0 (deterministic mode): CTA x of the grid owns the slice at
    // x * dq_split_stride, each element added by one thread in program order, and the
    // slices are summed in order when dq is rounded: bitwise equal run to run.
    long long dq_split_stride;
};

static_assert(sizeof(BwdParams) == 560, "BwdParams must match sdpa_cuda::params::BwdParams");
