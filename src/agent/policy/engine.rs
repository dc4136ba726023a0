//! The engine: follows NetworkPolicies, Pods and Namespaces with kube-rs watchers, keeps what
//! it learns as the pure [`Cluster`], and keeps this node's table `inet headcni-policy` equal
//! to [`compile`] of it.
//!
//! Level-triggered: a change only marks the view dirty; once the view has been quiet for
//! [`QUIET`] (or has been dirty for [`MAX_DELAY`]) the whole rule set is computed again and
//! the difference from what was applied is committed as one atomic batch. Nothing is applied
//! before all three kinds are listed: a table left by an earlier run stays in force (the
//! agent restarting never opens the node) until the engine knows the cluster again, and then
//! it is replaced in one batch. Every [`VERIFY_EVERY`] the table is read back; one that
//! someone else changed is replaced. A batch the kernel refuses changes nothing; it is
//! retried with backoff.
//!
//! The watch of Pods is cluster-wide: peers are pods of every node (their addresses and
//! labels), and the pods of this node are among them. Only what enforcement needs is kept
//! of each object ([`Pod::from_object`]), never the objects themselves.

use super::compile::{Stats, TABLE, compile};
use super::metrics::PolicyMetrics;
use super::model::{Cluster, Key, Labels, Pod, Policy};
use crate::netlink::nft::ruleset::{Change, Ruleset};
use crate::netlink::nft::{Nft, NftError};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod as PodObject};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

/// How long the view must be quiet before the rules are computed.
pub const QUIET: Duration = Duration::from_millis(30);
/// The longest a change waits for quiet.
pub const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often the table is read back.
pub const VERIFY_EVERY: Duration = Duration::from_secs(30);
/// The engine's status file in the run directory (read by `headcni status`).
pub const STATUS_FILE: &str = "policy.json";

/// Keeps one table equal to the rule sets it is given: the difference from what it applied
/// last, as one atomic batch; the whole table when what it holds is not known.
#[derive(Debug)]
pub struct Applier {
    nft: Nft,
    table: String,
    applied: Option<Ruleset>,
}

impl Applier {
    pub fn new(nft: Nft, table: &str) -> Self {
        Self { nft, table: table.to_string(), applied: None }
    }

    /// Makes the table `desired`; answers the number of changes sent. On error nothing
    /// changed, and the next call replaces the whole table.
    pub fn apply(&mut self, desired: &Ruleset) -> Result<usize, NftError> {
        desired.validate()?;
        let changes = match &self.applied {
            Some(applied) => desired.changes_from(applied),
            None => desired.replace_all(),
        };
        if let Err(e) = self.nft.commit(&self.table, &changes) {
            self.applied = None;
            return Err(e);
        }
        self.applied = Some(desired.clone());
        Ok(changes.len())
    }

    /// Whether the table still holds what was applied (`false` also when nothing was).
    pub fn in_place(&mut self) -> Result<bool, NftError> {
        let Some(applied) = &self.applied else { return Ok(false) };
        Ok(self.nft.list_table(&self.table)?.matches(applied))
    }

    /// Forgets what was applied: the next [`Applier::apply`] replaces the whole table.
    pub fn forget(&mut self) {
        self.applied = None;
    }

    /// Removes the table (nothing happens when there is none).
    pub fn remove(&mut self) -> Result<(), NftError> {
        self.applied = None;
        self.nft.commit(&self.table, &[Change::AddTable, Change::DeleteTable])
    }
}

/// Removes table `inet headcni-policy` from the calling thread's namespace (enforcement off,
/// `--cleanup`).
pub fn remove_table() -> Result<(), NftError> {
    Applier::new(Nft::connect()?, TABLE).remove()
}

/// What `headcni status` shows of the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyStatus {
    pub enabled: bool,
    /// All of NetworkPolicies, Pods and Namespaces listed.
    pub synced: bool,
    pub policies: usize,
    pub pods: usize,
    pub namespaces: usize,
    pub stats: Stats,
    /// Unix seconds of the last batch committed.
    pub applied_at: Option<u64>,
    pub applies: u64,
    /// Unix seconds of this status.
    pub updated_at: u64,
    /// What fails now (the watches, the kernel), if anything.
    pub problems: Vec<String>,
}

