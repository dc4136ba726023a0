//! What `headcni status` reads: the agent's report, tailscaled's status and prefs, the kernel's
//! forwarding, rules, tables and tailnet link, and the files the plugin needs. Nothing here
//! judges; [`super::assess`] does.

use super::{IpamView, StatusArgs};
use crate::agent::hostnet::{self, KernelHostNetwork, SYSCTL_FORWARD_V4, SYSCTL_FORWARD_V6};
use crate::agent::policy::engine::PolicyStatus;
use crate::clients::localapi::{LocalApi, Prefs, SocketLocalApi, Status};
use crate::netlink::RuleSpec;
use crate::netlink::nft::NftFamily;
use crate::netlink::sysctl::SysctlRoot;
use crate::nodefile::{self, NodeFile};
use ipnetwork::IpNetwork;
use std::path::{Path, PathBuf};

/// What the live checks found (gathered separately so that the judgement is testable).
#[derive(Debug, Default)]
pub struct Live {
    pub status: Option<Result<Status, String>>,
    pub prefs: Option<Prefs>,
    pub forwarding_v4: Option<bool>,
    pub forwarding_v6: Option<bool>,
    /// HeadCNI's policy rules.
    pub rules: Option<Vec<RuleSpec>>,
    /// HeadCNI's `unreachable` routes.
    pub unreachable: Option<Vec<IpNetwork>>,
    /// Whether the anti-spoofing guard is complete.
    pub guard: Option<bool>,
    pub tables: Option<Vec<(NftFamily, usize)>>,
    pub link: Option<(String, u32)>,
    pub files: Files,
}

/// The files the plugin needs, as found.
#[derive(Debug)]
pub struct Files {
    /// The node file (`None`: missing), or why it cannot be read.
    pub node_file: Result<Option<NodeFile>, String>,
    pub conflist_present: bool,
    /// The configuration the runtime uses (the first in the directory), or why the directory
    /// cannot be read.
    pub in_use: Result<Option<crate::cniconf::InUse>, String>,
    pub ipam: Option<IpamView>,
    /// The NetworkPolicy engine's status file.
    pub policy: Option<PolicyStatus>,
}

impl Default for Files {
    fn default() -> Self {
        Self { node_file: Ok(None), conflist_present: false, in_use: Ok(None), ipam: None, policy: None }
    }
}

/// Reads the node file, the conflist and the IPAM store it names.
pub fn read_files(args: &StatusArgs) -> Files {
    let conflist = args.conf_dir.join(&args.conflist_name);
    Files {
        node_file: NodeFile::load(&nodefile::path_in(&args.run_dir)).map_err(|e| e.to_string()),
        conflist_present: conflist.is_file(),
        in_use: crate::cniconf::in_use(&args.conf_dir).map_err(|e| e.to_string()),
        ipam: ipam_view(&conflist),
        policy: PolicyStatus::load(&args.run_dir),
    }
}

/// Reads the usage of the pool the conflist's IPAM plugin hands addresses out of.
pub fn ipam_view(conflist: &Path) -> Option<IpamView> {
    let text = std::fs::read_to_string(conflist).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
    let network = doc["name"].as_str()?.to_string();
    let ipam = &doc["plugins"][0]["ipam"];
    let plugin = ipam["type"].as_str()?.to_string();
    let configured = ipam["dataDir"].as_str().map(PathBuf::from);
    let mut view = IpamView { plugin: plugin.clone(), network: network.clone(), ..Default::default() };
    match plugin.as_str() {
        crate::ipam::PLUGIN_NAME => {
            let dir = configured.unwrap_or_else(|| PathBuf::from(crate::ipam::config::DEFAULT_DATA_DIR));
            view.data_dir = dir.display().to_string();
            match crate::ipam::usage(&dir, &network) {
                Ok(Some(u)) => {
                    view.used = u.used;
                    view.total = Some(u.total);
                    view.free = Some(u.total.saturating_sub(u.used));
                }
                Ok(None) => {}
                Err(e) => view.error = Some(e.to_string()),
            }
        }
        "host-local" => {
            let dir = configured.unwrap_or_else(|| PathBuf::from("/var/lib/cni/networks")).join(&network);
            view.data_dir = dir.display().to_string();
            // host-local keeps one file per address, named by the address.
            view.used = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_name().to_string_lossy().parse::<std::net::IpAddr>().is_ok())
                        .count() as u128
                })
                .unwrap_or(0);
        }
        _ => view.error = Some("usage is known for headcni-ipam and host-local only".into()),
    }
    Some(view)
}

/// Everything live: tailscaled, the kernel, the files.
pub async fn gather(args: &StatusArgs, pods: &[IpNetwork]) -> Live {
    let mut live = Live { files: read_files(args), ..Live::default() };
    let api = SocketLocalApi::new(&args.tailscale_socket);
    live.status = Some(api.status().await.map_err(|e| e.to_string()));
    live.prefs = api.prefs().await.ok();
    let root = SysctlRoot::new(&args.proc_sys_dir).unwrap_or_default(); // checked in main
    let read = |k: &str| root.read(k).ok().map(|v| v == "1");
    live.forwarding_v4 = read(SYSCTL_FORWARD_V4);
    if pods.iter().any(IpNetwork::is_ipv6) {
        live.forwarding_v6 = read(SYSCTL_FORWARD_V6);
    }
    if let Ok(dp) = KernelHostNetwork::current() {
        live.rules = dp.own_rules().await.ok();
        live.unreachable = dp.own_unreachable().await.ok();
        live.guard = dp.guard_intact().ok();
        let mut tables = Vec::new();
        let mut ok = true;
        for f in [NftFamily::Ipv4, NftFamily::Ipv6] {
            match dp.masquerade_table(f) {
                Ok(Some(n)) => tables.push((f, n)),
                Ok(None) => {}
                Err(_) => ok = false,
            }
        }
        live.tables = ok.then_some(tables);
        let ips =
            live.status.as_ref().and_then(|s| s.as_ref().ok()).map(|s| s.tailscale_ips.clone()).unwrap_or_default();
        live.link = hostnet::HostNetwork::tailnet_link(&dp, &ips).await.ok().flatten();
    }
    live
}
