//! The command line of the `headcni` binary when it is not acting as a CNI plugin: the
//! commands and their dispatch. The commands that only look or signal live here too:
//!
//! - [`status`]: `headcni status`, this node's pod network on one screen
//! - [`teardown`]: `headcni teardown`, the chart's uninstall hook
//!
//! The long-running roles have modules of their own (`agent`, `install`, `ipam::cli`).

pub mod status;
pub mod teardown;

use clap::{Parser, Subcommand};
use std::io::Write;

#[derive(Debug, Parser)]
#[command(name = "headcni", version, about = "Kubernetes pod networking over a Headscale tailnet")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Print the version and the CNI spec versions the plugins support.
    Version {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Install the binary, the headcni-ipam link and the conflist on this node.
    Install(Box<crate::install::InstallArgs>),
    /// Run the node agent: join the tailnet, advertise and approve this node's pod CIDRs, keep
    /// the node's data plane, write the node file, serve metrics.
    Agent(Box<crate::agent::config::AgentArgs>),
    /// Run the route approval controller (a Deployment; one replica leads): approve in
    /// Headscale each Node's pod CIDRs on the tailnet node its agent published.
    Controller(Box<crate::controller::config::ControllerArgs>),
    /// Show this node's pod network: tailnet, routes, MTU, forwarding, masquerade, files.
    Status(status::StatusArgs),
    /// Uninstall hook: raise the uninstall signal (the agents withdraw their nodes' routes)
    /// and wait until no agent is ready, or the timeout.
    Teardown(teardown::TeardownArgs),
    /// Inspect and maintain the headcni-ipam store on this node.
    Ipam(crate::ipam::cli::IpamArgs),
}

fn version(json: bool) -> i32 {
    let mut out = std::io::stdout().lock();
    let supported: Vec<&str> = crate::cni::CniVersion::ALL.iter().map(|v| v.as_str()).collect();
    let written = if json {
        let value = serde_json::json!({"version": crate::VERSION, "cniVersions": supported});
        writeln!(out, "{value}")
    } else {
        writeln!(out, "headcni {} (CNI {})", crate::VERSION, supported.join(", "))
    };
    i32::from(written.is_err())
}

/// Entry point of the CLI role.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Version { json } => version(json),
        Cmd::Install(args) => {
            crate::logging::init_stderr("info");
            match crate::install::main(&args) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e:#}");
                    1
                }
            }
        }
        Cmd::Agent(args) => crate::agent::main(*args),
        Cmd::Controller(args) => crate::controller::main(*args),
        Cmd::Status(args) => status::main(args),
        Cmd::Teardown(args) => teardown::main(args),
        Cmd::Ipam(args) => crate::ipam::cli::run(&args),
    }
}
