//! The backward reference against central finite differences of the f64 forward, a
//! closed form, the f64 result for f32/f16/bf16, and the safe-softmax rule.
//!
//! Finite differences: `g ~ (f(x + h) - f(x - h)) / 2h` with `f = sum(out * dout)` and
//! `h = 1e-6` in f64. Truncation error is `h^2 |f'''| / 6 ~ 1e-12`; rounding error is
//! `eps * |f| / h ~ 2.2e-16 * 30 / 1e-6 ~ 1e-8` at worst (|f| <= L * Ev here). So an
//! analytic gradient within `1e-7 * (1 + |g|)` of the difference is right to ~7 digits,
//! and a wrong term (a missing mask, a lost dropout factor, a wrong group sum) is off
//! by O(0.01) or more.

use half::{bf16, f16};
use ndarray::{s, Array4, ArrayD, IxDyn};
use sdpa_core::{Causal, Dropout, SdpaOptions, Window};
use sdpa_ref::{sdpa, sdpa_backward, Accum, Element, Gradients, Mask};

const H: f64 = 1e-6;
const FD_TOL: f64 = 1e-7;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn array(&mut self, shape: [usize; 4]) -> Array4<f64> {
        Array4::from_shape_simple_fn(shape, || self.uniform())
    }
}

#[derive(Clone)]
enum OwnedMask {
    Bool(ArrayD<bool>),
    Additive(ArrayD<f64>),
}

impl OwnedMask {
    fn view(&self) -> Mask<'_, f64> {
        match self {
            OwnedMask::Bool(m) => Mask::Bool(m.view()),
            OwnedMask::Additive(m) => Mask::Additive(m.view()),
        }
    }
}

#[derive(Clone)]
struct Case {
    q: Array4<f64>,
    k: Array4<f64>,
    v: Array4<f64>,
    dout: Array4<f64>,
    mask: Option<OwnedMask>,
    options: SdpaOptions,
}

impl Case {
    /// `[B, Hq, Hkv, L, S, E, Ev]`, random inputs in [-1, 1].
    fn new(rng: &mut Rng, [b, hq, hkv, l, s, e, ev]: [usize; 7], options: SdpaOptions) -> Self {
        Case {
            q: rng.array([b, hq, l, e]),
            k: rng.array([b, hkv, s, e]),
            v: rng.array([b, hkv, s, ev]),
            dout: rng.array([b, hq, l, ev]),
            mask: None,
            options,
        }
    }

    fn with_mask(self, mask: OwnedMask) -> Self {
        Case {
            mask: Some(mask),
            ..self
        }
    }

    fn loss(&self) -> f64 {
        let out = sdpa(
            self.q.view(),
            self.k.view(),
            self.v.view(),
            self.mask.as_ref().map(OwnedMask::view),
            &self.options,
        )
        .unwrap()
        .out;
        (&out * &self.dout).sum()
    }

    fn grads(&self) -> Gradients<f64> {
        let fwd = sdpa(
            self.q.view(),
            self.k.view(),
            self.v.view(),
            self.mask.as_ref().map(OwnedMask::view),
            &self.options,
        )
        .unwrap();
        sdpa_backward(
            self.q.view(),
            self.k.view(),
            self.v.view(),
            fwd.out.view(),
            fwd.lse.view(),
            self.dout.view(),
            self.mask.as_ref().map(OwnedMask::view),
            &self.options,
        )
        .unwrap()
    }
}

/// Exposes one input of a case as a flat, mutable slice.
type Pick = fn(&mut Case) -> &mut [f64];

