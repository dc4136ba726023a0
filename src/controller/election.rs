//! Leader election on a coordination.k8s.io/v1 Lease, on kube-rs, the way Kubernetes' own
//! controllers do it:
//!
//! - A candidate takes the Lease when nobody holds it, or when its record (holder, renew time,
//!   transitions) has not changed for a whole lease duration *as measured by the candidate's
//!   own clock* since it first saw that record: clocks of different machines are never
//!   compared. Every write is a replace carrying the resourceVersion that was read, so of two
//!   candidates only one can win (the other gets 409 Conflict).
//! - The leader renews every retry period. If it has not renewed for the renew deadline
//!   (shorter than the lease duration), it stops leading before anybody else may start.
//! - On shutdown the leader gives the Lease up (holder emptied), so a rolling update hands
//!   over within a retry period instead of a lease duration.
//!
//! With the defaults (lease 10 s, renew deadline 7 s, retry 1.5 s), a killed leader is
//! replaced within 10 s + 2 retry periods = 13 s. Each identity is the pod's name plus a random
//! suffix, so a restarted container is a new candidate, not the old holder.

use crate::clients::kube::KubeError;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The timings of the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_millis(1500),
        }
    }
}

/// The Lease, as the election reads and writes it (a seam for unit tests).
pub trait LeaseStore: Send + Sync {
    /// The Lease, `None` when it does not exist.
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, KubeError>> + Send;
    fn create(&self, lease: Lease) -> impl Future<Output = Result<Lease, KubeError>> + Send;
    /// Replaces the Lease; the object's resourceVersion must be the current one (else 409).
    fn replace(&self, lease: Lease) -> impl Future<Output = Result<Lease, KubeError>> + Send;
}

/// What makes two records different: a record that changed is a sign of life of its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// Every write changes it, whatever the clocks say.
    version: String,
    holder: String,
    renew: Option<Timestamp>,
    transitions: i32,
}

fn seen(lease: &Lease) -> Seen {
    let spec = lease.spec.as_ref();
    Seen {
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
        holder: spec.and_then(|s| s.holder_identity.clone()).unwrap_or_default(),
        renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
    }
}

/// One candidate.
pub struct Elector<S> {
    store: S,
    name: String,
    namespace: String,
    identity: String,
    timings: Timings,
    /// The record last seen, and when (this process's clock).
    observed: Option<(Seen, Instant)>,
    /// When this candidate last renewed its own lease.
    renewed_at: Option<Instant>,
}

