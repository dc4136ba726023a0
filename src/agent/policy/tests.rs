//! The compiled rule sets against the semantics of networking.k8s.io/v1, written a second time
//! and plainly here: random clusters (namespaces, pods on two nodes, policies of every shape),
//! random traffic between pods, the nodes and the outside, and for each packet the verdicts of
//! the nodes' rule sets (evaluated as nf_tables would, `Ruleset::evaluate`) must say what the
//! reference says. The kernel evaluating the same rule sets is proven in
//! tests/policy_netns.rs; this proves the rule sets are the right ones.

use super::compile::{PRIORITY, compile};
use super::model::*;
use crate::netlink::nft::ruleset::{CT_ESTABLISHED, CT_NEW, Hook, Packet, Ruleset, Verdict};
use ipnetwork::IpNetwork;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::IpAddr;

// ---------------------------------------------------------------------------------------------
// The reference

/// Where a packet comes from or goes to.
#[derive(Debug, Clone)]
enum End {
    Pod(Pod),
    /// A node's own address (its host network).
    Node(String, IpAddr),
    /// Outside the cluster.
    Outside(IpAddr),
}

impl End {
    fn ip(&self, v6: bool) -> Option<IpAddr> {
        match self {
            End::Pod(p) => p.ips.iter().find(|i| i.is_ipv6() == v6).copied(),
            End::Node(_, ip) | End::Outside(ip) => (ip.is_ipv6() == v6).then_some(*ip),
        }
    }
}

fn peers_match(c: &Cluster, policy: &Policy, peers: &Option<Vec<Peer>>, other: &End, other_ip: IpAddr) -> bool {
    let Some(peers) = peers else { return true };
    peers.iter().any(|peer| match peer {
        Peer::Pods { .. } => matches!(other, End::Pod(p) if c.peer_has_pod(&policy.namespace, peer, p)),
        Peer::Block { cidr, except } => cidr.contains(other_ip) && !except.iter().any(|e| e.contains(other_ip)),
        Peer::Nothing => false,
    })
}

fn ports_match(ports: &Option<Vec<PortSpec>>, dest: &End, proto: u8, port: u16) -> bool {
    let Some(ports) = ports else { return true };
    ports.iter().any(|spec| match spec {
        PortSpec::Any(p) => p.number() == proto,
        PortSpec::Range(p, a, b) => p.number() == proto && *a <= port && port <= *b,
        PortSpec::Named(p, name) => {
            // Pods on the host network share the node's address: their ports name no pod.
            p.number() == proto && matches!(dest, End::Pod(d) if d.selectable() && d.resolve(name, *p) == Some(port))
        }
        PortSpec::Nothing => false,
    })
}

/// Whether `pod`'s policies let the traffic through in `direction` (`other`: the far end).
fn direction_allows(
    c: &Cluster,
    pod: &Pod,
    direction: Direction,
    other: &End,
    other_ip: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let policies: Vec<&Policy> =
        c.policies.values().filter(|p| p.selects(pod) && p.rules(direction).is_some()).collect();
    if policies.is_empty() {
        return true;
    }
    let dest = match direction {
        Direction::Ingress => End::Pod(pod.clone()),
        Direction::Egress => other.clone(),
    };
    policies.iter().any(|policy| {
        policy
            .rules(direction)
            .unwrap_or_default()
            .iter()
            .any(|r| peers_match(c, policy, &r.peers, other, other_ip) && ports_match(&r.ports, &dest, proto, port))
    })
}

fn reference(c: &Cluster, from: &End, to: &End, v6: bool, proto: u8, port: u16) -> bool {
    let (Some(src), Some(dst)) = (from.ip(v6), to.ip(v6)) else { return true };
    // A pod's traffic to itself follows no policy (what the upstream tests expect of loopback,
    // also through a service address).
    if let (End::Pod(a), End::Pod(b)) = (from, to)
        && (&a.namespace, &a.name) == (&b.namespace, &b.name)
    {
        return true;
    }
    let egress = match from {
        End::Pod(p) if p.selectable() => direction_allows(c, p, Direction::Egress, to, dst, proto, port),
        _ => true,
    };
    // "The only allowed connections into the pod are those from the pod's node and those
    // allowed by the ingress list": the node, and pods on its host network.
    let from_node = match from {
        End::Node(n, _) => Some(n.clone()),
        End::Pod(p) if !p.selectable() => p.node.clone(),
        _ => None,
    };
    let ingress = match to {
        End::Pod(p) if p.selectable() && from_node.is_some() && from_node == p.node => true,
        End::Pod(p) if p.selectable() => direction_allows(c, p, Direction::Ingress, from, src, proto, port),
        _ => true,
    };
    egress && ingress
}

