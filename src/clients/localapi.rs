//! tailscaled's LocalAPI over its unix socket: status, prefs (read and masked edit), the
//! zero-config join (start with an auth key, then login), the packet filter Headscale sent this
//! node ([`FilterRule`]), and the IPN bus (its stream of change notifications,
//! [`SocketLocalApi::watch_bus`]).
//!
//! Requests carry `Host: local-tailscaled.sock` and never an Origin or Referer (tailscaled
//! refuses those). The `Sec-Tailscale: localapi` header is only checked by the loopback TCP form
//! of the LocalAPI (tsnet), not on the unix socket, so it is not sent. Writes need root or
//! tailscaled's operator user; tailscaled answers 403 otherwise.

use super::http::{ClientError, Endpoint, HttpRequest, StreamingResponse};
use super::secret::Secret;
use hyper::{Method, StatusCode};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Host header tailscaled expects on its socket.
pub const LOCALAPI_HOST: &str = "local-tailscaled.sock";
pub const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";

#[derive(Debug, thiserror::Error)]
pub enum TailscaleError {
    #[error("tailscaled is not reachable at {socket}: {source}")]
    Unreachable { socket: PathBuf, source: ClientError },
    #[error("tailscaled refused {what} (403 {msg}): the agent must run as root or as tailscaled's operator")]
    Forbidden { what: String, msg: String },
    #[error("tailscaled answered {what} with {status}: {msg}")]
    Status { what: String, status: StatusCode, msg: String },
    #[error("tailscaled: {0}")]
    Client(ClientError),
    #[error("tailscaled sent an unexpected answer to {what}: {source}")]
    Decode { what: String, source: serde_json::Error },
}

impl TailscaleError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// The backend states tailscaled reports.
pub const BACKEND_STATES: &[&str] = &["NoState", "NeedsLogin", "NeedsMachineAuth", "Stopped", "Starting", "Running"];

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One node as `/localapi/v0/status` describes it (self or a peer).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeStatus {
    pub public_key: String,
    pub host_name: String,
    #[serde(rename = "DNSName")]
    pub dns_name: String,
    #[serde(rename = "TailscaleIPs", deserialize_with = "null_as_default")]
    pub tailscale_ips: Vec<IpAddr>,
    #[serde(rename = "AllowedIPs", deserialize_with = "null_as_default")]
    pub allowed_ips: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub primary_routes: Vec<String>,
    pub online: bool,
    /// The peer's UDP endpoint while the path to it is direct; empty otherwise.
    #[serde(deserialize_with = "null_as_default")]
    pub cur_addr: String,
    /// The peer's home DERP region (where relayed packets go).
    #[serde(deserialize_with = "null_as_default")]
    pub relay: String,
    /// A peer relay in use, if any.
    #[serde(deserialize_with = "null_as_default")]
    pub peer_relay: String,
    /// Traffic went to the peer in the last 45 s (tailscaled's session timeout).
    pub active: bool,
}

/// How traffic to a peer flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    /// Straight to its UDP endpoint (NAT traversal succeeded).
    Direct,
    /// Through a relay: a DERP server, or a peer relay.
    Relay,
    /// No traffic lately: tailscaled keeps no path warm, so none is known.
    Idle,
}

impl PeerPath {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerPath::Direct => "direct",
            PeerPath::Relay => "relay",
            PeerPath::Idle => "idle",
        }
    }
}

impl NodeStatus {
    /// The path to this peer now: direct while tailscaled trusts an endpoint of it, relayed
    /// while traffic flows without one, idle otherwise. tailscaled stops probing a peer's
    /// endpoint when no traffic went to it for its session timeout and then trusts it no more, so
    /// a quiet peer has no endpoint however direct its last path was: it is idle, not relayed
    /// (as `tailscale status` says).
    pub fn path(&self) -> PeerPath {
        if !self.cur_addr.is_empty() {
            PeerPath::Direct
        } else if !self.peer_relay.is_empty() || self.active {
            PeerPath::Relay
        } else {
            PeerPath::Idle
        }
    }

