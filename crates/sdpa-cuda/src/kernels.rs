//! Kernel sources, the specialisations the dispatcher asks for, and their NVRTC
//! compilation with an in-memory and an on-disk cache.
//!
//! Every source is embedded (`include_str!`) and compiled at run time for the device's
//! arch; `#include "x.cuh"` lines are expanded here, so NVRTC needs no include path and
//! no CUDA headers. A specialisation is a [`KernelSpec`]: its symbol carries its dtype and
//! variant (`attn_fwd_tc_f16_d128_w4_n64_m2`, `attn_fwd_simt_f32_dv64_bool_dropout`).

use crate::error::{CudaError, Result};
use sdpa_core::DType;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

/// Embedded kernel sources, by path relative to `kernels/`.
pub const SOURCES: [(&str, &str); 14] = [
    (
        "common/dtype.cuh",
        include_str!("../../../kernels/common/dtype.cuh"),
    ),
    (
        "common/epilogue.cuh",
        include_str!("../../../kernels/common/epilogue.cuh"),
    ),
    (
        "common/load.cuh",
        include_str!("../../../kernels/common/load.cuh"),
    ),
    (
        "common/mask.cuh",
        include_str!("../../../kernels/common/mask.cuh"),
    ),
    (
        "common/params.cuh",
        include_str!("../../../kernels/common/params.cuh"),
    ),
    (
        "common/philox.cuh",
        include_str!("../../../kernels/common/philox.cuh"),
    ),
    (
        "common/seqlen.cuh",
        include_str!("../../../kernels/common/seqlen.cuh"),
    ),
    (
        "common/softmax.cuh",
        include_str!("../../../kernels/common/softmax.cuh"),
    ),
    (
        "common/wgmma.cuh",
        include_str!("../../../kernels/common/wgmma.cuh"),
    ),
    (
        "fwd/attn_fwd_tc.cu",
        include_str!("../../../kernels/fwd/attn_fwd_tc.cu"),
    ),
    (
        "fwd/attn_fwd_simt.cu",
        include_str!("../../../kernels/fwd/attn_fwd_simt.cu"),
    ),
    (
        "fwd/attn_fwd_wgmma.cu",
        include_str!("../../../kernels/fwd/attn_fwd_wgmma.cu"),
    ),
    (
        "math/math.cu",
        include_str!("../../../kernels/math/math.cu"),
    ),
    ("nn/nn.cu", include_str!("../../../kernels/nn/nn.cu")),
];

/// Padded head dims of the tensor-core kernel: every E (and Ev) up to 256 rounds up to
/// the next of these. Multiples of 32 keep the variant count (and CI's compile time)
/// down; the padding is zero-filled in shared memory and never stored.
pub const TC_HEAD_DIMS: [u32; 8] = [32, 64, 96, 128, 160, 192, 224, 256];

/// Padded head dims of the Hopper kernel (`fwd/attn_fwd_wgmma.cu`): every E (and Ev) up to
/// 128 rounds up to the next of these (one swizzled column block of 64, 128 bytes, or
/// two of 128).
pub const WG_HEAD_DIMS: [u32; 3] = [32, 64, 128];

/// Value-dim buckets of the scalar kernel, in 32-lane chunks.
pub const SIMT_DV_CHUNKS: [u32; 3] = [2, 4, 8];

/// One compiled specialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelSpec {
    /// Tensor-core forward (flash, and efficient in f16/bf16).
    Tc {
        /// f16 or bf16.
        dtype: DType,
        /// Padded head dim (one of [`TC_HEAD_DIMS`]), covering E and Ev.
        head_dim: u32,
        /// Mask and dropout compiled in (chosen at run time by the params); without
        /// them, the plain flash path.
        extras: bool,
    },
    /// Scalar forward (efficient in f32).
    Simt {
        /// Element type.
        dtype: DType,
        /// Ev bucket in 32-lane chunks (one of [`SIMT_DV_CHUNKS`]).
        dv_chunks: u32,
        /// Mask and dropout compiled in (chosen at run time by the params); without
        /// them, the plain flash path.
        extras: bool,
    },
    /// Hopper warpgroup-MMA forward (sm_90a only): the plain flash path (no mask, no
    /// dropout) in f16/bf16 for head dims up to 128.
    Wg {
        /// f16 or bf16.
        dtype: DType,
        /// Padded head dim (one of [`WG_HEAD_DIMS`]), covering E and Ev.
        head_dim: u32,
    },
    /// The math backend's gather and softmax kernels.
    Math {
        /// Element type.
        dtype: DType,
    },
}

fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F64 => 0,
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
    }
}

