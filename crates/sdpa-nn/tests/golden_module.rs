//! Module goldens: the tutorial's `CausalSelfAttention` computed by libtorch 2.11 with
//! random weights saved under the state_dict names, replayed through
//! [`CausalSelfAttention`] on the CPU and judged by DESIGN.md's tolerance policy
//! (`max|ours - truth| <= 2 * max|libtorch - truth| + floor`, never non-finite where the
//! truth is finite).
//!
//! - `golden/module/`: dense `[B, T, E]` cases from the tch generator (ci/golden.sh,
//!   tools/sdpa-golden/src/module.rs), checked byte for byte in CI: `forward`.
//! - `golden/nested/module_*` (and `golden/nested/cuda/module_*` where a GPU run made
//!   them): libtorch's module on jagged nested tensors (ci/golden_nested.py), packed
//!   `x [total, E]` + `cu_seqlens`: `forward_nested`.
//!
//! Each case loads its weights with `CausalSelfAttention::from_safetensors` from the
//! case file itself (it holds `c_attn.weight`, `c_attn.bias`, `c_proj.weight`,
//! `c_proj.bias`), takes `heads`, `is_causal` and `mode` (train / eval; dropout 0) from
//! the metadata. The f64 truth is also held against the module run in f64 on the same
//! weights and input, widened. A dense case with `dout` also holds libtorch's autograd
//! gradients (`dx`, `c_attn.weight.grad`, ...) and their f64 truths: the module's
//! `forward_train` + `backward` on the CPU is judged against them the same way (the
//! floor at the gradient's magnitude). A malformed file fails naming it; nothing is
//! skipped.

use ndarray::{ArrayD, Ix2, Ix3};
use sdpa_core::DType;
use sdpa_cuda::GpuContext;
use sdpa_harness::case::{read_tensor_file, serialize, TensorFile};
use sdpa_harness::compare::{compare, compare_with};
use sdpa_harness::golden::{checked_case_files, golden_dir};
use sdpa_harness::{tolerance, Tensor};
use sdpa_nested::CuSeqlens;
use sdpa_nn::cuda::CudaCausalSelfAttention;
use sdpa_nn::CausalSelfAttention;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// golden/module holds at least this many dense cases, golden/nested this many nested.
const MIN_DENSE: usize = 12;
const MIN_NESTED: usize = 6;

/// The module case files of `dir` whose names start with `prefix`, checked against the
/// folder's manifest.
fn module_files(dir: &Path, prefix: &str, problems: &mut Vec<String>) -> Vec<PathBuf> {
    checked_case_files(dir, prefix, problems)
        .into_iter()
        .map(|f| dir.join(f))
        .collect()
}

/// What the metadata says about the module.
struct Config {
    heads: usize,
    is_causal: bool,
    training: bool,
}

fn config(file: &TensorFile) -> Result<Config, String> {
    let get = |k: &str| {
        file.metadata
            .get(k)
            .map(String::as_str)
            .ok_or(format!("metadata: no {k}"))
    };
    let heads = get("heads")?.parse().map_err(|_| {
        format!(
            "metadata heads: expected an integer, got {:?}",
            get("heads")
        )
    })?;
    let is_causal = match get("is_causal")? {
        "true" => true,
        "false" => false,
        other => {
            return Err(format!(
                "metadata is_causal: expected true or false, got {other:?}"
            ))
        }
    };
    let training = match get("mode")? {
        "train" => true,
        "eval" => false,
        other => {
            return Err(format!(
                "metadata mode: expected train or eval, got {other:?}"
            ))
        }
    };
    if get("dropout")? != "0" {
        return Err(format!(
            "metadata dropout: expected 0 (deterministic goldens), got {:?}",
            get("dropout")
        ));
    }
    Ok(Config {
        heads,
        is_causal,
        training,
    })
}

/// `x` and, for nested cases, `cu_seqlens`.
enum Input {
    Dense,
    Nested(CuSeqlens),
}

