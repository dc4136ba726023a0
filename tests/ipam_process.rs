//! headcni-ipam as runtimes use it: the built binary exec'd through a `headcni-ipam` symlink,
//! many processes at once, killed mid-flight, on damaged, read-only and full data directories;
//! and the `headcni ipam` commands on the store those processes wrote.

use headcni::ipam::state::{Allocation, State};
use headcni::ipam::store::Store;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The many-process tests share two cores; running them one at a time keeps each fast and
/// their timing meaningful.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const NET: &str = "net";

struct Ipam {
    tmp: tempfile::TempDir,
    exe: PathBuf,
}

#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    json: Value,
    stderr: String,
}

impl Outcome {
    fn from(out: Output) -> Self {
        let json = if out.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad stdout {:?}: {e}", out.stdout))
        };
        Self { code: out.status.code(), json, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
    }

    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn address(&self) -> String {
        assert!(self.ok(), "{:?} {}\nstderr: {}", self.code, self.json, self.stderr);
        self.json["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string()
    }

    fn assert_error(&self, code: u64, needle: &str) {
        assert_eq!(self.code, Some(1), "{self:?}");
        assert_eq!(self.json["code"], code, "{self:?}");
        let msg = self.json["msg"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
}

impl Ipam {
    fn new() -> Self {
        Self::in_dir(tempfile::tempdir().unwrap())
    }

    fn in_dir(tmp: tempfile::TempDir) -> Self {
        let bin = tmp.path().join("bin");
        for d in ["bin", "run", "netns"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let exe = bin.join("headcni-ipam");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_headcni"), &exe).unwrap();
        Self { tmp, exe }
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("run")
    }

    fn store(&self) -> Store {
        Store::for_this_boot(&self.data_dir(), NET).unwrap()
    }

    fn state(&self) -> State<'static> {
        self.store().load_owned().unwrap()
    }

    fn conf(&self, ipam: Value) -> String {
        let mut block = json!({"type": "headcni-ipam", "subnet": "10.20.0.0/16", "dataDir": self.data_dir()});
        for (k, v) in ipam.as_object().unwrap() {
            block[k] = v.clone();
        }
        json!({"cniVersion": "1.1.0", "name": NET, "run_dir": self.run_dir(),
               "log_file": self.tmp.path().join("ipam.log"), "ipam": block})
        .to_string()
    }

    fn netns_path(&self, cid: &str) -> PathBuf {
        self.tmp.path().join("netns").join(cid)
    }

    fn spawn(&self, verb: &str, cid: &str, conf: &str) -> Child {
        let mut cmd = Command::new(&self.exe);
        cmd.env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_PATH", self.exe.parent().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !cid.is_empty() {
            cmd.env("CNI_CONTAINERID", cid)
                .env("CNI_IFNAME", "eth0")
                .env("CNI_NETNS", self.netns_path(cid))
                .env("CNI_ARGS", format!("K8S_POD_NAMESPACE=test;K8S_POD_NAME=pod-{cid}"));
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
        child
    }

    fn run(&self, verb: &str, cid: &str, conf: &str) -> Outcome {
        Outcome::from(self.spawn(verb, cid, conf).wait_with_output().unwrap())
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_headcni"))
            .arg("ipam")
            .args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .env_remove("CNI_COMMAND")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Only the store's own files (no temporary files of dead writers).
    fn dir_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.store().dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn spool_lines(&self) -> Vec<String> {
        fs::read_to_string(self.run_dir().join("events")).unwrap_or_default().lines().map(String::from).collect()
    }
}

fn held(state: &State<'_>) -> HashMap<String, Vec<IpAddr>> {
    let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for a in state.allocations() {
        map.entry(a.container_id).or_default().push(a.address);
    }
    map
}

/// Writes `count` allocations (containers `pre0..`) straight through the store API.
fn preload(ipam: &Ipam, count: u32) {
    let store = ipam.store();
    let locked = store.lock_creating().unwrap();
    let mut state = State::new(store.boot_id());
    for i in 0..count {
        let a = Allocation {
            address: IpAddr::V4(Ipv4Addr::from(0x0a14_0000 + 256 + i)),
            container_id: format!("pre{i}"),
            ifname: "eth0".into(),
            allocated_at: 1,
            pod_namespace: "pre".into(),
            pod_name: format!("pre-{i}"),
            netns: format!("/var/run/netns/pre-{i}"),
        };
        assert!(state.insert(&a));
    }
    locked.write(&state).unwrap();
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn parallel_adds_get_distinct_addresses_and_parallel_dels_empty_the_store() {
    let _serial = heavy();
    let ipam = Ipam::new();
    let conf = ipam.conf(json!({}));
    let cids: Vec<String> = (0..200).map(|i| format!("par{i:03}")).collect();

    let children: Vec<Child> = cids.iter().map(|c| ipam.spawn("ADD", c, &conf)).collect();
    let outcomes: Vec<Outcome> = children.into_iter().map(|c| Outcome::from(c.wait_with_output().unwrap())).collect();
    let addresses: HashSet<String> = outcomes.iter().map(Outcome::address).collect();
    assert_eq!(addresses.len(), 200, "200 ADD processes, 200 distinct addresses");
    let state = ipam.state();
    assert_eq!(state.len(), 200);
    let by_cid = held(&state);
    for (cid, out) in cids.iter().zip(&outcomes) {
        assert_eq!(by_cid[cid], vec![out.address().parse::<IpAddr>().unwrap()], "{cid}");
    }
    assert_eq!(ipam.spool_lines().iter().filter(|l| *l == "alloc 4").count(), 200);

    let children: Vec<Child> = cids.iter().map(|c| ipam.spawn("DEL", c, &conf)).collect();
    for child in children {
        let out = Outcome::from(child.wait_with_output().unwrap());
        assert!(out.ok(), "{out:?}");
    }
    assert!(ipam.state().is_empty(), "200 DEL processes leave the store empty");
    assert_eq!(ipam.spool_lines().iter().filter(|l| *l == "release 4").count(), 200);
    assert_eq!(ipam.dir_entries(), vec!["lock".to_string(), format!("state.{}", ipam.store().boot_id())]);
}

/// A tiny deterministic generator, so that a failing storm can be replayed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn a_storm_of_mixed_operations_ends_consistent() {
    let _serial = heavy();
    let ipam = std::sync::Arc::new(Ipam::new());
    // Random allocation in a /24 that the storm nearly fills: collisions are likely if anything races.
    let conf = std::sync::Arc::new(ipam.conf(json!({"subnet": "10.20.0.0/24", "allocation_strategy": "random"})));
    let workers: Vec<_> = (0..20u64)
        .map(|w| {
            let ipam = ipam.clone();
            let conf = conf.clone();
            std::thread::spawn(move || {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
                let mut model: HashMap<String, Option<String>> = (0..10).map(|c| (format!("w{w}c{c}"), None)).collect();
                for _ in 0..50 {
                    let cid = format!("w{w}c{}", rng.below(10));
                    match rng.below(10) {
                        0..6 => {
                            let addr = ipam.run("ADD", &cid, &conf).address();
                            let slot = model.get_mut(&cid).unwrap();
                            if let Some(held) = slot {
                                assert_eq!(*held, addr, "a repeated ADD returns the held address");
                            }
                            *slot = Some(addr);
                        }
                        6..9 => {
                            let out = ipam.run("DEL", &cid, &conf);
                            assert!(out.ok(), "{out:?}");
                            model.insert(cid, None);
                        }
                        _ => {
                            let out = ipam.run("CHECK", &cid, &conf);
                            assert_eq!(out.ok(), model[&cid].is_some(), "{out:?}");
                        }
                    }
                }
                model
            })
        })
        .collect();
    let mut expected: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for w in workers {
        for (cid, addr) in w.join().unwrap() {
            if let Some(a) = addr {
                expected.insert(cid, vec![a.parse().unwrap()]);
            }
        }
    }
    let state = ipam.state();
    assert_eq!(held(&state), expected, "the store is exactly what the 1,000 operations left");
    let lines = ipam.spool_lines();
    let allocs = lines.iter().filter(|l| *l == "alloc 4").count();
    let releases = lines.iter().filter(|l| *l == "release 4").count();
    assert_eq!(allocs - releases, state.len(), "every allocation and release was reported once");
}

/// Spawns an ADD for each of `cids` and SIGKILLs some of them; returns the addresses of the
/// ADDs that completed. `calibrated`: one process at a time, each killed at a random instant of
/// its own lifetime (so kills land in every phase, the write included); otherwise all at once
/// with kills spread over the queue.
fn adds_under_fire(
    ipam: &Ipam,
    conf: &str,
    cids: &[String],
    rng: &mut XorShift,
    lifetime: Duration,
    calibrated: bool,
) -> HashMap<String, IpAddr> {
    let mut finished = Vec::new();
    if calibrated {
        for cid in cids {
            let mut child = ipam.spawn("ADD", cid, conf);
            if rng.below(4) != 0 {
                std::thread::sleep(lifetime.mul_f64(rng.below(1000) as f64 / 1000.0));
                let _ = child.kill();
            }
            finished.push((cid.clone(), child));
        }
    } else {
        let mut children: Vec<(String, Child)> = cids.iter().map(|c| (c.clone(), ipam.spawn("ADD", c, conf))).collect();
        for (_, child) in children.iter_mut() {
            if rng.below(2) == 0 {
                std::thread::sleep(lifetime.mul_f64(rng.below(1000) as f64 / 1000.0));
                let _ = child.kill();
            }
        }
        finished = children;
    }
    let mut succeeded = HashMap::new();
    for (cid, child) in finished {
        let out = Outcome::from(child.wait_with_output().unwrap());
        if out.ok() {
            succeeded.insert(cid, out.address().parse().unwrap());
        } else {
            assert_eq!(out.code, None, "only killed processes fail: {out:?}");
        }
    }
    succeeded
}

#[test]
fn sigkill_mid_flight_leaves_nothing_del_and_gc_cannot_reclaim() {
    let _serial = heavy();
    let ipam = Ipam::new();
    // Thousands of records make each write long enough for kills to land inside it.
    const PRELOADED: usize = 20_000;
    preload(&ipam, PRELOADED as u32);
    let conf = ipam.conf(json!({}));
    let started = std::time::Instant::now();
    let probe = ipam.run("ADD", "probe", &conf).address();
    let lifetime = started.elapsed();
    assert!(ipam.run("DEL", "probe", &conf).ok(), "{probe}");
    // Readers take no lock: they must still never see anything but a whole state.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, stop) = (ipam.store(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Err(e) = store.read_header() {
                    return Err(format!("after {reads} clean reads: {e}"));
                }
                reads += 1;
            }
            Ok(reads)
        })
    };
    let mut rng = XorShift(0x5EED);
    let mut leftovers_seen = 0;
    for (round, calibrated) in [(0, true), (1, false), (2, true)] {
        let cids: Vec<String> = (0..30).map(|i| format!("k{round}x{i}")).collect();
        let succeeded = adds_under_fire(&ipam, &conf, &cids, &mut rng, lifetime, calibrated);
        leftovers_seen += ipam.dir_entries().iter().filter(|n| n.contains(".tmp.")).count();

        // Whatever was killed, the state is whole, unique, and holds every returned address.
        let state = ipam.state();
        let by_cid = held(&state);
        for (cid, addr) in &succeeded {
            assert_eq!(by_cid[cid], vec![*addr], "an ADD that returned is never lost");
        }
        for cid in &cids {
            assert!(by_cid.get(cid).is_none_or(|a| a.len() == 1), "{cid} holds {:?}", by_cid.get(cid));
        }
        assert_eq!(state.len(), PRELOADED + by_cid.keys().filter(|c| c.starts_with('k')).count());

        // GC with the attachments that really exist reclaims what killed ADDs committed.
        let mut valid: Vec<Value> =
            (0..PRELOADED).map(|i| json!({"containerID": format!("pre{i}"), "ifname": "eth0"})).collect();
        valid.extend(succeeded.keys().map(|c| json!({"containerID": c, "ifname": "eth0"})));
        let mut gc_conf: Value = serde_json::from_str(&conf).unwrap();
        gc_conf["cni.dev/valid-attachments"] = Value::Array(valid);
        assert!(ipam.run("GC", "", &gc_conf.to_string()).ok());
        assert_eq!(ipam.state().len(), PRELOADED + succeeded.len());
        assert!(!ipam.dir_entries().iter().any(|n| n.contains(".tmp.")), "the next writer removed temp files");

        // And DEL (the runtime's answer to a failed ADD) reclaims the rest.
        for cid in &cids {
            assert!(ipam.run("DEL", cid, &conf).ok());
        }
        assert_eq!(ipam.state().len(), PRELOADED);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap().unwrap();
    assert!(reads > 100, "the reader ran {reads} times");
    eprintln!("one ADD took {lifetime:?}; {reads} lock-free reads; temporary files seen: {leftovers_seen}");
}

