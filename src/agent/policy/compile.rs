//! From what the engine knows of the cluster to the rule set of this node's table (`inet
//! headcni-policy`). Pure: the same cluster and node give the same rule set.
//!
//! ```text
//! chain forward { type filter hook forward priority filter - 5; policy accept;
//!     ct state established,related accept        # replies, and connections already allowed
//!     ip saddr . ip daddr @self4 accept          # a pod reaching itself through a service
//!     ip6 saddr . ip6 daddr @self6 accept
//!     iifname "hc*" jump egress                  # from a local pod: its egress
//!     oifname "hc*" jump ingress                 # to a local pod: its ingress
//! }
//! chain input { type filter hook input priority filter - 5; policy accept;
//!     ct state established,related accept
//!     iifname "hc*" icmpv6 type 133-137 accept   # neighbour discovery with the node
//!     iifname "hc*" ip6 saddr fe80::/10 accept   # link-local traffic with the node
//!     iifname "hc*" jump egress                  # a pod's traffic to the node is egress too
//! }
//! chain egress {
//!     ip saddr vmap @eg4                         # local pods: goto their group, or return
//!     ip6 saddr vmap @eg6
//!     iifgroup vmap @eg-pending                  # a pod not known yet (see below)
//! }
//! chain ingress { ... the same with daddr, @in4, @in6, oifgroup, @in-pending }
//! chain ing-<hash> {                             # one per set of policies isolating pods
//!     ip saddr @p<hash>-4 tcp dport 80 return    # a rule's peers on one of its ports
//!     ip6 saddr @p<hash>-6 tcp dport 80 return
//!     ip saddr @p<hash>-4 ip daddr . meta l4proto . th dport @n<hash>-4 return  # named ports
//!     counter drop                               # isolated: nothing else
//! }
//! ```
//!
//! Ingress is decided on the node of the pod the traffic goes to, egress on the node of the
//! pod it comes from; traffic between two pods of one node passes both. The node's own
//! traffic to its pods (kubelet probes) leaves through `output` and is never filtered.
//!
//! Only local pods are in the maps and only their groups' chains and sets exist: a policy
//! that selects no pod of this node costs this node nothing, and a packet of a pod that no
//! policy isolates costs one map lookup (after the connection-tracking accept, which is what
//! almost every packet takes). Set names are derived from what defines them (a rule's peers,
//! a policy's rule) and chain names from their contents, so pods coming and going only change
//! set and map elements.
//!
//! A new pod: its addresses become known a moment after the plugin attached it. Until then
//! its host interface carries its namespace's group ([`crate::podgroup`], set by the plugin
//! when `enable_network_policy` is on): in a namespace where policies isolate pods, its
//! traffic takes the chain of the local pods of that namespace still waiting for addresses
//! when they all share one, and is dropped otherwise. So a pod is never reachable before its
//! policies apply to it.

use super::model::{Cluster, Direction, Namespaces, Peer, Pod, Policy, PortSpec, Rule as PolicyRule};
use crate::netlink::nft::ruleset::{
    Action, AddrField, BaseHook, CT_ESTABLISHED, CT_RELATED, Chain, Elem, Hook, Iface, IpVersion, KeyType, Match, Rule,
    Ruleset, Set, SetKind, Verdict,
};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The table's name (family `inet`).
pub const TABLE: &str = "headcni-policy";
/// `filter - 5`: ahead of the filter chains of iptables (kube-proxy, tailscaled).
pub const PRIORITY: i32 = -5;
/// Host ends of pod interfaces are named so (see `plugin::attachment::host_veth_name`).
pub const POD_IFNAME_PREFIX: &str = "hc";

pub const CHAIN_FORWARD: &str = "forward";
pub const CHAIN_INPUT: &str = "input";
pub const CHAIN_EGRESS: &str = "egress";
pub const CHAIN_INGRESS: &str = "ingress";
/// (address, same address) of every local pod: its traffic to itself.
const SELF4: &str = "self4";
const SELF6: &str = "self6";

