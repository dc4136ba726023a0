//! File-system primitives shared by the IPAM store, the installer and the agent: atomic
//! replacement of a file, advisory locks, and the kernel's boot id.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Whether [`write_atomic`] also forces the data to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives the writer being killed (the page cache keeps it), not a power loss.
    ProcessCrash,
    /// Survives a power loss: fsync of the file and of its directory.
    PowerLoss,
}

/// Replaces `path` with `data` atomically: a reader sees the old content or the new, never a
/// mix, and a writer killed at any instant leaves the old file in place (plus at most a
/// temporary file named `.<name>.tmp.<pid>`, see [`is_temp_file`]).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, durability: Durability) -> io::Result<()> {
    let tmp = temp_path(path)?;
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        if durability == Durability::PowerLoss {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if durability == Durability::PowerLoss
            && let Some(dir) = path.parent()
        {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp_name = format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id());
    Ok(path.with_file_name(tmp_name))
}

/// True for the temporary files [`write_atomic`] leaves behind when its process dies.
pub fn is_temp_file(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp.")
}

/// Creates `dir` and its parents with `mode` if missing.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// An advisory lock (flock) on a dedicated, never-renamed lock file, released on drop or when
/// the process dies.
#[derive(Debug)]
pub struct LockFile {
    file: File,
}

impl LockFile {
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)
    }

    /// Blocks until the exclusive lock is held.
    pub fn exclusive(path: &Path) -> io::Result<Self> {
        let file = Self::open(path)?;
        file.lock()?;
        Ok(Self { file })
    }

    /// Blocks until a shared lock is held.
    pub fn shared(path: &Path) -> io::Result<Self> {
        let file = Self::open(path)?;
        file.lock_shared()?;
        Ok(Self { file })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// The kernel's id of the current boot; changes at every reboot.
pub fn boot_id() -> io::Result<String> {
    let raw = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    Ok(raw.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomic(&path, b"one", 0o600, Durability::ProcessCrash).unwrap();
        write_atomic(&path, b"two", 0o600, Durability::PowerLoss).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state")]);
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        write_atomic(&path, b"old", 0o600, Durability::ProcessCrash).unwrap();
        // A stale temp file of this very pid makes create_new fail: the old state must survive.
        let tmp = temp_path(&path).unwrap();
        fs::write(&tmp, b"junk").unwrap();
        assert!(write_atomic(&path, b"new", 0o600, Durability::ProcessCrash).is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(is_temp_file(&tmp.file_name().unwrap().to_string_lossy()));
    }

    #[test]
    fn exclusive_lock_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = LockFile::exclusive(&path).unwrap();
        let other = File::open(&path).unwrap();
        assert!(other.try_lock().is_err());
        drop(held);
        assert!(other.try_lock().is_ok());
    }

    #[test]
    fn boot_id_is_readable() {
        let id = boot_id().unwrap();
        assert_eq!(id.len(), 36, "{id}");
    }
}
