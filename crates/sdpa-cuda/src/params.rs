//! The kernels' parameter family, mirrored from `kernels/common/params.cuh`:
//! [`FwdParams`] for every forward kernel and [`BwdParams`] extending it for the
//! backward (FlashAttention's `Flash_bwd_params : Flash_fwd_params`), with
//! `#[repr(i32)]` codes for the run-time switches. One builder,
//! [`FwdParams::build`], fills the struct for dense and variable-length problems after
//! checking every tensor against its buffer and the problem.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::tensor::{DeviceMask, DeviceSeqlens, DeviceSlopes, DeviceTensor};
use cudarc::driver::DeviceRepr;
use sdpa_core::{Causal, DType, MaskKind, Problem};

/// Causal alignment as the kernels read it (`enum CausalCode` in the `.cuh`).
#[repr(i32)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CausalCode {
    /// No causal masking.
    #[default]
    None = 0,
    /// PyTorch's `is_causal`: row i sees keys `0..=i`.
    TopLeft = 1,
    /// FlashAttention's: row i sees keys `0..=i + S - L`.
    BottomRight = 2,
}

/// The mask as the kernels read it (`enum MaskCode`).
#[repr(i32)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaskCode {
    /// No `attn_mask`.
    #[default]
    None = 0,
    /// Bool, one byte an element: nonzero takes part.
    Bool = 1,
    /// Additive, in the query's element type.
    Additive = 2,
}

/// Where sequences start (`enum SeqlenCode`).
#[repr(i32)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeqlenCode {
    /// Dense: every sequence has the problem's length, strides give the batch.
    #[default]
    Dense = 0,
    /// Packed rows, `cu_seqlens` as `u32`.
    VarlenU32 = 1,
    /// Packed rows, `cu_seqlens` as `i32`.
    VarlenI32 = 2,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[allow(missing_docs)]
pub struct FwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub mask: u64,
    pub cu_seqlens_q: u64,
    pub cu_seqlens_k: u64,
    pub q_stride_b: i64,
    pub q_stride_h: i64,
    pub q_stride_l: i64,
    pub q_stride_e: i64,
    pub k_stride_b: i64,
    pub k_stride_h: i64,
    pub k_stride_l: i64,
    pub k_stride_e: i64,
    pub v_stride_b: i64,
    pub v_stride_h: i64,
    pub v_stride_l: i64,
    pub v_stride_e: i64,
    pub out_stride_b: i64,
    pub out_stride_h: i64,
    pub out_stride_l: i64,
    pub lse_stride_b: i64,
    pub lse_stride_h: i64,
    pub lse_stride_l: i64,
    pub mask_stride_b: i64,
    pub mask_stride_h: i64,
    pub mask_stride_l: i64,
    pub mask_stride_s: i64,
    pub dropout_seed: u64,
    pub dropout_offset: u64,
    pub dropout_threshold: u64,
    pub scale: f64,
    pub keep_scale: f64,
    pub batch: i32,
    pub heads_q: i32,
    pub heads_kv: i32,
    pub group: i32,
    pub len_q: i32,
    pub len_kv: i32,
    pub head_dim: i32,
    pub head_dim_v: i32,
    pub scale_log2: f32,
    pub causal: CausalCode,
    pub mask_kind: MaskCode,
    pub dropout: i32,
    pub varlen: SeqlenCode,
    pub vec_ok: i32,
    pub alibi: u64,
    pub alibi_stride_b: i64,
    pub softcap: f64,
    pub window_left: i32,
    pub window_right: i32,
}

// SAFETY: `FwdParams` is `#[repr(C)]`, made only of integers, floats and `#[repr(i32)]`
// enums whose every value this crate writes is a declared variant (no pointers Rust
// would track, no padding the kernel reads), and matches the layout of the CUDA struct
// byte for byte (checked by `params_layout_matches_cuh` and a static_assert).
unsafe impl DeviceRepr for FwdParams {}

