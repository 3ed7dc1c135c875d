//! The native half of the Python package `sdpa_rs` (`bindings/python/python/sdpa_rs`).
//!
//! The Python side describes each torch tensor or numpy array (address, shape, element
//! strides, dtype, device), allocates the outputs with the framework, and calls these
//! functions, which run the call on that memory in place: inputs are never copied; the
//! CPU reference's results are written into the output buffers, CUDA kernels write them
//! directly, on the caller's stream. This module is private (`sdpa_rs._native`): the
//! descriptions must come from live tensors, which `sdpa_rs` guarantees.

use half::{bf16, f16};
use ndarray::{ArrayD, ArrayView4, ArrayViewD, Dimension, IxDyn, ShapeBuilder};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use sdpa::{
    Backend, BackendSet, Causal, CudaError, DType, Device, DeviceMask, DeviceSlopes, DeviceTensor,
    Dropout, Elem, GpuContext, KernelConfig, Problem, SdpaOptions,
};
use sdpa_core::{Layout, MaskDesc, MaskKind, TensorDesc, Window};
use sdpa_harness::Tensor as CaseTensor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A tensor as the Python side describes it: the tuple `(name, ptr, shape, strides,
/// dtype, device)` (a tuple, not a dict: it is built for every tensor of every call).
#[derive(Debug, Clone)]
struct Desc {
    /// The argument's name, for messages (`query`, `attn_mask`, ...).
    name: String,
    /// Address of element 0.
    ptr: usize,
    shape: Vec<usize>,
    /// Element strides (never negative: refused in Python).
    strides: Vec<isize>,
    /// `f64`, `f32`, `f16`, `bf16` or `bool`.
    dtype: String,
    /// -1 for the CPU, else the CUDA ordinal.
    device: i64,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Desc {
    type Error = PyErr;

    fn extract(ob: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let (name, ptr, shape, strides, dtype, device) = ob.extract()?;
        Ok(Desc {
            name,
            ptr,
            shape,
            strides,
            dtype,
            device,
        })
    }
}

/// The call's options as the Python side resolved them.
#[derive(Debug, Clone, FromPyObject)]
#[pyo3(from_item_all)]
struct Opts {
    /// `none`, `top_left` or `bottom_right`.
    causal: String,
    dropout_p: f64,
    seed: u64,
    offset: u64,
    scale: Option<f64>,
    enable_gqa: bool,
    window_left: i64,
    window_right: i64,
    softcap: Option<f64>,
    /// Enabled backends by name.
    backends: Vec<String>,
    /// The caller's CUDA stream (`torch.cuda.current_stream().cuda_stream`; 0 = default).
    stream: usize,
}

/// ALiBi slopes, copied to the host by the Python side (B x Hq floats at most).
#[derive(Debug, Clone, FromPyObject)]
#[pyo3(from_item_all)]
struct Slopes {
    values: Vec<f32>,
    shape: Vec<usize>,
}

fn value_error(msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(msg.to_string())
}

/// Bad input (the spec's, a layout, a placement, a size) is a `ValueError`; the device
/// failing (a missing library, the driver, cuBLAS, a compile, memory) a `RuntimeError`.
fn py_err(e: impl Into<sdpa::Error>) -> PyErr {
    let e = e.into();
    let bad_input = match &e {
        sdpa::Error::Cuda(c) => matches!(
            c,
            CudaError::BadLayout { .. } | CudaError::Misaligned { .. } | CudaError::Spec(_)
        ),
        _ => true,
    };
    if bad_input {
        value_error(e)
    } else {
        PyRuntimeError::new_err(e.to_string())
    }
}

fn harness_err(e: sdpa_harness::HarnessError) -> PyErr {
    value_error(e)
}

fn dtype_of(d: &Desc) -> PyResult<DType> {
    match d.dtype.as_str() {
        "f64" => Ok(DType::F64),
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(value_error(format!(
            "{}: expected a float64, float32, float16 or bfloat16 tensor, got {other}",
            d.name
        ))),
    }
}

impl Opts {
    fn options(&self) -> PyResult<SdpaOptions> {
        let causal = match self.causal.as_str() {
            "none" => Causal::None,
            "top_left" => Causal::TopLeft,
            "bottom_right" => Causal::BottomRight,
            other => {
                return Err(value_error(format!(
                    "causal: expected None, \"top_left\" or \"bottom_right\", got {other:?}"
                )))
            }
        };
        Ok(SdpaOptions {
            causal,
            dropout: Dropout {
                p: self.dropout_p,
                seed: self.seed,
                offset: self.offset,
            },
            scale: self.scale,
            enable_gqa: self.enable_gqa,
            window: Window {
                left: self.window_left,
                right: self.window_right,
            },
            softcap: self.softcap,
        })
    }

