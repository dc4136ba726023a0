//! What the agent saw and did in its last pass, published as `<run_dir>/agent-status.json` for
//! `headcni status` (no secrets in it), plus the problem list with de-duplicated logging.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const FILE_NAME: &str = "agent-status.json";

pub fn path_in(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE_NAME)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something the agent is waiting for (a podCIDR, an approval, tailscaled starting).
    Waiting,
    /// Works, but not as it should (e.g. an MTU larger than the tailnet's).
    Warning,
    /// A step failed.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemReport {
    pub id: String,
    pub severity: Severity,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TailnetReport {
    pub backend_state: String,
    pub control_url: String,
    pub tailscale_ips: Vec<std::net::IpAddr>,
    pub node_key: String,
    pub route_all: bool,
    pub no_snat: bool,
    pub health: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteReport {
    pub cidr: IpNetwork,
    pub advertised: bool,
    /// `None`: unknown (tailscaled unreachable, or not asked yet).
    pub approved: Option<bool>,
    /// Whether the packet filter Headscale sent this node lets traffic from the tailnet in to
    /// the route: an approval takes effect for incoming connections only then. `None`: not
    /// approved yet, or not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    pub hostname: String,
    pub tailscale_ips: Vec<std::net::IpAddr>,
    pub routes: Vec<IpNetwork>,
    pub online: bool,
    /// "direct", "relay" (DERP or a peer relay) or "idle" (no traffic in the last 45 s).
    #[serde(default)]
    pub path: String,
    /// The peer's UDP endpoint on a direct path.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// The DERP region relayed packets go through.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub relay: String,
}

/// The CNI configuration the runtime uses, as the agent found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CniConfigReport {
    pub conf_dir: String,
    /// The file the runtime uses (the first one), if any.
    pub in_use: Option<String>,
    /// Whether that file is HeadCNI's.
    pub headcni: bool,
    /// The pod MTU it sets, if it sets one (it overrides the node file's).
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    pub name: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AgentReport {
    pub version: String,
    /// Unix seconds of the pass.
    pub updated_at: u64,
    /// The next report is due within this many seconds (the pause before the next pass plus
    /// the last pass's duration); `headcni status` calls an agent silent after twice this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_interval_secs: Option<u64>,
    pub node_name: Option<String>,
    pub hostname: String,
    pub pod_cidrs: Vec<IpNetwork>,
    /// "flag" or "node".
    pub pod_cidr_source: String,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    /// Where pod traffic stays pod traffic: routed to the tailnet, never masqueraded (the
    /// cluster CIDR, or every Node's pod CIDRs).
    pub cluster_destinations: Vec<IpNetwork>,
    pub tailnet: TailnetReport,
    pub routes: Vec<RouteReport>,
    /// "api" (the agent approves with an API key), "controller" (`headcni controller`
    /// approves what the Node's published identity binds) or "policy" (autoApprovers).
    pub approval: String,
    /// In controller mode: the controller's word on this Node (its annotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<crate::binding::ApprovalStatus>,
    pub peers: Vec<PeerReport>,
    /// The node file's pod MTU.
    pub mtu: Option<u32>,
    pub tailnet_link: Option<LinkReport>,
    pub cni_config: Option<CniConfigReport>,
    pub masquerade: bool,
    pub rule_priority: u32,
    pub node_file_written: bool,
    pub ready: bool,
    /// The uninstall signal: "" (none), "in progress" or "done" (routes withdrawn).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub teardown: String,
    pub problems: Vec<ProblemReport>,
}

impl AgentReport {
    pub fn load(run_dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(path_in(run_dir)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn store(&self, run_dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&path_in(run_dir), &text, 0o644, crate::fsutil::Durability::ProcessCrash)
    }
}

/// The steps of a pass, as the metrics count their failures
/// (`headcni_reconcile_step_failing{step="..."}`, `headcni_reconcile_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    PodCidrs,
    Tailscale,
    Prefs,
    Approval,
    Dataplane,
    NodeFile,
    State,
}

impl Step {
    pub const ALL: [Step; 7] =
        [Step::PodCidrs, Step::Tailscale, Step::Prefs, Step::Approval, Step::Dataplane, Step::NodeFile, Step::State];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::PodCidrs => "pod_cidrs",
            Step::Tailscale => "tailscale",
            Step::Prefs => "prefs",
            Step::Approval => "approval",
            Step::Dataplane => "dataplane",
            Step::NodeFile => "node_file",
            Step::State => "state",
        }
    }
}

