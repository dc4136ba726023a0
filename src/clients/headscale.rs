//! Headscale's REST API: list nodes (to find one by its node key), replace a node's approved
//! routes, and delete a node (the controller, when a Kubernetes Node is deleted and the chart
//! asks for it). Supported: Headscale 0.26 and newer (`POST /api/v1/node/{id}/approve_routes`);
//! older servers (the `/api/v1/routes` API) are detected and reported, never driven.

use super::http::{ClientError, Endpoint, HttpRequest};
use super::secret::{SecretError, SecretSource};
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper::{Method, StatusCode};
use ipnetwork::IpNetwork;
use serde::Deserialize;
use serde_json::{Value, json};
use std::future::Future;

/// The first release with `approve_routes`.
pub const MIN_VERSION: (u64, u64) = (0, 26);

#[derive(Debug, thiserror::Error)]
pub enum HeadscaleError {
    #[error("Headscale is not reachable at {url}: {source}")]
    Unreachable { url: String, source: ClientError },
    #[error("Headscale rejected the API key ({status}): check --api-key-file (headscale apikeys list; keys expire)")]
    Unauthorized { status: StatusCode },
    #[error(
        "Headscale {version} is older than 0.26 and has no approve_routes API: upgrade Headscale, or drop \
         --api-key-file and approve routes with the policy's autoApprovers"
    )]
    TooOld { version: String },
    #[error("Headscale answered {what} with {status}: {msg}")]
    Status { what: String, status: StatusCode, msg: String },
    #[error("Headscale: {0}")]
    Client(ClientError),
    #[error("Headscale sent an unexpected answer to {what}: {source}")]
    Decode { what: String, source: serde_json::Error },
    #[error(transparent)]
    Key(#[from] SecretError),
}

fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    // uint64 ids come as JSON strings from grpc-gateway, as numbers from other encoders.
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    })
}

/// A node as `GET /api/v1/node` lists it. The route lists are `None` on servers that predate
/// them (before 0.26).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HsNode {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    pub node_key: String,
    pub name: String,
    pub given_name: String,
    pub online: bool,
    pub approved_routes: Option<Vec<String>>,
    pub available_routes: Option<Vec<String>>,
    pub subnet_routes: Option<Vec<String>>,
}

impl HsNode {
    pub fn has_route_api(&self) -> bool {
        self.approved_routes.is_some() || self.available_routes.is_some()
    }

    fn parsed(list: &Option<Vec<String>>) -> Vec<IpNetwork> {
        list.iter().flatten().filter_map(|s| s.parse().ok()).collect()
    }

    pub fn approved(&self) -> Vec<IpNetwork> {
        Self::parsed(&self.approved_routes)
    }

    pub fn available(&self) -> Vec<IpNetwork> {
        Self::parsed(&self.available_routes)
    }

    pub fn display_name(&self) -> &str {
        if self.given_name.is_empty() { &self.name } else { &self.given_name }
    }
}

#[derive(Debug, Deserialize)]
struct NodeList {
    #[serde(default)]
    nodes: Vec<HsNode>,
}

#[derive(Debug, Deserialize)]
struct NodeAnswer {
    node: HsNode,
}

/// Parses "v0.29.2" (or "0.26.0-beta.1") into (major, minor).
pub fn parse_version(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().trim_start_matches('v');
    let mut parts = v.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The Headscale calls the agent makes (a seam for unit tests).
pub trait HeadscaleApi: Send + Sync {
    /// The server's version, when it tells (`GET /version`).
    fn version(&self) -> impl Future<Output = Result<Option<String>, HeadscaleError>> + Send;
    fn nodes(&self) -> impl Future<Output = Result<Vec<HsNode>, HeadscaleError>> + Send;
    /// Replaces the node's approved routes with `routes`; answers the node as it is now.
    fn approve_routes(
        &self,
        node_id: &str,
        routes: &[IpNetwork],
    ) -> impl Future<Output = Result<HsNode, HeadscaleError>> + Send;
}

/// What only a cluster-wide controller asks of Headscale, beyond [`HeadscaleApi`].
pub trait HeadscaleAdmin: HeadscaleApi {
    /// Deletes the node (it must log in again to come back).
    fn delete_node(&self, node_id: &str) -> impl Future<Output = Result<(), HeadscaleError>> + Send;
}

fn check_node_id(what: &str, node_id: &str) -> Result<(), HeadscaleError> {
    if node_id.is_empty() || !node_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadscaleError::Status {
            what: what.into(),
            status: StatusCode::BAD_REQUEST,
            msg: format!("node id {node_id:?} is not numeric"),
        });
    }
    Ok(())
}

