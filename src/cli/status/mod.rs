//! `headcni status [--json]`: one screen about this node's pod network. It combines the agent's
//! last report (`<run_dir>/agent-status.json`) with live checks of tailscaled, the kernel and
//! the files the plugin needs; every line that is wrong says what to do.
//!
//! Three steps, each testable alone:
//! - [`gather`]: reads everything (the report, tailscaled, the kernel, the files) into [`Live`];
//! - [`assess`]: judges it, pure: the [`StatusView`] with its problems and fixes;
//! - [`render`]: the screen (or `--json` prints the view).

pub mod assess;
pub mod cluster;
pub mod gather;
pub mod render;
#[cfg(test)]
mod tests;

pub use assess::assess;
pub use gather::{Files, Live, gather, ipam_view};
pub use render::render;

use crate::agent::report::{AgentReport, Severity};
use crate::clients::localapi::DEFAULT_SOCKET;
use crate::netlink::sysctl::{PROC_SYS, SysctlRoot};
use crate::nodefile;
use clap::Args;
use ipnetwork::IpNetwork;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

/// The agent report is stale after this many seconds when the agent does not say when its next
/// report is due (an agent older than `reportIntervalSecs`).
pub const STALE_AFTER_SECS: u64 = 120;
/// Otherwise after this many report intervals.
pub const STALE_AFTER_INTERVALS: u64 = 2;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// tailscaled's LocalAPI socket.
    #[arg(long, env = "HEADCNI_TAILSCALE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub tailscale_socket: PathBuf,
    /// The agent's run directory (node file, status file).
    #[arg(long, env = "HEADCNI_RUN_DIR", default_value = nodefile::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// The CNI configuration directory.
    #[arg(long, env = "HEADCNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// HeadCNI's conflist in the configuration directory.
    #[arg(long, env = "HEADCNI_CONFLIST_NAME", default_value = "10-headcni.conflist")]
    pub conflist_name: String,
    /// The directory that stands for /proc/sys (forwarding is read under <DIR>/net).
    #[arg(long, env = "HEADCNI_PROC_SYS_DIR", default_value = PROC_SYS)]
    pub proc_sys_dir: PathBuf,
    /// Every node of the cluster instead of this one: pod CIDRs, approval, each peer's path
    /// (direct or DERP relay), MTU, version; exit code 1 when any node has a problem. From a
    /// node's agent pod, or from anywhere with a kubeconfig.
    #[arg(long)]
    pub cluster: bool,
    /// kubeconfig for --cluster (default: the in-cluster service account).
    #[arg(long, env = "KUBECONFIG", requires = "cluster")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the agent pods (--cluster through the API server's proxy).
    #[arg(long, default_value = "kube-system", requires = "cluster")]
    pub namespace: String,
    /// Label selector of the agent pods (--cluster through the API server's proxy).
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=headcni,app.kubernetes.io/component=agent",
        requires = "cluster"
    )]
    pub selector: String,
    /// How --cluster reaches the agents: direct (each Node's InternalIP and --metrics-port),
    /// proxy (the API server's proxy to the agent pods), auto (direct in a pod, proxy with a
    /// kubeconfig).
    #[arg(long, value_enum, default_value = "auto", requires = "cluster")]
    pub via: cluster::Via,
    /// The agents' metrics port, which also serves /status.
    #[arg(long, env = "HEADCNI_METRICS_PORT", default_value_t = 8080)]
    pub metrics_port: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub cidr: String,
    pub advertised: Option<bool>,
    pub approved: Option<bool>,
    /// Whether the packet filter in force lets the other nodes' pods in (known once approved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admitted: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpamView {
    /// The IPAM plugin (`headcni-ipam`, `host-local`, ...).
    pub plugin: String,
    pub network: String,
    pub data_dir: String,
    pub used: u128,
    /// Known for headcni-ipam; host-local keeps no count of its pool.
    pub total: Option<u128>,
    pub free: Option<u128>,
    /// Why the usage could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl IpamView {
    pub(super) fn text(&self) -> String {
        if let Some(e) = &self.error {
            return format!("{} ({}): {e}", self.plugin, self.data_dir);
        }
        match (self.total, self.free) {
            (Some(total), Some(free)) => {
                format!("{}: {} of {total} addresses in use, {free} free ({})", self.plugin, self.used, self.data_dir)
            }
            _ => format!("{}: {} addresses in use ({})", self.plugin, self.used, self.data_dir),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerView {
    pub hostname: String,
    pub tailscale_ips: Vec<String>,
    pub routes: Vec<String>,
    pub online: bool,
    /// "direct", "relay" or "idle".
    pub path: String,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub node: Option<String>,
    pub agent_running: bool,
    pub agent_report_age_secs: Option<u64>,
    pub agent_ready: Option<bool>,
    /// The uninstall signal as the agent last reported it: "in progress" or "done".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uninstall: Option<String>,
    pub backend_state: String,
    pub tailnet_hostname: String,
    pub tailscale_ips: Vec<String>,
    pub control_url: String,
    pub accept_routes: Option<bool>,
    pub snat_subnet_routes: Option<bool>,
    pub pod_cidrs: Vec<String>,
    pub pod_cidr_source: String,
    pub routes: Vec<RouteView>,
    pub approval: String,
    /// Controller mode: the controller's word on this Node, one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    pub peers: Vec<PeerView>,
    pub pod_mtu: Option<u32>,
    pub tailnet_interface: Option<String>,
    pub tailnet_mtu: Option<u32>,
    pub forwarding_ipv4: Option<bool>,
    pub forwarding_ipv6: Option<bool>,
    pub rules: Vec<String>,
    /// The networks the node refuses to route anywhere but to its pods (`unreachable` routes).
    pub unreachable: Vec<String>,
    /// The anti-spoofing guard is in place.
    pub guard: Option<bool>,
    /// Where pod traffic stays pod traffic (routed to the tailnet, not masqueraded).
    pub cluster_destinations: Vec<String>,
    pub masquerade_enabled: Option<bool>,
    pub masquerade_tables: Vec<String>,
    pub node_file: String,
    pub node_file_present: bool,
    pub conflist: String,
    pub conflist_present: bool,
    /// The configuration the container runtime uses (the first in the directory).
    pub cni_config_in_use: Option<String>,
    /// Addresses in use in this node's pool, from the IPAM plugin named in the conflist.
    pub ipam: Option<IpamView>,
    /// The NetworkPolicy engine, as it last reported.
    pub network_policy: Option<crate::agent::policy::engine::PolicyStatus>,
    pub problems: Vec<Finding>,
}

/// `headcni status --cluster`.
fn cluster_main(args: &StatusArgs) -> i32 {
    let opts = cluster::ClusterOptions {
        kubeconfig: args.kubeconfig.clone().filter(|p| !p.as_os_str().is_empty()),
        namespace: args.namespace.clone(),
        selector: args.selector.clone(),
        via: args.via,
        port: args.metrics_port,
    };
    let found = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(cluster::gather(&opts)),
        Err(e) => Err(format!("starting the runtime: {e}")),
    };
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            crate::logging::fatal("status", &e);
            return crate::logging::exit::FAILED;
        }
    };
    let view = cluster::assess(&found, crate::agent::serve::now());
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_string_pretty(&view).map_err(std::io::Error::other).and_then(|s| writeln!(out, "{s}"))
    } else {
        cluster::render(&view, &mut out)
    };
    if written.is_err() {
        return crate::logging::exit::FAILED;
    }
    i32::from(view.has_errors())
}

