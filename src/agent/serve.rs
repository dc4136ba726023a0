//! The agent's HTTP server (hyper 1, HTTP/1.1): the metrics path (in the format the scraper's
//! `Accept` header asks for), `/healthz` (the reconcile loop is alive), `/readyz` (the node
//! file is written and the pod CIDRs are advertised) and `/status` (the last pass's report,
//! JSON, for `headcni status --cluster`).

use super::metrics::{self, Metrics};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The loop is considered stuck when it has not finished a pass for this long.
pub const STALL_AFTER: Duration = Duration::from_secs(300);

/// What the probes answer, shared with the reconcile loop.
pub struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
    heartbeat: AtomicU64,
    report: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".into()),
            heartbeat: AtomicU64::new(now()),
            report: Mutex::new("{}".into()),
        }
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Health {
    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.to_string();
    }

    /// The report `/status` serves (JSON).
    pub fn set_report(&self, json: String) {
        *self.report.lock().unwrap_or_else(|p| p.into_inner()) = json;
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
    metrics_path: &str,
    metrics: &Metrics,
    health: &Health,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into(), PLAIN);
    }
    if path == metrics_path {
        metrics.collect_events();
        let format = metrics::Exposition::negotiate(accept);
        return text(StatusCode::OK, metrics.expose(format), format.content_type());
    }
    if path == "/status" {
        let report = health.report.lock().unwrap_or_else(|p| p.into_inner()).clone();
        return text(StatusCode::OK, report, "application/json");
    }
    match path {
        "/healthz" if health.alive() => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/healthz" => text(StatusCode::SERVICE_UNAVAILABLE, "the reconcile loop is stuck\n".into(), PLAIN),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", health.reason()), PLAIN),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    }
}

/// Serves until `shutdown` fires. Each connection is served on its own task.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics_path: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                log::debug!("metrics server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, health, path) = (metrics.clone(), health.clone(), metrics_path.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
                let resp = route(req.method(), req.uri().path(), accept, &path, &metrics, &health);
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
    use crate::events::{self, Event};

    #[test]
    fn probes_and_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let m = Metrics::new(dir.path());
        let h = Health::default();
        assert_eq!(route(&Method::GET, "/healthz", None, "/metrics", &m, &h).status(), StatusCode::OK);
        let r = route(&Method::GET, "/readyz", None, "/metrics", &m, &h);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        h.set_ready(true, "");
        assert_eq!(route(&Method::GET, "/readyz", None, "/metrics", &m, &h).status(), StatusCode::OK);
        assert_eq!(route(&Method::POST, "/metrics", None, "/metrics", &m, &h).status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(route(&Method::GET, "/other", None, "/metrics", &m, &h).status(), StatusCode::NOT_FOUND);
        // A scrape drains the spool first.
        events::record(dir.path(), &[Event::IpAllocated { ipv6: false }]);
        let r = route(&Method::GET, "/custom", None, "/custom", &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], metrics::TEXT_CONTENT_TYPE);
        let om = Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
        let r = route(&Method::GET, "/custom", om, "/custom", &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], metrics::OPENMETRICS_CONTENT_TYPE);
        h.set_report(r#"{"node":"n"}"#.into());
        let r = route(&Method::GET, "/status", None, "/custom", &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], "application/json");
        assert!(m.encode().contains("headcni_ip_allocations_total{family=\"ipv4\"} 1"));
        h.heartbeat.store(0, Ordering::SeqCst);
        assert_eq!(route(&Method::GET, "/healthz", None, "/metrics", &m, &h).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
