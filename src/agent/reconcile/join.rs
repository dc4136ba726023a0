//! Joining the tailnet and pacing the loop: tailscaled's state in each pass, the zero-config
//! join (start with the auth key, then wait for Running, with a bounded number of tries), and the
//! pause between passes (steady, or a backoff with jitter while something is wrong).

use super::{PassOutcome, Reconciler, STEADY_INTERVAL, merge_routes, set};
use crate::agent::hostnet::HostNetwork;
use crate::agent::node::PodCidrSource;
use crate::agent::report::ProblemId;
use crate::clients::headscale::HeadscaleApi;
use crate::clients::localapi::{JoinPrefs, LocalApi, Status};
use std::time::{Duration, Instant};

/// Longest pause while something is wrong.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a join may take before it counts as failed.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Where a join stands: when it was issued, how often it failed, when it may be tried again.
pub(super) struct Join {
    pub(super) issued_at: Option<Instant>,
    pub(super) failures: u32,
    pub(super) not_before: Option<Instant>,
}

impl<K: PodCidrSource, T: LocalApi, H: HeadscaleApi, D: HostNetwork> Reconciler<K, T, H, D> {
    /// A join was started and has not yet finished or timed out (the loop then polls quickly).
    pub fn joining(&self) -> bool {
        self.join.issued_at.is_some_and(|t| t.elapsed() < JOIN_TIMEOUT)
    }

    pub(super) async fn step_tailscale(&mut self) -> Option<Status> {
        let status = match self.ts.status().await {
            Ok(s) => s,
            Err(e) => {
                let hint = if e.is_unreachable() {
                    Some("is tailscaled running, and is --tailscale-socket its socket? pods keep working meanwhile")
                } else {
                    None
                };
                self.fail(ProblemId::Tailscale, e.to_string(), hint);
                self.join.issued_at = None;
                return None;
            }
        };
        let health = status.health.join("; ");
        match status.backend_state.as_str() {
            "Running" => {
                if let Some(at) = self.join.issued_at.take() {
                    let took = at.elapsed();
                    log::info!(
                        "joined the tailnet as {} ({}) in {:.1}s",
                        status.self_.host_name,
                        status.tailscale_ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        took.as_secs_f64()
                    );
                    self.joined_in = Some(took);
                    self.join.failures = 0;
                }
            }
            "NeedsLogin" => self.login(&status, &health).await,
            "NeedsMachineAuth" => self.wait(
                ProblemId::Tailscale,
                "tailscaled is logged in but waits for the node to be authorized in Headscale",
                Some("authorize it (headscale nodes register ...), or use a pre-auth key"),
            ),
            "Stopped" => self.fail(
                ProblemId::Tailscale,
                "tailscale is stopped (someone ran `tailscale down`): cross-node pod traffic is down",
                Some("run `tailscale up`; HeadCNI does not override an operator's down"),
            ),
            other => self.wait(ProblemId::Tailscale, format!("tailscaled is starting ({other})"), None),
        }
        Some(status)
    }