/// What a problem is about: a step or one part of it, or the uninstall machinery. Its text
/// ([`ProblemId::as_str`]: "step" or "step/part") is the id in the status file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemId {
    PodCidrs,
    Tailscale,
    Prefs,
    /// tailscaled is logged in to another server than --headscale-url.
    PrefsControlUrl,
    Approval,
    /// The packet filter in force on this node lets no traffic in to an approved pod CIDR.
    PacketFilter,
    /// Publishing this node's identity on its Node (controller mode).
    Identity,
    Forwarding,
    Rules,
    /// The `unreachable` route of the own pod CIDR.
    Unreachable,
    /// The anti-spoofing guard.
    Guard,
    /// What the masquerade exemption and the tailnet-bound rules are built from.
    ClusterCidrs,
    Masquerade,
    Mtu,
    NodeFile,
    /// The conflist put where the runtime reads it (--publish-conflist).
    Conflist,
    State,
    /// The cleanup under the uninstall signal.
    Teardown,
    /// The uninstall signal cannot be read.
    UninstallSignal,
    /// The metrics and probe server cannot listen.
    MetricsServer,
    /// The runtime's CNI configuration is not HeadCNI's, or cannot be read.
    CniConfig,
    /// Pods get an MTU above the tailnet interface's (the flag, or the CNI configuration).
    MtuAboveTailnet,
}

impl ProblemId {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemId::PodCidrs => "pod_cidrs",
            ProblemId::Tailscale => "tailscale",
            ProblemId::Prefs => "prefs",
            ProblemId::PrefsControlUrl => "prefs/control_url",
            ProblemId::Approval => "approval",
            ProblemId::PacketFilter => "approval/packet_filter",
            ProblemId::Identity => "approval/identity",
            ProblemId::Forwarding => "dataplane/forwarding",
            ProblemId::Rules => "dataplane/rules",
            ProblemId::Unreachable => "dataplane/unreachable",
            ProblemId::Guard => "dataplane/guard",
            ProblemId::ClusterCidrs => "dataplane/cluster_cidrs",
            ProblemId::Masquerade => "dataplane/masquerade",
            ProblemId::Mtu => "dataplane/mtu",
            ProblemId::NodeFile => "node_file",
            ProblemId::Conflist => "node_file/conflist",
            ProblemId::State => "state",
            ProblemId::Teardown => "teardown",
            ProblemId::UninstallSignal => "uninstall_signal",
            ProblemId::MetricsServer => "metrics_server",
            ProblemId::CniConfig => "cni_config",
            ProblemId::MtuAboveTailnet => "dataplane/mtu_above_tailnet",
        }
    }

    /// The step this problem counts against in the metrics (none for the uninstall's).
    pub fn step(self) -> Option<Step> {
        Some(match self {
            ProblemId::PodCidrs => Step::PodCidrs,
            ProblemId::Tailscale => Step::Tailscale,
            ProblemId::Prefs | ProblemId::PrefsControlUrl => Step::Prefs,
            ProblemId::Approval | ProblemId::Identity | ProblemId::PacketFilter => Step::Approval,
            ProblemId::Forwarding
            | ProblemId::Rules
            | ProblemId::Unreachable
            | ProblemId::Guard
            | ProblemId::ClusterCidrs
            | ProblemId::Masquerade
            | ProblemId::Mtu
            | ProblemId::MtuAboveTailnet => Step::Dataplane,
            ProblemId::NodeFile | ProblemId::Conflist => Step::NodeFile,
            ProblemId::State => Step::State,
            ProblemId::Teardown | ProblemId::UninstallSignal | ProblemId::MetricsServer | ProblemId::CniConfig => {
                return None;
            }
        })
    }
}

struct Tracked {
    report: ProblemReport,
    last_logged: Instant,
}