// ---------------------------------------------------------------------------------------------
// The nodes, as nf_tables sees the packet

const NODES: [&str; 2] = ["n1", "n2"];

fn veth(pod: &Pod) -> String {
    format!("hc{:013x}", crate::podgroup::namespace_group(&pod.name) as u64 * 7919)
}

fn group(pod: &Pod) -> u32 {
    crate::podgroup::namespace_group(&pod.namespace)
}

/// The verdicts of every node the packet crosses (all must accept).
fn simulated(
    rulesets: &BTreeMap<&str, Ruleset>,
    from: &End,
    to: &End,
    v6: bool,
    proto: u8,
    port: u16,
    ct: u32,
) -> bool {
    let (Some(src), Some(dst)) = (from.ip(v6), to.ip(v6)) else { return true };
    let base = Packet {
        iifname: String::new(),
        oifname: String::new(),
        iifgroup: 0,
        oifgroup: 0,
        src,
        dst,
        l4proto: proto,
        dport: matches!(proto, 6 | 17 | 132).then_some(port),
        icmp_type: (proto == 58).then_some(128),
        ct_state: ct,
    };
    let node_of = |e: &End| match e {
        End::Pod(p) => p.node.clone(),
        End::Node(n, _) => Some(n.clone()),
        _ => None,
    };
    let (from_node, to_node) = (node_of(from), node_of(to));
    let mut verdicts = Vec::new();
    let mut at = |node: &str, hook: Hook, iif: (String, u32), oif: (String, u32)| {
        let p = Packet { iifname: iif.0, iifgroup: iif.1, oifname: oif.0, oifgroup: oif.1, ..base.clone() };
        verdicts.push(rulesets[node].evaluate(hook, &p));
    };
    let pod_if = |e: &End| match e {
        End::Pod(p) if p.selectable() => Some((veth(p), group(p))),
        _ => None,
    };
    match (pod_if(from), pod_if(to)) {
        (Some(fi), Some(ti)) if from_node == to_node => at(from_node.as_deref().unwrap(), Hook::Forward, fi, ti),
        (Some(fi), _) => {
            let fnode = from_node.clone().unwrap();
            if to_node.as_deref() == Some(fnode.as_str()) {
                // To its own node (the host network).
                at(&fnode, Hook::Input, fi, (String::new(), 0));
            } else {
                at(&fnode, Hook::Forward, fi, ("tailscale0".into(), 0));
            }
            if let Some(ti) = pod_if(to) {
                at(to_node.as_deref().unwrap(), Hook::Forward, ("tailscale0".into(), 0), ti);
            }
        }
        (None, Some(ti)) => {
            let tnode = to_node.clone().unwrap();
            if from_node.as_deref() == Some(tnode.as_str()) {
                // The node's own traffic leaves through output: never filtered.
            } else {
                at(&tnode, Hook::Forward, ("eth0".into(), 0), ti);
            }
        }
        (None, None) => {}
    }
    verdicts.iter().all(|v| *v == Verdict::Accept)
}

// ---------------------------------------------------------------------------------------------
// Random clusters

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn arb_selector() -> impl Strategy<Value = Selector> {
    let req = prop_oneof![
        (prop::sample::select(vec!["app", "role", "team"]), prop::sample::select(vec!["web", "db", "fe", "a", "b"]))
            .prop_map(|(k, v)| Requirement::Equals(k.into(), v.into())),
        (
            prop::sample::select(vec!["app", "role"]),
            prop::collection::vec(prop::sample::select(vec!["web", "db", "fe", "be"]), 1..3)
        )
            .prop_map(|(k, vs)| Requirement::In(k.into(), vs.into_iter().map(String::from).collect())),
        (
            prop::sample::select(vec!["app", "team"]),
            prop::collection::vec(prop::sample::select(vec!["web", "a"]), 1..2)
        )
            .prop_map(|(k, vs)| Requirement::NotIn(k.into(), vs.into_iter().map(String::from).collect())),
        prop::sample::select(vec!["role", "team", "kubernetes.io/metadata.name"])
            .prop_map(|k| Requirement::Exists(k.into())),
        prop::sample::select(vec!["role", "team"]).prop_map(|k| Requirement::DoesNotExist(k.into())),
        prop::sample::select(vec!["ns0", "ns1", "ns2"])
            .prop_map(|v| Requirement::Equals("kubernetes.io/metadata.name".into(), v.into())),
    ];
    prop_oneof![
        2 => prop::collection::vec(req, 0..3).prop_map(|mut r| { r.sort(); r.dedup(); Selector::All(r) }),
        1 => Just(Selector::everything()),
    ]
}

