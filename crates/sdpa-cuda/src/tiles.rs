//! Tile shapes and switches of the fused kernels: a [`KernelConfig`] that a
//! [`GpuContext`](crate::GpuContext) owns. The library reads no environment variable;
//! a binary that wants the `SDPA_*` overrides (tile sweeps, planted-bug runs) calls
//! [`KernelConfig::from_env`] once at its edge, and a bad value is an `Err`.

use crate::error::{CudaError, Result};
use std::path::PathBuf;

/// Tile shape of the mma.sync kernel (`kernels/fwd/attn_fwd_tc.cu`) for one padded head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        32 * self.warps
    }

    /// The default for a padded head dim. Up to D = 128 a warp owns 32 rows (two
    /// fragments share every K/V fragment read from shared memory) and a CTA 128, as
    /// FlashAttention-2 does; wider heads take 16 rows a warp and 32 keys a tile so that
    /// the accumulators (D/2 registers a thread) and shared memory still fit.
    pub fn default_for(head_dim: u32) -> Self {
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

    fn from_fields(v: &[u32]) -> std::result::Result<Self, String> {
        let (warps, block_n, min_blocks, row_frags) = match *v {
            [w, n, b] => (w, n, b, 1),
            [w, n, b, m] => (w, n, b, m),
            _ => return Err("warps,block_n,min_blocks[,row_frags]".into()),
        };
        if !(1..=16).contains(&warps) {
            return Err("warps in 1..=16".into());
        }
        if block_n == 0 || block_n % 16 != 0 || block_n > 256 {
            return Err("block_n a multiple of 16 in 16..=256".into());
        }
        if !(1..=4).contains(&min_blocks) {
            return Err("min_blocks in 1..=4".into());
        }
        if !(1..=2).contains(&row_frags) {
            return Err("row_frags 1 or 2".into());
        }
        Ok(TcTiles {
            warps,
            block_n,
            row_frags,
            min_blocks,
        })
    }
}

/// Tile shape of the Hopper kernel (`kernels/fwd/attn_fwd_wgmma.cu`) for one padded head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        128 * self.warpgroups
    }

    /// The default for a padded head dim, 64 keys a tile: two warpgroups (128 query rows,
    /// O alone 96 or 128 registers) at D = 192 and 256; three (192 query rows, 168
    /// registers) at D = 96 and 128; at D = 64 and 32 one warpgroup a CTA and four
    /// CTAs an SM (at most 128 registers), so no CTA barrier couples two warpgroups and
    /// the SM's four warpgroups drift apart (one's softmax under another's GEMMs). The
    /// fastest of the sweeps in kernels/NOTES.md.
    pub fn default_for(head_dim: u32) -> Self {
        let t = |warpgroups, block_n, min_blocks| WgTiles {
            warpgroups,
            m_tiles: 1,
            block_n,
            min_blocks,
        };
        match head_dim {
            0..=64 => t(1, 64, 4),
            65..=128 => t(3, 64, 1),
            _ => t(2, 64, 1),
        }
    }

    fn from_fields(v: &[u32]) -> std::result::Result<Self, String> {
        let (warpgroups, block_n, min_blocks, m_tiles) = match *v {
            [g, n, b] => (g, n, b, 1),
            [g, n, b, m] => (g, n, b, m),
            _ => return Err("warpgroups,block_n,min_blocks[,m_tiles]".into()),
        };
        if !(1..=4).contains(&warpgroups) {
            return Err("warpgroups in 1..=4".into());
        }
        if block_n != 64 && block_n != 128 {
            return Err("block_n 64 or 128".into());
        }
        if !(1..=4).contains(&min_blocks) {
            return Err("min_blocks in 1..=4".into());
        }
        if !(1..=2).contains(&m_tiles) {
            return Err("m_tiles 1 or 2".into());
        }
        Ok(WgTiles {
            warpgroups,
            m_tiles,
            block_n,
            min_blocks,
        })
    }
}

/// Tile shape of the mma.sync backward (`kernels/bwd/attn_bwd_tc.cu`) for one padded
/// head dim: a CTA owns `16 * warps` keys and walks the query rows `block_m` at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BwdTiles {
    /// Warps per CTA (each owns 16 keys).
    pub warps: u32,
    /// Query rows per step (a multiple of 16).
    pub block_m: u32,
    /// CTAs per SM the register budget is sized for (`__launch_bounds__`).
    pub min_blocks: u32,
}

impl BwdTiles {
    /// Keys per CTA (the grid's x is `ceil(S / block_keys)`).
    pub fn block_keys(&self) -> u32 {
        16 * self.warps
    }

