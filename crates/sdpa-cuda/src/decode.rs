//! Decoding over a KV cache on the device (`kernels/decode/attn_decode.cu`): the append
//! of `k_new` / `v_new`, split-KV attention with the query heads of a kv head's group
//! packed into one tile (K and V read once a tile), and the combine of the splits by
//! their lse. Dense `[B, Hkv, S_max, E]` and paged `[num_blocks, block_size, Hkv, E]`
//! caches (any block size), causal bottom-right, window, softcap and ALiBi; f32, f16 and
//! bf16, head dims up to 256. Where q and the cache are f16 / bf16 with head dims up to
//! 128 and 16-byte aligned rows, the split runs on the tensor cores
//! (`kernels/decode/attn_decode_tc.cu`: tiles of 16 packed rows, each warp its own keys);
//! elsewhere on the scalar split of `attn_decode.cu`.
//!
//! Every argument is checked on the host before a launch by `sdpa_core::kvcache::check`
//! (the same function the CPU reference runs), so a bad block table is the same `Err`,
//! naming the batch row, on both.

use crate::context::GpuContext;
use crate::error::{CudaError, Result};
use crate::launch;
use crate::spec::{decode_block_n, Entry, KernelSpec, Kind};
use crate::tensor::{Buffer, DeviceSlopes, DeviceTensor};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use ndarray::{ArrayView1, ArrayView2, ArrayViewD};
use sdpa_core::kvcache::{check, CacheShape, KvCall, KvPlan};
use sdpa_core::{Causal, DType, SdpaError, SdpaOptions};
use std::sync::Arc;

/// A KV cache on the device. The block table stays a host array: it is checked on the
/// host (every entry a row reaches) and uploaded with the call.
#[derive(Debug, Clone, Copy)]
pub enum DeviceKvCache<'a> {
    /// `k [B, Hkv, S_max, E]`, `v [B, Hkv, S_max, Ev]` (any strides, unit last).
    Dense {
        /// Keys.
        k: &'a DeviceTensor,
        /// Values.
        v: &'a DeviceTensor,
    },
    /// `k [num_blocks, block_size, Hkv, E]`, `v [num_blocks, block_size, Hkv, Ev]` and
    /// `block_table [B, max_blocks]`.
    Paged {
        /// Key blocks.
        k: &'a DeviceTensor,
        /// Value blocks.
        v: &'a DeviceTensor,
        /// Block indices of each batch row's keys, in order.
        block_table: ArrayView2<'a, i32>,
    },
}

impl<'a> DeviceKvCache<'a> {
    fn tensors(&self) -> (&'a DeviceTensor, &'a DeviceTensor) {
        match *self {
            DeviceKvCache::Dense { k, v } | DeviceKvCache::Paged { k, v, .. } => (k, v),
        }
    }
}

/// What [`GpuContext::attention_with_kvcache`] returns.
#[derive(Debug, Clone)]
pub struct KvAttention {
    /// `[B, Hq, Lq, Ev]`, contiguous.
    pub out: DeviceTensor,
    /// f32 `[B, Hq, Lq, 1]`; `-inf` for a row with no key.
    pub lse: DeviceTensor,
    /// Key splits the call ran with.
    pub splits: usize,
    /// Packed query rows a tile held (1, 4, 8 or 16).
    pub tile_rows: usize,
    /// Whether the split kernel was the tensor-core one (`kernels/decode/attn_decode_tc.cu`:
    /// f16 / bf16, head dims up to 128, 16-byte aligned rows; tiles of 16 rows).
    pub tensor_cores: bool,
    /// `Some(backend)` when the attention ran on a fused forward kernel instead of the
    /// decode kernels: a chunk of more than 16 packed query rows over a dense cache whose
    /// rows all hold the same number of keys, with no window, softcap or ALiBi (the
    /// fused kernels' tensor cores beat one tile of query rows per kv head).
    pub fused: Option<sdpa_core::Backend>,
}

