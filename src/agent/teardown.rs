//! The uninstall signal as the agent sees it (`--teardown-configmap NAMESPACE/NAME`).
//!
//! The chart keeps a ConfigMap whose `data.teardown` is `"false"`; its pre-delete hook
//! (`headcni teardown`, [`crate::cli::teardown`]) sets it to `"true"`. A [`SignalWatcher`]
//! follows that one ConfigMap (a watch narrowed to it by a `metadata.name` field selector,
//! which the agent's Role allows by resource name; the watch relists and resumes by itself)
//! and publishes a [`SignalState`] on a tokio watch channel. What the agent does with it (tear
//! down, stop reconciling, answer not ready, resume) is the reconciler's state machine
//! ([`super::reconcile::Reconciler::pass`]).
//!
//! The watcher never logs above debug: a failure to read the signal is published as a
//! problem, which the reconciler reports like any other (logged once when it appears or
//! changes, shown by `headcni status`).

use super::metrics::ApiErrors;
use crate::clients::kube::{Kube, KubeError, ObjectRef};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use std::time::Duration;
use tokio::sync::watch;

/// The key of the ConfigMap's data that carries the signal.
pub const DATA_KEY: &str = "teardown";
/// Longest pause between attempts while the API fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
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

/// The signal a ConfigMap carries. Only the exact value "true" (as the hook writes it; case and
/// surrounding blanks ignored) means teardown.
pub fn signal_of(cm: &ConfigMap) -> Signal {
    match cm.data.as_ref().and_then(|d| d.get(DATA_KEY)) {
        Some(v) if v.trim().eq_ignore_ascii_case("true") => Signal::Teardown,
        _ => Signal::Normal,
    }
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
    errors: Option<ApiErrors>,
}

impl SignalWatcher {
    pub fn new(kube: Kube, configmap: ObjectRef) -> (Self, watch::Receiver<SignalState>) {
        let (tx, rx) = watch::channel(SignalState::default());
        (Self { kube, configmap, tx, errors: None }, rx)
    }

    /// Counts each failed read of the API in `errors`.
    pub fn counting(mut self, errors: ApiErrors) -> Self {
        self.errors = Some(errors);
        self
    }

