//! The kernel's network configuration: the only module that talks rtnetlink (links, addresses,
//! routes, policy rules), nf_tables, network namespaces and net sysctls.
//!
//! Callers that configure a namespace receive a [`Netlink`] handle already bound to it
//! ([`Netlink::connect_in`]) and never switch namespaces themselves.

pub mod netns;
pub mod nft;
pub mod sysctl;

pub use netns::Netns;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The main routing table.
pub const TABLE_MAIN: u32 = 254;

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("network namespace {path}: {source}")]
    Netns { path: String, source: io::Error },
    #[error("opening a netlink socket: {0}")]
    Connect(io::Error),
    #[error("{op}: {source}")]
    Request { op: String, source: rtnetlink::Error },
    #[error("{op}: {source}")]
    Io { op: String, source: io::Error },
}

impl NetlinkError {
    /// The errno the kernel answered with, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request { source: rtnetlink::Error::NetlinkError(msg), .. } => msg.code.map(|c| -c.get()),
            Self::Io { source, .. } | Self::Netns { source, .. } | Self::Connect(source) => source.raw_os_error(),
            _ => None,
        }
    }

    /// The object was already gone: what best-effort teardown treats as success.
    pub fn is_gone(&self) -> bool {
        matches!(self.errno(), Some(ENODEV | ESRCH | EADDRNOTAVAIL | ENOENT))
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(EEXIST)
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn req_err(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

/// A network interface as seen in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<String>,
    pub up: bool,
    pub kind: Option<String>,
    /// For a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    pub alias: Option<String>,
}

impl Link {
    fn from_message(msg: &rtnetlink::packet_route::link::LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            peer_index: None,
            alias: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Address(a) if a.len() == 6 => link.mac = Some(format_mac(a)),
                LinkAttribute::Link(i) => link.peer_index = Some(*i),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Flags for an address.
#[derive(Debug, Clone, Copy, Default)]
pub struct AddressOptions {
    /// Skip duplicate address detection (IPv6): the address is usable at once.
    pub nodad: bool,
    /// Do not create the connected-subnet route for the prefix.
    pub noprefixroute: bool,
}

/// The scope of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
    Universe,
    Link,
    Host,
}

/// What a route does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteKind {
    /// Forwards it (through a gateway or out of an interface).
    #[default]
    Unicast,
    /// Refuses it with "network unreachable" (no interface, no gateway).
    Unreachable,
    /// Any other type (local, broadcast, throw, ...), only ever read.
    Other,
}

/// The protocol of the routes HeadCNI's plugin adds (`proto static`).
pub const PROTO_STATIC: u8 = 4;

/// A route to install or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNetwork,
    pub kind: RouteKind,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope: Scope,
    pub onlink: bool,
    pub src: Option<IpAddr>,
    pub table: u32,
    pub mtu: Option<u32>,
    /// Who added the route (`ip route` shows "proto N"): lets an owner find its own.
    pub protocol: u8,
}

impl RouteSpec {
    pub fn new(dst: IpNetwork) -> Self {
        Self {
            dst,
            kind: RouteKind::Unicast,
            gateway: None,
            oif: None,
            scope: Scope::Universe,
            onlink: false,
            src: None,
            table: TABLE_MAIN,
            mtu: None,
            protocol: PROTO_STATIC,
        }
    }
}

/// A route found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: IpNetwork,
    pub kind: RouteKind,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub table: u32,
    pub scope: Scope,
    pub protocol: u8,
}

/// What a policy rule does with a packet it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleTarget {
    /// Look the destination up in this table (and go on with the next rule if it has no route).
    Table(u32),
    /// Go on with the rule at this priority, skipping those in between.
    Goto(u32),
}

