//! Device tensors: a shared buffer plus dtype, shape, element strides and offset.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::params::SeqlenCode;
use cudarc::driver::{CudaSlice, DevicePtr};
use ndarray::{Array4, ArrayView4, ArrayViewD};
use sdpa_core::{DType, Layout, MaskDesc, MaskKind, TensorDesc};
use std::sync::Arc;

/// An element type the kernels take: `sdpa_core`'s one element trait.
pub use sdpa_core::Scalar as DeviceElement;

fn as_bytes<T: Copy>(data: &[T]) -> &[u8] {
    // SAFETY: T is one of the plain float types of `DeviceElement` (or u8/u32/i32/bool
    // here): no padding, every byte initialised; the slice covers exactly `data`.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

/// Device memory shared by tensors that view it: an allocation of this crate, or
/// memory a caller (a framework) owns and lends.
#[derive(Debug)]
pub(crate) enum Buffer {
    /// Allocated here, freed (stream-ordered) on drop.
    Owned(CudaSlice<u8>),
    /// The caller's: `len` bytes from `ptr`, never freed here.
    Borrowed {
        /// Device address.
        ptr: u64,
        /// Bytes.
        len: usize,
    },
}

impl Buffer {
    pub(crate) fn alloc(gpu: &GpuContext, bytes: usize, what: &'static str) -> Result<Arc<Self>> {
        // SAFETY: the memory is uninitialised bytes; every reader is a kernel that writes
        // it first or a download of a tensor a kernel (or an upload) has filled.
        let slice = unsafe { gpu.stream().alloc::<u8>(bytes.max(1)) }
            .map_err(CudaError::driver(what, bytes))?;
        Ok(Arc::new(Buffer::Owned(slice)))
    }

    pub(crate) fn upload(gpu: &GpuContext, bytes: &[u8], what: &'static str) -> Result<Arc<Self>> {
        // SAFETY: every byte is written by the copy below before anything reads it.
        let mut slice = unsafe { gpu.stream().alloc::<u8>(bytes.len().max(1)) }
            .map_err(CudaError::driver(what, bytes.len()))?;
        if !bytes.is_empty() {
            gpu.stream()
                .memcpy_htod(bytes, &mut slice)
                .map_err(CudaError::driver(what, bytes.len()))?;
        }
        Ok(Arc::new(Buffer::Owned(slice)))
    }

    pub(crate) fn address(&self, gpu: &GpuContext) -> u64 {
        match self {
            Buffer::Owned(slice) => {
                let (ptr, _sync) = slice.device_ptr(gpu.stream());
                ptr
            }
            Buffer::Borrowed { ptr, .. } => *ptr,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Buffer::Owned(slice) => slice.len(),
            Buffer::Borrowed { len, .. } => *len,
        }
    }
}

/// A 4-d tensor on the device: `[B, H, L, E]` for q, k, v and the output.
#[derive(Debug, Clone)]
pub struct DeviceTensor {
    pub(crate) buffer: Arc<Buffer>,
    dtype: DType,
    layout: Layout,
    /// Offset of element `[0, 0, 0, 0]`, in bytes.
    byte_offset: usize,
}

/// One past the largest element offset a view of `shape` and `strides` reaches (0 for
/// an empty view), in checked arithmetic: `Err` for a negative stride or an extent that
/// does not fit `usize`, so a huge stride can never wrap to a small extent.
pub fn extent(arg: &'static str, shape: &[usize], strides: &[isize]) -> Result<usize> {
    if shape.contains(&0) {
        return Ok(0);
    }
    let overflow = || {
        CudaError::bad_layout(
            arg,
            "a view whose extent fits in memory",
            format!("shape {shape:?} strides {strides:?}"),
        )
    };
    let mut last = 0usize;
    for (&n, &stride) in shape.iter().zip(strides) {
        let stride = usize::try_from(stride).map_err(|_| {
            CudaError::bad_layout(arg, "non-negative strides", format!("strides {strides:?}"))
        })?;
        last = (n - 1)
            .checked_mul(stride)
            .and_then(|x| last.checked_add(x))
            .ok_or_else(overflow)?;
    }
    last.checked_add(1).ok_or_else(overflow)
}

/// The byte range `[byte_offset, end)` a view of `elements` elements of `dtype` covers,
/// checked against a buffer of `len` bytes.
fn check_inside(
    arg: &'static str,
    len: usize,
    elements: usize,
    dtype_bytes: usize,
    byte_offset: usize,
    what: impl Fn() -> String,
) -> Result<()> {
    if elements == 0 {
        return Ok(());
    }
    let end = elements
        .checked_mul(dtype_bytes)
        .and_then(|b| b.checked_add(byte_offset));
    match end {
        Some(end) if end <= len => Ok(()),
        _ => Err(CudaError::bad_layout(
            arg,
            format!("a view inside its buffer of {len} bytes"),
            what(),
        )),
    }
}

impl DeviceTensor {
    /// Uploads `array` (any strides) as a contiguous tensor.
    pub fn upload<T: DeviceElement>(gpu: &GpuContext, array: ArrayView4<'_, T>) -> Result<Self> {
        let data: Vec<T> = array.iter().copied().collect();
        let shape = array.shape();
        let buffer = Buffer::upload(gpu, as_bytes(&data), "an uploaded tensor")?;
        Ok(DeviceTensor {
            buffer,
            dtype: T::DTYPE,
            layout: Layout::contiguous([shape[0], shape[1], shape[2], shape[3]]),
            byte_offset: 0,
        })
    }

    /// An uninitialised contiguous tensor.
    pub fn alloc(gpu: &GpuContext, dtype: DType, shape: [usize; 4]) -> Result<Self> {
        let bytes = shape
            .iter()
            .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                CudaError::bad_layout("shape", "a size that fits in memory", format!("{shape:?}"))
            })?;
        Ok(DeviceTensor {
            buffer: Buffer::alloc(gpu, bytes, "a tensor")?,
            dtype,
            layout: Layout::contiguous(shape),
            byte_offset: 0,
        })
    }

    /// Another view of the same buffer: `shape` and element `strides` from element
    /// `offset` of this tensor's storage, in this dtype. Checked against the buffer.
    pub fn view(&self, shape: [usize; 4], strides: [isize; 4], offset: usize) -> Result<Self> {
        let byte_offset = offset
            .checked_mul(self.dtype.size_bytes())
            .and_then(|b| b.checked_add(self.byte_offset))
            .ok_or_else(|| CudaError::bad_layout("view", "an offset inside the buffer", offset))?;
        self.reinterpret(self.dtype, Layout { shape, strides }, byte_offset)
    }

    /// A tensor over device memory the caller owns (a framework's tensor): `len` bytes
    /// from `ptr`, seen as `dtype` with `layout` from byte `byte_offset`. Checked as an
    /// owned tensor is: the view must lie inside the `len` bytes, strides non-negative,
    /// the address aligned for the dtype. Nothing is copied or freed.
    ///
    /// # Safety
    /// `ptr..ptr + len` is device memory of `gpu`'s context that stays allocated while
    /// this tensor (or a view of it) is used, and the caller orders its own reads and
    /// writes of it with the work this crate queues on `gpu`'s stream.
    pub unsafe fn from_raw(
        gpu: &GpuContext,
        ptr: u64,
        len: usize,
        dtype: DType,
        layout: Layout,
        byte_offset: usize,
    ) -> Result<Self> {
        let tensor = DeviceTensor {
            buffer: Arc::new(Buffer::Borrowed { ptr, len }),
            dtype,
            layout,
            byte_offset,
        };
        tensor.checked_address(gpu, "tensor")?;
        Ok(tensor)
    }

    /// A view of the same bytes as another dtype from any byte offset (e.g. a slice of a
    /// packed byte buffer). Checked against the buffer; alignment is checked at launch.
    pub fn reinterpret(&self, dtype: DType, layout: Layout, byte_offset: usize) -> Result<Self> {
        let elements = extent("view", &layout.shape, &layout.strides)?;
        check_inside(
            "view",
            self.buffer.len(),
            elements,
            dtype.size_bytes(),
            byte_offset,
            || format!("{layout:?} from byte {byte_offset}"),
        )?;
        Ok(DeviceTensor {
            buffer: self.buffer.clone(),
            dtype,
            layout,
            byte_offset,
        })
    }

    /// dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape and strides.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Shape.
    pub fn shape(&self) -> [usize; 4] {
        self.layout.shape
    }

    /// What `sdpa-core` needs to validate a call.
    pub fn desc(&self) -> TensorDesc {
        TensorDesc {
            dtype: self.dtype,
            layout: self.layout,
        }
    }

    /// Device address of element `[0, 0, 0, 0]`.
    pub fn address(&self, gpu: &GpuContext) -> u64 {
        self.buffer.address(gpu) + self.byte_offset as u64
    }

    /// Checks that the view fits its buffer and its address suits its dtype.
    pub fn checked_address(&self, gpu: &GpuContext, arg: &'static str) -> Result<u64> {
        let elements = extent(arg, &self.layout.shape, &self.layout.strides)?;
        check_inside(
            arg,
            self.buffer.len(),
            elements,
            self.dtype.size_bytes(),
            self.byte_offset,
            || format!("{:?} from byte {}", self.layout, self.byte_offset),
        )?;
        let address = self.address(gpu);
        let align = self.dtype.size_bytes();
        if address % align as u64 != 0 {
            return Err(CudaError::Misaligned {
                arg,
                align,
                address,
            });
        }
        Ok(address)
    }

    /// Copies the tensor to the host (waits for the stream).
    pub fn download<T: DeviceElement>(&self, gpu: &GpuContext) -> Result<Array4<T>> {
        if T::DTYPE != self.dtype {
            return Err(CudaError::bad_layout(
                "download",
                format!("element type {}", self.dtype),
                T::DTYPE,
            ));
        }
        let address = self.checked_address(gpu, "download")?;
        let elements = extent("download", &self.layout.shape, &self.layout.strides)?;
        let size = self.dtype.size_bytes();
        let mut raw = vec![0u8; elements * size];
        if elements > 0 {
            // SAFETY: `check` placed [address, address + elements * size) inside the
            // buffer, and `raw` has exactly that many bytes; the stream is synchronised
            // below before `raw` is read.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    raw.as_mut_slice(),
                    address,
                    gpu.stream().cu_stream(),
                )
            }
            .map_err(CudaError::driver("a download", raw.len()))?;
        }
        gpu.stream().synchronize()?;
        let s = self.layout.shape;
        let st = self.layout.strides;
        Ok(Array4::from_shape_fn(
            (s[0], s[1], s[2], s[3]),
            |(a, b, c, d)| {
                let at = (a as isize * st[0]
                    + b as isize * st[1]
                    + c as isize * st[2]
                    + d as isize * st[3]) as usize;
                // SAFETY: `at < elements` (the layout's extent) and `raw` holds `elements`
                // values of T's size; read_unaligned because a Vec<u8> is byte-aligned.
                unsafe { std::ptr::read_unaligned(raw.as_ptr().add(at * size) as *const T) }
            },
        ))
    }

    /// Copies this tensor into `dst` (stream-ordered, without waiting): both contiguous
    /// (row-major over their own shapes), of one dtype and one element count, e.g. a
    /// gradient this crate allocated into a framework's tensor of the same shape.
    ///
    /// # Errors
    /// Another dtype or element count, a tensor that is not contiguous, a view outside
    /// its buffer, a failed copy.
    pub fn copy_into(&self, gpu: &GpuContext, dst: &DeviceTensor) -> Result<()> {
        let count = |t: &DeviceTensor| t.layout.shape.iter().product::<usize>();
        let contiguous = |t: &DeviceTensor| {
            Layout::contiguous(t.layout.shape).strides == t.layout.strides || count(t) == 0
        };
        if dst.dtype != self.dtype || count(dst) != count(self) {
            return Err(CudaError::bad_layout(
                "copy",
                format!("a {} tensor of {} elements", self.dtype, count(self)),
                format!("{} {:?}", dst.dtype, dst.layout.shape),
            ));
        }
        for (arg, t) in [("copy source", self), ("copy target", dst)] {
            if !contiguous(t) {
                return Err(CudaError::bad_layout(
                    arg,
                    "a contiguous tensor",
                    format!("{:?}", t.layout),
                ));
            }
        }
        let from = self.checked_address(gpu, "copy source")?;
        let to = dst.checked_address(gpu, "copy target")?;
        let bytes = count(self) * self.dtype.size_bytes();
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: both ranges [address, address + bytes) lie inside their buffers
        // (checked_address over contiguous views of `count` elements); the copy is
        // ordered on the context's stream with every other use of either.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(to, from, bytes, gpu.stream().cu_stream())
        }
        .map_err(CudaError::driver("a device copy", bytes))?;
        Ok(())
    }

    /// Fills every byte of the tensor's storage range with 0xFF: NaN in every float
    /// dtype, so a test can tell which elements a kernel wrote.
    pub fn poison(&self, gpu: &GpuContext) -> Result<()> {
        let elements = extent("poison", &self.layout.shape, &self.layout.strides)?;
        if elements == 0 {
            return Ok(());
        }
        let bytes = elements * self.dtype.size_bytes();
        // SAFETY: the range [address, address + bytes) lies inside the buffer (checked at
        // construction) and NaN bit patterns are valid floats.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.address(gpu),
                0xFF,
                bytes,
                gpu.stream().cu_stream(),
            )
        }?;
        Ok(())
    }
}

