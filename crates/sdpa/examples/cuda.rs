//! The facade on a CUDA device: the same call on host arrays (upload, run, download)
//! and on device tensors (results stay on the device), checked against the CPU
//! reference. `cargo run -p sdpa --example cuda` on a CUDA machine; the GPU bundle runs
//! it as `bin/sdpa-example-cuda`. Exits non-zero on any disagreement.
use half::f16;
use ndarray::Array4;
use sdpa::{
    attention, Backend, BackendSet, Causal, DeviceTensor, Exec, GpuContext, KernelConfig,
    SdpaOptions, Tensor,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = GpuContext::with_config(0, KernelConfig::from_env()?)?;
    println!("device: {} (sm_{})", gpu.name(), gpu.arch());
    let q = Array4::from_shape_fn((2, 8, 97, 64), |(b, h, i, e)| {
        f16::from_f32((((b * 31 + h * 17 + i * 7 + e) % 23) as f32 - 11.0) * 0.05)
    });
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    let host = |x: &Array4<f16>| x.mapv(|v| v.to_f64());
    let truth = attention(
        Tensor::Host(host(&q).view()),
        Tensor::Host(host(&q).view()),
        Tensor::Host(host(&q).view()),
        None,
        &options,
        &Exec::cpu(),
    )?
    .into_host()
    .expect("host in, host out")
    .0;
    for backend in [Backend::Flash, Backend::Efficient, Backend::Math] {
        let exec = Exec::cuda(&gpu).with_backends(BackendSet::only(backend));
        // Host arrays in, host arrays out.
        let (out, _lse) = attention(
            Tensor::Host(q.view()),
            Tensor::Host(q.view()),
            Tensor::Host(q.view()),
            None,
            &options,
            &exec,
        )?
        .into_host()
        .expect("host in, host out");
        // Device tensors in, device tensors out.
        let dq = DeviceTensor::upload(&gpu, q.view())?;
        let r = attention::<f16>(
            Tensor::Cuda(&dq),
            Tensor::Cuda(&dq),
            Tensor::Cuda(&dq),
            None,
            &options,
            &exec,
        )?;
        assert_eq!(r.backend, backend);
        let (dout, _dlse) = r.into_cuda().expect("device in, device out");
        let dout = dout.download::<f16>(&gpu)?;
        let worst = out
            .iter()
            .zip(truth.iter())
            .map(|(a, t)| (a.to_f64() - t).abs())
            .fold(0.0, f64::max);
        println!("{backend}: max |out - f64 reference| = {worst:.2e}");
        if out != dout || worst.is_nan() || worst >= 2e-3 {
            return Err(
                format!("{backend}: host and device paths disagree or error {worst}").into(),
            );
        }
    }
    println!("facade example: ok");
    Ok(())
}