/// Tile shape of the tensor-core kernel for one padded head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcTiles {
    /// Warps per CTA.
    pub warps: u32,
    /// Keys per K/V tile.
    pub block_n: u32,
    /// 16-row fragments per warp (1 or 2): a warp owns `16 * row_frags` query rows.
    pub row_frags: u32,
    /// CTAs per SM the register budget is sized for (`__launch_bounds__`).
    pub min_blocks: u32,
}

impl TcTiles {
    /// Query rows per CTA.
    pub fn block_rows(&self) -> u32 {
        16 * self.row_frags * self.warps
    }

    /// Dynamic shared memory for padded head dim `head_dim`: the Q tile plus two K and
    /// two V tiles, rows padded by 8 elements.
    pub fn shared_bytes(&self, head_dim: u32) -> u32 {
        (self.block_rows() + 4 * self.block_n) * (head_dim + 8) * 2
    }
}

/// The default tile shape for a padded head dim. Up to D = 128 a warp owns 32 rows (two
/// fragments share every K/V fragment read from shared memory) and a CTA 128, as
/// FlashAttention-2 does; wider heads take 16 rows a warp and 32 keys a tile so that the
/// accumulators (D/2 registers a thread) and shared memory still fit.
fn default_tiles(head_dim: u32) -> TcTiles {
    let t = |warps, block_n, row_frags, min_blocks| TcTiles {
        warps,
        block_n,
        row_frags,
        min_blocks,
    };
    match head_dim {
        0..=32 => t(4, 128, 2, 2),
        33..=128 => t(4, 64, 2, 2),
        _ => t(4, 32, 1, 1),
    }
}

/// The tile shape of the tensor-core kernel for a padded head dim (the override's, when
/// `SDPA_CUDA_TC_TILES` names this dim).
pub fn tc_tile_shape(head_dim: u32) -> TcTiles {
    tile_override(head_dim).unwrap_or_else(|| default_tiles(head_dim))
}

/// (warps, keys per tile) of the tensor-core kernel for a padded head dim.
pub fn tc_tiles(head_dim: u32) -> (u32, u32) {
    let t = tc_tile_shape(head_dim);
    (t.warps, t.block_n)
}

/// CTAs per SM the tensor-core kernel's register budget is sized for
/// (`__launch_bounds__` second argument).
pub fn tc_min_blocks(head_dim: u32) -> u32 {
    tc_tile_shape(head_dim).min_blocks
}

/// Parsed entries of a tile-override variable: (the head dim, or every dim, and a shape).
type Overrides<T> = Vec<(Option<u32>, T)>;

/// Entries of a tile-override variable: `;`-separated `[dim:]n,n,...`; an entry without
/// `dim:` applies to every head dim. `make` turns an entry's numbers into a tile shape,
/// or `None` for one it does not accept; malformed entries are dropped.
fn parse_overrides<T>(text: &str, make: impl Fn(&[u32]) -> Option<T>) -> Overrides<T> {
    text.split(';')
        .filter_map(|entry| {
            let (dim, rest) = match entry.split_once(':') {
                Some((d, rest)) => (Some(d.trim().parse::<u32>().ok()?), rest),
                None => (None, entry),
            };
            let v: Vec<u32> = rest
                .split(',')
                .map(|x| x.trim().parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            make(&v).map(|t| (dim, t))
        })
        .collect()
}

/// The first entry of the override variable `var` (parsed once, by `parse`) that applies
/// to `head_dim`.
fn override_for<T: Copy>(
    cell: &'static std::sync::OnceLock<Overrides<T>>,
    var: &str,
    parse: fn(&str) -> Overrides<T>,
    head_dim: u32,
) -> Option<T> {
    cell.get_or_init(|| std::env::var(var).map(|t| parse(&t)).unwrap_or_default())
        .iter()
        .find(|(dim, _)| dim.is_none_or(|d| d == head_dim))
        .map(|&(_, t)| t)
}

/// Parses `SDPA_CUDA_TC_TILES`: entries `[dim:]warps,block_n,min_blocks[,row_frags]`
/// (row_frags 1 when left out); the first entry that applies wins.
fn parse_tile_override(text: &str) -> Overrides<TcTiles> {
    parse_overrides(text, |v| {
        let (warps, block_n, min_blocks, row_frags) = match *v {
            [w, n, b] => (w, n, b, 1),
            [w, n, b, m] => (w, n, b, m),
            _ => return None,
        };
        let ok = (1..=16).contains(&warps)
            && block_n % 16 == 0
            && block_n > 0
            && min_blocks > 0
            && (1..=2).contains(&row_frags);
        ok.then_some(TcTiles {
            warps,
            block_n,
            row_frags,
            min_blocks,
        })
    })
}

/// `SDPA_CUDA_TC_TILES` (see [`parse_tile_override`]): tile-shape experiments
/// (benchmark sweeps only; the defaults above are what the tests cover).
fn tile_override(head_dim: u32) -> Option<TcTiles> {
    static TILES: std::sync::OnceLock<Overrides<TcTiles>> = std::sync::OnceLock::new();
    override_for(&TILES, "SDPA_CUDA_TC_TILES", parse_tile_override, head_dim)
}

/// Tile shape of the Hopper kernel for one padded head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgTiles {
    /// Warpgroups (128 threads) per CTA.
    pub warpgroups: u32,
    /// 64-row M tiles per warpgroup (1 or 2), each with its own S and O accumulators:
    /// with 2 the softmax of one overlaps the other's GEMMs inside the warp.
    pub m_tiles: u32,
    /// Keys per K/V tile (64 or 128: the S GEMM's N).
    pub block_n: u32,
    /// CTAs per SM the register budget is sized for (`__launch_bounds__`).
    pub min_blocks: u32,
}

