//! The reconcile loop: one pass observes the node's pod CIDRs, tailscaled, Headscale and the
//! kernel, and changes only what differs from what HeadCNI wants, in this order:
//!
//! 1. pod CIDRs (flag, or the Node; validated, and against the tailnet, service and cluster
//!    ranges);
//! 2. tailscaled: status, and the zero-config join when it needs a login and a key is given;
//! 3. prefs: AdvertiseRoutes ⊇ pod CIDRs (read, merge, write; only routes HeadCNI added are ever
//!    withdrawn), RouteAll, NoSNAT; nothing else;
//! 4. approval: with an API key, this node's own pod CIDRs in Headscale (read, merge, write);
//!    in controller mode, this node's node key published on its Node (the controller approves);
//!    otherwise what the node can see of the policy's autoApprovers;
//! 5. data plane: the anti-spoofing guard, forwarding, policy rules, the `unreachable` route of
//!    the pod CIDR, masquerade tables; all scoped to the cluster's destinations (the cluster
//!    CIDR, else every Node's pod CIDRs), never to a peer's routes;
//! 6. MTU and the node file;
//! 7. the CNI configuration the runtime uses: HeadCNI's, with a pod MTU within the tailnet's;
//! 8. the report (status file, metrics, readiness).
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
//!   approvals HeadCNI added, its rules, routes and masquerade tables; the node file and the
//!   anti-spoofing guard stay). No pass runs, so
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

