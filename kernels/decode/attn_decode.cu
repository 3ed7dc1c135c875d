// Decoding over a KV cache: split-KV ("flash-decoding") over a dense or a paged cache,
// with the append of new keys. Three kernels, launched in this order on one stream:
//
//  - append:  k_new / v_new [B, Hkv, L_new, E] written into the cache at key
//             cache_seqlens[b] + t (grid L_new x Hkv x B).
//  - split:   one CTA per (key split, kv head x row tile, batch row). The query rows of a
//             kv head's group are packed into one tile (packed row r = query position
//             r / group, query head hk * group + r % group), so every key and value of the
//             split is read once per tile. Keys come through shared memory in blocks of
//             BN (cp.async, two stages); the online softmax is kept per row; the split's
//             partial (out / l, lse) goes to f32 scratch, or (one split) the final out and
//             lse are written directly.
//  - combine: the splits of each row merged by their lse (grid: one CTA per row).
//
// Key j of batch row b, kv head h lives at k + page * k_stride_page + slot * k_stride_slot
// + h * k_stride_h with page = block_table[b][j / block_size], slot = j % block_size (a
// dense cache is the paged one with page = b and slot = j). The host has checked every
// table entry that a row's keys (after the append) reach, and the lengths.
//
// Scores, in this order (DESIGN.md, "Inference"): scale, softcap c * tanh(x / c), ALiBi
// -slope * |i + n - Lq - j|, then causal (bottom-right) and the window to -inf. Rows with
// no key give out 0 and lse -inf.
//
// Compile-time: SDPA_DTYPE (1 f32, 2 f16, 3 bf16), SDPA_HEAD_DIM (the class of max(E, Ev):
// 64, 128 or 256), SDPA_BLOCK_N (keys a block), SDPA_KERNEL_APPEND, SDPA_KERNEL_COMBINE,
// SDPA_KERNEL_SPLIT{1,4,8,16} (the split kernel for tiles of that many packed rows).
#include "common/dtype.cuh"
#include "common/load.cuh"
#include "common/softmax.cuh"
#include "decode/keys.cuh"


#define NT 128
#define EMAX SDPA_HEAD_DIM
#define BN SDPA_BLOCK_N
#define MR_MAX 16
// Elements a 16-byte chunk holds.
#define CE (16 / (int)sizeof(elem_t))
// Threads a key's dot products are split over in the score phase.
#define TPK (NT / BN)
// Shared row stride (elements): TPK * 16 bytes of padding keep the score phase's
// 16-byte reads of TPK threads x (8 / TPK) keys in distinct banks.
#define RS (EMAX + TPK * CE)
// The value phase: each thread owns DPT output dims of one of G key groups.
#define DPT (EMAX >= 128 ? EMAX / 64 : 2)
#define TPG (EMAX / DPT)
#define G (NT / TPG)
#define KV_STAGE_ELEMS (BN * RS)
#define KV_BYTES (4 * KV_STAGE_ELEMS * (int)sizeof(elem_t))
#define Q_BYTES (MR_MAX * EMAX * 4)
#define S_BYTES (MR_MAX * BN * 4)
#define ROW_BYTES (8 * MR_MAX * 4)
#define SHARED_BYTES (KV_BYTES + Q_BYTES + 2 * S_BYTES + ROW_BYTES)

static_assert(NT % BN == 0 && BN <= 64 && BN >= 32, "a key block of 32 or 64 keys");
static_assert(DPT % 2 == 0, "value columns in pairs (one 32-bit word of 16-bit values)");
static_assert(G * MR_MAX * EMAX * 4 <= KV_BYTES, "the group reduction fits the K/V stages");
static_assert(SHARED_BYTES <= 232448, "decode tiles exceed sm_90's shared memory");

extern "C" __constant__ unsigned int sdpa_shared_bytes = SHARED_BYTES;

extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_APPEND(const DecodeParams p) {
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int j = ((const int*)p.seqlens)[b] + t;
    const KeyAt at = key_at(p, b, j);
    elem_t* kd = (elem_t*)p.k + key_offset(at, p.k_stride_page, p.k_stride_slot, p.k_stride_h, h);
    elem_t* vd = (elem_t*)p.v + key_offset(at, p.v_stride_page, p.v_stride_slot, p.v_stride_h, h);
    const elem_t* ks = (const elem_t*)p.k_new + b * p.kn_stride_b + h * p.kn_stride_h + t * p.kn_stride_l;
    const elem_t* vs = (const elem_t*)p.v_new + b * p.vn_stride_b + h * p.vn_stride_h + t * p.vn_stride_l;
    for (int e = threadIdx.x; e < p.head_dim; e += NT) kd[e] = ks[e];
    for (int e = threadIdx.x; e < p.head_dim_v; e += NT) vd[e] = vs[e];
}

// Chunks of 16 bytes a shared row holds, and the rows one pass of the CTA covers when
// each thread keeps one chunk column (NT / CH threads a row).
#define CH (EMAX / CE)
#define ROWS_PER_PASS (NT / CH)
static_assert(NT % CH == 0 && BN % ROWS_PER_PASS == 0, "the load passes tile the block");

// Keys [j0, j0 + BN) of the split into a stage of K and one of V; keys at or past `end`
// and columns past E (Ev) are zero. Each key's page and slot are looked up once for both
// K and V; each thread keeps one 16-byte column, so the paged lookup's is the only
// division by a run-time size left in the loop.
__device__ __forceinline__ void load_block(const DecodeParams& p, elem_t* dk, elem_t* dv, int b, int h, int j0,
                                           int end, int tid) {
    const elem_t* kbase = (const elem_t*)p.k;
    const elem_t* vbase = (const elem_t*)p.v;
    if (p.vec16) {
        const int c = tid % CH;
        const int kbytes = max(0, min(CE, p.head_dim - c * CE)) * (int)sizeof(elem_t);
        const int vbytes = max(0, min(CE, p.head_dim_v - c * CE)) * (int)sizeof(elem_t);
#pragma unroll
        for (int r = tid / CH; r < BN; r += ROWS_PER_PASS) {
            const int j = j0 + r;
            const bool live = j < end;
            const KeyAt at = live ? key_at(p, b, j) : KeyAt{b, 0};
            const elem_t* ks = kbase + key_offset(at, p.k_stride_page, p.k_stride_slot, p.k_stride_h, h) + c * CE;
            const elem_t* vs = vbase + key_offset(at, p.v_stride_page, p.v_stride_slot, p.v_stride_h, h) + c * CE;
            cp_async16(smem_addr(dk + r * RS + c * CE), live && kbytes ? ks : kbase, live ? kbytes : 0);
            cp_async16(smem_addr(dv + r * RS + c * CE), live && vbytes ? vs : vbase, live ? vbytes : 0);
        }
    } else {
        for (int idx = tid; idx < BN * EMAX; idx += NT) {
            const int r = idx / EMAX, e = idx % EMAX;
            const int j = j0 + r;
            elem_t x = to_elem(0.f), y = to_elem(0.f);
            if (j < end) {
                const KeyAt at = key_at(p, b, j);
                if (e < p.head_dim) x = kbase[key_offset(at, p.k_stride_page, p.k_stride_slot, p.k_stride_h, h) + e];
                if (e < p.head_dim_v) y = vbase[key_offset(at, p.v_stride_page, p.v_stride_slot, p.v_stride_h, h) + e];
            }
            dk[r * RS + e] = x;
            dv[r * RS + e] = y;
        }
    }
}

// 16 bytes of shared memory as CE floats.
__device__ __forceinline__ void chunk_to_f32(const elem_t* src, float (&out)[CE]) {
    const uint4 w = *(const uint4*)src;
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#if SDPA_DTYPE == 1
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = __uint_as_float(words[k]);
#else
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        // Shifts, not a u16 view of the word (that would break strict aliasing).
        const elem_t lo = (elem_t)(words[k] & 0xffffu), hi = (elem_t)(words[k] >> 16);
        out[2 * k] = load_elem(&lo);
        out[2 * k + 1] = load_elem(&hi);
    }
#endif
}

