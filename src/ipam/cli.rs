//! `headcni ipam stats|list|gc|repair`: the operator's view of the store the plugin writes.
//! Reads take no lock (like STATUS); `gc` and `repair` take the same exclusive lock as the
//! plugin, so they are safe on a live node.

use super::config::DEFAULT_DATA_DIR;
use super::state::{self, Allocation, State};
use super::store::{self, Store, StoreError};
use crate::events::{self, Event};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::io::{self, Write};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct IpamArgs {
    #[command(subcommand)]
    pub command: IpamCommand,
    /// Parent directory of the per-network stores (the `dataDir` of the ipam config).
    #[arg(long, global = true, env = "HEADCNI_IPAM_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Only this network (default: every network found under the data directory).
    #[arg(long, global = true)]
    pub network: Option<String>,
    /// Machine-readable output (JSON).
    #[arg(long, global = true)]
    pub json: bool,
    /// Where release events for the agent's metrics are recorded.
    #[arg(long, global = true, env = "HEADCNI_RUN_DIR", default_value = crate::nodefile::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum IpamCommand {
    /// Addresses in total, in use and free, per range, per range set and per network.
    Stats,
    /// Who holds which address: container, interface, pod, network namespace, age.
    List,
    /// Release allocations whose network namespace no longer exists.
    Gc {
        /// Only show what would be released.
        #[arg(long)]
        dry_run: bool,
    },
    /// Salvage the valid records of a damaged state file, keeping a copy of the damaged file.
    Repair,
}

/// Runs an `ipam` subcommand and returns the exit code.
pub fn run(args: &IpamArgs) -> i32 {
    crate::logging::init_stderr("ipam", "warn");
    let stores = match stores(args) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let outcome = match args.command {
        IpamCommand::Stats => stats(args, &stores),
        IpamCommand::List => list(args, &stores),
        IpamCommand::Gc { dry_run } => gc(args, &stores, dry_run),
        IpamCommand::Repair => repair(args, &stores),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
}

fn fail(e: &dyn std::fmt::Display) -> i32 {
    crate::logging::fatal("ipam", e);
    crate::cli::exit::FAILED
}

fn stores(args: &IpamArgs) -> Result<Vec<Store>, StoreError> {
    let names = match &args.network {
        Some(n) => vec![n.clone()],
        None => store::networks(&args.data_dir)?,
    };
    names.iter().map(|n| Store::for_this_boot(&args.data_dir, n)).collect()
}

/// JSON output wrappers. Typed rather than `json!` because counts are u128 (an IPv6 /64 holds
/// 2^64 addresses) and serde_json::Value cannot hold numbers beyond u64.
#[derive(Debug, Serialize)]
struct Networks<T> {
    networks: Vec<T>,
}

#[derive(Debug, Serialize)]
struct Allocations<'a> {
    allocations: Vec<&'a Row>,
}

fn emit_json(value: &impl Serialize) -> Result<i32, CliError> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(io::Error::from)?;
    writeln!(out)?;
    Ok(0)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Counts {
    total: u128,
    used: u128,
    free: u128,
}

impl Counts {
    fn new(total: u128, used: u128) -> Self {
        Self { total, used, free: total.saturating_sub(used) }
    }

