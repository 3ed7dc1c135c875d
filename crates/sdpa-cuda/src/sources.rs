//! The kernel sources, embedded (`include_str!`) so that a binary needs no `kernels/`
//! folder, and their include expansion: NVRTC sees one self-contained translation unit
//! and needs no include path and no CUDA headers.

use crate::error::{CudaError, Result};
use std::path::Path;

/// Embedded kernel sources, by path relative to `kernels/`.
pub const SOURCES: [(&str, &str); 25] = [
    ("common/bwd.cuh", include_str!("../kernels/common/bwd.cuh")),
    (
        "common/dtype.cuh",
        include_str!("../kernels/common/dtype.cuh"),
    ),
    (
        "common/epilogue.cuh",
        include_str!("../kernels/common/epilogue.cuh"),
    ),
    (
        "common/load.cuh",
        include_str!("../kernels/common/load.cuh"),
    ),
    (
        "common/mask.cuh",
        include_str!("../kernels/common/mask.cuh"),
    ),
    ("common/mma.cuh", include_str!("../kernels/common/mma.cuh")),
    (
        "common/params.cuh",
        include_str!("../kernels/common/params.cuh"),
    ),
    (
        "common/philox.cuh",
        include_str!("../kernels/common/philox.cuh"),
    ),
    (
        "common/seqlen.cuh",
        include_str!("../kernels/common/seqlen.cuh"),
    ),
    (
        "common/softmax.cuh",
        include_str!("../kernels/common/softmax.cuh"),
    ),
    (
        "common/wgmma.cuh",
        include_str!("../kernels/common/wgmma.cuh"),
    ),
    (
        "common/wgmma_tile.cuh",
        include_str!("../kernels/common/wgmma_tile.cuh"),
    ),
    (
        "fwd/attn_fwd_tc.cu",
        include_str!("../kernels/fwd/attn_fwd_tc.cu"),
    ),
    (
        "fwd/attn_fwd_simt.cu",
        include_str!("../kernels/fwd/attn_fwd_simt.cu"),
    ),
    (
        "fwd/attn_fwd_wgmma.cu",
        include_str!("../kernels/fwd/attn_fwd_wgmma.cu"),
    ),
    ("math/math.cu", include_str!("../kernels/math/math.cu")),
    ("nn/nn.cu", include_str!("../kernels/nn/nn.cu")),
    (
        "bwd/math_bwd.cu",
        include_str!("../kernels/bwd/math_bwd.cu"),
    ),
    (
        "bwd/attn_bwd_simt.cu",
        include_str!("../kernels/bwd/attn_bwd_simt.cu"),
    ),
    (
        "bwd/attn_bwd_tc.cu",
        include_str!("../kernels/bwd/attn_bwd_tc.cu"),
    ),
    (
        "bwd/attn_bwd_wgmma.cu",
        include_str!("../kernels/bwd/attn_bwd_wgmma.cu"),
    ),
    (
        "decode/params.cuh",
        include_str!("../kernels/decode/params.cuh"),
    ),
    (
        "decode/keys.cuh",
        include_str!("../kernels/decode/keys.cuh"),
    ),
    (
        "decode/attn_decode.cu",
        include_str!("../kernels/decode/attn_decode.cu"),
    ),
    (
        "decode/attn_decode_tc.cu",
        include_str!("../kernels/decode/attn_decode_tc.cu"),
    ),
];

fn embedded(name: &str) -> Option<&'static str> {
    SOURCES.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// `name`'s source with every `#include "x"` replaced by that file (once each) and
/// `#pragma once` dropped. A file of `dir` (a folder mirroring `kernels/`, see
/// [`KernelConfig::with_kernel_dir`](crate::KernelConfig::with_kernel_dir)) replaces the
/// embedded one of the same path; files it lacks stay embedded. The disk cache is keyed
/// by the expanded text, so patched kernels never meet stale binaries.
///
/// # Errors
/// [`CudaError::UnknownInclude`] for a name (or an include) that is not embedded;
/// [`CudaError::Config`] for an override file that exists but cannot be read.
pub fn expanded_source(name: &str, dir: Option<&Path>) -> Result<String> {
    fn expand(
        name: &str,
        from: &str,
        dir: Option<&Path>,
        seen: &mut Vec<String>,
        out: &mut String,
    ) -> Result<()> {
        let embedded = embedded(name).ok_or_else(|| CudaError::UnknownInclude {
            file: from.to_string(),
            include: name.to_string(),
        })?;
        let text = match dir.map(|d| d.join(name)).filter(|p| p.exists()) {
            Some(path) => std::fs::read_to_string(&path).map_err(|e| CudaError::Config {
                var: "SDPA_KERNEL_DIR",
                expected: "readable kernel sources".into(),
                actual: format!("{}: {e}", path.display()),
            })?,
            None => embedded.to_string(),
        };
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed == "#pragma once" {
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix("#include \"") {
                let include = rest.trim_end_matches('"');
                if !seen.iter().any(|s| s == include) {
                    seen.push(include.to_string());
                    expand(include, name, dir, seen, out)?;
                }
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(())
    }
    let mut out = String::new();
    expand(name, name, dir, &mut vec![name.to_string()], &mut out)?;
    Ok(out)
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
            "bwd/math_bwd.cu",
            "bwd/attn_bwd_simt.cu",
            "bwd/attn_bwd_wgmma.cu",
        ] {
            let src = expanded_source(name, None).unwrap();
            assert!(!src.contains("#include"), "{name}");
            assert!(!src.contains("#pragma once"), "{name}");
            assert_eq!(src.matches("struct FwdParams {").count(), 1, "{name}");
            // The Hopper forward has no dropout, so no Philox (its backward has).
            let philox = usize::from(name != "fwd/attn_fwd_wgmma.cu");
            assert_eq!(src.matches("philox4x32_10(uint4").count(), philox, "{name}");
        }
    }

    #[test]
    fn override_replaces_named_files_only_and_unknown_includes_are_errors() {
        let dir = std::env::temp_dir().join(format!("sdpa-kernel-dir-{}", std::process::id()));
        for sub in ["math", "fwd", "common"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(dir.join("math/math.cu"), "// planted\n").unwrap();
        std::fs::write(dir.join("common/mask.cuh"), "// planted mask\n").unwrap();
        std::fs::write(
            dir.join("fwd/attn_fwd_simt.cu"),
            "#include \"nowhere.cuh\"\n",
        )
        .unwrap();
        let math = expanded_source("math/math.cu", Some(&dir));
        let tc = expanded_source("fwd/attn_fwd_tc.cu", Some(&dir));
        let simt = expanded_source("fwd/attn_fwd_simt.cu", Some(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(math.unwrap(), "// planted\n");
        let tc = tc.unwrap();
        assert!(tc.contains("SDPA_KERNEL") && tc.contains("// planted mask"));
        let e = simt.unwrap_err().to_string();
        assert!(
            e.contains("nowhere.cuh") && e.contains("attn_fwd_simt.cu"),
            "{e}"
        );
        assert!(expanded_source("missing.cu", None).is_err());
    }
}
