//! The Kubernetes API client shared by every role that talks to Kubernetes (the agent: its
//! Node, the uninstall signal; the uninstall hook), on kube-rs: typed objects from k8s-openapi,
//! watchers that list, watch, resume and relist with backoff by themselves.
//!
//! What this module adds to kube-rs: where the API server is (the in-cluster service account,
//! or a kubeconfig's current context, whose client-side settings are checked: no
//! `insecure-skip-tls-verify`), [`ObjectRef`]s that are checked before they name anything, a
//! deadline on every single request (watches excepted), and [`KubeError`]s that say what the
//! caller's identity lacks. The service account token is a file that kube-rs re-reads (at most
//! a minute old), so a rotated projected token is picked up without a restart.

use futures::{Stream, StreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The service account mount of a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Deadline of one ordinary request (watches have their own: the server ends them).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The pause between a watcher's attempts while the API server fails or is away: 250 ms
/// doubling to at most 5 s, jittered, back to 250 ms once an attempt succeeds. kube-rs's
/// default climbs to 30 s (client-go's, to spare a struggling API server); after a 10 s restart
/// of the API server that left the route controller blind to Node changes for half a minute
/// while it already led again. One list or watch per 5 s per watcher is little for the API server
/// to bear.
pub fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .into()
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client setup: {0}")]
    Setup(String),
    #[error("kubeconfig {path}: {msg}")]
    Kubeconfig { path: PathBuf, msg: String },
    #[error("the Kubernetes API is not reachable: {0}")]
    Unreachable(String),
    #[error("{what} does not exist")]
    NotFound { what: String },
    #[error("the Kubernetes API refused access to {what} ({status}: {msg})")]
    Denied { what: String, status: u16, msg: String },
    #[error("the Kubernetes API answered {status} for {what}: {msg}")]
    Status { what: String, status: u16, msg: String },
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
}

impl KubeError {
    /// Maps a kube-rs error about `what`.
    pub fn from_kube(what: &str, e: kube::Error) -> Self {
        let what = what.to_string();
        match e {
            kube::Error::Api(status) => Self::from_status(what, status.code, status.message),
            kube::Error::SerdeError(e) => Self::Invalid { what, msg: format!("undecodable answer: {e}") },
            kube::Error::HyperError(e) => Self::Unreachable(format!("{what}: {e}")),
            kube::Error::Service(e) => Self::Unreachable(format!("{what}: {e}")),
            kube::Error::Auth(e) => Self::Setup(format!("credentials for {what}: {e}")),
            other => Self::Unreachable(format!("{what}: {other}")),
        }
    }

    fn from_status(what: String, status: u16, msg: String) -> Self {
        match status {
            404 => Self::NotFound { what },
            401 | 403 => Self::Denied { what, status, msg },
            _ => Self::Status { what, status, msg },
        }
    }

    /// Maps an error a watcher reported about `what`.
    pub fn from_watcher(what: &str, e: watcher::Error) -> Self {
        match e {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => Self::from_kube(what, e),
            watcher::Error::WatchError(status) => Self::from_status(what.to_string(), status.code, status.message),
            watcher::Error::NoResourceVersion => {
                Self::Invalid { what: what.to_string(), msg: "the answer carries no resourceVersion".into() }
            }
        }
    }

    /// Worth retrying: the server was not reached, or answered that it is overloaded or
    /// failing (429, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// A NAMESPACE/NAME given on the command line that cannot name an object.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct InvalidRef {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

/// The kinds of object HeadCNI reads or writes (for messages; the type says the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    ConfigMap,
    DaemonSet,
    Deployment,
    Pod,
    Lease,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "Node",
            Self::ConfigMap => "ConfigMap",
            Self::DaemonSet => "DaemonSet",
            Self::Deployment => "Deployment",
            Self::Pod => "Pod",
            Self::Lease => "Lease",
        }
    }
}

/// One object: its kind, its namespace (empty for a Node) and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A lowercase RFC 1123 subdomain: what object names are.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

impl ObjectRef {
    /// A Node by name; anything but a DNS subdomain is refused.
    pub fn node(name: &str) -> Result<Self, InvalidRef> {
        if !is_dns_subdomain(name) {
            let reason = "a Node name must be a lowercase DNS subdomain".to_string();
            return Err(InvalidRef { flag: "--node-name", value: name.to_string(), reason });
        }
        Ok(Self { kind: Kind::Node, namespace: String::new(), name: name.to_string() })
    }

