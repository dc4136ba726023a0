//! The node's pod CIDRs: from `--pod-cidr`, or from `spec.podCIDR(s)` of this node's Node object
//! in the Kubernetes API, followed by a watch of that one Node (through [`crate::clients::kube`],
//! with the in-cluster service account or a kubeconfig): the assignment is seen the moment the
//! controller-manager makes it, and the reconcile loop is woken for it. In Kubernetes mode
//! without `--cluster-cidr`, every other node's pod CIDRs too ([`NodeCidrs::start_cluster_watch`],
//! a watcher of all Nodes): a node gets its podCIDR when it registers, before its agent can even
//! join the tailnet, so every agent knows a new node's pod CIDR before its first packet arrives.
//! Node data is untrusted: every CIDR is parsed, checked ([`crate::cidr::check`]) and at most one
//! per family, and anything odd is an error rather than a guess.
//!
//! The same Node carries the binding of [`crate::binding`]: the agent publishes its tailnet
//! node key there (controller mode) and reads the controller's approval status from it.

use super::metrics::ApiErrors;
use crate::clients::kube::{Kube, KubeError, ObjectRef};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("Node {name} does not exist (is NODE_NAME / --node-name right?)")]
    NotFound { name: String },
    #[error(
        "the Kubernetes API refused to read Node {name} ({status}: {msg}): the agent's service account needs \"get\", \"list\" and \"watch\" on nodes"
    )]
    Denied { name: String, status: u16, msg: String },
    #[error(
        "the Kubernetes API refused to annotate Node {name} ({status}: {msg}): the agent may set only the \
         headcni.io/node-key annotation of its own Node (RBAC \"patch\" on nodes, and the chart's \
         ValidatingAdmissionPolicy, which reads the node claim of the agent's token)"
    )]
    PublishDenied { name: String, status: u16, msg: String },
    #[error("the Kubernetes API answered {status} for Node {name}: {msg}")]
    Status { name: String, status: u16, msg: String },
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
    /// Resolves when what [`Self::pod_cidrs`] answers may have changed (never, for a fixed
    /// source): the loop runs a pass at once instead of waiting for its timer.
    fn changed(&self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
    /// Every node's pod CIDRs, where the source follows them (Kubernetes); `None` where it
    /// knows only this node's (`--pod-cidr`).
    fn cluster_cidrs(&self) -> Option<ClusterCidrs> {
        None
    }
    /// The binding as the Node carries it now (nothing, for a source without a Node).
    fn binding(&self) -> NodeBinding {
        NodeBinding::default()
    }
    /// Publishes this node's tailnet node key on the Node.
    fn publish_node_key(&self, _key: &str) -> impl Future<Output = Result<(), NodeError>> + Send {
        std::future::ready(Err(NodeError::Setup("publishing the node key needs the Node (--node-name)".into())))
    }
}

/// What the Node says of the binding: the node key published on it, and the controller's
/// approval status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeBinding {
    /// `None` before the Node was read.
    pub published: Option<Option<String>>,
    pub approval: Option<crate::binding::ApprovalStatus>,
}

