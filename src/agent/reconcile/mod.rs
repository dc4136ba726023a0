//! The reconcile loop: one pass observes the node's pod CIDRs, tailscaled, Headscale and the
//! kernel, and changes only what differs from what HeadCNI wants, in this order:
//!
//! 1. pod CIDRs (flag, or the Node; validated against the tailnet and service ranges);
//! 2. tailscaled: status, and the zero-config join when it needs a login and a key is given;
//! 3. prefs: AdvertiseRoutes ⊇ pod CIDRs (read, merge, write; only routes HeadCNI added are ever
//!    withdrawn), RouteAll, NoSNAT; nothing else;
//! 4. approval: with an API key, this node's own pod CIDRs in Headscale (read, merge, write);
//!    in controller mode, this node's node key published on its Node (the controller approves);
//!    otherwise what the node can see of the policy's autoApprovers;
//! 5. data plane: forwarding, policy rules, masquerade tables;
//! 6. MTU and the node file;
//! 7. the report (status file, metrics, readiness).
//!
//! Every step reports its own problems (keyed by [`ProblemId`]) and the others go on; a failing
//! pass is retried with a bounded backoff. Nothing in a pass tears anything down: pods keep
//! working whatever fails.
//!
//! The parts, one file each:
//! - this file: the [`Reconciler`], the pass and the steps on the node (pod CIDRs, data plane,
//!   MTU, node file);
//! - [`join`]: tailscaled's state, the zero-config join, and the backoff between passes;
//! - [`routes`]: advertising the pod CIDRs (prefs) and their approval in Headscale;
//! - [`uninstall`]: the state machine of the uninstall signal;
//! - [`publish`]: the report, the metrics and readiness at the end of a pass.
//!
//! The uninstall signal ([`super::teardown`]) drives a small state machine around the passes
//! ([`Reconciler::pass`]):
//!
//! ```text
//!            "true"                          cleanup succeeded
//!   Normal ─────────▶ TearingDown ─────────────────────────────▶ TornDown
//!     ▲                 │  │ cleanup failed: retried with backoff;   │
//!     │     "false"     │  └─ readiness stays as it was              │ not ready; nothing
//!     └─────────────────┴────────────────────────────────────────────┘ reconciled
//! ```
//!
//! - Normal: passes as above. An unreadable or missing ConfigMap changes nothing (it is
//!   reported as a warning).
//! - TearingDown: the cleanup of [`super::cleanup`] with [`CleanupScope::Uninstall`] (routes and
//!   approvals HeadCNI added, its rules and nft tables; the node file stays). No pass runs, so
//!   nothing is advertised. Readiness keeps its value until the cleanup succeeded: the hook
//!   waits for ready agents to turn not ready, which must mean "done".
//! - TornDown: not ready (/readyz 503, /healthz stays 200), nothing touched.
//! - Only an explicit "false" leaves teardown: a ConfigMap that disappears (Helm deletes it
//!   after the hook) or cannot be read keeps the agent torn down.

mod join;
mod publish;
mod routes;
mod uninstall;

pub use join::{JOIN_TIMEOUT, MAX_BACKOFF, next_delay};
pub use routes::{APPROVAL_RECHECK, merge_approvals, merge_routes};
pub use uninstall::Mode;

use super::config::{AgentConfig, check_pod_cidrs, outside_cluster};
use super::hostnet::{self, HostNetwork, masquerade_specs};
use super::metrics::Metrics;
use super::node::PodCidrSource;
use super::report::{AgentReport, LinkReport, PeerReport, ProblemId, Problems, RouteReport, Severity, TailnetReport};
use super::serve::{Health, now};
use super::state::{self, AgentState};
use crate::clients::headscale::HeadscaleApi;
use crate::clients::localapi::{LocalApi, Status};
use crate::nodefile::{self, NodeFile};
use ipnetwork::IpNetwork;
use join::Join;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pause between passes while everything is as it should be.
pub const STEADY_INTERVAL: Duration = Duration::from_secs(5);
/// What one pass ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOutcome {
    /// Everything as wanted.
    Converged,
    /// Waiting for something outside the agent (a podCIDR, an approval, a join in progress).
    Waiting,
    /// A step failed.
    Failed,
}

