//! The logic of the fuzz targets, kept out of `fuzz_targets/` so that `cargo test`
//! replays the seed corpora and every committed crash input without libFuzzer
//! (`tests/regressions.rs`). Each `run(data)` takes the raw fuzzer bytes and panics
//! exactly when a property is violated.
//!
//! - [`case_file`]: arbitrary bytes as a case file;
//! - [`api`]: arbitrary shapes, strides, masks and options through `sdpa_ref::sdpa`;
//! - [`nested`]: cu_seqlens validation, pad/unpad round trips, nested vs padded dense;
//! - [`differential`]: small consistent problems, f32/f16/bf16 reference vs f64;
//! - [`kvcache`]: KV-cache calls through the checks and the reference;
//! - [`ring`]: sharding plans and context-parallel calls against the one-device call.

pub mod api;
pub mod case_file;
pub mod differential;
pub mod kvcache;
pub mod nested;
pub mod ring;
mod views;

/// A target's entry point: the raw fuzzer bytes; panics on a violated property.
pub type Target = fn(&[u8]);

/// Every target by name, as `cargo fuzz` and `fuzz/regressions/<name>/` know it.
pub const TARGETS: &[(&str, Target)] = &[
    ("case_file", case_file::run),
    ("api", api::run),
    ("nested", nested::run),
    ("differential", differential::run),
    ("kvcache", kvcache::run),
    ("ring", ring::run),
];

/// Runs `f` on a one-thread rayon pool. The reference parallelises with rayon; called
/// from outside a pool, each parallel loop hands its work to a pool thread and waits,
/// which costs more than the tiny problems themselves. Inside the pool it runs inline.
pub fn on_one_thread(f: impl FnOnce() + Send) {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool")
    })
    .install(f)
}

/// Elements a target lets the reference touch per input: a case file may describe a
/// valid problem of any size, and the fuzzer wants thousands of inputs a second.
pub(crate) const WORK_BUDGET: u128 = 1 << 16;

/// Elements the reference reads, writes or iterates over for a problem of these dims
/// (q, k, v, out, lse, the score rows, one task per batch and head), in `u128` so that
/// no product of `usize`s overflows.
pub(crate) fn work(problem: &sdpa_core::Problem) -> u128 {
    let [b, hq, hkv, l, s, e, ev] = [
        problem.batch,
        problem.heads_q,
        problem.heads_kv,
        problem.len_q,
        problem.len_kv,
        problem.head_dim,
        problem.head_dim_v,
    ]
    .map(|d| d as u128);
    b * hq * l * (e + ev + s + 1) + b * hkv * s * (e + ev) + b * (hq + hkv)
}
