// Tensor-core attention backward (flash, and efficient in f16/bf16): the
// FlashAttention-2 algorithm on mma.sync m16n8k16 with f32 accumulation. DESIGN.md
// "Backward", with s = scale q.k (+ mask), P = exp(s - lse) from the forward's lse,
// Z the forward's Philox keep bits at the same flat index, dP = (dout.v) Z / (1 - p),
// D = rowsum(dout * out) and dS = P (dP - D):
//
//   pre  (SDPA_KERNEL_PRE) one warp per query row: D in f32 into softmax_d, and after
//        it the row's lse in log2 units (+inf for a row with no key: P = 0).
//   main (SDPA_KERNEL) one CTA per (block of BN = 16 * SDPA_WARPS keys, kv head, batch);
//        warp w owns keys n0 + 16w .. n0 + 16w + 15. K and V stay in shared memory; the
//        CTA walks the query blocks (BM rows) of every query head of the kv head's group,
//        Q and dout double-buffered through cp.async. Per block, each warp computes
//        S^T = K Q^T and dP^T = V dout^T for its keys (16 x BM, registers), P and dS
//        in place, then dV += (P Z/(1-p))^T dout and dK += dS^T Q with P and dS fed
//        from registers as A fragments (the GQA sum over the group happens in these
//        accumulators). dS^T goes to shared memory, and after one barrier the warps
//        split dQ_block = dS K (BM x D) between them and add it into the f32
//        accumulator dq_accum with atomics (its order is not fixed: dq is not bitwise
//        repeatable; dk and dv are). dK (times scale) and dV are written once at the end.
//   post the host rounds dq = scale * dq_accum once to the dtype (math_bwd's round).
//
// Query blocks whose rows see none of the CTA's keys (causal, window) are skipped; only
// blocks that reach outside a row's key range or past the sequence's end test elements
// one by one. With a softcap (SDPA_EXTRAS), dq and dk take dS (1 - tanh^2); ALiBi adds
// after it (DESIGN.md "Backward"). A
// row with no key (lse -inf) gets lse +inf here: P = 0. A key a bool mask hides (or an
// additive -inf) has P = dS = 0 whatever dout.v holds (DESIGN.md's NaN rule).
//
// Compile-time: SDPA_DTYPE (2 f16, 3 bf16), SDPA_HEAD_DIM (the larger of E and Ev padded
// to a multiple of 32, at most 128), SDPA_WARPS, SDPA_BLOCK_M (multiple of 16),
// SDPA_MIN_BLOCKS, SDPA_EXTRAS (0: causal, window, GQA, varlen; 1: masks, dropout,
// softcap and ALiBi too),
// SDPA_KERNEL_PRE, SDPA_KERNEL.
#include "common/bwd.cuh"
#include "common/dtype.cuh"
#include "common/load.cuh"
#include "common/mask.cuh"
#include "common/mma.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"

#define D SDPA_HEAD_DIM
#define NW SDPA_WARPS
#define BN (16 * NW)
#define BM SDPA_BLOCK_M
#define NTHREADS (32 * NW)
// Shared-memory row strides: 16 bytes of padding keep ldmatrix free of bank conflicts.
#define SROW (D + 8)
#define DSROW (BM + 8)
#define KV_ELEMS (BN * SROW)
#define QD_ELEMS (BM * SROW)
#define DS_ELEMS (BN * DSROW)
// K, V; two stages of Q and of dout; dS^T; two stages of lse (log2 units) and of D.
#define SHARED_BYTES (2 * (2 * KV_ELEMS + 4 * QD_ELEMS + DS_ELEMS) + 4 * 4 * BM)
// dQ = dS K: BM / 16 row fragments, split further by columns when there are more warps.
#define DQ_ROW_FRAGS (BM / 16)
#define DQ_SPLIT (NW > DQ_ROW_FRAGS ? NW / DQ_ROW_FRAGS : 1)
#define DQ_TILES (D / 8 / DQ_SPLIT)
#define DQ_CHUNK (DQ_TILES % 8 == 0 ? 8 : DQ_TILES % 6 == 0 ? 6 : DQ_TILES % 4 == 0 ? 4 : 2)