impl PolicyStatus {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(STATUS_FILE)
    }

    pub fn load(run_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(Self::path(run_dir)).ok()?).ok()
    }

    pub fn save(&self, run_dir: &Path) {
        let Ok(data) = serde_json::to_vec_pretty(self) else { return };
        if let Err(e) =
            crate::fsutil::write_atomic(&Self::path(run_dir), &data, 0o644, crate::fsutil::Durability::ProcessCrash)
        {
            log::debug!("writing {}: {e}", Self::path(run_dir).display());
        }
    }
}

/// The three kinds followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Followed {
    Policies = 0,
    Pods = 1,
    Namespaces = 2,
}

impl Followed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policies => "NetworkPolicy",
            Self::Pods => "Pod",
            Self::Namespaces => "Namespace",
        }
    }
}

/// One object as the engine keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Policy(Policy),
    Pod(Pod),
    Namespace(String, Labels),
}

impl Item {
    fn key(&self) -> Key {
        match self {
            Self::Policy(p) => (p.namespace.clone(), p.name.clone()),
            Self::Pod(p) => (p.namespace.clone(), p.name.clone()),
            Self::Namespace(n, _) => (n.clone(), String::new()),
        }
    }
}

/// What a watch reports, reduced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A (re)list starts.
    Relist,
    Listed(Item),
    /// The (re)list is complete: what it listed is the truth.
    Done,
    Applied(Item),
    Deleted(Key),
    Failed(String),
}

/// The view of the cluster the watches build.
#[derive(Debug, Default)]
pub struct View {
    pub cluster: Cluster,
    relisting: [Option<Vec<Item>>; 3],
    synced: [bool; 3],
    problems: [Option<String>; 3],
}

impl View {
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems.iter().flatten().cloned().collect()
    }

    fn put(&mut self, item: Item) -> bool {
        let key = item.key();
        match item {
            Item::Policy(p) => self.cluster.policies.insert(key, p.clone()).is_none_or(|old| old != p),
            Item::Pod(p) => self.cluster.pods.insert(key, p.clone()).is_none_or(|old| old != p),
            Item::Namespace(n, l) => self.cluster.namespaces.insert(n, l.clone()).is_none_or(|old| old != l),
        }
    }

    fn drop_key(&mut self, kind: Followed, key: &Key) -> bool {
        match kind {
            Followed::Policies => self.cluster.policies.remove(key).is_some(),
            Followed::Pods => self.cluster.pods.remove(key).is_some(),
            Followed::Namespaces => self.cluster.namespaces.remove(&key.0).is_some(),
        }
    }

    /// Takes one report in; answers whether what the rules depend on changed.
    pub fn take(&mut self, kind: Followed, seen: Seen) -> bool {
        let k = kind as usize;
        if !matches!(seen, Seen::Failed(_)) {
            self.problems[k] = None;
        }
        match seen {
            Seen::Relist => {
                self.relisting[k] = Some(Vec::new());
                false
            }
            Seen::Listed(item) => {
                self.relisting[k].get_or_insert_with(Vec::new).push(item);
                false
            }
            Seen::Done => {
                let listed = self.relisting[k].take().unwrap_or_default();
                let before = match kind {
                    Followed::Policies => std::mem::take(&mut self.cluster.policies).len(),
                    Followed::Pods => std::mem::take(&mut self.cluster.pods).len(),
                    Followed::Namespaces => std::mem::take(&mut self.cluster.namespaces).len(),
                };
                let after = listed.len();
                for item in listed {
                    self.put(item);
                }
                let first = !self.synced[k];
                self.synced[k] = true;
                // A relist that found the same objects may still differ in them: recompute.
                first || before > 0 || after > 0
            }
            Seen::Applied(item) => self.put(item),
            Seen::Deleted(key) => self.drop_key(kind, &key),
            Seen::Failed(msg) => {
                self.problems[k] = Some(format!("following {}s: {msg}", kind.as_str()));
                false
            }
        }
    }
}

