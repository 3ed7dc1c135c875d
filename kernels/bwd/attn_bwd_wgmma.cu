// Hopper (sm_90a) attention backward for the flash path (f16/bf16; causal both
// alignments, sliding window, GQA, varlen; with SDPA_EXTRAS = 1 also bool and additive
// masks with their dmask, softcap, ALiBi, and dropout replayed from the forward's Philox
// stream): the FlashAttention-2/3
// algorithm with
// every product on warpgroup MMA (wgmma.mma_async), f32 accumulators. The same pre
// kernel, grid, dq accumulator and round kernel as the mma.sync backward
// (attn_bwd_tc.cu, whose header states the algebra): only the main kernel differs.
//
// One CTA = two warpgroups = BN = 128 keys (each warpgroup owns 64, the wgmma M) of one
// kv head; K and V stay in shared memory while the CTA walks the query blocks (BM = 64
// rows) of every query head of the group, Q, dout, lse and D
// double-buffered through cp.async. Tiles use the forward's swizzled layout
// (common/wgmma_tile.cuh). Per query block, in each warpgroup:
//   S^T  = K_w Q^T      A = K (K-major), B = Q (K-major)            64 x BM
//   dP^T = V_w dout^T   A = V, B = dout (both K-major)               64 x BM
//   P^T  = exp2(S^T scale_log2 - lse), dS^T = P^T (dP^T - D)         registers
//   dV  += P^T dout     A = P^T from registers, B = dout (N-major)   64 x D
//   dK  += dS^T Q       A = dS^T from registers, B = Q (N-major)     64 x D
// dS^T also goes to shared memory ([BN keys][BM queries], swizzled); after a CTA barrier
//   dQ   = dS K         A = dS^T tile (M-major), B = K (N-major)     64 x 64
// each warpgroup D / 2 columns of the 64 x D block, added into the f32 dq accumulator with
// vector reductions (in a fixed
// thread order per CTA slice: the deterministic mode's slices work as in attn_bwd_tc.cu).
// Query blocks no row of which sees the CTA's keys (causal, window) are skipped; only
// blocks that reach outside a row's key range or past the sequence's end test elements
// one by one. Softcap and ALiBi (SDPA_EXTRAS) as in attn_bwd_tc.cu.
//
// Masks and dropout work as in attn_bwd_tc.cu (whose element layout this kernel's
// accumulators share: warp w of a warpgroup holds keys 16 w + g and 16 w + g + 8): a
// masked score leaves P and dS at 0, dmask takes dS by f32 atomics, and dV's weight and
// dP are scaled by the keep factor Z / (1 - p).
//
// Compile-time: SDPA_DTYPE (2 f16, 3 bf16), SDPA_HEAD_DIM (64 or 128: the larger of E and
// Ev padded, zero-filled in shared memory, padded columns never stored), SDPA_EXTRAS (0 or
// 1), SDPA_KERNEL_PRE, SDPA_KERNEL.
#include "common/bwd.cuh"
#include "common/dtype.cuh"
#include "common/load.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"
#include "common/wgmma.cuh"

#define D SDPA_HEAD_DIM
#define NTHREADS 256
#define BN 128
// Query rows a step: 64 (the default), or SDPA_BWD_BM = 128 at D = 64 (sweeps).
#ifdef SDPA_BWD_BM
#define BM SDPA_BWD_BM
#else
#define BM 64
#endif
#define RB 128
#define SW_MASK 7
#define SW_MODE 1
#define KPB 4
static_assert(D == 64 || D == 128, "head dim class: 64 or 128");
static_assert(BM == 64 || (BM == 128 && D == 64), "query block: 64, or 128 at D = 64");
// Shared memory: K, V; two stages of Q and of dout; dS^T; two stages of lse and of D;
// from a 1024-byte boundary the kernel rounds its base up to (the extra KiB).
#define KV_BYTES (BN * 2 * D)
#define QD_BYTES (BM * 2 * D)
#define DS_BYTES (BN * 2 * BM)
#define SHARED_BYTES (1024 + 2 * KV_BYTES + 4 * QD_BYTES + DS_BYTES + 4 * 4 * BM)

extern "C" __constant__ unsigned int sdpa_shared_bytes = SHARED_BYTES;
static_assert(SHARED_BYTES <= 232448, "backward tiles exceed sm_90's shared memory");

