// Elementwise kernels of the module layers (sdpa_cuda::nn): a bias broadcast that a
// cuBLAS product then accumulates onto (beta = 1, so the bias is added in f32 and the
// sum rounded once, as the CPU Linear does), and the residual dropout with the Philox
// stream of sdpa-core, indexed in the padded [B, Tmax, E] space for nested batches.
#include "common/dtype.cuh"
#include "common/philox.cuh"

// y[r, c] = bias[c] for r < rows, c < cols (y contiguous [rows, cols]).
extern "C" __global__ void nn_bias_rows(elem_t* y, const elem_t* bias, u64 rows, u64 cols) {
    const u64 total = rows * cols;
    for (u64 n = (u64)blockIdx.x * blockDim.x + threadIdx.x; n < total;
         n += (u64)gridDim.x * blockDim.x) {
        y[n] = bias[n % cols];
    }
}

// In place on y contiguous [rows, cols]: element (r, c) draws flat index
// padded_row(r) * cols + c of the stream (seed, offset); kept values scale by `scale`,
// dropped ones are 0. padded_row(r) = r for a dense batch (cu_seqlens == 0), else
// b * max_len + (r - cu_seqlens[b]) for the sequence b holding packed row r.
// cu_seqlens_code: 0 none, 1 u32, 2 i32 (the varlen codes of the attention kernels).
extern "C" __global__ void nn_dropout_rows(elem_t* y, u64 rows, u64 cols, u64 seed, u64 offset,
                                           u64 threshold, acc_t scale, u64 cu_seqlens,
                                           int cu_seqlens_code, int batch, u64 max_len) {
    const u64 total = rows * cols;
    for (u64 n = (u64)blockIdx.x * blockDim.x + threadIdx.x; n < total;
         n += (u64)gridDim.x * blockDim.x) {
        const u64 r = n / cols;
        const u64 c = n - r * cols;
        u64 padded = r;
        if (cu_seqlens_code != 0) {
            // The last sequence whose start is <= r (binary search over B+1 offsets).
            int lo = 0, hi = batch;
            while (hi - lo > 1) {
                const int mid = (lo + hi) >> 1;
                const u64 start = cu_seqlens_code == 2
                                      ? (u64)((const int*)cu_seqlens)[mid]
                                      : (u64)((const u32*)cu_seqlens)[mid];
                if (start <= r) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            const u64 start = cu_seqlens_code == 2 ? (u64)((const int*)cu_seqlens)[lo]
                                                   : (u64)((const u32*)cu_seqlens)[lo];
            padded = (u64)lo * max_len + (r - start);
        }
        const bool keep = dropout_keep1(seed, offset, threshold, padded * cols + c);
        y[n] = keep ? to_elem(load_elem(y + n) * scale) : to_elem((acc_t)0);
    }
}
