//! The one table of kernel variants. A [`KernelSpec`] is one compiled module (a source
//! specialised by `-D` defines); an [`Entry`] one function in it. Each row of [`TABLE`]
//! says which dtypes, head-dim classes and feature sets a kind comes in, its source and
//! its entry points; the spec derives its symbols, NVRTC options and launch geometry
//! from its row and the context's [`KernelConfig`]. A new variant of an existing kind
//! is a row edit; a new kind is a row, a source, and its arms in `KernelSpec::defines`
//! and [`KernelSpec::geometry`].

use crate::tiles::KernelConfig;
use sdpa_core::DType;

/// What a module computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The mma.sync tensor-core forward (flash, and efficient in f16/bf16; sm_80+).
    FwdTc,
    /// The Hopper warpgroup-MMA forward (sm_90a): the plain flash path.
    FwdWgmma,
    /// The scalar forward (efficient in f32).
    FwdSimt,
    /// The math backend's gather and softmax kernels (cuBLAS does the products).
    Math,
    /// The math backward's elementwise kernels (cuBLAS does the products).
    MathBwd,
    /// The efficient backend's fused scalar backward (f32, f16, bf16).
    BwdSimt,
    /// The mma.sync tensor-core backward (flash, and efficient in f16/bf16; sm_80+).
    BwdTc,
    /// The Hopper warpgroup-MMA backward (sm_90a): flash and efficient in f16/bf16, masks
    /// and dropout in its `extras` variant.
    BwdWgmma,
    /// The causal module's elementwise kernels (bias rows, residual dropout).
    Nn,
    /// Decoding over a KV cache: the append, split-KV attention, the combine.
    Decode,
    /// Decoding over a KV cache on the tensor cores: the split kernel for tiles of 16
    /// packed rows (f16 / bf16; the append and combine are `Decode`'s).
    DecodeTc,
}

/// A function of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// The attention forward of a fused kernel.
    Forward,
    /// Math: copies q, k or v into a contiguous operand (GQA heads expanded).
    MathGather,
    /// Math: masked, scaled softmax of the scores in place, with lse.
    MathSoftmax,
    /// Math backward: q, k, v or dout into a contiguous accumulator-type copy.
    MathBwdConvert,
    /// Math backward: P, D, W and dS of every score from lse and the dropout stream.
    MathBwdGrad,
    /// Math backward: a gradient rounded (and scaled) once to its dtype.
    MathBwdRound,
    /// Fused backward, query-major: D and dq (and dmask's sums).
    BwdDq,
    /// Fused backward, key-major: dk and dv.
    BwdDkDv,
    /// Tensor-core backward: D = rowsum(dout * out) per query row.
    BwdPre,
    /// Tensor-core backward: dk and dv of a key block, dq added into its accumulator.
    BwdMain,
    /// Module: writes the bias into every row.
    NnBiasRows,
    /// Module: residual dropout in place.
    NnDropoutRows,
    /// Decode: `k_new` / `v_new` written into the cache.
    DecodeAppend,
    /// Decode: one key split of a tile of this many packed query rows (1, 4, 8 or 16).
    DecodeSplit(u32),
    /// Decode: the splits of each row merged by lse.
    DecodeCombine,
    /// Decode on the tensor cores: one key split of a tile of 16 packed rows.
    DecodeSplitTc,
}

/// Which compute capabilities a kind runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// sm_80 and later.
    Sm80Plus,
    /// Exactly sm_90, compiled for sm_90a (wgmma is sm_90a-only).
    Sm90a,
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// The kind.
    pub kind: Kind,
    /// The source under `kernels/`.
    pub source: &'static str,
    /// Symbol prefix.
    pub prefix: &'static str,
    /// Element types it is built for.
    pub dtypes: &'static [DType],
    /// Head-dim classes (padded head dims, or value-dim buckets for the scalar kernel);
    /// `[0]` where the kind has none.
    pub head_dims: &'static [u32],
    /// Feature sets: `false` the plain path, `true` mask and dropout compiled in.
    pub extras: &'static [bool],
    /// Its entry points.
    pub entries: &'static [Entry],
    /// Where it runs.
    pub arch: Arch,
}

