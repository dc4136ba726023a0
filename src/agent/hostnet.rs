//! The node's data plane as the agent keeps it: IP forwarding, the policy rules that decide
//! what goes to Tailscale's table 52 and what does not, an `unreachable` route for each own pod
//! CIDR, the anti-spoofing guard ([`crate::podguard`]), an nf_tables masquerade table per
//! address family for pod traffic leaving the cluster, and the tailnet interface's MTU.
//! Everything goes through [`crate::netlink`]; a handle is bound to one namespace (the host's in
//! production, a test namespace in tests).
//!
//! The policy rules ([`policy_rules`]), ahead of Tailscale's at 5210-5270 (P is
//! `--rule-priority`, 5200 by default):
//!
//! ```text
//! P    to <own pod CIDR> lookup main                 local pods, whatever table 52 holds
//! P+1  fwmark 0x80000/0xff0000 goto P+3              tailscaled's own packets skip the next ones
//! P+2  to <X> lookup 52                              X: the cluster CIDR (or the Nodes' pod
//!                                                    CIDRs) and the tailnet ranges
//! P+3  lookup main suppress_prefixlength 0           anything the main table routes more
//!                                                    specifically than by its default route
//!                                                    stays off the tailnet
//! ```
//!
//! So a peer that advertises this node's own LAN, or an exit node's default route, never
//! captures the node's traffic, while traffic to other nodes' pods still goes to table 52 even
//! where the main table has a broader route covering it. Tailscale's own packets (its bypass
//! mark) are never sent to table 52 by these rules, as without HeadCNI (a rule can only invert
//! its whole match, so the mark is tested by a rule of its own that jumps over the others).
//!
//! Ownership: rules and routes carry HeadCNI's protocol number ([`OWN_PROTOCOL`]), the
//! nf_tables tables are named [`TABLE`] and [`crate::podguard::TABLE`]; nothing else on the node
//! is ever changed or removed.

use crate::cidr::covers;
use crate::netlink::nft::{MasqueradeSpec, Nft, NftError, NftFamily};
use crate::netlink::sysctl::SysctlRoot;
use crate::netlink::{Netlink, NetlinkError, Netns, RouteKind, RouteSpec, RuleSpec, RuleTarget, TABLE_MAIN};
use crate::podguard;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

/// Protocol number on HeadCNI's policy rules and routes (`ip rule` and `ip route` show
/// "proto 104").
pub const OWN_PROTOCOL: u8 = 104;
/// Default priority of the first rule: ahead of Tailscale's rules at 5210-5270.
pub const DEFAULT_RULE_PRIORITY: u32 = 5200;
/// How many consecutive priorities HeadCNI's rules take from `--rule-priority` on.
pub const RULE_PRIORITIES: u32 = 4;
/// Tailscale's first rule; HeadCNI's must come before it.
pub const TAILSCALE_FIRST_RULE: u32 = 5210;
/// Tailscale's routing table (the routes it accepted from peers).
pub const TAILSCALE_TABLE: u32 = 52;
/// A routing table no rule consults, where the agent adds and at once removes one route to a
/// documentation address (TEST-NET-1) after tailscaled has put its addresses on its interface.
/// Why: tailscaled's link monitor ignores the netlink events of its own addresses, so its view
/// of the interfaces stays without them until some other event makes it look again; it then
/// finds "tailscale0's addresses changed", calls that a major link change and rebinds its
/// sockets (the direct paths to peers are lost for a moment). Unprompted, that event is the
/// first pod's host route, and that pod's first packets across the tailnet are lost. The
/// route event makes the monitor catch up before any pod exists.
pub const LINK_MONITOR_TABLE: u32 = 5299;
const LINK_MONITOR_NUDGE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
/// The mark on tailscaled's own packets (its WireGuard and disco traffic) and the mask it is
/// matched with: Tailscale's rules send them to the main table, and HeadCNI's leave them alone.
pub const TAILSCALE_BYPASS_MARK: (u32, u32) = (0x80000, 0xff0000);
/// Name of HeadCNI's masquerade tables (`ip headcni`, `ip6 headcni`).
pub const TABLE: &str = "headcni";
pub const CHAIN: &str = "postrouting";
/// Tailscale's address ranges: never masqueraded, never pod CIDRs.
pub const TAILNET_V4: &str = "100.64.0.0/10";
pub const TAILNET_V6: &str = "fd7a:115c:a1e0::/48";
/// The default name of tailscaled's interface.
pub const DEFAULT_TUN: &str = "tailscale0";

