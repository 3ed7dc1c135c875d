//! Where computations run: the CPU reference, or a CUDA device when one is found.

use crate::error::CliError;
use sdpa::{Exec, GpuContext, KernelConfig};
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
    /// The CUDA context when running on CUDA.
    pub gpu: Option<GpuContext>,
    /// Why there is no CUDA device, when `auto` fell back to the CPU.
    pub no_cuda_reason: Option<String>,
}

impl Engine {
    /// Picks the device `requested` names.
    ///
    /// # Errors
    /// `--device cuda` where no CUDA device can be used (no driver, no NVRTC, no GPU).
    pub fn new(requested: DeviceArg) -> Result<Engine, CliError> {
        let cpu = |reason| Engine {
            device: Device::Cpu,
            gpu: None,
            no_cuda_reason: reason,
        };
        if requested == DeviceArg::Cpu {
            return Ok(cpu(None));
        }
        // A malformed SDPA_* variable is the user's error, not a reason to fall back.
        let config = KernelConfig::from_env()?;
        let open = || {
            let gpu = GpuContext::with_config(0, config.clone())?;
            // A cache folder another user could write is not used; say so once.
            if let Some(why) = gpu.disk_cache_refused() {
                eprintln!("warning: kernel disk cache off, compiling in this process: {why}");
            }
            Ok::<_, sdpa::CudaError>(gpu)
        };
        match requested {
            DeviceArg::Cpu => Ok(cpu(None)),
            DeviceArg::Auto => Ok(match open() {
                Ok(gpu) => Engine {
                    device: Device::Cuda,
                    gpu: Some(gpu),
                    no_cuda_reason: None,
                },
                Err(e) => cpu(Some(e.to_string())),
            }),
            DeviceArg::Cuda => match open() {
                Ok(gpu) => Ok(Engine {
                    device: Device::Cuda,
                    gpu: Some(gpu),
                    no_cuda_reason: None,
                }),
                Err(e) => Err(CliError::Usage(format!(
                    "--device: expected a usable CUDA device, got none ({e})"
                ))),
            },
        }
    }

    /// A short description: `cpu`, or `cuda (NVIDIA H200, sm_90)`.
    pub fn describe(&self) -> String {
        match &self.gpu {
            Some(gpu) => format!("cuda ({}, sm_{})", gpu.name(), gpu.arch()),
            None => self.device.to_string(),
        }
    }

    /// The backend `set` picks for `problem` here, or every enabled backend's reason.
    pub fn select(&self, set: BackendSet, problem: &Problem) -> Result<Backend, CliError> {
        Ok(select(set, problem, self.device)?)
    }

    /// Whether `backend` has a backward for `problem` here, with the reason when not: on
    /// CUDA flash's tensor-core backward and efficient's fused one where
    /// `select_backward` takes them; math everywhere (the reference on the CPU).
    pub fn backward_support(&self, backend: Backend, problem: &Problem) -> Result<(), String> {
        match (&self.gpu, backend) {
            (_, Backend::Math) => Ok(()),
            (Some(_), _) => sdpa_cuda::select_backward(problem, BackendSet::only(backend), None)
                .map(drop)
                .map_err(|e| e.to_string()),
            (None, _) => self.supports(backend, problem),
        }
    }

    /// Whether `backend` can run `problem` here, with the reason when not.
    pub fn supports(&self, backend: Backend, problem: &Problem) -> Result<(), String> {
        check_support(backend, problem, self.device).map_err(|reason| {
            match (&self.no_cuda_reason, backend) {
                (Some(why), Backend::Flash | Backend::Efficient) => {
                    format!("{reason} (no CUDA device: {why})")
                }
                _ => reason,
            }
        })
    }

    /// Where calls run, with only `backend` enabled.
    pub fn exec(&self, backend: Backend) -> Exec<'_> {
        let exec = match &self.gpu {
            Some(gpu) => Exec::cuda(gpu),
            None => Exec::cpu(),
        };
        exec.with_backends(BackendSet::only(backend))
    }

    /// Runs `case` with `backend` (which must support it here).
    pub fn run(&self, backend: Backend, case: &Case) -> Result<RunOutput, CliError> {
        if self.gpu.is_none() && backend != Backend::Math {
            return Err(CliError::Usage(format!(
                "--backend: expected a backend that runs on the cpu (math), got {backend}"
            )));
        }
        Ok(run::run_case(case, &self.exec(backend))?)
    }
}