/// A policy routing rule of the shapes HeadCNI uses:
/// `[to DST] [fwmark M/MASK] (lookup TABLE [suppress_prefixlength N] | goto P) priority P [proto X]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub ipv6: bool,
    /// `None`: every destination.
    pub dst: Option<IpNetwork>,
    /// (mark, mask) the rule matches on.
    pub fwmark: Option<(u32, u32)>,
    pub target: RuleTarget,
    /// Ignore a route found in the table whose prefix is this long or shorter (0: a default
    /// route), so that the lookup falls through to the next rule.
    pub suppress_prefixlen: Option<u32>,
    pub priority: u32,
    /// The rule's originator (FRA_PROTOCOL, Linux 4.17+): lets an owner find its own rules.
    pub protocol: Option<u8>,
}

impl RuleSpec {
    /// "to `dst` lookup `table` priority `priority`".
    pub fn to(dst: IpNetwork, table: u32, priority: u32) -> Self {
        Self {
            ipv6: dst.is_ipv6(),
            dst: Some(dst),
            fwmark: None,
            target: RuleTarget::Table(table),
            suppress_prefixlen: None,
            priority,
            protocol: None,
        }
    }

    /// The table the rule looks up, if it does.
    pub fn table(&self) -> Option<u32> {
        match self.target {
            RuleTarget::Table(t) => Some(t),
            RuleTarget::Goto(_) => None,
        }
    }
}

impl std::fmt::Display for RuleSpec {
    /// As `ip rule` prints it, without the priority and the protocol.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("from all ")?;
        if let Some(dst) = self.dst {
            write!(f, "to {dst} ")?;
        }
        if let Some((mark, mask)) = self.fwmark {
            write!(f, "fwmark {mark:#x}/{mask:#x} ")?;
        }
        match self.target {
            RuleTarget::Table(TABLE_MAIN) => f.write_str("lookup main")?,
            RuleTarget::Table(t) => write!(f, "lookup {t}")?,
            RuleTarget::Goto(p) => write!(f, "goto {p}")?,
        }
        if let Some(n) = self.suppress_prefixlen {
            write!(f, " suppress_prefixlength {n}")?;
        }
        Ok(())
    }
}

