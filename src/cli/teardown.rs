//! `headcni teardown`: the chart's pre-delete hook (a Job on one node, as uid 65534, with a
//! Role that may read and patch the one uninstall-signal ConfigMap and get the one DaemonSet).
//!
//! With `--deployment` (the route approval controller), it first sets the ConfigMap's
//! `data.teardown` to `"withdraw-approvals"` and waits until the controller reports no ready
//! replica: its leader turns not ready once it has withdrawn every approval it made. That comes
//! first because the controller reaches Headscale through the pod network, which the agents take
//! down next. Then it raises the uninstall signal (a JSON merge patch of `data.teardown` to
//! `"true"`) and waits until the agents' DaemonSet reports no ready pod: every agent that was
//! ready turns not ready only once it has withdrawn its node's routes ([`crate::agent::teardown`]).
//! The wait is bounded: on timeout the hook warns, naming the pods still ready when it may list
//! them (the chart's Role does not allow that: pod specs in the namespace are none of its
//! business) or else how to find them, and exits 0 so that the uninstall goes on. Only an API
//! that refuses or keeps failing makes it exit non-zero (the Job then retries; `helm uninstall
//! --no-hooks` skips it). A ConfigMap or DaemonSet that does not exist is a warning: there is
//! nothing to signal or to wait for.

use super::exit;
use crate::agent::teardown::{self, DATA_KEY, Signal};
use crate::clients::kube::{InvalidRef, Kind, Kube, KubeError, ObjectRef};
use crate::controller::WITHDRAW_APPROVALS;
use clap::Args;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Pause between two looks at the DaemonSet.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Args)]
pub struct TeardownArgs {
    /// The uninstall signal the agents follow (their --teardown-configmap).
    #[arg(long, env = "HEADCNI_TEARDOWN_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub configmap: String,
    /// The agents' DaemonSet, whose ready pods are waited for.
    #[arg(long, env = "HEADCNI_TEARDOWN_DAEMONSET", value_name = "NAMESPACE/NAME")]
    pub daemonset: String,
    /// The route approval controller's Deployment, whose ready replicas are waited for after
    /// the agents' (its leader withdraws every approval it made, then turns not ready).
    #[arg(long, env = "HEADCNI_TEARDOWN_DEPLOYMENT", value_name = "NAMESPACE/NAME")]
    pub deployment: Option<String>,
    /// How long to wait for the agents, in seconds; then warn and exit 0.
    #[arg(long, env = "HEADCNI_TEARDOWN_TIMEOUT", value_name = "SECONDS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub timeout: u64,
    /// kubeconfig for the Kubernetes API (default: the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Args(#[from] InvalidRef),
    #[error("raising the uninstall signal: {0}")]
    Signal(KubeError),
    #[error("watching the agents: {0}")]
    Wait(KubeError),
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
}

/// How the hook ended without an API failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// No agent is ready any more: each withdrew its node's routes.
    Done,
    /// The ConfigMap does not exist: the agents cannot be told.
    NoSignal,
    /// The DaemonSet does not exist: nothing to wait for.
    NoDaemonSet,
    /// The timeout passed with agents still ready.
    TimedOut {
        ready: u64,
        desired: u64,
        /// "pod (node)" of the ready pods, when the hook may list pods.
        pods: Option<Vec<String>>,
        /// The DaemonSet's selector, for `kubectl get pods -l`.
        selector: String,
    },
}

/// (ready, desired) of a DaemonSet; absent counts are 0 (the API omits zeros).
pub fn counts(ds: &DaemonSet) -> (u64, u64) {
    let count = |n: i32| u64::try_from(n).unwrap_or(0);
    ds.status.as_ref().map_or((0, 0), |s| (count(s.number_ready), count(s.desired_number_scheduled)))
}

/// The DaemonSet's spec.selector.matchLabels as a label selector ("k=v,k2=v2").
pub fn selector(ds: &DaemonSet) -> String {
    let mut parts: Vec<String> = ds
        .spec
        .selector
        .match_labels
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
        .unwrap_or_default();
    parts.sort();
    parts.join(",")
}

/// "pod (node)" for each ready pod.
pub fn ready_pods(pods: &[Pod]) -> Vec<String> {
    let mut out: Vec<String> = pods
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| {
            let name = p.metadata.name.as_deref().unwrap_or("?");
            let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("?");
            format!("{name} ({node})")
        })
        .collect();
    out.sort();
    out
}

