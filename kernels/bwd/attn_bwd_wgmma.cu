// Hopper (sm_90a) attention backward for the plain flash path (f16/bf16, no mask, no
// dropout; causal both alignments, GQA, varlen): the FlashAttention-2/3 algorithm with
// every product on warpgroup MMA (wgmma.mma_async), f32 accumulators. The same pre
// kernel, grid, dq accumulator and round kernel as the mma.sync backward
// (attn_bwd_tc.cu, whose header states the algebra): only the main kernel differs.
//
// One CTA = two warpgroups = BN = 128 keys (each warpgroup owns 64, the wgmma M) of one
// kv head; K and V stay in shared memory while the CTA walks the query blocks (BM rows:
// 128 at D = 64, 64 at D = 128) of every query head of the group, Q, dout, lse and D
// double-buffered through cp.async. Tiles use the forward's swizzled layout
// (common/wgmma_tile.cuh). Per query block, in each warpgroup:
//   S^T  = K_w Q^T      A = K (K-major), B = Q (K-major)            64 x BM
//   dP^T = V_w dout^T   A = V, B = dout (both K-major)               64 x BM
//   P^T  = exp2(S^T scale_log2 - lse), dS^T = P^T (dP^T - D)         registers
//   dV  += P^T dout     A = P^T from registers, B = dout (N-major)   64 x D
//   dK  += dS^T Q       A = dS^T from registers, B = Q (N-major)     64 x D
// dS^T also goes to shared memory ([BN keys][BM queries], swizzled); after a CTA barrier
//   dQ   = dS K         A = dS^T tile (M-major), B = K (N-major)     64 x 64
// each warpgroup one 64 x 64 part of the BM x D block (its 64 columns at D = 128, its 64
// rows at D = 64), added into the f32 dq accumulator with vector reductions (in a fixed
// thread order per CTA slice: the deterministic mode's slices work as in attn_bwd_tc.cu).
// Query blocks no row of which sees the CTA's keys (causal) are skipped; only blocks that
// reach past a row's key limit or the sequence's end test elements one by one.
//
// Compile-time: SDPA_DTYPE (2 f16, 3 bf16), SDPA_HEAD_DIM (64 or 128: the larger of E and
// Ev padded, zero-filled in shared memory, padded columns never stored), SDPA_KERNEL_PRE,
// SDPA_KERNEL.
#include "common/bwd.cuh"
#include "common/dtype.cuh"
#include "common/load.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"
#include "common/wgmma.cuh"