type Reports = Pin<Box<dyn Stream<Item = (Followed, Seen)> + Send>>;

fn follow<K, F>(api: Api<K>, kind: Followed, read: F) -> Reports
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: Fn(&K) -> Option<Item> + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .backoff(crate::clients::kube::watch_backoff())
        .filter_map(move |event| {
            let name =
                |o: &K| (o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default());
            let out = match event {
                Ok(watcher::Event::Init) => Some(Seen::Relist),
                Ok(watcher::Event::InitApply(o)) => read(&o).map(Seen::Listed),
                Ok(watcher::Event::InitDone) => Some(Seen::Done),
                Ok(watcher::Event::Apply(o)) => match read(&o) {
                    Some(item) => Some(Seen::Applied(item)),
                    None => Some(Seen::Deleted(name(&o))),
                },
                Ok(watcher::Event::Delete(o)) => {
                    let key = name(&o);
                    // Namespaces are keyed by name alone.
                    Some(Seen::Deleted(if kind == Followed::Namespaces { (key.1, String::new()) } else { key }))
                }
                // Resumed by the watcher itself.
                Err(watcher::Error::WatchError(s)) if s.code == 410 => None,
                Err(e @ watcher::Error::WatchFailed(_)) => {
                    log::debug!("watch of {}s: {e}", kind.as_str());
                    None
                }
                Err(e) => Some(Seen::Failed(
                    crate::clients::kube::KubeError::from_watcher(&format!("{}s", kind.as_str()), e).to_string(),
                )),
            };
            std::future::ready(out.map(|s| (kind, s)))
        })
        .boxed()
}

/// The watches of the three kinds, merged.
pub fn follow_cluster(client: kube::Client) -> impl Stream<Item = (Followed, Seen)> + Send {
    futures::stream::select_all([
        follow(Api::<NetworkPolicy>::all(client.clone()), Followed::Policies, |o| {
            Policy::from_object(o).map(Item::Policy)
        }),
        follow(Api::<PodObject>::all(client.clone()), Followed::Pods, |o| Pod::from_object(o).map(Item::Pod)),
        follow(Api::<Namespace>::all(client), Followed::Namespaces, |o| {
            let name = o.metadata.name.clone()?;
            Some(Item::Namespace(name, o.metadata.labels.clone().unwrap_or_default()))
        }),
    ])
}