    /// Threads per CTA.
    pub fn threads(&self) -> u32 {
        32 * self.warps
    }

    /// The default for a padded head dim (kernels/NOTES.md has the sweep): one shape
    /// for all of them.
    pub fn default_for(_head_dim: u32) -> Self {
        let t = |warps, block_m, min_blocks| BwdTiles {
            warps,
            block_m,
            min_blocks,
        };
        // Eight warps (128 keys a CTA, half the dq additions of 64 per key) and 64 query
        // rows a step: the fastest of the H200 sweep at every head dim (NOTES.md).
        t(8, 64, 1)
    }

    fn from_fields(v: &[u32]) -> std::result::Result<Self, String> {
        let [warps, block_m, min_blocks] = *v else {
            return Err("warps,block_m,min_blocks".into());
        };
        if !(1..=16).contains(&warps) {
            return Err("warps in 1..=16".into());
        }
        if block_m == 0 || block_m % 16 != 0 || block_m > 128 {
            return Err("block_m a multiple of 16 in 16..=128".into());
        }
        let frags = block_m / 16;
        if warps % frags != 0 && frags % warps != 0 {
            return Err("warps a multiple or a divisor of block_m / 16".into());
        }
        if !(1..=4).contains(&min_blocks) {
            return Err("min_blocks in 1..=4".into());
        }
        Ok(BwdTiles {
            warps,
            block_m,
            min_blocks,
        })
    }
}

/// Tile overrides of one kernel family: `(head dim or every dim, shape)`, first match wins.
type Overrides<T> = Vec<(Option<u32>, T)>;

fn pick<T: Copy>(overrides: &Overrides<T>, head_dim: u32) -> Option<T> {
    overrides
        .iter()
        .find(|(dim, _)| dim.is_none_or(|d| d == head_dim))
        .map(|&(_, t)| t)
}

/// Parses `;`-separated `[dim:]n,n,...` entries; an entry without `dim:` applies to
/// every head dim. Any malformed entry is an `Err` naming `var` and the entry.
fn parse_overrides<T>(
    var: &'static str,
    text: &str,
    make: fn(&[u32]) -> std::result::Result<T, String>,
) -> Result<Overrides<T>> {
    text.split(';')
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            let bad = |why: String| CudaError::Config {
                var,
                expected: why,
                actual: entry.to_string(),
            };
            let (dim, rest) = match entry.split_once(':') {
                Some((d, rest)) => (
                    Some(
                        d.trim()
                            .parse::<u32>()
                            .map_err(|_| bad("a head dim before ':'".into()))?,
                    ),
                    rest,
                ),
                None => (None, entry),
            };
            let fields = rest
                .split(',')
                .map(|x| x.trim().parse::<u32>())
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(|_| bad("comma-separated whole numbers".into()))?;
            Ok((dim, make(&fields).map_err(bad)?))
        })
        .collect()
}

/// What a context compiles and how: tile shapes per kernel family (defaults, or
/// overrides for sweeps), whether the Hopper kernel may run, where kernel sources and
/// compiled binaries come from. Built with [`KernelConfig::default`] and the `with_*`
/// methods, or [`KernelConfig::from_env`].
#[derive(Debug, Clone, PartialEq)]
pub struct KernelConfig {
    tc: Overrides<TcTiles>,
    wg: Overrides<WgTiles>,
    bwd: Overrides<BwdTiles>,
    wgmma: bool,
    kernel_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
}

impl Default for KernelConfig {
    /// The tested defaults, embedded sources, the user's disk cache
    /// ([`default_cache_dir`](crate::cache::default_cache_dir)).
    fn default() -> Self {
        KernelConfig {
            tc: Vec::new(),
            wg: Vec::new(),
            bwd: Vec::new(),
            wgmma: true,
            kernel_dir: None,
            cache_dir: crate::cache::default_cache_dir(),
        }
    }
}

