//! Where computations run: the CPU reference, or a CUDA device when one is found.

use crate::error::CliError;
use sdpa_core::{check_support, select, Backend, BackendSet, Device, Problem};
use sdpa_harness::case::Case;
use sdpa_harness::run::{self, RunOutput};

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA when a device is found, else the CPU.
    Auto,
    /// The CPU reference.
    Cpu,
    /// A CUDA device (an error when there is none).
    Cuda,
}

/// `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// The first of flash > efficient > math that supports the problem.
    Auto,
    /// Unfused math.
    Math,
    /// Fused flash kernel.
    Flash,
    /// Fused memory-efficient kernel.
    Efficient,
}

impl BackendArg {
    /// The set dispatch may choose from.
    pub fn set(self) -> BackendSet {
        match self {
            BackendArg::Auto => BackendSet::ALL,
            BackendArg::Math => BackendSet::only(Backend::Math),
            BackendArg::Flash => BackendSet::only(Backend::Flash),
            BackendArg::Efficient => BackendSet::only(Backend::Efficient),
        }
    }
}

/// A device ready to run problems.
pub struct Engine {
    /// The device.
    pub device: Device,
    /// Why there is no CUDA device, when there is none.
    pub no_cuda_reason: Option<String>,
}

/// Why CUDA cannot be used in this build or on this machine.
fn cuda_unavailable() -> String {
    "this build of sdpa has no CUDA backend compiled in".to_string()
}

impl Engine {
    /// Picks the device `requested` names.
    ///
    /// # Errors
    /// `--device cuda` where no CUDA device can be used.
    pub fn new(requested: DeviceArg) -> Result<Engine, CliError> {
        let reason = cuda_unavailable();
        match requested {
            DeviceArg::Cuda => Err(CliError::Usage(format!(
                "--device: expected a usable CUDA device, got none ({reason})"
            ))),
            DeviceArg::Auto | DeviceArg::Cpu => Ok(Engine {
                device: Device::Cpu,
                no_cuda_reason: Some(reason),
            }),
        }
    }

    /// The backend `set` picks for `problem` here, or every enabled backend's reason.
    pub fn select(&self, set: BackendSet, problem: &Problem) -> Result<Backend, CliError> {
        Ok(select(set, problem, self.device)?)
    }

    /// Whether `backend` can run `problem` here, with the reason when not.
    pub fn supports(&self, backend: Backend, problem: &Problem) -> Result<(), String> {
        check_support(backend, problem, self.device).map_err(|reason| {
            match (&self.no_cuda_reason, backend) {
                (Some(why), Backend::Flash | Backend::Efficient) => format!("{reason} ({why})"),
                _ => reason,
            }
        })
    }

    /// Runs `case` with `backend` (which must support it here).
    pub fn run(&self, backend: Backend, case: &Case) -> Result<RunOutput, CliError> {
        match (self.device, backend) {
            (Device::Cpu, Backend::Math) => Ok(run::run_reference(case)?),
            (device, backend) => Err(CliError::Usage(format!(
                "--backend: expected a backend that runs on {device}, got {backend}"
            ))),
        }
    }
}
