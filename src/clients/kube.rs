//! The Kubernetes API client shared by the agent (its Node, the uninstall signal) and the
//! uninstall hook (`headcni teardown`): where the API server is (the in-cluster service
//! account, or a kubeconfig's current context), how to authenticate (a bearer token re-read
//! at every request, so that a rotated projected token is used at once, or a client
//! certificate), and the few verbs HeadCNI needs: GET, JSON merge PATCH, LIST and WATCH.
//! Answers are mapped to [`KubeError`]s that say what the caller's RBAC lacks. Hand-rolled over
//! [`super::http`]: no client library, no informers, no caches.
//!
//! Callers name objects, never URLs: an [`ObjectRef`] (kind, namespace, name) goes in and JSON
//! comes out, the shape of kube-rs's `Api<K>` with `get`, `patch` and `watch`, so that a move to
//! kube-rs changes this module and the types its callers decode, not their logic.

use super::http::{self, ClientError, Endpoint, HttpRequest, StreamingResponse};
use super::secret::{self, SecretSource};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, StatusCode};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use yaml_rust2::{Yaml, YamlLoader};

/// The service account mount of a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Deadline of one ordinary request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client setup: {0}")]
    Setup(String),
    #[error("kubeconfig {path}: {msg}")]
    Kubeconfig { path: PathBuf, msg: String },
    #[error("the Kubernetes API is not reachable: {0}")]
    Unreachable(ClientError),
    #[error("Kubernetes API: {0}")]
    Client(ClientError),
    #[error("{what} does not exist")]
    NotFound { what: String },
    #[error("the Kubernetes API refused access to {what} ({status}: {msg})")]
    Denied { what: String, status: StatusCode, msg: String },
    #[error("the Kubernetes API answered {status} for {what}: {msg}")]
    Status { what: String, status: StatusCode, msg: String },
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
    #[error("{0}")]
    Secret(#[from] secret::SecretError),
}

/// A NAMESPACE/NAME given on the command line that cannot name an object.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct InvalidRef {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

/// The kinds of object HeadCNI reads or writes, and where the API serves each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    ConfigMap,
    DaemonSet,
    Pod,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Node => "Node",
            Self::ConfigMap => "ConfigMap",
            Self::DaemonSet => "DaemonSet",
            Self::Pod => "Pod",
        }
    }

    /// The path of the collection (in `namespace`, for the namespaced kinds).
    fn collection(self, namespace: &str) -> String {
        match self {
            Self::Node => "/api/v1/nodes".to_string(),
            Self::ConfigMap => format!("/api/v1/namespaces/{namespace}/configmaps"),
            Self::DaemonSet => format!("/apis/apps/v1/namespaces/{namespace}/daemonsets"),
            Self::Pod => format!("/api/v1/namespaces/{namespace}/pods"),
        }
    }

    /// The most an answer about one object of this kind (a list, for pods) may weigh.
    fn answer_limit(self) -> usize {
        match self {
            Self::Node => 32 << 20,
            Self::ConfigMap => 1 << 20,
            Self::DaemonSet => 4 << 20,
            Self::Pod => 16 << 20,
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
    /// A Node by name. The name goes into a URL path: anything but a DNS subdomain is refused.
    pub fn node(name: &str) -> Result<Self, InvalidRef> {
        if !is_dns_subdomain(name) {
            let reason = "a Node name must be a lowercase DNS subdomain".to_string();
            return Err(InvalidRef { flag: "--node-name", value: name.to_string(), reason });
        }
        Ok(Self { kind: Kind::Node, namespace: String::new(), name: name.to_string() })
    }

    /// Parses NAMESPACE/NAME of a namespaced kind: the namespace a DNS label, the name a DNS
    /// subdomain (both go into URL paths, so nothing else is accepted).
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

    /// The object's path on the API server.
    pub fn path(&self) -> String {
        format!("{}/{}", self.kind.collection(&self.namespace), self.name)
    }

    /// A watch of this one object from `resource_version` (the current state first when
    /// `None`), ended by the server after `timeout_secs`.
    pub fn watch_path(&self, resource_version: Option<&str>, timeout_secs: u64) -> String {
        let mut path = format!(
            "{}?fieldSelector=metadata.name%3D{}&watch=1&timeoutSeconds={timeout_secs}&allowWatchBookmarks=true",
            self.kind.collection(&self.namespace),
            self.name
        );
        if let Some(rv) = resource_version.filter(|rv| !rv.is_empty()) {
            path.push_str("&resourceVersion=");
            path.push_str(&percent_encode(rv));
        }
        path
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

/// Query values (resource versions, label selectors) are opaque strings: encode anything
/// outside the unreserved set.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl KubeError {
    /// Worth retrying: the server was not reached, or answered that it is overloaded or
    /// failing (429, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Client(e) => matches!(e, ClientError::Http { .. }),
            Self::Status { status, .. } => *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error(),
            _ => false,
        }
    }
}