static_assert(D % 32 == 0 && D <= 128, "head dim class: a multiple of 32 up to 128");
static_assert(BM % 16 == 0 && BM <= 128, "query block: a multiple of 16 up to 128");
static_assert(NW % DQ_ROW_FRAGS == 0 || DQ_ROW_FRAGS % NW == 0, "warps and query fragments");
static_assert((D / 8) % DQ_SPLIT == 0 && DQ_TILES % 2 == 0, "dQ column split");

extern "C" __constant__ unsigned int sdpa_shared_bytes = SHARED_BYTES;
#if __CUDA_ARCH__ >= 900
static_assert(SHARED_BYTES <= 232448, "backward tiles exceed sm_90's shared memory");
#else
static_assert(SHARED_BYTES <= 166912, "backward tiles exceed sm_80's shared memory");
#endif

extern "C" __global__ void __launch_bounds__(NTHREADS, SDPA_MIN_BLOCKS) SDPA_KERNEL(const BwdParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* s_k = (u16*)smem_raw;
    u16* s_v = s_k + KV_ELEMS;
    u16* s_q = s_v + KV_ELEMS;
    u16* s_do = s_q + 2 * QD_ELEMS;
    u16* s_ds = s_do + 2 * QD_ELEMS;
    float* s_lse = (float*)(s_ds + DS_ELEMS);
    float* s_dd = s_lse + 2 * BM;

    const int b = blockIdx.z;
    const int hk = blockIdx.y;
    const SeqLens seq(p, b);
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;
    const int t4 = lane & 3;
    const bool vec_ok = p.vec_ok != 0;

    const u16* k = (const u16*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const u16* v = (const u16*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    // dq_split_stride > 0 (deterministic): this CTA's own dq accumulator slice.
    float* dq_split = (float*)p.dq_accum + blockIdx.x * p.dq_split_stride;
    const int n_m = (seq.len_q + BM - 1) / BM;

    // Stage (query head h, block at row m0) into buffer `buf`: Q and dout, and the pre
    // kernel's lse (log2 units) and D rows, all by cp.async: a plain load here would
    // stall these threads, and the whole CTA at the next barrier.
    auto stage = [&](int h, int m0, int buf) {
        const u16* q = (const u16*)p.q + b * p.q_stride_b + h * p.q_stride_h + seq.start_q * p.q_stride_l;
        const u16* gr = (const u16*)p.dout + b * p.dout_stride_b + h * p.dout_stride_h + seq.start_q * p.dout_stride_l;
        load_rows<BM, D, SROW, NTHREADS>(s_q + buf * QD_ELEMS, q, p.q_stride_l, m0, seq.len_q, p.head_dim, vec_ok, tid);
        load_rows<BM, D, SROW, NTHREADS>(s_do + buf * QD_ELEMS, gr, p.dout_stride_l, m0, seq.len_q, p.head_dim_v,
                                         vec_ok, tid);
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

    // This warp's keys in A-fragment row order: key_row(e) for C element e.
    const int key_base = warp * 16 + g;
    // Shared addresses, 32-bit: four lane offsets from the arena's base, computed once;
    // every other term below (which tile, which buffer, which fragment) is a constant or
    // one add, so it folds into the ldmatrix instruction.
    const u32 base = smem_addr(smem_raw);
    const u32 a_lane = base + 2 * (u32)((warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8);
    const u32 b_lane = base + 2 * (u32)(((lane & 7) + (lane >> 4) * 8) * SROW + ((lane >> 3) & 1) * 8);
    const u32 bt_lane = base + 2 * (u32)(((lane & 7) + ((lane >> 3) & 1) * 8) * SROW + (lane >> 4) * 8);
    const u32 ds_lane = base + 2 * (u32)(((lane & 7) + (lane >> 4) * 8) * DSROW + ((lane >> 3) & 1) * 8);
    // Byte offsets of the tiles in the arena (s_k at 0).
    constexpr u32 V_AT = 2 * KV_ELEMS, Q_AT = 4 * KV_ELEMS, DO_AT = Q_AT + 4 * QD_ELEMS,
                  DS_AT = DO_AT + 4 * QD_ELEMS;

    // Key blocks blockIdx.x, + gridDim.x, ... (one, where the grid has a CTA a block).
    for (int n0 = blockIdx.x * BN; n0 < seq.len_k; n0 += gridDim.x * BN) {
        __syncthreads();  // the previous key block's K, V and dS^T are no longer read
        load_rows<BN, D, SROW, NTHREADS>(s_k, k, p.k_stride_l, n0, seq.len_k, p.head_dim, vec_ok, tid);
        load_rows<BN, D, SROW, NTHREADS>(s_v, v, p.v_stride_l, n0, seq.len_k, p.head_dim_v, vec_ok, tid);
        cp_async_commit();

        // The query blocks with a row that sees one of these keys (causal, window).
        const BlockSpan blocks = query_blocks(p, seq.len_q, seq.len_k, n0, BN, BM, n_m);
        const int m_begin = blocks.begin, m_end = blocks.end;
        const int per_head = m_end - m_begin;
        const int iters = per_head * p.group;

        float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
        for (int i = 0; i < D / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

        // The query head and block of step `it`, carried forward without a division a step.
        int h_cur = hk * p.group, mb_cur = m_begin;
        if (iters > 0) stage(h_cur, m_begin * BM, 0);
        for (int it = 0; it < iters; ++it) {
            const int buf = it & 1;
            const int h = h_cur;
            const int m0 = mb_cur * BM;
            if (++mb_cur == m_end) mb_cur = m_begin, ++h_cur;
            cp_async_wait<0>();
            // Stage `it` has landed for every thread; the other buffers and dS^T are free.
            __syncthreads();
            if (it + 1 < iters) stage(h_cur, mb_cur * BM, buf ^ 1);
            const u32 buf_at = buf * (2 * QD_ELEMS);  // this step's Q and dout buffers
            const float* slse = s_lse + buf * BM;
            const float* sdd = s_dd + buf * BM;

            // S^T = K Q^T and dP^T = V dout^T: this warp's 16 keys x BM query rows.
            float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
            for (int i = 0; i < BM / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll 2
            for (int ks = 0; ks < D / 16; ++ks) {
                u32 ka[4], va[4];
                ldmatrix_x4(ka, a_lane + ks * 32);
                ldmatrix_x4(va, a_lane + V_AT + ks * 32);
#pragma unroll
                for (int np = 0; np < BM / 16; ++np) {
                    u32 qb[4], ob[4];
                    ldmatrix_x4(qb, b_lane + buf_at + Q_AT + 2 * (np * 16 * SROW + ks * 16));
                    ldmatrix_x4(ob, b_lane + buf_at + DO_AT + 2 * (np * 16 * SROW + ks * 16));
                    mma16816_x2(st[2 * np], st[2 * np + 1], ka, qb);
                    mma16816_x2(dpt[2 * np], dpt[2 * np + 1], va, ob);
                }
            }

#if SDPA_EXTRAS
            // The forward's keep bits of this warp's elements, bit 4 nt + e (common/bwd.cuh).
            const u64 keep_bits = p.dropout ? replay_keep_bits<BM>(p, b, h, m0, n0 + key_base, lane) : ~0ull;
            // Softcap and ALiBi of query head h.
            const ScoreMods<float, true> mods(p, b, h, seq.len_q, seq.len_k, SDPA_LOG2E);
#endif
            // P (times the keep factor, for dV) into st and dS into dpt. Element e of n-tile
            // nt: key n0 + key_base + 8 (e >> 1), query row m0 + 8 nt + 2 t4 + (e & 1). Only
            // edge blocks test each element: keys past a row's limit, and rows past the
            // sequence (their lse and D are zero-filled, not +inf).
            // Called with a constant `edge` on each side of one branch: once inlined, neither
            // copy tests the flag inside its loop.
            auto probs_and_grads = [&](const bool edge) {
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt) {
                    // Rows 2 t4 and 2 t4 + 1 of the tile: one 8-byte read each of lse and D.
                    const float2 lse_pair = *(const float2*)(slse + nt * 8 + 2 * t4);
                    const float2 d_pair = *(const float2*)(sdd + nt * 8 + 2 * t4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = m0 + nt * 8 + 2 * t4 + (e & 1);
                        const int j = n0 + key_base + 8 * (e >> 1);
                        const float lse_row = (e & 1) ? lse_pair.y : lse_pair.x;
                        const float d_row = (e & 1) ? d_pair.y : d_pair.x;
                        float x = st[nt][e] * p.scale_log2;
                        bool seen = !edge || (i < seq.len_q && key_seen(p, i, j, seq.len_q, seq.len_k));
#if SDPA_EXTRAS
                        const bool inside = i < seq.len_q && j < seq.len_k;
                        float t = 0.f;  // tanh of the softcap (0 without one)
                        if (mods.active()) x = mods.apply(x, i, j, t);
                        if (p.mask_kind != MASK_NONE && seen && inside) x = masked_log2(p, b, h, i, j, x);
#endif
                        seen = seen && x != SDPA_NEG_INF;
                        const float prob = seen ? fast_exp2(x - lse_row) : 0.f;
                        float grad_p = dpt[nt][e], weight = prob;
#if SDPA_EXTRAS
                        if (p.dropout && seen && inside) {
                            const float keep = ((keep_bits >> (nt * 4 + e)) & 1ull) ? (float)p.keep_scale : 0.f;
                            grad_p *= keep;
                            weight *= keep;
                        }
#endif
                        float ds = seen ? prob * (grad_p - d_row) : 0.f;
#if SDPA_EXTRAS
                        if (p.mask_kind == MASK_ADDITIVE && p.dmask != 0 && seen && inside)
                            atomicAdd((float*)p.dmask + dmask_at(p, b, h, i, j), ds);
                        ds *= ScoreMods<float, true>::grad_factor(t);  // the softcap's 1 - tanh^2
#endif
                        st[nt][e] = weight;
                        dpt[nt][e] = ds;
                    }
                }
            };
            if (!tile_inside(block_keys_all(p, m0, m0 + BM - 1, seq.len_q, seq.len_k), n0, BN) || m0 + BM > seq.len_q)
                probs_and_grads(true);
            else
                probs_and_grads(false);

            // dV += (P Z/(1-p))^T dout and dK += dS^T Q (A from registers, B transposed from
            // shared memory); dS^T to shared memory for dQ.
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk) {
                const u32 pa[4] = {pack2(st[2 * kk][0], st[2 * kk][1]), pack2(st[2 * kk][2], st[2 * kk][3]),
                                   pack2(st[2 * kk + 1][0], st[2 * kk + 1][1]), pack2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                const u32 da[4] = {pack2(dpt[2 * kk][0], dpt[2 * kk][1]), pack2(dpt[2 * kk][2], dpt[2 * kk][3]),
                                   pack2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                   pack2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
                u16* ds_row = s_ds + key_base * DSROW + kk * 16 + 2 * t4;
                *(u32*)ds_row = da[0];
                *(u32*)(ds_row + 8 * DSROW) = da[1];
                *(u32*)(ds_row + 8) = da[2];
                *(u32*)(ds_row + 8 * DSROW + 8) = da[3];
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    u32 ob[4], qb[4];
                    ldmatrix_x4_trans(ob, bt_lane + buf_at + DO_AT + 2 * (kk * 16 * SROW + dp * 16));
                    ldmatrix_x4_trans(qb, bt_lane + buf_at + Q_AT + 2 * (kk * 16 * SROW + dp * 16));
                    mma16816_x2(dv[2 * dp], dv[2 * dp + 1], pa, ob);
                    mma16816_x2(dk[2 * dp], dk[2 * dp + 1], da, qb);
                }
            }
            __syncthreads();  // dS^T is complete

            // dQ_block = dS K: task (row fragment, column group) per warp, into dq_accum.
            float* dq_acc = dq_split + b * p.dq_stride_b + h * p.dq_stride_h + seq.start_q * p.dq_stride_l;
            // Four-wide reductions where every row of dq_accum starts 16-byte aligned.
            const bool vec4 = (p.head_dim & 3) == 0 && (p.dq_stride_l & 3) == 0 && (p.dq_stride_h & 3) == 0;
            // The adds of one chunk, `vector` a constant at each call: four-wide reductions
            // or scalar atomics. Each element of a block is added by the same thread at every
            // key block, so with a slice per CTA (deterministic) the adds into an element
            // come in program order: the same sum every run.
            auto add_chunk = [&](const float (&acc)[DQ_CHUNK][4], int r0, int c0, const bool vector) {
                // Lanes t and t ^ 1 swap halves so that each holds four consecutive columns of
                // one row: even t row g, odd t row g + 8.
                const bool odd = (t4 & 1) != 0;
#pragma unroll
                for (int nt = 0; nt < DQ_CHUNK; ++nt) {
                    if (vector) {
                        const float give0 = odd ? acc[nt][0] : acc[nt][2];
                        const float give1 = odd ? acc[nt][1] : acc[nt][3];
                        const float got0 = __shfl_xor_sync(0xffffffffu, give0, 1);
                        const float got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
                        const int i = m0 + r0 + g + (odd ? 8 : 0);
                        const int d = (c0 + nt) * 8 + 2 * (t4 & 2);
                        red_add4(dq_acc + i * p.dq_stride_l + d, odd ? got0 : acc[nt][0], odd ? got1 : acc[nt][1],
                                 odd ? acc[nt][2] : got0, odd ? acc[nt][3] : got1, i < seq.len_q && d < p.head_dim);
                    } else {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int i = m0 + r0 + g + 8 * (e >> 1);
                            const int d = (c0 + nt) * 8 + 2 * t4 + (e & 1);
                            if (i < seq.len_q && d < p.head_dim) atomicAdd(dq_acc + i * p.dq_stride_l + d, acc[nt][e]);
                        }
                    }
                }
            };
            for (int task = warp; task < DQ_ROW_FRAGS * DQ_SPLIT; task += NW) {
                const int r0 = (task % DQ_ROW_FRAGS) * 16;
                const int c_first = (task / DQ_ROW_FRAGS) * DQ_TILES;
#pragma unroll 1
                for (int c0 = c_first; c0 < c_first + DQ_TILES; c0 += DQ_CHUNK) {
                    float acc[DQ_CHUNK][4];
#pragma unroll
                    for (int i = 0; i < DQ_CHUNK; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
                    const u32 kb_addr = bt_lane + 16 * c0;  // K at 0
                    const u32 a_addr = ds_lane + DS_AT + 2 * r0;
#pragma unroll
                    for (int kk = 0; kk < BN / 16; ++kk) {
                        u32 a[4];
                        ldmatrix_x4_trans(a, a_addr + 2 * (kk * 16 * DSROW));
#pragma unroll
                        for (int np = 0; np < DQ_CHUNK / 2; ++np) {
                            u32 kb[4];
                            ldmatrix_x4_trans(kb, kb_addr + 2 * (kk * 16 * SROW + np * 16));
                            mma16816_x2(acc[2 * np], acc[2 * np + 1], a, kb);
                        }
                    }
                    if (vec4)
                        add_chunk(acc, r0, c0, true);
                    else
                        add_chunk(acc, r0, c0, false);
                }
            }
        }
        cp_async_wait<0>();

        elem_t* dk_out = (elem_t*)p.dk + b * p.dk_stride_b + hk * p.dk_stride_h + seq.start_k * p.dk_stride_l;
        elem_t* dv_out = (elem_t*)p.dv + b * p.dv_stride_b + hk * p.dv_stride_h + seq.start_k * p.dv_stride_l;
        const float scale = (float)p.scale;
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = n0 + key_base + 8 * (e >> 1);
                const int d = nt * 8 + 2 * t4 + (e & 1);
                if (j >= seq.len_k) continue;
                if (d < p.head_dim) dk_out[j * p.dk_stride_l + d] = to_elem(dk[nt][e] * scale);
                if (d < p.head_dim_v) dv_out[j * p.dv_stride_l + d] = to_elem(dv[nt][e]);
            }
        }
    }
}
