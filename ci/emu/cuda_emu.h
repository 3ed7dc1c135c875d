// A CPU stand-in for the parts of CUDA the scalar kernels use, so that their logic (the
// indexing, the passes, the tiles, the barriers' placement, the masks, the dropout replay)
// runs here and in CI with no GPU. Each block's threads are OS threads: __syncthreads is a
// barrier of the block, a warp's shuffles and __syncwarp a barrier of its 32 threads, and
// __shared__ arrays are static locals (one block runs at a time). Not a simulator of the
// memory model or of timing: a race the hardware would show may not show here (racecheck
// on the device covers that).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim {
    unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct uint2 {
    unsigned x, y;
};
struct float2 {
    float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim, gridDim;

struct EmuWarp {
    std::unique_ptr<std::barrier<>> bar;
    unsigned long long buf[32];
};
inline std::vector<EmuWarp>* emu_warps = nullptr;
inline std::barrier<>* emu_block = nullptr;
inline thread_local int emu_lane = 0, emu_warp = 0;
inline std::mutex emu_atomic;

inline void __syncthreads() { emu_block->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __syncwarp(unsigned = 0xffffffffu) { (*emu_warps)[emu_warp].bar->arrive_and_wait(); }

template <class T>
inline T emu_exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "one register");
    EmuWarp& w = (*emu_warps)[emu_warp];
    std::memcpy(&w.buf[emu_lane], &v, sizeof(T));
    w.bar->arrive_and_wait();
    T r;
    std::memcpy(&r, &w.buf[src & 31], sizeof(T));
    w.bar->arrive_and_wait();
    return r;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src) { return emu_exchange(v, src); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int x) { return emu_exchange(v, emu_lane ^ x); }

inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    const float old = *p;
    *p = old + v;
    return old;
}
inline double atomicAdd(double* p, double v) {
    std::lock_guard<std::mutex> g(emu_atomic);
    const double old = *p;
    *p = old + v;
    return old;
}

inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline float __uint_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline double __longlong_as_double(long long x) {
    double d;
    std::memcpy(&d, &x, 8);
    return d;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// Runs `kernel(params)` (a kernel, or a lambda around one) over `grid` blocks of
// `block.x` threads (a multiple of 32), one block at a time.
template <class K, class P>
void emu_launch(K kernel, EmuDim grid, EmuDim block, const P& params) {
    gridDim = grid;
    blockDim = block;
    const int n = (int)block.x;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::barrier<> block_bar(n);
                std::vector<EmuWarp> warps(n / 32);
                for (auto& w : warps) w.bar = std::make_unique<std::barrier<>>(32);
                emu_block = &block_bar;
                emu_warps = &warps;
                std::vector<std::thread> threads;
                for (int t = 0; t < n; ++t) {
                    threads.emplace_back([&, t, x, y, z] {
                        threadIdx = EmuDim{(unsigned)t, 0, 0};
                        blockIdx = EmuDim{x, y, z};
                        emu_lane = t & 31;
                        emu_warp = t >> 5;
                        kernel(params);
                        // An exited thread no longer counts at a barrier (as on sm_70+).
                        (*emu_warps)[emu_warp].bar->arrive_and_drop();
                        emu_block->arrive_and_drop();
                    });
                }
                for (auto& th : threads) th.join();
            }
}

// ---- The tensor-core kernels' pieces (kernels built with -DSDPA_EMU) ----------------

// The block's dynamic shared memory: a translation unit that runs a kernel with
// `extern __shared__` storage defines the arena and points this at it; "shared
// addresses" (what cvta.to.shared gives) are offsets into it.
inline unsigned char* emu_shared_base = nullptr;
inline unsigned emu_smem_addr(const void* p) {
    return (unsigned)((const unsigned char*)p - emu_shared_base);
}
inline void emu_cp_async16(unsigned dst, const void* src, int bytes) {
    std::memcpy(emu_shared_base + dst, src, bytes);
    std::memset(emu_shared_base + dst + bytes, 0, 16 - bytes);
}

