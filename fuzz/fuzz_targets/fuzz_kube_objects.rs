//! The other Kubernetes answers HeadCNI reads (the uninstall signal ConfigMap, the DaemonSet's
//! counts and selector, a pod list), decoded as the client decodes them, never make it panic.
#![no_main]

use headcni::agent::teardown::signal_of;
use headcni::cli::teardown::{counts, ready_pods, selector};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cm) = serde_json::from_slice::<ConfigMap>(data) {
        let _ = signal_of(&cm);
    }
    if let Ok(ds) = serde_json::from_slice::<DaemonSet>(data) {
        let _ = counts(&ds);
        let _ = selector(&ds);
    }
    if let Ok(pods) = serde_json::from_slice::<Vec<Pod>>(data) {
        let _ = ready_pods(&pods);
    }
});
