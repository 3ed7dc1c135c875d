// Hopper (sm_90a) attention forward for the flash path without mask or dropout (f16/bf16;
// causal, sliding window, softcap and ALiBi as run-time switches): warpgroup MMA (wgmma.mma_async) for both GEMMs, f32 accumulators, online
// softmax, scores never leave registers.
//
// One CTA = SDPA_WARPGROUPS warpgroups of 128 threads; each owns SDPA_M_TILES tiles of 64
// query rows (the wgmma M), each with its own S and O accumulators. Q, and K/V tiles of
// SDPA_BLOCK_N keys (double buffered, cp.async by every thread), sit in shared memory in
// the swizzled layout wgmma reads through matrix descriptors:
// a tile's rows are cut into column blocks of RB bytes (128, else 64 where 2 D is not a
// multiple of 128: D = 32 and 96), each block stored
// [rows][RB bytes] with its 16-byte chunks XOR-swizzled by address bits 7.. (128-, 64- or
// 32-byte swizzle), every block 1024-byte aligned.
//   S = Q K^T : A = Q (K-major descriptor), B = K (K-major descriptor).
//   O += P V  : A = P from registers (the S accumulators rounded to 16 bits: the wgmma D
//               fragment of 16 key columns is the A fragment of the next GEMM), B = V
//               (N-major descriptor, transposed by the instruction).
// Pipeline, key tile t: for each M tile m issue S_m = Q_m K_t and O_m += P_m V_{t-1} (one
// commit group each, in that order); then for each m: wait for S_m, its softmax while the
// GEMMs issued after it run, wait for O_m, rescale O_m (only when its running max moved:
// lazy rescaling, below), round P_m. With two M tiles the
// softmax of one overlaps the other's GEMMs inside the warp, no register copies needed.
// K_{t+1} and V_t load during tile t. (Issuing S_{t+1} ahead of the softmax of S_t,
// FlashAttention-3's intra-warpgroup overlap across key tiles, measured slower here:
// kernels/NOTES.md, wgmma v2.)
//
// Compile-time: SDPA_DTYPE (2 f16, 3 bf16), SDPA_HEAD_DIM (32, 64, 96, 128, 192 or 256: E and Ev
// padded, zero-filled in shared memory, padded columns never stored), SDPA_BLOCK_N (64
// or 128), SDPA_WARPGROUPS, SDPA_M_TILES (1 or 2), SDPA_MIN_BLOCKS, SDPA_KERNEL (symbol).
// Run time (FwdParams): causal alignment, scale, GQA group, varlen, strides.
#include "common/dtype.cuh"
#include "common/epilogue.cuh"
#include "common/load.cuh"
#include "common/mask.cuh"
#include "common/params.cuh"
#include "common/seqlen.cuh"
#include "common/softmax.cuh"
#include "common/wgmma.cuh"

#define D SDPA_HEAD_DIM
#define BN SDPA_BLOCK_N
#define NWG SDPA_WARPGROUPS
#define MT SDPA_M_TILES
// How far (log2 units) a row's score may rise above its running max before the max moves.
#define RESCALE_SLACK 8.f
#define BM (64 * NWG * MT)
#define NTHREADS (128 * NWG)
// Bytes of one swizzled row of a column block, blocks a row, the swizzle mask and the
// descriptor's swizzle mode (1: 128 B, 2: 64 B, 3: 32 B), 16-element k-steps a block.
#define RB ((2 * D) % 128 == 0 ? 128 : ((2 * D) % 64 == 0 ? 64 : 32))
#define NCB ((2 * D) / RB)
#define SW_MASK (RB / 16 - 1)
#define SW_MODE (RB == 128 ? 1 : (RB == 64 ? 2 : 3))
#define KPB (RB / 32)
// Shared memory: Q, two K stages, two V stages, from a 1024-byte boundary the kernel
// rounds its base up to (the extra KiB).
#define Q_BYTES (BM * 2 * D)
#define KV_BYTES (BN * 2 * D)
#define SHARED_BYTES (1024 + Q_BYTES + 4 * KV_BYTES)

// What the host launches this module with: the layout above, not a second formula.
extern "C" __constant__ unsigned int sdpa_shared_bytes = SHARED_BYTES;
// The opt-in per-block maximum of sm_90: 227 KiB.
static_assert(SHARED_BYTES <= 232448, "Q, K and V tiles exceed sm_90's shared memory");