/// How to authenticate to the API server.
#[derive(Debug, Clone)]
enum Auth {
    /// A client certificate (in the TLS configuration) or nothing (a local proxy).
    None,
    Token(SecretSource),
}

/// A client for one API server.
#[derive(Debug, Clone)]
pub struct Kube {
    endpoint: Endpoint,
    auth: Auth,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, KubeError> {
    std::fs::read(path).map_err(|e| KubeError::Setup(format!("reading {what} {}: {e}", path.display())))
}

/// The `message` of a Kubernetes Status answer, else the start of the body.
fn status_message(resp: &http::Response) -> String {
    serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| resp.snippet())
}

fn check(what: &str, resp: &http::Response) -> Result<(), KubeError> {
    let what = what.to_string();
    match resp.status {
        s if s.is_success() => Ok(()),
        StatusCode::NOT_FOUND => Err(KubeError::NotFound { what }),
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            Err(KubeError::Denied { what, status: s, msg: status_message(resp) })
        }
        status => Err(KubeError::Status { what, status, msg: status_message(resp) }),
    }
}

impl Kube {
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
        let cas = http::parse_certificates(&read(&dir.join("ca.crt"), "the service account CA")?, "ca.crt")
            .map_err(KubeError::Client)?;
        let tls = http::tls_config(cas, false, None).map_err(KubeError::Client)?;
        let endpoint = Endpoint::from_url(&format!("https://{host}:{port}"), Some(tls)).map_err(KubeError::Client)?;
        Ok(Self { endpoint, auth: Auth::Token(SecretSource::File(dir.join("token"))) })
    }

    /// The current context of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, KubeError> {
        let bad = |msg: String| KubeError::Kubeconfig { path: path.to_path_buf(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let kc = Kubeconfig::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(bad)?;
        let mut client_auth = None;
        if let (Some(cert), Some(key)) = (&kc.client_cert, &kc.client_key) {
            let chain = http::parse_certificates(cert, "client certificate").map_err(KubeError::Client)?;
            let key = http::parse_private_key(key, "client key").map_err(KubeError::Client)?;
            client_auth = Some((chain, key));
        }
        let tls = if kc.server.starts_with("https://") {
            let cas = match &kc.ca {
                Some(pem) => http::parse_certificates(pem, "certificate-authority").map_err(KubeError::Client)?,
                None => Vec::new(),
            };
            // Without a CA in the kubeconfig, the server must have a publicly trusted certificate.
            let web_roots = kc.ca.is_none();
            Some(http::tls_config(cas, web_roots, client_auth).map_err(KubeError::Client)?)
        } else {
            None
        };
        let endpoint = Endpoint::from_url(&kc.server, tls).map_err(KubeError::Client)?;
        let auth = match kc.token {
            Some(t) => Auth::Token(t),
            None => Auth::None,
        };
        Ok(Self { endpoint, auth })
    }

    /// A kubeconfig when one is given (non-empty), else the in-cluster service account.
    pub fn from_kubeconfig_or_in_cluster(kubeconfig: Option<&Path>) -> Result<Self, KubeError> {
        match kubeconfig {
            Some(p) if !p.as_os_str().is_empty() => Self::from_kubeconfig(p),
            _ => Self::in_cluster(),
        }
    }

    fn authorize(&self, mut req: HttpRequest) -> Result<HttpRequest, KubeError> {
        if let Auth::Token(src) = &self.auth {
            let token = src.load("Kubernetes token")?;
            let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| KubeError::Setup("the Kubernetes token is not a valid header value".into()))?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        Ok(req.header(ACCEPT, HeaderValue::from_static("application/json")))
    }

    async fn send(&self, req: HttpRequest) -> Result<http::Response, KubeError> {
        let req = self.authorize(req)?;
        self.endpoint
            .send(req)
            .await
            .map_err(|e| if e.is_unreachable() { KubeError::Unreachable(e) } else { KubeError::Client(e) })
    }

    /// The object, as JSON.
    pub async fn get(&self, obj: &ObjectRef) -> Result<Value, KubeError> {
        let body = self.get_raw(obj).await?;
        serde_json::from_slice(&body)
            .map_err(|e| KubeError::Invalid { what: obj.to_string(), msg: format!("not JSON: {e}") })
    }

    /// The object as the server sent it (for callers that validate it themselves).
    pub async fn get_raw(&self, obj: &ObjectRef) -> Result<Vec<u8>, KubeError> {
        let req = HttpRequest::new(Method::GET, obj.path()).timeout(REQUEST_TIMEOUT).limit(obj.kind.answer_limit());
        let resp = self.send(req).await?;
        check(&obj.to_string(), &resp)?;
        Ok(resp.body.to_vec())
    }

    /// The objects of `kind` in `namespace` that match `label_selector`, as the JSON list.
    pub async fn list(&self, kind: Kind, namespace: &str, label_selector: &str) -> Result<Value, KubeError> {
        let what = format!("the {}s in {namespace} labelled {label_selector}", kind.as_str());
        let path = format!("{}?labelSelector={}", kind.collection(namespace), percent_encode(label_selector));
        let resp =
            self.send(HttpRequest::new(Method::GET, &path).timeout(REQUEST_TIMEOUT).limit(kind.answer_limit())).await?;
        check(&what, &resp)?;
        serde_json::from_slice(&resp.body).map_err(|e| KubeError::Invalid { what, msg: format!("not JSON: {e}") })
    }

    /// Applies a JSON merge patch (RFC 7386) to the object. Answers the patched object.
    pub async fn merge_patch(&self, obj: &ObjectRef, patch: &Value) -> Result<Value, KubeError> {
        let what = obj.to_string();
        let mut req = HttpRequest::new(Method::PATCH, obj.path()).timeout(REQUEST_TIMEOUT).limit(4 << 20);
        req.body = Some(patch.to_string().into_bytes());
        let req = req.header(CONTENT_TYPE, HeaderValue::from_static("application/merge-patch+json"));
        let resp = self.send(req).await?;
        check(&what, &resp)?;
        serde_json::from_slice(&resp.body).map_err(|e| KubeError::Invalid { what, msg: format!("not JSON: {e}") })
    }

    /// Opens a watch of one object from `resource_version` (the current state first when
    /// `None`), which the server ends after `timeout_secs`; the events are read with
    /// [`WatchStream::next_event`].
    pub async fn watch(
        &self,
        obj: &ObjectRef,
        resource_version: Option<&str>,
        timeout_secs: u64,
    ) -> Result<WatchStream, KubeError> {
        self.open_watch(&obj.to_string(), &obj.watch_path(resource_version, timeout_secs), 1 << 20).await
    }

    /// Opens a watch of every object of `kind` in `namespace` (empty for Nodes) from
    /// `resource_version` (typically a list's), which the server ends after `timeout_secs`.
    pub async fn watch_all(
        &self,
        kind: Kind,
        namespace: &str,
        resource_version: Option<&str>,
        timeout_secs: u64,
    ) -> Result<WatchStream, KubeError> {
        let what = format!("the {}s", kind.as_str());
        let mut path =
            format!("{}?watch=1&timeoutSeconds={timeout_secs}&allowWatchBookmarks=true", kind.collection(namespace));
        if let Some(rv) = resource_version.filter(|rv| !rv.is_empty()) {
            path.push_str("&resourceVersion=");
            path.push_str(&percent_encode(rv));
        }
        self.open_watch(&what, &path, kind.answer_limit()).await
    }

    async fn open_watch(&self, what: &str, path: &str, line_limit: usize) -> Result<WatchStream, KubeError> {
        let req = self.authorize(HttpRequest::new(Method::GET, path).timeout(REQUEST_TIMEOUT).limit(line_limit))?;
        let stream = self
            .endpoint
            .open(req)
            .await
            .map_err(|e| if e.is_unreachable() { KubeError::Unreachable(e) } else { KubeError::Client(e) })?;
        if stream.status.is_success() {
            return Ok(WatchStream { stream: Some(stream), what: what.to_string() });
        }
        let resp = stream.collect(64 << 10).await.map_err(KubeError::Client)?;
        check(what, &resp)?;
        Err(KubeError::Status { what: what.to_string(), status: resp.status, msg: status_message(&resp) })
    }
}