/// Entry point of `headcni status`: 0 when all is well, 1 when something is wrong.
pub fn main(args: StatusArgs) -> i32 {
    crate::logging::init_stderr("status", "warn");
    if args.cluster {
        return cluster_main(&args);
    }
    if let Err(e) = SysctlRoot::new(&args.proc_sys_dir) {
        crate::logging::fatal("status", &format!("--proc-sys-dir: {e}"));
        return crate::logging::exit::USAGE;
    }
    let report = AgentReport::load(&args.run_dir);
    let pods: Vec<IpNetwork> = report.as_ref().map(|r| r.pod_cidrs.clone()).unwrap_or_default();
    let live = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(gather(&args, &pods)),
        Err(e) => {
            log::error!("starting the runtime: {e}");
            Live::default()
        }
    };
    let view = assess(&args, report, &live, crate::agent::serve::now());
    let mut out = std::io::stdout().lock();
    #[allow(clippy::print_stdout)]
    let written = if args.json {
        serde_json::to_string_pretty(&view).map_err(std::io::Error::other).and_then(|s| writeln!(out, "{s}"))
    } else {
        render(&view, &mut out)
    };
    if written.is_err() {
        return crate::logging::exit::FAILED;
    }
    i32::from(view.problems.iter().any(|p| p.severity == Severity::Error))
}