#if BN == 64
#define WGMMA_S wgmma_ss_n64
#elif BN == 128
#define WGMMA_S wgmma_ss_n128
#endif
#if D == 32
#define WGMMA_O wgmma_rs_n32
#elif D == 64
#define WGMMA_O wgmma_rs_n64
#elif D == 96
#define WGMMA_O wgmma_rs_n96
#elif D == 128
#define WGMMA_O wgmma_rs_n128
#elif D == 192
#define WGMMA_O wgmma_rs_n192
#elif D == 256
#define WGMMA_O wgmma_rs_n256
#else
#error "head dim class: 32, 64, 96, 128, 192 or 256"
#endif

#include "common/wgmma_tile.cuh"

extern "C" __global__ void __launch_bounds__(NTHREADS, SDPA_MIN_BLOCKS) SDPA_KERNEL(const FwdParams p) {
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The swizzle is a function of address bits 4-9: tiles start on 1024-byte boundaries
    // (the launch asks for 1 KiB more than the tiles need).
    const u32 s_q = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const u32 s_k = s_q + Q_BYTES;
    const u32 s_v = s_k + 2 * KV_BYTES;

    const int b = blockIdx.z;
    const int h = blockIdx.y;
    // Causal: the last query blocks have the most key tiles; start them first.
    const int m_block = p.causal ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int m0 = m_block * BM;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int wg = warp >> 2;

    const SeqLens seq(p, b);
    if (m0 >= seq.len_q) return;

    const int hk = h / p.group;
    const u16* q = (const u16*)p.q + b * p.q_stride_b + h * p.q_stride_h + seq.start_q * p.q_stride_l;
    const u16* k = (const u16*)p.k + b * p.k_stride_b + hk * p.k_stride_h + seq.start_k * p.k_stride_l;
    const u16* v = (const u16*)p.v + b * p.v_stride_b + hk * p.v_stride_h + seq.start_k * p.v_stride_l;
    const bool vec_ok = p.vec_ok != 0;

    const int last_row = min(m0 + BM, seq.len_q) - 1;
    // The key tiles some row of the block sees (causal, window, length): tile t holds keys
    // key0 + t BN ...
    const TileSpan tiles = key_tiles(block_keys_any(p, m0, last_row, seq.len_q, seq.len_k), BN);
    const int n_tiles = tiles.end - tiles.first;
    const int key0 = tiles.first * BN;
    // Tiles inside this range need no causal, window or length masking.
    const KeyRange unmasked = block_keys_all(p, m0, last_row, seq.len_q, seq.len_k);
    // Softcap and ALiBi (run-time switches, off on the plain path).
    const ScoreMods<float, true> mods(p, b, h, seq.len_q, seq.len_k, SDPA_LOG2E);
    const bool modded = mods.active();

    // This thread's rows: (lane / 4) and (lane / 4 + 8) of its warp's 16 in each of its
    // warpgroup's M tiles (M tile m: rows row_base + 64 m).
    const int row_base = m0 + wg * (64 * MT) + (warp & 3) * 16 + (lane >> 2);

    float o[MT][D / 2];
    float s[MT][BN / 2];
    u32 pf[MT][BN / 16][4];
    float row_max[MT][2], row_sum[MT][2], alpha[MT][2];
    bool rescale[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[m][i] = 0.f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_max[m][r] = SDPA_NEG_INF;
            row_sum[m][r] = 0.f;
        }
    }

    const u32 sbo = 8 * RB;
    // Matrix descriptors: one per operand tile, the others by adding the byte offset / 16
    // to its address field (every tile lies below 256 KiB, so the 14-bit field never
    // carries). The bases are laundered each tile (an empty asm the compiler cannot see
    // through): left to itself it hoists every (stage, k-step) descriptor out of the loop,
    // 2 registers each, and spills.
    const u64 q_desc0 = make_desc(s_q + wg * MT * (64 * RB), 16, sbo);
    const u64 k_desc0 = make_desc(s_k, 16, sbo);
    const u64 v_desc0 = make_desc(s_v, BN * RB, sbo);
    // S_m = Q_m K_(stage)^T into s[m] (async; one commit group).
    auto issue_s = [&](int m, int stage) {
        u64 qd = q_desc0 + m * (64 * RB / 16);
        u64 kd = k_desc0 + stage * (KV_BYTES / 16);
        asm volatile("" : "+l"(qd), "+l"(kd));
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
            const u32 q_off = ((ks / KPB) * (BM * RB) + (ks % KPB) * 32) / 16;
            const u32 k_off = ((ks / KPB) * (BN * RB) + (ks % KPB) * 32) / 16;
            WGMMA_S(s[m], qd + q_off, kd + k_off, ks > 0);
        }
        wgmma_commit();
    };
    // O_m += P_m V_(stage) (async; one group).
    auto issue_o = [&](int m, int stage) {
        u64 vd = v_desc0 + stage * (KV_BYTES / 16);
        asm volatile("" : "+l"(vd));
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) WGMMA_O(o[m], pf[m][kk], vd + kk * (16 * RB / 16), 1);
        wgmma_commit();
    };
    // Bound and exponentiate s[m] (keys from n0) against the running max; alpha[m] = the
    // factor O_m so far must be multiplied by, per row.
    // A positive scale folds into the exponent's FFMA, exp2(s * c - max), with the max
    // taken over raw scores. The FFMA's exact product differs from the rounded max
    // c * s_max by up to half an ulp of the max: harmless (< 2^-13) while |max| < 4096,
    // but at scores near 1e11 thousands, and exp2 overflows (golden large_const_* caught
    // that), so a warp whose rows reach that far takes the rounded product instead. Zero
    // or negative scales multiply first (c = 1).
    // Softcap and ALiBi act on scaled scores: with either, the scale multiplies first.
    const bool pos_scale = p.scale_log2 > 0.f && !modded;
    const float c = pos_scale ? p.scale_log2 : 1.f;
    auto softmax_tile = [&](int m, int n0) {
        float (&sm)[BN / 2] = s[m];
        const int row0 = row_base + 64 * m;
        if (!pos_scale) {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) sm[i] *= p.scale_log2;
            if (modded) {
#pragma unroll
                for (int i = 0; i < BN / 2; ++i)
                    sm[i] = mods.apply(sm[i], row0 + ((i >> 1) & 1) * 8, n0 + (i >> 2) * 8 + 2 * (lane & 3) + (i & 1));
            }
        }
        if (!tile_inside(unmasked, n0, BN)) {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) {
                const int j = n0 + (i >> 2) * 8 + 2 * (lane & 3) + (i & 1);
                if (!key_seen(p, row0 + ((i >> 1) & 1) * 8, j, seq.len_q, seq.len_k)) sm[i] = SDPA_NEG_INF;
            }
        }
        float tile_max[2];
        bool grow = false;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = SDPA_NEG_INF;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(sm[4 * j + 2 * r], sm[4 * j + 2 * r + 1]));
            mx = quad_max(mx);
            // -inf stays -inf under a positive factor.
            tile_max[r] = __fmul_rn(mx, c);
            grow |= tile_max[r] > row_max[m][r] + RESCALE_SLACK;
        }
        // Lazy rescaling (FlashAttention-4's): the running max moves only when a row of
        // the warp gains more than RESCALE_SLACK on it. Until then the exponents are taken
        // against the old max (weights up to 2^RESCALE_SLACK; the same max divides out of
        // O and the sum, so the algebra stays exact) and O needs no rescale. At magnitudes
        // where RESCALE_SLACK is below an ulp, any gain moves the max, as before.
        rescale[m] = __any_sync(0xffffffffu, grow);
        float base[2];
        if (rescale[m]) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float new_max = fmaxf(row_max[m][r], tile_max[r]);
                base[r] = exp_base(new_max);
                alpha[m][r] = fast_exp2(row_max[m][r] - base[r]);
                row_max[m][r] = new_max;
            }
        } else {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                base[r] = exp_base(row_max[m][r]);
                alpha[m][r] = 1.f;
            }
        }
        float sum[2] = {0.f, 0.f};
        if (__all_sync(0xffffffffu, fmaxf(fabsf(base[0]), fabsf(base[1])) < 4096.f)) {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) {
                sm[i] = fast_exp2(fmaf(sm[i], c, -base[(i >> 1) & 1]));
                sum[(i >> 1) & 1] += sm[i];
            }
        } else {
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) {
                sm[i] = fast_exp2(__fmul_rn(sm[i], c) - base[(i >> 1) & 1]);
                sum[(i >> 1) & 1] += sm[i];
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) row_sum[m][r] = row_sum[m][r] * alpha[m][r] + sum[r];
    };
    auto pack_p = [&](int m) {
        const float (&sm)[BN / 2] = s[m];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            pf[m][kk][0] = pack2(sm[8 * kk + 0], sm[8 * kk + 1]);
            pf[m][kk][1] = pack2(sm[8 * kk + 2], sm[8 * kk + 3]);
            pf[m][kk][2] = pack2(sm[8 * kk + 4], sm[8 * kk + 5]);
            pf[m][kk][3] = pack2(sm[8 * kk + 6], sm[8 * kk + 7]);
        }
    };
    if (n_tiles > 0) {
        load_tile_sw<BM>(s_q, q, p.q_stride_l, m0, seq.len_q, p.head_dim, vec_ok, tid);
        load_tile_sw<BN>(s_k, k, p.k_stride_l, key0, seq.len_k, p.head_dim, vec_ok, tid);
        load_tile_sw<BN>(s_v, v, p.v_stride_l, key0, seq.len_k, p.head_dim_v, vec_ok, tid);
        cp_async_commit();
        tiles_ready();
        if (n_tiles > 1) load_tile_sw<BN>(s_k + KV_BYTES, k, p.k_stride_l, key0 + BN, seq.len_k, p.head_dim, vec_ok, tid);
        cp_async_commit();
        wgmma_fence();
#pragma unroll
        for (int m = 0; m < MT; ++m) issue_s(m, 0);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            wgmma_wait_n(MT - 1 - m);  // S_m done; the later M tiles' may still run
            fence_regs(s[m]);
            softmax_tile(m, key0);
            pack_p(m);
        }

        for (int t = 1; t < n_tiles; ++t) {
            // K_t and V_{t-1} have landed; every warp is done with S_{t-1} and
            // P_{t-2} V_{t-2}, so their buffers take K_{t+1} and V_t.
            tiles_ready();
            if (t + 1 < n_tiles)
                load_tile_sw<BN>(s_k + ((t + 1) & 1) * KV_BYTES, k, p.k_stride_l, key0 + (t + 1) * BN, seq.len_k,
                                 p.head_dim, vec_ok, tid);
            load_tile_sw<BN>(s_v + (t & 1) * KV_BYTES, v, p.v_stride_l, key0 + t * BN, seq.len_k, p.head_dim_v, vec_ok,
                             tid);
            cp_async_commit();

            wgmma_fence();
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                issue_s(m, t & 1);
                issue_o(m, (t - 1) & 1);
            }
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                wgmma_wait_n(2 * (MT - 1 - m) + 1);  // S_m done; P_m V_{t-1} may still run
                fence_regs(s[m]);
                softmax_tile(m, key0 + t * BN);
                wgmma_wait_n(2 * (MT - 1 - m));  // P_m V_{t-1} done
                fence_regs(o[m]);
                if (rescale[m]) {
#pragma unroll
                    for (int i = 0; i < D / 2; ++i) o[m][i] *= alpha[m][(i >> 1) & 1];
                }
                pack_p(m);
            }
        }
        tiles_ready();
        wgmma_fence();