/// One event of a watch.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// ADDED, MODIFIED, DELETED, BOOKMARK or ERROR.
    pub kind: String,
    pub object: Value,
}

/// An open watch.
pub struct WatchStream {
    stream: Option<StreamingResponse>,
    what: String,
}

impl WatchStream {
    /// The next event; `None` when the server ended the watch.
    pub async fn next_event(&mut self) -> Result<Option<WatchEvent>, KubeError> {
        let Some(stream) = self.stream.as_mut() else { return Ok(None) };
        let line = match stream.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                self.stream = None;
                return Ok(None);
            }
            Err(e) => {
                self.stream = None;
                return Err(KubeError::Client(e));
            }
        };
        parse_watch_event(&line)
            .map(Some)
            .map_err(|msg| KubeError::Invalid { what: format!("watch of {}", self.what), msg })
    }
}

/// Parses one line of a watch answer.
pub fn parse_watch_event(line: &[u8]) -> Result<WatchEvent, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("an event is not JSON: {e}"))?;
    let kind = v.get("type").and_then(Value::as_str).ok_or("an event has no type")?.to_string();
    let object = v.get("object").cloned().ok_or("an event has no object")?;
    if !object.is_object() {
        return Err("an event's object is not an object".into());
    }
    Ok(WatchEvent { kind, object })
}

