//! Where the golden cases live, and what a golden folder's manifest lists.

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

fn collect_files(value: &serde_json::Value, files: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("file", serde_json::Value::String(name)) => {
                        files.insert(name.clone());
                    }
                    _ => collect_files(v, files),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_files(v, files)),
        _ => {}
    }
}

/// Every `"file"` entry of `dir/manifest.json` (at any depth) and its top-level
/// `case_count`.
///
/// # Errors
/// A missing or unparsable manifest, or one without a `case_count`, named by path.
pub fn manifest_files(dir: &Path) -> Result<(BTreeSet<String>, usize), String> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let count = json
        .get("case_count")
        .and_then(serde_json::Value::as_u64)
        .ok_or(format!("{}: no case_count", path.display()))?;
    let mut files = BTreeSet::new();
    collect_files(&json, &mut files);
    Ok((files, count as usize))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_files_finds_every_entry() {
        let dir = std::env::temp_dir().join(format!("sdpa-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("manifest.json"),
            r#"{"case_count": 2, "cases": [{"file": "a.safetensors", "x": {"file": "b.safetensors"}}]}"#,
        )
        .unwrap();
        let (files, count) = manifest_files(&dir).unwrap();
        assert_eq!(count, 2);
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            ["a.safetensors", "b.safetensors"]
        );
        std::fs::write(dir.join("manifest.json"), r#"{"cases": []}"#).unwrap();
        assert!(manifest_files(&dir).unwrap_err().ends_with("no case_count"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
