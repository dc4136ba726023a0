//! `headcni agent`: the node daemon (a DaemonSet pod on the host network) that makes the tailnet
//! the pod network of its node. It owns the reconcile loop and everything the loop keeps on the
//! node; the clients it talks through are [`crate::clients`], the commands that only look at or
//! signal it are [`crate::cli`].
//!
//! - [`config`]: the flags and their validation
//! - [`node`]: the node's pod CIDRs (flag, or the Kubernetes Node)
//! - [`reconcile`]: the loop that keeps all of it as wanted (join and backoff, routes, the
//!   uninstall state machine, publishing)
//! - [`hostnet`]: the host's network as the agent keeps it: forwarding, policy rules,
//!   masquerade tables, the tailnet MTU
//! - [`state`]: what HeadCNI added outside the node (so that it withdraws only that)
//! - [`cleanup`]: undoing it (`--cleanup`, and the uninstall)
//! - [`teardown`]: the uninstall signal (a ConfigMap the agent follows)
//! - [`report`]: the published status file and the problem list
//! - [`metrics`], [`serve`]: Prometheus metrics and the HTTP server with the health probes
//!
//! SIGTERM stops the agent and leaves the node as it is: pods keep working while the agent is
//! restarted or upgraded. The uninstall signal makes every agent undo its node's changes (but
//! the node file) and answer not ready; `--cleanup` undoes all of HeadCNI's changes and exits
//! (a node that missed the uninstall, or leaves HeadCNI).

pub mod cleanup;
pub mod config;
pub mod hostnet;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod reconcile;
pub mod report;
pub mod serve;
pub mod state;
pub mod teardown;

use crate::clients::headscale::RestHeadscale;
use crate::clients::localapi::SocketLocalApi;
use crate::clients::{http, kube};
use config::{AgentArgs, AgentConfig, CidrSource};
use hostnet::KernelHostNetwork;
use ipnetwork::IpNetwork;
use node::{NodeCidrs, NodeError, PodCidrSource, StaticCidrs};
use reconcile::{PassOutcome, Reconciler, next_delay};
use std::sync::Arc;
use std::time::Duration;
use teardown::{Signal, SignalState, SignalWatcher};

/// The pod CIDR source picked by the configuration.
pub enum CidrSourceImpl {
    Static(StaticCidrs),
    Node(Box<NodeCidrs>),
}

impl PodCidrSource for CidrSourceImpl {
    async fn pod_cidrs(&self) -> Result<Option<Vec<IpNetwork>>, NodeError> {
        match self {
            Self::Static(s) => s.pod_cidrs().await,
            Self::Node(n) => n.pod_cidrs().await,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Self::Static(s) => s.kind(),
            Self::Node(n) => n.kind(),
        }
    }
    fn refresh_interval(&self) -> Duration {
        match self {
            Self::Static(s) => s.refresh_interval(),
            Self::Node(n) => n.refresh_interval(),
        }
    }
    async fn changed(&self) {
        match self {
            Self::Static(s) => s.changed().await,
            Self::Node(n) => n.changed().await,
        }
    }
}

fn system_hostname() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().to_lowercase();
    name.split('.').next().unwrap_or("node").to_string()
}

/// The Headscale client for the configuration (`None` without an API key).
pub fn headscale_client(cfg: &AgentConfig) -> anyhow::Result<Option<RestHeadscale>> {
    let (Some(url), Some(key)) = (&cfg.headscale_url, &cfg.api_key) else { return Ok(None) };
    let tls = if url.starts_with("https://") {
        let cas = match &cfg.headscale_ca_file {
            Some(p) => {
                let pem = std::fs::read(p)
                    .map_err(|e| anyhow::anyhow!("reading --headscale-ca-file {}: {e}", p.display()))?;
                http::parse_certificates(&pem, "--headscale-ca-file")?
            }
            None => Vec::new(),
        };
        Some(http::tls_config(cas, true, None)?)
    } else {
        None
    };
    let endpoint = http::Endpoint::from_url(url, tls)?;
    Ok(Some(RestHeadscale::new(endpoint, key.clone())))
}

/// The Kubernetes client, when the configuration reads anything from Kubernetes (one client for
/// all: the Node's watch and the uninstall signal's share its connections).
async fn kube_client(cfg: &AgentConfig) -> anyhow::Result<Option<kube::Kube>> {
    let needed =
        !matches!(cfg.cidr_source, CidrSource::Static(_)) || cfg.teardown_configmap.is_some() || cfg.network_policy;
    if !needed {
        return Ok(None);
    }
    Ok(Some(kube::Kube::from_kubeconfig_or_in_cluster(cfg.kubeconfig.as_deref()).await?))
}