/// One node's reconciler over its four seams.
pub struct Reconciler<K, T, H, D> {
    cfg: Arc<AgentConfig>,
    cidrs: K,
    ts: T,
    hs: Option<H>,
    dp: D,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    state_path: PathBuf,
    state: Option<AgentState>,
    problems: Problems,
    pod_cidrs: Option<Vec<IpNetwork>>,
    pod_cidrs_at: Option<Instant>,
    join: Join,
    /// (routes, node key, when) Headscale last confirmed as approved.
    approval_confirmed: Option<(BTreeSet<IpNetwork>, String, Instant)>,
    headscale_checked: bool,
    pub(crate) joined_in: Option<Duration>,
    pub(crate) approved_in: Option<Duration>,
    advertised_at: Option<Instant>,
    report: AgentReport,
    mode: Mode,
    /// Why the uninstall signal cannot be read, reported as a warning.
    signal_problem: Option<String>,
}

fn set(nets: &[IpNetwork]) -> BTreeSet<IpNetwork> {
    nets.iter().copied().collect()
}

fn list(nets: &BTreeSet<IpNetwork>) -> String {
    hostnet::join(&nets.iter().copied().collect::<Vec<_>>())
}

impl<K: PodCidrSource, T: LocalApi, H: HeadscaleApi, D: HostNetwork> Reconciler<K, T, H, D> {
    pub fn new(
        cfg: Arc<AgentConfig>,
        cidrs: K,
        ts: T,
        hs: Option<H>,
        dp: D,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        let state_path = state::path_in(&cfg.state_dir);
        Self {
            cfg,
            cidrs,
            ts,
            hs,
            dp,
            metrics,
            health,
            state_path,
            state: None,
            problems: Problems::default(),
            pod_cidrs: None,
            pod_cidrs_at: None,
            join: Join { issued_at: None, failures: 0, not_before: None },
            approval_confirmed: None,
            headscale_checked: false,
            joined_in: None,
            approved_in: None,
            advertised_at: None,
            report: AgentReport::default(),
            mode: Mode::Normal,
            signal_problem: None,
        }
    }

    /// Where the pod CIDRs come from (the loop waits on its changes between passes).
    pub fn cidr_source(&self) -> &K {
        &self.cidrs
    }

    pub fn report(&self) -> &AgentReport {
        &self.report
    }

    fn fail(&mut self, id: ProblemId, msg: impl Into<String>, hint: Option<&str>) {
        self.problems.report(id, Severity::Error, msg, hint.map(str::to_string));
    }

    fn wait(&mut self, id: ProblemId, msg: impl Into<String>, hint: Option<&str>) {
        self.problems.report(id, Severity::Waiting, msg, hint.map(str::to_string));
    }

    fn warn(&mut self, id: ProblemId, msg: impl Into<String>, hint: Option<&str>) {
        self.problems.report(id, Severity::Warning, msg, hint.map(str::to_string));
    }

    /// The persistent state, loaded on first use. `None` if it cannot be read: then nothing
    /// that would need recording is changed.
    fn state(&mut self) -> Option<&mut AgentState> {
        if self.state.is_none() {
            match AgentState::load(&self.state_path) {
                Ok(s) => self.state = Some(s),
                Err(e) => {
                    self.fail(ProblemId::State, e.to_string(), Some("the state dir must be a writable host directory"));
                    return None;
                }
            }
        }
        self.state.as_mut()
    }

    fn store_state(&mut self) -> bool {
        let Some(st) = self.state.clone() else { return false };
        match st.store(&self.state_path) {
            Ok(()) => true,
            Err(e) => {
                self.fail(ProblemId::State, e.to_string(), Some("the state dir must be a writable host directory"));
                false
            }
        }
    }

