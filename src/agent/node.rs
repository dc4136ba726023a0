//! The pod CIDRs: this node's from `--pod-cidr`, or from `spec.podCIDR(s)` of this node's Node
//! object in the Kubernetes API (one GET through [`crate::clients::kube`], with the in-cluster
//! service account or a kubeconfig); and, in Kubernetes mode, every other node's, from all the
//! Node objects ([`NodeCidrs::start_cluster_watch`]: a list, then a watch). Node data is
//! untrusted: every CIDR is parsed, checked ([`crate::cidr::check`]) and at most one per
//! family, and anything odd is an error rather than a guess.
//!
//! podCIDRs are immutable once set (the API server refuses changes), so polling this node's is
//! enough: often while none is assigned, rarely afterwards. The others' are followed as they
//! come: a node gets its podCIDR when it registers, before its agent can even join the tailnet,
//! so every agent knows a new node's pod CIDR before its first packet arrives.

use crate::clients::kube::{Kind, Kube, KubeError, ObjectRef};
use hyper::StatusCode;
use ipnetwork::IpNetwork;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("Node {name} does not exist (is NODE_NAME / --node-name right?)")]
    NotFound { name: String },
    #[error(
        "the Kubernetes API refused to read Node {name} ({status}: {msg}): the agent's service account needs \"get\" on nodes"
    )]
    Denied { name: String, status: StatusCode, msg: String },
    #[error("the Kubernetes API answered {status} for Node {name}: {msg}")]
    Status { name: String, status: StatusCode, msg: String },
    #[error("Node {name}: {msg}")]
    Invalid { name: String, msg: String },
}

/// What a source knows of every node's pod CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterCidrs {
    /// Every node's accepted pod CIDRs (this node's included), sorted, each once.
    pub cidrs: Vec<IpNetwork>,
    /// The Nodes have been listed at least once: until then `cidrs` says nothing.
    pub synced: bool,
    /// Why the list may be stale (the API fails), and the Nodes whose podCIDRs were refused.
    pub problems: Vec<String>,
}

/// Where the pod CIDRs come from (a seam for unit tests).
pub trait PodCidrSource: Send + Sync {
    /// The node's pod CIDRs, or `None` while none is assigned.
    fn pod_cidrs(&self) -> impl Future<Output = Result<Option<Vec<IpNetwork>>, NodeError>> + Send;
    /// "flag" or "node", for status and logs.
    fn kind(&self) -> &'static str;
    /// How often to ask again once CIDRs are known.
    fn refresh_interval(&self) -> Duration;
    /// Every node's pod CIDRs, where the source follows them (Kubernetes); `None` where it
    /// knows only this node's (`--pod-cidr`).
    fn cluster_cidrs(&self) -> Option<ClusterCidrs> {
        None
    }
}

/// `--pod-cidr`: fixed.
#[derive(Debug, Clone)]
pub struct StaticCidrs(pub Vec<IpNetwork>);

impl PodCidrSource for StaticCidrs {
    async fn pod_cidrs(&self) -> Result<Option<Vec<IpNetwork>>, NodeError> {
        Ok(Some(self.0.clone()))
    }
    fn kind(&self) -> &'static str {
        "flag"
    }
    fn refresh_interval(&self) -> Duration {
        Duration::from_secs(24 * 3600)
    }
}

/// Checks a node name before it goes into a URL path (RFC 1123 subdomain).
pub fn validate_node_name(name: &str) -> Result<(), String> {
    if crate::clients::kube::is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid node name (a lowercase RFC 1123 subdomain)"))
    }
}

fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = s.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
    crate::cidr::check(&net)?;
    let max = if net.is_ipv4() { 30 } else { 126 };
    if net.prefix() > max {
        return Err(format!("{s}: a pod CIDR needs room for pods (at most /{max})"));
    }
    Ok(net)
}

/// Validates a list of pod CIDRs: canonical, at most two, at most one per family.
pub fn validate_pod_cidrs(list: &[String]) -> Result<Vec<IpNetwork>, String> {
    if list.len() > 2 {
        return Err(format!("{} pod CIDRs (at most one IPv4 and one IPv6)", list.len()));
    }
    let nets: Vec<IpNetwork> = list.iter().map(|s| parse_cidr(s.trim())).collect::<Result<_, _>>()?;
    if nets.len() == 2 && nets[0].is_ipv4() == nets[1].is_ipv4() {
        return Err(format!("two pod CIDRs of the same family: {} and {}", nets[0], nets[1]));
    }
    Ok(nets)
}

