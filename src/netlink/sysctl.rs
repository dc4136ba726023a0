//! Network sysctls under `<root>/net`, as seen by the calling thread's namespace or, through
//! [`SysctlRoot::read_in`] and [`SysctlRoot::ensure_in`], by another one.
//!
//! The root is normally `/proc/sys` ([`read`], [`ensure`]: what the CNI plugin uses). In a
//! container `/proc/sys` is read-only, so the agent is given the host's `/proc/sys/net` bind
//! mounted elsewhere (the chart mounts it at `/host/proc/sys/net`) and uses a [`SysctlRoot`]
//! for that directory. procfs resolves the `net` tree for the namespace of the thread that
//! opens the file, so a bind mount of it behaves like `/proc/sys/net` itself.

use super::Netns;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The kernel's sysctl tree.
pub const PROC_SYS: &str = "/proc/sys";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("sysctl directory {0:?} must be an absolute path without '.' or '..' components")]
    InvalidRoot(PathBuf),
}

/// A directory that stands for `/proc/sys` (only its `net` subtree is ever used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlRoot(PathBuf);

impl Default for SysctlRoot {
    fn default() -> Self {
        Self(PathBuf::from(PROC_SYS))
    }
}

impl std::fmt::Display for SysctlRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.display().fmt(f)
    }
}

impl SysctlRoot {
    /// A root directory: absolute, normal components only (a trailing '/' is fine). Whether
    /// it exists is found out at first use, where the error names the path.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, SysctlError> {
        let dir: PathBuf = dir.into();
        let text = dir.as_os_str().to_string_lossy();
        let normal = dir.is_absolute() && !text.split('/').any(|part| part == "." || part == "..");
        if !normal {
            return Err(SysctlError::InvalidRoot(dir));
        }
        Ok(Self(dir.components().collect()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The file of a key such as `ipv4/ip_forward`.
    pub fn key_path(&self, key: &str) -> io::Result<PathBuf> {
        // Keys embed interface names; refuse anything that could leave <root>/net.
        if key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad sysctl key {key}")));
        }
        Ok(self.0.join("net").join(key))
    }

    /// Reads a net sysctl such as `ipv4/ip_forward`.
    pub fn read(&self, key: &str) -> io::Result<String> {
        let path = self.key_path(key)?;
        let text = fs::read_to_string(&path).map_err(|e| with_path(e, &path))?;
        Ok(text.trim().to_string())
    }

    /// Sets a net sysctl unless it already has `value`; answers whether it changed.
    pub fn ensure(&self, key: &str, value: &str) -> io::Result<bool> {
        if self.read(key)? == value {
            return Ok(false);
        }
        let path = self.key_path(key)?;
        fs::write(&path, value).map_err(|e| with_path(e, &path))?;
        Ok(true)
    }

    /// [`Self::read`] as seen from `netns` (`None`: the calling thread's namespace).
    pub fn read_in(&self, netns: Option<&Netns>, key: &str) -> io::Result<String> {
        match netns {
            None => self.read(key),
            Some(ns) => ns.run(|| self.read(key))?,
        }
    }

    /// [`Self::ensure`] in `netns` (`None`: the calling thread's namespace).
    pub fn ensure_in(&self, netns: Option<&Netns>, key: &str, value: &str) -> io::Result<bool> {
        match netns {
            None => self.ensure(key, value),
            Some(ns) => ns.run(|| self.ensure(key, value))?,
        }
    }
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Reads a sysctl such as `ipv4/ip_forward` under `/proc/sys/net`.
pub fn read(key: &str) -> io::Result<String> {
    SysctlRoot::default().read(key)
}

/// Sets a sysctl under `/proc/sys/net` unless it already has `value`; answers whether it changed.
pub fn ensure(key: &str, value: &str) -> io::Result<bool> {
    SysctlRoot::default().ensure(key, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_keys_that_escape() {
        let root = SysctlRoot::default();
        assert!(root.key_path("ipv4/../../kernel/x").is_err());
        assert!(root.key_path("ipv4//ip_forward").is_err());
        assert_eq!(root.key_path("ipv4/ip_forward").unwrap(), PathBuf::from("/proc/sys/net/ipv4/ip_forward"));
    }

    #[test]
    fn roots_are_validated() {
        for bad in ["host/proc/sys", "", "/host/../proc/sys", "/host/./proc", "./x"] {
            assert!(SysctlRoot::new(bad).is_err(), "{bad}");
        }
        let root = SysctlRoot::new("/host/proc/sys/").unwrap();
        assert_eq!(root.path(), Path::new("/host/proc/sys"));
        assert_eq!(root.to_string(), "/host/proc/sys");
        assert_eq!(root.key_path("ipv4/ip_forward").unwrap(), PathBuf::from("/host/proc/sys/net/ipv4/ip_forward"));
    }

    #[test]
    fn a_directory_stands_in_for_proc_sys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net/ipv4")).unwrap();
        std::fs::write(dir.path().join("net/ipv4/ip_forward"), "0\n").unwrap();
        let root = SysctlRoot::new(dir.path()).unwrap();
        assert_eq!(root.read("ipv4/ip_forward").unwrap(), "0");
        assert!(root.ensure("ipv4/ip_forward", "1").unwrap());
        assert_eq!(std::fs::read_to_string(dir.path().join("net/ipv4/ip_forward")).unwrap(), "1");
        assert!(!root.ensure("ipv4/ip_forward", "1").unwrap(), "already set: not written again");
        let err = root.read("ipv6/conf/all/forwarding").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/net/ipv6/conf/all/forwarding"), "the error names the file: {err}");
    }

    #[test]
    fn reads_a_real_sysctl() {
        let v = read("ipv4/ip_forward").unwrap();
        assert!(v == "0" || v == "1");
    }
}
