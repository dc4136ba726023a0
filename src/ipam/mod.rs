//! The `headcni-ipam` IPAM plugin: ADD, DEL, CHECK, STATUS and GC over a crash-safe store of
//! allocations, one per network on each node, plus the `headcni ipam` maintenance commands.
//!
//! - [`allocator`]: which address comes next (sequential, random, dense), pure arithmetic
//! - [`state`]: the state of a network and its file format, pure
//! - [`store`]: the files on disk: lock, atomic replacement, boots, damage
//! - [`config`]: the `ipam` section of the network configuration
//! - [`entropy`]: the random source and the clock the allocator is handed
//! - [`cli`]: `headcni ipam stats|list|gc|repair`
//!
//! The same code runs when the binary is exec'd as `headcni-ipam` and when the `headcni` plugin
//! calls [`run_in_process`] instead of exec'ing it.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod entropy;
pub mod state;
pub mod store;

use crate::cni::{self, CniError, CniResult, Command, IpConfig, Request, code};
use crate::events::{self, Event};
use config::IpamConfig;
use ipnetwork::IpNetwork;
use serde_json::Value;
use state::{Allocation, Family, SetSpec, SetState, State};
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use store::{Store, StoreError};

/// Name of the IPAM plugin binary (a symlink to `headcni`) and its `type` in a conflist.
pub const PLUGIN_NAME: &str = "headcni-ipam";

/// Everything that can go wrong in an IPAM operation. [`From<IpamError> for CniError`] is the
/// one place where these become CNI error codes.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    /// The configuration is invalid; the message names the field.
    #[error("{0}")]
    Config(String),
    /// An environment variable (CNI_ARGS) is invalid.
    #[error("{0}")]
    Env(String),
    /// prevResult could not be decoded.
    #[error("{0}")]
    Decode(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no free address in range set {set} ({ranges}): all {capacity} addresses are in use")]
    Exhausted { set: usize, ranges: String, capacity: u128 },
    #[error("requested address {0} is in none of the configured ranges")]
    RequestedOutside(IpAddr),
    #[error("requested address {addr} {why}")]
    RequestedUnavailable { addr: IpAddr, why: String },
    /// CHECK found the store disagreeing with the attachment.
    #[error("{0}")]
    Check(String),
    /// STATUS: the plugin cannot serve ADD right now.
    #[error("{0}")]
    Unavailable(String),
}

/// A configuration field that is wrong.
impl From<cni::fields::FieldError> for IpamError {
    fn from(e: cni::fields::FieldError) -> Self {
        IpamError::Config(e.to_string())
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let code = match &e {
            IpamError::Config(_) | IpamError::RequestedOutside(_) => code::INVALID_CONFIG,
            IpamError::Env(_) => code::INVALID_ENV,
            IpamError::Decode(_) => code::DECODE_FAILURE,
            IpamError::Store(StoreError::NetworkName(_)) => code::INVALID_CONFIG,
            IpamError::Store(_) => code::IO_FAILURE,
            IpamError::Exhausted { .. } => code::RANGE_EXHAUSTED,
            IpamError::RequestedUnavailable { .. } => code::INTERNAL,
            IpamError::Check(_) => code::CHECK_FAILED,
            IpamError::Unavailable(_) => code::NOT_AVAILABLE,
        };
        CniError::new(code, format!("{PLUGIN_NAME}: {e}"))
    }
}

/// The plugin.
#[derive(Debug, Default)]
pub struct HeadcniIpam;

impl cni::Plugin for HeadcniIpam {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        Ok(add(req)?)
    }
    fn del(&self, req: &Request) -> Result<(), CniError> {
        Ok(del(req)?)
    }
    fn check(&self, req: &Request) -> Result<(), CniError> {
        Ok(check(req)?)
    }
    fn status(&self, req: &Request) -> Result<(), CniError> {
        Ok(status(req)?)
    }
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        Ok(gc(req)?)
    }
}