#pragma unroll
        for (int m = 0; m < MT; ++m) issue_o(m, (n_tiles - 1) & 1);
        wgmma_wait<0>();
#pragma unroll
        for (int m = 0; m < MT; ++m) fence_regs(o[m]);
    }

    elem_t* out = (elem_t*)p.out + b * p.out_stride_b + h * p.out_stride_h + seq.start_q * p.out_stride_l;
    float* lse = (float*)p.lse + b * p.lse_stride_b + h * p.lse_stride_h + seq.start_q * p.lse_stride_l;
    // Two adjacent outputs in one 4-byte store when every row of out starts 4-byte aligned.
    const bool out_pairs = ((p.out | (u64)p.out_stride_b | (u64)p.out_stride_h | (u64)p.out_stride_l) & 1) == 0 &&
                           (p.out & 3) == 0;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float sum = quad_sum(row_sum[m][r]);
            const int rr = row_base + 64 * m + 8 * r;
            if (rr >= seq.len_q) continue;
            const float inv = out_scale(sum, p.keep_scale);
            if ((lane & 3) == 0) lse[rr * p.lse_stride_l] = row_lse(sum, row_max[m][r]);
            elem_t* out_row = out + rr * p.out_stride_l;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const int d = j * 8 + 2 * (lane & 3);
                const float x0 = o[m][4 * j + 2 * r] * inv, x1 = o[m][4 * j + 2 * r + 1] * inv;
                if (out_pairs && d + 1 < p.head_dim_v) {
                    *(u32*)(out_row + d) = pack2(x0, x1);
                } else {
                    if (d < p.head_dim_v) out_row[d] = to_elem(x0);
                    if (d + 1 < p.head_dim_v) out_row[d + 1] = to_elem(x1);
                }
            }
        }
    }
}