impl WgTiles {
    /// Query rows per CTA.
    pub fn block_rows(&self) -> u32 {
        64 * self.warpgroups * self.m_tiles
    }

    /// Dynamic shared memory for padded head dim `head_dim`: the Q tile, two K and two V
    /// tiles, unpadded (the swizzle keeps them conflict-free), plus 1 KiB so the kernel
    /// can start its tiles on a 1024-byte boundary.
    pub fn shared_bytes(&self, head_dim: u32) -> u32 {
        1024 + (self.block_rows() + 4 * self.block_n) * head_dim * 2
    }
}

/// The default Hopper tile shape for a padded head dim, 64 keys a tile: three warpgroups
/// (192 query rows, 168 registers) at D = 128; at D = 64 and 32 one warpgroup a CTA and
/// four CTAs an SM (at most 128 registers), so no CTA barrier couples two warpgroups and
/// the SM's four warpgroups drift apart (one's softmax under another's GEMMs). The
/// fastest of the sweeps in kernels/NOTES.md.
fn default_wg_tiles(head_dim: u32) -> WgTiles {
    let t = |warpgroups, block_n, min_blocks| WgTiles {
        warpgroups,
        m_tiles: 1,
        block_n,
        min_blocks,
    };
    match head_dim {
        0..=64 => t(1, 64, 4),
        _ => t(3, 64, 1),
    }
}

/// `SDPA_CUDA_WG_TILES`: entries `[dim:]warpgroups,block_n,min_blocks[,m_tiles]`
/// (benchmark sweeps; the defaults are what the tests cover).
fn parse_wg_override(text: &str) -> Overrides<WgTiles> {
    parse_overrides(text, |v| {
        let (warpgroups, block_n, min_blocks, m_tiles) = match *v {
            [g, n, b] => (g, n, b, 1),
            [g, n, b, m] => (g, n, b, m),
            _ => return None,
        };
        let ok = (1..=4).contains(&warpgroups)
            && (block_n == 64 || block_n == 128)
            && (1..=4).contains(&min_blocks)
            && (1..=2).contains(&m_tiles);
        ok.then_some(WgTiles {
            warpgroups,
            m_tiles,
            block_n,
            min_blocks,
        })
    })
}

/// The Hopper kernel's tile shape for a padded head dim (the override's, when
/// `SDPA_CUDA_WG_TILES` names this dim).
pub fn wg_tile_shape(head_dim: u32) -> WgTiles {
    static TILES: std::sync::OnceLock<Overrides<WgTiles>> = std::sync::OnceLock::new();
    override_for(&TILES, "SDPA_CUDA_WG_TILES", parse_wg_override, head_dim)
        .unwrap_or_else(|| default_wg_tiles(head_dim))
}

/// Whether the dispatcher may use the Hopper kernel: yes unless `SDPA_CUDA_WGMMA=0`
/// (which keeps the mma.sync kernel on sm_90, for comparisons).
pub fn wgmma_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDPA_CUDA_WGMMA").map_or(true, |v| v != "0"))
}

/// Dynamic shared memory of the tensor-core kernel: Q tile plus two K and two V tiles,
/// rows padded by 8 elements.
pub fn tc_shared_bytes(head_dim: u32) -> u32 {
    tc_tile_shape(head_dim).shared_bytes(head_dim)
}

impl KernelSpec {
    /// The tensor-core specialisation for head dims `e`, `ev` (<= 256).
    pub fn tc(dtype: DType, e: usize, ev: usize, extras: bool) -> Self {
        let widest = e.max(ev) as u32;
        let head_dim = TC_HEAD_DIMS
            .into_iter()
            .find(|&d| d >= widest)
            .unwrap_or(TC_HEAD_DIMS[TC_HEAD_DIMS.len() - 1]);
        KernelSpec::Tc {
            dtype,
            head_dim,
            extras,
        }
    }

