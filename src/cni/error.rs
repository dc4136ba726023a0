//! CNI error replies: the spec's well-known codes and the JSON shape written to stdout.

use serde::Serialize;
use std::fmt;

/// Well-known error codes from the CNI specification ("Error" section), plus HeadCNI's own (100+).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// A failure inside the plugin that fits no well-known code (netlink refused a change, ...).
    pub const INTERNAL: u32 = 100;
    /// ADD found the requested interface already present in the container.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// CHECK found the attachment differing from what ADD created.
    pub const CHECK_FAILED: u32 = 102;
    /// The address range has no free address left.
    pub const RANGE_EXHAUSTED: u32 = 103;
    /// ADD found a host route to the pod's address that someone else owns; nothing was replaced.
    pub const ROUTE_CONFLICT: u32 = 104;
}

/// An error as the CNI spec reports it: a code, a short message and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }

    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENV, msg)
    }

    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(code::IO_FAILURE, msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    /// One error for a best-effort verb (DEL, GC) that went on past its failures: "<what>
    /// finished with errors: " and every message, with the code of the first failure (the cause
    /// the others most likely followed from). No failure, no error.
    pub fn from_list(what: &str, failures: crate::errors::ErrorList<CniError>) -> Result<(), CniError> {
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(CniError::new(first.code, format!("{what} finished with errors: {failures}"))),
        }
    }

    /// The reply written to stdout for this error.
    pub fn to_reply<'a>(&'a self, cni_version: &'a str) -> ErrorReply<'a> {
        ErrorReply { cni_version, code: self.code, msg: &self.msg, details: &self.details }
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// The error result structure of the spec: `{cniVersion, code, msg, details}`.
#[derive(Debug, Serialize)]
pub struct ErrorReply<'a> {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'a str,
    pub code: u32,
    pub msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub details: &'a str,
}

/// Parses an error reply printed by a delegated plugin.
pub fn parse_reply(stdout: &[u8]) -> Option<CniError> {
    #[derive(serde::Deserialize)]
    struct ErrorReply {
        code: u32,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    let reply: ErrorReply = serde_json::from_slice(stdout).ok()?;
    Some(CniError { code: reply.code, msg: reply.msg, details: reply.details })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_omits_empty_details() {
        let err = CniError::invalid_config("mtu must be between 576 and 9000");
        let json = serde_json::to_string(&err.to_reply("1.1.0")).unwrap();
        assert_eq!(json, r#"{"cniVersion":"1.1.0","code":7,"msg":"mtu must be between 576 and 9000"}"#);
    }

    #[test]
    fn reply_round_trips_through_parse() {
        let err = CniError::io("disk full").with_details("/var/lib/x");
        let json = serde_json::to_vec(&err.to_reply("1.0.0")).unwrap();
        assert_eq!(parse_reply(&json), Some(err));
        assert_eq!(parse_reply(b"not json"), None);
    }
}
