//! The controller's Prometheus metrics (prometheus-client), all prefixed `headcni_controller_`,
//! and its HTTP server: the metrics, in the format the scraper's `Accept` header asks for
//! ([`crate::exposition`], as the agent's), `/healthz` (the loop is alive) and `/readyz` (the
//! Node cache is synced; not ready once an uninstall withdrew everything).
//!
//! Every series of a labelled counter whose labels are known up front exists from the start,
//! at 0, so that `rate()` and `absent()` mean what they say before the first error.

use super::plan::Mismatch;
use crate::exposition::{self, Exposition};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type Labels = Vec<(&'static str, String)>;

/// The Headscale calls, as the error counter labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HsOp {
    List,
    Approve,
    Delete,
}

impl HsOp {
    pub const ALL: [HsOp; 3] = [Self::List, Self::Approve, Self::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::Approve => "approve",
            Self::Delete => "delete",
        }
    }
}

/// The Kubernetes API calls, as the error counter labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeOp {
    /// The reflector's list and watch of the Nodes.
    NodeWatch,
    /// Reading the record (ConfigMap).
    RecordRead,
    /// Writing the record.
    RecordWrite,
    /// Writing a Node's approval status annotation.
    NodeStatus,
}

impl KubeOp {
    pub const ALL: [KubeOp; 4] = [Self::NodeWatch, Self::RecordRead, Self::RecordWrite, Self::NodeStatus];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeWatch => "node_watch",
            Self::RecordRead => "record_read",
            Self::RecordWrite => "record_write",
            Self::NodeStatus => "node_status",
        }
    }
}

fn operation(op: &str) -> Labels {
    vec![("operation", op.to_string())]
}

pub struct Metrics {
    registry: Registry,
    pub leader: Gauge,
    pub approvals: Counter,
    pub withdrawals: Counter,
    pub bound_nodes: Gauge,
    pub mismatches: Family<Labels, Gauge>,
    pub headscale_errors: Family<Labels, Counter>,
    pub kubernetes_errors: Family<Labels, Counter>,
    pub deleted_nodes: Counter,
    pub passes: Counter,
    pub pass_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("headcni_controller");
        let m = Self {
            leader: Gauge::default(),
            approvals: Counter::default(),
            withdrawals: Counter::default(),
            bound_nodes: Gauge::default(),
            mismatches: Family::default(),
            headscale_errors: Family::default(),
            kubernetes_errors: Family::default(),
            deleted_nodes: Counter::default(),
            passes: Counter::default(),
            // 1 ms .. ~16 s
            pass_duration: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)),
            registry: Registry::default(),
        };
        // Counters are registered without "_total": the encoder adds it.
        registry.register("leader", "1 while this replica leads (holds the Lease), else 0", m.leader.clone());
        registry.register("approvals", "Pod CIDR routes approved in Headscale", m.approvals.clone());
        registry.register("withdrawals", "Route approvals withdrawn in Headscale", m.withdrawals.clone());
        registry.register(
            "bound_nodes",
            "Tailnet nodes bound to a Kubernetes Node by a published identity (leader only)",
            m.bound_nodes.clone(),
        );
        registry.register(
            "mismatches",
            "Nodes whose approval is held back, by reason (leader only)",
            m.mismatches.clone(),
        );
        registry.register("headscale_errors", "Failed Headscale API calls, by operation", m.headscale_errors.clone());
        registry.register(
            "kubernetes_errors",
            "Failed Kubernetes API calls of the reconcile loop, by operation",
            m.kubernetes_errors.clone(),
        );
        registry.register(
            "deleted_tailnet_nodes",
            "Headscale nodes deleted after their Kubernetes Node was deleted",
            m.deleted_nodes.clone(),
        );
        registry.register("passes", "Reconcile passes run as the leader", m.passes.clone());
        registry.register("pass_duration_seconds", "Time of one reconcile pass", m.pass_duration.clone());
        for r in Mismatch::ALL {
            m.mismatches.get_or_create(&vec![("reason", r.as_str().to_string())]).set(0);
        }
        for op in HsOp::ALL {
            m.headscale_errors.get_or_create(&operation(op.as_str())).inc_by(0);
        }
        for op in KubeOp::ALL {
            m.kubernetes_errors.get_or_create(&operation(op.as_str())).inc_by(0);
        }
        Self { registry, ..m }
    }

    pub fn headscale_error(&self, op: HsOp) {
        self.headscale_errors.get_or_create(&operation(op.as_str())).inc();
    }

    pub fn kubernetes_error(&self, op: KubeOp) {
        self.kubernetes_errors.get_or_create(&operation(op.as_str())).inc();
    }

    /// The OpenMetrics text of everything.
    pub fn encode(&self) -> String {
        self.expose(Exposition::OpenMetrics)
    }

    /// Everything in `format`.
    pub fn expose(&self, format: Exposition) -> String {
        exposition::expose(&self.registry, format)
    }
}

