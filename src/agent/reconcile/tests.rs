//! The reconcile logic against fakes of its four seams (no root, no daemons). The same
//! behaviour is proven against real tailscaled and Headscale by `tests/agent_tailnet.rs`.

use super::*;
use crate::agent::cleanup::{CleanupScope, cleanup_with};
use crate::agent::config::CidrSource;
use crate::agent::hostnet::{Changes, HostNetworkError};
use crate::agent::node::{ClusterCidrs, NodeBinding, NodeError};
use crate::agent::report::Severity;
use crate::agent::teardown::{Signal, SignalState};
use crate::clients::headscale::HeadscaleError;
use crate::clients::headscale::HsNode;
use crate::clients::localapi::{FilterDestination, FilterRule, NodeStatus, Prefs, PrefsEdit, TailscaleError};
use crate::clients::secret::{Secret, SecretSource};
use crate::netlink::RuleSpec;
use crate::netlink::nft::MasqueradeSpec;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn nets(list: &[&str]) -> BTreeSet<IpNetwork> {
    list.iter().map(|s| net(s)).collect()
}

const KEY: &str = "nodekey:cb43ecce6ee4ab78a628756fedfa4ced83c599aa6748fba67064226075906950";

// ---- fakes -------------------------------------------------------------------------------

#[derive(Default)]
struct Ts {
    reachable: bool,
    state: String,
    have_node_key: bool,
    prefs: Map<String, Value>,
    self_routes: Vec<String>,
    peers: Vec<NodeStatus>,
    health: Vec<String>,
    edits: Vec<PrefsEdit>,
    starts: Vec<(String, Value)>,
    logins: u32,
    /// What a start does: the state it leads to.
    start_leads_to: Option<String>,
    /// Overrides the node key.
    self_key: Option<String>,
    /// The packet filter in force; `None`: one rule letting everything in.
    filter: Option<Vec<FilterRule>>,
}

#[derive(Clone, Default)]
struct FakeTs(Arc<Mutex<Ts>>);

impl FakeTs {
    fn running(routes: &[&str]) -> Self {
        let t = FakeTs::default();
        {
            let mut s = t.0.lock().unwrap();
            s.reachable = true;
            s.state = "Running".into();
            s.have_node_key = true;
            s.prefs = json!({"ControlURL": "http://hs:8080", "RouteAll": false, "NoSNAT": false, "CorpDNS": true,
                             "WantRunning": true, "LoggedOut": false, "NetfilterMode": 2, "AdvertiseRoutes": routes})
            .as_object()
            .unwrap()
            .clone();
        }
        t
    }

