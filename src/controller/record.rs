//! The controller's record of what it approved: for each Headscale node it approved routes on,
//! the Nodes it was bound to and the routes. It is how approvals are withdrawn from a tailnet
//! node that is bound no more (its Node deleted, even while no controller ran), and only those.
//! It lives in a ConfigMap the chart creates (`data."approvals.json"`), written before each
//! approval and after each withdrawal, with optimistic concurrency on its resourceVersion.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The ConfigMap's data key.
pub const DATA_KEY: &str = "approvals.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordEntry {
    /// The Nodes the tailnet node was bound to.
    pub nodes: Vec<String>,
    /// What the controller approved on it.
    pub routes: BTreeSet<IpNetwork>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// By Headscale node id.
    pub entries: BTreeMap<String, RecordEntry>,
}

impl Record {
    /// The record as stored; an absent or empty value is an empty record. Anything else that
    /// does not parse is an error: a record that cannot be read must stop the controller from
    /// writing, or it would forget what to withdraw.
    pub fn parse(text: Option<&str>) -> Result<Self, String> {
        match text.map(str::trim) {
            None | Some("") => Ok(Self::default()),
            Some(t) => serde_json::from_str(t).map_err(|e| format!("the approval record does not parse: {e}")),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let mut r = Record::default();
        r.entries.insert(
            "3".into(),
            RecordEntry { nodes: vec!["node-1".into()], routes: ["10.244.1.0/24".parse().unwrap()].into() },
        );
        assert_eq!(Record::parse(Some(&r.to_json())).unwrap(), r);
        assert_eq!(Record::parse(None).unwrap(), Record::default());
        assert_eq!(Record::parse(Some(" ")).unwrap(), Record::default());
        assert!(Record::parse(Some("{\"entries\": 5}")).is_err());
    }
}