/// `struct BwdParams : FwdParams` of `kernels/common/params.cuh`: the forward's fields
/// (the problem, q, k, v, out, lse) and the gradients'. `softmax_d` is the row sum
/// `D = rowsum(dout * out)`, `dq_accum` an accumulator for `dq`, both `[B, Hq, L]` /
/// `[B, Hq, L, E]` contiguous scratch in the accumulator type (f32, f64 for f64);
/// `dmask` (0 without an additive mask) an accumulator in the mask's own shape, read
/// through the `dmask_stride_*` broadcast strides over `[B, Hq, L, S]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[allow(missing_docs)]
pub struct BwdParams {
    pub fwd: FwdParams,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dmask: u64,
    pub dq_accum: u64,
    pub softmax_d: u64,
    pub dout_stride_b: i64,
    pub dout_stride_h: i64,
    pub dout_stride_l: i64,
    pub dq_stride_b: i64,
    pub dq_stride_h: i64,
    pub dq_stride_l: i64,
    pub dk_stride_b: i64,
    pub dk_stride_h: i64,
    pub dk_stride_l: i64,
    pub dv_stride_b: i64,
    pub dv_stride_h: i64,
    pub dv_stride_l: i64,
    pub dmask_stride_b: i64,
    pub dmask_stride_h: i64,
    pub dmask_stride_l: i64,
    pub dmask_stride_s: i64,
    /// 0: the tensor-core backward's CTAs add into one dq accumulator (atomics). > 0
    /// (deterministic mode): CTA x of the grid owns the slice at `x * dq_split_stride`
    /// elements, summed in slice order when dq is rounded.
    pub dq_split_stride: i64,
}

// SAFETY: as for `FwdParams`: `#[repr(C)]`, plain integers after an embedded
// `FwdParams`, mirrored field for field (checked by `params_layout_matches_cuh`).
unsafe impl DeviceRepr for BwdParams {}

/// The `cu_seqlens` of a variable-length call: q `[total_q, Hq, E]`, k `[total_k, Hkv,
/// E]`, v `[total_k, Hkv, Ev]` seen as `[1, H, total, dim]` views.
#[derive(Debug, Clone, Copy)]
pub struct Varlen<'a> {
    /// Query sequence offsets, length B+1.
    pub cu_seqlens_q: &'a DeviceSeqlens,
    /// Key/value sequence offsets, length B+1.
    pub cu_seqlens_k: &'a DeviceSeqlens,
}

/// Every device operand of a forward call.
#[derive(Debug, Clone, Copy)]
pub struct Operands<'a> {
    /// `[B, Hq, L, E]`, or packed `[1, Hq, total_q, E]` with `seqlens`.
    pub q: &'a DeviceTensor,
    /// `[B, Hkv, S, E]`, or packed.
    pub k: &'a DeviceTensor,
    /// `[B, Hkv, S, Ev]`, or packed.
    pub v: &'a DeviceTensor,
    /// The `attn_mask`, broadcast by the problem's plan.
    pub mask: Option<&'a DeviceMask>,
    /// Written: `[B, Hq, L, Ev]` (packed `[1, Hq, total_q, Ev]`).
    pub out: &'a DeviceTensor,
    /// Written: f32 `[B, Hq, L, 1]` (packed `[1, Hq, total_q, 1]`).
    pub lse: &'a DeviceTensor,
    /// Variable-length sequences; `None` for a dense batch.
    pub seqlens: Option<Varlen<'a>>,
    /// ALiBi slopes (`[Hq]` or `[B, Hq]`), added after the softcap.
    pub alibi: Option<&'a DeviceSlopes>,
}

/// 16-byte loads are valid when every base address is 16-byte aligned and every
/// batch, head and row stride is a whole number of 16-byte chunks.
fn vec_ok(dtype: DType, tensors: &[(&DeviceTensor, u64)]) -> bool {
    let per_chunk = (16 / dtype.size_bytes()) as isize;
    tensors.iter().all(|(t, address)| {
        let s = t.layout().strides;
        address % 16 == 0 && s[..3].iter().all(|&x| x % per_chunk == 0)
    })
}

