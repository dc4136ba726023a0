//! The node file: what the agent knows about this node that the plugin needs (pod CIDRs, MTU,
//! cluster and service CIDRs), in `KEY=value` lines like flannel's subnet.env. The agent writes
//! it atomically; the plugin reads it when its config leaves pod_cidr or mtu out.
//!
//! ```text
//! HEADCNI_NODE_NAME=node-1
//! HEADCNI_POD_CIDRS=10.244.1.0/24,fd00:10:244:1::/64
//! HEADCNI_CLUSTER_CIDRS=10.244.0.0/16
//! HEADCNI_SERVICE_CIDRS=10.96.0.0/12
//! HEADCNI_MTU=1280
//! ```

use crate::fsutil::{self, Durability};
use ipnetwork::IpNetwork;
use std::io;
use std::path::{Path, PathBuf};

/// Default directory for the node file and the event spool.
pub const DEFAULT_RUN_DIR: &str = "/run/headcni";
/// File name of the node file inside the run directory.
pub const FILE_NAME: &str = "subnet.env";

/// Smallest and largest pod MTU HeadCNI accepts (the kernel allows 68..65535, but a pod MTU
/// outside this range is a mistake).
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9000;

pub fn path_in(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE_NAME)
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFile {
    pub node_name: Option<String>,
    pub pod_cidrs: Vec<IpNetwork>,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    pub mtu: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeFileError {
    #[error("reading node file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("node file {path}, line {line}: {msg}")]
    Invalid { path: String, line: usize, msg: String },
    #[error("node file {path}: {msg}")]
    Inconsistent { path: String, msg: String },
    #[error("writing node file {path}: {source}")]
    Write { path: String, source: io::Error },
}

fn parse_cidrs(value: &str) -> Result<Vec<IpNetwork>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let net: IpNetwork = s.parse().map_err(|_| format!("\"{s}\" is not a CIDR"))?;
            crate::cidr::check(&net)?;
            Ok(net)
        })
        .collect()
}

impl NodeFile {
    /// Parses the file's text. Unknown keys and comments are ignored so that newer agents can add keys.
    pub fn parse(text: &str, path: &Path) -> Result<Self, NodeFileError> {
        let mut nf = NodeFile::default();
        for (i, raw) in text.lines().enumerate() {
            let invalid = |msg: String| NodeFileError::Invalid { path: path.display().to_string(), line: i + 1, msg };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| invalid("expected KEY=value".into()))?;
            let value = value.trim();
            match key.trim() {
                "HEADCNI_NODE_NAME" => nf.node_name = Some(value.to_string()).filter(|v| !v.is_empty()),
                "HEADCNI_POD_CIDRS" => nf.pod_cidrs = parse_cidrs(value).map_err(invalid)?,
                "HEADCNI_CLUSTER_CIDRS" => nf.cluster_cidrs = parse_cidrs(value).map_err(invalid)?,
                "HEADCNI_SERVICE_CIDRS" => nf.service_cidrs = parse_cidrs(value).map_err(invalid)?,
                "HEADCNI_MTU" => {
                    let mtu: u32 =
                        value.parse().map_err(|_| invalid(format!("HEADCNI_MTU \"{value}\" is not a number")))?;
                    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
                        return Err(invalid(format!("HEADCNI_MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")));
                    }
                    nf.mtu = Some(mtu);
                }
                _ => {}
            }
        }
        crate::cidr::check_inside_cluster(&nf.pod_cidrs, &nf.cluster_cidrs)
            .map_err(|msg| NodeFileError::Inconsistent { path: path.display().to_string(), msg })?;
        Ok(nf)
    }

    /// Reads the node file; `Ok(None)` when it does not exist (the agent has not written it yet).
    pub fn load(path: &Path) -> Result<Option<Self>, NodeFileError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NodeFileError::Read { path: path.display().to_string(), source }),
        }
    }

    pub fn render(&self) -> String {
        let join = |v: &[IpNetwork]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        let mut out = String::from("# Written by headcni agent; read by the headcni CNI plugin.\n");
        if let Some(name) = &self.node_name {
            out.push_str(&format!("HEADCNI_NODE_NAME={name}\n"));
        }
        out.push_str(&format!("HEADCNI_POD_CIDRS={}\n", join(&self.pod_cidrs)));
        out.push_str(&format!("HEADCNI_CLUSTER_CIDRS={}\n", join(&self.cluster_cidrs)));
        out.push_str(&format!("HEADCNI_SERVICE_CIDRS={}\n", join(&self.service_cidrs)));
        if let Some(mtu) = self.mtu {
            out.push_str(&format!("HEADCNI_MTU={mtu}\n"));
        }
        out
    }

    /// Writes the file atomically (readers see the old or the new content, never a mix).
    pub fn store(&self, path: &Path) -> Result<(), NodeFileError> {
        let werr = |source| NodeFileError::Write { path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            fsutil::ensure_dir(dir, 0o755).map_err(werr)?;
        }
        fsutil::write_atomic(path, self.render().as_bytes(), 0o644, Durability::ProcessCrash).map_err(werr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let nf = NodeFile {
            node_name: Some("node-1".into()),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap(), "fd00:10:244:1::/64".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            service_cidrs: vec!["10.96.0.0/12".parse().unwrap()],
            mtu: Some(1280),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = path_in(dir.path());
        nf.store(&path).unwrap();
        assert_eq!(NodeFile::load(&path).unwrap(), Some(nf));
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeFile::load(&dir.path().join("absent")).unwrap(), None);
    }

    #[test]
    fn rejects_bad_values_with_the_line() {
        let p = Path::new("/run/headcni/subnet.env");
        for (text, needle) in [
            ("HEADCNI_POD_CIDRS=10.244.1.0/33", "not a CIDR"),
            ("HEADCNI_POD_CIDRS=10.244.1.5/24", "host bits"),
            ("# c\nHEADCNI_MTU=abc", "line 2"),
            ("HEADCNI_MTU=100", "outside 576..9000"),
            ("garbage", "KEY=value"),
            ("HEADCNI_POD_CIDRS=128.0.0.0/1", "covers too much"),
            ("HEADCNI_POD_CIDRS=10.9.1.0/24\nHEADCNI_CLUSTER_CIDRS=10.244.0.0/16", "not inside the cluster CIDR"),
        ] {
            let err = NodeFile::parse(text, p).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should contain {needle}");
            assert!(err.contains("/run/headcni/subnet.env"));
        }
        assert!(NodeFile::parse("FUTURE_KEY=1\nHEADCNI_MTU=1280", p).is_ok());
    }
}
