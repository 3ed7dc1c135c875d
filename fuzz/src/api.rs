//! `api`: arbitrary shapes, strides, masks and options through `sdpa_ref::sdpa`.
//!
//! Dims are small (0 to 6) and mostly consistent, with an optional override that
//! breaks one dim of one tensor; every tensor is a strided view (see `views`).
//! Properties:
//! - `sdpa` returns `Err` exactly when `Problem::new` does, with the same error, and
//!   the error names one of the call's arguments;
//! - on `Ok`: the output and lse have the problem's shapes; backend selection answers
//!   for every backend and device (math always runs);
//! - where the inputs are finite and bounded (|q|, |k|, |v| <= 1e3, additive mask finite
//!   or `-inf`, |scale| <= 16, p <= 0.95 or p = 1): every output element is finite and
//!   within `max|v| / (1 - p)` (a convex combination of value rows, rescaled by
//!   dropout), the lse is finite or `-inf`, and `-inf` only for a row that is all 0.

use crate::views::ViewSpec;
use arbitrary::{Arbitrary, Unstructured};
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayView4, ArrayViewD, Ix4, IxDyn};
use num_traits::ToPrimitive;
use sdpa_core::{
    check_support, select, Backend, BackendSet, Causal, Device, Dropout, SdpaError, SdpaOptions,
};
use sdpa_harness::strategies::SplitMix64;
use sdpa_ref::{Accum, Element, Mask};