/// Central difference of `case.loss()` along every element of the (contiguous) input
/// `pick` exposes, in its logical order.
fn finite_difference(case: &Case, pick: Pick) -> Vec<f64> {
    let mut work = case.clone();
    let n = pick(&mut work).len();
    (0..n)
        .map(|index| {
            let x = pick(&mut work)[index];
            if !x.is_finite() {
                return 0.0; // a -inf mask entry: no neighbourhood to differentiate in
            }
            pick(&mut work)[index] = x + H;
            let up = work.loss();
            pick(&mut work)[index] = x - H;
            let down = work.loss();
            pick(&mut work)[index] = x;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Worst `|analytic - fd| / (1 + |fd|)`, after asserting each is within `FD_TOL`.
fn assert_close<'a>(what: &str, got: impl Iterator<Item = &'a f64>, want: &[f64]) -> f64 {
    let mut worst = 0.0f64;
    let mut count = 0;
    for (index, (&g, &w)) in got.zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        assert!(
            err <= FD_TOL,
            "{what}[flat {index}]: analytic {g}, finite difference {w}"
        );
        worst = worst.max(err);
        count += 1;
    }
    assert_eq!(count, want.len(), "{what}: element count");
    worst
}

fn contiguous(x: &mut ArrayD<f64>) -> &mut [f64] {
    x.as_slice_mut().expect("test inputs are contiguous")
}

fn additive(c: &mut Case) -> &mut [f64] {
    match c.mask.as_mut() {
        Some(OwnedMask::Additive(m)) => contiguous(m),
        _ => unreachable!("only called with an additive mask"),
    }
}

/// Checks every gradient of `case` against finite differences; returns the gradients.
fn check_against_fd(name: &str, case: &Case) -> Gradients<f64> {
    let grads = case.grads();
    let inputs: [(&str, &Array4<f64>, Pick); 3] = [
        ("dq", &grads.dq, |c| c.q.as_slice_mut().unwrap()),
        ("dk", &grads.dk, |c| c.k.as_slice_mut().unwrap()),
        ("dv", &grads.dv, |c| c.v.as_slice_mut().unwrap()),
    ];
    let mut worst = 0.0f64;
    for (what, got, pick) in inputs {
        let fd = finite_difference(case, pick);
        worst = worst.max(assert_close(&format!("{name}: {what}"), got.iter(), &fd));
    }
    match &case.mask {
        Some(OwnedMask::Additive(m)) => {
            let dmask = grads
                .dmask
                .as_ref()
                .expect("an additive mask has a gradient");
            assert_eq!(
                dmask.shape(),
                m.shape(),
                "{name}: dmask in the mask's shape"
            );
            let fd = finite_difference(case, additive);
            worst = worst.max(assert_close(&format!("{name}: dmask"), dmask.iter(), &fd));
        }
        _ => assert!(
            grads.dmask.is_none(),
            "{name}: no dmask without an additive mask"
        ),
    }
    eprintln!("{name}: worst relative error {worst:.2e}");
    grads
}

/// dq, dk, dv of ALiBi attention against central differences of its forward.
fn check_alibi_against_fd(case: &Case, slopes: ndarray::ArrayViewD<'_, f32>) {
    let forward = |c: &Case| {
        sdpa_ref::sdpa_with_alibi(
            c.q.view(),
            c.k.view(),
            c.v.view(),
            None,
            slopes.clone(),
            &c.options,
        )
        .unwrap()
    };
    let fwd = forward(case);
    let grads = sdpa_ref::sdpa_backward_with_alibi(
        case.q.view(),
        case.k.view(),
        case.v.view(),
        fwd.out.view(),
        fwd.lse.view(),
        case.dout.view(),
        None,
        slopes.clone(),
        &case.options,
    )
    .unwrap();
    let inputs: [(&str, &Array4<f64>, Pick); 3] = [
        ("dq", &grads.dq, |c| c.q.as_slice_mut().unwrap()),
        ("dk", &grads.dk, |c| c.k.as_slice_mut().unwrap()),
        ("dv", &grads.dv, |c| c.v.as_slice_mut().unwrap()),
    ];
    for (what, got, pick) in inputs {
        let n = {
            let mut c = case.clone();
            pick(&mut c).len()
        };
        let fd: Vec<f64> = (0..n)
            .map(|i| {
                let h = H;
                let mut plus = case.clone();
                pick(&mut plus)[i] += h;
                let mut minus = case.clone();
                pick(&mut minus)[i] -= h;
                let loss = |c: &Case| (&forward(c).out * &c.dout).sum();
                (loss(&plus) - loss(&minus)) / (2.0 * h)
            })
            .collect();
        assert_close(&format!("alibi: {what}"), got.iter(), &fd);
    }
}

fn options(causal: Causal) -> SdpaOptions {
    SdpaOptions {
        causal,
        ..Default::default()
    }
}

#[test]
fn causal_alignments_with_unequal_lengths_match_finite_differences() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for (causal, dims) in [
        (Causal::TopLeft, [2, 2, 2, 5, 7, 3, 4]),
        (Causal::TopLeft, [1, 1, 1, 6, 3, 2, 2]),
        (Causal::BottomRight, [2, 2, 2, 3, 7, 4, 3]),
        // L > S bottom-right: the first L - S rows see no key at all.
        (Causal::BottomRight, [1, 2, 2, 6, 3, 3, 5]),
        (Causal::None, [2, 3, 3, 4, 6, 5, 1]),
    ] {
        let case = Case::new(&mut rng, dims, options(causal));
        check_against_fd(&format!("{causal:?} {dims:?}"), &case);
    }
}

