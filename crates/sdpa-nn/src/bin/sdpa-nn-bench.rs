//! Times the module on a CUDA device, for `ci/bench_torch_module.py` to set beside
//! PyTorch's numbers on the same card:
//! - issue 5's experiment: 32 sequences of max length 512, lengths drawn as the tutorial
//!   draws them (`int(512 * (1 - gauss(0.5, 0.01)))`, one sequence of length 512), E = 512,
//!   8 heads, f16, eval: the module on the nested batch vs on the zero-padded dense
//!   batch, and the attention call alone both ways;
//! - issue 6's module comparison: B = 32, T = 256, E = 512, 8 heads, f16, eval;
//! - issue 15's training step: the same module in train mode, forward_train + backward,
//!   dropout 0 and 0.1;
//! - the profile of that module (table, and a Chrome trace with `--trace FILE`).
//!
//! CUDA events around each call, 10 warm-ups, median of 100 calls. Writes one JSON object
//! to `--json FILE` (lengths included, so PyTorch runs the same batch).
//!
//! Usage: sdpa-nn-bench [--json FILE] [--trace FILE]

use half::f16;
use ndarray::Array2;
use sdpa_core::rng::SplitMix64;
use sdpa_core::{BackendSet, SdpaOptions};
use sdpa_cuda::{DeviceSeqlens, DeviceTensor, GpuContext, Varlen};
use sdpa_nn::cuda::{profile_forward, CudaCausalSelfAttention};
use sdpa_nn::device::Timeline;
use sdpa_nn::profile::Profiler;
use sdpa_nn::{CausalSelfAttention, Linear};

const WARMUP: usize = 10;
const RUNS: usize = 100;