#[derive(Debug, Clone, Copy, Arbitrary)]
enum DTypeChoice {
    F64,
    F32,
    F16,
    BF16,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Special {
    Nan,
    PosInf,
    NegInf,
    /// Finite in f32/f64, infinite in f16.
    Huge,
    /// Subnormal in f32, 0 in f16.
    Tiny,
}

impl Special {
    fn value(self) -> f64 {
        match self {
            Special::Nan => f64::NAN,
            Special::PosInf => f64::INFINITY,
            Special::NegInf => f64::NEG_INFINITY,
            Special::Huge => 1e30,
            Special::Tiny => 1e-40,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum ProbabilityChoice {
    None,
    /// `p = x / 65535`.
    Fraction(u16),
    One,
    /// Anything, NaN and negative included (validation's business).
    Raw(f64),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum ScaleChoice {
    Default,
    /// `x / 2048`, in `[-16, 16)`.
    Bounded(i16),
    Raw(f64),
}

#[derive(Debug, Clone, Arbitrary)]
struct MaskInput {
    additive: bool,
    /// 0 to 4.
    rank: u8,
    /// Per axis (right-aligned to `[B, Hq, L, S]`): 0, 1 full extent; 2 extent 1;
    /// 3 an arbitrary extent `(x / 4) % 7`.
    axes: [u8; 4],
    /// Probability (/256) of a masked-out element (`false` or `-inf`).
    masked: u8,
}

#[derive(Debug, Clone, Arbitrary)]
struct Input {
    dtype: DTypeChoice,
    /// `B, Hkv, group, L, S, E, Ev`.
    dims: [u8; 7],
    /// `(tensor q/k/v, axis, extent)`: overrides one dim, usually making the call invalid.
    wrong_dim: Option<(u8, u8, u8)>,
    views: [ViewSpec; 4],
    mask: Option<MaskInput>,
    causal: u8,
    dropout: ProbabilityChoice,
    seed: u64,
    offset: u64,
    scale: ScaleChoice,
    enable_gqa: bool,
    /// Magnitude choice of q and k, of v, of the additive mask.
    magnitudes: [u8; 3],
    data_seed: u64,
    /// `(tensor q/k/v/mask, flat storage index, value)`.
    specials: Vec<(u8, u16, Special)>,
}

/// Bound on |q|, |k|, |v| (and on the mask / 10) under which outputs must be finite.
const FINITE_BOUND: f64 = 1e3;
const MAGNITUDES: [f64; 3] = [1.0, 30.0, FINITE_BOUND];

fn round<T: Element>(x: f64) -> T {
    T::from_acc(<T::Acc as Accum>::from_f64(x))
}

fn widen<T: Element>(x: T) -> f64 {
    x.to_acc().to_f64().expect("floats widen to f64")
}

/// The argument names `Problem::new` may blame.
const ARGUMENTS: [&str; 7] = [
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "dropout_offset",
    "scale",
];

/// One fuzz input; panics on a violated property.
pub fn run(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    match input.dtype {
        DTypeChoice::F64 => run_typed::<f64>(&input),
        DTypeChoice::F32 => run_typed::<f32>(&input),
        DTypeChoice::F16 => run_typed::<f16>(&input),
        DTypeChoice::BF16 => run_typed::<bf16>(&input),
    }
}

struct Built<T> {
    dims: Vec<usize>,
    storage: ArrayD<T>,
}

fn view4<'a, T>(b: &'a Built<T>, spec: &ViewSpec) -> ArrayView4<'a, T> {
    spec.view(&b.storage, &b.dims)
        .into_dimensionality::<Ix4>()
        .expect("q, k, v are 4-d")
}

fn run_typed<T: Element>(input: &Input) {
    let d = input.dims.map(|x| x as usize);
    let (batch, heads_kv, group) = (d[0] % 4, d[1] % 4, d[2] % 4);
    let (len_q, len_kv, head_dim, head_dim_v) = (d[3] % 7, d[4] % 7, d[5] % 7, d[6] % 7);
    let heads_q = heads_kv * group;
    let mut shapes = [
        [batch, heads_q, len_q, head_dim],
        [batch, heads_kv, len_kv, head_dim],
        [batch, heads_kv, len_kv, head_dim_v],
    ];
    if let Some((tensor, axis, extent)) = input.wrong_dim {
        shapes[tensor as usize % 3][axis as usize % 4] = extent as usize % 7;
    }
    let target = [shapes[0][0], shapes[0][1], shapes[0][2], shapes[1][2]];
    let mask_dims: Option<Vec<usize>> = input.mask.as_ref().map(|m| {
        let rank = m.rank as usize % 5;
        (0..rank)
            .map(|i| {
                let choice = m.axes[i];
                match choice % 4 {
                    0 | 1 => target[4 - rank + i],
                    2 => 1,
                    _ => (choice as usize / 4) % 7,
                }
            })
            .collect()
    });

    let mut rng = SplitMix64(input.data_seed);
    let magnitude = |i: usize| MAGNITUDES[input.magnitudes[i] as usize % 3];
    let mut build =
        |dims: &[usize], view: &ViewSpec, fill: &mut dyn FnMut(&mut SplitMix64) -> f64| {
            let storage = ArrayD::from_shape_simple_fn(IxDyn(&view.storage_shape(dims)), || {
                round::<T>(fill(&mut rng))
            });
            Built {
                dims: dims.to_vec(),
                storage,
            }
        };
    let (qk_mag, v_mag, mask_mag) = (magnitude(0), magnitude(1), 10.0 * magnitude(2));
    let mut tensors = [
        build(&shapes[0], &input.views[0], &mut |r| r.symmetric() * qk_mag),
        build(&shapes[1], &input.views[1], &mut |r| r.symmetric() * qk_mag),
        build(&shapes[2], &input.views[2], &mut |r| r.symmetric() * v_mag),
    ];
    let masked = input.mask.as_ref().map_or(0.0, |m| m.masked as f64 / 256.0);
    let mut additive = mask_dims.as_ref().and_then(|dims| {
        let additive = input.mask.as_ref().is_some_and(|m| m.additive);
        additive.then(|| {
            build(dims, &input.views[3], &mut |r| {
                if r.unit() < masked {
                    f64::NEG_INFINITY
                } else {
                    r.symmetric() * mask_mag
                }
            })
        })
    });
    let bool_mask = mask_dims.as_ref().and_then(|dims| {
        let boolean = input.mask.as_ref().is_some_and(|m| !m.additive);
        boolean.then(|| Built {
            dims: dims.clone(),
            storage: ArrayD::from_shape_simple_fn(
                IxDyn(&input.views[3].storage_shape(dims)),
                || rng.unit() >= masked,
            ),
        })
    });
    for &(tensor, index, special) in &input.specials {
        let target = match tensor % 4 {
            3 => match additive.as_mut() {
                Some(m) => &mut m.storage,
                None => continue,
            },
            t => &mut tensors[t as usize].storage,
        };
        let len = target.len();
        if len > 0 {
            let slot = target
                .iter_mut()
                .nth(index as usize % len)
                .expect("index < len");
            *slot = round::<T>(special.value());
        }
    }

    let q = view4(&tensors[0], &input.views[0]);
    let k = view4(&tensors[1], &input.views[1]);
    let v = view4(&tensors[2], &input.views[2]);
    let mask: Option<Mask<'_, T>> = match (&bool_mask, &additive) {
        (Some(b), _) => Some(Mask::Bool(input.views[3].view(&b.storage, &b.dims))),
        (_, Some(a)) => Some(Mask::Additive(input.views[3].view(&a.storage, &a.dims))),
        _ => None,
    };

    let p = match input.dropout {
        ProbabilityChoice::None => 0.0,
        ProbabilityChoice::Fraction(x) => x as f64 / 65535.0,
        ProbabilityChoice::One => 1.0,
        ProbabilityChoice::Raw(x) => x,
    };
    let scale = match input.scale {
        ScaleChoice::Default => None,
        ScaleChoice::Bounded(x) => Some(x as f64 / 2048.0),
        ScaleChoice::Raw(x) => Some(x),
    };
    let options = SdpaOptions {
        causal: match input.causal % 3 {
            0 => Causal::None,
            1 => Causal::TopLeft,
            _ => Causal::BottomRight,
        },
        dropout: Dropout::new(p, input.seed, input.offset),
        scale,
        enable_gqa: input.enable_gqa,
        ..Default::default()
    };

    let validated = sdpa_ref::problem(&q, &k, &v, mask.as_ref(), &options);
    // Through the facade on the CPU: what a user calls.
    let facade_mask = mask.clone().map(|m| match m {
        Mask::Bool(b) => sdpa::Mask::Bool(b),
        Mask::Additive(a) => sdpa::Mask::Additive(a),
    });
    let result = sdpa::attention(
        sdpa::Tensor::Host(q.view()),
        sdpa::Tensor::Host(k.view()),
        sdpa::Tensor::Host(v.view()),
        facade_mask,
        &options,
        &sdpa::Exec::cpu(),
    )
    .map_err(|e| match e {
        sdpa::Error::Spec(spec) => spec,
        other => panic!("a CPU call of host arrays failed off the spec: {other}"),
    })
    .map(|r| {
        let (out, lse) = r.into_host().expect("host arrays in, host arrays out");
        sdpa_ref::Output { out, lse }
    });
    let (problem, output) = match (validated, result) {
        (Err(want), Err(got)) => {
            assert_eq!(
                got, want,
                "sdpa refused with another error than Problem::new"
            );
            match got {
                SdpaError::InvalidArgument { arg, .. } => {
                    assert!(ARGUMENTS.contains(&arg), "error blames {arg:?}: {got}")
                }
                SdpaError::NoBackend(_) => panic!("validation answered NoBackend: {got}"),
            }
            return;
        }
        (Ok(problem), Ok(output)) => (problem, output),
        (Ok(problem), Err(e)) => panic!("{}: validated, then refused: {e}", problem.summary()),
        (Err(e), Ok(_)) => panic!("refused by validation ({e}) but computed"),
    };
    assert_eq!(output.out.shape(), problem.out_shape(), "out shape");
    assert_eq!(output.lse.shape(), problem.lse_shape(), "lse shape");
    for device in [Device::Cpu, Device::Cuda] {
        for backend in Backend::PRIORITY {
            let _ = check_support(backend, &problem, device);
        }
        select(BackendSet::ALL, &problem, device).expect("math runs anything");
    }

    let bounded = |x: &ArrayViewD<'_, T>, bound: f64| {
        x.iter()
            .all(|&e| widen(e).is_finite() && widen(e).abs() <= bound)
    };
    let mask_ok = match &mask {
        Some(Mask::Additive(m)) => m.iter().all(|&e| {
            widen(e) == f64::NEG_INFINITY
                || (widen(e).is_finite() && widen(e).abs() <= 10.0 * FINITE_BOUND)
        }),
        _ => true,
    };
    let finite_inputs = bounded(&q.view().into_dyn(), FINITE_BOUND)
        && bounded(&k.view().into_dyn(), FINITE_BOUND)
        && bounded(&v.view().into_dyn(), FINITE_BOUND)
        && mask_ok
        && problem.scale.abs() <= 16.0
        && (problem.dropout.p <= 0.95 || problem.dropout.p == 1.0);
    if !finite_inputs {
        return;
    }
    let v_max = v.iter().map(|&e| widen(e).abs()).fold(0.0, f64::max);
    // 1% covers f32 sums of <= 6 weights and the final rounding to bf16 (2^-9); the
    // absolute part, the smallest f16 subnormal, covers outputs rounded to 0-ish.
    let bound = v_max * problem.dropout.keep_scale() * 1.01 + 6e-8;
    for (index, &o) in output.out.indexed_iter() {
        let o = widen(o);
        assert!(
            o.is_finite(),
            "out{index:?} = {o} from finite inputs ({})",
            problem.summary()
        );
        assert!(
            o.abs() <= bound,
            "|out{index:?}| = {} > max|v|/(1-p) = {bound} ({})",
            o.abs(),
            problem.summary()
        );
    }
    for ((b, h, i), &lse) in output.lse.indexed_iter() {
        assert!(
            lse.is_finite() || lse == f32::NEG_INFINITY,
            "lse[{b}, {h}, {i}] = {lse} from finite inputs ({})",
            problem.summary()
        );
        if lse == f32::NEG_INFINITY {
            let row = output.out.slice(ndarray::s![b, h, i, ..]);
            assert!(
                row.iter().all(|&x| widen(x) == 0.0),
                "row [{b}, {h}, {i}] has no key (lse -inf) but out = {row:?}"
            );
        }
    }
}