/// The engine of one node.
pub struct Engine {
    node: String,
    run_dir: PathBuf,
    metrics: PolicyMetrics,
    applier: Applier,
    view: View,
    status: PolicyStatus,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine {
    pub fn new(node: &str, run_dir: &Path, metrics: PolicyMetrics, applier: Applier) -> Self {
        metrics.enabled.set(1);
        Self {
            node: node.to_string(),
            run_dir: run_dir.to_path_buf(),
            metrics,
            applier,
            view: View::default(),
            status: PolicyStatus { enabled: true, ..Default::default() },
        }
    }

    pub fn view(&self) -> &View {
        &self.view
    }

    /// Takes one report in (see [`View::take`]).
    pub fn take(&mut self, kind: Followed, seen: Seen) -> bool {
        let changed = self.view.take(kind, seen);
        let c = &self.view.cluster;
        for (kind, n) in [("NetworkPolicy", c.policies.len()), ("Pod", c.pods.len()), ("Namespace", c.namespaces.len())]
        {
            self.metrics.watched.get_or_create(&vec![("kind", kind.to_string())]).set(i64::try_from(n).unwrap_or(0));
        }
        self.metrics.synced.set(i64::from(self.view.synced()));
        changed
    }

    /// Computes the rule set from the view and applies it (`since`: when the change it
    /// answers was first seen). Answers the stats, or the kernel's refusal.
    pub fn apply(&mut self, since: Option<Instant>) -> Result<Stats, NftError> {
        let started = Instant::now();
        let (ruleset, stats) = compile(&self.view.cluster, &self.node);
        let result = self.applier.apply(&ruleset);
        self.metrics.apply_duration.observe(started.elapsed().as_secs_f64());
        let kernel_problem = match &result {
            Ok(_) => {
                self.metrics.applies.inc();
                if let Some(t) = since {
                    self.metrics.enforce_latency.observe(t.elapsed().as_secs_f64());
                }
                self.metrics.record_stats(&stats);
                self.status.applies += 1;
                self.status.applied_at = Some(unix_now());
                self.status.stats = stats.clone();
                None
            }
            Err(e) => {
                self.metrics.apply_failures.inc();
                Some(format!("the kernel refused the rules: {e}"))
            }
        };
        self.publish(kernel_problem);
        result.map(|_| stats)
    }

    /// Whether the table still holds what was applied; replaces it on the next apply if not.
    pub fn verify(&mut self) -> Result<bool, NftError> {
        let ok = self.applier.in_place()?;
        if !ok {
            self.metrics.drift_repairs.inc();
            self.applier.forget();
        }
        Ok(ok)
    }

    /// Writes the status file.
    pub fn publish(&mut self, kernel_problem: Option<String>) {
        let c = &self.view.cluster;
        self.status.synced = self.view.synced();
        self.status.policies = c.policies.len();
        self.status.pods = c.pods.len();
        self.status.namespaces = c.namespaces.len();
        self.status.updated_at = unix_now();
        self.status.problems = self.view.problems();
        self.status.problems.extend(kernel_problem);
        self.status.save(&self.run_dir);
    }

    /// Runs until `stop` turns true: follows `reports` and keeps the table.
    pub async fn run(
        mut self,
        reports: impl Stream<Item = (Followed, Seen)> + Send,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut reports = std::pin::pin!(reports);
        // (first change not applied yet, last change)
        let mut dirty: Option<(Instant, Instant)> = None;
        let mut retry = Duration::from_millis(500);
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut verify = tokio::time::interval(VERIFY_EVERY);
        verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_synced = false;
        self.publish(None);
        loop {
            let due = match (dirty, retry_at) {
                (_, Some(at)) => Some(at),
                (Some((first, last)), None) if self.view.synced() => {
                    Some(tokio::time::Instant::from_std((last + QUIET).min(first + MAX_DELAY)))
                }
                _ => None,
            };
            tokio::select! {
                report = reports.next() => {
                    let Some((kind, seen)) = report else { break };
                    let failed = matches!(seen, Seen::Failed(_));
                    if let Seen::Failed(msg) = &seen {
                        log::warn!("NetworkPolicy engine: {msg}");
                    }
                    if self.take(kind, seen) {
                        let now = Instant::now();
                        dirty = Some((dirty.map_or(now, |(first, _)| first), now));
                    }
                    if failed {
                        self.publish(None);
                    }
                    if self.view.synced() && !was_synced {
                        was_synced = true;
                        log::info!(
                            "NetworkPolicy engine: {} policies, {} pods, {} namespaces listed; enforcing on {}",
                            self.view.cluster.policies.len(),
                            self.view.cluster.pods.len(),
                            self.view.cluster.namespaces.len(),
                            self.node
                        );
                    }
                }
                () = async { if let Some(at) = due { tokio::time::sleep_until(at).await } }, if due.is_some() => {
                    let since = dirty.map(|(first, _)| first);
                    match tokio::task::block_in_place(|| self.apply(since)) {
                        Ok(stats) => {
                            log::debug!("NetworkPolicy rules applied: {stats:?}");
                            dirty = None;
                            retry_at = None;
                            retry = Duration::from_millis(500);
                        }
                        Err(e) => {
                            log::error!("NetworkPolicy rules not applied (retrying in {retry:?}): {e}");
                            retry_at = Some(tokio::time::Instant::now() + retry);
                            retry = (retry * 2).min(Duration::from_secs(30));
                        }
                    }
                }
                _ = verify.tick() => {
                    if self.view.synced() && dirty.is_none() && retry_at.is_none() {
                        match tokio::task::block_in_place(|| self.verify()) {
                            Ok(true) => {}
                            Ok(false) => {
                                log::warn!("table inet {TABLE} differs from what was applied: replacing it");
                                let now = Instant::now();
                                dirty = Some((now, now));
                            }
                            Err(e) => log::warn!("reading table inet {TABLE}: {e}"),
                        }
                    }
                }
                _ = stop.changed() => break,
            }
        }
        self.metrics.synced.set(0);
    }
}

/// Enforcement off: the table removed, the status says so. Answers the kernel's refusal.
pub fn disable(run_dir: &Path, metrics: &PolicyMetrics) -> Result<(), NftError> {
    metrics.enabled.set(0);
    let result = remove_table();
    PolicyStatus {
        enabled: false,
        updated_at: unix_now(),
        problems: result.as_ref().err().map(|e| format!("removing table inet {TABLE}: {e}")).into_iter().collect(),
        ..Default::default()
    }
    .save(run_dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, app: &str, ip: Option<&str>) -> Item {
        Item::Pod(Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: ip.map(|i| i.parse().unwrap()).into_iter().collect(),
            node: Some("n1".into()),
            host_network: false,
            named_ports: vec![],
        })
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    #[test]
    fn nothing_counts_before_every_kind_is_listed() {
        let mut v = View::default();
        for kind in [Followed::Policies, Followed::Pods] {
            v.take(kind, Seen::Relist);
            v.take(kind, Seen::Done);
        }
        assert!(!v.synced(), "namespaces not listed yet");
        v.take(Followed::Namespaces, Seen::Relist);
        assert!(v.take(Followed::Namespaces, Seen::Done), "the first listing is a change");
        assert!(v.synced());
    }

    #[test]
    fn a_relist_is_the_truth_and_unchanged_objects_are_no_change() {
        let mut v = View::default();
        v.take(Followed::Pods, Seen::Relist);
        v.take(Followed::Pods, Seen::Listed(pod("x", "a", "web", Some("10.244.1.2"))));
        v.take(Followed::Pods, Seen::Listed(pod("x", "b", "db", Some("10.244.1.3"))));
        assert!(v.cluster.pods.is_empty(), "a listing counts once complete");
        assert!(v.take(Followed::Pods, Seen::Done));
        assert_eq!(v.cluster.pods.len(), 2);
        assert!(!v.take(Followed::Pods, Seen::Applied(pod("x", "a", "web", Some("10.244.1.2")))), "status-only update");
        assert!(v.take(Followed::Pods, Seen::Applied(pod("x", "a", "api", Some("10.244.1.2")))), "labels changed");
        assert!(v.take(Followed::Pods, Seen::Deleted(key("x", "b"))));
        assert!(!v.take(Followed::Pods, Seen::Deleted(key("x", "b"))), "already gone");
        // A relist after a lost watch drops what it no longer lists.
        v.take(Followed::Pods, Seen::Relist);
        v.take(Followed::Pods, Seen::Listed(pod("x", "c", "web", Some("10.244.1.4"))));
        v.take(Followed::Pods, Seen::Done);
        assert_eq!(v.cluster.pods.keys().cloned().collect::<Vec<_>>(), vec![key("x", "c")]);
    }

    #[test]
    fn failures_are_reported_until_the_watch_recovers() {
        let mut v = View::default();
        v.take(Followed::Pods, Seen::Failed("403 forbidden".into()));
        assert_eq!(v.problems(), vec!["following Pods: 403 forbidden".to_string()]);
        v.take(Followed::Pods, Seen::Relist);
        assert!(v.problems().is_empty());
    }

    #[test]
    fn status_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = PolicyStatus { enabled: true, synced: true, policies: 3, applies: 7, ..Default::default() };
        s.save(dir.path());
        assert_eq!(PolicyStatus::load(dir.path()), Some(s));
    }
}
