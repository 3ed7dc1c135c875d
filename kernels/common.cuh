// Element types, conversions, Philox and causal bounds shared by every kernel. No CUDA
// headers: NVRTC compiles this with nothing but its built-ins, so a CI machine needs only
// the nvidia-cuda-nvrtc wheel.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define SDPA_NEG_INF (-__int_as_float(0x7f800000))
#define SDPA_LOG2E 1.4426950408889634f
#define SDPA_LN2 0.6931471805599453f

// SDPA_DTYPE: 0 f64, 1 f32, 2 f16, 3 bf16 (sdpa-core's DType order, widest first).
#if SDPA_DTYPE == 0
typedef double elem_t;
typedef double acc_t;
#elif SDPA_DTYPE == 1
typedef float elem_t;
typedef float acc_t;
#else
typedef u16 elem_t;
typedef float acc_t;
#endif

__device__ __forceinline__ float f16_to_f32(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
}
__device__ __forceinline__ float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 x;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
}

__device__ __forceinline__ acc_t load_elem(const elem_t* p) {
#if SDPA_DTYPE == 2
    return f16_to_f32(*p);
#elif SDPA_DTYPE == 3
    return bf16_to_f32(*p);
#else
    return *p;
#endif
}
__device__ __forceinline__ elem_t to_elem(acc_t x) {
#if SDPA_DTYPE == 2
    return f32_to_f16(x);
#elif SDPA_DTYPE == 3
    return f32_to_bf16(x);
#else
    return x;
#endif
}

// Two f32 to one register of two 16-bit values, `lo` in the low half.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if SDPA_DTYPE == 3
    asm("cvt.rn.bf16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
#else
    asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
#endif
    return r;
}

// Philox4x32-10 exactly as Random123 (and sdpa_core::philox4x32_10) defines it.
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key.x += 0x9E3779B9u;
            key.y += 0xBB67AE85u;
        }
        const u32 hi0 = __umulhi(0xD2511F53u, ctr.x);
        const u32 lo0 = 0xD2511F53u * ctr.x;
        const u32 hi1 = __umulhi(0xCD9E8D57u, ctr.z);
        const u32 lo1 = 0xCD9E8D57u * ctr.z;
        ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    }
    return ctr;
}

__device__ __forceinline__ uint4 philox_block(u64 seed, u64 offset, u64 block) {
    const u64 c = offset + block;
    return philox4x32_10(make_uint4((u32)c, (u32)(c >> 32), 0u, 0u),
                         make_uint2((u32)seed, (u32)(seed >> 32)));
}

__device__ __forceinline__ u32 pick_word(uint4 w, u32 lane) {
    return lane == 0 ? w.x : lane == 1 ? w.y : lane == 2 ? w.z : w.w;
}

// Keep decisions of flat indices n and n + 1 (one Philox block when both share it).
__device__ __forceinline__ void dropout_keep2(u64 seed, u64 offset, u64 threshold, u64 n,
                                              bool& keep0, bool& keep1) {
    const u32 lane = (u32)n & 3u;
    const uint4 w = philox_block(seed, offset, n >> 2);
    keep0 = (u64)pick_word(w, lane) >= threshold;
    if (lane < 3) {
        keep1 = (u64)pick_word(w, lane + 1) >= threshold;
    } else {
        keep1 = (u64)philox_block(seed, offset, (n >> 2) + 1).x >= threshold;
    }
}

__device__ __forceinline__ bool dropout_keep1(u64 seed, u64 offset, u64 threshold, u64 n) {
    return (u64)pick_word(philox_block(seed, offset, n >> 2), (u32)n & 3u) >= threshold;
}

// sdpa_core::Causal::key_limit: keys j < limit take part for query i.
__device__ __forceinline__ int key_limit(int causal, int i, int len_q, int len_kv) {
    if (causal == 1) return min(i + 1, len_kv);
    if (causal == 2) {
        const i64 limit = (i64)i + 1 + (i64)len_kv - (i64)len_q;
        return (int)max((i64)0, min((i64)len_kv, limit));
    }
    return len_kv;
}

// Sequence b's start row and length: from cu_seqlens in varlen mode, else (0, dense).
__device__ __forceinline__ void seq_extent(int varlen, u64 cu_seqlens, int b, int dense_len,
                                           i64& start, int& len) {
    if (varlen == 0) {
        start = 0;
        len = dense_len;
    } else if (varlen == 1) {
        const u32* cu = (const u32*)cu_seqlens;
        start = cu[b];
        len = (int)(cu[b + 1] - cu[b]);
    } else {
        const int* cu = (const int*)cu_seqlens;
        start = cu[b];
        len = cu[b + 1] - cu[b];
    }
}