    pub(super) async fn login(&mut self, status: &Status, health: &str) {
        let (Some(url), Some(key_src)) = (self.cfg.headscale_url.clone(), self.cfg.auth_key.clone()) else {
            self.fail(
                ProblemId::Tailscale,
                format!("tailscaled is not logged in{}", if health.is_empty() { String::new() } else { format!(": {health}") }),
                Some("give --headscale-url and a pre-auth key (--auth-key-file or HEADCNI_AUTH_KEY) for the zero-config join, or log the node in by hand"),
            );
            return;
        };
        if let Some(at) = self.join.issued_at {
            if at.elapsed() < JOIN_TIMEOUT {
                self.wait(ProblemId::Tailscale, format!("joining the tailnet at {url}"), None);
                return;
            }
            self.join.issued_at = None;
            self.join.failures += 1;
            let backoff =
                Duration::from_secs(5u64.saturating_mul(1 << self.join.failures.min(6))).min(Duration::from_secs(300));
            self.join.not_before = Some(Instant::now() + backoff);
            let tags_refused = health.contains("requested tags");
            self.fail(
                ProblemId::Tailscale,
                format!(
                    "joining {url} failed within {}s: {}",
                    JOIN_TIMEOUT.as_secs(),
                    if health.is_empty() { "no answer from Headscale" } else { health }
                ),
                Some(if tags_refused {
                    "a tagged pre-auth key gives the node its tags: leave --advertise-tags empty"
                } else {
                    "is Headscale reachable from the node, and is the pre-auth key valid (reusable, not expired)?"
                }),
            );
            return;
        }
        if self.join.not_before.is_some_and(|t| Instant::now() < t) {
            self.fail(
                ProblemId::Tailscale,
                format!("tailscaled is not logged in; the next join attempt is delayed ({health})"),
                None,
            );
            return;
        }
        let key = match key_src.load("pre-auth key") {
            Ok(k) => k,
            Err(e) => {
                self.fail(
                    ProblemId::Tailscale,
                    e.to_string(),
                    Some("the pre-auth key comes from --auth-key-file or HEADCNI_AUTH_KEY"),
                );
                return;
            }
        };
        let prefs = match self.ts.prefs().await {
            Ok(p) => p,
            Err(e) => {
                self.fail(ProblemId::Tailscale, e.to_string(), None);
                return;
            }
        };
        // The join advertises the pod CIDRs at once; they are recorded before the call.
        let desired = self.pod_cidrs.as_deref().map(set).unwrap_or_default();
        let ours = self.state().map(|s| s.advertised_routes.clone()).unwrap_or_default();
        let (routes, added, _) = merge_routes(&prefs.advertise_routes, &desired, &ours);
        if !added.is_empty() {
            let Some(st) = self.state() else { return };
            st.advertised_routes.extend(added.iter().copied());
            if !self.store_state() {
                return;
            }
        }
        let join = JoinPrefs {
            control_url: url.clone(),
            hostname: self.cfg.hostname.clone(),
            advertise_routes: routes,
            advertise_tags: self.cfg.advertise_tags.clone(),
        };
        log::info!("tailscaled is not logged in: joining {url} as {} with the pre-auth key", self.cfg.hostname);
        let started = Instant::now();
        let result = async {
            self.ts.start(&key, join.update_prefs(&prefs)).await?;
            if !status.have_node_key {
                self.ts.login().await?;
            }
            Ok::<_, crate::clients::localapi::TailscaleError>(())
        }
        .await;
        match result {
            Ok(()) => {
                self.join.issued_at = Some(started);
                self.wait(ProblemId::Tailscale, format!("joining the tailnet at {url}"), None);
            }
            Err(e) => {
                self.join.failures += 1;
                self.join.not_before = Some(Instant::now() + Duration::from_secs(5 << self.join.failures.min(6)));
                self.fail(ProblemId::Tailscale, format!("starting the join: {e}"), None);
            }
        }
    }
}

/// The next pause after a pass.
pub fn next_delay(outcome: PassOutcome, streak: u32, joining: bool) -> Duration {
    if joining {
        return Duration::from_millis(250);
    }
    match outcome {
        PassOutcome::Converged => STEADY_INTERVAL,
        PassOutcome::Waiting | PassOutcome::Failed => {
            let base = Duration::from_secs(1).saturating_mul(1 << streak.min(6));
            let cap = if outcome == PassOutcome::Waiting { Duration::from_secs(30) } else { MAX_BACKOFF };
            let d = base.min(cap);
            // ±10 % jitter so that a fleet of agents does not retry in lockstep.
            let mut b = [0u8; 2];
            let r = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
                .map(|_| u16::from_ne_bytes(b))
                .unwrap_or(0);
            let jitter = i64::from(r % 21) - 10;
            let ms = d.as_millis() as i64;
            Duration::from_millis((ms + ms * jitter / 100).max(500) as u64)
        }
    }
}