impl<S: LeaseStore> Elector<S> {
    pub fn new(store: S, namespace: &str, name: &str, identity: &str, timings: Timings) -> Self {
        Self {
            store,
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            timings,
            observed: None,
            renewed_at: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32, holder: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(i32::try_from(self.timings.lease_duration.as_secs()).unwrap_or(10).max(1)),
            acquire_time: acquire.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to take or keep the Lease; true when this candidate holds it afterwards.
    /// `now` is this process's clock, `wall` the time written into the Lease (for people and
    /// for other tools; the election itself never compares it with a clock).
    pub async fn try_acquire_or_renew(&mut self, now: Instant, wall: Timestamp) -> Result<bool, KubeError> {
        let current = match self.store.get().await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(wall, None, 0, &self.identity)),
                };
                return match self.store.create(lease).await {
                    Ok(l) => {
                        self.observed = Some((seen(&l), now));
                        self.renewed_at = Some(now);
                        Ok(true)
                    }
                    // Another candidate created it first.
                    Err(KubeError::Status { status: 409, .. }) => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Some(l) => l,
        };
        let record = seen(&current);
        match &self.observed {
            Some((s, _)) if *s == record => {}
            _ => self.observed = Some((record.clone(), now)),
        }
        let mine = record.holder == self.identity;
        let observed_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
        let valid = now.saturating_duration_since(observed_at) < self.lease_duration_of(current.spec.as_ref());
        if !record.holder.is_empty() && !mine && valid {
            return Ok(false);
        }
        let acquire = if mine { current.spec.as_ref().and_then(|s| s.acquire_time.clone()) } else { None };
        let transitions = if mine { record.transitions } else { record.transitions.saturating_add(1) };
        let mut next = current.clone();
        next.spec = Some(self.spec(wall, acquire, transitions, &self.identity));
        match self.store.replace(next).await {
            Ok(l) => {
                self.observed = Some((seen(&l), now));
                self.renewed_at = Some(now);
                Ok(true)
            }
            Err(KubeError::Status { status: 409, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The lease duration the holder asked for (ours when it names none).
    fn lease_duration_of(&self, spec: Option<&LeaseSpec>) -> Duration {
        spec.and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.timings.lease_duration, Duration::from_secs)
    }

    /// Whether a leader that last renewed at `renewed_at` must stop leading at `now`.
    pub fn past_deadline(&self, now: Instant) -> bool {
        self.renewed_at.is_none_or(|at| now.saturating_duration_since(at) >= self.timings.renew_deadline)
    }

    /// Gives the Lease up if this candidate holds it (holder emptied, so the next candidate
    /// takes it at once).
    pub async fn release(&mut self, wall: Timestamp) -> Result<(), KubeError> {
        let Some(current) = self.store.get().await? else { return Ok(()) };
        if seen(&current).holder != self.identity {
            return Ok(());
        }
        let mut next = current.clone();
        let transitions = current.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
        let mut spec = self.spec(wall, None, transitions, "");
        spec.lease_duration_seconds = Some(1);
        next.spec = Some(spec);
        self.store.replace(next).await.map(|_| ())?;
        self.renewed_at = None;
        Ok(())
    }

    /// Runs the election until `stop` turns true, publishing whether this candidate leads.
    /// Each request is bounded by the retry period (a slow API must not hold a leader past
    /// its deadline). On stop, a leader gives the Lease up.
    pub async fn run(mut self, leading: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let bound = self.timings.retry_period.max(Duration::from_secs(1));
        loop {
            let now = Instant::now();
            let attempt = tokio::time::timeout(bound, self.try_acquire_or_renew(now, Timestamp::now())).await;
            let was = *leading.borrow();
            let is = match attempt {
                Ok(Ok(held)) => held,
                Ok(Err(e)) => {
                    log::warn!("leader election: Lease {}/{}: {e}", self.namespace, self.name);
                    was && !self.past_deadline(Instant::now())
                }
                Err(_) => {
                    log::warn!("leader election: Lease {}/{}: no answer within {bound:?}", self.namespace, self.name);
                    was && !self.past_deadline(Instant::now())
                }
            };
            if is != was {
                if is {
                    log::info!("leading as {} (Lease {}/{})", self.identity, self.namespace, self.name);
                } else {
                    log::warn!("no longer leading (Lease {}/{} not renewed)", self.namespace, self.name);
                }
                leading.send_replace(is);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timings.retry_period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            match tokio::time::timeout(bound, self.release(Timestamp::now())).await {
                Ok(Ok(())) => log::info!("gave up the Lease {}/{}", self.namespace, self.name),
                Ok(Err(e)) => log::warn!("giving up the Lease: {e}"),
                Err(_) => log::warn!("giving up the Lease: no answer within {bound:?}"),
            }
        }
    }
}

/// The Lease through the Kubernetes API.
pub struct KubeLease {
    api: kube::Api<Lease>,
    name: String,
    what: String,
}

impl KubeLease {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: kube::Api::namespaced(client, namespace),
            name: name.into(),
            what: format!("Lease {namespace}/{name}"),
        }
    }
}

impl LeaseStore for KubeLease {
    async fn get(&self) -> Result<Option<Lease>, KubeError> {
        match self.api.get_opt(&self.name).await {
            Ok(l) => Ok(l),
            Err(e) => Err(KubeError::from_kube(&self.what, e)),
        }
    }

    async fn create(&self, lease: Lease) -> Result<Lease, KubeError> {
        self.api
            .create(&kube::api::PostParams::default(), &lease)
            .await
            .map_err(|e| KubeError::from_kube(&self.what, e))
    }

    async fn replace(&self, lease: Lease) -> Result<Lease, KubeError> {
        self.api
            .replace(&self.name, &kube::api::PostParams::default(), &lease)
            .await
            .map_err(|e| KubeError::from_kube(&self.what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An API server's Lease in memory: resourceVersion checked on replace, as the real one.
    #[derive(Clone, Default)]
    struct FakeLease {
        lease: Arc<Mutex<Option<Lease>>>,
        version: Arc<Mutex<u64>>,
        down: Arc<Mutex<bool>>,
    }

    impl FakeLease {
        fn holder(&self) -> String {
            self.lease.lock().unwrap().as_ref().map(|l| seen(l).holder).unwrap_or_default()
        }
        fn check(&self) -> Result<(), KubeError> {
            if *self.down.lock().unwrap() { Err(KubeError::Unreachable("down".into())) } else { Ok(()) }
        }
        fn bump(&self, mut l: Lease) -> Lease {
            let mut v = self.version.lock().unwrap();
            *v += 1;
            l.metadata.resource_version = Some(v.to_string());
            *self.lease.lock().unwrap() = Some(l.clone());
            l
        }
    }

    impl LeaseStore for FakeLease {
        async fn get(&self) -> Result<Option<Lease>, KubeError> {
            self.check()?;
            Ok(self.lease.lock().unwrap().clone())
        }
        async fn create(&self, lease: Lease) -> Result<Lease, KubeError> {
            self.check()?;
            if self.lease.lock().unwrap().is_some() {
                return Err(KubeError::Status { what: "l".into(), status: 409, msg: "exists".into() });
            }
            Ok(self.bump(lease))
        }
        async fn replace(&self, lease: Lease) -> Result<Lease, KubeError> {
            self.check()?;
            let current = self.lease.lock().unwrap().as_ref().and_then(|l| l.metadata.resource_version.clone());
            if current != lease.metadata.resource_version {
                return Err(KubeError::Status { what: "l".into(), status: 409, msg: "conflict".into() });
            }
            Ok(self.bump(lease))
        }
    }

    fn elector(store: &FakeLease, id: &str) -> Elector<FakeLease> {
        Elector::new(store.clone(), "kube-system", "headcni-controller", id, Timings::default())
    }

    #[tokio::test]
    async fn one_leader_takeover_after_expiry_and_release() {
        let store = FakeLease::default();
        let (mut a, mut b) = (elector(&store, "a"), elector(&store, "b"));
        let t0 = Instant::now();
        let wall = Timestamp::now();
        assert!(a.try_acquire_or_renew(t0, wall).await.unwrap());
        assert!(!b.try_acquire_or_renew(t0, wall).await.unwrap());
        // a renews: b sees a changing record, so a's lease stays valid for b.
        let t1 = t0 + Duration::from_secs(8);
        assert!(a.try_acquire_or_renew(t1, wall).await.unwrap());
        assert!(!b.try_acquire_or_renew(t1, wall).await.unwrap());
        assert!(!b.try_acquire_or_renew(t1 + Duration::from_secs(9), wall).await.unwrap());
        // a dies: b waits a whole lease duration from when it saw the last change.
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.try_acquire_or_renew(t2, wall).await.unwrap());
        assert_eq!(store.holder(), "b");
        let transitions = store.lease.lock().unwrap().as_ref().unwrap().spec.as_ref().unwrap().lease_transitions;
        assert_eq!(transitions, Some(1));
        // a comes back: b holds it.
        assert!(!a.try_acquire_or_renew(t2, wall).await.unwrap());
        // b gives it up: a takes it at once.
        b.release(wall).await.unwrap();
        assert_eq!(store.holder(), "");
        assert!(a.try_acquire_or_renew(t2 + Duration::from_millis(1), wall).await.unwrap());
    }

    #[tokio::test]
    async fn a_stale_read_loses_the_race() {
        let store = FakeLease::default();
        let (mut a, mut b) = (elector(&store, "a"), elector(&store, "b"));
        let t0 = Instant::now();
        let wall = Timestamp::now();
        // Nobody holds it (released): both read the same version, only one write wins.
        assert!(a.try_acquire_or_renew(t0, wall).await.unwrap());
        a.release(wall).await.unwrap();
        let stale = store.lease.lock().unwrap().clone().unwrap();
        assert!(b.try_acquire_or_renew(t0, wall).await.unwrap());
        // a replaces with the version it read before b's write: refused.
        let mut next = stale;
        next.spec.as_mut().unwrap().holder_identity = Some("a".into());
        assert!(matches!(store.replace(next).await, Err(KubeError::Status { status: 409, .. })));
        assert_eq!(store.holder(), "b");
    }

    #[tokio::test]
    async fn a_leader_that_cannot_renew_stops_before_the_lease_expires() {
        let store = FakeLease::default();
        let mut a = elector(&store, "a");
        let t0 = Instant::now();
        assert!(a.try_acquire_or_renew(t0, Timestamp::now()).await.unwrap());
        *store.down.lock().unwrap() = true;
        assert!(a.try_acquire_or_renew(t0, Timestamp::now()).await.is_err());
        assert!(!a.past_deadline(t0 + Duration::from_secs(6)));
        assert!(a.past_deadline(t0 + Duration::from_secs(7)));
        let t = Timings::default();
        assert!(t.renew_deadline < t.lease_duration);
        // The worst case of a takeover stays within 15 s.
        assert!(t.lease_duration + 2 * t.retry_period <= Duration::from_secs(13));
    }
}
