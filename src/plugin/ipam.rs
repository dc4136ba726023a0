//! The IPAM delegation behind a seam: [`IpamDelegate`] runs the IPAM plugin a configuration
//! names for one verb; [`DelegatedIpam`] is the real one and the unit tests use a fake
//! (`plugin::fake`) that can fail on demand.

use crate::cni::{self, CniError, Command, Request, delegate};
use serde_json::{Map, Value};
use std::time::Duration;

/// Runs an IPAM plugin.
pub trait IpamDelegate {
    /// Runs IPAM plugin `kind` for `command` with `config` as its network configuration (the
    /// rest of the request as the plugin received it), for at most `timeout`. Answers what the
    /// plugin printed.
    fn run(
        &self,
        req: &Request,
        config: Map<String, Value>,
        kind: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<Option<Value>, CniError>;
}

/// `headcni-ipam` in this very process (the same code and result as exec'ing it, without the
/// fork and exec), anything else through CNI_PATH as the spec describes. A delegate built
/// before spec 1.1 gets its newest version for ADD/DEL/CHECK, and is skipped for STATUS and GC,
/// which it does not know.
#[derive(Debug, Default)]
pub struct DelegatedIpam;

impl IpamDelegate for DelegatedIpam {
    fn run(
        &self,
        req: &Request,
        config: Map<String, Value>,
        kind: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<Option<Value>, CniError> {
        let sub = Request { command, ..req.with_config(config) };
        if kind == crate::ipam::PLUGIN_NAME {
            return crate::ipam::run_in_process(&sub);
        }
        if matches!(command, Command::Status | Command::Gc)
            && !delegate::versions(&sub, kind, timeout)?.contains(&cni::CniVersion::V1_1_0)
        {
            log::debug!("IPAM plugin {kind} predates {command}; nothing to forward");
            return Ok(None);
        }
        delegate::exec_negotiated(&sub, kind, command, timeout)
    }
}
