//! tailscaled's change notifications, followed so that the reconcile loop runs a pass as soon as
//! something it keeps may have changed, not only on its timer: tailscaled's state (a restart, a
//! logout), its prefs (someone edited AdvertiseRoutes or RouteAll), this node's record (its
//! routes approved), and the peers' addresses and routes (a node joins, leaves, is approved).
//!
//! The watch (`/localapi/v0/watch-ipn-bus`) asks for peer deltas and never for the whole network
//! map. Only notifications that matter wake the loop: a peer's endpoints and its online state
//! change all the time on a large tailnet and change nothing the agent keeps. A stream that
//! ends or cannot be opened (tailscaled not running yet) is opened again after a pause; the
//! loop's timer keeps the node right meanwhile.

use crate::clients::localapi::SocketLocalApi;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Longest pause before the bus is opened again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the agent remembers of each peer: its addresses and routes, as the bus last told them.
#[derive(Debug, Default)]
pub struct Peers(HashMap<String, Vec<String>>);

fn strings(v: Option<&Value>) -> Vec<String> {
    let mut out: Vec<String> = v
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// A peer's identity in a notification: its node id (what `PeersRemoved` lists).
fn peer_id(node: &Value) -> Option<String> {
    node.get("ID").filter(|id| id.is_number()).map(ToString::to_string)
}

impl Peers {
    /// What in notification `n` can change what the agent keeps ("state", "prefs", "peers",
    /// ...), empty when nothing does; remembers the peers it names.
    pub fn relevant(&mut self, n: &Value) -> Vec<&'static str> {
        let mut what: Vec<&'static str> = [
            ("State", "state"),
            ("Prefs", "prefs"),
            ("LoginFinished", "login"),
            ("SelfChange", "this node"),
            ("NetMap", "network map"),
        ]
        .iter()
        .filter(|(k, _)| n.get(*k).is_some_and(|v| !v.is_null()))
        .map(|(_, w)| *w)
        .collect();
        let mut peers = false;
        if let Some(removed) = n.get("PeersRemoved").and_then(Value::as_array) {
            for id in removed {
                self.0.remove(&id.to_string());
                peers = true;
            }
        }
        if let Some(changed) = n.get("PeersChanged").and_then(Value::as_array) {
            for node in changed {
                let Some(id) = peer_id(node) else { continue };
                let mut seen = strings(node.get("Addresses"));
                seen.extend(strings(node.get("AllowedIPs")));
                seen.extend(strings(node.get("PrimaryRoutes")));
                if self.0.get(&id) != Some(&seen) {
                    self.0.insert(id, seen);
                    peers = true;
                }
            }
        }
        if peers {
            what.push("peers");
        }
        what
    }
}

/// Follows the bus until the task is aborted, notifying `wake` for every notification that
/// matters.
pub async fn follow(api: SocketLocalApi, wake: Arc<Notify>) {
    let mut failures: u32 = 0;
    loop {
        match api.watch_bus().await {
            Ok(mut stream) => {
                log::debug!("following tailscaled's change notifications");
                failures = 0;
                let mut peers = Peers::default();
                loop {
                    match stream.next().await {
                        Ok(Some(n)) => {
                            let what = peers.relevant(&n);
                            if !what.is_empty() {
                                log::info!("tailscaled reports a change ({}): a pass now", what.join(", "));
                                wake.notify_one();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            log::debug!("tailscaled's change notifications: {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => log::debug!("watching tailscaled's change notifications: {e}"),
        }
        failures = failures.saturating_add(1);
        let pause = Duration::from_millis(500).saturating_mul(1 << failures.min(6)).min(MAX_BACKOFF);
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_changes_that_matter_wake_the_loop() {
        let mut p = Peers::default();
        assert_eq!(p.relevant(&json!({"Version": "1.102.3", "State": 6})), ["state"]);
        assert_eq!(p.relevant(&json!({"Prefs": {"RouteAll": true}})), ["prefs"]);
        assert!(p.relevant(&json!({"Engine": {"RBytes": 1}})).is_empty(), "traffic counters");
        assert!(p.relevant(&json!({"Health": {}})).is_empty());
        let node = |routes: &[&str], endpoints: &[&str]| {
            json!({"ID": 7, "StableID": "nS7", "Addresses": ["100.64.0.7/32"], "AllowedIPs": routes,
                   "PrimaryRoutes": routes, "Endpoints": endpoints, "Online": true})
        };
        assert_eq!(p.relevant(&json!({"PeersChanged": [node(&["10.244.3.0/24"], &["a"])]})), ["peers"], "new");
        assert!(p.relevant(&json!({"PeersChanged": [node(&["10.244.3.0/24"], &["b"])]})).is_empty(), "an endpoint");
        let routes = json!({"PeersChanged": [node(&["10.244.3.0/24", "0.0.0.0/0"], &["b"])]});
        assert_eq!(p.relevant(&routes), ["peers"], "routes");
        assert_eq!(p.relevant(&json!({"PeersRemoved": [7]})), ["peers"]);
        assert_eq!(p.relevant(&routes), ["peers"], "back");
        assert!(p.relevant(&json!({"PeersChanged": [{"Online": false}]})).is_empty(), "no id: nothing to compare");
    }
}
