//! `headcni controller`: the cluster-wide role that approves each node's pod CIDRs in Headscale.
//! It is the only HeadCNI component that holds the Headscale API key (a Deployment of at least
//! two replicas, one of which leads); the agents keep only the pre-auth key.
//!
//! It binds each tailnet node to the Kubernetes Node whose agent published its node key
//! ([`crate::binding`]), and approves on it exactly that Node's pod CIDRs that it advertises
//! ([`plan`]). It follows the Nodes with a kube-rs reflector, reads Headscale on each pass
//! (Headscale has no watch), and runs a pass when a Node changes, when it became the leader,
//! and every resync interval; while something is pending (a route not advertised yet), soon.
//!
//! - [`config`]: the flags (Headscale over https only)
//! - [`election`]: leader election on a Lease
//! - [`plan`]: one pass's decisions, pure
//! - [`record`]: what the controller approved (a ConfigMap), so that it withdraws only that
//! - [`reconcile`]: carrying a plan out, in an order that never loses track of an approval
//! - [`metrics`]: Prometheus metrics and the probes
//!
//! The agent and the controller never import each other: they meet in the Node's annotations.

pub mod config;
pub mod election;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod record;

use crate::binding::{self, APPROVAL_ANNOTATION, ApprovalStatus};
use crate::clients::headscale::RestHeadscale;
use crate::clients::http;
use crate::clients::kube::{Kube, KubeError, ObjectRef};
use config::{ControllerArgs, ControllerConfig};
use election::{Elector, KubeLease};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use metrics::{Health, KubeOp, Metrics};
use plan::NodeView;
use reconcile::{ClusterApi, Controller, Outcome};
use record::Record;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How soon to look again while something is pending.
pub const PENDING_RETRY: Duration = Duration::from_secs(1);
/// The longest pause after failures. Short: a node that joined while Headscale was away is
/// approved within seconds of its return, and one list every 10 s costs Headscale nothing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The record ConfigMap and the Nodes' status annotations through the Kubernetes API.
pub struct KubeCluster {
    kube: Kube,
    record: ObjectRef,
}

impl ClusterApi for KubeCluster {
    async fn load_record(&self) -> Result<(Record, String), KubeError> {
        let cm: ConfigMap = self.kube.get(&self.record).await?;
        let text = cm.data.as_ref().and_then(|d| d.get(record::DATA_KEY)).map(String::as_str);
        let rec = Record::parse(text).map_err(|msg| KubeError::Invalid { what: self.record.to_string(), msg })?;
        Ok((rec, cm.metadata.resource_version.unwrap_or_default()))
    }

    async fn store_record(&self, rec: &Record, version: &str) -> Result<String, KubeError> {
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(self.kube.client(), &self.record.namespace);
        let what = self.record.to_string();
        let mut cm: ConfigMap = self.kube.get(&self.record).await?;
        if cm.metadata.resource_version.as_deref() != Some(version) {
            return Err(KubeError::Status { what, status: 409, msg: "changed since it was read".into() });
        }
        cm.data.get_or_insert_default().insert(record::DATA_KEY.into(), rec.to_json());
        let params = kube::api::PostParams::default();
        let fut = api.replace(&self.record.name, &params, &cm);
        match tokio::time::timeout(crate::clients::kube::REQUEST_TIMEOUT, fut).await {
            Ok(Ok(cm)) => Ok(cm.metadata.resource_version.unwrap_or_default()),
            Ok(Err(e)) => Err(KubeError::from_kube(&what, e)),
            Err(_) => Err(KubeError::Unreachable(format!("{what}: no answer"))),
        }
    }

    async fn set_status(&self, node: &str, status: Option<&ApprovalStatus>) -> Result<(), KubeError> {
        let obj = ObjectRef::node(node).map_err(|e| KubeError::Invalid { what: node.into(), msg: e.to_string() })?;
        let value = status.map(ApprovalStatus::to_json);
        let patch = json!({"metadata": {"annotations": {APPROVAL_ANNOTATION: value}}});
        self.kube.merge_patch::<Node>(&obj, &patch).await.map(|_| ())
    }
}

