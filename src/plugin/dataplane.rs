//! The plugin's data plane behind one seam: the [`Dataplane`] trait names every kernel operation
//! ADD, DEL, CHECK and GC need, [`KernelDataplane`] does them with netlink handles bound to
//! their namespaces (ptp style, no bridge: a veth pair per attachment, the pod's addresses
//! without connected routes, the link-local gateway as an on-link route and a permanent
//! neighbour entry in the pod, no routable address on the host end, an exclusive host route to
//! each pod address, and the node's anti-spoofing guard), and the unit tests use an in-memory
//! fake (`plugin::fake`). The root tests (tests/plugin_netns.rs) prove the kernel side.

use super::attachment::{Attached, AttachmentSpec, GatewayShape};
use crate::cni::{CniError, code};
use crate::netlink::nft::{Nft, NftError};
use crate::netlink::sysctl::SysctlRoot;
use crate::netlink::{AddressOptions, Netlink, NetlinkError, Netns, RouteSpec, Scope};
use crate::podguard;
use ipnetwork::IpNetwork;
use std::cell::RefCell;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: std::io::Error },
    #[error("link {0} vanished while being configured")]
    Vanished(String),
    #[error("starting the netlink runtime: {0}")]
    Runtime(std::io::Error),
    #[error("opening the host namespace: {0}")]
    HostNamespace(std::io::Error),
    #[error("the anti-spoofing guard (nft table inet headcni-guard): {0}")]
    Guard(NftError),
    #[error("the host already has a route to {dst} ({owner}): nothing was replaced")]
    RouteConflict { dst: IpNetwork, owner: String },
}

impl From<DataplaneError> for CniError {
    fn from(e: DataplaneError) -> Self {
        match e {
            DataplaneError::RouteConflict { .. } => CniError::new(code::ROUTE_CONFLICT, e.to_string()).with_details(
                "two networks (or another plugin) hand out the same addresses on this node: give each its own range",
            ),
            _ => CniError::internal(e.to_string()),
        }
    }
}

/// A link on the host side that carries an alias (GC looks for its own among them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLink {
    pub name: String,
    pub alias: String,
}

/// Every kernel operation of the plugin. The host side is the plugin's own namespace; a pod is
/// opened once per invocation and handed back to the operations on it.
pub trait Dataplane {
    /// An opened pod network namespace.
    type Pod;

    /// Opens CNI_NETNS; refuses a path that is no network namespace, and the plugin's own.
    fn open_pod(&self, netns: &Path) -> Result<Self::Pod, CniError>;
    /// Whether the pod already has an interface of that name.
    fn pod_has_link(&self, pod: &Self::Pod, ifname: &str) -> Result<bool, DataplaneError>;
    /// Turns forwarding on for the families in use (read first: most ADDs change nothing).
    fn enable_forwarding(&self, ipv4: bool, ipv6: bool) -> Result<(), DataplaneError>;
    /// Makes sure the node's anti-spoofing guard exists (cheap when it does); answers whether
    /// it had to be created.
    fn ensure_guard(&self) -> Result<bool, DataplaneError>;
    /// Creates and configures the attachment. On error the caller detaches it.
    fn attach(&self, pod: &Self::Pod, spec: &AttachmentSpec) -> Result<Attached, DataplaneError>;
    /// Removes the host end `host_name` (which takes the pod end with it); answers whether it
    /// existed.
    fn detach(&self, host_name: &str) -> Result<bool, DataplaneError>;
    /// Every difference between the live attachment and `spec` (empty: as ADD made it).
    fn check(
        &self,
        pod: &Self::Pod,
        spec: &AttachmentSpec,
        expected_mac: Option<&str>,
    ) -> Result<Vec<String>, DataplaneError>;
    /// The host's links that carry an alias.
    fn host_links(&self) -> Result<Vec<HostLink>, DataplaneError>;
    /// Ends the invocation's kernel work: what the operations kept open (sockets, a runtime)
    /// is released before the result is written.
    fn close(&self) {}
}

/// The kernel, through netlink. The runtime, the host's namespace and its handle are made on
/// first use (a verb that needs no kernel, STATUS, costs nothing) and dropped by
/// [`Dataplane::close`], before the result is written.
#[derive(Default)]
pub struct KernelDataplane {
    session: RefCell<Option<Session>>,
}

/// What one invocation's kernel work runs on.
struct Session {
    runtime: tokio::runtime::Runtime,
    host_ns: Netns,
    host: Option<Netlink>,
}

impl Session {
    fn start() -> Result<Self, DataplaneError> {
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(DataplaneError::Runtime)?;
        let host_ns = Netns::current().map_err(DataplaneError::HostNamespace)?;
        Ok(Self { runtime, host_ns, host: None })
    }

    /// The runtime, the host's handle (connected on first use) and the host's namespace.
    fn with_host(&mut self) -> Result<(&tokio::runtime::Runtime, &Netlink, &Netns), DataplaneError> {
        if self.host.is_none() {
            let _in_runtime = self.runtime.enter();
            self.host = Some(Netlink::connect()?);
        }
        let host = self.host.as_ref().ok_or_else(|| DataplaneError::Vanished("the host's netlink handle".into()))?;
        Ok((&self.runtime, host, &self.host_ns))
    }
}