const HALF: &[DType] = &[DType::F16, DType::BF16];

/// Every kind of module, its variants and entry points: what dispatch can ask for and
/// what CI compiles.
pub const TABLE: [Variant; 11] = [
    Variant {
        kind: Kind::FwdTc,
        source: "fwd/attn_fwd_tc.cu",
        prefix: "attn_fwd_tc",
        dtypes: HALF,
        // Multiples of 32 keep the variant count (and CI's compile time) down; padding
        // is zero-filled in shared memory and never stored.
        head_dims: &[32, 64, 96, 128, 160, 192, 224, 256],
        extras: &[false, true],
        entries: &[Entry::Forward],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::FwdWgmma,
        source: "fwd/attn_fwd_wgmma.cu",
        prefix: "attn_fwd_wgmma",
        dtypes: HALF,
        // Column blocks of 64 elements (128 bytes; of 32 at D = 32 and 96), one to four.
        head_dims: &[32, 64, 96, 128, 192, 256],
        extras: &[false],
        entries: &[Entry::Forward],
        arch: Arch::Sm90a,
    },
    Variant {
        kind: Kind::FwdSimt,
        source: "fwd/attn_fwd_simt.cu",
        prefix: "attn_fwd_simt",
        dtypes: &[DType::F32],
        // Value-dim buckets: 32-lane chunks of 2, 4 or 8 (dims up to 64, 128, 256).
        head_dims: &[64, 128, 256],
        extras: &[false, true],
        entries: &[Entry::Forward],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::Math,
        source: "math/math.cu",
        prefix: "math",
        dtypes: &DType::ALL,
        head_dims: &[0],
        extras: &[false],
        entries: &[Entry::MathGather, Entry::MathSoftmax],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::MathBwd,
        source: "bwd/math_bwd.cu",
        prefix: "math_bwd",
        dtypes: &DType::ALL,
        head_dims: &[0],
        extras: &[false],
        entries: &[
            Entry::MathBwdConvert,
            Entry::MathBwdGrad,
            Entry::MathBwdRound,
        ],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::BwdSimt,
        source: "bwd/attn_bwd_simt.cu",
        prefix: "attn_bwd_simt",
        dtypes: &[DType::F32, DType::F16, DType::BF16],
        // Head-dim buckets of the larger of E and Ev: 32-lane chunks of 2, 4 or 8.
        head_dims: &[64, 128, 256],
        // Mask and dropout are always compiled in (run-time switches).
        extras: &[true],
        entries: &[Entry::BwdDq, Entry::BwdDkDv],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::BwdTc,
        source: "bwd/attn_bwd_tc.cu",
        prefix: "attn_bwd_tc",
        dtypes: HALF,
        // The dK and dV accumulators (D/2 registers a thread each) cap it at 128.
        head_dims: &[32, 64, 96, 128],
        extras: &[false, true],
        entries: &[Entry::BwdPre, Entry::BwdMain],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::BwdWgmma,
        source: "bwd/attn_bwd_wgmma.cu",
        prefix: "attn_bwd_wgmma",
        dtypes: HALF,
        // One swizzled column block of 64, or two; query blocks of 64 rows.
        head_dims: &[64, 128],
        extras: &[false, true],
        entries: &[Entry::BwdPre, Entry::BwdMain],
        arch: Arch::Sm90a,
    },
    Variant {
        kind: Kind::Nn,
        source: "nn/nn.cu",
        prefix: "nn",
        dtypes: &DType::ALL,
        head_dims: &[0],
        extras: &[false],
        entries: &[Entry::NnBiasRows, Entry::NnDropoutRows],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::Decode,
        source: "decode/attn_decode.cu",
        prefix: "attn_decode",
        dtypes: &[DType::F32, DType::F16, DType::BF16],
        // Classes of max(E, Ev): shared rows of 64, 128 or 256 elements.
        head_dims: &[64, 128, 256],
        extras: &[false],
        entries: &[
            Entry::DecodeAppend,
            Entry::DecodeSplit(1),
            Entry::DecodeSplit(4),
            Entry::DecodeSplit(8),
            Entry::DecodeSplit(16),
            Entry::DecodeCombine,
        ],
        arch: Arch::Sm80Plus,
    },
    Variant {
        kind: Kind::DecodeTc,
        source: "decode/attn_decode_tc.cu",
        prefix: "attn_decode_tc",
        dtypes: HALF,
        // Q's fragments and the output's accumulators live in registers: 128 at most.
        head_dims: &[64, 128],
        extras: &[false],
        entries: &[Entry::DecodeSplitTc],
        arch: Arch::Sm80Plus,
    },
];

