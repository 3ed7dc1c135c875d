// The mma.sync kernels' pieces (sm_80+): ldmatrix, the m16n8k16 MMA with f32
// accumulation, and tile loads into a padded row-major shared-memory layout.
//
// Fragment layouts of mma.m16n8k16.row.col (g = lane / 4, t = lane % 4):
//   A 16x16: a0 (row g, cols 2t, 2t+1), a1 (row g+8, same cols), a2 (row g, cols 2t+8,
//            2t+9), a3 (row g+8, cols 2t+8, 2t+9);
//   B 16x8 (k x n): b0 (k 2t, 2t+1, col g), b1 (k 2t+8, 2t+9, col g);
//   C 16x8: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same cols).
// So two C tiles side by side (n-tiles 2k, 2k+1) are, packed to 16 bits, the A fragment
// of k-step k: what the kernels use to feed P or dS into the next product from registers.
#pragma once
#include "common/dtype.cuh"
#include "common/load.cuh"

// SDPA_EMU: the CPU emulator's stand-ins (ci/emu/cuda_emu.h); NVRTC never defines it.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
#ifdef SDPA_EMU
    emu_ldmatrix_x4(r, addr, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
#ifdef SDPA_EMU
    emu_ldmatrix_x4(r, addr, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#ifdef SDPA_EMU
    emu_mma16816(c, a, b0, b1, SDPA_DTYPE == 3);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE
        ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two C tiles side by side from one ldmatrix.x4 B fragment (n-tiles 2k, 2k+1: b[0..1]
// and b[2..3]).
__device__ __forceinline__ void mma16816_x2(float (&c0)[4], float (&c1)[4], const u32 (&a)[4], const u32 (&b)[4]) {
    mma16816(c0, a, b[0], b[1]);
    mma16816(c1, a, b[2], b[3]);
}

// Rows [row0, row0 + ROWS) of a [len, dim] matrix (row stride `stride`) into shared
// memory rows of STRIDE elements, zero-filling rows past `len` and columns past `dim` up
// to DIM (a multiple of 8); THREADS threads share the copy (cp.async when vec_ok). Where
// THREADS is a multiple of the DIM / 8 chunks of a row, each thread keeps one column
// and steps down the rows: its addresses are computed once and advanced by constants.
template <int ROWS, int DIM, int STRIDE, int THREADS>
__device__ __forceinline__ void load_rows(u16* smem, const u16* base, i64 stride, int row0,
                                          int len, int dim, bool vec_ok, int tid) {
    constexpr int CHUNKS = DIM / 8;
    if (THREADS % CHUNKS == 0 && vec_ok) {
        constexpr int ROW_STEP = THREADS / CHUNKS;
        const int r_first = tid / CHUNKS;
        const int col = (tid % CHUNKS) * 8;
        const int col_valid = max(min(8, dim - col), 0);
        const u32 dst = smem_addr(smem + r_first * STRIDE + col);
        const u16* src = base + (i64)(row0 + r_first) * stride + col;
#pragma unroll
        for (int k = 0; k < (ROWS + ROW_STEP - 1) / ROW_STEP; ++k) {
            const int r = r_first + k * ROW_STEP;
            if (ROWS % ROW_STEP != 0 && r >= ROWS) break;
            const int valid = row0 + r < len ? col_valid : 0;
            cp_async16(dst + 2 * k * ROW_STEP * STRIDE, valid > 0 ? (const void*)(src + k * ROW_STEP * stride)
                                                                  : (const void*)base, valid * 2);
        }
        return;
    }
#pragma unroll 4
    for (int c = tid; c < ROWS * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS;
        const int col = (c % CHUNKS) * 8;
        u16* dst = smem + r * STRIDE + col;
        const int valid = chunk_valid(row0 + r, len, col, dim);
        const u16* src = base + (i64)(row0 + r) * stride + col;
        if (vec_ok) {
            cp_async16(smem_addr(dst), valid > 0 ? (const void*)src : (const void*)base, valid * 2);
        } else {
            u32 w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 lo = (2 * e < valid) ? (u32)src[2 * e] : 0u;
                const u32 hi = (2 * e + 1 < valid) ? (u32)src[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            *(uint4*)dst = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}
