//! Split-KV / ring merging: the reference over disjoint key chunks, merged by lse, equals
//! the reference over all keys.

use ndarray::{s, Array4, ArrayD, IxDyn};
use sdpa_core::rng::SplitMix64;
use sdpa_core::SdpaOptions;
use sdpa_ref::{merge_partials, sdpa, Mask};

fn array(rng: &mut SplitMix64, shape: [usize; 4]) -> Array4<f64> {
    Array4::from_shape_simple_fn(shape, || rng.symmetric())
}

#[test]
fn chunks_merged_by_lse_equal_the_whole_call() {
    let mut seed = SplitMix64(0x5eed);
    let (b, h, l, s_len, e) = (2, 3, 5, 23, 8);
    let q = array(&mut seed, [b, h, l, e]);
    let k = array(&mut seed, [b, h, s_len, e]);
    let v = array(&mut seed, [b, h, s_len, 6]);
    // Row 1 of batch 0 sees no key of the middle chunk: that part's row is empty.
    let mut keep = ArrayD::from_elem(IxDyn(&[b, 1, l, s_len]), true);
    keep.slice_mut(s![0, 0, 1, 7..15]).fill(false);
    let options = SdpaOptions::default();
    let whole = sdpa(
        q.view(),
        k.view(),
        v.view(),
        Some(Mask::Bool(keep.view())),
        &options,
    )
    .unwrap();
    for cuts in [vec![0, 7, 15, 23], vec![0, 1, 23], vec![0, 23]] {
        let parts: Vec<_> = cuts
            .windows(2)
            .map(|w| {
                let keys = w[0]..w[1];
                sdpa(
                    q.view(),
                    k.slice(s![.., .., keys.clone(), ..]),
                    v.slice(s![.., .., keys.clone(), ..]),
                    Some(Mask::Bool(keep.slice(s![.., .., .., keys]).into_dyn())),
                    &options,
                )
                .unwrap()
            })
            .collect();
        let merged = merge_partials(&parts.iter().collect::<Vec<_>>()).unwrap();
        let err = (&merged.out - &whole.out)
            .mapv(f64::abs)
            .fold(0.0f64, |m, &x| m.max(x));
        // Each part's lse is rounded to f32 (relative 6e-8) before the merge.
        assert!(err < 1e-6, "{cuts:?}: {err}");
        for (g, w) in merged.lse.iter().zip(whole.lse.iter()) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{cuts:?}: lse {g} vs {w}"
            );
        }
    }
}

#[test]
fn rows_no_part_saw_stay_zero_and_bad_lists_are_named() {
    let mut seed = SplitMix64(7);
    let q = array(&mut seed, [1, 1, 2, 4]);
    let k = array(&mut seed, [1, 1, 3, 4]);
    let none = ArrayD::from_elem(IxDyn(&[3]), false);
    let empty = sdpa(
        q.view(),
        k.view(),
        k.view(),
        Some(Mask::Bool(none.view())),
        &SdpaOptions::default(),
    )
    .unwrap();
    let merged = merge_partials(&[&empty, &empty]).unwrap();
    assert!(merged.out.iter().all(|&x| x == 0.0));
    assert!(merged.lse.iter().all(|&x| x == f32::NEG_INFINITY));
    assert!(merge_partials(&[])
        .unwrap_err()
        .to_string()
        .contains("partials"));
    let other = sdpa(
        q.slice(s![.., .., ..1, ..]),
        k.view(),
        k.view(),
        None,
        &SdpaOptions::default(),
    )
    .unwrap();
    let e = merge_partials(&[&empty, &other]).unwrap_err().to_string();
    assert!(e.contains("part 1"), "{e}");
}
