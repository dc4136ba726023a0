//! The CNI configuration directory as a container runtime reads it: which file it uses (the
//! first network configuration in lexical order), whether that one is HeadCNI's and which pod
//! MTU it sets, and other networks' files set aside and back (`--exclusive` of `headcni install`
//! and of the agent).
//! Shared by `headcni install`, `headcni status` and the agent, which all judge the same thing.

use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};

/// The extensions libcni (containerd, CRI-O, podman) loads network configurations from.
pub const EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

/// The `type` of HeadCNI's plugin in a configuration (the plugin's name, `plugin::PLUGIN_NAME`).
pub const HEADCNI_TYPE: &str = "headcni";

/// What `headcni install --exclusive` appends to another network's file to take it out of the
/// runtime's sight; `headcni install --uninstall` removes it again.
pub const SET_ASIDE_SUFFIX: &str = ".headcni-aside";

/// Whether a runtime would load a file of this name.
pub fn is_network_config(name: &str) -> bool {
    EXTENSIONS.iter().any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// The network configuration files in `dir`, in the order a runtime considers them. A missing
/// directory has none.
pub fn config_files(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_network_config(n))
        .collect();
    names.sort();
    Ok(names)
}

/// The other networks' files that sort before `ours`: each of them wins over HeadCNI's.
pub fn sorting_before(dir: &Path, ours: &str) -> io::Result<Vec<String>> {
    Ok(config_files(dir)?.into_iter().filter(|n| n.as_str() < ours).collect())
}

/// A configuration document is HeadCNI's when its (first) plugin is `headcni`: a conflist's
/// `plugins[0]`, or a single-plugin `.conf` such as the documented one.
pub fn is_headcni(doc: &Value) -> bool {
    headcni_plugin(doc).is_some()
}

fn headcni_plugin(doc: &Value) -> Option<&Value> {
    let plugin = match doc.get("plugins") {
        Some(list) => list.get(0)?,
        None => doc,
    };
    (plugin.get("type").and_then(Value::as_str) == Some(HEADCNI_TYPE)).then_some(plugin)
}

/// The configuration the runtime uses, as far as HeadCNI cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    /// Its file name in the directory.
    pub file: String,
    /// The network name it declares.
    pub network: String,
    /// Whether its first plugin is headcni.
    pub headcni: bool,
    /// The pod MTU it sets for headcni (`None`: the node file's, i.e. the agent's).
    pub mtu: Option<u32>,
}

impl InUse {
    pub fn parse(file: &str, text: &str) -> Self {
        let doc: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let plugin = headcni_plugin(&doc);
        InUse {
            file: file.to_string(),
            network: doc.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
            headcni: plugin.is_some(),
            mtu: plugin.and_then(|p| p.get("mtu")).and_then(Value::as_u64).and_then(|m| u32::try_from(m).ok()),
        }
    }
}

/// The file a runtime uses from `dir` (the first one), read. `None` when there is none.
pub fn in_use(dir: &Path) -> io::Result<Option<InUse>> {
    let Some(first) = config_files(dir)?.into_iter().next() else { return Ok(None) };
    let text = std::fs::read_to_string(dir.join(&first))?;
    Ok(Some(InUse::parse(&first, &text)))
}

/// The network name and the data directory of headcni-ipam's store, when the conflist at `path`
/// is HeadCNI's and delegates to headcni-ipam.
pub fn headcni_ipam_store(path: &Path) -> Option<(String, PathBuf)> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let ipam = headcni_plugin(&doc)?.get("ipam")?;
    if ipam.get("type").and_then(Value::as_str) != Some(crate::ipam::PLUGIN_NAME) {
        return None;
    }
    let network = doc.get("name").and_then(Value::as_str)?.to_string();
    let dir = ipam.get("dataDir").and_then(Value::as_str).unwrap_or(crate::ipam::config::DEFAULT_DATA_DIR);
    Some((network, PathBuf::from(dir)))
}

/// One file moved aside or back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: PathBuf,
    pub to: PathBuf,
}

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.from.display(), self.to.display())
    }
}