/// Runs a validated request in this process and returns exactly what the exec'd plugin would
/// print on success (the ADD result in the request's version), or its error.
pub fn run_in_process(req: &Request) -> Result<Option<Value>, CniError> {
    let plugin = HeadcniIpam;
    match req.command {
        Command::Add => cni::Plugin::add(&plugin, req).map(|r| Some(r.to_value(req.version))),
        Command::Del => cni::Plugin::del(&plugin, req).map(|()| None),
        Command::Check => cni::Plugin::check(&plugin, req).map(|()| None),
        Command::Status => cni::Plugin::status(&plugin, req).map(|()| None),
        Command::Gc => cni::Plugin::gc(&plugin, req).map(|()| None),
        Command::Version => serde_json::to_value(cni::version::VersionReply::new())
            .map(Some)
            .map_err(|e| CniError::internal(e.to_string())),
    }
}

/// How full a network's pool is, from the state file's header (cheap: no records are parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub used: u128,
    pub total: u128,
}

/// The usage of `network`'s store under `data_dir`; `None` before the first allocation.
pub fn usage(data_dir: &Path, network: &str) -> Result<Option<Usage>, StoreError> {
    let store = Store::for_this_boot(data_dir, network)?;
    Ok(store.read_header()?.map(|(header, _)| Usage {
        used: header.sets.iter().map(|s| s.used).fold(0, u128::saturating_add),
        total: header.sets.iter().map(|s| s.spec.pool().capacity()).fold(0, u128::saturating_add),
    }))
}

/// One pool of a network (a range set) and how full it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetUsage {
    /// Its subnets, comma separated (`10.244.1.0/24`).
    pub pool: String,
    pub used: u128,
    pub total: u128,
}

