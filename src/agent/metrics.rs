//! The agent's Prometheus metrics (prometheus-client, OpenMetrics text).
//!
//! Plugin events (allocations, releases, setup times, errors) arrive through the spool of
//! [`crate::events`]; [`Metrics::collect_events`] drains it (periodically and before every
//! scrape) under a lock, and the spool deletes what it hands out, so each event counts once.
//! The agent's own state is exported as gauges, set after every reconcile pass.

use super::report::Step;
use crate::events::{self, Event};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    run_dir: PathBuf,
    drain: Mutex<()>,
    pub ip_allocations: Family<Labels, Counter>,
    pub ip_releases: Family<Labels, Counter>,
    pub network_errors: Family<Labels, Counter>,
    pub pod_setup: Histogram,
    pub routes_advertised: Gauge,
    pub routes_approved: Gauge,
    pub routes_pending_approval: Gauge,
    pub routes_accepted_from_peers: Gauge,
    pub tailnet_backend_state: Family<Labels, Gauge>,
    pub reconcile_errors: Family<Labels, Gauge>,
    pub reconcile_failures: Family<Labels, Counter>,
    pub pod_mtu: Gauge,
    pub ready: Gauge,
    /// The NetworkPolicy engine's (`headcni_policy_*`).
    pub policy: super::policy::metrics::PolicyMetrics,
}

fn family_label(ipv6: bool) -> Labels {
    vec![("family", if ipv6 { "ipv6" } else { "ipv4" }.to_string())]
}

impl Metrics {
    pub fn new(run_dir: &Path) -> Self {
        let mut registry = Registry::with_prefix("headcni");
        let ip_allocations = Family::<Labels, Counter>::default();
        let ip_releases = Family::<Labels, Counter>::default();
        let network_errors = Family::<Labels, Counter>::default();
        // 1 ms .. ~16 s
        let pod_setup = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15));
        let routes_advertised = Gauge::default();
        let routes_approved = Gauge::default();
        let routes_pending_approval = Gauge::default();
        let routes_accepted_from_peers = Gauge::default();
        let tailnet_backend_state = Family::<Labels, Gauge>::default();
        let reconcile_errors = Family::<Labels, Gauge>::default();
        let reconcile_failures = Family::<Labels, Counter>::default();
        let pod_mtu = Gauge::default();
        let ready = Gauge::default();
        // Counters are registered without "_total": the encoder adds it.
        registry.register("ip_allocations", "Pod IP addresses handed out by IPAM on this node", ip_allocations.clone());
        registry.register("ip_releases", "Pod IP addresses given back on this node", ip_releases.clone());
        registry.register("network_errors", "Failed CNI operations on this node, by operation", network_errors.clone());
        registry.register(
            "pod_network_setup_duration_seconds",
            "Time the CNI plugin took to set up a pod's network (ADD)",
            pod_setup.clone(),
        );
        registry.register(
            "routes_advertised",
            "Pod CIDRs of this node advertised to the tailnet",
            routes_advertised.clone(),
        );
        registry.register(
            "routes_approved",
            "Pod CIDRs of this node approved by Headscale (as far as the agent can tell)",
            routes_approved.clone(),
        );
        registry.register(
            "routes_pending_approval",
            "Pod CIDRs of this node advertised but not (yet) approved by Headscale",
            routes_pending_approval.clone(),
        );
        registry.register(
            "routes_accepted_from_peers",
            "Subnet routes of other tailnet nodes this node accepts",
            routes_accepted_from_peers.clone(),
        );
        registry.register(
            "tailnet_backend_state",
            "tailscaled's backend state (1 for the current one; Unreachable when the LocalAPI does not answer)",
            tailnet_backend_state.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile steps failing right now (1) or not (0)",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconcile steps since the agent started",
            reconcile_failures.clone(),
        );
        registry.register("pod_mtu", "MTU given to pod interfaces (0 until known)", pod_mtu.clone());
        registry.register("ready", "1 when the node file is written and the pod CIDRs are advertised", ready.clone());
        let policy = super::policy::metrics::PolicyMetrics::default();
        policy.register(&mut registry);
        for step in Step::ALL {
            reconcile_errors.get_or_create(&vec![("step", step.as_str().to_string())]).set(0);
        }
        for fam in [false, true] {
            ip_allocations.get_or_create(&family_label(fam)).inc_by(0);
            ip_releases.get_or_create(&family_label(fam)).inc_by(0);
        }
        Self {
            registry,
            run_dir: run_dir.to_path_buf(),
            drain: Mutex::new(()),
            ip_allocations,
            ip_releases,
            network_errors,
            pod_setup,
            routes_advertised,
            routes_approved,
            routes_pending_approval,
            routes_accepted_from_peers,
            tailnet_backend_state,
            reconcile_errors,
            reconcile_failures,
            pod_mtu,
            ready,
            policy,
        }
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
            Event::NetworkError { operation } => {
                self.network_errors.get_or_create(&vec![("operation", operation.clone())]).inc();
            }
        }
    }

    /// Drains the plugins' event spool into the metrics; answers how many events it counted.
    pub fn collect_events(&self) -> usize {
        let _guard = self.drain.lock().unwrap_or_else(|p| p.into_inner());
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
            self.tailnet_backend_state.get_or_create(&vec![("state", s.to_string())]).set(i64::from(s == state));
        }
    }

    pub fn set_step(&self, step: Step, failing: bool) {
        let label = vec![("step", step.as_str().to_string())];
        self.reconcile_errors.get_or_create(&label).set(i64::from(failing));
        if failing {
            self.reconcile_failures.get_or_create(&label).inc();
        }
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            log::warn!("encoding metrics: {e}");
        }
        out
    }
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

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
                Event::NetworkError { operation: "add".into() },
            ],
        );
        assert_eq!(m.collect_events(), 6);
        assert_eq!(m.collect_events(), 0);
        let text = m.encode();
        for needle in [
            "headcni_ip_allocations_total{family=\"ipv4\"} 2",
            "headcni_ip_allocations_total{family=\"ipv6\"} 1",
            "headcni_ip_releases_total{family=\"ipv4\"} 1",
            "headcni_network_errors_total{operation=\"add\"} 1",
            "headcni_pod_network_setup_duration_seconds_count 1",
            "headcni_pod_network_setup_duration_seconds_bucket{le=\"0.032\"} 1",
            "headcni_reconcile_errors{step=\"approval\"} 0",
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
        assert!(text.contains("headcni_reconcile_errors{step=\"approval\"} 1"));
        assert!(text.contains("headcni_reconcile_failures_total{step=\"approval\"} 1"));
        assert!(text.contains("headcni_routes_pending_approval 1"));
    }
}
