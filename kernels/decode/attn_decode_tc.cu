// Decoding over a KV cache on the tensor cores (mma.sync m16n8k16; f16 and bf16, head-dim
// classes 64 and 128, cache rows 16-byte aligned): the split kernel of attn_decode.cu for
// tiles of 16 packed query rows. The append and combine kernels of attn_decode.cu run
// around it unchanged: same DecodeParams, same grid, same scratch of the splits.
//
// One CTA per (key split, kv head x tile of 16 packed query rows, batch row). Inside it,
// each of the NW warps owns every NW-th block of KW keys of the split and runs its own
// online softmax over them, fed by its own STAGES-deep cp.async pipeline in its own part
// of shared memory: no barrier of the CTA inside the key loop, so a warp waiting on its
// loads never holds the others, and (STAGES - 1) blocks of every warp stay in flight.
// At the end the warps' partial results are merged through shared memory by their row
// maxima, and the split's partial (or, one split, the final out and lse) is written as
// attn_decode.cu writes it.
//
// Per block: S = Q K^T (Q's A fragments held in registers, K's B fragments by ldmatrix),
// the scores in log2 units as DESIGN.md orders them (scale, softcap, ALiBi, then causal
// bottom-right and the window to -inf), the running max and sum per row over the quad
// that holds it, then O += P V with P taken from the score accumulators as A fragments
// and V's B fragments by ldmatrix.trans. Packed rows past the tile's rows are zero
// queries that see no key; they are never written.
//
// Compile-time: SDPA_DTYPE (2 f16, 3 bf16), SDPA_HEAD_DIM (the class of max(E, Ev): 64
// or 128), SDPA_KERNEL_SPLIT_TC.
#include "common/dtype.cuh"
#include "common/load.cuh"
#include "common/mma.cuh"
#include "common/softmax.cuh"
#include "decode/keys.cuh"

#define NW 4
#define NT (NW * 32)
#define EMAX SDPA_HEAD_DIM
// Keys a warp's block; blocks a warp keeps in its pipeline. At D = 128, 3 stages (two
// CTAs an SM); 4 or 5 (one CTA an SM) lost 25-40%; 2 (three CTAs) won on B = 8 paged and
// lost on B = 64, where 512 CTAs make 1.3 waves of 396 (ci/decode-sweep.sh, H100,
// kernels/NOTES.md).
#define KW 16
#define STAGES (EMAX <= 64 ? 6 : 3)
// Shared row stride (elements): 16 bytes of padding keep ldmatrix free of bank conflicts.
#define RS (EMAX + 8)
// 16-byte chunks a row; a warp's lanes each keep one chunk column of a block.
#define CH (EMAX / 8)
#define MAT_ELEMS (KW * RS)
#define WARP_ELEMS (STAGES * 2 * MAT_ELEMS)
#define Q_ELEMS (16 * RS)
#define KV_BYTES (NW * WARP_ELEMS * 2)
// The merge's rows of partial outputs (padded against bank conflicts), maxima and sums.
#define RO (EMAX + 4)
#define MERGE_BYTES (NW * 16 * (RO + 2) * 4)
#define SHARED_BYTES (Q_ELEMS * 2 + KV_BYTES)

static_assert(SDPA_DTYPE == 2 || SDPA_DTYPE == 3, "the tensor-core decode is f16 / bf16");
static_assert(EMAX == 64 || EMAX == 128, "head-dim classes 64 and 128");
static_assert(32 % CH == 0 && KW % (32 / CH) == 0, "a warp's chunk columns tile a block");
static_assert(MERGE_BYTES <= KV_BYTES, "the merge fits the idle pipelines");
static_assert(SHARED_BYTES <= 232448, "decode tiles exceed sm_90's shared memory");

extern "C" __constant__ unsigned int sdpa_shared_bytes = SHARED_BYTES;

// Keys [j0, j0 + KW) into one stage of K and one of V, by the 32 lanes of a warp; keys at
// or past `end` and columns past E (Ev) are zero. Each key's page is looked up once for
// both K and V.
__device__ __forceinline__ void load_keys(const DecodeParams& p, elem_t* dk, elem_t* dv, int b, int h, int j0,
                                          int end, int lane) {
    const elem_t* kbase = (const elem_t*)p.k;
    const elem_t* vbase = (const elem_t*)p.v;
    const int c = lane % CH;
    const int kbytes = max(0, min(8, p.head_dim - c * 8)) * 2;
    const int vbytes = max(0, min(8, p.head_dim_v - c * 8)) * 2;
#pragma unroll
    for (int r = lane / CH; r < KW; r += 32 / CH) {
        const int j = j0 + r;
        const bool live = j < end;
        const KeyAt at = live ? key_at(p, b, j) : KeyAt{b, 0};
        const elem_t* ks = kbase + key_offset(at, p.k_stride_page, p.k_stride_slot, p.k_stride_h, h) + c * 8;
        const elem_t* vs = vbase + key_offset(at, p.v_stride_page, p.v_stride_slot, p.v_stride_h, h) + c * 8;
        cp_async16(smem_addr(dk + r * RS + c * 8), live && kbytes ? ks : kbase, live ? kbytes : 0);
        cp_async16(smem_addr(dv + r * RS + c * 8), live && vbytes ? vs : vbase, live ? vbytes : 0);
    }
}

extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_SPLIT_TC(const DecodeParams p) {
#ifdef SDPA_EMU
    unsigned char* smem_raw = emu_shared_base;
#else
    extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
    elem_t* s_q = (elem_t*)smem_raw;
    elem_t* s_kv = s_q + Q_ELEMS;

    const int split = blockIdx.x;
    const int hk = blockIdx.y / p.row_tiles;
    const int tile = blockIdx.y % p.row_tiles;
    const int b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;

    const int r0 = tile * 16;
    const int rows = min(16, p.group * p.len_q - r0);
    const RowKeys keys = row_keys(p, b);
    const int off = keys.off;
    // Splits are whole rounds of the NW warps' blocks.
    const KeySpan span = split_keys(p, keys, r0, rows, split, NW * KW);
    const int k_begin = span.begin, k_end = span.end;
    const int blocks = k_begin < k_end ? (k_end - k_begin + KW - 1) / KW : 0;
    // This warp's blocks: warp, warp + NW, ...
    const int mine = blocks > warp ? (blocks - warp + NW - 1) / NW : 0;
    auto block_key = [&](int it) { return k_begin + (warp + it * NW) * KW; };

    elem_t* wk = s_kv + warp * WARP_ELEMS;
    auto load = [&](int it) {
        elem_t* st = wk + (it % STAGES) * 2 * MAT_ELEMS;
        load_keys(p, st, st + MAT_ELEMS, b, hk, block_key(it), k_end, lane);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < mine) load(s);
        cp_async_commit();
    }

    // The tile's queries as 16-bit values, zero past its rows and past E.
    for (int idx = tid; idx < 16 * EMAX; idx += NT) {
        const int r = idx / EMAX, e = idx % EMAX;
        elem_t x = to_elem(0.f);
        if (r < rows && e < p.head_dim) {
            const int i = (r0 + r) / p.group, h = hk * p.group + (r0 + r) % p.group;
            x = ((const elem_t*)p.q)[b * p.q_stride_b + h * p.q_stride_h + i * p.q_stride_l + e];
        }
        s_q[r * RS + e] = x;
    }
    // This thread's two rows of every fragment: g and g + 8.
    int row_lo[2], row_hi[2], row_pos[2];
    float slope[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        const int r = g + 8 * u;
        const bool live = r < rows;
        const int i = (r0 + r) / p.group, h = hk * p.group + (r0 + r) % p.group;
        row_lo[u] = live ? keys.lo(i) : 0;
        row_hi[u] = live ? keys.hi(i) : 0;
        row_pos[u] = i + off;
        slope[u] = (p.alibi && live) ? ((const float*)p.alibi)[b * p.alibi_stride_b + h] * SDPA_LOG2E : 0.f;
    }
    __syncthreads();
    u32 qf[EMAX / 16][4];
#pragma unroll
    for (int ks = 0; ks < EMAX / 16; ++ks)
        ldmatrix_x4(qf[ks], smem_addr(s_q + ((lane & 7) + ((lane >> 3) & 1) * 8) * RS + ks * 16 + (lane >> 4) * 8));

    float o[EMAX / 8][4];