/// An rtnetlink connection bound to one network namespace.
pub struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// Connects in the calling thread's namespace. Must run inside a tokio runtime.
    pub fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        Ok(Self { handle, connection: tokio::spawn(conn) })
    }

    /// Connects in `ns`: the socket is created on a helper thread inside `ns` and then serves
    /// that namespace from any thread. Must run inside a tokio runtime.
    pub fn connect_in(ns: &Netns) -> Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let conn = ns
            .run(move || {
                let _guard = runtime.enter();
                rtnetlink::new_connection()
            })
            .map_err(|source| NetlinkError::Netns { path: ns.path().display().to_string(), source })?
            .map_err(NetlinkError::Connect)?;
        let (conn, handle, _) = conn;
        Ok(Self { handle, connection: tokio::spawn(conn) })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut stream = self.handle.link().get().match_name(name).execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg.map(|m| Link::from_message(&m))),
            Err(e) => {
                let err = req_err(format!("looking up link {name}"))(e);
                if err.is_gone() { Ok(None) } else { Err(err) }
            }
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg.map(|m| Link::from_message(&m))),
            Err(e) => {
                let err = req_err(format!("looking up link {index}"))(e);
                if err.is_gone() { Ok(None) } else { Err(err) }
            }
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<_> = self.handle.link().get().execute().try_collect().await.map_err(req_err("listing links"))?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// Creates a veth pair from this namespace: `name` stays here and `peer_name` is created
    /// directly in `peer_ns`, so neither end ever appears in the wrong namespace.
    pub async fn create_veth(&self, name: &str, peer_name: &str, mtu: u32, peer_ns: &Netns) -> Result<()> {
        let peer = LinkUnspec::new_with_name(peer_name).mtu(mtu).setns_by_fd(peer_ns.raw_fd());
        let msg = LinkMessageBuilder::<rtnetlink::LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
            .build();
        self.handle.link().add(msg).execute().await.map_err(req_err(format!("creating veth {name}/{peer_name}")))
    }

    /// Sets a link up, and its alias (IFLA_IFALIAS) when given.
    pub async fn set_up(&self, index: u32, alias: Option<&str>) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(index).up();
        if let Some(alias) = alias {
            msg = msg.alias(alias);
        }
        self.handle.link().set(msg.build()).execute().await.map_err(req_err(format!("setting link {index} up")))
    }

    /// Sets a link's interface group (`ip link set DEV group N`).
    pub async fn set_group(&self, index: u32, group: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).link_group(group).build();
        self.handle.link().set(msg).execute().await.map_err(req_err(format!("setting the group of link {index}")))
    }

    /// Deletes a link; answers whether it existed.
    pub async fn delete_link(&self, index: u32) -> Result<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = req_err(format!("deleting link {index}"))(e);
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }

    /// Adds (or replaces) an address.
    pub async fn add_address(&self, index: u32, addr: IpNetwork, opts: AddressOptions) -> Result<()> {
        let mut req = self.handle.address().add(index, addr.ip(), addr.prefix()).replace();
        let mut flags = AddressFlags::empty();
        if opts.nodad {
            flags |= AddressFlags::Nodad;
        }
        if opts.noprefixroute {
            flags |= AddressFlags::Noprefixroute;
        }
        if !flags.is_empty() {
            req.message_mut().attributes.push(AddressAttribute::Flags(flags));
        }
        req.execute().await.map_err(req_err(format!("adding address {addr} to link {index}")))
    }

    /// The addresses on a link (both families).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNetwork>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req_err(format!("listing addresses of link {index}")))?;
        Ok(msgs.iter().filter_map(address_of).collect())
    }

    /// Every address in the namespace with the index of its link (both families).
    pub async fn all_addresses(&self) -> Result<Vec<(u32, IpNetwork)>> {
        let msgs: Vec<_> =
            self.handle.address().get().execute().try_collect().await.map_err(req_err("listing addresses"))?;
        Ok(msgs.iter().filter_map(|m| address_of(m).map(|ip| (m.header.index, ip))).collect())
    }

    fn route_message(spec: &RouteSpec) -> Result<RouteMessage> {
        // The builder refuses a gateway or source of the other family than the destination.
        let invalid = |e: &dyn std::fmt::Display| NetlinkError::Io {
            op: format!("route to {}", spec.dst),
            source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(spec.dst.ip(), spec.dst.prefix())
            .map_err(|e| invalid(&e))?;
        if let Some(gw) = spec.gateway {
            b = b.gateway(gw).map_err(|e| invalid(&e))?;
        }
        if let Some(src) = spec.src {
            b = b.pref_source(src).map_err(|e| invalid(&e))?;
        }
        let mut msg = finish_route(b, spec);
        if let Some(mtu) = spec.mtu {
            msg.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        Ok(msg)
    }

    /// Adds a route, replacing one with the same destination.
    pub async fn add_route(&self, spec: &RouteSpec) -> Result<()> {
        let msg = Self::route_message(spec)?;
        self.handle.route().add(msg).replace().execute().await.map_err(req_err(format!("adding route to {}", spec.dst)))
    }

    /// Adds a route only if none to the same destination exists in its table: the kernel
    /// answers EEXIST ([`NetlinkError::is_exists`]) and nothing changes.
    pub async fn create_route(&self, spec: &RouteSpec) -> Result<()> {
        let msg = Self::route_message(spec)?;
        self.handle.route().add(msg).execute().await.map_err(req_err(format!("adding route to {}", spec.dst)))
    }

    /// Adds a permanent neighbour entry: `ip` on link `index` is at `mac`, without ARP or
    /// neighbour discovery (replacing an entry for the same address).
    pub async fn add_permanent_neighbour(&self, index: u32, ip: IpAddr, mac: &[u8]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(mac)
            .replace()
            .execute()
            .await
            .map_err(req_err(format!("adding neighbour {ip} on link {index}")))
    }

    /// The permanent neighbour entries on link `index`: (address, link-layer address).
    pub async fn permanent_neighbours(&self, index: u32) -> Result<Vec<(IpAddr, String)>> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req_err(format!("listing the neighbours of link {index}")))?;
        let mut out = Vec::new();
        for m in msgs.iter().filter(|m| m.header.ifindex == index && m.header.state == NeighbourState::Permanent) {
            let mut ip = None;
            let mut mac = None;
            for attr in &m.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => ip = Some(IpAddr::V6(*a)),
                    NeighbourAttribute::LinkLayerAddress(l) => mac = Some(format_mac(l)),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((ip, mac));
            }
        }
        Ok(out)
    }

    /// Deletes a route; answers whether it existed.
    pub async fn delete_route(&self, spec: &RouteSpec) -> Result<bool> {
        let msg = Self::route_message(spec)?;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = req_err(format!("deleting route to {}", spec.dst))(e);
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }

    /// Every route of one family, in every table.
    pub async fn routes(&self, ipv6: bool) -> Result<Vec<RouteInfo>> {
        let query = if ipv6 {
            RouteMessageBuilder::<Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new().build()
        };
        let msgs: Vec<_> =
            self.handle.route().get(query).execute().try_collect().await.map_err(req_err("listing routes"))?;
        Ok(msgs.iter().filter_map(route_info).collect())
    }

    /// Policy rules of one family.
    pub async fn rules(&self, ipv6: bool) -> Result<Vec<(RuleSpec, RuleMessage)>> {
        let version = if ipv6 { IpVersion::V6 } else { IpVersion::V4 };
        let msgs: Vec<_> =
            self.handle.rule().get(version).execute().try_collect().await.map_err(req_err("listing rules"))?;
        Ok(msgs.into_iter().filter_map(|m| rule_spec(&m).map(|s| (s, m))).collect())
    }

    /// Adds a rule (exclusively: an identical rule answers EEXIST).
    pub async fn add_rule(&self, rule: &RuleSpec) -> Result<()> {
        let mut req = self.handle.rule().add().priority(rule.priority);
        req = match rule.target {
            RuleTarget::Table(t) => req.table_id(t).action(RuleAction::ToTable),
            RuleTarget::Goto(_) => req.action(RuleAction::Goto),
        };
        let msg = req.message_mut();
        if let RuleTarget::Goto(p) = rule.target {
            // No table: the builder starts with main's.
            msg.header.table = 0;
            msg.attributes.push(RuleAttribute::Goto(p));
        }
        if let Some(proto) = rule.protocol {
            msg.attributes.push(RuleAttribute::Protocol(RouteProtocol::from(proto)));
        }
        if let Some((mark, mask)) = rule.fwmark {
            msg.attributes.push(RuleAttribute::FwMark(mark));
            msg.attributes.push(RuleAttribute::FwMask(mask));
        }
        if let Some(n) = rule.suppress_prefixlen {
            msg.attributes.push(RuleAttribute::SuppressPrefixLen(n));
        }
        let result = match (rule.ipv6, rule.dst) {
            (_, Some(IpNetwork::V4(d))) => req.v4().destination_prefix(d.ip(), d.prefix()).execute().await,
            (_, Some(IpNetwork::V6(d))) => req.v6().destination_prefix(d.ip(), d.prefix()).execute().await,
            (false, None) => req.v4().execute().await,
            (true, None) => req.v6().execute().await,
        };
        result.map_err(req_err(format!("adding rule \"{rule}\" priority {}", rule.priority)))
    }

    /// Deletes a rule found by [`Netlink::rules`]; answers whether it existed.
    pub async fn delete_rule(&self, msg: RuleMessage) -> Result<bool> {
        match self.handle.rule().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = req_err("deleting rule")(e);
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }
}