/// What the rule set does, in numbers (for status and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Stats {
    /// Pods of this node with addresses (on the pod network).
    pub local_pods: usize,
    /// Of them, isolated for ingress / egress.
    pub isolated_ingress: usize,
    pub isolated_egress: usize,
    /// Pods of this node still waiting for their addresses.
    pub pending_pods: usize,
    /// Policies that isolate at least one pod of this node.
    pub policies_in_force: usize,
    pub chains: usize,
    pub sets: usize,
    pub elements: usize,
    /// Addresses that two pods of this node claim (the stricter verdict is taken).
    pub address_conflicts: usize,
}

fn fnv64(data: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn short_hash(data: &str) -> String {
    format!("{:012x}", fnv64(data) >> 16)
}

fn family_suffix(v: IpVersion) -> &'static str {
    if v == IpVersion::V4 { "4" } else { "6" }
}

/// Sorted, merged (overlapping and adjacent) inclusive address ranges of one family.
fn normalize(mut ranges: Vec<(IpAddr, IpAddr)>) -> Vec<(IpAddr, IpAddr)> {
    ranges.sort();
    let mut out: Vec<(IpAddr, IpAddr)> = Vec::new();
    for (a, b) in ranges {
        if let Some(last) = out.last_mut() {
            let touches = match next_addr(last.1) {
                Some(n) => a <= n,
                None => true,
            };
            if touches {
                if b > last.1 {
                    last.1 = b;
                }
                continue;
            }
        }
        out.push((a, b));
    }
    out
}

fn next_addr(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(a) => u32::from(a).checked_add(1).map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        IpAddr::V6(a) => u128::from(a).checked_add(1).map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    }
}

fn prev_addr(a: IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(a) => u32::from(a).checked_sub(1).map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        IpAddr::V6(a) => u128::from(a).checked_sub(1).map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    }
}

/// `cidr` minus the `except` networks, as ranges.
fn block_ranges(cidr: &IpNetwork, except: &[IpNetwork]) -> Vec<(IpAddr, IpAddr)> {
    let mut ranges = vec![crate::cidr::address_range(cidr)];
    for e in except {
        let (ea, eb) = crate::cidr::address_range(e);
        let mut next = Vec::new();
        for (a, b) in ranges {
            if eb < a || ea > b {
                next.push((a, b));
                continue;
            }
            if ea > a
                && let Some(p) = prev_addr(ea)
            {
                next.push((a, p));
            }
            if eb < b
                && let Some(n) = next_addr(eb)
            {
                next.push((n, b));
            }
        }
        ranges = next;
    }
    ranges
}

/// The rule set being built, and what it is made of.
struct Builder<'a> {
    cluster: &'a Cluster,
    /// This node's pods on the pod network (with or without addresses).
    local: Vec<&'a Pod>,
    ruleset: Ruleset,
}

impl<'a> Builder<'a> {
    fn pods_with_addresses(&self) -> impl Iterator<Item = &'a Pod> + 'a {
        self.cluster.pods.values().filter(|p| p.selectable() && !p.ips.is_empty())
    }

    /// The set of a rule's peers (by what defines them: pods are resolved within the
    /// policy's namespace when a peer says so), created once and shared by every rule with
    /// the same peers.
    fn peer_set(&mut self, policy: &Policy, peers: &[Peer], v: IpVersion) -> String {
        let own_ns = peers
            .iter()
            .any(|p| matches!(p, Peer::Pods { namespaces: Namespaces::Own, .. }))
            .then_some(&policy.namespace);
        let name = format!("p{}-{}", short_hash(&format!("{own_ns:?}{peers:?}")), family_suffix(v));
        if self.ruleset.sets.contains_key(&name) {
            return name;
        }
        let mut ranges = Vec::new();
        for peer in peers {
            match peer {
                Peer::Block { cidr, except } if IpVersion::of(&cidr.ip()) == v => {
                    ranges.extend(block_ranges(cidr, except));
                }
                Peer::Pods { .. } => {
                    for pod in self.pods_with_addresses() {
                        if self.cluster.peer_has_pod(&policy.namespace, peer, pod) {
                            ranges.extend(pod.ips.iter().filter(|ip| IpVersion::of(ip) == v).map(|ip| (*ip, *ip)));
                        }
                    }
                }
                _ => {}
            }
        }
        let mut set = Set::new(KeyType::Addr(v), SetKind::Interval);
        for (a, b) in normalize(ranges) {
            set.insert(Elem::Range(a, b));
        }
        self.ruleset.sets.insert(name.clone(), set);
        name
    }

