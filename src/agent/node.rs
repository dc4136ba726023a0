//! The node's pod CIDRs: from `--pod-cidr`, or from `spec.podCIDR(s)` of this node's Node object
//! in the Kubernetes API (one hand-rolled HTTPS GET, with the in-cluster service account or a
//! kubeconfig). Node data is untrusted: every CIDR is parsed, checked canonical and at most one
//! per family, and anything odd is an error rather than a guess.
//!
//! podCIDRs are immutable once set (the API server refuses changes), so polling is enough:
//! often while none is assigned, rarely afterwards.

use super::client::{self, ClientError, Endpoint, Request};
use super::secret::{self, SecretSource};
use hyper::header::{ACCEPT, AUTHORIZATION, HeaderValue};
use hyper::{Method, StatusCode};
use ipnetwork::IpNetwork;
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use yaml_rust2::{Yaml, YamlLoader};

/// The service account mount of a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("Kubernetes client setup: {0}")]
    Setup(String),
    #[error("kubeconfig {path}: {msg}")]
    Kubeconfig { path: PathBuf, msg: String },
    #[error("the Kubernetes API is not reachable: {0}")]
    Unreachable(ClientError),
    #[error("Kubernetes API: {0}")]
    Client(ClientError),
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
    #[error("{0}")]
    Secret(#[from] secret::SecretError),
}

/// Where the pod CIDRs come from (a seam for unit tests).
pub trait PodCidrSource: Send + Sync {
    /// The node's pod CIDRs, or `None` while none is assigned.
    fn pod_cidrs(&self) -> impl Future<Output = Result<Option<Vec<IpNetwork>>, NodeError>> + Send;
    /// "flag" or "node", for status and logs.
    fn kind(&self) -> &'static str;
    /// How often to ask again once CIDRs are known.
    fn refresh_interval(&self) -> Duration;
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
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok { Ok(()) } else { Err(format!("{name:?} is not a valid node name (a lowercase RFC 1123 subdomain)")) }
}

fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = s.parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
    if net.network() != net.ip() {
        return Err(format!("{s} has host bits set"));
    }
    let (min, max) = if net.is_ipv4() { (1, 30) } else { (1, 126) };
    if net.prefix() < min || net.prefix() > max {
        return Err(format!("{s}: a pod CIDR needs a prefix length between /{min} and /{max}"));
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
    let invalid = |msg: String| NodeError::Invalid { name: name.to_string(), msg };
    let node: Value = serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))?;
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

/// How to authenticate to the API server.
#[derive(Debug, Clone)]
enum Auth {
    None,
    Token(SecretSource),
}

/// A client for one Node.
#[derive(Debug, Clone)]
pub struct NodeCidrs {
    name: String,
    endpoint: Endpoint,
    auth: Auth,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|e| NodeError::Setup(format!("reading {what} {}: {e}", path.display())))
}

impl NodeCidrs {
    /// The in-cluster service account: KUBERNETES_SERVICE_HOST/PORT, its CA and token.
    pub fn in_cluster(name: &str) -> Result<Self, NodeError> {
        Self::in_cluster_at(name, Path::new(SERVICE_ACCOUNT_DIR), |k| std::env::var(k).ok())
    }

