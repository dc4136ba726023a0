//! The controller's loop on fakes: a Headscale that keeps its nodes' routes (approve_routes
//! replaces the approved set, as the real one), and a cluster that keeps the record (with its
//! resourceVersion) and the Nodes' status annotations. The same cases run on the real
//! Kubernetes and Headscale in integration/controller-tests.sh.

use super::metrics::Metrics;
use super::plan::{self, Inputs, Mismatch, NodeView};
use super::reconcile::{ClusterApi, Controller, Outcome};
use super::record::{Record, RecordEntry};
use crate::binding::{ApprovalState, ApprovalStatus, NodeKey};
use crate::clients::headscale::{HeadscaleAdmin, HeadscaleApi, HeadscaleError, HsNode};
use crate::clients::kube::KubeError;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn nets(list: &[&str]) -> BTreeSet<IpNetwork> {
    list.iter().map(|s| net(s)).collect()
}

fn key(i: u8) -> String {
    format!("nodekey:{}", format!("{i:02x}").repeat(32))
}

fn hs_node(id: u8, advertised: &[&str], approved: &[&str]) -> HsNode {
    HsNode {
        id: id.to_string(),
        node_key: key(id),
        name: format!("node-{id}"),
        given_name: format!("node-{id}"),
        online: true,
        approved_routes: Some(approved.iter().map(|s| s.to_string()).collect()),
        available_routes: Some(advertised.iter().map(|s| s.to_string()).collect()),
        subnet_routes: None,
    }
}

/// Node `node-I`, with pod CIDR 10.244.I.0/24, publishing `published` (a tailnet node's key).
fn node(i: u8, published: Option<u8>) -> NodeView {
    NodeView {
        name: format!("node-{i}"),
        key: Ok(published.map(|p| NodeKey::parse(&key(p)).unwrap())),
        pod_cidrs: Ok(vec![net(&format!("10.244.{i}.0/24"))]),
        status: None,
    }
}

#[derive(Default)]
struct FakeHeadscale {
    nodes: Mutex<Vec<HsNode>>,
    down: AtomicBool,
    fail_approve: Mutex<BTreeSet<String>>,
    calls: Mutex<Vec<String>>,
}

impl FakeHeadscale {
    fn with(nodes: Vec<HsNode>) -> Self {
        Self { nodes: Mutex::new(nodes), ..Default::default() }
    }
    fn approved(&self, id: u8) -> BTreeSet<IpNetwork> {
        let nodes = self.nodes.lock().unwrap();
        nodes.iter().find(|n| n.id == id.to_string()).map(|n| n.approved().into_iter().collect()).unwrap_or_default()
    }
    fn writes(&self) -> usize {
        self.calls.lock().unwrap().iter().filter(|c| !c.starts_with("list")).count()
    }
    fn unreachable() -> HeadscaleError {
        HeadscaleError::Status { what: "x".into(), status: hyper::StatusCode::BAD_GATEWAY, msg: "down".into() }
    }
}

impl HeadscaleApi for FakeHeadscale {
    async fn version(&self) -> Result<Option<String>, HeadscaleError> {
        Ok(Some("v0.29.2".into()))
    }
    async fn nodes(&self) -> Result<Vec<HsNode>, HeadscaleError> {
        self.calls.lock().unwrap().push("list".into());
        if self.down.load(Ordering::SeqCst) {
            return Err(Self::unreachable());
        }
        Ok(self.nodes.lock().unwrap().clone())
    }
    async fn approve_routes(&self, id: &str, routes: &[IpNetwork]) -> Result<HsNode, HeadscaleError> {
        self.calls.lock().unwrap().push(format!("approve {id}"));
        if self.down.load(Ordering::SeqCst) || self.fail_approve.lock().unwrap().contains(id) {
            return Err(Self::unreachable());
        }
        let mut nodes = self.nodes.lock().unwrap();
        let n = nodes.iter_mut().find(|n| n.id == id).ok_or_else(Self::unreachable)?;
        n.approved_routes = Some(routes.iter().map(ToString::to_string).collect());
        Ok(n.clone())
    }
}