fn input(file: &TensorFile, x: &Tensor) -> Result<Input, String> {
    match (x.shape().len(), file.integers.get("cu_seqlens")) {
        (3, None) => Ok(Input::Dense),
        (2, Some(a)) => {
            let as_i32: Vec<i32> = a
                .iter()
                .map(|&v| i32::try_from(v).map_err(|_| format!("cu_seqlens: {v} out of range")))
                .collect::<Result<_, _>>()?;
            if a.ndim() != 1 {
                return Err(format!("cu_seqlens: expected 1-d, got {:?}", a.shape()));
            }
            let cu = CuSeqlens::from_i32(&as_i32).map_err(|e| format!("cu_seqlens: {e}"))?;
            if cu.total() != x.shape()[0] {
                return Err(format!(
                    "cu_seqlens: last offset {}, x has {} rows",
                    cu.total(),
                    x.shape()[0]
                ));
            }
            Ok(Input::Nested(cu))
        }
        (rank, cu) => Err(format!(
            "x: expected [B, T, E] without cu_seqlens or [total, E] with, got rank {rank} {} cu_seqlens",
            if cu.is_some() { "with" } else { "without" }
        )),
    }
}

/// The module built from `weights` (safetensors bytes) in `T`, run on `x`, as f64.
fn forward_typed<T: sdpa_ref::Element + sdpa_cuda::DeviceElement>(
    weights: &[u8],
    cfg: &Config,
    x: ArrayD<T>,
    input: &Input,
    widen: fn(&T) -> f64,
    gpu: Option<&GpuContext>,
) -> Result<ArrayD<f64>, String> {
    let mut m = CausalSelfAttention::<T>::from_safetensors(weights, cfg.heads, 0.0, cfg.is_causal)
        .map_err(|e| format!("from_safetensors: {e}"))?;
    if cfg.training {
        m.train();
    } else {
        m.eval();
    }
    if let Some(gpu) = gpu {
        // The same module on the device: weights uploaded once, mode and stream copied.
        let mut dm =
            CudaCausalSelfAttention::upload(gpu, &m).map_err(|e| format!("upload: {e}"))?;
        let out = match input {
            Input::Dense => {
                let x = x.into_dimensionality::<Ix3>().expect("checked 3-d");
                dm.forward_host(gpu, x.view()).map(|y| y.into_dyn())
            }
            Input::Nested(cu) => {
                let x = x.into_dimensionality::<Ix2>().expect("checked 2-d");
                dm.forward_nested_host(gpu, x.view(), cu)
                    .map(|y| y.into_dyn())
            }
        }
        .map_err(|e| format!("forward on CUDA: {e}"))?;
        return Ok(out.map(widen));
    }
    let out = match input {
        Input::Dense => {
            let x = x.into_dimensionality::<Ix3>().expect("checked 3-d");
            m.forward(x.view()).map(|y| y.into_dyn())
        }
        Input::Nested(cu) => {
            let x = x.into_dimensionality::<Ix2>().expect("checked 2-d");
            m.forward_nested(x.view(), cu).map(|y| y.into_dyn())
        }
    }
    .map_err(|e| format!("forward: {e}"))?;
    Ok(out.map(widen))
}

fn forward(
    weights: &[u8],
    cfg: &Config,
    x: &Tensor,
    input: &Input,
    gpu: Option<&GpuContext>,
) -> Result<ArrayD<f64>, String> {
    match x {
        Tensor::F64(x) => forward_typed(weights, cfg, x.clone(), input, |v| *v, gpu),
        Tensor::F32(x) => forward_typed(weights, cfg, x.clone(), input, |v| f64::from(*v), gpu),
        Tensor::F16(x) => forward_typed(weights, cfg, x.clone(), input, |v| v.to_f64(), gpu),
        Tensor::BF16(x) => forward_typed(weights, cfg, x.clone(), input, |v| v.to_f64(), gpu),
        Tensor::Bool(_) | Tensor::I32(_) => {
            Err(format!("x: expected a float dtype, got {}", x.dtype_name()))
        }
    }
}

const WEIGHTS: [&str; 4] = [
    "c_attn.weight",
    "c_attn.bias",
    "c_proj.weight",
    "c_proj.bias",
];