    /// The set of (address, protocol, port) a rule's named ports resolve to: on the pods the
    /// traffic goes to (ingress: this node's pods the policy selects; egress: the rule's peers,
    /// every pod when it has none).
    fn named_set(
        &mut self,
        policy: &Policy,
        direction: Direction,
        index: usize,
        rule: &PolicyRule,
        v: IpVersion,
    ) -> String {
        let name = format!(
            "n{}-{}",
            short_hash(&format!("{}/{} {} {index}", policy.namespace, policy.name, direction.as_str())),
            family_suffix(v)
        );
        let named: Vec<(&str, crate::agent::policy::model::Protocol)> = rule
            .ports
            .iter()
            .flatten()
            .filter_map(|p| match p {
                PortSpec::Named(proto, n) => Some((n.as_str(), *proto)),
                _ => None,
            })
            .collect();
        // (pod, address) pairs the traffic may go to: for egress, an address is a peer's when
        // its pod is one of a selector's or the address lies in a block.
        let mut targets: Vec<(&Pod, IpAddr)> = Vec::new();
        match direction {
            Direction::Ingress => {
                for pod in self.local.iter().copied().filter(|p| policy.selects(p)) {
                    targets.extend(pod.ips.iter().map(|ip| (pod, *ip)));
                }
            }
            Direction::Egress => {
                for pod in self.pods_with_addresses() {
                    for ip in &pod.ips {
                        let peer = match &rule.peers {
                            None => true,
                            Some(peers) => peers.iter().any(|peer| match peer {
                                Peer::Block { cidr, except } => {
                                    cidr.contains(*ip) && !except.iter().any(|e| e.contains(*ip))
                                }
                                _ => self.cluster.peer_has_pod(&policy.namespace, peer, pod),
                            }),
                        };
                        if peer {
                            targets.push((pod, *ip));
                        }
                    }
                }
            }
        }
        let mut set = Set::new(KeyType::AddrProtoPort(v), SetKind::Plain);
        for (pod, ip) in targets.into_iter().filter(|(_, ip)| IpVersion::of(ip) == v) {
            for (port_name, proto) in &named {
                if let Some(port) = pod.resolve(port_name, *proto) {
                    set.insert(Elem::AddrProtoPort(ip, proto.number(), port));
                }
            }
        }
        self.ruleset.sets.insert(name.clone(), set);
        name
    }

    /// The nft rules of one policy rule: any of them matching means allowed.
    fn rule_matches(
        &mut self,
        policy: &Policy,
        direction: Direction,
        index: usize,
        rule: &PolicyRule,
    ) -> Vec<Vec<Match>> {
        let field = if direction == Direction::Ingress { AddrField::Source } else { AddrField::Destination };
        let mut numeric: Vec<Vec<Match>> = Vec::new();
        let mut named = false;
        match &rule.ports {
            None => numeric.push(Vec::new()),
            Some(ports) => {
                for p in ports {
                    match p {
                        PortSpec::Any(proto) => numeric.push(vec![Match::L4Proto(proto.number())]),
                        PortSpec::Range(proto, a, b) => {
                            numeric.push(vec![Match::L4Proto(proto.number()), Match::DportRange(*a, *b)])
                        }
                        PortSpec::Named(..) => named = true,
                        PortSpec::Nothing => {}
                    }
                }
            }
        }
        let mut out = Vec::new();
        if rule.peers.is_none() && !named {
            return numeric;
        }
        for v in [IpVersion::V4, IpVersion::V6] {
            let peer_match =
                rule.peers.as_ref().map(|peers| Match::AddrInSet(field, v, self.peer_set(policy, peers, v)));
            for alt in &numeric {
                let mut m: Vec<Match> = peer_match.iter().cloned().collect();
                m.extend(alt.iter().cloned());
                out.push(m);
            }
            if named {
                let set = self.named_set(policy, direction, index, rule, v);
                let mut m = Vec::new();
                // Egress: the named set holds only the peers' addresses already.
                if direction == Direction::Ingress {
                    m.extend(peer_match.iter().cloned());
                }
                m.push(Match::DaddrProtoPortInSet(v, set));
                out.push(m);
            }
        }
        out
    }

