#![no_main]
//! `cargo fuzz run kvcache`: see `sdpa_fuzz::kvcache`.

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| sdpa_fuzz::on_one_thread(|| sdpa_fuzz::kvcache::run(data))
);
