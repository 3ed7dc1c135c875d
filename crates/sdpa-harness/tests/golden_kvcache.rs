//! The KV-cache goldens of `golden/kvcache/` (tools/sdpa-golden's `kvcache`: libtorch 2.11
//! over each batch row's gathered pages, the window and ALiBi as an explicit float mask,
//! a softcap as composed libtorch ops) through the CPU KV-cache reference: `out` within
//! `2 * max|libtorch - truth| + floor` of `out_f64` (DESIGN.md's policy), the lse within
//! `judge::LSE` of `lse_f64`, the appended caches bit for bit equal to `k_cache_after` /
//! `v_cache_after`; and the truth held against the reference run in f64 on the same
//! inputs (two f64 computations of one function agree to rounding).

use sdpa_core::DType;
use sdpa_harness::compare::{compare, compare_with};
use sdpa_harness::golden::kvcache_cases;
use sdpa_harness::kvcase::{run_kvcache, widened};
use sdpa_harness::tolerance::{peer_floor, Tolerance, PEER_FACTOR};
use sdpa_harness::Tensor;

/// The committed KV-cache goldens hold at least this many cases.
const MIN_CASES: usize = 10;

#[test]
fn kvcache_goldens_pass_on_the_cpu_reference() {
    let cases =
        kvcache_cases().unwrap_or_else(|e| panic!("{e} (regenerate with bash ci/golden.sh)"));
    assert!(cases.len() >= MIN_CASES, "{} KV-cache goldens", cases.len());
    let (mut paged, mut appended, mut softcapped, mut alibi, mut windowed) = (0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let dtype = case.q.dtype().expect("floating-point q");
        paged += case.block_table.is_some() as usize;
        appended += case.new.is_some() as usize;
        softcapped += case.options.softcap.is_some() as usize;
        alibi += case.alibi_slopes.is_some() as usize;
        windowed += case.options.window.is_active() as usize;
        let truth = case.result("out_f64").expect("out_f64").to_f64();
        let torch = case.result("out").expect("out");
        assert_eq!(torch.dtype(), Some(dtype), "{name}: libtorch's out");
        let r = run_kvcache(case, &sdpa::Exec::cpu()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let peer = compare(torch.to_f64().view(), truth.view());
        let bound = PEER_FACTOR * peer.max_abs + peer_floor(dtype);
        let ours = compare(r.out.to_f64().view(), truth.view());
        let line = format!(
            "{name}: max|ours - truth| {:.3e}, max|libtorch - truth| {:.3e}, bound {bound:.3e}",
            ours.max_abs, peer.max_abs
        );
        if ours.non_finite > 0 || ours.max_abs.is_nan() || ours.max_abs > bound {
            failures.push(line.clone());
        }
        println!("{line}");
        let lse = compare_with(
            r.lse.mapv(f64::from).view(),
            case.result("lse_f64").expect("lse_f64").to_f64().view(),
            Some(&sdpa_harness::judge::LSE),
        );
        if !lse.passes() {
            failures.push(format!("{name}: lse {lse}"));
        }
        // The truth against the reference in f64 on the same inputs.
        let f64_ref = run_kvcache(&widened(case), &sdpa::Exec::cpu()).unwrap();
        let twin = compare_with(
            f64_ref.out.to_f64().view(),
            truth.view(),
            Some(&Tolerance {
                atol: 1e-12,
                rtol: 1e-10,
                reason: "two f64 computations of one function",
            }),
        );
        if !twin.passes() {
            failures.push(format!("{name}: out_f64 vs the f64 reference: {twin}"));
        }
        for (what, got) in [("k_cache_after", &r.k_cache), ("v_cache_after", &r.v_cache)] {
            match (got, case.result(what)) {
                (Some(got), Some(want)) if got == want => {}
                (None, None) => {}
                (got, want) => failures.push(format!(
                    "{name}: {what}: the run {} a cache, the golden {}; equal: {}",
                    if got.is_some() { "gave" } else { "gave no" },
                    if want.is_some() {
                        "has one"
                    } else {
                        "has none"
                    },
                    got.as_ref().zip(want).is_some_and(|(g, w)| g == w)
                )),
            }
        }
        if dtype == DType::F64 {
            assert!(matches!(case.q, Tensor::F64(_)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The set covers what issue 17 asks of it.
    for (what, n) in [
        ("paged", paged),
        ("append", appended),
        ("softcap", softcapped),
        ("alibi", alibi),
        ("window", windowed),
    ] {
        assert!(n >= 2, "{n} {what} cases");
    }
}