/// Keys a split of the tensor-core kernel is a multiple of (its four warps' blocks of 16).
const TC_SPLIT_KEYS: usize = 64;

/// The most key splits a call takes (the combine kernel's weights fit one block).
pub const MAX_SPLITS: usize = 128;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct DecodeParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub part_out: u64,
    pub part_lse: u64,
    pub block_table: u64,
    pub seqlens: u64,
    pub alibi: u64,
    pub k_new: u64,
    pub v_new: u64,
    pub q_stride_b: i64,
    pub q_stride_h: i64,
    pub q_stride_l: i64,
    pub k_stride_page: i64,
    pub k_stride_slot: i64,
    pub k_stride_h: i64,
    pub v_stride_page: i64,
    pub v_stride_slot: i64,
    pub v_stride_h: i64,
    pub kn_stride_b: i64,
    pub kn_stride_h: i64,
    pub kn_stride_l: i64,
    pub vn_stride_b: i64,
    pub vn_stride_h: i64,
    pub vn_stride_l: i64,
    pub batch: i32,
    pub heads_q: i32,
    pub heads_kv: i32,
    pub group: i32,
    pub len_q: i32,
    pub head_dim: i32,
    pub head_dim_v: i32,
    pub len_new: i32,
    pub block_size: i32,
    pub table_stride: i32,
    pub causal: i32,
    pub window_left: i32,
    pub window_right: i32,
    pub alibi_stride_b: i32,
    pub splits: i32,
    pub row_tiles: i32,
    pub vec16: i32,
    pub pad0: i32,
    pub scale: f32,
    pub softcap: f32,
}

// SAFETY: a plain `#[repr(C)]` struct of integers and floats, laid out as the kernel's
// `struct DecodeParams` (same field order and types; 8-byte fields first).
unsafe impl DeviceRepr for DecodeParams {}

/// Packed query rows a tile holds for `rows` (group size times Lq) rows in all.
pub fn tile_rows(rows: usize) -> usize {
    match rows {
        0..=1 => 1,
        2..=4 => 4,
        5..=8 => 8,
        _ => 16,
    }
}

/// Key splits for `ctas` CTAs (kv heads x row tiles x batch) over at most `max_len` keys
/// on `sms` multiprocessors running `resident` CTAs each: one when the grid fills the
/// device, else as many as fill one wave, keeping at least four key blocks a split.
pub fn choose_splits(
    ctas: usize,
    sms: usize,
    resident: usize,
    max_len: usize,
    block_n: usize,
) -> usize {
    let capacity = sms.max(1) * resident.max(1);
    if ctas == 0 || ctas >= capacity {
        return 1;
    }
    let most = (max_len.div_ceil(block_n) / 4).clamp(1, MAX_SPLITS);
    (capacity / ctas).clamp(1, most)
}

fn i32_of(arg: &'static str, what: &str, value: usize) -> Result<i32> {
    launch::check_index(arg, what, value)?;
    Ok(value as i32)
}

fn upload_i32(gpu: &GpuContext, data: &[i32], what: &'static str) -> Result<Arc<Buffer>> {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    Buffer::upload(gpu, &bytes, what)
}

/// Unit last-dim stride, the dtype of q, inside its buffer; returns the address.
fn operand(gpu: &GpuContext, arg: &'static str, t: &DeviceTensor, dtype: DType) -> Result<u64> {
    if t.dtype() != dtype {
        return Err(CudaError::bad_layout(arg, dtype.name(), t.dtype().name()));
    }
    crate::params::unit_last(arg, t)?;
    t.checked_address(gpu, arg)
}

