#![no_main]
//! `cargo fuzz run api`: see `sdpa_fuzz::api`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sdpa_fuzz::on_one_thread(|| sdpa_fuzz::api::run(data)));
