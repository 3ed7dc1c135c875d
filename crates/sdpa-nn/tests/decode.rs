//! Incremental decoding (`CausalSelfAttention::decode` over a `ModuleCache`): one token
//! at a time, or a prompt then tokens, it gives the rows of the full forward over the
//! whole sequence (causal and not); a full cache and training mode are refused. The
//! full causal forward is the training-mode one at dropout 0: in eval mode the module
//! follows the PyTorch tutorial, which turns `is_causal` off there.

use ndarray::{s, Array1, Array2, Array3};
use sdpa::Exec;
use sdpa_core::rng::SplitMix64;
use sdpa_nn::{CausalSelfAttention, Linear, ModuleCache};

fn module(is_causal: bool, rng: &mut SplitMix64) -> CausalSelfAttention<f64> {
    let e = 16;
    let mut m = |rows, cols| Array2::from_shape_simple_fn((rows, cols), || 0.3 * rng.symmetric());
    let c_attn = Linear::new(m(3 * e, e), Some(Array1::from_elem(3 * e, 0.01))).unwrap();
    let c_proj = Linear::new(m(e, e), Some(Array1::from_elem(e, -0.02))).unwrap();
    CausalSelfAttention::new(c_attn, c_proj, 4, 0.0, is_causal).unwrap()
}

#[test]
fn decoding_token_by_token_equals_the_full_forward() {
    let mut rng = SplitMix64(0xdec);
    for is_causal in [true, false] {
        let mut m = module(is_causal, &mut rng);
        let (b, t) = (3, 11);
        let x = Array3::from_shape_simple_fn((b, t, 16), || rng.symmetric());
        // Training mode at dropout 0 keeps the module's causal flag (eval mode drops it).
        let full = m.forward(x.view()).unwrap();
        m.eval();
        // A prompt of 4 tokens, then one at a time.
        let mut cache = ModuleCache::new(b, 4, t, 4).unwrap();
        let mut got = m
            .decode(x.slice(s![.., ..4, ..]), &mut cache, &Exec::cpu())
            .unwrap();
        for i in 4..t {
            let y = m
                .decode(x.slice(s![.., i..i + 1, ..]), &mut cache, &Exec::cpu())
                .unwrap();
            got = ndarray::concatenate(ndarray::Axis(1), &[got.view(), y.view()]).unwrap();
        }
        assert_eq!(cache.lens(), vec![t; b]);
        if is_causal {
            // Each prefix sees what the full causal forward's row sees.
            let err = (&got - &full).mapv(f64::abs).fold(0.0f64, |a, &x| a.max(x));
            assert!(err < 1e-12, "causal: max error {err}");
        } else {
            // Non-causal: the last token's row sees the whole sequence, as in the full call.
            let err = (&got.slice(s![.., t - 1, ..]) - &full.slice(s![.., t - 1, ..]))
                .mapv(f64::abs)
                .fold(0.0f64, |a, &x| a.max(x));
            assert!(err < 1e-12, "non-causal last row: max error {err}");
        }
        // The cache is full: one more token is refused by row, and the cache is unchanged.
        let e = m
            .decode(x.slice(s![.., ..1, ..]), &mut cache, &Exec::cpu())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cache_seqlens") && e.contains("batch row 0"),
            "{e}"
        );
        assert_eq!(cache.lens(), vec![t; b]);
    }
    let mut m = module(true, &mut rng);
    m.train();
    let mut cache = ModuleCache::new(1, 4, 4, 4).unwrap();
    let x = Array3::<f64>::zeros((1, 1, 16));
    let e = m
        .decode(x.view(), &mut cache, &Exec::cpu())
        .unwrap_err()
        .to_string();
    assert!(e.contains("eval mode"), "{e}");
}
