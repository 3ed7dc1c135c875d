//! CausalSelfAttention against a hand-written composition of its parts, its modes,
//! its dropout stream, weight loading and nested input.

use half::bf16;
use ndarray::{s, Array1, Array2, Array3, Axis};
use sdpa_core::{Causal, SdpaOptions};
use sdpa_harness::case::serialize;
use sdpa_harness::compare::compare_with;
use sdpa_harness::strategies::SplitMix64;
use sdpa_harness::{tolerance, Tensor};
use sdpa_nested::CuSeqlens;
use sdpa_nn::{CausalSelfAttention, Linear};

fn rand2(rng: &mut SplitMix64, r: usize, c: usize, scale: f64) -> Array2<f64> {
    Array2::from_shape_simple_fn((r, c), || rng.symmetric() * scale)
}

fn module(
    e: usize,
    heads: usize,
    bias: bool,
    dropout: f64,
    causal: bool,
    seed: u64,
) -> CausalSelfAttention<f64> {
    let mut rng = SplitMix64(seed);
    let w = 1.0 / (e as f64).sqrt();
    let b = |rng: &mut SplitMix64, n| {
        bias.then(|| Array1::from_shape_simple_fn(n, || rng.symmetric() * w))
    };
    let c_attn = Linear::new(rand2(&mut rng, 3 * e, e, w), b(&mut rng, 3 * e)).unwrap();
    let c_proj = Linear::new(rand2(&mut rng, e, e, w), b(&mut rng, e)).unwrap();
    CausalSelfAttention::new(c_attn, c_proj, heads, dropout, causal).unwrap()
}

/// y = x W^T + b with plain loops.
fn linear(x: &Array2<f64>, w: &Array2<f64>, b: Option<&Array1<f64>>) -> Array2<f64> {
    Array2::from_shape_fn((x.nrows(), w.nrows()), |(r, o)| {
        (0..x.ncols()).map(|i| x[[r, i]] * w[[o, i]]).sum::<f64>() + b.map_or(0.0, |b| b[o])
    })
}

/// The tutorial's forward, spelled out: project, split into heads, attend, merge, project.
fn manual(m: &CausalSelfAttention<f64>, x: &Array3<f64>, causal: bool) -> Array3<f64> {
    let (bsz, t, e) = x.dim();
    let h = m.heads();
    let d = e / h;
    let sd = m.state_dict();
    let w = |n: &str| sd[n].clone().into_dimensionality::<ndarray::Ix2>().unwrap();
    let bias = |n: &str| {
        sd.get(n)
            .map(|a| a.clone().into_dimensionality::<ndarray::Ix1>().unwrap())
    };
    let rows = x.clone().into_shape_with_order((bsz * t, e)).unwrap();
    let qkv = linear(&rows, &w("c_attn.weight"), bias("c_attn.bias").as_ref());
    let split = |i: usize| {
        let part = qkv.slice(s![.., i * e..(i + 1) * e]).to_owned();
        part.into_shape_with_order((bsz, t, h, d))
            .unwrap()
            .permuted_axes([0, 2, 1, 3])
            .as_standard_layout()
            .into_owned()
    };
    let (q, k, v) = (split(0), split(1), split(2));
    let options = SdpaOptions {
        causal: if causal {
            Causal::TopLeft
        } else {
            Causal::None
        },
        ..Default::default()
    };
    let y = sdpa_ref::sdpa(q.view(), k.view(), v.view(), None, &options)
        .unwrap()
        .out;
    let y = y
        .permuted_axes([0, 2, 1, 3])
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((bsz * t, e))
        .unwrap();
    linear(&y, &w("c_proj.weight"), bias("c_proj.bias").as_ref())
        .into_shape_with_order((bsz, t, e))
        .unwrap()
}

fn input(seed: u64, b: usize, t: usize, e: usize) -> Array3<f64> {
    let mut rng = SplitMix64(seed);
    Array3::from_shape_simple_fn((b, t, e), || rng.symmetric())
}

fn assert_close(a: &Array3<f64>, b: &Array3<f64>) {
    let r = compare_with(
        a.view().into_dyn(),
        b.view().into_dyn(),
        Some(&tolerance::F64),
    );
    assert!(r.passes(), "{r}");
}

#[test]
fn eval_is_the_composition_without_causal_or_dropout() {
    for (bias, causal) in [(false, false), (true, true), (true, false)] {
        let mut m = module(32, 4, bias, 0.5, causal, 1);
        m.eval();
        let x = input(2, 3, 11, 32);
        assert_close(&m.forward(x.view()).unwrap(), &manual(&m, &x, false));
    }
}

