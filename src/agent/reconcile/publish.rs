//! The end of a pass: the report file `headcni status` reads, the metrics, and readiness.

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
        if let Err(e) = report.store(&self.cfg.run_dir) {
            log::debug!("writing {}: {e}", report::path_in(&self.cfg.run_dir).display());
        }
    }
}