impl HeadscaleAdmin for FakeHeadscale {
    async fn delete_node(&self, id: &str) -> Result<(), HeadscaleError> {
        self.calls.lock().unwrap().push(format!("delete {id}"));
        self.nodes.lock().unwrap().retain(|n| n.id != id);
        Ok(())
    }
}

#[derive(Default)]
struct FakeCluster {
    record: Mutex<(Record, u64)>,
    statuses: Mutex<BTreeMap<String, Option<ApprovalStatus>>>,
    record_down: AtomicBool,
}

impl ClusterApi for FakeCluster {
    async fn load_record(&self) -> Result<(Record, String), KubeError> {
        if self.record_down.load(Ordering::SeqCst) {
            return Err(KubeError::Unreachable("api".into()));
        }
        let r = self.record.lock().unwrap();
        Ok((r.0.clone(), r.1.to_string()))
    }
    async fn store_record(&self, record: &Record, version: &str) -> Result<String, KubeError> {
        let mut r = self.record.lock().unwrap();
        if r.1.to_string() != version {
            return Err(KubeError::Status { what: "cm".into(), status: 409, msg: "conflict".into() });
        }
        *r = (record.clone(), r.1 + 1);
        Ok(r.1.to_string())
    }
    async fn set_status(&self, node: &str, status: Option<&ApprovalStatus>) -> Result<(), KubeError> {
        self.statuses.lock().unwrap().insert(node.into(), status.cloned());
        Ok(())
    }
}

struct World {
    ctl: Controller<FakeHeadscale, FakeCluster>,
    nodes: Vec<NodeView>,
}

impl World {
    fn new(tailnet: Vec<HsNode>, nodes: Vec<NodeView>) -> Self {
        let ctl = Controller {
            hs: FakeHeadscale::with(tailnet),
            cluster: FakeCluster::default(),
            metrics: Arc::new(Metrics::new()),
            cluster_cidrs: vec![net("10.244.0.0/16")],
            delete_unbound: false,
        };
        Self { ctl, nodes }
    }

    /// A pass; the statuses written are fed back into the Node views, as the reflector would.
    async fn pass(&mut self) -> Outcome {
        self.pass_with(false).await
    }

    async fn pass_with(&mut self, teardown: bool) -> Outcome {
        let (o, _) = self.ctl.pass(&self.nodes, teardown, &|| true).await;
        let statuses = self.ctl.cluster.statuses.lock().unwrap().clone();
        for n in &mut self.nodes {
            if let Some(s) = statuses.get(&n.name) {
                n.status = s.clone();
            }
        }
        o
    }

    fn status(&self, node: &str) -> Option<ApprovalStatus> {
        self.ctl.cluster.statuses.lock().unwrap().get(node).cloned().flatten()
    }

    fn record(&self) -> Record {
        self.ctl.cluster.record.lock().unwrap().0.clone()
    }
}

#[tokio::test]
async fn approves_exactly_the_nodes_pod_cidrs_it_advertises() {
    // Node 1 advertises its pod CIDR, node 2's, a default route and a LAN; an administrator
    // approved the LAN. Node 2 advertises its own.
    let mut w = World::new(
        vec![
            hs_node(1, &["10.244.1.0/24", "10.244.2.0/24", "0.0.0.0/0", "192.168.7.0/24"], &["192.168.7.0/24"]),
            hs_node(2, &["10.244.2.0/24"], &[]),
        ],
        vec![node(1, Some(1)), node(2, Some(2))],
    );
    assert_eq!(w.pass().await, Outcome::Converged);
    assert_eq!(w.ctl.hs.approved(1), nets(&["10.244.1.0/24", "192.168.7.0/24"]));
    assert_eq!(w.ctl.hs.approved(2), nets(&["10.244.2.0/24"]));
    assert_eq!(w.status("node-1").unwrap().state, ApprovalState::Approved);
    assert_eq!(w.status("node-1").unwrap().approved, vec![net("10.244.1.0/24")]);
    assert_eq!(w.record().entries["1"].routes, nets(&["10.244.1.0/24"]));
    // Level-triggered and idempotent: the next pass writes nothing.
    let before = w.ctl.hs.writes();
    assert_eq!(w.pass().await, Outcome::Converged);
    assert_eq!(w.ctl.hs.writes(), before);
}

