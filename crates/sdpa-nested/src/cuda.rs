//! Nested batches on the device: packed values and `cu_seqlens` in device memory, and
//! [`sdpa_nested_cuda`] through the varlen mode of the fused kernels (flash, efficient):
//! no padding is computed or stored.
//!
//! # Shapes
//! Values `[total, H, E]` (stored packed, seen by the kernels as the `[1, H, total, E]`
//! view with strides `[_, E, H*E, 1]`; any view with a unit last-dim stride, such as a
//! slice of a packed QKV projection, works too) + `cu_seqlens` (length `B + 1`).
//!
//! ```no_run
//! use ndarray::Array3;
//! use sdpa_core::BackendSet;
//! use sdpa_cuda::GpuContext;
//! use sdpa_nested::cuda::{sdpa_nested_cuda, DeviceNested};
//! use sdpa_nested::Nested;
//!
//! let gpu = GpuContext::new(0)?;
//! let seqs = [Array3::<half::f16>::zeros((3, 2, 64)), Array3::zeros((5, 2, 64))];
//! let x = Nested::from_sequences(&[seqs[0].view(), seqs[1].view()]).unwrap();
//! let dx = DeviceNested::upload(&gpu, &x)?;
//! let out = sdpa_nested_cuda(&gpu, &dx, &dx, &dx, &Default::default(), BackendSet::ALL)?;
//! let host: Nested<half::f16> = out.out.download(&gpu)?;
//! assert_eq!(host.values().shape(), &[8, 2, 64]);
//! # Ok::<(), sdpa_cuda::CudaError>(())
//! ```

use crate::{CuSeqlens, Nested};
use ndarray::Axis;
use sdpa_core::{Backend, BackendSet, SdpaError, SdpaOptions};
use sdpa_cuda::{
    CudaError, DeviceElement, DeviceSeqlens, DeviceTensor, GpuContext, Result, Varlen,
};
use sdpa_ref::Element;

/// A nested batch on the device.
#[derive(Debug, Clone)]
pub struct DeviceNested {
    values: DeviceTensor,
    cu_seqlens: DeviceSeqlens,
    offsets: CuSeqlens,
}

impl DeviceNested {
    /// Uploads packed values and offsets.
    ///
    /// # Errors
    /// Offsets above `u32::MAX`, or a failed upload.
    pub fn upload<T: DeviceElement + Element>(
        gpu: &GpuContext,
        nested: &Nested<T>,
    ) -> Result<Self> {
        let [total, heads, dim] = *nested.values().shape() else {
            unreachable!("values are 3-d")
        };
        let packed = DeviceTensor::upload(gpu, nested.values().view().insert_axis(Axis(0)))?;
        let values = packed.view(
            [1, heads, total, dim],
            [
                (total * heads * dim) as isize,
                dim as isize,
                (heads * dim) as isize,
                1,
            ],
            0,
        )?;
        let offsets = nested.cu_seqlens().clone();
        let u32s = offsets.to_u32().ok_or_else(|| {
            CudaError::from(SdpaError::invalid(
                "cu_seqlens",
                "offsets that fit in u32",
                offsets.total(),
            ))
        })?;
        Ok(DeviceNested {
            values,
            cu_seqlens: DeviceSeqlens::upload_u32(gpu, &u32s)?,
            offsets,
        })
    }

    /// From a `[1, H, total, E]` view (any strides, unit last-dim stride for the fused
    /// kernels) and device offsets whose last offset is `total`.
    ///
    /// # Errors
    /// A view that is not `[1, H, total, E]` for the offsets' total.
    pub fn from_parts(values: DeviceTensor, cu_seqlens: DeviceSeqlens) -> Result<Self> {
        let shape = values.shape();
        if shape[0] != 1 || shape[2] != cu_seqlens.total() {
            return Err(SdpaError::invalid(
                "values",
                format!(
                    "a [1, H, {}, E] view (total rows from cu_seqlens)",
                    cu_seqlens.total()
                ),
                format!("{shape:?}"),
            )
            .into());
        }
        let offsets = CuSeqlens::from_lengths(&cu_seqlens.lengths());
        Ok(DeviceNested {
            values,
            cu_seqlens,
            offsets,
        })
    }