use super::config::{AgentConfig, check_pod_cidrs};
use super::hostnet::{self, HostNetwork, masquerade_specs};
use super::metrics::Metrics;
use super::node::PodCidrSource;
use super::report::{
    AgentReport, CniConfigReport, LinkReport, PeerReport, ProblemId, Problems, RouteReport, Severity, TailnetReport,
};
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
    /// The tailnet interface's index and addresses last announced to tailscaled's link monitor.
    announced: Option<(u32, Vec<std::net::IpAddr>)>,
    report: AgentReport,
    /// How long the last pass took (part of the report interval).
    last_pass: Duration,
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
            announced: None,
            report: AgentReport::default(),
            last_pass: Duration::ZERO,
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
        let started = Instant::now();
        self.problems.begin_pass();
        self.report_signal_problem();
        if let Some(p) = self.health.server_problem() {
            self.warn(ProblemId::MetricsServer, p, Some("free the port, or give --metrics-port another one"));
        }
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
        let admitted = match &approved {
            Some(a) if !a.is_empty() => self.step_packet_filter(a).await,
            _ => None,
        };

        if let Some(pods) = &pods {
            report.cluster_destinations = self.step_dataplane(pods).await;
        }
        let (mtu, link) = self.step_mtu(status.as_ref()).await;
        let written = match (&pods, mtu) {
            (Some(pods), Some(mtu)) => self.step_node_file(pods, mtu),
            _ => nodefile::path_in(&self.cfg.run_dir).exists(),
        };
        // The runtime sees the network as ready once the conflist is there: only after the node
        // file, which is what lets the plugin attach pods.
        let written = written && self.step_conflist();
        let cni_config = self.step_cni_config(link.as_ref());

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
                    path: p.path().as_str().to_string(),
                    endpoint: p.cur_addr.clone(),
                    relay: p.relay.clone(),
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
                admitted: match (&approved, &admitted) {
                    (Some(a), Some(open)) if a.contains(c) => Some(open.contains(c)),
                    _ => None,
                },
            })
            .collect();
        report.mtu = mtu;
        report.tailnet_link = link.map(|(name, mtu)| LinkReport { name, mtu });
        report.cni_config = cni_config;
        report.node_file_written = written;
        let all_advertised = !report.routes.is_empty() && report.routes.iter().all(|r| r.advertised);
        let running = status.as_ref().is_some_and(Status::is_running);
        report.ready = written && all_advertised && running;
        if all_advertised && self.advertised_at.is_none() {
            self.advertised_at = Some(Instant::now());
        }

        self.problems.end_pass();
        // Pods would not get HeadCNI's network, or would lose large packets: not ready, so that
        // the rollout stops and `kubectl get pods` shows it, while everything else goes on.
        if self.problems.has(ProblemId::CniConfig) || self.problems.has(ProblemId::MtuAboveTailnet) {
            report.ready = false;
        }
        report.problems = self.problems.list();
        self.last_pass = started.elapsed();
        report.report_interval_secs = self.report.report_interval_secs;
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
                Ok(Some(found)) => match check_pod_cidrs(&found, &self.cfg.cluster_cidrs, &self.cfg.service_cidrs) {
                    Ok(()) => {
                        if self.pod_cidrs.as_ref() != Some(&found) {
                            log::info!(
                                "pod CIDRs of this node: {} (from {})",
                                hostnet::join(&found),
                                self.cidrs.kind()
                            );
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

    /// Where the cluster's pod traffic goes: the destinations routed to the tailnet and exempt
    /// from masquerading. The cluster CIDR when given; else every Node's pod CIDRs (Kubernetes);
    /// else nothing but this node's own, which is reported: pods then reach other nodes' pods
    /// with the node's tailnet address as their source. Never a peer's tailnet routes: an exit
    /// node advertises 0.0.0.0/0, and any peer can advertise any subnet.
    fn cluster_destinations(&mut self) -> Vec<IpNetwork> {
        if !self.cfg.cluster_cidrs.is_empty() {
            if let Some(view) = self.cidrs.cluster_cidrs() {
                let outside: Vec<String> = view
                    .cidrs
                    .iter()
                    .filter(|c| crate::cidr::check_inside_cluster(&[**c], &self.cfg.cluster_cidrs).is_err())
                    .map(ToString::to_string)
                    .collect();
                if !outside.is_empty() {
                    self.warn(
                        ProblemId::ClusterCidrs,
                        format!(
                            "Nodes have pod CIDRs outside --cluster-cidr ({}): {}; traffic to them is masqueraded",
                            hostnet::join(&self.cfg.cluster_cidrs),
                            outside.join(", ")
                        ),
                        None,
                    );
                }
            }
            return self.cfg.cluster_cidrs.clone();
        }
        match self.cidrs.cluster_cidrs() {
            Some(view) if view.synced => {
                if !view.problems.is_empty() {
                    self.warn(ProblemId::ClusterCidrs, view.problems.join("; "), None);
                }
                view.cidrs
            }
            Some(view) => {
                self.wait(
                    ProblemId::ClusterCidrs,
                    format!(
                        "the other nodes' pod CIDRs are not known yet{}: traffic to their pods is masqueraded \
                         meanwhile",
                        view.problems.first().map(|p| format!(" ({p})")).unwrap_or_default()
                    ),
                    None,
                );
                Vec::new()
            }
            None => {
                self.warn(
                    ProblemId::ClusterCidrs,
                    "neither --cluster-cidr nor the Kubernetes API names the cluster's pod network: only this \
                     node's pod CIDRs are exempt from masquerading, so other nodes' pods see this node's tailnet \
                     address as the source of its pods' traffic",
                    Some("give --cluster-cidr (the network every node's pod CIDR lies in)"),
                );
                Vec::new()
            }
        }
    }

    async fn step_dataplane(&mut self, pods: &[IpNetwork]) -> Vec<IpNetwork> {
        let v4 = pods.iter().any(IpNetwork::is_ipv4);
        let v6 = pods.iter().any(IpNetwork::is_ipv6);
        let mut changes = Vec::new();
        match self.dp.ensure_guard().await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(
                ProblemId::Guard,
                format!("the anti-spoofing guard: {e}"),
                Some("pods could send with any source address; nf_tables with the fib expression is required"),
            ),
        }
        match self.dp.ensure_forwarding(v4, v6).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(ProblemId::Forwarding, format!("turning on IP forwarding: {e}"), None),
        }
        let cluster = self.cluster_destinations();
        let rules = hostnet::policy_rules(pods, &cluster, self.cfg.rule_priority);
        match self.dp.ensure_rules(&rules).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(ProblemId::Rules, format!("policy rules: {e}"), None),
        }
        match self.dp.ensure_unreachable(pods).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail(ProblemId::Unreachable, format!("unreachable route for the pod CIDR: {e}"), None),
        }
        let specs = if self.cfg.masquerade {
            let mut exempt = cluster.clone();
            exempt.extend(self.cfg.service_cidrs.iter().copied());
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
        cluster
    }

    async fn step_mtu(&mut self, status: Option<&Status>) -> (Option<u32>, Option<(String, u32)>) {
        let ips = status.map(|s| s.tailscale_ips.clone()).unwrap_or_default();
        self.step_announce_addresses(&ips).await;
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
                        ProblemId::MtuAboveTailnet,
                        format!(
                            "pod MTU {fixed} (--mtu) is larger than {name}'s MTU {tun}: packets larger than {tun} \
                             bytes between pods on different nodes are lost (TLS handshakes and large transfers hang)"
                        ),
                        Some(&format!(
                            "run the agent with --mtu auto (chart: config.network.mtu=auto) or at most {tun}; pods get \
                             the new MTU when they are recreated"
                        )),
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

    /// Once per tailnet interface and set of addresses: lets tailscaled's link monitor see its
    /// own addresses before the node takes pods (see `hostnet::LINK_MONITOR_TABLE`). It runs
    /// before the node file and the conflist of the same pass.
    async fn step_announce_addresses(&mut self, ips: &[std::net::IpAddr]) {
        if ips.is_empty() {
            return;
        }
        let done = self.announced.as_ref().filter(|(_, done)| done == ips).map(|(i, _)| *i);
        match self.dp.announce_tailnet_addresses(ips, done).await {
            Ok(Some(index)) => {
                if done != Some(index) {
                    log::info!(
                        "tailnet addresses on interface {index}: tailscaled's link monitor prompted to see them"
                    );
                }
                self.announced = Some((index, ips.to_vec()));
            }
            // tailscaled has not put them on its interface yet: the next pass.
            Ok(None) => {}
            Err(e) => log::warn!("prompting tailscaled's link monitor: {e}"),
        }
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

    /// --exclusive: sets aside every other network's configuration in --conf-dir, on every pass,
    /// so that one dropped there later (another CNI's DaemonSet, a leftover restored by hand,
    /// an uninstall that was called off) does not take the node's pods. The uninstall restores
    /// them (`install::remove_installed`).
    fn step_exclusive(&mut self, dir: &std::path::Path, ours: &str) {
        let (moves, blocked) = match crate::cniconf::set_aside_plan(dir, ours) {
            Ok(plan) => plan,
            // Reported by the check that follows, which reads the same directory.
            Err(_) => return,
        };
        // Said once by the install; one that wins over HeadCNI's is reported by the check that
        // follows, as without --exclusive (a log line every pass would say nothing new).
        for name in blocked {
            log::debug!(
                "{} stays in place: {name}{} exists already (remove one of the two by hand)",
                dir.join(&name).display(),
                crate::cniconf::SET_ASIDE_SUFFIX
            );
        }
        for m in &moves {
            match crate::cniconf::apply(std::slice::from_ref(m)) {
                Ok(()) => log::warn!("set aside another network's configuration (--exclusive): {m}"),
                Err(e) => log::error!("setting aside (--exclusive): {e}"),
            }
        }
    }

    /// The CNI configuration the runtime uses (the first in --conf-dir): HeadCNI's, and a pod
    /// MTU it sets within the tailnet interface's.
    fn step_cni_config(&mut self, link: Option<&(String, u32)>) -> Option<CniConfigReport> {
        let dir = self.cfg.conf_dir.clone();
        let ours = self.cfg.conflist_name.clone();
        let mut report = CniConfigReport { conf_dir: dir.display().to_string(), ..Default::default() };
        if self.cfg.exclusive {
            self.step_exclusive(&dir, &ours);
        }
        let in_use = match crate::cniconf::in_use(&dir) {
            Ok(u) => u,
            Err(e) => {
                self.warn(
                    ProblemId::CniConfig,
                    format!("cannot read the CNI configuration directory {}: {e}", dir.display()),
                    Some("mount the node's CNI configuration directory into the agent (the chart does) or set --conf-dir"),
                );
                return None;
            }
        };
        let Some(in_use) = in_use else {
            // The install writes it; its absence is status's to report, not a reason to wait.
            return Some(report);
        };
        report.in_use = Some(in_use.file.clone());
        report.headcni = in_use.headcni;
        report.mtu = in_use.mtu;
        if !in_use.headcni {
            self.warn(
                ProblemId::CniConfig,
                format!(
                    "the container runtime uses {} (network {:?}), which sorts before {ours} in {}: pods on this node \
                     do not get HeadCNI's network",
                    in_use.file,
                    in_use.network,
                    dir.display()
                ),
                Some(&format!(
                    "remove {} from the node, or install with --exclusive (chart: cni.exclusive=true), which sets \
                     other networks' configurations aside",
                    in_use.file
                )),
            );
        } else if let (Some(mtu), Some((name, tun))) = (in_use.mtu, link)
            && mtu > *tun
        {
            self.warn(
                ProblemId::MtuAboveTailnet,
                format!(
                    "{} sets the pod MTU to {mtu}, above {name}'s MTU {tun}: packets larger than {tun} bytes \
                     between pods on different nodes are lost (TLS handshakes and large transfers hang)",
                    in_use.file
                ),
                Some(&format!(
                    "remove \"mtu\" from {} (pods then get the agent's MTU from the node file) or set it to at most \
                     {tun}; pods get the new MTU when they are recreated",
                    dir.join(&in_use.file).display()
                )),
            );
        }
        Some(report)
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