#[test]
fn grouped_and_multi_query_heads_sum_their_group() {
    let mut rng = Rng(11);
    for dims in [[2, 4, 2, 5, 4, 3, 2], [1, 3, 1, 4, 6, 2, 3]] {
        let case = Case::new(
            &mut rng,
            dims,
            SdpaOptions {
                enable_gqa: true,
                causal: Causal::BottomRight,
                ..Default::default()
            },
        );
        check_against_fd(&format!("gqa {dims:?}"), &case);
    }
}

#[test]
fn bool_mask_with_a_fully_masked_row() {
    let mut rng = Rng(12);
    let case = Case::new(&mut rng, [2, 2, 2, 4, 5, 3, 3], options(Causal::None));
    let mut mask = ArrayD::from_shape_fn(IxDyn(&[2, 2, 4, 5]), |_| rng.uniform() > -0.4);
    mask.slice_mut(s![1, 0, 2, ..]).fill(false);
    let case = case.with_mask(OwnedMask::Bool(mask));
    let grads = check_against_fd("bool mask", &case);
    assert!(grads.dq.slice(s![1, 0, 2, ..]).iter().all(|&x| x == 0.0));
}

#[test]
fn additive_masks_get_gradients_in_their_own_broadcast_shape() {
    let mut rng = Rng(13);
    let (b, h, l, s) = (2, 3, 4, 5);
    for (shape, causal) in [
        (vec![b, 1, l, s], Causal::None),
        (vec![l, s], Causal::TopLeft),
        (vec![h, 1, s], Causal::BottomRight),
        (vec![b, h, l, s], Causal::None),
        (vec![], Causal::None),
    ] {
        let case = Case::new(&mut rng, [b, h, h, l, s, 3, 2], options(causal));
        let mut mask = ArrayD::from_shape_fn(IxDyn(&shape), |_| rng.uniform());
        if shape.len() >= 2 {
            // A -inf entry masks a key out: its gradient is 0.
            mask.as_slice_mut().unwrap()[1] = f64::NEG_INFINITY;
        }
        let case = case.with_mask(OwnedMask::Additive(mask.clone()));
        let grads = check_against_fd(&format!("additive {shape:?} {causal:?}"), &case);
        if shape.len() >= 2 {
            assert_eq!(grads.dmask.unwrap().as_slice().unwrap()[1], 0.0);
        }
    }
}

