//! tch links libtorch_cuda only if some symbol of it is used, and under the linker's
//! default `--as-needed` none is: the binary would run on the CPU even on a GPU machine.
//! `SDPA_GOLDEN_CUDA=1` keeps libtorch_cuda as a dependency. Off by default, because
//! loading libtorch_cuda needs the whole CUDA stack of the torch wheel (cuDNN, cuBLAS,
//! NCCL, ...), which the CPU goldens do not.
fn main() {
    println!("cargo:rerun-if-env-changed=SDPA_GOLDEN_CUDA");
    if std::env::var("SDPA_GOLDEN_CUDA").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    }
}
