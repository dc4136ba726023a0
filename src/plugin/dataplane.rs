//! The routed veth data plane (ptp style, no bridge): a veth pair per attachment, the pod's
//! addresses without connected routes, the gateway as an on-link host route in the pod, the
//! gateway address on the host end, and a host route to each pod address. Every function here
//! receives netlink handles already bound to their namespaces.

use crate::cni::{IpConfig, Route};
use crate::netlink::{AddressOptions, Link, Netlink, NetlinkError, Netns, RouteSpec, Scope, sysctl};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("link {0} vanished while being configured")]
    Vanished(String),
    #[error("address {0} has no gateway and none can be derived from its prefix")]
    NoGateway(IpNetwork),
}

const DEFAULT_V4: IpNetwork = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(n) => IpNetwork::V4(n),
    None => panic!("0.0.0.0/0 is a valid network"),
};
const DEFAULT_V6: IpNetwork = match Ipv6Network::new_checked(Ipv6Addr::UNSPECIFIED, 0) {
    Some(n) => IpNetwork::V6(n),
    None => panic!("::/0 is a valid network"),
};

/// Host-side veth name: "hc" and 13 hex digits of a hash of (container id, ifname). It is the
/// same on every call, so DEL and a retried ADD find the link without any saved state.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("hc{:013x}", hash >> 12)
}

/// The alias stored on the host veth, naming its owner: GC deletes links whose attachment is no
/// longer valid, and only those of its own network.
pub fn link_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("headcni:{network}:{container_id}:{ifname}")
}

/// The (network, container id, ifname) of a link alias written by [`link_alias`].
pub fn parse_link_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let rest = alias.strip_prefix("headcni:")?;
    let (network, rest) = rest.split_once(':')?;
    let (cid, ifname) = rest.split_once(':')?;
    Some((network, cid, ifname))
}

/// An address with the gateway the pod routes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddress {
    pub address: IpNetwork,
    pub gateway: IpAddr,
}

impl PodAddress {
    /// Uses the IPAM's gateway, or the first address of the subnet as host-local does.
    pub fn from_ipam(ip: &IpConfig) -> Result<Self, DataplaneError> {
        let gateway = match ip.gateway {
            Some(gw) => gw,
            None => first_host(ip.address).ok_or(DataplaneError::NoGateway(ip.address))?,
        };
        Ok(Self { address: ip.address, gateway })
    }

    fn host_prefix(&self) -> u8 {
        if self.address.is_ipv4() { 32 } else { 128 }
    }

    fn gateway_host(&self) -> IpNetwork {
        IpNetwork::new(self.gateway, self.host_prefix()).unwrap_or(self.address)
    }

    fn pod_host(&self) -> IpNetwork {
        IpNetwork::new(self.address.ip(), self.host_prefix()).unwrap_or(self.address)
    }
}

fn first_host(net: IpNetwork) -> Option<IpAddr> {
    let max_prefix = if net.is_ipv4() { 32 } else { 128 };
    if net.prefix() + 1 >= max_prefix {
        return None;
    }
    match net.network() {
        IpAddr::V4(a) => Some(IpAddr::V4((u32::from(a) + 1).into())),
        IpAddr::V6(a) => Some(IpAddr::V6((u128::from(a) + 1).into())),
    }
}

/// Everything one attachment consists of.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub ifname: String,
    pub host_name: String,
    pub alias: String,
    pub mtu: u32,
    pub addresses: Vec<PodAddress>,
    /// Routes through the gateway of their family (from IPAM, or a default route per family).
    pub routes: Vec<Route>,
}

impl Attachment {
    /// The routes the pod gets: the IPAM's, or a default route for each family it has.
    pub fn effective_routes(addresses: &[PodAddress], ipam_routes: &[Route]) -> Vec<Route> {
        if !ipam_routes.is_empty() {
            return ipam_routes.to_vec();
        }
        let mut routes = Vec::new();
        if addresses.iter().any(|a| a.address.is_ipv4()) {
            routes.push(Route::new(DEFAULT_V4, None));
        }
        if addresses.iter().any(|a| a.address.is_ipv6()) {
            routes.push(Route::new(DEFAULT_V6, None));
        }
        routes
    }

    /// The gateway a route goes through: its own, or the gateway of its address family.
    pub fn gateway_for(&self, route: &Route) -> Option<IpAddr> {
        route
            .gw
            .or_else(|| self.addresses.iter().find(|a| a.address.is_ipv4() == route.dst.is_ipv4()).map(|a| a.gateway))
    }
}

