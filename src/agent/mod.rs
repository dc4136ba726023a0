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
//! - [`bus`]: tailscaled's change notifications, which wake the loop at once
//!
//! The agent fails closed and stays up: every input (the flags, the key files, the URLs, the
//! Kubernetes credentials, tailscaled's socket) is checked before anything on the node changes
//! ([`preflight`]), and once it runs, nothing but a signal stops it: a metrics port that is
//! taken or flooded, an unreachable API or tailscaled are reported and retried while the loop
//! keeps the node's networking.
//!
//! SIGTERM stops the agent and leaves the node as it is: pods keep working while the agent is
//! restarted or upgraded. The uninstall signal makes every agent undo its node's changes (but
//! the node file) and answer not ready; `--cleanup` undoes all of HeadCNI's changes and exits
//! (a node that missed the uninstall, or leaves HeadCNI).

pub mod bus;
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
use crate::clients::secret::{self, SecretSource};
use crate::clients::{http, kube};
use crate::logging::exit;
use config::{AgentArgs, AgentConfig, CidrSource};
use hostnet::KernelHostNetwork;
use ipnetwork::IpNetwork;
use node::{NodeCidrs, NodeError, PodCidrSource, StaticCidrs};
use reconcile::{PassOutcome, Reconciler, next_delay};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use teardown::{Signal, SignalState, SignalWatcher};
use tokio::sync::Notify;

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
    fn cluster_cidrs(&self) -> Option<node::ClusterCidrs> {
        match self {
            Self::Static(s) => s.cluster_cidrs(),
            Self::Node(n) => n.cluster_cidrs(),
        }
    }
    fn binding(&self) -> node::NodeBinding {
        match self {
            Self::Static(s) => s.binding(),
            Self::Node(n) => n.binding(),
        }
    }
    async fn publish_node_key(&self, key: &str) -> Result<(), NodeError> {
        match self {
            Self::Static(s) => s.publish_node_key(key).await,
            Self::Node(n) => n.publish_node_key(key).await,
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

/// A key file the agent will read: it must exist, hold one line of text, and be writable by its
/// owner only (anyone else could swap the key).
fn check_key_file(path: &Path, what: &'static str, flag: &str) -> anyhow::Result<()> {
    secret::read_file(path, what).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o022 != 0 {
        anyhow::bail!(
            "{flag} {}: the file is writable by group or others (mode {:o}): anyone could replace the {what}",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(())
}

/// tailscaled's socket: a socket, or (tailscaled not started yet) a path in an existing
/// directory.
fn check_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => anyhow::bail!("--tailscale-socket {} is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match path.parent() {
            Some(dir) if dir.is_dir() => Ok(()),
            _ => anyhow::bail!(
                "--tailscale-socket {}: neither the socket nor its directory exists (is tailscaled's socket mounted?)",
                path.display()
            ),
        },
        Err(e) => anyhow::bail!("--tailscale-socket {}: {e}", path.display()),
    }
}

/// What the agent talks through, made from checked inputs.
pub struct Peers {
    pub headscale: Option<RestHeadscale>,
    pub cidrs: CidrSourceImpl,
    /// The Kubernetes client, when the configuration reads anything from Kubernetes (one for
    /// all: the Node's watches and the uninstall signal's share its connections).
    pub kube: Option<kube::Kube>,
}

/// Checks every input the agent was given, before anything on the node changes: the key files
/// (readable, one line, not writable by others), Headscale's URL and CA, the Kubernetes
/// credentials, tailscaled's socket. (The flags themselves, the CIDRs among them, were checked
/// by [`AgentConfig::from_args`]; an API key over plain http is refused there.)
pub async fn preflight(cfg: &AgentConfig, metrics: &metrics::Metrics) -> anyhow::Result<Peers> {
    for (src, what, flag) in
        [(&cfg.auth_key, "pre-auth key", "--auth-key-file"), (&cfg.api_key, "API key", "--api-key-file")]
    {
        if let Some(SecretSource::File(path)) = src {
            check_key_file(path, what, flag)?;
        }
    }
    if let Some(url) = &cfg.headscale_url {
        // The control URL of a join must be one, API key or not.
        let tls = url.starts_with("https://").then(|| http::tls_config(Vec::new(), true, None)).transpose()?;
        http::Endpoint::from_url(url, tls).map_err(|e| anyhow::anyhow!("--headscale-url: {e}"))?;
    }
    let headscale = headscale_client(cfg)?;
    let kube = kube_client(cfg).await?;
    let cidrs = cidr_source(cfg, kube.as_ref(), metrics)?;
    check_socket(&cfg.tailscale_socket)?;
    Ok(Peers { headscale, cidrs, kube })
}

/// Raises the soft limit on open files to the hard one: the descriptors the agent needs for
/// its own sockets must never be the ones a flood of connections took.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(max)) = (limit.current, limit.maximum)
        && current < max
    {
        let raised = rustix::process::Rlimit { current: Some(max), maximum: Some(max) };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => log::debug!("open files: soft limit raised from {current} to {max}"),
            Err(e) => log::warn!("raising the soft limit on open files from {current} to {max}: {e}"),
        }
    }
}

