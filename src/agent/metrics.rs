//! The agent's Prometheus metrics (prometheus-client), in the format the scraper asks for.
//!
//! Plugin events (allocations, releases, setup and teardown times, errors) arrive through the
//! spool of [`crate::events`]; [`Metrics::collect_events`] drains it (periodically and before
//! every scrape) under a lock, and the spool deletes what it hands out, so each event counts
//! once. The agent's own state is exported as gauges, set after every reconcile pass.
//!
//! Every series a dashboard or an alert looks for exists from the start (counters at 0), so
//! that `rate()` and `absent()` mean what they say. Units are in the names (`_bytes`,
//! `_seconds`); gauges are named for a state, counters end in `_total`.
//!
//! The exposition follows the scraper's `Accept` header, as [`crate::exposition`] decides:
//! OpenMetrics 1.0 when asked for, else the classic text format 0.0.4.

use super::report::Step;
use crate::events::{self, Event};
use crate::exposition::{self, Exposition};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type Labels = Vec<(&'static str, String)>;

/// The CNI operations whose failures are counted (`headcni_network_errors_total{operation}`).
pub const CNI_OPERATIONS: [&str; 3] = ["add", "del", "check"];
/// The Headscale API calls the agent makes (`headcni_headscale_api_errors_total{operation}`).
pub const HEADSCALE_OPERATIONS: [&str; 3] = ["version", "list_nodes", "approve_routes"];
/// What the agent reads from Kubernetes (`headcni_kubernetes_api_errors_total{operation}`).
pub const KUBERNETES_OPERATIONS: [&str; 2] = ["watch_node", "watch_uninstall_signal"];
/// How traffic reaches a peer (`headcni_tailnet_peer_path{peer,path}`).
pub const PEER_PATHS: [&str; 3] = ["direct", "relay", "idle"];

fn label(key: &'static str, value: &str) -> Labels {
    vec![(key, value.to_string())]
}

fn family_label(ipv6: bool) -> Labels {
    label("family", if ipv6 { "ipv6" } else { "ipv4" })
}

/// A counter family by one label, each of `values` present from the start.
fn counters(values: &[&str], key: &'static str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for v in values {
        family.get_or_create(&label(key, v)).inc_by(0);
    }
    family
}

/// Counts the failed requests of one kind (handed to the tasks that make them).
#[derive(Clone)]
pub struct ApiErrors {
    family: Family<Labels, Counter>,
    operation: &'static str,
}

impl ApiErrors {
    pub fn inc(&self) {
        self.family.get_or_create(&label("operation", self.operation)).inc();
    }
}

/// One address pool (a range set of a network) as the IPAM store counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub network: String,
    /// Its subnets, comma separated.
    pub pool: String,
    pub used: u128,
    pub total: u128,
}

pub struct Metrics {
    registry: Registry,
    run_dir: PathBuf,
    /// HeadCNI's conflist: the IPAM store whose pools are counted (see [`Metrics::reading_ipam`]).
    ipam_conflist: Option<PathBuf>,
    drain: Mutex<()>,
    pub build_info: Family<Labels, Gauge>,
    pub ip_allocations: Family<Labels, Counter>,
    pub ip_releases: Family<Labels, Counter>,
    pub network_errors: Family<Labels, Counter>,
    pub pod_setup: Histogram,
    pub pod_teardown: Histogram,
    pub pod_cidrs: Gauge,
    pub routes_advertised: Gauge,
    pub routes_approved: Gauge,
    pub routes_pending_approval: Gauge,
    pub routes_not_admitted: Gauge,
    pub routes_accepted_from_peers: Gauge,
    pub tailnet_backend_state: Family<Labels, Gauge>,
    pub tailnet_peer_path: Family<Labels, Gauge>,
    pub reconcile_step_failing: Family<Labels, Gauge>,
    pub reconcile_failures: Family<Labels, Counter>,
    pub headscale_api_errors: Family<Labels, Counter>,
    pub kubernetes_api_errors: Family<Labels, Counter>,
    pub pod_mtu_bytes: Gauge,
    pub tailnet_mtu_bytes: Gauge,
    pub ipam_addresses_used: Family<Labels, Gauge>,
    pub ipam_addresses_free: Family<Labels, Gauge>,
    pub ready: Gauge,
    /// The NetworkPolicy engine's (`headcni_policy_*`).
    pub policy: super::policy::metrics::PolicyMetrics,
}

