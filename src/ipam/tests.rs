//! The plugin's semantics, driven through the CNI protocol in-process (env, stdin, stdout).

use super::*;
use crate::events;
use serde_json::{Map, json};
use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("run")).unwrap();
        Self { dir }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn store(&self) -> Store {
        Store::for_this_boot(&self.data_dir(), "net").unwrap()
    }

    /// A network config with `ipam` merged over a /29 whose usable addresses are .2-.6.
    fn conf(&self, version: &str, ipam: Value) -> String {
        let mut block = json!({"type": "headcni-ipam", "subnet": "10.9.0.0/29", "dataDir": self.data_dir()});
        if ipam.get("ranges").is_some() {
            block.as_object_mut().unwrap().remove("subnet");
        }
        for (k, v) in ipam.as_object().unwrap() {
            block[k] = v.clone();
        }
        json!({"cniVersion": version, "name": "net", "run_dir": self.run_dir(), "ipam": block}).to_string()
    }

    fn run(&self, command: &str, cid: &str, ifname: &str, conf: &str, args: &str) -> (i32, Value) {
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("CNI_COMMAND".into(), command.into());
        if !cid.is_empty() {
            env.insert("CNI_CONTAINERID".into(), cid.into());
            env.insert("CNI_IFNAME".into(), ifname.into());
            env.insert("CNI_NETNS".into(), format!("/var/run/netns/{cid}"));
        }
        if !args.is_empty() {
            env.insert("CNI_ARGS".into(), args.into());
        }
        let mut out = Vec::new();
        let code = cni::run(&HeadcniIpam, &env, &mut conf.as_bytes(), &mut out);
        let value = if out.is_empty() { Value::Null } else { serde_json::from_slice(&out).unwrap() };
        (code, value)
    }

    fn add(&self, cid: &str, ipam: Value) -> (i32, Value) {
        self.run("ADD", cid, "eth0", &self.conf("1.0.0", ipam), "")
    }

    fn address(&self, cid: &str, ipam: Value) -> String {
        let (code, v) = self.add(cid, ipam);
        assert_eq!(code, 0, "{v}");
        v["ips"][0]["address"].as_str().unwrap().to_string()
    }

    fn del(&self, cid: &str) -> (i32, Value) {
        self.run("DEL", cid, "eth0", &self.conf("1.0.0", json!({})), "")
    }

    fn state_text(&self) -> String {
        fs::read_to_string(self.store().state_path()).unwrap()
    }
}

fn assert_error(v: &Value, code: u32, needle: &str) {
    assert_eq!(v["code"], code, "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

#[test]
fn add_returns_an_ipam_result_in_the_requested_version() {
    let f = Fixture::new();
    let ipam = json!({"routes": [{"dst": "0.0.0.0/0", "gw": "10.9.0.1"}], "dns": {"nameservers": ["10.96.0.10"]}});
    let (code, v) = f.run("ADD", "c1", "eth0", &f.conf("1.0.0", ipam.clone()), "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p 1");
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v,
        json!({"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.2/29", "gateway": "10.9.0.1"}],
               "routes": [{"dst": "0.0.0.0/0", "gw": "10.9.0.1"}], "dns": {"nameservers": ["10.96.0.10"]}})
    );
    let (_, v) = f.run("ADD", "c2", "eth0", &f.conf("0.3.1", ipam), "");
    assert_eq!(v["ips"][0], json!({"version": "4", "address": "10.9.0.3/29", "gateway": "10.9.0.1"}));
    assert!(v.get("interfaces").is_none());
    let text = f.state_text();
    assert!(text.contains(" c1 eth0 ") && text.contains(" ns p%201 /var/run/netns/c1\n"), "{text}");
}

#[test]
fn add_is_idempotent_per_container_and_ifname() {
    let f = Fixture::new();
    let first = f.address("c1", json!({}));
    let before = f.state_text();
    assert_eq!(f.address("c1", json!({})), first, "a repeated ADD returns the same address");
    assert_eq!(f.state_text(), before, "and writes nothing");
    let (_, v) = f.run("ADD", "c1", "net1", &f.conf("1.0.0", json!({})), "");
    assert_ne!(v["ips"][0]["address"], first.as_str(), "another ifname is another attachment");
}