    /// Downloads to a host nested batch `[total, H, E]` (waits for the stream).
    ///
    /// # Errors
    /// A dtype other than `T`'s, or a failed copy.
    pub fn download<T: DeviceElement + Element>(&self, gpu: &GpuContext) -> Result<Nested<T>> {
        let bhle = self.values.download::<T>(gpu)?;
        let values = bhle
            .index_axis_move(Axis(0), 0)
            .permuted_axes([1, 0, 2])
            .as_standard_layout()
            .into_owned();
        Ok(Nested::new(values, self.offsets.clone())?)
    }

    /// The `[1, H, total, E]` view the kernels read.
    pub fn values(&self) -> &DeviceTensor {
        &self.values
    }

    /// The device offsets.
    pub fn device_cu_seqlens(&self) -> &DeviceSeqlens {
        &self.cu_seqlens
    }

    /// The host copy of the offsets.
    pub fn cu_seqlens(&self) -> &CuSeqlens {
        &self.offsets
    }

    /// `B`.
    pub fn batch(&self) -> usize {
        self.offsets.batch()
    }

    /// `H`.
    pub fn heads(&self) -> usize {
        self.values.shape()[1]
    }
}

/// What [`sdpa_nested_cuda`] returns.
#[derive(Debug, Clone)]
pub struct DeviceNestedOutput {
    /// `[total_q, Hq, Ev]` (packed, contiguous) with the query offsets.
    pub out: DeviceNested,
    /// f32 `[1, Hq, total_q, 1]`.
    pub lse: DeviceTensor,
    /// The backend that ran.
    pub backend: Backend,
}

/// Scaled dot-product attention over a nested batch on the device, through the varlen
/// mode of the fused kernels: sequence `b` of q attends to sequence `b` of k/v only,
/// causal aligned per sequence, dropout from the padded index space (so the result
/// equals the padded dense call with a key-padding mask). Dispatch takes the first of
/// `backends` (flash > efficient) whose check passes; math takes no `cu_seqlens`.
///
/// # Errors
/// Batch counts of q and k/v that differ, k and v offsets that differ, anything the
/// dense call rejects, or no backend that can run it (every reason listed).
pub fn sdpa_nested_cuda(
    gpu: &GpuContext,
    q: &DeviceNested,
    k: &DeviceNested,
    v: &DeviceNested,
    options: &SdpaOptions,
    backends: BackendSet,
) -> Result<DeviceNestedOutput> {
    if k.batch() != q.batch() {
        return Err(SdpaError::invalid(
            "key",
            format!("{} sequences (the query's)", q.batch()),
            k.batch(),
        )
        .into());
    }
    if v.offsets != k.offsets {
        return Err(SdpaError::invalid(
            "value",
            format!("the key's cu_seqlens {:?}", k.offsets.offsets()),
            format!("{:?}", v.offsets.offsets()),
        )
        .into());
    }
    if q.offsets.total() == 0 {
        // No query rows: nothing to launch (a grid of zero blocks is a launch error).
        let backend = backends
            .iter()
            .find(|&b| b != Backend::Math)
            .ok_or_else(|| {
                SdpaError::NoBackend(vec![(
                    Backend::Math,
                    "takes no cu_seqlens (variable-length batches run on flash and efficient)"
                        .to_string(),
                )])
            })?;
        let (hq, ev) = (q.heads(), v.values.shape()[3]);
        return Ok(DeviceNestedOutput {
            out: DeviceNested {
                values: DeviceTensor::alloc(gpu, q.values.dtype(), [1, hq, 0, ev])?,
                cu_seqlens: q.cu_seqlens.clone(),
                offsets: q.offsets.clone(),
            },
            lse: DeviceTensor::alloc(gpu, sdpa_core::DType::F32, [1, hq, 0, 1])?,
            backend,
        });
    }
    let result = sdpa::attention_varlen(
        &q.values,
        &k.values,
        &v.values,
        Varlen {
            cu_seqlens_q: &q.cu_seqlens,
            cu_seqlens_k: &k.cu_seqlens,
        },
        options,
        &sdpa::Exec::cuda(gpu).with_backends(backends),
    )?;
    let backend = result.backend;
    let (out, lse) = result
        .into_cuda()
        .expect("device tensors in, device tensors out");
    Ok(DeviceNestedOutput {
        out: DeviceNested {
            values: out,
            cu_seqlens: q.cu_seqlens.clone(),
            offsets: q.offsets.clone(),
        },
        lse,
        backend,
    })
}
