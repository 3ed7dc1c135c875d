#![no_main]
//! `cargo fuzz run differential`: see `sdpa_fuzz::differential`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdpa_fuzz::on_one_thread(|| {
    sdpa_fuzz::differential::run(data)
}));