#[tokio::test]
async fn pod_space_approvals_made_by_others_are_corrected_on_bound_nodes() {
    // Someone approved node 2's CIDR and a default route on node 1 (e.g. autoApprovers).
    let mut w = World::new(
        vec![hs_node(1, &["10.244.1.0/24", "10.244.2.0/24", "0.0.0.0/0"], &["10.244.2.0/24", "0.0.0.0/0"])],
        vec![node(1, Some(1))],
    );
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(1), nets(&["10.244.1.0/24"]));
    assert_eq!(w.ctl.metrics.withdrawals.get(), 2);
}

#[tokio::test]
async fn a_tailnet_node_without_a_kubernetes_node_is_left_alone() {
    // Node 9 is in the tailnet, with no Kubernetes Node: whatever it advertises or has
    // approved (even in the pod space), nothing changes.
    let mut w = World::new(
        vec![hs_node(1, &["10.244.1.0/24"], &[]), hs_node(9, &["10.244.9.0/24", "10.244.3.0/24"], &["10.244.3.0/24"])],
        vec![node(1, Some(1))],
    );
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(9), nets(&["10.244.3.0/24"]));
    assert!(!w.ctl.hs.calls.lock().unwrap().contains(&"approve 9".to_string()));
    assert!(!w.record().entries.contains_key("9"));
}

#[tokio::test]
async fn a_node_unbound_or_deleted_loses_what_the_controller_approved() {
    let mut w = World::new(
        vec![
            hs_node(1, &["10.244.1.0/24", "192.168.7.0/24"], &["192.168.7.0/24"]),
            hs_node(2, &["10.244.2.0/24"], &[]),
        ],
        vec![node(1, Some(1)), node(2, Some(2))],
    );
    w.ctl.delete_unbound = true;
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(1), nets(&["10.244.1.0/24", "192.168.7.0/24"]));
    // Node 1 is deleted: its approval goes, the LAN approval stays, the tailnet node is deleted.
    w.nodes.retain(|n| n.name != "node-1");
    assert_eq!(w.pass().await, Outcome::Converged);
    assert!(w.ctl.hs.calls.lock().unwrap().contains(&"delete 1".to_string()));
    assert!(!w.record().entries.contains_key("1"));
    // Node 2 unpublishes (but exists): withdrawn, not deleted from Headscale.
    w.nodes[0].key = Ok(None);
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(2), nets(&[]));
    assert!(!w.ctl.hs.calls.lock().unwrap().contains(&"delete 2".to_string()));
    assert!(w.record().entries.is_empty());
}

#[tokio::test]
async fn publishing_another_nodes_key_gains_nothing_and_takes_nothing() {
    // Node 1 is compromised and publishes node 2's key on its own Node (the API server lets
    // it write only its own Node). Tailnet node 1 advertises node 2's CIDR too.
    let mut w = World::new(
        vec![hs_node(1, &["10.244.1.0/24", "10.244.2.0/24"], &[]), hs_node(2, &["10.244.2.0/24"], &[])],
        vec![node(1, Some(1)), node(2, Some(2))],
    );
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(1), nets(&["10.244.1.0/24"]));
    w.nodes[0].key = Ok(Some(NodeKey::parse(&key(2)).unwrap()));
    assert_eq!(w.pass().await, Outcome::Pending);
    // Tailnet node 2 keeps exactly node 2's CIDR (node 1's is not advertised by it).
    assert_eq!(w.ctl.hs.approved(2), nets(&["10.244.2.0/24"]));
    // Tailnet node 1 is bound no more: it loses what the controller approved, gains nothing.
    assert_eq!(w.ctl.hs.approved(1), nets(&[]));
    let s1 = w.status("node-1").unwrap();
    assert_eq!(s1.state, ApprovalState::Pending);
    assert!(s1.message.contains("published the same node key"), "{}", s1.message);
    assert_eq!(w.status("node-2").unwrap().approved, vec![net("10.244.2.0/24")]);
    // Even if tailnet node 2 advertised node 1's CIDR, it would serve only what node 2's own
    // tailscaled advertises: the union is bounded by the advertiser.
    assert_eq!(w.ctl.metrics.mismatches.get_or_create(&vec![("reason", "duplicate_claim".into())]).get(), 2);
}