    /// The Hopper specialisation for head dims `e`, `ev`, or `None` when they exceed 128.
    pub fn wg(dtype: DType, e: usize, ev: usize) -> Option<Self> {
        let widest = e.max(ev) as u32;
        WG_HEAD_DIMS
            .into_iter()
            .find(|&d| d >= widest)
            .map(|head_dim| KernelSpec::Wg { dtype, head_dim })
    }

    /// The scalar specialisation for value dim `ev` (<= 256).
    pub fn simt(dtype: DType, e: usize, ev: usize, extras: bool) -> Self {
        let chunks = e.max(ev).div_ceil(32) as u32;
        let dv_chunks = SIMT_DV_CHUNKS
            .into_iter()
            .find(|&c| c >= chunks)
            .unwrap_or(SIMT_DV_CHUNKS[SIMT_DV_CHUNKS.len() - 1]);
        KernelSpec::Simt {
            dtype,
            dv_chunks,
            extras,
        }
    }

    /// Every specialisation the dispatcher can ask for: what CI compiles.
    pub fn all() -> Vec<KernelSpec> {
        let mut specs = Vec::new();
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in TC_HEAD_DIMS {
                for extras in [false, true] {
                    specs.push(KernelSpec::Tc {
                        dtype,
                        head_dim,
                        extras,
                    });
                }
            }
        }
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in WG_HEAD_DIMS {
                specs.push(KernelSpec::Wg { dtype, head_dim });
            }
        }
        for dv_chunks in SIMT_DV_CHUNKS {
            for extras in [false, true] {
                specs.push(KernelSpec::Simt {
                    dtype: DType::F32,
                    dv_chunks,
                    extras,
                });
            }
        }
        for dtype in DType::ALL {
            specs.push(KernelSpec::Math { dtype });
        }
        specs
    }

    /// The source file this specialisation compiles.
    pub fn source_name(&self) -> &'static str {
        match self {
            KernelSpec::Tc { .. } => "fwd/attn_fwd_tc.cu",
            KernelSpec::Simt { .. } => "fwd/attn_fwd_simt.cu",
            KernelSpec::Wg { .. } => "fwd/attn_fwd_wgmma.cu",
            KernelSpec::Math { .. } => "math/math.cu",
        }
    }

    /// Kernel symbols in the compiled module (the math module has two).
    pub fn symbols(&self) -> Vec<String> {
        match *self {
            KernelSpec::Tc {
                dtype,
                head_dim,
                extras,
            } => {
                let t = tc_tile_shape(head_dim);
                vec![format!(
                    "attn_fwd_tc_{dtype}_d{head_dim}_w{}_n{}_m{}{}",
                    t.warps,
                    t.block_n,
                    t.row_frags,
                    if extras { "_mask_dropout" } else { "" }
                )]
            }
            KernelSpec::Wg { dtype, head_dim } => {
                let t = wg_tile_shape(head_dim);
                vec![format!(
                    "attn_fwd_wgmma_{dtype}_d{head_dim}_g{}_m{}_n{}_b{}",
                    t.warpgroups, t.m_tiles, t.block_n, t.min_blocks
                )]
            }
            KernelSpec::Simt {
                dtype,
                dv_chunks,
                extras,
            } => vec![format!(
                "attn_fwd_simt_{dtype}_dv{}{}",
                32 * dv_chunks,
                if extras { "_mask_dropout" } else { "" }
            )],
            KernelSpec::Math { dtype } => {
                vec![
                    format!("math_gather_{dtype}"),
                    format!("math_softmax_{dtype}"),
                ]
            }
        }
    }

    /// Whether this specialisation runs on a device of compute capability `arch` (e.g.
    /// 90): the Hopper kernel needs exactly sm_90 (its wgmma is sm_90a-only).
    pub fn runs_on(&self, arch: u32) -> bool {
        match self {
            KernelSpec::Wg { .. } => arch == 90,
            _ => arch >= 80,
        }
    }

    /// NVRTC options (the `-D` defines that specialise the source) for `arch`, e.g. 90
    /// (the Hopper kernel compiles for `sm_90a`).
    pub fn options(&self, arch: u32) -> Vec<String> {
        let target = match self {
            KernelSpec::Wg { .. } => format!("sm_{arch}a"),
            _ => format!("sm_{arch}"),
        };
        let mut opts = vec![
            format!("--gpu-architecture={target}"),
            "--std=c++17".to_string(),
            "-lineinfo".to_string(),
        ];
        let symbols = self.symbols();
        match *self {
            KernelSpec::Tc {
                dtype,
                head_dim,
                extras,
            } => {
                let t = tc_tile_shape(head_dim);
                opts.push(format!("-DSDPA_DTYPE={}", dtype_code(dtype)));
                opts.push(format!("-DSDPA_HEAD_DIM={head_dim}"));
                opts.push(format!("-DSDPA_WARPS={}", t.warps));
                opts.push(format!("-DSDPA_BLOCK_N={}", t.block_n));
                opts.push(format!("-DSDPA_ROW_FRAGS={}", t.row_frags));
                opts.push(format!("-DSDPA_MIN_BLOCKS={}", t.min_blocks));
                opts.push(format!("-DSDPA_EXTRAS={}", extras as u32));
                opts.push(format!("-DSDPA_KERNEL={}", symbols[0]));
            }
            KernelSpec::Wg { dtype, head_dim } => {
                let t = wg_tile_shape(head_dim);
                opts.push(format!("-DSDPA_DTYPE={}", dtype_code(dtype)));
                opts.push(format!("-DSDPA_HEAD_DIM={head_dim}"));
                opts.push(format!("-DSDPA_BLOCK_N={}", t.block_n));
                opts.push(format!("-DSDPA_WARPGROUPS={}", t.warpgroups));
                opts.push(format!("-DSDPA_M_TILES={}", t.m_tiles));
                opts.push(format!("-DSDPA_MIN_BLOCKS={}", t.min_blocks));
                opts.push(format!("-DSDPA_KERNEL={}", symbols[0]));
            }
            KernelSpec::Simt {
                dtype,
                dv_chunks,
                extras,
            } => {
                opts.push(format!("-DSDPA_DTYPE={}", dtype_code(dtype)));
                opts.push(format!("-DSDPA_DV_CHUNKS={dv_chunks}"));
                opts.push(format!("-DSDPA_EXTRAS={}", extras as u32));
                opts.push(format!("-DSDPA_KERNEL={}", symbols[0]));
            }
            KernelSpec::Math { dtype } => {
                opts.push(format!("-DSDPA_DTYPE={}", dtype_code(dtype)));
                opts.push(format!("-DSDPA_KERNEL_GATHER={}", symbols[0]));
                opts.push(format!("-DSDPA_KERNEL_SOFTMAX={}", symbols[1]));
            }
        }
        opts
    }
}

