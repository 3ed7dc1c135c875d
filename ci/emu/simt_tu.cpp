// The fused backward's kernels compiled for the CPU emulator (cuda_emu.h), f32.
#include "cuda_emu.h"
#include "bwd/attn_bwd_simt.cu"
