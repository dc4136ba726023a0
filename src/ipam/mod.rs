//! The `headcni-ipam` IPAM plugin.

use crate::cni::{self, CniError, CniResult, Request};

/// Name of the IPAM plugin binary (a symlink to `headcni`) and its `type` in a conflist.
pub const PLUGIN_NAME: &str = "headcni-ipam";

struct Ipam;

impl cni::Plugin for Ipam {
    fn add(&self, _req: &Request) -> Result<CniResult, CniError> {
        Err(CniError::internal("headcni-ipam: allocation is not available in this build"))
    }
    fn del(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("headcni-ipam: release is not available in this build"))
    }
    fn check(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("headcni-ipam: CHECK is not available in this build"))
    }
    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::new(cni::code::NOT_AVAILABLE, "headcni-ipam: not available in this build"))
    }
    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("headcni-ipam: GC is not available in this build"))
    }
}

/// Entry point of the IPAM role.
pub fn main() -> i32 {
    crate::logging::init_cni(PLUGIN_NAME, None, None);
    let mut stdout = std::io::stdout().lock();
    cni::run(&Ipam, &cni::ProcessEnv, &mut std::io::stdin().lock(), &mut stdout)
}