pub const SYSCTL_FORWARD_V4: &str = "ipv4/ip_forward";
pub const SYSCTL_FORWARD_V6: &str = "ipv6/conf/all/forwarding";

/// The kernel has no IPv6 (booted with ipv6.disable=1): IPv6 rules are skipped.
const EAFNOSUPPORT: i32 = 97;

#[derive(Debug, thiserror::Error)]
pub enum HostNetworkError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("sysctl net/{key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("{0}")]
    Conflict(String),
}

const TAILNET_V4_NET: IpNetwork = match Ipv4Network::new_checked(Ipv4Addr::new(100, 64, 0, 0), 10) {
    Some(n) => IpNetwork::V4(n),
    None => panic!("100.64.0.0/10 is a valid network"),
};
const TAILNET_V6_NET: IpNetwork =
    match Ipv6Network::new_checked(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48) {
        Some(n) => IpNetwork::V6(n),
        None => panic!("fd7a:115c:a1e0::/48 is a valid network"),
    };

/// Tailscale's CGNAT and ULA ranges.
pub fn tailnet_ranges() -> [IpNetwork; 2] {
    [TAILNET_V4_NET, TAILNET_V6_NET]
}

/// HeadCNI's policy rules (see the module doc), for both families: own pod CIDRs to main at
/// `priority`, tailscaled's marked packets past the next rules at `priority`+1, the
/// tailnet-bound destinations `to_tailnet` and the tailnet ranges to table 52 at `priority`+2,
/// and main's specific routes ahead of table 52 at `priority`+3.
pub fn policy_rules(pod_cidrs: &[IpNetwork], to_tailnet: &[IpNetwork], priority: u32) -> Vec<RuleSpec> {
    let own = |mut r: RuleSpec| {
        r.protocol = Some(OWN_PROTOCOL);
        r
    };
    let mut rules: Vec<RuleSpec> = pod_cidrs.iter().map(|p| own(RuleSpec::to(*p, TABLE_MAIN, priority))).collect();
    for ipv6 in [false, true] {
        rules.push(own(RuleSpec {
            ipv6,
            dst: None,
            fwmark: Some(TAILSCALE_BYPASS_MARK),
            target: RuleTarget::Goto(priority + 3),
            suppress_prefixlen: None,
            priority: priority + 1,
            protocol: None,
        }));
    }
    let mut tailnet: Vec<IpNetwork> = Vec::new();
    for net in to_tailnet.iter().chain(tailnet_ranges().iter()) {
        if !tailnet.iter().any(|t| covers(t, net)) {
            tailnet.retain(|t| !covers(net, t));
            tailnet.push(*net);
        }
    }
    tailnet.sort_by_key(|n| (n.is_ipv6(), n.network(), n.prefix()));
    rules.extend(tailnet.into_iter().map(|net| own(RuleSpec::to(net, TAILSCALE_TABLE, priority + 2))));
    for ipv6 in [false, true] {
        rules.push(own(RuleSpec {
            ipv6,
            dst: None,
            fwmark: None,
            target: RuleTarget::Table(TABLE_MAIN),
            suppress_prefixlen: Some(0),
            priority: priority + 3,
            protocol: None,
        }));
    }
    rules
}