template <int MR>
__device__ __forceinline__ void decode_split(const DecodeParams& p) {
#ifdef SDPA_EMU
    unsigned char* smem_raw = emu_shared_base;
#else
    extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
    elem_t* s_k = (elem_t*)smem_raw;
    elem_t* s_v = s_k + 2 * KV_STAGE_ELEMS;
    float* s_q = (float*)(smem_raw + KV_BYTES);
    float* s_s = s_q + MR_MAX * EMAX;
    float* s_p = s_s + MR_MAX * BN;
    float* s_m = s_p + MR_MAX * BN;
    float* s_l = s_m + MR_MAX;
    float* s_alpha = s_l + MR_MAX;
    float* s_slope = s_alpha + MR_MAX;
    int* s_lo = (int*)(s_slope + MR_MAX);
    int* s_hi = s_lo + MR_MAX;
    int* s_pos = s_hi + MR_MAX;

    const int split = blockIdx.x;
    const int hk = blockIdx.y / p.row_tiles;
    const int tile = blockIdx.y % p.row_tiles;
    const int b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

    const int r0 = tile * MR;
    const int rows = min(MR, p.group * p.len_q - r0);
    const RowKeys keys = row_keys(p, b);
    const int off = keys.off;
    const KeySpan span = split_keys(p, keys, r0, rows, split, BN);
    const int k_begin = span.begin, k_end = span.end;

    for (int idx = tid; idx < MR * EMAX; idx += NT) {
        const int r = idx / EMAX, e = idx % EMAX;
        float x = 0.f;
        if (r < rows && e < p.head_dim) {
            const int i = (r0 + r) / p.group, h = hk * p.group + (r0 + r) % p.group;
            x = load_elem((const elem_t*)p.q + b * p.q_stride_b + h * p.q_stride_h + i * p.q_stride_l + e);
        }
        s_q[idx] = x;
    }
    if (tid < MR) {
        const int r = tid;
        const int i = (r0 + r) / p.group, h = hk * p.group + (r0 + r) % p.group;
        s_m[r] = SDPA_NEG_INF;
        s_l[r] = 0.f;
        s_pos[r] = i + off;
        s_lo[r] = r < rows ? keys.lo(i) : 0;
        s_hi[r] = r < rows ? keys.hi(i) : 0;
        s_slope[r] = (p.alibi && r < rows) ? ((const float*)p.alibi)[b * p.alibi_stride_b + h] * SDPA_LOG2E : 0.f;
    }

    float o[MR][DPT];
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
        for (int d = 0; d < DPT; ++d) o[r][d] = 0.f;

    auto load = [&](int stage, int j0) {
        load_block(p, s_k + stage * KV_STAGE_ELEMS, s_v + stage * KV_STAGE_ELEMS, b, hk, j0, k_end, tid);
    };
    if (k_begin < k_end) load(0, k_begin);
    cp_async_commit();

    const int chunks = (p.head_dim + CE - 1) / CE;
    const int kk = tid / TPK, part = tid % TPK;
    const int grp = tid / TPG, d0 = (tid % TPG) * DPT;
    int stage = 0;
    for (int j0 = k_begin; j0 < k_end; j0 += BN, stage ^= 1) {
        if (j0 + BN < k_end) load(stage ^ 1, j0 + BN);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        // Scores: TPK threads a key, each over every TPK-th chunk of the head dim.
        {
            float acc[MR];
#pragma unroll
            for (int r = 0; r < MR; ++r) acc[r] = 0.f;
            const elem_t* krow = s_k + stage * KV_STAGE_ELEMS + kk * RS;
            for (int c = part; c < chunks; c += TPK) {
                float kf[CE];
                chunk_to_f32(krow + c * CE, kf);
#pragma unroll
                for (int r = 0; r < MR; ++r) {
                    float qf[CE];
#pragma unroll
                    for (int w = 0; w < CE / 4; ++w) {
                        const uint4 x = *(const uint4*)(s_q + r * EMAX + c * CE + 4 * w);
                        qf[4 * w] = __uint_as_float(x.x);
                        qf[4 * w + 1] = __uint_as_float(x.y);
                        qf[4 * w + 2] = __uint_as_float(x.z);
                        qf[4 * w + 3] = __uint_as_float(x.w);
                    }
#pragma unroll
                    for (int e = 0; e < CE; ++e) acc[r] = fmaf(qf[e], kf[e], acc[r]);
                }
            }
#pragma unroll
            for (int o2 = 1; o2 < TPK; o2 <<= 1)
#pragma unroll
                for (int r = 0; r < MR; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o2);
            const int j = j0 + kk;
#pragma unroll
            for (int r = 0; r < MR; ++r) {
                if (r % TPK != part) continue;
                float x = SDPA_NEG_INF;
                if (j < k_end && j >= s_lo[r] && j < s_hi[r]) {
                    x = acc[r] * p.scale;
                    if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
                    x *= SDPA_LOG2E;
                    x -= s_slope[r] * fabsf((float)(s_pos[r] - j));
                }
                s_s[r * BN + kk] = x;
            }
        }
        __syncthreads();

        // The online softmax: a warp a row.
        for (int r = warp; r < MR; r += NT / 32) {
            float x[BN / 32];
            float mx = SDPA_NEG_INF;
#pragma unroll
            for (int u = 0; u < BN / 32; ++u) {
                x[u] = s_s[r * BN + lane + 32 * u];
                mx = fmaxf(mx, x[u]);
            }
            mx = warp_max(mx);
            const float m_old = s_m[r];
            const float m_new = fmaxf(m_old, mx);
            const float base = exp_base(m_new);
            float sum = 0.f;
#pragma unroll
            for (int u = 0; u < BN / 32; ++u) {
                const float pr = fast_exp2(x[u] - base);
                s_p[(lane + 32 * u) * MR + r] = pr;
                sum += pr;
            }
            sum = warp_sum(sum);
            __syncwarp();
            if (lane == 0) {
                const float alpha = fast_exp2(m_old - base);
                s_alpha[r] = alpha;
                s_l[r] = s_l[r] * alpha + sum;
                s_m[r] = m_new;
            }
        }
        __syncthreads();

        // out += P V: group `grp` takes every G-th key of the block.
        {
#pragma unroll
            for (int r = 0; r < MR; ++r) {
                const float alpha = s_alpha[r];
#pragma unroll
                for (int d = 0; d < DPT; ++d) o[r][d] *= alpha;
            }
            const elem_t* vblock = s_v + stage * KV_STAGE_ELEMS + d0;
            const int live = min(BN, k_end - j0);
            for (int jj = grp; jj < live; jj += G) {
                float vf[DPT];
#if SDPA_DTYPE == 1
#pragma unroll
                for (int d = 0; d < DPT; ++d) vf[d] = vblock[jj * RS + d];
#else
                // DPT 16-bit values as DPT / 2 words (d0 is even: 4-byte aligned).
#pragma unroll
                for (int w = 0; w < DPT / 2; ++w) {
                    const u32 x = ((const u32*)(vblock + jj * RS))[w];
                    const elem_t lo = (elem_t)(x & 0xffffu), hi = (elem_t)(x >> 16);
                    vf[2 * w] = load_elem(&lo);
                    vf[2 * w + 1] = load_elem(&hi);
                }
#endif
                float pr[MR];
                if constexpr (MR % 4 == 0) {
                    // 16-byte aligned: s_p is, and a key's MR weights span MR * 4 bytes.
#pragma unroll
                    for (int r = 0; r < MR; r += 4) {
                        const uint4 x = *(const uint4*)(s_p + jj * MR + r);
                        pr[r] = __uint_as_float(x.x);
                        pr[r + 1] = __uint_as_float(x.y);
                        pr[r + 2] = __uint_as_float(x.z);
                        pr[r + 3] = __uint_as_float(x.w);
                    }
                } else {
#pragma unroll
                    for (int r = 0; r < MR; ++r) pr[r] = s_p[jj * MR + r];
                }
#pragma unroll
                for (int r = 0; r < MR; ++r)
#pragma unroll
                    for (int d = 0; d < DPT; ++d) o[r][d] = fmaf(pr[r], vf[d], o[r][d]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    // The key groups' sums, through the (now idle) K/V stages.
    float* red = (float*)smem_raw;
    if (G > 1) {
        if (grp > 0) {
#pragma unroll
            for (int r = 0; r < MR; ++r)
#pragma unroll
                for (int d = 0; d < DPT; ++d) red[((grp - 1) * MR + r) * EMAX + d0 + d] = o[r][d];
        }
        __syncthreads();
        if (grp == 0) {
            for (int g = 1; g < G; ++g)
#pragma unroll
                for (int r = 0; r < MR; ++r)
#pragma unroll
                    for (int d = 0; d < DPT; ++d) o[r][d] += red[((g - 1) * MR + r) * EMAX + d0 + d];
        }
    }
    if (grp != 0) return;
    const i64 total_rows = (i64)p.batch * p.heads_q * p.len_q;
#pragma unroll
    for (int r = 0; r < MR; ++r) {
        if (r >= rows) break;
        const int i = (r0 + r) / p.group, h = hk * p.group + (r0 + r) % p.group;
        const i64 row = ((i64)b * p.heads_q + h) * p.len_q + i;
        const float l = s_l[r];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const float lse = l > 0.f ? s_m[r] * SDPA_LN2 + logf(l) : SDPA_NEG_INF;
        if (p.splits == 1) {
            elem_t* out = (elem_t*)p.out + row * p.head_dim_v;
#pragma unroll
            for (int d = 0; d < DPT; ++d)
                if (d0 + d < p.head_dim_v) out[d0 + d] = to_elem(o[r][d] * inv);
            if (d0 == 0) ((float*)p.lse)[row] = lse;
        } else {
            float* out = (float*)p.part_out + ((i64)split * total_rows + row) * p.head_dim_v;
#pragma unroll
            for (int d = 0; d < DPT; ++d)
                if (d0 + d < p.head_dim_v) out[d0 + d] = o[r][d] * inv;
            if (d0 == 0) ((float*)p.part_lse)[(i64)split * total_rows + row] = lse;
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_SPLIT1(const DecodeParams p) { decode_split<1>(p); }
extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_SPLIT4(const DecodeParams p) { decode_split<4>(p); }
extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_SPLIT8(const DecodeParams p) { decode_split<8>(p); }
extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_SPLIT16(const DecodeParams p) { decode_split<16>(p); }

// The splits of row blockIdx.x merged: weights exp(lse_s - max), out the weighted mean.
extern "C" __global__ void __launch_bounds__(NT) SDPA_KERNEL_COMBINE(const DecodeParams p) {
    __shared__ float s_w[128];
    __shared__ float s_base, s_sum;
    const i64 row = blockIdx.x;
    const i64 total_rows = (i64)p.batch * p.heads_q * p.len_q;
    const float* lse = (const float*)p.part_lse;
    if (threadIdx.x < 32) {
        float mx = SDPA_NEG_INF;
        for (int s = threadIdx.x; s < p.splits; s += 32) mx = fmaxf(mx, lse[s * total_rows + row]);
        mx = warp_max(mx);
        const float base = exp_base(mx);
        float sum = 0.f;
        for (int s = threadIdx.x; s < p.splits; s += 32) {
            const float w = expf(lse[s * total_rows + row] - base);
            s_w[s] = w;
            sum += w;
        }
        sum = warp_sum(sum);
        if (threadIdx.x == 0) {
            s_base = base;
            s_sum = sum;
        }
    }
    __syncthreads();
    const float sum = s_sum;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const float* part = (const float*)p.part_out;
    for (int d = threadIdx.x; d < p.head_dim_v; d += NT) {
        float acc = 0.f;
        for (int s = 0; s < p.splits; ++s) acc = fmaf(s_w[s], part[(s * total_rows + row) * p.head_dim_v + d], acc);
        ((elem_t*)p.out)[row * p.head_dim_v + d] = to_elem(acc * inv);
    }
    if (threadIdx.x == 0) ((float*)p.lse)[row] = sum > 0.f ? s_base + logf(sum) : SDPA_NEG_INF;
}
