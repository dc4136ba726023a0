//! `headcni status --cluster`: every node of the cluster on one screen, from the Node objects
//! and each node's agent (its `/status`, the report `headcni status` reads on the node). Exit
//! code 1 when any node has a problem.
//!
//! The same three steps as on one node: [`gather`] asks the Kubernetes API and the agents,
//! [`assess`] judges (pure), [`render`] draws. The agents are reached either directly at each
//! Node's InternalIP and the metrics port (inside the cluster: the agents run on the host
//! network, as Prometheus scrapes them), or through the API server's proxy to the agent pods
//! (from a workstation with a kubeconfig: needs `list pods` and `get pods/proxy` in the
//! agents' namespace).

use super::STALE_AFTER_INTERVALS;
use crate::agent::report::{AgentReport, Severity};
use crate::clients::http::{Endpoint, HttpRequest};
use crate::clients::kube::{Kube, KubeError};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

/// How long one agent may take to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agents are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// `direct` inside the cluster (no --kubeconfig), `proxy` with a kubeconfig.
    Auto,
    /// Each Node's InternalIP at the metrics port.
    Direct,
    /// The API server's proxy to each agent pod.
    Proxy,
}

/// What `--cluster` needs besides the node flags.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub namespace: String,
    pub selector: String,
    pub via: Via,
    pub port: u16,
}

/// One Node as the API has it.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: String,
    pub internal_ip: Option<String>,
    pub pod_cidrs: Vec<String>,
    pub ready: Option<bool>,
}

/// What was found about one node.
#[derive(Debug, Clone)]
pub struct Found {
    pub node: NodeInfo,
    /// The agent's report, or why there is none.
    pub report: Result<AgentReport, String>,
}

/// One node's line.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    pub node_ready: Option<bool>,
    pub agent: String,
    pub version: Option<String>,
    pub pod_cidrs: Vec<String>,
    /// "approved", "pending", "not advertised" or "unknown".
    pub approval: String,
    pub peers: Vec<PeerPathView>,
    pub pod_mtu: Option<u32>,
    pub tailnet_mtu: Option<u32>,
    pub problems: Vec<super::Finding>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerPathView {
    pub peer: String,
    pub path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub relay: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterView {
    pub nodes: Vec<NodeView>,
    /// Problems with the view itself (the API could not be read).
    pub problems: Vec<super::Finding>,
}

impl ClusterView {
    /// Whether anything is wrong somewhere: the exit code's question.
    pub fn has_errors(&self) -> bool {
        self.problems.iter().chain(self.nodes.iter().flat_map(|n| &n.problems)).any(|p| p.severity == Severity::Error)
    }
}

fn node_info(n: &Node) -> NodeInfo {
    let status = n.status.as_ref();
    let spec = n.spec.as_ref();
    let mut pod_cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if pod_cidrs.is_empty()
        && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
    {
        pod_cidrs.push(c);
    }
    NodeInfo {
        name: n.metadata.name.clone().unwrap_or_default(),
        internal_ip: status
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address.clone()),
        pod_cidrs,
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status == "True"),
    }
}

fn parse_report(body: &[u8]) -> Result<AgentReport, String> {
    serde_json::from_slice(body).map_err(|e| format!("the agent's /status is not a report: {e}"))
}

async fn direct(ip: &str, port: u16) -> Result<AgentReport, String> {
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
    let endpoint = Endpoint::from_url(&format!("http://{host}:{port}"), None).map_err(|e| e.to_string())?;
    let mut req = HttpRequest::new(hyper::Method::GET, "/status");
    req.timeout = AGENT_TIMEOUT;
    let resp = endpoint.send(req).await.map_err(|e| e.to_string())?;
    if !resp.status.is_success() {
        return Err(format!("http://{host}:{port}/status answered {}: {}", resp.status, resp.snippet()));
    }
    parse_report(&resp.body)
}

