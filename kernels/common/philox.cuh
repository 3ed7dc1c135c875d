// Dropout's random stream: Philox4x32-10 and the keep decision of a flat index, shared by
// the fused kernels, the math backend's softmax and the module's residual dropout.
#pragma once
#include "common/dtype.cuh"
#include "common/params.cuh"

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

// The flat index of score (b, h, i, j) in the [B, Hq, L, S] dropout stream (L and S the
// padded lengths in varlen mode, so a sequence draws the same words as its dense copy).
__device__ __forceinline__ u64 dropout_index(const FwdParams& p, int b, int h, int i, int j) {
    return (((u64)b * p.heads_q + h) * (u64)p.len_q + (u64)i) * (u64)p.len_kv + (u64)j;
}