fn arb_net() -> impl Strategy<Value = IpNetwork> {
    prop::sample::select(vec![
        "10.244.0.0/16",
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.1.0/28",
        "10.244.1.4/30",
        "10.244.2.3/32",
        "0.0.0.0/0",
        "192.0.2.0/24",
        "fd00:10:244::/48",
        "fd00:10:244:1::/64",
        "::/0",
    ])
    .prop_map(|s| s.parse().unwrap())
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        arb_selector().prop_map(|pods| Peer::Pods { namespaces: Namespaces::Own, pods }),
        (arb_selector(), arb_selector())
            .prop_map(|(ns, pods)| Peer::Pods { namespaces: Namespaces::Matching(ns), pods }),
        (arb_net(), prop::collection::vec(arb_net(), 0..2)).prop_map(|(cidr, except)| Peer::Block {
            cidr,
            except: except.into_iter().filter(|e| e.is_ipv4() == cidr.is_ipv4()).collect()
        }),
        Just(Peer::Nothing),
    ]
}

fn arb_proto() -> impl Strategy<Value = Protocol> {
    prop::sample::select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp])
}

fn arb_port() -> impl Strategy<Value = PortSpec> {
    prop_oneof![
        arb_proto().prop_map(PortSpec::Any),
        (arb_proto(), prop::sample::select(vec![53u16, 80, 81, 8080]), 0u16..3).prop_map(|(p, a, w)| PortSpec::Range(
            p,
            a,
            a + w
        )),
        (arb_proto(), prop::sample::select(vec!["http", "dns", "metrics", "none"]))
            .prop_map(|(p, n)| PortSpec::Named(p, n.into())),
        Just(PortSpec::Nothing),
    ]
}

fn arb_rule() -> impl Strategy<Value = super::model::Rule> {
    (
        prop::option::weighted(0.7, prop::collection::vec(arb_peer(), 0..3)),
        prop::option::weighted(0.6, prop::collection::vec(arb_port(), 0..3)),
    )
        .prop_map(|(peers, ports)| super::model::Rule { peers, ports })
}

fn arb_policy(i: usize) -> impl Strategy<Value = Policy> {
    (
        prop::sample::select(vec!["ns0", "ns1", "ns2"]),
        arb_selector(),
        prop::option::weighted(0.8, prop::collection::vec(arb_rule(), 0..3)),
        prop::option::weighted(0.5, prop::collection::vec(arb_rule(), 0..3)),
    )
        .prop_map(move |(ns, pod_selector, ingress, egress)| Policy {
            namespace: ns.into(),
            name: format!("pol{i}"),
            pod_selector,
            ingress,
            egress,
            problems: Vec::new(),
        })
}

fn arb_pod(i: usize) -> impl Strategy<Value = Pod> {
    (
        prop::sample::select(vec!["ns0", "ns1", "ns2"]),
        prop::sample::select(vec!["web", "db", "cache"]),
        prop::option::of(prop::sample::select(vec!["fe", "be"])),
        0usize..2,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.3),
        prop::collection::vec(
            prop::sample::select(vec![
                ("http", Protocol::Tcp, 80u16),
                ("http", Protocol::Tcp, 8080),
                ("dns", Protocol::Udp, 53),
                ("metrics", Protocol::Tcp, 81),
                ("dns", Protocol::Sctp, 53),
            ]),
            0..3,
        ),
    )
        .prop_map(move |(ns, app, role, node, host_network, v6, ports)| {
            let mut l = labels(&[("app", app)]);
            if let Some(r) = role {
                l.insert("role".into(), r.into());
            }
            let node_name = NODES[node].to_string();
            let mut ips: Vec<IpAddr> = if host_network {
                vec![format!("10.99.0.{}", 11 + node).parse().unwrap()]
            } else {
                vec![format!("10.244.{}.{}", node + 1, i + 2).parse().unwrap()]
            };
            if v6 && !host_network {
                ips.push(format!("fd00:10:244:{}::{:x}", node + 1, i + 2).parse().unwrap());
            }
            let mut named_ports: Vec<NamedPort> =
                ports.into_iter().map(|(n, p, port)| NamedPort { name: n.into(), protocol: p, port }).collect();
            named_ports.sort();
            named_ports.dedup_by(|a, b| a.name == b.name && a.protocol == b.protocol);
            Pod {
                namespace: ns.into(),
                name: format!("pod{i}"),
                labels: l,
                ips,
                node: Some(node_name),
                host_network,
                named_ports,
            }
        })
}

