//! What HeadCNI itself changed outside the node, kept across agent restarts and reboots so
//! that only HeadCNI's own changes are ever undone: the routes it added to tailscaled's
//! AdvertiseRoutes, and the routes it approved in Headscale (with the node id they belong to).
//!
//! Written ahead of the change it records (a crash in between leaves a record of a change
//! that did not happen, which is harmless; the reverse would leave a route nobody withdraws).

use crate::fsutil::{self, Durability};
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "agent-state.json";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/headcni";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentState {
    pub version: u32,
    /// Routes HeadCNI added to AdvertiseRoutes (and may therefore withdraw).
    pub advertised_routes: BTreeSet<IpNetwork>,
    /// Routes HeadCNI approved in Headscale, for node `approved_node_id`.
    pub approved_routes: BTreeSet<IpNetwork>,
    pub approved_node_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading agent state {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "agent state {path} is corrupt ({source}); move it away to start afresh (HeadCNI then withdraws nothing it added before)"
    )]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("writing agent state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

impl AgentState {
    /// Loads the state; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { path: path.into(), source })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Read { path: path.into(), source }),
        }
    }

    /// Writes the state atomically and durably (0600).
    pub fn store(&self, path: &Path) -> Result<(), StateError> {
        let werr = |source| StateError::Write { path: path.into(), source };
        if let Some(dir) = path.parent() {
            fsutil::ensure_dir(dir, 0o755).map_err(werr)?;
        }
        let mut me = self.clone();
        me.version = 1;
        let text = serde_json::to_vec_pretty(&me).map_err(|e| werr(io::Error::other(e)))?;
        fsutil::write_atomic(path, &text, 0o600, Durability::PowerLoss).map_err(werr)
    }

    pub fn remove(path: &Path) -> Result<(), StateError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path: path.into(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_in(&dir.path().join("sub"));
        assert_eq!(AgentState::load(&p).unwrap(), AgentState::default());
        let mut s = AgentState::default();
        s.advertised_routes.insert("10.244.1.0/24".parse().unwrap());
        s.approved_node_id = Some("3".into());
        s.store(&p).unwrap();
        let back = AgentState::load(&p).unwrap();
        assert_eq!(back.advertised_routes, s.advertised_routes);
        assert_eq!(back.version, 1);
        std::fs::write(&p, "{garbage").unwrap();
        assert!(matches!(AgentState::load(&p), Err(StateError::Corrupt { .. })));
        AgentState::remove(&p).unwrap();
        AgentState::remove(&p).unwrap();
    }
}
