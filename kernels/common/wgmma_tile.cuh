// Hopper shared-memory tiles for warpgroup MMA (sm_90a): the swizzled tile layout the
// matrix descriptors read, its cp.async loader, descriptors, and the wgmma fence, commit
// and wait. Tile layout: a tile's rows are cut into column blocks of RB = min(2 D, 128)
// bytes, each block stored [rows][RB bytes] with its 16-byte chunks XOR-swizzled by
// address bits 7.. (128-, 64- or 32-byte swizzle), every block 1024-byte aligned.
//
// The includer defines D (padded head dim), NTHREADS (threads a CTA), RB, SW_MASK
// (RB / 16 - 1) and SW_MODE (the descriptor's swizzle: 1 128 B, 2 64 B, 3 32 B).
#pragma once
#include "common/dtype.cuh"
#include "common/load.cuh"

__device__ __forceinline__ void st_shared_v4(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}
// Shared-memory writes of the generic proxy (cp.async, st.shared) made visible to the
// async proxy wgmma reads through; then a CTA barrier.
__device__ __forceinline__ void tiles_ready() {
    cp_async_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Waits until at most n groups are pending; n is a constant once the M-tile loops unroll.
__device__ __forceinline__ void wgmma_wait_n(int n) {
    switch (n) {
        case 0: wgmma_wait<0>(); break;
        case 1: wgmma_wait<1>(); break;
        case 2: wgmma_wait<2>(); break;
        default: wgmma_wait<3>(); break;
    }
}
// Pins accumulator registers in program order: reads after a wgmma wait stay after it.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Matrix descriptor: start address, leading and stride byte offsets, swizzle mode.
__device__ __forceinline__ u64 make_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) |
           ((u64)SW_MODE << 62);
}

// Rows [row0, row0 + ROWS) of a [len, dim] matrix (row stride `stride`) into the
// swizzled tile at shared address `tile`; rows past `len` and columns past `dim` zero.
template <int ROWS>
__device__ __forceinline__ void load_tile_sw(u32 tile, const u16* base, i64 stride, int row0, int len,
                                             int dim, bool vec_ok, int tid) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks a row
    constexpr int CPB = RB / 16;   // chunks a column block
    // The fast path needs a fixed chunk column a thread: not at D = 96 or 192 with two
    // warpgroups (12 or 24 chunks a row), which take the general loop.
    constexpr bool FIXED = NTHREADS % CHUNKS == 0;
    if (FIXED && vec_ok && dim == D && row0 + ROWS <= len) {
        // Whole tile, 16-byte aligned rows, no padded columns: thread tid copies chunk
        // tid % CHUNKS of rows tid / CHUNKS + i RSTEP. Rows RSTEP apart have the same
        // swizzle phase (asserted), so one address computation, then constant steps.
        constexpr int RSTEP = FIXED ? NTHREADS / CHUNKS : 1;
        static_assert(!FIXED || ((RSTEP * RB) % 128 == 0 && ((RSTEP * RB) >> 7) % (SW_MASK + 1) == 0),
                      "a thread's swizzle phase is fixed");
        const int r0 = tid / CHUNKS;
        const int ch = tid % CHUNKS;
        const u32 dst = tile + (ch / CPB) * (ROWS * RB) + r0 * RB + (((ch % CPB) ^ ((r0 * RB >> 7) & SW_MASK)) << 4);
        const u16* src = base + (i64)(row0 + r0) * stride + ch * 8;
#pragma unroll
        for (int i = 0; i < (ROWS + RSTEP - 1) / RSTEP; ++i) {
            if (ROWS % RSTEP == 0 || r0 + i * RSTEP < ROWS)
                cp_async16(dst + i * RSTEP * RB, src + (i64)i * RSTEP * stride, 16);
        }
        return;
    }
#pragma unroll 4
    for (int c = tid; c < ROWS * CHUNKS; c += NTHREADS) {
        const int r = c / CHUNKS;
        const int ch = c % CHUNKS;
        const int cb = ch / CPB;
        const int cc = ch % CPB;
        const u32 dst = tile + cb * (ROWS * RB) + r * RB + ((cc ^ ((r * RB >> 7) & SW_MASK)) << 4);
        const int col = ch * 8;
        const int valid = chunk_valid(row0 + r, len, col, dim);
        const u16* src = base + (i64)(row0 + r) * stride + col;
        if (vec_ok) {
            cp_async16(dst, valid > 0 ? (const void*)src : (const void*)base, valid * 2);
        } else {
            u32 w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 lo = (2 * e < valid) ? (u32)src[2 * e] : 0u;
                const u32 hi = (2 * e + 1 < valid) ? (u32)src[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            st_shared_v4(dst, w[0], w[1], w[2], w[3]);
        }
    }
}
