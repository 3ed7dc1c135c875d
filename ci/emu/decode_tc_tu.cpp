// The tensor-core decode split kernel (kernels/decode/attn_decode_tc.cu) compiled for the
// CPU emulator (cuda_emu.h, -DSDPA_EMU): its dynamic shared memory is this file's arena.
#include "cuda_emu.h"
#define __align__(x) __attribute__((aligned(x)))
#define __constant__
#define sdpa_shared_bytes emu_decode_tc_shared_bytes
#include "decode/attn_decode_tc.cu"

__attribute__((aligned(16))) unsigned char decode_tc_smem[232448];
extern "C" unsigned char* emu_decode_tc_arena() { return decode_tc_smem; }
