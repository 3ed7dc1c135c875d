// The mma.sync backward (kernels/bwd/attn_bwd_tc.cu) compiled for the CPU emulator
// (cuda_emu.h, -DSDPA_EMU), once per tile shape: -DSDPA_EMU_TAG=x names this copy's
// arena, shared-memory size and queries (x_arena, ...); its dynamic shared memory is the
// arena.
#include "cuda_emu.h"
#define SDPA_EMU_CAT2(a, b) a##_##b
#define SDPA_EMU_CAT(a, b) SDPA_EMU_CAT2(a, b)
#define SDPA_EMU_NAME(x) SDPA_EMU_CAT(SDPA_EMU_TAG, x)
#undef __shared__
#define __shared__
#define __align__(x) __attribute__((aligned(x)))
#define __constant__
#define sdpa_shared_bytes SDPA_EMU_NAME(shared_bytes)
#define smem_raw SDPA_EMU_NAME(smem)
#include "bwd/attn_bwd_tc.cu"

__attribute__((aligned(16))) unsigned char smem_raw[232448];
extern "C" unsigned char* SDPA_EMU_NAME(arena)() { return smem_raw; }
extern "C" unsigned SDPA_EMU_NAME(block_keys)() { return BN; }
extern "C" unsigned SDPA_EMU_NAME(threads)() { return NTHREADS; }