    fn backend_set(&self) -> PyResult<BackendSet> {
        let mut set = BackendSet::EMPTY;
        for name in &self.backends {
            let b = match name.as_str() {
                "flash" => Backend::Flash,
                "efficient" => Backend::Efficient,
                "math" => Backend::Math,
                other => {
                    return Err(value_error(format!(
                        "backend: expected \"auto\" or some of \"flash\", \"efficient\", \"math\", got {other:?}"
                    )))
                }
            };
            set = set.with(b);
        }
        Ok(set)
    }
}

/// One past the largest element offset of the view, in checked arithmetic
/// (`sdpa_cuda::extent`, the one check of every view), its error naming `d`.
fn extent(d: &Desc) -> PyResult<usize> {
    if d.shape.len() != d.strides.len() {
        return Err(value_error(format!(
            "{}: expected one stride per axis, got shape {:?} strides {:?}",
            d.name, d.shape, d.strides
        )));
    }
    sdpa_cuda::extent("view", &d.shape, &d.strides).map_err(|e| match e {
        CudaError::BadLayout {
            expected, actual, ..
        } => value_error(format!("{}: expected {expected}, got {actual}", d.name)),
        other => py_err(other),
    })
}

/// The host pointer of `d` as `*const T`: aligned, non-null where it holds elements
/// (a dangling, aligned pointer for an empty view, which ndarray never reads).
fn host_ptr<T>(d: &Desc) -> PyResult<*mut T> {
    if d.device != -1 {
        return Err(value_error(format!(
            "{}: expected a CPU tensor, got one on cuda:{}",
            d.name, d.device
        )));
    }
    if extent(d)? == 0 {
        return Ok(std::ptr::NonNull::<T>::dangling().as_ptr());
    }
    if d.ptr == 0 || d.ptr % std::mem::align_of::<T>() != 0 {
        return Err(value_error(format!(
            "{}: expected an address aligned to {} bytes, got {:#x}",
            d.name,
            std::mem::align_of::<T>(),
            d.ptr
        )));
    }
    Ok(d.ptr as *mut T)
}

/// A 4-d host view of a live tensor.
///
/// # Safety
/// `d` describes memory of a live tensor of element type `T` covering its extent, not
/// written while the view is used.
unsafe fn view4<'a, T: Elem>(d: &Desc) -> PyResult<ArrayView4<'a, T>> {
    expect_dtype::<T>(d)?;
    let ptr = host_ptr::<T>(d)?;
    let [a, b, c, e] = <[usize; 4]>::try_from(d.shape.as_slice()).map_err(|_| {
        value_error(format!(
            "{}: expected a 4-d tensor [B, H, L, E], got shape {:?}",
            d.name, d.shape
        ))
    })?;
    let s: Vec<usize> = d.strides.iter().map(|&s| s as usize).collect();
    // SAFETY: the caller's contract; strides were checked non-negative by host_ptr's
    // extent, so the view's elements are [ptr, ptr + extent).
    Ok(unsafe { ArrayView4::from_shape_ptr((a, b, c, e).strides((s[0], s[1], s[2], s[3])), ptr) })
}

/// Refuses a tensor whose dtype is not `T`'s: a view of it as `T` would misread it.
fn expect_dtype<T: Elem>(d: &Desc) -> PyResult<()> {
    if d.dtype != T::DTYPE.name() {
        return Err(value_error(format!(
            "{}: expected dtype {} (the dtype of query; lse: f32), got {}",
            d.name,
            T::DTYPE,
            d.dtype
        )));
    }
    Ok(())
}

/// A host view of any rank (a mask, rank 0 to 4).
///
/// # Safety
/// As [`view4`].
unsafe fn view_d<'a, T>(d: &Desc) -> PyResult<ArrayViewD<'a, T>> {
    let ptr = host_ptr::<T>(d)?;
    let s: Vec<usize> = d.strides.iter().map(|&s| s as usize).collect();
    // SAFETY: as view4.
    Ok(unsafe { ArrayViewD::from_shape_ptr(IxDyn(&d.shape).strides(IxDyn(&s)), ptr) })
}

/// Writes `values` (logical row-major order) into the contiguous output `d`.
///
/// # Safety
/// `d` describes a live, contiguous tensor of element type `T` that nothing else reads
/// or writes during the call.
unsafe fn write_out<T: Elem>(
    d: &Desc,
    shape: &[usize],
    values: impl Iterator<Item = T>,
) -> PyResult<()> {
    expect_dtype::<T>(d)?;
    let count: usize = shape.iter().product();
    if d.shape.iter().product::<usize>() != count {
        return Err(value_error(format!(
            "{}: expected {count} elements ({shape:?}), got shape {:?}",
            d.name, d.shape
        )));
    }
    if count == 0 {
        return Ok(());
    }
    let ptr = host_ptr::<T>(d)?;
    // SAFETY: the caller's contract; the Python side allocated `d` contiguous with
    // `count` elements.
    let slot = unsafe { std::slice::from_raw_parts_mut(ptr, count) };
    let mut n = 0;
    for (s, v) in slot.iter_mut().zip(values) {
        *s = v;
        n += 1;
    }
    if n != count {
        return Err(value_error(format!(
            "{}: expected {count} values, the result held {n}",
            d.name
        )));
    }
    Ok(())
}

fn slopes_array(alibi: &Option<Slopes>) -> PyResult<Option<ArrayD<f32>>> {
    alibi
        .as_ref()
        .map(|s| {
            ArrayD::from_shape_vec(IxDyn(&s.shape), s.values.clone()).map_err(|_| {
                value_error(format!(
                    "alibi_slopes: expected {} values for shape {:?}",
                    s.values.len(),
                    s.shape
                ))
            })
        })
        .transpose()
}

/// The host mask of `d` typed for queries of dtype `T`.
///
/// # Safety
/// As [`view4`].
unsafe fn host_mask<'a, T: Elem>(d: &Desc) -> PyResult<sdpa::Mask<'a, T>> {
    if d.dtype == "bool" {
        // SAFETY: torch and numpy store bools as one byte, 0 or 1.
        return Ok(sdpa::Mask::Bool(unsafe { view_d::<bool>(d) }?));
    }
    if dtype_of(d)? != T::DTYPE {
        return Err(value_error(format!(
            "attn_mask: expected a bool mask or one of the query's dtype ({}), got {}",
            T::DTYPE,
            d.dtype
        )));
    }
    // SAFETY: the caller's contract, and the dtype was checked above.
    Ok(sdpa::Mask::Additive(unsafe { view_d::<T>(d) }?))
}

/// Every host input of a call, borrowed.
struct HostCall<'a> {
    q: &'a Desc,
    k: &'a Desc,
    v: &'a Desc,
    mask: Option<&'a Desc>,
}

