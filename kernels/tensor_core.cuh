// Helpers of the two tensor-core kernels (attn_fwd_tc.cu: mma.sync; attn_fwd_wgmma.cu:
// Hopper wgmma): shared-memory addresses, cp.async, the MUFU exp2.
#pragma once

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronously; bytes past `bytes` are zero-filled.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

// 2^x on the MUFU unit alone (exp2f adds a subnormal-input fix-up around it); results
// under 2^-126 flush to zero, far below anything an f16/bf16 output or an f32 sum sees.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
