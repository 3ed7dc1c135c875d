// The mma.sync forward (kernels/fwd/attn_fwd_tc.cu) compiled for the CPU emulator
// (cuda_emu.h, -DSDPA_EMU): its dynamic shared memory is this file's arena.
#include "cuda_emu.h"
#undef __shared__
#define __shared__
#define __align__(x) __attribute__((aligned(x)))
#define __constant__
#define sdpa_shared_bytes emu_tc_shared_bytes
#include "fwd/attn_fwd_tc.cu"

__attribute__((aligned(16))) unsigned char smem_raw[232448];
extern "C" unsigned char* emu_tc_arena() { return smem_raw; }
extern "C" unsigned emu_tc_block_rows() { return BM; }
