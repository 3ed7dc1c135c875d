//! Where computations run: the CPU reference, or a CUDA device when one is found.

use crate::error::CliError;
use sdpa_core::{check_support, select, Backend, BackendSet, DType, Device, Problem};
use sdpa_cuda::{DeviceElement, GpuContext, HostMask};
use sdpa_harness::case::Case;
use sdpa_harness::run::{self, RunOutput};
use sdpa_harness::Tensor;

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
        match requested {
            DeviceArg::Cpu => Ok(cpu(None)),
            DeviceArg::Auto => Ok(match GpuContext::new(0) {
                Ok(gpu) => Engine {
                    device: Device::Cuda,
                    gpu: Some(gpu),
                    no_cuda_reason: None,
                },
                Err(e) => cpu(Some(e.to_string())),
            }),
            DeviceArg::Cuda => match GpuContext::new(0) {
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

    /// Runs `case` with `backend` (which must support it here).
    pub fn run(&self, backend: Backend, case: &Case) -> Result<RunOutput, CliError> {
        match &self.gpu {
            None if backend == Backend::Math => Ok(run::run_reference(case)?),
            None => Err(CliError::Usage(format!(
                "--backend: expected a backend that runs on the cpu (math), got {backend}"
            ))),
            Some(gpu) => run_cuda(gpu, backend, case),
        }
    }
}

fn cuda_typed<T: DeviceElement>(
    gpu: &GpuContext,
    backend: Backend,
    case: &Case,
    [q, k, v]: [&ndarray::ArrayD<T>; 3],
    mask: Option<HostMask<'_, T>>,
    wrap: fn(ndarray::ArrayD<T>) -> Tensor,
) -> Result<RunOutput, CliError> {
    let r = gpu.sdpa_host(
        four("q", q)?,
        four("k", k)?,
        four("v", v)?,
        mask.as_ref(),
        &case.options,
        BackendSet::only(backend),
    )?;
    Ok(RunOutput {
        out: wrap(r.out.into_dyn()),
        lse: r.lse.into_dyn(),
    })
}

fn four<'a, T>(
    name: &str,
    a: &'a ndarray::ArrayD<T>,
) -> Result<ndarray::ArrayView4<'a, T>, CliError> {
    a.view()
        .into_dimensionality::<ndarray::Ix4>()
        .map_err(|_| CliError::Usage(format!("{name}: expected 4 dims, got {}", a.ndim())))
}

/// Runs a case on the GPU in its own dtype.
fn run_cuda(gpu: &GpuContext, backend: Backend, case: &Case) -> Result<RunOutput, CliError> {
    let problem = run::problem(case)?;
    macro_rules! dispatch {
        ($variant:ident) => {{
            let (Tensor::$variant(q), Tensor::$variant(k), Tensor::$variant(v)) =
                (&case.q, &case.k, &case.v)
            else {
                unreachable!("run::problem checked that q, k, v share a dtype")
            };
            let mask = match &case.attn_mask {
                Some(Tensor::$variant(m)) => Some(HostMask::Additive(m.view())),
                Some(Tensor::Bool(b)) => Some(HostMask::Bool(b.view())),
                None => None,
                Some(_) => unreachable!("run::problem checked the mask dtype"),
            };
            cuda_typed(gpu, backend, case, [q, k, v], mask, Tensor::$variant)
        }};
    }
    match problem.dtype {
        DType::F64 => dispatch!(F64),
        DType::F32 => dispatch!(F32),
        DType::F16 => dispatch!(F16),
        DType::BF16 => dispatch!(BF16),
    }
}