    /// The chain of pods isolated by exactly `policies` in `direction` (created once).
    fn group_chain(&mut self, direction: Direction, policies: &[&'a Policy]) -> String {
        let mut rules = Vec::new();
        let mut allows_all = false;
        'policies: for policy in policies {
            for (i, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
                let note = format!("{}/{} {} rule {i}", policy.namespace, policy.name, direction.as_str());
                if rule.allows_all() {
                    rules.push(Rule::new(Vec::new(), Verdict::Return).with_comment(note));
                    allows_all = true;
                    break 'policies;
                }
                for m in self.rule_matches(policy, direction, i, rule) {
                    rules.push(Rule::new(m, Verdict::Return).with_comment(note.clone()));
                }
            }
        }
        if !allows_all {
            rules.push(
                Rule::new(Vec::new(), Verdict::Drop)
                    .counted()
                    .with_comment(format!("{} not allowed", direction.as_str())),
            );
        }
        let prefix = if direction == Direction::Ingress { "ing-" } else { "egr-" };
        let name = format!("{prefix}{}", short_hash(&format!("{rules:?}")));
        self.ruleset.chains.entry(name.clone()).or_insert(Chain { base: None, rules });
        name
    }

    /// The verdict for a local pod in `direction`: the chain of the policies isolating it, or
    /// `return` (not isolated).
    fn verdict_for(
        &mut self,
        pod: &'a Pod,
        direction: Direction,
        in_force: &mut BTreeSet<(String, String)>,
    ) -> Verdict {
        let cluster = self.cluster;
        let policies: Vec<&Policy> = cluster.pods_policies(pod).filter(|p| p.rules(direction).is_some()).collect();
        if policies.is_empty() {
            return Verdict::Return;
        }
        for p in &policies {
            in_force.insert((p.namespace.clone(), p.name.clone()));
        }
        Verdict::Goto(self.group_chain(direction, &policies))
    }
}

impl Cluster {
    /// The policies of the pod's namespace that select it.
    pub fn pods_policies<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies
            .range((pod.namespace.clone(), String::new())..)
            .take_while(move |((ns, _), _)| *ns == pod.namespace)
            .map(|(_, p)| p)
            .filter(move |p| p.selects(pod))
    }

    /// Whether some policy of the namespace applies to `direction`.
    fn namespace_has(&self, namespace: &str, direction: Direction) -> bool {
        self.policies
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .any(|(_, p)| p.rules(direction).is_some())
    }
}

/// fe80::/10, the IPv6 link-local network.
fn link_local() -> IpNetwork {
    const NET: ipnetwork::Ipv6Network =
        match ipnetwork::Ipv6Network::new_checked(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
            Some(net) => net,
            None => panic!("fe80::/10 is a network"),
        };
    IpNetwork::V6(NET)
}

fn map_name(direction: Direction, v: IpVersion) -> String {
    let prefix = if direction == Direction::Ingress { "in" } else { "eg" };
    format!("{prefix}{}", family_suffix(v))
}

fn pending_name(direction: Direction) -> &'static str {
    if direction == Direction::Ingress { "in-pending" } else { "eg-pending" }
}

