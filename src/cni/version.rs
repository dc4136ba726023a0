//! CNI spec versions this plugin speaks, and the VERSION reply.

use super::error::{CniError, code};
use serde::Serialize;
use std::fmt;

/// A spec version HeadCNI supports; the order is the spec's chronology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [Self::V0_3_0, Self::V0_3_1, Self::V0_4_0, Self::V1_0_0, Self::V1_1_0];
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == text)
    }

    /// Parses the `cniVersion` of a config, answering code 1 for versions HeadCNI does not speak.
    pub fn from_config(text: &str) -> Result<Self, CniError> {
        Self::parse(text).ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion \"{text}\" is not supported; supported versions: {}", supported_list()),
            )
        })
    }

    /// Results before 1.0.0 carry a "version" field in each IP entry.
    pub fn ip_has_version_field(self) -> bool {
        self < Self::V1_0_0
    }

    /// 1.1.0 added mtu/socketPath/pciID to interfaces and mtu/advmss/priority/table/scope to routes.
    pub fn has_extended_fields(self) -> bool {
        self >= Self::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn supported_list() -> String {
    CniVersion::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
}

/// The reply to VERSION.
#[derive(Debug, Serialize)]
pub struct VersionReply {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<&'static str>,
}

impl VersionReply {
    pub fn new() -> Self {
        Self {
            cni_version: CniVersion::LATEST.as_str(),
            supported_versions: CniVersion::ALL.iter().map(|v| v.as_str()).collect(),
        }
    }
}

impl Default for VersionReply {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_nothing_else() {
        for v in CniVersion::ALL {
            assert_eq!(CniVersion::parse(v.as_str()), Some(v));
        }
        for bad in ["0.2.0", "0.1.0", "1.2.0", "", "1.0", "v1.0.0"] {
            let err = CniVersion::from_config(bad).unwrap_err();
            assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
            assert!(err.msg.contains("supported versions"), "{}", err.msg);
        }
    }

    #[test]
    fn versions_are_ordered() {
        assert!(CniVersion::V0_4_0 < CniVersion::V1_0_0);
        assert!(CniVersion::V0_4_0.ip_has_version_field());
        assert!(!CniVersion::V1_0_0.ip_has_version_field());
        assert!(CniVersion::V1_1_0.has_extended_fields());
    }
}