    /// Publishes one reading of the watch: a signal (the problem cleared), an absent
    /// ConfigMap (a problem: an uninstall would not reach this node), or a failure (the last
    /// known signal stands). Publishes only what changed.
    pub fn apply(&self, reading: Result<Option<ConfigMap>, KubeError>) {
        let cm = &self.configmap;
        self.tx.send_if_modified(|s| {
            let next = match reading {
                Ok(Some(object)) => SignalState { signal: signal_of(&object), problem: None },
                Ok(None) => SignalState {
                    signal: Signal::Absent,
                    problem: Some(format!(
                        "the uninstall signal ConfigMap {cm} does not exist: an uninstall would not withdraw this \
                         node's routes"
                    )),
                },
                Err(e) => {
                    let hint = match &e {
                        KubeError::Denied { .. } => {
                            " (the agent's Role needs get, list and watch on this ConfigMap, by resource name)"
                        }
                        _ => "",
                    };
                    SignalState { signal: s.signal, problem: Some(format!("reading the uninstall signal: {e}{hint}")) }
                }
            };
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Runs until the task is aborted.
    pub async fn run(self) {
        let readings = self.kube.watch_object::<ConfigMap>(&self.configmap);
        futures::pin_mut!(readings);
        while let Some(reading) = readings.next().await {
            if let Err(e) = &reading {
                log::debug!("watch of {}: {e}", self.configmap);
                if let Some(errors) = &self.errors {
                    errors.inc();
                }
            }
            self.apply(reading);
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
        let f: ConfigMap = serde_json::from_str(&fixture("configmap-teardown-false.json")).unwrap();
        let t: ConfigMap = serde_json::from_str(&fixture("configmap-teardown-true.json")).unwrap();
        assert_eq!(signal_of(&f), Signal::Normal);
        assert_eq!(signal_of(&t), Signal::Teardown);
        for (v, want) in [
            (serde_json::json!({}), Signal::Normal),
            (serde_json::json!({"data": {"teardown": " TRUE "}}), Signal::Teardown),
            (serde_json::json!({"data": {"teardown": "yes"}}), Signal::Normal),
            (serde_json::json!({"data": {"other": "true"}}), Signal::Normal),
        ] {
            assert_eq!(signal_of(&serde_json::from_value(v.clone()).unwrap()), want, "{v}");
        }
        assert!(serde_json::from_value::<ConfigMap>(serde_json::json!({"data": {"teardown": true}})).is_err());
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn readings_become_signal_states() {
        let kube = Kube::from_config(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
        let (w, mut rx) = SignalWatcher::new(kube, cm());
        assert_eq!(rx.borrow().signal, Signal::Unknown);
        let f: ConfigMap = serde_json::from_str(&fixture("configmap-teardown-false.json")).unwrap();
        let t: ConfigMap = serde_json::from_str(&fixture("configmap-teardown-true.json")).unwrap();
        w.apply(Ok(Some(f)));
        assert_eq!(*rx.borrow_and_update(), SignalState { signal: Signal::Normal, problem: None });
        w.apply(Ok(Some(t.clone())));
        assert_eq!(rx.borrow_and_update().signal, Signal::Teardown);

        // API errors: the last reading stands, the problem is published once.
        let slow = || Err(KubeError::Status { what: "x".into(), status: 503, msg: "etcd is slow".into() });
        w.apply(slow());
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.signal, Signal::Teardown);
        assert!(s.problem.as_deref().unwrap().contains("etcd is slow"), "{s:?}");
        w.apply(slow());
        assert!(!rx.has_changed().unwrap(), "the same failure is not published again");
        w.apply(Err(KubeError::Denied { what: "x".into(), status: 403, msg: "forbidden".into() }));
        assert!(rx.borrow_and_update().problem.as_deref().unwrap().contains("by resource name"));

        // Deleted (Helm removes it after the hook): absent, with a problem to report.
        w.apply(Ok(None));
        let s = rx.borrow_and_update().clone();
        assert_eq!(s.signal, Signal::Absent);
        assert!(s.problem.unwrap().contains("does not exist"));
        w.apply(Ok(Some(t)));
        assert_eq!(*rx.borrow_and_update(), SignalState { signal: Signal::Teardown, problem: None });
    }

    #[tokio::test]
    async fn follows_the_recorded_configmap_over_tls() {
        let c = Arc::new(Mutex::new(Some(fixture("configmap-teardown-false.json"))));
        let handler: testserver::Handler = Arc::new(move |s| {
            if s.headers.get("authorization").map(|h| h.as_bytes()) != Some(b"Bearer sa-token") {
                return (401, r#"{"kind":"Status","message":"Unauthorized","code":401}"#.into());
            }
            if !s.path.starts_with("/api/v1/namespaces/kube-system/configmaps?") {
                return (404, r#"{"kind":"Status","code":404}"#.into());
            }
            assert!(s.path.contains("fieldSelector=metadata.name%3Dheadcni-teardown"), "{}", s.path);
            if s.path.contains("watch=true") {
                return (410, r#"{"kind":"Status","message":"too old","reason":"Expired","code":410}"#.into());
            }
            let items = c.lock().unwrap().clone().unwrap_or_default();
            (
                200,
                format!(
                    r#"{{"kind":"ConfigMapList","apiVersion":"v1","metadata":{{"resourceVersion":"9"}},"items":[{items}]}}"#
                ),
            )
        });
        let Some((_server, _dir, kube)) = testpki::in_cluster_server(handler).await else {
            eprintln!("test skipped: no openssl tool to make certificates");
            return;
        };
        let (w, mut rx) = SignalWatcher::new(kube, cm());
        let task = tokio::spawn(w.run());
        let got = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.signal != Signal::Unknown)).await;
        assert_eq!(got.unwrap().unwrap().clone(), SignalState { signal: Signal::Normal, problem: None });
        task.abort();
    }
}
