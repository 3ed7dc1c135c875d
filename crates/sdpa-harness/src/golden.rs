//! Where the golden cases live, and what a golden folder's manifest lists.

use sdpa_manifest::Manifest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// `SDPA_GOLDEN_DIR` when set (a folder `ci/golden.sh --out DIR` wrote, or the working
/// tree's `golden/` on the GPU machine), else the repository's `golden/`.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("SDPA_GOLDEN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden"),
    }
}

/// The files `dir/manifest.json` lists (see [`Manifest::files`]) and its `case_count`.
///
/// # Errors
/// A missing manifest, one that is not a [`Manifest`], or one without a `case_count`,
/// named by path.
pub fn manifest_files(dir: &Path) -> Result<(BTreeSet<String>, usize), String> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let manifest = Manifest::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let count = manifest
        .case_count
        .ok_or(format!("{}: no case_count", path.display()))?;
    Ok((manifest.files().map(str::to_owned).collect(), count))
}

/// The `*.safetensors` files of `dir` (not descending) whose names start with
/// `prefix`, checked one to one against its manifest: a manifest that does not load,
/// a `case_count` that differs from the entries listed, a listed file that is missing
/// and a file that is not listed each add a line to `problems`. Returns the names
/// both list, sorted.
pub fn checked_case_files(dir: &Path, prefix: &str, problems: &mut Vec<String>) -> Vec<String> {
    let (listed, count) = match manifest_files(dir) {
        Ok(m) => m,
        Err(e) => {
            problems.push(e);
            return Vec::new();
        }
    };
    if listed.len() != count {
        problems.push(format!(
            "{}: case_count {count}, {} files listed",
            dir.display(),
            listed.len()
        ));
    }
    let on_disk: BTreeSet<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|d| d.ok().map(|d| d.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".safetensors") && n.starts_with(prefix))
            .collect(),
        Err(e) => {
            problems.push(format!("{}: {e}", dir.display()));
            return Vec::new();
        }
    };
    let listed: BTreeSet<String> = listed
        .into_iter()
        .filter(|f| f.starts_with(prefix))
        .collect();
    for f in listed.difference(&on_disk) {
        problems.push(format!(
            "{}/{f}: in manifest.json, no such file",
            dir.display()
        ));
    }
    for f in on_disk.difference(&listed) {
        problems.push(format!("{}/{f}: not in manifest.json", dir.display()));
    }
    on_disk.intersection(&listed).cloned().collect()
}

/// The KV-cache goldens of `golden_dir()/kvcache/` (tools/sdpa-golden's `kvcache`), read,
/// in file-name order, each with its file name.
///
/// # Errors
/// A folder that cannot be listed, or a file that is not a KV-cache case, named by path.
pub fn kvcache_cases() -> Result<Vec<(String, crate::kvcase::KvCase)>, String> {
    let dir = golden_dir().join("kvcache");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let case = crate::kvcase::KvCase::read(&p).map_err(|e| e.to_string())?;
            Ok((
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                case,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_files_lists_every_case_file() {
        let dir = std::env::temp_dir().join(format!("sdpa-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let module_case = |name: &str| {
            format!(
                r#"{{"b": 1, "bytes": 8, "causal_applied": false, "dropout": 0.0, "dtype": "f32",
                   "e": 8, "file": "{name}.safetensors", "heads": 2, "is_causal": false,
                   "mode": "eval", "name": "{name}", "t": 3}}"#
            )
        };
        std::fs::write(
            dir.join("manifest.json"),
            format!(
                r#"{{"case_count": 2, "cases": [{}, {}], "libtorch": "2.11.0", "produced_by": "test"}}"#,
                module_case("b"),
                module_case("a")
            ),
        )
        .unwrap();
        let (files, count) = manifest_files(&dir).unwrap();
        assert_eq!(count, 2);
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            ["a.safetensors", "b.safetensors"]
        );
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"cases": [], "libtorch": "2.11.0", "produced_by": "test"}"#,
        )
        .unwrap();
        assert!(manifest_files(&dir).unwrap_err().ends_with("no case_count"));
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"case_count": 0, "cases": []}"#,
        )
        .unwrap();
        assert!(manifest_files(&dir)
            .unwrap_err()
            .contains("missing field `libtorch`"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The committed folders that `checked_case_files` reads all parse as a manifest.
    #[test]
    fn committed_manifests_list_their_files() {
        for sub in ["module", "nested", "nested/cuda"] {
            let dir = golden_dir().join(sub);
            if !dir.join("manifest.json").exists() {
                continue;
            }
            let mut problems = Vec::new();
            let files = checked_case_files(&dir, "", &mut problems);
            assert!(problems.is_empty(), "{problems:#?}");
            assert!(!files.is_empty(), "{}", dir.display());
        }
    }
}
