//! Timing of the CUDA backends with CUDA events: warm-up, then the median of many runs,
//! rotating through input sets that together exceed the L2 cache so that no run reads
//! its inputs from cache.

use crate::context::GpuContext;
use crate::error::Result;
use crate::tensor::DeviceTensor;
use cudarc::driver::sys::CUevent_flags;
use half::{bf16, f16};
use ndarray::Array4;
use sdpa_core::{check_support, Backend, Causal, DType, Device, SdpaOptions};
use serde::Serialize;

/// One benchmark shape: `(B, H, L=S, E)`, dtype, causal.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchShape {
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Sequence length (L = S).
    pub len: usize,
    /// Head dim (E = Ev).
    pub head_dim: usize,
    /// dtype name.
    pub dtype: &'static str,
    /// Top-left causal.
    pub causal: bool,
}

impl BenchShape {
    /// `4*B*H*L*S*E`, halved for causal: the FLOP count the issue and PyTorch report.
    pub fn flops(&self) -> f64 {
        let full = 4.0 * (self.batch * self.heads * self.len * self.len * self.head_dim) as f64;
        if self.causal {
            full / 2.0
        } else {
            full
        }
    }

    fn dtype(&self) -> DType {
        self.dtype.parse().expect("bench dtypes are f16/bf16/f32")
    }
}

/// The issue's five shapes: the tutorial's, two more, one causal, one long.
pub fn issue_shapes() -> Vec<BenchShape> {
    let s = |batch, heads, len, head_dim, dtype, causal| BenchShape {
        batch,
        heads,
        len,
        head_dim,
        dtype,
        causal,
    };
    vec![
        s(32, 32, 1024, 32, "f16", false),
        s(16, 16, 2048, 64, "f16", false),
        s(8, 16, 4096, 128, "bf16", false),
        s(8, 16, 4096, 128, "bf16", true),
        s(4, 16, 8192, 128, "f16", false),
    ]
}

/// One timing.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The shape.
    pub shape: BenchShape,
    /// Backend name.
    pub backend: String,
    /// Median milliseconds per call.
    pub median_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// TFLOP/s at the median.
    pub tflops: f64,
}

fn random_tensor(
    gpu: &GpuContext,
    dtype: DType,
    shape: [usize; 4],
    seed: u64,
) -> Result<DeviceTensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64) as f32 * 2.0 - 1.0
    };
    let dims = (shape[0], shape[1], shape[2], shape[3]);
    match dtype {
        DType::F16 => DeviceTensor::upload(
            gpu,
            Array4::from_shape_simple_fn(dims, || f16::from_f32(next())).view(),
        ),
        DType::BF16 => DeviceTensor::upload(
            gpu,
            Array4::from_shape_simple_fn(dims, || bf16::from_f32(next())).view(),
        ),
        DType::F32 => {
            DeviceTensor::upload(gpu, Array4::from_shape_simple_fn(dims, &mut next).view())
        }
        DType::F64 => DeviceTensor::upload(
            gpu,
            Array4::from_shape_simple_fn(dims, || next() as f64).view(),
        ),
    }
}

/// Times `backend` on `shape`: `warmup` untimed calls, then up to `max_runs` timed ones
/// (fewer when they would take over `budget_ms` in all), each between two CUDA events,
/// over enough input sets to exceed twice the L2 cache. `None` if the backend does not
/// take the shape.
pub fn time_backend(
    gpu: &GpuContext,
    shape: &BenchShape,
    backend: Backend,
    warmup: usize,
    max_runs: usize,
    budget_ms: f64,
) -> Result<Option<BenchRow>> {
    let dtype = shape.dtype();
    let dims = [shape.batch, shape.heads, shape.len, shape.head_dim];
    let set_bytes = 3 * dims.iter().product::<usize>() * dtype.size_bytes();
    let sets = (2 * gpu.l2_bytes()?).div_ceil(set_bytes).clamp(2, 16);
    let mut inputs = Vec::with_capacity(sets);
    for i in 0..sets {
        let seed = 3 * i as u64;
        inputs.push([
            random_tensor(gpu, dtype, dims, seed)?,
            random_tensor(gpu, dtype, dims, seed + 1)?,
            random_tensor(gpu, dtype, dims, seed + 2)?,
        ]);
    }
    let options = SdpaOptions {
        causal: if shape.causal {
            Causal::TopLeft
        } else {
            Causal::None
        },
        ..Default::default()
    };
    let [q0, k0, v0] = &inputs[0];
    let problem = gpu.problem(q0, k0, v0, None, &options)?;
    if check_support(backend, &problem, Device::Cuda).is_err() {
        return Ok(None);
    }
    let out = DeviceTensor::alloc(gpu, dtype, problem.out_shape())?;
    let lse = DeviceTensor::alloc(gpu, DType::F32, [shape.batch, shape.heads, shape.len, 1])?;
    let call = |i: usize| -> Result<()> {
        let [q, k, v] = &inputs[i % sets];
        gpu.run(backend, &problem, q, k, v, None, &out, &lse)
    };
    for i in 0..warmup {
        call(i)?;
    }
    gpu.synchronize()?;
    let ctx = gpu.cuda();
    let mut times = Vec::new();
    let mut spent = 0.0;
    for i in 0..max_runs {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(gpu.stream())?;
        call(i + warmup)?;
        end.record(gpu.stream())?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)? as f64;
        times.push(ms);
        spent += ms;
        if spent > budget_ms && times.len() >= 5 {
            break;
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median_ms = times[times.len() / 2];
    Ok(Some(BenchRow {
        shape: *shape,
        backend: backend.name().to_string(),
        median_ms,
        min_ms: times[0],
        runs: times.len(),
        tflops: shape.flops() / (median_ms * 1e-3) / 1e12,
    }))
}

/// Every backend on every shape of [`issue_shapes`].
pub fn run_issue_benchmarks(gpu: &GpuContext) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    // SDPA_BENCH_SHAPES=0,1 times only those of the five (tile sweeps).
    let only_shapes = std::env::var("SDPA_BENCH_SHAPES").ok();
    for (i, shape) in issue_shapes().into_iter().enumerate() {
        if let Some(only) = &only_shapes {
            if !only.split(',').any(|s| s.trim() == i.to_string()) {
                continue;
            }
        }
        for backend in Backend::PRIORITY {
            // SDPA_BENCH_BACKENDS=flash,math times only those.
            if let Ok(only) = std::env::var("SDPA_BENCH_BACKENDS") {
                if !only.split(',').any(|b| b.trim() == backend.name()) {
                    continue;
                }
            }
            let (warmup, runs, budget) = match backend {
                Backend::Math => (2, 10, 1500.0),
                _ => (5, 50, 1500.0),
            };
            if let Some(row) = time_backend(gpu, &shape, backend, warmup, runs, budget)? {
                rows.push(row);
            }
        }
    }
    Ok(rows)
}