impl GpuContext {
    /// Attention of `q [B, Hq, Lq, E]` over a KV cache on the device, after `new`
    /// (`k_new`, `v_new` `[B, Hkv, L_new, E / Ev]`) is written into the cache at
    /// `cache_seqlens[b]` (in place, before attention, on this context's stream). Causal
    /// (either alignment) is bottom-right; window, softcap and `alibi_slopes` (`[Hq]` or
    /// `[B, Hq]`) as DESIGN.md orders them. `splits` forces the number of key splits
    /// (1 to [`MAX_SPLITS`]); `None` picks it from the grid and the device.
    ///
    /// # Errors
    /// Whatever `sdpa_core::kvcache::check` refuses (naming the batch row), a dtype other
    /// than f32/f16/bf16 or tensors of different dtypes, a head dim past 256, a last-dim
    /// stride other than 1, bad `alibi_slopes` or `splits`, sizes the kernels cannot
    /// index, and driver failures. Nothing is launched (or written) on an error.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_with_kvcache(
        &self,
        q: &DeviceTensor,
        cache: DeviceKvCache<'_>,
        cache_seqlens: ArrayView1<'_, i32>,
        new: Option<(&DeviceTensor, &DeviceTensor)>,
        alibi_slopes: Option<ArrayViewD<'_, f32>>,
        options: &SdpaOptions,
        splits: Option<usize>,
    ) -> Result<KvAttention> {
        let (k, v) = cache.tensors();
        let lens: Vec<i32> = cache_seqlens.iter().copied().collect();
        let table: Vec<i32> = match cache {
            DeviceKvCache::Paged { block_table, .. } => block_table.iter().copied().collect(),
            DeviceKvCache::Dense { .. } => Vec::new(),
        };
        let shape = match cache {
            DeviceKvCache::Dense { .. } => CacheShape::Dense {
                k: k.shape(),
                v: v.shape(),
            },
            DeviceKvCache::Paged { block_table, .. } => CacheShape::Paged {
                k: k.shape(),
                v: v.shape(),
                table: &table,
                table_shape: [block_table.nrows(), block_table.ncols()],
            },
        };
        let plan = check(&KvCall {
            q: q.shape(),
            cache: shape,
            cache_seqlens: &lens,
            new: new.map(|(kn, vn)| (kn.shape(), vn.shape())),
            options,
        })?;
        let dtype = q.dtype();
        let widest = plan.head_dim.max(plan.head_dim_v);
        let spec = KernelSpec::fitting(Kind::Decode, dtype, widest, false).ok_or_else(|| {
            CudaError::bad_layout(
                "query",
                "f32, f16 or bf16 and head dims up to 256 (the CUDA KV-cache kernels)",
                format!(
                    "{} with E = {}, Ev = {}",
                    dtype.name(),
                    plan.head_dim,
                    plan.head_dim_v
                ),
            )
        })?;
        let mut p = self.decode_params(q, cache, new, &plan, options)?;
        let slopes = alibi_slopes
            .map(|s| DeviceSlopes::upload(self, s, plan.batch, plan.heads_q))
            .transpose()?;
        let packed = plan
            .heads_q
            .checked_div(plan.heads_kv)
            .and_then(|g| g.checked_mul(plan.len_q))
            .ok_or_else(|| {
                CudaError::bad_layout("query", "Lq * group that fits usize", plan.len_q)
            })?;
        // The tensor-core split kernel where it applies (its table row: 16-bit, head dims
        // up to 128; and rows cp.async can read); tiles of 16 packed rows there.
        let tc_spec = (p.vec16 != 0)
            .then(|| KernelSpec::fitting(Kind::DecodeTc, dtype, widest, false))
            .flatten();
        let rows = if tc_spec.is_some() {
            16
        } else {
            tile_rows(packed)
        };
        let row_tiles = packed.div_ceil(rows);
        let grid_y = plan.heads_kv.saturating_mul(row_tiles);
        if grid_y > launch::MAX_GRID_YZ || plan.batch > launch::MAX_GRID_YZ {
            return Err(CudaError::bad_layout(
                "query",
                format!("Hkv x row tiles and B at most {}", launch::MAX_GRID_YZ),
                format!("Hkv x row tiles = {grid_y}, B = {}", plan.batch),
            ));
        }
        let total_rows = plan.batch * plan.heads_q * plan.len_q;
        i32_of("query", "B * Hq * Lq", total_rows)?;
        if let Some(n) = splits.filter(|n| !(1..=MAX_SPLITS).contains(n)) {
            return Err(SdpaError::invalid("num_splits", format!("1..={MAX_SPLITS}"), n).into());
        }
        // A long chunk over a dense cache of equal lengths without window, softcap or
        // ALiBi runs on a fused forward over the cache's first n keys (views, no copy).
        // Its problem and backend are settled here, before anything is launched.
        let n = plan.lengths.first().copied().unwrap_or(0);
        let fused = if matches!(cache, DeviceKvCache::Dense { .. })
            && packed > 16
            && total_rows > 0
            && n > 0
            && plan.lengths.iter().all(|&x| x == n)
            && !options.window.is_active()
            && options.softcap.is_none()
            && slopes.is_none()
        {
            let view = |t: &DeviceTensor| {
                let l = t.layout();
                t.view([l.shape[0], l.shape[1], n, l.shape[3]], l.strides, 0)
            };
            let fused_options = SdpaOptions {
                causal: if options.causal == Causal::None {
                    Causal::None
                } else {
                    Causal::BottomRight
                },
                enable_gqa: true,
                ..*options
            };
            let (kv, vv) = (view(k)?, view(v)?);
            let problem = self.problem(q, &kv, &vv, None, &fused_options)?;
            let backend = sdpa_core::select(
                sdpa_core::BackendSet::ALL,
                &problem,
                sdpa_core::Device::Cuda,
            )?;
            Some((problem, backend, kv, vv))
        } else {
            None
        };
        let out = DeviceTensor::alloc(
            self,
            dtype,
            [plan.batch, plan.heads_q, plan.len_q, plan.head_dim_v],
        )?;
        let lse = DeviceTensor::alloc(self, DType::F32, [plan.batch, plan.heads_q, plan.len_q, 1])?;
        let seqlens = upload_i32(self, &lens, "cache_seqlens")?;
        let table_buf = if table.is_empty() {
            None
        } else {
            Some(upload_i32(self, &table, "block_table")?)
        };
        p.block_table = table_buf.as_ref().map_or(0, |b| b.address(self));
        p.seqlens = seqlens.address(self);
        if let Some(s) = &slopes {
            let (address, stride_b) = s.for_call(self, plan.batch, plan.heads_q)?;
            p.alibi = address;
            p.alibi_stride_b = stride_b as i32;
        }
        let block = |grid: (u32, u32, u32), shared| LaunchConfig {
            grid_dim: grid,
            block_dim: (128, 1, 1),
            shared_mem_bytes: shared,
        };
        // The split kernel (and its resident count for the splits) only where it runs.
        let split = match (&fused, &tc_spec) {
            (Some(_), _) => None,
            (None, Some(tc)) => Some(self.kernel(tc, Entry::DecodeSplitTc)?),
            (None, None) => Some(self.kernel(&spec, Entry::DecodeSplit(rows as u32))?),
        };
        // Every module a launch below needs is compiled and loaded before the first
        // launch, so a compile failure leaves the cache as it was.
        if let Some((problem, backend, ..)) = &fused {
            if *backend != sdpa_core::Backend::Math {
                self.kernel(&crate::fwd::fused_spec(self, problem)?, Entry::Forward)?;
            }
        }
        let append = if plan.len_new > 0 && plan.batch * plan.heads_kv > 0 {
            Some(self.kernel(&spec, Entry::DecodeAppend)?)
        } else {
            None
        };
        let splits = match (&split, splits) {
            (None, _) => 1,
            (Some(_), Some(n)) => n,
            (Some(kernel), None) => {
                let resident =
                    (self.max_shared_bytes() / (kernel.shared_bytes as usize + 1024)).clamp(1, 16);
                let block_n = if tc_spec.is_some() {
                    TC_SPLIT_KEYS
                } else {
                    decode_block_n(dtype, spec.head_dim) as usize
                };
                choose_splits(
                    grid_y * plan.batch,
                    self.sm_count()?,
                    resident,
                    plan.max_len(),
                    block_n,
                )
            }
        };
        let combine = if splits > 1 {
            Some(self.kernel(&spec, Entry::DecodeCombine)?)
        } else {
            None
        };
        let scratch = |n: usize, what| -> Result<Option<Arc<Buffer>>> {
            if splits == 1 {
                return Ok(None);
            }
            let bytes = n
                .checked_mul(splits)
                .and_then(|x| x.checked_mul(4))
                .ok_or_else(|| {
                    CudaError::bad_layout("query", "split scratch that fits memory", n)
                })?;
            Buffer::alloc(self, bytes, what).map(Some)
        };
        let part_out = scratch(total_rows * plan.head_dim_v, "the decode splits' outputs")?;
        let part_lse = scratch(total_rows, "the decode splits' lse")?;
        p.out = out.address(self);
        p.lse = lse.address(self);
        p.part_out = part_out.as_ref().map_or(0, |b| b.address(self));
        p.part_lse = part_lse.as_ref().map_or(0, |b| b.address(self));
        p.splits = splits as i32;
        p.row_tiles = row_tiles as i32;
        if self.poison_outputs() {
            out.poison(self)?;
            lse.poison(self)?;
        }
        if let Some(append) = append {
            let grid = (plan.len_new as u32, plan.heads_kv as u32, plan.batch as u32);
            // SAFETY: `check` proved every row's appended keys inside its capacity and every
            // table entry they reach inside the key blocks; the cache views lie inside their
            // buffers (`decode_params`); k_new / v_new are read within their shapes.
            unsafe { launch::launch_params(self.stream(), &append.function, block(grid, 0), &p) }?;
        }
        let result = KvAttention {
            out: out.clone(),
            lse: lse.clone(),
            splits,
            tile_rows: rows,
            tensor_cores: fused.is_none() && tc_spec.is_some(),
            fused: fused.as_ref().map(|f| f.1),
        };
        if let Some((problem, backend, kv, vv)) = &fused {
            // After the append above, on the same stream.
            self.run(*backend, problem, q, kv, vv, None, None, &out, &lse)?;
            return Ok(result);
        }
        let Some(kernel) = split else {
            unreachable!("the split kernel is loaded when the call is not fused")
        };
        if total_rows == 0 {
            return Ok(result);
        }
        let grid = (splits as u32, grid_y as u32, plan.batch as u32);
        // SAFETY: as for the append; the split kernel reads keys below each row's checked
        // length through the checked table, q within its shape, and writes `out`/`lse`
        // (or the scratch of `splits` x rows) exactly as allocated above.
        unsafe {
            launch::launch_params(
                self.stream(),
                &kernel.function,
                block(grid, kernel.shared_bytes),
                &p,
            )
        }?;
        if let Some(combine) = &combine {
            // SAFETY: one CTA per row of the scratch written above; writes `out` and `lse`.
            unsafe {
                launch::launch_params(
                    self.stream(),
                    &combine.function,
                    block((total_rows as u32, 1, 1), 0),
                    &p,
                )
            }?;
        }
        // The uploads and scratch are freed stream-ordered after the kernels that read them.
        drop((seqlens, table_buf, slopes, part_out, part_lse));
        Ok(result)
    }

    /// The parameters every decode kernel reads, from checked operands.
    fn decode_params(
        &self,
        q: &DeviceTensor,
        cache: DeviceKvCache<'_>,
        new: Option<(&DeviceTensor, &DeviceTensor)>,
        plan: &KvPlan,
        options: &SdpaOptions,
    ) -> Result<DecodeParams> {
        let dtype = q.dtype();
        let (k, v) = cache.tensors();
        let mut p = DecodeParams {
            q: operand(self, "query", q, dtype)?,
            k: operand(self, "k_cache", k, dtype)?,
            v: operand(self, "v_cache", v, dtype)?,
            ..Default::default()
        };
        let s = |t: &DeviceTensor, i: usize| t.layout().strides[i] as i64;
        [p.q_stride_b, p.q_stride_h, p.q_stride_l] = [s(q, 0), s(q, 1), s(q, 2)];
        match cache {
            DeviceKvCache::Dense { .. } => {
                [p.k_stride_page, p.k_stride_h, p.k_stride_slot] = [s(k, 0), s(k, 1), s(k, 2)];
                [p.v_stride_page, p.v_stride_h, p.v_stride_slot] = [s(v, 0), s(v, 1), s(v, 2)];
            }
            DeviceKvCache::Paged { block_table, .. } => {
                [p.k_stride_page, p.k_stride_slot, p.k_stride_h] = [s(k, 0), s(k, 1), s(k, 2)];
                [p.v_stride_page, p.v_stride_slot, p.v_stride_h] = [s(v, 0), s(v, 1), s(v, 2)];
                p.block_size = i32_of("k_cache", "block_size", plan.block_size.unwrap_or(1))?;
                p.table_stride = i32_of("block_table", "max_blocks", block_table.ncols())?;
            }
        }
        if let Some((kn, vn)) = new {
            p.k_new = operand(self, "k_new", kn, dtype)?;
            p.v_new = operand(self, "v_new", vn, dtype)?;
            [p.kn_stride_b, p.kn_stride_h, p.kn_stride_l] = [s(kn, 0), s(kn, 1), s(kn, 2)];
            [p.vn_stride_b, p.vn_stride_h, p.vn_stride_l] = [s(vn, 0), s(vn, 1), s(vn, 2)];
        }
        let es = dtype.size_bytes() as i64;
        let aligned = |addr: u64, strides: [i64; 3]| {
            addr % 16 == 0 && strides.iter().all(|x| (x * es) % 16 == 0)
        };
        p.vec16 = (aligned(p.k, [p.k_stride_page, p.k_stride_slot, p.k_stride_h])
            && aligned(p.v, [p.v_stride_page, p.v_stride_slot, p.v_stride_h]))
            as i32;
        p.batch = i32_of("query", "batch B", plan.batch)?;
        p.heads_q = i32_of("query", "query heads Hq", plan.heads_q)?;
        p.heads_kv = i32_of("k_cache", "kv heads Hkv", plan.heads_kv)?;
        p.group = (plan.heads_q / plan.heads_kv) as i32;
        p.len_q = i32_of("query", "query length Lq", plan.len_q)?;
        p.head_dim = plan.head_dim as i32;
        p.head_dim_v = plan.head_dim_v as i32;
        p.len_new = i32_of("k_new", "L_new", plan.len_new)?;
        i32_of("cache_seqlens", "keys a row attends to", plan.max_len())?;
        p.causal = (options.causal != Causal::None) as i32;
        let side = |n: i64| n.clamp(-1, i32::MAX as i64) as i32;
        p.window_left = side(options.window.left);
        p.window_right = side(options.window.right);
        p.scale = plan.scale as f32;
        p.softcap = options.softcap.map_or(0.0, |c| c as f32);
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_one_wave_and_tiles_cover_the_group() {
        // B = 1, 8 kv heads, 128k keys on 132 SMs of two CTAs: 33 splits (one wave).
        assert_eq!(choose_splits(8, 132, 2, 131072, 64), 33);
        // A full grid runs unsplit.
        assert_eq!(choose_splits(512, 132, 2, 4096, 64), 1);
        // Short caches keep four blocks a split.
        assert_eq!(choose_splits(8, 132, 2, 512, 64), 2);
        assert_eq!(choose_splits(1, 132, 2, 1 << 24, 64), MAX_SPLITS);
        assert_eq!(
            [1, 2, 4, 5, 8, 9, 64].map(tile_rows),
            [1, 4, 4, 8, 8, 16, 16]
        );
    }
}
