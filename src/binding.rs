//! The binding of a tailnet node to a Kubernetes Node: where the agent and the controller meet
//! (they never import each other, as the plugin and the agent meet only in the node file).
//!
//! - The agent publishes its tailnet identity, its node key as Headscale lists it, in the
//!   annotation [`NODE_KEY_ANNOTATION`] of its own Node. The API server lets an agent set it
//!   only on the Node named in its token's node claim (the chart's ValidatingAdmissionPolicy),
//!   and nothing else on any Node.
//! - The controller answers in [`APPROVAL_ANNOTATION`] of the same Node: what it approved for
//!   that Node in Headscale, or why it did not ([`ApprovalStatus`]). The agent shows it in its
//!   report, so `headcni status` on the node can say it.
//!
//! Everything read here comes from objects others may write: it is parsed strictly, and what
//! does not parse binds nothing.

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

/// The agent's annotation on its Node: this node's tailnet node key ("nodekey:" and 64 hex
/// digits, as tailscaled and Headscale print it).
pub const NODE_KEY_ANNOTATION: &str = "headcni.io/node-key";
/// The controller's annotation on a Node: the [`ApprovalStatus`] as JSON.
pub const APPROVAL_ANNOTATION: &str = "headcni.io/route-approval";

const NODE_KEY_PREFIX: &str = "nodekey:";

/// A tailnet node key in its canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeKey(String);

impl NodeKey {
    /// Parses "nodekey:" followed by 64 lowercase hex digits; anything else is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.strip_prefix(NODE_KEY_PREFIX).ok_or_else(|| format!("{s:?} does not start with \"nodekey:\""))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("{s:?} is not \"nodekey:\" and 64 lowercase hex digits"));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The value of one annotation of a Node.
pub fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The identity a Node's agent published: `Ok(None)` when there is none.
pub fn published_key(node: &Node) -> Result<Option<NodeKey>, String> {
    annotation(node, NODE_KEY_ANNOTATION).map(NodeKey::parse).transpose()
}

/// The pod CIDRs Kubernetes assigned to a Node (`spec.podCIDRs`, or the older `spec.podCIDR`
/// alone), each canonical: `Ok(empty)` while none is assigned.
pub fn assigned_pod_cidrs(node: &Node) -> Result<Vec<IpNetwork>, String> {
    let Some(spec) = &node.spec else { return Ok(Vec::new()) };
    let mut list = spec.pod_cidrs.clone().unwrap_or_default();
    if list.is_empty()
        && let Some(single) = spec.pod_cidr.clone().filter(|s| !s.is_empty())
    {
        list.push(single);
    }
    if list.len() > 2 {
        return Err(format!("{} pod CIDRs (at most one per family)", list.len()));
    }
    let mut out: Vec<IpNetwork> = Vec::new();
    for s in &list {
        let net: IpNetwork = s.parse().map_err(|_| format!("pod CIDR {s:?} is not a CIDR"))?;
        if net.network() != net.ip() {
            return Err(format!("pod CIDR {s} has host bits set"));
        }
        if out.iter().any(|o| o.is_ipv4() == net.is_ipv4()) {
            return Err(format!("two pod CIDRs of the same family ({})", list.join(", ")));
        }
        out.push(net);
    }
    Ok(out)
}

/// Where a Node's approval stands, as the controller last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ApprovalState {
    /// Every pod CIDR of the Node is approved on its tailnet node.
    Approved,
    /// Waiting: the tailnet node does not advertise every pod CIDR yet, or is not in
    /// Headscale yet, or the Node has no pod CIDR yet.
    Pending,
    /// The published identity cannot be used (malformed, or listed by several Headscale
    /// nodes); nothing is approved for it.
    Mismatch,
    /// A pod CIDR of the Node overlaps another Node's: it is not newly approved anywhere.
    Conflict,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Pending => "pending",
            Self::Mismatch => "mismatch",
            Self::Conflict => "conflict",
        }
    }
}

/// The controller's word on one Node ([`APPROVAL_ANNOTATION`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApprovalStatus {
    pub state: ApprovalState,
    /// The node key the status is about (the one published when it was written).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_key: String,
    /// The Headscale node the identity was found as.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub headscale_node: String,
    /// The Node's pod CIDRs approved on it.
    #[serde(default)]
    pub approved: Vec<IpNetwork>,
    /// Why not (empty when approved).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl ApprovalStatus {
    /// The status written on a Node, if it parses.
    pub fn of(node: &Node) -> Option<Self> {
        serde_json::from_str(annotation(node, APPROVAL_ANNOTATION)?).ok()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use kube::api::ObjectMeta;

    const KEY: &str = "nodekey:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn node(annotations: &[(&str, &str)], cidrs: &[&str], single: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
                pod_cidr: single.map(str::to_string),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn node_keys_are_strict() {
        assert_eq!(NodeKey::parse(KEY).unwrap().as_str(), KEY);
        for bad in [
            "",
            "nodekey:",
            &KEY.to_uppercase(),
            &KEY[..KEY.len() - 1],
            &format!("{KEY}0"),
            &KEY.replace("nodekey:", "mkey:"),
            &KEY.replace('a', "g"),
            &format!(" {KEY}"),
        ] {
            assert!(NodeKey::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(published_key(&node(&[(NODE_KEY_ANNOTATION, KEY)], &[], None)).unwrap().unwrap().as_str(), KEY);
        assert_eq!(published_key(&node(&[], &[], None)).unwrap(), None);
        assert!(published_key(&node(&[(NODE_KEY_ANNOTATION, "x")], &[], None)).is_err());
    }

    #[test]
    fn pod_cidrs_are_canonical() {
        let n = |c: &[&str], s| assigned_pod_cidrs(&node(&[], c, s));
        assert_eq!(n(&["10.244.1.0/24", "fd00::/64"], None).unwrap().len(), 2);
        assert_eq!(n(&[], Some("10.244.1.0/24")).unwrap(), vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]);
        assert!(n(&[], None).unwrap().is_empty());
        assert!(n(&["10.244.1.1/24"], None).unwrap_err().contains("host bits"));
        assert!(n(&["10.244.1.0/24", "10.244.2.0/24"], None).unwrap_err().contains("same family"));
        assert!(n(&["x"], None).unwrap_err().contains("not a CIDR"));
        assert!(n(&["1.0.0.0/8", "fd00::/64", "2.0.0.0/8"], None).is_err());
    }

    #[test]
    fn status_round_trip() {
        let s = ApprovalStatus {
            state: ApprovalState::Approved,
            node_key: KEY.into(),
            headscale_node: "4".into(),
            approved: vec!["10.244.1.0/24".parse().unwrap()],
            message: String::new(),
        };
        let n = node(&[(APPROVAL_ANNOTATION, &s.to_json())], &[], None);
        assert_eq!(ApprovalStatus::of(&n), Some(s));
        assert_eq!(ApprovalStatus::of(&node(&[(APPROVAL_ANNOTATION, "{")], &[], None)), None);
    }
}
