//! `sdpa-golden`: regenerates `golden/` through libtorch 2.11 (tch 0.24).
//!
//! For every case of [`cases::all`] it draws the inputs from a fixed seed (in Rust,
//! byte-stable), runs libtorch's CPU `scaled_dot_product_attention` in the case dtype
//! (`out`, the peer result of the 2x rule), libtorch's math path on the inputs upcast to
//! f64 (`out_f64`, truth), the log-sum-exp where libtorch returns one (`lse`) and the f64
//! log-sum-exp of the masked scaled scores (`lse_f64`), and writes one safetensors file
//! per case plus `manifest.json`; [`module`] writes `golden/module/`, [`backward`]
//! `golden/backward/` (libtorch's autograd: `dq`, `dk`, `dv`, `dmask` and their f64
//! truth), [`kvcache`] `golden/kvcache/` (KV-cache cases: pages gathered, window and
//! ALiBi as an explicit float mask, softcap as composed libtorch ops). Run it through `ci/golden.sh`, which pins what makes
//! libtorch reproducible (one thread, MKL's CNR mode, one CPU code path).
//!
//! ```text
//! sdpa-golden [--out DIR] [--device cpu|cuda] [--only SUBSTRING] [--list]
//! ```
//! `--device cuda` (a binary built with `SDPA_GOLDEN_CUDA=1`, on a machine with a GPU
//! and torch 2.11's CUDA libraries) writes `DIR/cuda/`: for every f32/f16/bf16 case,
//! the result of each PyTorch CUDA backend that accepts it.

mod args;
mod backward;
mod cases;
mod cuda;
mod inputs;
mod kvcache;
mod manifest;
mod module;
mod torch;
mod write;

use args::{Args, Device};
use cases::Case;
use clap::Parser;
use sdpa_core::Causal;
use std::path::Path;
use tch::Tensor;

type Result<T> = std::result::Result<T, String>;

/// The environment that pins libtorch's CPU arithmetic. Thread counts and the MKL and
/// oneDNN modes are read when the libraries load, before `main`, so they must come
/// from the caller (ci/golden.sh sets them).
pub const PINNED_ENV: [(&str, &str); 5] = [
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("MKL_CBWR", "COMPATIBLE"),
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
];

fn check_env() -> Result<()> {
    for (name, want) in PINNED_ENV {
        let have = std::env::var(name).unwrap_or_default();
        if have != want {
            return Err(format!(
                "{name}: expected {want:?}, got {have:?}; run through ci/golden.sh, which pins \
                 libtorch's threads and CPU code paths so the files come out byte for byte"
            ));
        }
    }
    Ok(())
}

/// `(version, git_version)` of the libtorch this process loaded, read from the wheel's
/// `torch/version.py` next to the mapped `libtorch_cpu.so`.
fn libtorch_version() -> Result<(String, String)> {
    let maps =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let lib = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .ok_or("libtorch_cpu.so is not mapped into this process")?;
    let torch_dir = Path::new(lib)
        .parent()
        .and_then(Path::parent)
        .ok_or("libtorch_cpu.so has no torch/ folder above it")?;
    let text = std::fs::read_to_string(torch_dir.join("version.py"))
        .map_err(|e| format!("{}: {e}", torch_dir.join("version.py").display()))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split('\'').nth(1))
            .map(str::to_owned)
            .ok_or(format!("version.py has no {name}"))
    };
    let version = field("__version__")?;
    if !version.starts_with("2.11.0") {
        return Err(format!(
            "libtorch: expected 2.11.0 (tch 0.24), got {version}"
        ));
    }
    Ok((version, field("git_version")?))
}

pub fn metadata(case: &Case, torch_backend: &str) -> Vec<(String, String)> {
    let mut m = vec![
        ("name".to_owned(), case.name.clone()),
        (
            "is_causal".to_owned(),
            (case.causal == Causal::TopLeft).to_string(),
        ),
        ("causal".to_owned(), case.causal.name().to_owned()),
        ("dropout_p".to_owned(), format!("{}", case.dropout.p)),
        ("seed".to_owned(), case.dropout.seed.to_string()),
        ("offset".to_owned(), case.dropout.offset.to_string()),
        ("enable_gqa".to_owned(), case.enable_gqa.to_string()),
        ("torch_backend".to_owned(), torch_backend.to_owned()),
    ];
    if let Some(scale) = case.scale {
        m.push(("scale".to_owned(), format!("{scale:?}")));
    }
    m
}

