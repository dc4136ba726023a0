//! The judgement of `headcni status`: from what [`super::gather`] found to the view, with a
//! problem and its fix for every line that is wrong. Pure: no I/O.

use super::{Finding, Live, PeerView, RouteView, STALE_AFTER_INTERVALS, STALE_AFTER_SECS, StatusArgs, StatusView};
use crate::agent::hostnet::TABLE;
use crate::agent::report::{self, AgentReport, Severity};
use crate::nodefile;
use ipnetwork::IpNetwork;

/// Adds a problem once; the same message found again (the agent's report, then a live check)
/// keeps the higher severity.
fn find(view: &mut StatusView, severity: Severity, message: impl Into<String>, fix: Option<&str>) {
    let message = message.into();
    match view.problems.iter_mut().find(|p| p.message == message) {
        Some(p) => p.severity = p.severity.max(severity),
        None => view.problems.push(Finding { severity, message, fix: fix.map(str::to_string) }),
    }
}

/// Builds the view from the agent's report, the live findings and the files.
pub fn assess(args: &StatusArgs, report: Option<AgentReport>, live: &Live, now: u64) -> StatusView {
    let node_file = &live.files.node_file;
    let mut v = StatusView {
        node_file: nodefile::path_in(&args.run_dir).display().to_string(),
        node_file_present: matches!(node_file, Ok(Some(_))),
        conflist: args.conf_dir.join(&args.conflist_name).display().to_string(),
        conflist_present: live.files.conflist_present,
        ipam: live.files.ipam.clone(),
        network_policy: live.files.policy.clone(),
        ..StatusView::default()
    };
    if let Some(p) = v.network_policy.clone().filter(|p| p.enabled) {
        for problem in &p.problems {
            find(
                &mut v,
                Severity::Error,
                format!("NetworkPolicy: {problem}"),
                Some("the rules applied last stay in force; see the agent's log"),
            );
        }
        if !p.synced && p.problems.is_empty() {
            find(&mut v, Severity::Waiting, "NetworkPolicy: listing policies, pods and namespaces", None);
        }
    }
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
            format!("the agent has not reported on this node (no {})", report::path_in(&args.run_dir).display()),
            Some("is the headcni agent pod running on this node? (kubectl -n kube-system get pods -o wide)"),
        ),
        Some(r) => {
            let age = now.saturating_sub(r.updated_at);
            let stale_after = r.report_interval_secs.map_or(STALE_AFTER_SECS, |i| i.max(1) * STALE_AFTER_INTERVALS);
            v.agent_report_age_secs = Some(age);
            v.agent_running = age <= stale_after;
            v.agent_ready = Some(r.ready);
            if !v.agent_running {
                let due = r.report_interval_secs.map(|i| format!(", one was due every {i}s")).unwrap_or_default();
                find(
                    &mut v,
                    Severity::Error,
                    format!("the agent is silent: its last report is {age}s old{due}"),
                    Some(
                        "is the headcni agent running on this node? kubectl -n kube-system get pods -o wide -l \
                         app.kubernetes.io/component=agent; then its logs",
                    ),
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
            v.controller = r.controller.as_ref().map(|c| {
                let approved: Vec<String> = c.approved.iter().map(ToString::to_string).collect();
                let mut line = format!(
                    "{}: {} approved on Headscale node {}",
                    c.state.as_str(),
                    if approved.is_empty() { "nothing".into() } else { approved.join(", ") },
                    if c.headscale_node.is_empty() { "-" } else { &c.headscale_node }
                );
                if !c.message.is_empty() {
                    line.push_str(&format!(" ({})", c.message));
                }
                line
            });
            v.pod_mtu = r.mtu;
            v.masquerade_enabled = Some(r.masquerade);
            v.cluster_destinations = r.cluster_destinations.iter().map(ToString::to_string).collect();
            v.routes = r
                .routes
                .iter()
                .map(|rt| RouteView {
                    cidr: rt.cidr.to_string(),
                    advertised: Some(rt.advertised),
                    approved: rt.approved,
                    admitted: rt.admitted,
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
    if let Ok(Some(nf)) = node_file {
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
                    path: p.path().as_str().to_string(),
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
        let mut sorted = rules.clone();
        sorted.sort_by_key(|r| (r.priority, r.ipv6));
        v.rules = sorted.iter().map(|r| format!("{}: {r}", r.priority)).collect();
        for p in &pods {
            if !rules.iter().any(|r| r.dst == Some(*p) && r.table() == Some(crate::netlink::TABLE_MAIN)) {
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
        if !pods.is_empty() && !rules.iter().any(|r| r.suppress_prefixlen == Some(0) && !r.ipv6) {
            find(
                &mut v,
                Severity::Error,
                "no rule keeps the main table's specific routes ahead of Tailscale's table 52: a peer advertising \
                 this node's LAN would capture its traffic",
                Some("the agent adds it; see its logs"),
            );
        }
    }
    if let Some(unreachable) = &live.unreachable {
        v.unreachable = unreachable.iter().map(ToString::to_string).collect();
        for p in pods.iter().filter(|p| !unreachable.contains(p)) {
            find(
                &mut v,
                Severity::Warning,
                format!("no unreachable route for {p}: traffic to its unassigned addresses follows the default route"),
                Some("the agent adds it; see its logs"),
            );
        }
    }
    v.guard = live.guard;
    if live.guard == Some(false) {
        find(
            &mut v,
            Severity::Error,
            format!(
                "the anti-spoofing guard (nft table inet {}) is missing: pods can send with any source address",
                crate::podguard::TABLE
            ),
            Some("the agent and every pod ADD put it back; see the agent's logs"),
        );
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
    // What pods get: the configuration's MTU where the one in use sets it, else the node file's.
    let in_use = live.files.in_use.as_ref().ok().and_then(Option::as_ref);
    let set_by_config = in_use.filter(|u| u.headcni).and_then(|u| u.mtu.map(|m| (m, u.file.clone())));
    if let Some((m, _)) = &set_by_config {
        v.pod_mtu = Some(*m);
    }
    if let Some((name, mtu)) = &live.link {
        v.tailnet_interface = Some(name.clone());
        v.tailnet_mtu = Some(*mtu);
        if let Some(pod) = v.pod_mtu
            && pod > *mtu
        {
            let (source, fix) = match &set_by_config {
                Some((_, file)) => (
                    format!(" (set by {file})"),
                    format!(
                        "remove \"mtu\" from {} (pods then get the agent's MTU) or set it to at most {mtu}; pods \
                         get the new MTU when they are recreated",
                        args.conf_dir.join(file).display()
                    ),
                ),
                None => (
                    String::new(),
                    format!(
                        "run the agent with --mtu auto (chart: config.network.mtu=auto) or at most {mtu}; pods get \
                         the new MTU when they are recreated"
                    ),
                ),
            };
            find(
                &mut v,
                Severity::Error,
                format!(
                    "pod MTU {pod}{source} is larger than {name}'s MTU {mtu}: packets larger than {mtu} bytes \
                     between pods on different nodes are lost (TLS handshakes and large transfers hang)"
                ),
                Some(&fix),
            );
        }
    }

    // Files.
    let (nf_path, cl_path) = (v.node_file.clone(), v.conflist.clone());
    match node_file {
        Ok(Some(_)) => {}
        Ok(None) => find(
            &mut v,
            Severity::Error,
            format!("the node file {nf_path} is missing: the plugin cannot set up pods"),
            Some("the agent writes it once it knows the pod CIDRs and the MTU"),
        ),
        Err(e) => find(&mut v, Severity::Error, e.to_string(), Some("the agent rewrites it")),
    }
    v.cni_config_in_use = in_use.map(|u| u.file.clone());
    if let Err(e) = &live.files.in_use {
        find(
            &mut v,
            Severity::Error,
            format!("cannot read the CNI configuration directory {}: {e}", args.conf_dir.display()),
            Some(
                "run status where the node's CNI configuration directory is (the chart mounts it), or pass --conf-dir",
            ),
        );
    } else if let Some(u) = in_use.filter(|u| !u.headcni) {
        find(
            &mut v,
            Severity::Error,
            format!(
                "the container runtime uses {} (network {:?}), which sorts before {} in {}: pods on this node do not \
                 get HeadCNI's network",
                u.file,
                u.network,
                args.conflist_name,
                args.conf_dir.display()
            ),
            Some(&format!(
                "remove {} from the node, or install with --exclusive (chart: cni.exclusive=true), which sets other \
                 networks' configurations aside",
                u.file
            )),
        );
    } else if !v.conflist_present && in_use.is_none() {
        find(
            &mut v,
            Severity::Error,
            format!("no CNI configuration at {cl_path}: the runtime does not use HeadCNI"),
            Some("headcni install (the chart's init container) writes it"),
        );
    }
    // A running agent that is not ready says why among its problems; when none of them is an
    // error (waiting for an approval, a warning that blocks readiness), it is one here.
    if v.agent_running
        && v.agent_ready == Some(false)
        && v.uninstall.is_none()
        && !v.problems.iter().any(|p| p.severity == Severity::Error)
    {
        let why = report
            .as_ref()
            .and_then(|r| r.problems.first())
            .map(|p| p.message.clone())
            .unwrap_or_else(|| "starting".into());
        find(
            &mut v,
            Severity::Error,
            format!("the agent is not ready: {why}"),
            Some("the lines above say what it waits for; pods on this node may not get the network"),
        );
    }
    v.problems.sort_by_key(|p| std::cmp::Reverse(p.severity));
    v
}