/// A pod namespace and a netlink handle bound to it.
pub struct KernelPod {
    ns: Netns,
    netlink: Netlink,
}

impl KernelDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> Result<T, DataplaneError>) -> Result<T, DataplaneError> {
        let mut guard = self.session.borrow_mut();
        let session = match guard.take() {
            Some(s) => guard.insert(s),
            None => guard.insert(Session::start()?),
        };
        f(session)
    }
}

impl Dataplane for KernelDataplane {
    type Pod = KernelPod;

    fn open_pod(&self, netns: &Path) -> Result<KernelPod, CniError> {
        let ns =
            Netns::open(netns).map_err(|e| CniError::invalid_env(format!("CNI_NETNS {}: {e}", netns.display())))?;
        let pod = self.with_session(|s| {
            if matches!((ns.id(), s.host_ns.id()), (Ok(pod), Ok(host)) if pod == host) {
                return Ok(None);
            }
            let _in_runtime = s.runtime.enter();
            Ok(Some(Netlink::connect_in(&ns)?))
        })?;
        match pod {
            Some(netlink) => Ok(KernelPod { ns, netlink }),
            None => Err(CniError::invalid_env("CNI_NETNS is the plugin's own network namespace")),
        }
    }

    fn pod_has_link(&self, pod: &KernelPod, ifname: &str) -> Result<bool, DataplaneError> {
        self.with_session(|s| s.runtime.block_on(async { Ok(pod.netlink.link(ifname).await?.is_some()) }))
    }

    fn enable_forwarding(&self, ipv4: bool, ipv6: bool) -> Result<(), DataplaneError> {
        for (on, key) in [(ipv4, "ipv4/ip_forward"), (ipv6, "ipv6/conf/all/forwarding")] {
            if on {
                SysctlRoot::default()
                    .ensure(key, "1")
                    .map_err(|source| DataplaneError::Sysctl { key: key.into(), source })?;
            }
        }
        Ok(())
    }

    fn ensure_guard(&self) -> Result<bool, DataplaneError> {
        // A socket of its own: nf_tables is not rtnetlink, and this is its only request.
        let mut nft = Nft::connect().map_err(DataplaneError::Guard)?;
        podguard::ensure(&mut nft).map_err(DataplaneError::Guard)
    }

    fn attach(&self, pod: &KernelPod, spec: &AttachmentSpec) -> Result<Attached, DataplaneError> {
        self.with_session(|s| {
            let (runtime, host, host_ns) = s.with_host()?;
            runtime.block_on(attach(host, &pod.netlink, host_ns, &pod.ns, spec))
        })
    }

    fn detach(&self, host_name: &str) -> Result<bool, DataplaneError> {
        self.with_session(|s| {
            let (runtime, host, _) = s.with_host()?;
            runtime.block_on(detach(host, host_name))
        })
    }

    fn check(
        &self,
        pod: &KernelPod,
        spec: &AttachmentSpec,
        expected_mac: Option<&str>,
    ) -> Result<Vec<String>, DataplaneError> {
        self.with_session(|s| {
            let (runtime, host, _) = s.with_host()?;
            runtime.block_on(check(host, &pod.netlink, spec, expected_mac))
        })
    }

    fn host_links(&self) -> Result<Vec<HostLink>, DataplaneError> {
        let links = self.with_session(|s| {
            let (runtime, host, _) = s.with_host()?;
            Ok(runtime.block_on(host.links())?)
        })?;
        Ok(links.into_iter().filter_map(|l| Some(HostLink { alias: l.alias?, name: l.name })).collect())
    }

    fn close(&self) {
        self.session.borrow_mut().take();
    }
}

