//! The agent's HTTP server (hyper 1, HTTP/1.1): the metrics path, `/healthz` (the reconcile
//! loop is alive) and `/readyz` (the node file is written and the pod CIDRs are advertised).

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
}

impl Default for Health {
    fn default() -> Self {
        Self { ready: AtomicBool::new(false), reason: Mutex::new("starting".into()), heartbeat: AtomicU64::new(now()) }
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

/// Answers one request.
pub fn route(
    method: &Method,
    path: &str,
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
        return text(StatusCode::OK, metrics.encode(), metrics::CONTENT_TYPE);
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
                let resp = route(req.method(), req.uri().path(), &path, &metrics, &health);
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
        assert_eq!(route(&Method::GET, "/healthz", "/metrics", &m, &h).status(), StatusCode::OK);
        let r = route(&Method::GET, "/readyz", "/metrics", &m, &h);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        h.set_ready(true, "");
        assert_eq!(route(&Method::GET, "/readyz", "/metrics", &m, &h).status(), StatusCode::OK);
        assert_eq!(route(&Method::POST, "/metrics", "/metrics", &m, &h).status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(route(&Method::GET, "/other", "/metrics", &m, &h).status(), StatusCode::NOT_FOUND);
        // A scrape drains the spool first.
        events::record(dir.path(), &[Event::IpAllocated { ipv6: false }]);
        let r = route(&Method::GET, "/custom", "/custom", &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], metrics::CONTENT_TYPE);
        assert!(m.encode().contains("headcni_ip_allocations_total{family=\"ipv4\"} 1"));
        h.heartbeat.store(0, Ordering::SeqCst);
        assert_eq!(route(&Method::GET, "/healthz", "/metrics", &m, &h).status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