#if BM == 64
#define WGMMA_ST wgmma_ss_n64
#else
#define WGMMA_ST wgmma_ss_n128
#endif
#if D == 64
#define WGMMA_KV wgmma_rs_n64
#else
#define WGMMA_KV wgmma_rs_n128
#endif
// dQ = dS K: each warpgroup D / 2 columns of the BM x D block (BM = 64), or its 64 rows
// (BM = 128).
#define SPLIT_COLS (BM == 64)
#define DQ_N (SPLIT_COLS ? D / 2 : D)
#if DQ_N == 32
#define WGMMA_DQ wgmma_ss_tt_n32
#else
#define WGMMA_DQ wgmma_ss_tt_n64
#endif

#include "common/wgmma_tile.cuh"

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) SDPA_KERNEL(const BwdParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 s_k = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const u32 s_v = s_k + KV_BYTES;
    const u32 s_q = s_v + KV_BYTES;
    const u32 s_do = s_q + 2 * QD_BYTES;
    const u32 s_ds = s_do + 2 * QD_BYTES;
    // lse (log2 units) and D, two stages each: generic pointers for the reads.
    float* s_lse = (float*)(smem_raw + (s_ds + DS_BYTES - smem_addr(smem_raw)));
    float* s_dd = s_lse + 2 * BM;

    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const SeqLens seq(p, b);
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int wg = warp >> 2;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const bool vec_ok = p.vec_ok != 0;

    const u16* k = (const u16*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const u16* v = (const u16*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    float* dq_split = (float*)p.dq_accum + blockIdx.x * p.dq_split_stride;
    const int n_m = (seq.len_q + BM - 1) / BM;

    // Stage (query head h, block at row m0) into buffer `buf`: Q, dout, lse and D.
    auto stage = [&](int h, int m0, int buf) {
        const u16* q = (const u16*)p.q + b * p.q_stride_b + h * p.q_stride_h + seq.start_q * p.q_stride_l;
        const u16* gr = (const u16*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + seq.start_q * p.dout_stride_l;
        load_tile_sw<BM>(s_q + buf * QD_BYTES, q, p.q_stride_l, m0, seq.len_q, p.head_dim, vec_ok, tid);
        load_tile_sw<BM>(s_do + buf * QD_BYTES, gr, p.dout_stride_l, m0, seq.len_q, p.head_dim_v, vec_ok, tid);
        const float* dd = (const float*)p.softmax_d + ((i64)b * p.heads_q + h) * p.len_q;
        const float* l2 = dd + (i64)p.batch * p.heads_q * p.len_q;
        for (int r = tid; r < 2 * BM; r += NTHREADS) {
            const int i = m0 + (r % BM);
            const bool in = i < seq.len_q;
            const float* src = (r < BM ? l2 : dd) + (in ? i : 0);
            float* dst = (r < BM ? s_lse : s_dd) + buf * BM + r % BM;
            cp_async4(smem_addr(dst), src, in ? 4 : 0);
        }
        cp_async_commit();
    };

    // Descriptors (see attn_fwd_wgmma.cu): K-major tiles advance 32 bytes a k-step inside
    // a column block and a block (rows x RB) at every KPB steps; N-/M-major ones 16 rows.
    // Each is made at its use from the arena's base, laundered (an empty asm the compiler
    // cannot see through): kept from one step to the next they would hold two registers
    // each, which the accumulators need.
    const u32 sbo = 8 * RB;
    constexpr u32 V_AT = KV_BYTES, Q_AT = 2 * KV_BYTES, DO_AT = Q_AT + 2 * QD_BYTES, DS_AT = DO_AT + 2 * QD_BYTES;
    const u32 wg_rows = wg * 64 * RB;  // this warpgroup's keys in K and V
    auto desc = [&](u32 off, u32 lbo) {
        u32 at = s_k;
        asm volatile("" : "+r"(at));
        return make_desc(at + off, lbo, sbo);
    };
    // dQ part of this warpgroup: its DQ_N columns from dq_col0 (an N-major descriptor may
    // start inside a 128-byte swizzle row: the swizzle is a function of the address) or
    // its 64 query rows from dq_row0.
    const int dq_row0 = SPLIT_COLS ? 0 : wg * 64;
    const int dq_col0 = SPLIT_COLS ? wg * DQ_N : 0;
    const u32 dst_off = DS_AT + (dq_row0 / 64) * (BN * RB);
    const u32 kt_off = (dq_col0 / 64) * (BN * RB) + (dq_col0 % 64) * 2;
    // This thread's dS^T stores: key row wg 64 + 16 (warp & 3) + g (+ 8), query pairs 2 t4
    // of each 8-column group; the swizzle phase of its rows is g.
    const u32 ds_row = s_ds + (u32)(wg * 64 + (warp & 3) * 16 + g) * RB + 4 * t4;
    const int key_off = wg * 64 + (warp & 3) * 16 + g;

    for (int n0 = blockIdx.x * BN; n0 < seq.len_k; n0 += gridDim.x * BN) {
        __syncthreads();  // the previous key block's tiles are no longer read
        load_tile_sw<BN>(s_k, k, p.k_stride_l, n0, seq.len_k, p.head_dim, vec_ok, tid);
        load_tile_sw<BN>(s_v, v, p.v_stride_l, n0, seq.len_k, p.head_dim_v, vec_ok, tid);
        cp_async_commit();

        // The query blocks with a row that sees one of these keys (causal, window).
        const BlockSpan blocks = query_blocks(p, seq.len_q, seq.len_k, n0, BN, BM, n_m);
        const int m_begin = blocks.begin, m_end = blocks.end;
        const int per_head = m_end - m_begin;
        const int iters = per_head * p.group;

        float dk[D / 2], dv[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

        int h_cur = hk * p.group, mb_cur = m_begin;
        if (iters > 0) stage(h_cur, m_begin * BM, 0);
        for (int it = 0; it < iters; ++it) {
            const int buf = it & 1;
            const int h = h_cur;
            const int m0 = mb_cur * BM;
            if (++mb_cur == m_end) mb_cur = m_begin, ++h_cur;
            // Stage `it` (and K, V) landed for every thread and is visible to wgmma; every
            // warpgroup is done with the other buffers and with dS^T.
            tiles_ready();
            if (it + 1 < iters) stage(h_cur, mb_cur * BM, buf ^ 1);
            const float* slse = s_lse + buf * BM;
            const float* sdd = s_dd + buf * BM;

            float st[BM / 2], dpt[BM / 2];
            {
                const u64 kd = desc(wg_rows, 16), vd = desc(V_AT + wg_rows, 16);
                const u64 qd = desc(Q_AT + buf * QD_BYTES, 16), od = desc(DO_AT + buf * QD_BYTES, 16);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks) {
                    const u32 a_off = ((ks / KPB) * (BN * RB) + (ks % KPB) * 32) / 16;
                    const u32 b_off = ((ks / KPB) * (BM * RB) + (ks % KPB) * 32) / 16;
                    WGMMA_ST(st, kd + a_off, qd + b_off, ks > 0);
                }
                wgmma_commit();
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks) {
                    const u32 a_off = ((ks / KPB) * (BN * RB) + (ks % KPB) * 32) / 16;
                    const u32 b_off = ((ks / KPB) * (BM * RB) + (ks % KPB) * 32) / 16;
                    WGMMA_ST(dpt, vd + a_off, od + b_off, ks > 0);
                }
                wgmma_commit();
            }
#if SDPA_EXTRAS
            // The forward's keep bits of this thread's elements, bit idx (common/bwd.cuh).
            const u64 keep_bits = p.dropout ? replay_keep_bits<BM>(p, b, h, m0, n0 + key_off, lane) : ~0ull;
            const bool any_mask = p.mask_kind != MASK_NONE;
            // Softcap and ALiBi of query head h; with a softcap, tanh of each element's
            // score is kept for dS's factor 1 - tanh^2.
            const ScoreMods<float, true> mods(p, b, h, seq.len_q, seq.len_k, SDPA_LOG2E);
            const bool modded = mods.active();
            float tanh_s[BM / 2];
            // A mask that broadcasts along the queries (a key-padding mask [B, 1, 1, S], its L
            // stride 0) has one entry a key: this thread's two keys' entries are read once a
            // block (log2 units; -inf for a hidden key), and its dmask sums over the rows of
            // the block in registers, one atomic a key and lane quad.
            const bool key_mask = any_mask && p.mask_stride_l == 0;
            const bool key_dmask = p.mask_kind == MASK_ADDITIVE && p.dmask != 0 && p.dmask_stride_l == 0;
            float key_bias[2] = {0.f, 0.f}, key_ds[2] = {0.f, 0.f};
            if (key_mask) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int j = n0 + key_off + 8 * r;
                    if (j < seq.len_k) key_bias[r] = masked_log2(p, b, h, 0, j, 0.f);
                }
            }
#else
            const bool any_mask = false;
#endif
            // P^T into st as soon as S^T is done (dP^T still running), then dS^T = P^T (dP^T -
            // D) into dpt. Element idx: key n0 + key_off + 8 ((idx >> 1) & 1), query row m0 +
            // 8 (idx >> 2) + 2 t4 + (idx & 1). Only edge blocks test each element (keys past a
            // row's limit, rows past the sequence, whose lse and D are zero-filled) and, with
            // a mask, every block: bit idx of `unseen`, whose dS is 0 whatever dP holds.
            // Called with a constant `edge`.
            auto probs_and_grads = [&](const bool edge) {
                u64 unseen = 0;
                wgmma_wait<1>();
                fence_regs(st);
#pragma unroll
                for (int cg = 0; cg < BM / 8; ++cg) {
                    const float2 lse_pair = *(const float2*)(slse + cg * 8 + 2 * t4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int idx = 4 * cg + e;
                        const int i = m0 + cg * 8 + 2 * t4 + (e & 1);
                        const int j = n0 + key_off + 8 * (e >> 1);
                        const float lse_row = (e & 1) ? lse_pair.y : lse_pair.x;
                        bool seen = !edge || (i < seq.len_q && key_seen(p, i, j, seq.len_q, seq.len_k));
                        float x = st[idx] * p.scale_log2;
#if SDPA_EXTRAS
                        tanh_s[idx] = 0.f;
                        if (modded) x = mods.apply(x, i, j, tanh_s[idx]);
                        if (any_mask) {
                            if (seen && i < seq.len_q && j < seq.len_k)
                                x = key_mask ? x + key_bias[e >> 1] : masked_log2(p, b, h, i, j, x);
                            seen = seen && x != SDPA_NEG_INF;
                        }
#endif
                        st[idx] = seen ? fast_exp2(x - lse_row) : 0.f;
                        if ((edge || any_mask) && !seen) unseen |= 1ull << idx;
                    }
                }
                wgmma_wait<0>();
                fence_regs(dpt);
#pragma unroll
                for (int cg = 0; cg < BM / 8; ++cg) {
                    const float2 d_pair = *(const float2*)(sdd + cg * 8 + 2 * t4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int idx = 4 * cg + e;
                        const float d_row = (e & 1) ? d_pair.y : d_pair.x;
                        float grad_p = dpt[idx];
#if SDPA_EXTRAS
                        float keep = 1.f;
                        if (p.dropout) {
                            keep = ((keep_bits >> idx) & 1ull) ? (float)p.keep_scale : 0.f;
                            grad_p *= keep;
                        }
#endif
                        const float ds = st[idx] * (grad_p - d_row);
                        const bool hidden = (edge || any_mask) && ((unseen >> idx) & 1ull);
                        dpt[idx] = hidden ? 0.f : ds;
#if SDPA_EXTRAS
                        if (modded) dpt[idx] *= ScoreMods<float, true>::grad_factor(tanh_s[idx]);  // not dmask's
#endif
#if SDPA_EXTRAS
                        if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0 && !hidden) {
                            const int i = m0 + cg * 8 + 2 * t4 + (e & 1);
                            const int j = n0 + key_off + 8 * (e >> 1);
                            if (key_dmask)
                                key_ds[e >> 1] += i < seq.len_q ? ds : 0.f;
                            else if (i < seq.len_q && j < seq.len_k)
                                atomicAdd((float*)p.dmask + dmask_at(p, b, h, i, j), ds);
                        }
                        st[idx] *= keep;
#endif
                    }
                }
#if SDPA_EXTRAS
                if (key_dmask) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        float sum = key_ds[r];
                        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                        const int j = n0 + key_off + 8 * r;
                        if (t4 == 0 && j < seq.len_k) atomicAdd((float*)p.dmask + dmask_at(p, b, h, 0, j), sum);
                    }
                }
#endif
            };
            if (any_mask || !tile_inside(block_keys_all(p, m0, m0 + BM - 1, seq.len_q, seq.len_k), n0, BN) ||
                m0 + BM > seq.len_q)
                probs_and_grads(true);
            else
                probs_and_grads(false);

            // P^T and dS^T as A fragments; dV += P^T dout and dK += dS^T Q (one group).
            u32 pf[BM / 16][4], df[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    pf[kk][r] = pack2(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1]);
                    df[kk][r] = pack2(dpt[8 * kk + 2 * r], dpt[8 * kk + 2 * r + 1]);
                }
            }
            {
                const u64 od = desc(DO_AT + buf * QD_BYTES, BM * RB);
                const u64 qd = desc(Q_AT + buf * QD_BYTES, BM * RB);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) WGMMA_KV(dv, pf[kk], od + kk * (16 * RB / 16), 1);
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) WGMMA_KV(dk, df[kk], qd + kk * (16 * RB / 16), 1);
                wgmma_commit();
            }
            // dS^T to shared memory while those run (16-bit pairs: queries 2 t4, 2 t4 + 1 of
            // a key row).
