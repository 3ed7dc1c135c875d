//! The NaN rule of DESIGN.md ("NaN and Inf") in f64 and in the f32-intermediate path
//! (f32, f16, bf16): a NaN in anything a query row reads gives NaN in that row; keys a
//! row does not read (causal, bool mask false) change nothing; other rows are bitwise
//! what the NaN-free inputs give; a fully masked row stays 0 with lse -inf.

use half::{bf16, f16};
use ndarray::{s, Array2, Array4, ArrayD, IxDyn};
use num_traits::Float;
use sdpa_core::{Causal, Dropout, SdpaOptions};
use sdpa_ref::{sdpa, Accum, Element, Mask, Output};

const B: usize = 2;
const H: usize = 2;
const L: usize = 5;
const S: usize = 5;
const E: usize = 4;
const EV: usize = 3;

fn from_f64<T: Element>(x: f64) -> T {
    T::from_acc(T::Acc::from_f64(x))
}

fn is_nan<T: Element>(x: T) -> bool {
    x.to_acc().is_nan()
}

/// Smooth values in [-1, 1], exactly representable in bf16.
fn inputs<T: Element>() -> [Array4<T>; 3] {
    let make = |dim: usize, seed: usize| {
        Array4::from_shape_fn((B, H, L.max(S), dim), |(b, h, i, e)| {
            let n = ((b * 7 + h * 5 + i * 3 + e + seed) % 17) as f64;
            from_f64::<T>(n / 8.0 - 1.0)
        })
    };
    [make(E, 0), make(E, 3), make(EV, 11)]
}

fn run<T: Element>(
    [q, k, v]: &[Array4<T>; 3],
    mask: Option<Mask<'_, T>>,
    options: &SdpaOptions,
) -> Output<T> {
    sdpa(q.view(), k.view(), v.view(), mask, options).expect("a valid call")
}

/// Output row `(b, h, i)` is all NaN, and so is its lse.
fn assert_nan_row<T: Element>(got: &Output<T>, b: usize, h: usize, i: usize) {
    let row = got.out.slice(s![b, h, i, ..]);
    assert!(row.iter().all(|&x| is_nan(x)), "row {b} {h} {i}: {row:?}");
    assert!(got.lse[[b, h, i]].is_nan(), "lse {b} {h} {i}");
}

/// Every row except those `nan_rows` names is bitwise what `clean` has, and finite.
fn assert_rows_match<T: Element>(
    got: &Output<T>,
    clean: &Output<T>,
    nan_rows: impl Fn(usize, usize, usize) -> bool,
) {
    for b in 0..B {
        for h in 0..H {
            for i in 0..L {
                if nan_rows(b, h, i) {
                    continue;
                }
                for c in 0..EV {
                    let (x, y) = (got.out[[b, h, i, c]], clean.out[[b, h, i, c]]);
                    assert!(x.to_acc().is_finite(), "{b} {h} {i} {c}: {x:?}");
                    assert_eq!(x.to_acc(), y.to_acc(), "{b} {h} {i} {c}");
                }
                assert_eq!(got.lse[[b, h, i]], clean.lse[[b, h, i]], "lse {b} {h} {i}");
            }
        }
    }
}

fn nan_in_q_row<T: Element>() {
    for options in [
        SdpaOptions::default(),
        SdpaOptions {
            causal: Causal::TopLeft,
            ..Default::default()
        },
        // Dropout does not hide the NaN, not even when it drops everything.
        SdpaOptions {
            dropout: Dropout::new(0.5, 7, 3),
            ..Default::default()
        },
        SdpaOptions {
            dropout: Dropout::new(1.0, 7, 3),
            ..Default::default()
        },
    ] {
        let clean_inputs = inputs::<T>();
        let clean = run(&clean_inputs, None, &options);
        let mut dirty = clean_inputs.clone();
        dirty[0][[1, 0, 2, 1]] = T::from_acc(T::Acc::nan());
        let got = run(&dirty, None, &options);
        assert_nan_row(&got, 1, 0, 2);
        assert_rows_match(&got, &clean, |b, h, i| (b, h, i) == (1, 0, 2));
    }
}

fn nan_in_a_key_a_causal_row_does_not_see<T: Element>() {
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    let clean_inputs = inputs::<T>();
    let clean = run(&clean_inputs, None, &options);
    // Key 3 of (b, kv head) = (0, 1): rows 0..3 do not see it, rows 3.. do.
    let mut dirty = clean_inputs.clone();
    dirty[1][[0, 1, 3, 2]] = T::from_acc(T::Acc::nan());
    let got = run(&dirty, None, &options);
    for i in 3..L {
        assert_nan_row(&got, 0, 1, i);
    }
    assert_rows_match(&got, &clean, |b, h, i| b == 0 && h == 1 && i >= 3);
    // The same key's value: the rows that see it get NaN in the column that reads it.
    let mut dirty = clean_inputs.clone();
    dirty[2][[0, 1, 3, 2]] = T::from_acc(T::Acc::nan());
    let got = run(&dirty, None, &options);
    for i in 0..L {
        for c in 0..EV {
            let x = got.out[[0, 1, i, c]];
            if i >= 3 && c == 2 {
                assert!(is_nan(x), "row {i} column {c}: {x:?}");
            } else {
                assert_eq!(x.to_acc(), clean.out[[0, 1, i, c]].to_acc(), "{i} {c}");
            }
        }
    }
    assert_rows_match(&got, &clean, |b, h, _| b == 0 && h == 1);
    assert_eq!(got.lse, clean.lse, "the lse does not read v");
}