fn base_chains(ruleset: &mut Ruleset) {
    let from_pod = Match::IfnamePrefix(Iface::Input, POD_IFNAME_PREFIX.into());
    let established = Rule::new(vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)], Verdict::Accept);
    ruleset.chains.insert(
        CHAIN_FORWARD.into(),
        Chain {
            base: Some(BaseHook { hook: Hook::Forward, priority: PRIORITY }),
            rules: vec![
                established.clone(),
                // A pod reaching itself (through a service address, back out of its own
                // interface) follows no policy.
                Rule::new(vec![Match::SaddrDaddrInSet(IpVersion::V4, SELF4.into())], Verdict::Accept),
                Rule::new(vec![Match::SaddrDaddrInSet(IpVersion::V6, SELF6.into())], Verdict::Accept),
                Rule::new(vec![from_pod.clone()], Verdict::Jump(CHAIN_EGRESS.into())),
                Rule::new(
                    vec![Match::IfnamePrefix(Iface::Output, POD_IFNAME_PREFIX.into())],
                    Verdict::Jump(CHAIN_INGRESS.into()),
                ),
            ],
        },
    );
    ruleset.chains.insert(
        CHAIN_INPUT.into(),
        Chain {
            base: Some(BaseHook { hook: Hook::Input, priority: PRIORITY }),
            rules: vec![
                established,
                // Neighbour discovery (solicitations and advertisements, also from a pod's
                // own address) and link-local traffic are the node's business, not policy's.
                Rule::new(vec![from_pod.clone(), Match::Icmpv6TypeRange(133, 137)], Verdict::Accept),
                Rule::new(vec![from_pod.clone(), Match::AddrIn(AddrField::Source, link_local())], Verdict::Accept),
                Rule::new(vec![from_pod], Verdict::Jump(CHAIN_EGRESS.into())),
            ],
        },
    );
    for (chain, direction, field, iface) in [
        (CHAIN_EGRESS, Direction::Egress, AddrField::Source, Iface::Input),
        (CHAIN_INGRESS, Direction::Ingress, AddrField::Destination, Iface::Output),
    ] {
        let mut rules = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            rules.push(Rule {
                matches: Vec::new(),
                counter: false,
                action: Action::AddrVmap(field, v, map_name(direction, v)),
                comment: None,
            });
        }
        rules.push(Rule {
            matches: Vec::new(),
            counter: false,
            action: Action::GroupVmap(iface, pending_name(direction).into()),
            comment: Some("pods whose addresses are not known yet".into()),
        });
        ruleset.chains.insert(chain.into(), Chain { base: None, rules });
    }
}

/// The stricter of two verdicts for one key: equal ones stand, anything else is a drop.
fn merge(existing: Option<&Verdict>, new: Verdict) -> (Verdict, bool) {
    match existing {
        None => (new, false),
        Some(v) if *v == new => (new, false),
        Some(_) => (Verdict::Drop, true),
    }
}

