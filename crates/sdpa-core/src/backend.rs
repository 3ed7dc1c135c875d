use crate::dtype::DType;
use crate::error::{Result, SdpaError};
use crate::problem::{KvLayout, Problem};
use std::fmt;

/// Largest head dim (E and Ev) the fused flash kernel takes.
pub const FLASH_MAX_HEAD_DIM: usize = 256;
/// Largest head dim (E and Ev) the fused memory-efficient kernel takes.
pub const EFFICIENT_MAX_HEAD_DIM: usize = 256;

/// An SDPA implementation strategy, as PyTorch names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// Fused tensor-core kernel with online softmax (f16/bf16, no explicit mask).
    Flash,
    /// Fused memory-efficient kernel (f32/f16/bf16, any mask).
    Efficient,
    /// Unfused math: scores materialised, exact softmax, any dtype.
    Math,
}

impl Backend {
    /// Dispatch order: the first supported one wins.
    pub const PRIORITY: [Backend; 3] = [Backend::Flash, Backend::Efficient, Backend::Math];

    /// Lower-case name (`flash`, `efficient`, `math`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Flash => "flash",
            Backend::Efficient => "efficient",
            Backend::Math => "math",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flash" => Ok(Backend::Flash),
            "efficient" | "mem_efficient" | "memory_efficient" => Ok(Backend::Efficient),
            "math" => Ok(Backend::Math),
            other => Err(format!(
                "expected one of flash, efficient, math, got {other:?}"
            )),
        }
    }
}

/// Where a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU reference.
    Cpu,
    /// A CUDA device.
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// Which backends dispatch may choose: the value form of PyTorch's `sdpa_kernel`
/// context manager. Explicit, never global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendSet {
    bits: u8,
}

impl BackendSet {
    /// Every backend (what `auto` means).
    pub const ALL: BackendSet = BackendSet { bits: 0b111 };
    /// No backend: `select` then fails with an empty reason list.
    pub const EMPTY: BackendSet = BackendSet { bits: 0 };

    fn bit(backend: Backend) -> u8 {
        match backend {
            Backend::Flash => 1,
            Backend::Efficient => 2,
            Backend::Math => 4,
        }
    }

    /// Just `backend`.
    pub fn only(backend: Backend) -> Self {
        BackendSet {
            bits: Self::bit(backend),
        }
    }

    /// This set plus `backend`.
    pub fn with(self, backend: Backend) -> Self {
        BackendSet {
            bits: self.bits | Self::bit(backend),
        }
    }

    /// This set less `backend`.
    pub fn without(self, backend: Backend) -> Self {
        BackendSet {
            bits: self.bits & !Self::bit(backend),
        }
    }

    /// Whether `backend` is enabled.
    pub fn contains(self, backend: Backend) -> bool {
        self.bits & Self::bit(backend) != 0
    }

    /// Enabled backends in dispatch order.
    pub fn iter(self) -> impl Iterator<Item = Backend> {
        Backend::PRIORITY
            .into_iter()
            .filter(move |b| self.contains(*b))
    }
}

impl FromIterator<Backend> for BackendSet {
    fn from_iter<I: IntoIterator<Item = Backend>>(iter: I) -> Self {
        iter.into_iter().fold(BackendSet::EMPTY, BackendSet::with)
    }
}

/// Whether `backend` can run `problem` on `device`; `Err` carries the reason, in the
/// words the tutorial prints next to a backend that cannot run.
///
/// The rules follow PyTorch's `sdp_utils` checks: flash takes f16/bf16, `E == Ev`,
/// `E <= 256` and no explicit mask; efficient takes f32/f16/bf16 and any mask; both
/// need CUDA, non-empty dims and a unit-stride last dim; math takes anything.
pub fn check_support(
    backend: Backend,
    problem: &Problem,
    device: Device,
) -> std::result::Result<(), String> {
    if backend == Backend::Math {
        if problem.kv_layout == KvLayout::Varlen {
            return Err(
                "takes no cu_seqlens (variable-length batches run on flash and efficient)"
                    .to_string(),
            );
        }
        return Ok(());
    }
    if device != Device::Cuda {
        return Err(format!("runs on CUDA only; this call is on the {device}"));
    }
    let (dtypes_ok, dtypes_text, max_dim) = match backend {
        Backend::Flash => (problem.dtype.is_half(), "f16 or bf16", FLASH_MAX_HEAD_DIM),
        _ => (
            problem.dtype != DType::F64,
            "f32, f16 or bf16",
            EFFICIENT_MAX_HEAD_DIM,
        ),
    };
    if !dtypes_ok {
        return Err(format!("needs {dtypes_text} inputs, got {}", problem.dtype));
    }
    if backend == Backend::Flash {
        if problem.head_dim != problem.head_dim_v {
            return Err(format!(
                "needs the same head dim for q/k and v, got E={} and Ev={}",
                problem.head_dim, problem.head_dim_v
            ));
        }
        if problem.mask.is_some() {
            return Err("takes no explicit attn_mask (causal only)".to_string());
        }
    }
    let widest = problem.head_dim.max(problem.head_dim_v);
    if widest > max_dim {
        return Err(format!("takes head dims up to {max_dim}, got {widest}"));
    }
    if problem.is_empty() {
        return Err(format!("needs non-empty dims, got {}", problem.summary()));
    }
    for (name, layout) in [
        ("query", &problem.q),
        ("key", &problem.k),
        ("value", &problem.v),
    ] {
        if !layout.last_dim_contiguous() {
            return Err(format!(
                "needs a unit stride in the last dim of {name}, got {}",
                layout.strides[3]
            ));
        }
    }
    Ok(())
}