/// Keys a decode block holds: 64, or 32 where f32 rows of 256 would not fit twice.
pub fn decode_block_n(dtype: DType, head_dim: u32) -> u32 {
    if dtype == DType::F32 && head_dim > 128 {
        32
    } else {
        64
    }
}

/// One compiled module: a row of [`TABLE`] at one dtype, head-dim class and feature set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelSpec {
    /// The kind.
    pub kind: Kind,
    /// Element type.
    pub dtype: DType,
    /// Head-dim class (0 where the kind has none).
    pub head_dim: u32,
    /// Mask and dropout compiled in.
    pub extras: bool,
}

/// How a fused forward is launched: query rows per CTA and threads per CTA. Dynamic
/// shared memory comes from the compiled kernel itself (its `sdpa_shared_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Query rows one CTA covers (the grid's x is `ceil(L / block_rows)`).
    pub block_rows: u32,
    /// Threads per CTA.
    pub threads: u32,
}

fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::F64 => 0,
        DType::F32 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
    }
}

impl KernelSpec {
    /// Its row of the table.
    pub fn variant(&self) -> &'static Variant {
        TABLE
            .iter()
            .find(|v| v.kind == self.kind)
            .expect("every kind has a row")
    }

    /// The spec of `kind` for `dtype` whose head-dim class is the first that covers
    /// `widest` (the larger of E and Ev), or `None` when the kind has no such variant.
    pub fn fitting(kind: Kind, dtype: DType, widest: usize, extras: bool) -> Option<Self> {
        let row = TABLE.iter().find(|v| v.kind == kind)?;
        if !row.dtypes.contains(&dtype) || !row.extras.contains(&extras) {
            return None;
        }
        let head_dim = *row.head_dims.iter().find(|&&d| d as usize >= widest)?;
        Some(KernelSpec {
            kind,
            dtype,
            head_dim,
            extras,
        })
    }

    /// The one module of a kind without head-dim classes (math, nn).
    pub fn plain(kind: Kind, dtype: DType) -> Self {
        KernelSpec {
            kind,
            dtype,
            head_dim: 0,
            extras: false,
        }
    }

    /// Every module of the table: what CI compiles.
    pub fn all() -> Vec<KernelSpec> {
        TABLE
            .iter()
            .flat_map(|row| {
                row.dtypes.iter().flat_map(move |&dtype| {
                    row.head_dims.iter().flat_map(move |&head_dim| {
                        row.extras.iter().map(move |&extras| KernelSpec {
                            kind: row.kind,
                            dtype,
                            head_dim,
                            extras,
                        })
                    })
                })
            })
            .collect()
    }

    /// The source file under `kernels/`.
    pub fn source(&self) -> &'static str {
        self.variant().source
    }

    /// Whether it runs on a device of compute capability `arch` (e.g. 90).
    pub fn runs_on(&self, arch: u32) -> bool {
        match self.variant().arch {
            Arch::Sm80Plus => arch >= 80,
            Arch::Sm90a => arch == 90,
        }
    }

    /// The symbol of `entry` in this module (carrying dtype, head-dim class, tiles and
    /// features, so that no two modules share a symbol).
    pub fn symbol(&self, entry: Entry, config: &KernelConfig) -> String {
        let (prefix, dtype, d) = (self.variant().prefix, self.dtype, self.head_dim);
        let extras = if self.extras { "_mask_dropout" } else { "" };
        match (self.kind, entry) {
            (Kind::FwdTc, _) => {
                let t = config.tc_tiles(d);
                format!(
                    "{prefix}_{dtype}_d{d}_w{}_n{}_m{}{extras}",
                    t.warps, t.block_n, t.row_frags
                )
            }
            (Kind::FwdWgmma, _) => {
                let t = config.wg_tiles(d);
                format!(
                    "{prefix}_{dtype}_d{d}_g{}_m{}_n{}_b{}",
                    t.warpgroups, t.m_tiles, t.block_n, t.min_blocks
                )
            }
            (Kind::FwdSimt, _) => format!("{prefix}_{dtype}_dv{d}{extras}"),
            (Kind::Math, Entry::MathGather) => format!("{prefix}_gather_{dtype}"),
            (Kind::Math, _) => format!("{prefix}_softmax_{dtype}"),
            (Kind::MathBwd, Entry::MathBwdConvert) => format!("{prefix}_convert_{dtype}"),
            (Kind::MathBwd, Entry::MathBwdGrad) => format!("{prefix}_grad_{dtype}"),
            (Kind::MathBwd, _) => format!("{prefix}_round_{dtype}"),
            (Kind::BwdSimt, Entry::BwdDq) => format!("{prefix}_dq_{dtype}_d{d}"),
            (Kind::BwdSimt, _) => format!("{prefix}_dkdv_{dtype}_d{d}"),
            (Kind::BwdTc, entry) => {
                let t = config.bwd_tiles(d);
                let part = if entry == Entry::BwdPre {
                    "pre"
                } else {
                    "main"
                };
                format!(
                    "{prefix}_{part}_{dtype}_d{d}_w{}_m{}_b{}{extras}",
                    t.warps, t.block_m, t.min_blocks
                )
            }
            (Kind::BwdWgmma, entry) => {
                let part = if entry == Entry::BwdPre {
                    "pre"
                } else {
                    "main"
                };
                format!("{prefix}_{part}_{dtype}_d{d}{extras}")
            }
            // nn.cu's symbols are fixed; its module is per dtype.
            (Kind::Nn, Entry::NnBiasRows) => "nn_bias_rows".to_string(),
            (Kind::Nn, _) => "nn_dropout_rows".to_string(),
            (Kind::Decode, Entry::DecodeAppend) => format!("{prefix}_append_{dtype}_d{d}"),
            (Kind::Decode, Entry::DecodeSplit(rows)) => {
                format!("{prefix}_split_{dtype}_d{d}_r{rows}")
            }
            (Kind::Decode, _) => format!("{prefix}_combine_{dtype}_d{d}"),
            (Kind::DecodeTc, _) => format!("{prefix}_split_{dtype}_d{d}"),
        }
    }

    /// The `-D` defines that specialise the source.
    fn defines(&self, config: &KernelConfig) -> Vec<(&'static str, String)> {
        let mut d = vec![("SDPA_DTYPE", dtype_code(self.dtype).to_string())];
        let forward = || self.symbol(Entry::Forward, config);
        match self.kind {
            Kind::FwdTc => {
                let t = config.tc_tiles(self.head_dim);
                d.extend([
                    ("SDPA_HEAD_DIM", self.head_dim.to_string()),
                    ("SDPA_WARPS", t.warps.to_string()),
                    ("SDPA_BLOCK_N", t.block_n.to_string()),
                    ("SDPA_ROW_FRAGS", t.row_frags.to_string()),
                    ("SDPA_MIN_BLOCKS", t.min_blocks.to_string()),
                    ("SDPA_EXTRAS", (self.extras as u32).to_string()),
                    ("SDPA_KERNEL", forward()),
                ]);
            }
            Kind::FwdWgmma => {
                let t = config.wg_tiles(self.head_dim);
                d.extend([
                    ("SDPA_HEAD_DIM", self.head_dim.to_string()),
                    ("SDPA_BLOCK_N", t.block_n.to_string()),
                    ("SDPA_WARPGROUPS", t.warpgroups.to_string()),
                    ("SDPA_M_TILES", t.m_tiles.to_string()),
                    ("SDPA_MIN_BLOCKS", t.min_blocks.to_string()),
                    ("SDPA_KERNEL", forward()),
                ]);
            }
            Kind::FwdSimt => d.extend([
                ("SDPA_DV_CHUNKS", (self.head_dim / 32).to_string()),
                ("SDPA_EXTRAS", (self.extras as u32).to_string()),
                ("SDPA_KERNEL", forward()),
            ]),
            Kind::Math => d.extend([
                ("SDPA_KERNEL_GATHER", self.symbol(Entry::MathGather, config)),
                (
                    "SDPA_KERNEL_SOFTMAX",
                    self.symbol(Entry::MathSoftmax, config),
                ),
            ]),
            Kind::MathBwd => d.extend([
                (
                    "SDPA_KERNEL_CONVERT",
                    self.symbol(Entry::MathBwdConvert, config),
                ),
                ("SDPA_KERNEL_GRAD", self.symbol(Entry::MathBwdGrad, config)),
                (
                    "SDPA_KERNEL_ROUND",
                    self.symbol(Entry::MathBwdRound, config),
                ),
            ]),
            Kind::BwdSimt => d.extend([
                ("SDPA_DV_CHUNKS", (self.head_dim / 32).to_string()),
                ("SDPA_KERNEL_DQ", self.symbol(Entry::BwdDq, config)),
                ("SDPA_KERNEL_DKDV", self.symbol(Entry::BwdDkDv, config)),
            ]),
            Kind::BwdTc => {
                let t = config.bwd_tiles(self.head_dim);
                d.extend([
                    ("SDPA_HEAD_DIM", self.head_dim.to_string()),
                    ("SDPA_WARPS", t.warps.to_string()),
                    ("SDPA_BLOCK_M", t.block_m.to_string()),
                    ("SDPA_MIN_BLOCKS", t.min_blocks.to_string()),
                    ("SDPA_EXTRAS", (self.extras as u32).to_string()),
                    ("SDPA_KERNEL_PRE", self.symbol(Entry::BwdPre, config)),
                    ("SDPA_KERNEL", self.symbol(Entry::BwdMain, config)),
                ]);
            }
            Kind::BwdWgmma => d.extend([
                ("SDPA_HEAD_DIM", self.head_dim.to_string()),
                ("SDPA_EXTRAS", (self.extras as u32).to_string()),
                ("SDPA_KERNEL_PRE", self.symbol(Entry::BwdPre, config)),
                ("SDPA_KERNEL", self.symbol(Entry::BwdMain, config)),
            ]),
            Kind::Nn => {}
            Kind::Decode => {
                d.extend([
                    ("SDPA_HEAD_DIM", self.head_dim.to_string()),
                    (
                        "SDPA_BLOCK_N",
                        decode_block_n(self.dtype, self.head_dim).to_string(),
                    ),
                    (
                        "SDPA_KERNEL_APPEND",
                        self.symbol(Entry::DecodeAppend, config),
                    ),
                    (
                        "SDPA_KERNEL_COMBINE",
                        self.symbol(Entry::DecodeCombine, config),
                    ),
                ]);
                for (name, rows) in [
                    ("SDPA_KERNEL_SPLIT1", 1),
                    ("SDPA_KERNEL_SPLIT4", 4),
                    ("SDPA_KERNEL_SPLIT8", 8),
                    ("SDPA_KERNEL_SPLIT16", 16),
                ] {
                    d.push((name, self.symbol(Entry::DecodeSplit(rows), config)));
                }
            }
            Kind::DecodeTc => d.extend([
                ("SDPA_HEAD_DIM", self.head_dim.to_string()),
                (
                    "SDPA_KERNEL_SPLIT_TC",
                    self.symbol(Entry::DecodeSplitTc, config),
                ),
            ]),
        }
        d
    }

    /// NVRTC options for a device of compute capability `arch`.
    pub fn options(&self, arch: u32, config: &KernelConfig) -> Vec<String> {
        let target = match self.variant().arch {
            Arch::Sm90a => format!("sm_{arch}a"),
            Arch::Sm80Plus => format!("sm_{arch}"),
        };
        let mut opts = vec![
            format!("--gpu-architecture={target}"),
            "--std=c++17".to_string(),
            "-lineinfo".to_string(),
        ];
        opts.extend(
            self.defines(config)
                .into_iter()
                .map(|(k, v)| format!("-D{k}={v}")),
        );
        opts
    }

    /// The launch geometry of a fused forward (`None` for math and nn, which size their
    /// grids per call).
    pub fn geometry(&self, config: &KernelConfig) -> Option<Geometry> {
        match self.kind {
            Kind::FwdTc => {
                let t = config.tc_tiles(self.head_dim);
                Some(Geometry {
                    block_rows: t.block_rows(),
                    threads: t.threads(),
                })
            }
            Kind::FwdWgmma => {
                let t = config.wg_tiles(self.head_dim);
                Some(Geometry {
                    block_rows: t.block_rows(),
                    threads: t.threads(),
                })
            }
            // Four warps, one query row each.
            Kind::FwdSimt => Some(Geometry {
                block_rows: 4,
                threads: 128,
            }),
            // Here "rows" are the keys a CTA owns.
            Kind::BwdTc => {
                let t = config.bwd_tiles(self.head_dim);
                Some(Geometry {
                    block_rows: t.block_keys(),
                    threads: t.threads(),
                })
            }
            // Two warpgroups of 64 keys each (the tiles are fixed per head dim).
            Kind::BwdWgmma => Some(Geometry {
                block_rows: 128,
                threads: 256,
            }),
            Kind::Math
            | Kind::MathBwd
            | Kind::BwdSimt
            | Kind::Nn
            | Kind::Decode
            | Kind::DecodeTc => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiles::WgTiles;

    fn dim(kind: Kind, dtype: DType, widest: usize) -> Option<u32> {
        KernelSpec::fitting(kind, dtype, widest, false).map(|s| s.head_dim)
    }

    #[test]
    fn head_dims_round_up_to_classes() {
        let tc = |w| dim(Kind::FwdTc, DType::F16, w);
        assert_eq!(
            [tc(8), tc(40), tc(59), tc(111), tc(130), tc(256), tc(257)],
            [
                Some(32),
                Some(64),
                Some(64),
                Some(128),
                Some(160),
                Some(256),
                None
            ]
        );
        let simt = |w| dim(Kind::FwdSimt, DType::F32, w);
        assert_eq!(
            [simt(8), simt(65), simt(200)],
            [Some(64), Some(128), Some(256)]
        );
        let wg = |w| dim(Kind::FwdWgmma, DType::BF16, w);
        assert_eq!(
            [
                wg(8),
                wg(33),
                wg(80),
                wg(96),
                wg(100),
                wg(129),
                wg(200),
                wg(256),
                wg(257)
            ],
            [
                Some(32),
                Some(64),
                Some(96),
                Some(96),
                Some(128),
                Some(192),
                Some(256),
                Some(256),
                None
            ]
        );
        assert_eq!(dim(Kind::FwdTc, DType::F32, 64), None);
        assert!(KernelSpec::fitting(Kind::FwdWgmma, DType::F16, 64, true).is_none());
    }

    #[test]
    fn symbols_carry_dtype_and_variant() {
        let config = KernelConfig::default();
        let tc = KernelSpec::fitting(Kind::FwdTc, DType::BF16, 111, true).unwrap();
        assert_eq!(
            tc.symbol(Entry::Forward, &config),
            "attn_fwd_tc_bf16_d128_w4_n64_m2_mask_dropout"
        );
        let simt = KernelSpec::fitting(Kind::FwdSimt, DType::F32, 64, false).unwrap();
        assert_eq!(
            simt.symbol(Entry::Forward, &config),
            "attn_fwd_simt_f32_dv64"
        );
        let math = KernelSpec::plain(Kind::Math, DType::F64);
        assert_eq!(math.symbol(Entry::MathGather, &config), "math_gather_f64");
        assert_eq!(math.symbol(Entry::MathSoftmax, &config), "math_softmax_f64");
        let bwd = KernelSpec::plain(Kind::MathBwd, DType::BF16);
        assert_eq!(bwd.source(), "bwd/math_bwd.cu");
        assert_eq!(
            bwd.symbol(Entry::MathBwdGrad, &config),
            "math_bwd_grad_bf16"
        );
        let bwd_opts = bwd.options(80, &config);
        assert!(bwd_opts.contains(&"-DSDPA_DTYPE=3".to_string()));
        assert!(bwd_opts.contains(&"-DSDPA_KERNEL_ROUND=math_bwd_round_bf16".to_string()));
        let opts = KernelSpec::fitting(Kind::FwdTc, DType::F16, 40, false)
            .unwrap()
            .options(90, &config);
        assert!(opts.contains(&"--gpu-architecture=sm_90".to_string()));
        assert!(opts.contains(&"-DSDPA_HEAD_DIM=64".to_string()));
        assert!(opts.contains(&"-DSDPA_KERNEL=attn_fwd_tc_f16_d64_w4_n64_m2".to_string()));
        let fused = KernelSpec::fitting(Kind::BwdSimt, DType::F16, 96, true).unwrap();
        assert_eq!(fused.source(), "bwd/attn_bwd_simt.cu");
        assert_eq!(
            fused.symbol(Entry::BwdDq, &config),
            "attn_bwd_simt_dq_f16_d128"
        );
        let fused_opts = fused.options(90, &config);
        assert!(fused_opts.contains(&"-DSDPA_DV_CHUNKS=4".to_string()));
        assert!(fused_opts.contains(&"-DSDPA_KERNEL_DKDV=attn_bwd_simt_dkdv_f16_d128".to_string()));
        assert!(KernelSpec::fitting(Kind::BwdSimt, DType::F64, 64, true).is_none());
        assert!(KernelSpec::fitting(Kind::BwdSimt, DType::F32, 257, true).is_none());
        let simt_opts = simt.options(80, &config);
        assert!(simt_opts.contains(&"-DSDPA_DV_CHUNKS=2".to_string()));
    }

    #[test]
    fn the_tensor_core_decode_row_gates_dtype_and_head_dim() {
        // decode.rs picks the tensor-core split by this row alone (plus aligned rows).
        let tc = |dtype, w| dim(Kind::DecodeTc, dtype, w);
        assert_eq!(tc(DType::F16, 40), Some(64));
        assert_eq!(tc(DType::BF16, 128), Some(128));
        assert_eq!(tc(DType::BF16, 129), None);
        assert_eq!(tc(DType::F32, 64), None);
    }

    #[test]
    fn every_module_has_distinct_symbols_and_arch_rules() {
        let config = KernelConfig::default();
        let specs = KernelSpec::all();
        assert_eq!(specs.len(), 32 + 12 + 6 + 4 + 4 + 9 + 16 + 4 + 8 + 9 + 4);
        let mut symbols: Vec<String> = specs
            .iter()
            .filter(|s| s.kind != Kind::Nn)
            .flat_map(|s| {
                s.variant()
                    .entries
                    .iter()
                    .map(|&e| s.symbol(e, &config))
                    .collect::<Vec<_>>()
            })
            .collect();
        let n = symbols.len();
        symbols.sort();
        symbols.dedup();
        assert_eq!(symbols.len(), n);
        let wg = KernelSpec::fitting(Kind::FwdWgmma, DType::BF16, 128, false).unwrap();
        assert!(wg.runs_on(90) && !wg.runs_on(80) && !wg.runs_on(100));
        assert!(wg
            .options(90, &config)
            .contains(&"--gpu-architecture=sm_90a".to_string()));
        assert!(KernelSpec::plain(Kind::Math, DType::F32).runs_on(80));
    }

    #[test]
    fn geometry_follows_the_config() {
        let w = WgTiles {
            warpgroups: 2,
            m_tiles: 2,
            block_n: 128,
            min_blocks: 1,
        };
        let config = KernelConfig::default().with_wg_tiles(Some(64), w).unwrap();
        let wg = KernelSpec::fitting(Kind::FwdWgmma, DType::F16, 64, false).unwrap();
        assert_eq!(
            wg.geometry(&config),
            Some(Geometry {
                block_rows: 256,
                threads: 256
            })
        );
        assert_eq!(
            wg.symbol(Entry::Forward, &config),
            "attn_fwd_wgmma_f16_d64_g2_m2_n128_b1"
        );
        let default = KernelSpec::fitting(Kind::FwdWgmma, DType::F16, 128, false).unwrap();
        assert_eq!(
            default.geometry(&config),
            Some(Geometry {
                block_rows: 192,
                threads: 384
            })
        );
        assert_eq!(
            KernelSpec::plain(Kind::Nn, DType::F16).geometry(&config),
            None
        );
    }
}
