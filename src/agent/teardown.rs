//! The uninstall signal as the agent sees it (`--teardown-configmap NAMESPACE/NAME`).
//!
//! The chart keeps a ConfigMap whose `data.teardown` is `"false"`; its pre-delete hook
//! (`headcni teardown`, [`super::hook`]) sets it to `"true"`. A [`SignalWatcher`] follows that
//! one ConfigMap (GET, then a WATCH narrowed to it by a `metadata.name` field selector, which
//! the agent's Role allows by resource name; GET polls where the watch is refused) and
//! publishes a [`SignalState`] on a tokio watch channel. What the agent does with it (tear
//! down, stop reconciling, answer not ready, resume) is the reconciler's state machine
//! ([`super::reconcile::Reconciler::pass`]).
//!
//! The watcher never logs above debug: a failure to read the signal is published as a
//! problem, which the reconciler reports like any other (logged once when it appears or
//! changes, shown by `headcni status`), and retried with a bounded backoff.

use crate::clients::kube::{Kube, KubeError, ObjectRef};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The key of the ConfigMap's data that carries the signal.
pub const DATA_KEY: &str = "teardown";
/// Longest pause between attempts while the API fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Pause between GETs where the API refuses the watch.
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);
/// How long the server keeps one watch open before the watcher reads the object afresh.
pub const WATCH_SECONDS: u64 = 290;
/// How long the agent waits at start for the first reading before its first pass.
pub const STARTUP_WAIT: Duration = Duration::from_secs(10);

/// What the ConfigMap says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Signal {
    /// Not read yet (or never readable).
    #[default]
    Unknown,
    /// The ConfigMap does not exist.
    Absent,
    /// `data.teardown` is anything but "true": run normally.
    Normal,
    /// `data.teardown` is "true": the chart is being uninstalled.
    Teardown,
}

/// The last reading and, while the ConfigMap cannot be read or does not exist, why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignalState {
    pub signal: Signal,
    pub problem: Option<String>,
}

/// The signal a ConfigMap object carries. Only the exact value "true" (as the hook writes it;
/// case and surrounding blanks ignored) means teardown.
pub fn signal_of(object: &Value) -> Result<Signal, String> {
    if object.get("kind").and_then(Value::as_str).is_some_and(|k| k != "ConfigMap") {
        return Err("the answer is not a ConfigMap".into());
    }
    match object.get("data") {
        None | Some(Value::Null) => Ok(Signal::Normal),
        Some(Value::Object(data)) => match data.get(DATA_KEY) {
            Some(Value::String(v)) if v.trim().eq_ignore_ascii_case("true") => Ok(Signal::Teardown),
            Some(Value::String(_)) | None | Some(Value::Null) => Ok(Signal::Normal),
            Some(_) => Err(format!("data.{DATA_KEY} is not a string")),
        },
        Some(_) => Err("data is not an object".into()),
    }
}

fn resource_version(object: &Value) -> Option<String> {
    object.pointer("/metadata/resourceVersion").and_then(Value::as_str).map(str::to_string)
}

/// The pause after `streak` failures in a row: 1 s doubling up to [`MAX_BACKOFF`].
pub fn backoff(streak: u32) -> Duration {
    Duration::from_secs(1).saturating_mul(1 << streak.min(6)).min(MAX_BACKOFF)
}

/// Follows the ConfigMap and publishes what it says.
pub struct SignalWatcher {
    kube: Kube,
    configmap: ObjectRef,
    tx: watch::Sender<SignalState>,
    failures: u32,
    watch_refused: bool,
}

/// How one watch ended.
enum WatchEnd {
    /// The server ended it (timeout, expired version, a dropped connection): read afresh.
    Relist,
    /// The API refused the watch: poll with GETs instead.
    Refused(KubeError),
}

impl SignalWatcher {
    pub fn new(kube: Kube, configmap: ObjectRef) -> (Self, watch::Receiver<SignalState>) {
        let (tx, rx) = watch::channel(SignalState::default());
        (Self { kube, configmap, tx, failures: 0, watch_refused: false }, rx)
    }

    fn what(&self) -> String {
        self.configmap.to_string()
    }

