//! One pass's decisions, pure: from the Nodes, Headscale's nodes and the record of what the
//! controller approved, what to approve and withdraw, what to record, which Headscale nodes to
//! delete and what to tell each Node. No I/O, no clock: every case is a unit test.
//!
//! The rules:
//!
//! - A tailnet node is **bound** to the Nodes that published its node key (and only when exactly
//!   one Headscale node lists that key). Unbound tailnet nodes the controller never approved for
//!   are left alone, whatever they advertise or have approved.
//! - The **pod space** is every Node's pod CIDRs plus `--cluster-cidr`. On a bound tailnet node,
//!   the approvals inside the pod space (any route overlapping it, a default route too) become
//!   exactly the bound Nodes' pod CIDRs that this tailnet node advertises itself; approvals
//!   outside the pod space (a LAN it routes for, approved by an administrator) are kept.
//! - A pod CIDR overlapping another Node's is a **conflict**: it is approved nowhere anew, and
//!   kept only where it is approved already (so a second Node claiming a range cannot take it
//!   over, nor take it away).
//! - A tailnet node the controller approved for (the **record**) that is bound no more (its
//!   Node was deleted, re-registered under another key, or unpublished) loses exactly what the
//!   record says the controller approved; then it leaves the record, and, when asked for and
//!   its Node is gone, Headscale.
//!
//! So whatever a compromised node publishes (another node's key, garbage), what it can get
//! approved is at most its own Node's pod CIDRs on the tailnet node it publishes, and only
//! when that tailnet node advertises them: publishing another node's key approves nothing the
//! other node does not advertise itself, and takes nothing from it.

use super::record::{Record, RecordEntry};
use crate::binding::{ApprovalState, ApprovalStatus, NodeKey};
use crate::clients::headscale::HsNode;
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};

/// What the controller needs of one Node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// The published node key: `Ok(None)` when none is published.
    pub key: Result<Option<NodeKey>, String>,
    /// The assigned pod CIDRs (`Ok(empty)`: none yet).
    pub pod_cidrs: Result<Vec<IpNetwork>, String>,
    /// What the controller last wrote on the Node.
    pub status: Option<ApprovalStatus>,
}

/// Why a Node is not (fully) approved, as the metrics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mismatch {
    /// The annotation is not a node key.
    MalformedKey,
    /// No Headscale node has the key (yet).
    UnknownKey,
    /// Several Headscale nodes list the key.
    AmbiguousKey,
    /// Another Node published the same key.
    DuplicateClaim,
    /// The Node's pod CIDRs are unusable.
    InvalidPodCidrs,
    /// A pod CIDR overlaps another Node's.
    CidrConflict,
    /// The tailnet node does not advertise a pod CIDR of its Node.
    NotAdvertised,
}

impl Mismatch {
    pub const ALL: [Mismatch; 7] = [
        Self::MalformedKey,
        Self::UnknownKey,
        Self::AmbiguousKey,
        Self::DuplicateClaim,
        Self::InvalidPodCidrs,
        Self::CidrConflict,
        Self::NotAdvertised,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedKey => "malformed_key",
            Self::UnknownKey => "unknown_key",
            Self::AmbiguousKey => "ambiguous_key",
            Self::DuplicateClaim => "duplicate_claim",
            Self::InvalidPodCidrs => "invalid_pod_cidrs",
            Self::CidrConflict => "cidr_conflict",
            Self::NotAdvertised => "not_advertised",
        }
    }
}

/// A new approved set for one Headscale node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub node_id: String,
    /// Its name in Headscale, for logs.
    pub name: String,
    pub before: BTreeSet<IpNetwork>,
    pub after: BTreeSet<IpNetwork>,
}

impl Write {
    pub fn added(&self) -> BTreeSet<IpNetwork> {
        self.after.difference(&self.before).copied().collect()
    }

    pub fn removed(&self) -> BTreeSet<IpNetwork> {
        self.before.difference(&self.after).copied().collect()
    }
}

/// A pass's decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Record entries to hold before any write (what is about to be approved is recorded first).
    pub record_ahead: Record,
    /// The approvals to write.
    pub writes: Vec<Write>,
    /// The record once every write succeeded (a failed write keeps its entry as in
    /// `record_ahead`).
    pub record_after: Record,
    /// Headscale nodes to delete once their approvals are withdrawn (ids).
    pub deletions: Vec<String>,
    /// The status each Node with a published identity should carry (`None`: no status).
    pub statuses: BTreeMap<String, Option<ApprovalStatus>>,
    /// Counts per reason, for the metrics.
    pub mismatches: BTreeMap<Mismatch, u64>,
    /// Tailnet nodes bound to at least one Node.
    pub bound: usize,
}

