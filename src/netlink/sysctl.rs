//! Network sysctls under /proc/sys/net, as seen by the calling thread's namespace (run inside
//! [`super::Netns::run`] to reach another namespace).

use std::fs;
use std::io;
use std::path::PathBuf;

fn path(key: &str) -> io::Result<PathBuf> {
    // Keys embed interface names; refuse anything that could leave /proc/sys/net.
    if key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad sysctl key {key}")));
    }
    Ok(PathBuf::from("/proc/sys/net").join(key))
}

/// Reads a sysctl such as `ipv4/ip_forward`.
pub fn read(key: &str) -> io::Result<String> {
    Ok(fs::read_to_string(path(key)?)?.trim().to_string())
}

/// Sets a sysctl unless it already has `value`; answers whether it changed.
pub fn ensure(key: &str, value: &str) -> io::Result<bool> {
    if read(key)? == value {
        return Ok(false);
    }
    fs::write(path(key)?, value)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_keys_that_escape() {
        assert!(path("ipv4/../../kernel/x").is_err());
        assert!(path("ipv4//ip_forward").is_err());
        assert_eq!(path("ipv4/ip_forward").unwrap(), PathBuf::from("/proc/sys/net/ipv4/ip_forward"));
    }

    #[test]
    fn reads_a_real_sysctl() {
        let v = read("ipv4/ip_forward").unwrap();
        assert!(v == "0" || v == "1");
    }
}
