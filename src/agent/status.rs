//! `headcni status [--json]`: one screen about this node's pod network. It combines the agent's
//! last report (`<run_dir>/agent-status.json`) with live checks of tailscaled, the kernel and
//! the files the plugin needs; every line that is wrong says what to do.

use super::dataplane::{self, HostDataplane, RULE_PROTOCOL, SYSCTL_FORWARD_V4, SYSCTL_FORWARD_V6, TABLE};
use super::report::{AgentReport, Severity};
use crate::clients::localapi::{DEFAULT_SOCKET, LocalApi, Prefs, SocketLocalApi, Status};
use crate::netlink::nft::Family;
use crate::netlink::sysctl::{PROC_SYS, SysctlRoot};
use crate::nodefile::{self, NodeFile};
use clap::Args;
use ipnetwork::IpNetwork;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The agent report is stale after this many seconds.
pub const STALE_AFTER_SECS: u64 = 120;

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
    fn text(&self) -> String {
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

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerView {
    pub hostname: String,
    pub tailscale_ips: Vec<String>,
    pub routes: Vec<String>,
    pub online: bool,
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
    pub peers: Vec<PeerView>,
    pub pod_mtu: Option<u32>,
    pub tailnet_interface: Option<String>,
    pub tailnet_mtu: Option<u32>,
    pub forwarding_ipv4: Option<bool>,
    pub forwarding_ipv6: Option<bool>,
    pub rules: Vec<String>,
    pub masquerade_enabled: Option<bool>,
    pub masquerade_tables: Vec<String>,
    pub node_file: String,
    pub node_file_present: bool,
    pub conflist: String,
    pub conflist_present: bool,
    /// Addresses in use in this node's pool, from the IPAM plugin named in the conflist.
    pub ipam: Option<IpamView>,
    pub problems: Vec<Finding>,
}

fn find(view: &mut StatusView, severity: Severity, message: impl Into<String>, fix: Option<&str>) {
    let message = message.into();
    if !view.problems.iter().any(|p| p.message == message) {
        view.problems.push(Finding { severity, message, fix: fix.map(str::to_string) });
    }
}

/// What the live checks found (gathered separately so that the judgement is testable).
#[derive(Debug, Default)]
pub struct Live {
    pub status: Option<Result<Status, String>>,
    pub prefs: Option<Prefs>,
    pub forwarding_v4: Option<bool>,
    pub forwarding_v6: Option<bool>,
    pub rules: Option<Vec<IpNetwork>>,
    pub tables: Option<Vec<(Family, usize)>>,
    pub link: Option<(String, u32)>,
}

/// Builds the view from the agent's report, the live findings and the files.
pub fn assess(args: &StatusArgs, report: Option<AgentReport>, live: &Live, now: u64) -> StatusView {
    let mut v = StatusView::default();
    let node_file_path = nodefile::path_in(&args.run_dir);
    v.node_file = node_file_path.display().to_string();
    let node_file = NodeFile::load(&node_file_path);
    v.node_file_present = matches!(node_file, Ok(Some(_)));
    let conflist = args.conf_dir.join(&args.conflist_name);
    v.conflist = conflist.display().to_string();
    v.conflist_present = conflist.is_file();
    v.ipam = ipam_view(&conflist);
    if let Some(ipam) = v.ipam.clone() {
        match (ipam.free, ipam.total, &ipam.error) {
            (_, _, Some(e)) => find(
                &mut v,
                Severity::Error,
                format!("the IPAM store cannot be read: {e}"),
                Some("the message names the file and, for damage, the repair command"),
            ),
            (Some(0), Some(total), _) if total > 0 => find(
                &mut v,
                Severity::Error,
                format!("the pod address range is exhausted ({total} addresses in use)"),
                Some(
                    "headcni ipam gc --dry-run shows allocations of pods that are gone; otherwise give the node a larger pod CIDR",
                ),
            ),
            (Some(free), Some(total), _) if total > 0 && free * 10 < total => find(
                &mut v,
                Severity::Warning,
                format!("the pod address range is over 90% used ({free} of {total} free)"),
                Some("headcni ipam gc --dry-run shows allocations of pods that are gone"),
            ),
            _ => {}
        }
    }

    match &report {
        None => find(
            &mut v,
            Severity::Error,
            format!("the agent has not reported on this node (no {})", super::report::path_in(&args.run_dir).display()),
            Some("is the headcni agent pod running on this node? (kubectl -n kube-system get pods -o wide)"),
        ),
        Some(r) => {
            let age = now.saturating_sub(r.updated_at);
            v.agent_report_age_secs = Some(age);
            v.agent_running = age <= STALE_AFTER_SECS;
            v.agent_ready = Some(r.ready);
            if !v.agent_running {
                find(
                    &mut v,
                    Severity::Error,
                    format!("the agent's last report is {age}s old"),
                    Some("is the headcni agent pod running? see its logs"),
                );
            }
            if !r.teardown.is_empty() {
                v.uninstall = Some(r.teardown.clone());
                find(
                    &mut v,
                    Severity::Warning,
                    format!(
                        "HeadCNI is being uninstalled (teardown {}): this node's routes are withdrawn, pods keep only \
                         node-local connectivity",
                        r.teardown
                    ),
                    Some(
                        "helm upgrade or rollback sets the signal back to \"false\"; after the uninstall, drain the \
                         node and remove the CNI files with headcni install --uninstall",
                    ),
                );
            }
            v.node = r.node_name.clone();
            v.pod_cidrs = r.pod_cidrs.iter().map(ToString::to_string).collect();
            v.pod_cidr_source = r.pod_cidr_source.clone();
            v.approval = r.approval.clone();
            v.pod_mtu = r.mtu;
            v.masquerade_enabled = Some(r.masquerade);
            v.routes = r
                .routes
                .iter()
                .map(|rt| RouteView {
                    cidr: rt.cidr.to_string(),
                    advertised: Some(rt.advertised),
                    approved: rt.approved,
                })
                .collect();
            v.backend_state = r.tailnet.backend_state.clone();
            v.tailscale_ips = r.tailnet.tailscale_ips.iter().map(ToString::to_string).collect();
            v.control_url = r.tailnet.control_url.clone();
            v.tailnet_hostname = r.hostname.clone();
            for p in &r.problems {
                if v.agent_running {
                    find(&mut v, p.severity, p.message.clone(), p.hint.as_deref());
                }
            }
        }
    }
    if let Ok(Some(nf)) = &node_file {
        if v.pod_cidrs.is_empty() {
            v.pod_cidrs = nf.pod_cidrs.iter().map(ToString::to_string).collect();
        }
        v.pod_mtu = nf.mtu.or(v.pod_mtu);
        if v.node.is_none() {
            v.node = nf.node_name.clone();
        }
    }

    // tailscaled, live.
    match &live.status {
        Some(Ok(st)) => {
            v.backend_state = st.backend_state.clone();
            v.tailnet_hostname = st.self_.host_name.clone();
            v.tailscale_ips = st.tailscale_ips.iter().map(ToString::to_string).collect();
            v.peers = st
                .peer
                .values()
                .map(|p| PeerView {
                    hostname: p.host_name.clone(),
                    tailscale_ips: p.tailscale_ips.iter().map(ToString::to_string).collect(),
                    routes: p.served_routes().iter().map(ToString::to_string).collect(),
                    online: p.online,
                })
                .collect();
            v.peers.sort_by(|a, b| a.hostname.cmp(&b.hostname));
            if !st.is_running() {
                let health = st.health.join("; ");
                find(
                    &mut v,
                    Severity::Error,
                    format!(
                        "tailscale is {}{}",
                        st.backend_state,
                        if health.is_empty() { String::new() } else { format!(": {health}") }
                    ),
                    Some(match st.backend_state.as_str() {
                        "NeedsLogin" => {
                            "give the agent --headscale-url and a pre-auth key, or log in with tailscale up"
                        }
                        "NeedsMachineAuth" => "authorize the node in Headscale",
                        "Stopped" => "run tailscale up",
                        _ => "wait for tailscaled to start",
                    }),
                );
            }
        }
        Some(Err(e)) => find(
            &mut v,
            Severity::Error,
            format!("tailscaled: {e}"),
            Some("is tailscaled running? check --tailscale-socket"),
        ),
        None => {}
    }
    if let Some(p) = &live.prefs {
        v.control_url = p.control_url.clone();
        v.accept_routes = Some(p.route_all);
        v.snat_subnet_routes = Some(!p.no_snat);
        if !p.route_all {
            find(
                &mut v,
                Severity::Error,
                "accept-routes is off: this node does not route to other nodes' pods",
                Some("the agent turns it on; by hand: tailscale set --accept-routes"),
            );
        }
        if !p.no_snat {
            find(
                &mut v,
                Severity::Error,
                "subnet-route SNAT is on: remote pods see this node's address instead of the pod's",
                Some("the agent turns it off; by hand: tailscale set --snat-subnet-routes=false"),
            );
        }
        for r in &mut v.routes {
            let Ok(net) = r.cidr.parse::<IpNetwork>() else { continue };
            r.advertised = Some(p.advertises(&net));
        }
    }
    for r in v.routes.clone() {
        if r.advertised == Some(false) {
            find(
                &mut v,
                Severity::Error,
                format!("pod CIDR {} is not advertised to the tailnet", r.cidr),
                Some("the agent advertises it; see its logs (tailscale debug prefs shows AdvertiseRoutes)"),
            );
        } else if r.approved == Some(false) {
            find(
                &mut v,
                Severity::Error,
                format!("route {} is not approved in Headscale: other nodes cannot reach this node's pods", r.cidr),
                Some(&format!(
                    "approve it (headscale nodes approve-routes --identifier <id> --routes {}), or cover it with the \
                     policy's autoApprovers, or give the agent --api-key-file",
                    r.cidr
                )),
            );
        }
    }

    // Kernel, live.
    let pods: Vec<IpNetwork> = v.pod_cidrs.iter().filter_map(|s| s.parse().ok()).collect();
    v.forwarding_ipv4 = live.forwarding_v4;
    v.forwarding_ipv6 = live.forwarding_v6;
    if pods.iter().any(IpNetwork::is_ipv4) && live.forwarding_v4 == Some(false) {
        find(
            &mut v,
            Severity::Error,
            "IPv4 forwarding is off: pods cannot leave the node",
            Some("sysctl -w net.ipv4.ip_forward=1 (the agent sets it)"),
        );
    }
    if pods.iter().any(IpNetwork::is_ipv6) && live.forwarding_v6 == Some(false) {
        find(
            &mut v,
            Severity::Error,
            "IPv6 forwarding is off",
            Some("sysctl -w net.ipv6.conf.all.forwarding=1 (the agent sets it)"),
        );
    }
    if let Some(rules) = &live.rules {
        v.rules = rules.iter().map(|r| format!("to {r} lookup main")).collect();
        for p in &pods {
            if !rules.contains(p) {
                find(
                    &mut v,
                    Severity::Error,
                    format!(
                        "no policy rule sends traffic to {p} to the main table: a peer route covering it would capture it"
                    ),
                    Some("the agent adds it; see its logs"),
                );
            }
        }
    }
    if let Some(tables) = &live.tables {
        v.masquerade_tables = tables.iter().map(|(f, n)| format!("{f} {TABLE} ({n} rules)")).collect();
        if v.masquerade_enabled == Some(true) && !pods.is_empty() && tables.is_empty() {
            find(
                &mut v,
                Severity::Error,
                "no masquerade table: pods cannot reach addresses outside the cluster",
                Some("the agent creates it; see its logs"),
            );
        }
    }
    if let Some((name, mtu)) = &live.link {
        v.tailnet_interface = Some(name.clone());
        v.tailnet_mtu = Some(*mtu);
        if let Some(pod) = v.pod_mtu
            && pod > *mtu
        {
            find(
                &mut v,
                Severity::Error,
                format!("pod MTU {pod} is larger than {name}'s MTU {mtu}: large packets between nodes are lost"),
                Some("run the agent with --mtu auto (or at most the tailnet MTU); new pods get the new MTU"),
            );
        }
    }

    // Files.
    let (nf_path, cl_path) = (v.node_file.clone(), v.conflist.clone());
    match &node_file {
        Ok(Some(_)) => {}
        Ok(None) => find(
            &mut v,
            Severity::Error,
            format!("the node file {nf_path} is missing: the plugin cannot set up pods"),
            Some("the agent writes it once it knows the pod CIDRs and the MTU"),
        ),
        Err(e) => find(&mut v, Severity::Error, e.to_string(), Some("the agent rewrites it")),
    }
    if !v.conflist_present {
        find(
            &mut v,
            Severity::Error,
            format!("no CNI configuration at {cl_path}: the runtime does not use HeadCNI"),
            Some("headcni install (the chart's init container) writes it"),
        );
    } else if let Some(first) = first_conflist(&args.conf_dir)
        && first != args.conflist_name
    {
        find(
            &mut v,
            Severity::Warning,
            format!(
                "{first} sorts before {} in {}: the runtime uses the first configuration",
                args.conflist_name,
                args.conf_dir.display()
            ),
            Some("remove the other network's configuration, or rename HeadCNI's to sort first"),
        );
    }
    v.problems.sort_by_key(|p| std::cmp::Reverse(p.severity));
    v
}

/// The file name the runtime picks: the first *.conflist/*.conf/*.json in lexical order.
fn first_conflist(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
        .collect();
    names.sort();
    names.into_iter().next()
}

async fn gather(args: &StatusArgs, pods: &[IpNetwork]) -> Live {
    let mut live = Live::default();
    let api = SocketLocalApi::new(&args.tailscale_socket);
    live.status = Some(api.status().await.map_err(|e| e.to_string()));
    live.prefs = api.prefs().await.ok();
    let root = SysctlRoot::new(&args.proc_sys_dir).unwrap_or_default(); // checked in main
    let read = |k: &str| root.read(k).ok().map(|v| v == "1");
    live.forwarding_v4 = read(SYSCTL_FORWARD_V4);
    if pods.iter().any(IpNetwork::is_ipv6) {
        live.forwarding_v6 = read(SYSCTL_FORWARD_V6);
    }
    if let Ok(dp) = HostDataplane::current() {
        live.rules = dp
            .own_rules()
            .await
            .ok()
            .map(|r| r.into_iter().filter(|r| r.protocol == Some(RULE_PROTOCOL)).map(|r| r.dst).collect());
        let mut tables = Vec::new();
        let mut ok = true;
        for f in [Family::Ipv4, Family::Ipv6] {
            match dp.masquerade_table(f) {
                Ok(Some(n)) => tables.push((f, n)),
                Ok(None) => {}
                Err(_) => ok = false,
            }
        }
        live.tables = ok.then_some(tables);
        let ips =
            live.status.as_ref().and_then(|s| s.as_ref().ok()).map(|s| s.tailscale_ips.clone()).unwrap_or_default();
        live.link = dataplane::Dataplane::tailnet_link(&dp, &ips).await.ok().flatten();
    }
    live
}

fn yes(b: Option<bool>, t: &str, f: &str) -> String {
    match b {
        Some(true) => t.into(),
        Some(false) => f.into(),
        None => "unknown".into(),
    }
}

pub fn render(v: &StatusView, out: &mut impl Write) -> std::io::Result<()> {
    let dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    writeln!(out, "HeadCNI on {}", v.node.as_deref().unwrap_or("this node"))?;
    let agent = match (v.agent_running, v.agent_report_age_secs, v.agent_ready) {
        (true, Some(age), Some(_)) if v.uninstall.is_some() => {
            format!("uninstalling, teardown {} (reported {age}s ago)", v.uninstall.as_deref().unwrap_or("-"))
        }
        (true, Some(age), Some(ready)) => {
            format!("running, {} (reported {age}s ago)", if ready { "ready" } else { "not ready" })
        }
        (false, Some(age), _) => format!("not reporting (last report {age}s ago)"),
        _ => "no report".into(),
    };
    writeln!(out, "  agent        {agent}")?;
    writeln!(
        out,
        "  tailnet      {} as {} ({}) via {}",
        dash(&v.backend_state),
        dash(&v.tailnet_hostname),
        dash(&v.tailscale_ips.join(", ")),
        dash(&v.control_url)
    )?;
    writeln!(
        out,
        "  prefs        accept-routes {}, subnet SNAT {}",
        yes(v.accept_routes, "on", "OFF"),
        yes(v.snat_subnet_routes, "ON", "off")
    )?;
    writeln!(out, "  pod CIDRs    {} (from {})", dash(&v.pod_cidrs.join(", ")), dash(&v.pod_cidr_source))?;
    for r in &v.routes {
        writeln!(
            out,
            "  route        {}: {}, {} ({})",
            r.cidr,
            yes(r.advertised, "advertised", "NOT advertised"),
            yes(r.approved, "approved", "NOT approved"),
            if v.approval == "api" { "approved by the agent" } else { "approval by policy" }
        )?;
    }
    if v.peers.is_empty() {
        writeln!(out, "  peers        none")?;
    }
    for p in &v.peers {
        writeln!(
            out,
            "  peer         {} {}{}: {}",
            p.hostname,
            p.tailscale_ips.first().map(String::as_str).unwrap_or("-"),
            if p.online { "" } else { " (offline)" },
            if p.routes.is_empty() { "no routes".into() } else { format!("accepting {}", p.routes.join(", ")) }
        )?;
    }
    writeln!(
        out,
        "  MTU          pod {}, {} {}",
        v.pod_mtu.map(|m| m.to_string()).unwrap_or("-".into()),
        v.tailnet_interface.as_deref().unwrap_or("tailnet"),
        v.tailnet_mtu.map(|m| m.to_string()).unwrap_or("-".into())
    )?;
    let fwd6 = if v.forwarding_ipv6.is_some() {
        format!(", ipv6 {}", yes(v.forwarding_ipv6, "on", "OFF"))
    } else {
        String::new()
    };
    writeln!(out, "  forwarding   ipv4 {}{fwd6}", yes(v.forwarding_ipv4, "on", "OFF"))?;
    writeln!(out, "  ip rules     {}", if v.rules.is_empty() { "none".into() } else { v.rules.join(", ") })?;
    let masq = match v.masquerade_enabled {
        Some(false) => "disabled".to_string(),
        _ if v.masquerade_tables.is_empty() => "no table".to_string(),
        _ => v.masquerade_tables.join(", "),
    };
    writeln!(out, "  masquerade   {masq}")?;
    writeln!(out, "  node file    {} ({})", v.node_file, if v.node_file_present { "present" } else { "MISSING" })?;
    writeln!(out, "  conflist     {} ({})", v.conflist, if v.conflist_present { "present" } else { "MISSING" })?;
    writeln!(
        out,
        "  IPAM         {}",
        v.ipam.as_ref().map(IpamView::text).unwrap_or_else(|| "no conflist to read it from".into())
    )?;
    if v.problems.is_empty() {
        writeln!(out, "All good.")?;
    } else {
        writeln!(out, "Problems:")?;
        for p in &v.problems {
            let tag = match p.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "WARN ",
                Severity::Waiting => "WAIT ",
            };
            writeln!(out, "  {tag} {}", p.message)?;
            if let Some(fix) = &p.fix {
                writeln!(out, "        → {fix}")?;
            }
        }
    }
    Ok(())
}