/// An `attn_mask` on the device (bool as bytes, or additive in the query's dtype), of
/// rank 0 to 4 with its own strides; broadcast at launch, never materialised.
#[derive(Debug, Clone)]
pub struct DeviceMask {
    pub(crate) buffer: Arc<Buffer>,
    kind: MaskKind,
    shape: Vec<usize>,
    strides: Vec<isize>,
}

impl DeviceMask {
    /// Uploads a bool mask (true = takes part).
    pub fn upload_bool(gpu: &GpuContext, mask: ArrayViewD<'_, bool>) -> Result<Self> {
        let data: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        Self::from_bytes(gpu, &data, MaskKind::Bool, mask.shape())
    }

    /// Uploads an additive mask.
    pub fn upload_additive<T: DeviceElement>(
        gpu: &GpuContext,
        mask: ArrayViewD<'_, T>,
    ) -> Result<Self> {
        let data: Vec<T> = mask.iter().copied().collect();
        Self::from_bytes(
            gpu,
            as_bytes(&data),
            MaskKind::Additive(T::DTYPE),
            mask.shape(),
        )
    }

    /// A mask over device memory the caller owns (a framework's tensor, broadcast views
    /// with stride 0 included): `len` bytes from `ptr` seen as `kind` (bool as one byte
    /// per element, 0 or 1; additive in its dtype) with `shape` and element `strides`.
    /// Checked at launch as an uploaded mask is (inside the `len` bytes, aligned).
    ///
    /// # Safety
    /// As [`DeviceTensor::from_raw`]; a bool mask's bytes are 0 or 1.
    ///
    /// # Errors
    /// A rank above 4, strides of another rank than the shape, a negative stride.
    pub unsafe fn from_raw(
        ptr: u64,
        len: usize,
        kind: MaskKind,
        shape: &[usize],
        strides: &[isize],
    ) -> Result<Self> {
        if shape.len() > 4 || strides.len() != shape.len() {
            return Err(CudaError::bad_layout(
                "attn_mask",
                "rank 0 to 4 with one stride per axis",
                format!("shape {shape:?} strides {strides:?}"),
            ));
        }
        extent("attn_mask", shape, strides)?;
        Ok(DeviceMask {
            buffer: Arc::new(Buffer::Borrowed { ptr, len }),
            kind,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
        })
    }