fn arb_cluster() -> impl Strategy<Value = Cluster> {
    let pods = (0usize..8).prop_flat_map(|n| (0..n).map(arb_pod).collect::<Vec<_>>());
    let policies = (0usize..5).prop_flat_map(|n| (0..n).map(arb_policy).collect::<Vec<_>>());
    let ns_labels = prop::collection::vec(prop::option::of(prop::sample::select(vec!["a", "b"])), 3);
    (pods, policies, ns_labels).prop_map(|(pods, policies, ns_labels)| {
        let mut c = Cluster::default();
        for (i, team) in ns_labels.into_iter().enumerate() {
            let name = format!("ns{i}");
            let mut l = labels(&[("kubernetes.io/metadata.name", &name)]);
            if let Some(t) = team {
                l.insert("team".into(), t.into());
            }
            c.namespaces.insert(name, l);
        }
        for p in pods {
            c.pods.insert((p.namespace.clone(), p.name.clone()), p);
        }
        for p in policies {
            c.policies.insert((p.namespace.clone(), p.name.clone()), p);
        }
        c
    })
}

fn ends(c: &Cluster) -> Vec<End> {
    let mut out: Vec<End> = c.pods.values().map(|p| End::Pod(p.clone())).collect();
    out.push(End::Node("n1".into(), "10.99.0.11".parse().unwrap()));
    out.push(End::Node("n2".into(), "10.99.0.12".parse().unwrap()));
    out.push(End::Outside("192.0.2.7".parse().unwrap()));
    out.push(End::Outside("fd00:10:244:1::77".parse().unwrap()));
    out
}

fn rulesets(c: &Cluster) -> BTreeMap<&'static str, Ruleset> {
    NODES
        .iter()
        .map(|n| {
            let (r, _) = compile(c, n);
            r.validate().unwrap_or_else(|e| panic!("node {n}: {e}"));
            (*n, r)
        })
        .collect()
}