impl NodeBinding {
    pub fn of(node: &Node) -> Self {
        Self {
            published: Some(crate::binding::annotation(node, crate::binding::NODE_KEY_ANNOTATION).map(str::to_string)),
            approval: crate::binding::ApprovalStatus::of(node),
        }
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

/// Checks a node name before it names anything (RFC 1123 subdomain).
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

/// The pod CIDRs of Node `name`. `Ok(None)`: none assigned yet.
pub fn node_pod_cidrs(name: &str, node: &Node) -> Result<Option<Vec<IpNetwork>>, NodeError> {
    let invalid = |msg: String| NodeError::Invalid { name: name.to_string(), msg };
    match node.metadata.name.as_deref() {
        Some(n) if n == name => {}
        other => return Err(invalid(format!("the answer names node {other:?}"))),
    }
    let Some(spec) = &node.spec else { return Ok(None) };
    let single = spec.pod_cidr.clone().filter(|s| !s.is_empty());
    let list = spec.pod_cidrs.clone().unwrap_or_default();
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

/// The pod CIDRs of a Node object as JSON (what the API server sends). `Ok(None)`: none
/// assigned yet.
pub fn parse_node(name: &str, body: &[u8]) -> Result<Option<Vec<IpNetwork>>, NodeError> {
    let invalid = |msg: String| NodeError::Invalid { name: name.to_string(), msg };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if value.get("kind").and_then(serde_json::Value::as_str).is_some_and(|k| k != "Node") {
        return Err(invalid("the answer is not a Node".into()));
    }
    let node: Node = serde_json::from_value(value).map_err(|e| invalid(format!("not a Node: {e}")))?;
    node_pod_cidrs(name, &node)
}

/// What the watch of the Node last said (`None` before its first answer).
type Reading = Option<Result<Option<Vec<IpNetwork>>, NodeError>>;

/// One Node, followed by a watch.
#[derive(Debug)]
pub struct NodeCidrs {
    name: String,
    kube: Kube,
    /// Every Node's pod CIDRs, once [`Self::start_cluster_watch`] started following them.
    cluster: Option<Arc<Mutex<ClusterCidrs>>>,
    binding: watch::Receiver<NodeBinding>,
    /// The pass reads it (marking the reading seen); between passes the loop waits on it.
    reading: tokio::sync::Mutex<watch::Receiver<Reading>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NodeCidrs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn node_error(name: &str, e: KubeError) -> NodeError {
    let name = name.to_string();
    match e {
        KubeError::NotFound { .. } => NodeError::NotFound { name },
        KubeError::Denied { status, msg, .. } => NodeError::Denied { name, status, msg },
        KubeError::Status { status, msg, .. } => NodeError::Status { name, status, msg },
        e => e.into(),
    }
}

impl NodeCidrs {
    /// Node `name` through `kube`: starts its watch (needs a tokio runtime).
    pub fn new(name: &str, kube: Kube) -> Result<Self, NodeError> {
        Self::counted(name, kube, None)
    }

    /// The same, counting each failed read of the API in `errors`.
    pub fn counted(name: &str, kube: Kube, errors: Option<ApiErrors>) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        let node = ObjectRef::node(name).map_err(|e| NodeError::Setup(e.to_string()))?;
        let (tx, reading) = watch::channel(None);
        let (binding_tx, binding) = watch::channel(NodeBinding::default());
        let owned = name.to_string();
        let client = kube.clone();
        let task = tokio::spawn(async move {
            use futures::StreamExt;
            let events = client.watch_object::<Node>(&node);
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                if let (Err(_), Some(errors)) = (&event, &errors) {
                    errors.inc();
                }
                if let Ok(Some(n)) = &event {
                    binding_tx.send_if_modified(|b| {
                        let next = NodeBinding::of(n);
                        (*b != next).then(|| *b = next).is_some()
                    });
                }
                let next = match event {
                    Ok(Some(n)) => node_pod_cidrs(&owned, &n),
                    Ok(None) => Err(NodeError::NotFound { name: owned.clone() }),
                    // Pod CIDRs never change once assigned: while the API cannot be read, the
                    // last answer stands (the watch goes on trying).
                    Err(e) if matches!(*tx.borrow(), Some(Ok(_))) => {
                        log::debug!("watch of Node {owned}: {e}");
                        continue;
                    }
                    Err(e) => Err(node_error(&owned, e)),
                };
                tx.send_replace(Some(next));
            }
        });
        Ok(Self {
            name: name.to_string(),
            kube,
            cluster: None,
            binding,
            reading: tokio::sync::Mutex::new(reading),
            task,
        })
    }

    /// The in-cluster service account.
    pub fn in_cluster(name: &str) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        Self::new(name, Kube::in_cluster()?)
    }

    /// The current context of a kubeconfig file.
    pub async fn from_kubeconfig(name: &str, path: &Path) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        Self::new(name, Kube::from_kubeconfig(path).await?)
    }

    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// Starts following every Node's pod CIDRs on a task of its own (kube-rs's watcher: a
    /// list, then a watch, relisting and backing off by itself); `wake` is notified whenever
    /// the CIDRs or the sync state change. Answers the task (it runs until aborted).
    pub fn start_cluster_watch(&mut self, wake: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let shared = Arc::new(Mutex::new(ClusterCidrs::default()));
        self.cluster = Some(shared.clone());
        let follower = ClusterWatch { shared, wake, nodes: BTreeMap::new(), listing: None };
        tokio::spawn(follower.run(self.kube.clone()))
    }
}