fn cidr_source(cfg: &AgentConfig, kube: Option<&kube::Kube>) -> anyhow::Result<CidrSourceImpl> {
    let name = cfg.node_name.clone().unwrap_or_default();
    Ok(match (&cfg.cidr_source, kube) {
        (CidrSource::Static(c), _) => CidrSourceImpl::Static(StaticCidrs(c.clone())),
        (_, Some(kube)) => CidrSourceImpl::Node(Box::new(NodeCidrs::new(&name, kube.clone())?)),
        (_, None) => anyhow::bail!("no Kubernetes client for the Node's pod CIDRs"),
    })
}

/// Entry point of `headcni agent`.
pub fn main(args: AgentArgs) -> i32 {
    crate::logging::init_stderr("info");
    let cfg = match AgentConfig::from_args(&args, |k| std::env::var(k).ok(), system_hostname) {
        Ok(c) => c,
        Err(e) => {
            log::error!("invalid configuration: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("starting the runtime: {e}");
            return 1;
        }
    };
    let result =
        rt.block_on(async { if cfg.cleanup { cleanup(Arc::new(cfg)).await } else { run(Arc::new(cfg)).await } });
    match result {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            1
        }
    }
}

async fn run(cfg: Arc<AgentConfig>) -> anyhow::Result<i32> {
    log::info!(
        "headcni agent {} starting: node {}, tailnet hostname {}, tailscaled at {}, Headscale {}, approval by {}",
        crate::VERSION,
        cfg.node_name.as_deref().unwrap_or("-"),
        cfg.hostname,
        cfg.tailscale_socket.display(),
        cfg.headscale_url.as_deref().unwrap_or("(not set)"),
        if cfg.api_key.is_some() { "API key" } else { "policy (autoApprovers)" },
    );
    crate::fsutil::ensure_dir(&cfg.run_dir, 0o755)
        .map_err(|e| anyhow::anyhow!("creating --run-dir {}: {e}", cfg.run_dir.display()))?;
    let metrics = Arc::new(metrics::Metrics::new(&cfg.run_dir));
    let health = Arc::new(serve::Health::default());
    let listener = tokio::net::TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {} for metrics: {e}", cfg.metrics_addr))?;
    log::info!("metrics on http://{}{}, probes /healthz and /readyz", cfg.metrics_addr, cfg.metrics_path);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve::serve(
        listener,
        cfg.metrics_path.clone(),
        metrics.clone(),
        health.clone(),
        stop_rx.clone(),
    ));
    let collector = {
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(15)) => {}
                    _ = stop.changed() => return,
                }
                let m = metrics.clone();
                let _ = tokio::task::spawn_blocking(move || m.collect_events()).await;
            }
        })
    };

    let kube = kube_client(&cfg).await?;
    let mut policy_engine = start_policy_engine(&cfg, kube.as_ref(), &metrics).await?;
    let mut rec = Reconciler::new(
        cfg.clone(),
        cidr_source(&cfg, kube.as_ref())?,
        SocketLocalApi::new(&cfg.tailscale_socket),
        headscale_client(&cfg)?,
        KernelHostNetwork::current()?.with_sysctl_root(cfg.sysctl_root.clone()),
        metrics.clone(),
        health,
    );
    // Without a signal the loop reads this one, which says Unknown for ever.
    let (_no_signal_tx, no_signal_rx) = tokio::sync::watch::channel(SignalState::default());
    let (watcher, mut signal_rx) = match (&cfg.teardown_configmap, &kube) {
        (Some(cm), Some(kube)) => {
            let (w, rx) = SignalWatcher::new(kube.clone(), cm.clone());
            log::info!("following the uninstall signal in {cm}");
            (Some(tokio::spawn(w.run())), rx)
        }
        _ => (None, no_signal_rx),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    if watcher.is_some() {
        // Never advertise under a "true" read late: wait for the first reading (bounded; an
        // API that does not answer means running normally).
        let first = tokio::time::timeout(
            teardown::STARTUP_WAIT,
            signal_rx.wait_for(|s| s.signal != Signal::Unknown || s.problem.is_some()),
        );
        tokio::select! {
            r = first => if r.is_err() {
                log::warn!(
                    "no answer about the uninstall signal within {:?}: starting normally",
                    teardown::STARTUP_WAIT
                );
            },
            _ = term.recv() => return Ok(0),
            _ = int.recv() => return Ok(0),
        }
    }
    let mut streak = 0u32;
    let mut was_ready = false;
    let signal = loop {
        let sig = signal_rx.borrow_and_update().clone();
        // The uninstall signal takes the policy table with the rest; called off, it comes back.
        match (sig.signal == Signal::Teardown, policy_engine.is_some()) {
            (true, true) => {
                if let Some(engine) = policy_engine.take() {
                    engine.stop().await;
                }
                disable_policy(&cfg, &metrics).await;
            }
            (false, false) if cfg.network_policy && sig.signal == Signal::Normal => {
                policy_engine = start_policy_engine(&cfg, kube.as_ref(), &metrics).await?;
            }
            _ => {}
        }
        let outcome = tokio::select! {
            o = rec.pass(&sig) => o,
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        };
        let ready = rec.report().ready;
        if ready && !was_ready {
            log::info!(
                "ready: pod CIDRs {} advertised, node file written{}{}",
                hostnet::join(&rec.report().pod_cidrs),
                rec.joined_in.map(|d| format!(", joined in {:.1}s", d.as_secs_f64())).unwrap_or_default(),
                rec.approved_in
                    .map(|d| format!(", approved {:.1}s after advertising", d.as_secs_f64()))
                    .unwrap_or_default(),
            );
        }
        was_ready = ready;
        streak = if outcome == PassOutcome::Converged { 0 } else { streak.saturating_add(1) };
        let delay = next_delay(outcome, streak, rec.joining());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A new reading (e.g. "true") is acted on at once.
            Ok(()) = signal_rx.changed() => {}
            // So is a change of the Node (its pod CIDR assigned).
            () = rec.cidr_source().changed() => {}
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    if let Some(w) = watcher {
        w.abort();
    }
    log::info!("{signal}: stopping; the node's network stays as it is, pods keep working");
    let _ = stop_tx.send(true);
    if let Some(engine) = policy_engine {
        // The table stays: the rules hold while the agent is away.
        engine.stop().await;
    }
    metrics.collect_events();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    collector.abort();
    Ok(0)
}

/// The running NetworkPolicy engine.
struct PolicyTask {
    handle: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl PolicyTask {
    /// Stops following the cluster; the table stays as it is.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.handle).await;
    }
}

/// Enforcement off (or uninstalled): the table removed.
async fn disable_policy(cfg: &AgentConfig, metrics: &metrics::Metrics) {
    let (run_dir, m) = (cfg.run_dir.clone(), metrics.policy.clone());
    match tokio::task::spawn_blocking(move || policy::engine::disable(&run_dir, &m)).await {
        Ok(Ok(())) => log::info!("NetworkPolicy enforcement off: table inet {} absent", policy::compile::TABLE),
        Ok(Err(e)) => log::warn!("NetworkPolicy enforcement off, but removing its table failed: {e}"),
        Err(e) => log::warn!("removing the NetworkPolicy table: {e}"),
    }
}

/// The NetworkPolicy engine when enforcement is on; when it is off, its table removed.
async fn start_policy_engine(
    cfg: &AgentConfig,
    kube: Option<&kube::Kube>,
    metrics: &metrics::Metrics,
) -> anyhow::Result<Option<PolicyTask>> {
    let (true, Some(kube), Some(node)) = (cfg.network_policy, kube, cfg.node_name.as_deref()) else {
        disable_policy(cfg, metrics).await;
        return Ok(None);
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let nft = crate::netlink::nft::Nft::connect()
        .map_err(|e| anyhow::anyhow!("NetworkPolicy engine: opening nf_tables: {e}"))?;
    let applier = policy::engine::Applier::new(nft, policy::compile::TABLE);
    let engine = policy::engine::Engine::new(node, &cfg.run_dir, metrics.policy.clone(), applier);
    let reports = policy::engine::follow_cluster(kube.client());
    log::info!("NetworkPolicy enforcement on: following NetworkPolicies, Pods and Namespaces");
    Ok(Some(PolicyTask { handle: tokio::spawn(engine.run(reports, stop)), stop: stop_tx }))
}

/// `--cleanup`: withdraws what HeadCNI added (advertised routes, its approvals), removes its
/// rules, nft tables, node file and status file. Every step runs; all failures are reported.
pub async fn cleanup(cfg: Arc<AgentConfig>) -> anyhow::Result<i32> {
    let ts = SocketLocalApi::new(&cfg.tailscale_socket);
    let hs = headscale_client(&cfg)?;
    let dp = KernelHostNetwork::current()?.with_sysctl_root(cfg.sysctl_root.clone());
    let mut errors = cleanup::cleanup_with(&cfg, &ts, hs.as_ref(), &dp, cleanup::CleanupScope::Full).await;
    match tokio::task::spawn_blocking(policy::engine::remove_table).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => errors.push(format!("removing table inet {}: {e}", policy::compile::TABLE)),
        Err(e) => errors.push(format!("removing table inet {}: {e}", policy::compile::TABLE)),
    }
    if errors.is_empty() {
        log::info!("cleanup done");
        Ok(0)
    } else {
        for e in &errors {
            log::error!("cleanup: {e}");
        }
        Ok(1)
    }
}