/// The REST API with a Bearer API key.
#[derive(Debug, Clone)]
pub struct RestHeadscale {
    endpoint: Endpoint,
    url: String,
    api_key: SecretSource,
}

impl RestHeadscale {
    pub fn new(endpoint: Endpoint, api_key: SecretSource) -> Self {
        Self { url: endpoint.to_string(), endpoint, api_key }
    }

    async fn call(&self, what: &str, req: HttpRequest) -> Result<hyper::body::Bytes, HeadscaleError> {
        let key = self.api_key.load("Headscale API key")?;
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
            .map_err(|_| HeadscaleError::Unauthorized { status: StatusCode::UNAUTHORIZED })?;
        auth.set_sensitive(true);
        let resp = self.endpoint.send(req.header(AUTHORIZATION, auth)).await.map_err(|e| {
            if e.is_unreachable() {
                HeadscaleError::Unreachable { url: self.url.clone(), source: e }
            } else {
                HeadscaleError::Client(e)
            }
        })?;
        match resp.status {
            s if s.is_success() => Ok(resp.body),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(HeadscaleError::Unauthorized { status: s }),
            status => {
                // grpc-gateway: {"code":N,"message":"..."}; 0.30: problem+json {"detail": "..."}.
                let msg = serde_json::from_slice::<Value>(&resp.body)
                    .ok()
                    .and_then(|v| {
                        v.get("message").or_else(|| v.get("detail")).and_then(Value::as_str).map(str::to_string)
                    })
                    .unwrap_or_else(|| resp.snippet());
                Err(HeadscaleError::Status { what: what.to_string(), status, msg })
            }
        }
    }
}

