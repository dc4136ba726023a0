//! The `headcni` plugin in real network namespaces (root only): every spec version end to end,
//! chaining, idempotency, rollback, best-effort DEL, CHECK drift, STATUS and GC. The plugin's
//! "host" is a namespace of the test's own; the machine's namespace is never touched.

mod common;

use common::{Bin, Env, Netns, Reply, invoke};
use serde_json::{Value, json};
use std::path::PathBuf;

/// One node: a host namespace, the binaries and a scratch directory for state and logs.
struct Node {
    host: Netns,
    bin: Bin,
    scratch: tempfile::TempDir,
    subnet: String,
}

impl Node {
    fn new(subnet_octet: u8) -> Self {
        let host = Netns::new("h");
        // An address of the host itself that pods can reach through their gateway.
        host.exec_ok(&["ip", "addr", "add", "192.168.250.1/32", "dev", "lo"]);
        Node {
            host,
            bin: Bin::new(),
            scratch: tempfile::tempdir().unwrap(),
            subnet: format!("10.244.{subnet_octet}.0/24"),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.scratch.path().join("ipam")
    }

    fn conf(&self, version: &str, ipam_type: &str) -> Value {
        let ipam = match ipam_type {
            "host-local" => json!({"type": "host-local", "dataDir": self.data_dir()}),
            other => json!({"type": other, "dataDir": self.data_dir()}),
        };
        json!({
            "cniVersion": version,
            "name": "hctnet",
            "type": "headcni",
            "pod_cidr": self.subnet,
            "mtu": 1280,
            "ipam": ipam,
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
            "run_dir": self.scratch.path().join("run"),
            "log_file": self.scratch.path().join("headcni.log"),
        })
    }

    fn run(&self, command: &str, cid: &str, pod: Option<&Netns>, conf: &Value) -> Reply {
        let path = pod.map(Netns::path);
        let env = Env::new(command, &self.bin.cni_path()).container(cid, "eth0", path.as_deref());
        invoke(&self.bin.plugin("headcni"), Some(&self.host), &env, &conf.to_string())
    }

    fn host_veths(&self) -> Vec<String> {
        self.host.links().into_iter().filter(|l| l.starts_with("hc")).collect()
    }

    /// Addresses host-local still holds for the network.
    fn reserved(&self) -> Vec<String> {
        let dir = self.data_dir().join("hctnet");
        std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Asserts that nothing of any attachment is left on the host.
    fn assert_clean(&self) {
        assert!(self.host_veths().is_empty(), "veths left: {:?}", self.host_veths());
        let routes = self.host.routes(false);
        assert!(!routes.contains("10.244."), "routes left:\n{routes}");
        assert!(self.reserved().is_empty(), "addresses left: {:?}", self.reserved());
    }
}

fn pod_ip(result: &Value) -> String {
    let addr = result["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().to_string()
}

fn with_prev(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}

fn lifecycle(version: &str) {
    let node = Node::new(5);
    let conf = node.conf(version, "host-local");
    let (a, b) = (Netns::new("a"), Netns::new("b"));

    let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    let rb = node.run("ADD", "ctr-b", Some(&b), &conf).ok().json();
    assert_eq!(ra["cniVersion"], version);
    assert_eq!(ra["interfaces"][1]["name"], "eth0");
    assert_eq!(ra["interfaces"][1]["sandbox"], a.path().display().to_string());
    assert_eq!(ra["dns"]["nameservers"][0], "10.96.0.10");
    assert_eq!(ra["ips"][0]["gateway"], "169.254.1.1");
    if version.starts_with("0.") {
        assert_eq!(ra["ips"][0]["version"], "4");
    }
    let (ip_a, ip_b) = (pod_ip(&ra), pod_ip(&rb));
    assert_ne!(ip_a, ip_b);

    assert!(a.ping(&ip_b), "pod a -> pod b");
    assert!(b.ping(&ip_a), "pod b -> pod a");
    assert!(a.ping("192.168.250.1"), "pod -> host");
    assert!(node.host.ping(&ip_a), "host -> pod");
    assert_eq!(a.exec_ok(&["cat", "/sys/class/net/eth0/mtu"]).trim(), "1280");
    // The link-local gateway: on-link, its MAC known without ARP; nothing routable on the host end.
    let routes = a.exec_ok(&["ip", "-4", "route"]);
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");
    assert!(routes.contains(&format!("169.254.1.1 dev eth0 proto static scope link src {ip_a}")), "{routes}");
    let host_end = ra["interfaces"][0]["name"].as_str().unwrap();
    let neigh = a.exec_ok(&["ip", "neigh", "show", "169.254.1.1"]);
    assert!(neigh.contains(&format!("lladdr {} PERMANENT", ra["interfaces"][0]["mac"].as_str().unwrap())), "{neigh}");
    let host_addrs = node.host.exec_ok(&["ip", "-o", "addr", "show", "dev", host_end]);
    assert!(!host_addrs.contains("inet "), "no IPv4 address on the host end: {host_addrs}");

    if version != "0.3.0" && version != "0.3.1" {
        node.run("CHECK", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    }

    node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    node.run("DEL", "ctr-b", Some(&b), &with_prev(&conf, &rb)).ok();
    node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    node.run("DEL", "ctr-b", Some(&b), &conf).ok();
    node.assert_clean();
    assert!(!a.links().contains(&"eth0".to_string()));
}

macro_rules! lifecycle_tests {
    ($($name:ident => $version:expr),*) => {$(
        #[test]
        fn $name() {
            require_root!();
            lifecycle($version);
        }
    )*};
}

lifecycle_tests! {
    lifecycle_0_3_0 => "0.3.0",
    lifecycle_0_3_1 => "0.3.1",
    lifecycle_0_4_0 => "0.4.0",
    lifecycle_1_0_0 => "1.0.0",
    lifecycle_1_1_0 => "1.1.0"
}

#[test]
fn second_add_for_the_same_attachment_adds_nothing() {
    require_root!();
    let node = Node::new(6);
    let conf = node.conf("1.0.0", "host-local");
    let a = Netns::new("a");
    let first = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    node.run("ADD", "ctr-a", Some(&a), &conf).error(101, "already exists");
    assert_eq!(node.host_veths().len(), 1);
    assert_eq!(node.reserved().len(), 1);
    // The first attachment is untouched by the refused second ADD.
    assert!(a.ping("192.168.250.1"));
    node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &first)).ok();
    node.assert_clean();
}

#[test]
fn failed_add_rolls_everything_back() {
    require_root!();
    let node = Node::new(7);
    let conf = node.conf("1.0.0", "host-local");
    // The host already routes the address host-local hands out first (someone else's route):
    // the ADD fails after the veth and the IPAM reservation exist, and the route stays.
    node.host.exec_ok(&["ip", "route", "add", "10.244.7.2/32", "dev", "lo"]);
    let a = Netns::new("a");
    let reply = node.run("ADD", "ctr-a", Some(&a), &conf);
    reply.error(104, "10.244.7.2/32");
    assert!(node.host.routes(false).contains("10.244.7.2 dev lo"), "nothing replaced");
    node.host.exec_ok(&["ip", "route", "del", "10.244.7.2/32", "dev", "lo"]);
    node.assert_clean();
    assert!(!a.links().contains(&"eth0".to_string()));
}

#[test]
fn del_succeeds_when_things_are_already_gone() {
    require_root!();
    let node = Node::new(8);
    let conf = node.conf("1.0.0", "host-local");

    // Gone network namespace.
    let a = Netns::new("a");
    let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    let a_path = a.path();
    drop(a);
    let env = Env::new("DEL", &node.bin.cni_path()).container("ctr-a", "eth0", Some(&a_path));
    invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &with_prev(&conf, &ra).to_string()).ok();

    // Gone interface.
    let b = Netns::new("b");
    let rb = node.run("ADD", "ctr-b", Some(&b), &conf).ok().json();
    b.exec_ok(&["ip", "link", "del", "eth0"]);
    node.run("DEL", "ctr-b", Some(&b), &with_prev(&conf, &rb)).ok();

    // Gone IPAM record.
    let c = Netns::new("c");
    let rc = node.run("ADD", "ctr-c", Some(&c), &conf).ok().json();
    std::fs::remove_file(node.data_dir().join("hctnet").join(pod_ip(&rc))).unwrap();
    node.run("DEL", "ctr-c", Some(&c), &with_prev(&conf, &rc)).ok();

    // No netns given at all, nothing ever added.
    let env = Env::new("DEL", &node.bin.cni_path()).container("never-added", "eth0", None);
    invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &conf.to_string()).ok();
    node.assert_clean();
}

