//! Launch checks and the launch. A kernel indexes rows, keys and tiles in 32-bit `int`
//! and adds tile sizes to them (`m0 + BM`, `n_end + BN - 1`), so every size it sees must
//! stay below `i32::MAX` by more than the largest tile; the grid's y and z carry heads
//! and batch (at most 65535). What a kernel cannot index is refused here, on the host,
//! naming the dimension, before any launch.

use crate::error::{CudaError, Result};
use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};
use sdpa_core::Problem;

/// The largest length (rows, keys) or head dim a kernel takes: `i32::MAX` less a margin
/// larger than any tile (512 query rows, 256 keys), so tile arithmetic cannot wrap.
pub const MAX_KERNEL_INDEX: usize = i32::MAX as usize - 4096;

/// Grid y and z limit.
pub const MAX_GRID_YZ: usize = 65535;

fn fits(arg: &'static str, what: &str, value: usize, limit: usize) -> Result<()> {
    if value > limit {
        return Err(CudaError::bad_layout(
            arg,
            format!("{what} <= {limit} (what the kernels can index)"),
            format!("{what} = {value}"),
        ));
    }
    Ok(())
}

/// Refuses a problem the kernels cannot index: lengths or head dims past
/// [`MAX_KERNEL_INDEX`], batch or heads past the grid's [`MAX_GRID_YZ`]. In varlen mode
/// `len_q`/`len_kv` are the longest sequences; the packed totals are checked by the
/// caller against the same limit.
///
/// # Errors
/// [`CudaError::BadLayout`] naming the dimension, its value and the limit.
pub fn check_indexable(problem: &Problem, varlen: bool) -> Result<()> {
    let arg = if varlen { "cu_seqlens" } else { "query" };
    fits(arg, "query length L", problem.len_q, MAX_KERNEL_INDEX)?;
    fits(arg, "key length S", problem.len_kv, MAX_KERNEL_INDEX)?;
    fits(
        "query",
        "head dim",
        problem.head_dim.max(problem.head_dim_v),
        MAX_KERNEL_INDEX,
    )?;
    fits(arg, "batch B", problem.batch, MAX_GRID_YZ)?;
    fits("query", "query heads Hq", problem.heads_q, MAX_GRID_YZ)?;
    Ok(())
}

/// Checks a value against the kernels' index limit (packed totals, gathered sizes).
pub fn check_index(arg: &'static str, what: &str, value: usize) -> Result<()> {
    fits(arg, what, value, MAX_KERNEL_INDEX)
}

/// The grid of a per-(query block, head, batch) kernel.
///
/// # Errors
/// More query blocks, heads or batches than a grid holds.
pub fn grid(
    blocks_x: usize,
    heads: usize,
    batch: usize,
    threads: u32,
    shared_bytes: u32,
) -> Result<LaunchConfig> {
    fits("query", "query blocks", blocks_x, i32::MAX as usize)?;
    fits("query", "query heads Hq", heads, MAX_GRID_YZ)?;
    fits("query", "batch B", batch, MAX_GRID_YZ)?;
    Ok(LaunchConfig {
        grid_dim: (blocks_x as u32, heads as u32, batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared_bytes,
    })
}

/// A 1-d grid-stride launch over `total` elements, 256 threads a block.
pub fn elementwise(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `function` with one parameter struct on `stream`.
///
/// # Safety
/// Every device address in `params` is a live allocation of the stream's context, and
/// every element the kernel reads or writes under `config` lies inside it: the caller
/// built `params` through the checks of [`crate::params::FwdParams::build`] (or their
/// equivalent) for exactly this kernel and grid.
pub unsafe fn launch_params<P: DeviceRepr>(
    stream: &cudarc::driver::CudaStream,
    function: &CudaFunction,
    config: LaunchConfig,
    params: &P,
) -> Result<()> {
    let mut builder = stream.launch_builder(function);
    builder.arg(params);
    // SAFETY: the caller's contract above.
    unsafe { builder.launch(config) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdpa_core::{DType, SdpaOptions, TensorDesc};

    fn problem(l: usize, s: usize, b: usize, h: usize) -> Problem {
        // Stride-0 views: no memory behind them is needed to describe the problem.
        let desc = |len| TensorDesc {
            dtype: DType::F16,
            layout: sdpa_core::Layout {
                shape: [b, h, len, 8],
                strides: [0, 0, 0, 1],
            },
        };
        Problem::new(&desc(l), &desc(s), &desc(s), None, &SdpaOptions::default()).unwrap()
    }

    #[test]
    fn sizes_the_kernels_cannot_index_are_refused_by_name() {
        assert!(check_indexable(&problem(1024, 1024, 4, 8), false).is_ok());
        let e = check_indexable(&problem(8, (1 << 31) - 64, 1, 1), false).unwrap_err();
        assert!(e.to_string().contains("key length S"), "{e}");
        let e = check_indexable(&problem(2147483521, 8, 1, 1), false).unwrap_err();
        assert!(e.to_string().contains("query length L"), "{e}");
        let e = check_indexable(&problem(8, 8, 65536, 1), true).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cu_seqlens: expected batch B <= 65535"),
            "{e}"
        );
        let e = check_indexable(&problem(8, 8, 1, 70000), false).unwrap_err();
        assert!(e.to_string().contains("query heads Hq"), "{e}");
        assert!(grid(1 << 31, 1, 1, 128, 0).is_err());
        assert_eq!(grid(3, 2, 1, 128, 4096).unwrap().grid_dim, (3, 2, 1));
    }
}