/// Creates and configures the attachment. On error the caller removes the host veth (which
/// takes the pod end with it).
async fn attach(
    host: &Netlink,
    pod: &Netlink,
    host_ns: &Netns,
    pod_ns: &Netns,
    att: &AttachmentSpec,
) -> Result<Attached, DataplaneError> {
    pod.create_veth(&att.ifname, &att.host_name, att.mtu, host_ns).await?;
    let pod_link = pod.link(&att.ifname).await?.ok_or_else(|| DataplaneError::Vanished(att.ifname.clone()))?;
    let host_link = host.link(&att.host_name).await?.ok_or_else(|| DataplaneError::Vanished(att.host_name.clone()))?;

    if att.addresses.iter().any(|a| a.address.is_ipv6()) {
        // Duplicate address detection on the link-local addresses would hold IPv6 traffic
        // for about a second after ADD; on a point-to-point veth there is nothing to detect.
        let host_key = format!("ipv6/conf/{}/accept_dad", att.host_name);
        SysctlRoot::default()
            .ensure(&host_key, "0")
            .map_err(|source| DataplaneError::Sysctl { key: host_key, source })?;
        let pod_key = format!("ipv6/conf/{}/accept_dad", att.ifname);
        SysctlRoot::default()
            .ensure_in(Some(pod_ns), &pod_key, "0")
            .map_err(|source| DataplaneError::Sysctl { key: pod_key.clone(), source })?;
    }
    // The pod's namespace group (the NetworkPolicy engine's), set before the host end is up.
    if let Some(group) = att.group {
        host.set_group(host_link.index, group).await?;
    }
    // Up (a route needs a link that is up) and named by its alias, which tells whose it is.
    host.set_up(host_link.index, Some(&att.alias)).await?;
    // The host routes next: one that someone else owns ends the ADD before the pod is
    // configured (a route to a pod address is created, never replaced).
    for a in &att.addresses {
        let mut to_pod = RouteSpec::new(a.pod_host());
        to_pod.oif = Some(host_link.index);
        to_pod.scope = Scope::Link;
        match host.create_route(&to_pod).await {
            Ok(()) => {}
            Err(e) if e.is_exists() => {
                return Err(DataplaneError::RouteConflict {
                    dst: a.pod_host(),
                    owner: route_owner(host, a.pod_host()).await,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    for a in &att.addresses {
        let v6 = a.address.is_ipv6();
        pod.add_address(pod_link.index, a.address, AddressOptions { nodad: v6, noprefixroute: true }).await?;
    }
    for addr in att.host_addresses() {
        let v6 = addr.is_ipv6();
        host.add_address(host_link.index, addr, AddressOptions { nodad: v6, noprefixroute: !v6 }).await?;
    }
    pod.set_up(pod_link.index, None).await?;

    let host_mac = host_link.mac.as_deref().and_then(parse_mac);
    for a in &att.addresses {
        if att.shape == GatewayShape::LinkLocal {
            // The gateway needs no ARP or neighbour discovery: the pod knows its MAC address.
            let mac = host_mac.ok_or_else(|| DataplaneError::Vanished(format!("{}'s MAC address", att.host_name)))?;
            pod.add_permanent_neighbour(pod_link.index, a.gateway, &mac).await?;
        }
        if a.address.is_ipv4() {
            // The gateway is reachable on the link; everything else goes through it. (IPv6's
            // link-local prefix is on every link already.)
            let mut gw_route = RouteSpec::new(a.gateway_host());
            gw_route.oif = Some(pod_link.index);
            gw_route.scope = Scope::Link;
            gw_route.src = Some(a.address.ip());
            pod.add_route(&gw_route).await?;
        }
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

/// Who holds the route to `dst` on the host: its interface and, for a pod veth, the
/// attachment its alias names.
async fn route_owner(host: &Netlink, dst: IpNetwork) -> String {
    let Ok(routes) = host.routes(dst.is_ipv6()).await else { return "owner unknown".into() };
    let Some(route) = routes.into_iter().find(|r| r.dst == dst && r.table == crate::netlink::TABLE_MAIN) else {
        return "owner unknown".into();
    };
    let link = match route.oif {
        Some(i) => host.link_by_index(i).await.ok().flatten(),
        None => None,
    };
    match link {
        Some(l) => match l.alias.as_deref().and_then(super::attachment::parse_link_alias) {
            Some((network, cid, ifname)) => {
                format!("dev {}, attachment {cid}/{ifname} of network {network}", l.name)
            }
            None => format!("dev {}", l.name),
        },
        None => format!("proto {}", route.protocol),
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Removes the host end (and with it the pod end); answers whether it existed.
async fn detach(host: &Netlink, host_name: &str) -> Result<bool, DataplaneError> {
    match host.link(host_name).await? {
        Some(link) => Ok(host.delete_link(link.index).await?),
        None => Ok(false),
    }
}

fn is_link_local(net: &IpNetwork) -> bool {
    match net.ip() {
        std::net::IpAddr::V4(a) => a.is_link_local(),
        std::net::IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}

/// Compares the live attachment with what ADD reported; returns every difference found.
async fn check(
    host: &Netlink,
    pod: &Netlink,
    att: &AttachmentSpec,
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
    let neighbours =
        if att.shape == GatewayShape::LinkLocal { pod.permanent_neighbours(pod_link.index).await? } else { Vec::new() };
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
    let host_addrs = host.addresses(host_link.index).await?;
    for want in att.host_addresses() {
        if !host_addrs.contains(&want) {
            problems.push(format!("address {want} is missing from {}", att.host_name));
        }
    }
    if att.shape == GatewayShape::LinkLocal {
        for have in host_addrs.iter().filter(|a| !is_link_local(a)) {
            problems.push(format!("{} holds the routable address {have}", att.host_name));
        }
        let mac = host_link.mac.as_deref().map(str::to_ascii_lowercase);
        for a in &att.addresses {
            if !neighbours.iter().any(|(ip, m)| *ip == a.gateway && Some(m) == mac.as_ref()) {
                problems.push(format!(
                    "the pod has no permanent neighbour entry for its gateway {} at {}'s MAC address",
                    a.gateway, att.host_name
                ));
            }
        }
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