#[test]
fn window_and_softcap_match_finite_differences() {
    let mut rng = Rng(21);
    for (window, softcap, causal, dims) in [
        (
            Window { left: 2, right: 1 },
            None,
            Causal::None,
            [2, 2, 2, 6, 6, 3, 2],
        ),
        (
            Window { left: 1, right: -1 },
            None,
            Causal::BottomRight,
            [1, 2, 2, 4, 9, 3, 3],
        ),
        (
            Window { left: -1, right: 0 },
            None,
            Causal::None,
            [1, 1, 1, 7, 4, 2, 2],
        ),
        (Window::NONE, Some(0.7), Causal::None, [2, 2, 2, 4, 5, 3, 4]),
        (
            Window { left: 3, right: 2 },
            Some(1.5),
            Causal::TopLeft,
            [1, 2, 2, 6, 8, 4, 3],
        ),
    ] {
        let options = SdpaOptions {
            causal,
            window,
            softcap,
            scale: Some(1.3),
            ..Default::default()
        };
        let case = Case::new(&mut rng, dims, options);
        check_against_fd(&format!("window {window:?} softcap {softcap:?}"), &case);
    }
    // ALiBi ([B, Hq] slopes) with a softcap and a window, bottom-right causal.
    let options = SdpaOptions {
        softcap: Some(1.1),
        window: Window { left: 3, right: -1 },
        causal: Causal::BottomRight,
        ..Default::default()
    };
    let case = Case::new(&mut rng, [2, 2, 2, 5, 7, 3, 2], options);
    let slopes = ArrayD::from_shape_fn(IxDyn(&[2, 2]), |_| rng.uniform().abs() as f32);
    check_alibi_against_fd(&case, slopes.view());
    // An additive mask after the softcap: dmask is dS before the softcap's slope.
    let options = SdpaOptions {
        softcap: Some(0.9),
        window: Window { left: 2, right: 2 },
        ..Default::default()
    };
    let case = Case::new(&mut rng, [2, 2, 2, 5, 5, 3, 2], options);
    let mask = ArrayD::from_shape_fn(IxDyn(&[5, 5]), |_| rng.uniform());
    let grads = check_against_fd(
        "softcap + additive",
        &case.with_mask(OwnedMask::Additive(mask)),
    );
    assert!(grads.dmask.is_some());
}

#[test]
fn custom_and_negative_scale() {
    let mut rng = Rng(14);
    for scale in [-0.7, 2.5] {
        let case = Case::new(
            &mut rng,
            [1, 2, 2, 5, 5, 4, 3],
            SdpaOptions {
                scale: Some(scale),
                causal: Causal::TopLeft,
                ..Default::default()
            },
        );
        let mask = ArrayD::from_shape_fn(IxDyn(&[1, 1, 5, 5]), |_| rng.uniform());
        check_against_fd(
            &format!("scale {scale}"),
            &case.with_mask(OwnedMask::Additive(mask)),
        );
    }
}

#[test]
fn dropout_replays_the_forward_keep_bits() {
    let mut rng = Rng(15);
    let dropout = Dropout::new(0.3, 0x5EED, 8);
    let case = Case::new(
        &mut rng,
        [2, 4, 2, 5, 6, 3, 4],
        SdpaOptions {
            dropout,
            enable_gqa: true,
            causal: Causal::TopLeft,
            ..Default::default()
        },
    );
    let mask = ArrayD::from_shape_fn(IxDyn(&[1, 4, 5, 6]), |_| rng.uniform());
    let case = case.with_mask(OwnedMask::Additive(mask));
    let grads = check_against_fd("dropout", &case);

    let mut other_seed = case.clone();
    other_seed.options.dropout.seed ^= 1;
    let other = other_seed.grads();
    let moved = (&other.dq - &grads.dq)
        .iter()
        .fold(0.0f64, |m, x| m.max(x.abs()));
    assert!(moved > 1e-3, "a new seed must change dq, moved {moved}");
    let mut other_offset = case.clone();
    other_offset.options.dropout.offset += 1;
    assert_ne!(other_offset.grads().dq, grads.dq);

    // p = 1 drops everything: the output is 0 whatever the inputs, so is every gradient.
    let mut all_dropped = case.clone();
    all_dropped.options.dropout.p = 1.0;
    let g = all_dropped.grads();
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|&x| x == 0.0));
}

