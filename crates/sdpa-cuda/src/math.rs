//! The CUDA math backend: `scores = q k^T` and `out = P v` on cuBLAS around a softmax
//! kernel (`kernels/math.cu`) that scales, masks and normalises the scores in place.
//! Every dtype, f64 included; scores are kept in f32 (f64 for f64).

use crate::blas::{blas_types, Gemm, Operand};
use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::launch;
use crate::params::{FwdParams, Operands};
use crate::spec::{Entry, KernelSpec, Kind};
use crate::tensor::{Buffer, DeviceTensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use sdpa_core::{Layout, Problem};
use std::sync::Arc;

fn product(arg: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            CudaError::bad_layout(arg, "a size that fits in memory", format!("{dims:?}"))
        })
}

impl GpuContext {
    /// Runs the math backend on checked operands.
    pub(crate) fn run_math(
        &self,
        problem: &Problem,
        ops: &Operands<'_>,
        params: &FwdParams,
    ) -> Result<()> {
        let (b, hq, l, s, e, ev) = (
            problem.batch,
            problem.heads_q,
            problem.len_q,
            problem.len_kv,
            problem.head_dim,
            problem.head_dim_v,
        );
        if b * hq * l == 0 {
            return Ok(());
        }
        let dtype = problem.dtype;
        let elem = dtype.size_bytes();
        let types = blas_types(dtype);
        let spec = KernelSpec::plain(Kind::Math, dtype);
        let gather = self.kernel(&spec, Entry::MathGather)?;
        let softmax = self.kernel(&spec, Entry::MathSoftmax)?;
        let batch = b * hq;
        launch::check_index("query", "B * Hq", batch)?;

        // Operands cuBLAS can read in place: contiguous, and (k, v) one kv head per query head.
        let mut scratch: Vec<Arc<Buffer>> = Vec::new();
        let mut operand =
            |which: i32, t: &DeviceTensor, address: u64, rows: usize, cols: usize| -> Result<u64> {
                let direct = t.layout() == Layout::contiguous(t.shape())
                    && (which == 0 || problem.group_size() == 1);
                if direct {
                    return Ok(address);
                }
                let total = product("query", &[batch, rows, cols])?;
                let buffer = Buffer::alloc(self, total * elem, "a gathered math operand")?;
                let dst = buffer.address(self);
                scratch.push(buffer);
                if total > 0 {
                    let mut builder = self.stream().launch_builder(&gather.function);
                    builder.arg(params).arg(&which).arg(&dst);
                    // SAFETY: `dst` holds B*Hq*rows*cols elements, exactly what the kernel
                    // writes; the source is read through strides checked against its buffer.
                    unsafe { builder.launch(launch::elementwise(total)) }?;
                }
                Ok(dst)
            };
        let q_ptr = operand(0, ops.q, params.q, l, e)?;
        let k_ptr = operand(1, ops.k, params.k, s, e)?;
        let v_ptr = operand(2, ops.v, params.v, s, ev)?;

        let scores_bytes = product("query", &[batch, l, s, types.acc_bytes])?;
        let scores = Buffer::alloc(self, scores_bytes, "the math backend's scores")?;
        let scores_ptr = scores.address(self);
        if e == 0 || s == 0 {
            // An empty dot product is 0 (and with no keys there is nothing to read).
            // SAFETY: the scores buffer holds exactly `scores_bytes` bytes.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    scores_ptr,
                    0,
                    scores_bytes,
                    self.stream().cu_stream(),
                )
            }?;
        } else {
            // Column-major view: scores^T [S x L] = K [S x E] * Q^T [E x L], per (b, h).
            let qk = Gemm {
                trans_a: true,
                trans_b: false,
                m: s,
                n: l,
                k: e,
                a: Operand {
                    ptr: k_ptr,
                    dtype: types.elem,
                    ld: e,
                    stride: s * e,
                },
                b: Operand {
                    ptr: q_ptr,
                    dtype: types.elem,
                    ld: e,
                    stride: l * e,
                },
                c: Operand {
                    ptr: scores_ptr,
                    dtype: types.acc,
                    ld: s,
                    stride: l * s,
                },
                batch,
                accumulate: false,
                compute: types.compute,
            };
            // SAFETY: q, k (contiguous or gathered) hold `batch` matrices of [L, E] and
            // [S, E]; the scores buffer holds `batch` [L, S] accumulator matrices.
            unsafe { qk.run(self) }?;
        }
        let config = LaunchConfig {
            grid_dim: (l as u32, hq as u32, b as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = self.stream().launch_builder(&softmax.function);
        builder.arg(params).arg(&scores_ptr);
        // SAFETY: one block per (i, h, b) row of the [B, Hq, L, S] scores buffer allocated
        // above (L, Hq, B within the grid limits checked by `FwdParams::build`);
        // probabilities overwrite their own row; lse and mask were checked.
        unsafe { builder.launch(config) }?;

        // The probabilities overwrite the scores as elements of the input dtype, at the
        // accumulator pitch: `ratio` elements per accumulator slot.
        let ratio = types.acc_bytes / elem;
        if s == 0 || ev == 0 {
            if ev > 0 {
                // SAFETY: `out` is contiguous [B, Hq, L, Ev] (checked by `run`).
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        params.out,
                        0,
                        product("out", &[batch, l, ev, elem])?,
                        self.stream().cu_stream(),
                    )
                }?;
            }
        } else {
            // out^T [Ev x L] = V^T [Ev x S] * P^T [S x L]; P rows have the scores' pitch.
            let pv = Gemm {
                trans_a: false,
                trans_b: false,
                m: ev,
                n: l,
                k: s,
                a: Operand {
                    ptr: v_ptr,
                    dtype: types.elem,
                    ld: ev,
                    stride: s * ev,
                },
                b: Operand {
                    ptr: scores_ptr,
                    dtype: types.elem,
                    ld: product("key", &[s, ratio])?,
                    stride: product("key", &[l, s, ratio])?,
                },
                c: Operand {
                    ptr: params.out,
                    dtype: types.elem,
                    ld: ev,
                    stride: l * ev,
                },
                batch,
                accumulate: false,
                compute: types.compute,
            };
            // SAFETY: v holds `batch` [S, Ev] matrices, the scores buffer `batch` [L, S]
            // probability rows at the accumulator pitch, `out` is contiguous [B, Hq, L, Ev].
            unsafe { pv.run(self) }?;
        }
        // Scratch buffers are freed stream-ordered after the products that read them.
        drop(scratch);
        drop(scores);
        Ok(())
    }
}
