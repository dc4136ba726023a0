//! The end of a pass: the report file `headcni status` reads (and `/status` serves), the
//! metrics, and readiness.

use super::Reconciler;
use crate::agent::hostnet::HostNetwork;
use crate::agent::node::PodCidrSource;
use crate::agent::report::{self, AgentReport, Step};
use crate::clients::headscale::HeadscaleApi;
use crate::clients::localapi::{LocalApi, Status};

impl<K: PodCidrSource, T: LocalApi, H: HeadscaleApi, D: HostNetwork> Reconciler<K, T, H, D> {
    pub(super) fn publish(&self, report: &AgentReport, status: Option<&Status>) {
        let m = &self.metrics;
        m.set_backend_state(if status.is_some() { &report.tailnet.backend_state } else { "Unreachable" });
        m.routes_advertised.set(report.routes.iter().filter(|r| r.advertised).count() as i64);
        m.routes_approved.set(report.routes.iter().filter(|r| r.approved == Some(true)).count() as i64);
        m.routes_pending_approval
            .set(report.routes.iter().filter(|r| r.advertised && r.approved == Some(false)).count() as i64);
        m.routes_not_admitted.set(report.routes.iter().filter(|r| r.admitted == Some(false)).count() as i64);
        if let Some(st) = status {
            let accepted = if report.tailnet.route_all {
                st.peer.values().map(|p| p.served_routes().len()).sum::<usize>() as i64
            } else {
                0
            };
            m.routes_accepted_from_peers.set(accepted);
        }
        // What pods really get: the CNI configuration's MTU where it sets one, else the node file's.
        let pod_mtu = report.cni_config.as_ref().and_then(|c| c.mtu).or(report.mtu);
        m.pod_mtu_bytes.set(i64::from(pod_mtu.unwrap_or(0)));
        m.tailnet_mtu_bytes.set(i64::from(report.tailnet_link.as_ref().map(|l| l.mtu).unwrap_or(0)));
        m.pod_cidrs.set(report.pod_cidrs.len() as i64);
        m.set_peer_paths(report.peers.iter().map(|p| (p.hostname.as_str(), p.path.as_str())));
        m.ready.set(i64::from(report.ready));
        for step in Step::ALL {
            m.set_step(step, self.problems.failing(step));
        }
        let reason = report
            .problems
            .iter()
            .map(|p| p.message.clone())
            .next()
            .unwrap_or_else(|| "the pod CIDRs are not advertised yet".into());
        self.health.set_ready(report.ready, &reason);
        self.health.beat();
        self.store_report(report);
    }

    fn store_report(&self, report: &AgentReport) {
        self.health.set_report(serde_json::to_string(report).unwrap_or_else(|_| "{}".into()));
        if let Err(e) = report.store(&self.cfg.run_dir) {
            log::debug!("writing {}: {e}", report::path_in(&self.cfg.run_dir).display());
        }
    }

    /// Records when the next report is due: after `pause`, plus what the last pass took
    /// (rounded up, at least 1 s). A report older than twice that means a silent agent.
    pub fn announce_next_pass(&mut self, pause: std::time::Duration) {
        let secs = (pause + self.last_pass).as_secs_f64().ceil().max(1.0) as u64;
        self.report.report_interval_secs = Some(secs);
        let report = self.report.clone();
        self.store_report(&report);
    }
}