#[test]
fn strategies_pick_their_addresses() {
    let f = Fixture::new();
    for (cid, expected) in [("a", "10.9.0.2/29"), ("b", "10.9.0.3/29"), ("c", "10.9.0.4/29")] {
        assert_eq!(f.address(cid, json!({})), expected);
    }
    assert_eq!(f.del("a").0, 0);
    // Sequential does not reuse the address just freed; dense takes the lowest free one.
    assert_eq!(f.address("d", json!({"allocation_strategy": "sequential"})), "10.9.0.5/29");
    assert_eq!(f.address("e", json!({"allocation_strategy": "dense"})), "10.9.0.2/29");
    assert_eq!(f.address("g", json!({"allocation_strategy": "random"})), "10.9.0.6/29", "the one left");
    let (code, v) = f.add("h", json!({"allocation_strategy": "dense_pack"}));
    assert_eq!(code, 1);
    assert_error(&v, code::RANGE_EXHAUSTED, "all 5 addresses are in use");
}

#[test]
fn sequential_wraps_around_after_the_end() {
    let f = Fixture::new();
    for cid in ["a", "b", "c", "d", "e"] {
        f.address(cid, json!({}));
    }
    f.del("b");
    f.del("d");
    assert_eq!(f.address("x", json!({})), "10.9.0.3/29", "past .6 the cursor wraps to the first free");
    assert_eq!(f.address("y", json!({})), "10.9.0.5/29");
}

#[test]
fn exhaustion_changes_nothing() {
    let f = Fixture::new();
    let ipam = json!({"ranges": [[{"subnet": "10.9.0.0/30"}], [{"subnet": "fd00::/64"}]]});
    let (code, v) = f.add("a", ipam.clone());
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ips"][1]["address"], "fd00::2/64");
    let before = f.state_text();
    let (_, v) = f.add("b", ipam);
    assert_error(&v, code::RANGE_EXHAUSTED, "range set 0 (10.9.0.0/30)");
    assert_eq!(f.state_text(), before, "the IPv6 address of the failed ADD was not kept");
}

#[test]
fn del_releases_and_tolerates_absence() {
    let f = Fixture::new();
    assert_eq!(f.del("nobody"), (0, Value::Null));
    assert!(!f.data_dir().exists(), "a DEL without a store creates none");
    f.address("a", json!({}));
    assert_eq!(f.del("a"), (0, Value::Null));
    assert_eq!(f.del("a"), (0, Value::Null));
    assert!(f.store().load_owned().unwrap().is_empty());
    // A DEL whose config lost its ranges (the plugin could not resolve them) still releases.
    f.address("b", json!({}));
    let bare = json!({"cniVersion": "1.0.0", "name": "net", "run_dir": f.run_dir(),
        "ipam": {"type": "headcni-ipam", "dataDir": f.data_dir()}})
    .to_string();
    assert_eq!(f.run("DEL", "b", "eth0", &bare, "").0, 0);
    let state = f.store().load_owned().unwrap();
    assert!(state.is_empty());
    assert_eq!(state.sets.len(), 1, "the store keeps its ranges");
}

#[test]
fn allocation_and_release_events_reach_the_spool() {
    let f = Fixture::new();
    f.add("a", json!({"ranges": [[{"subnet": "10.9.0.0/29"}], [{"subnet": "fd00::/120"}]]}));
    f.add("a", json!({"ranges": [[{"subnet": "10.9.0.0/29"}], [{"subnet": "fd00::/120"}]]}));
    f.del("a");
    f.del("a");
    let evs = events::drain(&f.run_dir()).unwrap();
    assert_eq!(
        evs,
        vec![
            Event::IpAllocated { ipv6: false },
            Event::IpAllocated { ipv6: true },
            Event::IpReleased { ipv6: false },
            Event::IpReleased { ipv6: true },
        ]
    );
}

