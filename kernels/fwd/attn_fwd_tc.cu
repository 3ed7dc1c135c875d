// Tensor-core attention forward (flash and, for f16/bf16, efficient): mma.sync
// m16n8k16 with f32 accumulation, online softmax, scores never leave registers.
//
// One CTA computes BM = 16 * SDPA_ROW_FRAGS * SDPA_WARPS query rows of one (batch, head);
// each warp owns 16 * SDPA_ROW_FRAGS rows, so every K/V fragment it reads from shared
// memory feeds SDPA_ROW_FRAGS mma's. With one fragment per warp (and D <= 128) the Q
// fragments live in registers for the whole loop; with two they are re-read per k-step. K and V tiles of SDPA_BLOCK_N keys stream through shared memory with cp.async,
// double buffered. The head dim is padded to SDPA_HEAD_DIM (a multiple of 16) by
// zero-filling shared memory; padded columns are never stored.
//
// Compile-time: SDPA_DTYPE (2 f16, 3 bf16), SDPA_HEAD_DIM, SDPA_WARPS, SDPA_BLOCK_N,
// SDPA_ROW_FRAGS (1 or 2),
// SDPA_EXTRAS (0: the plain flash path; 1: mask, dropout, softcap and ALiBi compiled in,
// chosen at run time by mask_kind, dropout, softcap and alibi), SDPA_KERNEL (symbol).
// SDPA_MIN_BLOCKS (CTAs per SM for __launch_bounds__).
// Run time (FwdParams): causal alignment, sliding window (both variants: key tiles no row
// of the block sees are not visited), scale, GQA group, varlen, strides.
#include "common/dtype.cuh"
#include "common/epilogue.cuh"
#include "common/load.cuh"
#include "common/mask.cuh"
#include "common/mma.cuh"
#include "common/params.cuh"
#include "common/philox.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"

#define D SDPA_HEAD_DIM
#define MW SDPA_ROW_FRAGS
#define WM (16 * MW)
#define BM (WM * SDPA_WARPS)
#define Q_IN_REGS (MW == 1 && D <= 128)
#ifndef SDPA_KS_UNROLL
#define SDPA_KS_UNROLL 8
#endif
#define BN SDPA_BLOCK_N
#define NTHREADS (32 * SDPA_WARPS)
// Shared-memory row stride: 16 bytes of padding keep ldmatrix free of bank conflicts.
#define SROW (D + 8)
// Shared memory (16-bit elements): the Q tile, then two K and two V stages of KV_ELEMS.
#define Q_ELEMS (BM * SROW)
#define KV_ELEMS (BN * SROW)
#define SHARED_BYTES (2 * (Q_ELEMS + 4 * KV_ELEMS))

// What the host launches this module with: the layout above, not a second formula.
extern "C" __constant__ unsigned int sdpa_shared_bytes = SHARED_BYTES;
// The opt-in per-block maxima: 227 KiB on sm_90, 163 KiB on sm_80.
#if __CUDA_ARCH__ >= 900
static_assert(SHARED_BYTES <= 232448, "Q, K and V tiles exceed sm_90's shared memory");
#else
static_assert(SHARED_BYTES <= 166912, "Q, K and V tiles exceed sm_80's shared memory");
#endif

// Rows [row0, row0 + ROWS) of a [len, dim] matrix into this kernel's tile layout.
template <int ROWS>
__device__ __forceinline__ void load_tile(u16* smem, const u16* base, i64 stride, int row0,
                                          int len, int dim, bool vec_ok, int tid) {
    load_rows<ROWS, D, SROW, NTHREADS>(smem, base, stride, row0, len, dim, vec_ok, tid);
}