    /// Publishes a reading; the problem is cleared.
    fn publish(&self, signal: Signal) {
        self.tx.send_if_modified(|s| {
            let next = SignalState { signal, problem: None };
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Publishes a failure; the last known signal stands.
    fn publish_problem(&self, problem: String) {
        self.tx.send_if_modified(|s| {
            let changed = s.problem.as_deref() != Some(problem.as_str());
            s.problem = Some(problem);
            changed
        });
    }

    fn absent(&self) {
        self.tx.send_if_modified(|s| {
            let next = SignalState {
                signal: Signal::Absent,
                problem: Some(format!(
                    "the uninstall signal ConfigMap {} does not exist: an uninstall would not withdraw this node's \
                     routes",
                    self.configmap
                )),
            };
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    fn object(&self, object: &Value) -> bool {
        match signal_of(object) {
            Ok(signal) => {
                self.publish(signal);
                true
            }
            Err(msg) => {
                self.publish_problem(format!("{}: {msg}", self.what()));
                false
            }
        }
    }

    /// One GET: answers the resource version to watch from (`None` to watch from now), or
    /// `Err` after publishing the failure.
    async fn read(&mut self) -> Result<Option<String>, ()> {
        match self.kube.get(&self.configmap).await {
            Ok(object) => {
                let ok = self.object(&object);
                self.failures = if ok { 0 } else { self.failures.saturating_add(1) };
                if ok { Ok(resource_version(&object)) } else { Err(()) }
            }
            Err(KubeError::NotFound { .. }) => {
                self.failures = 0;
                self.absent();
                Ok(None)
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                let hint = match &e {
                    KubeError::Denied { .. } => {
                        " (the agent's Role needs get, list and watch on this ConfigMap, by resource name)"
                    }
                    _ => "",
                };
                self.publish_problem(format!("reading the uninstall signal: {e}{hint}"));
                Err(())
            }
        }
    }

    /// Follows one watch until the server ends it.
    async fn follow(&mut self, resource_version: Option<String>) -> WatchEnd {
        let mut stream = match self.kube.watch(&self.configmap, resource_version.as_deref(), WATCH_SECONDS).await {
            Ok(s) => s,
            Err(e @ (KubeError::Denied { .. } | KubeError::Status { .. } | KubeError::NotFound { .. })) => {
                return WatchEnd::Refused(e);
            }
            Err(e) => {
                log::debug!("watching {}: {e}", self.what());
                return WatchEnd::Relist;
            }
        };
        // A silent connection is given the watch's own time and a margin.
        let idle = Duration::from_secs(WATCH_SECONDS + 30);
        loop {
            let event = match tokio::time::timeout(idle, stream.next_event()).await {
                Ok(Ok(Some(ev))) => ev,
                Ok(Ok(None)) => return WatchEnd::Relist,
                Ok(Err(e)) => {
                    log::debug!("watch of {}: {e}", self.what());
                    return WatchEnd::Relist;
                }
                Err(_) => return WatchEnd::Relist,
            };
            match event.kind.as_str() {
                "ADDED" | "MODIFIED" => {
                    self.object(&event.object);
                }
                "DELETED" => self.absent(),
                "BOOKMARK" => {}
                _ => {
                    // ERROR: typically 410 Gone (the version expired): read afresh.
                    log::debug!("watch of {}: {} {}", self.what(), event.kind, event.object);
                    return WatchEnd::Relist;
                }
            }
        }
    }

    /// Runs until the task is aborted.
    pub async fn run(mut self) {
        loop {
            let rv = match self.read().await {
                Ok(rv) => rv,
                Err(()) => {
                    tokio::time::sleep(backoff(self.failures.saturating_sub(1))).await;
                    continue;
                }
            };
            if self.watch_refused {
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            let opened = Instant::now();
            match self.follow(rv).await {
                WatchEnd::Relist => {
                    // A watch that ends at once (a proxy that cuts it, a server error) must
                    // not turn into a tight loop of GETs.
                    if opened.elapsed() < Duration::from_secs(5) {
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                }
                WatchEnd::Refused(e) => {
                    log::info!("watching {} is refused ({e}); reading it every {POLL_INTERVAL:?} instead", self.what());
                    self.watch_refused = true;
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::http::testserver;
    use crate::clients::kube::testpki;
    use std::sync::{Arc, Mutex};

    pub(crate) fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn cm() -> ObjectRef {
        ObjectRef::parse(crate::clients::kube::Kind::ConfigMap, "--teardown-configmap", "kube-system/headcni-teardown")
            .unwrap()
    }

    #[test]
    fn recorded_configmaps() {
        let f: Value = serde_json::from_str(&fixture("configmap-teardown-false.json")).unwrap();
        let t: Value = serde_json::from_str(&fixture("configmap-teardown-true.json")).unwrap();
        assert_eq!(signal_of(&f), Ok(Signal::Normal));
        assert_eq!(signal_of(&t), Ok(Signal::Teardown));
        assert_eq!(resource_version(&f).as_deref(), Some("51877"));
        for (v, want) in [
            (serde_json::json!({"kind": "ConfigMap"}), Ok(Signal::Normal)),
            (serde_json::json!({"data": {"teardown": " TRUE "}}), Ok(Signal::Teardown)),
            (serde_json::json!({"data": {"teardown": "yes"}}), Ok(Signal::Normal)),
            (serde_json::json!({"data": {"other": "true"}}), Ok(Signal::Normal)),
        ] {
            assert_eq!(signal_of(&v), want, "{v}");
        }
        assert!(signal_of(&serde_json::json!({"data": {"teardown": true}})).is_err());
        assert!(signal_of(&serde_json::json!({"data": []})).is_err());
        assert!(signal_of(&serde_json::json!({"kind": "Secret", "data": {}})).is_err());
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    /// The API as the watcher sees it: the ConfigMap (or not), and a watch answer.
    struct Api {
        get: (u16, String),
        watch: (u16, String),
    }

    fn handler(api: Arc<Mutex<Api>>) -> testserver::Handler {
        Arc::new(move |s| {
            if s.headers.get("authorization").map(|h| h.as_bytes()) != Some(b"Bearer sa-token") {
                return (401, r#"{"kind":"Status","message":"Unauthorized","code":401}"#.into());
            }
            let api = api.lock().unwrap();
            if s.path == "/api/v1/namespaces/kube-system/configmaps/headcni-teardown" {
                api.get.clone()
            } else if s.path.starts_with("/api/v1/namespaces/kube-system/configmaps?fieldSelector=") {
                api.watch.clone()
            } else {
                (404, r#"{"kind":"Status","code":404}"#.into())
            }
        })
    }

    #[tokio::test]
    async fn follows_the_recorded_configmap_over_tls() {
        let api = Arc::new(Mutex::new(Api {
            get: (200, fixture("configmap-teardown-false.json")),
            watch: (200, fixture("configmap-watch.jsonl")),
        }));
        let Some((server, _dir, kube)) = testpki::in_cluster_server(handler(api.clone())).await else {
            eprintln!("test skipped: no openssl tool to make certificates");
            return;
        };
        let (mut w, mut rx) = SignalWatcher::new(kube, cm());
        assert_eq!(rx.borrow().signal, Signal::Unknown);
        let rv = w.read().await.unwrap();
        assert_eq!(rv.as_deref(), Some("51877"));
        assert_eq!(*rx.borrow_and_update(), SignalState { signal: Signal::Normal, problem: None });

        // The watch: ADDED (false), a bookmark, MODIFIED (true), then the server ends it.
        assert!(matches!(w.follow(rv).await, WatchEnd::Relist));
        assert_eq!(rx.borrow_and_update().signal, Signal::Teardown);
        let seen = server.seen.lock().unwrap().clone();
        let watch = seen.iter().find(|s| s.path.contains("watch=1")).unwrap();
        assert!(watch.path.contains("fieldSelector=metadata.name%3Dheadcni-teardown"), "{}", watch.path);
        assert!(watch.path.contains("resourceVersion=51877"), "{}", watch.path);

        // An expired version ends the watch: read afresh.
        api.lock().unwrap().watch = (200, fixture("configmap-watch-expired.jsonl"));
        assert!(matches!(w.follow(Some("1".into())).await, WatchEnd::Relist));
        assert_eq!(rx.borrow_and_update().signal, Signal::Teardown, "an error event changes nothing");

        // Deleted (Helm removes it after the hook): absent, with a problem to report.
        api.lock().unwrap().get = (404, r#"{"kind":"Status","reason":"NotFound","code":404}"#.into());
        assert_eq!(w.read().await, Ok(None));
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.signal, Signal::Absent);
        assert!(s.problem.unwrap().contains("does not exist"));

        // API errors: the last reading stands, the problem is published once, the backoff grows.
        api.lock().unwrap().get = (200, fixture("configmap-teardown-true.json"));
        w.read().await.unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().signal, Signal::Teardown);
        api.lock().unwrap().get = (503, r#"{"kind":"Status","message":"etcd is slow","code":503}"#.into());
        assert!(w.read().await.is_err());
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.signal, Signal::Teardown);
        assert!(s.problem.as_deref().unwrap().contains("etcd is slow"), "{s:?}");
        assert!(w.read().await.is_err());
        assert!(!rx.has_changed().unwrap(), "the same failure is not published again");
        assert_eq!(w.failures, 2);

        // The watch refused (a Role without watch): poll instead.
        api.lock().unwrap().watch = (403, fixture("status-forbidden-configmap.json"));
        assert!(matches!(w.follow(None).await, WatchEnd::Refused(KubeError::Denied { .. })));
        api.lock().unwrap().get = (403, fixture("status-forbidden-configmap.json"));
        assert!(w.read().await.is_err());
        assert!(rx.borrow().problem.as_deref().unwrap().contains("by resource name"), "{:?}", rx.borrow());
    }
}