/// The parts of a kubeconfig's current context the agent uses.
#[derive(Debug, Default)]
struct Kubeconfig {
    server: String,
    ca: Option<Vec<u8>>,
    client_cert: Option<Vec<u8>>,
    client_key: Option<Vec<u8>>,
    token: Option<SecretSource>,
}

fn named<'a>(doc: &'a Yaml, list: &str, name: &str) -> Result<&'a Yaml, String> {
    doc[list]
        .as_vec()
        .ok_or_else(|| format!("no {list} list"))?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .map(|e| &e[list.trim_end_matches('s')])
        .ok_or_else(|| format!("{list} has no entry named {name:?}"))
}

impl Kubeconfig {
    fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not YAML: {e}"))?;
        let doc = docs.first().ok_or("empty file")?;
        let ctx_name = doc["current-context"].as_str().ok_or("no current-context")?;
        let ctx = named(doc, "contexts", ctx_name)?;
        let cluster = named(doc, "clusters", ctx["cluster"].as_str().ok_or("the context names no cluster")?)?;
        let user = match ctx["user"].as_str() {
            Some(u) => named(doc, "users", u)?.clone(),
            None => Yaml::Null,
        };
        let server = cluster["server"].as_str().ok_or("the cluster has no server")?.to_string();
        if cluster["insecure-skip-tls-verify"].as_bool() == Some(true) {
            return Err("insecure-skip-tls-verify is not supported: give the cluster's certificate-authority".into());
        }
        let file_or_data = |node: &Yaml, file_key: &str, data_key: &str| -> Result<Option<Vec<u8>>, String> {
            if let Some(data) = node[data_key].as_str() {
                return base64_decode(data).map(Some).ok_or_else(|| format!("{data_key} is not base64"));
            }
            if let Some(file) = node[file_key].as_str() {
                let p = base.join(file);
                return std::fs::read(&p).map(Some).map_err(|e| format!("{file_key} {}: {e}", p.display()));
            }
            Ok(None)
        };
        let ca = file_or_data(cluster, "certificate-authority", "certificate-authority-data")?;
        let client_cert = file_or_data(&user, "client-certificate", "client-certificate-data")?;
        let client_key = file_or_data(&user, "client-key", "client-key-data")?;
        if client_cert.is_some() != client_key.is_some() {
            return Err("the user has a client certificate without a key, or a key without a certificate".into());
        }
        let token = match (user["token"].as_str(), user["tokenFile"].as_str()) {
            (Some(t), _) if !t.is_empty() => Some(SecretSource::Value(secret::Secret::new(t.to_string()))),
            (_, Some(f)) => Some(SecretSource::File(base.join(f))),
            _ => None,
        };
        if token.is_none()
            && client_cert.is_none()
            && (!user["exec"].is_badvalue() || !user["auth-provider"].is_badvalue())
        {
            return Err(
                "exec and auth-provider credentials are not supported: use a token or a client certificate".into()
            );
        }
        Ok(Self { server, ca, client_cert, client_key, token })
    }
}

