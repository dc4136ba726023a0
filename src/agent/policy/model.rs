//! What the engine knows of the cluster: pods (labels, addresses, node, named ports),
//! namespaces (labels) and NetworkPolicies, each reduced to what enforcement needs and checked
//! on the way in. Pure: no I/O.
//!
//! A NetworkPolicy is read with the semantics of networking.k8s.io/v1:
//!
//! - it applies to the pods of its namespace its `podSelector` selects; `policyTypes` defaults
//!   to Ingress, plus Egress when it has egress rules;
//! - a pod some policy applies to for a direction is isolated in that direction: only what
//!   one of those policies' rules allows passes (the rules of all of them together);
//! - a rule allows traffic from (to) any of its peers on any of its ports; no peers, or no
//!   ports, means all of them; an empty rule list allows nothing;
//! - peers: `podSelector` (pods of the policy's namespace), `namespaceSelector` (every pod of
//!   the matching namespaces), both (those pods of those namespaces), `ipBlock` (addresses in
//!   `cidr` but not in `except`, pod addresses included);
//! - ports: a number, a range (`endPort`), a container port's name (resolved on the pod the
//!   traffic goes to), or only a protocol (every port); TCP unless a protocol is given;
//! - pods on the host network are never selected, never peers by selector, and their ports
//!   resolve no name (they share the node's address: traffic to it names no one pod);
//! - traffic from the pod's own node (the node, and pods on its host network) is always
//!   allowed in (what the kubelet's probes need).
//!
//! What the API server should have refused (a bad selector operator, a bad CIDR, a port out of
//! range, an unknown protocol) matches nothing and is reported: the engine never widens what
//! a policy allows because it could not read it.

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub type Labels = BTreeMap<String, String>;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A label selector: all requirements hold. `Nothing` is a selector that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    All(Vec<Requirement>),
    Nothing,
}

impl Selector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Self {
        Self::All(Vec::new())
    }

    /// Reads a `LabelSelector`; an invalid one matches nothing (and says why).
    pub fn from_label_selector(sel: &LabelSelector) -> (Self, Option<String>) {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(Requirement::Equals(k.clone(), v.clone()));
        }
        for e in sel.match_expressions.iter().flatten() {
            let values = e.values.clone().unwrap_or_default();
            let req = match (e.operator.as_str(), values.is_empty()) {
                ("In", false) => Requirement::In(e.key.clone(), values),
                ("NotIn", false) => Requirement::NotIn(e.key.clone(), values),
                ("Exists", true) => Requirement::Exists(e.key.clone()),
                ("DoesNotExist", true) => Requirement::DoesNotExist(e.key.clone()),
                (op, _) => {
                    return (
                        Self::Nothing,
                        Some(format!("selector requirement {:?} {op} {values:?} is not valid", e.key)),
                    );
                }
            };
            reqs.push(req);
        }
        reqs.sort();
        reqs.dedup();
        (Self::All(reqs), None)
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        let Self::All(reqs) = self else { return false };
        reqs.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The protocol of a Kubernetes `protocol` field (absent: TCP).
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

/// A container port with a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod, as far as policies care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Its addresses (none while it has none, and none once it has finished: a finished pod's
    /// address may already belong to another).
    pub ips: Vec<IpAddr>,
    /// The node it is bound to.
    pub node: Option<String>,
    pub host_network: bool,
    pub named_ports: Vec<NamedPort>,
}

impl Pod {
    /// Whether policies can select it (pods on the host network are the node's traffic).
    pub fn selectable(&self) -> bool {
        !self.host_network
    }

    pub fn resolve(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports.iter().find(|p| p.name == name && p.protocol == protocol).map(|p| p.port)
    }
}

/// Which namespaces a pod peer draws from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespaces {
    /// The policy's own.
    Own,
    Matching(Selector),
}