#[test]
fn check_verifies_the_allocation() {
    let f = Fixture::new();
    let addr = f.address("a", json!({}));
    let conf = |prev: Value| {
        let mut c: Value = serde_json::from_str(&f.conf("1.0.0", json!({}))).unwrap();
        if !prev.is_null() {
            c["prevResult"] = prev;
        }
        c.to_string()
    };
    assert_eq!(f.run("CHECK", "a", "eth0", &conf(Value::Null), "").0, 0);
    let good = json!({"cniVersion": "1.0.0", "ips": [{"address": addr}]});
    assert_eq!(f.run("CHECK", "a", "eth0", &conf(good), "").0, 0);
    let wrong = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.6/29"}]});
    let (_, v) = f.run("CHECK", "a", "eth0", &conf(wrong), "");
    assert_error(&v, code::CHECK_FAILED, "which prevResult does not list");
    let (_, v) = f.run("CHECK", "zz", "eth0", &conf(Value::Null), "");
    assert_error(&v, code::CHECK_FAILED, "holds no address");
}

#[test]
fn gc_keeps_only_valid_attachments_under_either_key() {
    let f = Fixture::new();
    for cid in ["a", "b", "c"] {
        f.address(cid, json!({}));
    }
    let gc = |key: &str, list: Value| {
        let mut c: Value = serde_json::from_str(&f.conf("1.1.0", json!({}))).unwrap();
        c[key] = list;
        f.run("GC", "", "", &c.to_string(), "")
    };
    let keep = json!([{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "eth0"}]);
    assert_eq!(gc("cni.dev/attachments", keep).0, 0);
    let held: Vec<String> = f.store().load_owned().unwrap().allocations().map(|a| a.container_id).collect();
    assert_eq!(held, ["a", "b"]);
    assert_eq!(gc("cni.dev/valid-attachments", json!([{"containerID": "b", "ifname": "eth0"}])).0, 0);
    assert_eq!(f.store().load_owned().unwrap().len(), 1);
    assert_eq!(gc("cni.dev/valid-attachments", json!([])).0, 0, "an empty list means none is valid");
    assert!(f.store().load_owned().unwrap().is_empty());
}

#[test]
fn requested_addresses_are_honoured_like_host_local() {
    let f = Fixture::new();
    let conf = f.conf("1.0.0", json!({}));
    let (code, v) = f.run("ADD", "a", "eth0", &conf, "IgnoreUnknown=1;IP=10.9.0.5");
    assert_eq!((code, &v["ips"][0]["address"]), (0, &json!("10.9.0.5/29")), "{v}");
    let (_, v) = f.run("ADD", "b", "eth0", &conf, "IP=10.9.0.5");
    assert_error(&v, code::INTERNAL, "10.9.0.5 is in use");
    let (_, v) = f.run("ADD", "b", "eth0", &conf, "IP=10.9.0.1");
    assert_error(&v, code::INTERNAL, "reserved");
    let (_, v) = f.run("ADD", "b", "eth0", &conf, "IP=10.1.1.1");
    assert_error(&v, code::INVALID_CONFIG, "in none of the configured ranges");
    let (_, v) = f.run("ADD", "b", "eth0", &conf, "IP=banana");
    assert_error(&v, code::INVALID_ENV, "CNI_ARGS IP");
    let mut rc: Value = serde_json::from_str(&conf).unwrap();
    rc["runtimeConfig"] = json!({"ips": ["10.9.0.6/29"]});
    let (_, v) = f.run("ADD", "b", "eth0", &rc.to_string(), "");
    assert_eq!(v["ips"][0]["address"], "10.9.0.6/29");
    // The same request again is the same attachment: fine. Another address for it is not.
    let (code, _) = f.run("ADD", "a", "eth0", &conf, "IP=10.9.0.5");
    assert_eq!(code, 0);
    let (_, v) = f.run("ADD", "a", "eth0", &conf, "IP=10.9.0.4");
    assert_error(&v, code::INTERNAL, "already holds");
}

#[test]
fn bad_config_is_code_7_naming_the_field() {
    let f = Fixture::new();
    let (_, v) = f.add("a", json!({"allocation_strategy": "fast"}));
    assert_error(&v, code::INVALID_CONFIG, "ipam.allocation_strategy");
    let (_, v) = f.add("a", json!({"subnet": "10.9.0.0/99"}));
    assert_error(&v, code::INVALID_CONFIG, "ipam.subnet");
    let no_range = json!({"cniVersion": "1.0.0", "name": "net", "ipam": {"type": "headcni-ipam"}}).to_string();
    let (_, v) = f.run("ADD", "a", "eth0", &no_range, "");
    assert_error(&v, code::INVALID_CONFIG, "\"subnet\" or \"ranges\"");
}

