//! HeadCNI: Kubernetes pod networking over a Tailscale tailnet coordinated by Headscale.
//!
//! One multi-call binary carries every role; [`Role::detect`] picks it before any argument
//! parsing, and `main.rs` does nothing else.
//!
//! - [`cidr`]: the one sanity check of pod, cluster, service and IPAM ranges
//! - [`cni`]: the CNI protocol (no Linux networking, nothing of HeadCNI's own config)
//! - [`plugin`]: the `headcni` CNI plugin (routed veth pairs)
//! - [`ipam`]: the `headcni-ipam` IPAM plugin, its pure allocator and its store
//! - [`netlink`]: the only code that talks to the kernel's network configuration or enters a
//!   network namespace
//! - [`nodefile`], [`events`]: what the agent and the plugins share on a node (the only way
//!   they meet)
//! - [`podguard`]: the anti-spoofing guard both the plugin and the agent keep on a node
//! - [`podgroup`]: the interface group that tags a pod's host interface with its namespace
//!   (plugin sets, policy engine reads)
//! - [`agent`]: the node daemon (`headcni agent`)
//! - [`controller`]: the cluster-wide route approver (`headcni controller`), the only holder
//!   of the Headscale API key
//! - [`binding`]: the Node annotations where the agent and the controller meet (the only way
//!   they do)
//! - [`clients`]: HTTP, Kubernetes, Headscale and tailscaled's LocalAPI, shared by the roles
//! - [`cli`]: the command line and its commands (`status`, `teardown`)
//! - [`install`]: `headcni install`, putting HeadCNI on a node
//! - [`cniconf`]: the CNI configuration directory as the runtime reads it (shared by install,
//!   status and the agent)
//! - [`exposition`]: the Prometheus exposition formats of every `/metrics` (agent, controller)
//! - [`errors`]: the error list of best-effort operations (DEL, GC, cleanup)
//! - [`fsutil`], [`logging`]: files written safely, and each role's logging
//!
//! ARCHITECTURE.md draws the map and states the rules; tests/boundaries.rs checks them.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod binding;
pub mod cidr;
pub mod cli;
pub mod clients;
pub mod cni;
pub mod cniconf;
pub mod controller;
pub mod errors;
pub mod events;
pub mod exposition;
pub mod fsutil;
pub mod install;
pub mod ipam;
pub mod logging;
pub mod netlink;
pub mod nodefile;
pub mod plugin;
pub mod podgroup;
pub mod podguard;

use std::ffi::OsStr;
use std::path::Path;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What this process is, decided from how it was invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Invoked as `headcni-ipam`: the IPAM plugin.
    Ipam,
    /// Invoked as `headcni` with CNI_COMMAND set: the CNI plugin.
    Plugin,
    /// Anything else: the command line.
    Cli,
}

impl Role {
    pub fn detect(argv0: Option<&OsStr>, cni_command_set: bool) -> Role {
        let name = argv0.and_then(|a| Path::new(a).file_name()).and_then(OsStr::to_str).unwrap_or("");
        if name == ipam::PLUGIN_NAME {
            Role::Ipam
        } else if cni_command_set {
            Role::Plugin
        } else {
            Role::Cli
        }
    }
}

/// Runs the role and returns the process exit code.
pub fn run(role: Role) -> i32 {
    match role {
        Role::Ipam => ipam::main(),
        Role::Plugin => plugin::main(),
        Role::Cli => cli::main(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_follows_argv0_then_cni_command() {
        assert_eq!(Role::detect(Some(OsStr::new("/opt/cni/bin/headcni-ipam")), true), Role::Ipam);
        assert_eq!(Role::detect(Some(OsStr::new("headcni-ipam")), false), Role::Ipam);
        assert_eq!(Role::detect(Some(OsStr::new("/opt/cni/bin/headcni")), true), Role::Plugin);
        assert_eq!(Role::detect(Some(OsStr::new("headcni")), false), Role::Cli);
        assert_eq!(Role::detect(None, false), Role::Cli);
    }
}