    /// One pass.
    pub async fn reconcile(&mut self) -> PassOutcome {
        self.problems.begin_pass();
        self.report_signal_problem();
        let mut report = AgentReport {
            version: crate::VERSION.to_string(),
            updated_at: now(),
            node_name: self.cfg.node_name.clone(),
            hostname: self.cfg.hostname.clone(),
            pod_cidr_source: self.cidrs.kind().to_string(),
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            service_cidrs: self.cfg.service_cidrs.clone(),
            approval: if self.hs.is_some() {
                "api"
            } else if self.cfg.publish_identity {
                "controller"
            } else {
                "policy"
            }
            .to_string(),
            masquerade: self.cfg.masquerade,
            rule_priority: self.cfg.rule_priority,
            ..Default::default()
        };

        let pods = self.step_pod_cidrs().await;
        let desired: BTreeSet<IpNetwork> = pods.as_deref().map(set).unwrap_or_default();
        report.pod_cidrs = pods.clone().unwrap_or_default();

        let status = self.step_tailscale().await;
        let prefs = match &status {
            Some(st) if st.backend_state != "NoState" => self.step_prefs(st, &desired).await,
            _ => None,
        };
        if self.cfg.publish_identity
            && let Some(st) = status.as_ref().filter(|s| s.is_running())
        {
            self.step_identity(st).await;
            report.controller = self.cidrs.binding().approval;
        }
        let approved = match (&status, &prefs) {
            (Some(st), Some(p)) if st.is_running() && !desired.is_empty() => self.step_approval(st, p, &desired).await,
            _ => None,
        };

        if let Some(pods) = &pods {
            self.step_dataplane(pods, status.as_ref()).await;
        }
        let (mtu, link) = self.step_mtu(status.as_ref()).await;
        let written = match (&pods, mtu) {
            (Some(pods), Some(mtu)) => self.step_node_file(pods, mtu),
            _ => nodefile::path_in(&self.cfg.run_dir).exists(),
        };
        // The runtime sees the network as ready once the conflist is there: only after the node
        // file, which is what lets the plugin attach pods.
        let written = written && self.step_conflist();

        // Report.
        if let Some(st) = &status {
            report.tailnet = TailnetReport {
                backend_state: st.backend_state.clone(),
                control_url: prefs.as_ref().map(|p| p.control_url.clone()).unwrap_or_default(),
                tailscale_ips: st.tailscale_ips.clone(),
                node_key: st.node_key().unwrap_or_default().to_string(),
                route_all: prefs.as_ref().is_some_and(|p| p.route_all),
                no_snat: prefs.as_ref().is_some_and(|p| p.no_snat),
                health: st.health.clone(),
            };
            report.peers = st
                .peer
                .values()
                .map(|p| PeerReport {
                    hostname: p.host_name.clone(),
                    tailscale_ips: p.tailscale_ips.clone(),
                    routes: p.served_routes(),
                    online: p.online,
                })
                .collect();
            report.peers.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        } else {
            report.tailnet.backend_state = "Unreachable".into();
        }
        report.routes = desired
            .iter()
            .map(|c| RouteReport {
                cidr: *c,
                advertised: prefs.as_ref().is_some_and(|p| p.advertises(c)),
                approved: approved.as_ref().map(|a| a.contains(c)),
            })
            .collect();
        report.mtu = mtu;
        report.tailnet_link = link.map(|(name, mtu)| LinkReport { name, mtu });
        report.node_file_written = written;
        let all_advertised = !report.routes.is_empty() && report.routes.iter().all(|r| r.advertised);
        let running = status.as_ref().is_some_and(Status::is_running);
        report.ready = written && all_advertised && running;
        if all_advertised && self.advertised_at.is_none() {
            self.advertised_at = Some(Instant::now());
        }

        self.problems.end_pass();
        report.problems = self.problems.list();
        self.publish(&report, status.as_ref());
        self.report = report;
        match self.problems.worst() {
            None | Some(Severity::Warning) => PassOutcome::Converged,
            Some(Severity::Waiting) => PassOutcome::Waiting,
            Some(Severity::Error) => PassOutcome::Failed,
        }
    }

    async fn step_pod_cidrs(&mut self) -> Option<Vec<IpNetwork>> {
        let due = match (self.pod_cidrs.as_ref(), self.pod_cidrs_at) {
            (Some(_), Some(at)) => at.elapsed() >= self.cidrs.refresh_interval(),
            _ => true,
        };
        if due {
            let name = self.cfg.node_name.clone().unwrap_or_default();
            match self.cidrs.pod_cidrs().await {
                Ok(Some(found)) => match check_pod_cidrs(&found, &self.cfg.service_cidrs) {
                    Ok(()) => {
                        if self.pod_cidrs.as_ref() != Some(&found) {
                            log::info!(
                                "pod CIDRs of this node: {} (from {})",
                                hostnet::join(&found),
                                self.cidrs.kind()
                            );
                            for net in outside_cluster(&found, &self.cfg.cluster_cidrs) {
                                log::warn!(
                                    "pod CIDR {net} is outside every --cluster-cidr ({}): traffic between it and the \
                                     cluster would be masqueraded",
                                    hostnet::join(&self.cfg.cluster_cidrs)
                                );
                            }
                        }
                        self.pod_cidrs = Some(found);
                        self.pod_cidrs_at = Some(Instant::now());
                    }
                    Err(msg) => self.fail(ProblemId::PodCidrs, msg, None),
                },
                Ok(None) => self.wait(
                    ProblemId::PodCidrs,
                    format!("Node {name} has no podCIDR yet: waiting"),
                    Some("the controller manager assigns one with --allocate-node-cidrs; or give --pod-cidr"),
                ),
                Err(e) => {
                    let hint = if self.pod_cidrs.is_some() { Some("keeping the pod CIDRs read before") } else { None };
                    self.fail(ProblemId::PodCidrs, e.to_string(), hint);
                }
            }
        }
        self.pod_cidrs.clone()
    }