/// Checks one case (on `gpu` when given, else the CPU); returns (our error / bound).
fn check(path: &Path, gpu: Option<&GpuContext>) -> Result<f64, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let file = read_tensor_file(&bytes).map_err(|e| e.to_string())?;
    let cfg = config(&file)?;
    let get = |n: &str| file.tensors.get(n).ok_or(format!("no tensor {n}"));
    let x = get("x")?;
    let dtype = x.dtype().ok_or("x: expected a float dtype, got bool")?;
    let input = input(&file, x)?;
    let (out, out_f64) = (get("out")?, get("out_f64")?);
    if out.dtype() != Some(dtype) || out.shape() != x.shape() {
        return Err(format!(
            "tensor out: expected {} {:?}, got {} {:?}",
            dtype.name(),
            x.shape(),
            out.dtype_name(),
            out.shape()
        ));
    }
    if out_f64.dtype() != Some(DType::F64) || out_f64.shape() != x.shape() {
        return Err(format!(
            "tensor out_f64: expected f64 {:?}, got {} {:?}",
            x.shape(),
            out_f64.dtype_name(),
            out_f64.shape()
        ));
    }
    for w in WEIGHTS {
        if get(w)?.dtype() != Some(dtype) {
            return Err(format!("tensor {w}: expected {}", dtype.name()));
        }
    }
    let known = ["x", "out", "out_f64", "dout"];
    let is_grad = |n: &str| {
        GRADS
            .iter()
            .any(|g| n == *g || n.strip_suffix("_f64") == Some(g))
    };
    if let Some(extra) = file
        .tensors
        .keys()
        .find(|n| !known.contains(&n.as_str()) && !WEIGHTS.contains(&n.as_str()) && !is_grad(n))
    {
        return Err(format!("unexpected tensor {extra}"));
    }
    // Dense cases with dout: the backward on the CPU (the CUDA module has no backward of
    // its own; its attention's is tested in the GPU bundle).
    let grad_ratio = match (file.tensors.get("dout"), &input, gpu) {
        (Some(dout), Input::Dense, None) => check_gradients(&file, &bytes, &cfg, x, dout)?,
        (Some(_), Input::Nested(_), _) => {
            return Err("dout in a nested case: not made by the generator".into())
        }
        _ => 0.0,
    };
    let truth = out_f64.to_f64();

    // The truth against the module in f64 on the widened weights and input.
    let wide: Vec<(String, Tensor)> = WEIGHTS
        .iter()
        .map(|&w| Ok((w.to_owned(), Tensor::F64(get(w)?.to_f64()))))
        .collect::<Result<_, String>>()?;
    let wide_refs: Vec<(String, &Tensor)> = wide.iter().map(|(n, t)| (n.clone(), t)).collect();
    let wide_bytes = serialize(&wide_refs, &BTreeMap::new());
    let ours_f64 = forward(&wide_bytes, &cfg, &Tensor::F64(x.to_f64()), &input, None)?;
    let r = compare_with(ours_f64.view(), truth.view(), Some(&tolerance::F64));
    if !r.passes() {
        return Err(format!(
            "libtorch's f64 truth and the module in f64 disagree: {r}"
        ));
    }

    let ours = forward(&bytes, &cfg, x, &input, gpu)?;
    let torch = compare(out.to_f64().view(), truth.view());
    if torch.max_abs.is_finite() {
        let bound = tolerance::peer_bound(dtype, torch.max_abs);
        let r = compare(ours.view(), truth.view());
        if !r.passes() || r.max_abs > bound {
            return Err(format!(
                "FAIL: ours {r}; libtorch max abs err {:.3e}, bound {bound:.3e}",
                torch.max_abs
            ));
        }
        Ok((r.max_abs / bound).max(grad_ratio))
    } else {
        let r = compare_with(
            ours.view(),
            truth.view(),
            Some(&tolerance::for_dtype(dtype)),
        );
        if !r.passes() {
            return Err(format!("FAIL (preset, libtorch non-finite): ours {r}"));
        }
        Ok(0.0)
    }
}

/// The gradients libtorch's autograd stored, in order: the incoming `dout`'s effect on
/// `x` and on each weight.
const GRADS: [&str; 5] = [
    "dx",
    "c_attn.weight.grad",
    "c_attn.bias.grad",
    "c_proj.weight.grad",
    "c_proj.bias.grad",
];