impl Metrics {
    pub fn new(run_dir: &Path) -> Self {
        let mut registry = Registry::with_prefix("headcni");
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", crate::VERSION.to_string()), ("arch", std::env::consts::ARCH.to_string())])
            .set(1);
        let ip_allocations = counters(&["ipv4", "ipv6"], "family");
        let ip_releases = counters(&["ipv4", "ipv6"], "family");
        let network_errors = counters(&CNI_OPERATIONS, "operation");
        // 1 ms .. ~16 s
        let pod_setup = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let pod_teardown = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let steps: Vec<&str> = Step::ALL.iter().map(|s| s.as_str()).collect();
        let reconcile_step_failing = Family::<Labels, Gauge>::default();
        for step in &steps {
            reconcile_step_failing.get_or_create(&label("step", step)).set(0);
        }
        let reconcile_failures = counters(&steps, "step");
        let headscale_api_errors = counters(&HEADSCALE_OPERATIONS, "operation");
        let kubernetes_api_errors = counters(&KUBERNETES_OPERATIONS, "operation");
        let m = Self {
            registry: Registry::default(),
            run_dir: run_dir.to_path_buf(),
            ipam_conflist: None,
            drain: Mutex::new(()),
            build_info,
            ip_allocations,
            ip_releases,
            network_errors,
            pod_setup,
            pod_teardown,
            pod_cidrs: Gauge::default(),
            routes_advertised: Gauge::default(),
            routes_approved: Gauge::default(),
            routes_pending_approval: Gauge::default(),
            routes_not_admitted: Gauge::default(),
            routes_accepted_from_peers: Gauge::default(),
            tailnet_backend_state: Family::default(),
            tailnet_peer_path: Family::default(),
            reconcile_step_failing,
            reconcile_failures,
            headscale_api_errors,
            kubernetes_api_errors,
            pod_mtu_bytes: Gauge::default(),
            tailnet_mtu_bytes: Gauge::default(),
            ipam_addresses_used: Family::default(),
            ipam_addresses_free: Family::default(),
            ready: Gauge::default(),
            policy: super::policy::metrics::PolicyMetrics::default(),
        };
        // Counters are registered without "_total": the encoder adds it.
        let r = &mut registry;
        r.register("build_info", "The running headcni: version and architecture (always 1)", m.build_info.clone());
        r.register("ip_allocations", "Pod IP addresses handed out by IPAM on this node", m.ip_allocations.clone());
        r.register("ip_releases", "Pod IP addresses given back on this node", m.ip_releases.clone());
        r.register("network_errors", "Failed CNI operations on this node, by operation", m.network_errors.clone());
        r.register(
            "pod_network_setup_duration_seconds",
            "Time the CNI plugin took to set up a pod's network (ADD)",
            m.pod_setup.clone(),
        );
        r.register(
            "pod_network_teardown_duration_seconds",
            "Time the CNI plugin took to remove a pod's network (DEL)",
            m.pod_teardown.clone(),
        );
        r.register("pod_cidrs", "Pod CIDRs known for this node (0: none yet, pods cannot start)", m.pod_cidrs.clone());
        r.register(
            "routes_advertised",
            "Pod CIDRs of this node advertised to the tailnet",
            m.routes_advertised.clone(),
        );
        r.register(
            "routes_approved",
            "Pod CIDRs of this node approved by Headscale (as far as the agent can tell)",
            m.routes_approved.clone(),
        );
        r.register(
            "routes_pending_approval",
            "Pod CIDRs of this node advertised but not (yet) approved by Headscale",
            m.routes_pending_approval.clone(),
        );
        r.register(
            "routes_not_admitted",
            "Pod CIDRs of this node approved, but into which the packet filter in force lets no pod of the cluster",
            m.routes_not_admitted.clone(),
        );
        r.register(
            "routes_accepted_from_peers",
            "Subnet routes of other tailnet nodes this node accepts",
            m.routes_accepted_from_peers.clone(),
        );
        r.register(
            "tailnet_backend_state",
            "tailscaled's backend state (1 for the current one; Unreachable when the LocalAPI does not answer)",
            m.tailnet_backend_state.clone(),
        );
        r.register(
            "tailnet_peer_path",
            "How traffic to each tailnet peer flows (1 for the current path): direct, relay (DERP) or idle",
            m.tailnet_peer_path.clone(),
        );
        r.register(
            "reconcile_step_failing",
            "Whether a reconcile step fails right now (1) or not (0)",
            m.reconcile_step_failing.clone(),
        );
        r.register(
            "reconcile_failures",
            "Failed reconcile steps since the agent started",
            m.reconcile_failures.clone(),
        );
        r.register(
            "headscale_api_errors",
            "Failed requests to Headscale's API, by operation",
            m.headscale_api_errors.clone(),
        );
        r.register(
            "kubernetes_api_errors",
            "Failed reads of the Kubernetes API, by operation",
            m.kubernetes_api_errors.clone(),
        );
        r.register("pod_mtu_bytes", "MTU pods get on this node (0 until known)", m.pod_mtu_bytes.clone());
        r.register(
            "tailnet_mtu_bytes",
            "MTU of the tailnet interface (0 until it exists)",
            m.tailnet_mtu_bytes.clone(),
        );
        r.register(
            "ipam_addresses_used",
            "Pod addresses in use, per network and pool of the node's IPAM",
            m.ipam_addresses_used.clone(),
        );
        r.register(
            "ipam_addresses_free",
            "Pod addresses still free, per network and pool of the node's IPAM",
            m.ipam_addresses_free.clone(),
        );
        r.register("ready", "1 when the node file is written and the pod CIDRs are advertised", m.ready.clone());
        m.policy.register(r);
        // Present from the start, none current until the first look at tailscaled (a scrape
        // before the first pass finds the family, all 0).
        m.set_backend_state("");
        Self { registry, ..m }
    }