/// Entry point of `headcni status`: 0 when all is well, 1 when something is wrong.
pub fn main(args: StatusArgs) -> i32 {
    crate::logging::init_stderr("warn");
    if let Err(e) = SysctlRoot::new(&args.proc_sys_dir) {
        log::error!("--proc-sys-dir: {e}");
        return 2;
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
    let view = assess(&args, report, &live, super::serve::now());
    let mut out = std::io::stdout().lock();
    #[allow(clippy::print_stdout)]
    let written = if args.json {
        serde_json::to_string_pretty(&view).map_err(std::io::Error::other).and_then(|s| writeln!(out, "{s}"))
    } else {
        render(&view, &mut out)
    };
    if written.is_err() {
        return 2;
    }
    i32::from(view.problems.iter().any(|p| p.severity == Severity::Error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::report::{ProblemReport, RouteReport};

    fn write_conflist(path: &Path, ipam: serde_json::Value) {
        let doc = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "headcni", "ipam": ipam}]});
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, doc.to_string()).unwrap();
    }

    #[test]
    fn ipam_usage_of_headcni_ipam_and_host_local() {
        let dir = tempfile::tempdir().unwrap();
        let conflist = dir.path().join("net.d/10-headcni.conflist");
        let data = dir.path().join("ipam");
        write_conflist(&conflist, serde_json::json!({"type": "headcni-ipam", "dataDir": data}));
        let before = ipam_view(&conflist).unwrap();
        assert_eq!((before.used, before.total, before.error.clone()), (0, None, None));

        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet",
            "ipam": {"type": "headcni-ipam", "subnet": "10.44.0.0/28", "dataDir": data}});
        for cid in ["c1", "c2", "c3"] {
            let env: std::collections::HashMap<String, String> =
                [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", cid), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            let req = crate::cni::parse_request(crate::cni::Command::Add, &env, conf.to_string().as_bytes()).unwrap();
            crate::ipam::run_in_process(&req).unwrap();
        }
        let v = ipam_view(&conflist).unwrap();
        assert_eq!((v.used, v.total, v.free), (3, Some(13), Some(10)), "{v:?}");
        assert!(v.text().contains("3 of 13"), "{}", v.text());

        let hl = dir.path().join("hl");
        std::fs::create_dir_all(hl.join("podnet")).unwrap();
        for name in ["10.44.0.2", "10.44.0.3", "lock", "last_reserved_ip.0"] {
            std::fs::write(hl.join("podnet").join(name), "x").unwrap();
        }
        write_conflist(&conflist, serde_json::json!({"type": "host-local", "dataDir": hl}));
        let v = ipam_view(&conflist).unwrap();
        assert_eq!((v.plugin.as_str(), v.used, v.total), ("host-local", 2, None));
    }

    #[test]
    fn an_exhausted_pool_is_a_problem_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (a, report, live) = healthy(dir.path());
        let data = dir.path().join("ipam");
        write_conflist(
            &a.conf_dir.join(&a.conflist_name),
            serde_json::json!({"type": "headcni-ipam", "dataDir": data}),
        );
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet",
            "ipam": {"type": "headcni-ipam", "subnet": "10.44.0.0/30", "dataDir": data}});
        let env: std::collections::HashMap<String, String> =
            [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "only"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let req = crate::cni::parse_request(crate::cni::Command::Add, &env, conf.to_string().as_bytes()).unwrap();
        crate::ipam::run_in_process(&req).unwrap();
        let v = assess(&a, Some(report), &live, 0);
        let p = v.problems.iter().find(|p| p.message.contains("exhausted")).expect("exhaustion reported");
        assert!(p.fix.as_deref().unwrap_or("").contains("headcni ipam gc"));
    }

    fn args(dir: &Path) -> StatusArgs {
        StatusArgs {
            json: false,
            tailscale_socket: dir.join("ts.sock"),
            run_dir: dir.join("run"),
            conf_dir: dir.join("net.d"),
            conflist_name: "10-headcni.conflist".into(),
            proc_sys_dir: PROC_SYS.into(),
        }
    }

    fn status(name: &str) -> Status {
        let text =
            std::fs::read_to_string(format!("{}/tests/fixtures/tailscale/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn prefs(name: &str) -> Prefs {
        let text =
            std::fs::read_to_string(format!("{}/tests/fixtures/tailscale/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        Prefs::from_json(serde_json::from_str(&text).unwrap())
    }

    fn healthy(dir: &Path) -> (StatusArgs, AgentReport, Live) {
        let a = args(dir);
        std::fs::create_dir_all(&a.conf_dir).unwrap();
        std::fs::write(a.conf_dir.join("10-headcni.conflist"), "{}").unwrap();
        let pod: IpNetwork = "10.244.1.0/24".parse().unwrap();
        NodeFile { node_name: Some("node-1".into()), pod_cidrs: vec![pod], mtu: Some(1280), ..Default::default() }
            .store(&nodefile::path_in(&a.run_dir))
            .unwrap();
        let report = AgentReport {
            updated_at: 1000,
            node_name: Some("node-1".into()),
            pod_cidrs: vec![pod],
            pod_cidr_source: "node".into(),
            routes: vec![RouteReport { cidr: pod, advertised: true, approved: Some(true) }],
            approval: "api".into(),
            masquerade: true,
            mtu: Some(1280),
            ready: true,
            ..Default::default()
        };
        let live = Live {
            status: Some(Ok(status("status-peer-approved.json"))),
            prefs: Some(prefs("prefs-joined.json")),
            forwarding_v4: Some(true),
            forwarding_v6: None,
            rules: Some(vec![pod]),
            tables: Some(vec![(Family::Ipv4, 3)]),
            link: Some(("tailscale0".into(), 1280)),
        };
        (a, report, live)
    }

    #[test]
    fn all_good_renders_one_screen() {
        let dir = tempfile::tempdir().unwrap();
        let (a, report, live) = healthy(dir.path());
        let v = assess(&a, Some(report), &live, 1010);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let mut out = Vec::new();
        render(&v, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().count() <= 24, "{text}");
        for needle in [
            "route        10.244.1.0/24: advertised, approved",
            "peer         node-1 100.64.0.1: accepting 10.244.1.0/24",
            "All good.",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }

    #[test]
    fn each_wrong_thing_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let (a, mut report, mut live) = healthy(dir.path());
        report.routes[0].approved = Some(false);
        report.problems.push(ProblemReport {
            id: "approval".into(),
            severity: Severity::Waiting,
            message: "route 10.244.1.0/24 pending approval in Headscale".into(),
            hint: Some("autoApprovers".into()),
        });
        let mut p = prefs("prefs-default.json");
        p.advertise_routes = vec!["10.244.1.0/24".into()];
        live.prefs = Some(p);
        live.forwarding_v4 = Some(false);
        live.tables = Some(vec![]);
        live.link = Some(("tailscale0".into(), 1200));
        std::fs::remove_file(nodefile::path_in(&a.run_dir)).unwrap();
        std::fs::write(a.conf_dir.join("05-other.conflist"), "{}").unwrap();
        let v = assess(&a, Some(report), &live, 1010);
        let text: Vec<String> =
            v.problems.iter().map(|p| format!("{} → {}", p.message, p.fix.clone().unwrap_or_default())).collect();
        let all = text.join("\n");
        for needle in [
            "not approved in Headscale",
            "pending approval",
            "accept-routes is off",
            "SNAT is on",
            "IPv4 forwarding is off",
            "no masquerade table",
            "pod MTU 1280 is larger than tailscale0's MTU 1200",
            "node file",
            "05-other.conflist sorts before",
        ] {
            assert!(all.contains(needle), "{needle} missing:\n{all}");
        }
        assert!(v.problems.iter().all(|p| p.fix.is_some()), "{all}");
    }

    #[test]
    fn no_agent_and_no_tailscaled() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        let live = Live { status: Some(Err("tailscaled is not reachable".into())), ..Default::default() };
        let v = assess(&a, None, &live, 5000);
        let all: Vec<&str> = v.problems.iter().map(|p| p.message.as_str()).collect();
        assert!(all.iter().any(|m| m.contains("has not reported")), "{all:?}");
        assert!(all.iter().any(|m| m.contains("not reachable")), "{all:?}");
        assert!(all.iter().any(|m| m.contains("no CNI configuration")), "{all:?}");
        let (a, report, live) = healthy(dir.path());
        let v = assess(&a, Some(report), &live, 1000 + STALE_AFTER_SECS + 1);
        assert!(v.problems.iter().any(|p| p.message.contains("last report")));
    }

    #[test]
    fn uninstall_in_progress_is_shown() {
        let dir = tempfile::tempdir().unwrap();
        let (a, mut report, live) = healthy(dir.path());
        report.teardown = "done".into();
        report.ready = false;
        let v = assess(&a, Some(report), &live, 1010);
        assert_eq!(v.uninstall.as_deref(), Some("done"));
        let p = v.problems.iter().find(|p| p.message.contains("being uninstalled")).unwrap();
        assert!(p.fix.as_deref().unwrap().contains("headcni install --uninstall"));
        let mut out = Vec::new();
        render(&v, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("agent        uninstalling, teardown done"), "{text}");
    }
}
