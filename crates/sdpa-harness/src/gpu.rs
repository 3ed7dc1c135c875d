//! Support for the workspace's GPU test suites (sdpa-cuda, sdpa-nested, sdpa-nn): the
//! one shared device context, random tensors on the host and the device in every dtype,
//! per-dtype dispatch, the proptest runner of device properties, and [`GpuCase`], a
//! [`ProblemSpec`] with the dtype and the knob only device tests turn (a logit shift).
//!
//! # Device tests
//! A test that needs a CUDA device is marked `#[ignore = "needs a CUDA device"]` (slow
//! CPU tests say `slow` instead), so `cargo test` on a machine without one skips it and
//! the GPU bundle (`ci/gpu_run.sh`) runs it with `--ignored`. Run there without a device,
//! [`gpu`] fails the test with the reason: an ignored test that is asked for must not
//! pass silently.
//!
//! ```
//! use sdpa_core::DType;
//! use sdpa_harness::gpu::{random, GpuCase};
//! use sdpa_harness::strategies::{ProblemSpec, SplitMix64};
//!
//! let case = GpuCase::new(DType::F16, ProblemSpec::small_example());
//! let x = case.inputs::<half::f16>();
//! assert_eq!(x.q.shape(), &[2, 4, 17, 16]);
//! let a = random::<f32, _>(&mut SplitMix64(1), (2, 3));
//! assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
//! ```

use crate::elem::Elem;
use crate::strategies::{MaskSpec, ProblemSpec, SplitMix64};
use ndarray::{Array, Array4, ArrayD, Axis, ShapeBuilder};
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use sdpa::{CudaError, DType, DeviceElement, DeviceTensor, GpuContext};
use sdpa_core::{Causal, Dropout, SdpaOptions};

/// The context every GPU test shares: device 0, built once per process by
/// `GpuContext::poisoned_for_tests` with `KernelConfig::from_env()` (so
/// `SDPA_KERNEL_DIR` planted-bug runs and tile overrides reach every suite), outputs
/// poisoned with NaN before every launch so an element a kernel leaves unwritten fails
/// the comparison.
///
/// # Panics
/// Without a usable device (no driver, no NVRTC, no device 0), with the reason: device
/// tests are `#[ignore]`d, so this runs only where a device was asked for.
pub fn gpu() -> &'static GpuContext {
    GpuContext::poisoned_for_tests()
        .unwrap_or_else(|e| panic!("a CUDA device with driver and NVRTC: {e}"))
}

/// An element type of the GPU tests: the reference's ([`Elem`]), with a device twin.
pub trait GpuElem: Elem + DeviceElement {}
impl<T: Elem + DeviceElement> GpuElem for T {}

/// Runs `$body` with `$t` the element type of `$dtype` (`f64`, `f32`, `f16`, `bf16`):
/// the one per-dtype dispatch of the GPU tests.
///
/// ```
/// use sdpa_core::DType;
/// use sdpa_harness::{elem::Elem, with_dtype};
///
/// fn one<T: Elem>() -> f64 { T::narrow(1.0).wide() }
/// assert_eq!(with_dtype!(DType::BF16, T => one::<T>()), 1.0);
/// ```
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::gpu::__private::DType::F64 => {
                type $t = f64;
                $body
            }
            $crate::gpu::__private::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::gpu::__private::DType::F16 => {
                type $t = $crate::gpu::__private::f16;
                $body
            }
            $crate::gpu::__private::DType::BF16 => {
                type $t = $crate::gpu::__private::bf16;
                $body
            }
        }
    };
}

#[doc(hidden)]
pub mod __private {
    pub use half::{bf16, f16};
    pub use sdpa_core::DType;
}

/// `shape` filled with values uniform in `[-1, 1)` from `rng`, rounded to `T`, in
/// standard (row-major) order: the same draws for every dtype.
pub fn random<T: Elem, Sh: ShapeBuilder>(rng: &mut SplitMix64, shape: Sh) -> Array<T, Sh::Dim> {
    uniform(rng, shape, 1.0)
}

/// As [`random`], uniform in `[-bound, bound)` (the scaling before the rounding).
pub fn uniform<T: Elem, Sh: ShapeBuilder>(
    rng: &mut SplitMix64,
    shape: Sh,
    bound: f64,
) -> Array<T, Sh::Dim> {
    Array::from_shape_simple_fn(shape, || T::narrow(rng.symmetric() * bound))
}

