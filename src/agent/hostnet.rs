//! The node's data plane as the agent keeps it: IP forwarding, a policy rule per pod CIDR that
//! keeps traffic to local pods in the main table ahead of Tailscale's table 52, an nf_tables
//! masquerade table per address family for pod traffic leaving the cluster, and the tailnet
//! interface's MTU. Everything goes through [`crate::netlink`]; a handle is bound to one
//! namespace (the host's in production, a test namespace in tests).
//!
//! Ownership: rules carry HeadCNI's protocol number ([`RULE_PROTOCOL`]) and the nf_tables tables
//! are named [`TABLE`]; nothing else on the node is ever changed or removed.

use crate::cidr::covers;
use crate::netlink::nft::{MasqueradeSpec, Nft, NftError, NftFamily};
use crate::netlink::sysctl::SysctlRoot;
use crate::netlink::{Netlink, NetlinkError, Netns, RuleSpec, TABLE_MAIN};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

/// Protocol number on HeadCNI's policy rules (`ip rule` shows "proto 104").
pub const RULE_PROTOCOL: u8 = 104;
/// Default rule priority: ahead of Tailscale's rules at 5210-5270.
pub const DEFAULT_RULE_PRIORITY: u32 = 5200;
/// Tailscale's first rule; HeadCNI's must come before it.
pub const TAILSCALE_FIRST_RULE: u32 = 5210;
/// Name of HeadCNI's nf_tables tables (`ip headcni`, `ip6 headcni`).
pub const TABLE: &str = "headcni";
pub const CHAIN: &str = "postrouting";
/// Tailscale's address ranges: never masqueraded, never pod CIDRs.
pub const TAILNET_V4: &str = "100.64.0.0/10";
pub const TAILNET_V6: &str = "fd7a:115c:a1e0::/48";
/// The default name of tailscaled's interface.
pub const DEFAULT_TUN: &str = "tailscale0";

pub const SYSCTL_FORWARD_V4: &str = "ipv4/ip_forward";
pub const SYSCTL_FORWARD_V6: &str = "ipv6/conf/all/forwarding";

#[derive(Debug, thiserror::Error)]
pub enum HostNetworkError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("sysctl net/{key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
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

/// The masquerade tables for these pod CIDRs: one per family that has a pod CIDR. Exempt are
/// the cluster, service, own and peer pod CIDRs and the tailnet ranges of that family.
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
    /// Makes HeadCNI's rules exactly "to <pod CIDR> lookup main" at `priority`.
    fn ensure_rules(
        &self,
        pod_cidrs: &[IpNetwork],
        priority: u32,
    ) -> impl Future<Output = Result<Changes, HostNetworkError>> + Send;
    /// Removes every rule HeadCNI owns; answers how many.
    fn remove_rules(&self) -> impl Future<Output = Result<usize, HostNetworkError>> + Send;
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
            out.extend(
                self.netlink.rules(v6).await?.into_iter().map(|(s, _)| s).filter(|s| s.protocol == Some(RULE_PROTOCOL)),
            );
        }
        Ok(out)
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

    async fn ensure_rules(&self, pod_cidrs: &[IpNetwork], priority: u32) -> Result<Changes, HostNetworkError> {
        let mut changes = Changes::default();
        let want: Vec<RuleSpec> = pod_cidrs
            .iter()
            .map(|dst| RuleSpec { dst: *dst, table: TABLE_MAIN, priority, protocol: Some(RULE_PROTOCOL) })
            .collect();
        for v6 in [false, true] {
            for (have, msg) in self.netlink.rules(v6).await? {
                if have.protocol != Some(RULE_PROTOCOL) {
                    continue;
                }
                if !want.contains(&have) {
                    self.netlink.delete_rule(msg).await?;
                    changes.items.push(format!("removed rule to {} lookup main priority {}", have.dst, have.priority));
                }
            }
        }
        let now = self.own_rules().await?;
        for rule in want {
            if now.contains(&rule) {
                continue;
            }
            match self.netlink.add_rule(&rule).await {
                Ok(()) => {
                    changes.items.push(format!("added rule to {} lookup main priority {}", rule.dst, rule.priority))
                }
                Err(e) if e.is_exists() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(changes)
    }

    async fn remove_rules(&self) -> Result<usize, HostNetworkError> {
        let mut removed = 0;
        for v6 in [false, true] {
            for (have, msg) in self.netlink.rules(v6).await? {
                if have.protocol == Some(RULE_PROTOCOL) && self.netlink.delete_rule(msg).await? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
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