    fn from_bytes(gpu: &GpuContext, bytes: &[u8], kind: MaskKind, shape: &[usize]) -> Result<Self> {
        let desc = MaskDesc::contiguous(kind, shape);
        Ok(DeviceMask {
            buffer: Buffer::upload(gpu, bytes, "an attn_mask")?,
            kind,
            shape: desc.shape,
            strides: desc.strides,
        })
    }

    /// What `sdpa-core` needs to validate and broadcast it.
    pub fn desc(&self) -> MaskDesc {
        MaskDesc {
            kind: self.kind,
            shape: self.shape.clone(),
            strides: self.strides.clone(),
        }
    }

    /// Checks the mask's view against its buffer for elements of `size` bytes and
    /// returns its aligned address.
    pub(crate) fn check(&self, gpu: &GpuContext, size: usize) -> Result<u64> {
        let elements = extent("attn_mask", &self.shape, &self.strides)?;
        check_inside("attn_mask", self.buffer.len(), elements, size, 0, || {
            format!("shape {:?} strides {:?}", self.shape, self.strides)
        })?;
        let address = self.buffer.address(gpu);
        if address % size as u64 != 0 {
            return Err(CudaError::Misaligned {
                arg: "attn_mask",
                align: size,
                address,
            });
        }
        Ok(address)
    }
}

