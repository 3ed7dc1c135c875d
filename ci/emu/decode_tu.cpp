// The decode kernels (kernels/decode/attn_decode.cu) compiled for the CPU emulator
// (cuda_emu.h, -DSDPA_EMU): the split kernel's dynamic shared memory is this file's arena.
#include "cuda_emu.h"
#define __align__(x) __attribute__((aligned(x)))
#define __constant__
#define sdpa_shared_bytes emu_decode_shared_bytes
#include "decode/attn_decode.cu"

__attribute__((aligned(16))) unsigned char decode_smem[232448];
extern "C" unsigned char* emu_decode_arena() { return decode_smem; }
extern "C" unsigned emu_decode_bytes() { return SHARED_BYTES; }