#[test]
fn one_query_one_key_has_a_closed_form() {
    // softmax over one key is 1: out = v, so dv = dout and nothing reaches q or k.
    let mut rng = Rng(16);
    let case = Case::new(&mut rng, [2, 3, 3, 1, 1, 4, 2], options(Causal::None));
    let grads = case.grads();
    assert_eq!(grads.dv, case.dout);
    assert!(grads.dq.iter().chain(&grads.dk).all(|&x| x == 0.0));
}

#[test]
fn a_fully_masked_row_has_zero_gradients_and_no_nan() {
    let mut rng = Rng(17);
    // Bottom-right with L > S: queries 0 and 1 see no key; a bool mask empties row 3.
    let case = Case::new(
        &mut rng,
        [1, 2, 2, 5, 3, 3, 2],
        options(Causal::BottomRight),
    );
    let mut mask = ArrayD::from_elem(IxDyn(&[5, 3]), true);
    mask.slice_mut(s![3, ..]).fill(false);
    let case = case.with_mask(OwnedMask::Bool(mask));
    let grads = case.grads();
    for x in grads.dq.iter().chain(&grads.dk).chain(&grads.dv) {
        assert!(x.is_finite());
    }
    for i in [0, 1, 3] {
        assert!(grads.dq.slice(s![.., .., i, ..]).iter().all(|&x| x == 0.0));
    }
    // Those rows' dout reaches no key: changing it changes nothing.
    let mut other = case.clone();
    for i in [0, 1, 3] {
        other.dout.slice_mut(s![.., .., i, ..]).fill(1e3);
    }
    assert_eq!(other.grads(), grads);
}

fn low_precision_matches_f64<T: Element>(eps: f64) -> f64
where
    T::Acc: Accum,
{
    let narrow = |x: &Array4<f64>| x.mapv(|x| T::from_acc(T::Acc::from_f64(x)));
    let widen = |x: &Array4<T>| x.mapv(|x| x.to_acc().to_f32() as f64);
    let mut rng = Rng(18);
    let mut worst = 0.0f64;
    for (dims, options, with_mask) in [
        (
            [2, 4, 2, 6, 5, 4, 3],
            SdpaOptions {
                enable_gqa: true,
                causal: Causal::TopLeft,
                ..Default::default()
            },
            true,
        ),
        (
            [1, 3, 1, 5, 7, 5, 5],
            SdpaOptions {
                enable_gqa: true,
                dropout: Dropout::new(0.2, 3, 0),
                causal: Causal::BottomRight,
                ..Default::default()
            },
            false,
        ),
    ] {
        let case = Case::new(&mut rng, dims, options);
        let [b, _, _, l, s, _, _] = dims;
        let mask64 = ArrayD::from_shape_fn(IxDyn(&[b, 1, l, s]), |_| rng.uniform());
        let (q, k, v, dout) = (
            narrow(&case.q),
            narrow(&case.k),
            narrow(&case.v),
            narrow(&case.dout),
        );
        let mask_t = mask64.mapv(|x| T::from_acc(T::Acc::from_f64(x)));
        // The truth is the f64 computation on exactly the inputs T holds.
        let truth = Case {
            q: widen(&q),
            k: widen(&k),
            v: widen(&v),
            dout: widen(&dout),
            mask: with_mask
                .then(|| OwnedMask::Additive(mask_t.mapv(|x| x.to_acc().to_f32() as f64))),
            options: case.options,
        };
        let want = truth.grads();
        let mask = || with_mask.then(|| Mask::Additive(mask_t.view()));
        let fwd = sdpa(q.view(), k.view(), v.view(), mask(), &case.options).unwrap();
        let got = sdpa_backward(
            q.view(),
            k.view(),
            v.view(),
            fwd.out.view(),
            fwd.lse.view(),
            dout.view(),
            mask(),
            &case.options,
        )
        .unwrap();
        let to64 = |x: &ArrayD<T>| x.mapv(|x| x.to_acc().to_f32() as f64);
        let mut pairs = vec![
            ("dq", to64(&got.dq.into_dyn()), want.dq.into_dyn()),
            ("dk", to64(&got.dk.into_dyn()), want.dk.into_dyn()),
            ("dv", to64(&got.dv.into_dyn()), want.dv.into_dyn()),
        ];
        if with_mask {
            pairs.push(("dmask", to64(&got.dmask.unwrap()), want.dmask.unwrap()));
        }
        for (what, got, want) in pairs {
            let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
            let err = (&got - &want).iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let ulps = err / (eps * scale);
            assert!(
                ulps <= LOW_PRECISION_ULPS,
                "{} {what}: max error {err:.3e} = {ulps:.2} eps of max(1, max|truth|) {scale:.3}",
                std::any::type_name::<T>()
            );
            worst = worst.max(ulps);
        }
    }
    eprintln!("{}: worst {worst:.2} eps", std::any::type_name::<T>());
    worst
}