    /// Subnet routes this node serves: its primary routes and the non-host entries of its
    /// allowed IPs (Headscale sends the latter only for routes it approved).
    pub fn served_routes(&self) -> Vec<IpNetwork> {
        let mut out: Vec<IpNetwork> = Vec::new();
        for s in self.primary_routes.iter().chain(&self.allowed_ips) {
            let Ok(net) = s.parse::<IpNetwork>() else { continue };
            let host = if net.is_ipv4() { 32 } else { 128 };
            if net.prefix() == host && self.tailscale_ips.contains(&net.ip()) {
                continue;
            }
            if !out.contains(&net) {
                out.push(net);
            }
        }
        out
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Tailnet {
    pub name: String,
}

/// `/localapi/v0/status`, the parts HeadCNI uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Status {
    pub version: String,
    pub backend_state: String,
    #[serde(rename = "AuthURL")]
    pub auth_url: String,
    #[serde(deserialize_with = "null_as_default")]
    pub have_node_key: bool,
    #[serde(rename = "TailscaleIPs", deserialize_with = "null_as_default")]
    pub tailscale_ips: Vec<IpAddr>,
    #[serde(rename = "Self", deserialize_with = "null_as_default")]
    pub self_: NodeStatus,
    #[serde(deserialize_with = "null_as_default")]
    pub peer: BTreeMap<String, NodeStatus>,
    #[serde(deserialize_with = "null_as_default")]
    pub health: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub current_tailnet: Tailnet,
}

impl Status {
    pub fn is_running(&self) -> bool {
        self.backend_state == "Running"
    }

    /// The node key, unless tailscaled has none yet (it reports all zeros then).
    pub fn node_key(&self) -> Option<&str> {
        let key = self.self_.public_key.as_str();
        let hex = key.strip_prefix("nodekey:")?;
        (!hex.is_empty() && hex.bytes().any(|b| b != b'0')).then_some(key)
    }
}

/// `/localapi/v0/prefs`: typed views of the fields HeadCNI reads, plus the whole document
/// (the join starts from it, so that prefs HeadCNI does not know survive).
#[derive(Debug, Clone, PartialEq)]
pub struct Prefs {
    pub control_url: String,
    pub route_all: bool,
    pub no_snat: bool,
    pub want_running: bool,
    pub logged_out: bool,
    pub corp_dns: bool,
    pub hostname: String,
    /// Kept as text: routes someone else advertised are passed back exactly as they were.
    pub advertise_routes: Vec<String>,
    pub advertise_tags: Vec<String>,
    pub raw: Map<String, Value>,
}

impl Prefs {
    pub fn from_json(raw: Map<String, Value>) -> Self {
        let b = |k: &str| raw.get(k).and_then(Value::as_bool).unwrap_or(false);
        let s = |k: &str| raw.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let list = |k: &str| -> Vec<String> {
            raw.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default()
        };
        Self {
            control_url: s("ControlURL"),
            route_all: b("RouteAll"),
            no_snat: b("NoSNAT"),
            want_running: b("WantRunning"),
            logged_out: b("LoggedOut"),
            corp_dns: b("CorpDNS"),
            hostname: s("Hostname"),
            advertise_routes: list("AdvertiseRoutes"),
            advertise_tags: list("AdvertiseTags"),
            raw: raw.clone(),
        }
    }

    /// Whether `net` is among the advertised routes.
    pub fn advertises(&self, net: &IpNetwork) -> bool {
        self.advertise_routes.iter().any(|r| r.parse::<IpNetwork>().is_ok_and(|p| p == *net))
    }
}

/// A masked prefs edit: only the fields set here change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefsEdit {
    pub advertise_routes: Option<Vec<String>>,
    pub route_all: Option<bool>,
    pub no_snat: Option<bool>,
}

impl PrefsEdit {
    pub fn is_empty(&self) -> bool {
        self.advertise_routes.is_none() && self.route_all.is_none() && self.no_snat.is_none()
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if let Some(routes) = &self.advertise_routes {
            m.insert("AdvertiseRoutes".into(), json!(routes));
            m.insert("AdvertiseRoutesSet".into(), json!(true));
        }
        if let Some(v) = self.route_all {
            m.insert("RouteAll".into(), json!(v));
            m.insert("RouteAllSet".into(), json!(true));
        }
        if let Some(v) = self.no_snat {
            m.insert("NoSNAT".into(), json!(v));
            m.insert("NoSNATSet".into(), json!(true));
        }
        Value::Object(m)
    }
}