#[test]
fn damaged_state_files_are_refused_then_repaired() {
    let ipam = Ipam::new();
    let conf = ipam.conf(json!({"subnet": "10.20.0.0/24"}));
    let first: Vec<String> = (0..5).map(|i| ipam.run("ADD", &format!("d{i}"), &conf).address()).collect();
    let path = ipam.store().state_path();
    let good = fs::read(&path).unwrap();
    let repair_hint = format!("headcni ipam repair --network net --data-dir {}", ipam.data_dir().display());

    // Truncated: refused with the file and the command named, file untouched.
    let truncated = &good[..good.len() * 2 / 3];
    fs::write(&path, truncated).unwrap();
    let out = ipam.run("ADD", "new", &conf);
    out.assert_error(5, &path.display().to_string());
    out.assert_error(5, &repair_hint);
    ipam.run("STATUS", "", &conf).assert_error(50, &repair_hint);
    assert_eq!(fs::read(&path).unwrap(), truncated);
    let (code, stdout, stderr) = ipam.cli(&["stats"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("damaged"), "{stderr}");

    // Repair keeps every record it can read and a copy of the damaged file.
    let (code, stdout, _) = ipam.cli(&["repair", "--network", NET]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("repaired"), "{stdout}");
    let copies: Vec<String> = ipam.dir_entries().into_iter().filter(|n| n.starts_with("corrupt.")).collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(fs::read(ipam.store().dir().join(&copies[0])).unwrap(), truncated);
    let salvaged: HashSet<String> = ipam.state().allocations().map(|a| a.address.to_string()).collect();
    assert!(!salvaged.is_empty() && salvaged.iter().all(|a| first.contains(a)), "{salvaged:?}");
    let next = ipam.run("ADD", "new", &conf).address();
    assert!(!salvaged.contains(&next), "salvaged addresses are not handed out again");
    let (_, stdout, _) = ipam.cli(&["repair"]);
    assert!(stdout.contains("intact"), "{stdout}");

    // Garbage: the same, and repair starts over from nothing it cannot read.
    fs::write(&path, b"\x00\x01garbage\nip not-an-address\n\xff\xfe").unwrap();
    ipam.run("DEL", "d0", &conf).assert_error(5, "damaged");
    let (code, stdout, _) = ipam.cli(&["repair", "--json"]);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["networks"][0]["outcome"], "repaired");
    assert_eq!(report["networks"][0]["kept"], 0);
    assert!(ipam.run("ADD", "after", &conf).ok());
}