const PROTOS: [u8; 4] = [6, 17, 132, 1];
const PORTS: [u16; 5] = [53, 80, 81, 8080, 9999];

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn compiled_rules_enforce_what_the_policies_say(c in arb_cluster()) {
        let rs = rulesets(&c);
        let ends = ends(&c);
        for from in &ends {
            for to in &ends {
                // A pod's traffic to itself included: it crosses the node when it goes to a
                // service address and comes back to the pod.
                for v6 in [false, true] {
                    for proto in PROTOS {
                        let proto = if v6 && proto == 1 { 58 } else { proto };
                        for port in PORTS {
                            let want = reference(&c, from, to, v6, proto, port);
                            let got = simulated(&rs, from, to, v6, proto, port, CT_NEW);
                            prop_assert_eq!(got, want, "{:?} -> {:?} v6={} proto={} port={}", from, to, v6, proto, port);
                            if matches!(proto, 1 | 6 | 17 | 132) && port == 9999 { break; }
                        }
                    }
                }
            }
        }
        // Replies and connections already allowed always pass.
        for from in &ends {
            for to in &ends {
                prop_assert!(simulated(&rs, from, to, false, 6, 80, CT_ESTABLISHED));
            }
        }
    }

    /// A pod whose addresses the engine does not know yet is never reachable (nor reaches)
    /// beyond what its policies allow: the rules for unknown pods of its namespace are at
    /// least as strict.
    #[test]
    fn a_pod_not_known_yet_gets_no_more_than_its_policies_allow(c in arb_cluster(), pick in 0usize..8) {
        let candidates: Vec<Pod> = c.pods.values().filter(|p| p.selectable()).cloned().collect();
        prop_assume!(!candidates.is_empty());
        let x = candidates[pick % candidates.len()].clone();
        let mut engine_view = c.clone();
        engine_view.pods.get_mut(&(x.namespace.clone(), x.name.clone())).unwrap().ips.clear();
        let rs = rulesets(&engine_view);
        for other in ends(&c) {
            if matches!(&other, End::Pod(p) if p.name == x.name) { continue; }
            for v6 in [false, true] {
                for proto in [6u8, 17] {
                    for port in PORTS {
                        for (from, to) in [(End::Pod(x.clone()), other.clone()), (other.clone(), End::Pod(x.clone()))] {
                            if simulated(&rs, &from, &to, v6, proto, port, CT_NEW) {
                                prop_assert!(
                                    reference(&c, &from, &to, v6, proto, port),
                                    "{:?} -> {:?} v6={} proto={} port={} passed before the pod was known", from, to, v6, proto, port
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Compiling is a function of the cluster: the same cluster gives the same rule set, and
    /// set and chain names do not depend on the pods.
    #[test]
    fn names_do_not_follow_pods(c in arb_cluster()) {
        let (a, _) = compile(&c, "n1");
        let (b, _) = compile(&c, "n1");
        prop_assert_eq!(&a, &b);
        // Another pod far away (other node, new labels) changes no chain name of node 1.
        let mut more = c.clone();
        let extra = Pod {
            namespace: "ns1".into(), name: "zz".into(), labels: labels(&[("app", "web")]),
            ips: vec!["10.244.2.200".parse().unwrap()], node: Some("n2".into()), host_network: false, named_ports: vec![],
        };
        more.pods.insert(("ns1".into(), "zz".into()), extra);
        let (m, _) = compile(&more, "n1");
        prop_assert_eq!(a.chains.keys().collect::<Vec<_>>(), m.chains.keys().collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written cases: the shapes the upstream suite checks, readable on their own.

fn pod(ns: &str, name: &str, app: &str, node: &str, ip: &str) -> Pod {
    Pod {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        ips: vec![ip.parse().unwrap()],
        node: Some(node.into()),
        host_network: false,
        named_ports: vec![NamedPort { name: "serve-80-tcp".into(), protocol: Protocol::Tcp, port: 80 }],
    }
}

fn cluster(pods: Vec<Pod>, policies: Vec<Policy>) -> Cluster {
    let mut c = Cluster::default();
    for ns in ["x", "y"] {
        c.namespaces.insert(ns.into(), labels(&[("kubernetes.io/metadata.name", ns)]));
    }
    for p in pods {
        c.pods.insert((p.namespace.clone(), p.name.clone()), p);
    }
    for p in policies {
        c.policies.insert((p.namespace.clone(), p.name.clone()), p);
    }
    c
}

fn deny_ingress(ns: &str) -> Policy {
    Policy {
        namespace: ns.into(),
        name: "deny".into(),
        pod_selector: Selector::everything(),
        ingress: Some(vec![]),
        egress: None,
        problems: vec![],
    }
}

#[test]
fn default_deny_ingress_isolates_the_namespace_and_nothing_else() {
    let c = cluster(
        vec![
            pod("x", "a", "web", "n1", "10.244.1.2"),
            pod("x", "b", "db", "n2", "10.244.2.2"),
            pod("y", "a", "web", "n1", "10.244.1.3"),
        ],
        vec![deny_ingress("x")],
    );
    let rs = rulesets(&c);
    let p = |ns: &str, n: &str| End::Pod(c.pods[&(ns.to_string(), n.to_string())].clone());
    assert!(!simulated(&rs, &p("y", "a"), &p("x", "a"), false, 6, 80, CT_NEW), "same node, other namespace");
    assert!(!simulated(&rs, &p("x", "a"), &p("x", "b"), false, 6, 80, CT_NEW), "across nodes");
    assert!(simulated(&rs, &p("x", "a"), &p("y", "a"), false, 6, 80, CT_NEW), "y is not isolated");
    assert!(
        simulated(&rs, &End::Node("n1".into(), "10.99.0.11".parse().unwrap()), &p("x", "a"), false, 6, 80, CT_NEW),
        "the node's own probes"
    );
    assert!(simulated(&rs, &p("x", "b"), &p("x", "a"), false, 6, 80, CT_ESTABLISHED), "replies");
    // Node 2 has a chain for x/b only; node 1 none for x/b.
    let (_, stats) = compile(&c, "n1");
    assert_eq!((stats.local_pods, stats.isolated_ingress, stats.isolated_egress), (2, 1, 0));
    assert_eq!(stats.policies_in_force, 1);
}

#[test]
fn base_chains_hook_ahead_of_iptables() {
    let (r, _) = compile(&Cluster::default(), "n1");
    let fwd = &r.chains[super::compile::CHAIN_FORWARD];
    assert_eq!(fwd.base.unwrap().priority, PRIORITY);
    const { assert!(PRIORITY < 0) };
    // Without policies nothing is dropped anywhere.
    assert!(r.sets.values().all(|s| s.elements.is_empty()));
}
