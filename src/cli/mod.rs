//! The command line of the `headcni` binary when it is not acting as a CNI plugin: the
//! commands and their dispatch. The commands that only look or signal live here too:
//!
//! - [`status`]: `headcni status`, this node's pod network on one screen
//! - [`teardown`]: `headcni teardown`, the chart's uninstall hook
//!
//! The long-running roles have modules of their own (`agent`, `install`, `ipam::cli`).

pub mod status;
pub mod teardown;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::io::Write;

pub use crate::logging::exit;

/// What every `--help` ends with, the top level's and each subcommand's (see [`command`]): the
/// environment that changes any command, and the exit codes.
const ENVIRONMENT_AND_EXIT_CODES: &str = "\
Environment:
  HEADCNI_LOG_LEVEL   error, warn, info, debug or trace (or a filter such as headcni=debug);
                      overrides the configuration's log level
  HEADCNI_LOG_FORMAT  text (default) or json: one JSON object per line (ts, level, role, pid, msg)
                      for log pipelines
  Most flags also read an environment variable, shown as [env: ...] next to the flag.

Exit codes:
  0  done (status: nothing is wrong)
  1  the command ran and failed, or status found a problem
  2  unusable command line or configuration; nothing was changed

Errors end a command with one line on stderr: headcni COMMAND: error: MESSAGE
(with HEADCNI_LOG_FORMAT=json, a JSON object of level error like every other line)";

#[derive(Debug, Parser)]
#[command(
    name = "headcni",
    version,
    about = "Kubernetes pod networking over a Headscale tailnet",
    propagate_version = true
)]
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
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): headcni man > headcni.1; man ./headcni.1
    Man,
}

/// The command definition the parser, `--help` and every generated file (completions, man
/// page) are made from.
pub fn command() -> clap::Command {
    with_help_footer(Cli::command())
}

/// `cmd` and every subcommand under it, at any depth, with [`ENVIRONMENT_AND_EXIT_CODES`] at
/// the end of their help.
fn with_help_footer(cmd: clap::Command) -> clap::Command {
    cmd.after_help(ENVIRONMENT_AND_EXIT_CODES).mut_subcommands(with_help_footer)
}

fn completion(shell: clap_complete::Shell) -> i32 {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut command(), "headcni", &mut out);
    i32::from(out.flush().is_err())
}

/// The man page: the command, then a section per subcommand with its own options.
fn man() -> i32 {
    let mut page = Vec::new();
    let cmd = command();
    let mut written = clap_mangen::Man::new(cmd.clone()).render(&mut page);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("headcni {}", sub.get_name());
        let sub = sub.clone().bin_name(name);
        let man = clap_mangen::Man::new(sub);
        written = written.and_then(|()| {
            let mut section = Vec::new();
            man.render_name_section(&mut section)?;
            man.render_synopsis_section(&mut section)?;
            man.render_description_section(&mut section)?;
            man.render_options_section(&mut section)?;
            // Each sub-page's sections become subsections of the one page.
            let text = String::from_utf8_lossy(&section).replace(".SH ", ".SS ");
            page.extend_from_slice(text.as_bytes());
            Ok(())
        });
    }
    let mut out = std::io::stdout().lock();
    i32::from(written.is_err() || out.write_all(&page).is_err())
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
    let cli = match command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => cli,
        Err(e) => {
            // clap's own message, with its "tip: a similar ... exists" suggestions.
            let _ = e.print();
            return if e.use_stderr() { exit::USAGE } else { exit::OK };
        }
    };
    match cli.command {
        Cmd::Version { json } => version(json),
        Cmd::Install(args) => crate::install::main(&args),
        Cmd::Agent(args) => crate::agent::main(*args),
        Cmd::Controller(args) => crate::controller::main(*args),
        Cmd::Status(args) => status::main(args),
        Cmd::Teardown(args) => teardown::main(args),
        Cmd::Ipam(args) => crate::ipam::cli::run(&args),
        Cmd::Completion { shell } => completion(shell),
        Cmd::Man => man(),
    }
}