#[test]
fn cli_reports_what_the_plugin_wrote_and_gc_reclaims_dead_namespaces() {
    let ipam = Ipam::new();
    let conf = ipam
        .conf(json!({"ranges": [[{"subnet": "10.20.0.0/24", "rangeStart": "10.20.0.10", "rangeEnd": "10.20.0.19"}],
        [{"subnet": "fd00:20::/64"}]], "subnet": null, "exclude": ["10.20.0.12"]}));
    for cid in ["alive", "dead1", "dead2"] {
        assert!(ipam.run("ADD", cid, &conf).ok());
    }
    fs::write(ipam.netns_path("alive"), b"").unwrap();

    let (code, stdout, stderr) = ipam.cli(&["stats", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let stats: Value = serde_json::from_str(&stdout).unwrap();
    let net = &stats["networks"][0];
    assert_eq!(net["network"], NET);
    assert_eq!(net["sets"][0]["total"], 9, "10 addresses minus the excluded one");
    assert_eq!(net["sets"][0]["used"], 3);
    assert_eq!(net["sets"][0]["ranges"][0]["free"], 6);
    assert_eq!(net["sets"][1]["total"].as_u64(), Some(u64::MAX - 1), "a /64 without its network and gateway addresses");
    assert_eq!((net["used"].as_u64(), net["allocations"].as_u64()), (Some(6), Some(6)));
    let (_, text, _) = ipam.cli(&["stats"]);
    assert!(text.contains("set 0  total 9  used 3  free 6"), "{text}");

    let (_, listing, _) = ipam.cli(&["list", "--network", NET]);
    assert!(listing.contains("test/pod-dead1") && listing.contains("fd00:20::"), "{listing}");
    let (_, listing, _) = ipam.cli(&["list", "--json"]);
    let rows: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(rows["allocations"].as_array().unwrap().len(), 6);

    let (code, dry, _) = ipam.cli(&["gc", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(dry.contains("would release 4 allocation(s)"), "{dry}");
    assert_eq!(ipam.state().len(), 6, "a dry run changes nothing");
    let (_, done, _) = ipam.cli(&["gc"]);
    assert!(done.contains("released 4 allocation(s)"), "{done}");
    let left: Vec<String> = ipam.state().allocations().map(|a| a.container_id).collect();
    assert_eq!(left, ["alive", "alive"]);
    assert_eq!(ipam.spool_lines().iter().filter(|l| l.starts_with("release")).count(), 4);
}

/// Runs `body` in a thread with a private mount namespace, so that test mounts are invisible to
/// the rest of the machine and vanish with the thread.
fn in_private_mounts(body: impl FnOnce() + Send + 'static) -> bool {
    if !is_root() {
        eprintln!("test skipped, requires root");
        return false;
    }
    std::thread::spawn(move || {
        // SAFETY: only the mount namespace (and with it the fs attributes) of this thread change;
        // no file descriptors are unshared.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.unwrap();
        sh("mount --make-rprivate /");
        body();
    })
    .join()
    .unwrap();
    true
}

fn sh(script: &str) {
    let status = Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(status.success(), "{script}");
}

#[test]
fn a_read_only_data_dir_is_an_io_error_and_a_status_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    in_private_mounts(move || {
        let ipam = Ipam::in_dir(tempfile::tempdir_in(&root).unwrap());
        let conf = ipam.conf(json!({}));
        let addr = ipam.run("ADD", "a", &conf).address();
        let before = fs::read(ipam.store().state_path()).unwrap();
        let data = ipam.data_dir().display().to_string();
        sh(&format!("mount --bind {data} {data} && mount -o remount,ro,bind {data}"));
        ipam.run("ADD", "b", &conf).assert_error(5, "Read-only file system");
        ipam.run("DEL", "a", &conf).assert_error(5, "Read-only file system");
        ipam.run("STATUS", "", &conf).assert_error(50, "cannot be written");
        assert_eq!(fs::read(ipam.store().state_path()).unwrap(), before);
        sh(&format!("umount {data}"));
        assert_eq!(ipam.run("ADD", "a", &conf).address(), addr);
    });
}

#[test]
fn a_full_data_dir_is_an_io_error_and_keeps_the_old_state() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    in_private_mounts(move || {
        let ipam = Ipam::in_dir(tempfile::tempdir_in(&root).unwrap());
        let data = ipam.data_dir();
        fs::create_dir_all(&data).unwrap();
        sh(&format!("mount -t tmpfs -o size=64k tmpfs {}", data.display()));
        let conf = ipam.conf(json!({}));
        for i in 0..20 {
            assert!(ipam.run("ADD", &format!("f{i}"), &conf).ok());
        }
        let path = ipam.store().state_path();
        let before = fs::read(&path).unwrap();
        // Fill the file system to the last byte.
        let _ = Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}/filler", data.display()))
            .arg("bs=4k")
            .stderr(Stdio::null())
            .status();
        ipam.run("ADD", "one-more", &conf).assert_error(5, "No space left on device");
        ipam.run("DEL", "f3", &conf).assert_error(5, "No space left on device");
        ipam.run("STATUS", "", &conf).assert_error(50, "bytes free");
        assert_eq!(fs::read(&path).unwrap(), before, "the previous state is intact");
        assert!(!ipam.dir_entries().iter().any(|n| n.contains(".tmp.")), "no half-written file stays");
        fs::remove_file(data.join("filler")).unwrap();
        assert!(ipam.run("ADD", "one-more", &conf).ok());
        assert_eq!(ipam.state().len(), 21);
        sh(&format!("umount {}", data.display()));
    });
}

#[test]
fn status_and_version_answer_through_the_symlink() {
    let ipam = Ipam::new();
    let out = ipam.run("VERSION", "", "{\"cniVersion\":\"1.1.0\"}");
    assert!(out.json["supportedVersions"].as_array().unwrap().contains(&json!("1.1.0")));
    assert!(ipam.run("STATUS", "", &ipam.conf(json!({}))).ok());
    assert!(!Path::new(&ipam.data_dir()).exists(), "STATUS creates nothing");
}
