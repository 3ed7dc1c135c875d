#![no_main]
//! `cargo fuzz run case_file`: see `sdpa_fuzz::case_file`.

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| sdpa_fuzz::on_one_thread(|| sdpa_fuzz::case_file::run(data))
);