/// A [`random`] tensor of `dtype` uploaded to `gpu` (contiguous).
///
/// # Errors
/// The upload's (out of memory, the driver).
pub fn random_device(
    gpu: &GpuContext,
    rng: &mut SplitMix64,
    shape: [usize; 4],
    dtype: DType,
) -> Result<DeviceTensor, CudaError> {
    with_dtype!(dtype, T => DeviceTensor::upload(gpu, random::<T, _>(rng, shape).view()))
}

/// The proptest runner of a device property: `PROPTEST_CASES` cases (else
/// `default_cases`: device suites pick their own), no failure persistence (a failing
/// case prints its value, which replays it).
pub fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: crate::strategies::proptest_cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `test` over `strategy` with [`runner`]; panics with the (shrunk) failing case.
pub fn property<S: Strategy>(
    default_cases: u32,
    strategy: &S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    if let Err(e) = runner(default_cases).run(strategy, test) {
        panic!("{e}");
    }
}

/// A problem of the GPU suites: a [`ProblemSpec`], the dtype its inputs are rounded to,
/// and a logit shift.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuCase {
    /// The dtype of q, k, v and an additive mask.
    pub dtype: DType,
    /// Dimensions, mask, options, data seed.
    pub problem: ProblemSpec,
    /// A common offset added to every score before scaling (`q[.., 0] = sqrt|shift|`,
    /// `k[.., 0] = +-sqrt|shift|`): the softmax is unchanged, but exp of the raw scores
    /// overflows (or underflows) unless the kernel subtracts the row max. 0: none.
    pub logit_shift: f64,
    /// ALiBi slopes ([`GpuCase::alibi_slopes`]) added after the softcap.
    pub alibi: bool,
}

/// The inputs of a [`GpuCase`], rounded to `T`.
#[derive(Debug, Clone)]
pub struct GpuInputs<T> {
    /// `[B, Hq, L, E]`.
    pub q: Array4<T>,
    /// `[B, Hkv, S, E]`.
    pub k: Array4<T>,
    /// `[B, Hkv, S, Ev]`.
    pub v: Array4<T>,
    /// Bool mask, if the problem has one.
    pub bool_mask: Option<ArrayD<bool>>,
    /// Additive mask in `T`, if the problem has one.
    pub additive_mask: Option<ArrayD<T>>,
}

impl GpuCase {
    /// `problem` in `dtype`, no logit shift.
    pub fn new(dtype: DType, problem: ProblemSpec) -> Self {
        GpuCase {
            dtype,
            problem,
            logit_shift: 0.0,
            alibi: false,
        }
    }

    /// ALiBi's geometric slopes `2^(-8 (h + 1) / Hq)`, `[Hq]`, when the case has ALiBi.
    pub fn alibi_slopes(&self) -> Option<ndarray::ArrayD<f32>> {
        let hq = self.problem.heads_kv * self.problem.group;
        self.alibi
            .then(|| ndarray::Array1::from_vec(sdpa_core::geometric_alibi_slopes(hq)).into_dyn())
    }

    /// The problem's inputs ([`ProblemSpec::inputs`]), shifted, rounded to `T`.
    pub fn inputs<T: Elem>(&self) -> GpuInputs<T> {
        let mut x = self.problem.inputs();
        if self.logit_shift != 0.0 {
            let c = self.logit_shift.abs().sqrt();
            x.q.index_axis_mut(Axis(3), 0).fill(c);
            x.k.index_axis_mut(Axis(3), 0)
                .fill(c * self.logit_shift.signum());
        }
        GpuInputs {
            q: x.q.mapv(T::narrow),
            k: x.k.mapv(T::narrow),
            v: x.v.mapv(T::narrow),
            bool_mask: x.bool_mask,
            additive_mask: x.additive_mask.map(|m| m.mapv(T::narrow)),
        }
    }
}

/// Head dims of the device properties: the kernels' tile classes and odd ones between.
pub const HEAD_DIMS: [usize; 14] = [8, 16, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 200, 256];
/// Sequence lengths of the device properties (besides any in `1..260`): around the tiles.
pub const LENGTHS: [usize; 10] = [1, 2, 17, 63, 64, 65, 97, 113, 127, 200];
/// `keep` of a generated bool mask.
pub const BOOL_KEEP: f64 = 0.75;
/// `neg_inf` of a generated additive mask.
pub const ADDITIVE_NEG_INF: f64 = 0.15;