/// `name`'s source (a path relative to `kernels/`) with every `#include "x.cuh"` (also
/// relative to `kernels/`) replaced by the embedded file (once each) and `#pragma once`
/// dropped, so NVRTC sees one self-contained translation unit. Files of
/// `$SDPA_KERNEL_DIR` replace the embedded ones (see [`source_override`]).
///
/// # Errors
/// [`CudaError::Compile`] when `name` or a file it includes is not in [`SOURCES`].
pub fn expanded_source(name: &str) -> Result<String> {
    let dir = std::env::var_os("SDPA_KERNEL_DIR").map(PathBuf::from);
    expanded_source_from(name, dir.as_deref())
}

fn expanded_source_from(name: &str, dir: Option<&Path>) -> Result<String> {
    fn expand(
        name: &str,
        dir: Option<&Path>,
        seen: &mut Vec<String>,
        out: &mut String,
    ) -> std::result::Result<(), String> {
        let embedded = SOURCES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .ok_or_else(|| format!("kernels/{name} is not one of the embedded sources"))?;
        let text = source_override(dir, name).unwrap_or_else(|| embedded.to_string());
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed == "#pragma once" {
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix("#include \"") {
                let inc = rest.trim_end_matches('"');
                if !seen.iter().any(|s| s == inc) {
                    seen.push(inc.to_string());
                    expand(inc, dir, seen, out)
                        .map_err(|e| format!("{e}\n  included by kernels/{name}"))?;
                }
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(())
    }
    let mut out = String::new();
    expand(name, dir, &mut vec![name.to_string()], &mut out).map_err(|log| CudaError::Compile {
        kernel: format!("kernels/{name}"),
        arch: "any arch".to_string(),
        log,
    })?;
    Ok(out)
}

/// `SDPA_KERNEL_DIR`: a folder mirroring `kernels/` whose `name` (a path inside it, e.g.
/// `common/mask.cuh`) replaces the embedded source at run time
/// (the planted-bug runs of `ci/planted-bugs.sh` patch a copy of `kernels/` and point
/// here, so no rebuild is needed). Files the folder lacks stay embedded. The disk cache
/// is keyed by the expanded source, so patched kernels never meet stale binaries.
fn source_override(dir: Option<&Path>, name: &str) -> Option<String> {
    std::fs::read_to_string(dir?.join(name)).ok()
}

/// FNV-1a, 64 bits: the disk-cache key. Not cryptographic; it only has to change when
/// the source, the options or the compiler change.
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether `libnvrtc` can be loaded.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn missing_nvrtc() -> CudaError {
    CudaError::Missing {
        library: "NVRTC (libnvrtc.so)",
        hint: "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put its lib directory on LD_LIBRARY_PATH",
    }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(missing_nvrtc());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Driver(format!("nvrtcVersion: {status:?}")));
    }
    Ok((major, minor))
}