/// The rule set of `node`'s table.
pub fn compile(cluster: &Cluster, node: &str) -> (Ruleset, Stats) {
    let local: Vec<&Pod> =
        cluster.pods.values().filter(|p| p.selectable() && p.node.as_deref() == Some(node)).collect();
    let mut b = Builder { cluster, local: local.clone(), ruleset: Ruleset::default() };
    let mut stats = Stats::default();
    base_chains(&mut b.ruleset);
    let mut maps: BTreeMap<String, Set> = BTreeMap::new();
    for direction in [Direction::Ingress, Direction::Egress] {
        for v in [IpVersion::V4, IpVersion::V6] {
            maps.insert(map_name(direction, v), Set::new(KeyType::Addr(v), SetKind::VerdictMap));
        }
        maps.insert(pending_name(direction).into(), Set::new(KeyType::Group, SetKind::VerdictMap));
    }
    let mut own = [
        Set::new(KeyType::AddrPair(IpVersion::V4), SetKind::Plain),
        Set::new(KeyType::AddrPair(IpVersion::V6), SetKind::Plain),
    ];
    for ip in local.iter().flat_map(|p| p.ips.iter()) {
        own[usize::from(ip.is_ipv6())].insert(Elem::AddrPair(*ip, *ip));
    }
    let [own4, own6] = own;
    b.ruleset.sets.insert(SELF4.into(), own4);
    b.ruleset.sets.insert(SELF6.into(), own6);
    let mut in_force = BTreeSet::new();
    // Verdicts of the pods waiting for their addresses, by namespace and direction.
    let mut waiting: BTreeMap<(String, Direction), Vec<Verdict>> = BTreeMap::new();
    for pod in &local {
        if pod.ips.is_empty() {
            stats.pending_pods += 1;
        } else {
            stats.local_pods += 1;
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            let verdict = b.verdict_for(pod, direction, &mut in_force);
            if pod.ips.is_empty() {
                waiting.entry((pod.namespace.clone(), direction)).or_default().push(verdict);
                continue;
            }
            if verdict != Verdict::Return {
                match direction {
                    Direction::Ingress => stats.isolated_ingress += 1,
                    Direction::Egress => stats.isolated_egress += 1,
                }
            }
            for ip in &pod.ips {
                let map = maps
                    .entry(map_name(direction, IpVersion::of(ip)))
                    .or_insert_with(|| Set::new(KeyType::Addr(IpVersion::of(ip)), SetKind::VerdictMap));
                let (merged, conflict) =
                    merge(map.elements.get(&Elem::Addr(*ip)).and_then(Option::as_ref), verdict.clone());
                stats.address_conflicts += usize::from(conflict);
                map.insert_verdict(Elem::Addr(*ip), merged);
            }
        }
    }
    // Pods not known yet, by their interface's group: in a namespace whose policies apply to
    // the direction, the one verdict its waiting pods share, else drop.
    let namespaces: BTreeSet<&String> = cluster.policies.keys().map(|(ns, _)| ns).collect();
    for ns in namespaces {
        for direction in [Direction::Ingress, Direction::Egress] {
            if !cluster.namespace_has(ns, direction) {
                continue;
            }
            let verdict = match waiting.get(&(ns.clone(), direction)) {
                Some(vs) if vs.iter().all(|v| *v == vs[0]) => vs[0].clone(),
                _ => Verdict::Drop,
            };
            let key = Elem::Group(crate::podgroup::namespace_group(ns));
            let map = maps
                .entry(pending_name(direction).into())
                .or_insert_with(|| Set::new(KeyType::Group, SetKind::VerdictMap));
            let (merged, _) = merge(map.elements.get(&key).and_then(Option::as_ref), verdict);
            map.insert_verdict(key, merged);
        }
    }
    b.ruleset.sets.extend(maps);
    stats.policies_in_force = in_force.len();
    stats.chains = b.ruleset.chains.len();
    stats.sets = b.ruleset.sets.len();
    stats.elements = b.ruleset.sets.values().map(|s| s.elements.len()).sum();
    (b.ruleset, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_merge_when_they_touch() {
        let r = normalize(vec![
            (a("10.0.0.5"), a("10.0.0.5")),
            (a("10.0.0.1"), a("10.0.0.4")),
            (a("10.0.0.9"), a("10.0.0.9")),
        ]);
        assert_eq!(r, vec![(a("10.0.0.1"), a("10.0.0.5")), (a("10.0.0.9"), a("10.0.0.9"))]);
        let r = normalize(vec![(a("0.0.0.0"), a("255.255.255.255")), (a("10.0.0.1"), a("10.0.0.1"))]);
        assert_eq!(r, vec![(a("0.0.0.0"), a("255.255.255.255"))]);
    }

    #[test]
    fn blocks_lose_their_exceptions() {
        let net = |s: &str| s.parse::<IpNetwork>().unwrap();
        assert_eq!(
            block_ranges(&net("10.0.0.0/8"), &[net("10.1.0.0/16"), net("10.0.0.0/24")]),
            vec![(a("10.0.1.0"), a("10.0.255.255")), (a("10.2.0.0"), a("10.255.255.255"))]
        );
        assert_eq!(
            block_ranges(&net("0.0.0.0/0"), &[net("10.0.0.0/8")]),
            vec![(a("0.0.0.0"), a("9.255.255.255")), (a("11.0.0.0"), a("255.255.255.255"))]
        );
        assert!(block_ranges(&net("10.0.0.0/24"), &[net("10.0.0.0/16")]).is_empty());
        assert_eq!(block_ranges(&net("::/0"), &[]), vec![(a("::"), a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))]);
    }
}