/// The pod CIDRs of a Node object (JSON from the API server). `Ok(None)`: none assigned yet.
pub fn parse_node(name: &str, body: &[u8]) -> Result<Option<Vec<IpNetwork>>, NodeError> {
    let node: Value = serde_json::from_slice(body)
        .map_err(|e| NodeError::Invalid { name: name.to_string(), msg: format!("not JSON: {e}") })?;
    node_cidrs(name, &node)
}

/// The pod CIDRs of Node `name`, decoded. `Ok(None)`: none assigned yet.
pub fn node_cidrs(name: &str, node: &Value) -> Result<Option<Vec<IpNetwork>>, NodeError> {
    let invalid = |msg: String| NodeError::Invalid { name: name.to_string(), msg };
    if node.get("kind").and_then(Value::as_str).is_some_and(|k| k != "Node") {
        return Err(invalid("the answer is not a Node".into()));
    }
    match node.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if n == name => {}
        other => return Err(invalid(format!("the answer names node {other:?}"))),
    }
    let spec = match node.get("spec") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(spec)) => spec,
        Some(_) => return Err(invalid("spec is not an object".into())),
    };
    let single = match spec.get("podCIDR") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("spec.podCIDR is not a string".into())),
    };
    let list: Vec<String> = match spec.get("podCIDRs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| invalid("spec.podCIDRs holds a non-string".into())))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("spec.podCIDRs is not a list".into())),
    };
    let list = match (single, list.is_empty()) {
        (None, true) => return Ok(None),
        (Some(s), true) => vec![s],
        (Some(s), false) if s != list[0] => {
            return Err(invalid(format!("spec.podCIDR {s} differs from spec.podCIDRs[0] {}", list[0])));
        }
        (_, false) => list,
    };
    validate_pod_cidrs(&list).map(Some).map_err(invalid)
}

/// A client for one Node, and optionally the follower of all of them.
#[derive(Debug, Clone)]
pub struct NodeCidrs {
    node: ObjectRef,
    kube: Kube,
    cluster: Option<Arc<Mutex<ClusterCidrs>>>,
}

impl NodeCidrs {
    /// Node `name` through `kube`.
    pub fn new(name: &str, kube: Kube) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        let node = ObjectRef::node(name).map_err(|e| NodeError::Setup(e.to_string()))?;
        Ok(Self { node, kube, cluster: None })
    }

    /// The in-cluster service account.
    pub fn in_cluster(name: &str) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        Self::new(name, Kube::in_cluster()?)
    }

    /// The current context of a kubeconfig file.
    pub fn from_kubeconfig(name: &str, path: &Path) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        Self::new(name, Kube::from_kubeconfig(path)?)
    }

    pub fn node_name(&self) -> &str {
        &self.node.name
    }

    /// Starts following every Node's pod CIDRs (a list, then a watch, again after every end)
    /// on a task of its own; `wake` is notified whenever the set of CIDRs changes. Answers the
    /// task (it runs until aborted).
    pub fn start_cluster_watch(&mut self, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let shared = Arc::new(Mutex::new(ClusterCidrs::default()));
        self.cluster = Some(shared.clone());
        let watcher = ClusterWatch { kube: self.kube.clone(), shared, wake, nodes: BTreeMap::new(), failures: 0 };
        tokio::spawn(watcher.run())
    }
}

/// How long the server keeps one watch of the Nodes open.
const CLUSTER_WATCH_SECONDS: u64 = 290;
/// Longest pause between attempts while the API fails.
const CLUSTER_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The follower of every Node's pod CIDRs.
struct ClusterWatch {
    kube: Kube,
    shared: Arc<Mutex<ClusterCidrs>>,
    wake: Arc<Notify>,
    /// Every Node by name: its CIDRs, or why they were refused.
    nodes: BTreeMap<String, Result<Vec<IpNetwork>, String>>,
    failures: u32,
}

fn resource_version(object: &Value) -> Option<String> {
    object.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(str::to_string)
}

