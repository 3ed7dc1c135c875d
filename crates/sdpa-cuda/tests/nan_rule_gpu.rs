//! The NaN rule (DESIGN.md "NaN and Inf") on every CUDA backend, against the
//! reference: where the reference gives NaN (out or lse) the GPU does, where it gives a
//! finite value the GPU gives a close one. Ignored by default (needs a CUDA device).

use half::f16;
use ndarray::{Array4, ArrayD, IxDyn};
use sdpa_core::{Backend, BackendSet, Causal, Dropout, SdpaOptions};
use sdpa_cuda::HostMask;
use sdpa_harness::gpu::gpu;
use sdpa_ref::{Accum, Element};

const B: usize = 1;
const H: usize = 2;
const L: usize = 37;
const S: usize = 37;
const E: usize = 64;

fn inputs<T: Element + sdpa_cuda::DeviceElement>() -> [Array4<T>; 3] {
    let make = |seed: usize| {
        Array4::from_shape_fn((B, H, L, E), |(b, h, i, e)| {
            let n = ((b * 7 + h * 5 + i * 3 + e + seed) % 17) as f64;
            T::from_acc(<T::Acc as Accum>::from_f64(n / 8.0 - 1.0))
        })
    };
    [make(0), make(3), make(11)]
}

/// Mismatches of one run against the reference, as text.
fn compare<T: Element + sdpa_cuda::DeviceElement>(
    [q, k, v]: &[Array4<T>; 3],
    mask: Option<&ArrayD<bool>>,
    options: &SdpaOptions,
    backend: Backend,
) -> Result<Vec<String>, String> {
    let host_mask = mask.map(|m| HostMask::<T>::Bool(m.view()));
    let got = gpu()
        .sdpa_host(
            q.view(),
            k.view(),
            v.view(),
            host_mask.as_ref(),
            options,
            BackendSet::only(backend),
        )
        .map_err(|e| format!("{e}"))?;
    let want = sdpa_ref::sdpa(
        q.view(),
        k.view(),
        v.view(),
        mask.map(|m| sdpa_ref::Mask::Bool(m.view())),
        options,
    )
    .unwrap();
    let mut bad = Vec::new();
    for ((ix, &g), &w) in got.out.indexed_iter().zip(want.out.iter()) {
        let (g, w) = (g.to_acc().to_f32(), w.to_acc().to_f32());
        let ok = if w.is_nan() {
            g.is_nan()
        } else {
            g.is_finite() && (g - w).abs() <= 2e-2
        };
        if !ok && bad.len() < 6 {
            bad.push(format!("out{ix:?}: gpu {g:?} ref {w:?}"));
        }
    }
    for ((ix, &g), &w) in got.lse.indexed_iter().zip(want.lse.iter()) {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w == f32::NEG_INFINITY {
            g == w
        } else {
            (g - w).abs() <= 2e-2
        };
        if !ok && bad.len() < 12 {
            bad.push(format!("lse{ix:?}: gpu {g:?} ref {w:?}"));
        }
    }
    Ok(bad)
}

fn nan<T: Element>() -> T {
    T::from_acc(<T::Acc as Accum>::from_f64(f64::NAN))
}

/// What a case is, its q, k, v, its bool mask and its options.
type Case<T> = (
    &'static str,
    [Array4<T>; 3],
    Option<ArrayD<bool>>,
    SdpaOptions,
);

fn run_all<T: Element + sdpa_cuda::DeviceElement>(name: &str) -> Vec<String> {
    let causal = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    let dropout = SdpaOptions {
        dropout: Dropout::new(0.3, 5, 0),
        ..Default::default()
    };
    let allowed = ArrayD::from_shape_fn(IxDyn(&[L, S]), |ix| ix[1] != 1 && ix[0] != 0);
    let mut cases: Vec<Case<T>> = Vec::new();
    let clean = inputs::<T>();
    let mut x = clean.clone();
    x[0][[0, 1, 5, 3]] = nan();
    cases.push(("q row NaN", x.clone(), None, Default::default()));
    cases.push(("q row NaN causal", x.clone(), None, causal));
    cases.push(("q row NaN dropout", x, None, dropout));
    let mut x = clean.clone();
    x[1][[0, 0, 20, 3]] = nan();
    cases.push(("k NaN causal (rows < 20 finite)", x.clone(), None, causal));
    cases.push(("k NaN dropout", x, None, dropout));
    let mut x = clean.clone();
    x[2][[0, 0, 20, 3]] = nan();
    cases.push(("v NaN attended", x, None, Default::default()));
    let mut x = clean.clone();
    x[1][[0, 0, 1, 0]] = nan();
    x[0][[0, 1, 0, 0]] = nan();
    cases.push((
        "k NaN bool-masked, q NaN fully masked",
        x,
        Some(allowed.clone()),
        Default::default(),
    ));
    let mut x = clean.clone();
    x[2][[0, 0, 1, 0]] = nan();
    cases.push((
        "v NaN bool-masked (known: tile kernels read it)",
        x,
        Some(allowed),
        Default::default(),
    ));
    let mut x = clean.clone();
    x[2][[0, 0, 30, 0]] = nan();
    cases.push((
        "v NaN causal-masked (known: tile kernels read it)",
        x,
        None,
        causal,
    ));
    let mut report = Vec::new();
    for backend in [Backend::Math, Backend::Flash, Backend::Efficient] {
        for (what, x, mask, options) in &cases {
            match compare(x, mask.as_ref(), options, backend) {
                Ok(bad) if bad.is_empty() => report.push(format!("ok   {name} {backend} {what}")),
                Ok(bad) => report.push(format!("FAIL {name} {backend} {what}: {}", bad.join("; "))),
                Err(e) => report.push(format!("skip {name} {backend} {what}: {e}")),
            }
        }
    }
    report
}

#[test]
#[ignore = "needs a CUDA device"]
fn nan_rule_on_every_backend() {
    let mut report = run_all::<f16>("f16");
    report.extend(run_all::<f32>("f32"));
    for line in &report {
        println!("{line}");
    }
    let failed: Vec<_> = report
        .iter()
        .filter(|l| l.starts_with("FAIL") && !l.contains("known:"))
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