fn finish_route<T>(b: RouteMessageBuilder<T>, spec: &RouteSpec) -> RouteMessage {
    let mut b = b.table_id(spec.table).protocol(RouteProtocol::from(spec.protocol)).scope(match spec.scope {
        Scope::Universe => RouteScope::Universe,
        Scope::Link => RouteScope::Link,
        Scope::Host => RouteScope::Host,
    });
    b = b.kind(match spec.kind {
        RouteKind::Unreachable => RouteType::Unreachable,
        RouteKind::Unicast | RouteKind::Other => RouteType::Unicast,
    });
    if let Some(oif) = spec.oif {
        b = b.output_interface(oif);
    }
    if spec.onlink {
        b = b.onlink();
    }
    b.build()
}

/// The address (with its prefix length) an address message describes.
fn address_of(msg: &rtnetlink::packet_route::address::AddressMessage) -> Option<IpNetwork> {
    let ip = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })?;
    IpNetwork::new(ip, msg.header.prefix_len).ok()
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn route_info(msg: &RouteMessage) -> Option<RouteInfo> {
    let ipv6 = msg.header.address_family == AddressFamily::Inet6;
    let mut dst_ip = None;
    let mut gateway = None;
    let mut oif = None;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst_ip = ip_of(a),
            RouteAttribute::Gateway(a) => gateway = ip_of(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let unspecified = if ipv6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    let dst = IpNetwork::new(dst_ip.unwrap_or(unspecified), msg.header.destination_prefix_length).ok()?;
    let scope = match msg.header.scope {
        RouteScope::Link => Scope::Link,
        RouteScope::Host => Scope::Host,
        _ => Scope::Universe,
    };
    let kind = match msg.header.kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::Unreachable => RouteKind::Unreachable,
        _ => RouteKind::Other,
    };
    Some(RouteInfo { dst, kind, gateway, oif, table, scope, protocol: u8::from(msg.header.protocol) })
}