/// The usage of each pool of `network`'s store under `data_dir` (none before the first
/// allocation), from the state file's header.
pub fn pool_usage(data_dir: &Path, network: &str) -> Result<Vec<SetUsage>, StoreError> {
    let store = Store::for_this_boot(data_dir, network)?;
    Ok(store
        .read_header()?
        .map(|(header, _)| {
            header
                .sets
                .iter()
                .map(|s| SetUsage {
                    pool: s.spec.ranges.iter().map(|r| r.subnet.to_string()).collect::<Vec<_>>().join(","),
                    used: s.used,
                    total: s.spec.pool().capacity(),
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Entry point of the IPAM role (the binary invoked as `headcni-ipam`).
pub fn main() -> i32 {
    cni::main(&HeadcniIpam, &|command, config| crate::logging::init_plugin(PLUGIN_NAME, command, config))
}

/// Makes the config's range sets the state's, keeping each set's cursor. A config without
/// ranges (a DEL that could not resolve them) keeps what the store knows.
fn adopt(state: &mut State<'_>, sets: &[SetSpec]) {
    if sets.is_empty() {
        return;
    }
    state.sets = sets
        .iter()
        .enumerate()
        .map(|(i, spec)| SetState {
            spec: spec.clone(),
            last: state.sets.get(i).and_then(|s| s.last).filter(|l| Family::of(*l) == spec.family()),
            used: 0,
        })
        .collect();
}

fn record_events(conf: &IpamConfig, released: bool, addresses: impl Iterator<Item = IpAddr>) {
    let events: Vec<Event> =
        addresses
            .map(|a| {
                if released {
                    Event::IpReleased { ipv6: a.is_ipv6() }
                } else {
                    Event::IpAllocated { ipv6: a.is_ipv6() }
                }
            })
            .collect();
    events::record(&conf.run_dir, &events);
}

fn list(addresses: &[IpAddr]) -> String {
    addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The requested address for each range set (CNI_ARGS IP=, args.cni.ips, runtimeConfig.ips).
fn requested_per_set(req: &Request, conf: &IpamConfig) -> Result<Vec<Option<IpAddr>>, IpamError> {
    let mut wanted: Vec<Option<IpAddr>> = vec![None; conf.sets.len()];
    for addr in config::requested_ips(req)? {
        let i = conf.set_of(addr).ok_or(IpamError::RequestedOutside(addr))?;
        if let Some(other) = wanted[i].filter(|o| *o != addr) {
            return Err(IpamError::Config(format!(
                "requested addresses {other} and {addr} are both in range set {i}; one address per set"
            )));
        }
        if !conf.sets[i].pool().contains(state::offset(addr)) {
            return Err(IpamError::RequestedUnavailable {
                addr,
                why: "is reserved (network, broadcast or gateway address) or excluded".into(),
            });
        }
        wanted[i] = Some(addr);
    }
    Ok(wanted)
}

fn add(req: &Request) -> Result<CniResult, IpamError> {
    let conf = IpamConfig::from_request(req)?;
    if conf.sets.is_empty() {
        return Err(IpamError::Config("ipam needs \"subnet\" or \"ranges\" to allocate from".into()));
    }
    let wanted = requested_per_set(req, &conf)?;
    let store = Store::for_this_boot(&conf.data_dir, &req.network)?;
    let locked = store.lock_creating()?;
    let bytes = locked.store().read()?;
    let mut state = match &bytes {
        Some(b) => store.parse(b)?,
        None => State::new(store.boot_id()),
    };
    adopt(&mut state, &conf.sets);

    let held = state.held_by(&req.container_id, &req.ifname);
    let mut ips = Vec::with_capacity(conf.sets.len());
    let mut new = Vec::new();
    for (i, set) in conf.sets.iter().enumerate() {
        let existing = held.iter().copied().find(|a| set.range_of(*a).is_some());
        let addr = match (existing, wanted[i]) {
            (Some(have), Some(want)) if have != want => {
                return Err(IpamError::RequestedUnavailable {
                    addr: want,
                    why: format!("differs from {have}, which {} {} already holds", req.container_id, req.ifname),
                });
            }
            (Some(have), _) => have,
            (None, Some(want)) if state.is_used(want) => {
                return Err(IpamError::RequestedUnavailable { addr: want, why: "is in use".into() });
            }
            (None, Some(want)) => want,
            (None, None) => {
                let family = set.family();
                let pool = set.pool();
                let cursor = state.sets[i].last.map(state::offset);
                let mut random = entropy::os_random_below;
                let next = pool.next(state.used(family), conf.strategy, cursor, &mut random);
                let offset = next.ok_or_else(|| IpamError::Exhausted {
                    set: i,
                    ranges: set.describe(),
                    capacity: pool.capacity(),
                })?;
                state::address(family, offset)
            }
        };
        if existing.is_none() {
            let allocation = Allocation {
                address: addr,
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                allocated_at: entropy::unix_now(),
                pod_namespace: req.arg("K8S_POD_NAMESPACE").unwrap_or_default().to_string(),
                pod_name: req.arg("K8S_POD_NAME").unwrap_or_default().to_string(),
                netns: req.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            };
            if !state.insert(&allocation) {
                return Err(IpamError::RequestedUnavailable { addr, why: "is in use".into() });
            }
            state.sets[i].last = Some(addr);
            new.push(addr);
        }
        let range = set.range_of(addr).ok_or_else(|| IpamError::Config(format!("{addr} left its range")))?;
        let address = IpNetwork::new(addr, range.subnet.prefix()).map_err(|e| IpamError::Config(e.to_string()))?;
        ips.push(IpConfig { address, gateway: range.gateway, interface: None });
    }

    if new.is_empty() {
        log::info!("ADD {} {}: already holds {}", req.container_id, req.ifname, list(&held));
    } else {
        locked.write(&state)?;
        drop(locked);
        record_events(&conf, false, new.iter().copied());
        log::info!("ADD {} {}: allocated {} in network {}", req.container_id, req.ifname, list(&new), req.network);
    }
    Ok(CniResult { interfaces: Vec::new(), ips, routes: conf.routes, dns: conf.dns })
}

fn del(req: &Request) -> Result<(), IpamError> {
    let conf = IpamConfig::from_request(req)?;
    let store = Store::for_this_boot(&conf.data_dir, &req.network)?;
    let Some(locked) = store.lock_existing()? else { return Ok(()) };
    let Some(bytes) = locked.store().read()? else { return Ok(()) };
    let mut state = store.parse(&bytes)?;
    let released = state.release(&req.container_id, &req.ifname);
    if released.is_empty() {
        log::debug!("DEL {} {}: holds no address", req.container_id, req.ifname);
        return Ok(());
    }
    adopt(&mut state, &conf.sets);
    locked.write(&state)?;
    drop(locked);
    let addresses: Vec<IpAddr> = released.iter().map(|a| a.address).collect();
    record_events(&conf, true, addresses.iter().copied());
    log::info!("DEL {} {}: released {}", req.container_id, req.ifname, list(&addresses));
    Ok(())
}

fn check(req: &Request) -> Result<(), IpamError> {
    let conf = IpamConfig::from_request(req)?;
    let store = Store::for_this_boot(&conf.data_dir, &req.network)?;
    let state = store.load_owned()?;
    let who = format!("container {} ifname {}", req.container_id, req.ifname);
    let held = state.held_by(&req.container_id, &req.ifname);
    if held.is_empty() {
        return Err(IpamError::Check(format!("{who} holds no address in network {}", req.network)));
    }
    for (i, set) in conf.sets.iter().enumerate() {
        if !held.iter().any(|a| set.range_of(*a).is_some()) {
            return Err(IpamError::Check(format!("{who} holds no address from range set {i} ({})", set.describe())));
        }
    }
    let prev = req.prev_result().map_err(|e| IpamError::Decode(e.msg))?;
    if let Some(prev) = prev.filter(|p| !p.ips.is_empty()) {
        let reported: Vec<IpAddr> = prev.ips.iter().map(|ip| ip.address.ip()).collect();
        if let Some(missing) = held.iter().find(|a| !reported.contains(a)) {
            return Err(IpamError::Check(format!("{who} holds {missing}, which prevResult does not list")));
        }
        if let Some(stray) = reported.iter().find(|a| conf.set_of(**a).is_some() && !held.contains(a)) {
            return Err(IpamError::Check(format!("prevResult lists {stray}, but {who} holds {}", list(&held))));
        }
    }
    Ok(())
}

/// Cheap by design (containerd asks every few seconds): reads the header of the state, never
/// takes the lock, and verifies the whole file only while it is small.
fn status(req: &Request) -> Result<(), IpamError> {
    let conf = IpamConfig::from_request(req)?;
    if conf.sets.is_empty() {
        return Err(IpamError::Config("ipam needs \"subnet\" or \"ranges\" to allocate from".into()));
    }
    let unavailable = |e: StoreError| IpamError::Unavailable(format!("the IPAM store is unusable: {e}"));
    let store = Store::for_this_boot(&conf.data_dir, &req.network).map_err(unavailable)?;
    let header = store.read_header().map_err(unavailable)?;
    if let Some(problem) = store.write_problem(header.as_ref().map(|(_, len)| *len).unwrap_or(0)) {
        return Err(IpamError::Unavailable(format!(
            "the IPAM store {} cannot be written: {problem}",
            store.dir().display()
        )));
    }
    let Some((header, _)) = header else { return Ok(()) };
    // Counts come from the header when it describes the same sets; otherwise they are counted.
    let counted =
        if conf.sets.iter().zip(&header.sets).all(|(c, h)| *c == h.spec) && conf.sets.len() <= header.sets.len() {
            None
        } else {
            Some(store.load_owned().map_err(unavailable)?)
        };
    for (i, set) in conf.sets.iter().enumerate() {
        let pool = set.pool();
        let used = match &counted {
            None => header.sets[i].used,
            Some(state) => pool.used_count(state.used(set.family())),
        };
        if used >= pool.capacity() {
            return Err(IpamError::Unavailable(format!(
                "range set {i} ({}) is exhausted: all {} addresses are in use",
                set.describe(),
                pool.capacity()
            )));
        }
    }
    Ok(())
}

fn gc(req: &Request) -> Result<(), IpamError> {
    let conf = IpamConfig::from_request(req)?;
    let valid: HashSet<(String, String)> = req
        .valid_attachments()
        .map_err(|e| IpamError::Config(e.msg))?
        .into_iter()
        .map(|a| (a.container_id, a.ifname))
        .collect();
    let store = Store::for_this_boot(&conf.data_dir, &req.network)?;
    let Some(locked) = store.lock_existing()? else { return Ok(()) };
    let Some(bytes) = locked.store().read()? else { return Ok(()) };
    let mut state = store.parse(&bytes)?;
    let released = state.retain(|a| valid.contains(&(a.container_id.clone(), a.ifname.clone())));
    if released.is_empty() {
        return Ok(());
    }
    adopt(&mut state, &conf.sets);
    locked.write(&state)?;
    drop(locked);
    record_events(&conf, true, released.iter().map(|a| a.address));
    for a in &released {
        log::info!("GC released {} of {} {} (no longer a valid attachment)", a.address, a.container_id, a.ifname);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