fn strides3(t: &DeviceTensor) -> [i64; 3] {
    let s = t.layout().strides;
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

/// A window side as the kernels read it: -1 (unbounded) or a key count, clamped to
/// `i32::MAX` (no sequence the kernels index is longer).
fn window_side(n: i64) -> i32 {
    if n < 0 {
        -1
    } else {
        n.min(i32::MAX as i64) as i32
    }
}

impl FwdParams {
    /// Everything that comes from the validated problem (sizes, scale, causal, dropout,
    /// mask kind and strides); addresses and tensor strides come from [`FwdParams::build`].
    pub fn from_problem(problem: &Problem) -> Self {
        let dropout = problem.dropout;
        let mask_strides = problem.mask.map(|m| m.strides).unwrap_or([0; 4]);
        FwdParams {
            batch: problem.batch as i32,
            heads_q: problem.heads_q as i32,
            heads_kv: problem.heads_kv as i32,
            group: problem.group_size() as i32,
            len_q: problem.len_q as i32,
            len_kv: problem.len_kv as i32,
            head_dim: problem.head_dim as i32,
            head_dim_v: problem.head_dim_v as i32,
            scale: problem.scale,
            scale_log2: (problem.scale * std::f64::consts::LOG2_E) as f32,
            keep_scale: if dropout.is_active() {
                dropout.keep_scale()
            } else {
                1.0
            },
            causal: match problem.causal {
                Causal::None => CausalCode::None,
                Causal::TopLeft => CausalCode::TopLeft,
                Causal::BottomRight => CausalCode::BottomRight,
            },
            mask_kind: match problem.mask.map(|m| m.kind) {
                None => MaskCode::None,
                Some(MaskKind::Bool) => MaskCode::Bool,
                Some(MaskKind::Additive(_)) => MaskCode::Additive,
            },
            dropout: dropout.is_active() as i32,
            dropout_seed: dropout.seed,
            dropout_offset: dropout.offset,
            dropout_threshold: dropout.keep_threshold(),
            mask_stride_b: mask_strides[0] as i64,
            mask_stride_h: mask_strides[1] as i64,
            mask_stride_l: mask_strides[2] as i64,
            mask_stride_s: mask_strides[3] as i64,
            softcap: problem.softcap.unwrap_or(0.0),
            window_left: window_side(problem.window.left),
            window_right: window_side(problem.window.right),
            ..Default::default()
        }
    }

    /// The parameters of `problem` over `ops`, after the launch checks
    /// ([`crate::launch::check_indexable`]) and a check of every operand against its
    /// buffer, its dtype's alignment and (mask) the problem's broadcast plan. In varlen
    /// mode the batch strides are 0 and sequence `b` starts at row `cu_seqlens[b]`.
    ///
    /// # Errors
    /// An operand outside its buffer or misaligned, a mismatched `cu_seqlens` pair, or
    /// a size the kernels cannot index.
    pub fn build(gpu: &GpuContext, problem: &Problem, ops: &Operands<'_>) -> Result<Self> {
        crate::launch::check_indexable(problem, ops.seqlens.is_some())?;
        let mut p = FwdParams::from_problem(problem);
        p.q = ops.q.checked_address(gpu, "query")?;
        p.k = ops.k.checked_address(gpu, "key")?;
        p.v = ops.v.checked_address(gpu, "value")?;
        p.out = ops.out.checked_address(gpu, "out")?;
        p.lse = ops.lse.checked_address(gpu, "lse")?;
        let (q, k, v) = (
            ops.q.layout().strides,
            ops.k.layout().strides,
            ops.v.layout().strides,
        );
        [p.q_stride_b, p.q_stride_h, p.q_stride_l, p.q_stride_e] = q.map(|s| s as i64);
        [p.k_stride_b, p.k_stride_h, p.k_stride_l, p.k_stride_e] = k.map(|s| s as i64);
        [p.v_stride_b, p.v_stride_h, p.v_stride_l, p.v_stride_e] = v.map(|s| s as i64);
        [p.out_stride_b, p.out_stride_h, p.out_stride_l] = strides3(ops.out);
        [p.lse_stride_b, p.lse_stride_h, p.lse_stride_l] = strides3(ops.lse);
        if let Some(Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
        }) = ops.seqlens
        {
            if cu_seqlens_q.code() != cu_seqlens_k.code() {
                return Err(CudaError::bad_layout(
                    "cu_seqlens_k",
                    "the index type of cu_seqlens_q",
                    format!("{:?}", cu_seqlens_k.code()),
                ));
            }
            p.cu_seqlens_q = cu_seqlens_q.address(gpu);
            p.cu_seqlens_k = cu_seqlens_k.address(gpu);
            p.varlen = cu_seqlens_q.code();
            [
                p.q_stride_b,
                p.k_stride_b,
                p.v_stride_b,
                p.out_stride_b,
                p.lse_stride_b,
            ] = [0; 5];
        }
        if let (Some(m), Some(plan)) = (ops.mask, problem.mask) {
            let size = match plan.kind {
                MaskKind::Bool => 1,
                MaskKind::Additive(dt) => dt.size_bytes(),
            };
            p.mask = m.check(gpu, size)?;
        }
        if let Some(slopes) = ops.alibi {
            let (address, stride_b) = slopes.for_call(gpu, problem.batch, problem.heads_q)?;
            p.alibi = address;
            p.alibi_stride_b = stride_b as i64;
        }
        p.vec_ok = vec_ok(problem.dtype, &[(ops.q, p.q), (ops.k, p.k), (ops.v, p.v)]) as i32;
        Ok(p)
    }
}