#[tokio::test]
async fn an_overlapping_pod_cidr_is_approved_nowhere_new() {
    let mut w = World::new(
        vec![hs_node(2, &["10.244.2.0/24"], &[]), hs_node(5, &["10.244.2.0/24", "10.244.5.0/24"], &[])],
        vec![node(2, Some(2))],
    );
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(2), nets(&["10.244.2.0/24"]));
    // A Node "node-5" appears claiming node 2's CIDR (a re-created Node with a forged spec).
    let mut evil = node(5, Some(5));
    evil.pod_cidrs = Ok(vec![net("10.244.2.0/24")]);
    w.nodes.push(evil);
    w.pass().await;
    assert_eq!(w.ctl.hs.approved(2), nets(&["10.244.2.0/24"]), "kept where it was approved");
    assert_eq!(w.ctl.hs.approved(5), nets(&[]), "not approved for the newcomer");
    assert_eq!(w.status("node-5").unwrap().state, ApprovalState::Conflict);
    assert_eq!(w.status("node-2").unwrap().state, ApprovalState::Conflict);
}

#[tokio::test]
async fn ambiguous_unknown_and_malformed_identities_bind_nothing() {
    let mut twin = hs_node(7, &["10.244.1.0/24"], &[]);
    twin.node_key = key(1);
    let mut w = World::new(vec![hs_node(1, &["10.244.1.0/24"], &[]), twin], vec![node(1, Some(1)), node(3, Some(3))]);
    let mut bad = node(4, None);
    bad.key = Err("\"nodekey:x\" is not ...".into());
    w.nodes.push(bad);
    assert_eq!(w.pass().await, Outcome::Pending);
    assert!(w.ctl.hs.approved(1).is_empty() && w.ctl.hs.approved(7).is_empty());
    assert_eq!(w.status("node-1").unwrap().state, ApprovalState::Mismatch);
    assert_eq!(w.status("node-3").unwrap().state, ApprovalState::Pending);
    assert_eq!(w.status("node-4").unwrap().state, ApprovalState::Mismatch);
}

#[tokio::test]
async fn pending_until_advertised_then_approved() {
    let mut w = World::new(vec![hs_node(1, &[], &[])], vec![node(1, Some(1))]);
    assert_eq!(w.pass().await, Outcome::Pending);
    assert!(w.status("node-1").unwrap().message.contains("does not advertise 10.244.1.0/24"));
    w.ctl.hs.nodes.lock().unwrap()[0].available_routes = Some(vec!["10.244.1.0/24".into()]);
    assert_eq!(w.pass().await, Outcome::Converged);
    assert_eq!(w.ctl.hs.approved(1), nets(&["10.244.1.0/24"]));
    // The node stops advertising (its agent withdrew it): the approval goes.
    w.ctl.hs.nodes.lock().unwrap()[0].available_routes = Some(vec![]);
    w.pass().await;
    assert!(w.ctl.hs.approved(1).is_empty());
}