fn forward_cpu<T: Elem>(
    call: &HostCall<'_>,
    alibi: Option<ArrayD<f32>>,
    options: &SdpaOptions,
    set: BackendSet,
    out: &Desc,
    lse: &Desc,
) -> PyResult<Backend> {
    // SAFETY: the Python side passes descriptions of live tensors it holds for the call.
    let (q, k, v) = unsafe {
        (
            view4::<T>(call.q)?,
            view4::<T>(call.k)?,
            view4::<T>(call.v)?,
        )
    };
    let mask = call
        .mask
        .map(|m| unsafe { host_mask::<T>(m) })
        .transpose()?;
    let r = sdpa::attention_with_alibi(
        sdpa::Tensor::Host(q),
        sdpa::Tensor::Host(k),
        sdpa::Tensor::Host(v),
        mask,
        alibi.as_ref().map(|a| sdpa::Alibi::Host(a.view())),
        options,
        &sdpa::Exec::cpu().with_backends(set),
    )
    .map_err(py_err)?;
    let backend = r.backend;
    let (o, l) = r
        .into_host()
        .ok_or_else(|| PyRuntimeError::new_err("host arrays in gave device tensors out"))?;
    // SAFETY: `out` and `lse` are contiguous tensors the Python side allocated.
    unsafe {
        write_out(out, o.shape(), o.iter().copied())?;
        write_out(lse, l.shape(), l.iter().copied())?;
    }
    Ok(backend)
}

