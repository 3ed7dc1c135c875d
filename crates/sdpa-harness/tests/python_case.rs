//! A case file written by Python's safetensors (the serializer behind
//! `safetensors.torch.save_file`), read and replayed: see tests/data/make_python_case.py.

use half::f16;
use ndarray::ArrayD;
use sdpa_core::{Causal, Dropout, SdpaOptions};
use sdpa_harness::case::Case;
use sdpa_harness::{run, Tensor};

fn formula(shape: &[usize], salt: f64) -> ArrayD<f64> {
    let mut i = 0.0;
    ArrayD::from_shape_simple_fn(shape, || {
        let v = (i * 0.37 + salt).sin();
        i += 1.0;
        v
    })
}

#[test]
fn a_file_written_by_python_replays() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/python_written.safetensors"
    );
    let case = Case::read(path).unwrap();
    assert_eq!(
        case.options,
        SdpaOptions {
            causal: Causal::BottomRight,
            dropout: Dropout::new(0.25, 1234, 8),
            scale: Some(-0.3),
            enable_gqa: true,
            ..Default::default()
        }
    );
    assert_eq!(case.name(), Some("python_written"));
    for (tensor, shape, salt) in [
        (&case.q, [2, 4, 5, 8], 0.0),
        (&case.k, [2, 2, 7, 8], 1.0),
        (&case.v, [2, 2, 7, 3], 2.0),
    ] {
        let Tensor::F64(values) = tensor else {
            panic!("f64 expected")
        };
        // numpy's sin and Rust's may differ in the last bit; the layout may not.
        let want = formula(&shape, salt);
        assert_eq!(values.shape(), want.shape());
        assert!(values
            .iter()
            .zip(want.iter())
            .all(|(a, b)| (a - b).abs() <= 1e-15));
    }
    let Some(Tensor::Bool(mask)) = &case.attn_mask else {
        panic!("bool mask expected")
    };
    assert_eq!(mask.shape(), &[1, 1, 5, 7]);
    assert!(mask
        .indexed_iter()
        .all(|(ix, &m)| m == ((ix[2] * 7 + ix[3]) % 3 != 0)));
    let Some(Tensor::F16(q16)) = case.result("q16") else {
        panic!("q16 expected")
    };
    assert_eq!(q16, &case.q.to_f64().mapv(f16::from_f64));

    let got = run::run_reference(&case).unwrap();
    assert_eq!(got.out.shape(), &[2, 4, 5, 3]);
    assert!(got.out.to_f64().iter().all(|x| x.is_finite()));
    // Bottom-right with L = 5 < S = 7 leaves every query at least 3 keys, the mask
    // drops a third of them, dropout a quarter: no row is fully masked here.
    assert!(got.lse.iter().all(|x| x.is_finite()));
}

/// A plain case file's `alibi_slopes` (f32 `[Hq]` or `[B, Hq]`) reaches the call: the
/// replay equals the reference's ALiBi forward and backward, through a file round trip;
/// slopes of another dtype or shape are refused by name.
#[test]
fn alibi_slopes_in_a_plain_case_replay_forward_and_backward() {
    use sdpa_core::Window;
    let q = formula(&[1, 2, 6, 4], 0.5);
    let k = formula(&[1, 2, 9, 4], 1.5);
    let v = formula(&[1, 2, 9, 3], 2.5);
    let options = SdpaOptions {
        window: Window { left: 3, right: 1 },
        softcap: Some(2.0),
        ..Default::default()
    };
    let mut case = Case::new(
        Tensor::F64(q.clone()),
        Tensor::F64(k.clone()),
        Tensor::F64(v.clone()),
        None,
        options,
    );
    let slopes = ndarray::arr1(&[0.5f32, 0.125]).into_dyn();
    case.results
        .insert("alibi_slopes".into(), Tensor::F32(slopes.clone()));
    case.results
        .insert("dout".into(), Tensor::F64(formula(&[1, 2, 6, 3], 3.5)));
    let case = Case::from_bytes(&case.to_bytes().unwrap()).unwrap();
    let got = run::run_reference(&case).unwrap();
    let d4 = |a: &ArrayD<f64>| a.clone().into_dimensionality::<ndarray::Ix4>().unwrap();
    let (q4, k4, v4) = (d4(&q), d4(&k), d4(&v));
    let want = sdpa_ref::sdpa_with_alibi(
        q4.view(),
        k4.view(),
        v4.view(),
        None,
        slopes.view(),
        &options,
    )
    .unwrap();
    assert_eq!(got.out.to_f64(), want.out.clone().into_dyn());
    let plain = sdpa_ref::sdpa(q4.view(), k4.view(), v4.view(), None, &options).unwrap();
    assert_ne!(
        got.out.to_f64(),
        plain.out.into_dyn(),
        "the slopes must act"
    );
    let g = run::run_backward(&case, &sdpa::Exec::cpu()).unwrap();
    let want_g = sdpa_ref::bwd::sdpa_backward_with_alibi(
        q4.view(),
        k4.view(),
        v4.view(),
        want.out.view(),
        want.lse.view(),
        d4(&formula(&[1, 2, 6, 3], 3.5)).view(),
        None,
        slopes.view(),
        &options,
    )
    .unwrap();
    assert_eq!(g.dq.to_f64(), want_g.dq.into_dyn());
    let mut bad = case.clone();
    bad.results.insert(
        "alibi_slopes".into(),
        Tensor::F64(ndarray::arr1(&[0.5, 0.125]).into_dyn()),
    );
    let e = run::run_reference(&bad).unwrap_err().to_string();
    assert!(e.contains("alibi_slopes"), "{e}");
    let mut bad = case;
    bad.results.insert(
        "alibi_slopes".into(),
        Tensor::F32(ndarray::arr1(&[0.5f32, 0.125, 1.0]).into_dyn()),
    );
    let e = run::run_reference(&bad).unwrap_err().to_string();
    assert!(e.contains("alibi_slopes"), "{e}");
}