/// The mask of a device case: `kind` 0 none, 1 bool, 2 additive; `axes` the axes of
/// `[B, Hq, L, S]` the mask has (the others broadcast, extent 1; always rank 4).
pub fn mask_spec(kind: u8, axes: [bool; 4], full: [usize; 4]) -> MaskSpec {
    let shape: Vec<usize> = (0..4).map(|a| if axes[a] { full[a] } else { 1 }).collect();
    match kind {
        1 => MaskSpec::Bool {
            shape,
            keep: BOOL_KEEP,
        },
        2 => MaskSpec::Additive {
            shape,
            neg_inf: ADDITIVE_NEG_INF,
        },
        _ => MaskSpec::None,
    }
}

/// Device cases in one of `dtypes`: B <= 2, Hkv <= 2, groups of 1 to 3 (GQA on above
/// 1), L and S from [`LENGTHS`] or `1..260`, E and Ev from [`HEAD_DIMS`] (`Ev = E` when
/// `same_dims`), explicit masks only when `masks`, any causal alignment, dropout p of 0,
/// 1 or in `[0.05, 0.7)`, scale default or in `[-1.5, 1.5)`.
pub fn gpu_case(
    dtypes: Vec<DType>,
    masks: bool,
    same_dims: bool,
) -> impl Strategy<Value = GpuCase> {
    use proptest::prelude::*;
    let len = prop_oneof![proptest::sample::select(LENGTHS.to_vec()), 1usize..260];
    (
        proptest::sample::select(dtypes),
        (1usize..=2, 1usize..=2, 1usize..=3),
        len.clone(),
        len,
        proptest::sample::select(HEAD_DIMS.to_vec()),
        proptest::sample::select(HEAD_DIMS.to_vec()),
        if masks { 0u8..=2 } else { 0u8..=0 },
        any::<[bool; 4]>(),
        (
            0u8..3,
            prop_oneof![Just(0.0), 0.05f64..0.7, Just(1.0)],
            any::<u64>(),
            0u64..1 << 40,
        ),
        prop_oneof![Just(None), (-1.5f64..1.5).prop_map(Some)],
        any::<u64>(),
    )
        .prop_map(
            move |(
                dtype,
                (batch, heads_kv, group),
                len_q,
                len_kv,
                e,
                ev,
                mask_kind,
                mask_axes,
                (causal, p, dropout_seed, offset),
                scale,
                data_seed,
            )| {
                let full = [batch, heads_kv * group, len_q, len_kv];
                GpuCase::new(
                    dtype,
                    ProblemSpec {
                        batch,
                        heads_kv,
                        group,
                        len_q,
                        len_kv,
                        head_dim: e,
                        head_dim_v: if same_dims { e } else { ev },
                        mask: mask_spec(mask_kind, mask_axes, full),
                        options: SdpaOptions {
                            causal: [Causal::None, Causal::TopLeft, Causal::BottomRight]
                                [causal as usize],
                            dropout: Dropout::new(p, dropout_seed, offset),
                            scale,
                            enable_gqa: group > 1,
                            ..Default::default()
                        },
                        data_seed,
                    },
                )
            },
        )
}