    fn fresh() -> Self {
        let t = FakeTs::default();
        {
            let mut s = t.0.lock().unwrap();
            s.reachable = true;
            s.state = "NeedsLogin".into();
            let text = std::fs::read_to_string(format!(
                "{}/tests/fixtures/tailscale/prefs-default.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            s.prefs = serde_json::from_str(&text).unwrap();
            s.start_leads_to = Some("Running".into());
        }
        t
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ts> {
        self.0.lock().unwrap()
    }

    fn routes(&self) -> Vec<String> {
        Prefs::from_json(self.lock().prefs.clone()).advertise_routes
    }
}

fn unreachable() -> TailscaleError {
    TailscaleError::Unreachable {
        socket: "/nope".into(),
        source: crate::clients::http::ClientError::Timeout { target: "x".into(), timeout: Duration::from_secs(1) },
    }
}

impl LocalApi for FakeTs {
    async fn status(&self) -> Result<Status, TailscaleError> {
        let s = self.lock();
        if !s.reachable {
            return Err(unreachable());
        }
        let ips: Vec<IpAddr> = if s.state == "Running" { vec!["100.64.0.1".parse().unwrap()] } else { vec![] };
        let peer: BTreeMap<String, NodeStatus> =
            s.peers.iter().enumerate().map(|(i, p)| (format!("nodekey:{i:064x}"), p.clone())).collect();
        Ok(Status {
            backend_state: s.state.clone(),
            have_node_key: s.have_node_key,
            tailscale_ips: ips.clone(),
            self_: NodeStatus {
                public_key: match (&s.self_key, s.have_node_key) {
                    (Some(k), _) => k.clone(),
                    (None, true) => KEY.into(),
                    (None, false) => format!("nodekey:{}", "0".repeat(64)),
                },
                host_name: "node-1".into(),
                tailscale_ips: ips,
                primary_routes: s.self_routes.clone(),
                ..Default::default()
            },
            peer,
            health: s.health.clone(),
            ..Default::default()
        })
    }

    async fn prefs(&self) -> Result<Prefs, TailscaleError> {
        let s = self.lock();
        if !s.reachable {
            return Err(unreachable());
        }
        Ok(Prefs::from_json(s.prefs.clone()))
    }

    async fn edit_prefs(&self, edit: &PrefsEdit) -> Result<Prefs, TailscaleError> {
        let mut s = self.lock();
        if !s.reachable {
            return Err(unreachable());
        }
        s.edits.push(edit.clone());
        if let Value::Object(m) = edit.to_json() {
            for (k, v) in m {
                if !k.ends_with("Set") {
                    s.prefs.insert(k, v);
                }
            }
        }
        Ok(Prefs::from_json(s.prefs.clone()))
    }

    async fn start(&self, auth_key: &Secret, prefs: Value) -> Result<(), TailscaleError> {
        let mut s = self.lock();
        s.starts.push((auth_key.expose().to_string(), prefs.clone()));
        s.prefs = prefs.as_object().unwrap().clone();
        Ok(())
    }

    async fn login(&self) -> Result<(), TailscaleError> {
        let mut s = self.lock();
        s.logins += 1;
        if let Some(next) = s.start_leads_to.clone() {
            s.state = next;
            s.have_node_key = true;
        }
        Ok(())
    }

    async fn packet_filter(&self) -> Result<Vec<FilterRule>, TailscaleError> {
        let s = self.lock();
        if !s.reachable {
            return Err(unreachable());
        }
        Ok(s.filter.clone().unwrap_or_else(|| vec![filter_rule(&["*"], &["*"])]))
    }
}

fn filter_rule(src: &[&str], dst: &[&str]) -> FilterRule {
    FilterRule {
        src_ips: src.iter().map(|s| s.to_string()).collect(),
        dst_ports: dst.iter().map(|d| FilterDestination { ip: d.to_string() }).collect(),
    }
}

#[derive(Default)]
struct Hs {
    nodes: Vec<HsNode>,
    approvals: Vec<(String, Vec<IpNetwork>)>,
    error: Option<fn() -> HeadscaleError>,
    version: Option<String>,
}

#[derive(Clone, Default)]
struct FakeHs(Arc<Mutex<Hs>>);

impl FakeHs {
    fn with(nodes: Vec<HsNode>) -> Self {
        let h = FakeHs::default();
        h.0.lock().unwrap().nodes = nodes;
        h
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Hs> {
        self.0.lock().unwrap()
    }
}

fn hs_node(id: &str, key: &str, available: &[&str], approved: &[&str]) -> HsNode {
    HsNode {
        id: id.into(),
        node_key: key.into(),
        name: format!("node-{id}"),
        approved_routes: Some(approved.iter().map(|s| s.to_string()).collect()),
        available_routes: Some(available.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

impl HeadscaleApi for FakeHs {
    async fn version(&self) -> Result<Option<String>, HeadscaleError> {
        Ok(self.lock().version.clone())
    }
    async fn nodes(&self) -> Result<Vec<HsNode>, HeadscaleError> {
        let s = self.lock();
        if let Some(e) = s.error {
            return Err(e());
        }
        Ok(s.nodes.clone())
    }
    async fn approve_routes(&self, node_id: &str, routes: &[IpNetwork]) -> Result<HsNode, HeadscaleError> {
        let mut s = self.lock();
        s.approvals.push((node_id.to_string(), routes.to_vec()));
        let node = s.nodes.iter_mut().find(|n| n.id == node_id).unwrap();
        node.approved_routes = Some(routes.iter().map(ToString::to_string).collect());
        Ok(node.clone())
    }
}

#[derive(Default)]
struct Dp {
    forwarding: Vec<(bool, bool)>,
    rules: Vec<Vec<RuleSpec>>,
    unreachable: Vec<Vec<IpNetwork>>,
    guards: u32,
    masq: Vec<Vec<MasqueradeSpec>>,
    removed_rules: u32,
    removed_unreachable: u32,
    removed_guard: u32,
    removed_tables: u32,
    link: Option<(String, u32)>,
    /// The index of the interface `link` stands for (a restarted tailscaled makes a new one).
    link_index: u32,
    /// Every announcement of the tailnet addresses.
    announced: Vec<Vec<IpAddr>>,
    fail_masq: bool,
}

#[derive(Clone, Default)]
struct FakeDp(Arc<Mutex<Dp>>);

impl FakeDp {
    fn with_link(mtu: u32) -> Self {
        let d = FakeDp::default();
        d.0.lock().unwrap().link = Some(("tailscale0".into(), mtu));
        d
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Dp> {
        self.0.lock().unwrap()
    }
}

impl HostNetwork for FakeDp {
    async fn ensure_forwarding(&self, ipv4: bool, ipv6: bool) -> Result<Changes, HostNetworkError> {
        self.lock().forwarding.push((ipv4, ipv6));
        Ok(Changes::default())
    }
    async fn ensure_rules(&self, rules: &[RuleSpec]) -> Result<Changes, HostNetworkError> {
        self.lock().rules.push(rules.to_vec());
        Ok(Changes::default())
    }
    async fn remove_rules(&self) -> Result<usize, HostNetworkError> {
        self.lock().removed_rules += 1;
        Ok(1)
    }
    async fn ensure_unreachable(&self, nets: &[IpNetwork]) -> Result<Changes, HostNetworkError> {
        self.lock().unreachable.push(nets.to_vec());
        Ok(Changes::default())
    }
    async fn remove_unreachable(&self) -> Result<usize, HostNetworkError> {
        self.lock().removed_unreachable += 1;
        Ok(1)
    }
    async fn ensure_guard(&self) -> Result<Changes, HostNetworkError> {
        self.lock().guards += 1;
        Ok(Changes::default())
    }
    async fn remove_guard(&self) -> Result<bool, HostNetworkError> {
        self.lock().removed_guard += 1;
        Ok(true)
    }
    async fn ensure_masquerade(&self, specs: &[MasqueradeSpec]) -> Result<Changes, HostNetworkError> {
        let mut s = self.lock();
        if s.fail_masq {
            return Err(HostNetworkError::Nft(crate::netlink::nft::NftError::Kernel {
                op: "adding table".into(),
                errno: 1,
            }));
        }
        s.masq.push(specs.to_vec());
        Ok(Changes::default())
    }
    async fn remove_masquerade(&self) -> Result<usize, HostNetworkError> {
        self.lock().removed_tables += 1;
        Ok(1)
    }
    async fn tailnet_link(&self, _ips: &[IpAddr]) -> Result<Option<(String, u32)>, HostNetworkError> {
        Ok(self.lock().link.clone())
    }
    async fn announce_tailnet_addresses(
        &self,
        ips: &[IpAddr],
        done: Option<u32>,
    ) -> Result<Option<u32>, HostNetworkError> {
        let mut s = self.lock();
        if ips.is_empty() || s.link.is_none() {
            return Ok(None);
        }
        if done != Some(s.link_index) {
            s.announced.push(ips.to_vec());
        }
        Ok(Some(s.link_index))
    }
}

type OwnCidrs = Result<Option<Vec<IpNetwork>>, String>;

/// The pod CIDRs (this node's, and the Nodes' where the source follows them), and the Node's
/// binding with the keys published on it.
#[derive(Clone)]
struct FakeCidrs(Arc<Mutex<(OwnCidrs, Option<ClusterCidrs>)>>, Arc<Mutex<(NodeBinding, Vec<String>)>>);

impl FakeCidrs {
    fn some(list: &[&str]) -> Self {
        let binding = NodeBinding { published: Some(None), approval: None };
        FakeCidrs(
            Arc::new(Mutex::new((Ok(Some(list.iter().map(|s| net(s)).collect())), None))),
            Arc::new(Mutex::new((binding, Vec::new()))),
        )
    }
    fn set(&self, v: OwnCidrs) {
        self.0.lock().unwrap().0 = v;
    }
    /// What the Nodes say (a Kubernetes source); `None`: a source that knows only this node.
    fn set_cluster(&self, v: Option<ClusterCidrs>) {
        self.0.lock().unwrap().1 = v;
    }
}

impl PodCidrSource for FakeCidrs {
    async fn pod_cidrs(&self) -> Result<Option<Vec<IpNetwork>>, NodeError> {
        self.0.lock().unwrap().0.clone().map_err(NodeError::Setup)
    }
    fn kind(&self) -> &'static str {
        "node"
    }
    fn refresh_interval(&self) -> Duration {
        Duration::ZERO
    }
    fn cluster_cidrs(&self) -> Option<ClusterCidrs> {
        self.0.lock().unwrap().1.clone()
    }
    fn binding(&self) -> NodeBinding {
        self.1.lock().unwrap().0.clone()
    }
    async fn publish_node_key(&self, key: &str) -> Result<(), NodeError> {
        let mut b = self.1.lock().unwrap();
        b.0.published = Some(Some(key.to_string()));
        b.1.push(key.to_string());
        Ok(())
    }
}

struct World {
    dir: tempfile::TempDir,
    cfg: Arc<AgentConfig>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

fn world(tweak: impl FnOnce(&mut AgentConfig)) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig {
        node_name: Some("node-1".into()),
        cidr_source: CidrSource::InCluster,
        cluster_cidrs: vec![net("10.244.0.0/16")],
        service_cidrs: vec![net("10.96.0.0/12")],
        tailscale_socket: dir.path().join("ts.sock"),
        headscale_url: Some("http://hs:8080".into()),
        headscale_ca_file: None,
        auth_key: None,
        api_key: None,
        publish_identity: false,
        hostname: "node-1".into(),
        advertise_tags: vec![],
        mtu: None,
        masquerade: true,
        network_policy: false,
        run_dir: dir.path().join("run"),
        state_dir: dir.path().join("state"),
        rule_priority: 5200,
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_path: "/metrics".into(),
        sysctl_root: Default::default(),
        conf_dir: dir.path().join("net.d"),
        exclusive: false,
        conflist_name: "10-headcni.conflist".into(),
        teardown_configmap: None,
        kubeconfig: None,
        cni_files: Default::default(),
        cleanup: false,
    };
    std::fs::create_dir(&cfg.conf_dir).unwrap();
    std::fs::write(cfg.conf_dir.join("10-headcni.conflist"), r#"{"name":"headcni","plugins":[{"type":"headcni"}]}"#)
        .unwrap();
    tweak(&mut cfg);
    let metrics = Arc::new(Metrics::new(&cfg.run_dir));
    World { dir, cfg: Arc::new(cfg), metrics, health: Arc::new(Health::default()) }
}

type Rec = Reconciler<FakeCidrs, FakeTs, FakeHs, FakeDp>;

fn reconciler(w: &World, cidrs: &FakeCidrs, ts: &FakeTs, hs: Option<&FakeHs>, dp: &FakeDp) -> Rec {
    Reconciler::new(
        w.cfg.clone(),
        cidrs.clone(),
        ts.clone(),
        hs.cloned(),
        dp.clone(),
        w.metrics.clone(),
        w.health.clone(),
    )
}

fn state(w: &World) -> AgentState {
    AgentState::load(&state::path_in(&w.cfg.state_dir)).unwrap()
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test]
async fn zero_config_join_advertises_and_keeps_the_prefs_true() {
    let w = world(|c| c.auth_key = Some(SecretSource::Value(Secret::new("hskey-auth-test".into()))));
    let (cidrs, ts, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::fresh(), FakeDp::with_link(1280));
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);

    assert_eq!(r.reconcile().await, PassOutcome::Waiting, "joining");
    assert!(r.joining());
    {
        let s = ts.lock();
        assert_eq!(s.starts.len(), 1);
        let (key, prefs) = &s.starts[0];
        assert_eq!(key, "hskey-auth-test");
        assert_eq!(prefs["ControlURL"], "http://hs:8080");
        assert_eq!(prefs["Hostname"], "node-1");
        assert_eq!(prefs["AdvertiseRoutes"], json!(["10.244.1.0/24"]));
        assert_eq!(prefs["RouteAll"], true);
        assert_eq!(prefs["NoSNAT"], true);
        assert_eq!(prefs["WantRunning"], true);
        assert_eq!(prefs["CorpDNS"], false);
        assert!(prefs.get("AdvertiseTags").is_none_or(Value::is_null));
        assert_eq!(s.logins, 1, "a fresh node has no node key: login follows start");
    }
    assert_eq!(state(&w).advertised_routes, nets(&["10.244.1.0/24"]), "recorded before the join");

    // Headscale auto-approved (the policy): the node is running and sees its route.
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    assert_eq!(r.reconcile().await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert!(r.joined_in.is_some());
    assert!(r.report().ready);
    assert!(w.health.is_ready());
    assert!(ts.lock().edits.is_empty(), "the join already set everything");
    let nf = NodeFile::load(&nodefile::path_in(&w.cfg.run_dir)).unwrap().unwrap();
    assert_eq!(nf.pod_cidrs, vec![net("10.244.1.0/24")]);
    assert_eq!(nf.mtu, Some(1280));
    assert_eq!(nf.service_cidrs, vec![net("10.96.0.0/12")]);
    let text = w.metrics.encode();
    assert!(text.contains("headcni_routes_advertised 1"), "{text}");
    assert!(text.contains("headcni_routes_approved 1"), "{text}");
    assert!(text.contains("headcni_tailnet_backend_state{state=\"Running\"} 1"), "{text}");
    assert!(text.contains("headcni_ready 1"), "{text}");
    assert!(text.contains("headcni_pod_mtu_bytes 1280"), "{text}");
    assert!(text.contains("headcni_tailnet_mtu_bytes 1280"), "{text}");
    assert!(text.contains("headcni_pod_cidrs 1"), "{text}");
    let report = crate::agent::report::AgentReport::load(&w.cfg.run_dir).unwrap();
    assert!(report.ready);
}

#[tokio::test]
async fn a_join_refused_for_tags_says_so_and_backs_off() {
    let w = world(|c| {
        c.auth_key = Some(SecretSource::Value(Secret::new("k".into())));
        c.advertise_tags = vec!["tag:headcni".into()];
    });
    let (cidrs, ts, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::fresh(), FakeDp::with_link(1280));
    ts.lock().start_leads_to = None;
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    assert_eq!(ts.lock().starts[0].1["AdvertiseTags"], json!(["tag:headcni"]));
    ts.lock().health = vec![
        "You are logged out. The last login error was: requested tags [tag:headcni] are invalid or not permitted"
            .into(),
    ];
    r.join.issued_at = Some(Instant::now() - JOIN_TIMEOUT);
    assert_eq!(r.reconcile().await, PassOutcome::Failed);
    let p = &r.report().problems[0];
    assert!(p.message.contains("requested tags"), "{p:?}");
    assert!(p.hint.as_deref().unwrap().contains("leave --advertise-tags empty"), "{p:?}");
    // Backoff: the next pass does not start another join.
    r.reconcile().await;
    assert_eq!(ts.lock().starts.len(), 1);
}

#[tokio::test]
async fn without_a_key_a_logged_out_node_is_reported_not_touched() {
    let w = world(|_| {});
    let (cidrs, ts, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::fresh(), FakeDp::with_link(1280));
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Failed);
    assert!(ts.lock().starts.is_empty());
    assert!(r.report().problems[0].message.contains("not logged in"));
    assert!(!r.report().ready);
}

#[tokio::test]
async fn others_routes_survive_and_only_headcni_routes_are_withdrawn() {
    let w = world(|_| {});
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    // An exit node, an operator's subnet, and a route someone else advertised that equals a
    // future pod CIDR of ours.
    let ts = FakeTs::running(&["0.0.0.0/0", "::/0", "192.168.7.0/24", "10.244.9.0/24"]);
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    assert_eq!(ts.routes(), vec!["0.0.0.0/0", "::/0", "192.168.7.0/24", "10.244.9.0/24", "10.244.1.0/24"]);
    let edit = ts.lock().edits[0].clone();
    assert_eq!(edit.route_all, Some(true));
    assert_eq!(edit.no_snat, Some(true));
    assert_eq!(state(&w).advertised_routes, nets(&["10.244.1.0/24"]));

    // The node's pod CIDR changes (node recreated under the same name): ours moves, the
    // operator's 10.244.9.0/24 (never ours) stays even though it is not a pod CIDR either.
    cidrs.set(Ok(Some(vec![net("10.244.2.0/24")])));
    r.reconcile().await;
    assert_eq!(ts.routes(), vec!["0.0.0.0/0", "::/0", "192.168.7.0/24", "10.244.9.0/24", "10.244.2.0/24"]);
    assert_eq!(state(&w).advertised_routes, nets(&["10.244.2.0/24"]));

    // Someone else removed our route by hand: it comes back.
    ts.lock().prefs.insert("AdvertiseRoutes".into(), json!(["0.0.0.0/0", "::/0"]));
    r.reconcile().await;
    assert_eq!(ts.routes(), vec!["0.0.0.0/0", "::/0", "10.244.2.0/24"]);

    // Nothing to do: no edit at all.
    let edits = ts.lock().edits.len();
    r.reconcile().await;
    assert_eq!(ts.lock().edits.len(), edits);
}

#[tokio::test]
async fn a_restarted_agent_still_knows_its_routes() {
    let w = world(|_| {});
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["192.168.7.0/24"]);
    reconciler(&w, &cidrs, &ts, None, &dp).reconcile().await;
    // A new agent process (same state dir), and the node's CIDR changed meanwhile.
    cidrs.set(Ok(Some(vec![net("10.244.3.0/24")])));
    let mut r2 = reconciler(&w, &cidrs, &ts, None, &dp);
    r2.reconcile().await;
    assert_eq!(ts.routes(), vec!["192.168.7.0/24", "10.244.3.0/24"]);
}

#[tokio::test]
async fn approves_exactly_its_own_advertised_routes_and_never_others() {
    let w = world(|c| c.api_key = Some(SecretSource::Value(Secret::new("api".into()))));
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["192.168.7.0/24"]);
    let hs = FakeHs::with(vec![
        // Another node advertising its pod CIDR and a LAN route, neither approved.
        hs_node("2", "nodekey:other", &["10.244.2.0/24", "192.168.50.0/24"], &[]),
        // This node: its own LAN route was approved by an admin; the pod CIDR not yet seen.
        hs_node("1", KEY, &["192.168.7.0/24"], &["192.168.7.0/24"]),
    ]);
    hs.lock().version = Some("v0.29.2".into());
    let mut r = reconciler(&w, &cidrs, &ts, Some(&hs), &dp);

    // Headscale has not seen the advertisement yet: nothing is approved blindly.
    assert_eq!(r.reconcile().await, PassOutcome::Waiting);
    assert!(hs.lock().approvals.is_empty());
    assert!(r.report().problems.iter().any(|p| p.message.contains("has not seen it advertised")));

    hs.lock().nodes[1].available_routes = Some(vec!["192.168.7.0/24".into(), "10.244.1.0/24".into()]);
    assert_eq!(r.reconcile().await, PassOutcome::Converged, "{:?}", r.report().problems);
    {
        let h = hs.lock();
        assert_eq!(h.approvals, vec![("1".to_string(), vec![net("10.244.1.0/24"), net("192.168.7.0/24")])]);
        assert_eq!(h.nodes[0].approved_routes, Some(vec![]), "the other node is untouched");
    }
    assert_eq!(state(&w).approved_routes, nets(&["10.244.1.0/24"]));
    assert_eq!(state(&w).approved_node_id.as_deref(), Some("1"));
    assert_eq!(r.report().routes[0].approved, Some(true));
    assert!(r.approved_in.is_some());

    // Confirmed: Headscale is not asked again on every pass.
    r.reconcile().await;
    assert_eq!(hs.lock().approvals.len(), 1);

    // The pod CIDR changes: the new one is approved, the old approval (ours) withdrawn, the
    // admin's LAN approval kept.
    cidrs.set(Ok(Some(vec![net("10.244.5.0/24")])));
    hs.lock().nodes[1].available_routes = Some(vec!["192.168.7.0/24".into(), "10.244.5.0/24".into()]);
    r.reconcile().await;
    let last = hs.lock().approvals.last().cloned().unwrap();
    assert_eq!(last, ("1".to_string(), vec![net("10.244.5.0/24"), net("192.168.7.0/24")]));
    assert_eq!(state(&w).approved_routes, nets(&["10.244.5.0/24"]));

    // tailscaled lost its state and registered again: a new node, approved again at once.
    {
        let mut h = hs.lock();
        let mut fresh = hs_node("3", "nodekey:fresh", &["10.244.5.0/24"], &[]);
        fresh.name = "node-1-1".into();
        h.nodes.push(fresh);
    }
    ts.lock().self_key = Some("nodekey:fresh".into());
    r.reconcile().await;
    assert_eq!(hs.lock().approvals.last().cloned().unwrap(), ("3".to_string(), vec![net("10.244.5.0/24")]));
    assert_eq!(state(&w).approved_node_id.as_deref(), Some("3"));
    assert_eq!(state(&w).approved_routes, nets(&["10.244.5.0/24"]));
}

#[tokio::test]
async fn an_approval_counts_for_incoming_traffic_once_the_packet_filter_lets_pods_in() {
    let w = world(|c| {
        c.api_key = Some(SecretSource::Value(Secret::new("api".into())));
        c.cluster_cidrs = vec![net("10.244.0.0/16")];
    });
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["10.244.1.0/24"]);
    let hs = FakeHs::with(vec![hs_node("1", KEY, &["10.244.1.0/24"], &[])]);
    hs.lock().version = Some("v0.29.2".into());
    // Approved in Headscale, but the filter in force still is the one from before the approval:
    // it lets the tailnet reach this node's own addresses only (as Headscale 0.29 sends it).
    ts.lock().filter = Some(vec![filter_rule(&["10.244.0.0/16", "100.64.0.1-100.64.0.3"], &["100.64.0.1/32"])]);
    let mut r = reconciler(&w, &cidrs, &ts, Some(&hs), &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Waiting);
    assert_eq!(r.report().routes[0].approved, Some(true));
    assert_eq!(r.report().routes[0].admitted, Some(false));
    assert!(r.report().ready, "pods on this node work meanwhile");
    let p = r.report().problems.iter().find(|p| p.id == "approval/packet_filter").cloned();
    assert!(p.as_ref().is_some_and(|p| p.message.contains("10.244.1.0/24")), "{:?}", r.report().problems);
    assert!(w.metrics.encode().contains("headcni_routes_not_admitted 1"));

    // A rule for the tailnet's own addresses only, from pods: still shut.
    ts.lock().filter = Some(vec![filter_rule(&["100.64.0.0/10"], &["10.244.0.0/16"])]);
    assert_eq!(r.reconcile().await, PassOutcome::Waiting, "sources outside the cluster CIDR do not count");

    // Headscale's filter for the approved route arrives.
    ts.lock().filter =
        Some(vec![filter_rule(&["10.244.0.0/16", "100.64.0.1-100.64.0.3"], &["100.64.0.1/32", "10.244.0.0/16"])]);
    assert_eq!(r.reconcile().await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert_eq!(r.report().routes[0].admitted, Some(true));
    assert!(r.report().problems.is_empty());
    assert!(w.metrics.encode().contains("headcni_routes_not_admitted 0"));
}

#[tokio::test]
async fn headscale_faults_are_reported_and_pods_keep_working() {
    let w = world(|c| c.api_key = Some(SecretSource::Value(Secret::new("api".into()))));
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&[]);
    let hs = FakeHs::with(vec![hs_node("1", KEY, &["10.244.1.0/24"], &[])]);
    hs.lock().error = Some(|| HeadscaleError::Unauthorized { status: hyper::StatusCode::UNAUTHORIZED });
    let mut r = reconciler(&w, &cidrs, &ts, Some(&hs), &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Failed);
    assert!(r.report().problems[0].message.contains("rejected the API key"));
    // Everything else was done: routes advertised, node file written, data plane kept.
    assert!(r.report().ready);
    assert!(nodefile::path_in(&w.cfg.run_dir).exists());
    assert_eq!(dp.lock().rules.len(), 1);
    let text = w.metrics.encode();
    assert!(text.contains("headcni_reconcile_step_failing{step=\"approval\"} 1"));
    let api_errors: u64 = text
        .lines()
        .filter(|l| l.starts_with("headcni_headscale_api_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(api_errors, 1, "the refused request is counted once:\n{text}");

    hs.lock().error = None;
    hs.lock().version = Some("v0.25.1".into());
    let mut r = reconciler(&w, &cidrs, &ts, Some(&hs), &dp);
    r.reconcile().await;
    assert!(r.report().problems[0].message.contains("older than 0.26"), "{:?}", r.report().problems);
    assert!(hs.lock().approvals.is_empty());

    hs.lock().version = None;
    hs.lock().nodes[0].approved_routes = None;
    hs.lock().nodes[0].available_routes = None;
    let mut r = reconciler(&w, &cidrs, &ts, Some(&hs), &dp);
    r.reconcile().await;
    assert!(r.report().problems[0].message.contains("older than 0.26"), "{:?}", r.report().problems);

    let other = FakeHs::with(vec![hs_node("7", "nodekey:someone-else", &[], &[])]);
    let mut r = reconciler(&w, &cidrs, &ts, Some(&other), &dp);
    r.reconcile().await;
    assert!(r.report().problems[0].message.contains("no node with this node's key"));
}

#[tokio::test]
async fn without_an_api_key_pending_approval_is_reported() {
    let w = world(|_| {});
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["10.244.1.0/24"]);
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Waiting);
    let p = &r.report().problems[0];
    assert_eq!(p.message, "route 10.244.1.0/24 pending approval in Headscale");
    assert!(p.hint.as_deref().unwrap().contains("autoApprovers"));
    assert_eq!(r.report().routes[0].approved, Some(false));
    assert!(r.report().ready, "readiness does not wait for the approval");
    let text = w.metrics.encode();
    assert!(text.contains("headcni_routes_pending_approval 1"), "{text}");
    assert!(text.contains("headcni_routes_approved 0"), "{text}");
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    assert_eq!(r.reconcile().await, PassOutcome::Converged);
    assert!(w.metrics.encode().contains("headcni_routes_pending_approval 0"));
}

#[tokio::test]
async fn controller_mode_publishes_the_node_key_once_and_explains_the_wait() {
    let w = world(|c| c.publish_identity = true);
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["10.244.1.0/24"]);
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Waiting);
    assert_eq!(cidrs.1.lock().unwrap().1, vec![KEY.to_string()]);
    assert_eq!(r.report().approval, "controller");
    let p = r.report().problems.iter().find(|p| p.id == "approval").unwrap();
    assert!(p.message.contains("pending approval by the controller"), "{}", p.message);
    // The controller answers on the Node; the agent shows it.
    cidrs.1.lock().unwrap().0.approval = Some(crate::binding::ApprovalStatus {
        state: crate::binding::ApprovalState::Pending,
        node_key: KEY.into(),
        headscale_node: "1".into(),
        approved: vec![],
        message: "tailnet node node-1 does not advertise 10.244.1.0/24 (yet)".into(),
    });
    r.reconcile().await;
    let p = r.report().problems.iter().find(|p| p.id == "approval").unwrap();
    assert!(p.message.contains("does not advertise"), "{}", p.message);
    assert_eq!(r.report().controller.as_ref().unwrap().headscale_node, "1");
    // Approved: served by Headscale; nothing published again.
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    assert_eq!(r.reconcile().await, PassOutcome::Converged);
    assert_eq!(cidrs.1.lock().unwrap().1.len(), 1);
    // Someone removed the annotation: published again.
    cidrs.1.lock().unwrap().0.published = Some(None);
    r.reconcile().await;
    assert_eq!(cidrs.1.lock().unwrap().1.len(), 2);
}

#[tokio::test]
async fn tailscaled_down_keeps_the_node_file_and_data_plane() {
    let w = world(|c| c.mtu = Some(1280));
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::default());
    let ts = FakeTs::running(&[]);
    ts.lock().reachable = false;
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Failed);
    assert!(r.report().problems[0].message.contains("not reachable"));
    assert!(nodefile::path_in(&w.cfg.run_dir).exists(), "local pods can still be set up");
    assert_eq!(dp.lock().rules.len(), 1);
    assert!(!r.report().ready);
    assert!(w.metrics.encode().contains("headcni_tailnet_backend_state{state=\"Unreachable\"} 1"));
    // tailscaled comes back (its prefs survived): the agent re-applies what is missing.
    ts.lock().reachable = true;
    assert_eq!(r.reconcile().await, PassOutcome::Waiting, "pending approval");
    assert_eq!(ts.routes(), vec!["10.244.1.0/24"]);
    assert!(r.report().ready);
}

