//! HeadCNI: Kubernetes pod networking over a Tailscale tailnet coordinated by Headscale.
//!
//! One multi-call binary carries every role; `main.rs` only picks the role.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