/// What a join asks for, on top of the node's current prefs.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinPrefs {
    pub control_url: String,
    pub hostname: String,
    pub advertise_routes: Vec<String>,
    pub advertise_tags: Vec<String>,
}

impl JoinPrefs {
    /// The full prefs for `/localapi/v0/start` (which replaces all prefs but the persisted
    /// login state): the current prefs with the join's changes. DNS is left to the node
    /// (CorpDNS off): pods get their DNS from Kubernetes, and the node keeps its resolver.
    pub fn update_prefs(&self, current: &Prefs) -> Value {
        let mut p = current.raw.clone();
        p.remove("Config"); // the persisted login state; tailscaled keeps its own
        p.insert("ControlURL".into(), json!(self.control_url));
        p.insert("WantRunning".into(), json!(true));
        p.insert("LoggedOut".into(), json!(false));
        p.insert("Hostname".into(), json!(self.hostname));
        p.insert("AdvertiseRoutes".into(), json!(self.advertise_routes));
        p.insert("RouteAll".into(), json!(true));
        p.insert("NoSNAT".into(), json!(true));
        p.insert("CorpDNS".into(), json!(false));
        if !self.advertise_tags.is_empty() {
            p.insert("AdvertiseTags".into(), json!(self.advertise_tags));
        }
        Value::Object(p)
    }
}

/// One rule of the packet filter Headscale sends a node (`/localapi/v0/debug-packet-filter-rules`,
/// tailscale's `tailcfg.FilterRule`): tailscaled lets a packet from a peer in only when a rule's
/// sources hold its source address and its destinations its destination. Only the addresses are
/// kept; ports and protocols do not matter to whether pods can be reached at all.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct FilterRule {
    #[serde(rename = "SrcIPs", deserialize_with = "null_as_default")]
    pub src_ips: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub dst_ports: Vec<FilterDestination>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct FilterDestination {
    /// `*`, an address, a prefix, or a range `first-last`.
    #[serde(rename = "IP")]
    pub ip: String,
}

/// The addresses a filter entry stands for, as ranges of one family each (`*` is both families).
fn filter_ranges(entry: &str) -> Vec<(IpAddr, IpAddr)> {
    let entry = entry.trim();
    if entry == "*" {
        return vec![
            (IpAddr::from([0u8; 4]), IpAddr::from([255u8; 4])),
            (IpAddr::from([0u8; 16]), IpAddr::from([255u8; 16])),
        ];
    }
    if let Some((first, last)) = entry.split_once('-')
        && let (Ok(a), Ok(b)) = (first.parse::<IpAddr>(), last.parse::<IpAddr>())
        && a.is_ipv4() == b.is_ipv4()
    {
        return vec![(a, b)];
    }
    if let Ok(net) = entry.parse::<IpNetwork>() {
        return vec![crate::cidr::address_range(&net)];
    }
    vec![]
}

fn overlaps<'a>(entries: impl IntoIterator<Item = &'a str>, net: &IpNetwork) -> bool {
    let (lo, hi) = crate::cidr::address_range(net);
    entries.into_iter().flat_map(filter_ranges).any(|(a, b)| a.is_ipv4() == lo.is_ipv4() && a <= hi && lo <= b)
}

/// Whether the packet filter lets any traffic in to some address of `dst`, from some address of
/// `sources` of its family (from anywhere when there are none): false means no peer can reach it.
pub fn filter_admits(rules: &[FilterRule], dst: &IpNetwork, sources: &[IpNetwork]) -> bool {
    rules.iter().any(|r| {
        let from: Vec<&IpNetwork> = sources.iter().filter(|s| s.is_ipv4() == dst.is_ipv4()).collect();
        overlaps(r.dst_ports.iter().map(|d| d.ip.as_str()), dst)
            && (from.is_empty() || from.iter().any(|s| overlaps(r.src_ips.iter().map(String::as_str), s)))
    })
}