/// The two ends of a created attachment.
#[derive(Debug, Clone)]
pub struct Attached {
    pub host: Link,
    pub pod: Link,
}

/// Turns on forwarding for the families in use (read first: most ADDs change nothing).
pub fn enable_forwarding(addresses: &[PodAddress]) -> Result<(), DataplaneError> {
    let mut keys = Vec::new();
    if addresses.iter().any(|a| a.address.is_ipv4()) {
        keys.push("ipv4/ip_forward");
    }
    if addresses.iter().any(|a| a.address.is_ipv6()) {
        keys.push("ipv6/conf/all/forwarding");
    }
    for key in keys {
        sysctl::ensure(key, "1").map_err(|source| DataplaneError::Sysctl { key: key.into(), source })?;
    }
    Ok(())
}

/// Creates and configures the attachment. On error the caller removes the host veth (which
/// takes the pod end with it).
pub async fn attach(
    host: &Netlink,
    pod: &Netlink,
    host_ns: &Netns,
    pod_ns: &Netns,
    att: &Attachment,
) -> Result<Attached, DataplaneError> {
    pod.create_veth(&att.ifname, &att.host_name, att.mtu, host_ns).await?;
    let pod_link = pod.link(&att.ifname).await?.ok_or_else(|| DataplaneError::Vanished(att.ifname.clone()))?;
    let host_link = host.link(&att.host_name).await?.ok_or_else(|| DataplaneError::Vanished(att.host_name.clone()))?;

    for a in &att.addresses {
        let v6 = a.address.is_ipv6();
        pod.add_address(pod_link.index, a.address, AddressOptions { nodad: v6, noprefixroute: true }).await?;
        host.add_address(host_link.index, a.gateway_host(), AddressOptions { nodad: v6, noprefixroute: true }).await?;
    }
    if att.addresses.iter().any(|a| a.address.is_ipv6()) {
        // Duplicate address detection on the link-local addresses would hold IPv6 traffic
        // for about a second after ADD; on a point-to-point veth there is nothing to detect.
        let host_key = format!("ipv6/conf/{}/accept_dad", att.host_name);
        sysctl::ensure(&host_key, "0").map_err(|source| DataplaneError::Sysctl { key: host_key, source })?;
        let pod_key = format!("ipv6/conf/{}/accept_dad", att.ifname);
        sysctl::SysctlRoot::default()
            .ensure_in(Some(pod_ns), &pod_key, "0")
            .map_err(|source| DataplaneError::Sysctl { key: pod_key.clone(), source })?;
    }
    pod.set_up(pod_link.index, None).await?;
    host.set_up(host_link.index, Some(&att.alias)).await?;

    for a in &att.addresses {
        // The gateway is reachable on the link; everything else goes through it.
        let mut gw_route = RouteSpec::new(a.gateway_host());
        gw_route.oif = Some(pod_link.index);
        gw_route.scope = Scope::Link;
        gw_route.src = Some(a.address.ip());
        pod.add_route(&gw_route).await?;

        let mut to_pod = RouteSpec::new(a.pod_host());
        to_pod.oif = Some(host_link.index);
        to_pod.scope = Scope::Link;
        host.add_route(&to_pod).await?;
    }
    for route in &att.routes {
        let Some(gw) = att.gateway_for(route) else { continue };
        let mut spec = RouteSpec::new(route.dst);
        spec.gateway = Some(gw);
        spec.oif = Some(pod_link.index);
        spec.mtu = route.mtu;
        pod.add_route(&spec).await?;
    }
    Ok(Attached { host: host_link, pod: pod_link })
}

/// Removes the host end (and with it the pod end); answers whether it existed.
pub async fn detach(host: &Netlink, host_name: &str) -> Result<bool, DataplaneError> {
    match host.link(host_name).await? {
        Some(link) => Ok(host.delete_link(link.index).await?),
        None => Ok(false),
    }
}

