//! `sdpa profile`: the tutorial's profiling section. Runs the causal self-attention
//! module and prints a per-op table like `prof.key_averages().table()`; `--trace`
//! writes a Chrome trace. On CUDA every op is timed with CUDA events (one event per
//! kernel or cuBLAS product in the trace, device `cuda`).

use crate::engine::Engine;
use crate::error::CliError;
use ndarray::{Array1, Array2, Array3};
use sdpa_core::{DType, Device};
use sdpa_cuda::{DeviceElement, DeviceTensor, GpuContext};
use sdpa_harness::strategies::SplitMix64;
use sdpa_nn::cuda::{profile_forward, CudaCausalSelfAttention};
use sdpa_nn::profile::{Event, Profiler};
use sdpa_nn::{CausalSelfAttention, Linear};
use sdpa_ref::Element;
use std::path::Path;

/// The module's setup.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Batch.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Embedding dim.
    pub embed: usize,
    /// Heads.
    pub heads: usize,
    /// Element type.
    pub dtype: DType,
    /// Forward calls profiled (after one warm-up call).
    pub iters: usize,
}

fn build<T: Element>(s: &Setup) -> Result<CausalSelfAttention<T>, CliError> {
    let mut rng = SplitMix64(0x0070_f11e);
    let bound = 1.0 / (s.embed as f64).sqrt();
    let mut weight = |rows: usize| {
        Array2::from_shape_simple_fn((rows, s.embed), || {
            T::from_acc(num_cast(rng.symmetric() * bound))
        })
    };
    let c_attn = Linear::new(weight(3 * s.embed), None::<Array1<T>>).map_err(nn)?;
    let c_proj = Linear::new(weight(s.embed), None::<Array1<T>>).map_err(nn)?;
    // The tutorial's module: bias=False, is_causal=True, dropout=0.1, profiled in eval.
    let mut m = CausalSelfAttention::new(c_attn, c_proj, s.heads, 0.1, true).map_err(nn)?;
    m.eval();
    Ok(m)
}

fn num_cast<A: sdpa_ref::Accum>(x: f64) -> A {
    A::from_f64(x)
}

fn nn(e: sdpa_nn::NnError) -> CliError {
    CliError::Usage(e.to_string())
}

fn profile_typed<T: Element>(s: &Setup, profiler: &mut Profiler) -> Result<(), CliError> {
    let mut module = build::<T>(s)?;
    let mut rng = SplitMix64(11);
    let x = Array3::from_shape_simple_fn((s.batch, s.seq, s.embed), || {
        T::from_acc(num_cast(rng.symmetric()))
    });
    module.forward(x.view()).map_err(nn)?;
    for _ in 0..s.iters {
        let start = profiler.now_us();
        let y = module.forward_profiled(x.view(), profiler).map_err(nn)?;
        std::hint::black_box(y);
        let end = profiler.now_us();
        profiler.record(Event {
            name: "CausalSelfAttention.forward".to_string(),
            device: "cpu",
            start_us: start,
            dur_us: end - start,
        });
    }
    Ok(())
}

/// The module on the device: weights uploaded once, `x` uploaded once, then
/// [`sdpa_nn::cuda::profile_forward`]: one CUDA event pair per op (cuBLAS product or
/// kernel) and per forward.
fn profile_cuda<T: Element + DeviceElement>(
    gpu: &GpuContext,
    s: &Setup,
    profiler: &mut Profiler,
) -> Result<(), CliError> {
    let module = build::<T>(s)?;
    let mut on_gpu = CudaCausalSelfAttention::upload(gpu, &module)?;
    let mut rng = SplitMix64(11);
    let x = Array3::from_shape_simple_fn((s.batch, s.seq, s.embed), || {
        T::from_acc(num_cast(rng.symmetric()))
    });
    let dx = DeviceTensor::upload(gpu, x.view().insert_axis(ndarray::Axis(0)))?;
    Ok(profile_forward(gpu, &mut on_gpu, &dx, s.iters, profiler)?)
}

/// Runs the profile and prints the table; writes the trace when asked.
pub fn run(engine: &Engine, setup: Setup, trace: Option<&Path>) -> Result<(), CliError> {
    let mut s = setup;
    if engine.device == Device::Cpu && s.batch > 4 {
        println!(
            "scaled for the CPU: batch {} -> 4 (1/{} of the work)",
            s.batch,
            s.batch / 4
        );
        s.batch = 4;
    }
    println!(
        "CausalSelfAttention(E={}, heads={}, bias=False, is_causal=True, dropout=0.1).eval() on x [{}, {}, {}] {}, {} calls on {}",
        s.embed, s.heads, s.batch, s.seq, s.embed, s.dtype, s.iters, engine.device
    );
    let mut profiler = Profiler::enabled();
    if let Some(gpu) = &engine.gpu {
        println!(
            "device: {} (sm_{}), CUDA events per op",
            gpu.name(),
            gpu.arch()
        );
        match s.dtype {
            DType::F64 => profile_cuda::<f64>(gpu, &s, &mut profiler)?,
            DType::F32 => profile_cuda::<f32>(gpu, &s, &mut profiler)?,
            DType::F16 => profile_cuda::<half::f16>(gpu, &s, &mut profiler)?,
            DType::BF16 => profile_cuda::<half::bf16>(gpu, &s, &mut profiler)?,
        }
    } else {
        match s.dtype {
            DType::F64 => profile_typed::<f64>(&s, &mut profiler)?,
            DType::F32 => profile_typed::<f32>(&s, &mut profiler)?,
            DType::F16 => profile_typed::<half::f16>(&s, &mut profiler)?,
            DType::BF16 => profile_typed::<half::bf16>(&s, &mut profiler)?,
        }
    }
    print!("{}", profiler.table());
    if let Some(path) = trace {
        crate::output::write(path, profiler.chrome_trace().as_bytes(), &[])?;
        println!(
            "trace: {} ({} events)",
            path.display(),
            profiler.events().len()
        );
    }
    Ok(())
}
