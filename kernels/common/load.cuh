// Global -> shared tile loading of the tensor-core kernels: cp.async, and the chunk logic
// both tile layouts share (zero fill past the matrix, a scalar path for rows that 16-byte
// loads cannot read).
#pragma once
#include "common/dtype.cuh"

// SDPA_EMU: the CPU emulator's stand-ins (ci/emu/cuda_emu.h: shared addresses are
// offsets into the block's arena, copies synchronous); NVRTC never defines it.
__device__ __forceinline__ u32 smem_addr(const void* p) {
#ifdef SDPA_EMU
    return emu_smem_addr(p);
#else
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#endif
}

// 16 bytes global -> shared, asynchronously; bytes past `bytes` are zero-filled.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
#ifdef SDPA_EMU
    emu_cp_async16(dst, src, bytes);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
#endif
}
// 4 bytes global -> shared, asynchronously (through L1); zero-filled when `bytes` is 0.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int bytes) {
#ifdef SDPA_EMU
    emu_cp_async4(dst, src, bytes);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifndef SDPA_EMU
    asm volatile("cp.async.commit_group;");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef SDPA_EMU
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Elements of the 8-wide chunk at column col of row `row` that lie inside a [len, dim]
// matrix (0 for a row past the end).
__device__ __forceinline__ int chunk_valid(int row, int len, int col, int dim) {
    const int valid = (row < len) ? min(8, dim - col) : 0;
    return max(valid, 0);
}
