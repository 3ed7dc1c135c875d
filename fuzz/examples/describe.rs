//! Prints the problem each differential fuzz input decodes to (dtype, dims, mask,
//! options), for triaging crash files: `cargo run --example describe -- FILE...`.

fn main() {
    for path in std::env::args().skip(1) {
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        };
        match sdpa_fuzz::differential::describe(&data) {
            Some(text) => println!("{path}: {text}"),
            None => println!("{path}: too short to decode (the target skips it)"),
        }
    }
}
