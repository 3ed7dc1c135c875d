#![no_main]
//! `cargo fuzz run ring`: see `sdpa_fuzz::ring`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdpa_fuzz::on_one_thread(|| sdpa_fuzz::ring::run(data)));