/// The follower of every Node's pod CIDRs.
struct ClusterWatch {
    shared: Arc<Mutex<ClusterCidrs>>,
    wake: Arc<Notify>,
    /// Every Node by name: its CIDRs, or why they were refused.
    nodes: BTreeMap<String, Result<Vec<IpNetwork>, String>>,
    /// A relist in progress: the Nodes seen so far (replaces `nodes` when it completes, so
    /// that a Node deleted while the watch was down disappears).
    listing: Option<BTreeMap<String, Result<Vec<IpNetwork>, String>>>,
}

impl ClusterWatch {
    /// What a Node object says, or `None` for an object without a name.
    fn decode(node: &Node) -> Option<(String, Result<Vec<IpNetwork>, String>)> {
        let name = node.metadata.name.clone()?;
        let cidrs = match node_pod_cidrs(&name, node) {
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

    async fn run(mut self, client: Kube) {
        use ::kube::runtime::{WatchStreamExt, watcher};
        use futures::StreamExt;
        let nodes: ::kube::Api<Node> = ::kube::Api::all(client.client());
        let events = watcher(nodes, watcher::Config::default()).backoff(crate::clients::kube::watch_backoff());
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => self.listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(node)) => {
                    if let (Some(listing), Some((name, cidrs))) = (self.listing.as_mut(), Self::decode(&node)) {
                        listing.insert(name, cidrs);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    self.nodes = self.listing.take().unwrap_or_default();
                    self.publish(None, true);
                }
                Ok(watcher::Event::Apply(node)) => {
                    if let Some((name, cidrs)) = Self::decode(&node) {
                        self.nodes.insert(name, cidrs);
                        self.publish(None, false);
                    }
                }
                Ok(watcher::Event::Delete(node)) => {
                    if let Some(name) = node.metadata.name {
                        self.nodes.remove(&name);
                        self.publish(None, false);
                    }
                }
                // The watcher resumes after these by itself (an expired version is relisted).
                Err(e) => {
                    let hint = match &e {
                        watcher::Error::InitialListFailed(::kube::Error::Api(s)) if s.code == 403 => {
                            " (the agent's service account needs list and watch on nodes)"
                        }
                        _ => "",
                    };
                    log::debug!("watch of the Nodes: {e}");
                    self.publish(Some(format!("following the Nodes: {e}{hint}")), false);
                }
            }
        }
    }
}

impl PodCidrSource for NodeCidrs {
    /// The watch's latest answer; before its first one, waits for it (at most a request's
    /// deadline).
    async fn pod_cidrs(&self) -> Result<Option<Vec<IpNetwork>>, NodeError> {
        let mut rx = self.reading.lock().await;
        let first = tokio::time::timeout(crate::clients::kube::REQUEST_TIMEOUT, rx.wait_for(Option::is_some)).await;
        match first {
            Ok(Ok(reading)) => reading.clone().unwrap_or_else(|| Err(NodeError::Setup("no reading".into()))),
            Ok(Err(_)) => Err(NodeError::Setup(format!("the watch of Node {} ended", self.name))),
            Err(_) => Err(NodeError::Kube(KubeError::Unreachable(format!(
                "Node {}: no answer within {:?}",
                self.name,
                crate::clients::kube::REQUEST_TIMEOUT
            )))),
        }
    }