extern "C" __global__ void __launch_bounds__(NTHREADS, SDPA_MIN_BLOCKS) SDPA_KERNEL(const FwdParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    u16* s_q = (u16*)smem_raw;
    u16* s_k = s_q + Q_ELEMS;
    u16* s_v = s_k + 2 * KV_ELEMS;

    const int b = blockIdx.z;
    const int h = blockIdx.y;
    // Causal: the last query blocks have the most key tiles; start them first so that
    // the short ones fill the tail of the grid.
    const int m_block = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int m0 = m_block * BM;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;

    const SeqLens seq(p, b);
    if (m0 >= seq.len_q) return;

    const int hk = h / p.group;
    const u16* q = (const u16*)p.q + b * p.q_stride_b + h * p.q_stride_h + seq.start_q * p.q_stride_l;
    const u16* k = (const u16*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const u16* v = (const u16*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    const bool vec_ok = p.vec_ok != 0;

    const int last_row = min(m0 + BM, seq.len_q) - 1;
    // The key tiles some row of the block sees (causal, window, length): tile t of the
    // loop holds keys (tiles.first + t) BN ...
    const TileSpan tiles = key_tiles(block_keys_any(p, m0, last_row, seq.len_q, seq.len_k), BN);
    const int n_tiles = tiles.end - tiles.first;
    const int key0 = tiles.first * BN;
    // Tiles inside this range need no causal, window or length masking.
    const KeyRange unmasked = block_keys_all(p, m0, last_row, seq.len_q, seq.len_k);
#if SDPA_EXTRAS
    const ScoreMods<float, true> mods(p, b, h, seq.len_q, seq.len_k, SDPA_LOG2E);
#endif

    load_tile<BM>(s_q, q, p.q_stride_l, m0, seq.len_q, p.head_dim, vec_ok, tid);
    if (n_tiles > 0) load_tile<BN>(s_k, k, p.k_stride_l, key0, seq.len_k, p.head_dim, vec_ok, tid);
    cp_async_commit();
    if (n_tiles > 0) load_tile<BN>(s_v, v, p.v_stride_l, key0, seq.len_k, p.head_dim_v, vec_ok, tid);
    cp_async_commit();

    // This thread's rows: fragment mi, half r (lane / 4, then + 8). Recomputed where
    // needed rather than held: registers are the scarce resource here.
    const int row0 = m0 + warp * WM + (lane >> 2);
#define ROW(mi, r) (row0 + (mi) * 16 + (r) * 8)

    float o[MW][D / 8][4];
#pragma unroll
    for (int mi = 0; mi < MW; ++mi)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
    float row_max[MW][2], row_sum[MW][2];
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
        row_max[mi][0] = row_max[mi][1] = SDPA_NEG_INF;
        row_sum[mi][0] = row_sum[mi][1] = 0.f;
    }

#if Q_IN_REGS
    // Q's A fragments, read once (each warp reads only its own rows of s_q).
    u32 qf[D / 16][4];
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
        ldmatrix_x4(qf[ks], smem_addr(s_q + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW +
                                      ks * 16 + (lane >> 4) * 8));
#endif

    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = key0 + t * BN;
        cp_async_wait<1>();
        __syncthreads();
        if (t + 1 < n_tiles)
            load_tile<BN>(s_k + ((t + 1) & 1) * BN * SROW, k, p.k_stride_l, n0 + BN, seq.len_k,
                          p.head_dim, vec_ok, tid);
        cp_async_commit();

        const u16* k_tile = s_k + (t & 1) * BN * SROW;
        float s[MW][BN / 8][4];
#pragma unroll
        for (int mi = 0; mi < MW; ++mi)
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
#if Q_IN_REGS
#pragma unroll
#else
#pragma unroll SDPA_KS_UNROLL
#endif
        for (int ks = 0; ks < D / 16; ++ks) {
#if Q_IN_REGS
#define QFRAG(mi) qf[ks]
#else
#define QFRAG(mi) a[mi]
            u32 a[MW][4];
#pragma unroll
            for (int mi = 0; mi < MW; ++mi)
                ldmatrix_x4(a[mi], smem_addr(s_q + (warp * WM + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW +
                                             ks * 16 + (lane >> 4) * 8));
#endif
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 kb[4];
                ldmatrix_x4(kb, smem_addr(k_tile + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SROW +
                                          ks * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
                for (int mi = 0; mi < MW; ++mi) {
                    mma16816(s[mi][2 * np], QFRAG(mi), kb[0], kb[1]);
                    mma16816(s[mi][2 * np + 1], QFRAG(mi), kb[2], kb[3]);
                }
            }
        }

        // Scale (softcap, ALiBi and mask), in log2 units.
#pragma unroll
        for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float x = s[mi][nt][e] * p.scale_log2;
#if SDPA_EXTRAS
                    if (mods.active() || p.mask_kind != 0) {
                        const int j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
                        const int rr = ROW(mi, e >> 1);
                        x = mods.apply(x, rr, j);
                        if (p.mask_kind != 0 && rr < seq.len_q && j < seq.len_k) x = masked_log2(p, b, h, rr, j, x);
                    }
#endif
                    s[mi][nt][e] = x;
                }
            }
        }
        // Causal, window and length bounds: only tiles not inside the unmasked keys.
        if (!tile_inside(unmasked, n0, BN)) {
#pragma unroll
            for (int mi = 0; mi < MW; ++mi)
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
                        if (!key_seen(p, ROW(mi, e >> 1), j, seq.len_q, seq.len_k)) s[mi][nt][e] = SDPA_NEG_INF;
                    }
        }

        // Online softmax: rescale what came before by exp2(old max - new max).