/// The masquerade tables for these pod CIDRs: one per family that has a pod CIDR. Exempt are
/// `exempt` (the cluster and service CIDRs, the other nodes' pod CIDRs), the own pod CIDRs and
/// the tailnet ranges of that family; never anything else (a peer's routes are not the
/// cluster's: an exit node lists 0.0.0.0/0).
pub fn masquerade_specs(pod_cidrs: &[IpNetwork], exempt: &[IpNetwork]) -> Vec<MasqueradeSpec> {
    let mut out = Vec::new();
    for family in [NftFamily::Ipv4, NftFamily::Ipv6] {
        let sources: Vec<IpNetwork> = pod_cidrs.iter().filter(|n| NftFamily::of(n) == family).copied().collect();
        if sources.is_empty() {
            continue;
        }
        let mut dests: Vec<IpNetwork> = Vec::new();
        for net in exempt.iter().chain(pod_cidrs).chain(tailnet_ranges().iter()) {
            if NftFamily::of(net) == family && !dests.iter().any(|d| covers(d, net)) {
                dests.retain(|d| !covers(net, d));
                dests.push(*net);
            }
        }
        dests.sort_by_key(|d| (d.prefix(), d.network()));
        out.push(MasqueradeSpec {
            family,
            table: TABLE.into(),
            chain: CHAIN.into(),
            sources,
            exempt_destinations: dests,
        });
    }
    out
}

/// What the agent changed in one pass (for logs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub items: Vec<String>,
}

/// The data-plane operations of the reconcile loop (a seam for unit tests).
pub trait HostNetwork: Send + Sync {
    /// Turns forwarding on for the families in use; answers what changed.
    fn ensure_forwarding(
        &self,
        ipv4: bool,
        ipv6: bool,
    ) -> impl Future<Output = Result<Changes, HostNetworkError>> + Send;
    /// Makes HeadCNI's policy rules exactly `rules` (all carrying [`OWN_PROTOCOL`]).
    fn ensure_rules(&self, rules: &[RuleSpec]) -> impl Future<Output = Result<Changes, HostNetworkError>> + Send;
    /// Removes every rule HeadCNI owns; answers how many.
    fn remove_rules(&self) -> impl Future<Output = Result<usize, HostNetworkError>> + Send;
    /// Makes HeadCNI's `unreachable` routes in the main table exactly one per network of `nets`.
    /// A route to the same network that someone else owns is never replaced: an error names it.
    fn ensure_unreachable(&self, nets: &[IpNetwork]) -> impl Future<Output = Result<Changes, HostNetworkError>> + Send;
    /// Removes HeadCNI's `unreachable` routes; answers how many.
    fn remove_unreachable(&self) -> impl Future<Output = Result<usize, HostNetworkError>> + Send;
    /// Puts the anti-spoofing guard back unless it is complete.
    fn ensure_guard(&self) -> impl Future<Output = Result<Changes, HostNetworkError>> + Send;
    /// Removes the anti-spoofing guard; answers whether it existed.
    fn remove_guard(&self) -> impl Future<Output = Result<bool, HostNetworkError>> + Send;
    /// Makes the masquerade tables match `specs` (and removes the other family's table).
    fn ensure_masquerade(
        &self,
        specs: &[MasqueradeSpec],
    ) -> impl Future<Output = Result<Changes, HostNetworkError>> + Send;
    /// Removes HeadCNI's tables; answers how many existed.
    fn remove_masquerade(&self) -> impl Future<Output = Result<usize, HostNetworkError>> + Send;
    /// The tailnet interface (the one holding a Tailscale address, else `tailscale0`) and its MTU.
    fn tailnet_link(
        &self,
        tailscale_ips: &[IpAddr],
    ) -> impl Future<Output = Result<Option<(String, u32)>, HostNetworkError>> + Send;
    /// Once the tailnet addresses are on an interface other than `done` (the one already
    /// announced), makes tailscaled's link monitor look at the interfaces again
    /// ([`LINK_MONITOR_TABLE`] says why); answers the index of the interface holding them,
    /// `None` (nothing done) while no interface does.
    fn announce_tailnet_addresses(
        &self,
        tailscale_ips: &[IpAddr],
        done: Option<u32>,
    ) -> impl Future<Output = Result<Option<u32>, HostNetworkError>> + Send;
}

/// The real data plane of one namespace.
pub struct KernelHostNetwork {
    netns: Option<Netns>,
    sysctl_root: SysctlRoot,
    netlink: Netlink,
    nft: Mutex<Option<Nft>>,
    applied: Mutex<HashMap<NftFamily, MasqueradeSpec>>,
}

impl KernelHostNetwork {
    /// The calling thread's namespace. Must run inside a tokio runtime.
    pub fn current() -> Result<Self, HostNetworkError> {
        Ok(Self {
            netns: None,
            sysctl_root: SysctlRoot::default(),
            netlink: Netlink::connect()?,
            nft: Mutex::new(None),
            applied: Mutex::default(),
        })
    }

