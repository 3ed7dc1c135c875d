//! Blocks at their frames of a larger call: merged forward results and summed backward
//! contributions equal the whole call, with causal (both alignments), window, softcap,
//! ALiBi, dropout and GQA taken at the frame's positions.

use ndarray::{s, Array3, Array4, ArrayD, IxDyn};
use sdpa_core::rng::SplitMix64;
use sdpa_core::{Causal, Dropout, SdpaOptions, Window};
use sdpa_ref::blocks::{delta, merge, partial, partial_backward, Frame, Partial};
use sdpa_ref::{sdpa_backward_with_alibi, sdpa_with_alibi};

fn array(rng: &mut SplitMix64, shape: [usize; 4]) -> Array4<f64> {
    Array4::from_shape_simple_fn(shape, || rng.symmetric())
}

fn max_diff(a: &Array4<f64>, b: &Array4<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    (a - b).mapv(f64::abs).fold(0.0, |m, &x| m.max(x))
}

fn options_under_test() -> Vec<(&'static str, SdpaOptions)> {
    let base = SdpaOptions {
        enable_gqa: true,
        ..Default::default()
    };
    vec![
        ("plain", base),
        (
            "causal top-left",
            SdpaOptions {
                causal: Causal::TopLeft,
                ..base
            },
        ),
        (
            "causal bottom-right + dropout",
            SdpaOptions {
                causal: Causal::BottomRight,
                dropout: Dropout::new(0.3, 11, 5),
                ..base
            },
        ),
        (
            "window + softcap",
            SdpaOptions {
                window: Window { left: 4, right: 2 },
                softcap: Some(1.5),
                ..base
            },
        ),
    ]
}

/// Cuts of queries and keys, deliberately uneven, with empty and one-row pieces.
const Q_CUTS: [usize; 5] = [0, 1, 6, 6, 13];
const K_CUTS: [usize; 5] = [0, 5, 6, 12, 17];

#[test]
fn blocks_at_their_frames_equal_the_whole_call_forward_and_backward() {
    let mut rng = SplitMix64(0xb10c);
    let (b, hq, hkv, l, s_len, e, ev) = (2, 4, 2, 13, 17, 8, 5);
    let q = array(&mut rng, [b, hq, l, e]);
    let k = array(&mut rng, [b, hkv, s_len, e]);
    let v = array(&mut rng, [b, hkv, s_len, ev]);
    let dout = array(&mut rng, [b, hq, l, ev]);
    let slopes = ArrayD::from_shape_fn(IxDyn(&[hq]), |i| 0.1 * (i[0] as f32 + 1.0));
    for (name, options) in options_under_test() {
        let whole =
            sdpa_with_alibi(q.view(), k.view(), v.view(), None, slopes.view(), &options).unwrap();
        let grads = sdpa_backward_with_alibi(
            q.view(),
            k.view(),
            v.view(),
            whole.out.view(),
            whole.lse.view(),
            dout.view(),
            None,
            slopes.view(),
            &options,
        )
        .unwrap();
        let mut dq = Array4::<f64>::zeros(q.dim());
        let mut dk = Array4::<f64>::zeros(k.dim());
        let mut dv = Array4::<f64>::zeros(v.dim());
        let mut skipped = 0;
        for qw in Q_CUTS.windows(2) {
            let rows = qw[0]..qw[1];
            let q_blk = q.slice(s![.., .., rows.clone(), ..]);
            let parts: Vec<Partial<f64>> = K_CUTS
                .windows(2)
                .map(|kw| {
                    let keys = kw[0]..kw[1];
                    let frame = Frame {
                        query_offset: rows.start,
                        key_offset: keys.start,
                        len_q: l,
                        len_kv: s_len,
                    };
                    partial(
                        q_blk,
                        k.slice(s![.., .., keys.clone(), ..]),
                        v.slice(s![.., .., keys, ..]),
                        Some(slopes.view()),
                        &options,
                        frame,
                    )
                    .unwrap()
                })
                .collect();
            let merged = merge(&parts.iter().collect::<Vec<_>>()).unwrap();
            let (out, lse) = merged.finish();
            let want = whole.out.slice(s![.., .., rows.clone(), ..]).to_owned();
            let err = max_diff(&out, &want);
            assert!(err < 1e-12, "{name}: rows {rows:?}: out off by {err}");
            for (got, want) in lse.iter().zip(whole.lse.slice(s![.., .., rows.clone()])) {
                assert!(
                    got == &(*want as f64) || (got - *want as f64).abs() < 1e-6,
                    "{name}: lse {got} vs {want}"
                );
            }
            // The backward of each block, given the merged row statistics and the whole D.
            let d: Array3<f64> =
                delta::<f64>(out.view(), dout.slice(s![.., .., rows.clone(), ..])).unwrap();
            for kw in K_CUTS.windows(2) {
                let keys = kw[0]..kw[1];
                let frame = Frame {
                    query_offset: rows.start,
                    key_offset: keys.start,
                    len_q: l,
                    len_kv: s_len,
                };
                if frame.is_masked_out(rows.len(), keys.len(), &options) {
                    skipped += 1;
                    continue;
                }
                let g = partial_backward(
                    q_blk,
                    k.slice(s![.., .., keys.clone(), ..]),
                    v.slice(s![.., .., keys.clone(), ..]),
                    dout.slice(s![.., .., rows.clone(), ..]),
                    merged.max().view(),
                    merged.sum().view(),
                    d.view(),
                    Some(slopes.view()),
                    &options,
                    frame,
                )
                .unwrap();
                let mut dq_rows = dq.slice_mut(s![.., .., rows.clone(), ..]);
                dq_rows += &g.dq;
                let mut dk_keys = dk.slice_mut(s![.., .., keys.clone(), ..]);
                dk_keys += &g.dk;
                let mut dv_keys = dv.slice_mut(s![.., .., keys, ..]);
                dv_keys += &g.dv;
            }
        }
        // D and P come from the merged blocks here; the whole call takes D from P and
        // renormalises P: both exact to f64 rounding.
        for (what, got, want) in [
            ("dq", &dq, &grads.dq),
            ("dk", &dk, &grads.dk),
            ("dv", &dv, &grads.dv),
        ] {
            let err = max_diff(got, want);
            assert!(err < 1e-12, "{name}: {what} off by {err}");
        }
        if name.starts_with("causal") || name.starts_with("window") {
            assert!(skipped > 0, "{name}: no block was skipped");
        }
    }
}