impl ClusterWatch {
    /// What a Node object says, or `None` for an object without a name.
    fn decode(object: &Value) -> Option<(String, Result<Vec<IpNetwork>, String>)> {
        let name = object.pointer("/metadata/name").and_then(Value::as_str)?.to_string();
        let cidrs = match node_cidrs(&name, object) {
            Ok(c) => Ok(c.unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        };
        Some((name, cidrs))
    }

    /// Publishes the current view (`listed`: right after a list came through); wakes the loop
    /// when the CIDRs or the sync state changed.
    fn publish(&self, problem: Option<String>, listed: bool) {
        let mut cidrs: Vec<IpNetwork> =
            self.nodes.values().filter_map(|r| r.as_ref().ok()).flatten().copied().collect();
        cidrs.sort_by_key(|n| (n.is_ipv6(), n.network(), n.prefix()));
        cidrs.dedup();
        let mut problems: Vec<String> = problem.into_iter().collect();
        problems.extend(self.nodes.values().filter_map(|r| r.as_ref().err()).map(|e| format!("{e}: not exempt")));
        let mut state = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let synced = state.synced || listed;
        let changed = state.cidrs != cidrs || state.synced != synced;
        *state = ClusterCidrs { cidrs, synced, problems };
        drop(state);
        if changed {
            self.wake.notify_one();
        }
    }

    /// Lists the Nodes: answers the resource version to watch from.
    async fn list(&mut self) -> Result<Option<String>, String> {
        let list = self.kube.list(Kind::Node, "", "").await.map_err(|e| {
            let hint = match e {
                KubeError::Denied { .. } => " (the agent's service account needs list and watch on nodes)",
                _ => "",
            };
            format!("listing the Nodes: {e}{hint}")
        })?;
        let items = list.get("items").and_then(Value::as_array).ok_or("the Node list has no items")?;
        self.nodes = items.iter().filter_map(Self::decode).collect();
        self.publish(None, true);
        Ok(resource_version(&list))
    }

    /// Follows one watch until it ends.
    async fn follow(&mut self, mut rv: Option<String>) {
        let mut stream = match self.kube.watch_all(Kind::Node, "", rv.as_deref(), CLUSTER_WATCH_SECONDS).await {
            Ok(s) => s,
            Err(e) => {
                log::debug!("watching the Nodes: {e}");
                return;
            }
        };
        let idle = Duration::from_secs(CLUSTER_WATCH_SECONDS + 30);
        loop {
            let event = match tokio::time::timeout(idle, stream.next_event()).await {
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => {
                    log::debug!("watch of the Nodes: {e}");
                    return;
                }
            };
            if let Some(v) = resource_version(&event.object) {
                rv = Some(v);
            }
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    if let Some((name, cidrs)) = Self::decode(&event.object) {
                        self.nodes.insert(name, cidrs);
                        self.publish(None, false);
                    }
                }
                "DELETED" => {
                    if let Some((name, _)) = Self::decode(&event.object) {
                        self.nodes.remove(&name);
                        self.publish(None, false);
                    }
                }
                "BOOKMARK" => {}
                _ => {
                    // ERROR: typically 410 Gone (the version expired): list afresh.
                    log::debug!("watch of the Nodes: {} {} (at {rv:?})", event.kind, event.object);
                    return;
                }
            }
        }
    }

    async fn run(mut self) {
        loop {
            let rv = match self.list().await {
                Ok(rv) => {
                    self.failures = 0;
                    rv
                }
                Err(problem) => {
                    self.failures = self.failures.saturating_add(1);
                    self.publish(Some(problem), false);
                    let pause = Duration::from_secs(1).saturating_mul(1 << self.failures.min(6));
                    tokio::time::sleep(pause.min(CLUSTER_MAX_BACKOFF)).await;
                    continue;
                }
            };
            let opened = Instant::now();
            self.follow(rv).await;
            // A watch that ends at once must not turn into a tight loop of lists.
            if opened.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

impl PodCidrSource for NodeCidrs {
    async fn pod_cidrs(&self) -> Result<Option<Vec<IpNetwork>>, NodeError> {
        let name = self.node.name.clone();
        match self.kube.get_raw(&self.node).await {
            Ok(body) => parse_node(&name, &body),
            Err(KubeError::NotFound { .. }) => Err(NodeError::NotFound { name }),
            Err(KubeError::Denied { status, msg, .. }) => Err(NodeError::Denied { name, status, msg }),
            Err(KubeError::Status { status, msg, .. }) => Err(NodeError::Status { name, status, msg }),
            Err(e) => Err(e.into()),
        }
    }

    fn kind(&self) -> &'static str {
        "node"
    }

    fn refresh_interval(&self) -> Duration {
        Duration::from_secs(300)
    }

    fn cluster_cidrs(&self) -> Option<ClusterCidrs> {
        self.cluster.as_ref().map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::http::testserver;
    use crate::clients::kube::testpki;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn recorded_nodes() {
        assert_eq!(parse_node("node-1", &fixture("node-ipv4.json")).unwrap(), Some(nets(&["10.244.1.0/24"])));
        assert_eq!(
            parse_node("node-2", &fixture("node-dual-stack.json")).unwrap(),
            Some(nets(&["10.244.2.0/24", "fd00:10:244:2::/64"]))
        );
        assert_eq!(parse_node("node-3", &fixture("node-unassigned.json")).unwrap(), None);
        assert_eq!(
            parse_node("node-4", &fixture("node-legacy-podcidr-only.json")).unwrap(),
            Some(nets(&["10.42.4.0/24"]))
        );
        for (file, name, needle) in [
            ("node-host-bits.json", "node-5", "host bits"),
            ("node-inconsistent.json", "node-6", "differs"),
            ("node-same-family-twice.json", "node-7", "same family"),
            ("node-garbage-cidr.json", "node-8", "not a CIDR"),
        ] {
            let err = parse_node(name, &fixture(file)).unwrap_err().to_string();
            assert!(err.contains(needle), "{file}: {err}");
        }
        let err = parse_node("other", &fixture("node-ipv4.json")).unwrap_err().to_string();
        assert!(err.contains("names node"), "{err}");
    }

    #[test]
    fn node_names_are_checked_before_use() {
        assert!(validate_node_name("node-1.example.com").is_ok());
        for bad in ["", "Node1", "a/b", "../x", "-a", "a..b", &"a".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn gets_the_node_with_the_token() {
        let node = fixture("node-ipv4.json");
        let handler: testserver::Handler = Arc::new(move |s| {
            if s.headers.get("authorization").map(|h| h.as_bytes()) != Some(b"Bearer t0ken") {
                return (401, r#"{"kind":"Status","message":"Unauthorized"}"#.into());
            }
            match s.path.as_str() {
                "/api/v1/nodes/node-1" => (200, String::from_utf8(node.clone()).unwrap()),
                "/api/v1/nodes/denied" => {
                    (403, r#"{"kind":"Status","message":"nodes \"denied\" is forbidden: User \"system:serviceaccount:kube-system:headcni\" cannot get resource \"nodes\""}"#.into())
                }
                _ => (404, r#"{"kind":"Status","message":"not found"}"#.into()),
            }
        });
        let (_server, url) = testserver::tcp(handler).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "t0ken").unwrap();
        let kc = format!(
            "current-context: c\ncontexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n\
             clusters: [{{name: k, cluster: {{server: \"{url}\"}}}}]\nusers: [{{name: u, user: {{tokenFile: tok}}}}]\n"
        );
        std::fs::write(dir.path().join("config"), kc).unwrap();
        let c = NodeCidrs::from_kubeconfig("node-1", &dir.path().join("config")).unwrap();
        assert_eq!(c.pod_cidrs().await.unwrap(), Some(nets(&["10.244.1.0/24"])));
        let c = NodeCidrs::from_kubeconfig("denied", &dir.path().join("config")).unwrap();
        let err = c.pod_cidrs().await.unwrap_err().to_string();
        assert!(err.contains("needs \"get\" on nodes"), "{err}");
        let c = NodeCidrs::from_kubeconfig("node-9", &dir.path().join("config")).unwrap();
        assert!(matches!(c.pod_cidrs().await.unwrap_err(), NodeError::NotFound { .. }));
    }

    #[tokio::test]
    async fn in_cluster_over_tls_trusts_only_the_service_account_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, other) = (dir.path().join("pki"), dir.path().join("other"));
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        if testpki::make(&pki, "cluster-ca").is_none() || testpki::make(&other, "other-ca").is_none() {
            eprintln!("test skipped: no openssl tool to make certificates");
            return;
        }
        let node = fixture("node-ipv4.json");
        let handler: testserver::Handler = Arc::new(move |s| match (s.path.as_str(), s.headers.get("authorization")) {
            ("/api/v1/nodes/node-1", Some(a)) if a.as_bytes() == b"Bearer sa-token" => {
                (200, String::from_utf8(node.clone()).unwrap())
            }
            _ => (401, r#"{"message":"Unauthorized"}"#.into()),
        });
        let chain = std::fs::read(pki.join("srv.crt")).unwrap();
        let key = std::fs::read(pki.join("srv.key")).unwrap();
        let (_server, port) = testserver::tls(handler, &chain, &key).await;
        let sa = dir.path().join("sa");
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::copy(pki.join("ca.crt"), sa.join("ca.crt")).unwrap();
        std::fs::write(sa.join("token"), "sa-token\n").unwrap();
        let env = |k: &str| match k {
            "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some(port.to_string()),
            _ => None,
        };
        let c = NodeCidrs::new("node-1", Kube::in_cluster_at(&sa, env).unwrap()).unwrap();
        assert_eq!(c.pod_cidrs().await.unwrap(), Some(nets(&["10.244.1.0/24"])));
        // The token is read at every request: a rotated token is used at once.
        std::fs::write(sa.join("token"), "rotated").unwrap();
        assert!(matches!(c.pod_cidrs().await.unwrap_err(), NodeError::Denied { .. }));
        // A server the service account's CA did not sign is refused.
        std::fs::copy(other.join("ca.crt"), sa.join("ca.crt")).unwrap();
        let c = NodeCidrs::new("node-1", Kube::in_cluster_at(&sa, env).unwrap()).unwrap();
        let err = c.pod_cidrs().await.unwrap_err().to_string();
        assert!(err.contains("TLS handshake"), "{err}");
    }

    #[tokio::test]
    async fn every_nodes_pod_cidrs_are_followed_and_bad_ones_refused() {
        let node = |name: &str, cidr: &str| {
            serde_json::json!({"kind": "Node", "metadata": {"name": name, "resourceVersion": "5"},
                               "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
        };
        let list = serde_json::json!({"kind": "NodeList", "metadata": {"resourceVersion": "5"}, "items": [
            node("node-1", "10.244.1.0/24"), node("node-2", "10.244.2.0/24"), node("evil", "0.0.0.0/1"),
            {"kind": "Node", "metadata": {"name": "new"}, "spec": {}},
        ]});
        let events = [
            serde_json::json!({"type": "ADDED", "object": node("node-3", "10.244.3.0/24")}),
            serde_json::json!({"type": "DELETED", "object": node("node-2", "10.244.2.0/24")}),
        ]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
        let handler: testserver::Handler = Arc::new(move |s| match s.path.as_str() {
            p if p.starts_with("/api/v1/nodes?watch=1") && p.contains("resourceVersion=5") => (200, events.clone()),
            p if p.starts_with("/api/v1/nodes?labelSelector=") => (200, list.to_string()),
            _ => (404, r#"{"kind":"Status","message":"not found"}"#.into()),
        });
        let (_server, url) = testserver::tcp(handler).await;
        let dir = tempfile::tempdir().unwrap();
        let kc = format!(
            "current-context: c\ncontexts: [{{name: c, context: {{cluster: k}}}}]\n\
             clusters: [{{name: k, cluster: {{server: \"{url}\"}}}}]\n"
        );
        std::fs::write(dir.path().join("config"), kc).unwrap();
        let mut c = NodeCidrs::from_kubeconfig("node-1", &dir.path().join("config")).unwrap();
        assert_eq!(c.cluster_cidrs(), None, "not followed before it is started");
        let wake = Arc::new(Notify::new());
        let task = c.start_cluster_watch(wake.clone());
        tokio::time::timeout(Duration::from_secs(5), wake.notified()).await.unwrap();
        // The list, then the watch's events: node-3 came, node-2 went; "evil" is refused.
        let t0 = Instant::now();
        let view = loop {
            let v = c.cluster_cidrs().unwrap();
            if v.cidrs == nets(&["10.244.1.0/24", "10.244.3.0/24"]) {
                break v;
            }
            assert!(t0.elapsed() < Duration::from_secs(3), "{v:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(view.synced);
        assert_eq!(view.problems.len(), 1, "{view:?}");
        assert!(view.problems[0].contains("evil") && view.problems[0].contains("not exempt"), "{view:?}");
        task.abort();
    }

    proptest! {
        // Node JSON is untrusted: no input may panic, and whatever is accepted is canonical.
        #[test]
        fn any_pod_cidr_text_is_handled(a in ".{0,40}", b in "[0-9a-f:./]{0,40}", two in any::<bool>()) {
            let list = if two { vec![a.clone(), b.clone()] } else { vec![b.clone()] };
            let body = serde_json::json!({"kind": "Node", "metadata": {"name": "n"}, "spec": {"podCIDR": list[0], "podCIDRs": list}});
            if let Ok(Some(nets)) = parse_node("n", body.to_string().as_bytes()) {
                prop_assert!(!nets.is_empty() && nets.len() <= 2);
                for n in nets {
                    prop_assert_eq!(n.ip(), n.network());
                }
            }
        }

        #[test]
        fn valid_cidrs_are_accepted(o in any::<[u8; 4]>(), p in 8u8..=30) {
            let net = ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::from(o), p).unwrap();
            let canonical = IpNetwork::V4(ipnetwork::Ipv4Network::new(net.network(), p).unwrap());
            prop_assume!(crate::cidr::check(&canonical).is_ok());
            let body = serde_json::json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": [canonical.to_string()]}});
            prop_assert_eq!(parse_node("n", body.to_string().as_bytes()).unwrap(), Some(vec![canonical]));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_node("n", &bytes);
        }
    }
}
