//! One pass of the leader, carried out over two seams ([`HeadscaleAdmin`] and [`ClusterApi`]):
//! read Headscale's nodes and the record, [`plan`] it, then write in an order that never loses
//! track of an approval:
//!
//! 1. the record, with everything about to be approved added (write-ahead);
//! 2. the approvals, one Headscale node at a time (a failure skips that node only);
//! 3. the record as it is now (a failed withdrawal stays recorded, to be retried);
//! 4. the Headscale nodes to delete (only once their approvals are withdrawn);
//! 5. each Node's status annotation, where it changed.
//!
//! Nothing is written when Headscale's list or the record cannot be read: an outage changes
//! nothing, and the next pass catches up. Before each write the pass checks it still leads.

use super::metrics::{HsOp, KubeOp, Metrics};
use super::plan::{self, Inputs, NodeView, Plan, describe};
use super::record::Record;
use crate::binding::{ApprovalState, ApprovalStatus};
use crate::clients::headscale::{HeadscaleAdmin, HeadscaleError, HsNode};
use crate::clients::kube::KubeError;
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

/// The Kubernetes side of a pass (a seam for unit tests).
pub trait ClusterApi: Send + Sync {
    /// The record and its resourceVersion.
    fn load_record(&self) -> impl Future<Output = Result<(Record, String), KubeError>> + Send;
    /// Replaces the record if its resourceVersion is still `version`; answers the new one.
    fn store_record(&self, record: &Record, version: &str) -> impl Future<Output = Result<String, KubeError>> + Send;
    /// Sets (or, with `None`, removes) a Node's status annotation.
    fn set_status(
        &self,
        node: &str,
        status: Option<&ApprovalStatus>,
    ) -> impl Future<Output = Result<(), KubeError>> + Send;
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything as wanted.
    Converged,
    /// Waiting for something outside (a route not advertised yet, a key not in Headscale
    /// yet): look again soon.
    Pending,
    /// A read or a write failed.
    Failed,
    /// Leadership was lost during the pass; the rest was not written.
    NotLeading,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("listing Headscale's nodes: {0}")]
    Headscale(#[from] HeadscaleError),
    #[error("the approval record: {0}")]
    Record(String),
}

/// The leader's loop state.
pub struct Controller<H, C> {
    pub hs: H,
    pub cluster: C,
    pub metrics: Arc<Metrics>,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub delete_unbound: bool,
}

impl<H: HeadscaleAdmin, C: ClusterApi> Controller<H, C> {
    /// One pass over `nodes`; `teardown`: withdraw everything recorded and approve nothing.
    /// `leading` is asked before each write. Answers the outcome and whether the record is empty
    /// afterwards.
    pub async fn pass(
        &self,
        nodes: &[NodeView],
        teardown: bool,
        leading: &(dyn Fn() -> bool + Sync),
    ) -> (Outcome, bool) {
        match self.try_pass(nodes, teardown, leading).await {
            Ok(r) => r,
            Err(e) => {
                log::warn!("{e}; nothing changed, retrying");
                (Outcome::Failed, false)
            }
        }
    }