#pragma unroll
        for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float tile_max = SDPA_NEG_INF;
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt)
                    tile_max = fmaxf(tile_max, fmaxf(s[mi][nt][2 * r], s[mi][nt][2 * r + 1]));
                tile_max = quad_max(tile_max);
                const float new_max = fmaxf(row_max[mi][r], tile_max);
                const float base = exp_base(new_max);
                const float alpha = fast_exp2(row_max[mi][r] - base);
                row_max[mi][r] = new_max;
                row_sum[mi][r] *= alpha;
#pragma unroll
                for (int i = 0; i < D / 8; ++i) {
                    o[mi][i][2 * r] *= alpha;
                    o[mi][i][2 * r + 1] *= alpha;
                }
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
                    const float p0 = fast_exp2(s[mi][nt][2 * r] - base);
                    const float p1 = fast_exp2(s[mi][nt][2 * r + 1] - base);
                    row_sum[mi][r] += p0 + p1;
                    s[mi][nt][2 * r] = p0;
                    s[mi][nt][2 * r + 1] = p1;
                }
            }
        }

#if SDPA_EXTRAS
        // Dropped weights leave the numerator only; the denominator is the full softmax.
        if (p.dropout) {
#pragma unroll
            for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int j = n0 + nt * 8 + 2 * (lane & 3);
                        const u64 n = dropout_index(p, b, h, ROW(mi, r), j);
                        bool keep0, keep1;
                        dropout_keep2(p.dropout_seed, p.dropout_offset, p.dropout_threshold, n, keep0, keep1);
                        if (!keep0) s[mi][nt][2 * r] = 0.f;
                        if (!keep1) s[mi][nt][2 * r + 1] = 0.f;
                    }
                }
            }
        }
#endif

        cp_async_wait<1>();
        __syncthreads();
        if (t + 1 < n_tiles)
            load_tile<BN>(s_v + ((t + 1) & 1) * BN * SROW, v, p.v_stride_l, n0 + BN, seq.len_k,
                          p.head_dim_v, vec_ok, tid);
        cp_async_commit();

        const u16* v_tile = s_v + (t & 1) * BN * SROW;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[MW][4];
#pragma unroll
            for (int mi = 0; mi < MW; ++mi) {
                a[mi][0] = pack2(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                a[mi][1] = pack2(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                a[mi][2] = pack2(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                a[mi][3] = pack2(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 vb[4];
                ldmatrix_x4_trans(vb, smem_addr(v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SROW +
                                                dp * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int mi = 0; mi < MW; ++mi) {
                    mma16816(o[mi][2 * dp], a[mi], vb[0], vb[1]);
                    mma16816(o[mi][2 * dp + 1], a[mi], vb[2], vb[3]);
                }
            }
        }
    }
    cp_async_wait<0>();

    elem_t* out = (elem_t*)p.out + b * p.out_stride_b + h * p.out_stride_h + seq.start_q * p.out_stride_l;
    float* lse = (float*)p.lse + b * p.lse_stride_b + h * p.lse_stride_h + seq.start_q * p.lse_stride_l;
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float sum = quad_sum(row_sum[mi][r]);
            const int rr = ROW(mi, r);
            if (rr >= seq.len_q) continue;
            const float inv = out_scale(sum, p.keep_scale);
            if ((lane & 3) == 0) lse[rr * p.lse_stride_l] = row_lse(sum, row_max[mi][r]);
            elem_t* out_row = out + rr * p.out_stride_l;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) {
                const int d = i * 8 + 2 * (lane & 3);
                if (d < p.head_dim_v) out_row[d] = to_elem(o[mi][i][2 * r] * inv);
                if (d + 1 < p.head_dim_v) out_row[d + 1] = to_elem(o[mi][i][2 * r + 1] * inv);
            }
        }
    }
}
