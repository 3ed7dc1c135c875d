//! The KV-cache reference: paged == dense == the reference on the gathered keys, the
//! append in place, bad tables refused by batch row with nothing written.

use ndarray::{s, Array1, Array2, Array4};
use sdpa_core::rng::SplitMix64;
use sdpa_core::{Causal, SdpaOptions};
use sdpa_ref::kvcache::{attention_with_kvcache, KvCache};
use sdpa_ref::sdpa;

/// Random draws from the project's SplitMix64.
struct Rng(SplitMix64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }
    fn array(&mut self, shape: [usize; 4]) -> Array4<f64> {
        Array4::from_shape_simple_fn(shape, || self.0.symmetric())
    }
}

/// A dense cache and the same keys in pages: block `table[b][m]` holds keys
/// `m * bs .. (m + 1) * bs` of row `b`, the blocks shuffled and two spare ones unused.
fn paged_copy(dense: &Array4<f64>, bs: usize, rng: &mut Rng) -> (Array4<f64>, Array2<i32>) {
    let (b_n, hkv, s_max, width) = dense.dim();
    let per_row = s_max.div_ceil(bs);
    let blocks = b_n * per_row + 2;
    let mut order: Vec<usize> = (0..blocks).collect();
    for i in (1..blocks).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let mut pages = Array4::from_elem((blocks, bs, hkv, width), f64::NAN);
    let mut table = Array2::<i32>::zeros((b_n, per_row));
    for b in 0..b_n {
        for m in 0..per_row {
            let block = order[b * per_row + m];
            table[[b, m]] = block as i32;
            for slot in 0..bs {
                let j = m * bs + slot;
                if j < s_max {
                    for h in 0..hkv {
                        pages
                            .slice_mut(s![block, slot, h, ..])
                            .assign(&dense.slice(s![b, h, j, ..]));
                    }
                }
            }
        }
    }
    (pages, table)
}

#[test]
fn paged_equals_dense_equals_the_gathered_reference_with_appends() {
    let mut rng = Rng(SplitMix64(0xcac4e));
    for case in 0..40 {
        let b_n = 1 + rng.below(3);
        let hkv = 1 + rng.below(2);
        let group = 1 + rng.below(3);
        let (e, ev) = (1 + rng.below(12), 1 + rng.below(12));
        let s_max = 1 + rng.below(60);
        let l_new = if rng.below(2) == 0 {
            0
        } else {
            rng.below(4).min(s_max)
        };
        let lq = 1 + rng.below(5);
        let bs = [1, 3, 16][rng.below(3)];
        let lens = Array1::from_shape_fn(b_n, |_| rng.below(s_max - l_new + 1) as i32);
        let q = rng.array([b_n, hkv * group, lq, e]);
        let (k0, v0) = (
            rng.array([b_n, hkv, s_max, e]),
            rng.array([b_n, hkv, s_max, ev]),
        );
        let (kn, vn) = (
            rng.array([b_n, hkv, l_new, e]),
            rng.array([b_n, hkv, l_new, ev]),
        );
        let options = SdpaOptions {
            causal: [Causal::None, Causal::BottomRight, Causal::TopLeft][rng.below(3)],
            enable_gqa: group > 1,
            scale: Some(0.7),
            ..Default::default()
        };
        let new = (l_new > 0).then(|| (kn.view(), vn.view()));
        let (mut kd, mut vd) = (k0.clone(), v0.clone());
        let dense = attention_with_kvcache(
            q.view(),
            KvCache::Dense {
                k: kd.view_mut(),
                v: vd.view_mut(),
            },
            lens.view(),
            new,
            None,
            &options,
        )
        .unwrap();
        let (mut kp, table) = paged_copy(&k0, bs, &mut rng);
        let (mut vp, _) = {
            // The same shuffle for v: rebuild from the key table.
            let mut pages = Array4::from_elem((kp.dim().0, bs, hkv, ev), f64::NAN);
            for b in 0..b_n {
                for j in 0..s_max {
                    let block = table[[b, j / bs]] as usize;
                    for h in 0..hkv {
                        pages
                            .slice_mut(s![block, j % bs, h, ..])
                            .assign(&v0.slice(s![b, h, j, ..]));
                    }
                }
            }
            (pages, ())
        };
        let paged = attention_with_kvcache(
            q.view(),
            KvCache::Paged {
                k: kp.view_mut(),
                v: vp.view_mut(),
                block_table: table.view(),
            },
            lens.view(),
            new,
            None,
            &options,
        )
        .unwrap();
        assert_eq!(dense.out, paged.out, "case {case}");
        assert_eq!(dense.lse, paged.lse, "case {case}");
        for b in 0..b_n {
            let (start, n) = (lens[b] as usize, lens[b] as usize + l_new);
            // The append landed at cache_seqlens[b] in both caches, the rest untouched.
            for h in 0..hkv {
                for j in 0..s_max {
                    let want = if j >= start && j < n {
                        kn.slice(s![b, h, j - start, ..])
                    } else {
                        k0.slice(s![b, h, j, ..])
                    };
                    assert_eq!(kd.slice(s![b, h, j, ..]), want, "case {case} dense key {j}");
                    let block = table[[b, j / bs]] as usize;
                    assert_eq!(
                        kp.slice(s![block, j % bs, h, ..]),
                        want,
                        "case {case} paged key {j}"
                    );
                }
            }
            // The row's output is the reference's over its n keys, bottom-right causal.
            let truth = sdpa(
                q.slice(s![b..b + 1, .., .., ..]),
                kd.slice(s![b..b + 1, .., ..n, ..]),
                vd.slice(s![b..b + 1, .., ..n, ..]),
                None,
                &SdpaOptions {
                    causal: if options.causal == Causal::None {
                        Causal::None
                    } else {
                        Causal::BottomRight
                    },
                    ..options
                },
            )
            .unwrap();
            assert_eq!(
                dense.out.slice(s![b..b + 1, .., .., ..]),
                truth.out,
                "case {case} row {b}"
            );
        }
    }
}

