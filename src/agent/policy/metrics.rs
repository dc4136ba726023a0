//! The engine's Prometheus metrics (`headcni_policy_*`), registered with the agent's.

use super::compile::Stats;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct PolicyMetrics {
    pub enabled: Gauge,
    pub synced: Gauge,
    /// Objects followed, by kind.
    pub watched: Family<Labels, Gauge>,
    pub policies_in_force: Gauge,
    /// Local pods isolated, by direction.
    pub isolated_pods: Family<Labels, Gauge>,
    pub local_pods: Gauge,
    pub pending_pods: Gauge,
    pub rule_elements: Gauge,
    pub chains: Gauge,
    pub applies: Counter,
    pub apply_failures: Counter,
    pub drift_repairs: Counter,
    /// Computing the rule set and committing the difference.
    pub apply_duration: Histogram,
    /// From the first change seen to the rule set enforcing it.
    pub enforce_latency: Histogram,
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        Self {
            enabled: Gauge::default(),
            synced: Gauge::default(),
            watched: Family::default(),
            policies_in_force: Gauge::default(),
            isolated_pods: Family::default(),
            local_pods: Gauge::default(),
            pending_pods: Gauge::default(),
            rule_elements: Gauge::default(),
            chains: Gauge::default(),
            applies: Counter::default(),
            apply_failures: Counter::default(),
            drift_repairs: Counter::default(),
            // 0.5 ms .. ~8 s
            apply_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            enforce_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
        }
    }
}

impl PolicyMetrics {
    /// Registers every metric under `headcni_policy_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("policy");
        r.register("enabled", "1 when this node enforces NetworkPolicies", self.enabled.clone());
        r.register("synced", "1 once NetworkPolicies, Pods and Namespaces are all listed", self.synced.clone());
        r.register("watched_objects", "Objects the engine follows, by kind", self.watched.clone());
        r.register(
            "in_force",
            "NetworkPolicies isolating at least one pod of this node",
            self.policies_in_force.clone(),
        );
        r.register("isolated_pods", "Pods of this node isolated, by direction", self.isolated_pods.clone());
        r.register("local_pods", "Pods of this node on the pod network with addresses", self.local_pods.clone());
        r.register("pending_pods", "Pods of this node waiting for their addresses", self.pending_pods.clone());
        r.register(
            "rule_elements",
            "Elements of the sets and maps of table inet headcni-policy",
            self.rule_elements.clone(),
        );
        r.register("chains", "Chains of table inet headcni-policy", self.chains.clone());
        // Counters are registered without "_total": the encoder adds it.
        r.register("applies", "Rule set changes committed (one atomic batch each)", self.applies.clone());
        r.register("apply_failures", "Rule set changes the kernel refused", self.apply_failures.clone());
        r.register(
            "drift_repairs",
            "Times the table was found changed by someone else and replaced",
            self.drift_repairs.clone(),
        );
        r.register(
            "apply_duration_seconds",
            "Time to compute the rule set and commit the difference",
            self.apply_duration.clone(),
        );
        r.register(
            "enforce_latency_seconds",
            "From a change of a policy, pod or namespace being seen to the rules enforcing it",
            self.enforce_latency.clone(),
        );
        for d in ["ingress", "egress"] {
            self.isolated_pods.get_or_create(&vec![("direction", d.to_string())]).set(0);
        }
    }

    pub fn record_stats(&self, stats: &Stats) {
        let g = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.policies_in_force.set(g(stats.policies_in_force));
        self.isolated_pods.get_or_create(&vec![("direction", "ingress".to_string())]).set(g(stats.isolated_ingress));
        self.isolated_pods.get_or_create(&vec![("direction", "egress".to_string())]).set(g(stats.isolated_egress));
        self.local_pods.set(g(stats.local_pods));
        self.pending_pods.set(g(stats.pending_pods));
        self.rule_elements.set(g(stats.elements));
        self.chains.set(g(stats.chains));
    }
}