#[tokio::test]
async fn bad_or_missing_pod_cidrs_change_nothing() {
    let w = world(|_| {});
    let (dp, ts) = (FakeDp::with_link(1280), FakeTs::running(&[]));
    let cidrs = FakeCidrs::some(&["10.96.1.0/24"]);
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Failed);
    assert!(r.report().problems.iter().any(|p| p.message.contains("overlaps the service CIDR")));
    assert!(ts.routes().is_empty());
    assert!(!nodefile::path_in(&w.cfg.run_dir).exists());
    assert!(dp.lock().rules.is_empty());

    cidrs.set(Ok(None));
    assert_eq!(r.reconcile().await, PassOutcome::Waiting);
    assert!(r.report().problems.iter().any(|p| p.message.contains("has no podCIDR yet")));

    cidrs.set(Ok(Some(vec![net("100.100.0.0/24")])));
    r.reconcile().await;
    assert!(r.report().problems.iter().any(|p| p.message.contains("Tailscale's range")));

    // A good CIDR once, then the API fails: the known CIDR stays in use.
    cidrs.set(Ok(Some(vec![net("10.244.1.0/24")])));
    r.reconcile().await;
    cidrs.set(Err("the Kubernetes API is not reachable".into()));
    r.reconcile().await;
    assert_eq!(ts.routes(), vec!["10.244.1.0/24"]);
    assert!(r.report().problems.iter().any(|p| p.hint.as_deref() == Some("keeping the pod CIDRs read before")));
}