    /// Counts the pools of the headcni-ipam store that `conflist` names, read afresh with the
    /// plugins' events (before every scrape).
    pub fn reading_ipam(mut self, conflist: PathBuf) -> Self {
        self.ipam_conflist = Some(conflist);
        self
    }

    /// The counter of failed Headscale requests of `operation` (one of [`HEADSCALE_OPERATIONS`]).
    pub fn headscale_errors(&self, operation: &'static str) -> ApiErrors {
        ApiErrors { family: self.headscale_api_errors.clone(), operation }
    }

    /// The counter of failed Kubernetes reads of `operation` (one of [`KUBERNETES_OPERATIONS`]).
    pub fn kubernetes_errors(&self, operation: &'static str) -> ApiErrors {
        ApiErrors { family: self.kubernetes_api_errors.clone(), operation }
    }

    /// Counts one event.
    pub fn observe(&self, event: &Event) {
        match event {
            Event::IpAllocated { ipv6 } => {
                self.ip_allocations.get_or_create(&family_label(*ipv6)).inc();
            }
            Event::IpReleased { ipv6 } => {
                self.ip_releases.get_or_create(&family_label(*ipv6)).inc();
            }
            Event::PodSetup { seconds } => self.pod_setup.observe(*seconds),
            Event::PodTeardown { seconds } => self.pod_teardown.observe(*seconds),
            Event::NetworkError { operation } => {
                self.network_errors.get_or_create(&label("operation", operation)).inc();
            }
        }
    }