#[test]
fn a_frame_that_does_not_hold_the_call_is_refused() {
    let mut rng = SplitMix64(3);
    let q = array(&mut rng, [1, 1, 4, 2]);
    let frame = Frame {
        query_offset: 3,
        key_offset: 0,
        len_q: 6,
        len_kv: 4,
    };
    let e = partial(
        q.view(),
        q.view(),
        q.view(),
        None,
        &SdpaOptions::default(),
        frame,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("frame") && e.contains("query_offset 3"), "{e}");
    let wide = Frame {
        key_offset: usize::MAX,
        ..Frame::whole(4, 4)
    };
    let e = partial(
        q.view(),
        q.view(),
        q.view(),
        None,
        &SdpaOptions::default(),
        wide,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("frame"), "{e}");
}

/// Scores near 7e5 in f32 that differ by a few units: an lse there is off by up to
/// 0.03 (half an ulp), which a merge by lse turns into weights off by as much; the
/// online form (max, sum) keeps the blocks' merge as exact as the whole call.
#[test]
fn blocks_of_huge_scores_merge_as_exactly_as_the_whole_call() {
    let (l, s_len, e) = (4, 12, 8);
    let q =
        Array4::<f32>::from_shape_fn((1, 1, l, e), |(_, _, i, d)| 300.0 + (i + d) as f32 * 5e-4);
    let k = Array4::<f32>::from_shape_fn((1, 1, s_len, e), |(_, _, j, d)| {
        300.0 + ((j * 3 + d) % 5) as f32 * 5e-4
    });
    let v = Array4::<f32>::from_shape_fn((1, 1, s_len, 3), |(_, _, j, c)| {
        (j as f32 - 5.0) * (c as f32 + 1.0)
    });
    let options = SdpaOptions {
        scale: Some(1.0),
        ..Default::default()
    };
    let whole = sdpa_ref::sdpa(q.view(), k.view(), v.view(), None, &options).unwrap();
    assert!(whole.lse.iter().all(|&x| x > 7e5), "{:?}", whole.lse);
    let parts: Vec<Partial<f32>> = [0, 5, 9, 12]
        .windows(2)
        .map(|w| {
            let frame = Frame {
                query_offset: 0,
                key_offset: w[0],
                len_q: l,
                len_kv: s_len,
            };
            let keys = w[0]..w[1];
            partial(
                q.view(),
                k.slice(s![.., .., keys.clone(), ..]),
                v.slice(s![.., .., keys, ..]),
                None,
                &options,
                frame,
            )
            .unwrap()
        })
        .collect();
    let (out, _) = merge(&parts.iter().collect::<Vec<_>>()).unwrap().finish();
    let err = (&out - &whole.out)
        .mapv(f32::abs)
        .fold(0.0f32, |m, &x| m.max(x));
    assert!(err < 1e-5, "merged blocks off by {err}");
    eprintln!("online merge off by {err}");
    // The same blocks merged through each one's f32 lse, as an lse merge does.
    let by_lse: Vec<Partial<f32>> = parts
        .iter()
        .map(|p| {
            let (out, lse) = p.finish();
            Partial::from_normalised(out, lse).unwrap()
        })
        .collect();
    let (out, _) = merge(&by_lse.iter().collect::<Vec<_>>()).unwrap().finish();
    let lse_err = (&out - &whole.out)
        .mapv(f32::abs)
        .fold(0.0f32, |m, &x| m.max(x));
    eprintln!("lse merge off by {lse_err}");
    assert!(
        lse_err > 100.0 * err.max(1e-6),
        "lse merge off by only {lse_err}"
    );
}

