//! The `headcni` plugin with `headcni-ipam`: called in-process (ipam type `headcni-ipam`) and
//! exec'd like any other IPAM plugin must behave identically. Needs root: each run happens in a
//! network namespace of its own ("the host") with a pod namespace held open by a sleeping
//! process; the machine's own namespaces are never touched.

use serde_json::{Value, json};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A process holding a fresh network namespace open: the pod's sandbox.
struct PodNetns {
    child: Child,
}

impl PodNetns {
    fn new() -> Self {
        let child = Command::new("unshare").args(["-n", "sleep", "120"]).spawn().unwrap();
        let me = fs::read_link("/proc/thread-self/ns/net").unwrap();
        let path = format!("/proc/{}/ns/net", child.id());
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read_link(&path).ok().is_none_or(|ns| ns == me) {
            assert!(Instant::now() < deadline, "unshare -n did not start");
            std::thread::sleep(Duration::from_millis(2));
        }
        Self { child }
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/net", self.child.id())
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(tmp.path().join("run")).unwrap();
        let exe = bin.join("headcni-ipam");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_headcni"), &exe).unwrap();
        // Another name for the same IPAM, so that the plugin execs it instead of calling it.
        let wrapper = bin.join("exec-headcni-ipam");
        fs::write(&wrapper, format!("#!/bin/sh\nexec {} \"$@\"\n", exe.display())).unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        Self { tmp }
    }

    fn bin(&self) -> PathBuf {
        self.tmp.path().join("bin")
    }

    fn conf(&self, ipam_type: &str, data: &str, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "podnet", "type": "headcni",
            "pod_cidr": "10.77.0.0/24", "mtu": 1400,
            "run_dir": self.tmp.path().join("run"), "log_file": self.tmp.path().join("headcni.log"),
            "ipam": {"type": ipam_type, "subnet": "10.77.0.0/24", "gateway": "10.77.0.1",
                     "allocation_strategy": "dense", "dataDir": self.tmp.path().join(data),
                     "routes": [{"dst": "0.0.0.0/0"}]}
        })
    }

    fn plugin(&self, verb: &str, netns: Option<&str>, conf: &Value) -> (i32, Value) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_headcni"));
        cmd.env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_PATH", self.bin())
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", ns);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let value = if out.stdout.is_empty() { Value::Null } else { serde_json::from_slice(&out.stdout).unwrap() };
        assert!(
            out.status.success() || value.get("code").is_some(),
            "no CNI error on failure: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), value)
    }

    /// The store's records without the fields that differ between runs (time, netns path).
    fn records(&self, data: &str) -> Vec<String> {
        let dir = self.tmp.path().join(data).join("podnet");
        let Ok(entries) = fs::read_dir(&dir) else { return Vec::new() };
        let state = entries
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("state."))
            .map(|p| fs::read_to_string(p).unwrap())
            .unwrap_or_default();
        state
            .lines()
            .filter(|l| l.starts_with("ip "))
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                format!("{} {} {} {} {}", f[1], f[2], f[3], f[5], f[6])
            })
            .collect()
    }
}

/// What one full lifecycle printed and stored, normalised (MACs and sandbox paths differ).
#[derive(Debug, PartialEq)]
struct Lifecycle {
    add: Value,
    stored_after_add: Vec<String>,
    second_add: Value,
    check: i32,
    status: i32,
    del: (i32, Value),
    stored_after_del: Vec<String>,
    del_again: (i32, Value),
    gc: i32,
    stored_after_gc: Vec<String>,
    version_0_4_add: Value,
    ipam_error: (i32, Value),
}

fn normalise(mut result: Value) -> Value {
    if let Some(list) = result.get_mut("interfaces").and_then(Value::as_array_mut) {
        for iface in list {
            for key in ["mac", "sandbox"] {
                if iface.get(key).is_some() {
                    iface[key] = json!("*");
                }
            }
        }
    }
    result
}

fn lifecycle(setup: &Setup, ipam_type: &str, data: &str) -> Lifecycle {
    let conf = setup.conf(ipam_type, data, "1.1.0");
    let pod = PodNetns::new();
    let (code, add) = setup.plugin("ADD", Some(&pod.path()), &conf);
    assert_eq!(code, 0, "{add}");
    let stored_after_add = setup.records(data);
    // A repeated ADD of the same attachment fails on the existing interface, keeping the address.
    let (_, mut second_add) = setup.plugin("ADD", Some(&pod.path()), &conf);
    second_add["msg"] = json!(second_add["msg"].as_str().unwrap_or("").replace(&pod.path(), "<pod netns>"));
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = add.clone();
    let (check, _) = setup.plugin("CHECK", Some(&pod.path()), &check_conf);
    let (status, _) = setup.plugin("STATUS", None, &conf);
    let del = setup.plugin("DEL", Some(&pod.path()), &conf);
    let stored_after_del = setup.records(data);
    let del_again = setup.plugin("DEL", None, &conf);

    let pod2 = PodNetns::new();
    let (code, _) = setup.plugin("ADD", Some(&pod2.path()), &conf);
    assert_eq!(code, 0);
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    let (gc, _) = setup.plugin("GC", None, &gc_conf);
    let stored_after_gc = setup.records(data);

    let pod3 = PodNetns::new();
    let (_, version_0_4_add) = setup.plugin("ADD", Some(&pod3.path()), &setup.conf(ipam_type, data, "0.4.0"));
    setup.plugin("DEL", Some(&pod3.path()), &setup.conf(ipam_type, data, "0.4.0"));

    // An error raised inside the IPAM reaches the runtime unchanged either way.
    let mut bad = conf.clone();
    bad["ipam"]["allocation_strategy"] = json!("fastest");
    let pod4 = PodNetns::new();
    let ipam_error = setup.plugin("ADD", Some(&pod4.path()), &bad);

    Lifecycle {
        add: normalise(add),
        stored_after_add,
        second_add,
        check,
        status,
        del,
        stored_after_del,
        del_again,
        gc,
        stored_after_gc,
        version_0_4_add: normalise(version_0_4_add),
        ipam_error,
    }
}

#[test]
fn in_process_ipam_behaves_exactly_like_the_exec_d_plugin() {
    if !is_root() {
        eprintln!("test skipped, requires root");
        return;
    }
    let setup = std::sync::Arc::new(Setup::new());
    let runner = setup.clone();
    let (in_process, exec) = std::thread::spawn(move || {
        // SAFETY: only this thread's network namespace changes; it becomes the plugin's "host".
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.unwrap();
        (lifecycle(&runner, "headcni-ipam", "in-process"), lifecycle(&runner, "exec-headcni-ipam", "exec"))
    })
    .join()
    .unwrap();

    assert_eq!(in_process.add["ips"][0]["address"], "10.77.0.2/24", "{:?}", in_process.add);
    assert_eq!(in_process.stored_after_add, vec!["10.77.0.2 c0ffee eth0 default web-0".to_string()]);
    assert_eq!(in_process.second_add["code"], 101, "{:?}", in_process.second_add);
    assert_eq!((in_process.check, in_process.status, in_process.gc), (0, 0, 0));
    assert_eq!(in_process.del, (0, Value::Null));
    assert!(in_process.stored_after_del.is_empty() && in_process.stored_after_gc.is_empty());
    assert_eq!(in_process.version_0_4_add["ips"][0]["version"], "4");
    assert_eq!(in_process.ipam_error.1["code"], 7);
    assert!(in_process.ipam_error.1["msg"].as_str().unwrap().contains("ipam.allocation_strategy"));
    assert_eq!(in_process, exec, "in-process and exec'd IPAM must be indistinguishable");
}