#[allow(clippy::too_many_arguments)]
fn backward_cpu<T: Elem>(
    call: &HostCall<'_>,
    out: &Desc,
    lse: &Desc,
    dout: &Desc,
    alibi: Option<ArrayD<f32>>,
    options: &SdpaOptions,
    set: BackendSet,
    grads: &[Desc],
) -> PyResult<Backend> {
    // SAFETY: as forward_cpu.
    let (q, k, v, o, d) = unsafe {
        (
            view4::<T>(call.q)?,
            view4::<T>(call.k)?,
            view4::<T>(call.v)?,
            view4::<T>(out)?,
            view4::<T>(dout)?,
        )
    };
    expect_dtype::<f32>(lse)?;
    let l = unsafe { view_d::<f32>(lse) }?;
    let l = l.into_dimensionality::<ndarray::Ix3>().map_err(|_| {
        value_error(format!(
            "lse: expected [B, Hq, L], got shape {:?}",
            lse.shape
        ))
    })?;
    let mask = call
        .mask
        .map(|m| unsafe { host_mask::<T>(m) })
        .transpose()?;
    let problem = sdpa_ref_problem(call, options)?;
    let exec = sdpa::Exec::cpu().with_backends(set);
    let backend = exec.select(&problem).map_err(py_err)?;
    let g = sdpa::attention_backward_with_alibi(
        q,
        k,
        v,
        o,
        l,
        d,
        mask,
        alibi.as_ref().map(|a| a.view()),
        options,
        &exec,
    )
    .map_err(py_err)?;
    // SAFETY: the gradient buffers are contiguous tensors the Python side allocated.
    unsafe {
        write_out(&grads[0], g.dq.shape(), g.dq.iter().copied())?;
        write_out(&grads[1], g.dk.shape(), g.dk.iter().copied())?;
        write_out(&grads[2], g.dv.shape(), g.dv.iter().copied())?;
        if let (Some(target), Some(dm)) = (grads.get(3), g.dmask.as_ref()) {
            write_out(target, dm.shape(), dm.iter().copied())?;
        }
    }
    Ok(backend)
}

fn tensor_desc(d: &Desc) -> PyResult<TensorDesc> {
    let shape = <[usize; 4]>::try_from(d.shape.as_slice()).map_err(|_| {
        value_error(format!(
            "{}: expected a 4-d tensor [B, H, L, E], got shape {:?}",
            d.name, d.shape
        ))
    })?;
    let strides = <[isize; 4]>::try_from(d.strides.as_slice())
        .map_err(|_| value_error(format!("{}: expected 4 strides", d.name)))?;
    Ok(TensorDesc {
        dtype: dtype_of(d)?,
        layout: Layout { shape, strides },
    })
}

fn mask_desc(d: &Desc) -> PyResult<MaskDesc> {
    let kind = if d.dtype == "bool" {
        MaskKind::Bool
    } else {
        MaskKind::Additive(dtype_of(d)?)
    };
    extent(d)?;
    Ok(MaskDesc {
        kind,
        shape: d.shape.clone(),
        strides: d.strides.clone(),
    })
}

/// The problem of a call from the descriptions alone (no data is read).
fn sdpa_ref_problem(call: &HostCall<'_>, options: &SdpaOptions) -> PyResult<Problem> {
    let mask = call.mask.map(mask_desc).transpose()?;
    Problem::new(
        &tensor_desc(call.q)?,
        &tensor_desc(call.k)?,
        &tensor_desc(call.v)?,
        mask.as_ref(),
        options,
    )
    .map_err(py_err)
}

/// The contexts this process opened, one per (device, stream): each keeps its compiled
/// kernels; a stream seen again reuses them (the disk cache serves a new one).
type Contexts = Mutex<HashMap<(i64, usize), Arc<GpuContext>>>;

fn context(device: i64, stream: usize) -> PyResult<Arc<GpuContext>> {
    static CONTEXTS: OnceLock<Contexts> = OnceLock::new();
    let map = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| PyRuntimeError::new_err("a CUDA call panicked earlier in this process"))?;
    if let Some(g) = map.get(&(device, stream)) {
        return Ok(g.clone());
    }
    if !sdpa_cuda::driver_available() {
        return Err(PyRuntimeError::new_err(
            "the CUDA driver (libcuda.so) cannot be loaded on this machine",
        ));
    }
    let ordinal = usize::try_from(device)
        .map_err(|_| value_error(format!("device: expected a CUDA ordinal, got {device}")))?;
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| py_err(CudaError::from(e)))?;
    // SAFETY: every context here uses one stream, so cudarc's cross-stream event
    // tracking has nothing to order (as GpuContext::with_config does).
    unsafe { ctx.disable_event_tracking() };
    let s = if stream == 0 {
        ctx.default_stream()
    } else {
        // SAFETY: the handle is torch's current stream of this device, which torch keeps
        // alive (its streams live as long as the process).
        unsafe { ctx.wrap_borrowed_stream(stream as cudarc::driver::sys::CUstream) }
    };
    let config = KernelConfig::from_env().map_err(py_err)?;
    let gpu = Arc::new(GpuContext::on_stream(s, config).map_err(py_err)?);
    map.insert((device, stream), gpu.clone());
    Ok(gpu)
}