/// Error budget, in units of `eps_T * max(1, max|truth|)`, inputs in [-1, 1], E, Ev <= 5:
/// each gradient is rounded once (1/2); the forward's `out`, rounded to T, enters
/// `D = rowsum(dout * out)` with up to Ev terms each off by 1/2 (so |dD| <= 2.5 for
/// Ev = 5), which reaches `dq`, `dk` through `|scale| * sum_j P_ij |k_j| <= 1/sqrt(E)`
/// and `dv` not at all; accumulating in f32 adds ~n * 2^-24, negligible against the
/// f16/bf16 eps and at most ~1 more eps for f32. 4 leaves room over that sum of ~3.
const LOW_PRECISION_ULPS: f64 = 4.0;

#[test]
fn f32_is_within_its_error_budget_of_f64() {
    low_precision_matches_f64::<f32>(f32::EPSILON as f64);
}

#[test]
fn f16_is_within_its_error_budget_of_f64() {
    low_precision_matches_f64::<f16>(f16::EPSILON.to_f64());
}

#[test]
fn bf16_is_within_its_error_budget_of_f64() {
    low_precision_matches_f64::<bf16>(bf16::EPSILON.to_f64());
}

#[test]
fn mismatched_forward_outputs_name_the_argument() {
    let mut rng = Rng(19);
    let case = Case::new(&mut rng, [1, 2, 2, 3, 4, 2, 3], options(Causal::None));
    let fwd = sdpa(
        case.q.view(),
        case.k.view(),
        case.v.view(),
        None,
        &case.options,
    )
    .unwrap();
    let wrong4 = Array4::<f64>::zeros((1, 2, 3, 2));
    let wrong3 = ndarray::Array3::<f32>::zeros((1, 2, 4));
    let run = |out: &Array4<f64>, lse: &ndarray::Array3<f32>, dout: &Array4<f64>| {
        sdpa_backward(
            case.q.view(),
            case.k.view(),
            case.v.view(),
            out.view(),
            lse.view(),
            dout.view(),
            None,
            &case.options,
        )
        .unwrap_err()
        .to_string()
    };
    let e = run(&wrong4, &fwd.lse, &case.dout);
    assert!(e.starts_with("out: expected shape [1, 2, 3, 3]"), "{e}");
    assert!(e.ends_with("got [1, 2, 3, 2]"), "{e}");
    let e = run(&fwd.out, &wrong3, &case.dout);
    assert!(e.starts_with("lse: expected shape [1, 2, 3]"), "{e}");
    let e = run(&fwd.out, &fwd.lse, &wrong4);
    assert!(e.starts_with("grad_out: expected"), "{e}");
}