#[test]
fn training_applies_causal_and_dropout_changes_each_call() {
    let mut m = module(24, 3, true, 0.0, true, 3);
    let x = input(4, 2, 9, 24);
    assert!(m.is_training());
    assert_close(&m.forward(x.view()).unwrap(), &manual(&m, &x, true));

    let mut m = module(24, 3, true, 0.3, true, 3);
    m.seed(77);
    let first = m.forward(x.view()).unwrap();
    let after_one = m.generator();
    // Attention uses ceil(B*H*T*T/4) counters, residual dropout ceil(B*T*E/4).
    assert_eq!(
        after_one.offset,
        (2 * 3 * 9 * 9u64).div_ceil(4) + (2 * 9 * 24u64).div_ceil(4)
    );
    let second = m.forward(x.view()).unwrap();
    assert_ne!(first, second, "two calls draw different dropout bits");
    m.seed(77);
    assert_eq!(
        m.forward(x.view()).unwrap(),
        first,
        "a run replays from its seed"
    );
    // About p of the residual outputs are exactly 0.
    let zeros = first.iter().filter(|v| **v == 0.0).count() as f64 / first.len() as f64;
    assert!((zeros - 0.3).abs() < 0.1, "zero fraction {zeros}");
    m.eval();
    assert_close(&m.forward(x.view()).unwrap(), &manual(&m, &x, false));
}

#[test]
fn weights_load_from_a_state_dict_by_pytorch_names() {
    let m = module(16, 2, true, 0.0, false, 5);
    let sd = m.state_dict();
    let to_f32 = |n: &str| Tensor::F32(sd[n].mapv(|v| v as f32));
    let names = [
        "c_attn.weight",
        "c_attn.bias",
        "c_proj.weight",
        "c_proj.bias",
    ];
    let tensors: Vec<(String, Tensor)> = names.iter().map(|n| (n.to_string(), to_f32(n))).collect();
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let bytes = serialize(&refs, &Default::default());
    let mut loaded = CausalSelfAttention::<f32>::from_safetensors(&bytes, 2, 0.0, false).unwrap();
    loaded.eval();
    let x = input(6, 2, 5, 16);
    let y = loaded.forward(x.mapv(|v| v as f32).view()).unwrap();
    let mut m64 = m.clone();
    m64.eval();
    let want = m64.forward(x.view()).unwrap();
    let r = compare_with(
        y.mapv(f64::from).view().into_dyn(),
        want.view().into_dyn(),
        Some(&tolerance::F32),
    );
    assert!(r.passes(), "{r}");

    // Without biases: fine (PyTorch's bias=False).
    let no_bias: Vec<(String, &Tensor)> = refs
        .iter()
        .filter(|(n, _)| n.ends_with("weight"))
        .cloned()
        .collect();
    assert!(CausalSelfAttention::<f32>::from_safetensors(
        &serialize(&no_bias, &Default::default()),
        2,
        0.0,
        false
    )
    .is_ok());

    let err = |pairs: &[(String, &Tensor)], want: &str| {
        let e = CausalSelfAttention::<f32>::from_safetensors(
            &serialize(pairs, &Default::default()),
            2,
            0.0,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with(want), "{e}");
    };
    err(
        &refs[..2],
        "c_proj.weight: expected a tensor [16, 16], got none",
    );
    err(
        &refs[1..],
        "c_attn.weight: expected a tensor [3E, E], got none",
    );
    let short_bias = Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[15])));
    let mut bad = refs.clone();
    bad[3] = ("c_proj.bias".into(), &short_bias);
    err(&bad, "c_proj.bias: expected shape [16], got [15]");
    let wrong_dtype = Tensor::BF16(sd["c_proj.weight"].mapv(bf16::from_f64));
    let mut bad = refs.clone();
    bad[2] = ("c_proj.weight".into(), &wrong_dtype);
    err(
        &bad,
        "c_proj.weight: expected dtype F32 (the module's), got BF16",
    );
    assert!(
        CausalSelfAttention::<f32>::from_safetensors(&bytes, 3, 0.0, false)
            .unwrap_err()
            .to_string()
            .starts_with("heads: expected a divisor of the embedding dim 16, got 3")
    );
    assert!(
        CausalSelfAttention::<f32>::from_safetensors(b"junk", 2, 0.0, false)
            .unwrap_err()
            .to_string()
            .starts_with("state_dict: expected a safetensors file")
    );
}

#[test]
fn nested_input_equals_each_sequence_alone() {
    let mut m = module(32, 4, true, 0.0, true, 8);
    let lengths = [7usize, 1, 12, 3];
    let cu = CuSeqlens::from_lengths(&lengths);
    let mut rng = SplitMix64(9);
    let packed = Array2::from_shape_simple_fn((cu.total(), 32), || rng.symmetric());
    for training in [true, false] {
        if training {
            m.train()
        } else {
            m.eval()
        }
        let y = m.forward_nested(packed.view(), &cu).unwrap();
        for (b, &len) in lengths.iter().enumerate() {
            let o = cu.offsets()[b];
            let seq = packed
                .slice(s![o..o + len, ..])
                .to_owned()
                .insert_axis(Axis(0));
            let alone = m.forward(seq.view()).unwrap();
            let r = compare_with(
                y.slice(s![o..o + len, ..]).to_owned().into_dyn().view(),
                alone.index_axis(Axis(0), 0).to_owned().into_dyn().view(),
                Some(&tolerance::F64),
            );
            assert!(r.passes(), "training {training}, sequence {b}: {r}");
        }
    }
    assert!(m
        .forward_nested(packed.view(), &CuSeqlens::from_lengths(&[1, 2]))
        .is_err());
    assert!(m
        .forward(Array3::<f64>::zeros((1, 2, 31)).view())
        .unwrap_err()
        .to_string()
        .starts_with("input: expected embedding dim 32"));
}