/// What the IPN bus is asked for: the state at once (so a watcher knows it is connected), peer
/// changes as deltas, and never the whole network map (which can be megabytes): bits of
/// tailscale's `ipn.NotifyWatchOpt` (`NotifyInitialState`, `NotifyPeerChanges`,
/// `NotifyNoNetMap`). A tailscaled that predates the last two ignores them and sends its
/// network map, which the per-line cap of [`BUS_LINE_LIMIT`] allows for.
pub const BUS_MASK: u64 = (1 << 1) | (1 << 12) | (1 << 13);
/// The largest notification accepted (one line of the stream).
pub const BUS_LINE_LIMIT: usize = 64 << 20;

/// An open watch of the IPN bus: one JSON notification per line.
pub struct BusStream {
    stream: StreamingResponse,
}

impl BusStream {
    /// The next notification; `None` when tailscaled ended the stream (it restarts, say).
    pub async fn next(&mut self) -> Result<Option<Value>, TailscaleError> {
        let Some(line) = self.stream.next_line().await.map_err(TailscaleError::Client)? else { return Ok(None) };
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|source| TailscaleError::Decode { what: "a notification of the IPN bus".into(), source })
    }
}

/// The LocalAPI calls the agent makes: the seam that lets the reconcile logic run against a
/// fake in unit tests.
pub trait LocalApi: Send + Sync {
    fn status(&self) -> impl Future<Output = Result<Status, TailscaleError>> + Send;
    fn prefs(&self) -> impl Future<Output = Result<Prefs, TailscaleError>> + Send;
    fn edit_prefs(&self, edit: &PrefsEdit) -> impl Future<Output = Result<Prefs, TailscaleError>> + Send;
    /// `/localapi/v0/start` with an auth key and full prefs.
    fn start(&self, auth_key: &Secret, prefs: Value) -> impl Future<Output = Result<(), TailscaleError>> + Send;
    /// `/localapi/v0/login-interactive`: with an auth key given to start, no browser is involved.
    fn login(&self) -> impl Future<Output = Result<(), TailscaleError>> + Send;
    /// The packet filter in force on this node (tailscaled answers 404 before its first network
    /// map: no rules then).
    fn packet_filter(&self) -> impl Future<Output = Result<Vec<FilterRule>, TailscaleError>> + Send;
}

/// The LocalAPI on a unix socket.
#[derive(Debug, Clone)]
pub struct SocketLocalApi {
    socket: PathBuf,
    endpoint: Endpoint,
}

impl SocketLocalApi {
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf(), endpoint: Endpoint::unix(socket, LOCALAPI_HOST) }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call(&self, what: &str, req: HttpRequest) -> Result<hyper::body::Bytes, TailscaleError> {
        let resp = self.endpoint.send(req).await.map_err(|e| {
            if e.is_unreachable() {
                TailscaleError::Unreachable { socket: self.socket.clone(), source: e }
            } else {
                TailscaleError::Client(e)
            }
        })?;
        if resp.status.is_success() {
            return Ok(resp.body);
        }
        // Errors come as {"Error": "..."} or as text.
        let msg = serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("Error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| resp.snippet());
        if resp.status == StatusCode::FORBIDDEN {
            return Err(TailscaleError::Forbidden { what: what.to_string(), msg });
        }
        Err(TailscaleError::Status { what: what.to_string(), status: resp.status, msg })
    }

    /// Opens the IPN bus (`/localapi/v0/watch-ipn-bus`): tailscaled's change notifications, as
    /// they happen, until the connection ends.
    pub async fn watch_bus(&self) -> Result<BusStream, TailscaleError> {
        let what = "GET /localapi/v0/watch-ipn-bus";
        let req = HttpRequest::new(Method::GET, format!("/localapi/v0/watch-ipn-bus?mask={BUS_MASK}"))
            .timeout(Duration::from_secs(10))
            .limit(BUS_LINE_LIMIT);
        let stream = self.endpoint.open(req).await.map_err(|e| {
            if e.is_unreachable() {
                TailscaleError::Unreachable { socket: self.socket.clone(), source: e }
            } else {
                TailscaleError::Client(e)
            }
        })?;
        if stream.status.is_success() {
            return Ok(BusStream { stream });
        }
        let status = stream.status;
        let resp = stream.collect(64 << 10).await.map_err(TailscaleError::Client)?;
        if status == StatusCode::FORBIDDEN {
            return Err(TailscaleError::Forbidden { what: what.into(), msg: resp.snippet() });
        }
        Err(TailscaleError::Status { what: what.into(), status, msg: resp.snippet() })
    }

    fn decode<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, TailscaleError> {
        serde_json::from_slice(body).map_err(|source| TailscaleError::Decode { what: what.to_string(), source })
    }
}