#pragma unroll
            for (int cg = 0; cg < BM / 8; ++cg) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const u32 at = ds_row + (cg / 8) * (BN * RB) + r * 8 * RB + (((cg & 7) ^ g) << 4);
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(at), "r"(df[cg / 2][(cg & 1) * 2 + r]) : "memory");
                }
            }
            // dS^T complete (both warpgroups) and visible to the async proxy.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();

            // dQ part = dS K over the CTA's 128 keys.
            float dq[DQ_N / 2];
            {
                const u64 ad = desc(dst_off, BN * RB), bd = desc(kt_off, BN * RB);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk)
                    WGMMA_DQ(dq, ad + kk * (16 * RB / 16), bd + kk * (16 * RB / 16), kk > 0);
                wgmma_commit();
            }
            wgmma_wait<0>();
            fence_regs(dq);

            float* dq_acc = dq_split + b * p.dq_stride_b + h * p.dq_stride_h + seq.start_q * p.dq_stride_l;
            const bool vec4 = (p.head_dim & 3) == 0 && (p.dq_stride_l & 3) == 0 && (p.dq_stride_h & 3) == 0;
            // Element e of column group cg: row dq_row0 + 16 (warp & 3) + g + 8 (e >> 1),
            // column dq_col0 + 8 cg + 2 t4 + (e & 1). Lanes t and t ^ 1 trade halves so
            // that each holds four consecutive columns of one row (even t row g, odd g + 8).
            const bool odd = (t4 & 1) != 0;
            const int row_g = m0 + dq_row0 + (warp & 3) * 16 + g;
