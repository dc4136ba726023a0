//! Helper of bench/ipam.sh (not part of the product): builds large headcni-ipam stores through
//! the store API, and measures what an fsync would add to every state update on this disk.
//!
//! ```text
//! ipam-bench fill <data-dir> <network> <subnet> <count>
//! ipam-bench fsync <dir> <records> <iterations>
//! ipam-bench time <iterations> (--case <name> <verb> <prepare verb|-> <plugin> <conf> <container>)...
//! ```
//!
//! `time` runs whole plugin processes the way a runtime does (fork, exec, config on stdin,
//! wait) and times each one; the cases take turns within every iteration, so that a noisy
//! neighbour affects them alike. A case's prepare verb (for example the DEL that undoes the
//! timed ADD) runs untimed before each timed run.

use headcni::fsutil::{self, Durability};
use headcni::ipam::config::IpamConfig;
use headcni::ipam::state::{self, Allocation, SetState, State};
use headcni::ipam::store::Store;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn usage() -> ExitCode {
    eprintln!(
        "usage: ipam-bench fill <data-dir> <network> <subnet> <count>\n       ipam-bench fsync <dir> <records> <iterations>\n       ipam-bench time <iterations> (--case <name> <verb> <prepare verb|-> <plugin> <conf> <container>)..."
    );
    ExitCode::from(2)
}

struct Case<'a> {
    name: &'a str,
    verb: &'a str,
    prepare: Option<&'a str>,
    plugin: &'a str,
    conf: &'a str,
    container: &'a str,
    times: Vec<f64>,
}

/// Runs `plugin` for `verb` like a runtime would; returns the wall time in ms.
fn spawn_plugin(case: &Case<'_>, verb: &str) -> Result<f64, String> {
    let stdin = std::fs::File::open(case.conf).map_err(|e| format!("{}: {e}", case.conf))?;
    let dir = Path::new(case.plugin).parent().unwrap_or(Path::new("/"));
    let start = Instant::now();
    let status = std::process::Command::new(case.plugin)
        .env("CNI_COMMAND", verb)
        .env("CNI_CONTAINERID", case.container)
        .env("CNI_NETNS", format!("/var/run/netns/{}", case.container))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", dir)
        .stdin(stdin)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", case.plugin))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if !status.success() {
        return Err(format!("{} {verb} failed: {status}", case.name));
    }
    Ok(ms)
}

fn time(iterations: &str, specs: &[&str]) -> Result<(), String> {
    let iterations: usize = iterations.parse().map_err(|e| format!("iterations: {e}"))?;
    let mut cases = Vec::new();
    let mut rest = specs;
    while let ["--case", name, verb, prepare, plugin, conf, container, tail @ ..] = rest {
        let prepare = Some(*prepare).filter(|p| *p != "-");
        cases.push(Case { name, verb, prepare, plugin, conf, container, times: Vec::new() });
        rest = tail;
    }
    if cases.is_empty() || !rest.is_empty() {
        return Err("expected one or more --case <name> <verb> <prepare verb|-> <plugin> <conf> <container>".into());
    }
    let n = cases.len();
    for i in 0..iterations {
        for k in 0..n {
            let case = &mut cases[(i + k) % n];
            if let Some(prepare) = case.prepare {
                spawn_plugin(case, prepare)?;
            }
            let ms = spawn_plugin(case, case.verb)?;
            case.times.push(ms);
        }
    }
    for case in &mut cases {
        case.times.sort_by(f64::total_cmp);
        println!(
            "{} {:.3} {:.3} {}",
            case.name,
            percentile(&case.times, 0.5),
            percentile(&case.times, 0.9),
            case.times.len()
        );
    }
    Ok(())
}

/// A state with `count` allocations that look like a kubelet's: 64-hex container ids,
/// namespace and pod names, containerd-style netns paths.
fn synthetic(boot_id: &str, subnet: &str, count: usize) -> Result<State<'static>, String> {
    let conf = serde_json::json!({"ipam": {"subnet": subnet}});
    let conf = IpamConfig::parse(conf.as_object().ok_or("config")?).map_err(|e| e.to_string())?;
    let set = conf.sets.first().ok_or("no range")?.clone();
    let pool = set.pool();
    let family = set.family();
    let mut state = State::new(boot_id);
    let mut last = None;
    for i in 0..count {
        let offset = pool.nth_free(&[], i as u128).ok_or("the subnet is too small")?;
        let address = state::address(family, offset);
        let a = Allocation {
            address,
            container_id: format!("{:016x}{:016x}{:016x}{:016x}", i, i ^ 0x5a5a, i * 7919, i + 1),
            ifname: "eth0".into(),
            allocated_at: 1_764_403_200 + i as u64,
            pod_namespace: "bench".into(),
            pod_name: format!("pod-{i}-7d4b9c8f6d-x2k9p"),
            netns: format!("/var/run/netns/cni-{:08x}-{:04x}-4{:03x}-8000-{:012x}", i, i & 0xffff, i & 0xfff, i),
        };
        if !state.insert(&a) {
            return Err(format!("{address} twice"));
        }
        last = Some(address);
    }
    state.sets = vec![SetState { spec: set, last, used: 0 }];
    Ok(state)
}

fn fill(data_dir: &str, network: &str, subnet: &str, count: &str) -> Result<(), String> {
    let count: usize = count.parse().map_err(|e| format!("count: {e}"))?;
    let store = Store::for_this_boot(Path::new(data_dir), network).map_err(|e| e.to_string())?;
    let locked = store.lock_creating().map_err(|e| e.to_string())?;
    let state = synthetic(store.boot_id(), subnet, count)?;
    locked.write(&state).map_err(|e| e.to_string())?;
    let size = std::fs::metadata(store.state_path()).map_err(|e| e.to_string())?.len();
    println!("{}: {count} allocations, {size} bytes", store.state_path().display());
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Alternates atomic replacements of a `records`-record state with and without fsync (of the
/// file and its directory) and prints medians and p90s in milliseconds.
fn fsync(dir: &str, records: &str, iterations: &str) -> Result<(), String> {
    let records: usize = records.parse().map_err(|e| format!("records: {e}"))?;
    let iterations: usize = iterations.parse().map_err(|e| format!("iterations: {e}"))?;
    let boot = fsutil::boot_id().map_err(|e| e.to_string())?;
    let bytes = synthetic(&boot, "10.128.0.0/16", records)?.encode();
    let path = Path::new(dir).join("fsync-probe");
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..iterations {
        for (slot, durability) in [Durability::ProcessCrash, Durability::PowerLoss].into_iter().enumerate() {
            let start = Instant::now();
            fsutil::write_atomic(&path, &bytes, 0o600, durability).map_err(|e| e.to_string())?;
            times[slot].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let _ = std::fs::remove_file(&path);
    for (name, t) in ["rename only", "fsync file+dir"].iter().zip(times.iter_mut()) {
        t.sort_by(f64::total_cmp);
        println!(
            "{name:<15} {records} records ({} bytes): median {:.3} ms  p90 {:.3} ms  max {:.3} ms",
            bytes.len(),
            percentile(t, 0.5),
            percentile(t, 0.9),
            percentile(t, 1.0)
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args[..] {
        ["fill", data_dir, network, subnet, count] => fill(data_dir, network, subnet, count),
        ["fsync", dir, records, iterations] => fsync(dir, records, iterations),
        ["time", iterations, ref specs @ ..] => time(iterations, specs),
        _ => return usage(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ipam-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
