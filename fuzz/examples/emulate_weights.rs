//! The CUDA kernels' rounding, emulated on the CPU for differential fuzz inputs:
//! `cargo run --release --example emulate_weights -- FILE...`.
//!
//! Scores and exponentials in f32, the softmax weights rounded to the input dtype before
//! P V (the 16-bit tensor-core GEMM; the math backend stores them in that dtype), the
//! normaliser summed from the unrounded f32 weights, dropout's kept weights scaled by
//! 1/(1-p), the output rounded once; then compared with the f64 reference, against the
//! dtype's preset and against the preset plus `u * max|v| / (1-p)` (the fuzz target's
//! CUDA bound, `cuda_tolerance` in `src/differential.rs`). On the H200's failing inputs
//! of 2026-11-28 (`regressions/differential/efficient_*`) it reproduces the device's
//! reported worst element value for value (VERIFICATION.md, section 1).
use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};
use sdpa_core::DType;
use sdpa_harness::{run, tolerance};

fn rnd(x: f32, dt: DType) -> f32 {
    match dt {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).unwrap();
        let (dt, spec) = sdpa_fuzz::differential::decode(&data).unwrap();
        let case = spec.to_case(dt);
        let truth = run::run_reference_f64(&case).unwrap().out.to_f64();
        let (q, k, v) = (case.q.to_f64(), case.k.to_f64(), case.v.to_f64());
        let sh = q.shape().to_vec();
        let (b_n, hq, l, e) = (sh[0], sh[1], sh[2], sh[3]);
        let (hkv, s, ev) = (k.shape()[1], k.shape()[2], v.shape()[3]);
        let o = case.options;
        // The mask broadcast to [B, Hq, L, S] (numpy rules, as PyTorch's).
        let mask = case.attn_mask.as_ref().map(|m| {
            let full = m.to_f64();
            let full = full
                .broadcast(IxDyn(&[b_n, hq, l, s]))
                .expect("generated masks broadcast")
                .to_owned();
            (matches!(m, sdpa_harness::Tensor::Bool(_)), full)
        });
        let scale = o.scale.unwrap_or(1.0 / (e as f64).sqrt()) as f32;
        let mut out = ArrayD::<f64>::zeros(IxDyn(&[b_n, hq, l, ev]));
        for b in 0..b_n {
            for h in 0..hq {
                let hk = h / (hq / hkv);
                for i in 0..l {
                    let lim = o.causal.key_limit(i, l, s);
                    let mut sc = vec![f32::NEG_INFINITY; s];
                    for j in 0..lim {
                        let mut acc = 0f32;
                        for d in 0..e {
                            acc += q[[b, h, i, d]] as f32 * k[[b, hk, j, d]] as f32;
                        }
                        let mut x = acc * scale;
                        if let Some((is_bool, m)) = &mask {
                            let mv = m[[b, h, i, j]];
                            if *is_bool {
                                if mv == 0.0 {
                                    x = f32::NEG_INFINITY;
                                }
                            } else {
                                x += mv as f32;
                            }
                        }
                        sc[j] = x;
                    }
                    let mx = sc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    if mx == f32::NEG_INFINITY {
                        continue;
                    }
                    let mut sum = 0f32;
                    let mut acc = vec![0f32; ev];
                    for j in 0..s {
                        let p = (sc[j] - mx).exp();
                        sum += p;
                        let n = sdpa_core::dropout::flat_index(b, h, i, j, hq, l, s);
                        if !o.dropout.keeps(n) {
                            continue;
                        }
                        let pr = rnd(p, dt);
                        for d in 0..ev {
                            acc[d] += pr * v[[b, hk, j, d]] as f32;
                        }
                    }
                    let ks = o.dropout.keep_scale() as f32;
                    for d in 0..ev {
                        out[[b, h, i, d]] = rnd(acc[d] * ks / sum, dt) as f64;
                    }
                }
            }
        }
        let preset = tolerance::for_dtype(dt);
        let bound = sdpa_fuzz::differential::cuda_tolerance(dt, &case);
        let vmax = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        let (mut worst, mut at, mut bad_old, mut bad_new, mut worst_ratio_new) =
            (0f64, 0usize, 0, 0, 0f64);
        for (n, (g, t)) in out.iter().zip(truth.iter()).enumerate() {
            let err = (g - t).abs();
            if err > worst {
                worst = err;
                at = n;
            }
            if err > preset.atol + preset.rtol * t.abs() {
                bad_old += 1;
            }
            let bound_new = bound.atol + bound.rtol * t.abs();
            if err > bound_new {
                bad_new += 1;
            }
            worst_ratio_new = worst_ratio_new.max(err / bound_new);
        }
        println!("{dt} p={:.3} keep={:.2} vmax={:.3}: sim max abs err {:.3e} (at flat {at}, got {:.6}, truth {:.6}); outside preset {bad_old}, outside new bound {bad_new} (worst {:.2} of it)",
            o.dropout.p, o.dropout.keep_scale(), vmax, worst, out.iter().nth(at).unwrap(), truth.iter().nth(at).unwrap(), worst_ratio_new);
    }
}