/// A borrowed device tensor over a framework's memory.
fn device_tensor(gpu: &GpuContext, d: &Desc, ordinal: i64) -> PyResult<DeviceTensor> {
    if d.device != ordinal {
        return Err(value_error(format!(
            "{}: expected a tensor on cuda:{ordinal}, got one on {}",
            d.name,
            if d.device < 0 {
                "the CPU".to_string()
            } else {
                format!("cuda:{}", d.device)
            }
        )));
    }
    let mut desc = d.clone();
    if desc.shape.len() == 3 {
        // lse [B, Hq, L] is the kernels' [B, Hq, L, 1].
        desc.shape.push(1);
        desc.strides.push(1);
    }
    let t = tensor_desc(&desc)?;
    let bytes = extent(&desc)?
        .checked_mul(t.dtype.size_bytes())
        .ok_or_else(|| value_error(format!("{}: expected a size that fits in memory", d.name)))?;
    // SAFETY: `d` describes a live tensor of the framework on this device covering
    // `bytes` from `ptr`; the work below is queued on the framework's current stream,
    // which orders it with the framework's own use of that memory.
    unsafe { DeviceTensor::from_raw(gpu, d.ptr as u64, bytes, t.dtype, t.layout, 0) }
        .map_err(py_err)
}

fn device_mask(d: &Desc, ordinal: i64) -> PyResult<DeviceMask> {
    if d.device != ordinal {
        return Err(value_error(format!(
            "attn_mask: expected a tensor on cuda:{ordinal}, got one on another device"
        )));
    }
    let m = mask_desc(d)?;
    let size = match m.kind {
        MaskKind::Bool => 1,
        MaskKind::Additive(dt) => dt.size_bytes(),
    };
    let bytes = extent(d)?
        .checked_mul(size)
        .ok_or_else(|| value_error("attn_mask: expected a size that fits in memory"))?;
    // SAFETY: as device_tensor.
    unsafe { DeviceMask::from_raw(d.ptr as u64, bytes, m.kind, &m.shape, &m.strides) }
        .map_err(py_err)
}

/// The inputs of a CUDA call, borrowed from the framework on its device, with the
/// context of the caller's stream and the slopes uploaded (and checked).
struct DeviceCall {
    gpu: Arc<GpuContext>,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    mask: Option<DeviceMask>,
    slopes: Option<DeviceSlopes>,
}

impl DeviceCall {
    fn new(call: &HostCall<'_>, slopes: Option<ArrayD<f32>>, stream: usize) -> PyResult<Self> {
        let dev = call.q.device;
        let gpu = context(dev, stream)?;
        let t = |d: &Desc| device_tensor(&gpu, d, dev);
        let (q, k, v) = (t(call.q)?, t(call.k)?, t(call.v)?);
        let mask = call.mask.map(|m| device_mask(m, dev)).transpose()?;
        let [b, hq] = [call.q.shape[0], call.q.shape[1]];
        let slopes = slopes
            .map(|s| DeviceSlopes::upload(&gpu, s.view(), b, hq))
            .transpose()
            .map_err(py_err)?;
        Ok(DeviceCall {
            gpu,
            q,
            k,
            v,
            mask,
            slopes,
        })
    }
}

