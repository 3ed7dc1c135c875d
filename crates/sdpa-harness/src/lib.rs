//! The verification harness: case files (safetensors) and the dynamic [`Tensor`],
//! tolerance presets with their reasons, comparison reports, proptest strategies that
//! generate consistent SDPA problems, and the driver that runs a case through the CPU
//! reference.
//!
//! ```
//! use sdpa_harness::{case::Case, run, strategies::ProblemSpec, compare, tolerance};
//!
//! // A small causal GQA problem with a bool mask, generated deterministically.
//! let spec = ProblemSpec::small_example();
//! let case: Case = spec.to_case(sdpa_core::DType::F16);
//! let bytes = case.to_bytes()?;
//! let replayed = Case::from_bytes(&bytes)?;
//! assert_eq!(replayed, case);
//!
//! let got = run::run_reference(&replayed)?;
//! let truth = run::run_reference_f64(&replayed)?;
//! let report = compare::compare_with(
//!     got.out.to_f64().view(),
//!     truth.out.to_f64().view(),
//!     Some(&tolerance::F16),
//! );
//! assert!(report.passes(), "{report}");
//! # Ok::<(), sdpa_harness::HarnessError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod case;
pub mod compare;
pub mod elem;
mod error;
pub mod golden;
pub mod gpu;
pub mod judge;
pub mod kvcase;
pub mod run;
pub mod strategies;
mod tensor;
pub mod tolerance;

pub use error::{HarnessError, Result};
pub use tensor::Tensor;