    async fn step_dataplane(&mut self, pods: &[IpNetwork], status: Option<&Status>) {
        let v4 = pods.iter().any(IpNetwork::is_ipv4);
        let v6 = pods.iter().any(IpNetwork::is_ipv6);
        let mut changes = Vec::new();
        match self.dp.ensure_forwarding(v4, v6).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(ProblemId::Forwarding, format!("turning on IP forwarding: {e}"), None),
        }
        match self.dp.ensure_rules(pods, self.cfg.rule_priority).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(ProblemId::Rules, format!("policy rules: {e}"), None),
        }
        let specs = if self.cfg.masquerade {
            let mut exempt: Vec<IpNetwork> = self.cfg.cluster_cidrs.clone();
            exempt.extend(self.cfg.service_cidrs.iter().copied());
            // Without a cluster CIDR, the other nodes' pod CIDRs are known only as their routes.
            // (With one, routes of non-cluster subnet routers stay masqueraded: they do not
            // know the pod CIDRs.)
            if self.cfg.cluster_cidrs.is_empty()
                && let Some(st) = status
            {
                for p in st.peer.values() {
                    exempt.extend(p.served_routes());
                }
            }
            masquerade_specs(pods, &exempt)
        } else {
            Vec::new()
        };
        match self.dp.ensure_masquerade(&specs).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(ProblemId::Masquerade, format!("masquerade table: {e}"), None),
        }
        for c in changes {
            log::info!("data plane: {c}");
        }
    }

    async fn step_mtu(&mut self, status: Option<&Status>) -> (Option<u32>, Option<(String, u32)>) {
        let ips = status.map(|s| s.tailscale_ips.clone()).unwrap_or_default();
        let link = match self.dp.tailnet_link(&ips).await {
            Ok(l) => l,
            Err(e) => {
                self.fail(ProblemId::Mtu, format!("looking up the tailnet interface: {e}"), None);
                None
            }
        };
        let mtu = match (self.cfg.mtu, &link) {
            (Some(fixed), Some((name, tun))) => {
                if fixed > *tun {
                    self.warn(
                        ProblemId::Mtu,
                        format!(
                            "pod MTU {fixed} is larger than {name}'s MTU {tun}: large packets between nodes are lost"
                        ),
                        Some("use --mtu auto, or at most the tailnet MTU"),
                    );
                }
                Some(fixed)
            }
            (Some(fixed), None) => Some(fixed),
            (None, Some((_, tun))) => Some((*tun).clamp(nodefile::MIN_MTU, nodefile::MAX_MTU)),
            (None, None) => {
                self.wait(
                    ProblemId::Mtu,
                    format!(
                        "the tailnet interface ({}) does not exist yet: the pod MTU is unknown",
                        hostnet::DEFAULT_TUN
                    ),
                    Some("waiting for tailscaled; or set --mtu"),
                );
                None
            }
        };
        (mtu, link)
    }

    /// Publishes the staged conflist (--publish-conflist); true when none is managed or it is
    /// in place.
    fn step_conflist(&mut self) -> bool {
        let Some((staged, published)) = self.cfg.cni_files.conflist.clone() else { return true };
        match crate::install::publish_conflist(&staged, &published) {
            Ok(true) => {
                log::info!("published the conflist {} (the node's pod network is ready)", published.display());
                true
            }
            Ok(false) => true,
            Err(e) => {
                self.fail(
                    ProblemId::Conflist,
                    e.to_string(),
                    Some("the install init container stages the conflist; the agent needs the CNI conf dir mounted"),
                );
                false
            }
        }
    }

    fn step_node_file(&mut self, pods: &[IpNetwork], mtu: u32) -> bool {
        let path = nodefile::path_in(&self.cfg.run_dir);
        let nf = NodeFile {
            node_name: self.cfg.node_name.clone().or_else(|| Some(self.cfg.hostname.clone())),
            pod_cidrs: pods.to_vec(),
            cluster_cidrs: self.cfg.cluster_cidrs.clone(),
            service_cidrs: self.cfg.service_cidrs.clone(),
            mtu: Some(mtu),
        };
        if std::fs::read_to_string(&path).ok().as_deref() == Some(nf.render().as_str()) {
            return true;
        }
        match nf.store(&path) {
            Ok(()) => {
                log::info!("wrote the node file {} (pod CIDRs {}, MTU {mtu})", path.display(), hostnet::join(pods));
                true
            }
            Err(e) => {
                self.fail(ProblemId::NodeFile, e.to_string(), Some("--run-dir must be the host's /run/headcni"));
                path.exists()
            }
        }
    }
}

#[cfg(test)]
mod tests;