    async fn try_pass(
        &self,
        nodes: &[NodeView],
        teardown: bool,
        leading: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Outcome, bool), PassError> {
        let tailnet: Vec<HsNode> = self.hs.nodes().await.inspect_err(|_| self.metrics.headscale_error(HsOp::List))?;
        let (record, mut version) = self.cluster.load_record().await.map_err(|e| {
            self.metrics.kubernetes_error(KubeOp::RecordRead);
            PassError::Record(e.to_string())
        })?;
        let plan = if teardown {
            plan::plan_teardown(&tailnet, &record)
        } else {
            plan::plan(&Inputs {
                nodes,
                tailnet: &tailnet,
                record: &record,
                cluster_cidrs: &self.cluster_cidrs,
                delete_unbound: self.delete_unbound,
            })
        };
        if !teardown {
            self.publish_gauges(&plan);
        }
        let mut failed = false;

        // 1. Write-ahead.
        if plan.record_ahead != record {
            if !leading() {
                return Ok((Outcome::NotLeading, false));
            }
            version = self.store(&plan.record_ahead, &version).await?;
        }
        // 2. Approvals.
        let mut failed_ids: BTreeSet<String> = BTreeSet::new();
        for w in &plan.writes {
            if !leading() {
                return Ok((Outcome::NotLeading, false));
            }
            let routes: Vec<IpNetwork> = w.after.iter().copied().collect();
            match self.hs.approve_routes(&w.node_id, &routes).await {
                Ok(now) => {
                    self.metrics.approvals.inc_by(w.added().len() as u64);
                    self.metrics.withdrawals.inc_by(w.removed().len() as u64);
                    log::info!("{}", describe(w));
                    let got: BTreeSet<IpNetwork> = now.approved().into_iter().collect();
                    if got != w.after {
                        log::warn!(
                            "Headscale answered approved routes {got:?} for node {} instead of {:?}",
                            w.node_id,
                            w.after
                        );
                    }
                }
                Err(e) => {
                    self.metrics.headscale_error(HsOp::Approve);
                    log::warn!("approving routes on tailnet node {} (id {}): {e}", w.name, w.node_id);
                    failed_ids.insert(w.node_id.clone());
                    failed = true;
                }
            }
        }
        // 3. The record as it is now.
        let mut now = if teardown {
            let mut r = plan.record_ahead.clone();
            r.entries.retain(|id, _| failed_ids.contains(id));
            r
        } else {
            plan.record_after.clone()
        };
        for id in &failed_ids {
            match plan.record_ahead.entries.get(id) {
                Some(e) => {
                    now.entries.insert(id.clone(), e.clone());
                }
                None => {
                    now.entries.remove(id);
                }
            }
        }
        if now != plan.record_ahead {
            if !leading() {
                return Ok((Outcome::NotLeading, false));
            }
            self.store(&now, &version).await?;
        }
        let record_empty = now.entries.is_empty();
        // 4. Deletions.
        for id in plan.deletions.iter().filter(|id| !failed_ids.contains(*id)) {
            if !leading() {
                return Ok((Outcome::NotLeading, record_empty));
            }
            match self.hs.delete_node(id).await {
                Ok(()) => {
                    self.metrics.deleted_nodes.inc();
                    log::info!("deleted tailnet node {id} from Headscale: its Kubernetes Node was deleted");
                }
                Err(e) => {
                    self.metrics.headscale_error(HsOp::Delete);
                    log::warn!("deleting tailnet node {id} from Headscale: {e}");
                    failed = true;
                }
            }
        }
        // 5. Statuses.
        let mut pending = false;
        if !teardown {
            for n in nodes {
                let Some(want) = plan.statuses.get(&n.name) else { continue };
                if want.as_ref().is_some_and(|s| s.state != ApprovalState::Approved) {
                    pending = true;
                }
                if *want == n.status {
                    continue;
                }
                if !leading() {
                    return Ok((Outcome::NotLeading, record_empty));
                }
                if let Err(e) = self.cluster.set_status(&n.name, want.as_ref()).await {
                    self.metrics.kubernetes_error(KubeOp::NodeStatus);
                    log::warn!("writing the approval status of Node {}: {e}", n.name);
                    failed = true;
                }
            }
        }
        let outcome = if failed {
            Outcome::Failed
        } else if pending {
            Outcome::Pending
        } else {
            Outcome::Converged
        };
        Ok((outcome, record_empty))
    }

    async fn store(&self, record: &Record, version: &str) -> Result<String, PassError> {
        self.cluster.store_record(record, version).await.map_err(|e| {
            self.metrics.kubernetes_error(KubeOp::RecordWrite);
            PassError::Record(e.to_string())
        })
    }

    fn publish_gauges(&self, plan: &Plan) {
        self.metrics.bound_nodes.set(i64::try_from(plan.bound).unwrap_or(i64::MAX));
        for r in plan::Mismatch::ALL {
            let n = plan.mismatches.get(&r).copied().unwrap_or(0);
            self.metrics
                .mismatches
                .get_or_create(&vec![("reason", r.as_str().to_string())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}