/// The current problems, keyed by what they are about. Each is logged when it appears or
/// changes, reminded at most every [`Problems::REMIND`], and its end is logged once.
#[derive(Default)]
pub struct Problems {
    current: BTreeMap<ProblemId, Tracked>,
    seen: Vec<ProblemId>,
}

impl Problems {
    pub const REMIND: Duration = Duration::from_secs(600);

    /// Starts a pass: problems not reported again before [`Problems::end_pass`] are resolved.
    pub fn begin_pass(&mut self) {
        self.seen.clear();
    }

    pub fn report(&mut self, id: ProblemId, severity: Severity, message: impl Into<String>, hint: Option<String>) {
        let message = message.into();
        self.seen.push(id);
        let now = Instant::now();
        let log_it = |p: &ProblemReport, again: bool| {
            let prefix = if again { "still: " } else { "" };
            let hint = p.hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default();
            match p.severity {
                Severity::Error => log::error!("{prefix}{}{hint}", p.message),
                Severity::Warning => log::warn!("{prefix}{}{hint}", p.message),
                Severity::Waiting => log::info!("{prefix}{}{hint}", p.message),
            }
        };
        match self.current.get_mut(&id) {
            Some(t) if t.report.message == message && t.report.severity == severity => {
                if now.duration_since(t.last_logged) >= Self::REMIND {
                    log_it(&t.report, true);
                    t.last_logged = now;
                } else {
                    log::debug!("still: {message}");
                }
            }
            _ => {
                let report = ProblemReport { id: id.as_str().to_string(), severity, message, hint };
                log_it(&report, false);
                self.current.insert(id, Tracked { report, last_logged: now });
            }
        }
    }

    /// Ends a pass; answers the ids that were resolved.
    pub fn end_pass(&mut self) -> Vec<ProblemId> {
        let gone: Vec<ProblemId> = self.current.keys().filter(|k| !self.seen.contains(k)).copied().collect();
        for id in &gone {
            if let Some(t) = self.current.remove(id) {
                log::info!("resolved: {}", t.report.message);
            }
        }
        gone
    }

    /// Forgets every problem without logging it as resolved (the checks behind them stopped).
    pub fn forget_all(&mut self) {
        self.current.clear();
        self.seen.clear();
    }

    pub fn list(&self) -> Vec<ProblemReport> {
        let mut v: Vec<ProblemReport> = self.current.values().map(|t| t.report.clone()).collect();
        v.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(&b.id)));
        v
    }

    /// Whether an error counts against `step` now.
    pub fn failing(&self, step: Step) -> bool {
        self.current.iter().any(|(id, t)| id.step() == Some(step) && t.report.severity == Severity::Error)
    }

    /// Whether a problem about `id` is current.
    pub fn has(&self, id: ProblemId) -> bool {
        self.current.contains_key(&id)
    }

    pub fn worst(&self) -> Option<Severity> {
        self.current.values().map(|t| t.report.severity).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_come_and_go() {
        let mut p = Problems::default();
        p.begin_pass();
        p.report(ProblemId::Approval, Severity::Waiting, "route pending", None);
        p.report(ProblemId::Masquerade, Severity::Error, "nft failed", Some("check CAP_NET_ADMIN".into()));
        assert!(p.end_pass().is_empty());
        assert!(p.failing(Step::Dataplane) && !p.failing(Step::Approval) && !p.failing(Step::Tailscale));
        assert_eq!(p.worst(), Some(Severity::Error));
        assert_eq!(p.list()[0].id, "dataplane/masquerade");
        p.begin_pass();
        p.report(ProblemId::Approval, Severity::Waiting, "route pending", None);
        assert_eq!(p.end_pass(), vec![ProblemId::Masquerade]);
        p.begin_pass();
        assert_eq!(p.end_pass(), vec![ProblemId::Approval]);
        assert_eq!(p.worst(), None);
    }

    #[test]
    fn report_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let r = AgentReport {
            hostname: "n".into(),
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
            ..Default::default()
        };
        r.store(dir.path()).unwrap();
        assert_eq!(AgentReport::load(dir.path()).unwrap(), r);
    }
}