/// Sequence boundaries of a variable-length batch on the device (`cu_seqlens`, length
/// B+1, from 0, non-decreasing), with the host copy the launch checks use.
#[derive(Debug, Clone)]
pub struct DeviceSeqlens {
    pub(crate) buffer: Arc<Buffer>,
    host: Vec<i64>,
    signed: bool,
}

impl DeviceSeqlens {
    fn new(gpu: &GpuContext, host: Vec<i64>, bytes: &[u8], signed: bool) -> Result<Self> {
        if host.first() != Some(&0) || host.windows(2).any(|w| w[1] < w[0]) {
            return Err(CudaError::bad_layout(
                "cu_seqlens",
                "B+1 offsets starting at 0, non-decreasing",
                format!("{host:?}"),
            ));
        }
        Ok(DeviceSeqlens {
            buffer: Buffer::upload(gpu, bytes, "cu_seqlens")?,
            host,
            signed,
        })
    }

    /// From `u32` offsets.
    pub fn upload_u32(gpu: &GpuContext, cu_seqlens: &[u32]) -> Result<Self> {
        Self::new(
            gpu,
            cu_seqlens.iter().map(|&x| x as i64).collect(),
            as_bytes(cu_seqlens),
            false,
        )
    }

    /// From `i32` offsets.
    pub fn upload_i32(gpu: &GpuContext, cu_seqlens: &[i32]) -> Result<Self> {
        Self::new(
            gpu,
            cu_seqlens.iter().map(|&x| x as i64).collect(),
            as_bytes(cu_seqlens),
            true,
        )
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.host.len().saturating_sub(1)
    }