/// Runs the forward into `out` `[B, Hq, L, Ev]` and `lse` `[B, Hq, L]` (f32), both
/// contiguous and allocated by the caller; returns the backend that ran.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, alibi, opts, out, lse))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    q: Desc,
    k: Desc,
    v: Desc,
    mask: Option<Desc>,
    alibi: Option<Slopes>,
    opts: Opts,
    out: Desc,
    lse: Desc,
) -> PyResult<String> {
    let options = opts.options()?;
    let set = opts.backend_set()?;
    let slopes = slopes_array(&alibi)?;
    py.detach(move || -> PyResult<String> {
        let call = HostCall {
            q: &q,
            k: &k,
            v: &v,
            mask: mask.as_ref(),
        };
        if q.device < 0 {
            let backend = match dtype_of(&q)? {
                DType::F64 => forward_cpu::<f64>(&call, slopes, &options, set, &out, &lse),
                DType::F32 => forward_cpu::<f32>(&call, slopes, &options, set, &out, &lse),
                DType::F16 => forward_cpu::<f16>(&call, slopes, &options, set, &out, &lse),
                DType::BF16 => forward_cpu::<bf16>(&call, slopes, &options, set, &out, &lse),
            }?;
            return Ok(backend.to_string());
        }
        let c = DeviceCall::new(&call, slopes, opts.stream)?;
        let (gpu, dq, dk, dv) = (&c.gpu, &c.q, &c.k, &c.v);
        let (dmask, dslopes) = (&c.mask, &c.slopes);
        let dev = q.device;
        let problem = gpu
            .problem(dq, dk, dv, dmask.as_ref(), &options)
            .map_err(py_err)?;
        let backend = sdpa::select(set, &problem, Device::Cuda).map_err(py_err)?;
        let (o, l) = (
            device_tensor(gpu, &out, dev)?,
            device_tensor(gpu, &lse, dev)?,
        );
        gpu.run(
            backend,
            &problem,
            dq,
            dk,
            dv,
            dmask.as_ref(),
            dslopes.as_ref(),
            &o,
            &l,
        )
        .map_err(py_err)?;
        Ok(backend.to_string())
    })
}

/// Runs the backward of a forward with the same options into `grads` (dq, dk, dv and,
/// for an additive mask that wants one, dmask), all contiguous and allocated by the
/// caller; returns the backend whose backward ran.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, alibi, opts, out, lse, dout, grads))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    q: Desc,
    k: Desc,
    v: Desc,
    mask: Option<Desc>,
    alibi: Option<Slopes>,
    opts: Opts,
    out: Desc,
    lse: Desc,
    dout: Desc,
    grads: Vec<Desc>,
) -> PyResult<String> {
    let options = opts.options()?;
    let set = opts.backend_set()?;
    let slopes = slopes_array(&alibi)?;
    if grads.len() < 3 {
        return Err(value_error("grads: expected dq, dk, dv (and dmask)"));
    }
    py.detach(move || -> PyResult<String> {
        let call = HostCall {
            q: &q,
            k: &k,
            v: &v,
            mask: mask.as_ref(),
        };
        if q.device < 0 {
            let backend = match dtype_of(&q)? {
                DType::F64 => {
                    backward_cpu::<f64>(&call, &out, &lse, &dout, slopes, &options, set, &grads)
                }
                DType::F32 => {
                    backward_cpu::<f32>(&call, &out, &lse, &dout, slopes, &options, set, &grads)
                }
                DType::F16 => {
                    backward_cpu::<f16>(&call, &out, &lse, &dout, slopes, &options, set, &grads)
                }
                DType::BF16 => {
                    backward_cpu::<bf16>(&call, &out, &lse, &dout, slopes, &options, set, &grads)
                }
            }?;
            return Ok(backend.to_string());
        }
        let c = DeviceCall::new(&call, slopes, opts.stream)?;
        let (gpu, dq, dk, dv) = (&c.gpu, &c.q, &c.k, &c.v);
        let (dmask, dslopes) = (&c.mask, &c.slopes);
        let dev = q.device;
        let t = |d: &Desc| device_tensor(gpu, d, dev);
        let (o, l, g) = (t(&out)?, t(&lse)?, t(&dout)?);
        let r = gpu
            .sdpa_backward_with_alibi(
                dq,
                dk,
                dv,
                &o,
                &l,
                &g,
                dmask.as_ref(),
                dslopes.as_ref(),
                &options,
                set,
            )
            .map_err(py_err)?;
        r.dq.copy_into(gpu, &t(&grads[0])?).map_err(py_err)?;
        r.dk.copy_into(gpu, &t(&grads[1])?).map_err(py_err)?;
        r.dv.copy_into(gpu, &t(&grads[2])?).map_err(py_err)?;
        if let (Some(target), Some(dm)) = (grads.get(3), r.dmask.as_ref()) {
            // The gradient is stored as the mask's shape left-padded to rank 4; the
            // target is the mask's shape, contiguous: the same bytes.
            let mut padded = target.clone();
            while padded.shape.len() < 4 {
                padded.shape.insert(0, 1);
                padded
                    .strides
                    .insert(0, padded.strides.first().copied().unwrap_or(1));
            }
            dm.copy_into(gpu, &t(&padded)?).map_err(py_err)?;
        }
        // The gradients above were allocated here and are freed (stream-ordered) when
        // `r` drops, after the copies on the same stream.
        Ok(r.backend.to_string())
    })
}