/// Compares the live attachment with what ADD reported; returns every difference found.
pub async fn check(
    host: &Netlink,
    pod: &Netlink,
    att: &Attachment,
    expected_mac: Option<&str>,
) -> Result<Vec<String>, DataplaneError> {
    let mut problems = Vec::new();
    let Some(pod_link) = pod.link(&att.ifname).await? else {
        problems.push(format!("interface {} is missing from the pod", att.ifname));
        return Ok(problems);
    };
    if pod_link.kind.as_deref() != Some("veth") {
        problems.push(format!("interface {} is a {:?}, not a veth", att.ifname, pod_link.kind));
    }
    if let Some(mac) = expected_mac
        && pod_link.mac.as_deref().map(str::to_ascii_lowercase) != Some(mac.to_ascii_lowercase())
    {
        problems.push(format!("interface {} has MAC {:?}, expected {mac}", att.ifname, pod_link.mac));
    }
    if pod_link.mtu != att.mtu {
        problems.push(format!("interface {} has MTU {}, expected {}", att.ifname, pod_link.mtu, att.mtu));
    }
    if !pod_link.up {
        problems.push(format!("interface {} is down", att.ifname));
    }
    let addrs = pod.addresses(pod_link.index).await?;
    for a in &att.addresses {
        if !addrs.contains(&a.address) {
            problems.push(format!("address {} is missing from {}", a.address, att.ifname));
        }
    }
    let mut pod_routes = pod.routes(false).await?;
    pod_routes.extend(pod.routes(true).await?);
    for route in &att.routes {
        let gw = att.gateway_for(route);
        let found = pod_routes
            .iter()
            .any(|r| r.dst == route.dst && r.table == crate::netlink::TABLE_MAIN && (gw.is_none() || r.gateway == gw));
        if !found {
            problems.push(format!("route to {} via {:?} is missing in the pod", route.dst, gw));
        }
    }

    let Some(host_link) = host.link(&att.host_name).await? else {
        problems.push(format!("host interface {} is missing", att.host_name));
        return Ok(problems);
    };
    if host_link.peer_index != Some(pod_link.index) {
        problems.push(format!("host interface {} is not the peer of {}", att.host_name, att.ifname));
    }
    let mut host_routes = host.routes(false).await?;
    if att.addresses.iter().any(|a| a.address.is_ipv6()) {
        host_routes.extend(host.routes(true).await?);
    }
    for a in &att.addresses {
        let found = host_routes.iter().any(|r| r.dst == a.pod_host() && r.oif == Some(host_link.index));
        if !found {
            problems.push(format!("host route to {} via {} is missing", a.pod_host(), att.host_name));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_distinct_and_short() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
        assert_ne!(a, host_veth_name("0123456789abcdef", "eth1"));
        assert_ne!(a, host_veth_name("0123456789abcdee", "eth0"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(host_veth_name("ab", "c"), host_veth_name("a", "bc"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("hc"));
    }

    #[test]
    fn alias_round_trips() {
        let alias = link_alias("net-1", "abc.def_1", "eth0");
        assert_eq!(parse_link_alias(&alias), Some(("net-1", "abc.def_1", "eth0")));
        assert_eq!(parse_link_alias("something else"), None);
    }

    #[test]
    fn gateway_defaults_to_the_first_address() {
        let ip = IpConfig { address: "10.244.1.7/24".parse().unwrap(), gateway: None, interface: None };
        assert_eq!(PodAddress::from_ipam(&ip).unwrap().gateway, "10.244.1.1".parse::<IpAddr>().unwrap());
        let ip6 = IpConfig { address: "fd00::7/64".parse().unwrap(), gateway: None, interface: None };
        assert_eq!(PodAddress::from_ipam(&ip6).unwrap().gateway, "fd00::1".parse::<IpAddr>().unwrap());
        let host = IpConfig { address: "10.0.0.7/32".parse().unwrap(), gateway: None, interface: None };
        assert!(PodAddress::from_ipam(&host).is_err());
    }

    #[test]
    fn default_routes_per_family_unless_ipam_gives_routes() {
        let addrs = vec![
            PodAddress { address: "10.0.0.2/24".parse().unwrap(), gateway: "10.0.0.1".parse().unwrap() },
            PodAddress { address: "fd00::2/64".parse().unwrap(), gateway: "fd00::1".parse().unwrap() },
        ];
        let routes = Attachment::effective_routes(&addrs, &[]);
        assert_eq!(routes.iter().map(|r| r.dst.to_string()).collect::<Vec<_>>(), ["0.0.0.0/0", "::/0"]);
        let ipam = vec![Route::new("10.96.0.0/12".parse().unwrap(), None)];
        assert_eq!(Attachment::effective_routes(&addrs, &ipam), ipam);
    }
}