#[test]
fn damaged_state_fails_loudly_and_is_left_alone() {
    let f = Fixture::new();
    f.address("a", json!({}));
    let path = f.store().state_path();
    let good = fs::read(&path).unwrap();
    let cut = good[..good.len() - 10].to_vec();
    fs::write(&path, &cut).unwrap();
    for (command, cid) in [("ADD", "b"), ("DEL", "a")] {
        let (_, v) = f.run(command, cid, "eth0", &f.conf("1.0.0", json!({})), "");
        assert_error(&v, code::IO_FAILURE, &path.display().to_string());
        assert_error(&v, code::IO_FAILURE, "headcni ipam repair --network net --data-dir");
    }
    let (_, v) = f.run("STATUS", "", "", &f.conf("1.1.0", json!({})), "");
    assert_error(&v, code::NOT_AVAILABLE, "damaged");
    assert_eq!(fs::read(&path).unwrap(), cut, "nothing overwrote the evidence");
}

#[test]
fn state_of_an_earlier_boot_is_released_unread() {
    let f = Fixture::new();
    let dir = f.data_dir().join("net");
    fs::create_dir_all(&dir).unwrap();
    let old = dir.join("state.00000000-0000-4000-8000-000000000000");
    fs::write(&old, b"\0\0\0\0 whatever a power loss left").unwrap();
    assert_eq!(f.run("STATUS", "", "", &f.conf("1.1.0", json!({})), "").0, 0);
    assert_eq!(f.address("a", json!({})), "10.9.0.2/29");
    assert!(!old.exists());
}

#[test]
fn status_reports_exhaustion_and_recovers() {
    let f = Fixture::new();
    let conf = f.conf("1.1.0", json!({}));
    assert_eq!(f.run("STATUS", "", "", &conf, ""), (0, Value::Null), "no store yet is fine");
    for cid in ["a", "b", "c", "d", "e"] {
        f.address(cid, json!({}));
    }
    let (code, v) = f.run("STATUS", "", "", &conf, "");
    assert_eq!(code, 1);
    assert_error(&v, code::NOT_AVAILABLE, "range set 0 (10.9.0.0/29) is exhausted: all 5 addresses");
    f.del("c");
    assert_eq!(f.run("STATUS", "", "", &conf, "").0, 0);
    // A config whose sets differ from the header's is counted from the records.
    let wider = f.conf("1.1.0", json!({"subnet": "10.9.0.0/28"}));
    assert_eq!(f.run("STATUS", "", "", &wider, "").0, 0);
}

#[test]
fn in_process_calls_give_what_the_process_prints() {
    let f = Fixture::new();
    let conf: Map<String, Value> = serde_json::from_str(&f.conf("0.4.0", json!({}))).unwrap();
    let req = Request {
        command: Command::Add,
        container_id: "a".into(),
        netns: Some("/var/run/netns/a".into()),
        ifname: "eth0".into(),
        args_raw: None,
        args: Vec::new(),
        path_raw: None,
        path: Vec::new(),
        version: cni::CniVersion::V0_4_0,
        network: "net".into(),
        config: conf,
    };
    let direct = run_in_process(&req).unwrap().unwrap();
    let (_, printed) = f.run("ADD", "a", "eth0", &f.conf("0.4.0", json!({})), "");
    assert_eq!(direct, printed);
    let del = Request { command: Command::Del, ..req.clone() };
    assert_eq!(run_in_process(&del).unwrap(), None);
    let err = run_in_process(&Request { command: Command::Check, ..req }).unwrap_err();
    assert_eq!(err.code, code::CHECK_FAILED);
}

#[test]
fn usage_comes_from_the_header() {
    let f = Fixture::new();
    assert_eq!(usage(&f.data_dir(), "net").unwrap(), None);
    f.address("c1", json!({}));
    f.address("c2", json!({}));
    assert_eq!(usage(&f.data_dir(), "net").unwrap(), Some(Usage { used: 2, total: 5 }));
    f.del("c1");
    assert_eq!(usage(&f.data_dir(), "net").unwrap(), Some(Usage { used: 1, total: 5 }));
}
