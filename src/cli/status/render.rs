//! The screen of `headcni status`: the view, one line a part, then the problems with fixes.

use super::{IpamView, StatusView};
use crate::agent::report::Severity;
use std::io::Write;

fn yes(b: Option<bool>, t: &str, f: &str) -> String {
    match b {
        Some(true) => t.into(),
        Some(false) => f.into(),
        None => "unknown".into(),
    }
}

/// Writes the view as the screen a person reads.
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
        (false, Some(age), _) => format!("SILENT (last report {age}s ago)"),
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
            "  route        {}: {}, {}{} ({})",
            r.cidr,
            yes(r.advertised, "advertised", "NOT advertised"),
            yes(r.approved, "approved", "NOT approved"),
            match r.admitted {
                Some(true) => ", admitted by the packet filter",
                Some(false) => ", NOT admitted by the packet filter",
                None => "",
            },
            match v.approval.as_str() {
                "api" => "approved by the agent",
                "controller" => "approval by the controller",
                _ => "approval by policy",
            }
        )?;
    }
    if let Some(c) = &v.controller {
        writeln!(out, "  controller   {c}")?;
    } else if v.approval == "controller" {
        writeln!(out, "  controller   no word on this Node yet (is headcni controller running?)")?;
    }
    if v.peers.is_empty() {
        writeln!(out, "  peers        none")?;
    }
    for p in &v.peers {
        writeln!(
            out,
            "  peer         {} {}{}: {}, {}",
            p.hostname,
            p.tailscale_ips.first().map(String::as_str).unwrap_or("-"),
            if p.online { "" } else { " (offline)" },
            if p.routes.is_empty() { "no routes".into() } else { format!("accepting {}", p.routes.join(", ")) },
            if p.path.is_empty() { "path unknown" } else { p.path.as_str() }
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
    if v.rules.is_empty() {
        writeln!(out, "  ip rules     none")?;
    }
    for (i, r) in v.rules.iter().enumerate() {
        writeln!(out, "  {}{r}", if i == 0 { "ip rules     " } else { "             " })?;
    }
    if !v.cluster_destinations.is_empty() {
        writeln!(out, "  pod traffic  stays pod traffic to {}", v.cluster_destinations.join(", "))?;
    }
    writeln!(
        out,
        "  refused      {}",
        match (v.guard, v.unreachable.is_empty()) {
            (Some(true), false) => format!("spoofed pod sources; unassigned addresses of {}", v.unreachable.join(", ")),
            (Some(true), true) => "spoofed pod sources".to_string(),
            (Some(false), _) => "NOTHING: the anti-spoofing guard is missing".to_string(),
            (None, _) => "-".to_string(),
        }
    )?;
    let masq = match v.masquerade_enabled {
        Some(false) => "disabled".to_string(),
        _ if v.masquerade_tables.is_empty() => "no table".to_string(),
        _ => v.masquerade_tables.join(", "),
    };
    writeln!(out, "  masquerade   {masq}")?;
    let netpol = match &v.network_policy {
        None => "no report".to_string(),
        Some(p) if !p.enabled => "off (enable_network_policy false): no table".to_string(),
        Some(p) if !p.synced => "on, listing policies, pods and namespaces".to_string(),
        Some(p) => format!(
            "on: {} of {} policies in force; {} local pods, isolated {} ingress, {} egress; {} chains, {} elements; {} applies",
            p.stats.policies_in_force,
            p.policies,
            p.stats.local_pods,
            p.stats.isolated_ingress,
            p.stats.isolated_egress,
            p.stats.chains,
            p.stats.elements,
            p.applies
        ),
    };
    writeln!(out, "  netpol       {netpol}")?;
    writeln!(out, "  node file    {} ({})", v.node_file, if v.node_file_present { "present" } else { "MISSING" })?;
    writeln!(out, "  conflist     {} ({})", v.conflist, if v.conflist_present { "present" } else { "MISSING" })?;
    if let Some(file) = &v.cni_config_in_use
        && !v.conflist.ends_with(&format!("/{file}"))
    {
        writeln!(out, "  in use       {file} (the runtime's first configuration)")?;
    }
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
