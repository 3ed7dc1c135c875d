//! The on-disk cubin cache, so that a second process skips NVRTC.
//!
//! The folder is created 0700 and used only when this user owns it and nobody else can
//! write it; otherwise the context runs without a disk cache and says why. An entry is
//! `MAGIC`, the SHA-256 of the cubin, then the cubin; it is checked before it is loaded,
//! and a bad entry is deleted (the caller recompiles). Entries are written to a fresh
//! temp file (created exclusively, so a planted link is never followed), synced, and
//! renamed into place, so a reader sees a whole entry or none, and many processes on a
//! cold cache each succeed.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: &[u8; 8] = b"SDPACUB1";

/// The default folder: `$XDG_CACHE_HOME/sdpa-cuda`, else `$HOME/.cache/sdpa-cuda`;
/// `None` when neither is set. (`SDPA_CUDA_CACHE` is an override that binaries read
/// through [`KernelConfig::from_env`](crate::KernelConfig::from_env).)
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(|d| PathBuf::from(d).join("sdpa-cuda"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/sdpa-cuda")))
}

/// The key of a compile: everything that can change the cubin.
pub fn cache_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A disk cache folder this user owns and alone can write.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

impl DiskCache {
    /// Creates `dir` (0700) if missing and checks it.
    ///
    /// # Errors
    /// Why the folder cannot be trusted or made: it is not a folder, another user owns
    /// it, or group/others may write it.
    pub fn open(dir: &Path) -> Result<Self, String> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("{}: cannot create it: {e}", dir.display()))?;
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("{}: not a folder", dir.display()));
        }
        if meta.uid() != current_uid() {
            return Err(format!(
                "{}: owned by uid {}, not by this user (uid {})",
                dir.display(),
                meta.uid(),
                current_uid()
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(format!(
                "{}: mode {mode:03o} lets group or others write it (expected 0700)",
                dir.display()
            ));
        }
        Ok(DiskCache {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str, key: &str) -> PathBuf {
        self.dir.join(format!("{name}-{key}.cubin"))
    }

    /// The cubin stored under (`name`, `key`), when the entry is whole and its digest
    /// matches; a bad entry is deleted.
    pub fn load(&self, name: &str, key: &str) -> Option<Vec<u8>> {
        let path = self.path(name, key);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() || meta.uid() != current_uid() {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let bytes = std::fs::read(&path).ok()?;
        let good = bytes.len() > MAGIC.len() + 32
            && bytes.starts_with(MAGIC)
            && Sha256::digest(&bytes[MAGIC.len() + 32..])[..]
                == bytes[MAGIC.len()..MAGIC.len() + 32];
        if good {
            Some(bytes[MAGIC.len() + 32..].to_vec())
        } else {
            let _ = std::fs::remove_file(&path);
            None
        }
    }

    /// Stores `cubin` under (`name`, `key`). Failure costs the next process a compile
    /// only, so it is reported, not fatal.
    pub fn store(&self, name: &str, key: &str, cubin: &[u8]) -> std::io::Result<()> {
        let path = self.path(name, key);
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{name}-{key}.{}.{}.{:x}.tmp",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(MAGIC)?;
            file.write_all(&Sha256::digest(cubin))?;
            file.write_all(cubin)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sdpa-cache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn entries_round_trip_and_bad_ones_are_deleted() {
        let dir = scratch("rt");
        let cache = DiskCache::open(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        cache.store("k", "00", b"cubin bytes").unwrap();
        assert_eq!(cache.load("k", "00").unwrap(), b"cubin bytes");
        // A flipped byte: the digest no longer matches; the entry goes.
        let path = cache.path("k", "00");
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(cache.load("k", "00").is_none());
        assert!(!path.exists());
        // A planted file without the digest is never loaded.
        std::fs::write(cache.path("k", "01"), b"planted").unwrap();
        assert!(cache.load("k", "01").is_none());
        // No temp files left behind.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_others_can_write_is_refused() {
        let dir = scratch("open");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = DiskCache::open(&dir).unwrap_err();
        assert!(e.contains("group or others"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        let file = scratch("file");
        std::fs::write(&file, b"").unwrap();
        assert!(DiskCache::open(&file).unwrap_err().contains("not a folder"));
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn concurrent_writers_leave_one_whole_entry() {
        let dir = scratch("race");
        let cache = DiskCache::open(&dir).unwrap();
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let cache = cache.clone();
                s.spawn(move || cache.store("k", "race", &[i; 4096]).unwrap());
            }
        });
        let got = cache.load("k", "race").unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|&b| b == got[0]));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_changes_with_every_part() {
        let a = cache_key(&[b"src", b"opts"]);
        assert_ne!(a, cache_key(&[b"src", b"opts2"]));
        assert_ne!(a, cache_key(&[b"srcopts"]));
        assert_eq!(a, cache_key(&[b"src", b"opts"]));
        assert_eq!(a.len(), 32);
    }
}