/// Which backend the forward would pick and every backend's reason (None = it can run),
/// from the descriptions alone; on CUDA also the backward's pick.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, opts))]
fn backends<'py>(
    py: Python<'py>,
    q: Desc,
    k: Desc,
    v: Desc,
    mask: Option<Desc>,
    opts: Opts,
) -> PyResult<Bound<'py, PyDict>> {
    let options = opts.options()?;
    let set = opts.backend_set()?;
    let call = HostCall {
        q: &q,
        k: &k,
        v: &v,
        mask: mask.as_ref(),
    };
    let problem = sdpa_ref_problem(&call, &options)?;
    let device = if q.device < 0 {
        Device::Cpu
    } else {
        Device::Cuda
    };
    let result = PyDict::new(py);
    let reasons = PyDict::new(py);
    for b in [Backend::Flash, Backend::Efficient, Backend::Math] {
        let reason = if !set.contains(b) {
            Some("not enabled by backend=".to_string())
        } else {
            sdpa_core::check_support(b, &problem, device).err()
        };
        reasons.set_item(b.to_string(), reason)?;
    }
    result.set_item("reasons", reasons)?;
    result.set_item(
        "forward",
        sdpa::select(set, &problem, device)
            .ok()
            .map(|b| b.to_string()),
    )?;
    let backward = match device {
        Device::Cpu => sdpa::select(set, &problem, device)
            .ok()
            .map(|_| "math".to_string()),
        Device::Cuda => sdpa_cuda::select_backward(&problem, set, None)
            .ok()
            .map(|b| b.to_string()),
    };
    result.set_item("backward", backward)?;
    result.set_item("problem", problem.summary())?;
    Ok(result)
}

/// A copy of a host tensor into the harness's tensor type.
///
/// # Safety
/// As [`view4`].
unsafe fn case_tensor(d: &Desc) -> PyResult<CaseTensor> {
    // SAFETY: the caller's contract.
    unsafe {
        Ok(match d.dtype.as_str() {
            "bool" => CaseTensor::Bool(view_d::<bool>(d)?.to_owned()),
            _ => match dtype_of(d)? {
                DType::F64 => CaseTensor::F64(view_d::<f64>(d)?.to_owned()),
                DType::F32 => CaseTensor::F32(view_d::<f32>(d)?.to_owned()),
                DType::F16 => CaseTensor::F16(view_d::<f16>(d)?.to_owned()),
                DType::BF16 => CaseTensor::BF16(view_d::<bf16>(d)?.to_owned()),
            },
        })
    }
}

fn report_dict<'py>(
    py: Python<'py>,
    r: &sdpa_harness::compare::Report,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("count", r.count)?;
    d.set_item("max_abs", r.max_abs)?;
    d.set_item("index", r.max_abs_index.clone())?;
    d.set_item("got", r.worst.0)?;
    d.set_item("truth", r.worst.1)?;
    d.set_item("max_rel", r.max_rel)?;
    d.set_item("non_finite", r.non_finite)?;
    d.set_item("outside", r.outside)?;
    d.set_item("line", r.to_string())?;
    Ok(d)
}

/// The query rows whose largest error is largest: `(b, h, i, max |got - truth|)`, at
/// most `count`, worst first (a non-finite element where the truth is finite counts
/// as infinite).
fn worst_rows(
    got: &ArrayD<f64>,
    truth: &ArrayD<f64>,
    count: usize,
) -> Vec<(usize, usize, usize, f64)> {
    let mut rows: HashMap<(usize, usize, usize), f64> = HashMap::new();
    for ((index, &t), &g) in truth.indexed_iter().zip(got.iter()) {
        let err = if t.is_finite() {
            if g.is_finite() {
                (g - t).abs()
            } else {
                f64::INFINITY
            }
        } else if (g.is_nan() && t.is_nan()) || g == t {
            0.0
        } else {
            f64::INFINITY
        };
        let ix = index.slice();
        let row = rows.entry((ix[0], ix[1], ix[2])).or_insert(0.0);
        *row = row.max(err);
    }
    let mut rows: Vec<_> = rows
        .into_iter()
        .map(|((b, h, i), e)| (b, h, i, e))
        .collect();
    rows.sort_by(|x, y| {
        y.3.total_cmp(&x.3)
            .then((x.0, x.1, x.2).cmp(&(y.0, y.1, y.2)))
    });
    rows.truncate(count);
    rows
}

