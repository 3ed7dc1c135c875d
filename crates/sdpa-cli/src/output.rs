//! The one way the command writes a file (`eval --out`, `profile --trace`).
//!
//! A reader of the target sees either the old file whole or the new file whole, and an
//! error leaves nothing behind:
//! - the target must be a new name or an existing regular file; a directory, device,
//!   FIFO, socket or symlink is refused (a symlink is not followed, so a planted link
//!   never redirects the write), as is a name ending in `/` or without a file name;
//! - the target must not be one of the inputs, compared by `(dev, ino)`, so a hard link
//!   or another spelling of the case file is caught;
//! - bytes go to a temp file beside the target with an unpredictable name, created
//!   exclusively (`O_CREAT | O_EXCL`, which never follows a symlink) with mode 0600,
//!   written, fsynced, given its final mode, renamed over the target, and the folder
//!   fsynced so the rename survives a crash;
//! - the final mode is the replaced file's, or `0666 & !umask` for a new file;
//! - on any error before the rename the temp file is removed.

use crate::error::CliError;
use std::ffi::OsString;
use std::fs::{File, OpenOptions, Permissions};
use std::hash::{BuildHasher, Hasher};
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// How many fresh temp names to try before giving up: a collision of 64 random bits
/// means someone is guessing, not chance.
const TEMP_ATTEMPTS: usize = 8;

fn refused(path: &Path, expected: &str, actual: impl Into<String>) -> CliError {
    CliError::Refused {
        path: path.display().to_string(),
        expected: expected.to_string(),
        actual: actual.into(),
    }
}

fn io_error(path: &Path, source: std::io::Error) -> CliError {
    CliError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn kind_name(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symlink"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// What a checked target is: where its temp files go and the mode it will end with.
#[derive(Debug)]
struct Target {
    folder: PathBuf,
    file_name: OsString,
    mode: u32,
}

/// Refuses a target the writer must not replace (see the module docs). Cheap, so the
/// commands call it before any work as well as [`write`] calling it before writing.
///
/// # Errors
/// [`CliError::Refused`] naming the target, or [`CliError::Io`] when it cannot be
/// inspected.
pub fn check_target(target: &Path, inputs: &[&Path]) -> Result<(), CliError> {
    resolve(target, inputs).map(|_| ())
}

fn resolve(target: &Path, inputs: &[&Path]) -> Result<Target, CliError> {
    const FILE: &str = "a file name (a new file or a regular file to replace)";
    // `Path` drops a trailing slash when it splits components, so look at the bytes.
    if target.as_os_str().as_bytes().ends_with(b"/") {
        return Err(refused(target, FILE, "a name ending in /"));
    }
    let file_name = match target.file_name() {
        Some(name) => name.to_os_string(),
        None => return Err(refused(target, FILE, "a path without a file name")),
    };
    let folder = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mode = match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.file_type().is_file() => {
            for input in inputs {
                // An input that cannot be read was reported by its reader already.
                if let Ok(im) = std::fs::metadata(input) {
                    if (im.dev(), im.ino()) == (meta.dev(), meta.ino()) {
                        return Err(refused(
                            target,
                            "a file other than the input",
                            format!("the input {} (the same file)", input.display()),
                        ));
                    }
                }
            }
            meta.mode() & 0o777
        }
        Ok(meta) => return Err(refused(target, FILE, kind_name(meta.file_type()))),
        Err(e) if e.kind() == ErrorKind::NotFound => 0o666 & !umask(),
        Err(e) => return Err(io_error(target, e)),
    };
    Ok(Target {
        folder,
        file_name,
        mode,
    })
}

/// The process umask, read from `/proc/self/status` (std has no call for it and
/// `umask(2)` cannot read without writing). Where it cannot be read, assume the
/// strictest common one so a new file is never more open than the user asked.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o077)
}

/// A name nobody can guess ahead: 64 bits from std's randomly keyed SipHash (seeded
/// from the OS per process), mixed with the pid and the clock.
fn temp_name(file_name: &std::ffi::OsStr) -> OsString {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(t.as_nanos());
    }
    let mut name = OsString::from(".");
    name.push(file_name);
    name.push(format!(".{:016x}.tmp", hasher.finish()));
    name
}

/// A temp file that is removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(target: &Target, display: &Path) -> Result<TempFile, CliError> {
        let mut last = None;
        for _ in 0..TEMP_ATTEMPTS {
            let path = target.folder.join(temp_name(&target.file_name));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file: Some(file),
                    })
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(io_error(display, e)),
            }
        }
        Err(io_error(
            display,
            last.unwrap_or_else(|| ErrorKind::AlreadyExists.into()),
        ))
    }

    fn persist(mut self, target: &Path) -> std::io::Result<()> {
        // Close before the rename so no descriptor outlives the name it was opened as.
        drop(self.file.take());
        std::fs::rename(&self.path, target)?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            // Nothing more can be done about a temp file that cannot be removed; the
            // error that got us here is the one to report.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `target` by the rules of the module docs, refusing a target that
/// is one of `inputs`.
///
/// # Errors
/// [`CliError::Refused`] for a target it will not replace, [`CliError::Io`] naming the
/// target for any failed step; either way the target is as it was and no temp file
/// remains.
pub fn write(target: &Path, bytes: &[u8], inputs: &[&Path]) -> Result<(), CliError> {
    let resolved = resolve(target, inputs)?;
    let mut temp = TempFile::create(&resolved, target)?;
    let file = temp.file.as_mut().expect("a fresh temp file is open");
    file.write_all(bytes)
        .and_then(|()| file.set_permissions(Permissions::from_mode(resolved.mode)))
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error(target, e))?;
    // Re-check just before the rename: a folder or device put at the name meanwhile
    // must not be replaced (rename(2) would replace an empty folder's name only with
    // another folder, but a device node or FIFO it would replace silently).
    check_target(target, inputs)?;
    temp.persist(target).map_err(|e| io_error(target, e))?;
    File::open(&resolved.folder)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| io_error(&resolved.folder, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_are_distinct_hidden_and_beside_the_target() {
        let names: std::collections::HashSet<OsString> = (0..1000)
            .map(|_| temp_name(std::ffi::OsStr::new("r.safetensors")))
            .collect();
        assert_eq!(names.len(), 1000);
        for n in &names {
            let s = n.to_str().unwrap();
            assert!(
                s.starts_with(".r.safetensors.") && s.ends_with(".tmp"),
                "{s}"
            );
        }
    }
}