/// The Kubernetes client, when the configuration reads anything from Kubernetes.
async fn kube_client(cfg: &AgentConfig) -> anyhow::Result<Option<kube::Kube>> {
    let needed =
        !matches!(cfg.cidr_source, CidrSource::Static(_)) || cfg.teardown_configmap.is_some() || cfg.network_policy;
    if !needed {
        return Ok(None);
    }
    let kube = kube::Kube::from_kubeconfig_or_in_cluster(cfg.kubeconfig.as_deref())
        .await
        .map_err(|e| anyhow::anyhow!("the Kubernetes API's credentials: {e}"))?;
    Ok(Some(kube))
}

fn cidr_source(
    cfg: &AgentConfig,
    kube: Option<&kube::Kube>,
    metrics: &metrics::Metrics,
) -> anyhow::Result<CidrSourceImpl> {
    let name = cfg.node_name.clone().unwrap_or_default();
    Ok(match (&cfg.cidr_source, kube) {
        (CidrSource::Static(c), _) => CidrSourceImpl::Static(StaticCidrs(c.clone())),
        (_, Some(kube)) => {
            let errors = metrics.kubernetes_errors("watch_node");
            CidrSourceImpl::Node(Box::new(NodeCidrs::counted(&name, kube.clone(), Some(errors))?))
        }
        (_, None) => anyhow::bail!("no Kubernetes client for the Node's pod CIDRs"),
    })
}

/// Entry point of `headcni agent`.
pub fn main(args: AgentArgs) -> i32 {
    crate::logging::init_stderr("agent", "info");
    let cfg = match AgentConfig::from_args(&args, |k| std::env::var(k).ok(), system_hostname) {
        Ok(c) => c,
        Err(e) => {
            crate::logging::fatal("agent", &format!("invalid configuration: {e}"));
            return exit::USAGE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            crate::logging::fatal("agent", &format!("starting the runtime: {e}"));
            return exit::FAILED;
        }
    };
    let result =
        rt.block_on(async { if cfg.cleanup { cleanup(Arc::new(cfg)).await } else { run(Arc::new(cfg)).await } });
    match result {
        Ok(code) => code,
        Err(e) => {
            crate::logging::fatal("agent", &format!("{e:#}"));
            exit::FAILED
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
        if cfg.api_key.is_some() {
            "API key"
        } else if cfg.publish_identity {
            "the controller (this node's identity published on its Node)"
        } else {
            "policy (autoApprovers)"
        },
    );
    // The metrics only name paths; nothing on the node changes before every input is known to
    // be usable.
    let metrics = Arc::new(metrics::Metrics::new(&cfg.run_dir).reading_ipam(cfg.conf_dir.join(&cfg.conflist_name)));
    let peers = preflight(&cfg, &metrics).await?;
    raise_open_files_limit();
    crate::fsutil::ensure_dir(&cfg.run_dir, 0o755)
        .map_err(|e| anyhow::anyhow!("creating --run-dir {}: {e}", cfg.run_dir.display()))?;
    let health = Arc::new(serve::Health::default());
    log::info!("metrics on http://{}{}, probes /healthz and /readyz", cfg.metrics_addr, cfg.metrics_path);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve::bind_and_serve(
        cfg.metrics_addr,
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

    // What wakes the loop before its timer: tailscaled's change notifications, and a change of
    // the Nodes' pod CIDRs (when they are what the cluster's pod network is known by).
    let wake = Arc::new(Notify::new());
    let Peers { headscale, mut cidrs, kube } = peers;
    let mut background = vec![tokio::spawn(bus::follow(SocketLocalApi::new(&cfg.tailscale_socket), wake.clone()))];
    if let CidrSourceImpl::Node(node) = &mut cidrs
        && cfg.cluster_cidrs.is_empty()
    {
        log::info!("no --cluster-cidr: following every Node's pod CIDRs");
        background.push(node.start_cluster_watch(wake.clone()));
    }
    let mut policy_engine = start_policy_engine(&cfg, kube.as_ref(), &metrics).await?;
    let mut rec = Reconciler::new(
        cfg.clone(),
        cidrs,
        SocketLocalApi::new(&cfg.tailscale_socket),
        headscale,
        KernelHostNetwork::current()?.with_sysctl_root(cfg.sysctl_root.clone()),
        metrics.clone(),
        health,
    );
    // Without a signal the loop reads this one, which says Unknown for ever.
    let (_no_signal_tx, no_signal_rx) = tokio::sync::watch::channel(SignalState::default());
    let (watcher, mut signal_rx) = match (&cfg.teardown_configmap, &kube) {
        (Some(cm), Some(kube)) => {
            let (w, rx) = SignalWatcher::new(kube.clone(), cm.clone());
            let w = w.counting(metrics.kubernetes_errors("watch_uninstall_signal"));
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
        let started = Instant::now();
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
        rec.announce_next_pass(delay);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A new reading (e.g. "true") is acted on at once.
            Ok(()) = signal_rx.changed() => {}
            // So is a change of the Node (its pod CIDR assigned)...
            () = rec.cidr_source().changed() => {}
            // ... and a change in the tailnet or the cluster; a burst of them costs one pass
            // per MIN_PASS_GAP.
            _ = wake.notified() => {
                tokio::time::sleep(MIN_PASS_GAP.saturating_sub(started.elapsed())).await;
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    if let Some(w) = watcher {
        w.abort();
    }
    for task in background {
        task.abort();
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

/// The shortest time between the starts of two passes woken by notifications.
pub const MIN_PASS_GAP: Duration = Duration::from_millis(250);

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