/// A compiled specialisation.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// CUBIN for the requested arch.
    pub cubin: Vec<u8>,
    /// Where it came from.
    pub from_disk: bool,
}

/// Compiles `spec` for `sm_{arch}` with NVRTC, or reads it from `cache_dir` when a
/// previous process compiled the same source, options and compiler. A non-empty NVRTC
/// log (a warning) is an error: the kernels compile clean or not at all.
pub fn compile(spec: &KernelSpec, arch: u32, cache_dir: Option<&Path>) -> Result<Compiled> {
    let (major, minor) = nvrtc_version()?;
    let source = expanded_source(spec.source_name())?;
    let options = spec.options(arch);
    let joined = options.join(" ");
    let version = format!("nvrtc {major}.{minor}");
    let key = fnv1a(&[source.as_bytes(), joined.as_bytes(), version.as_bytes()]);
    let symbol = &spec.symbols()[0];
    let cache_file: Option<PathBuf> =
        cache_dir.map(|dir| dir.join(format!("{symbol}-sm{arch}-{key:016x}.cubin")));
    if let Some(path) = &cache_file {
        if let Ok(cubin) = std::fs::read(path) {
            if !cubin.is_empty() {
                return Ok(Compiled {
                    cubin,
                    from_disk: true,
                });
            }
        }
    }
    let cubin =
        nvrtc_cubin(&source, spec.source_name(), &options).map_err(|log| CudaError::Compile {
            kernel: symbol.clone(),
            arch: format!("sm_{arch}"),
            log,
        })?;
    if let (Some(dir), Some(path)) = (cache_dir, &cache_file) {
        // A cache that cannot be written only costs the next process a compile.
        if std::fs::create_dir_all(dir).is_ok() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
    Ok(Compiled {
        cubin,
        from_disk: false,
    })
}

/// One NVRTC run; `Err` carries the log (errors, or warnings of an otherwise good run).
/// Compiles one translation unit to a cubin; any NVRTC log output (a warning) is an
/// error carrying the log.
pub(crate) fn nvrtc_cubin(
    source: &str,
    name: &str,
    options: &[String],
) -> std::result::Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    let src = CString::new(source).map_err(|e| e.to_string())?;
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| format!("{e:?}"))?;
    // SAFETY: `prog` is a live program created above and destroyed exactly once below;
    // the option strings outlive the call.
    let compiled = unsafe { result::compile_program(prog, options) };
    // SAFETY: as above; the log is read before the program is destroyed.
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| {
            let bytes: Vec<u8> = raw
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        })
        .unwrap_or_default();
    let outcome = match compiled {
        Err(e) => Err(format!("{e:?}\n{log}")),
        Ok(()) if !log.is_empty() => Err(log),
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; `size` is valid for writes.
            let status = unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) };
            if status != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                Err(format!("nvrtcGetCUBINSize: {status:?} (size {size})"))
            } else {
                let mut cubin = vec![0u8; size];
                // SAFETY: `cubin` has exactly the `size` bytes NVRTC asked for.
                let status = unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) };
                if status != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(format!("nvrtcGetCUBIN: {status:?}"))
                } else {
                    Ok(cubin)
                }
            }
        }
    };
    // SAFETY: destroys the program created above, once.
    let _ = unsafe { result::destroy_program(prog) };
    outcome
}

/// PTX of one translation unit, for `options` as [`compile`] passes them (a real `sm_`
/// target compiles as its `compute_` twin, whose PTX is what the cubin is built from):
/// `ci/ptx-compare.sh` diffs it between revisions. `Err` carries the log.
#[doc(hidden)]
pub fn nvrtc_ptx(source: &str, options: &[String]) -> std::result::Result<String, String> {
    let options = options
        .iter()
        .map(|o| o.replace("--gpu-architecture=sm_", "--gpu-architecture=compute_"))
        .collect();
    let opts = cudarc::nvrtc::CompileOptions {
        options,
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| format!("{e:?}"))
}