#[test]
fn block_arguments_of_the_wrong_shape_are_refused_by_name() {
    let mut rng = SplitMix64(5);
    let q = array(&mut rng, [1, 2, 3, 4]);
    let dout = array(&mut rng, [1, 2, 3, 4]);
    let rows = Array3::<f64>::zeros((1, 2, 3));
    let short = Array3::<f64>::zeros((1, 2, 2));
    let options = SdpaOptions::default();
    let frame = Frame::whole(3, 3);
    let call = |max: &Array3<f64>, sum: &Array3<f64>, d: &Array3<f64>| {
        partial_backward(
            q.view(),
            q.view(),
            q.view(),
            dout.view(),
            max.view(),
            sum.view(),
            d.view(),
            None,
            &options,
            frame,
        )
        .unwrap_err()
        .to_string()
    };
    assert!(call(&short, &rows, &rows).starts_with("max: expected shape [1, 2, 3]"));
    assert!(call(&rows, &short, &rows).starts_with("sum: expected shape [1, 2, 3]"));
    assert!(call(&rows, &rows, &short).starts_with("delta: expected shape [1, 2, 3]"));
    let e = delta::<f64>(q.view(), dout.slice(s![.., .., ..2, ..]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("grad_out: expected shape [1, 2, 3, 4]"),
        "{e}"
    );
    let e = Partial::new(q.clone(), short.clone(), rows.clone())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("max: expected shape [1, 2, 3]"), "{e}");
    let e = Partial::from_normalised(q.clone(), short)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("lse: expected shape [1, 2, 3]"), "{e}");
}

