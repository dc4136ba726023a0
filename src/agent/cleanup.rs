//! Undoing what HeadCNI changed on a node: the routes it added to tailscaled's AdvertiseRoutes
//! and approved in Headscale (only those, from the agent's state record), its policy rules, its
//! `unreachable` routes, its masquerade tables and (`--cleanup` only) the anti-spoofing guard. Used by `headcni agent --cleanup` ([`CleanupScope::Full`]) and by the agent
//! itself when the uninstall signal arrives ([`CleanupScope::Uninstall`]).
//!
//! Where the agent manages HeadCNI's files in the runtime's CNI directories (the chart's
//! `--publish-conflist`, `--bin-dir`), both scopes remove them: the conflist first, so the
//! runtime stops creating pods on this network and reports the node's network not ready, then
//! `headcni` and `headcni-ipam`. Pods already running keep their addresses and their
//! connectivity within the node; what ends is traffic to other nodes' pods (the routes are
//! withdrawn) and masqueraded traffic leaving the cluster (the nftables tables are removed).
//! The uninstall keeps the node file (`<run_dir>/subnet.env`); `--cleanup` removes it too: it is
//! for a node that leaves HeadCNI.

use super::config::{AgentConfig, CniFiles};
use super::hostnet::{self, HostNetwork};
use super::reconcile;
use super::report;
use super::state::{self, AgentState};
use crate::clients::headscale::HeadscaleApi;
use crate::clients::localapi::{LocalApi, PrefsEdit};
use crate::errors::ErrorList;
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;

/// How much to undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupScope {
    /// Everything, the node file and the status file included (`--cleanup`).
    Full,
    /// Everything but the node file and the status file (the uninstall signal).
    Uninstall,
}

/// Undoes HeadCNI's changes over the seams; answers the failures. Every step runs, whatever
/// failed before it.
pub async fn cleanup_with<T: LocalApi, H: HeadscaleApi, D: HostNetwork>(
    cfg: &AgentConfig,
    ts: &T,
    hs: Option<&H>,
    dp: &D,
    scope: CleanupScope,
) -> ErrorList<String> {
    let mut errors = ErrorList::new();
    let state_path = state::path_in(&cfg.state_dir);
    let mut st = match AgentState::load(&state_path) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };
    if let Some(st) = st.as_mut() {
        // Routes.
        if !st.advertised_routes.is_empty() {
            match ts.prefs().await {
                Ok(prefs) => {
                    let (routes, _, removed) =
                        reconcile::merge_routes(&prefs.advertise_routes, &BTreeSet::new(), &st.advertised_routes);
                    let edit = PrefsEdit { advertise_routes: Some(routes), ..Default::default() };
                    if removed.is_empty() {
                        st.advertised_routes.clear();
                    } else {
                        match ts.edit_prefs(&edit).await {
                            Ok(_) => {
                                log::info!("withdrew {}", hostnet::join(&removed.iter().copied().collect::<Vec<_>>()));
                                st.advertised_routes.clear();
                            }
                            Err(e) => errors.push(format!("withdrawing routes: {e}")),
                        }
                    }
                }
                Err(e) => errors.push(format!("withdrawing routes: {e}")),
            }
        }
        // Approvals.
        if let (Some(hs), false) = (hs, st.approved_routes.is_empty()) {
            let result = async {
                let status = ts.status().await.map_err(|e| e.to_string())?;
                let key = status.node_key().ok_or("tailscaled has no node key")?.to_string();
                let nodes = hs.nodes().await.map_err(|e| e.to_string())?;
                let Some(node) = nodes.into_iter().find(|n| n.node_key == key) else { return Ok(()) };
                if st.approved_node_id.as_deref() != Some(node.id.as_str()) {
                    return Ok(());
                }
                let keep: Vec<IpNetwork> =
                    node.approved().into_iter().filter(|r| !st.approved_routes.contains(r)).collect();
                if keep.len() != node.approved().len() {
                    hs.approve_routes(&node.id, &keep).await.map_err(|e| e.to_string())?;
                    log::info!(
                        "withdrew the approval of {} in Headscale",
                        hostnet::join(&st.approved_routes.iter().copied().collect::<Vec<_>>())
                    );
                }
                Ok::<_, String>(())
            }
            .await;
            match result {
                Ok(()) => st.approved_routes.clear(),
                Err(e) => errors.push(format!("withdrawing approvals: {e}")),
            }
        }
        if st.advertised_routes.is_empty() && st.approved_routes.is_empty() {
            if let Err(e) = AgentState::remove(&state_path) {
                errors.push(e.to_string());
            }
        } else if let Err(e) = st.store(&state_path) {
            errors.push(e.to_string());
        }
    }
    match dp.remove_rules().await {
        Ok(n) if n > 0 => log::info!("removed {n} policy rules"),
        Ok(_) => {}
        Err(e) => errors.push(format!("removing policy rules: {e}")),
    }
    match dp.remove_unreachable().await {
        Ok(n) if n > 0 => log::info!("removed {n} unreachable routes"),
        Ok(_) => {}
        Err(e) => errors.push(format!("removing the unreachable routes: {e}")),
    }
    // The guard protects the pods that stay during an uninstall (and ADD would put it back):
    // only a node that leaves HeadCNI loses it.
    if scope == CleanupScope::Full {
        match dp.remove_guard().await {
            Ok(true) => log::info!("removed the anti-spoofing guard"),
            Ok(false) => {}
            Err(e) => errors.push(format!("removing the anti-spoofing guard: {e}")),
        }
    }
    match dp.remove_masquerade().await {
        Ok(n) if n > 0 => log::info!("removed {n} nft tables"),
        Ok(_) => {}
        Err(e) => errors.push(format!("removing nft tables: {e}")),
    }
    // HeadCNI's files in the runtime's CNI directories: the conflist first (the runtime stops
    // creating pods on this network), then the binaries. The uninstall keeps the staged
    // conflist (in the run dir): an uninstall called off puts everything back from it.
    if cfg.cni_files != CniFiles::default() {
        let conflists = cfg.cni_files.conflists(scope == CleanupScope::Full);
        match crate::install::remove_installed(cfg.cni_files.bin_dir.as_deref(), &conflists) {
            Ok(out) => {
                for p in out.changed {
                    log::info!("removed {}", p.display());
                }
            }
            Err(e) => errors.push(format!("removing HeadCNI's CNI files: {e}")),
        }
    }
    let files = match scope {
        CleanupScope::Full => vec![crate::nodefile::path_in(&cfg.run_dir), report::path_in(&cfg.run_dir)],
        CleanupScope::Uninstall => Vec::new(),
    };
    for path in files {
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("removing {}: {e}", path.display())),
        }
    }
    errors
}