/// Every device operand of a backward call: the forward's (q, k, v, mask, out, lse, and
/// `cu_seqlens` for packed sequences) and the gradients'.
#[derive(Debug, Clone, Copy)]
pub struct BwdOperands<'a> {
    /// q, k, v, mask and the forward's out and lse (read here, not written).
    pub fwd: Operands<'a>,
    /// `[B, Hq, L, Ev]`, unit last-dim stride.
    pub dout: &'a DeviceTensor,
    /// Written: `[B, Hq, L, E]`.
    pub dq: &'a DeviceTensor,
    /// Written: `[B, Hkv, S, E]`.
    pub dk: &'a DeviceTensor,
    /// Written: `[B, Hkv, S, Ev]`.
    pub dv: &'a DeviceTensor,
}

/// `Err` naming `arg` unless the last dim has stride 1 (or extent 1).
pub(crate) fn unit_last(arg: &'static str, t: &DeviceTensor) -> Result<()> {
    let l = t.layout();
    if l.shape[3] > 1 && l.strides[3] != 1 {
        return Err(CudaError::bad_layout(
            arg,
            "a unit last-dim stride",
            format!("strides {:?}", l.strides),
        ));
    }
    Ok(())
}

impl BwdParams {
    /// The parameters of a backward of `problem` over `ops`: [`FwdParams::build`]'s
    /// checks for the forward's operands, and every gradient operand checked against
    /// its buffer and alignment. `out` and `dout` need a unit last-dim stride (the
    /// kernels read their rows as vectors). Scratch addresses (`softmax_d`, `dq_accum`,
    /// `dmask` and its strides) are the caller's to fill.
    ///
    /// In varlen mode every batch stride is 0 (packed rows).
    ///
    /// # Errors
    /// As [`FwdParams::build`]; `out` or `dout` with a last-dim stride other than 1; a
    /// gradient outside its buffer or misaligned.
    pub fn build(gpu: &GpuContext, problem: &Problem, ops: &BwdOperands<'_>) -> Result<Self> {
        let fwd = FwdParams::build(gpu, problem, &ops.fwd)?;
        unit_last("out", ops.fwd.out)?;
        unit_last("dout", ops.dout)?;
        let mut p = BwdParams {
            fwd,
            dout: ops.dout.checked_address(gpu, "dout")?,
            dq: ops.dq.checked_address(gpu, "dq")?,
            dk: ops.dk.checked_address(gpu, "dk")?,
            dv: ops.dv.checked_address(gpu, "dv")?,
            ..Default::default()
        };
        [p.dout_stride_b, p.dout_stride_h, p.dout_stride_l] = strides3(ops.dout);
        // The tensor-core backward reads dout's rows like q's: 16-byte loads need it too.
        p.fwd.vec_ok &= vec_ok(problem.dtype, &[(ops.dout, p.dout)]) as i32;
        [p.dq_stride_b, p.dq_stride_h, p.dq_stride_l] = strides3(ops.dq);
        [p.dk_stride_b, p.dk_stride_h, p.dk_stride_l] = strides3(ops.dk);
        [p.dv_stride_b, p.dv_stride_h, p.dv_stride_l] = strides3(ops.dv);
        if ops.fwd.seqlens.is_some() {
            // Packed rows: sequence b starts at row cu_seqlens[b] of every operand.
            [p.dout_stride_b, p.dq_stride_b, p.dk_stride_b, p.dv_stride_b] = [0; 4];
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdpa_core::{DType, Dropout, MaskDesc, SdpaOptions, TensorDesc};

    /// The Rust field names in declaration order, from this file's source.
    fn rust_fields(name: &str) -> Vec<String> {
        let src = include_str!("params.rs");
        let body = src
            .split(&format!("pub struct {name} {{"))
            .nth(1)
            .unwrap()
            .split('}')
            .next()
            .unwrap();
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("pub "))
            .map(|l| l.split(':').next().unwrap().trim().to_string())
            .collect()
    }

    fn cuh_fields(name: &str) -> Vec<String> {
        let src = include_str!("../kernels/common/params.cuh");
        let body = src
            .split(&format!("struct {name}"))
            .nth(1)
            .unwrap()
            .split("};")
            .next()
            .unwrap();
        body.lines()
            .map(|l| l.split("//").next().unwrap().trim())
            .filter(|l| l.ends_with(';'))
            .map(|l| {
                l.trim_end_matches(';')
                    .split_whitespace()
                    .last()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn params_layout_matches_cuh() {
        assert_eq!(rust_fields("FwdParams"), cuh_fields("FwdParams {"));
        // BwdParams embeds FwdParams as its first field; the .cuh derives from it.
        let bwd = rust_fields("BwdParams");
        assert_eq!(bwd[0], "fwd");
        assert_eq!(bwd[1..], cuh_fields("BwdParams : FwdParams {")[..]);
        assert_eq!(std::mem::size_of::<FwdParams>(), 368);
        assert_eq!(std::mem::size_of::<BwdParams>(), 560);
        let cuh = include_str!("../kernels/common/params.cuh");
        assert!(cuh.contains("sizeof(FwdParams) == 368"));
        assert!(cuh.contains("sizeof(BwdParams) == 560"));
        assert_eq!(std::mem::offset_of!(FwdParams, dropout_threshold), 256);
        assert_eq!(std::mem::offset_of!(FwdParams, scale), 264);
        assert_eq!(std::mem::offset_of!(FwdParams, batch), 280);
        assert_eq!(std::mem::offset_of!(FwdParams, scale_log2), 312);
        assert_eq!(std::mem::offset_of!(FwdParams, vec_ok), 332);
        assert_eq!(std::mem::offset_of!(FwdParams, alibi), 336);
        assert_eq!(std::mem::offset_of!(FwdParams, softcap), 352);
        assert_eq!(std::mem::offset_of!(FwdParams, window_right), 364);
        assert_eq!(std::mem::offset_of!(BwdParams, dout), 368);
        assert_eq!(std::mem::offset_of!(BwdParams, dq_split_stride), 552);
        // The codes, value for value.
        for line in [
            "enum CausalCode : int { CAUSAL_NONE = 0, CAUSAL_TOP_LEFT = 1, CAUSAL_BOTTOM_RIGHT = 2 };",
            "enum MaskCode : int { MASK_NONE = 0, MASK_BOOL = 1, MASK_ADDITIVE = 2 };",
            "enum SeqlenCode : int { SEQLEN_DENSE = 0, SEQLEN_VARLEN_U32 = 1, SEQLEN_VARLEN_I32 = 2 };",
        ] {
            assert!(cuh.contains(line), "{line}");
        }
        assert_eq!(
            [
                CausalCode::None,
                CausalCode::TopLeft,
                CausalCode::BottomRight
            ]
            .map(|c| c as i32),
            [0, 1, 2]
        );
        assert_eq!(
            [MaskCode::None, MaskCode::Bool, MaskCode::Additive].map(|c| c as i32),
            [0, 1, 2]
        );
        assert_eq!(
            [
                SeqlenCode::Dense,
                SeqlenCode::VarlenU32,
                SeqlenCode::VarlenI32
            ]
            .map(|c| c as i32),
            [0, 1, 2]
        );
    }

    #[test]
    fn packing_from_problem() {
        let q = TensorDesc::contiguous(DType::F16, [2, 8, 5, 40]);
        let k = TensorDesc::contiguous(DType::F16, [2, 2, 7, 40]);
        let mask = MaskDesc::contiguous(sdpa_core::MaskKind::Bool, &[5, 7]);
        let options = SdpaOptions {
            causal: Causal::BottomRight,
            dropout: Dropout::new(0.25, 0x1234_5678_9abc, 77),
            scale: Some(-0.5),
            enable_gqa: true,
            ..Default::default()
        };
        let problem = Problem::new(&q, &k, &k, Some(&mask), &options).unwrap();
        let p = FwdParams::from_problem(&problem);
        assert_eq!((p.batch, p.heads_q, p.heads_kv, p.group), (2, 8, 2, 4));
        assert_eq!(
            (p.len_q, p.len_kv, p.head_dim, p.head_dim_v),
            (5, 7, 40, 40)
        );
        assert_eq!(p.scale, -0.5);
        assert_eq!(p.scale_log2, (-0.5 * std::f64::consts::LOG2_E) as f32);
        assert_eq!(p.causal, CausalCode::BottomRight);
        assert_eq!(p.mask_kind, MaskCode::Bool);
        assert_eq!(
            [
                p.mask_stride_b,
                p.mask_stride_h,
                p.mask_stride_l,
                p.mask_stride_s
            ],
            [0, 0, 7, 1]
        );
        assert_eq!(p.dropout, 1);
        assert_eq!(p.dropout_threshold, 1 << 30);
        assert_eq!(p.keep_scale, 1.0 / 0.75);
        assert_eq!((p.dropout_seed, p.dropout_offset), (0x1234_5678_9abc, 77));
        let everything_dropped = SdpaOptions {
            dropout: Dropout::new(1.0, 1, 2),
            ..Default::default()
        };
        let problem = Problem::new(&q, &q, &q, None, &everything_dropped).unwrap();
        let p = FwdParams::from_problem(&problem);
        assert_eq!((p.dropout_threshold, p.keep_scale), (1 << 32, 0.0));
        // No window: both sides unbounded (-1, not the Default 0, a window of one key).
        assert_eq!((p.window_left, p.window_right, p.softcap), (-1, -1, 0.0));
        let windowed = SdpaOptions {
            window: sdpa_core::Window { left: 3, right: 0 },
            softcap: Some(30.0),
            ..Default::default()
        };
        let problem = Problem::new(&q, &q, &q, None, &windowed).unwrap();
        let p = FwdParams::from_problem(&problem);
        assert_eq!((p.window_left, p.window_right, p.softcap), (3, 0, 30.0));
        assert_eq!((p.alibi, p.alibi_stride_b), (0, 0));
        assert_eq!(window_side(i64::MAX), i32::MAX);
        assert_eq!(
            (p.mask_kind, p.causal, p.group),
            (MaskCode::None, CausalCode::None, 1)
        );
    }
}