    /// Another namespace (tests). Must run inside a tokio runtime.
    pub fn in_netns(ns: Netns) -> Result<Self, HostNetworkError> {
        let netlink = Netlink::connect_in(&ns)?;
        Ok(Self {
            netns: Some(ns),
            sysctl_root: SysctlRoot::default(),
            netlink,
            nft: Mutex::new(None),
            applied: Mutex::default(),
        })
    }

    /// Reads and writes the net sysctls under `root` instead of `/proc/sys` (`--proc-sys-dir`).
    pub fn with_sysctl_root(mut self, root: SysctlRoot) -> Self {
        self.sysctl_root = root;
        self
    }

    /// Reads a net sysctl in the data plane's namespace.
    pub fn read_sysctl(&self, key: &str) -> std::io::Result<String> {
        self.sysctl_root.read_in(self.netns.as_ref(), key)
    }

    fn with_nft<T>(&self, f: impl FnOnce(&mut Nft) -> Result<T, NftError>) -> Result<T, NftError> {
        let mut guard = self.nft.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(match &self.netns {
                None => Nft::connect()?,
                Some(ns) => Nft::connect_in(ns)?,
            });
        }
        let nft = guard.as_mut().ok_or_else(|| NftError::Invalid("no socket".into()))?;
        let result = f(nft);
        if result.as_ref().is_err_and(|e| matches!(e, NftError::Io { .. } | NftError::Protocol { .. })) {
            *guard = None; // a broken socket is reopened next time
        }
        result
    }

    /// HeadCNI's rules as they are now.
    pub async fn own_rules(&self) -> Result<Vec<RuleSpec>, HostNetworkError> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            let rules = match self.netlink.rules(v6).await {
                Ok(r) => r,
                Err(e) if v6 && e.errno() == Some(EAFNOSUPPORT) => continue,
                Err(e) => return Err(e.into()),
            };
            out.extend(rules.into_iter().map(|(s, _)| s).filter(|s| s.protocol == Some(OWN_PROTOCOL)));
        }
        Ok(out)
    }

    /// HeadCNI's `unreachable` routes as they are now.
    pub async fn own_unreachable(&self) -> Result<Vec<IpNetwork>, HostNetworkError> {
        let mut out = Vec::new();
        for v6 in [false, true] {
            for r in self.netlink.routes(v6).await? {
                if r.protocol == OWN_PROTOCOL && r.kind == RouteKind::Unreachable && r.table == TABLE_MAIN {
                    out.push(r.dst);
                }
            }
        }
        Ok(out)
    }

    /// Whether the anti-spoofing guard is complete.
    pub fn guard_intact(&self) -> Result<bool, HostNetworkError> {
        Ok(self.with_nft(podguard::intact)?)
    }

    /// Whether a table exists and how many rules its chain has.
    pub fn masquerade_table(&self, family: NftFamily) -> Result<Option<usize>, HostNetworkError> {
        Ok(self.with_nft(|nft| {
            if nft.table_exists(family, TABLE)? { Ok(Some(nft.rule_count(family, TABLE, CHAIN)?)) } else { Ok(None) }
        })?)
    }
}

impl HostNetwork for KernelHostNetwork {
    async fn ensure_forwarding(&self, ipv4: bool, ipv6: bool) -> Result<Changes, HostNetworkError> {
        let mut changes = Changes::default();
        for (on, key) in [(ipv4, SYSCTL_FORWARD_V4), (ipv6, SYSCTL_FORWARD_V6)] {
            if !on {
                continue;
            }
            let changed = self
                .sysctl_root
                .ensure_in(self.netns.as_ref(), key, "1")
                .map_err(|source| HostNetworkError::Sysctl { key: key.into(), source })?;
            if changed {
                changes.items.push(format!("set net/{key}=1"));
            }
        }
        Ok(changes)
    }