/// Progress over every case this run generates: shown on a terminal (stderr), hidden
/// otherwise (CI logs stay as they were).
pub fn progress() -> &'static indicatif::ProgressBar {
    static BAR: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();
    BAR.get_or_init(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
                .expect("a valid template"),
        );
        bar
    })
}

/// One case done.
pub fn tick(name: &str) {
    progress().set_message(name.to_string());
    progress().inc(1);
}

fn run() -> Result<()> {
    let args = Args::parse();
    let mut cases = cases::all();
    let mut backward_cases = backward::all();
    for (folder, list) in [("golden/", &cases), ("golden/backward/", &backward_cases)] {
        let mut names = std::collections::BTreeSet::new();
        for c in list {
            if !names.insert(c.name.clone()) {
                return Err(format!("two cases of {folder} are named {}", c.name));
            }
        }
    }
    let mut module_cases = module::all();
    let mut kv_cases = kvcache::all();
    if let Some(only) = &args.only {
        kv_cases.retain(|c| c.name.contains(only.as_str()));
        cases.retain(|c| c.name.contains(only.as_str()));
        backward_cases.retain(|c| c.name.contains(only.as_str()));
        module_cases.retain(|c| c.name.contains(only.as_str()));
    }
    if args.list {
        for c in &cases {
            println!("{}", c.name);
        }
        for c in &module_cases {
            println!("module/{}", c.name);
        }
        for c in &backward_cases {
            println!("backward/{}", c.name);
        }
        for c in &kv_cases {
            println!("kvcache/{}", c.name);
        }
        return Ok(());
    }
    check_env()?;
    tch::set_num_threads(1);
    tch::set_num_interop_threads(1);
    let (version, git_version) = libtorch_version()?;

    if args.device == Device::Cuda {
        let non_f64 = cases.iter().filter(|c| c.dtype != cases::DType::F64);
        progress().set_length(non_f64.count() as u64);
        let r = cuda::generate(&cases, &args.out.join("cuda"), &version);
        progress().finish_and_clear();
        return r;
    }
    progress().set_length(
        (cases.len() + module_cases.len() + backward_cases.len() + kv_cases.len()) as u64,
    );

    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut entries = Vec::new();
    let mut total = 0usize;
    for case in &cases {
        let x = inputs::make_inputs(case);
        let r = torch::run_cpu(case, &x)?;
        let mut tensors: Vec<(&str, &Tensor)> = vec![("q", &x.q), ("k", &x.k), ("v", &x.v)];
        if let Some(m) = &x.stored_mask {
            tensors.push(("attn_mask", m));
        }
        tensors.push(("out", &r.out));
        tensors.push(("out_f64", &r.out_f64));
        if let Some(lse) = &r.lse {
            tensors.push(("lse", lse));
        }
        tensors.push(("lse_f64", &r.lse_f64));
        let file = format!("{}.safetensors", case.name);
        let bytes = write::case_file(
            &args.out.join(&file),
            &tensors,
            &metadata(case, &r.torch_backend),
        )?;
        total += bytes;
        entries.push(manifest::attention_case(case, &r, &file, bytes));
        tick(&case.name);
    }
    manifest::write(
        &args.out,
        &manifest::dense(&version, &git_version, entries, total),
    )?;
    eprintln!(
        "sdpa-golden: {} cases, {:.2} MB, libtorch {version}, into {}",
        cases.len(),
        total as f64 / 1e6,
        args.out.display()
    );
    if !module_cases.is_empty() {
        module::generate(&module_cases, &args.out.join("module"), &version)?;
    }
    if !backward_cases.is_empty() {
        backward::generate(
            &backward_cases,
            &args.out.join("backward"),
            &version,
            &git_version,
        )?;
    }
    if !kv_cases.is_empty() {
        kvcache::generate(&kv_cases, &args.out.join("kvcache"), &version)?;
    }
    progress().finish_and_clear();
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("sdpa-golden: {e}");
        std::process::exit(1);
    }
}