/// `Frame::is_masked_out` against a key-by-key statement: true exactly when no query of
/// the block reads any of its keys, over every small frame, causal mode and window.
#[test]
fn a_block_is_skipped_exactly_when_no_query_reads_a_key() {
    let mut skipped = 0;
    for (len_q, len_kv) in [(5, 5), (3, 6), (6, 3)] {
        for causal in [Causal::None, Causal::TopLeft, Causal::BottomRight] {
            for window in [
                Window::NONE,
                Window { left: 1, right: 0 },
                Window { left: 0, right: 2 },
                Window { left: 2, right: -1 },
            ] {
                let options = SdpaOptions {
                    causal,
                    window,
                    ..Default::default()
                };
                for q0 in 0..=len_q {
                    for rows in 0..=len_q - q0 {
                        for k0 in 0..=len_kv {
                            for keys in 0..=len_kv - k0 {
                                let frame = Frame {
                                    query_offset: q0,
                                    key_offset: k0,
                                    len_q,
                                    len_kv,
                                };
                                let read = (q0..q0 + rows).any(|i| {
                                    (k0..k0 + keys).any(|j| {
                                        causal.allows(i, j, len_q, len_kv)
                                            && window.allows(i, j, len_q, len_kv)
                                    })
                                });
                                let skip = frame.is_masked_out(rows, keys, &options);
                                assert_eq!(
                                    skip, !read,
                                    "{causal:?} {window:?} rows {q0}+{rows} keys {k0}+{keys} of {len_q}x{len_kv}"
                                );
                                skipped += usize::from(skip && rows > 0 && keys > 0);
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(skipped > 100, "{skipped}");
    // A frame that does not hold the call (on either side) skips nothing, and its
    // offsets do not overflow.
    let causal = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    for (q0, k0, rows, keys) in [(usize::MAX, 0, 1, 2), (0, usize::MAX, 2, 1), (3, 0, 2, 2)] {
        let frame = Frame {
            query_offset: q0,
            key_offset: k0,
            len_q: 4,
            len_kv: 4,
        };
        assert!(!frame.is_masked_out(rows, keys, &causal), "{frame:?}");
    }
}

/// NaN through blocks: a NaN query row is NaN after the merge (out and lse) and the
/// other rows are untouched; a NaN in `v` reaches only the rows that read its key.
#[test]
fn nan_reaches_the_merged_rows_that_read_it() {
    let mut rng = SplitMix64(21);
    let mut q = array(&mut rng, [1, 1, 4, 3]);
    let k = array(&mut rng, [1, 1, 6, 3]);
    let mut v = array(&mut rng, [1, 1, 6, 2]);
    q[[0, 0, 1, 0]] = f64::NAN;
    v[[0, 0, 2, 1]] = f64::NAN;
    let options = SdpaOptions {
        causal: Causal::TopLeft,
        ..Default::default()
    };
    let whole = sdpa_ref::sdpa(q.view(), k.view(), v.view(), None, &options).unwrap();
    let parts: Vec<Partial<f64>> = [0, 3, 6]
        .windows(2)
        .map(|w| {
            let frame = Frame {
                query_offset: 0,
                key_offset: w[0],
                len_q: 4,
                len_kv: 6,
            };
            partial(
                q.view(),
                k.slice(s![.., .., w[0]..w[1], ..]),
                v.slice(s![.., .., w[0]..w[1], ..]),
                None,
                &options,
                frame,
            )
            .unwrap()
        })
        .collect();
    let (out, lse) = merge(&parts.iter().collect::<Vec<_>>()).unwrap().finish();
    for ((g, w), i) in out.iter().zip(whole.out.iter()).zip(0..) {
        assert!(
            (g.is_nan() && w.is_nan()) || (g - w).abs() < 1e-12,
            "element {i}: {g} vs {w}"
        );
    }
    assert!(lse[[0, 0, 1]].is_nan() && !lse[[0, 0, 0]].is_nan());
    // Rows 2 and 3 read key 2 (top-left causal): their column 1 is NaN, column 0 is
    // not; row 0 does not read it.
    for i in [2, 3] {
        assert!(out[[0, 0, i, 1]].is_nan() && !out[[0, 0, i, 0]].is_nan());
    }
    assert!(!out[[0, 0, 0, 1]].is_nan());
}

/// Rows that read no key anywhere (bottom-right causal with L > S) keep zero gradients
/// in a block's backward: their whole-call sum is 0, and nothing is divided by it.
#[test]
fn rows_with_no_key_have_zero_block_gradients() {
    let mut rng = SplitMix64(8);
    let (l, s_len) = (6, 3);
    let q = array(&mut rng, [1, 1, l, 4]);
    let k = array(&mut rng, [1, 1, s_len, 4]);
    let dout = array(&mut rng, [1, 1, l, 4]);
    let options = SdpaOptions {
        causal: Causal::BottomRight,
        ..Default::default()
    };
    let frame = Frame::whole(l, s_len);
    let merged = partial(q.view(), k.view(), k.view(), None, &options, frame).unwrap();
    let (out, _) = merged.finish();
    let d = delta::<f64>(out.view(), dout.view()).unwrap();
    let g = partial_backward(
        q.view(),
        k.view(),
        k.view(),
        dout.view(),
        merged.max().view(),
        merged.sum().view(),
        d.view(),
        None,
        &options,
        frame,
    )
    .unwrap();
    // Rows 0..3 see no key (i + S - L < 0); their dq is exactly 0, and no NaN anywhere.
    assert!(g.dq.slice(s![.., .., ..3, ..]).iter().all(|&x| x == 0.0));
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
    assert!(g.dq.slice(s![.., .., 3.., ..]).iter().any(|&x| x != 0.0));
}