/// The first backend of `enabled`, in the order flash > efficient > math, that
/// supports `problem` on `device`.
///
/// # Errors
/// [`SdpaError::NoBackend`] with every enabled backend's reason when none supports it.
pub fn select(enabled: BackendSet, problem: &Problem, device: Device) -> Result<Backend> {
    let mut reasons = Vec::new();
    for backend in enabled.iter() {
        match check_support(backend, problem, device) {
            Ok(()) => return Ok(backend),
            Err(reason) => reasons.push((backend, reason)),
        }
    }
    Err(SdpaError::NoBackend(reasons))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::TensorDesc;
    use crate::mask::{MaskDesc, MaskKind};
    use crate::problem::SdpaOptions;

    fn problem(dtype: DType, e: usize, ev: usize, mask: bool) -> Problem {
        let m = MaskDesc::contiguous(MaskKind::Bool, &[4, 4]);
        Problem::new(
            &TensorDesc::contiguous(dtype, [1, 2, 4, e]),
            &TensorDesc::contiguous(dtype, [1, 2, 4, e]),
            &TensorDesc::contiguous(dtype, [1, 2, 4, ev]),
            mask.then_some(&m),
            &SdpaOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn dispatch_prefers_flash_then_efficient_then_math() {
        let p = problem(DType::F16, 64, 64, false);
        assert_eq!(
            select(BackendSet::ALL, &p, Device::Cuda).unwrap(),
            Backend::Flash
        );
        let masked = problem(DType::F16, 64, 64, true);
        assert_eq!(
            select(BackendSet::ALL, &masked, Device::Cuda).unwrap(),
            Backend::Efficient
        );
        let f64p = problem(DType::F64, 64, 64, false);
        assert_eq!(
            select(BackendSet::ALL, &f64p, Device::Cuda).unwrap(),
            Backend::Math
        );
        assert_eq!(
            select(BackendSet::ALL, &p, Device::Cpu).unwrap(),
            Backend::Math
        );
        let wide = problem(DType::BF16, 320, 320, false);
        assert_eq!(
            select(BackendSet::ALL, &wide, Device::Cuda).unwrap(),
            Backend::Math
        );
        let ev = problem(DType::BF16, 64, 32, false);
        assert_eq!(
            select(BackendSet::ALL, &ev, Device::Cuda).unwrap(),
            Backend::Efficient
        );
    }

    #[test]
    fn unsupported_request_lists_every_reason() {
        let p = problem(DType::F32, 64, 64, true);
        let set = BackendSet::only(Backend::Flash).with(Backend::Efficient);
        let err = select(set, &p, Device::Cpu).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no enabled backend can run this problem: flash: runs on CUDA only; this call is on the cpu; efficient: runs on CUDA only; this call is on the cpu"
        );
        let err = select(BackendSet::only(Backend::Flash), &p, Device::Cuda).unwrap_err();
        assert_eq!(
            err,
            SdpaError::NoBackend(vec![(
                Backend::Flash,
                "needs f16 or bf16 inputs, got f32".into()
            )])
        );
        let masked = problem(DType::F16, 64, 64, true);
        assert_eq!(
            check_support(Backend::Flash, &masked, Device::Cuda).unwrap_err(),
            "takes no explicit attn_mask (causal only)"
        );
        assert!(select(BackendSet::EMPTY, &p, Device::Cpu).is_err());
    }

    #[test]
    fn strided_last_dim_is_refused_by_fused_backends() {
        let mut p = problem(DType::F16, 8, 8, false);
        p.k.strides[3] = 2;
        assert_eq!(
            check_support(Backend::Efficient, &p, Device::Cuda).unwrap_err(),
            "needs a unit stride in the last dim of key, got 2"
        );
        assert!(check_support(Backend::Math, &p, Device::Cuda).is_ok());
    }

    #[test]
    fn backend_set_operations() {
        let s: BackendSet = [Backend::Math, Backend::Flash].into_iter().collect();
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![Backend::Flash, Backend::Math]
        );
        assert!(!s.contains(Backend::Efficient));
        assert_eq!(s.without(Backend::Flash), BackendSet::only(Backend::Math));
        assert_eq!(
            "mem_efficient".parse::<Backend>().unwrap(),
            Backend::Efficient
        );
    }
}