fn nan_in_v_of_an_attended_key<T: Element>() {
    for options in [
        SdpaOptions::default(),
        // A dropped key was still read.
        SdpaOptions {
            dropout: Dropout::new(0.6, 1, 0),
            ..Default::default()
        },
    ] {
        let clean_inputs = inputs::<T>();
        let clean = run(&clean_inputs, None, &options);
        let mut dirty = clean_inputs.clone();
        dirty[2][[1, 1, 4, 0]] = T::from_acc(T::Acc::nan());
        let got = run(&dirty, None, &options);
        for i in 0..L {
            assert!(is_nan(got.out[[1, 1, i, 0]]), "row {i}");
            for c in 1..EV {
                assert_eq!(
                    got.out[[1, 1, i, c]].to_acc(),
                    clean.out[[1, 1, i, c]].to_acc()
                );
            }
        }
        assert_rows_match(&got, &clean, |b, h, _| (b, h) == (1, 1));
        assert_eq!(got.lse, clean.lse);
    }
}

fn nan_in_a_masked_out_key<T: Element>() {
    // Key 1 is masked out for every row; key 3 for rows 0 and 4 only.
    let allowed = ArrayD::from_shape_fn(IxDyn(&[L, S]), |ix| {
        let (i, j) = (ix[0], ix[1]);
        j != 1 && !(j == 3 && (i == 0 || i == 4))
    });
    let clean_inputs = inputs::<T>();
    let clean = run(
        &clean_inputs,
        Some(Mask::Bool(allowed.view())),
        &Default::default(),
    );
    let mut dirty = clean_inputs.clone();
    for b in 0..B {
        for h in 0..H {
            for e in 0..E {
                dirty[1][[b, h, 1, e]] = T::from_acc(T::Acc::nan());
            }
            for c in 0..EV {
                dirty[2][[b, h, 1, c]] = T::from_acc(T::Acc::nan());
            }
        }
    }
    let got = run(
        &dirty,
        Some(Mask::Bool(allowed.view())),
        &Default::default(),
    );
    assert_rows_match(&got, &clean, |_, _, _| false);
    // A NaN in key 3 reaches rows 1..=3 only.
    dirty[1][[0, 0, 3, 0]] = T::from_acc(T::Acc::nan());
    let got = run(
        &dirty,
        Some(Mask::Bool(allowed.view())),
        &Default::default(),
    );
    for i in 1..=3 {
        assert_nan_row(&got, 0, 0, i);
    }
    assert_rows_match(&got, &clean, |b, h, i| {
        (b, h) == (0, 0) && (1..=3).contains(&i)
    });
}

fn nan_in_an_additive_mask<T: Element>() {
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    let zeros = Array2::<T>::from_elem((L, S), from_f64(0.0)).into_dyn();
    let clean_inputs = inputs::<T>();
    let clean = run(&clean_inputs, Some(Mask::Additive(zeros.view())), &options);
    let mut mask = zeros.clone();
    // Row 1 attends to key 0: NaN. Row 2 does not see key 4 (causal): no effect, and no
    // +inf meeting the causal -inf either.
    mask[[1, 0]] = T::from_acc(T::Acc::nan());
    mask[[2, 4]] = T::from_acc(T::Acc::nan());
    mask[[3, 4]] = T::from_acc(T::Acc::infinity());
    let got = run(&clean_inputs, Some(Mask::Additive(mask.view())), &options);
    for b in 0..B {
        for h in 0..H {
            assert_nan_row(&got, b, h, 1);
        }
    }
    assert_rows_match(&got, &clean, |_, _, i| i == 1);
}

fn fully_masked_row_stays_zero<T: Element>() {
    // Row 0 sees no key; a NaN in its q row is not read.
    let allowed = ArrayD::from_shape_fn(IxDyn(&[L, S]), |ix| ix[0] != 0);
    let mut dirty = inputs::<T>();
    dirty[0][[0, 0, 0, 0]] = T::from_acc(T::Acc::nan());
    let got = run(
        &dirty,
        Some(Mask::Bool(allowed.view())),
        &Default::default(),
    );
    assert!(got
        .out
        .slice(s![0, 0, 0, ..])
        .iter()
        .all(|&x| x.to_acc() == T::Acc::from_f64(0.0)));
    assert_eq!(got.lse[[0, 0, 0]], f32::NEG_INFINITY);
    assert!(got.out.iter().all(|&x| x.to_acc().is_finite()));
}

macro_rules! for_each_dtype {
    ($($name:ident),*) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn f64() {
                    $name::<f64>();
                }
                #[test]
                fn f32() {
                    $name::<f32>();
                }
                #[test]
                fn f16() {
                    $name::<f16>();
                }
                #[test]
                fn bf16() {
                    $name::<bf16>();
                }
            }
        )*
    };
}

for_each_dtype!(
    nan_in_q_row,
    nan_in_a_key_a_causal_row_does_not_see,
    nan_in_v_of_an_attended_key,
    nan_in_a_masked_out_key,
    nan_in_an_additive_mask,
    fully_masked_row_stays_zero
);

#[test]
fn a_scale_past_f32_is_refused_for_every_dtype() {
    fn refused<T: Element>() {
        let [q, k, v] = inputs::<T>();
        let options = SdpaOptions {
            scale: Some(1e300),
            ..Default::default()
        };
        let err = sdpa(q.view(), k.view(), v.view(), None, &options).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("scale: expected a number finite in f32"));
    }
    refused::<f64>();
    refused::<f32>();
    refused::<f16>();
    refused::<bf16>();
}
