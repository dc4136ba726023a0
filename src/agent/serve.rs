//! The agent's HTTP server (hyper 1, HTTP/1.1): the metrics path (in the format the scraper's
//! `Accept` header asks for), `/healthz` (the reconcile loop is alive), `/readyz` (the node
//! file is written and the pod CIDRs are advertised) and `/status` (the last pass's report,
//! JSON, for `headcni status --cluster`).
//!
//! The server never takes the node's networking down with it: it runs beside the reconcile
//! loop, not in front of it. A port it cannot bind is retried in the background (and reported)
//! while the loop goes on; at most [`MAX_CONNECTIONS`] connections are served at once (more are
//! closed as soon as they are accepted), each must send its request within
//! [`HEADER_TIMEOUT`] and is closed after one answer, so a flood of connections costs a bounded
//! number of descriptors and the loop's own sockets never run out.

use super::metrics::Metrics;
use crate::exposition::Exposition;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The loop is considered stuck when it has not finished a pass for this long.
pub const STALL_AFTER: Duration = Duration::from_secs(300);
/// Connections served at once; the rest are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may live at most.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between attempts to bind a port that is taken.
pub const BIND_RETRY: Duration = Duration::from_secs(5);

/// What the probes answer, shared with the reconcile loop.
pub struct Health {
    ready: AtomicBool,
    reason: Mutex<String>,
    heartbeat: AtomicU64,
    /// Why the server is not serving (its port cannot be bound), for the loop to report.
    server_problem: Mutex<Option<String>>,
    report: Mutex<String>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            reason: Mutex::new("starting".into()),
            heartbeat: AtomicU64::new(now()),
            server_problem: Mutex::new(None),
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

    fn set_server_problem(&self, problem: Option<String>) {
        *self.server_problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// Why the metrics and probe server is not serving, if it is not.
    pub fn server_problem(&self) -> Option<String> {
        self.server_problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        let format = Exposition::negotiate(accept);
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

/// Binds `addr` (again every [`BIND_RETRY`] while it is taken, each failure published in
/// `health` for the loop to report), then serves until `shutdown` fires.
pub async fn bind_and_serve(
    addr: SocketAddr,
    metrics_path: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                if health.server_problem().is_some() {
                    log::info!("metrics and probes: listening on {addr} now");
                }
                health.set_server_problem(None);
                break l;
            }
            Err(e) => {
                let problem = format!(
                    "the metrics and probe server cannot listen on {addr} ({e}): retrying every {}s; the node's \
                     networking is kept meanwhile",
                    BIND_RETRY.as_secs()
                );
                health.set_server_problem(Some(problem));
                tokio::select! {
                    _ = tokio::time::sleep(BIND_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    serve(listener, metrics_path, metrics, health, shutdown).await;
}

/// Serves until `shutdown` fires. Each connection is served on its own task, at most
/// [`MAX_CONNECTIONS`] at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics_path: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (or a connection reset before it was accepted): wait a
                // little instead of spinning on the listener.
                log::debug!("metrics server accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                log::warn!("metrics server: {refused} connections refused so far ({MAX_CONNECTIONS} at once at most)");
            }
            drop(stream);
            continue;
        };
        let (metrics, health, path) = (metrics.clone(), health.clone(), metrics_path.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
                let resp = route(req.method(), req.uri().path(), accept, &path, &metrics, &health);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => log::debug!("metrics connection: {e}"),
                Err(_) => log::debug!("metrics connection: closed after {CONNECTION_TIMEOUT:?}"),
                Ok(Ok(())) => {}
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
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], crate::exposition::TEXT_CONTENT_TYPE);
        let om = Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5");
        let r = route(&Method::GET, "/custom", om, "/custom", &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], crate::exposition::OPENMETRICS_CONTENT_TYPE);
        h.set_report(r#"{"node":"n"}"#.into());
        let r = route(&Method::GET, "/status", None, "/custom", &m, &h);
        assert_eq!(r.headers()[hyper::header::CONTENT_TYPE], "application/json");
        assert!(m.encode().contains("headcni_ip_allocations_total{family=\"ipv4\"} 1"));
        h.heartbeat.store(0, Ordering::SeqCst);
        assert_eq!(route(&Method::GET, "/healthz", None, "/metrics", &m, &h).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_flood_of_idle_connections_is_capped_and_the_server_recovers() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let (m, h) = (Arc::new(Metrics::new(dir.path())), Arc::new(Health::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, "/metrics".into(), m, h, stop_rx));
        assert!(get(addr, "/healthz").await.unwrap().starts_with("HTTP/1.1 200"));

        // Connections that never send a request: beyond the cap they are closed at once.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 100 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for (i, c) in idle.iter_mut().enumerate().skip(MAX_CONNECTIONS) {
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(HEADER_TIMEOUT / 2, c.read(&mut b)).await;
            assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "connection {i}, beyond the cap, was kept open");
        }
        drop(idle);
        // Once the flood stops the server answers again, within the header timeout at worst.
        let t0 = std::time::Instant::now();
        loop {
            if get(addr, "/healthz").await.is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
                break;
            }
            assert!(t0.elapsed() < HEADER_TIMEOUT * 2, "the server did not recover");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.abort();
    }
}
