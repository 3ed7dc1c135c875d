// Element types and conversions of every kernel. No CUDA headers (here or in any kernel):
// NVRTC compiles them with nothing but its built-ins, so a CI machine needs only the
// nvidia-cuda-nvrtc wheel.
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

// SDPA_EMU: the CPU emulator's conversions (ci/emu/cuda_emu.h); NVRTC never defines it.
__device__ __forceinline__ float f16_to_f32(u16 x) {
#ifdef SDPA_EMU
    return emu_f16_to_f32(x);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
#endif
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef SDPA_EMU
    return emu_f32_to_f16(f);
#else
    u16 x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
#endif
}
__device__ __forceinline__ float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
#ifdef SDPA_EMU
    return emu_f32_to_bf16(f);
#else
    u16 x;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
#endif
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
#ifdef SDPA_EMU
#if SDPA_DTYPE == 3
    r = (u32)emu_f32_to_bf16(lo) | ((u32)emu_f32_to_bf16(hi) << 16);
#else
    r = (u32)emu_f32_to_f16(lo) | ((u32)emu_f32_to_f16(hi) << 16);
#endif
#elif SDPA_DTYPE == 3
    asm("cvt.rn.bf16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
#else
    asm("cvt.rn.f16x2.f32 %0, %2, %1;" : "=r"(r) : "f"(lo), "f"(hi));
#endif
    return r;
}

// The 16-bit element's PTX type name, for the mma.sync and wgmma wrappers.
#if SDPA_DTYPE == 2
#define MMA_TYPE "f16"
#elif SDPA_DTYPE == 3
#define MMA_TYPE "bf16"
#endif