    /// Total rows (the last offset).
    pub fn total(&self) -> usize {
        self.host.last().copied().unwrap_or(0) as usize
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.host
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Per-sequence lengths.
    pub fn lengths(&self) -> Vec<usize> {
        self.host
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect()
    }

    /// The index type of the offsets, as the kernels read it.
    pub fn code(&self) -> SeqlenCode {
        if self.signed {
            SeqlenCode::VarlenI32
        } else {
            SeqlenCode::VarlenU32
        }
    }

    /// Device address of the offsets.
    pub fn address(&self, gpu: &GpuContext) -> u64 {
        self.buffer.address(gpu)
    }
}

/// Host arrays of a bool or additive mask, as `sdpa_ref::Mask` holds them.
#[derive(Debug, Clone)]
pub enum HostMask<'a, T> {
    /// `true` = takes part.
    Bool(ArrayViewD<'a, bool>),
    /// Added to the scaled scores.
    Additive(ArrayViewD<'a, T>),
}

impl<T: DeviceElement> HostMask<'_, T> {
    /// Uploads it.
    pub fn upload(&self, gpu: &GpuContext) -> Result<DeviceMask> {
        match self {
            HostMask::Bool(m) => DeviceMask::upload_bool(gpu, m.view()),
            HostMask::Additive(m) => DeviceMask::upload_additive(gpu, m.view()),
        }
    }
}

/// `[B, Hq, L]` f32 log-sum-exp out of its `[B, Hq, L, 1]` device tensor.
pub fn lse_to_3d(lse: Array4<f32>) -> ndarray::Array3<f32> {
    let s = lse.shape().to_vec();
    lse.into_shape_with_order((s[0], s[1], s[2]))
        .expect("lse is [B, Hq, L, 1]")
}

#[cfg(test)]
mod tests {
    use super::extent;