#[tokio::test]
async fn outages_change_nothing_and_failed_writes_stay_recorded() {
    let mut w = World::new(
        vec![hs_node(1, &["10.244.1.0/24"], &[]), hs_node(2, &["10.244.2.0/24"], &[])],
        vec![node(1, Some(1)), node(2, Some(2))],
    );
    w.pass().await;
    let record = w.record();
    // Headscale down: a failed pass, nothing written, nothing withdrawn.
    w.ctl.hs.down.store(true, Ordering::SeqCst);
    w.nodes.retain(|n| n.name != "node-1");
    let writes = w.ctl.hs.writes();
    assert_eq!(w.pass().await, Outcome::Failed);
    assert_eq!(w.record(), record);
    assert_eq!(w.ctl.hs.writes(), writes);
    // Headscale back, but approving on node 1 fails: node 1 stays recorded, to be retried.
    w.ctl.hs.down.store(false, Ordering::SeqCst);
    w.ctl.hs.fail_approve.lock().unwrap().insert("1".into());
    assert_eq!(w.pass().await, Outcome::Failed);
    assert!(w.record().entries.contains_key("1"));
    assert_eq!(w.ctl.hs.approved(1), nets(&["10.244.1.0/24"]));
    w.ctl.hs.fail_approve.lock().unwrap().clear();
    assert_eq!(w.pass().await, Outcome::Converged);
    assert!(w.ctl.hs.approved(1).is_empty());
    assert!(!w.record().entries.contains_key("1"));
    // The record unreadable: nothing written.
    w.ctl.cluster.record_down.store(true, Ordering::SeqCst);
    w.nodes.push(node(1, Some(1)));
    assert_eq!(w.pass().await, Outcome::Failed);
    assert!(w.ctl.hs.approved(1).is_empty());
}

#[tokio::test]
async fn the_record_is_written_before_the_approval() {
    let mut w = World::new(vec![hs_node(1, &["10.244.1.0/24"], &[])], vec![node(1, Some(1))]);
    w.ctl.hs.fail_approve.lock().unwrap().insert("1".into());
    w.pass().await;
    // The approval failed, yet the record holds what was about to be approved: had it
    // succeeded before a crash, the controller would still know to withdraw it.
    assert_eq!(w.record().entries["1"], RecordEntry { nodes: vec!["node-1".into()], routes: nets(&["10.244.1.0/24"]) });
}

#[tokio::test]
async fn no_writes_without_leadership() {
    let w = World::new(vec![hs_node(1, &["10.244.1.0/24"], &[])], vec![node(1, Some(1))]);
    let (o, _) = w.ctl.pass(&w.nodes, false, &|| false).await;
    assert_eq!(o, Outcome::NotLeading);
    assert_eq!(w.ctl.hs.writes(), 0);
    assert!(w.record().entries.is_empty());
}

#[tokio::test]
async fn teardown_withdraws_only_what_was_recorded() {
    let mut w = World::new(
        vec![
            hs_node(1, &["10.244.1.0/24", "192.168.7.0/24"], &["192.168.7.0/24"]),
            hs_node(9, &["10.244.9.0/24"], &["10.244.9.0/24"]),
        ],
        vec![node(1, Some(1))],
    );
    w.pass().await;
    assert_eq!(w.pass_with(true).await, Outcome::Converged);
    assert_eq!(w.ctl.hs.approved(1), nets(&["192.168.7.0/24"]));
    assert_eq!(w.ctl.hs.approved(9), nets(&["10.244.9.0/24"]));
    let (_, empty) = w.ctl.pass(&w.nodes, true, &|| true).await;
    assert!(empty);
}

#[test]
fn the_plan_alone() {
    let tailnet = [hs_node(1, &["10.244.1.0/24"], &[])];
    let nodes = [node(1, Some(1))];
    let record = Record::default();
    let p = plan::plan(&Inputs {
        nodes: &nodes,
        tailnet: &tailnet,
        record: &record,
        cluster_cidrs: &[],
        delete_unbound: false,
    });
    assert_eq!(p.writes.len(), 1);
    assert_eq!(p.writes[0].added(), nets(&["10.244.1.0/24"]));
    assert_eq!(p.bound, 1);
    assert!(!p.mismatches.contains_key(&Mismatch::NotAdvertised));
    assert!(plan::overlaps(&net("0.0.0.0/0"), &net("10.244.1.0/24")));
    assert!(!plan::overlaps(&net("10.244.1.0/24"), &net("10.244.2.0/24")));
    assert!(!plan::overlaps(&net("::/0"), &net("10.244.1.0/24")));
}
