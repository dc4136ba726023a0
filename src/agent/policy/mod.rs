//! The NetworkPolicy engine: what networking.k8s.io/v1 NetworkPolicies allow, enforced on this
//! node with nf_tables (its own table, `inet headcni-policy`).
//!
//! - [`model`]: pods, namespaces and policies as the engine reads them, and their semantics
//! - [`compile`]: from the cluster to this node's rule set (pure)
//! - [`engine`]: the watches, the view they build, and the table kept equal to its rule set
//! - [`metrics`]: the `headcni_policy_` metrics

pub mod compile;
pub mod engine;
pub mod metrics;
pub mod model;

#[cfg(test)]
mod tests;