impl LocalApi for SocketLocalApi {
    async fn status(&self) -> Result<Status, TailscaleError> {
        let what = "GET /localapi/v0/status";
        let body = self.call(what, HttpRequest::new(Method::GET, "/localapi/v0/status").limit(64 << 20)).await?;
        Self::decode(what, &body)
    }

    async fn prefs(&self) -> Result<Prefs, TailscaleError> {
        let what = "GET /localapi/v0/prefs";
        let body = self.call(what, HttpRequest::new(Method::GET, "/localapi/v0/prefs")).await?;
        Ok(Prefs::from_json(Self::decode(what, &body)?))
    }

    async fn edit_prefs(&self, edit: &PrefsEdit) -> Result<Prefs, TailscaleError> {
        let what = "PATCH /localapi/v0/prefs";
        let body = self.call(what, HttpRequest::new(Method::PATCH, "/localapi/v0/prefs").json(&edit.to_json())).await?;
        Ok(Prefs::from_json(Self::decode(what, &body)?))
    }

    async fn start(&self, auth_key: &Secret, prefs: Value) -> Result<(), TailscaleError> {
        let what = "POST /localapi/v0/start";
        let body = json!({"AuthKey": auth_key.expose(), "UpdatePrefs": prefs});
        let req = HttpRequest::new(Method::POST, "/localapi/v0/start").json(&body).timeout(Duration::from_secs(30));
        self.call(what, req).await.map(|_| ())
    }

    async fn login(&self) -> Result<(), TailscaleError> {
        let what = "POST /localapi/v0/login-interactive";
        let req = HttpRequest::new(Method::POST, "/localapi/v0/login-interactive").timeout(Duration::from_secs(30));
        self.call(what, req).await.map(|_| ())
    }