#[test]
fn check_reports_drift() {
    require_root!();
    let node = Node::new(9);
    let conf = node.conf("1.1.0", "host-local");
    let a = Netns::new("a");
    let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    let with = with_prev(&conf, &ra);
    node.run("CHECK", "ctr-a", Some(&a), &with).ok();

    a.exec_ok(&["ip", "link", "set", "eth0", "mtu", "1400"]);
    node.run("CHECK", "ctr-a", Some(&a), &with).error(102, "MTU 1400");
    a.exec_ok(&["ip", "link", "set", "eth0", "mtu", "1280"]);

    a.exec_ok(&["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"]);
    node.run("CHECK", "ctr-a", Some(&a), &with).error(102, "permanent neighbour entry for its gateway 169.254.1.1");
    let host_end = ra["interfaces"][0]["name"].as_str().unwrap();
    a.exec_ok(&[
        "ip",
        "neigh",
        "replace",
        "169.254.1.1",
        "dev",
        "eth0",
        "lladdr",
        ra["interfaces"][0]["mac"].as_str().unwrap(),
        "nud",
        "permanent",
    ]);
    // (The drift stays: the address cannot go again without the kernel flushing the veth's
    // routes with the last IPv4 address; the checks below name their own drift as well.)
    node.host.exec_ok(&["ip", "addr", "add", "10.244.9.1/32", "dev", host_end]);
    node.run("CHECK", "ctr-a", Some(&a), &with).error(102, "holds the routable address 10.244.9.1/32");

    let ip = pod_ip(&ra);
    node.host.exec_ok(&["ip", "route", "del", &format!("{ip}/32")]);
    node.run("CHECK", "ctr-a", Some(&a), &with).error(102, "host route");

    a.exec_ok(&["ip", "addr", "flush", "dev", "eth0"]);
    node.run("CHECK", "ctr-a", Some(&a), &with).error(102, "address");

    node.run("CHECK", "ctr-a", Some(&a), &conf).error(7, "prevResult");
    node.run("DEL", "ctr-a", Some(&a), &with).ok();
    node.assert_clean();
}