/// One peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Pods {
        namespaces: Namespaces,
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`.
    Block {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
    /// What could not be read: matches nothing.
    Nothing,
}

/// The ports of one rule entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// Every port of the protocol.
    Any(Protocol),
    /// `from..=to`.
    Range(Protocol, u16, u16),
    /// A container port's name, resolved on the pod the traffic goes to.
    Named(Protocol, String),
    /// What could not be read: matches nothing.
    Nothing,
}

/// One rule: traffic from (to) one of the peers on one of the ports. `None`: all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub peers: Option<Vec<Peer>>,
    pub ports: Option<Vec<PortSpec>>,
}

impl Rule {
    /// Whether it allows everything.
    pub fn allows_all(&self) -> bool {
        self.peers.is_none() && self.ports.is_none()
    }

    pub fn uses_named_ports(&self) -> bool {
        self.ports.iter().flatten().any(|p| matches!(p, PortSpec::Named(..)))
    }
}

/// A NetworkPolicy, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// The ingress rules, when the policy applies to ingress.
    pub ingress: Option<Vec<Rule>>,
    /// The egress rules, when the policy applies to egress.
    pub egress: Option<Vec<Rule>>,
    /// What could not be read (each part of it matches nothing).
    pub problems: Vec<String>,
}

fn read_selector(sel: Option<&LabelSelector>, problems: &mut Vec<String>) -> Selector {
    match sel {
        None => Selector::everything(),
        Some(s) => {
            let (sel, problem) = Selector::from_label_selector(s);
            problems.extend(problem);
            sel
        }
    }
}

fn read_cidr(s: &str) -> Option<IpNetwork> {
    let net: IpNetwork = s.trim().parse().ok()?;
    // A CIDR with host bits set stands for its network, as the API server reads it.
    IpNetwork::new(net.network(), net.prefix()).ok()
}

fn read_peer(peer: &NetworkPolicyPeer, problems: &mut Vec<String>) -> Peer {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            problems.push("a peer with ipBlock and a selector".into());
            return Peer::Nothing;
        }
        let Some(cidr) = read_cidr(&block.cidr) else {
            problems.push(format!("ipBlock cidr {:?} is not a CIDR", block.cidr));
            return Peer::Nothing;
        };
        let mut except = Vec::new();
        for e in block.except.iter().flatten() {
            match read_cidr(e) {
                Some(net) if net.is_ipv4() == cidr.is_ipv4() => except.push(net),
                Some(_) => {}
                None => {
                    // Ignoring it would allow what it excepts.
                    problems.push(format!("ipBlock except {e:?} is not a CIDR"));
                    return Peer::Nothing;
                }
            }
        }
        except.sort_by_key(|n| (n.network(), n.prefix()));
        except.dedup();
        return Peer::Block { cidr, except };
    }
    match (&peer.namespace_selector, &peer.pod_selector) {
        (None, None) => {
            problems.push("a peer without a selector or an ipBlock".into());
            Peer::Nothing
        }
        (None, Some(pods)) => Peer::Pods { namespaces: Namespaces::Own, pods: read_selector(Some(pods), problems) },
        (Some(ns), pods) => Peer::Pods {
            namespaces: Namespaces::Matching(read_selector(Some(ns), problems)),
            pods: read_selector(pods.as_ref(), problems),
        },
    }
}

fn read_port(port: &NetworkPolicyPort, problems: &mut Vec<String>) -> PortSpec {
    let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
        problems.push(format!("protocol {:?} is not TCP, UDP or SCTP", port.protocol));
        return PortSpec::Nothing;
    };
    let number = |n: i32| u16::try_from(n).ok().filter(|p| *p > 0);
    match (&port.port, port.end_port) {
        (None, None) => PortSpec::Any(protocol),
        (Some(IntOrString::Int(n)), end) => {
            let Some(from) = number(*n) else {
                problems.push(format!("port {n} is out of range"));
                return PortSpec::Nothing;
            };
            let to = match end {
                None => from,
                Some(e) => match number(e).filter(|e| *e >= from) {
                    Some(e) => e,
                    None => {
                        problems.push(format!("endPort {e} is below port {from} or out of range"));
                        return PortSpec::Nothing;
                    }
                },
            };
            PortSpec::Range(protocol, from, to)
        }
        (Some(IntOrString::String(s)), None) => match s.parse::<i32>() {
            // A number given as a string is that number.
            Ok(n) => read_port(&NetworkPolicyPort { port: Some(IntOrString::Int(n)), ..port.clone() }, problems),
            Err(_) if !s.is_empty() => PortSpec::Named(protocol, s.clone()),
            Err(_) => {
                problems.push("an empty port name".into());
                PortSpec::Nothing
            }
        },
        (Some(IntOrString::String(_)), Some(_)) | (None, Some(_)) => {
            problems.push("endPort without a numeric port".into());
            PortSpec::Nothing
        }
    }
}

fn read_rule(
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
    problems: &mut Vec<String>,
) -> Rule {
    let peers = peers.filter(|p| !p.is_empty()).map(|list| {
        let mut v: Vec<Peer> = list.iter().map(|p| read_peer(p, problems)).collect();
        v.sort();
        v.dedup();
        v
    });
    let ports = ports.filter(|p| !p.is_empty()).map(|list| {
        let mut v: Vec<PortSpec> = list.iter().map(|p| read_port(p, problems)).collect();
        v.sort();
        v.dedup();
        v
    });
    Rule { peers, ports }
}

impl Policy {
    pub fn from_spec(namespace: &str, name: &str, spec: &NetworkPolicySpec) -> Self {
        let mut problems = Vec::new();
        let pod_selector = read_selector(Some(&spec.pod_selector.clone().unwrap_or_default()), &mut problems);
        let egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let (ingress_on, egress_on) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                for t in types {
                    if t != "Ingress" && t != "Egress" {
                        problems.push(format!("policyTypes has {t:?}"));
                    }
                }
                (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"))
            }
            _ => (true, egress_rules),
        };
        let ingress = ingress_on.then(|| {
            spec.ingress.iter().flatten().map(|r| read_rule(r.from.as_ref(), r.ports.as_ref(), &mut problems)).collect()
        });
        let egress = egress_on.then(|| {
            spec.egress.iter().flatten().map(|r| read_rule(r.to.as_ref(), r.ports.as_ref(), &mut problems)).collect()
        });
        Self { namespace: namespace.to_string(), name: name.to_string(), pod_selector, ingress, egress, problems }
    }

    /// The rules of one direction (`None`: the policy does not apply to it).
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Whether the policy applies to the pod (in `direction`, when given).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace && pod.selectable() && self.pod_selector.matches(&pod.labels)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// (namespace, name)
pub type Key = (String, String);

/// Everything the engine knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    pub pods: BTreeMap<Key, Pod>,
    /// Namespace name → its labels.
    pub namespaces: BTreeMap<String, Labels>,
    pub policies: BTreeMap<Key, Policy>,
}

impl Cluster {
    /// Whether a pod is one of a peer's (the peer belonging to a policy of `policy_ns`).
    pub fn peer_has_pod(&self, policy_ns: &str, peer: &Peer, pod: &Pod) -> bool {
        if !pod.selectable() {
            return false;
        }
        match peer {
            Peer::Pods { namespaces, pods } => {
                let ns_ok = match namespaces {
                    Namespaces::Own => pod.namespace == policy_ns,
                    Namespaces::Matching(sel) => {
                        self.namespaces.get(&pod.namespace).is_some_and(|labels| sel.matches(labels))
                    }
                };
                ns_ok && pods.matches(&pod.labels)
            }
            Peer::Block { .. } | Peer::Nothing => false,
        }
    }

    /// The pods of a namespace.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .range((namespace.to_string(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, p)| p)
    }
}

impl Pod {
    /// Reads a Pod object: its addresses only while it is running or about to (a finished
    /// pod's address may already belong to another), its named container ports.
    pub fn from_object(obj: &k8s_openapi::api::core::v1::Pod) -> Option<Self> {
        let namespace = obj.metadata.namespace.clone()?;
        let name = obj.metadata.name.clone()?;
        let spec = obj.spec.as_ref();
        let status = obj.status.as_ref();
        let finished = status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
        let mut ips: Vec<IpAddr> = Vec::new();
        if !finished && obj.metadata.deletion_timestamp.is_none() {
            for ip in status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten() {
                if let Ok(a) = ip.ip.parse::<IpAddr>()
                    && !ips.contains(&a)
                {
                    ips.push(a);
                }
            }
            if ips.is_empty()
                && let Some(a) = status.and_then(|s| s.pod_ip.as_deref()).and_then(|s| s.parse::<IpAddr>().ok())
            {
                ips.push(a);
            }
        }
        let mut named_ports = Vec::new();
        for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
            for p in c.ports.iter().flatten() {
                let (Some(pname), Some(protocol), Ok(port)) = (
                    p.name.as_ref().filter(|n| !n.is_empty()),
                    Protocol::parse(p.protocol.as_deref()),
                    u16::try_from(p.container_port),
                ) else {
                    continue;
                };
                named_ports.push(NamedPort { name: pname.clone(), protocol, port });
            }
        }
        named_ports.sort();
        named_ports.dedup();
        Some(Self {
            namespace,
            name,
            labels: obj.metadata.labels.clone().unwrap_or_default(),
            ips,
            // A finished pod has no interface left on its node: it is not waiting for
            // addresses either.
            node: spec.and_then(|s| s.node_name.clone()).filter(|_| !finished),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            named_ports,
        })
    }
}

impl Policy {
    /// Reads a NetworkPolicy object.
    pub fn from_object(obj: &k8s_openapi::api::networking::v1::NetworkPolicy) -> Option<Self> {
        let namespace = obj.metadata.namespace.as_deref()?;
        let name = obj.metadata.name.as_deref()?;
        Some(Self::from_spec(namespace, name, &obj.spec.clone().unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyEgressRule, NetworkPolicyIngressRule};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn selectors_follow_the_label_selector_semantics() {
        let sel = |labels_: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| {
            Selector::from_label_selector(&LabelSelector {
                match_labels: (!labels_.is_empty()).then(|| labels(labels_)),
                match_expressions: (!exprs.is_empty()).then_some(exprs),
            })
            .0
        };
        let pod = labels(&[("app", "web"), ("tier", "front")]);
        assert!(sel(&[], vec![]).matches(&pod), "{{}} selects everything");
        assert!(sel(&[("app", "web")], vec![]).matches(&pod));
        assert!(!sel(&[("app", "web"), ("tier", "back")], vec![]).matches(&pod), "matchLabels are ANDed");
        assert!(sel(&[], vec![expr("app", "In", &["db", "web"])]).matches(&pod));
        assert!(!sel(&[], vec![expr("app", "NotIn", &["web"])]).matches(&pod));
        assert!(sel(&[], vec![expr("zone", "NotIn", &["a"])]).matches(&pod), "NotIn holds without the key");
        assert!(sel(&[], vec![expr("tier", "Exists", &[])]).matches(&pod));
        assert!(!sel(&[], vec![expr("tier", "DoesNotExist", &[])]).matches(&pod));
        assert!(!sel(&[("app", "web")], vec![expr("tier", "In", &["back"])]).matches(&pod), "labels AND expressions");
        let (bad, why) = Selector::from_label_selector(&LabelSelector {
            match_expressions: Some(vec![expr("app", "Equals", &["web"])]),
            ..Default::default()
        });
        assert_eq!(bad, Selector::Nothing);
        assert!(!bad.matches(&pod) && why.is_some());
        let (bad, _) = Selector::from_label_selector(&LabelSelector {
            match_expressions: Some(vec![expr("app", "In", &[])]),
            ..Default::default()
        });
        assert_eq!(bad, Selector::Nothing, "In needs values");
    }

    fn port(protocol: Option<&str>, port: Option<IntOrString>, end: Option<i32>) -> NetworkPolicyPort {
        NetworkPolicyPort { protocol: protocol.map(str::to_string), port, end_port: end }
    }

    #[test]
    fn ports_are_read_strictly() {
        let mut p = Vec::new();
        assert_eq!(
            read_port(&port(None, Some(IntOrString::Int(80)), None), &mut p),
            PortSpec::Range(Protocol::Tcp, 80, 80)
        );
        assert_eq!(
            read_port(&port(Some("UDP"), Some(IntOrString::Int(1000)), Some(2000)), &mut p),
            PortSpec::Range(Protocol::Udp, 1000, 2000)
        );
        assert_eq!(read_port(&port(Some("SCTP"), None, None), &mut p), PortSpec::Any(Protocol::Sctp));
        assert_eq!(
            read_port(&port(None, Some(IntOrString::String("http".into())), None), &mut p),
            PortSpec::Named(Protocol::Tcp, "http".into())
        );
        assert_eq!(
            read_port(&port(None, Some(IntOrString::String("8080".into())), None), &mut p),
            PortSpec::Range(Protocol::Tcp, 8080, 8080)
        );
        assert!(p.is_empty());
        for bad in [
            port(Some("ICMP"), None, None),
            port(None, Some(IntOrString::Int(0)), None),
            port(None, Some(IntOrString::Int(70000)), None),
            port(None, Some(IntOrString::Int(90)), Some(80)),
            port(None, Some(IntOrString::String("http".into())), Some(90)),
            port(None, None, Some(90)),
        ] {
            assert_eq!(read_port(&bad, &mut p), PortSpec::Nothing, "{bad:?}");
        }
        assert_eq!(p.len(), 6);
    }

    #[test]
    fn policy_types_default_as_the_api_documents() {
        let ingress_only = NetworkPolicySpec::default();
        let pol = Policy::from_spec("x", "p", &ingress_only);
        assert_eq!(pol.ingress, Some(vec![]), "no rules: deny all ingress");
        assert_eq!(pol.egress, None);
        assert_eq!(pol.pod_selector, Selector::everything(), "an absent podSelector selects all");
        let with_egress =
            NetworkPolicySpec { egress: Some(vec![NetworkPolicyEgressRule::default()]), ..Default::default() };
        let pol = Policy::from_spec("x", "p", &with_egress);
        assert_eq!(pol.ingress, Some(vec![]));
        assert_eq!(pol.egress, Some(vec![Rule { peers: None, ports: None }]));
        assert!(pol.egress.as_ref().unwrap()[0].allows_all());
        let egress_only = NetworkPolicySpec { policy_types: Some(vec!["Egress".into()]), ..Default::default() };
        let pol = Policy::from_spec("x", "p", &egress_only);
        assert_eq!((pol.ingress, pol.egress), (None, Some(vec![])));
    }

    #[test]
    fn peers_are_read_strictly() {
        let spec = NetworkPolicySpec {
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![
                    NetworkPolicyPeer {
                        ip_block: Some(IPBlock { cidr: "10.0.0.1/8".into(), except: Some(vec!["10.1.0.0/16".into()]) }),
                        ..Default::default()
                    },
                    NetworkPolicyPeer {
                        ip_block: Some(IPBlock { cidr: "10.0.0.0/8".into(), except: Some(vec!["bogus".into()]) }),
                        ..Default::default()
                    },
                    NetworkPolicyPeer { pod_selector: Some(LabelSelector::default()), ..Default::default() },
                    NetworkPolicyPeer { namespace_selector: Some(LabelSelector::default()), ..Default::default() },
                    NetworkPolicyPeer::default(),
                ]),
                ports: Some(vec![]),
            }]),
            ..Default::default()
        };
        let pol = Policy::from_spec("x", "p", &spec);
        let rule = &pol.ingress.as_ref().unwrap()[0];
        assert_eq!(rule.ports, None, "an empty port list is all ports");
        let peers = rule.peers.as_ref().unwrap();
        assert!(peers.contains(&Peer::Block {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()]
        }));
        assert!(peers.contains(&Peer::Pods { namespaces: Namespaces::Own, pods: Selector::everything() }));
        assert!(peers.contains(&Peer::Pods {
            namespaces: Namespaces::Matching(Selector::everything()),
            pods: Selector::everything()
        }));
        assert!(peers.contains(&Peer::Nothing), "a bad except and an empty peer match nothing");
        assert_eq!(pol.problems.len(), 2, "{:?}", pol.problems);
    }
}