    fn text(&self) -> String {
        format!("total {}  used {}  free {}", self.total, self.used, self.free)
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RangeStats {
    subnet: String,
    range_start: String,
    range_end: String,
    gateway: Option<String>,
    #[serde(flatten)]
    counts: Counts,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SetStats {
    set: usize,
    ranges: Vec<RangeStats>,
    excluded: Vec<String>,
    #[serde(flatten)]
    counts: Counts,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct NetworkStats {
    network: String,
    dir: String,
    boot_id: String,
    /// Records in the store, including any outside today's ranges.
    allocations: usize,
    sets: Vec<SetStats>,
    #[serde(flatten)]
    counts: Counts,
}

fn network_stats(store: &Store, state: &State<'_>) -> NetworkStats {
    let mut sets = Vec::new();
    let (mut total, mut used) = (0u128, 0u128);
    for (i, set) in state.sets.iter().enumerate() {
        let in_use = state.used(set.spec.family());
        let ranges = set
            .spec
            .ranges
            .iter()
            .map(|r| {
                let pool = r.pool(&set.spec.excludes);
                RangeStats {
                    subnet: r.subnet.to_string(),
                    range_start: r.start.to_string(),
                    range_end: r.end.to_string(),
                    gateway: r.gateway.map(|g| g.to_string()),
                    counts: Counts::new(pool.capacity(), pool.used_count(in_use)),
                }
            })
            .collect();
        let pool = set.spec.pool();
        let counts = Counts::new(pool.capacity(), pool.used_count(in_use));
        total = total.saturating_add(counts.total);
        used += counts.used;
        sets.push(SetStats {
            set: i,
            ranges,
            excluded: set.spec.excludes.iter().map(ToString::to_string).collect(),
            counts,
        });
    }
    NetworkStats {
        network: store.network().to_string(),
        dir: store.dir().display().to_string(),
        boot_id: store.boot_id().to_string(),
        allocations: state.len(),
        sets,
        counts: Counts::new(total, used),
    }
}

fn stats(args: &IpamArgs, stores: &[Store]) -> Result<i32, CliError> {
    let mut all = Vec::new();
    for store in stores {
        let state = store.load_owned()?;
        all.push(network_stats(store, &state));
    }
    if args.json {
        return emit_json(&Networks { networks: all });
    }
    let mut out = io::stdout().lock();
    if all.is_empty() {
        writeln!(out, "no IPAM store under {}", args.data_dir.display())?;
    }
    for n in &all {
        writeln!(out, "network {}  ({}, boot {})", n.network, n.dir, n.boot_id)?;
        if n.sets.is_empty() {
            writeln!(out, "  no range recorded yet ({} allocations)", n.allocations)?;
            continue;
        }
        for s in &n.sets {
            writeln!(out, "  set {}  {}", s.set, s.counts.text())?;
            for r in &s.ranges {
                let gw = r.gateway.as_deref().unwrap_or("-");
                writeln!(
                    out,
                    "    {}  {}-{}  gateway {gw}  {}",
                    r.subnet,
                    r.range_start,
                    r.range_end,
                    r.counts.text()
                )?;
            }
            if !s.excluded.is_empty() {
                writeln!(out, "    excluded {}", s.excluded.join(" "))?;
            }
        }
        writeln!(out, "  network {}  ({} allocations)", n.counts.text(), n.allocations)?;
    }
    Ok(0)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    network: String,
    address: String,
    container_id: String,
    ifname: String,
    pod_namespace: String,
    pod_name: String,
    netns: String,
    allocated_at: u64,
}

impl Row {
    fn new(network: &str, a: &Allocation) -> Self {
        Self {
            network: network.to_string(),
            address: a.address.to_string(),
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            pod_namespace: a.pod_namespace.clone(),
            pod_name: a.pod_name.clone(),
            netns: a.netns.clone(),
            allocated_at: a.allocated_at,
        }
    }
}

fn age(since: u64) -> String {
    let now = super::entropy::unix_now();
    let s = now.saturating_sub(since);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn list(args: &IpamArgs, stores: &[Store]) -> Result<i32, CliError> {
    let mut rows = Vec::new();
    for store in stores {
        let state = store.load_owned()?;
        rows.extend(state.allocations().map(|a| (Row::new(store.network(), &a), a)));
    }
    if args.json {
        let rows: Vec<&Row> = rows.iter().map(|(r, _)| r).collect();
        return emit_json(&Allocations { allocations: rows });
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{:<12} {:<39} {:<14} {:<8} {:<40} {:<6} NETNS",
        "NETWORK", "ADDRESS", "CONTAINER", "IFNAME", "POD", "AGE"
    )?;
    for (row, a) in &rows {
        let cid: String = row.container_id.chars().take(13).collect();
        writeln!(
            out,
            "{:<12} {:<39} {:<14} {:<8} {:<40} {:<6} {}",
            row.network,
            row.address,
            cid,
            row.ifname,
            a.pod(),
            age(row.allocated_at),
            or_dash(&row.netns)
        )?;
    }
    Ok(0)
}

/// The kernel's fixed inode number of the initial PID namespace (PROC_PID_INIT_INO).
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

fn in_initial_pid_namespace() -> bool {
    std::fs::read_link("/proc/self/ns/pid").is_ok_and(|link| link.as_os_str() == INITIAL_PID_NAMESPACE)
}

/// Whether the network namespace an allocation was made for is gone. Only a path that is
/// missing where this process can judge counts: a process's namespace (`/proc/<pid>/ns/net`)
/// only when this process is in the node's PID namespace, a bind-mounted one
/// (`/var/run/netns/<name>`) only when its directory is visible here. Anything else (no path
/// recorded, no permission, a directory this process does not see) keeps the allocation:
/// releasing a live pod's address is far worse than keeping a dead one's a little longer.
pub fn netns_gone(netns: &str) -> bool {
    if netns.is_empty() {
        return false;
    }
    let path = std::path::Path::new(netns);
    match std::fs::symlink_metadata(path) {
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {}
        _ => return false,
    }
    if netns.starts_with("/proc/") {
        return in_initial_pid_namespace();
    }
    path.parent().is_some_and(|dir| dir.is_dir())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GcReport {
    network: String,
    dry_run: bool,
    released: Vec<Row>,
}

fn gc(args: &IpamArgs, stores: &[Store], dry_run: bool) -> Result<i32, CliError> {
    let mut reports = Vec::new();
    for store in stores {
        let Some(locked) = store.lock_existing()? else { continue };
        let Some(bytes) = store.read()? else { continue };
        let mut state = store.parse(&bytes)?;
        let released = state.retain(|a| !netns_gone(&a.netns));
        if !dry_run && !released.is_empty() {
            locked.write(&state)?;
            let evs: Vec<Event> = released.iter().map(|a| Event::IpReleased { ipv6: a.address.is_ipv6() }).collect();
            events::record(&args.run_dir, &evs);
        }
        drop(locked);
        reports.push(GcReport {
            network: store.network().to_string(),
            dry_run,
            released: released.iter().map(|a| Row::new(store.network(), a)).collect(),
        });
    }
    if args.json {
        return emit_json(&Networks { networks: reports });
    }
    let mut out = io::stdout().lock();
    let verb = if dry_run { "would release" } else { "released" };
    let mut total = 0;
    for r in &reports {
        for row in &r.released {
            writeln!(
                out,
                "{}: {verb} {} (container {} {}, pod {}/{}): netns {} is gone",
                r.network,
                row.address,
                row.container_id,
                row.ifname,
                or_dash(&row.pod_namespace),
                or_dash(&row.pod_name),
                row.netns
            )?;
        }
        total += r.released.len();
    }
    writeln!(out, "{verb} {total} allocation(s) in {} network(s)", reports.len())?;
    Ok(0)
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RepairReport {
    network: String,
    outcome: &'static str,
    kept: usize,
    dropped: Vec<String>,
    damaged_copy: Option<String>,
}

fn repair_one(store: &Store) -> Result<RepairReport, CliError> {
    let mut report = RepairReport {
        network: store.network().to_string(),
        outcome: "nothing stored",
        kept: 0,
        dropped: Vec::new(),
        damaged_copy: None,
    };
    let Some(locked) = store.lock_existing()? else { return Ok(report) };
    let Some(bytes) = store.read()? else { return Ok(report) };
    match store.parse(&bytes) {
        Ok(state) => {
            report.outcome = "intact";
            report.kept = state.len();
            return Ok(report);
        }
        Err(e @ StoreError::NewerFormat { .. }) => return Err(e.into()),
        Err(_) => {}
    }
    let salvaged = state::salvage(&bytes, store.boot_id());
    let copy = locked.set_aside()?;
    locked.write(&salvaged.state)?;
    report.outcome = "repaired";
    report.kept = salvaged.state.len();
    report.dropped = salvaged.dropped.iter().map(|(line, why)| format!("line {line}: {why}")).collect();
    report.damaged_copy = Some(copy.display().to_string());
    Ok(report)
}

fn repair(args: &IpamArgs, stores: &[Store]) -> Result<i32, CliError> {
    let reports = stores.iter().map(repair_one).collect::<Result<Vec<_>, _>>()?;
    if args.json {
        return emit_json(&Networks { networks: reports });
    }
    let mut out = io::stdout().lock();
    for r in &reports {
        match r.outcome {
            "repaired" => {
                writeln!(
                    out,
                    "{}: repaired: kept {} allocation(s), dropped {} line(s); damaged file kept as {}",
                    r.network,
                    r.kept,
                    r.dropped.len(),
                    r.damaged_copy.as_deref().unwrap_or("-")
                )?;
                for d in &r.dropped {
                    writeln!(out, "  dropped {d}")?;
                }
                if !r.dropped.is_empty() {
                    writeln!(
                        out,
                        "  the addresses of dropped lines may be handed out again: compare with `headcni ipam list` and the pods on this node"
                    )?;
                }
            }
            outcome => writeln!(out, "{}: {outcome} ({} allocation(s)), nothing to repair", r.network, r.kept)?,
        }
    }
    if reports.is_empty() {
        writeln!(out, "no IPAM store under {}", args.data_dir.display())?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_namespaces_missing_where_they_can_be_seen_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let alive = dir.path().join("alive");
        std::fs::write(&alive, b"").unwrap();
        assert!(!netns_gone(""));
        assert!(!netns_gone(&alive.display().to_string()));
        assert!(netns_gone(&dir.path().join("dead").display().to_string()));
        assert!(!netns_gone("/no-such-netns-dir-here/cni-1234"), "an invisible directory proves nothing");
        // A process that cannot exist: gone, if this test sees the node's PID namespace.
        assert_eq!(netns_gone("/proc/2147483647/ns/net"), in_initial_pid_namespace());
        assert!(!netns_gone("/proc/self/ns/net"));
    }
}