impl HeadscaleApi for RestHeadscale {
    async fn version(&self) -> Result<Option<String>, HeadscaleError> {
        match self.call("GET /version", HttpRequest::new(Method::GET, "/version")).await {
            Ok(body) => Ok(serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("version").and_then(Value::as_str).map(str::to_string))),
            Err(HeadscaleError::Status { status: StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn nodes(&self) -> Result<Vec<HsNode>, HeadscaleError> {
        let what = "GET /api/v1/node";
        let body = self.call(what, HttpRequest::new(Method::GET, "/api/v1/node").limit(64 << 20)).await?;
        let list: NodeList =
            serde_json::from_slice(&body).map_err(|source| HeadscaleError::Decode { what: what.into(), source })?;
        Ok(list.nodes)
    }

    async fn approve_routes(&self, node_id: &str, routes: &[IpNetwork]) -> Result<HsNode, HeadscaleError> {
        check_node_id("approve_routes", node_id)?;
        let what = format!("POST /api/v1/node/{node_id}/approve_routes");
        let routes: Vec<String> = routes.iter().map(ToString::to_string).collect();
        let req = HttpRequest::new(Method::POST, format!("/api/v1/node/{node_id}/approve_routes"))
            .json(&json!({ "routes": routes }));
        let body = match self.call(&what, req).await {
            // A server without the endpoint: grpc-gateway answers 404 "Not Found" (or 501).
            Err(HeadscaleError::Status {
                status: StatusCode::NOT_FOUND | StatusCode::NOT_IMPLEMENTED, msg, ..
            }) if msg.eq_ignore_ascii_case("not found") || msg.contains("Not Implemented") => {
                return Err(HeadscaleError::TooOld { version: "(the server)".into() });
            }
            other => other?,
        };
        let answer: NodeAnswer =
            serde_json::from_slice(&body).map_err(|source| HeadscaleError::Decode { what, source })?;
        Ok(answer.node)
    }
}

impl HeadscaleAdmin for RestHeadscale {
    async fn delete_node(&self, node_id: &str) -> Result<(), HeadscaleError> {
        check_node_id("delete node", node_id)?;
        let what = format!("DELETE /api/v1/node/{node_id}");
        self.call(&what, HttpRequest::new(Method::DELETE, format!("/api/v1/node/{node_id}"))).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::http::testserver;
    use crate::clients::secret::Secret;
    use std::sync::Arc;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/headscale/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn parses_recorded_nodes() {
        let list: NodeList = serde_json::from_str(&fixture("nodes-v0.29.2.json")).unwrap();
        assert_eq!(list.nodes.len(), 2);
        let n1 = &list.nodes[0];
        assert_eq!(n1.id, "1");
        assert!(n1.node_key.starts_with("nodekey:"));
        assert!(n1.has_route_api());
        assert_eq!(n1.approved(), vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]);
        assert_eq!(list.nodes[1].approved(), Vec::<IpNetwork>::new());
        let ans: NodeAnswer = serde_json::from_str(&fixture("approve-v0.29.2.json")).unwrap();
        assert_eq!(ans.node.available(), vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]);
        // A 0.25 node: no route lists at all.
        let old: HsNode = serde_json::from_value(json!({"id": 7, "nodeKey": "nodekey:ab", "name": "x"})).unwrap();
        assert_eq!(old.id, "7");
        assert!(!old.has_route_api());
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("v0.29.2"), Some((0, 29)));
        assert_eq!(parse_version("0.26.0-beta.1"), Some((0, 26)));
        assert_eq!(parse_version("dev"), None);
        assert!(parse_version("v0.25.1").unwrap() < MIN_VERSION);
    }

    #[tokio::test]
    async fn sends_the_key_as_bearer_and_maps_errors() {
        let nodes = fixture("nodes-v0.29.2.json");
        let approve = fixture("approve-v0.29.2.json");
        let handler: testserver::Handler = Arc::new(move |s| {
            if s.headers.get("authorization").map(|h| h.as_bytes()) != Some(b"Bearer hskey-api-good") {
                return (401, "Unauthorized".into());
            }
            match (s.method.as_str(), s.path.as_str()) {
                ("GET", "/version") => (200, r#"{"version":"v0.29.2"}"#.into()),
                ("GET", "/api/v1/node") => (200, nodes.clone()),
                ("POST", "/api/v1/node/1/approve_routes") => (200, approve.clone()),
                ("POST", "/api/v1/node/99/approve_routes") => (400, fixture("error-unknown-node-v0.29.2.json")),
                ("DELETE", "/api/v1/node/1") => (200, "{}".into()),
                _ => (404, r#"{"code":5, "message":"Not Found", "details":[]}"#.into()),
            }
        });
        let (server, url) = testserver::tcp(handler).await;
        let ep = Endpoint::from_url(&url, None).unwrap();
        let good = RestHeadscale::new(ep.clone(), SecretSource::Value(Secret::new("hskey-api-good".into())));
        assert_eq!(good.version().await.unwrap().as_deref(), Some("v0.29.2"));
        assert_eq!(good.nodes().await.unwrap().len(), 2);
        let n = good.approve_routes("1", &["10.244.1.0/24".parse().unwrap()]).await.unwrap();
        assert_eq!(n.approved().len(), 1);
        let body: Value = serde_json::from_slice(&server.seen.lock().unwrap().last().unwrap().body).unwrap();
        assert_eq!(body, json!({"routes": ["10.244.1.0/24"]}));
        let err = good.approve_routes("99", &[]).await.unwrap_err().to_string();
        assert!(err.contains("node no longer exists"), "{err}");
        assert!(good.approve_routes("1/../2", &[]).await.is_err());
        good.delete_node("1").await.unwrap();
        assert_eq!(server.seen.lock().unwrap().last().unwrap().method, "DELETE");
        assert!(good.delete_node("../1").await.is_err());
        assert!(good.delete_node("2").await.is_err());
        let err = good.approve_routes("5", &[]).await.unwrap_err();
        assert!(matches!(err, HeadscaleError::TooOld { .. }), "{err}");

        let bad = RestHeadscale::new(ep, SecretSource::Value(Secret::new("hskey-api-wrong".into())));
        let err = bad.nodes().await.unwrap_err();
        assert!(matches!(err, HeadscaleError::Unauthorized { .. }));
        assert!(!err.to_string().contains("hskey-api-wrong"));

        let down = Endpoint::from_url("http://127.0.0.1:9", None).unwrap();
        let err = RestHeadscale::new(down, SecretSource::Value(Secret::new("k".into()))).nodes().await.unwrap_err();
        assert!(matches!(err, HeadscaleError::Unreachable { .. }), "{err}");
    }
}