    /// Drains the plugins' event spool into the metrics, and reads the IPAM pools; answers how
    /// many events it counted.
    pub fn collect_events(&self) -> usize {
        let _guard = self.drain.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conflist) = &self.ipam_conflist {
            self.set_ipam(&read_pools(conflist));
        }
        match events::drain(&self.run_dir) {
            Ok(events) => {
                for e in &events {
                    self.observe(e);
                }
                events.len()
            }
            Err(e) => {
                log::debug!("event spool in {}: {e}", self.run_dir.display());
                0
            }
        }
    }

    pub fn set_backend_state(&self, state: &str) {
        let states = crate::clients::localapi::BACKEND_STATES.iter().copied().chain(["Unreachable"]);
        for s in states {
            self.tailnet_backend_state.get_or_create(&label("state", s)).set(i64::from(s == state));
        }
    }

    /// The peers as tailscaled sees them now: (hostname, path); peers that left disappear.
    pub fn set_peer_paths<'a>(&self, peers: impl IntoIterator<Item = (&'a str, &'a str)>) {
        self.tailnet_peer_path.clear();
        for (peer, current) in peers {
            for path in PEER_PATHS {
                let labels = vec![("peer", peer.to_string()), ("path", path.to_string())];
                self.tailnet_peer_path.get_or_create(&labels).set(i64::from(path == current));
            }
        }
    }

    /// The IPAM pools of the node now; pools that are gone disappear.
    pub fn set_ipam(&self, pools: &[PoolUsage]) {
        self.ipam_addresses_used.clear();
        self.ipam_addresses_free.clear();
        for p in pools {
            let labels = vec![("network", p.network.clone()), ("pool", p.pool.clone())];
            let gauge = |n: u128| i64::try_from(n).unwrap_or(i64::MAX);
            self.ipam_addresses_used.get_or_create(&labels).set(gauge(p.used));
            self.ipam_addresses_free.get_or_create(&labels).set(gauge(p.total.saturating_sub(p.used)));
        }
    }

    pub fn set_step(&self, step: Step, failing: bool) {
        let labels = label("step", step.as_str());
        self.reconcile_step_failing.get_or_create(&labels).set(i64::from(failing));
        if failing {
            self.reconcile_failures.get_or_create(&labels).inc();
        }
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        self.expose(Exposition::OpenMetrics)
    }

    /// Everything in `format`.
    pub fn expose(&self, format: Exposition) -> String {
        exposition::expose(&self.registry, format)
    }
}

