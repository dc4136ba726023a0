//! What one routed veth attachment is, before any kernel is asked: the names of its host end
//! (stable, so DEL and GC need no saved state), the pod's addresses with their gateways, and the
//! routes the pod gets. Pure: [`super::dataplane`] puts it into the kernel.
//!
//! The pod's gateway is link-local ([`GatewayShape::LinkLocal`]): 169.254.1.1 for IPv4 and
//! fe80::1 for IPv6, on-link, resolved by a permanent neighbour entry in the pod that points at
//! the host end's MAC address. The host end carries no routable address (only fe80::1 when the
//! pod has IPv6): tailscaled treats an interface that comes or goes with a routable address as
//! a major link change and rebinds, so pod churn would disturb the tailnet; and a gateway
//! address inside the pod CIDR would make the node answer on it to the whole tailnet.
//! Attachments made by earlier versions ([`GatewayShape::Legacy`]: the host end holds the
//! IPAM's gateway, e.g. 10.244.1.1/32) are still recognised by CHECK and removed by DEL.

use crate::cni::{CniError, IpConfig, Route};
use crate::netlink::Link;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const DEFAULT_V4: IpNetwork = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(n) => IpNetwork::V4(n),
    None => panic!("0.0.0.0/0 is a valid network"),
};
const DEFAULT_V6: IpNetwork = match Ipv6Network::new_checked(Ipv6Addr::UNSPECIFIED, 0) {
    Some(n) => IpNetwork::V6(n),
    None => panic!("::/0 is a valid network"),
};

/// The pod's IPv4 gateway.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 gateway (also the host end's address, on-link only).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The link-local gateway of `address`'s family.
pub fn link_local_gateway(address: IpAddr) -> IpAddr {
    if address.is_ipv4() { IpAddr::V4(GATEWAY_V4) } else { IpAddr::V6(GATEWAY_V6) }
}

/// How the pod reaches its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayShape {
    /// The gateway is link-local and the host end has no routable address (this version).
    LinkLocal,
    /// The host end holds the IPAM's gateway as a /32 (/128) and the pod routes through it
    /// (earlier versions; only CHECK and DEL meet it).
    Legacy,
}

/// Host-side veth name: "hc" and 13 hex digits of a hash of (container id, ifname). It is the
/// same on every call, so DEL and a retried ADD find the link without any saved state.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}{:013x}", crate::podguard::VETH_PREFIX, hash >> 12)
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
    /// An address the IPAM handed out: its gateway is the link-local one, whatever gateway the
    /// IPAM names (that one stays reserved in the IPAM's range and is never given to a pod).
    pub fn from_ipam(ip: &IpConfig) -> Self {
        Self { address: ip.address, gateway: link_local_gateway(ip.address.ip()) }
    }

    /// An address of a previous result (CHECK): its gateway as the result names it, or, for a
    /// result without one, the first address of the subnet as host-local does.
    pub fn from_result(ip: &IpConfig) -> Result<Self, CniError> {
        let gateway = match ip.gateway {
            Some(gw) => gw,
            None => first_host(ip.address).ok_or_else(|| {
                CniError::internal(format!(
                    "address {} has no gateway and none can be derived from its prefix",
                    ip.address
                ))
            })?,
        };
        Ok(Self { address: ip.address, gateway })
    }

    fn host_prefix(&self) -> u8 {
        if self.address.is_ipv4() { 32 } else { 128 }
    }

    pub fn gateway_host(&self) -> IpNetwork {
        IpNetwork::new(self.gateway, self.host_prefix()).unwrap_or(self.address)
    }

    pub fn pod_host(&self) -> IpNetwork {
        IpNetwork::new(self.address.ip(), self.host_prefix()).unwrap_or(self.address)
    }
}