/// Holds `out` (and `lse`) of anyone's run against our f64 reference on the same
/// inputs by the tolerance policy (the peer rule where `peer`, a same-dtype result of
/// a trusted implementation, is given; else the dtype's preset). Host tensors only (the
/// Python side copies device tensors to the host). Returns the report as a dict.
#[pyfunction]
#[pyo3(signature = (q, k, v, mask, alibi, opts, out, lse, peer, rows))]
#[allow(clippy::too_many_arguments)]
fn judge<'py>(
    py: Python<'py>,
    q: Desc,
    k: Desc,
    v: Desc,
    mask: Option<Desc>,
    alibi: Option<Slopes>,
    opts: Opts,
    out: Desc,
    lse: Option<Desc>,
    peer: Option<Desc>,
    rows: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let options = opts.options()?;
    let slopes = slopes_array(&alibi)?;
    let dtype = dtype_of(&q)?;
    for d in [Some(&out), peer.as_ref()].into_iter().flatten() {
        if dtype_of(d)? != dtype {
            return Err(value_error(format!(
                "{}: expected the dtype of query ({dtype}), got {}",
                d.name, d.dtype
            )));
        }
    }
    let work = move || -> PyResult<_> {
        // SAFETY: host descriptions of live tensors the Python side holds for the call.
        let (qt, kt, vt, mt, ot, lt, pt) = unsafe {
            (
                case_tensor(&q)?,
                case_tensor(&k)?,
                case_tensor(&v)?,
                mask.as_ref().map(|m| case_tensor(m)).transpose()?,
                case_tensor(&out)?,
                lse.as_ref()
                    .map(|l| {
                        expect_dtype::<f32>(l)
                            .and_then(|()| view_d::<f32>(l))
                            .map(|a| a.to_owned())
                    })
                    .transpose()?,
                peer.as_ref().map(|p| case_tensor(p)).transpose()?,
            )
        };
        let mut case = sdpa_harness::case::Case::new(qt, kt, vt, mt, options);
        if let Some(s) = slopes {
            case.results
                .insert("alibi_slopes".into(), CaseTensor::F32(s));
        }
        let truth = sdpa_harness::run::run_reference_f64(&case).map_err(harness_err)?;
        let truth_out = truth.out.to_f64();
        case.results.insert("out_f64".into(), truth.out);
        case.results
            .insert("lse_f64".into(), CaseTensor::F32(truth.lse));
        if let Some(p) = pt {
            case.results.insert("out".into(), p);
        }
        let verdict =
            sdpa_harness::judge::judge(&case, dtype, &ot, lt.as_ref()).map_err(harness_err)?;
        let worst = worst_rows(&ot.to_f64(), &truth_out, rows);
        Ok((verdict, worst))
    };
    let (verdict, worst) = py.detach(work)?;
    let d = PyDict::new(py);
    d.set_item("passed", verdict.passed)?;
    d.set_item("line", verdict.to_string())?;
    d.set_item("ours", report_dict(py, &verdict.ours)?)?;
    d.set_item(
        "peer",
        verdict
            .torch
            .as_ref()
            .map(|r| report_dict(py, r))
            .transpose()?,
    )?;
    d.set_item("bound", verdict.bound)?;
    let preset = sdpa_harness::tolerance::for_dtype(dtype);
    d.set_item(
        "rule",
        if verdict.bound.is_some() {
            "peer"
        } else {
            "preset"
        },
    )?;
    d.set_item("atol", preset.atol)?;
    d.set_item("rtol", preset.rtol)?;
    d.set_item(
        "lse",
        verdict
            .lse
            .as_ref()
            .map(|r| report_dict(py, r))
            .transpose()?,
    )?;
    d.set_item("worst_rows", worst)?;
    d.set_item("dtype", dtype.to_string())?;
    Ok(d)
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    m.add_function(wrap_pyfunction!(judge, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("cuda_driver_available", sdpa_cuda::driver_available())?;
    Ok(())
}