/// Normal(mean, sd) by Box-Muller: the bench's sequence lengths, not bit-stable data.
fn gauss(rng: &mut SplitMix64, mean: f64, sd: f64) -> f64 {
    let (u1, u2) = (1.0 - rng.unit(), rng.unit());
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Median device time of `f` in microseconds.
fn time(gpu: &GpuContext, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..WARMUP {
        f()?;
    }
    let mut timeline = Timeline::new(gpu, 0.0)?;
    for _ in 0..RUNS {
        let start = timeline.begin(gpu)?;
        f()?;
        timeline.end(gpu, "call", start)?;
    }
    let mut t: Vec<f64> = timeline.finish()?.into_iter().map(|op| op.dur_us).collect();
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn module(rng: &mut SplitMix64, e: usize, heads: usize) -> Res<CausalSelfAttention<f16>> {
    let bound = 1.0 / (e as f64).sqrt();
    let mut w = |rows: usize| {
        Array2::from_shape_simple_fn((rows, e), || f16::from_f64(rng.symmetric() * bound))
    };
    // The tutorial's module: bias=False, is_causal=True, dropout=0.1.
    let mut m = CausalSelfAttention::new(
        Linear::new(w(3 * e), None)?,
        Linear::new(w(e), None)?,
        heads,
        0.1,
        true,
    )?;
    m.eval();
    Ok(m)
}

fn random_tensor(gpu: &GpuContext, rng: &mut SplitMix64, shape: [usize; 4]) -> Res<DeviceTensor> {
    let a = ndarray::Array4::from_shape_simple_fn(shape, || f16::from_f64(rng.symmetric()));
    Ok(DeviceTensor::upload(gpu, a.view())?)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let gpu = GpuContext::with_config(0, sdpa_cuda::KernelConfig::from_env()?)?;
    let mut rng = SplitMix64(112);
    let (batch, max_len, e, heads) = (32usize, 512usize, 512usize, 8usize);
    let d = e / heads;

    // Issue 5: nested vs padded, through the module and through its attention call.
    let mut lengths: Vec<usize> = (0..batch)
        .map(|_| (max_len as f64 * (1.0 - gauss(&mut rng, 0.5, 0.01))) as usize)
        .collect();
    let long = (rng.next_u64() % batch as u64) as usize;
    lengths[long] = max_len;
    let total: usize = lengths.iter().sum();
    let padding = 1.0 - total as f64 / (batch * max_len) as f64;
    let host = module(&mut rng, e, heads)?;
    let mut m = CudaCausalSelfAttention::upload(&gpu, &host)?;
    let mut offsets = vec![0u32];
    for &l in &lengths {
        offsets.push(offsets.last().unwrap() + l as u32);
    }
    let cu = DeviceSeqlens::upload_u32(&gpu, &offsets)?;
    let x_nested = random_tensor(&gpu, &mut rng, [1, 1, total, e])?;
    let x_dense = random_tensor(&gpu, &mut rng, [1, batch, max_len, e])?;
    let nested_module = time(&gpu, || {
        m.forward_nested(&gpu, &x_nested, &cu, None)?;
        Ok(())
    })?;
    let dense_module = time(&gpu, || {
        m.forward(&gpu, &x_dense)?;
        Ok(())
    })?;
    // The attention call alone: q, k, v as views of one [N, 3E] projection.
    let uniform: Vec<u32> = (0..=batch).map(|b| (b * max_len) as u32).collect();
    let cu_dense = DeviceSeqlens::upload_u32(&gpu, &uniform)?;
    let attention = |rows: usize, cu: &DeviceSeqlens, qkv: &DeviceTensor| -> Res<()> {
        let part = |i: usize| {
            qkv.view(
                [1, heads, rows, d],
                [(rows * 3 * e) as isize, d as isize, (3 * e) as isize, 1],
                i * e,
            )
        };
        gpu.sdpa_varlen(
            &part(0)?,
            &part(1)?,
            &part(2)?,
            Varlen {
                cu_seqlens_q: cu,
                cu_seqlens_k: cu,
            },
            &SdpaOptions::default(),
            BackendSet::ALL,
        )?;
        Ok(())
    };
    let qkv_nested = random_tensor(&gpu, &mut rng, [1, 1, total, 3 * e])?;
    let qkv_dense = random_tensor(&gpu, &mut rng, [1, 1, batch * max_len, 3 * e])?;
    let nested_attn = time(&gpu, || attention(total, &cu, &qkv_nested))?;
    let dense_attn = time(&gpu, || attention(batch * max_len, &cu_dense, &qkv_dense))?;

    // Issue 6: the tutorial's module comparison.
    let (mb, mt) = (32usize, 256usize);
    let x_module = random_tensor(&gpu, &mut rng, [1, mb, mt, e])?;
    let module_us = time(&gpu, || {
        m.forward(&gpu, &x_module)?;
        Ok(())
    })?;

    // Issue 15's training step (forward_train + backward on the device), train mode,
    // the tutorial's dropout 0.1 and none.
    let dout_module = random_tensor(&gpu, &mut rng, [1, mb, mt, e])?;
    let mut step_us = Vec::new();
    for p in [0.0, 0.1] {
        let layers = (host.c_attn().clone(), host.c_proj().clone());
        let mut cpu = CausalSelfAttention::new(layers.0, layers.1, heads, p, true)?;
        cpu.train();
        let mut t = CudaCausalSelfAttention::upload(&gpu, &cpu)?;
        let us = time(&gpu, || {
            let (_, saved) = t.forward_train(&gpu, &x_module)?;
            t.backward(&gpu, &saved, &dout_module)?;
            Ok(())
        })?;
        step_us.push(us);
    }
    println!(
        "training step: B={mb} T={mt} E={e} H={heads} f16: ours {:.1} us, with dropout 0.1 {:.1} us",
        step_us[0], step_us[1]
    );

    // Check that the dense forward output is finite (timings of NaN work are no use).
    let y = m.forward(&gpu, &x_module)?.download::<f16>(&gpu)?;
    let finite = y.iter().all(|v| v.is_finite());

    println!("device: {}", gpu.name());
    println!(
        "nested experiment: B={batch} max_len={max_len} E={e} H={heads} f16 eval, total rows {total}, padding {:.1}%",
        padding * 100.0
    );
    println!("  ours module nested {nested_module:.1} us, dense padded {dense_module:.1} us, speed-up {:.2}x", dense_module / nested_module);
    println!("  ours attention nested {nested_attn:.1} us, dense padded {dense_attn:.1} us, speed-up {:.2}x", dense_attn / nested_attn);
    println!("module comparison: B={mb} T={mt} E={e} H={heads} f16 eval: ours {module_us:.1} us (output finite: {finite})");

    // Profile (the `sdpa profile --device cuda` default setup).
    let mut profiler = Profiler::enabled();
    profile_forward(&gpu, &mut m, &x_module, 25, &mut profiler)?;
    println!("profile, 25 calls:");
    print!("{}", profiler.table());
    if let Some(path) = arg("--trace") {
        std::fs::write(&path, profiler.chrome_trace())?;
        println!("trace: {path} ({} events)", profiler.events().len());
    }

    if let Some(path) = arg("--json") {
        let lengths_json: Vec<String> = lengths.iter().map(|l| l.to_string()).collect();
        let json = format!(
            "{{\"device\":\"{}\",\"lengths\":[{}],\"batch\":{batch},\"max_len\":{max_len},\"embed\":{e},\"heads\":{heads},\"padding\":{padding:.4},\"nested_module_us\":{nested_module:.2},\"dense_module_us\":{dense_module:.2},\"nested_attn_us\":{nested_attn:.2},\"dense_attn_us\":{dense_attn:.2},\"module_batch\":{mb},\"module_seq\":{mt},\"module_us\":{module_us:.2},\"train_step_us\":{:.2},\"train_step_dropout_us\":{:.2},\"finite\":{finite}}}\n",
            gpu.name(),
            lengths_json.join(","),
            step_us[0],
            step_us[1],
        );
        std::fs::write(&path, json)?;
    }
    Ok(())
}