/// The rule a message describes, in the shapes [`RuleSpec`] knows: `None` for a rule with a
/// source, an interface, an inverted match or any action but a table lookup or a goto (not
/// HeadCNI's, and never mistaken for one of its shapes).
fn rule_spec(msg: &RuleMessage) -> Option<RuleSpec> {
    if msg.header.src_len != 0 || msg.header.flags.contains(RuleFlags::Invert) {
        return None;
    }
    let mut target = match msg.header.action {
        RuleAction::ToTable => RuleTarget::Table(u32::from(msg.header.table)),
        RuleAction::Goto => RuleTarget::Goto(0),
        _ => return None,
    };
    let mut rule = RuleSpec {
        ipv6: msg.header.family == AddressFamily::Inet6,
        dst: None,
        fwmark: None,
        target,
        suppress_prefixlen: None,
        priority: 0,
        protocol: None,
    };
    let (mut mark, mut mask) = (None, None);
    for attr in &msg.attributes {
        match attr {
            RuleAttribute::Destination(ip) => rule.dst = Some(IpNetwork::new(*ip, msg.header.dst_len).ok()?),
            RuleAttribute::Table(t) => {
                if let RuleTarget::Table(_) = target {
                    target = RuleTarget::Table(*t);
                }
            }
            RuleAttribute::Goto(p) => {
                if let RuleTarget::Goto(_) = target {
                    target = RuleTarget::Goto(*p);
                }
            }
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Protocol(p) => rule.protocol = Some(u8::from(*p)),
            RuleAttribute::FwMark(m) => mark = Some(*m),
            RuleAttribute::FwMask(m) => mask = Some(*m),
            // The kernel reports "none" as all ones.
            RuleAttribute::SuppressPrefixLen(n) if *n != u32::MAX => rule.suppress_prefixlen = Some(*n),
            RuleAttribute::SuppressPrefixLen(_) | RuleAttribute::SuppressIfGroup(_) => {}
            RuleAttribute::Source(_)
            | RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_) => return None,
            _ => {}
        }
    }
    rule.target = target;
    if let Some(mark) = mark {
        rule.fwmark = Some((mark, mask.unwrap_or(u32::MAX)));
    }
    Some(rule)
}
