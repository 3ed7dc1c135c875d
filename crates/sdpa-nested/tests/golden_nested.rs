//! Nested goldens (`golden/nested/`, and `golden/nested/cuda/` where a GPU run made it):
//! libtorch 2.11's jagged nested tensors through `scaled_dot_product_attention`
//! (ci/golden_nested.py), each case replayed through [`sdpa_nested`] on the CPU and
//! judged by DESIGN.md's tolerance policy: `max|ours - truth| <= 2 * max|libtorch -
//! truth| + floor` (`tolerance::peer_bound`), truth being the per-sequence f64 math
//! result; never non-finite where the truth is finite.
//!
//! The f64 truth is itself held against `sdpa_nested` run on the inputs widened to f64
//! (two f64 computations of one function agree to rounding), so a wrong truth cannot
//! pass by moving libtorch's error and ours alike.
//!
//! Malformed files fail naming the file: a tensor missing or of the wrong shape or
//! dtype, offsets that do not add up, a file not in the manifest or a manifest entry
//! with no file. The `module_*` files of the folder are the nested module cases, which
//! crates/sdpa-nn/tests/golden_module.rs checks.

use ndarray::{Array3, ArrayD, Ix3};
use sdpa_core::{DType, SdpaOptions};
use sdpa_harness::case::{parse_options, read_tensor_file, TensorFile};
use sdpa_harness::compare::{compare, compare_with};
use sdpa_harness::golden::checked_case_files;
use sdpa_harness::{tolerance, Tensor};
use sdpa_nested::{sdpa_nested, CuSeqlens, Nested};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// golden/nested holds at least this many SDPA cases (ci/golden_nested.py --device cpu).
const MIN_CPU_CASES: usize = 10;

fn nested_dir() -> PathBuf {
    match std::env::var_os("SDPA_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir).join("nested"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden/nested"),
    }
}

/// The case files of `dir` (not descending), checked one to one against its manifest.
fn case_files(dir: &Path, problems: &mut Vec<String>) -> Vec<String> {
    checked_case_files(dir, "", problems)
}

fn tensor<'a>(file: &'a TensorFile, name: &str) -> Result<&'a Tensor, String> {
    file.tensors.get(name).ok_or(format!("no tensor {name}"))
}

fn offsets(file: &TensorFile, name: &str, total: usize) -> Result<CuSeqlens, String> {
    let a = file
        .integers
        .get(name)
        .ok_or(format!("no integer tensor {name}"))?;
    if a.ndim() != 1 || a.is_empty() {
        return Err(format!("{name}: expected 1-d [B + 1], got {:?}", a.shape()));
    }
    let as_i32: Vec<i32> = a
        .iter()
        .map(|&x| i32::try_from(x).map_err(|_| format!("{name}: offset {x} out of i32 range")))
        .collect::<Result<_, _>>()?;
    let cu = CuSeqlens::from_i32(&as_i32).map_err(|e| format!("{name}: {e}"))?;
    if cu.total() != total {
        return Err(format!(
            "{name}: last offset {} but the packed tensor has {total} rows",
            cu.total()
        ));
    }
    Ok(cu)
}

fn three_d(name: &str, t: &Tensor, dtype: DType) -> Result<[usize; 3], String> {
    match (t.dtype(), t.shape()) {
        (Some(d), &[a, b, c]) if d == dtype => Ok([a, b, c]),
        _ => Err(format!(
            "tensor {name}: expected {} [total, H, dim], got {} {:?}",
            dtype.name(),
            t.dtype_name(),
            t.shape()
        )),
    }
}

/// `sdpa_nested` on the case's tensors in element type `T`, as f64.
fn run_typed<T: sdpa::Elem>(
    q: ArrayD<T>,
    k: ArrayD<T>,
    v: ArrayD<T>,
    cu_q: &CuSeqlens,
    cu_kv: &CuSeqlens,
    options: &SdpaOptions,
    widen: fn(&T) -> f64,
) -> Result<Array3<f64>, String> {
    let three = |a: ArrayD<T>| a.into_dimensionality::<Ix3>().expect("checked 3-d");
    let nq = Nested::new(three(q), cu_q.clone()).map_err(|e| format!("q: {e}"))?;
    let nk = Nested::new(three(k), cu_kv.clone()).map_err(|e| format!("k: {e}"))?;
    let nv = Nested::new(three(v), cu_kv.clone()).map_err(|e| format!("v: {e}"))?;
    let r = sdpa_nested(&nq, &nk, &nv, options).map_err(|e| format!("sdpa_nested: {e}"))?;
    Ok(r.out.values().map(widen))
}

fn run(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_q: &CuSeqlens,
    cu_kv: &CuSeqlens,
    options: &SdpaOptions,
) -> Result<Array3<f64>, String> {
    match (q, k, v) {
        (Tensor::F64(q), Tensor::F64(k), Tensor::F64(v)) => {
            run_typed(q.clone(), k.clone(), v.clone(), cu_q, cu_kv, options, |x| {
                *x
            })
        }
        (Tensor::F32(q), Tensor::F32(k), Tensor::F32(v)) => {
            run_typed(q.clone(), k.clone(), v.clone(), cu_q, cu_kv, options, |x| {
                f64::from(*x)
            })
        }
        (Tensor::F16(q), Tensor::F16(k), Tensor::F16(v)) => {
            run_typed(q.clone(), k.clone(), v.clone(), cu_q, cu_kv, options, |x| {
                x.to_f64()
            })
        }
        (Tensor::BF16(q), Tensor::BF16(k), Tensor::BF16(v)) => {
            run_typed(q.clone(), k.clone(), v.clone(), cu_q, cu_kv, options, |x| {
                x.to_f64()
            })
        }
        _ => Err(format!(
            "q, k, v: expected one float dtype, got {}, {}, {}",
            q.dtype_name(),
            k.dtype_name(),
            v.dtype_name()
        )),
    }
}

