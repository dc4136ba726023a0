//! The reconcile loop: one pass observes the node's pod CIDRs, tailscaled, Headscale and the
//! kernel, and changes only what differs from what HeadCNI wants, in this order:
//!
//! 1. pod CIDRs (flag, or the Node; validated against the tailnet and service ranges);
//! 2. tailscaled: status, and the zero-config join when it needs a login and a key is given;
//! 3. prefs: AdvertiseRoutes ⊇ pod CIDRs (read, merge, write; only routes HeadCNI added are ever
//!    withdrawn), RouteAll, NoSNAT; nothing else;
//! 4. approval: with an API key, this node's own pod CIDRs in Headscale (read, merge, write);
//!    without, what the node can see of the policy's autoApprovers;
//! 5. data plane: forwarding, policy rules, masquerade tables;
//! 6. MTU and the node file;
//! 7. the report (status file, metrics, readiness).
//!
//! Every step reports its own problems and the others go on; a failing pass is retried with a
//! bounded backoff. Nothing in a pass tears anything down: pods keep working whatever fails.
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

use super::cleanup::{CleanupScope, cleanup_with};
use super::config::{AgentConfig, check_pod_cidrs, outside_cluster};
use super::hostnet::{self, HostNetwork, masquerade_specs};
use super::metrics::Metrics;
use super::node::PodCidrSource;
use super::report::{AgentReport, LinkReport, PeerReport, Problems, RouteReport, Severity, TailnetReport};
use super::serve::{Health, now};
use super::state::{self, AgentState};
use super::teardown::{Signal, SignalState};
use crate::clients::headscale::{HeadscaleApi, HeadscaleError, MIN_VERSION, parse_version};
use crate::clients::localapi::{JoinPrefs, LocalApi, Prefs, PrefsEdit, Status};
use crate::nodefile::{self, NodeFile};
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pause between passes while everything is as it should be.
pub const STEADY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest pause while something is wrong.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a join may take before it counts as failed.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Once Headscale confirmed the approval, ask it again only this often.
pub const APPROVAL_RECHECK: Duration = Duration::from_secs(300);

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

/// Where the uninstall signal has put the agent (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    TearingDown,
    TornDown,
}