/// The module in `T` built from `weights`, its training forward on `x` and backward for
/// `dout`: the gradients of [`GRADS`], widened.
fn gradients_typed<T: sdpa_ref::Element>(
    weights: &[u8],
    cfg: &Config,
    x: ArrayD<T>,
    dout: ArrayD<T>,
    widen: fn(&T) -> f64,
) -> Result<Vec<ArrayD<f64>>, String> {
    let mut m = CausalSelfAttention::<T>::from_safetensors(weights, cfg.heads, 0.0, cfg.is_causal)
        .map_err(|e| format!("from_safetensors: {e}"))?;
    if cfg.training {
        m.train();
    } else {
        m.eval();
    }
    let x = x
        .into_dimensionality::<Ix3>()
        .map_err(|e| format!("x: {e}"))?;
    let dout = dout
        .into_dimensionality::<Ix3>()
        .map_err(|e| format!("dout: {e}"))?;
    let (_, saved) = m
        .forward_train(x.view())
        .map_err(|e| format!("forward_train: {e}"))?;
    let g = m
        .backward(&saved, dout.view())
        .map_err(|e| format!("backward: {e}"))?;
    let bias = |b: Option<ndarray::Array1<T>>, name: &str| {
        b.map(|b| b.into_dyn().map(widen))
            .ok_or(format!("{name}: no gradient (the layer has a bias)"))
    };
    Ok(vec![
        g.dx.into_dyn().map(widen),
        g.c_attn.0.into_dyn().map(widen),
        bias(g.c_attn.1, "c_attn.bias")?,
        g.c_proj.0.into_dyn().map(widen),
        bias(g.c_proj.1, "c_proj.bias")?,
    ])
}

fn gradients(
    weights: &[u8],
    cfg: &Config,
    x: &Tensor,
    dout: &Tensor,
) -> Result<Vec<ArrayD<f64>>, String> {
    match (x, dout) {
        (Tensor::F64(x), Tensor::F64(d)) => {
            gradients_typed(weights, cfg, x.clone(), d.clone(), |v| *v)
        }
        (Tensor::F32(x), Tensor::F32(d)) => {
            gradients_typed(weights, cfg, x.clone(), d.clone(), |v| f64::from(*v))
        }
        (Tensor::F16(x), Tensor::F16(d)) => {
            gradients_typed(weights, cfg, x.clone(), d.clone(), |v| v.to_f64())
        }
        (Tensor::BF16(x), Tensor::BF16(d)) => {
            gradients_typed(weights, cfg, x.clone(), d.clone(), |v| v.to_f64())
        }
        _ => Err(format!(
            "dout: expected the dtype of x ({}), got {}",
            x.dtype_name(),
            dout.dtype_name()
        )),
    }
}