#[test]
fn status_waits_for_a_pod_cidr() {
    require_root!();
    let node = Node::new(10);
    let mut conf = node.conf("1.1.0", "host-local");
    conf.as_object_mut().unwrap().remove("pod_cidr");
    let env = Env::new("STATUS", &node.bin.cni_path());
    let reply = invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &conf.to_string());
    reply.error(50, "subnet.env");

    let run = node.scratch.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("subnet.env"), "HEADCNI_POD_CIDRS=10.244.10.0/24\nHEADCNI_MTU=1280\n").unwrap();
    invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &conf.to_string()).ok();

    // And ADD then takes its range from the node file.
    let a = Netns::new("a");
    let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    assert!(pod_ip(&ra).starts_with("10.244.10."));
    node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    node.assert_clean();
}

#[test]
fn gc_removes_only_invalid_attachments_of_its_network() {
    require_root!();
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let node = Node::new(11);
        let conf = node.conf("1.1.0", "host-local");
        let (a, b) = (Netns::new("a"), Netns::new("b"));
        let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
        node.run("ADD", "ctr-b", Some(&b), &conf).ok();

        // Another network's attachment on the same host must survive this network's GC.
        let mut other = node.conf("1.1.0", "host-local");
        other["name"] = json!("othernet");
        other["pod_cidr"] = json!("10.244.12.0/24");
        let c = Netns::new("c");
        node.run("ADD", "ctr-c", Some(&c), &other).ok();

        let mut gc = conf.clone();
        gc[key] = json!([{"containerID": "ctr-a", "ifname": "eth0"}]);
        let env = Env::new("GC", &node.bin.cni_path());
        invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &gc.to_string()).ok();

        assert_eq!(node.host_veths().len(), 2, "{key}: ctr-b's veth is gone, ctr-a's and othernet's stay");
        assert!(a.ping("192.168.250.1"));
        assert!(!b.links().contains(&"eth0".to_string()));
        node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
        node.run("DEL", "ctr-b", Some(&b), &conf).ok();
        node.run("DEL", "ctr-c", Some(&c), &other).ok();
        node.assert_clean();
    }
}