struct Join {
    issued_at: Option<Instant>,
    failures: u32,
    not_before: Option<Instant>,
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

/// AdvertiseRoutes after merging: `desired` added, routes HeadCNI added that are no longer
/// desired (`ours − desired`) removed, everything else kept verbatim. Answers the new list,
/// the routes added and the routes removed.
pub fn merge_routes(
    current: &[String],
    desired: &BTreeSet<IpNetwork>,
    ours: &BTreeSet<IpNetwork>,
) -> (Vec<String>, BTreeSet<IpNetwork>, BTreeSet<IpNetwork>) {
    let stale: BTreeSet<IpNetwork> = ours.difference(desired).copied().collect();
    let mut out = Vec::new();
    let mut removed = BTreeSet::new();
    let mut present = BTreeSet::new();
    for r in current {
        match r.parse::<IpNetwork>() {
            Ok(net) if stale.contains(&net) => {
                removed.insert(net);
            }
            Ok(net) => {
                present.insert(net);
                out.push(r.clone());
            }
            Err(_) => out.push(r.clone()),
        }
    }
    let added: BTreeSet<IpNetwork> = desired.difference(&present).copied().collect();
    out.extend(added.iter().map(ToString::to_string));
    (out, added, removed)
}

/// The approved set to write: everything approved now, minus what HeadCNI approved earlier and
/// no longer wants, plus the desired routes the node actually advertises. Never a route the
/// node did not advertise.
pub fn merge_approvals(
    approved: &BTreeSet<IpNetwork>,
    available: &BTreeSet<IpNetwork>,
    desired: &BTreeSet<IpNetwork>,
    ours: &BTreeSet<IpNetwork>,
) -> BTreeSet<IpNetwork> {
    let stale: BTreeSet<IpNetwork> = ours.difference(desired).copied().collect();
    let wanted: BTreeSet<IpNetwork> = desired.intersection(available).copied().collect();
    approved.difference(&stale).copied().chain(wanted).collect()
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

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One pass under the uninstall signal: a normal pass, or a teardown step.
    pub async fn pass(&mut self, signal: &SignalState) -> PassOutcome {
        self.signal_problem = signal.problem.clone();
        let tear = match signal.signal {
            Signal::Teardown => true,
            Signal::Normal => false,
            // Unknown or gone: only an explicit "false" ends a teardown.
            Signal::Unknown | Signal::Absent => self.mode != Mode::Normal,
        };
        if tear {
            return self.teardown().await;
        }
        if self.mode != Mode::Normal {
            log::info!("the uninstall signal is \"false\" again (upgrade or rollback): resuming");
            self.resume();
        }
        self.reconcile().await
    }

    /// Leaves teardown: everything cached about what was advertised or approved is stale.
    fn resume(&mut self) {
        self.mode = Mode::Normal;
        self.state = None;
        self.approval_confirmed = None;
        self.advertised_at = None;
    }

    fn report_signal_problem(&mut self) {
        if let Some(p) = self.signal_problem.clone() {
            self.warn(
                "uninstall_signal",
                p,
                Some("the agent runs normally meanwhile; check --teardown-configmap and the agent's Role"),
            );
        }
    }

    /// One teardown step: the cleanup until it succeeds, then nothing.
    async fn teardown(&mut self) -> PassOutcome {
        if self.mode == Mode::Normal {
            // The checks behind the normal pass's problems stop: they are not "resolved".
            self.problems.forget_all();
        }
        self.problems.begin_pass();
        self.report_signal_problem();
        if self.mode == Mode::Normal {
            log::info!(
                "uninstall signal: withdrawing this node's routes and approvals, removing its rules and nft tables; \
                 no more reconciling (the node file stays: running pods keep working on this node)"
            );
            self.mode = Mode::TearingDown;
        }
        if self.mode == Mode::TearingDown {
            let errors = cleanup_with(&self.cfg, &self.ts, self.hs.as_ref(), &self.dp, CleanupScope::Uninstall).await;
            // The record changed under the reconciler.
            self.state = None;
            self.approval_confirmed = None;
            self.advertised_at = None;
            if errors.is_empty() {
                self.mode = Mode::TornDown;
                log::info!("uninstall: this node's routes are withdrawn; answering not ready from now on");
            } else {
                self.fail(
                    "teardown",
                    format!("uninstall: {}", errors.join("; ")),
                    Some("retried; the uninstall hook waits for this agent until its timeout"),
                );
            }
        }
        self.problems.end_pass();
        let mut report = self.report.clone();
        report.updated_at = now();
        report.version = crate::VERSION.to_string();
        report.teardown = match self.mode {
            Mode::TornDown => "done",
            _ => "in progress",
        }
        .to_string();
        if self.mode == Mode::TornDown {
            report.ready = false;
            for r in &mut report.routes {
                r.advertised = false;
                r.approved = None;
            }
            self.health.set_ready(
                false,
                "uninstalling: this node's routes were withdrawn (the uninstall signal ConfigMap says teardown)",
            );
            self.metrics.routes_advertised.set(0);
            self.metrics.routes_approved.set(0);
            self.metrics.routes_pending_approval.set(0);
            self.metrics.ready.set(0);
        }
        report.problems = self.problems.list();
        self.health.beat();
        if let Err(e) = report.store(&self.cfg.run_dir) {
            log::debug!("writing {}: {e}", super::report::path_in(&self.cfg.run_dir).display());
        }
        self.report = report;
        if self.mode == Mode::TornDown { PassOutcome::Converged } else { PassOutcome::Failed }
    }

    pub fn report(&self) -> &AgentReport {
        &self.report
    }

    /// A join was started and has not yet finished or timed out (the loop then polls quickly).
    pub fn joining(&self) -> bool {
        self.join.issued_at.is_some_and(|t| t.elapsed() < JOIN_TIMEOUT)
    }

    fn fail(&mut self, id: &str, msg: impl Into<String>, hint: Option<&str>) {
        self.problems.report(id, Severity::Error, msg, hint.map(str::to_string));
    }

    fn wait(&mut self, id: &str, msg: impl Into<String>, hint: Option<&str>) {
        self.problems.report(id, Severity::Waiting, msg, hint.map(str::to_string));
    }

    fn warn(&mut self, id: &str, msg: impl Into<String>, hint: Option<&str>) {
        self.problems.report(id, Severity::Warning, msg, hint.map(str::to_string));
    }

    /// The persistent state, loaded on first use. `None` if it cannot be read: then nothing
    /// that would need recording is changed.
    fn state(&mut self) -> Option<&mut AgentState> {
        if self.state.is_none() {
            match AgentState::load(&self.state_path) {
                Ok(s) => self.state = Some(s),
                Err(e) => {
                    self.fail("state", e.to_string(), Some("the state dir must be a writable host directory"));
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
                self.fail("state", e.to_string(), Some("the state dir must be a writable host directory"));
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
            approval: if self.hs.is_some() { "api" } else { "policy" }.to_string(),
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

    fn publish(&self, report: &AgentReport, status: Option<&Status>) {
        let m = &self.metrics;
        m.set_backend_state(if status.is_some() { &report.tailnet.backend_state } else { "Unreachable" });
        m.routes_advertised.set(report.routes.iter().filter(|r| r.advertised).count() as i64);
        m.routes_approved.set(report.routes.iter().filter(|r| r.approved == Some(true)).count() as i64);
        m.routes_pending_approval
            .set(report.routes.iter().filter(|r| r.advertised && r.approved == Some(false)).count() as i64);
        if let Some(st) = status {
            let accepted = if report.tailnet.route_all {
                st.peer.values().map(|p| p.served_routes().len()).sum::<usize>() as i64
            } else {
                0
            };
            m.routes_accepted_from_peers.set(accepted);
        }
        m.pod_mtu.set(i64::from(report.mtu.unwrap_or(0)));
        m.ready.set(i64::from(report.ready));
        for step in super::metrics::STEPS {
            m.set_step(
                step,
                self.problems
                    .list()
                    .iter()
                    .any(|p| p.severity == Severity::Error && p.id.split('/').next() == Some(step)),
            );
        }
        let reason = report
            .problems
            .iter()
            .map(|p| p.message.clone())
            .next()
            .unwrap_or_else(|| "the pod CIDRs are not advertised yet".into());
        self.health.set_ready(report.ready, &reason);
        self.health.beat();
        if let Err(e) = report.store(&self.cfg.run_dir) {
            log::debug!("writing {}: {e}", super::report::path_in(&self.cfg.run_dir).display());
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
                    Err(msg) => self.fail("pod_cidrs", msg, None),
                },
                Ok(None) => self.wait(
                    "pod_cidrs",
                    format!("Node {name} has no podCIDR yet: waiting"),
                    Some("the controller manager assigns one with --allocate-node-cidrs; or give --pod-cidr"),
                ),
                Err(e) => {
                    let hint = if self.pod_cidrs.is_some() { Some("keeping the pod CIDRs read before") } else { None };
                    self.fail("pod_cidrs", e.to_string(), hint);
                }
            }
        }
        self.pod_cidrs.clone()
    }

    async fn step_tailscale(&mut self) -> Option<Status> {
        let status = match self.ts.status().await {
            Ok(s) => s,
            Err(e) => {
                let hint = if e.is_unreachable() {
                    Some("is tailscaled running, and is --tailscale-socket its socket? pods keep working meanwhile")
                } else {
                    None
                };
                self.fail("tailscale", e.to_string(), hint);
                self.join.issued_at = None;
                return None;
            }
        };
        let health = status.health.join("; ");
        match status.backend_state.as_str() {
            "Running" => {
                if let Some(at) = self.join.issued_at.take() {
                    let took = at.elapsed();
                    log::info!(
                        "joined the tailnet as {} ({}) in {:.1}s",
                        status.self_.host_name,
                        status.tailscale_ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        took.as_secs_f64()
                    );
                    self.joined_in = Some(took);
                    self.join.failures = 0;
                }
            }
            "NeedsLogin" => self.login(&status, &health).await,
            "NeedsMachineAuth" => self.wait(
                "tailscale",
                "tailscaled is logged in but waits for the node to be authorized in Headscale",
                Some("authorize it (headscale nodes register ...), or use a pre-auth key"),
            ),
            "Stopped" => self.fail(
                "tailscale",
                "tailscale is stopped (someone ran `tailscale down`): cross-node pod traffic is down",
                Some("run `tailscale up`; HeadCNI does not override an operator's down"),
            ),
            other => self.wait("tailscale", format!("tailscaled is starting ({other})"), None),
        }
        Some(status)
    }

    async fn login(&mut self, status: &Status, health: &str) {
        let (Some(url), Some(key_src)) = (self.cfg.headscale_url.clone(), self.cfg.auth_key.clone()) else {
            self.fail(
                "tailscale",
                format!("tailscaled is not logged in{}", if health.is_empty() { String::new() } else { format!(": {health}") }),
                Some("give --headscale-url and a pre-auth key (--auth-key-file or HEADCNI_AUTH_KEY) for the zero-config join, or log the node in by hand"),
            );
            return;
        };
        if let Some(at) = self.join.issued_at {
            if at.elapsed() < JOIN_TIMEOUT {
                self.wait("tailscale", format!("joining the tailnet at {url}"), None);
                return;
            }
            self.join.issued_at = None;
            self.join.failures += 1;
            let backoff =
                Duration::from_secs(5u64.saturating_mul(1 << self.join.failures.min(6))).min(Duration::from_secs(300));
            self.join.not_before = Some(Instant::now() + backoff);
            let tags_refused = health.contains("requested tags");
            self.fail(
                "tailscale",
                format!(
                    "joining {url} failed within {}s: {}",
                    JOIN_TIMEOUT.as_secs(),
                    if health.is_empty() { "no answer from Headscale" } else { health }
                ),
                Some(if tags_refused {
                    "a tagged pre-auth key gives the node its tags: leave --advertise-tags empty"
                } else {
                    "is Headscale reachable from the node, and is the pre-auth key valid (reusable, not expired)?"
                }),
            );
            return;
        }
        if self.join.not_before.is_some_and(|t| Instant::now() < t) {
            self.fail(
                "tailscale",
                format!("tailscaled is not logged in; the next join attempt is delayed ({health})"),
                None,
            );
            return;
        }
        let key = match key_src.load("pre-auth key") {
            Ok(k) => k,
            Err(e) => {
                self.fail(
                    "tailscale",
                    e.to_string(),
                    Some("the pre-auth key comes from --auth-key-file or HEADCNI_AUTH_KEY"),
                );
                return;
            }
        };
        let prefs = match self.ts.prefs().await {
            Ok(p) => p,
            Err(e) => {
                self.fail("tailscale", e.to_string(), None);
                return;
            }
        };
        // The join advertises the pod CIDRs at once; they are recorded before the call.
        let desired = self.pod_cidrs.as_deref().map(set).unwrap_or_default();
        let ours = self.state().map(|s| s.advertised_routes.clone()).unwrap_or_default();
        let (routes, added, _) = merge_routes(&prefs.advertise_routes, &desired, &ours);
        if !added.is_empty() {
            let Some(st) = self.state() else { return };
            st.advertised_routes.extend(added.iter().copied());
            if !self.store_state() {
                return;
            }
        }
        let join = JoinPrefs {
            control_url: url.clone(),
            hostname: self.cfg.hostname.clone(),
            advertise_routes: routes,
            advertise_tags: self.cfg.advertise_tags.clone(),
        };
        log::info!("tailscaled is not logged in: joining {url} as {} with the pre-auth key", self.cfg.hostname);
        let started = Instant::now();
        let result = async {
            self.ts.start(&key, join.update_prefs(&prefs)).await?;
            if !status.have_node_key {
                self.ts.login().await?;
            }
            Ok::<_, crate::clients::localapi::TailscaleError>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.join.issued_at = Some(started);
                self.wait("tailscale", format!("joining the tailnet at {url}"), None);
            }
            Err(e) => {
                self.join.failures += 1;
                self.join.not_before = Some(Instant::now() + Duration::from_secs(5 << self.join.failures.min(6)));
                self.fail("tailscale", format!("starting the join: {e}"), None);
            }
        }
    }

    async fn step_prefs(&mut self, status: &Status, desired: &BTreeSet<IpNetwork>) -> Option<Prefs> {
        let prefs = match self.ts.prefs().await {
            Ok(p) => p,
            Err(e) => {
                self.fail("prefs", e.to_string(), None);
                return None;
            }
        };
        if let Some(url) = &self.cfg.headscale_url
            && status.is_running()
            && !prefs.control_url.is_empty()
            && prefs.control_url.trim_end_matches('/') != url
        {
            self.warn(
                "prefs/control_url",
                format!(
                    "tailscaled is logged in to {}, not to --headscale-url {url}; HeadCNI leaves the login alone",
                    prefs.control_url
                ),
                Some("log the node out (tailscale logout) to let the agent join the right server"),
            );
        }
        let ours = match self.state() {
            Some(s) => s.advertised_routes.clone(),
            None => return Some(prefs),
        };
        let (routes, added, removed) = merge_routes(&prefs.advertise_routes, desired, &ours);
        let mut edit = PrefsEdit::default();
        if routes != prefs.advertise_routes {
            edit.advertise_routes = Some(routes);
        }
        if !prefs.route_all {
            edit.route_all = Some(true);
        }
        if !prefs.no_snat {
            edit.no_snat = Some(true);
        }
        // Routes stale in the record but already gone from the prefs: forget them.
        let forgotten: BTreeSet<IpNetwork> =
            ours.difference(desired).filter(|r| !prefs.advertises(r)).copied().collect();
        if edit.is_empty() {
            if !forgotten.is_empty()
                && let Some(st) = self.state()
            {
                st.advertised_routes.retain(|r| !forgotten.contains(r));
                self.store_state();
            }
            return Some(prefs);
        }
        if !added.is_empty() {
            if let Some(st) = self.state() {
                st.advertised_routes.extend(added.iter().copied());
            }
            if !self.store_state() {
                return Some(prefs);
            }
        }
        match self.ts.edit_prefs(&edit).await {
            Ok(new) => {
                let mut what = Vec::new();
                if !added.is_empty() {
                    what.push(format!("advertised {}", list(&added)));
                }
                if !removed.is_empty() {
                    what.push(format!("withdrew {} (no longer this node's)", list(&removed)));
                }
                if edit.route_all.is_some() {
                    what.push("accept-routes on".into());
                }
                if edit.no_snat.is_some() {
                    what.push("subnet SNAT off".into());
                }
                log::info!("tailscale prefs: {}", what.join(", "));
                if !removed.is_empty() || !forgotten.is_empty() {
                    if let Some(st) = self.state() {
                        st.advertised_routes.retain(|r| !removed.contains(r) && !forgotten.contains(r));
                    }
                    self.store_state();
                }
                Some(new)
            }
            Err(e) => {
                self.fail("prefs", format!("updating tailscale prefs: {e}"), None);
                Some(prefs)
            }
        }
    }

    async fn step_approval(
        &mut self,
        status: &Status,
        prefs: &Prefs,
        desired: &BTreeSet<IpNetwork>,
    ) -> Option<BTreeSet<IpNetwork>> {
        let advertised: BTreeSet<IpNetwork> = desired.iter().filter(|c| prefs.advertises(c)).copied().collect();
        if self.hs.is_none() {
            let served = set(&status.self_.served_routes());
            let approved: BTreeSet<IpNetwork> = desired.intersection(&served).copied().collect();
            let pending: BTreeSet<IpNetwork> = advertised.difference(&approved).copied().collect();
            if pending.is_empty() {
                self.note_approved();
            } else {
                self.wait(
                    "approval",
                    format!("route {} pending approval in Headscale", list(&pending)),
                    Some(&format!(
                        "the policy's autoApprovers must cover it for this node's tag or user, or approve it: \
                         headscale nodes approve-routes --identifier <id> --routes {} (a node learns of an approval \
                         made by hand only when it next reconnects to Headscale; other nodes route at once)",
                        list(&pending)
                    )),
                );
            }
            return Some(approved);
        }
        let key = status.node_key().unwrap_or_default().to_string();
        if let Some((confirmed, confirmed_key, at)) = &self.approval_confirmed
            && confirmed == desired
            && *confirmed_key == key
            && at.elapsed() < APPROVAL_RECHECK
        {
            return Some(desired.clone());
        }
        match self.approve_with_api(status, desired).await {
            Ok(approved) => {
                let pending: BTreeSet<IpNetwork> = desired.difference(&approved).copied().collect();
                if pending.is_empty() {
                    self.approval_confirmed = Some((desired.clone(), key, Instant::now()));
                    self.note_approved();
                } else {
                    self.wait(
                        "approval",
                        format!("route {} pending approval: Headscale has not seen it advertised yet", list(&pending)),
                        None,
                    );
                }
                Some(approved)
            }
            Err(e) => {
                let hint = match &e {
                    HeadscaleError::Unreachable { .. } => Some("approval is retried; pods keep working meanwhile"),
                    _ => None,
                };
                self.fail("approval", e.to_string(), hint);
                None
            }
        }
    }

    fn note_approved(&mut self) {
        if self.approved_in.is_none()
            && let Some(at) = self.advertised_at
        {
            self.approved_in = Some(at.elapsed());
        }
    }

    async fn approve_with_api(
        &mut self,
        status: &Status,
        desired: &BTreeSet<IpNetwork>,
    ) -> Result<BTreeSet<IpNetwork>, HeadscaleError> {
        let Some(hs) = self.hs.as_ref() else { return Ok(BTreeSet::new()) };
        if !self.headscale_checked {
            if let Some(v) = hs.version().await?
                && let Some(mm) = parse_version(&v)
                && mm < MIN_VERSION
            {
                return Err(HeadscaleError::TooOld { version: v });
            }
            self.headscale_checked = true;
        }
        let Some(key) = status.node_key() else { return Ok(BTreeSet::new()) };
        let nodes = hs.nodes().await?;
        let Some(node) = nodes.into_iter().find(|n| n.node_key == key) else {
            return Err(HeadscaleError::Status {
                what: "finding this node".into(),
                status: hyper::StatusCode::NOT_FOUND,
                msg: format!(
                    "no node with this node's key ({key}); is --headscale-url the server tailscaled is logged in to?"
                ),
            });
        };
        if !node.has_route_api() {
            return Err(HeadscaleError::TooOld { version: "(the server)".into() });
        }
        let approved = set(&node.approved());
        let available = set(&node.available());
        let ours = {
            let node_id = node.id.clone();
            let Some(st) = self.state() else { return Ok(approved.intersection(desired).copied().collect()) };
            if st.approved_node_id.as_deref() != Some(node_id.as_str()) {
                // A new registration: approvals recorded for an older node id are not this node's.
                if let Some(old) = st.approved_node_id.replace(node_id.clone())
                    && !st.approved_routes.is_empty()
                {
                    log::info!(
                        "this node registered again in Headscale (node id {old} -> {node_id}); the old registration \
                         keeps its approvals: remove it with `headscale nodes delete --identifier {old}`"
                    );
                }
                st.approved_routes.clear();
            }
            st.approved_routes.clone()
        };
        let next = merge_approvals(&approved, &available, desired, &ours);
        if next == approved {
            return Ok(approved.intersection(desired).copied().collect());
        }
        let adding: BTreeSet<IpNetwork> = next.difference(&approved).copied().collect();
        let dropping: BTreeSet<IpNetwork> = approved.difference(&next).copied().collect();
        if let Some(st) = self.state() {
            st.approved_routes.extend(adding.iter().copied());
        }
        if !self.store_state() {
            return Ok(approved.intersection(desired).copied().collect());
        }
        let Some(hs) = self.hs.as_ref() else { return Ok(BTreeSet::new()) };
        let routes: Vec<IpNetwork> = next.iter().copied().collect();
        let result = hs.approve_routes(&node.id, &routes).await?;
        let now_approved = set(&result.approved());
        log::info!(
            "Headscale: {}{} for node {} (id {}); approved now: {}",
            if adding.is_empty() { String::new() } else { format!("approved {}", list(&adding)) },
            if dropping.is_empty() { String::new() } else { format!(" withdrew approval of {}", list(&dropping)) },
            node.display_name(),
            node.id,
            list(&now_approved)
        );
        if !dropping.is_empty() {
            if let Some(st) = self.state() {
                st.approved_routes.retain(|r| !dropping.contains(r));
            }
            self.store_state();
        }
        Ok(now_approved.intersection(desired).copied().collect())
    }

    async fn step_dataplane(&mut self, pods: &[IpNetwork], status: Option<&Status>) {
        let v4 = pods.iter().any(IpNetwork::is_ipv4);
        let v6 = pods.iter().any(IpNetwork::is_ipv6);
        let mut changes = Vec::new();
        match self.dp.ensure_forwarding(v4, v6).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail("dataplane/forwarding", format!("turning on IP forwarding: {e}"), None),
        }
        match self.dp.ensure_rules(pods, self.cfg.rule_priority).await {
            Ok(c) => changes.extend(c.items),
            Err(e) => self.fail("dataplane/rules", format!("policy rules: {e}"), None),
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
            Err(e) => self.fail("dataplane/masquerade", format!("masquerade table: {e}"), None),
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
                self.fail("dataplane/mtu", format!("looking up the tailnet interface: {e}"), None);
                None
            }
        };
        let mtu = match (self.cfg.mtu, &link) {
            (Some(fixed), Some((name, tun))) => {
                if fixed > *tun {
                    self.warn(
                        "dataplane/mtu",
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
                    "dataplane/mtu",
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
                self.fail("node_file", e.to_string(), Some("--run-dir must be the host's /run/headcni"));
                path.exists()
            }
        }
    }
}

/// The next pause after a pass.
pub fn next_delay(outcome: PassOutcome, streak: u32, joining: bool) -> Duration {
    if joining {
        return Duration::from_millis(250);
    }
    match outcome {
        PassOutcome::Converged => STEADY_INTERVAL,
        PassOutcome::Waiting | PassOutcome::Failed => {
            let base = Duration::from_secs(1).saturating_mul(1 << streak.min(6));
            let cap = if outcome == PassOutcome::Waiting { Duration::from_secs(30) } else { MAX_BACKOFF };
            let d = base.min(cap);
            // ±10 % jitter so that a fleet of agents does not retry in lockstep.
            let mut b = [0u8; 2];
            let r = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
                .map(|_| u16::from_ne_bytes(b))
                .unwrap_or(0);
            let jitter = i64::from(r % 21) - 10;
            let ms = d.as_millis() as i64;
            Duration::from_millis((ms + ms * jitter / 100).max(500) as u64)
        }
    }
}

#[cfg(test)]
mod tests;