/// Every stored gradient against its f64 truth: ours within `2 * max|libtorch - truth|`
/// plus the dtype's floor at the gradient's magnitude (`max(1, max|truth|)`: weight
/// gradients sum over B*T rows, FlashAttention 3's floor), and the module in f64 within
/// 1e-10 of the truth at that magnitude. Returns the largest error / bound.
fn check_gradients(
    file: &TensorFile,
    bytes: &[u8],
    cfg: &Config,
    x: &Tensor,
    dout: &Tensor,
) -> Result<f64, String> {
    let dtype = x.dtype().ok_or("x: a float dtype")?;
    if dout.shape() != x.shape() || dout.dtype() != Some(dtype) {
        return Err(format!(
            "tensor dout: expected {} {:?}, got {} {:?}",
            dtype.name(),
            x.shape(),
            dout.dtype_name(),
            dout.shape()
        ));
    }
    let ours = gradients(bytes, cfg, x, dout)?;
    let wide: Vec<(String, Tensor)> = WEIGHTS
        .iter()
        .map(|&w| {
            Ok((
                w.to_owned(),
                Tensor::F64(
                    file.tensors
                        .get(w)
                        .ok_or(format!("no tensor {w}"))?
                        .to_f64(),
                ),
            ))
        })
        .collect::<Result<_, String>>()?;
    let wide_refs: Vec<(String, &Tensor)> = wide.iter().map(|(n, t)| (n.clone(), t)).collect();
    let wide_bytes = serialize(&wide_refs, &BTreeMap::new());
    let ours_f64 = gradients(
        &wide_bytes,
        cfg,
        &Tensor::F64(x.to_f64()),
        &Tensor::F64(dout.to_f64()),
    )?;
    let mut worst = 0.0f64;
    for (i, name) in GRADS.iter().enumerate() {
        let get = |n: &str| file.tensors.get(n).ok_or(format!("no tensor {n}"));
        let (torch, truth) = (get(name)?, get(&format!("{name}_f64"))?);
        if torch.dtype() != Some(dtype)
            || truth.dtype() != Some(DType::F64)
            || torch.shape() != truth.shape()
        {
            return Err(format!(
                "{name}: libtorch's {} {:?} and truth {} {:?}",
                torch.dtype_name(),
                torch.shape(),
                truth.dtype_name(),
                truth.shape()
            ));
        }
        let truth = truth.to_f64();
        if ours[i].shape() != truth.shape() {
            return Err(format!(
                "{name}: ours {:?}, truth {:?}",
                ours[i].shape(),
                truth.shape()
            ));
        }
        let magnitude = truth.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let r64 = compare(ours_f64[i].view(), truth.view());
        if r64.non_finite > 0 || r64.max_abs > 1e-10 * magnitude {
            return Err(format!(
                "{name}: the module in f64 and libtorch's f64 truth disagree: {r64}"
            ));
        }
        let torch_err = compare(torch.to_f64().view(), truth.view()).max_abs;
        let bound = tolerance::PEER_FACTOR * torch_err + tolerance::peer_floor(dtype) * magnitude;
        let r = compare(ours[i].view(), truth.view());
        if r.non_finite > 0 || r.max_abs.is_nan() || r.max_abs > bound {
            return Err(format!(
                "FAIL {name}: ours {r}; libtorch max abs err {torch_err:.3e}, bound {bound:.3e}"
            ));
        }
        worst = worst.max(r.max_abs / bound);
    }
    Ok(worst)
}

fn check_all(
    files: &[PathBuf],
    problems: &mut Vec<String>,
    gpu: Option<&GpuContext>,
) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for path in files {
        match check(path, gpu) {
            Ok(ratio) if ratio > worst.0 => worst = (ratio, path.display().to_string()),
            Ok(_) => {}
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    worst
}

fn run_module_goldens(gpu: Option<&GpuContext>) {
    let root = golden_dir();
    let mut problems = Vec::new();
    let dense = module_files(&root.join("module"), "module_", &mut problems);
    let mut nested = module_files(&root.join("nested"), "module_", &mut problems);
    // golden/nested/cuda/ exists where a GPU run of ci/gpu_goldens.sh made it.
    if root.join("nested/cuda").is_dir() {
        nested.extend(module_files(
            &root.join("nested/cuda"),
            "module_",
            &mut problems,
        ));
    }
    assert!(
        dense.len() >= MIN_DENSE && nested.len() >= MIN_NESTED,
        "{} dense module cases (at least {MIN_DENSE}) and {} nested (at least {MIN_NESTED}); {problems:?}",
        dense.len(),
        nested.len()
    );
    let worst_dense = check_all(&dense, &mut problems, gpu);
    let worst_nested = check_all(&nested, &mut problems, gpu);
    println!(
        "module goldens on {}: {} dense, {} nested; closest to its bound: {} at {:.2}, {} at {:.2}",
        gpu.map_or("the CPU".to_string(), |g| g.name().to_string()),
        dense.len(),
        nested.len(),
        worst_dense.1,
        worst_dense.0,
        worst_nested.1,
        worst_nested.0
    );
    assert!(
        problems.is_empty(),
        "{} module golden problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn module_goldens_pass_on_the_cpu() {
    run_module_goldens(None);
}

/// The same cases through the CUDA module (cuBLAS projections, fused attention on
/// strided views), in the GPU bundle.
#[test]
#[ignore = "needs a CUDA device"]
fn module_goldens_pass_on_cuda() {
    run_module_goldens(Some(sdpa_harness::gpu::gpu()));
}
