//! The node's anti-spoofing guard, which the plugin and the agent both keep: one static rule in
//! the `inet` table [`TABLE`] that drops every packet arriving on a pod veth (a host end named
//! [`VETH_PREFIX`]`*`) whose source address the host does not route back out of that very veth
//! ([`crate::netlink::nft::GuardSpec`]). A pod's veth has host routes to the pod's own
//! addresses only, so a pod can send from those and from nothing else, whatever socket it
//! uses; the routes ADD creates are the guard's whole state.
//!
//! The plugin makes sure the guard exists before it creates a veth ([`ensure`]: one lookup of
//! the chain, nothing more when it is there); the agent checks it completely in every pass
//! ([`intact`]) and puts it back when someone removed or changed it. `headcni agent --cleanup`
//! removes it; the uninstall signal leaves it, as the pods it protects stay.

use crate::netlink::nft::{GuardSpec, Nft, NftError, NftFamily};

/// The guard's table (`table inet headcni-guard`).
pub const TABLE: &str = "headcni-guard";
/// Its one chain, a filter chain on the prerouting hook at priority raw.
pub const CHAIN: &str = "prerouting";
/// The first letters of every host-side pod veth's name, and nothing else's on a node.
pub const VETH_PREFIX: &str = "hc";

/// The guard as HeadCNI keeps it.
pub fn spec() -> GuardSpec {
    GuardSpec { table: TABLE.into(), chain: CHAIN.into(), ifname_prefix: VETH_PREFIX.into() }
}

/// Creates the guard unless its chain exists; answers whether it created it. Concurrent
/// callers (plugins running side by side) each replace the table atomically with the same
/// content, so the outcome is one table with one rule, whoever wins.
pub fn ensure(nft: &mut Nft) -> Result<bool, NftError> {
    if nft.chain_exists(NftFamily::Inet, TABLE, CHAIN)? {
        return Ok(false);
    }
    nft.replace_guard(&spec())?;
    Ok(true)
}

/// Whether the guard is complete: its table, its chain and exactly its one rule.
pub fn intact(nft: &mut Nft) -> Result<bool, NftError> {
    Ok(nft.rule_count(NftFamily::Inet, TABLE, CHAIN)? == 1 && nft.chain_exists(NftFamily::Inet, TABLE, CHAIN)?)
}

/// Removes the guard; answers whether it existed.
pub fn remove(nft: &mut Nft) -> Result<bool, NftError> {
    nft.delete_table(NftFamily::Inet, TABLE)
}