/// The pools of the headcni-ipam store HeadCNI's conflist names (none for another IPAM).
fn read_pools(conflist: &Path) -> Vec<PoolUsage> {
    let Some((network, data_dir)) = crate::cniconf::headcni_ipam_store(conflist) else { return Vec::new() };
    match crate::ipam::pool_usage(&data_dir, &network) {
        Ok(sets) => sets
            .into_iter()
            .map(|s| PoolUsage { network: network.clone(), pool: s.pool, used: s.used, total: s.total })
            .collect(),
        Err(e) => {
            log::debug!("IPAM store {}: {e}", data_dir.display());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_and_info_is_there_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let text = Metrics::new(dir.path()).encode();
        for needle in [
            "headcni_network_errors_total{operation=\"add\"} 0",
            "headcni_network_errors_total{operation=\"del\"} 0",
            "headcni_reconcile_failures_total{step=\"approval\"} 0",
            "headcni_reconcile_failures_total{step=\"pod_cidrs\"} 0",
            "headcni_headscale_api_errors_total{operation=\"approve_routes\"} 0",
            "headcni_kubernetes_api_errors_total{operation=\"watch_node\"} 0",
            "headcni_ip_releases_total{family=\"ipv6\"} 0",
            "headcni_pod_network_teardown_duration_seconds_count 0",
            "headcni_pod_mtu_bytes 0",
            "headcni_tailnet_mtu_bytes 0",
            "headcni_pod_cidrs 0",
            "headcni_tailnet_backend_state{state=\"Running\"} 0",
            "headcni_tailnet_backend_state{state=\"Unreachable\"} 0",
            "# TYPE headcni_build_info gauge",
            concat!("headcni_build_info{version=\"", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        for gone in ["headcni_pod_mtu ", "headcni_reconcile_errors"] {
            assert!(!text.contains(gone), "{gone} in\n{text}");
        }
    }

    #[test]
    fn both_formats_carry_every_sample() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path());
        let om = m.expose(Exposition::OpenMetrics);
        assert!(om.contains("# TYPE headcni_ip_allocations counter") && om.ends_with("# EOF\n"));
        let text = m.expose(Exposition::Text);
        assert!(text.contains("# TYPE headcni_ip_allocations_total counter\n"), "{text}");
        assert!(text.contains("# HELP headcni_ip_allocations_total Pod IP"), "{text}");
        assert!(text.contains("headcni_ip_allocations_total{family=\"ipv4\"} 0"));
        assert!(text.contains("# TYPE headcni_pod_network_setup_duration_seconds histogram"));
        assert!(!text.contains("# EOF") && !text.contains("# TYPE headcni_ip_allocations counter"));
        // Every sample keeps its line; only the metadata of counters is renamed.
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(samples(&om), samples(&text));
    }

    #[test]
    fn the_ipam_pools_are_read_at_each_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("ipam");
        let conflist = dir.path().join("10-headcni.conflist");
        let doc = serde_json::json!({"name": "podnet", "plugins": [{"type": "headcni",
            "ipam": {"type": "headcni-ipam", "dataDir": data}}]});
        std::fs::write(&conflist, doc.to_string()).unwrap();
        let m = Metrics::new(dir.path()).reading_ipam(conflist);
        m.collect_events();
        assert!(!m.encode().contains("headcni_ipam_addresses_used{"), "no store yet");
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet",
            "ipam": {"type": "headcni-ipam", "subnet": "10.44.0.0/28", "dataDir": data}});
        for cid in ["c1", "c2"] {
            let env: std::collections::HashMap<String, String> =
                [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", cid), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            let req = crate::cni::parse_request(crate::cni::Command::Add, &env, conf.to_string().as_bytes()).unwrap();
            crate::ipam::run_in_process(&req).unwrap();
        }
        m.collect_events();
        let text = m.encode();
        assert!(text.contains("headcni_ipam_addresses_used{network=\"podnet\",pool=\"10.44.0.0/28\"} 2"), "{text}");
        assert!(text.contains("headcni_ipam_addresses_free{network=\"podnet\",pool=\"10.44.0.0/28\"} 11"), "{text}");
    }

    #[test]
    fn peers_and_pools_follow_what_exists_now() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path());
        m.set_peer_paths([("node-2", "direct"), ("node-3", "relay")]);
        let text = m.encode();
        assert!(text.contains("headcni_tailnet_peer_path{peer=\"node-2\",path=\"direct\"} 1"));
        assert!(text.contains("headcni_tailnet_peer_path{peer=\"node-3\",path=\"relay\"} 1"));
        assert!(text.contains("headcni_tailnet_peer_path{peer=\"node-3\",path=\"direct\"} 0"));
        m.set_peer_paths([("node-2", "relay")]);
        assert!(!m.encode().contains("node-3"));
        m.set_ipam(&[PoolUsage { network: "headcni".into(), pool: "10.244.1.0/24".into(), used: 12, total: 253 }]);
        let text = m.encode();
        assert!(text.contains("headcni_ipam_addresses_used{network=\"headcni\",pool=\"10.244.1.0/24\"} 12"));
        assert!(text.contains("headcni_ipam_addresses_free{network=\"headcni\",pool=\"10.244.1.0/24\"} 241"));
        m.kubernetes_errors("watch_node").inc();
        assert!(m.encode().contains("headcni_kubernetes_api_errors_total{operation=\"watch_node\"} 1"));
    }

    #[test]
    fn events_become_metrics_once() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path());
        events::record(
            dir.path(),
            &[
                Event::IpAllocated { ipv6: false },
                Event::IpAllocated { ipv6: false },
                Event::IpAllocated { ipv6: true },
                Event::IpReleased { ipv6: false },
                Event::PodSetup { seconds: 0.02 },
                Event::PodTeardown { seconds: 0.03 },
                Event::NetworkError { operation: "add".into() },
            ],
        );
        assert_eq!(m.collect_events(), 7);
        assert_eq!(m.collect_events(), 0);
        let text = m.encode();
        for needle in [
            "headcni_ip_allocations_total{family=\"ipv4\"} 2",
            "headcni_ip_allocations_total{family=\"ipv6\"} 1",
            "headcni_ip_releases_total{family=\"ipv4\"} 1",
            "headcni_network_errors_total{operation=\"add\"} 1",
            "headcni_pod_network_setup_duration_seconds_count 1",
            "headcni_pod_network_setup_duration_seconds_bucket{le=\"0.032\"} 1",
            "headcni_pod_network_teardown_duration_seconds_count 1",
            "headcni_reconcile_step_failing{step=\"approval\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn gauges() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path());
        m.set_backend_state("Running");
        m.set_step(Step::Approval, true);
        m.routes_pending_approval.set(1);
        let text = m.encode();
        assert!(text.contains("headcni_tailnet_backend_state{state=\"Running\"} 1"));
        assert!(text.contains("headcni_tailnet_backend_state{state=\"NeedsLogin\"} 0"));
        assert!(text.contains("headcni_reconcile_step_failing{step=\"approval\"} 1"));
        assert!(text.contains("headcni_reconcile_failures_total{step=\"approval\"} 1"));
        assert!(text.contains("headcni_routes_pending_approval 1"));
    }
}