/// What the pass runs with.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub nodes: &'a [NodeView],
    pub tailnet: &'a [HsNode],
    pub record: &'a Record,
    /// `--cluster-cidr`: part of the pod space even where no Node holds it yet.
    pub cluster_cidrs: &'a [IpNetwork],
    /// Delete a Headscale node whose Kubernetes Node was deleted.
    pub delete_unbound: bool,
}

/// Whether two prefixes share an address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

fn list(nets: &BTreeSet<IpNetwork>) -> String {
    if nets.is_empty() {
        return "nothing".into();
    }
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn status(state: ApprovalState, key: &str, hs: &str, approved: Vec<IpNetwork>, message: String) -> ApprovalStatus {
    ApprovalStatus { state, node_key: key.into(), headscale_node: hs.into(), approved, message }
}

/// The decisions of one pass.
pub fn plan(inp: &Inputs<'_>) -> Plan {
    let mut out = Plan::default();
    let count = |m: Mismatch, out: &mut Plan| *out.mismatches.entry(m).or_default() += 1;

    // Pod CIDRs by Node, the pod space, and the conflicts between Nodes.
    let cidrs: BTreeMap<&str, Vec<IpNetwork>> =
        inp.nodes.iter().filter_map(|n| n.pod_cidrs.as_ref().ok().map(|c| (n.name.as_str(), c.clone()))).collect();
    let mut pod_space: Vec<IpNetwork> = inp.cluster_cidrs.to_vec();
    pod_space.extend(cidrs.values().flatten().copied());
    let conflicts = |name: &str, c: &IpNetwork| -> Option<String> {
        cidrs
            .iter()
            .find(|(other, list)| **other != name && list.iter().any(|o| overlaps(o, c)))
            .map(|(o, _)| o.to_string())
    };

    // Headscale nodes by key; keys listed more than once bind nothing.
    let mut by_key: BTreeMap<&str, Vec<&HsNode>> = BTreeMap::new();
    for h in inp.tailnet {
        if !h.node_key.is_empty() {
            by_key.entry(h.node_key.as_str()).or_default().push(h);
        }
    }
    let present: BTreeSet<&str> = inp.nodes.iter().map(|n| n.name.as_str()).collect();

    // Bindings: tailnet node id -> the Nodes that published its key.
    let mut bound: BTreeMap<&str, Vec<&NodeView>> = BTreeMap::new();
    for n in inp.nodes {
        let key = match &n.key {
            Ok(None) => {
                if n.status.is_some() {
                    out.statuses.insert(n.name.clone(), None);
                }
                continue;
            }
            Err(e) => {
                count(Mismatch::MalformedKey, &mut out);
                let msg = format!("the published identity is unusable: {e}");
                out.statuses.insert(n.name.clone(), Some(status(ApprovalState::Mismatch, "", "", vec![], msg)));
                continue;
            }
            Ok(Some(k)) => k,
        };
        match by_key.get(key.as_str()).map(Vec::as_slice) {
            None | Some([]) => {
                count(Mismatch::UnknownKey, &mut out);
                let msg = "no Headscale node has this node key (yet)".to_string();
                out.statuses
                    .insert(n.name.clone(), Some(status(ApprovalState::Pending, key.as_str(), "", vec![], msg)));
            }
            Some([h]) => bound.entry(h.id.as_str()).or_default().push(n),
            Some(many) => {
                count(Mismatch::AmbiguousKey, &mut out);
                let ids: Vec<&str> = many.iter().map(|h| h.id.as_str()).collect();
                let msg =
                    format!("Headscale nodes {} all list this node key: nothing is approved for it", ids.join(", "));
                out.statuses
                    .insert(n.name.clone(), Some(status(ApprovalState::Mismatch, key.as_str(), "", vec![], msg)));
            }
        }
    }
    out.bound = bound.len();

    let mut ahead = inp.record.clone();
    let mut after = inp.record.clone();
    for h in inp.tailnet {
        let approved: BTreeSet<IpNetwork> = h.approved().into_iter().collect();
        let available: BTreeSet<IpNetwork> = h.available().into_iter().collect();
        let recorded = inp.record.entries.get(&h.id);
        let Some(nodes) = bound.get(h.id.as_str()) else {
            // Unbound: withdraw what the controller approved, nothing else; unknown ones are
            // left alone.
            let Some(entry) = recorded else { continue };
            let next: BTreeSet<IpNetwork> = approved.difference(&entry.routes).copied().collect();
            if next != approved {
                out.writes.push(Write {
                    node_id: h.id.clone(),
                    name: h.display_name().to_string(),
                    before: approved.clone(),
                    after: next,
                });
            }
            after.entries.remove(&h.id);
            if inp.delete_unbound && entry.nodes.iter().all(|n| !present.contains(n.as_str())) {
                out.deletions.push(h.id.clone());
            }
            continue;
        };

        // Bound: the pod space's part of the approvals is exactly the wanted set.
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let mut wanted: BTreeSet<IpNetwork> = BTreeSet::new();
        let mut per_node: Vec<(&NodeView, ApprovalStatus)> = Vec::new();
        for n in nodes {
            let key = n.key.as_ref().ok().and_then(Option::as_ref).map(NodeKey::as_str).unwrap_or_default();
            let own = match &n.pod_cidrs {
                Err(e) => {
                    count(Mismatch::InvalidPodCidrs, &mut out);
                    let msg = format!("the Node's pod CIDRs are unusable: {e}");
                    per_node.push((n, status(ApprovalState::Mismatch, key, &h.id, vec![], msg)));
                    continue;
                }
                Ok(c) if c.is_empty() => {
                    let msg = "the Node has no pod CIDR yet".to_string();
                    per_node.push((n, status(ApprovalState::Pending, key, &h.id, vec![], msg)));
                    continue;
                }
                Ok(c) => c,
            };
            let mut mine = BTreeSet::new();
            let mut problems = Vec::new();
            let mut state = ApprovalState::Approved;
            for c in own {
                if let Some(other) = conflicts(&n.name, c) {
                    count(Mismatch::CidrConflict, &mut out);
                    state = ApprovalState::Conflict;
                    if approved.contains(c) && available.contains(c) {
                        mine.insert(*c);
                        problems.push(format!("{c} overlaps Node {other}'s pod CIDR: kept where it was approved"));
                    } else {
                        problems.push(format!("{c} overlaps Node {other}'s pod CIDR: not approved"));
                    }
                } else if available.contains(c) {
                    mine.insert(*c);
                } else {
                    count(Mismatch::NotAdvertised, &mut out);
                    if state == ApprovalState::Approved {
                        state = ApprovalState::Pending;
                    }
                    problems.push(format!("tailnet node {} does not advertise {c} (yet)", h.display_name()));
                }
            }
            if names.len() > 1 {
                count(Mismatch::DuplicateClaim, &mut out);
                let others: Vec<&str> = names.iter().filter(|o| **o != n.name).map(String::as_str).collect();
                problems.push(format!(
                    "Node {} published the same node key: each Node gets only its own pod CIDRs this tailnet node advertises",
                    others.join(", ")
                ));
            }
            wanted.extend(mine.iter().copied());
            per_node.push((n, status(state, key, &h.id, mine.into_iter().collect(), problems.join("; "))));
        }
        let outside: BTreeSet<IpNetwork> =
            approved.iter().filter(|r| !pod_space.iter().any(|p| overlaps(p, r))).copied().collect();
        let next: BTreeSet<IpNetwork> = outside.union(&wanted).copied().collect();
        if next != approved {
            out.writes.push(Write {
                node_id: h.id.clone(),
                name: h.display_name().to_string(),
                before: approved,
                after: next,
            });
        }
        // Recorded before the write: what is about to be approved, with what was approved.
        let old_routes = recorded.map(|e| e.routes.clone()).unwrap_or_default();
        let entry = |routes: BTreeSet<IpNetwork>| RecordEntry { nodes: names.clone(), routes };
        ahead.entries.insert(h.id.clone(), entry(old_routes.union(&wanted).copied().collect()));
        after.entries.insert(h.id.clone(), entry(wanted));
        for (n, s) in per_node {
            out.statuses.insert(n.name.clone(), Some(s));
        }
    }
    // Recorded tailnet nodes Headscale no longer lists: nothing left to withdraw.
    let listed: BTreeSet<&str> = inp.tailnet.iter().map(|h| h.id.as_str()).collect();
    after.entries.retain(|id, _| listed.contains(id.as_str()));
    ahead.entries.retain(|id, _| listed.contains(id.as_str()) || inp.record.entries.contains_key(id));
    out.record_ahead = ahead;
    out.record_after = after;
    out
}

/// Teardown: withdraw everything the record says the controller approved, approve nothing.
pub fn plan_teardown(tailnet: &[HsNode], record: &Record) -> Plan {
    let mut out = Plan { record_ahead: record.clone(), ..Default::default() };
    for h in tailnet {
        let Some(entry) = record.entries.get(&h.id) else { continue };
        let approved: BTreeSet<IpNetwork> = h.approved().into_iter().collect();
        let next: BTreeSet<IpNetwork> = approved.difference(&entry.routes).copied().collect();
        if next != approved {
            out.writes.push(Write {
                node_id: h.id.clone(),
                name: h.display_name().to_string(),
                before: approved,
                after: next,
            });
        }
    }
    out
}

/// One line about a write, for the log.
pub fn describe(w: &Write) -> String {
    let (added, removed) = (w.added(), w.removed());
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("approved {}", list(&added)));
    }
    if !removed.is_empty() {
        parts.push(format!("withdrew {}", list(&removed)));
    }
    format!("tailnet node {} (id {}): {}; approved now: {}", w.name, w.node_id, parts.join(", "), list(&w.after))
}