/// The exempt destinations of the IPv4 masquerade table, and those the rules send to table 52
/// (the tailnet ranges left out), after the last pass.
fn scope(dp: &FakeDp) -> (BTreeSet<IpNetwork>, BTreeSet<IpNetwork>) {
    let d = dp.lock();
    let masq = d.masq.last().cloned().unwrap();
    let to_52 = d
        .rules
        .last()
        .unwrap()
        .iter()
        .filter(|r| r.table() == Some(crate::agent::hostnet::TAILSCALE_TABLE))
        .filter_map(|r| r.dst)
        .filter(|n| !crate::agent::hostnet::tailnet_ranges().contains(n))
        .collect();
    (masq[0].exempt_destinations.iter().copied().collect(), to_52)
}

#[tokio::test]
async fn masquerade_and_routing_are_scoped_to_the_cluster_never_to_peer_routes() {
    let w = world(|_| {});
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&[]);
    // A subnet router that does not know pods, an exit node, and a peer advertising the underlay.
    let peer = |name: &str, routes: &[&str]| NodeStatus {
        host_name: name.into(),
        tailscale_ips: vec!["100.64.0.9".parse().unwrap()],
        allowed_ips: routes.iter().map(|r| r.to_string()).collect(),
        primary_routes: routes.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    };
    ts.lock().peers = vec![
        peer("other-cluster-node", &["10.50.0.0/24"]),
        peer("exit", &["0.0.0.0/0", "::/0"]),
        peer("lan", &["192.168.1.0/24"]),
    ];
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    let specs = dp.lock().masq.last().cloned().unwrap();
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].sources, vec![net("10.244.1.0/24")]);
    let (exempt, to_52) = scope(&dp);
    assert_eq!(exempt, nets(&["10.244.0.0/16", "10.96.0.0/12", "100.64.0.0/10"]));
    assert_eq!(to_52, nets(&["10.244.0.0/16"]));
    assert_eq!(r.report().cluster_destinations, vec![net("10.244.0.0/16")]);
    assert_eq!(dp.lock().unreachable.last().unwrap(), &vec![net("10.244.1.0/24")]);
    assert!(dp.lock().guards > 0, "the guard is checked in every pass");

    // No cluster CIDR, but the Nodes are known: their pod CIDRs, and nothing else.
    let w0 = world(|c| c.cluster_cidrs.clear());
    cidrs.set_cluster(Some(ClusterCidrs {
        cidrs: nets(&["10.244.1.0/24", "10.244.2.0/24"]).into_iter().collect(),
        synced: true,
        problems: vec![],
    }));
    let mut r = reconciler(&w0, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Waiting, "pending approval only");
    let (exempt, to_52) = scope(&dp);
    assert_eq!(exempt, nets(&["10.244.1.0/24", "10.244.2.0/24", "10.96.0.0/12", "100.64.0.0/10"]));
    assert_eq!(to_52, nets(&["10.244.1.0/24", "10.244.2.0/24"]));

    // The Nodes are not listed yet: waiting, only the own pod CIDR exempt.
    cidrs.set_cluster(Some(ClusterCidrs {
        cidrs: vec![],
        synced: false,
        problems: vec!["listing the Nodes: 403".into()],
    }));
    r.reconcile().await;
    let (exempt, to_52) = scope(&dp);
    assert_eq!(exempt, nets(&["10.244.1.0/24", "10.96.0.0/12", "100.64.0.0/10"]));
    assert!(to_52.is_empty());
    let p = r.report().problems.iter().find(|p| p.id == "dataplane/cluster_cidrs").cloned().unwrap();
    assert_eq!(p.severity, Severity::Waiting);
    assert!(p.message.contains("403"), "{p:?}");

    // Neither a cluster CIDR nor the Nodes: the own pod CIDR only, reported.
    cidrs.set_cluster(None);
    r.reconcile().await;
    let (exempt, _) = scope(&dp);
    assert_eq!(exempt, nets(&["10.244.1.0/24", "10.96.0.0/12", "100.64.0.0/10"]));
    let p = r.report().problems.iter().find(|p| p.id == "dataplane/cluster_cidrs").cloned().unwrap();
    assert_eq!(p.severity, Severity::Warning);
    assert!(p.message.contains("only this node's pod CIDRs"), "{p:?}");
    assert!(r.report().ready, "a warning: the node works");

    let w2 = world(|c| c.masquerade = false);
    let mut r = reconciler(&w2, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    assert!(dp.lock().masq.last().unwrap().is_empty(), "disabled: the tables are removed");

    dp.lock().fail_masq = true;
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.reconcile().await, PassOutcome::Failed);
    assert!(r.report().problems.iter().any(|p| p.id == "dataplane/masquerade"));
    assert!(nodefile::path_in(&w.cfg.run_dir).exists());
}