/// Checks one case file; returns (our error / bound) on success.
fn check(path: &Path) -> Result<f64, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let file = read_tensor_file(&bytes).map_err(|e| e.to_string())?;
    let q = tensor(&file, "q")?;
    let dtype = q
        .dtype()
        .ok_or("tensor q: expected a float dtype, got bool")?;
    let [total_q, hq, e] = three_d("q", q, dtype)?;
    let k = tensor(&file, "k")?;
    let v = tensor(&file, "v")?;
    let [total_kv, hkv, ek] = three_d("k", k, dtype)?;
    let [total_v, hv, ev] = three_d("v", v, dtype)?;
    if ek != e || total_v != total_kv || hv != hkv {
        return Err(format!(
            "k {:?} / v {:?} do not fit q {:?}",
            k.shape(),
            v.shape(),
            q.shape()
        ));
    }
    let out = tensor(&file, "out")?;
    let out_f64 = tensor(&file, "out_f64")?;
    if three_d("out", out, dtype)? != [total_q, hq, ev] {
        return Err(format!(
            "tensor out: expected [{total_q}, {hq}, {ev}], got {:?}",
            out.shape()
        ));
    }
    if three_d("out_f64", out_f64, DType::F64)? != [total_q, hq, ev] {
        return Err(format!(
            "tensor out_f64: expected [{total_q}, {hq}, {ev}], got {:?}",
            out_f64.shape()
        ));
    }
    let cu_q = offsets(&file, "cu_seqlens_q", total_q)?;
    let cu_kv = offsets(&file, "cu_seqlens_kv", total_kv)?;
    if cu_q.batch() != cu_kv.batch() {
        return Err(format!(
            "cu_seqlens_q has {} sequences, cu_seqlens_kv {}",
            cu_q.batch(),
            cu_kv.batch()
        ));
    }
    let known = ["q", "k", "v", "out", "out_f64"];
    if let Some(extra) = file.tensors.keys().find(|n| !known.contains(&n.as_str())) {
        return Err(format!("unexpected tensor {extra}"));
    }
    let meta: HashMap<String, String> = file.metadata.clone().into_iter().collect();
    let options = parse_options(&meta).map_err(|e| e.to_string())?;
    let truth = out_f64.to_f64();

    // The truth against our f64 computation on the same (widened) inputs.
    let widen = |t: &Tensor| Tensor::F64(t.to_f64());
    let ours_f64 = run(&widen(q), &widen(k), &widen(v), &cu_q, &cu_kv, &options)?;
    let r = compare_with(
        ours_f64.view().into_dyn(),
        truth.view(),
        Some(&tolerance::F64),
    );
    if !r.passes() {
        return Err(format!(
            "libtorch's f64 truth and sdpa_nested in f64 disagree: {r}"
        ));
    }

    let ours = run(q, k, v, &cu_q, &cu_kv, &options)?;
    let torch = compare(out.to_f64().view(), truth.view());
    if torch.max_abs.is_finite() {
        let bound = tolerance::peer_bound(dtype, torch.max_abs);
        let r = compare(ours.view().into_dyn(), truth.view());
        if !r.passes() || r.max_abs > bound {
            return Err(format!(
                "FAIL: ours {r}; libtorch ({}) max abs err {:.3e}, bound {bound:.3e}",
                meta.get("torch_backend").map_or("?", String::as_str),
                torch.max_abs
            ));
        }
        Ok(r.max_abs / bound)
    } else {
        // libtorch non-finite where the truth is finite bounds nothing: the preset.
        let preset = tolerance::for_dtype(dtype);
        let r = compare_with(ours.view().into_dyn(), truth.view(), Some(&preset));
        if !r.passes() {
            return Err(format!("FAIL (preset, libtorch non-finite): ours {r}"));
        }
        Ok(0.0)
    }
}

#[test]
fn nested_goldens_pass_on_the_cpu() {
    let base = nested_dir();
    assert!(
        base.is_dir(),
        "{}: missing (python3 ci/golden_nested.py writes it)",
        base.display()
    );
    let mut problems = Vec::new();
    let mut dirs = vec![base.clone()];
    // golden/nested/cuda/ exists where a GPU run of ci/gpu_goldens.sh made it.
    if base.join("cuda").is_dir() {
        dirs.push(base.join("cuda"));
    }
    let mut checked = 0usize;
    let mut cpu_cases = 0usize;
    let mut worst = (0.0f64, String::new());
    for dir in &dirs {
        for f in case_files(dir, &mut problems) {
            if f.starts_with("module_") {
                continue;
            }
            checked += 1;
            if *dir == base {
                cpu_cases += 1;
            }
            match check(&dir.join(&f)) {
                Ok(ratio) if ratio > worst.0 => worst = (ratio, f),
                Ok(_) => {}
                Err(e) => problems.push(format!("{}/{f}: {e}", dir.display())),
            }
        }
    }
    assert!(
        cpu_cases >= MIN_CPU_CASES,
        "golden/nested holds {cpu_cases} SDPA cases, fewer than {MIN_CPU_CASES}"
    );
    println!(
        "nested goldens: {checked} cases in {} folder(s); closest to its bound: {} at {:.2} of it",
        dirs.len(),
        worst.1,
        worst.0
    );
    assert!(
        problems.is_empty(),
        "{} nested golden problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