/// Raises the signal and waits for the agents, polling every `poll` for at most `timeout`.
pub async fn run(
    kube: &Kube,
    configmap: &ObjectRef,
    daemonset: &ObjectRef,
    timeout: Duration,
    poll: Duration,
) -> Result<HookOutcome, HookError> {
    let deadline = Instant::now() + timeout;
    let cm_what = configmap.to_string();
    let patch = json!({ "data": { DATA_KEY: "true" } });
    let mut failures = 0u32;
    loop {
        match kube.merge_patch::<ConfigMap>(configmap, &patch).await {
            Ok(object) => {
                if teardown::signal_of(&object) != Signal::Teardown {
                    return Err(HookError::Invalid {
                        what: cm_what,
                        msg: format!("the patched ConfigMap does not say data.{DATA_KEY}=\"true\""),
                    });
                }
                log::info!("uninstall signal raised: {cm_what} data.{DATA_KEY}=\"true\"");
                break;
            }
            Err(KubeError::NotFound { .. }) => {
                log::warn!(
                    "{cm_what} does not exist: the agents cannot be told to withdraw their routes; after the \
                     uninstall run `headcni agent --cleanup` on every node"
                );
                return Ok(HookOutcome::NoSignal);
            }
            Err(e) if e.is_transient() && Instant::now() + teardown::backoff(failures) < deadline => {
                if failures == 0 {
                    log::warn!("raising the uninstall signal: {e}; retrying");
                }
                tokio::time::sleep(teardown::backoff(failures)).await;
                failures = failures.saturating_add(1);
            }
            Err(e) => return Err(HookError::Signal(e)),
        }
    }

    let ds_what = daemonset.to_string();
    let mut last: Option<(u64, u64)> = None;
    let mut failing = false;
    loop {
        match kube.get::<DaemonSet>(daemonset).await {
            Ok(ds) => {
                failing = false;
                let (ready, desired) = counts(&ds);
                if ready == 0 {
                    log::info!("no agent of {ds_what} is ready any more: every node withdrew its routes");
                    return Ok(HookOutcome::Done);
                }
                if last != Some((ready, desired)) {
                    log::info!("waiting for {ready} of {desired} agents of {ds_what} to withdraw their routes");
                    last = Some((ready, desired));
                }
                if Instant::now() >= deadline {
                    let selector = selector(&ds);
                    let pods = list_ready_pods(kube, daemonset, &selector).await;
                    return Ok(HookOutcome::TimedOut { ready, desired, pods, selector });
                }
            }
            Err(KubeError::NotFound { .. }) => {
                log::warn!("{ds_what} does not exist: no agent to wait for");
                return Ok(HookOutcome::NoDaemonSet);
            }
            Err(e) if e.is_transient() => {
                if !failing {
                    log::warn!("reading {ds_what}: {e}; retrying");
                    failing = true;
                }
                if Instant::now() >= deadline {
                    return Err(HookError::Wait(e));
                }
            }
            Err(e) => return Err(HookError::Wait(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(poll.min(left).max(Duration::from_millis(10))).await;
    }
}

/// Asks the controller to withdraw its approvals and waits until its Deployment reports no
/// ready replica, or `deadline`. Answers whether it got there; a missing ConfigMap or an API
/// that refuses ends the phase (warned): the agents' phase follows in any case.
pub async fn withdraw_approvals(
    kube: &Kube,
    configmap: &ObjectRef,
    deployment: &ObjectRef,
    deadline: Instant,
    poll: Duration,
) -> bool {
    // A retried hook finds the agents' signal raised already: it must not lower it (the agents
    // would resume and advertise again); the controller withdraws under "true" too.
    if let Ok(cm) = kube.get::<ConfigMap>(configmap).await
        && teardown::signal_of(&cm) == Signal::Teardown
    {
        log::info!("{configmap} says data.{DATA_KEY}=\"true\" already: waiting for {deployment}");
        return wait_deployment(kube, deployment, deadline, poll).await;
    }
    let patch = json!({ "data": { DATA_KEY: WITHDRAW_APPROVALS } });
    match kube.merge_patch::<ConfigMap>(configmap, &patch).await {
        Ok(_) => log::info!(
            "asked {deployment} to withdraw its approvals: {configmap} data.{DATA_KEY}={WITHDRAW_APPROVALS:?}"
        ),
        Err(e) => {
            log::warn!("asking {deployment} to withdraw its approvals through {configmap}: {e}");
            return false;
        }
    }
    wait_deployment(kube, deployment, deadline, poll).await
}

/// Waits until the Deployment reports no ready replica, or `deadline`. Answers whether it got
/// there; an API that keeps failing, or a missing Deployment, ends the wait (warned).
pub async fn wait_deployment(kube: &Kube, deployment: &ObjectRef, deadline: Instant, poll: Duration) -> bool {
    let what = deployment.to_string();
    let mut last = None;
    loop {
        match kube.get::<Deployment>(deployment).await {
            Ok(d) => {
                let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
                if ready <= 0 {
                    log::info!("no replica of {what} is ready any more: every approval it made is withdrawn");
                    return true;
                }
                if last != Some(ready) {
                    log::info!("waiting for {what} to withdraw its approvals ({ready} ready)");
                    last = Some(ready);
                }
            }
            Err(KubeError::NotFound { .. }) => {
                log::warn!("{what} does not exist: no controller to wait for");
                return true;
            }
            Err(e) => log::warn!("reading {what}: {e}"),
        }
        if Instant::now() >= deadline {
            log::warn!(
                "{what} still ready at the timeout: approvals it made may remain in Headscale (remove them with \
                 headscale nodes approve-routes)"
            );
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(poll.min(left).max(Duration::from_millis(10))).await;
    }
}

/// The ready pods of the DaemonSet, if this identity may list pods (one try, no noise).
async fn list_ready_pods(kube: &Kube, daemonset: &ObjectRef, selector: &str) -> Option<Vec<String>> {
    if selector.is_empty() {
        return None;
    }
    match kube.list::<Pod>(&daemonset.namespace, selector).await {
        Ok(list) => Some(ready_pods(&list)),
        Err(e) => {
            log::debug!("listing the agents' pods: {e}");
            None
        }
    }
}

/// Entry point of `headcni teardown`: 0 unless the API refused or kept failing.
pub fn main(args: TeardownArgs) -> i32 {
    crate::logging::init_stderr("teardown", "info");
    let refs = ObjectRef::parse(Kind::ConfigMap, "--configmap", &args.configmap)
        .and_then(|cm| Ok((cm, ObjectRef::parse(Kind::DaemonSet, "--daemonset", &args.daemonset)?)));
    let (configmap, daemonset) = match refs {
        Ok(r) => r,
        Err(e) => {
            crate::logging::fatal("teardown", &e);
            return exit::USAGE;
        }
    };
    let deployment = match args.deployment.as_deref().filter(|d| !d.is_empty()) {
        None => None,
        Some(d) => match ObjectRef::parse(Kind::Deployment, "--deployment", d) {
            Ok(r) => Some(r),
            Err(e) => {
                log::error!("{e}");
                return 2;
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            crate::logging::fatal("teardown", &format!("starting the runtime: {e}"));
            return exit::FAILED;
        }
    };
    let kube = match rt.block_on(Kube::from_kubeconfig_or_in_cluster(args.kubeconfig.as_deref())) {
        Ok(k) => k,
        Err(e) => {
            crate::logging::fatal("teardown", &e);
            return exit::FAILED;
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    let started = Instant::now();
    if let Some(d) = &deployment {
        // The controller first, while the pod network still carries its requests to Headscale;
        // it gets half of the time, the agents the rest (at least half a minute).
        let deadline = Instant::now() + timeout / 2;
        rt.block_on(withdraw_approvals(&kube, &configmap, d, deadline, POLL_INTERVAL));
    }
    let left = (started + timeout).saturating_duration_since(Instant::now()).max(Duration::from_secs(30));
    let outcome = rt.block_on(run(&kube, &configmap, &daemonset, left, POLL_INTERVAL));
    match outcome {
        Ok(HookOutcome::TimedOut { ready, desired, pods, selector }) => {
            let which = match pods {
                Some(p) if !p.is_empty() => format!(": {}", p.join(", ")),
                _ => {
                    format!(" (see kubectl -n {} get pods -l {selector} -o wide, and their logs)", daemonset.namespace)
                }
            };
            log::warn!(
                "{ready} of {desired} agents still ready after {}s; the uninstall goes on, and those nodes may keep \
                 advertising their pod CIDRs: run `headcni agent --cleanup` on them{which}",
                args.timeout
            );
            0
        }
        Ok(_) => exit::OK,
        Err(e) => {
            crate::logging::fatal("teardown", &e);
            exit::FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clients::http::testserver;
    use crate::clients::kube::testpki;
    use serde_json::Value;
    use std::sync::{Arc, Mutex};

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/tests/fixtures/kubernetes/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn refs() -> (ObjectRef, ObjectRef) {
        (
            ObjectRef::parse(Kind::ConfigMap, "--configmap", "kube-system/headcni-teardown").unwrap(),
            ObjectRef::parse(Kind::DaemonSet, "--daemonset", "kube-system/headcni").unwrap(),
        )
    }

    /// A cluster: the ConfigMap (or a canned failure for the PATCH), the DaemonSet's ready
    /// count going down by one per GET down to `floor`, and pods (or a 403).
    struct Cluster {
        cm: Value,
        patch_failures: Vec<(u16, String)>,
        ready: u64,
        floor: u64,
        ds_missing: bool,
        pods: Option<Value>,
    }

    fn handler(c: Arc<Mutex<Cluster>>) -> testserver::Handler {
        Arc::new(move |s| {
            if s.headers.get("authorization").map(|h| h.as_bytes()) != Some(b"Bearer sa-token") {
                return (401, r#"{"kind":"Status","message":"Unauthorized","code":401}"#.into());
            }
            let mut c = c.lock().unwrap();
            // kube-rs ends object paths with "?" and its (possibly empty) parameters.
            let path = match s.path.split_once('?') {
                Some((p, "")) => p,
                _ => s.path.as_str(),
            };
            match (s.method.as_str(), path) {
                ("PATCH", "/api/v1/namespaces/kube-system/configmaps/headcni-teardown") => {
                    if !c.patch_failures.is_empty() {
                        return c.patch_failures.remove(0);
                    }
                    if s.headers.get("content-type").map(|h| h.as_bytes()) != Some(b"application/merge-patch+json") {
                        return (415, r#"{"kind":"Status","code":415}"#.into());
                    }
                    let patch: Value = serde_json::from_slice(&s.body).unwrap();
                    c.cm["data"]["teardown"] = patch["data"]["teardown"].clone();
                    (200, c.cm.to_string())
                }
                ("GET", "/apis/apps/v1/namespaces/kube-system/daemonsets/headcni") if !c.ds_missing => {
                    let mut ds: Value = serde_json::from_str(&fixture("daemonset-agents-ready.json")).unwrap();
                    // The agents turn not ready only after the signal.
                    if c.cm["data"]["teardown"] == "true" && c.ready > c.floor {
                        c.ready -= 1;
                    }
                    ds["status"]["numberReady"] = json!(c.ready);
                    if c.ready == 0 {
                        ds["status"].as_object_mut().unwrap().remove("numberReady");
                    }
                    (200, ds.to_string())
                }
                ("GET", p) if p.starts_with("/api/v1/namespaces/kube-system/pods?") => match &c.pods {
                    Some(list) => {
                        assert!(
                            p.contains(
                                "labelSelector=app.kubernetes.io%2Fcomponent%3Dagent\
                                 %2Capp.kubernetes.io%2Finstance%3Dheadcni%2Capp.kubernetes.io%2Fname%3Dheadcni"
                            ),
                            "{p}"
                        );
                        (200, list.to_string())
                    }
                    None => (403, r#"{"kind":"Status","message":"pods is forbidden","code":403}"#.into()),
                },
                _ => (404, r#"{"kind":"Status","reason":"NotFound","code":404}"#.into()),
            }
        })
    }

    fn cluster() -> Arc<Mutex<Cluster>> {
        Arc::new(Mutex::new(Cluster {
            cm: serde_json::from_str(&fixture("configmap-teardown-false.json")).unwrap(),
            patch_failures: Vec::new(),
            ready: 3,
            floor: 0,
            ds_missing: false,
            pods: None,
        }))
    }

    const FAST: Duration = Duration::from_millis(20);

    #[test]
    fn recorded_daemonset() {
        let ds: DaemonSet = serde_json::from_str(&fixture("daemonset-agents-ready.json")).unwrap();
        assert_eq!(counts(&ds), (3, 3));
        assert_eq!(
            selector(&ds),
            "app.kubernetes.io/component=agent,app.kubernetes.io/instance=headcni,app.kubernetes.io/name=headcni"
        );
        let ds = |v: Value| serde_json::from_value::<DaemonSet>(v);
        assert_eq!(counts(&ds(json!({"status": {}})).unwrap()), (0, 0), "the API may omit zeros");
        assert_eq!(counts(&ds(json!({})).unwrap()), (0, 0));
        assert!(ds(json!({"status": {"numberReady": "3"}})).is_err());
        let pods: Vec<Pod> = serde_json::from_value(json!([
            {"metadata": {"name": "headcni-b"}, "spec": {"nodeName": "node-2"},
             "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "headcni-a"}, "spec": {"nodeName": "node-1"},
             "status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            {"metadata": {"name": "headcni-c"}, "spec": {"nodeName": "node-3"}}
        ]))
        .unwrap();
        assert_eq!(ready_pods(&pods), vec!["headcni-b (node-2)"]);
    }

    #[tokio::test]
    async fn raises_the_signal_and_waits_for_the_agents() {
        let c = cluster();
        let Some((server, _dir, kube)) = testpki::in_cluster_server(handler(c.clone())).await else {
            eprintln!("test skipped: no openssl tool to make certificates");
            return;
        };
        let (cm, ds) = refs();
        assert_eq!(run(&kube, &cm, &ds, Duration::from_secs(10), FAST).await.unwrap(), HookOutcome::Done);
        assert_eq!(c.lock().unwrap().cm["data"]["teardown"], "true");
        let seen = server.seen.lock().unwrap().clone();
        assert_eq!(seen[0].method, hyper::Method::PATCH);
        assert_eq!(serde_json::from_slice::<Value>(&seen[0].body).unwrap(), json!({"data": {"teardown": "true"}}));
        assert_eq!(seen.iter().filter(|s| s.method == hyper::Method::GET).count(), 3, "3 → 2 → 1 → 0 (field absent)");
    }

    #[tokio::test]
    async fn a_timeout_names_what_is_still_ready_and_is_not_an_error() {
        let c = cluster();
        c.lock().unwrap().floor = 2;
        let Some((_server, _dir, kube)) = testpki::in_cluster_server(handler(c.clone())).await else {
            return;
        };
        let (cm, ds) = refs();
        let out = run(&kube, &cm, &ds, Duration::from_millis(300), FAST).await.unwrap();
        let HookOutcome::TimedOut { ready, desired, pods, selector } = out else { panic!("{out:?}") };
        assert_eq!((ready, desired, pods), (2, 3, None), "the chart's Role may not list pods");
        assert!(selector.contains("app.kubernetes.io/component=agent"));

        // An identity that may list pods gets their names.
        c.lock().unwrap().pods = Some(json!({"kind": "PodList", "items": [
            {"metadata": {"name": "headcni-x7k2p"}, "spec": {"nodeName": "node-3"},
             "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        ]}));
        let out = run(&kube, &cm, &ds, Duration::from_millis(200), FAST).await.unwrap();
        assert!(
            matches!(out, HookOutcome::TimedOut { pods: Some(ref p), .. } if p == &["headcni-x7k2p (node-3)"]),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn api_faults() {
        let c = cluster();
        let Some((_server, _dir, kube)) = testpki::in_cluster_server(handler(c.clone())).await else {
            return;
        };
        let (cm, ds) = refs();
        // Transient failures are retried.
        c.lock().unwrap().patch_failures =
            vec![(503, r#"{"kind":"Status","message":"etcdserver: leader changed","code":503}"#.into())];
        assert_eq!(run(&kube, &cm, &ds, Duration::from_secs(10), FAST).await.unwrap(), HookOutcome::Done);

        // A refusal is an error at once, naming what the Role lacks.
        c.lock().unwrap().patch_failures = vec![(403, fixture("status-forbidden-configmap.json"))];
        let err = run(&kube, &cm, &ds, Duration::from_secs(10), FAST).await.unwrap_err().to_string();
        assert!(err.contains("cannot patch resource \"configmaps\""), "{err}");

        // No ConfigMap, no DaemonSet: warnings, not errors.
        let missing = ObjectRef::parse(Kind::ConfigMap, "--configmap", "kube-system/other").unwrap();
        assert_eq!(run(&kube, &missing, &ds, Duration::from_secs(1), FAST).await.unwrap(), HookOutcome::NoSignal);
        c.lock().unwrap().ds_missing = true;
        assert_eq!(run(&kube, &cm, &ds, Duration::from_secs(1), FAST).await.unwrap(), HookOutcome::NoDaemonSet);
    }
}