    async fn ensure_rules(&self, want: &[RuleSpec]) -> Result<Changes, HostNetworkError> {
        let mut changes = Changes::default();
        for v6 in [false, true] {
            let rules = match self.netlink.rules(v6).await {
                Ok(r) => r,
                Err(e) if v6 && e.errno() == Some(EAFNOSUPPORT) => continue,
                Err(e) => return Err(e.into()),
            };
            for (have, msg) in rules {
                if have.protocol == Some(OWN_PROTOCOL) && !want.contains(&have) {
                    self.netlink.delete_rule(msg).await?;
                    changes.items.push(format!("removed rule \"{have}\" priority {}", have.priority));
                }
            }
        }
        let now = self.own_rules().await?;
        for rule in want {
            if now.contains(rule) {
                continue;
            }
            match self.netlink.add_rule(rule).await {
                Ok(()) => changes.items.push(format!("added rule \"{rule}\" priority {}", rule.priority)),
                Err(e) if e.is_exists() => {}
                Err(e) if rule.ipv6 && e.errno() == Some(EAFNOSUPPORT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(changes)
    }

    async fn remove_rules(&self) -> Result<usize, HostNetworkError> {
        let mut removed = 0;
        for v6 in [false, true] {
            let rules = match self.netlink.rules(v6).await {
                Ok(r) => r,
                Err(e) if v6 && e.errno() == Some(EAFNOSUPPORT) => continue,
                Err(e) => return Err(e.into()),
            };
            for (have, msg) in rules {
                if have.protocol == Some(OWN_PROTOCOL) && self.netlink.delete_rule(msg).await? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    async fn ensure_unreachable(&self, nets: &[IpNetwork]) -> Result<Changes, HostNetworkError> {
        let mut changes = Changes::default();
        let have = self.own_unreachable().await?;
        for net in have.iter().filter(|h| !nets.contains(h)) {
            if self.netlink.delete_route(&unreachable(*net)).await? {
                changes.items.push(format!("removed route unreachable {net}"));
            }
        }
        for net in nets.iter().filter(|n| !have.contains(n)) {
            match self.netlink.create_route(&unreachable(*net)).await {
                Ok(()) => changes.items.push(format!("added route unreachable {net}")),
                Err(e) if e.is_exists() => {
                    let owner = self
                        .netlink
                        .routes(net.is_ipv6())
                        .await?
                        .into_iter()
                        .find(|r| r.dst == *net && r.table == TABLE_MAIN)
                        .map(|r| format!("{:?} route, proto {}", r.kind, r.protocol))
                        .unwrap_or_else(|| "a route".into());
                    return Err(HostNetworkError::Conflict(format!(
                        "the main table already has {owner} to {net}, which is not HeadCNI's: left as it is, so \
                         traffic to unassigned addresses of the pod CIDR follows it"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(changes)
    }

    async fn remove_unreachable(&self) -> Result<usize, HostNetworkError> {
        let mut removed = 0;
        for net in self.own_unreachable().await? {
            if self.netlink.delete_route(&unreachable(net)).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn ensure_guard(&self) -> Result<Changes, HostNetworkError> {
        let mut changes = Changes::default();
        if !self.with_nft(podguard::intact)? {
            self.with_nft(|nft| nft.replace_guard(&podguard::spec()))?;
            changes.items.push(format!("put the anti-spoofing guard (nft table inet {}) in place", podguard::TABLE));
        }
        Ok(changes)
    }

    async fn remove_guard(&self) -> Result<bool, HostNetworkError> {
        Ok(self.with_nft(podguard::remove)?)
    }

    async fn ensure_masquerade(&self, specs: &[MasqueradeSpec]) -> Result<Changes, HostNetworkError> {
        let mut changes = Changes::default();
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for family in [NftFamily::Ipv4, NftFamily::Ipv6] {
            match specs.iter().find(|s| s.family == family) {
                Some(spec) => {
                    let current = applied.get(&family) == Some(spec);
                    let exists = self.with_nft(|nft| nft.table_exists(family, TABLE))?;
                    if current && exists {
                        continue;
                    }
                    self.with_nft(|nft| nft.replace_masquerade(spec))?;
                    applied.insert(family, spec.clone());
                    changes.items.push(format!(
                        "{} nft table {family} {TABLE} (masquerade {} except to {})",
                        if exists { "replaced" } else { "created" },
                        join(&spec.sources),
                        join(&spec.exempt_destinations)
                    ));
                }
                None => {
                    applied.remove(&family);
                    if self.with_nft(|nft| nft.delete_table(family, TABLE))? {
                        changes.items.push(format!("removed nft table {family} {TABLE}"));
                    }
                }
            }
        }
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
        Ok(changes)
    }

    async fn remove_masquerade(&self) -> Result<usize, HostNetworkError> {
        let mut removed = 0;
        for family in [NftFamily::Ipv4, NftFamily::Ipv6] {
            if self.with_nft(|nft| nft.delete_table(family, TABLE))? {
                removed += 1;
            }
        }
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(removed)
    }

    async fn tailnet_link(&self, tailscale_ips: &[IpAddr]) -> Result<Option<(String, u32)>, HostNetworkError> {
        if !tailscale_ips.is_empty() {
            let addrs = self.netlink.all_addresses().await?;
            if let Some((index, _)) = addrs.iter().find(|(_, a)| tailscale_ips.contains(&a.ip()))
                && let Some(link) = self.netlink.link_by_index(*index).await?
            {
                return Ok(Some((link.name, link.mtu)));
            }
        }
        Ok(self.netlink.link(DEFAULT_TUN).await?.map(|l| (l.name, l.mtu)))
    }

    async fn announce_tailnet_addresses(
        &self,
        tailscale_ips: &[IpAddr],
        done: Option<u32>,
    ) -> Result<Option<u32>, HostNetworkError> {
        let addrs = self.netlink.all_addresses().await?;
        let Some(index) = addrs.iter().find(|(_, a)| tailscale_ips.contains(&a.ip())).map(|(i, _)| *i) else {
            return Ok(None);
        };
        if done == Some(index) {
            return Ok(Some(index));
        }
        let mut nudge = RouteSpec::new(IpNetwork::from(IpAddr::V4(LINK_MONITOR_NUDGE)));
        nudge.kind = RouteKind::Unreachable;
        nudge.table = LINK_MONITOR_TABLE;
        nudge.protocol = OWN_PROTOCOL;
        self.netlink.add_route(&nudge).await?;
        self.netlink.delete_route(&nudge).await?;
        Ok(Some(index))
    }
}

/// HeadCNI's `unreachable` route to `net` in the main table.
fn unreachable(net: IpNetwork) -> RouteSpec {
    let mut r = RouteSpec::new(net);
    r.kind = RouteKind::Unreachable;
    r.protocol = OWN_PROTOCOL;
    r
}

pub fn join(nets: &[IpNetwork]) -> String {
    if nets.is_empty() {
        return "-".into();
    }
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn masquerade_exemptions_are_minimal_and_per_family() {
        let specs = masquerade_specs(
            &nets(&["10.244.1.0/24", "fd00:10:244:1::/64"]),
            &nets(&["10.244.0.0/16", "10.244.2.0/24", "10.96.0.0/12", "fd00:10:244::/56"]),
        );
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].family, NftFamily::Ipv4);
        assert_eq!(specs[0].sources, nets(&["10.244.1.0/24"]));
        // 10.244.2.0/24 and the own CIDR are inside 10.244.0.0/16: not repeated.
        assert_eq!(specs[0].exempt_destinations, nets(&["100.64.0.0/10", "10.96.0.0/12", "10.244.0.0/16"]));
        assert_eq!(specs[1].exempt_destinations, nets(&["fd7a:115c:a1e0::/48", "fd00:10:244::/56"]));
        // No IPv6 pod CIDR: no ip6 table.
        assert_eq!(masquerade_specs(&nets(&["10.244.1.0/24"]), &[]).len(), 1);
    }

    #[test]
    fn coverage() {
        let a: IpNetwork = "10.0.0.0/8".parse().unwrap();
        let b: IpNetwork = "10.1.0.0/16".parse().unwrap();
        let c: IpNetwork = "fd00::/8".parse().unwrap();
        assert!(covers(&a, &b) && !covers(&b, &a));
        assert!(crate::cidr::overlaps(&b, &a) && !crate::cidr::overlaps(&a, &c));
        assert_eq!(tailnet_ranges()[0].to_string(), TAILNET_V4);
        assert_eq!(tailnet_ranges()[1].to_string(), TAILNET_V6);
    }
}
