//! The command line.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Regenerates golden/ through libtorch 2.11 (tch 0.24). Run it through ci/golden.sh,
/// which pins libtorch's threads and CPU code paths.
#[derive(Debug, Parser)]
#[command(name = "sdpa-golden")]
pub struct Args {
    /// The folder to write: case files and manifest.json, module/, and cuda/ under
    /// `--device cuda`.
    #[arg(long, value_name = "DIR", default_value = "golden")]
    pub out: PathBuf,
    /// Where libtorch runs: `cuda` needs a binary built with SDPA_GOLDEN_CUDA=1 and
    /// writes DIR/cuda/ only.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Only the cases whose name contains SUBSTRING.
    #[arg(long, value_name = "SUBSTRING")]
    pub only: Option<String>,
    /// Print the case names (module cases as module/NAME) and exit; needs no libtorch
    /// environment.
    #[arg(long)]
    pub list: bool,
}

/// Where libtorch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// libtorch's CPU kernels: golden/ and golden/module/.
    Cpu,
    /// Every PyTorch CUDA backend that accepts a case: golden/cuda/.
    Cuda,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_and_flags() {
        Args::command().debug_assert();
        let a = Args::parse_from(["sdpa-golden"]);
        assert_eq!(
            (a.out, a.device, a.only, a.list),
            (PathBuf::from("golden"), Device::Cpu, None, false)
        );
        let a = Args::parse_from([
            "sdpa-golden",
            "--out",
            "x",
            "--device",
            "cuda",
            "--only",
            "gqa",
            "--list",
        ]);
        assert_eq!(
            (a.out, a.device, a.only, a.list),
            (PathBuf::from("x"), Device::Cuda, Some("gqa".into()), true)
        );
    }

    #[test]
    fn a_bad_device_names_the_flag_and_the_choices() {
        let err = Args::try_parse_from(["sdpa-golden", "--device", "tpu"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("'tpu'") && err.contains("--device"), "{err}");
        assert!(err.contains("cpu") && err.contains("cuda"), "{err}");
    }
}
