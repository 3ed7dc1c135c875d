// The end of every fused kernel: a row's output is its accumulator over the softmax sum,
// times 1 / (1 - p) under dropout, and its log-sum-exp goes out beside it. The stores
// stay in the kernels: each writes its own fragment layout, and a shared store helper
// moved the tensor-core kernels' scaling and parameter loads (ci/ptx-compare.sh).
#pragma once
#include "common/dtype.cuh"

// The factor a row's accumulator is stored with. A fully masked row has sum 0: output 0.
// A row that read a NaN has sum NaN, and the factor stays NaN (sdpa_core's NaN rule):
// `sum > 0` would make it 0, and a row whose NaN weight dropout dropped would come out 0.
__device__ __forceinline__ float out_scale(float sum, double keep_scale) {
    return sum != 0.f ? (float)keep_scale / sum : 0.f;
}

// The natural-log log-sum-exp of a row whose weights were taken against `row_max` (log2
// units); -inf for a fully masked row, NaN for a row that read a NaN (sum NaN).
__device__ __forceinline__ float row_lse(float sum, float row_max) {
    return sum != 0.f ? row_max * SDPA_LN2 + logf(sum) : SDPA_NEG_INF;
}
