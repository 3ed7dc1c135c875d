// A CPU stand-in for the parts of CUDA the scalar kernels use, so that their logic (the
// indexing, the passes, the tiles, the barriers' placement, the masks, the dropout replay)
// runs here and in CI with no GPU. Each block's threads are OS threads: __syncthreads is a
// barrier of the block, a warp's shuffles and __syncwarp a barrier of its 32 threads, and
// __shared__ arrays are static locals (one block runs at a time). Not a simulator of the
// memory model or of timing: a race the hardware would show may not show here (racecheck
// on the device covers that).
#pragma once
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