    async fn packet_filter(&self) -> Result<Vec<FilterRule>, TailscaleError> {
        let what = "POST /localapi/v0/debug-packet-filter-rules";
        let req = HttpRequest::new(Method::POST, "/localapi/v0/debug-packet-filter-rules").limit(16 << 20);
        match self.call(what, req).await {
            Ok(body) => Self::decode::<Option<Vec<FilterRule>>>(what, &body).map(Option::unwrap_or_default),
            Err(TailscaleError::Status { status: StatusCode::NOT_FOUND, .. }) => Ok(vec![]),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_filter_admits_by_overlap_of_destinations_and_sources() {
        // As tailscaled 1.102 printed it on a harness node after its pod CIDR was approved.
        let text = r#"[{"SrcIPs":["10.244.0.0/16","100.64.0.1-100.64.0.3","fd7a:115c:a1e0::1-fd7a:115c:a1e0::3"],
            "DstPorts":[{"IP":"100.64.0.2/31","Ports":{"First":0,"Last":65535}},
                        {"IP":"fd7a:115c:a1e0::2/127","Ports":{"First":0,"Last":65535}},
                        {"IP":"10.244.0.0/16","Ports":{"First":0,"Last":65535}}]}]"#;
        let rules: Vec<FilterRule> = serde_json::from_str(text).unwrap();
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let cluster = [n("10.244.0.0/16"), n("fd00:10:244::/56")];
        assert!(filter_admits(&rules, &n("10.244.1.0/24"), &cluster));
        assert!(filter_admits(&rules, &n("10.244.1.0/24"), &[]));
        assert!(!filter_admits(&rules, &n("10.245.1.0/24"), &cluster));
        // No IPv6 pod range in the rule: the IPv6 pod CIDR is shut, whatever the IPv4 sources.
        assert!(!filter_admits(&rules, &n("fd00:10:244:1::/64"), &cluster));
        // Ranges and single addresses count by overlap; a pod range as source is required.
        let rules = vec![FilterRule {
            src_ips: vec!["100.64.0.0/10".into()],
            dst_ports: vec![FilterDestination { ip: "10.244.1.5".into() }],
        }];
        assert!(filter_admits(&rules, &n("10.244.1.0/24"), &[]));
        assert!(!filter_admits(&rules, &n("10.244.1.0/24"), &cluster));
        let rules = vec![FilterRule {
            src_ips: vec!["10.244.3.0-10.244.3.255".into()],
            dst_ports: vec![FilterDestination { ip: "10.244.1.250-10.244.2.3".into() }],
        }];
        assert!(filter_admits(&rules, &n("10.244.1.0/24"), &cluster));
        assert!(filter_admits(&rules, &n("10.244.2.0/24"), &cluster));
        assert!(!filter_admits(&rules, &n("10.244.3.0/24"), &cluster));
        // `*` is every address of both families; an empty or null filter admits nothing.
        let any = vec![FilterRule { src_ips: vec!["*".into()], dst_ports: vec![FilterDestination { ip: "*".into() }] }];
        assert!(filter_admits(&any, &n("fd00:10:244:1::/64"), &cluster));
        assert!(!filter_admits(&[], &n("10.244.1.0/24"), &[]));
        let none: Option<Vec<FilterRule>> = serde_json::from_str("null").unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn the_path_to_a_peer() {
        let peer = |json: &str| serde_json::from_str::<NodeStatus>(json).unwrap().path();
        assert_eq!(peer(r#"{"CurAddr":"10.99.0.12:41641","Relay":"hca","Active":true}"#), PeerPath::Direct);
        assert_eq!(peer(r#"{"CurAddr":"","Relay":"hca","Active":true}"#), PeerPath::Relay);
        // A quiet peer, as tailscaled 1.102 (on the harness's tailnet) reported node-2 a minute
        // after the last ping over a direct path: no endpoint trusted any more, yet not relayed.
        let quiet = r#"{"CurAddr":"","Relay":"headcni","Active":false,"LastHandshake":"2026-12-07T19:03:57.472712693Z",
            "LastWrite":"2026-12-07T19:04:09.411636724Z"}"#;
        assert_eq!(peer(quiet), PeerPath::Idle, "a quiet peer is no relayed one");
        assert_eq!(peer(r#"{"CurAddr":"","Relay":"hca","LastHandshake":"0001-01-01T00:00:00Z"}"#), PeerPath::Idle);
        // Still probed a few seconds after its session ended: the endpoint is trusted yet.
        assert_eq!(peer(r#"{"CurAddr":"10.99.0.12:41641","Relay":"hca","Active":false}"#), PeerPath::Direct);
        assert_eq!(peer(r#"{"CurAddr":null,"Relay":null,"PeerRelay":"100.64.0.9:7000"}"#), PeerPath::Relay);
    }
    use crate::clients::http::testserver;
    use std::sync::Arc;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/tailscale/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn parses_recorded_status() {
        let st: Status = serde_json::from_str(&fixture("status-needslogin.json")).unwrap();
        assert_eq!(st.backend_state, "NeedsLogin");
        assert_eq!(st.node_key(), None, "all-zero key means none");
        assert!(st.peer.is_empty());

        let st: Status = serde_json::from_str(&fixture("status-running-approved.json")).unwrap();
        assert!(st.is_running());
        assert!(st.node_key().unwrap().starts_with("nodekey:"));
        assert_eq!(st.self_.served_routes(), vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]);

        let st: Status = serde_json::from_str(&fixture("status-peer-approved.json")).unwrap();
        let peer = st.peer.values().next().unwrap();
        assert_eq!(peer.host_name, "node-1");
        assert_eq!(peer.served_routes(), vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]);
        // Right after approval Headscale 0.29 has not told the node itself yet.
        let st: Status = serde_json::from_str(&fixture("status-running-pending.json")).unwrap();
        assert!(st.self_.served_routes().is_empty());

        let st: Status = serde_json::from_str(&fixture("status-login-error.json")).unwrap();
        assert!(st.health.iter().any(|h| h.contains("requested tags")));
    }

    #[test]
    fn parses_recorded_prefs_and_builds_join_prefs() {
        let p = Prefs::from_json(serde_json::from_str(&fixture("prefs-default.json")).unwrap());
        assert!(p.logged_out && !p.route_all && p.corp_dns);
        let join = JoinPrefs {
            control_url: "http://hs:8080".into(),
            hostname: "node-1".into(),
            advertise_routes: vec!["10.244.1.0/24".into()],
            advertise_tags: vec![],
        };
        let v = join.update_prefs(&p);
        assert_eq!(v["RouteAll"], true);
        assert_eq!(v["NoSNAT"], true);
        assert_eq!(v["CorpDNS"], false);
        assert_eq!(v["LoggedOut"], false);
        assert_eq!(v["NetfilterMode"], 2, "unknown prefs are carried over");
        assert_eq!(v["AdvertiseTags"], Value::Null, "no tags unless asked: a tagged key refuses them");
        assert!(v.get("Config").is_none());

        let p = Prefs::from_json(serde_json::from_str(&fixture("prefs-joined.json")).unwrap());
        assert!(p.advertises(&"10.244.1.0/24".parse().unwrap()));
        assert!(p.route_all && p.no_snat && !p.corp_dns);
    }

    #[test]
    fn masked_edit_sets_only_what_it_changes() {
        let e = PrefsEdit { route_all: Some(true), ..Default::default() };
        assert_eq!(e.to_json(), json!({"RouteAll": true, "RouteAllSet": true}));
        let e = PrefsEdit { advertise_routes: Some(vec![]), ..Default::default() };
        assert_eq!(e.to_json(), json!({"AdvertiseRoutes": [], "AdvertiseRoutesSet": true}));
        assert!(PrefsEdit::default().is_empty());
    }

    #[tokio::test]
    async fn talks_http_over_the_socket_like_tailscaled_wants() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ts.sock");
        let status = fixture("status-running-approved.json");
        let handler: testserver::Handler = Arc::new(move |s| {
            // tailscaled's own checks.
            if s.headers.get("host").map(|h| h.as_bytes()) != Some(LOCALAPI_HOST.as_bytes())
                || s.headers.contains_key("origin")
                || s.headers.contains_key("referer")
            {
                return (403, "invalid localapi request\n".into());
            }
            match (s.method.as_str(), s.path.as_str()) {
                ("GET", "/localapi/v0/status") => (200, status.clone()),
                ("PATCH", "/localapi/v0/prefs") => {
                    (400, r#"{"Error":"route 10.244.1.5/24 has non-address bits set"}"#.into())
                }
                ("POST", "/localapi/v0/start") => (204, String::new()),
                ("POST", "/localapi/v0/login-interactive") => (403, "login access denied\n".into()),
                _ => (404, "not found".into()),
            }
        });
        let server = testserver::unix(&sock, handler);
        let api = SocketLocalApi::new(&sock);
        assert!(api.status().await.unwrap().is_running());
        let err = api.edit_prefs(&PrefsEdit { route_all: Some(true), ..Default::default() }).await.unwrap_err();
        assert!(err.to_string().contains("non-address bits"), "{err}");
        api.start(&Secret::new("hskey-auth-x".into()), json!({})).await.unwrap();
        let err = api.login().await.unwrap_err();
        assert!(matches!(err, TailscaleError::Forbidden { .. }), "{err}");
        let start = server.seen.lock().unwrap().iter().find(|s| s.path == "/localapi/v0/start").cloned().unwrap();
        let body: Value = serde_json::from_slice(&start.body).unwrap();
        assert_eq!(body["AuthKey"], "hskey-auth-x");

        let gone = SocketLocalApi::new(&dir.path().join("absent.sock"));
        assert!(gone.status().await.unwrap_err().is_unreachable());
    }
}