#pragma unroll
    for (int d = 0; d < EMAX / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {SDPA_NEG_INF, SDPA_NEG_INF}, l[2] = {0.f, 0.f};

    for (int it = 0; it < mine; ++it) {
        if (it + STAGES - 1 < mine) load(it + STAGES - 1);
        cp_async_commit();
        cp_async_wait<STAGES - 1>();
        __syncwarp();
        const elem_t* sk = wk + (it % STAGES) * 2 * MAT_ELEMS;
        const elem_t* sv = sk + MAT_ELEMS;

        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < EMAX / 16; ++ks) {
            u32 kb[4];
            ldmatrix_x4(kb, smem_addr(sk + ((lane & 7) + (lane >> 4) * 8) * RS + ks * 16 + ((lane >> 3) & 1) * 8));
            mma16816_x2(s[0], s[1], qf[ks], kb);
        }

        // Scores in log2 units; c0, c1 are row g, c2, c3 row g + 8; columns 2 t4, 2 t4 + 1.
        const int j0 = block_key(it);
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int u = e >> 1;
                const int j = j0 + nt * 8 + 2 * t4 + (e & 1);
                float x = SDPA_NEG_INF;
                if (j < k_end && j >= row_lo[u] && j < row_hi[u]) {
                    x = s[nt][e] * p.scale;
                    if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
                    x *= SDPA_LOG2E;
                    x -= slope[u] * fabsf((float)(row_pos[u] - j));
                }
                s[nt][e] = x;
                mx[u] = fmaxf(mx[u], x);
            }
        float alpha[2], base[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            mx[u] = quad_max(mx[u]);
            base[u] = exp_base(mx[u]);
            alpha[u] = fast_exp2(m[u] - base[u]);
            m[u] = mx[u];
        }
        // Each thread keeps its own part of a row's sum (alpha is the quad's); summed
        // over the quad once, at the end.
        float rs[2] = {0.f, 0.f};
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = fast_exp2(s[nt][e] - base[e >> 1]);
                rs[e >> 1] += s[nt][e];
            }
#pragma unroll
        for (int u = 0; u < 2; ++u) l[u] = l[u] * alpha[u] + rs[u];
#pragma unroll
        for (int d = 0; d < EMAX / 8; ++d) {
            o[d][0] *= alpha[0];
            o[d][1] *= alpha[0];
            o[d][2] *= alpha[1];
            o[d][3] *= alpha[1];
        }
        const u32 pa[4] = {pack2(s[0][0], s[0][1]), pack2(s[0][2], s[0][3]), pack2(s[1][0], s[1][1]),
                           pack2(s[1][2], s[1][3])};
#pragma unroll
        for (int dp = 0; dp < EMAX / 16; ++dp) {
            u32 vb[4];
            ldmatrix_x4_trans(vb, smem_addr(sv + ((lane & 7) + ((lane >> 3) & 1) * 8) * RS + dp * 16 + (lane >> 4) * 8));
            mma16816_x2(o[2 * dp], o[2 * dp + 1], pa, vb);
        }
        // Every lane is done with this stage before the warp's next load refills it.
        __syncwarp();
    }
    cp_async_wait<0>();
    __syncthreads();

    // The warps' partials through the (now idle) pipelines: row r of warp w at w * 16 + r.
    float* red_o = (float*)(smem_raw + Q_ELEMS * 2);
    float* red_m = red_o + NW * 16 * RO;
    float* red_l = red_m + NW * 16;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        const float sum = quad_sum(l[u]);
        if (t4 == 0) {
            red_m[warp * 16 + g + 8 * u] = m[u];
            red_l[warp * 16 + g + 8 * u] = sum;
        }
    }
#pragma unroll
    for (int d = 0; d < EMAX / 8; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            red_o[(warp * 16 + g + 8 * (e >> 1)) * RO + d * 8 + 2 * t4 + (e & 1)] = o[d][e];
    __syncthreads();

    const i64 total_rows = (i64)p.batch * p.heads_q * p.len_q;
    for (int idx = tid; idx < rows * EMAX; idx += NT) {
        const int r = idx / EMAX, d = idx % EMAX;
        if (d >= p.head_dim_v) continue;
        float mw = SDPA_NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) mw = fmaxf(mw, red_m[w * 16 + r]);
        const float wbase = exp_base(mw);
        float sum = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float wt = fast_exp2(red_m[w * 16 + r] - wbase);
            sum = fmaf(wt, red_l[w * 16 + r], sum);
            acc = fmaf(wt, red_o[(w * 16 + r) * RO + d], acc);
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        const float lse = sum > 0.f ? mw * SDPA_LN2 + logf(sum) : SDPA_NEG_INF;
        const int i = (r0 + r) / p.group, h = hk * p.group + (r0 + r) % p.group;
        const i64 row = ((i64)b * p.heads_q + h) * p.len_q + i;
        if (p.splits == 1) {
            ((elem_t*)p.out)[row * p.head_dim_v + d] = to_elem(acc * inv);
            if (d == 0) ((float*)p.lse)[row] = lse;
        } else {
            ((float*)p.part_out)[((i64)split * total_rows + row) * p.head_dim_v + d] = acc * inv;
            if (d == 0) ((float*)p.part_lse)[(i64)split * total_rows + row] = lse;
        }
    }
}