#[tokio::test]
async fn mtu_follows_the_tailnet_unless_set() {
    let w = world(|_| {});
    let (cidrs, ts) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::running(&[]));
    let dp = FakeDp::default();
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    assert!(r.report().problems.iter().any(|p| p.id == "dataplane/mtu"), "no interface yet: waiting");
    assert!(!nodefile::path_in(&w.cfg.run_dir).exists());
    dp.lock().link = Some(("tailscale0".into(), 1230));
    r.reconcile().await;
    assert_eq!(NodeFile::load(&nodefile::path_in(&w.cfg.run_dir)).unwrap().unwrap().mtu, Some(1230));

    let w2 = world(|c| c.mtu = Some(1400));
    let mut r = reconciler(&w2, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    let p = r.report().problems.iter().find(|p| p.id == "dataplane/mtu_above_tailnet").unwrap();
    assert_eq!(p.severity, Severity::Warning);
    assert!(p.message.contains("larger than tailscale0's MTU 1230") && p.message.contains("are lost"), "{p:?}");
    assert!(p.hint.as_deref().unwrap().contains("--mtu auto"), "{p:?}");
    assert!(!r.report().ready, "a pod MTU above the tailnet's is not ready");
}

#[tokio::test]
async fn a_pasted_conflist_mtu_above_the_tailnets_is_reported_and_not_ready() {
    let w = world(|_| {});
    let (cidrs, ts, dp) =
        (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::running(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    assert_eq!(r.reconcile().await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert!(r.report().ready && probe(&w, "/readyz") == 200);

    // The documented seed configuration, as a user pastes it: "mtu": 1420.
    let seed = w.cfg.conf_dir.join("05-tailscale-cni.conf");
    std::fs::write(
        &seed,
        r#"{"cniVersion":"1.0.0","name":"tailscale-cni","type":"headcni","mtu":1420,
        "ipam":{"type":"host-local","subnet":"10.244.1.0/24"}}"#,
    )
    .unwrap();
    assert_eq!(r.reconcile().await, PassOutcome::Converged, "the rest goes on");
    let p = r.report().problems.iter().find(|p| p.id == "dataplane/mtu_above_tailnet").expect("reported");
    assert!(p.message.contains("05-tailscale-cni.conf sets the pod MTU to 1420, above tailscale0's MTU 1280"), "{p:?}");
    assert!(p.message.contains("are lost") && p.hint.as_deref().unwrap().contains("remove \"mtu\""), "{p:?}");
    assert!(!r.report().ready);
    assert_eq!(probe(&w, "/readyz"), 503);
    let text = w.metrics.encode();
    assert!(text.contains("headcni_pod_mtu_bytes 1420") && text.contains("headcni_tailnet_mtu_bytes 1280"), "{text}");
    assert_eq!(r.report().cni_config.as_ref().unwrap().mtu, Some(1420));

    std::fs::write(
        &seed,
        r#"{"cniVersion":"1.0.0","name":"tailscale-cni","type":"headcni","mtu":1280,
        "ipam":{"type":"host-local","subnet":"10.244.1.0/24"}}"#,
    )
    .unwrap();
    r.reconcile().await;
    assert!(r.report().ready, "{:?}", r.report().problems);
}

/// A node with its pod CIDR, tailscaled running and already advertising it, and a tailnet link.
fn advertising_node() -> (FakeCidrs, FakeTs, FakeDp) {
    let (cidrs, ts, dp) =
        (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::running(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    (cidrs, ts, dp)
}

#[tokio::test]
async fn another_networks_conflist_sorting_first_is_loud_and_not_ready() {
    let w = world(|_| {});
    let (cidrs, ts, dp) = advertising_node();
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    let leftover = w.cfg.conf_dir.join("10-flannel.conflist");
    std::fs::write(&leftover, r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#).unwrap();
    assert_eq!(r.reconcile().await, PassOutcome::Converged);
    let p = r.report().problems.iter().find(|p| p.id == "cni_config").expect("reported");
    assert!(p.message.contains("uses 10-flannel.conflist") && p.message.contains("sorts before 10-headcni.conflist"));
    assert!(p.hint.as_deref().unwrap().contains("cni.exclusive=true"), "{p:?}");
    assert!(!r.report().ready);
    assert_eq!(probe(&w, "/readyz"), 503);
    assert!(nodefile::path_in(&w.cfg.run_dir).exists(), "the node is kept as it should be meanwhile");
    std::fs::remove_file(&leftover).unwrap();
    r.reconcile().await;
    assert!(r.report().ready && probe(&w, "/readyz") == 200, "{:?}", r.report().problems);
}

#[tokio::test]
async fn tailscaleds_link_monitor_is_prompted_once_per_interface() {
    let w = world(|_| {});
    let (cidrs, ts, dp) = advertising_node();
    dp.lock().link_index = 7;
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    r.reconcile().await;
    let ips: Vec<IpAddr> = vec!["100.64.0.1".parse().unwrap()];
    assert_eq!(dp.lock().announced, vec![ips], "once, with the node's tailnet addresses");
    // tailscaled restarted: a new interface with the same addresses.
    dp.lock().link_index = 8;
    r.reconcile().await;
    r.reconcile().await;
    assert_eq!(dp.lock().announced.len(), 2);
}

#[tokio::test]
async fn exclusive_sets_aside_every_other_network_whenever_it_appears() {
    let w = world(|c| c.exclusive = true);
    let (cidrs, ts, dp) = advertising_node();
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    let dir = w.cfg.conf_dir.clone();
    assert_eq!(r.reconcile().await, PassOutcome::Converged);
    assert!(r.report().ready, "{:?}", r.report().problems);
    // Another CNI drops its configuration while the agent runs: before HeadCNI's and after.
    let flannel = r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#;
    std::fs::write(dir.join("05-flannel.conflist"), flannel).unwrap();
    std::fs::write(dir.join("99-bridge.conf"), r#"{"name":"br","type":"bridge"}"#).unwrap();
    // One whose set-aside name is taken stays (an earlier copy is never overwritten).
    std::fs::write(dir.join("07-old.conf"), r#"{"name":"old","type":"bridge"}"#).unwrap();
    std::fs::write(dir.join("07-old.conf.headcni-aside"), "earlier copy").unwrap();
    r.reconcile().await;
    assert_eq!(std::fs::read_to_string(dir.join("05-flannel.conflist.headcni-aside")).unwrap(), flannel);
    assert!(!dir.join("05-flannel.conflist").exists() && dir.join("99-bridge.conf.headcni-aside").exists());
    assert_eq!(std::fs::read_to_string(dir.join("07-old.conf.headcni-aside")).unwrap(), "earlier copy");
    assert!(dir.join("07-old.conf").exists());
    assert!(dir.join("10-headcni.conflist").exists(), "HeadCNI's own stays");
    // The one left in place sorts first: reported as without --exclusive.
    let p = r.report().problems.iter().find(|p| p.id == "cni_config").expect("reported");
    assert!(p.message.contains("uses 07-old.conf"), "{p:?}");
    std::fs::remove_file(dir.join("07-old.conf.headcni-aside")).unwrap();
    r.reconcile().await;
    assert!(r.report().ready, "{:?}", r.report().problems);
    assert!(dir.join("07-old.conf.headcni-aside").exists());

    // The uninstall puts every one of them back, and removes HeadCNI's.
    let out = crate::install::remove_installed(None, &[dir.join("10-headcni.conflist")]).unwrap();
    assert_eq!(out.changed.len(), 4, "{:?}", out.changed);
    assert_eq!(std::fs::read_to_string(dir.join("05-flannel.conflist")).unwrap(), flannel);
    assert!(dir.join("99-bridge.conf").exists() && dir.join("07-old.conf").exists());
    assert!(!dir.join("10-headcni.conflist").exists());
}

#[tokio::test]
async fn the_report_says_when_the_next_is_due_and_status_serves_it() {
    let w = world(|_| {});
    let (cidrs, ts, dp) =
        (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::running(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    r.announce_next_pass(Duration::from_secs(5));
    let stored = crate::agent::report::AgentReport::load(&w.cfg.run_dir).unwrap();
    let interval = stored.report_interval_secs.unwrap();
    assert!((5..=6).contains(&interval), "{interval}");
    let served = crate::agent::serve::route(&hyper::Method::GET, "/status", None, "/metrics", &w.metrics, &w.health);
    assert_eq!(served.status(), 200);
    // The next pass keeps the announcement until the loop makes a new one.
    r.reconcile().await;
    assert_eq!(crate::agent::report::AgentReport::load(&w.cfg.run_dir).unwrap().report_interval_secs, Some(interval));
}

#[tokio::test]
async fn cleanup_undoes_only_what_headcni_did() {
    let w = world(|c| c.api_key = Some(SecretSource::Value(Secret::new("api".into()))));
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["192.168.7.0/24"]);
    let hs = FakeHs::with(vec![
        hs_node("2", "nodekey:other", &["10.244.2.0/24"], &["10.244.2.0/24"]),
        hs_node("1", KEY, &["192.168.7.0/24", "10.244.1.0/24"], &["192.168.7.0/24"]),
    ]);
    reconciler(&w, &cidrs, &ts, Some(&hs), &dp).reconcile().await;
    assert_eq!(ts.routes(), vec!["192.168.7.0/24", "10.244.1.0/24"]);

    let errors = cleanup_with(&w.cfg, &ts, Some(&hs), &dp, CleanupScope::Full).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(ts.routes(), vec!["192.168.7.0/24"], "the operator's route stays");
    {
        let h = hs.lock();
        assert_eq!(h.nodes[1].approved_routes, Some(vec!["192.168.7.0/24".to_string()]));
        assert_eq!(h.nodes[0].approved_routes, Some(vec!["10.244.2.0/24".to_string()]), "other node untouched");
    }
    assert_eq!(dp.lock().removed_rules, 1);
    assert_eq!(dp.lock().removed_unreachable, 1);
    assert_eq!(dp.lock().removed_guard, 1, "a node that leaves HeadCNI loses the guard too");
    assert_eq!(dp.lock().removed_tables, 1);
    assert!(!nodefile::path_in(&w.cfg.run_dir).exists());
    assert!(!state::path_in(&w.cfg.state_dir).exists());
    // Twice is fine.
    assert!(cleanup_with(&w.cfg, &ts, Some(&hs), &dp, CleanupScope::Full).await.is_empty());

    // tailscaled unreachable: the failure is reported and the record kept for a retry.
    let w = world(|_| {});
    let ts = FakeTs::running(&[]);
    reconciler(&w, &cidrs, &ts, None, &dp).reconcile().await;
    ts.lock().reachable = false;
    let errors = cleanup_with(&w.cfg, &ts, None::<&FakeHs>, &dp, CleanupScope::Full).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(state(&w).advertised_routes, nets(&["10.244.1.0/24"]));
    let _ = &w.dir;
}

#[test]
fn delays_are_bounded() {
    assert_eq!(next_delay(PassOutcome::Converged, 0, false), STEADY_INTERVAL);
    assert_eq!(next_delay(PassOutcome::Failed, 3, true), Duration::from_millis(250));
    for streak in 0..100 {
        let d = next_delay(PassOutcome::Failed, streak, false);
        assert!(d >= Duration::from_millis(500) && d <= MAX_BACKOFF + MAX_BACKOFF / 10, "{d:?}");
        assert!(next_delay(PassOutcome::Waiting, streak, false) <= Duration::from_secs(33));
    }
    assert!(next_delay(PassOutcome::Failed, 10, false) >= Duration::from_secs(54));
}

fn arb_net() -> impl Strategy<Value = IpNetwork> {
    (0u8..4, 20u8..=26).prop_map(|(third, p)| {
        let n = ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::new(10, 244, third * 64, 0), p).unwrap();
        IpNetwork::V4(ipnetwork::Ipv4Network::new(n.network(), p).unwrap())
    })
}

proptest! {
    /// Routes HeadCNI did not add are never dropped; desired routes are always present.
    #[test]
    fn route_merge_never_drops_foreign_routes(
        current in proptest::collection::vec(arb_net(), 0..6),
        desired in proptest::collection::btree_set(arb_net(), 0..3),
        ours in proptest::collection::btree_set(arb_net(), 0..4),
    ) {
        let cur: Vec<String> = current.iter().map(ToString::to_string).collect();
        let (out, added, removed) = merge_routes(&cur, &desired, &ours);
        let out_set: BTreeSet<IpNetwork> = out.iter().map(|s| s.parse().unwrap()).collect();
        for c in &current {
            if !ours.contains(c) || desired.contains(c) {
                prop_assert!(out_set.contains(c), "{} dropped", c);
            }
        }
        prop_assert!(desired.is_subset(&out_set));
        for r in &removed {
            prop_assert!(ours.contains(r) && !desired.contains(r));
        }
        prop_assert!(added.is_disjoint(&current.iter().copied().collect()));
    }

    /// Never approves what the node does not advertise; keeps approvals HeadCNI did not make.
    #[test]
    fn approval_merge_is_conservative(
        approved in proptest::collection::btree_set(arb_net(), 0..4),
        available in proptest::collection::btree_set(arb_net(), 0..4),
        desired in proptest::collection::btree_set(arb_net(), 0..3),
        ours in proptest::collection::btree_set(arb_net(), 0..4),
    ) {
        let next = merge_approvals(&approved, &available, &desired, &ours);
        for r in next.difference(&approved) {
            prop_assert!(available.contains(r) && desired.contains(r));
        }
        for r in approved.difference(&next) {
            prop_assert!(ours.contains(r) && !desired.contains(r));
        }
    }
}

// ---- the uninstall signal -----------------------------------------------------------------

fn signal(s: Signal) -> SignalState {
    SignalState { signal: s, problem: None }
}

fn probe(w: &World, path: &str) -> u16 {
    crate::agent::serve::route(&hyper::Method::GET, path, None, "/metrics", &w.metrics, &w.health).status().as_u16()
}

#[tokio::test]
async fn uninstall_signal_tears_down_stops_and_resumes() {
    let w = world(|c| c.api_key = Some(SecretSource::Value(Secret::new("api".into()))));
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&["192.168.7.0/24"]);
    let hs = FakeHs::with(vec![
        hs_node("2", "nodekey:other", &["10.244.2.0/24"], &["10.244.2.0/24"]),
        hs_node("1", KEY, &["192.168.7.0/24", "10.244.1.0/24"], &["192.168.7.0/24"]),
    ]);
    let mut r = reconciler(&w, &cidrs, &ts, Some(&hs), &dp);
    assert_eq!(r.pass(&signal(Signal::Normal)).await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert!(w.health.is_ready());
    assert_eq!(ts.routes(), vec!["192.168.7.0/24", "10.244.1.0/24"]);
    assert_eq!(hs.lock().nodes[1].approved_routes, Some(vec!["10.244.1.0/24".into(), "192.168.7.0/24".into()]));

    // "true": the cleanup, the node file kept, not ready, alive.
    assert_eq!(r.pass(&signal(Signal::Teardown)).await, PassOutcome::Converged);
    assert_eq!(r.mode(), Mode::TornDown);
    assert_eq!(ts.routes(), vec!["192.168.7.0/24"], "only HeadCNI's route is withdrawn");
    assert_eq!(hs.lock().nodes[1].approved_routes, Some(vec!["192.168.7.0/24".into()]));
    assert_eq!(hs.lock().nodes[0].approved_routes, Some(vec!["10.244.2.0/24".into()]), "other node untouched");
    assert_eq!(dp.lock().removed_rules, 1);
    assert_eq!(dp.lock().removed_unreachable, 1);
    assert_eq!(dp.lock().removed_guard, 0, "the pods that stay keep their guard");
    assert_eq!(dp.lock().removed_tables, 1);
    assert!(nodefile::path_in(&w.cfg.run_dir).exists(), "running pods keep working on the node");
    assert!(!state::path_in(&w.cfg.state_dir).exists(), "nothing left to withdraw");
    assert!(!w.health.is_ready());
    assert_eq!(probe(&w, "/readyz"), 503);
    assert_eq!(probe(&w, "/healthz"), 200);
    let report = crate::agent::report::AgentReport::load(&w.cfg.run_dir).unwrap();
    assert_eq!(report.teardown, "done");
    assert!(!report.ready && report.routes.iter().all(|r| !r.advertised));
    assert!(w.metrics.encode().contains("headcni_ready 0"));

    // Torn down: no more reconciling, whatever the signal says short of "false".
    let edits = ts.lock().edits.len();
    let approvals = hs.lock().approvals.len();
    let (rules, fwd) = {
        let d = dp.lock();
        (d.rules.len(), d.forwarding.len())
    };
    for s in [
        signal(Signal::Teardown),
        SignalState { signal: Signal::Absent, problem: Some("the ConfigMap does not exist".into()) },
        SignalState { signal: Signal::Teardown, problem: Some("reading the uninstall signal: 503".into()) },
        signal(Signal::Unknown),
    ] {
        assert_eq!(r.pass(&s).await, PassOutcome::Converged);
        assert_eq!(r.mode(), Mode::TornDown, "{s:?}");
    }
    assert_eq!(ts.lock().edits.len(), edits, "nothing advertised");
    assert_eq!(hs.lock().approvals.len(), approvals);
    {
        let d = dp.lock();
        assert_eq!((d.rules.len(), d.forwarding.len(), d.removed_rules), (rules, fwd, 1));
    }
    assert_eq!(probe(&w, "/readyz"), 503);
    assert_eq!(probe(&w, "/healthz"), 200);

    // Back to "false" (helm rollback after an aborted uninstall): normal again.
    assert_eq!(r.pass(&signal(Signal::Normal)).await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert_eq!(r.mode(), Mode::Normal);
    assert_eq!(ts.routes(), vec!["192.168.7.0/24", "10.244.1.0/24"]);
    assert_eq!(hs.lock().nodes[1].approved_routes, Some(vec!["10.244.1.0/24".into(), "192.168.7.0/24".into()]));
    assert_eq!(state(&w).advertised_routes, nets(&["10.244.1.0/24"]));
    assert!(w.health.is_ready());
    assert_eq!(probe(&w, "/readyz"), 200);
    assert_eq!(crate::agent::report::AgentReport::load(&w.cfg.run_dir).unwrap().teardown, "");
}

#[tokio::test]
async fn teardown_at_start_never_advertises_or_joins() {
    // A previous run advertised the pod CIDR and recorded it.
    let w = world(|c| c.auth_key = Some(SecretSource::Value(Secret::new("hskey-auth-test".into()))));
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&[]);
    reconciler(&w, &cidrs, &ts, None, &dp).reconcile().await;
    assert_eq!(ts.routes(), vec!["10.244.1.0/24"]);
    let edits = ts.lock().edits.len();

    // The agent restarts while the signal says "true": its first pass withdraws, nothing more.
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.pass(&signal(Signal::Teardown)).await, PassOutcome::Converged);
    assert!(ts.routes().is_empty());
    {
        let s = ts.lock();
        assert_eq!(s.edits.len(), edits + 1);
        assert_eq!(s.edits[edits].route_all, None, "the withdrawal edits AdvertiseRoutes only");
        assert_eq!(s.edits[edits].advertise_routes, Some(vec![]));
    }
    assert!(!w.health.is_ready());

    // A fresh node under the signal: no join, no advertisement.
    let w = world(|c| c.auth_key = Some(SecretSource::Value(Secret::new("hskey-auth-test".into()))));
    let ts = FakeTs::fresh();
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.pass(&signal(Signal::Teardown)).await;
    r.pass(&signal(Signal::Teardown)).await;
    {
        let t = ts.lock();
        assert!(t.starts.is_empty() && t.edits.is_empty() && t.logins == 0);
    }
    assert!(!nodefile::path_in(&w.cfg.run_dir).exists(), "nothing written either");
}

#[tokio::test]
async fn a_failing_teardown_keeps_readiness_and_is_retried() {
    let w = world(|_| {});
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&[]);
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.pass(&signal(Signal::Normal)).await;
    assert!(w.health.is_ready());

    ts.lock().reachable = false;
    assert_eq!(r.pass(&signal(Signal::Teardown)).await, PassOutcome::Failed);
    assert_eq!(r.mode(), Mode::TearingDown);
    assert!(w.health.is_ready(), "the hook must keep waiting for this node");
    let p = r.report().problems.iter().find(|p| p.id == "teardown").unwrap();
    assert!(p.message.starts_with("uninstall: withdrawing routes"), "{p:?}");
    assert_eq!(r.report().teardown, "in progress");
    assert_eq!(state(&w).advertised_routes, nets(&["10.244.1.0/24"]), "kept for the retry");

    // The ConfigMap vanishes meanwhile: the teardown goes on.
    ts.lock().reachable = true;
    let gone = SignalState { signal: Signal::Absent, problem: Some("gone".into()) };
    assert_eq!(r.pass(&gone).await, PassOutcome::Converged);
    assert_eq!(r.mode(), Mode::TornDown);
    assert!(ts.routes().is_empty());
    assert!(!w.health.is_ready());
}

#[tokio::test]
async fn an_unreadable_signal_is_a_warning_and_the_agent_runs_normally() {
    let w = world(|_| {});
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&[]);
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    for s in [Signal::Unknown, Signal::Absent] {
        let state = SignalState {
            signal: s,
            problem: Some("reading the uninstall signal: the Kubernetes API is not reachable".into()),
        };
        assert_eq!(r.pass(&state).await, PassOutcome::Converged, "{:?}", r.report().problems);
        assert_eq!(r.mode(), Mode::Normal);
        assert!(w.health.is_ready());
        let p = &r.report().problems[0];
        assert_eq!((p.id.as_str(), p.severity), ("uninstall_signal", Severity::Warning));
    }
    assert_eq!(ts.routes(), vec!["10.244.1.0/24"]);
    r.pass(&signal(Signal::Normal)).await;
    assert!(r.report().problems.is_empty(), "resolved once readable");
}

/// The chart's layout: install staged the conflist in the run dir and put the binaries in the
/// bin dir; the agent publishes the conflist into the conf dir.
fn with_cni_files(c: &mut AgentConfig) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let root = c.run_dir.parent().unwrap().to_path_buf();
    let (stage, conf, bin) = (root.join("run/staged"), root.join("net.d"), root.join("bin"));
    for d in [&stage, &conf, &bin] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The conf dir is the world's: nothing in it until the agent publishes.
    let _ = std::fs::remove_file(conf.join("10-headcni.conflist"));
    std::fs::write(
        stage.join("10-headcni.conflist"),
        r#"{"cniVersion":"1.0.0","name":"headcni","plugins":[{"type":"headcni"}]}"#,
    )
    .unwrap();
    std::fs::write(bin.join("headcni"), b"binary").unwrap();
    std::os::unix::fs::symlink("headcni", bin.join("headcni-ipam")).unwrap();
    c.cni_files = crate::agent::config::CniFiles {
        conflist: Some((stage.join("10-headcni.conflist"), conf.join("10-headcni.conflist"))),
        bin_dir: Some(bin.clone()),
    };
    (stage.join("10-headcni.conflist"), conf.join("10-headcni.conflist"), bin)
}

#[tokio::test]
async fn the_conflist_appears_only_once_pods_can_be_attached() {
    let mut paths = None;
    let w = world(|c| paths = Some(with_cni_files(c)));
    let (staged, published, _) = paths.unwrap();
    let (cidrs, ts, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeTs::running(&[]), FakeDp::with_link(1280));
    cidrs.set(Ok(None));
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    r.reconcile().await;
    assert!(!nodefile::path_in(&w.cfg.run_dir).exists());
    assert!(!published.exists(), "no pod CIDR yet: the runtime must not see the network as ready");
    assert!(!r.report().ready);

    cidrs.set(Ok(Some(vec![net("10.244.1.0/24")])));
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    assert_eq!(r.reconcile().await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert!(nodefile::path_in(&w.cfg.run_dir).exists());
    assert_eq!(std::fs::read(&published).unwrap(), std::fs::read(&staged).unwrap());
    assert!(r.report().ready);

    // Another network's conflist where HeadCNI's belongs: a problem, not ready, left alone.
    std::fs::write(&published, r#"{"name":"other","plugins":[{"type":"flannel"}]}"#).unwrap();
    r.reconcile().await;
    assert!(!r.report().ready);
    assert!(r.report().problems.iter().any(|p| p.id == "node_file/conflist"), "{:?}", r.report().problems);
    assert!(std::fs::read_to_string(&published).unwrap().contains("flannel"));
}

#[tokio::test]
async fn the_uninstall_removes_the_cni_files_and_a_rollback_puts_them_back() {
    let mut paths = None;
    let w = world(|c| paths = Some(with_cni_files(c)));
    let (staged, published, bin) = paths.unwrap();
    let (cidrs, dp) = (FakeCidrs::some(&["10.244.1.0/24"]), FakeDp::with_link(1280));
    let ts = FakeTs::running(&[]);
    ts.lock().self_routes = vec!["10.244.1.0/24".into()];
    let mut r = reconciler(&w, &cidrs, &ts, None, &dp);
    assert_eq!(r.pass(&signal(Signal::Normal)).await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert!(published.exists());

    assert_eq!(r.pass(&signal(Signal::Teardown)).await, PassOutcome::Converged);
    assert_eq!(r.mode(), Mode::TornDown);
    assert!(!published.exists(), "the runtime no longer sees HeadCNI's network");
    assert!(!bin.join("headcni").exists() && std::fs::symlink_metadata(bin.join("headcni-ipam")).is_err());
    assert!(staged.exists(), "kept in the run dir for a rollback");

    assert_eq!(r.pass(&signal(Signal::Normal)).await, PassOutcome::Converged, "{:?}", r.report().problems);
    assert!(published.exists(), "republished");
    assert_eq!(std::fs::read(bin.join("headcni")).unwrap(), std::fs::read(std::env::current_exe().unwrap()).unwrap());
    assert_eq!(std::fs::read_link(bin.join("headcni-ipam")).unwrap(), std::path::Path::new("headcni"));
}