    #[test]
    fn extents_are_checked_not_wrapped() {
        assert_eq!(extent("t", &[2, 3, 4, 5], &[60, 20, 5, 1]).unwrap(), 120);
        assert_eq!(extent("t", &[2, 0, 4, 5], &[60, 20, 5, 1]).unwrap(), 0);
        // Shape 5 with stride 2^62 + 1: 4 * (2^62 + 1) wraps a 64-bit usize to 4, a
        // small extent that would pass a buffer check and read out of bounds.
        let huge = (1isize << 62) + 1;
        let e = extent("view", &[1, 1, 1, 5], &[0, 0, 0, huge]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("view: expected a view whose extent fits"),
            "{e}"
        );
        assert!(extent("view", &[1, 1, 2, 1], &[0, 0, -1, 1]).is_err());
        assert!(extent("view", &[usize::MAX, 1, 1, 2], &[1, 0, 0, 1]).is_err());
    }
}

/// ALiBi slopes on the device (DESIGN.md "Inference"): f32 `[Hq]` (every batch row) or
/// `[B, Hq]`, checked when uploaded (shape, every slope finite) by
/// `sdpa_core::check_alibi_slopes`, the one check of every backend's slopes. A call
/// refuses slopes uploaded for another `B` or `Hq`.
#[derive(Debug, Clone)]
pub struct DeviceSlopes {
    pub(crate) buffer: Arc<Buffer>,
    batch: usize,
    heads_q: usize,
    stride_b: usize,
}

impl DeviceSlopes {
    /// Uploads `slopes` for calls of `batch` batch rows and `heads_q` query heads.
    ///
    /// # Errors
    /// `alibi_slopes` of a shape other than `[heads_q]` or `[batch, heads_q]`, a slope
    /// that is not finite, a failed upload.
    pub fn upload(
        gpu: &GpuContext,
        slopes: ArrayViewD<'_, f32>,
        batch: usize,
        heads_q: usize,
    ) -> Result<Self> {
        let stride_b =
            sdpa_core::check_alibi_slopes(slopes.shape(), slopes.iter(), batch, heads_q)?;
        let data: Vec<f32> = slopes.iter().copied().collect();
        Ok(DeviceSlopes {
            buffer: Buffer::upload(gpu, as_bytes(&data), "alibi_slopes")?,
            batch,
            heads_q,
            stride_b,
        })
    }

    /// The slopes' device address and batch stride (elements: 0 for `[Hq]`) for a call
    /// of `batch` rows and `heads_q` query heads (`[Hq]` slopes fit any batch).
    ///
    /// # Errors
    /// Slopes uploaded for another batch or head count, naming `alibi_slopes`.
    pub(crate) fn for_call(
        &self,
        gpu: &GpuContext,
        batch: usize,
        heads_q: usize,
    ) -> Result<(u64, usize)> {
        // [Hq] slopes serve any batch; [B, Hq] only their own.
        let fits = self.heads_q == heads_q && (self.stride_b == 0 || self.batch == batch);
        if !fits {
            return Err(CudaError::bad_layout(
                "alibi_slopes",
                format!("slopes for B = {batch}, Hq = {heads_q}"),
                format!(
                    "slopes uploaded for B = {}, Hq = {}",
                    self.batch, self.heads_q
                ),
            ));
        }
        Ok((self.buffer.address(gpu), self.stride_b))
    }
}