#[test]
fn nan_reaches_the_rows_that_read_it_and_no_other() {
    let mut rng = Rng(20);
    let mut case = Case::new(&mut rng, [1, 1, 1, 4, 4, 3, 2], options(Causal::TopLeft));
    // Key 3 is read by query 3 only; a NaN there must not leak into rows 0..3.
    case.k[[0, 0, 3, 1]] = f64::NAN;
    case.v[[0, 0, 3, 0]] = f64::NAN;
    let grads = case.grads();
    assert!(grads.dq.slice(s![0, 0, 3, ..]).iter().all(|x| x.is_nan()));
    assert!(grads
        .dq
        .slice(s![0, 0, ..3, ..])
        .iter()
        .all(|x| x.is_finite()));
    // Keys 0..3 are read by the NaN row as well: their dk, dv carry it.
    assert!(grads.dk.iter().all(|x| x.is_nan()));
    // A NaN query row in a fully causal-masked setting reads only key 0 (query 0).
    let mut case = Case::new(&mut rng, [1, 1, 1, 4, 4, 3, 2], options(Causal::TopLeft));
    case.q[[0, 0, 0, 2]] = f64::NAN;
    let grads = case.grads();
    assert!(grads.dq.slice(s![0, 0, 0, ..]).iter().all(|x| x.is_nan()));
    assert!(grads
        .dq
        .slice(s![0, 0, 1.., ..])
        .iter()
        .all(|x| x.is_finite()));
    assert!(grads.dk.slice(s![0, 0, 0, ..]).iter().all(|x| x.is_nan()));
    assert!(grads
        .dk
        .slice(s![0, 0, 1.., ..])
        .iter()
        .all(|x| x.is_finite()));
    assert!(grads
        .dv
        .slice(s![0, 0, 1.., ..])
        .iter()
        .all(|x| x.is_finite()));
}

#[test]
fn several_query_blocks_match_finite_differences() {
    // L = 70 spans two of the reference's 64-row query blocks, the second partial.
    let mut rng = Rng(0x5eed_b10c);
    let case = Case::new(
        &mut rng,
        [1, 1, 1, 70, 9, 4, 3],
        options(Causal::BottomRight),
    );
    check_against_fd("two query blocks, causal bottom-right", &case);
}

#[test]
fn an_empty_head_dim_gives_every_key_the_same_weight() {
    // E = 0: every score is 0 (the default scale 1/sqrt(0) is infinite, but no product
    // is taken), P = 1/S, so dv_j = sum_i dout_i / S; dq and dk are empty.
    let mut rng = Rng(7);
    let case = Case::new(&mut rng, [1, 2, 2, 4, 5, 0, 3], SdpaOptions::default());
    let g = case.grads();
    assert_eq!(g.dq.shape(), &[1, 2, 4, 0]);
    assert_eq!(g.dk.shape(), &[1, 2, 5, 0]);
    for h in 0..2 {
        for j in 0..5 {
            for c in 0..3 {
                let want = case.dout.slice(s![0, h, .., c]).sum() / 5.0;
                let got = g.dv[[0, h, j, c]];
                assert!(
                    (got - want).abs() < 1e-12,
                    "dv[{h}, {j}, {c}]: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn gradients_do_not_move_when_every_score_shifts_by_a_constant() {
    // Softmax is shift invariant: an additive mask of one constant changes no gradient
    // (dmask included, which sums to 0 per row there). 600 puts the lse past where
    // exp(s + lse) would overflow f64: P must come from exp(s - lse).
    let mut rng = Rng(0x51f7);
    let base = Case::new(&mut rng, [1, 2, 2, 6, 7, 5, 4], SdpaOptions::default());
    let zero = base
        .clone()
        .with_mask(OwnedMask::Additive(ArrayD::zeros(IxDyn(&[6, 7]))));
    let shifted = base.with_mask(OwnedMask::Additive(ArrayD::from_elem(
        IxDyn(&[6, 7]),
        600.0,
    )));
    let (a, b) = (zero.grads(), shifted.grads());
    let close = |what: &str, x: &ArrayD<f64>, y: &ArrayD<f64>| {
        for (u, w) in x.iter().zip(y.iter()) {
            assert!(
                (u - w).abs() <= 1e-9 * (1.0 + w.abs()),
                "{what}: {u} vs {w}"
            );
        }
    };
    close("dq", &a.dq.clone().into_dyn(), &b.dq.clone().into_dyn());
    close("dk", &a.dk.clone().into_dyn(), &b.dk.clone().into_dyn());
    close("dv", &a.dv.clone().into_dyn(), &b.dv.clone().into_dyn());
    close(
        "dmask",
        a.dmask.as_ref().unwrap(),
        b.dmask.as_ref().unwrap(),
    );
}