/// The shape of the attachment whose addresses these are: link-local when every gateway is.
pub fn shape_of(addresses: &[PodAddress]) -> GatewayShape {
    if addresses.iter().all(|a| a.gateway == link_local_gateway(a.address.ip())) {
        GatewayShape::LinkLocal
    } else {
        GatewayShape::Legacy
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

/// Everything one attachment consists of: what ADD creates and CHECK compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentSpec {
    pub ifname: String,
    pub host_name: String,
    pub alias: String,
    pub mtu: u32,
    pub shape: GatewayShape,
    pub addresses: Vec<PodAddress>,
    /// Routes through the gateway of their family (from IPAM, or a default route per family).
    pub routes: Vec<Route>,
    /// The interface group of the host end: the pod's namespace ([`crate::podgroup`]), set
    /// before the link goes up when `enable_network_policy` is on, so that the policy engine
    /// holds the pod to its namespace's rules before it knows the pod's addresses.
    pub group: Option<u32>,
}

impl AttachmentSpec {
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

    /// The gateway a route goes through. Link-local shape: the gateway of the route's family,
    /// whatever gateway the IPAM named for it (every route leaves the pod through the host
    /// end). Legacy shape: the route's own, else the gateway of its family.
    pub fn gateway_for(&self, route: &Route) -> Option<IpAddr> {
        let family = || self.addresses.iter().find(|a| a.address.is_ipv4() == route.dst.is_ipv4()).map(|a| a.gateway);
        match self.shape {
            GatewayShape::LinkLocal => family(),
            GatewayShape::Legacy => route.gw.or_else(family),
        }
    }

    /// The addresses the host end holds: the IPv6 link-local gateway (link-local shape, a pod
    /// with IPv6), or every gateway as a host address (legacy shape).
    pub fn host_addresses(&self) -> Vec<IpNetwork> {
        match self.shape {
            GatewayShape::LinkLocal => self
                .addresses
                .iter()
                .filter(|a| a.address.is_ipv6())
                .take(1)
                .filter_map(|_| IpNetwork::new(IpAddr::V6(GATEWAY_V6), 64).ok())
                .collect(),
            GatewayShape::Legacy => self.addresses.iter().map(PodAddress::gateway_host).collect(),
        }
    }
}

/// The two ends of a created attachment.
#[derive(Debug, Clone)]
pub struct Attached {
    pub host: Link,
    pub pod: Link,
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
    fn the_gateway_is_link_local_whatever_the_ipam_says() {
        let ip = IpConfig { address: "10.244.1.7/24".parse().unwrap(), gateway: None, interface: None };
        assert_eq!(PodAddress::from_ipam(&ip).gateway, IpAddr::V4(GATEWAY_V4));
        let ip = IpConfig {
            address: "10.244.1.7/24".parse().unwrap(),
            gateway: Some("10.244.1.1".parse().unwrap()),
            interface: None,
        };
        assert_eq!(PodAddress::from_ipam(&ip).gateway, IpAddr::V4(GATEWAY_V4));
        let ip6 = IpConfig { address: "fd00::7/64".parse().unwrap(), gateway: None, interface: None };
        assert_eq!(PodAddress::from_ipam(&ip6).gateway, IpAddr::V6(GATEWAY_V6));
    }

    #[test]
    fn a_previous_result_tells_the_shape() {
        let new = [PodAddress::from_result(&IpConfig {
            address: "10.244.1.7/24".parse().unwrap(),
            gateway: Some("169.254.1.1".parse().unwrap()),
            interface: None,
        })
        .unwrap()];
        assert_eq!(shape_of(&new), GatewayShape::LinkLocal);
        let old = [PodAddress::from_result(&IpConfig {
            address: "10.244.1.7/24".parse().unwrap(),
            gateway: Some("10.244.1.1".parse().unwrap()),
            interface: None,
        })
        .unwrap()];
        assert_eq!(shape_of(&old), GatewayShape::Legacy);
        // A result without a gateway: host-local's default, the first address.
        let bare = IpConfig { address: "10.244.1.7/24".parse().unwrap(), gateway: None, interface: None };
        assert_eq!(PodAddress::from_result(&bare).unwrap().gateway, "10.244.1.1".parse::<IpAddr>().unwrap());
        let host = IpConfig { address: "10.0.0.7/32".parse().unwrap(), gateway: None, interface: None };
        assert!(PodAddress::from_result(&host).is_err());
    }

    fn spec(shape: GatewayShape, addresses: Vec<PodAddress>, routes: Vec<Route>) -> AttachmentSpec {
        AttachmentSpec {
            group: None,
            ifname: "eth0".into(),
            host_name: "hcx".into(),
            alias: "a".into(),
            mtu: 1280,
            shape,
            addresses,
            routes,
        }
    }

    #[test]
    fn every_route_goes_through_the_link_local_gateway_of_its_family() {
        let addrs = vec![
            PodAddress { address: "10.0.0.2/24".parse().unwrap(), gateway: IpAddr::V4(GATEWAY_V4) },
            PodAddress { address: "fd00::2/64".parse().unwrap(), gateway: IpAddr::V6(GATEWAY_V6) },
        ];
        let routes = AttachmentSpec::effective_routes(&addrs, &[]);
        assert_eq!(routes.iter().map(|r| r.dst.to_string()).collect::<Vec<_>>(), ["0.0.0.0/0", "::/0"]);
        let ipam = vec![Route::new("10.96.0.0/12".parse().unwrap(), Some("10.0.0.1".parse().unwrap()))];
        assert_eq!(AttachmentSpec::effective_routes(&addrs, &ipam), ipam);
        let s = spec(GatewayShape::LinkLocal, addrs.clone(), ipam.clone());
        assert_eq!(s.gateway_for(&ipam[0]), Some(IpAddr::V4(GATEWAY_V4)), "the IPAM's gw is not used");
        assert_eq!(s.host_addresses(), vec!["fe80::1/64".parse::<IpNetwork>().unwrap()], "no IPv4 address");
        let v4only = spec(GatewayShape::LinkLocal, addrs[..1].to_vec(), vec![]);
        assert!(v4only.host_addresses().is_empty());

        let legacy = vec![PodAddress { address: "10.0.0.2/24".parse().unwrap(), gateway: "10.0.0.1".parse().unwrap() }];
        let s = spec(GatewayShape::Legacy, legacy, ipam.clone());
        assert_eq!(s.gateway_for(&ipam[0]), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(s.host_addresses(), vec!["10.0.0.1/32".parse::<IpNetwork>().unwrap()]);
    }
}