/// [`gpu_case`] with a sliding window (each side unbounded, 0 or up to 80 keys), a
/// softcap (none, or 0.5 to 30) and ALiBi slopes, each drawn independently: DESIGN.md's
/// "Inference" options on every backend.
pub fn gpu_case_mods(
    dtypes: Vec<DType>,
    masks: bool,
    same_dims: bool,
) -> impl Strategy<Value = GpuCase> {
    use proptest::prelude::*;
    let side = prop_oneof![Just(-1i64), Just(0i64), 1i64..80];
    (
        gpu_case(dtypes, masks, same_dims),
        side.clone(),
        side,
        prop_oneof![Just(None), (0.5f64..30.0).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(mut case, left, right, softcap, alibi)| {
            case.problem.options.window = sdpa_core::Window { left, right };
            case.problem.options.softcap = softcap;
            case.alibi = alibi;
            case
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use proptest::strategy::ValueTree;

    #[test]
    fn inputs_are_the_problem_inputs_rounded_then_shifted() {
        let spec = ProblemSpec {
            mask: MaskSpec::Additive {
                shape: vec![2, 1, 17, 23],
                neg_inf: ADDITIVE_NEG_INF,
            },
            ..ProblemSpec::small_example()
        };
        let f64_inputs = spec.inputs();
        let plain = GpuCase::new(DType::BF16, spec.clone()).inputs::<bf16>();
        assert_eq!(plain.q, f64_inputs.q.mapv(bf16::narrow));
        assert_eq!(plain.v, f64_inputs.v.mapv(bf16::narrow));
        let add = f64_inputs.additive_mask.unwrap();
        assert_eq!(plain.additive_mask.unwrap(), add.mapv(bf16::narrow));
        assert!(plain.bool_mask.is_none());

        let shifted = GpuCase {
            logit_shift: -4096.0,
            ..GpuCase::new(DType::F32, spec)
        }
        .inputs::<f32>();
        assert!(shifted.q.index_axis(Axis(3), 0).iter().all(|&x| x == 64.0));
        assert!(shifted.k.index_axis(Axis(3), 0).iter().all(|&x| x == -64.0));
        // Only the first feature moves.
        assert_eq!(
            shifted.q.index_axis(Axis(3), 1),
            f64_inputs.q.index_axis(Axis(3), 1).mapv(|x| x as f32)
        );
    }

    #[test]
    fn random_draws_the_same_values_in_every_dtype_and_rank() {
        let a = random::<f64, _>(&mut SplitMix64(3), (2, 3, 4));
        let b = random::<f16, _>(&mut SplitMix64(3), [1, 2, 3, 4]);
        assert_eq!(
            a.mapv(f16::narrow)
                .into_shape_with_order((1, 2, 3, 4))
                .unwrap(),
            b
        );
        let mut rng = SplitMix64(3);
        let first = rng.symmetric();
        assert_eq!(a[[0, 0, 0]], first);
        let scaled = uniform::<f64, _>(&mut SplitMix64(3), 4, 0.5);
        assert_eq!(scaled[0], first * 0.5);
    }

    #[test]
    fn with_dtype_picks_the_element_type() {
        fn size<T: GpuElem>() -> (usize, DType) {
            (std::mem::size_of::<T>(), <T as DeviceElement>::DTYPE)
        }
        for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
            let (bytes, got) = with_dtype!(dtype, T => size::<T>());
            assert_eq!(got, dtype);
            assert_eq!(bytes, dtype.size_bytes());
        }
    }

    #[test]
    fn generated_cases_agree_with_themselves() {
        let strategy = gpu_case(vec![DType::F16, DType::F32], true, false);
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut kinds = [0usize; 3];
        for _ in 0..200 {
            let case = strategy.new_tree(&mut runner).unwrap().current();
            let p = &case.problem;
            assert!(matches!(case.dtype, DType::F16 | DType::F32));
            assert_eq!(p.options.enable_gqa, p.group > 1);
            assert!(HEAD_DIMS.contains(&p.head_dim) && HEAD_DIMS.contains(&p.head_dim_v));
            assert!((1..260).contains(&p.len_q) && (1..260).contains(&p.len_kv));
            let full = [p.batch, p.heads_q(), p.len_q, p.len_kv];
            match &p.mask {
                MaskSpec::None => kinds[0] += 1,
                MaskSpec::Bool { shape, keep } => {
                    kinds[1] += 1;
                    assert_eq!(*keep, BOOL_KEEP);
                    assert!(shape.iter().zip(full).all(|(&s, f)| s == 1 || s == f));
                }
                MaskSpec::Additive { shape, neg_inf } => {
                    kinds[2] += 1;
                    assert_eq!(*neg_inf, ADDITIVE_NEG_INF);
                    assert!(shape.iter().zip(full).all(|(&s, f)| s == 1 || s == f));
                }
            }
            assert_eq!(case.logit_shift, 0.0);
        }
        assert!(kinds.iter().all(|&n| n > 0), "{kinds:?}");
        let flash = gpu_case(vec![DType::BF16], false, true);
        for _ in 0..50 {
            let case = flash.new_tree(&mut runner).unwrap().current();
            assert_eq!(case.problem.mask, MaskSpec::None);
            assert_eq!(case.problem.head_dim, case.problem.head_dim_v);
        }
    }

    #[test]
    fn mask_spec_is_rank_four_with_broadcast_axes() {
        assert_eq!(mask_spec(0, [true; 4], [2, 3, 4, 5]), MaskSpec::None);
        assert_eq!(
            mask_spec(1, [true, false, true, false], [2, 3, 4, 5]),
            MaskSpec::Bool {
                shape: vec![2, 1, 4, 1],
                keep: BOOL_KEEP
            }
        );
    }
}
