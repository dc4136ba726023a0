//! Secrets (the pre-auth key, the Headscale API key): never printed, never logged. They come from
//! files (re-read at each use, so a rotated Secret takes effect) or, for the auth key, from an
//! environment variable populated from a Kubernetes Secret; never from a command-line value.

use std::path::{Path, PathBuf};

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading {what} from {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} in {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} in {path} is not a single line of printable text")]
    Malformed { what: &'static str, path: PathBuf },
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    /// Read once at start from the environment.
    Value(Secret),
}

impl SecretSource {
    pub fn load(&self, what: &'static str) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Value(s) => Ok(s.clone()),
            SecretSource::File(path) => read_file(path, what),
        }
    }
}

/// Reads a secret file: surrounding whitespace is dropped; the rest must be one printable line.
pub fn read_file(path: &Path, what: &'static str) -> Result<Secret, SecretError> {
    let raw = std::fs::read_to_string(path).map_err(|source| SecretError::Read { what, path: path.into(), source })?;
    let value = raw.trim();
    if value.is_empty() {
        return Err(SecretError::Empty { what, path: path.into() });
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(SecretError::Malformed { what, path: path.into() });
    }
    Ok(Secret(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hskey-api-abc".into());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{:?}", SecretSource::Value(s)), "Value(Secret(<redacted>))");
    }

    #[test]
    fn files_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "  hskey-auth-1-2\n").unwrap();
        assert_eq!(read_file(&p, "auth key").unwrap().expose(), "hskey-auth-1-2");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(read_file(&p, "auth key"), Err(SecretError::Empty { .. })));
        std::fs::write(&p, "a b").unwrap();
        let err = read_file(&p, "auth key").unwrap_err().to_string();
        assert!(!err.contains("a b"), "the value never appears in errors: {err}");
        assert!(read_file(&dir.path().join("absent"), "api key").is_err());
    }
}