    /// Parses NAMESPACE/NAME of a namespaced kind: the namespace a DNS label, the name a DNS
    /// subdomain.
    pub fn parse(kind: Kind, flag: &'static str, value: &str) -> Result<Self, InvalidRef> {
        let bad = |reason: &str| InvalidRef { flag, value: value.to_string(), reason: reason.into() };
        let (ns, name) = value.trim().split_once('/').ok_or_else(|| bad("expected NAMESPACE/NAME"))?;
        if !dns_label(ns) {
            return Err(bad("the namespace must be a lowercase DNS label"));
        }
        if !is_dns_subdomain(name) {
            return Err(bad("the name must be a lowercase DNS subdomain"));
        }
        Ok(Self { kind, namespace: ns.to_string(), name: name.to_string() })
    }
}

impl std::fmt::Display for ObjectRef {
    /// "ConfigMap kube-system/headcni-teardown", "Node node-1": how errors name the object.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// Where the objects of a scope live: a namespace's collection, or the cluster's.
pub trait ScopeApi {
    fn api<K: kube::Resource<Scope = Self, DynamicType = ()>>(client: kube::Client, namespace: &str) -> Api<K>;
}

impl ScopeApi for k8s_openapi::NamespaceResourceScope {
    fn api<K: kube::Resource<Scope = Self, DynamicType = ()>>(client: kube::Client, namespace: &str) -> Api<K> {
        Api::namespaced(client, namespace)
    }
}

impl ScopeApi for k8s_openapi::ClusterResourceScope {
    fn api<K: kube::Resource<Scope = Self, DynamicType = ()>>(client: kube::Client, _: &str) -> Api<K> {
        Api::all(client)
    }
}

/// What the typed verbs need of an object type (every k8s-openapi type has it).
pub trait Object:
    kube::Resource<DynamicType = (), Scope: ScopeApi> + Clone + Debug + DeserializeOwned + Serialize + Send + Sync + 'static
{
}
impl<K> Object for K where
    K: kube::Resource<DynamicType = (), Scope: ScopeApi>
        + Clone
        + Debug
        + DeserializeOwned
        + Serialize
        + Send
        + Sync
        + 'static
{
}

/// A client for one API server.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
}

impl Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kube")
    }
}

async fn bounded<T>(what: &str, fut: impl Future<Output = Result<T, kube::Error>>) -> Result<T, KubeError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| KubeError::from_kube(what, e)),
        Err(_) => Err(KubeError::Unreachable(format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))),
    }
}

impl Kube {
    /// A client for `config`. Needs a tokio runtime.
    pub fn from_config(config: kube::Config) -> Result<Self, KubeError> {
        let client = kube::Client::try_from(config).map_err(|e| KubeError::Setup(e.to_string()))?;
        Ok(Self { client })
    }

    /// The in-cluster service account: KUBERNETES_SERVICE_HOST/PORT, its CA and token.
    pub fn in_cluster() -> Result<Self, KubeError> {
        Self::in_cluster_at(Path::new(SERVICE_ACCOUNT_DIR), |k| std::env::var(k).ok())
    }