async fn proxied(kube: &Kube, namespace: &str, pod: &str, port: u16) -> Result<AgentReport, String> {
    let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/status");
    let what = format!("pod {namespace}/{pod} through the API server's proxy");
    let req = hyper::Request::get(path).body(Vec::new()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(AGENT_TIMEOUT, kube.client().request_text(req)).await {
        Ok(Ok(text)) => parse_report(text.as_bytes()),
        Ok(Err(e)) => Err(KubeError::from_kube(&what, e).to_string()),
        Err(_) => Err(format!("{what}: no answer within {AGENT_TIMEOUT:?}")),
    }
}

/// Reads the Nodes and asks every agent. `Err`: the API cannot be read at all.
pub async fn gather(opts: &ClusterOptions) -> Result<Vec<Found>, String> {
    let kube = Kube::from_kubeconfig_or_in_cluster(opts.kubeconfig.as_deref()).await.map_err(|e| e.to_string())?;
    let nodes: Vec<NodeInfo> =
        kube.list::<Node>("", "").await.map_err(|e| format!("listing the Nodes: {e}"))?.iter().map(node_info).collect();
    let via = match opts.via {
        Via::Auto if opts.kubeconfig.as_ref().is_some_and(|p| !p.as_os_str().is_empty()) => Via::Proxy,
        Via::Auto => Via::Direct,
        v => v,
    };
    let mut pods: BTreeMap<String, String> = BTreeMap::new();
    let mut pods_error = None;
    if via == Via::Proxy {
        match kube.list::<Pod>(&opts.namespace, &opts.selector).await {
            Ok(list) => {
                for p in list {
                    if let (Some(node), Some(name)) = (p.spec.and_then(|s| s.node_name), p.metadata.name) {
                        pods.insert(node, name);
                    }
                }
            }
            Err(e) => pods_error = Some(format!("listing the agent pods: {e}")),
        }
    }
    let asks = nodes.iter().map(|n| {
        let (kube, pods, pods_error) = (&kube, &pods, &pods_error);
        async move {
            let report = match via {
                Via::Proxy => match (pods.get(&n.name), pods_error) {
                    (_, Some(e)) => Err(e.clone()),
                    (Some(pod), None) => proxied(kube, &opts.namespace, pod, opts.port).await,
                    (None, None) => Err(format!(
                        "no agent pod on this node (pods in {} labelled {})",
                        opts.namespace, opts.selector
                    )),
                },
                _ => match &n.internal_ip {
                    Some(ip) => direct(ip, opts.port).await,
                    None => Err("the Node has no InternalIP to reach its agent at".into()),
                },
            };
            Found { node: n.clone(), report }
        }
    });
    Ok(futures::future::join_all(asks).await)
}

fn finding(severity: Severity, message: String, fix: &str) -> super::Finding {
    super::Finding { severity, message, fix: Some(fix.to_string()) }
}

/// Judges what was found. Pure: `now` is the clock.
pub fn assess(found: &[Found], now: u64) -> ClusterView {
    let mut nodes = Vec::new();
    for f in found {
        let mut v = NodeView {
            name: f.node.name.clone(),
            node_ready: f.node.ready,
            agent: String::new(),
            version: None,
            pod_cidrs: f.node.pod_cidrs.clone(),
            approval: "unknown".into(),
            peers: Vec::new(),
            pod_mtu: None,
            tailnet_mtu: None,
            problems: Vec::new(),
        };
        match &f.report {
            Err(e) => {
                v.agent = "unreachable".into();
                v.problems.push(finding(
                    Severity::Error,
                    format!("no answer from the agent: {e}"),
                    "is the headcni agent running on this node? kubectl -n kube-system get pods -o wide -l \
                     app.kubernetes.io/component=agent",
                ));
            }
            Ok(r) => {
                let age = now.saturating_sub(r.updated_at);
                let stale_after =
                    r.report_interval_secs.map_or(super::STALE_AFTER_SECS, |i| i.max(1) * STALE_AFTER_INTERVALS);
                v.agent = if age > stale_after {
                    "silent".into()
                } else if !r.teardown.is_empty() {
                    format!("uninstall {}", r.teardown)
                } else if r.ready {
                    "ready".into()
                } else {
                    "not ready".into()
                };
                v.version = Some(r.version.clone()).filter(|s| !s.is_empty());
                if !r.pod_cidrs.is_empty() {
                    v.pod_cidrs = r.pod_cidrs.iter().map(ToString::to_string).collect();
                }
                v.approval = if r.routes.is_empty() {
                    "unknown".into()
                } else if r.routes.iter().any(|rt| !rt.advertised) {
                    "not advertised".into()
                } else if r.routes.iter().all(|rt| rt.approved == Some(true)) {
                    "approved".into()
                } else {
                    "pending".into()
                };
                v.pod_mtu = r.cni_config.as_ref().and_then(|c| c.mtu).or(r.mtu);
                v.tailnet_mtu = r.tailnet_link.as_ref().map(|l| l.mtu);
                v.peers = r
                    .peers
                    .iter()
                    .map(|p| PeerPathView {
                        peer: p.hostname.clone(),
                        path: if p.path.is_empty() { "unknown".into() } else { p.path.clone() },
                        endpoint: p.endpoint.clone(),
                        relay: p.relay.clone(),
                    })
                    .collect();
                if age > stale_after {
                    v.problems.push(finding(
                        Severity::Error,
                        format!("the agent is silent: its last report is {age}s old"),
                        "see the agent's logs on this node; kubectl -n kube-system delete pod <its agent> restarts it",
                    ));
                } else {
                    for p in r.problems.iter().filter(|p| p.severity >= Severity::Warning) {
                        v.problems.push(super::Finding {
                            severity: p.severity,
                            message: p.message.clone(),
                            fix: p.hint.clone(),
                        });
                    }
                    if !r.ready && r.teardown.is_empty() && !v.problems.iter().any(|p| p.severity == Severity::Error) {
                        let why = r.problems.first().map(|p| p.message.clone()).unwrap_or_else(|| "starting".into());
                        v.problems.push(finding(
                            Severity::Error,
                            format!("the agent is not ready: {why}"),
                            "headcni status on this node shows every check with its fix",
                        ));
                    }
                }
                let known: Vec<String> = f.node.pod_cidrs.clone();
                if !known.is_empty() && !r.pod_cidrs.is_empty() {
                    let reported: Vec<String> = r.pod_cidrs.iter().map(ToString::to_string).collect();
                    if reported != known {
                        v.problems.push(finding(
                            Severity::Warning,
                            format!("the agent uses {} but the Node has {}", reported.join(","), known.join(",")),
                            "an agent with --pod-cidr overrides the Node; leave it out to follow the Node",
                        ));
                    }
                }
            }
        }
        if f.node.ready == Some(false) {
            v.problems.push(finding(
                Severity::Warning,
                "the Node is not Ready".into(),
                "kubectl describe node shows why (the network is one reason among others)",
            ));
        }
        v.problems.sort_by_key(|p| std::cmp::Reverse(p.severity));
        nodes.push(v);
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    ClusterView { nodes, problems: Vec::new() }
}

/// The screen: a line per node, then each peer path, then the problems.
pub fn render(v: &ClusterView, out: &mut impl Write) -> std::io::Result<()> {
    let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "{:<20} {:<11} {:<9} {:<34} {:<14} {:<14} {:<9}",
        "NODE", "AGENT", "VERSION", "POD CIDRS", "ROUTE", "PEERS d/r/i", "MTU"
    )?;
    for n in &v.nodes {
        let count = |path: &str| n.peers.iter().filter(|p| p.path == path).count();
        writeln!(
            out,
            "{:<20} {:<11} {:<9} {:<34} {:<14} {:<14} {:<9}",
            n.name,
            n.agent,
            dash(n.version.clone()),
            if n.pod_cidrs.is_empty() { "-".into() } else { n.pod_cidrs.join(",") },
            n.approval,
            format!("{}/{}/{}", count("direct"), count("relay"), count("idle")),
            format!("{}/{}", dash(n.pod_mtu.map(|m| m.to_string())), dash(n.tailnet_mtu.map(|m| m.to_string()))),
        )?;
    }
    let paths: Vec<String> = v
        .nodes
        .iter()
        .flat_map(|n| {
            n.peers.iter().map(move |p| {
                let via = match p.path.as_str() {
                    "direct" if !p.endpoint.is_empty() => format!(" ({})", p.endpoint),
                    "relay" if !p.relay.is_empty() => format!(" (DERP {})", p.relay),
                    _ => String::new(),
                };
                format!("  {} -> {}: {}{via}", n.name, p.peer, p.path)
            })
        })
        .collect();
    if !paths.is_empty() {
        writeln!(out, "Paths (MTU is pod/tailnet):")?;
        for p in paths {
            writeln!(out, "{p}")?;
        }
    }
    let problems: Vec<(&str, &super::Finding)> = v
        .problems
        .iter()
        .map(|p| ("cluster", p))
        .chain(v.nodes.iter().flat_map(|n| n.problems.iter().map(move |p| (n.name.as_str(), p))))
        .collect();
    if problems.is_empty() {
        writeln!(out, "All {} nodes good.", v.nodes.len())?;
    } else {
        writeln!(out, "Problems:")?;
        for (node, p) in problems {
            let tag = match p.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "WARN ",
                Severity::Waiting => "WAIT ",
            };
            writeln!(out, "  {tag} {node}: {}", p.message)?;
            if let Some(fix) = &p.fix {
                writeln!(out, "        → {fix}")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::report::{LinkReport, PeerReport, ProblemReport, RouteReport};

    fn node(name: &str, cidr: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ip: Some("10.99.0.11".into()),
            pod_cidrs: vec![cidr.into()],
            ready: Some(true),
        }
    }

    fn report(name: &str, cidr: &str, peer: &str, path: &str) -> AgentReport {
        AgentReport {
            version: "0.1.0".into(),
            updated_at: 1000,
            report_interval_secs: Some(6),
            node_name: Some(name.into()),
            pod_cidrs: vec![cidr.parse().unwrap()],
            routes: vec![RouteReport {
                cidr: cidr.parse().unwrap(),
                advertised: true,
                approved: Some(true),
                admitted: Some(true),
            }],
            peers: vec![PeerReport {
                hostname: peer.into(),
                tailscale_ips: vec![],
                routes: vec![],
                online: true,
                path: path.into(),
                endpoint: if path == "direct" { "10.99.0.12:41641".into() } else { String::new() },
                relay: "hca".into(),
            }],
            mtu: Some(1280),
            tailnet_link: Some(LinkReport { name: "tailscale0".into(), mtu: 1280 }),
            ready: true,
            ..Default::default()
        }
    }

    #[test]
    fn every_node_with_its_paths_and_a_problem_anywhere_fails() {
        let good = [
            Found {
                node: node("node-1", "10.244.1.0/24"),
                report: Ok(report("node-1", "10.244.1.0/24", "node-2", "direct")),
            },
            Found {
                node: node("node-2", "10.244.2.0/24"),
                report: Ok(report("node-2", "10.244.2.0/24", "node-1", "relay")),
            },
        ];
        let v = assess(&good, 1005);
        assert!(!v.has_errors(), "{:?}", v.nodes);
        let mut out = Vec::new();
        render(&v, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "node-1               ready       0.1.0     10.244.1.0/24",
            "approved",
            "1/0/0",
            "1280/1280",
            "node-1 -> node-2: direct (10.99.0.12:41641)",
            "node-2 -> node-1: relay (DERP hca)",
            "All 2 nodes good.",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }

        // One node silent, one unreachable, one with a pending route and a larger MTU.
        let mut pending = report("node-3", "10.244.3.0/24", "node-1", "direct");
        pending.updated_at = 1010;
        pending.routes[0].approved = Some(false);
        pending.ready = false;
        pending.cni_config =
            Some(crate::agent::report::CniConfigReport { mtu: Some(1420), headcni: true, ..Default::default() });
        pending.problems.push(ProblemReport {
            id: "dataplane/mtu_above_tailnet".into(),
            severity: Severity::Warning,
            message: "05-seed.conf sets the pod MTU to 1420".into(),
            hint: Some("remove \"mtu\"".into()),
        });
        let found = [
            good[0].clone(),
            Found {
                node: node("node-2", "10.244.2.0/24"),
                report: Ok(report("node-2", "10.244.2.0/24", "node-1", "relay")),
            },
            Found { node: node("node-3", "10.244.3.0/24"), report: Ok(pending) },
            Found {
                node: node("node-4", "10.244.4.0/24"),
                report: Err("connecting to 10.99.0.14:8080: refused".into()),
            },
        ];
        let v = assess(&found, 1013);
        assert!(v.has_errors());
        let by = |n: &str| v.nodes.iter().find(|x| x.name == n).unwrap();
        assert_eq!(by("node-1").agent, "silent");
        assert_eq!(by("node-3").approval, "pending");
        assert_eq!(by("node-3").pod_mtu, Some(1420));
        assert!(by("node-3").problems.iter().any(|p| p.message.contains("not ready")));
        assert_eq!(by("node-4").agent, "unreachable");
        let mut out = Vec::new();
        render(&v, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("ERROR node-4: no answer from the agent"), "{text}");
        assert!(text.contains("ERROR node-1: the agent is silent"), "{text}");
        assert!(text.contains("WARN  node-3: 05-seed.conf sets the pod MTU to 1420"), "{text}");
    }
}