#pragma unroll
            for (int cg = 0; cg < DQ_N / 8; ++cg) {
                const float* a = dq + 4 * cg;
                if (vec4) {
                    const float got0 = __shfl_xor_sync(0xffffffffu, odd ? a[0] : a[2], 1);
                    const float got1 = __shfl_xor_sync(0xffffffffu, odd ? a[1] : a[3], 1);
                    const int i = row_g + (odd ? 8 : 0);
                    const int d = dq_col0 + cg * 8 + 2 * (t4 & 2);
                    red_add4(dq_acc + i * p.dq_stride_l + d, odd ? got0 : a[0], odd ? got1 : a[1], odd ? a[2] : got0,
                             odd ? a[3] : got1, i < seq.len_q && d < p.head_dim);
                } else {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = row_g + 8 * (e >> 1);
                        const int d = dq_col0 + cg * 8 + 2 * t4 + (e & 1);
                        if (i < seq.len_q && d < p.head_dim) atomicAdd(dq_acc + i * p.dq_stride_l + d, a[e]);
                    }
                }
            }
        }
        cp_async_wait<0>();
        fence_regs(dk);
        fence_regs(dv);

        elem_t* dk_out = (elem_t*)p.dk + b * p.dk_stride_b + hk * p.dk_stride_h + seq.start_k * p.dk_stride_l;
        elem_t* dv_out = (elem_t*)p.dv + b * p.dv_stride_b + hk * p.dv_stride_h + seq.start_k * p.dv_stride_l;
        const float scale = (float)p.scale;
#pragma unroll
        for (int cg = 0; cg < D / 8; ++cg) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = n0 + key_off + 8 * (e >> 1);
                const int d = cg * 8 + 2 * t4 + (e & 1);
                if (j >= seq.len_k) continue;
                if (d < p.head_dim) dk_out[j * p.dk_stride_l + d] = to_elem(dk[4 * cg + e] * scale);
                if (d < p.head_dim_v) dv_out[j * p.dv_stride_l + d] = to_elem(dv[4 * cg + e]);
            }
        }
    }
}