/// Standard base64 (with or without padding, whitespace ignored).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let trimmed: &[u8] = {
        let mut end = clean.len();
        while end > 0 && clean[end - 1] == b'=' {
            end -= 1;
        }
        if clean.len() - end > 2 {
            return None;
        }
        &clean[..end]
    };
    if trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= val(*c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
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
        (ok(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            &subj,
        ]) && ok(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=kubernetes",
        ]) && std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1,DNS:kubernetes\n").is_ok()
            && ok(&[
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
            ]))
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
        std::fs::write(sa.join("token"), "sa-token\n").ok()?;
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
    fn object_refs_are_checked_before_use() {
        let r = ObjectRef::parse(Kind::ConfigMap, "--teardown-configmap", "kube-system/headcni-teardown").unwrap();
        assert_eq!(r.to_string(), "ConfigMap kube-system/headcni-teardown");
        assert_eq!(r.path(), "/api/v1/namespaces/kube-system/configmaps/headcni-teardown");
        assert_eq!(
            r.watch_path(Some("51877"), 290),
            "/api/v1/namespaces/kube-system/configmaps?fieldSelector=metadata.name%3Dheadcni-teardown&watch=1\
             &timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=51877"
        );
        assert!(!r.watch_path(None, 290).contains("resourceVersion"));
        assert_eq!(r.watch_path(Some("a b&c"), 1).rsplit('=').next(), Some("a%20b%26c"));
        let ds = ObjectRef::parse(Kind::DaemonSet, "--daemonset", "net/cni.agents").unwrap();
        assert_eq!(ds.path(), "/apis/apps/v1/namespaces/net/daemonsets/cni.agents");
        assert_eq!(ObjectRef::node("node-1").unwrap().path(), "/api/v1/nodes/node-1");
        assert!(ObjectRef::node("node/1").is_err());
        for bad in ["headcni-teardown", "/x", "ns/", "Kube/x", "ns/X", "ns/a/b", "ns/../x", "ns/a?b", "-ns/x"] {
            assert!(ObjectRef::parse(Kind::ConfigMap, "--configmap", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").unwrap(), b"hello!");
        assert!(base64_decode("a$==").is_none());
        assert!(base64_decode("a").is_none());
    }

    #[test]
    fn kubeconfig_current_context() {
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
        let kc = Kubeconfig::parse(text, dir.path()).unwrap();
        assert_eq!(kc.server, "http://127.0.0.1:8001");
        assert_eq!(kc.token.unwrap().load("t").unwrap().expose(), "t0ken");
        let exec = text.replace("    tokenFile: tok", "    exec: {command: aws}");
        assert!(Kubeconfig::parse(&exec, dir.path()).unwrap_err().contains("exec"));
        let insecure =
            text.replace("server: http://127.0.0.1:8001", "server: https://x\n    insecure-skip-tls-verify: true");
        assert!(Kubeconfig::parse(&insecure, dir.path()).unwrap_err().contains("insecure"));
        assert!(Kubeconfig::parse("current-context: nope\ncontexts: []", dir.path()).is_err());
    }

    #[test]
    fn in_cluster_needs_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let err = Kube::in_cluster_at(dir.path(), |_| None).unwrap_err().to_string();
        assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
        let err = Kube::in_cluster_at(dir.path(), |k| (k == "KUBERNETES_SERVICE_HOST").then(|| "10.96.0.1".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.crt"), "{err}");
    }
}