inline void emu_cp_async4(unsigned dst, const void* src, int bytes) {
    std::memcpy(emu_shared_base + dst, src, bytes);
    std::memset(emu_shared_base + dst + bytes, 0, 4 - bytes);
}

// IEEE half and bfloat16, round to nearest even (the PTX cvt.rn's).
inline float emu_f16_to_f32(unsigned short x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return (float)h;
}
inline unsigned short emu_f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short x;
    std::memcpy(&x, &h, 2);
    return x;
}
inline unsigned short emu_f32_to_bf16(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
// ex2.approx.ftz: 2^x with subnormal results flushed to zero.
inline float emu_exp2_approx(float x) {
    const float y = std::exp2(x);
    return std::fabs(y) < 1.17549435e-38f ? 0.f : y;
}

// Every lane's `v`, in lane order (a warp-wide exchange).
template <class T>
inline void emu_gather(T v, T (&all)[32]) {
    static_assert(sizeof(T) <= 8, "one register pair");
    EmuWarp& w = (*emu_warps)[emu_warp];
    std::memcpy(&w.buf[emu_lane], &v, sizeof(T));
    w.bar->arrive_and_wait();
    for (int l = 0; l < 32; ++l) std::memcpy(&all[l], &w.buf[l], sizeof(T));
    w.bar->arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8m..8m+7 give the row
// addresses of matrix m; lane l (group g = l / 4, t = l % 4) receives in r[m] elements
// (g, 2t) and (g, 2t+1) of matrix m, or with .trans (2t, g) and (2t+1, g).
inline void emu_ldmatrix_x4(unsigned (&r)[4], unsigned addr, bool trans) {
    unsigned addrs[32];
    emu_gather(addr, addrs);
    const int g = emu_lane / 4, t = emu_lane % 4;
    for (int m = 0; m < 4; ++m) {
        auto elem = [&](int row, int col) {
            unsigned short e;
            std::memcpy(&e, emu_shared_base + addrs[8 * m + row] + 2 * col, 2);
            return (unsigned)e;
        };
        r[m] = trans ? elem(2 * t, g) | (elem(2 * t + 1, g) << 16) : elem(g, 2 * t) | (elem(g, 2 * t + 1) << 16);
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with A 16x16 (lane
// l = 4g + t holds a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
// a3 = A[g+8][2t+8..]), B 16x8 (b0 = B[2t..][g], b1 = B[2t+8..][g]) and C/D 16x8
// (c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]); products exact
// in f32, summed in k order.
inline void emu_mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, bool bf16) {
    unsigned long long a01[32], a23[32], bb[32];
    emu_gather((unsigned long long)a[0] | ((unsigned long long)a[1] << 32), a01);
    emu_gather((unsigned long long)a[2] | ((unsigned long long)a[3] << 32), a23);
    emu_gather((unsigned long long)b0 | ((unsigned long long)b1 << 32), bb);
    auto half = [&](unsigned word, int hi) {
        const unsigned short x = (unsigned short)(hi ? word >> 16 : word & 0xffffu);
        return bf16 ? __uint_as_float((unsigned)x << 16) : emu_f16_to_f32(x);
    };
    auto A = [&](int row, int k) {
        const int lane = (row % 8) * 4 + (k % 8) / 2;
        const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        const unsigned long long pair = reg < 2 ? a01[lane] : a23[lane];
        return half((unsigned)(reg % 2 ? pair >> 32 : pair), k % 2);
    };
    auto B = [&](int k, int n) {
        const int lane = n * 4 + (k % 8) / 2;
        const unsigned long long pair = bb[lane];
        return half((unsigned)(k >= 8 ? pair >> 32 : pair), k % 2);
    };
    const int g = emu_lane / 4, t = emu_lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A(rows[i], k) * B(k, cols[i]);
        c[i] = acc;
    }
}