/// The disk cache directory: `$SDPA_CUDA_CACHE`, else `$XDG_CACHE_HOME/sdpa-cuda`, else
/// `$HOME/.cache/sdpa-cuda`; `None` when none is set or `SDPA_CUDA_CACHE` is empty.
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("SDPA_CUDA_CACHE") {
        Some(dir) if dir.is_empty() => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(|d| PathBuf::from(d).join("sdpa-cuda"))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdpa-cuda"))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_expanded_once_and_pragma_once_dropped() {
        for name in [
            "fwd/attn_fwd_tc.cu",
            "fwd/attn_fwd_simt.cu",
            "math/math.cu",
            "fwd/attn_fwd_wgmma.cu",
        ] {
            let src = expanded_source(name).unwrap();
            assert!(!src.contains("#include"), "{name}");
            assert!(!src.contains("#pragma once"), "{name}");
            assert_eq!(src.matches("struct SdpaParams {").count(), 1, "{name}");
            assert!(src.matches("philox4x32_10(uint4").count() <= 1, "{name}");
            assert!(src.matches("struct KeyRange {").count() <= 1, "{name}");
        }
        let tc = expanded_source("fwd/attn_fwd_tc.cu").unwrap();
        assert_eq!(tc.matches("philox4x32_10(uint4").count(), 1);
        assert_eq!(tc.matches("struct SeqLens {").count(), 1);
    }

    #[test]
    fn head_dims_round_up_to_buckets() {
        let dim = |e, ev| match KernelSpec::tc(DType::F16, e, ev, false) {
            KernelSpec::Tc { head_dim, .. } => head_dim,
            _ => unreachable!(),
        };
        assert_eq!(dim(8, 8), 32);
        assert_eq!(dim(40, 40), 64);
        assert_eq!(dim(59, 59), 64);
        assert_eq!(dim(111, 111), 128);
        assert_eq!(dim(64, 130), 160);
        assert_eq!(dim(256, 256), 256);
        let chunks = |e, ev| match KernelSpec::simt(DType::F32, e, ev, true) {
            KernelSpec::Simt { dv_chunks, .. } => dv_chunks,
            _ => unreachable!(),
        };
        assert_eq!(chunks(8, 8), 2);
        assert_eq!(chunks(64, 65), 4);
        assert_eq!(chunks(200, 3), 8);
    }

    #[test]
    fn symbols_carry_dtype_and_variant() {
        let s = KernelSpec::tc(DType::BF16, 111, 111, true);
        assert_eq!(
            s.symbols(),
            vec!["attn_fwd_tc_bf16_d128_w4_n64_m2_mask_dropout"]
        );
        let s = KernelSpec::simt(DType::F32, 64, 64, false);
        assert_eq!(s.symbols(), vec!["attn_fwd_simt_f32_dv64"]);
        let s = KernelSpec::Math { dtype: DType::F64 };
        assert_eq!(s.symbols(), vec!["math_gather_f64", "math_softmax_f64"]);
        let opts = KernelSpec::tc(DType::F16, 40, 40, false).options(90);
        assert!(opts.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(opts.contains(&"-DSDPA_HEAD_DIM=64".to_string()));
        assert!(opts.contains(&"-DSDPA_KERNEL=attn_fwd_tc_f16_d64_w4_n64_m2".to_string()));
    }

    #[test]
    fn every_variant_has_a_distinct_symbol_and_fits_shared_memory() {
        let specs = KernelSpec::all();
        let mut symbols: Vec<String> = specs.iter().flat_map(|s| s.symbols()).collect();
        let n = symbols.len();
        symbols.sort();
        symbols.dedup();
        assert_eq!(symbols.len(), n);
        // sm_80's opt-in limit is 163 KiB per block; sm_90's is 227 KiB.
        for d in TC_HEAD_DIMS {
            assert!(
                tc_shared_bytes(d) <= 163 * 1024,
                "d={d}: {}",
                tc_shared_bytes(d)
            );
        }
    }

    #[test]
    fn tile_override_parses_per_dim_entries() {
        let t = |warps, block_n, row_frags, min_blocks| TcTiles {
            warps,
            block_n,
            row_frags,
            min_blocks,
        };
        assert_eq!(parse_tile_override("8,64,1"), vec![(None, t(8, 64, 1, 1))]);
        assert_eq!(
            parse_tile_override("128:4,64,2,2;4,128,1"),
            vec![(Some(128), t(4, 64, 2, 2)), (None, t(4, 128, 1, 1))]
        );
        // Malformed entries (bad dim, block_n not a multiple of 16, 3 fragments) are dropped.
        assert!(parse_tile_override("x:4,64,1;4,60,1;4,64,1,3;4,64").is_empty());
        assert_eq!(t(4, 64, 2, 2).block_rows(), 128);
        assert_eq!(t(4, 64, 2, 2).shared_bytes(128), (128 + 256) * 136 * 2);
    }

    #[test]
    fn hopper_kernel_specs_and_overrides() {
        let dim = |e, ev| match KernelSpec::wg(DType::F16, e, ev) {
            Some(KernelSpec::Wg { head_dim, .. }) => Some(head_dim),
            _ => None,
        };
        assert_eq!(dim(8, 8), Some(32));
        assert_eq!(dim(33, 16), Some(64));
        assert_eq!(dim(96, 96), Some(128));
        assert_eq!(dim(64, 129), None);
        let wg = KernelSpec::Wg {
            dtype: DType::BF16,
            head_dim: 128,
        };
        assert!(wg.runs_on(90));
        assert!(!wg.runs_on(80) && !wg.runs_on(100));
        assert!(KernelSpec::tc(DType::F16, 64, 64, false).runs_on(80));
        let opts = wg.options(90);
        assert!(opts.contains(&"--gpu-architecture=sm_90a".to_string()));
        assert!(opts.contains(&"-DSDPA_HEAD_DIM=128".to_string()));
        let t = wg_tile_shape(128);
        assert_eq!(
            wg.symbols(),
            vec![format!(
                "attn_fwd_wgmma_bf16_d128_g{}_m{}_n{}_b{}",
                t.warpgroups, t.m_tiles, t.block_n, t.min_blocks
            )]
        );
        let w = |warpgroups, block_n, min_blocks, m_tiles| WgTiles {
            warpgroups,
            m_tiles,
            block_n,
            min_blocks,
        };
        assert_eq!(
            parse_wg_override("64:2,64,2;3,128,1;32:1,64,3,2"),
            vec![
                (Some(64), w(2, 64, 2, 1)),
                (None, w(3, 128, 1, 1)),
                (Some(32), w(1, 64, 3, 2))
            ]
        );
        // block_n other than 64/128, 5 warpgroups, a missing field, 3 M tiles: dropped.
        assert!(parse_wg_override("2,96,1;5,64,1;2,64;1,64,2,3").is_empty());
        assert_eq!(w(3, 64, 1, 1).block_rows(), 192);
        assert_eq!(w(1, 64, 3, 2).block_rows(), 128);
        assert_eq!(w(3, 64, 1, 1).shared_bytes(128), 1024 + (192 + 256) * 256);
        assert!(opts.iter().any(|o| o.starts_with("-DSDPA_M_TILES=")));
        // Every default fits sm_90's 227 KiB and its registers fit the thread count.
        for d in WG_HEAD_DIMS {
            let t = default_wg_tiles(d);
            assert!(t.min_blocks * t.shared_bytes(d) <= 227 * 1024, "d={d}");
        }
    }

    #[test]
    fn source_override_replaces_named_files_only() {
        let dir = std::env::temp_dir().join(format!("sdpa-kernel-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(dir.join("math")).unwrap();
        std::fs::create_dir_all(dir.join("common")).unwrap();
        std::fs::write(dir.join("math/math.cu"), "// planted\n").unwrap();
        std::fs::write(dir.join("common/mask.cuh"), "// planted mask\n").unwrap();
        let math = expanded_source_from("math/math.cu", Some(&dir)).unwrap();
        let tc = expanded_source_from("fwd/attn_fwd_tc.cu", Some(&dir)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(math, "// planted\n");
        assert!(tc.contains("SDPA_KERNEL"));
        assert!(tc.contains("// planted mask\n"));
        assert!(!tc.contains("struct KeyRange"));
    }

    #[test]
    fn an_include_of_a_file_not_embedded_is_an_error() {
        let dir = std::env::temp_dir().join(format!("sdpa-kernel-inc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("math")).unwrap();
        std::fs::write(
            dir.join("math/math.cu"),
            "#include \"common/dtype.cuh\"\n#include \"common/nowhere.cuh\"\n",
        )
        .unwrap();
        let result = expanded_source_from("math/math.cu", Some(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        let err = result.unwrap_err().to_string();
        assert!(err.contains("kernels/common/nowhere.cuh"), "{err}");
        assert!(err.contains("included by kernels/math/math.cu"), "{err}");
        assert!(expanded_source_from("fwd/nowhere.cu", None).is_err());
    }

    #[test]
    fn cache_key_changes_with_every_part() {
        let a = fnv1a(&[b"src", b"opts"]);
        assert_ne!(a, fnv1a(&[b"src", b"opts2"]));
        assert_ne!(a, fnv1a(&[b"srcopts"]));
        assert_eq!(a, fnv1a(&[b"src", b"opts"]));
    }
}