    fn in_cluster_at(name: &str, dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty()).ok_or_else(|| {
            NodeError::Setup(
                "not running in a pod (KUBERNETES_SERVICE_HOST is unset): give --kubeconfig or --pod-cidr".into(),
            )
        })?;
        let port = env("KUBERNETES_SERVICE_PORT").filter(|p| !p.is_empty()).unwrap_or_else(|| "443".into());
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        let cas = client::parse_certificates(&read(&dir.join("ca.crt"), "the service account CA")?, "ca.crt")
            .map_err(NodeError::Client)?;
        let tls = client::tls_config(cas, false, None).map_err(NodeError::Client)?;
        let endpoint = Endpoint::from_url(&format!("https://{host}:{port}"), Some(tls)).map_err(NodeError::Client)?;
        Ok(Self { name: name.to_string(), endpoint, auth: Auth::Token(SecretSource::File(dir.join("token"))) })
    }

    /// The current context of a kubeconfig file.
    pub fn from_kubeconfig(name: &str, path: &Path) -> Result<Self, NodeError> {
        validate_node_name(name).map_err(NodeError::Setup)?;
        let bad = |msg: String| NodeError::Kubeconfig { path: path.to_path_buf(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let kc = Kubeconfig::parse(&text, path.parent().unwrap_or(Path::new("."))).map_err(bad)?;
        let mut client_auth = None;
        if let (Some(cert), Some(key)) = (&kc.client_cert, &kc.client_key) {
            let chain = client::parse_certificates(cert, "client certificate").map_err(NodeError::Client)?;
            let key = client::parse_private_key(key, "client key").map_err(NodeError::Client)?;
            client_auth = Some((chain, key));
        }
        let tls = if kc.server.starts_with("https://") {
            let cas = match &kc.ca {
                Some(pem) => client::parse_certificates(pem, "certificate-authority").map_err(NodeError::Client)?,
                None => Vec::new(),
            };
            // Without a CA in the kubeconfig, the server must have a publicly trusted certificate.
            let web_roots = kc.ca.is_none();
            Some(client::tls_config(cas, web_roots, client_auth).map_err(NodeError::Client)?)
        } else {
            None
        };
        let endpoint = Endpoint::from_url(&kc.server, tls).map_err(NodeError::Client)?;
        let auth = match kc.token {
            Some(t) => Auth::Token(t),
            None => Auth::None,
        };
        Ok(Self { name: name.to_string(), endpoint, auth })
    }

    pub fn node_name(&self) -> &str {
        &self.name
    }
}

impl PodCidrSource for NodeCidrs {
    async fn pod_cidrs(&self) -> Result<Option<Vec<IpNetwork>>, NodeError> {
        let mut req = Request::new(Method::GET, format!("/api/v1/nodes/{}", self.name))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .timeout(Duration::from_secs(15))
            .limit(32 << 20);
        if let Auth::Token(src) = &self.auth {
            let token = src.load("Kubernetes token")?;
            let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| NodeError::Setup("the Kubernetes token is not a valid header value".into()))?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        let resp = self
            .endpoint
            .send(req)
            .await
            .map_err(|e| if e.is_unreachable() { NodeError::Unreachable(e) } else { NodeError::Client(e) })?;
        let msg = || {
            serde_json::from_slice::<Value>(&resp.body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| resp.snippet())
        };
        let name = self.name.clone();
        match resp.status {
            StatusCode::OK => parse_node(&self.name, &resp.body),
            StatusCode::NOT_FOUND => Err(NodeError::NotFound { name }),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                Err(NodeError::Denied { name, status: s, msg: msg() })
            }
            status => Err(NodeError::Status { name, status, msg: msg() }),
        }
    }

    fn kind(&self) -> &'static str {
        "node"
    }

    fn refresh_interval(&self) -> Duration {
        Duration::from_secs(300)
    }
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
mod tests {
    use super::*;
    use crate::agent::client::testserver;
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

    /// A CA and a server certificate for 127.0.0.1 made with the openssl tool (None without it).
    fn make_pki(dir: &Path, cn: &str) -> Option<()> {
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

    #[tokio::test]
    async fn in_cluster_over_tls_trusts_only_the_service_account_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, other) = (dir.path().join("pki"), dir.path().join("other"));
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        if make_pki(&pki, "cluster-ca").is_none() || make_pki(&other, "other-ca").is_none() {
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
        let c = NodeCidrs::in_cluster_at("node-1", &sa, env).unwrap();
        assert_eq!(c.pod_cidrs().await.unwrap(), Some(nets(&["10.244.1.0/24"])));
        // The token is read at every request: a rotated token is used at once.
        std::fs::write(sa.join("token"), "rotated").unwrap();
        assert!(matches!(c.pod_cidrs().await.unwrap_err(), NodeError::Denied { .. }));
        // A server the service account's CA did not sign is refused.
        std::fs::copy(other.join("ca.crt"), sa.join("ca.crt")).unwrap();
        let c = NodeCidrs::in_cluster_at("node-1", &sa, env).unwrap();
        let err = c.pod_cidrs().await.unwrap_err().to_string();
        assert!(err.contains("TLS handshake"), "{err}");
    }

    #[test]
    fn in_cluster_needs_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let err = NodeCidrs::in_cluster_at("n", dir.path(), |_| None).unwrap_err().to_string();
        assert!(err.contains("KUBERNETES_SERVICE_HOST"), "{err}");
        let err =
            NodeCidrs::in_cluster_at("n", dir.path(), |k| (k == "KUBERNETES_SERVICE_HOST").then(|| "10.96.0.1".into()))
                .unwrap_err()
                .to_string();
        assert!(err.contains("ca.crt"), "{err}");
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
            let body = serde_json::json!({"metadata": {"name": "n"}, "spec": {"podCIDRs": [canonical.to_string()]}});
            prop_assert_eq!(parse_node("n", body.to_string().as_bytes()).unwrap(), Some(vec![canonical]));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_node("n", &bytes);
        }
    }
}