    /// The in-cluster configuration with the service account files in `dir`.
    pub fn in_cluster_at(dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, KubeError> {
        let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()).ok_or_else(|| {
            KubeError::Setup(
                "not running in a pod (KUBERNETES_SERVICE_HOST is unset): give --kubeconfig (or --pod-cidr)".into(),
            )
        })?;
        let port = env("KUBERNETES_SERVICE_PORT").filter(|p| !p.is_empty()).unwrap_or_else(|| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let url: hyper::Uri = format!("https://{host}:{port}")
            .parse()
            .map_err(|e| KubeError::Setup(format!("KUBERNETES_SERVICE_HOST/PORT: {e}")))?;
        let ca_path = dir.join("ca.crt");
        let pem = std::fs::read(&ca_path)
            .map_err(|e| KubeError::Setup(format!("reading the service account CA {}: {e}", ca_path.display())))?;
        let cas = super::http::parse_certificates(&pem, "ca.crt").map_err(|e| KubeError::Setup(e.to_string()))?;
        let token = dir.join("token");
        if let Err(e) = std::fs::metadata(&token) {
            return Err(KubeError::Setup(format!("the service account token {}: {e}", token.display())));
        }
        let mut config = kube::Config::new(url);
        config.root_cert = Some(cas.iter().map(|c| c.to_vec()).collect());
        config.auth_info.token_file = Some(token.to_string_lossy().into_owned());
        if let Ok(ns) = std::fs::read_to_string(dir.join("namespace")) {
            config.default_namespace = ns.trim().to_string();
        }
        Self::from_config(config)
    }

    /// The current context of a kubeconfig file.
    pub async fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let bad = |msg: String| KubeError::Kubeconfig { path: path.to_path_buf(), msg };
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| bad(e.to_string()))?;
        if config.accept_invalid_certs {
            return Err(bad(
                "insecure-skip-tls-verify is not supported: give the cluster's certificate-authority".into()
            ));
        }
        Self::from_config(config)
    }

    /// A kubeconfig when one is given (non-empty), else the in-cluster service account.
    pub async fn from_kubeconfig_or_in_cluster(kubeconfig: Option<&Path>) -> Result<Self, KubeError> {
        match kubeconfig {
            Some(p) if !p.as_os_str().is_empty() => Self::from_kubeconfig(p).await,
            _ => Self::in_cluster(),
        }
    }

    /// The kube-rs client, for watchers and reflectors over many objects.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    fn api<K: Object>(&self, namespace: &str) -> Api<K> {
        <K::Scope as ScopeApi>::api(self.client.clone(), namespace)
    }

    /// The object.
    pub async fn get<K: Object>(&self, obj: &ObjectRef) -> Result<K, KubeError> {
        bounded(&obj.to_string(), self.api::<K>(&obj.namespace).get(&obj.name)).await
    }

    /// Applies a JSON merge patch (RFC 7386) to the object; answers the patched object.
    pub async fn merge_patch<K: Object>(&self, obj: &ObjectRef, patch: &serde_json::Value) -> Result<K, KubeError> {
        let params = PatchParams::default();
        bounded(&obj.to_string(), self.api::<K>(&obj.namespace).patch(&obj.name, &params, &Patch::Merge(patch))).await
    }

    /// The objects in `namespace` (all namespaces when empty, for cluster-scoped kinds the
    /// only choice) that match `label_selector`.
    pub async fn list<K: Object>(&self, namespace: &str, label_selector: &str) -> Result<Vec<K>, KubeError> {
        let what = format!("the {}s in {namespace} labelled {label_selector}", K::kind(&()));
        let params = ListParams::default().labels(label_selector);
        Ok(bounded(&what, self.api::<K>(namespace).list(&params)).await?.items)
    }

    /// Follows one object: yields what it is each time that changes (`None`: it does not
    /// exist), and each failure (the watch resumes by itself, with backoff). The watch is
    /// narrowed to the object by a field selector, which RBAC allows by resource name.
    pub fn watch_object<K: Object>(
        &self,
        obj: &ObjectRef,
    ) -> impl Stream<Item = Result<Option<K>, KubeError>> + use<K> {
        let what = obj.to_string();
        let config = watcher::Config::default().fields(&format!("metadata.name={}", obj.name));
        let mut listed: Option<K> = None;
        watcher(self.api::<K>(&obj.namespace), config).backoff(watch_backoff()).filter_map(move |event| {
            let out = match event {
                Ok(watcher::Event::Init) => {
                    listed = None;
                    None
                }
                Ok(watcher::Event::InitApply(o)) => {
                    listed = Some(o);
                    None
                }
                Ok(watcher::Event::InitDone) => Some(Ok(listed.take())),
                Ok(watcher::Event::Apply(o)) => Some(Ok(Some(o))),
                Ok(watcher::Event::Delete(_)) => Some(Ok(None)),
                // The watcher resumes these by itself: an expired version (410) is relisted, a
                // broken stream reopened. Only failures to list or to start a watch are news.
                Err(watcher::Error::WatchError(s)) if s.code == 410 => None,
                Err(e @ watcher::Error::WatchFailed(_)) => {
                    log::debug!("watch of {what}: {e}");
                    None
                }
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(s))) if s.code == 410 => None,
                Err(e) => Some(Err(KubeError::from_watcher(&what, e))),
            };
            std::future::ready(out)
        })
    }
}

#[cfg(test)]
pub(crate) mod testpki {
    //! Certificates made with the openssl tool at test time, and an in-cluster client for a
    //! local HTTPS test server.
    use super::*;
    use crate::clients::http::testserver;

