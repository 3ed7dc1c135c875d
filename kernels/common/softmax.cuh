// Pieces of the online softmax every fused kernel shares: row reductions over the threads
// that hold a row, the exponent base, the MUFU exp2.
#pragma once
#include "common/dtype.cuh"

// 2^x on the MUFU unit alone (exp2f adds a subnormal-input fix-up around it); results
// under 2^-126 flush to zero, far below anything an f16/bf16 output or an f32 sum sees.
__device__ __forceinline__ float fast_exp2(float x) {
#ifdef SDPA_EMU
    return emu_exp2_approx(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}

// The mma fragments spread a row over the four threads of a quad (lanes 4r .. 4r + 3).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// The scalar kernel spreads a row's keys over the whole warp.
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// What the exponents subtract for a row of running max `row_max`: a row with nothing
// unmasked yet keeps max -inf, and subtracting 0 then keeps every exp2 at exactly 0
// instead of NaN.
__device__ __forceinline__ float exp_base(float row_max) { return (row_max == SDPA_NEG_INF) ? 0.f : row_max; }