/// The loop is considered stuck when it has not beaten for this long.
pub const STALL_AFTER: Duration = Duration::from_secs(300);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What the probes answer.
pub struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
    heartbeat: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self { ready: AtomicBool::new(false), reason: Mutex::new("starting".into()), heartbeat: AtomicU64::new(now()) }
    }
}

impl Health {
    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
    }

    pub fn beat(&self) {
        self.heartbeat.store(now(), Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn alive(&self) -> bool {
        now().saturating_sub(self.heartbeat.load(Ordering::SeqCst)) < STALL_AFTER.as_secs()
    }

    fn reason(&self) -> String {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    resp
}

/// Answers one request; `accept` is its Accept header.
pub fn route(
    method: &Method,
    path: &str,
    accept: Option<&str>,
    metrics: &Metrics,
    health: &Health,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into(), PLAIN);
    }
    match path {
        "/metrics" => {
            let format = Exposition::negotiate(accept);
            text(StatusCode::OK, metrics.expose(format), format.content_type())
        }
        "/healthz" if health.alive() => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "the controller loop is stuck\n".into(), PLAIN),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", health.reason()), PLAIN),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}

/// Serves until `shutdown` turns true; each connection on its own task.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
                let resp = route(req.method(), req.uri().path(), accept, &metrics, &health);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                log::debug!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(resp: Response<Full<Bytes>>) -> String {
        use http_body_util::BodyExt;
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let bytes = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn probes_and_metrics() {
        let m = Metrics::new();
        let h = Health::default();
        assert_eq!(route(&Method::GET, "/healthz", None, &m, &h).status(), StatusCode::OK);
        assert_eq!(route(&Method::GET, "/readyz", None, &m, &h).status(), StatusCode::SERVICE_UNAVAILABLE);
        h.set_ready(true, "");
        assert_eq!(route(&Method::GET, "/readyz", None, &m, &h).status(), StatusCode::OK);
        assert_eq!(route(&Method::POST, "/metrics", None, &m, &h).status(), StatusCode::METHOD_NOT_ALLOWED);
        m.leader.set(1);
        m.approvals.inc();
        m.headscale_error(HsOp::List);
        m.kubernetes_error(KubeOp::RecordWrite);
        let text = m.encode();
        for line in [
            "headcni_controller_leader 1",
            "headcni_controller_approvals_total 1",
            "headcni_controller_headscale_errors_total{operation=\"list\"} 1",
            "headcni_controller_kubernetes_errors_total{operation=\"record_write\"} 1",
            "headcni_controller_mismatches{reason=\"duplicate_claim\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn every_counter_is_there_from_the_start() {
        let text = Metrics::new().encode();
        let mut wanted: Vec<String> = [
            "approvals_total",
            "withdrawals_total",
            "deleted_tailnet_nodes_total",
            "passes_total",
            "pass_duration_seconds_count",
        ]
        .iter()
        .map(|name| format!("headcni_controller_{name} 0"))
        .collect();
        for op in HsOp::ALL {
            wanted.push(format!("headcni_controller_headscale_errors_total{{operation=\"{}\"}} 0", op.as_str()));
        }
        for op in KubeOp::ALL {
            wanted.push(format!("headcni_controller_kubernetes_errors_total{{operation=\"{}\"}} 0", op.as_str()));
        }
        for line in &wanted {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn the_metrics_follow_the_accept_header() {
        let m = Metrics::new();
        let h = Health::default();
        for accept in [None, Some("text/plain;version=0.0.4"), Some("*/*")] {
            let r = route(&Method::GET, "/metrics", accept, &m, &h);
            assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], exposition::TEXT_CONTENT_TYPE, "{accept:?}");
            let text = body(r);
            assert!(text.contains("# TYPE headcni_controller_approvals_total counter\n"), "{text}");
            assert!(text.contains("# TYPE headcni_controller_kubernetes_errors_total counter\n"), "{text}");
            assert!(text.contains("# TYPE headcni_controller_leader gauge\n"), "{text}");
            assert!(!text.contains("# TYPE headcni_controller_approvals counter") && !text.contains("# EOF"), "{text}");
        }
        let prometheus = Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
        let r = route(&Method::GET, "/metrics", prometheus, &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], exposition::OPENMETRICS_CONTENT_TYPE);
        let om = body(r);
        assert!(om.contains("# TYPE headcni_controller_approvals counter\n") && om.ends_with("# EOF\n"), "{om}");
    }
}