    fn kind(&self) -> &'static str {
        "node"
    }

    fn refresh_interval(&self) -> Duration {
        Duration::from_secs(300)
    }

    async fn changed(&self) {
        let mut rx = self.reading.lock().await;
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    fn cluster_cidrs(&self) -> Option<ClusterCidrs> {
        self.cluster.as_ref().map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn binding(&self) -> NodeBinding {
        self.binding.borrow().clone()
    }

    /// A JSON merge patch of the one annotation: the API server's admission policy lets this
    /// agent change nothing else, and only on its own Node.
    async fn publish_node_key(&self, key: &str) -> Result<(), NodeError> {
        let node = ObjectRef::node(&self.name).map_err(|e| NodeError::Setup(e.to_string()))?;
        let patch = serde_json::json!({"metadata": {"annotations": {crate::binding::NODE_KEY_ANNOTATION: key}}});
        self.kube.merge_patch::<Node>(&node, &patch).await.map(|_| ()).map_err(|e| match e {
            KubeError::Denied { status, msg, .. } => NodeError::PublishDenied { name: self.name.clone(), status, msg },
            KubeError::Status { status: 422, msg, .. } => {
                NodeError::PublishDenied { name: self.name.clone(), status: 422, msg }
            }
            e => node_error(&self.name, e),
        })
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

    /// A fake API server: LIST of nodes by name from `nodes` (403 for "denied"), every WATCH
    /// answered 410 Gone (the watcher relists after its backoff).
    fn node_api(nodes: Vec<(String, Vec<u8>)>, token: &'static str) -> testserver::Handler {
        Arc::new(move |s| {
            if s.headers.get("authorization").map(|h| h.as_bytes()) != Some(format!("Bearer {token}").as_bytes()) {
                return (401, r#"{"kind":"Status","message":"Unauthorized","code":401}"#.into());
            }
            if !s.path.starts_with("/api/v1/nodes?") {
                return (404, r#"{"kind":"Status","message":"not found","code":404}"#.into());
            }
            if s.path.contains("watch=true") {
                return (410, r#"{"kind":"Status","message":"too old","reason":"Expired","code":410}"#.into());
            }
            if s.path.contains("metadata.name%3Ddenied") {
                return (403, r#"{"kind":"Status","message":"nodes is forbidden: User \"system:serviceaccount:kube-system:headcni\" cannot list resource \"nodes\"","code":403}"#.into());
            }
            let items: Vec<String> = nodes
                .iter()
                .filter(|(n, _)| s.path.contains(&format!("metadata.name%3D{n}")))
                .map(|(_, body)| String::from_utf8(body.clone()).unwrap())
                .collect();
            (
                200,
                format!(
                    r#"{{"kind":"NodeList","apiVersion":"v1","metadata":{{"resourceVersion":"7"}},"items":[{}]}}"#,
                    items.join(",")
                ),
            )
        })
    }

    #[tokio::test]
    async fn follows_the_node_with_the_kubeconfig_token() {
        let handler = node_api(vec![("node-1".into(), fixture("node-ipv4.json"))], "t0ken");
        let (_server, url) = testserver::tcp(handler).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "t0ken").unwrap();
        let kc = format!(
            "current-context: c\ncontexts: [{{name: c, context: {{cluster: k, user: u}}}}]\n\
             clusters: [{{name: k, cluster: {{server: \"{url}\"}}}}]\nusers: [{{name: u, user: {{tokenFile: tok}}}}]\n"
        );
        std::fs::write(dir.path().join("config"), kc).unwrap();
        let c = NodeCidrs::from_kubeconfig("node-1", &dir.path().join("config")).await.unwrap();
        assert_eq!(c.pod_cidrs().await.unwrap(), Some(nets(&["10.244.1.0/24"])));
        let c = NodeCidrs::from_kubeconfig("denied", &dir.path().join("config")).await.unwrap();
        let err = c.pod_cidrs().await.unwrap_err().to_string();
        assert!(err.contains("\"watch\" on nodes"), "{err}");
        // The refusals are counted (headcni_kubernetes_api_errors_total{operation="watch_node"}).
        let metrics = crate::agent::metrics::Metrics::new(dir.path());
        let kube = Kube::from_kubeconfig(&dir.path().join("config")).await.unwrap();
        let c = NodeCidrs::counted("denied", kube, Some(metrics.kubernetes_errors("watch_node"))).unwrap();
        assert!(c.pod_cidrs().await.is_err());
        assert!(
            !metrics.encode().contains("headcni_kubernetes_api_errors_total{operation=\"watch_node\"} 0"),
            "{}",
            metrics.encode()
        );
        let c = NodeCidrs::from_kubeconfig("node-9", &dir.path().join("config")).await.unwrap();
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
        let handler = node_api(vec![("node-1".into(), fixture("node-ipv4.json"))], "sa-token");
        let chain = std::fs::read(pki.join("srv.crt")).unwrap();
        let key = std::fs::read(pki.join("srv.key")).unwrap();
        let (_server, port) = testserver::tls(handler, &chain, &key).await;
        let sa = dir.path().join("sa");
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::copy(pki.join("ca.crt"), sa.join("ca.crt")).unwrap();
        std::fs::write(sa.join("token"), "sa-token").unwrap();
        let env = |k: &str| match k {
            "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some(port.to_string()),
            _ => None,
        };
        let c = NodeCidrs::new("node-1", Kube::in_cluster_at(&sa, env).unwrap()).unwrap();
        assert_eq!(c.pod_cidrs().await.unwrap(), Some(nets(&["10.244.1.0/24"])));
        // A server the service account's CA did not sign is refused.
        std::fs::copy(other.join("ca.crt"), sa.join("ca.crt")).unwrap();
        let c = NodeCidrs::new("node-1", Kube::in_cluster_at(&sa, env).unwrap()).unwrap();
        let err = c.pod_cidrs().await.unwrap_err();
        assert!(matches!(err, NodeError::Kube(KubeError::Unreachable(_))), "{err}");
    }

    #[tokio::test]
    async fn every_nodes_pod_cidrs_are_followed_and_bad_ones_refused() {
        let node = |name: &str, cidr: &str, rv: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Node",
                               "metadata": {"name": name, "resourceVersion": rv},
                               "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
        };
        let list = serde_json::json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "5"}, "items": [
            node("node-1", "10.244.1.0/24", "5"), node("node-2", "10.244.2.0/24", "5"), node("evil", "0.0.0.0/1", "5"),
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "new", "resourceVersion": "5"}, "spec": {}},
        ]});
        let events = [
            serde_json::json!({"type": "ADDED", "object": node("node-3", "10.244.3.0/24", "6")}),
            serde_json::json!({"type": "DELETED", "object": node("node-2", "10.244.2.0/24", "7")}),
        ]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
        let handler: testserver::Handler = Arc::new(move |s| match s.path.as_str() {
            p if p.starts_with("/api/v1/nodes?") && p.contains("watch=true") && p.contains("resourceVersion=5") => {
                (200, events.clone())
            }
            p if p.starts_with("/api/v1/nodes?") && p.contains("watch=true") => {
                (410, r#"{"kind":"Status","message":"too old","reason":"Expired","code":410}"#.into())
            }
            p if p.starts_with("/api/v1/nodes?") => (200, list.to_string()),
            _ => (404, r#"{"kind":"Status","message":"not found","code":404}"#.into()),
        });
        let (_server, url) = testserver::tcp(handler).await;
        let dir = tempfile::tempdir().unwrap();
        let kc = format!(
            "current-context: c\ncontexts: [{{name: c, context: {{cluster: k}}}}]\n\
             clusters: [{{name: k, cluster: {{server: \"{url}\"}}}}]\n"
        );
        std::fs::write(dir.path().join("config"), kc).unwrap();
        let mut c = NodeCidrs::from_kubeconfig("node-1", &dir.path().join("config")).await.unwrap();
        assert_eq!(c.cluster_cidrs(), None, "not followed before it is started");
        let wake = Arc::new(Notify::new());
        let task = c.start_cluster_watch(wake.clone());
        tokio::time::timeout(Duration::from_secs(5), wake.notified()).await.unwrap();
        // The list, then the watch's events: node-3 came, node-2 went; "evil" is refused.
        let t0 = std::time::Instant::now();
        let view = loop {
            let v = c.cluster_cidrs().unwrap();
            if v.cidrs == nets(&["10.244.1.0/24", "10.244.3.0/24"]) {
                break v;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "{v:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(view.synced);
        assert!(view.problems.iter().any(|p| p.contains("evil") && p.contains("not exempt")), "{view:?}");
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