/// What a pass needs of each Node in the cache.
pub fn node_views(store: &Store<Node>) -> Vec<NodeView> {
    let mut out: Vec<NodeView> = store
        .state()
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.clone()?;
            Some(NodeView {
                name,
                key: binding::published_key(n),
                pod_cidrs: binding::assigned_pod_cidrs(n),
                status: ApprovalStatus::of(n),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn random_suffix() -> String {
    let mut b = [0u8; 4];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// The Headscale client: https only, trusting the given CA (and the public roots).
fn headscale(cfg: &ControllerConfig) -> anyhow::Result<RestHeadscale> {
    let cas = match &cfg.headscale_ca_file {
        Some(p) => {
            let pem =
                std::fs::read(p).map_err(|e| anyhow::anyhow!("reading --headscale-ca-file {}: {e}", p.display()))?;
            http::parse_certificates(&pem, "--headscale-ca-file")?
        }
        None => Vec::new(),
    };
    let endpoint = http::Endpoint::from_url(&cfg.headscale_url, Some(http::tls_config(cas, true, None)?))?;
    anyhow::ensure!(endpoint.is_tls(), "--headscale-url must be https");
    // Fail early on an unreadable key (it is read again on each use, so a rotation applies).
    cfg.api_key.load("Headscale API key")?;
    Ok(RestHeadscale::new(endpoint, cfg.api_key.clone()))
}

/// Entry point of `headcni controller`: the exit code (see `headcni --help`).
pub fn main(args: ControllerArgs) -> i32 {
    use crate::logging::{exit, fatal};
    crate::logging::init_stderr("controller", "info");
    let cfg = match ControllerConfig::from_args(&args, &hostname(), &random_suffix()) {
        Ok(c) => c,
        Err(e) => {
            fatal("controller", &format!("invalid configuration: {e}"));
            return exit::USAGE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            fatal("controller", &format!("starting the runtime: {e}"));
            return exit::FAILED;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => exit::OK,
        Err(e) => {
            fatal("controller", &format!("{e:#}"));
            exit::FAILED
        }
    }
}

/// What the uninstall hook first sets data.teardown to: the controller withdraws its approvals
/// while the agents, which act on "true" only, still keep the pod network that carries the
/// controller's requests to Headscale (`headcni teardown` sets it).
pub const WITHDRAW_APPROVALS: &str = "withdraw-approvals";

/// Follows the uninstall signal: true while its data.teardown is "true" or
/// [`WITHDRAW_APPROVALS`] (a missing or unreadable ConfigMap keeps the last reading).
fn follow_teardown(kube: &Kube, cm: ObjectRef, tx: watch::Sender<bool>) -> tokio::task::JoinHandle<()> {
    let events = kube.watch_object::<ConfigMap>(&cm);
    tokio::spawn(async move {
        futures::pin_mut!(events);
        while let Some(ev) = events.next().await {
            if let Ok(Some(cm)) = ev {
                let v = cm.data.as_ref().and_then(|d| d.get("teardown")).map(|s| s.trim().to_ascii_lowercase());
                match v.as_deref() {
                    Some("true" | WITHDRAW_APPROVALS) => tx.send_if_modified(|t| !std::mem::replace(t, true)),
                    Some("false") => tx.send_if_modified(|t| std::mem::replace(t, false)),
                    _ => false,
                };
            }
        }
    })
}

async fn run(cfg: ControllerConfig) -> anyhow::Result<()> {
    log::info!(
        "headcni controller {} starting as {}: Headscale {}, Lease {}, record {}{}",
        crate::VERSION,
        cfg.identity,
        cfg.headscale_url,
        cfg.lease,
        cfg.record,
        if cfg.delete_tailnet_nodes { ", deleting the tailnet nodes of deleted Nodes" } else { "" }
    );
    let hs = headscale(&cfg)?;
    let kube = Kube::from_kubeconfig_or_in_cluster(cfg.kubeconfig.as_deref()).await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {} for metrics: {e}", cfg.metrics_addr))?;
    let server = tokio::spawn(metrics::serve(listener, metrics.clone(), health.clone(), stop_rx.clone()));

    // Every replica follows the Nodes, so a new leader starts with a warm cache.
    let (store, writer) = reflector::store::<Node>();
    let changed = Arc::new(Notify::new());
    let nodes_api: kube::Api<Node> = kube::Api::all(kube.client());
    let follower = {
        let changed = changed.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let stream = watcher(nodes_api, watcher::Config::default())
                .backoff(crate::clients::kube::watch_backoff())
                .reflect(writer);
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => changed.notify_one(),
                    Err(e) => {
                        metrics.kubernetes_error(KubeOp::NodeWatch);
                        log::debug!("watch of the Nodes: {e}");
                    }
                }
            }
        })
    };

    let (lead_tx, mut lead_rx) = watch::channel(false);
    let elector = Elector::new(
        KubeLease::new(kube.client(), &cfg.lease.namespace, &cfg.lease.name),
        &cfg.lease.namespace,
        &cfg.lease.name,
        &cfg.identity,
        cfg.timings,
    );
    let election = tokio::spawn(elector.run(lead_tx, stop_rx.clone()));
    let (td_tx, mut td_rx) = watch::channel(false);
    let td_task = cfg.teardown.clone().map(|cm| follow_teardown(&kube, cm, td_tx));

    let ctl = Controller {
        hs,
        cluster: KubeCluster { kube: kube.clone(), record: cfg.record.clone() },
        metrics: metrics.clone(),
        cluster_cidrs: cfg.cluster_cidrs.clone(),
        delete_unbound: cfg.delete_tailnet_nodes,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    tokio::select! {
        r = store.wait_until_ready() => r.map_err(|e| anyhow::anyhow!("the Node cache: {e}"))?,
        _ = term.recv() => return shutdown(stop_tx, election, server, follower).await,
        _ = int.recv() => return shutdown(stop_tx, election, server, follower).await,
    }
    log::info!("Node cache synced ({} Nodes)", store.state().len());
    let mut failures = 0u32;
    let mut torn_down = false;
    loop {
        health.beat();
        let leading = *lead_rx.borrow_and_update();
        let teardown = *td_rx.borrow_and_update();
        metrics.leader.set(i64::from(leading));
        let delay = if leading {
            let started = std::time::Instant::now();
            let lead_now = || *lead_rx.borrow();
            let (outcome, record_empty) = ctl.pass(&node_views(&store), teardown, &lead_now).await;
            metrics.passes.inc();
            metrics.pass_duration.observe(started.elapsed().as_secs_f64());
            if teardown && record_empty && outcome != Outcome::Failed {
                if !torn_down {
                    log::info!("uninstall: every approval the controller made is withdrawn");
                }
                torn_down = true;
            }
            match outcome {
                Outcome::Converged | Outcome::NotLeading => {
                    failures = 0;
                    cfg.resync
                }
                Outcome::Pending => {
                    failures = 0;
                    PENDING_RETRY
                }
                Outcome::Failed => {
                    failures = failures.saturating_add(1);
                    (PENDING_RETRY * 2u32.saturating_pow(failures.min(5))).min(MAX_BACKOFF)
                }
            }
        } else {
            cfg.resync
        };
        if !teardown {
            torn_down = false;
        }
        // A follower has nothing to withdraw; the leader is done once its record is empty.
        if teardown && (torn_down || !leading) {
            health.set_ready(false, "uninstall: approvals withdrawn");
        } else {
            health.set_ready(true, "");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = changed.notified() => {
                // Let a burst of Node events settle into one pass.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(()) = lead_rx.changed() => {}
            Ok(()) = td_rx.changed() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if let Some(t) = td_task {
        t.abort();
    }
    log::info!("stopping");
    shutdown(stop_tx, election, server, follower).await
}

/// Stops the tasks; the election gives the Lease up first (bounded), so that another replica
/// takes over at once.
async fn shutdown(
    stop: watch::Sender<bool>,
    election: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    stop.send_replace(true);
    follower.abort();
    if tokio::time::timeout(Duration::from_secs(5), election).await.is_err() {
        log::warn!("the Lease was not given up in time");
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    Ok(())
}

#[cfg(test)]
mod tests;
