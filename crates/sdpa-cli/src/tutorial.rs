//! PyTorch's "(Beta) Implementing High-Performance Transformers with Scaled Dot Product
//! Attention" tutorial, step by step, on the best device found.

use crate::bench::{self, Shape};
use crate::engine::Engine;
use crate::error::CliError;
use ndarray::{Array4, Axis};
use sdpa_core::{Backend, BackendSet, DType, Device, SdpaOptions};
use sdpa_harness::run;
use sdpa_harness::strategies::SplitMix64;
use std::process::ExitCode;

/// Standard normal samples (Box-Muller), like `torch.randn`.
fn randn(shape: [usize; 4], rng: &mut SplitMix64) -> Array4<f32> {
    Array4::from_shape_simple_fn(shape, || {
        let u1 = rng.unit().max(f64::MIN_POSITIVE);
        let u2 = rng.unit();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    })
}

fn print_tensor(name: &str, a: &Array4<f32>) {
    println!("{name} {:?} =", a.shape());
    for (b, batch) in a.axis_iter(Axis(0)).enumerate() {
        for (h, head) in batch.axis_iter(Axis(0)).enumerate() {
            println!("  [{b}, {h}]:");
            for row in head.axis_iter(Axis(0)) {
                let cells: Vec<String> = row.iter().map(|x| format!("{x:>8.4}")).collect();
                println!("    [{}]", cells.join(","));
            }
        }
    }
}

/// The tutorial's problem: batch 32, 32 heads, length 1024, head dim 32, f16. On the CPU
/// the batch is cut so the table finishes in seconds; the scaling is printed.
fn tutorial_shape(device: Device) -> (Shape, Option<String>) {
    let full = Shape {
        batch: 32,
        heads: 32,
        len: 1024,
        head_dim: 32,
        dtype: DType::F16,
        causal: false,
    };
    match device {
        Device::Cuda => (full, None),
        Device::Cpu => {
            let scaled = Shape { batch: 2, ..full };
            (
                scaled,
                Some(format!(
                    "scaled for the CPU: batch 32 -> {} (1/{} of the work); times are for the scaled problem",
                    scaled.batch,
                    full.batch / scaled.batch
                )),
            )
        }
    }
}

/// Runs the tutorial.
pub fn run(engine: &Engine) -> Result<ExitCode, CliError> {
    println!("sdpa: PyTorch's scaled dot-product attention tutorial, in Rust");
    match &engine.no_cuda_reason {
        Some(why) => println!("device: {} (no CUDA device: {why})\n", engine.describe()),
        None => println!("device: {}\n", engine.describe()),
    }

    println!("1. The function");
    println!("   query, key, value = randn(2, 3, 8) each (as [B=2, H=1, L=3, E=8])");
    println!("   out = scaled_dot_product_attention(query, key, value)\n");
    let mut rng = SplitMix64(2024);
    let q = randn([2, 1, 3, 8], &mut rng);
    let k = randn([2, 1, 3, 8], &mut rng);
    let v = randn([2, 1, 3, 8], &mut rng);
    let (out, _lse) = sdpa::attention(
        sdpa::Tensor::Host(q.view()),
        sdpa::Tensor::Host(k.view()),
        sdpa::Tensor::Host(v.view()),
        None,
        &SdpaOptions::default(),
        &sdpa::Exec::cpu(),
    )?
    .into_host()
    .expect("host arrays in, host arrays out");
    print_tensor("out", &out);
    println!();

    let (shape, scaling) = tutorial_shape(engine.device);
    println!(
        "2. Each backend on the tutorial's problem: batch 32, 32 heads, length 1024, head dim 32, f16"
    );
    if let Some(s) = &scaling {
        println!("   {s}");
    }
    let rows = bench::bench_shape(engine, shape, 3)?;
    for line in bench::table(&rows).lines() {
        println!("   {line}");
    }
    println!();

    println!("3. Explicit backend control (sdpa_kernel(SDPBackend.FLASH_ATTENTION) in PyTorch)");
    let case = shape.case(7);
    let problem = run::problem(&case)?;
    match engine.select(BackendSet::only(Backend::Flash), &problem) {
        Ok(b) => println!("   flash only: dispatch picks {b}"),
        Err(e) => println!("   flash only: {e}"),
    }
    let f32_problem = run::problem(
        &Shape {
            dtype: DType::F32,
            ..shape
        }
        .case(7),
    )?;
    match engine.select(
        BackendSet::only(Backend::Flash).with(Backend::Efficient),
        &f32_problem,
    ) {
        Ok(b) => println!("   flash or efficient, f32 inputs: dispatch picks {b}"),
        Err(e) => println!("   flash or efficient, f32 inputs: {e}"),
    }
    println!();

    // The tutorial's CausalSelfAttention section and its profile, through the same path
    // as `sdpa profile` (which also writes a Chrome trace).
    println!("4. Causal self-attention (the tutorial's nanoGPT module), profiled (`sdpa profile` for the trace)");
    crate::profile::run(
        engine,
        crate::profile::Setup {
            batch: 32,
            seq: 256,
            embed: 512,
            heads: 8,
            dtype: DType::F16,
            iters: 5,
        },
        None,
    )?;
    Ok(ExitCode::SUCCESS)
}
