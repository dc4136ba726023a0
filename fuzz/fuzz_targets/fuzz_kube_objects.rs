//! The other Kubernetes answers HeadCNI reads (the uninstall signal ConfigMap, watch events,
//! the DaemonSet's counts and selector, a pod list) never make it panic.
#![no_main]

use headcni::agent::hook::{counts, ready_pods, selector};
use headcni::agent::kube::parse_watch_event;
use headcni::agent::teardown::signal_of;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = parse_watch_event(data) {
        let _ = signal_of(&event.object);
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = signal_of(&value);
        let _ = counts(&value);
        let _ = selector(&value);
        let _ = ready_pods(&value);
    }
});