    /// A CA and a server certificate for 127.0.0.1 made with the openssl tool (None without it).
    pub(crate) fn make(dir: &Path, cn: &str) -> Option<()> {
        let ok = |args: &[&str]| {
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let subj = format!("/CN={cn}");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let ca = [&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", &subj]];
        let csr = [&["req"][..], &ec, &["-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=kubernetes"]];
        let sign = [
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.crt",
            "-days",
            "1",
            "-extfile",
            "ext",
        ];
        (ok(&ca.concat())
            && ok(&csr.concat())
            && std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:kubernetes\n").is_ok()
            && ok(&sign))
        .then_some(())
    }

    /// A TLS test server with `handler`, and an in-cluster client for it whose service account
    /// (in the returned directory) has the token "sa-token". `None` without the openssl tool.
    pub(crate) async fn in_cluster_server(
        handler: testserver::Handler,
    ) -> Option<(testserver::Server, tempfile::TempDir, Kube)> {
        let dir = tempfile::tempdir().ok()?;
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).ok()?;
        make(&pki, "cluster-ca")?;
        let chain = std::fs::read(pki.join("srv.crt")).ok()?;
        let key = std::fs::read(pki.join("srv.key")).ok()?;
        let (server, port) = testserver::tls(handler, &chain, &key).await;
        let sa = dir.path().join("sa");
        std::fs::create_dir_all(&sa).ok()?;
        std::fs::copy(pki.join("ca.crt"), sa.join("ca.crt")).ok()?;
        std::fs::write(sa.join("token"), "sa-token").ok()?;
        let env = |k: &str| match k {
            "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some(port.to_string()),
            _ => None,
        };
        let kube = Kube::in_cluster_at(&sa, env).ok()?;
        Some((server, dir, kube))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_retry_quickly_and_never_wait_more_than_five_seconds() {
        use kube::runtime::utils::Backoff;
        let mut b = watch_backoff();
        let first: Vec<Duration> = b.by_ref().take(12).collect();
        assert!(first[0] <= Duration::from_millis(500), "{first:?}");
        assert!(first.iter().all(|d| *d <= Duration::from_secs(10)), "{first:?}");
        assert!(first[11] >= Duration::from_secs(5), "{first:?}");
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(500));
    }

    #[test]
    fn object_refs_are_checked_before_use() {
        let r = ObjectRef::parse(Kind::ConfigMap, "--teardown-configmap", "kube-system/headcni-teardown").unwrap();
        assert_eq!(r.to_string(), "ConfigMap kube-system/headcni-teardown");
        assert_eq!(ObjectRef::node("node-1").unwrap().to_string(), "Node node-1");
        assert!(ObjectRef::node("node/1").is_err());
        for bad in ["headcni-teardown", "/x", "ns/", "Kube/x", "ns/X", "ns/a/b", "ns/../x", "ns/a?b", "-ns/x"] {
            assert!(ObjectRef::parse(Kind::ConfigMap, "--configmap", bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn kubeconfig_current_context() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "t0ken\n").unwrap();
        let text = r#"
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: other
  cluster: {server: "https://other:6443"}
- name: c1
  cluster:
    server: http://127.0.0.1:8001
contexts:
- name: dev
  context: {cluster: c1, user: u1}
users:
- name: u1
  user:
    tokenFile: tok
"#;
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, text).unwrap();
        Kube::from_kubeconfig(&path).await.unwrap();
        let insecure =
            text.replace("server: http://127.0.0.1:8001", "server: https://x\n    insecure-skip-tls-verify: true");
        std::fs::write(&path, insecure).unwrap();
        let err = Kube::from_kubeconfig(&path).await.unwrap_err().to_string();
        assert!(err.contains("insecure-skip-tls-verify"), "{err}");
        std::fs::write(&path, "current-context: nope\ncontexts: []").unwrap();
        assert!(Kube::from_kubeconfig(&path).await.is_err());
    }

    #[tokio::test]
    async fn in_cluster_needs_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let err = Kube::in_cluster_at(dir.path(), |_| None).unwrap_err().to_string();
        assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
        let err = Kube::in_cluster_at(dir.path(), |k| (k == "KUBERNETES_SERVICE_HOST").then(|| "10.96.0.1".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.crt"), "{err}");
    }

    #[test]
    fn errors_say_what_is_missing() {
        let denied = KubeError::from_status("Node n1".into(), 403, "nodes is forbidden".into());
        assert!(matches!(denied, KubeError::Denied { status: 403, .. }));
        assert!(!denied.is_transient());
        assert!(matches!(KubeError::from_status("x".into(), 404, String::new()), KubeError::NotFound { .. }));
        assert!(KubeError::from_status("x".into(), 503, String::new()).is_transient());
        assert!(KubeError::from_status("x".into(), 429, String::new()).is_transient());
        assert!(KubeError::Unreachable("x".into()).is_transient());
    }
}