impl KernelConfig {
    /// The defaults with the process's overrides applied:
    /// - `SDPA_CUDA_TC_TILES`: `[dim:]warps,block_n,min_blocks[,row_frags]` entries, `;`-separated;
    /// - `SDPA_CUDA_WG_TILES`: `[dim:]warpgroups,block_n,min_blocks[,m_tiles]` entries;
    /// - `SDPA_CUDA_BWD_TILES`: `[dim:]warps,block_m,min_blocks` entries (the mma.sync backward);
    /// - `SDPA_CUDA_WGMMA=0`: keep the mma.sync kernel on sm_90 (for comparisons);
    /// - `SDPA_KERNEL_DIR`: a folder mirroring `kernels/` whose files replace the
    ///   embedded ones (planted-bug runs);
    /// - `SDPA_CUDA_CACHE`: the disk cache folder (empty: no disk cache).
    ///
    /// # Errors
    /// [`CudaError::Config`] naming the variable, for a malformed value or a
    /// `SDPA_KERNEL_DIR` that is not a folder.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok();
        let mut config = KernelConfig::default();
        if let Some(text) = var("SDPA_CUDA_TC_TILES") {
            config.tc = parse_overrides("SDPA_CUDA_TC_TILES", &text, TcTiles::from_fields)?;
        }
        if let Some(text) = var("SDPA_CUDA_WG_TILES") {
            config.wg = parse_overrides("SDPA_CUDA_WG_TILES", &text, WgTiles::from_fields)?;
        }
        if let Some(text) = var("SDPA_CUDA_BWD_TILES") {
            config.bwd = parse_overrides("SDPA_CUDA_BWD_TILES", &text, BwdTiles::from_fields)?;
        }
        if let Some(text) = var("SDPA_CUDA_WGMMA") {
            config.wgmma = match text.as_str() {
                "0" => false,
                "1" => true,
                _ => {
                    return Err(CudaError::Config {
                        var: "SDPA_CUDA_WGMMA",
                        expected: "0 or 1".into(),
                        actual: text,
                    })
                }
            };
        }
        if let Some(dir) = std::env::var_os("SDPA_KERNEL_DIR") {
            config = config.with_kernel_dir(Some(PathBuf::from(dir)))?;
        }
        if let Some(dir) = std::env::var_os("SDPA_CUDA_CACHE") {
            config.cache_dir = (!dir.is_empty()).then(|| PathBuf::from(dir));
        }
        Ok(config)
    }

    /// Every padded head dim takes `tiles` in the mma.sync kernel (before any earlier override).
    pub fn with_tc_tiles(mut self, head_dim: Option<u32>, tiles: TcTiles) -> Result<Self> {
        let fields = [
            tiles.warps,
            tiles.block_n,
            tiles.min_blocks,
            tiles.row_frags,
        ];
        TcTiles::from_fields(&fields).map_err(|expected| CudaError::Config {
            var: "tc tiles",
            expected,
            actual: format!("{tiles:?}"),
        })?;
        self.tc.insert(0, (head_dim, tiles));
        Ok(self)
    }

    /// Every padded head dim (or `head_dim`) takes `tiles` in the Hopper kernel.
    pub fn with_wg_tiles(mut self, head_dim: Option<u32>, tiles: WgTiles) -> Result<Self> {
        let fields = [
            tiles.warpgroups,
            tiles.block_n,
            tiles.min_blocks,
            tiles.m_tiles,
        ];
        WgTiles::from_fields(&fields).map_err(|expected| CudaError::Config {
            var: "wg tiles",
            expected,
            actual: format!("{tiles:?}"),
        })?;
        self.wg.insert(0, (head_dim, tiles));
        Ok(self)
    }

    /// Every padded head dim (or `head_dim`) takes `tiles` in the mma.sync backward.
    pub fn with_bwd_tiles(mut self, head_dim: Option<u32>, tiles: BwdTiles) -> Result<Self> {
        BwdTiles::from_fields(&[tiles.warps, tiles.block_m, tiles.min_blocks]).map_err(
            |expected| CudaError::Config {
                var: "bwd tiles",
                expected,
                actual: format!("{tiles:?}"),
            },
        )?;
        self.bwd.insert(0, (head_dim, tiles));
        Ok(self)
    }

    /// Whether the dispatcher may use the Hopper kernel on sm_90.
    pub fn with_wgmma(mut self, on: bool) -> Self {
        self.wgmma = on;
        self
    }

    /// Kernel sources from `dir` (a folder mirroring `kernels/`) where it has the file.
    ///
    /// # Errors
    /// `dir` is not an existing folder.
    pub fn with_kernel_dir(mut self, dir: Option<PathBuf>) -> Result<Self> {
        if let Some(d) = &dir {
            if !d.is_dir() {
                return Err(CudaError::Config {
                    var: "SDPA_KERNEL_DIR",
                    expected: "an existing folder of kernel sources".into(),
                    actual: d.display().to_string(),
                });
            }
        }
        self.kernel_dir = dir;
        Ok(self)
    }

    /// The disk cache folder (`None`: compile every kernel in each process).
    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.cache_dir = dir;
        self
    }

    /// The mma.sync kernel's tiles for a padded head dim.
    pub fn tc_tiles(&self, head_dim: u32) -> TcTiles {
        pick(&self.tc, head_dim).unwrap_or_else(|| TcTiles::default_for(head_dim))
    }

    /// The Hopper kernel's tiles for a padded head dim.
    pub fn wg_tiles(&self, head_dim: u32) -> WgTiles {
        pick(&self.wg, head_dim).unwrap_or_else(|| WgTiles::default_for(head_dim))
    }

    /// The mma.sync backward's tiles for a padded head dim.
    pub fn bwd_tiles(&self, head_dim: u32) -> BwdTiles {
        pick(&self.bwd, head_dim).unwrap_or_else(|| BwdTiles::default_for(head_dim))
    }

    /// Whether the Hopper kernel may run.
    pub fn wgmma(&self) -> bool {
        self.wgmma
    }

    /// Where kernel sources are overridden.
    pub fn kernel_dir(&self) -> Option<&std::path::Path> {
        self.kernel_dir.as_deref()
    }

    /// The disk cache folder.
    pub fn cache_dir(&self) -> Option<&std::path::Path> {
        self.cache_dir.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_overrides_parse_per_dim_entries() {
        let t = |warps, block_n, row_frags, min_blocks| TcTiles {
            warps,
            block_n,
            row_frags,
            min_blocks,
        };
        let parse = |s| parse_overrides("V", s, TcTiles::from_fields);
        assert_eq!(parse("8,64,1").unwrap(), vec![(None, t(8, 64, 1, 1))]);
        assert_eq!(
            parse("128:4,64,2,2;4,128,1").unwrap(),
            vec![(Some(128), t(4, 64, 2, 2)), (None, t(4, 128, 1, 1))]
        );
        // A bad dim, block_n not a multiple of 16, 3 fragments, a missing field, a
        // block_n so large its shared memory would wrap: each an error naming the entry.
        for bad in ["x:4,64,1", "4,60,1", "4,64,1,3", "4,64", "4,4294967280,1"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("V: expected") && e.contains(bad), "{e}");
        }
        assert_eq!(t(4, 64, 2, 2).block_rows(), 128);
    }

    #[test]
    fn wg_overrides_and_defaults() {
        let w = |warpgroups, block_n, min_blocks, m_tiles| WgTiles {
            warpgroups,
            m_tiles,
            block_n,
            min_blocks,
        };
        let parse = |s| parse_overrides("W", s, WgTiles::from_fields);
        assert_eq!(
            parse("64:2,64,2;3,128,1;32:1,64,3,2").unwrap(),
            vec![
                (Some(64), w(2, 64, 2, 1)),
                (None, w(3, 128, 1, 1)),
                (Some(32), w(1, 64, 3, 2))
            ]
        );
        for bad in ["2,96,1", "5,64,1", "2,64", "1,64,2,3"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(w(3, 64, 1, 1).block_rows(), 192);
        assert_eq!(w(1, 64, 3, 2).block_rows(), 128);
        let config = KernelConfig::default()
            .with_wg_tiles(Some(64), w(2, 64, 2, 1))
            .unwrap();
        assert_eq!(config.wg_tiles(64), w(2, 64, 2, 1));
        assert_eq!(config.wg_tiles(128), WgTiles::default_for(128));
        assert!(KernelConfig::default()
            .with_wg_tiles(None, w(9, 64, 1, 1))
            .is_err());
    }

    #[test]
    fn bwd_overrides_and_defaults() {
        let t = |warps, block_m, min_blocks| BwdTiles {
            warps,
            block_m,
            min_blocks,
        };
        let parse = |s| parse_overrides("B", s, BwdTiles::from_fields);
        assert_eq!(
            parse("128:8,32,1;4,64,2").unwrap(),
            vec![(Some(128), t(8, 32, 1)), (None, t(4, 64, 2))]
        );
        // block_m not a multiple of 16, 3 warps over 4 fragments, a missing field.
        for bad in ["4,40,1", "3,64,1", "4,64", "4,64,5", "0,64,1"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("B: expected") && e.contains(bad), "{e}");
        }
        assert_eq!(t(8, 32, 1).block_keys(), 128);
        let config = KernelConfig::default()
            .with_bwd_tiles(Some(64), t(8, 64, 1))
            .unwrap();
        assert_eq!(config.bwd_tiles(64), t(8, 64, 1));
        assert_eq!(config.bwd_tiles(128), BwdTiles::default_for(128));
    }

    #[test]
    fn kernel_dir_must_exist() {
        let missing = std::env::temp_dir().join("sdpa-no-such-kernel-dir");
        let e = KernelConfig::default()
            .with_kernel_dir(Some(missing.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SDPA_KERNEL_DIR") && e.contains(&missing.display().to_string()));
    }
}