/// What `--exclusive` would move: every network configuration in `dir` but `ours`, to the same
/// name with [`SET_ASIDE_SUFFIX`]. A name whose set-aside copy exists already is left out (and
/// reported by the caller): an earlier copy is never overwritten.
pub fn set_aside_plan(dir: &Path, ours: &str) -> io::Result<(Vec<Move>, Vec<String>)> {
    let mut moves = Vec::new();
    let mut blocked = Vec::new();
    for name in config_files(dir)? {
        if name == ours {
            continue;
        }
        let to = dir.join(format!("{name}{SET_ASIDE_SUFFIX}"));
        if to.exists() {
            blocked.push(name);
        } else {
            moves.push(Move { from: dir.join(&name), to });
        }
    }
    Ok((moves, blocked))
}

/// What `--uninstall` restores: every set-aside file whose original name is free again.
pub fn restore_plan(dir: &Path) -> io::Result<(Vec<Move>, Vec<String>)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> =
        entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut moves = Vec::new();
    let mut blocked = Vec::new();
    for name in names {
        let Some(original) = name.strip_suffix(SET_ASIDE_SUFFIX) else { continue };
        if !is_network_config(original) {
            continue;
        }
        let to = dir.join(original);
        if to.exists() {
            blocked.push(name);
        } else {
            moves.push(Move { from: dir.join(&name), to });
        }
    }
    Ok((moves, blocked))
}

/// Carries out moves (renames within the directory: atomic, the content untouched).
pub fn apply(moves: &[Move]) -> io::Result<()> {
    for m in moves {
        std::fs::rename(&m.from, &m.to).map_err(|e| io::Error::new(e.kind(), format!("renaming {}: {e}", m)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_type_is_the_plugins_name() {
        assert_eq!(HEADCNI_TYPE, crate::plugin::PLUGIN_NAME);
    }

    #[test]
    fn the_runtime_uses_the_first_network_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(in_use(d).unwrap(), None);
        std::fs::write(d.join("10-headcni.conflist"), r#"{"name":"headcni","plugins":[{"type":"headcni"}]}"#).unwrap();
        std::fs::write(d.join("README"), "not a config").unwrap();
        std::fs::write(d.join("99-loopback.conf"), r#"{"name":"lo","type":"loopback"}"#).unwrap();
        let used = in_use(d).unwrap().unwrap();
        assert_eq!((used.file.as_str(), used.headcni, used.mtu), ("10-headcni.conflist", true, None));
        std::fs::write(d.join("05-seed.conf"), r#"{"name":"tailscale-cni","type":"headcni","mtu":1420}"#).unwrap();
        let used = in_use(d).unwrap().unwrap();
        assert_eq!(
            (used.file.as_str(), used.network.as_str(), used.mtu),
            ("05-seed.conf", "tailscale-cni", Some(1420))
        );
        std::fs::write(d.join("00-flannel.conflist"), r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#).unwrap();
        assert!(!in_use(d).unwrap().unwrap().headcni);
        assert_eq!(sorting_before(d, "10-headcni.conflist").unwrap(), vec!["00-flannel.conflist", "05-seed.conf"]);
    }

    #[test]
    fn set_aside_and_restore_are_reversible() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, text) in [("10-flannel.conflist", "a"), ("10-headcni.conflist", "ours"), ("99-x.json", "b")] {
            std::fs::write(d.join(name), text).unwrap();
        }
        let (moves, blocked) = set_aside_plan(d, "10-headcni.conflist").unwrap();
        assert!(blocked.is_empty());
        assert_eq!(moves.len(), 2);
        apply(&moves).unwrap();
        assert_eq!(config_files(d).unwrap(), vec!["10-headcni.conflist"]);
        assert_eq!(std::fs::read_to_string(d.join("10-flannel.conflist.headcni-aside")).unwrap(), "a");
        // A file that came back meanwhile is not overwritten by the restore.
        std::fs::write(d.join("99-x.json"), "new").unwrap();
        let (moves, blocked) = restore_plan(d).unwrap();
        assert_eq!(blocked, vec!["99-x.json.headcni-aside"]);
        apply(&moves).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("10-flannel.conflist")).unwrap(), "a");
        assert_eq!(std::fs::read_to_string(d.join("99-x.json")).unwrap(), "new");
    }
}