#define D SDPA_HEAD_DIM
#define NTHREADS 256
#define BN 128
#define BM (8192 / D)
#define RB 128
#define SW_MASK 7
#define SW_MODE 1
#define KPB 4
static_assert(D == 64 || D == 128, "head dim class: 64 or 128");
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
    const u32 sbo = 8 * RB;
    const u64 k_desc0 = make_desc(s_k + wg * 64 * RB, 16, sbo);
    const u64 v_desc0 = make_desc(s_v + wg * 64 * RB, 16, sbo);
    const u64 q_desc0 = make_desc(s_q, 16, sbo);
    const u64 do_desc0 = make_desc(s_do, 16, sbo);
    const u64 qt_desc0 = make_desc(s_q, BM * RB, sbo);
    const u64 dot_desc0 = make_desc(s_do, BM * RB, sbo);
    // dQ part of this warpgroup: its 64 columns (D = 128) or its 64 query rows (D = 64).
    constexpr bool SPLIT_COLS = D == 128;
    const int dq_row0 = SPLIT_COLS ? 0 : wg * 64;
    const int dq_col0 = SPLIT_COLS ? wg * 64 : 0;
    const u64 dst_desc0 = make_desc(s_ds + (dq_row0 / 64) * (BN * RB), BN * RB, sbo);
    const u64 kt_desc0 = make_desc(s_k + (dq_col0 / 64) * (BN * RB), BN * RB, sbo);
    // This thread's dS^T stores: key row wg 64 + 16 (warp & 3) + g (+ 8), query pairs 2 t4
    // of each 8-column group; the swizzle phase of its rows is g.
    const u32 ds_row = s_ds + (u32)(wg * 64 + (warp & 3) * 16 + g) * RB + 4 * t4;
    const int key_off = wg * 64 + (warp & 3) * 16 + g;

    for (int n0 = blockIdx.x * BN; n0 < seq.len_k; n0 += gridDim.x * BN) {
        __syncthreads();  // the previous key block's tiles are no longer read
        load_tile_sw<BN>(s_k, k, p.k_stride_l, n0, seq.len_k, p.head_dim, vec_ok, tid);
        load_tile_sw<BN>(s_v, v, p.v_stride_l, n0, seq.len_k, p.head_dim_v, vec_ok, tid);
        cp_async_commit();

        const int m_begin = first_query_block<BM>(p, seq, n0, n_m);
        const int per_head = n_m - m_begin;
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
            if (++mb_cur == n_m) mb_cur = m_begin, ++h_cur;
            // Stage `it` (and K, V) landed for every thread and is visible to wgmma; every
            // warpgroup is done with the other buffers and with dS^T.
            tiles_ready();
            if (it + 1 < iters) stage(h_cur, mb_cur * BM, buf ^ 1);
            const float* slse = s_lse + buf * BM;
            const float* sdd = s_dd + buf * BM;

            float st[BM / 2], dpt[BM / 2];
            {
                u64 kd = k_desc0, vd = v_desc0;
                u64 qd = q_desc0 + buf * (QD_BYTES / 16), od = do_desc0 + buf * (QD_BYTES / 16);
                asm volatile("" : "+l"(kd), "+l"(vd), "+l"(qd), "+l"(od));
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
            wgmma_wait<0>();
            fence_regs(st);
            fence_regs(dpt);

            // P^T into st and dS^T = P^T (dP^T - D) into dpt. Element idx: key n0 + key_off
            // + 8 ((idx >> 1) & 1), query row m0 + 8 (idx >> 2) + 2 t4 + (idx & 1). Only edge
            // blocks test each element: keys past a row's limit, rows past the sequence
            // (their lse and D are zero-filled). Called with a constant `edge`.
            auto probs_and_grads = [&](const bool edge) {
#pragma unroll
                for (int cg = 0; cg < BM / 8; ++cg) {
                    const float2 lse_pair = *(const float2*)(slse + cg * 8 + 2 * t4);
                    const float2 d_pair = *(const float2*)(sdd + cg * 8 + 2 * t4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int idx = 4 * cg + e;
                        const int i = m0 + cg * 8 + 2 * t4 + (e & 1);
                        const int j = n0 + key_off + 8 * (e >> 1);
                        const float lse_row = (e & 1) ? lse_pair.y : lse_pair.x;
                        const float d_row = (e & 1) ? d_pair.y : d_pair.x;
                        const bool seen = !edge || (i < seq.len_q && j < key_limit(p.causal, i, seq.len_q, seq.len_k));
                        const float prob = seen ? fast_exp2(st[idx] * p.scale_log2 - lse_row) : 0.f;
                        const float ds = seen ? prob * (dpt[idx] - d_row) : 0.f;
                        st[idx] = prob;
                        dpt[idx] = ds;
                    }
                }
            };
            if (n0 + BN > key_limit(p.causal, m0, seq.len_q, seq.len_k) || m0 + BM > seq.len_q)
                probs_and_grads(true);
            else
                probs_and_grads(false);

            // dS^T to shared memory (16-bit pairs: queries 2 t4, 2 t4 + 1 of a key row).
#pragma unroll
            for (int cg = 0; cg < BM / 8; ++cg) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const u32 at = ds_row + (cg / 8) * (BN * RB) + r * 8 * RB + (((cg & 7) ^ g) << 4);
                    asm volatile("st.shared.b32 [%0], %1;" ::"r"(at), "r"(pack2(dpt[4 * cg + 2 * r], dpt[4 * cg + 2 * r + 1]))
                                 : "memory");
                }
            }
            // P^T and dS^T as A fragments; dV += P^T dout and dK += dS^T Q (one group).
            u32 pf[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                pf[kk][0] = pack2(st[8 * kk + 0], st[8 * kk + 1]);
                pf[kk][1] = pack2(st[8 * kk + 2], st[8 * kk + 3]);
                pf[kk][2] = pack2(st[8 * kk + 4], st[8 * kk + 5]);
                pf[kk][3] = pack2(st[8 * kk + 6], st[8 * kk + 7]);
            }
            u32 df[BM / 16][4];
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                df[kk][0] = pack2(dpt[8 * kk + 0], dpt[8 * kk + 1]);
                df[kk][1] = pack2(dpt[8 * kk + 2], dpt[8 * kk + 3]);
                df[kk][2] = pack2(dpt[8 * kk + 4], dpt[8 * kk + 5]);
                df[kk][3] = pack2(dpt[8 * kk + 6], dpt[8 * kk + 7]);
            }
            {
                u64 od = dot_desc0 + buf * (QD_BYTES / 16);
                u64 qd = qt_desc0 + buf * (QD_BYTES / 16);
                asm volatile("" : "+l"(od), "+l"(qd));
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) WGMMA_KV(dv, pf[kk], od + kk * (16 * RB / 16), 1);
#pragma unroll
                for (int kk = 0; kk < BM / 16; ++kk) WGMMA_KV(dk, df[kk], qd + kk * (16 * RB / 16), 1);
                wgmma_commit();
            }
            // dS^T complete (both warpgroups) and visible to the async proxy.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();

            // dQ part = dS K over the CTA's 128 keys.
            float dq[32];
            {
                u64 ad = dst_desc0, bd = kt_desc0;
                asm volatile("" : "+l"(ad), "+l"(bd));
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BN / 16; ++kk)
                    wgmma_ss_tt_n64(dq, ad + kk * (16 * RB / 16), bd + kk * (16 * RB / 16), kk > 0);
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
            for (int cg = 0; cg < 8; ++cg) {
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
