#![no_main]
//! `cargo fuzz run nested`: see `sdpa_fuzz::nested`.

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| sdpa_fuzz::on_one_thread(|| sdpa_fuzz::nested::run(data))
);
