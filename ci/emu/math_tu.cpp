// The math backward's kernels compiled for the CPU emulator (cuda_emu.h), f32.
#include "cuda_emu.h"
#include "bwd/math_bwd.cu"