#[test]
fn bad_tables_and_lengths_are_refused_by_batch_row_before_any_write() {
    let mut rng = Rng(SplitMix64(9));
    let q = rng.array([2, 2, 1, 4]);
    let kn = rng.array([2, 2, 1, 4]);
    let (mut k, mut v) = (
        Array4::<f64>::zeros((5, 4, 2, 4)),
        Array4::<f64>::zeros((5, 4, 2, 4)),
    );
    let good = Array2::from_shape_vec((2, 2), vec![0, 1, 2, 3]).unwrap();
    let call = |k: &mut Array4<f64>, v: &mut Array4<f64>, table: &Array2<i32>, lens: &[i32]| {
        let lens = Array1::from(lens.to_vec());
        attention_with_kvcache(
            q.view(),
            KvCache::Paged {
                k: k.view_mut(),
                v: v.view_mut(),
                block_table: table.view(),
            },
            lens.view(),
            Some((kn.view(), kn.view())),
            None,
            &SdpaOptions::default(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert!(call(&mut k, &mut v, &good, &[3, 7]).is_ok());
    k.fill(0.0);
    v.fill(0.0);
    let out_of_range = Array2::from_shape_vec((2, 2), vec![0, 1, 2, 5]).unwrap();
    let e = call(&mut k, &mut v, &out_of_range, &[3, 7]).unwrap_err();
    assert!(
        e.contains("block_table") && e.contains("batch row 1, entry 1"),
        "{e}"
    );
    let e = call(&mut k, &mut v, &good, &[3, -1]).unwrap_err();
    assert!(
        e.contains("cache_seqlens") && e.contains("batch row 1"),
        "{e}"
    );
    let e = call(&mut k, &mut v, &good, &[8, 0]).unwrap_err();
    assert!(
        e.contains("cache_seqlens") && e.contains("batch row 0: 8 + 1"),
        "{e}"
    );
    let e = call(&mut k, &mut v, &good, &[1]).unwrap_err();
    assert!(e.contains("cache_seqlens"), "{e}");
    // Nothing was written by the refused calls (row 0's append would have landed first).
    assert!(k.iter().chain(v.iter()).all(|&x| x == 0.0));
    let lens = Array1::from(vec![0, 0]);
    let mut kd = Array4::<f64>::zeros((2, 2, 3, 5));
    let mut vd = Array4::<f64>::zeros((2, 2, 3, 4));
    let e = attention_with_kvcache(
        q.view(),
        KvCache::Dense {
            k: kd.view_mut(),
            v: vd.view_mut(),
        },
        lens.view(),
        None,
        None,
        &SdpaOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("k_cache"), "{e}");
    // Rows with no key give 0 and lse -inf.
    let mut kd = Array4::<f64>::zeros((2, 2, 3, 4));
    let out = attention_with_kvcache(
        q.view(),
        KvCache::Dense {
            k: kd.view_mut(),
            v: vd.view_mut(),
        },
        lens.view(),
        None,
        None,
        &SdpaOptions::default(),
    )
    .unwrap();
    assert!(out.out.iter().all(|&x| x == 0.0) && out.lse.iter().all(|&x| x == f32::NEG_INFINITY));
}

#[test]
fn alibi_window_and_softcap_through_the_cache_equal_the_reference_on_the_gathered_keys() {
    let mut rng = Rng(SplitMix64(0xa11b1));
    let (b_n, hkv, group, lq, e, s_max) = (2, 2, 2, 3, 6, 20);
    let q = rng.array([b_n, hkv * group, lq, e]);
    let k0 = rng.array([b_n, hkv, s_max, e]);
    let v0 = rng.array([b_n, hkv, s_max, e]);
    let lens = Array1::from(vec![11, 17]);
    let slopes =
        ndarray::Array2::from_shape_fn((b_n, hkv * group), |(b, h)| 0.1 * (1 + b + h) as f32);
    let options = SdpaOptions {
        causal: Causal::BottomRight,
        window: sdpa_core::Window { left: 4, right: 0 },
        softcap: Some(2.5),
        enable_gqa: true,
        ..Default::default()
    };
    let (mut kd, mut vd) = (k0.clone(), v0.clone());
    let got = attention_with_kvcache(
        q.view(),
        KvCache::Dense {
            k: kd.view_mut(),
            v: vd.view_mut(),
        },
        lens.view(),
        None,
        Some(slopes.view().into_dyn()),
        &options,
    )
    .unwrap();
    for b in 0..b_n {
        let n = lens[b] as usize;
        let want = sdpa_ref::sdpa_with_alibi(
            q.slice(s![b..b + 1, .., .., ..]),
            k0.slice(s![b..b + 1, .., ..n, ..]),
            v0.slice(s![b..b + 1, .., ..n, ..]),
            None,
            slopes.slice(s![b..b + 1, ..]).into_dyn(),
            &options,
        )
        .unwrap();
        assert_eq!(got.out.slice(s![b..b + 1, .., .., ..]), want.out);
        assert_eq!(got.lse.slice(s![b..b + 1, .., ..]), want.lse);
    }
    // Slopes of the wrong shape are refused by name before anything is read.
    let bad = ndarray::Array1::<f32>::zeros(3);
    let e = attention_with_kvcache(
        q.view(),
        KvCache::Dense {
            k: kd.view_mut(),
            v: vd.view_mut(),
        },
        lens.view(),
        None,
        Some(bad.view().into_dyn()),
        &options,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("alibi_slopes"), "{e}");
}