#[test]
fn dual_stack_attachment() {
    require_root!();
    let node = Node::new(13);
    let mut conf = node.conf("1.0.0", "host-local");
    conf["enable_ipv6"] = json!(true);
    conf["pod_cidr"] = json!("10.244.13.0/24,fd00:10:244:13::/64");
    let (a, b) = (Netns::new("a"), Netns::new("b"));
    let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    let rb = node.run("ADD", "ctr-b", Some(&b), &conf).ok().json();
    assert_eq!(ra["ips"].as_array().unwrap().len(), 2);
    let v6_b = rb["ips"][1]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    assert!(v6_b.starts_with("fd00:10:244:13:"), "{v6_b}");
    assert!(a.exec(&["ping", "-6", "-c", "1", "-W", "2", &v6_b]).status.success(), "v6 pod to pod");
    assert!(a.ping(&pod_ip(&rb)), "v4 pod to pod");
    node.run("CHECK", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    node.run("DEL", "ctr-b", Some(&b), &with_prev(&conf, &rb)).ok();
    node.assert_clean();
    assert!(!node.host.routes(true).contains("fd00:10:244:13"));
}

/// An attachment made by an earlier version (the node's end holding the IPAM's gateway as a
/// /32, the pod routing through it, the result naming it): CHECK accepts it as it is, names its
/// drift, and DEL removes it. Built by turning an attachment of this version into that shape
/// with `ip`, exactly as the earlier version set it up.
#[test]
fn an_attachment_of_the_previous_shape_is_checked_and_removed() {
    require_root!();
    let node = Node::new(16);
    let mut conf = node.conf("1.0.0", "host-local");
    conf["ipam"]["subnet"] = json!("10.244.16.0/24");
    conf["ipam"]["gateway"] = json!("10.244.16.1");
    let a = Netns::new("a");
    let mut result = node.run("ADD", "ctr-old", Some(&a), &conf).ok().json();
    let ip = pod_ip(&result);
    let host_end = result["interfaces"][0]["name"].as_str().unwrap().to_string();
    node.host.exec_ok(&["ip", "addr", "add", "10.244.16.1/32", "dev", &host_end, "noprefixroute"]);
    a.exec_ok(&["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"]);
    a.exec_ok(&["ip", "route", "flush", "dev", "eth0"]);
    a.exec_ok(&["ip", "route", "add", "10.244.16.1", "dev", "eth0", "scope", "link", "src", &ip, "proto", "static"]);
    a.exec_ok(&["ip", "route", "add", "default", "via", "10.244.16.1", "dev", "eth0", "proto", "static"]);
    result["ips"][0]["gateway"] = json!("10.244.16.1");
    result["routes"] = json!([{"dst": "0.0.0.0/0", "gw": "10.244.16.1"}]);
    assert!(a.ping("192.168.250.1"), "the old shape works");

    let with = with_prev(&conf, &result);
    node.run("CHECK", "ctr-old", Some(&a), &with).ok();
    node.host.exec_ok(&["ip", "addr", "del", "10.244.16.1/32", "dev", &host_end]);
    node.run("CHECK", "ctr-old", Some(&a), &with).error(102, "address 10.244.16.1/32 is missing");
    node.run("DEL", "ctr-old", Some(&a), &with).ok();
    node.assert_clean();
    assert!(!a.links().contains(&"eth0".to_string()));
}
