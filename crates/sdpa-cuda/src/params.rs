//! The kernels' one parameter struct, mirrored from `kernels/common/params.cuh`.

use cudarc::driver::DeviceRepr;
use sdpa_core::{Causal, MaskKind, Problem};

/// `struct SdpaParams` of `kernels/common/params.cuh`, field for field. Device addresses
/// are plain `u64`; strides count elements.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[allow(missing_docs)]
pub struct SdpaParams {
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
    pub causal: i32,
    pub mask_kind: i32,
    pub dropout: i32,
    pub varlen: i32,
    pub vec_ok: i32,
}

// SAFETY: `SdpaParams` is `#[repr(C)]`, made only of integers and floats (no pointers
// Rust would track, no padding the kernel reads), and matches the layout of the CUDA
// struct byte for byte (checked by `params_layout_matches_cuh` and a static_assert).
unsafe impl DeviceRepr for SdpaParams {}

impl SdpaParams {
    /// Everything that comes from the validated problem (sizes, scale, causal, dropout,
    /// mask kind and strides); addresses and tensor strides are filled in by the caller.
    pub fn from_problem(problem: &Problem) -> Self {
        let dropout = problem.dropout;
        let mask_strides = problem.mask.map(|m| m.strides).unwrap_or([0; 4]);
        SdpaParams {
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
                Causal::None => 0,
                Causal::TopLeft => 1,
                Causal::BottomRight => 2,
            },
            mask_kind: match problem.mask.map(|m| m.kind) {
                None => 0,
                Some(MaskKind::Bool) => 1,
                Some(MaskKind::Additive(_)) => 2,
            },
            dropout: dropout.is_active() as i32,
            dropout_seed: dropout.seed,
            dropout_offset: dropout.offset,
            dropout_threshold: dropout.keep_threshold(),
            mask_stride_b: mask_strides[0] as i64,
            mask_stride_h: mask_strides[1] as i64,
            mask_stride_l: mask_strides[2] as i64,
            mask_stride_s: mask_strides[3] as i64,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdpa_core::{DType, Dropout, MaskDesc, SdpaOptions, TensorDesc};

    /// The Rust field names in declaration order, from this file's source.
    fn rust_fields() -> Vec<String> {
        let src = include_str!("params.rs");
        let body = src
            .split("pub struct SdpaParams {")
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

    fn cuh_fields() -> Vec<String> {
        let src = include_str!("../../../kernels/common/params.cuh");
        let body = src
            .split("struct SdpaParams {")
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
        assert_eq!(rust_fields(), cuh_fields());
        assert_eq!(std::mem::size_of::<SdpaParams>(), 336);
        assert!(include_str!("../../../kernels/common/params.cuh")
            .contains("sizeof(SdpaParams) == 336"));
        assert_eq!(std::mem::offset_of!(SdpaParams, dropout_threshold), 256);
        assert_eq!(std::mem::offset_of!(SdpaParams, scale), 264);
        assert_eq!(std::mem::offset_of!(SdpaParams, batch), 280);
        assert_eq!(std::mem::offset_of!(SdpaParams, scale_log2), 312);
        assert_eq!(std::mem::offset_of!(SdpaParams, vec_ok), 332);
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
        };
        let problem = Problem::new(&q, &k, &k, Some(&mask), &options).unwrap();
        let p = SdpaParams::from_problem(&problem);
        assert_eq!((p.batch, p.heads_q, p.heads_kv, p.group), (2, 8, 2, 4));
        assert_eq!(
            (p.len_q, p.len_kv, p.head_dim, p.head_dim_v),
            (5, 7, 40, 40)
        );
        assert_eq!(p.scale, -0.5);
        assert_eq!(p.scale_log2, (-0.5 * std::f64::consts::LOG2_E) as f32);
        assert_eq!(p.causal, 2);
        assert_eq!(p.mask_kind, 1);
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
        let p = SdpaParams::from_problem(&problem);
        assert_eq!((p.dropout_threshold, p.keep_scale), (1 << 32, 0.0));
        assert_eq!((p.mask_kind, p.causal, p.group), (0, 0, 1));
    }
}
