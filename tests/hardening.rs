//! Root-only: what a node refuses, each in namespaces this test creates, against the built
//! binary (or the one `HEADCNI_TEST_BIN` names: run against an earlier build, each test shows
//! what that build let through). The items of the data plane's hardening that need no tailnet:
//!
//! 1. a pod that forges its source address, with a raw socket, is not heard (IPv4 and IPv6);
//! 2. the pod gateway is no address of the node and no pod's;
//! 5. a host route to a pod address that someone else owns is an error, and is not replaced;
//! 6. GC without the list of valid attachments removes nothing;
//! 7. absurd pod CIDRs are refused by the agent, the plugin and headcni-ipam;
//! 8. the agent checks its inputs before it changes the node, and a taken metrics port does
//!    not stop it;
//! 9. a flood of connections to the metrics port costs the agent a bounded number of
//!    descriptors;
//! 11. an API key over plain http, an oversized configuration, a delegate that hangs and an
//!     endless log each get a clear answer.
//!
//! Items 3, 4 and 10 need real tailscaled peers: tests/agent_tailnet.rs.

mod common;

use common::{Bin, Env, Netns, Reply, headcni_exe, invoke, invoke_within, python3};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A node: a host namespace with an address pods can reach, loose reverse-path filtering (the
/// guard must not depend on the host's sysctls), the binaries and a scratch directory.
struct Node {
    host: Netns,
    bin: Bin,
    scratch: tempfile::TempDir,
}

const HOST_ADDR: &str = "192.168.250.1";

impl Node {
    fn new() -> Self {
        let host = Netns::new("h");
        host.exec_ok(&["ip", "addr", "add", &format!("{HOST_ADDR}/32"), "dev", "lo"]);
        host.exec_ok(&["ip", "addr", "add", "fd00:250::1/128", "dev", "lo"]);
        host.exec_ok(&[
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.accept_local=0",
        ]);
        Node { host, bin: Bin::new(), scratch: tempfile::tempdir().unwrap() }
    }

    fn conf(&self, name: &str, pod_cidr: &str, ipam: Value) -> Value {
        json!({
            "cniVersion": "1.1.0", "name": name, "type": "headcni",
            "pod_cidr": pod_cidr, "mtu": 1280, "enable_ipv6": pod_cidr.contains(':'),
            "ipam": ipam,
            "run_dir": self.scratch.path().join("run"),
        })
    }

    fn host_local(&self, name: &str) -> Value {
        json!({"type": "host-local", "dataDir": self.scratch.path().join(format!("ipam-{name}"))})
    }

    fn run(&self, command: &str, cid: &str, pod: Option<&Netns>, conf: &Value) -> Reply {
        let path = pod.map(Netns::path);
        let env = Env::new(command, &self.bin.cni_path()).container(cid, "eth0", path.as_deref());
        invoke(&self.bin.plugin("headcni"), Some(&self.host), &env, &conf.to_string())
    }

    fn host_veths(&self) -> Vec<String> {
        self.host.links().into_iter().filter(|l| l.starts_with("hc")).collect()
    }
}

fn ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().split('/').next().unwrap().to_string())
        .collect()
}

fn with_prev(conf: &Value, result: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = result.clone();
    c
}

/// Sends one UDP datagram from inside `from` with source `src` (any address: a raw socket
/// builds the IP header) to `dst`:`port`.
fn send_raw(from: &Netns, src: &str, dst: &str, port: u16, payload: &str) {
    const SCRIPT: &str = r#"
import ipaddress, socket, struct, sys
src, dst, port, payload = ipaddress.ip_address(sys.argv[1]), ipaddress.ip_address(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
udp_len = 8 + len(payload)
def csum(data):
    if len(data) % 2: data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff or 0xffff
if src.version == 4:
    pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", csum(pseudo + udp)) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, src.packed, dst.packed)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp, (str(dst), 0))
else:
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", udp_len, 17)
    udp = struct.pack("!HHHH", 40000, port, udp_len, 0) + payload
    udp = udp[:6] + struct.pack("!H", csum(pseudo + udp)) + udp[8:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, src.packed, dst.packed)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.sendto(ip + udp, (str(dst), 0))
"#;
    from.exec_ok(&[python3(), "-c", SCRIPT, src, dst, &port.to_string(), payload]);
}

/// Everything a UDP socket bound in `ns` at `addr` receives within `wait`: (source, payload).
fn received(ns: &Netns, addr: &str, wait: Duration, send: impl FnOnce()) -> Vec<(String, String)> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let sock = headcni::netlink::Netns::open(&ns.path()).unwrap().bind_udp(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    send();
    let mut out = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < wait {
        let mut buf = [0u8; 256];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            out.push((from.ip().to_string(), String::from_utf8_lossy(&buf[..n]).into_owned()));
        }
    }
    out
}

/// Item 1: a pod with CAP_NET_RAW forges another pod's address, the node's and an outside one:
/// none of it arrives; its own traffic does. IPv4 and IPv6.
#[test]
fn raw_socket_spoofing_from_a_pod_is_dropped() {
    require_root!();
    let node = Node::new();
    let conf = node.conf("spoofnet", "10.244.31.0/24,fd00:10:244:31::/64", node.host_local("spoofnet"));
    let (a, b) = (Netns::new("a"), Netns::new("b"));
    let ra = node.run("ADD", "ctr-a", Some(&a), &conf).ok().json();
    let rb = node.run("ADD", "ctr-b", Some(&b), &conf).ok().json();
    let (a_ips, b_ips) = (ips(&ra), ips(&rb));

    let got = received(&node.host, &format!("{HOST_ADDR}:41001"), Duration::from_millis(1500), || {
        send_raw(&a, &a_ips[0], HOST_ADDR, 41001, "genuine");
        send_raw(&a, &b_ips[0], HOST_ADDR, 41001, "as-pod-b");
        send_raw(&a, "8.8.8.8", HOST_ADDR, 41001, "as-outside");
        send_raw(&a, "10.244.31.250", HOST_ADDR, 41001, "as-unassigned");
    });
    let got6 = received(&node.host, "[fd00:250::1]:41002", Duration::from_millis(1500), || {
        send_raw(&a, &a_ips[1], "fd00:250::1", 41002, "genuine6");
        send_raw(&a, &b_ips[1], "fd00:250::1", 41002, "as-pod-b6");
        send_raw(&a, "2001:db8::8", "fd00:250::1", 41002, "as-outside6");
    });
    let mut failures = Vec::new();
    if !got.contains(&(a_ips[0].clone(), "genuine".into())) {
        failures.push(format!("the pod's own IPv4 datagram did not arrive: {got:?}"));
    }
    if !got6.contains(&(a_ips[1].clone(), "genuine6".into())) {
        failures.push(format!("the pod's own IPv6 datagram did not arrive: {got6:?}"));
    }
    for (src, what) in got.iter().chain(&got6).filter(|(_, p)| p.starts_with("as-")) {
        failures.push(format!("a forged datagram arrived: {what} from {src}"));
    }
    let guard = node.host.exec(&["nft", "list", "table", "inet", "headcni-guard"]);
    let listing = String::from_utf8_lossy(&guard.stdout);
    if !listing.contains("drop") {
        failures.push("no anti-spoofing guard on the node".into());
    }
    node.run("DEL", "ctr-a", Some(&a), &with_prev(&conf, &ra)).ok();
    node.run("DEL", "ctr-b", Some(&b), &with_prev(&conf, &rb)).ok();
    assert!(failures.is_empty(), "{failures:#?}\nguard: {listing}");
}

/// Item 2: the pod's gateway is link-local and the node holds no address of the pod CIDR, so
/// nothing on the node answers on the CIDR's first address; the IPAM's configured gateway
/// (the documented conflists name one) is never given to a pod, by either IPAM.
#[test]
fn the_gateway_is_no_address_of_the_node_or_of_a_pod() {
    require_root!();
    let node = Node::new();
    // A machine next to the node that routes the pod CIDR to it, as a tailnet peer would.
    let peer = Netns::new("peer");
    node.host.ip(&format!("link add eth0 type veth peer name eth0 netns {}", peer.name));
    node.host.ip("addr add 192.168.251.1/24 dev eth0");
    node.host.ip("link set eth0 up");
    peer.ip("addr add 192.168.251.2/24 dev eth0");
    peer.ip("link set eth0 up");
    peer.ip("route add 10.244.32.0/24 via 192.168.251.1");
    node.host.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let mut failures = Vec::new();
    for (ipam, name) in [
        (
            json!({"type": "host-local", "subnet": "10.244.32.0/24", "gateway": "10.244.32.1",
                "dataDir": node.scratch.path().join("hl")}),
            "host-local",
        ),
        (
            json!({"type": "headcni-ipam", "subnet": "10.244.32.0/24", "gateway": "10.244.32.1",
                "allocation_strategy": "sequential", "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.32.1"}],
                "dataDir": node.scratch.path().join("hi")}),
            "headcni-ipam",
        ),
    ] {
        let conf = node.conf(&format!("gw-{name}"), "10.244.32.0/24", ipam);
        let pods: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("g{i}"))).collect();
        let mut results = Vec::new();
        for (i, p) in pods.iter().enumerate() {
            let r = node.run("ADD", &format!("ctr-{name}-{i}"), Some(p), &conf).ok().json();
            if ips(&r).contains(&"10.244.32.1".to_string()) {
                failures.push(format!("{name} gave the configured gateway 10.244.32.1 to a pod"));
            }
            if r["ips"][0]["gateway"] != "169.254.1.1" {
                failures.push(format!("{name}: the result names gateway {}", r["ips"][0]["gateway"]));
            }
            results.push(r);
        }
        if !pods[0].ping(HOST_ADDR) {
            failures.push(format!("{name}: the pod cannot reach the node through its gateway"));
        }
        let addrs = node.host.exec_ok(&["ip", "-4", "-o", "addr"]);
        if addrs.contains("10.244.32.") {
            failures.push(format!("{name}: the node holds an address of the pod CIDR:\n{addrs}"));
        }
        // A service on the node bound to every address: the peer must not reach it through the
        // pod CIDR's first address (it can through the node's own).
        let answered = |addr: &str| peer.exec(&["sh", "-c", &format!("echo | nc -w 2 {addr} 41003")]).status.success();
        let mut listener = spawn_in(&node.host, &["socat", "TCP-LISTEN:41003,reuseaddr,fork", "SYSTEM:echo hello"]);
        wait_for(Duration::from_secs(5), || answered("192.168.251.1"));
        if answered("10.244.32.1") {
            failures.push(format!("{name}: a node service answered on 10.244.32.1"));
        }
        let _ = listener.kill();
        let _ = listener.wait();
        for (i, (p, r)) in pods.iter().zip(&results).enumerate() {
            node.run("DEL", &format!("ctr-{name}-{i}"), Some(p), &with_prev(&conf, r)).ok();
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Item 5: a second network handing out the same addresses on the node must not take the
/// first one's pod routes.
#[test]
fn a_route_conflict_is_an_error_and_replaces_nothing() {
    require_root!();
    let node = Node::new();
    let first = node.conf("net-a", "10.244.33.0/24", node.host_local("net-a"));
    let second = node.conf("net-b", "10.244.33.0/24", node.host_local("net-b"));
    let (a, b) = (Netns::new("a"), Netns::new("b"));
    let ra = node.run("ADD", "ctr-a", Some(&a), &first).ok().json();
    let reply = node.run("ADD", "ctr-b", Some(&b), &second);
    let a_ip = ips(&ra)[0].clone();
    let route = node.host.exec_ok(&["ip", "route", "show", &format!("{a_ip}/32")]);
    let mut failures = Vec::new();
    if reply.code == 0 {
        failures.push(format!("the second network's ADD succeeded: {}", reply.stdout));
    } else if reply.json()["code"].as_u64() != Some(104) {
        failures.push(format!("the conflict is not code 104: {}", reply.stdout));
    }
    if !route.contains(ra["interfaces"][0]["name"].as_str().unwrap()) {
        failures.push(format!("the first pod's route was taken: {route}"));
    }
    if !node.host.ping(&a_ip) {
        failures.push("the first pod is no longer reachable".into());
    }
    if b.links().contains(&"eth0".to_string()) || node.host_veths().len() != 1 {
        failures.push(format!("the refused ADD left {:?} behind", node.host_veths()));
    }
    node.run("DEL", "ctr-a", Some(&a), &with_prev(&first, &ra)).ok();
    node.run("DEL", "ctr-b", Some(&b), &second).ok();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Item 6: GC without `cni.dev/valid-attachments` says so and removes nothing, for the plugin
/// with either IPAM.
#[test]
fn gc_without_valid_attachments_removes_nothing() {
    require_root!();
    let node = Node::new();
    let mut failures = Vec::new();
    for ipam in ["host-local", "headcni-ipam"] {
        let conf = node.conf(&format!("gc-{ipam}"), "10.244.34.0/24", {
            let mut i = node.host_local(ipam);
            i["type"] = json!(ipam);
            i
        });
        let (a, b) = (Netns::new("a"), Netns::new("b"));
        let ra = node.run("ADD", &format!("{ipam}-a"), Some(&a), &conf).ok().json();
        let rb = node.run("ADD", &format!("{ipam}-b"), Some(&b), &conf).ok().json();
        let env = Env::new("GC", &node.bin.cni_path());
        let reply = invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &conf.to_string());
        if reply.code == 0 {
            failures.push(format!("{ipam}: GC without the list answered success"));
        } else if !reply.stdout.contains("valid-attachments") {
            failures.push(format!("{ipam}: GC's error does not say what is missing: {}", reply.stdout));
        }
        if node.host_veths().len() != 2 {
            failures.push(format!("{ipam}: GC removed attachments: {:?} left", node.host_veths()));
        }
        // The addresses are still held: a third pod gets a new one.
        let c = Netns::new("c");
        let rc = node.run("ADD", &format!("{ipam}-c"), Some(&c), &conf).ok().json();
        if ips(&rc).iter().any(|ip| ips(&ra).contains(ip) || ips(&rb).contains(ip)) {
            failures.push(format!("{ipam}: GC released addresses in use ({:?})", ips(&rc)));
        }
        for (cid, ns, r) in [("a", &a, &ra), ("b", &b, &rb), ("c", &c, &rc)] {
            node.run("DEL", &format!("{ipam}-{cid}"), Some(ns), &with_prev(&conf, r)).ok();
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// An agent process in a namespace: its flags, its log, killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `headcni agent ARGS` in `ns`, with the soft open-files limit of a container (1024).
    fn start(ns: &Netns, dir: &Path, args: &[&str]) -> Agent {
        let log = dir.join("agent.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sh", "-c", "ulimit -Sn 1024; exec \"$@\"", "sh"])
            .arg(headcni_exe())
            .arg("agent")
            .args(args)
            .env("HEADCNI_LOG_LEVEL", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the agent to exit; `None` if it is still running after `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's flags for a node in `dir` without tailscaled (a socket path that does not exist
/// yet) and a fixed MTU, so that it can write the node file on its own.
fn agent_args(dir: &Path, port: u16) -> Vec<String> {
    [
        "--pod-cidr=10.244.35.0/24",
        "--cluster-cidr=10.244.0.0/16",
        "--mtu=1280",
        "--metrics-bind=127.0.0.1",
        &format!("--metrics-port={port}"),
        &format!("--tailscale-socket={}", dir.join("tailscaled.sock").display()),
        &format!("--run-dir={}", dir.join("run").display()),
        &format!("--state-dir={}", dir.join("state").display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// What the agent could have changed in `ns`: forwarding, rules, routes, nft tables.
fn node_state(ns: &Netns) -> String {
    [
        ns.exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"]),
        ns.exec_ok(&["ip", "rule"]),
        ns.exec_ok(&["ip", "route", "show", "table", "all"]),
        ns.exec_ok(&["nft", "list", "ruleset"]),
    ]
    .join("\n")
}

/// Item 7: absurd pod CIDRs are refused everywhere they enter, and change nothing.
#[test]
fn absurd_pod_cidrs_are_refused_everywhere() {
    require_root!();
    let node = Node::new();
    let mut failures = Vec::new();
    let before = node_state(&node.host);
    for cidr in ["128.0.0.0/1", "0.0.0.0/0", "::/0", "::ffff:10.0.0.0/120"] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = agent_args(dir.path(), 19101);
        args[0] = format!("--pod-cidr={cidr}");
        args.remove(1);
        let mut agent = Agent::start(&node.host, dir.path(), &strs(&args));
        match agent.exit_within(Duration::from_secs(5)) {
            Some(2) => {}
            other => failures.push(format!("agent --pod-cidr {cidr}: exit {other:?}\n{}", agent.log())),
        }
    }
    if node_state(&node.host) != before {
        failures.push("a refused agent changed the node".into());
    }
    let env = Env::new("ADD", &node.bin.cni_path());
    for (ipam, cidr) in [
        (json!({"type": "headcni-ipam", "subnet": "0.0.0.0/0"}), "0.0.0.0/0"),
        (json!({"type": "headcni-ipam", "ranges": [[{"subnet": "::/0"}]]}), "::/0"),
        (json!({"type": "headcni-ipam", "ranges": [[{"subnet": "::ffff:10.0.0.0/120"}]]}), "::ffff:10.0.0.0/120"),
    ] {
        let mut ipam = ipam;
        ipam["dataDir"] = json!(node.scratch.path().join("ipam7"));
        let conf = json!({"cniVersion": "1.1.0", "name": "n7", "ipam": ipam});
        let pod = Netns::new("p7");
        let env = env.clone().container("c7", "eth0", Some(&pod.path()));
        let reply = invoke(&node.bin.plugin("headcni-ipam"), Some(&node.host), &env, &conf.to_string());
        if reply.code == 0 {
            failures.push(format!("headcni-ipam handed out {} from {cidr}", reply.stdout.trim()));
        }
        let plugin_conf = node.conf("n7", "10.244.36.0/24", {
            let mut i = conf["ipam"].clone();
            i["dataDir"] = json!(node.scratch.path().join("ipam7p"));
            i
        });
        let mut plugin_conf = plugin_conf;
        plugin_conf.as_object_mut().unwrap().remove("pod_cidr");
        plugin_conf["enable_ipv6"] = json!(cidr.contains(':'));
        let reply = invoke(&node.bin.plugin("headcni"), Some(&node.host), &env, &plugin_conf.to_string());
        if reply.code == 0 || reply.json()["code"] != 7 {
            failures.push(format!("the plugin accepted an IPAM range {cidr}: {}", reply.stdout.trim()));
        }
    }
    let pod = Netns::new("p7b");
    let mut conf = node.conf("n7b", "128.0.0.0/1", node.host_local("n7b"));
    conf["ipam"]["subnet"] = json!("128.0.0.0/1");
    let reply = node.run("ADD", "c7b", Some(&pod), &conf);
    if reply.code == 0 || reply.json()["code"] != 7 {
        failures.push(format!("the plugin accepted pod_cidr 128.0.0.0/1: {}", reply.stdout.trim()));
    }
    if !node.host_veths().is_empty() {
        failures.push(format!("a refused ADD left {:?}", node.host_veths()));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Item 8: a missing or unreadable key file stops the agent before it changes the node; a
/// metrics port that is taken does not stop it.
#[test]
fn the_agent_checks_its_inputs_first_and_survives_a_taken_port() {
    require_root!();
    let ns = Netns::new("a8");
    ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let mut failures = Vec::new();
    let before = node_state(&ns);
    let dir = tempfile::tempdir().unwrap();
    let world_writable = dir.path().join("ww-key");
    std::fs::write(&world_writable, "hskey-auth-x\n").unwrap();
    Command::new("chmod").arg("0666").arg(&world_writable).status().unwrap();
    let empty = dir.path().join("empty-key");
    std::fs::write(&empty, "\n").unwrap();
    for (flag, path, needle) in [
        ("--auth-key-file", dir.path().join("absent"), "absent"),
        ("--auth-key-file", empty.clone(), "empty"),
        ("--auth-key-file", world_writable.clone(), "writable by group or others"),
        ("--api-key-file", dir.path().join("absent"), "absent"),
    ] {
        let mut args = agent_args(dir.path(), 19102);
        args.push("--headscale-url=https://headscale.invalid".into());
        args.push(format!("{flag}={}", path.display()));
        let mut agent = Agent::start(&ns, dir.path(), &strs(&args));
        let code = agent.exit_within(Duration::from_secs(5));
        let log = agent.log();
        if code.is_none_or(|c| c == 0) || !log.contains(needle) {
            failures.push(format!("{flag} {}: exit {code:?}, log:\n{log}", path.display()));
        }
        if node_state(&ns) != before {
            failures.push(format!("{flag} {}: the agent changed the node before failing", path.display()));
            break;
        }
    }
    // A taken metrics port: the agent stays up, keeps the node, and says why it does not serve.
    let port = 19103;
    let mut holder = spawn_in(
        &ns,
        &[
            python3(),
            "-c",
            &format!(
                "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(120)"
            ),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let run = dir.path().join("run");
    let mut agent = Agent::start(&ns, dir.path(), &strs(&agent_args(dir.path(), port)));
    let up = wait_for(Duration::from_secs(15), || {
        headcni::agent::report::AgentReport::load(&run)
            .is_some_and(|r| r.problems.iter().any(|p| p.id == "metrics_server"))
    });
    if !up || agent.exit_within(Duration::ZERO).is_some() {
        failures.push(format!("with its port taken the agent did not keep running and report it:\n{}", agent.log()));
    }
    if !headcni::nodefile::path_in(&run).exists() {
        failures.push("with its port taken the agent did not write the node file".into());
    }
    if ns.exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim() != "1" {
        failures.push("with its port taken the agent did not keep the data plane".into());
    }
    // The port comes free: it serves.
    let _ = holder.kill();
    let _ = holder.wait();
    let served = wait_for(Duration::from_secs(15), || {
        ns.exec(&["curl", "-fsS", "--max-time", "1", &format!("http://127.0.0.1:{port}/healthz")]).status.success()
    });
    if !served {
        failures.push(format!("the agent did not serve once its port came free:\n{}", agent.log()));
    }
    drop(agent);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Item 9: thousands of connections to the metrics port cost the agent a bounded number of
/// descriptors; its own sockets never run out, and it answers again once the flood stops.
#[test]
fn a_connection_flood_does_not_exhaust_the_agent() {
    require_root!();
    let ns = Netns::new("a9");
    let dir = tempfile::tempdir().unwrap();
    let port = 19104;
    let mut agent = Agent::start(&ns, dir.path(), &strs(&agent_args(dir.path(), port)));
    let healthz =
        || ns.exec(&["curl", "-fsS", "--max-time", "2", &format!("http://127.0.0.1:{port}/healthz")]).status.success();
    assert!(wait_for(Duration::from_secs(15), healthz), "the agent never served:\n{}", agent.log());
    // 3000 connections that never send a request, held open for 12 s.
    let mut flood = spawn_in(
        &ns,
        &[
            "sh",
            "-c",
            &format!(
                "ulimit -n 8192; exec {} -c 'import socket,time\nc=[]\nfor i in range(3000):\n  s=socket.socket(); s.connect((\"127.0.0.1\",{port})); c.append(s)\nprint(\"flooding\", flush=True)\ntime.sleep(12)'",
                python3()
            ),
        ],
    );
    let mut max_fds = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{}/fd", agent.pid())) {
            max_fds = max_fds.max(rd.count());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = flood.kill();
    let _ = flood.wait();
    let mut failures = Vec::new();
    if max_fds > 400 {
        failures.push(format!("the agent held up to {max_fds} descriptors during the flood"));
    }
    let log = agent.log();
    if log.contains("Too many open files") {
        failures.push("the agent ran out of descriptors".into());
    }
    if agent.exit_within(Duration::ZERO).is_some() {
        failures.push("the agent died".into());
    }
    if !wait_for(Duration::from_secs(15), healthz) {
        failures.push("the agent did not answer /healthz after the flood".into());
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", log.lines().rev().take(20).collect::<Vec<_>>().join("\n"));
}

/// Item 11: an API key over plain http, an oversized configuration, a delegated plugin that
/// hangs and a log file that grows without end.
#[test]
fn clear_answers_to_http_api_keys_huge_configs_hanging_delegates_and_endless_logs() {
    require_root!();
    let node = Node::new();
    let mut failures = Vec::new();

    // An API key would go to an http:// Headscale.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("api-key");
    std::fs::write(&key, "hskey-api-x\n").unwrap();
    let before = node_state(&node.host);
    let mut args = agent_args(dir.path(), 19105);
    args.push("--headscale-url=http://192.0.2.9:8080".into());
    args.push(format!("--api-key-file={}", key.display()));
    let mut agent = Agent::start(&node.host, dir.path(), &strs(&args));
    let code = agent.exit_within(Duration::from_secs(5));
    if code != Some(2) || !agent.log().contains("clear text") {
        failures.push(format!("an API key over http: exit {code:?}\n{}", agent.log()));
    }
    drop(agent);
    if node_state(&node.host) != before {
        failures.push("the refused agent changed the node".into());
    }

    // 64 MiB of configuration.
    let pod = Netns::new("p11");
    let env = Env::new("ADD", &node.bin.cni_path()).container("c11", "eth0", Some(&pod.path()));
    let mut big =
        br#"{"cniVersion":"1.1.0","name":"n11","type":"headcni","ipam":{"type":"host-local"},"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 64 << 20));
    big.extend_from_slice(br#""}"#);
    let t0 = Instant::now();
    match invoke_within(&node.bin.plugin("headcni"), Some(&node.host), &env, &big, Duration::from_secs(30)) {
        Some(r) if r.code != 0 && r.json()["code"] == 7 && r.stdout.contains("larger than 1 MiB") => {
            if t0.elapsed() > Duration::from_secs(5) {
                failures.push(format!("the oversized configuration took {:?} to refuse", t0.elapsed()));
            }
        }
        other => failures.push(format!("64 MiB on stdin: {other:?}")),
    }

    // A delegated IPAM plugin that never answers.
    let pidfile = dir.path().join("hang.pid");
    let hang = node.bin.dir.path().join("hang-ipam");
    std::fs::write(&hang, format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", pidfile.display())).unwrap();
    Command::new("chmod").arg("0755").arg(&hang).status().unwrap();
    let mut conf = node.conf("n11h", "10.244.37.0/24", json!({"type": "hang-ipam"}));
    conf["delegate_timeout"] = json!(1);
    let t0 = Instant::now();
    match invoke_within(
        &node.bin.plugin("headcni"),
        Some(&node.host),
        &env,
        conf.to_string().as_bytes(),
        Duration::from_secs(20),
    ) {
        Some(r) if r.code != 0 && r.json()["code"] == 11 && r.stdout.contains("did not answer") => {
            let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
            if Path::new(&format!("/proc/{}", pid.trim())).exists() && !pid.trim().is_empty() {
                failures.push(format!("the hanging delegate (pid {}) was left running", pid.trim()));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                failures.push(format!("a 1 s delegate timeout took {:?}", t0.elapsed()));
            }
        }
        other => failures.push(format!("a hanging delegate: {other:?}")),
    }
    if !node.host_veths().is_empty() || pod.links().contains(&"eth0".to_string()) {
        failures.push("the failed ADD left an attachment".into());
    }

    // A log file at its bound: the next invocation rotates it.
    let log = dir.path().join("plugin.log");
    std::fs::write(&log, vec![b'x'; 8 << 20]).unwrap();
    let env = Env::new("STATUS", &node.bin.cni_path()).set("HEADCNI_LOG_FILE", log.to_str().unwrap());
    let status = node.conf("n11s", "10.244.38.0/24", node.host_local("n11s"));
    invoke(&node.bin.plugin("headcni"), Some(&node.host), &env.set("HEADCNI_LOG_LEVEL", "debug"), &status.to_string());
    let rotated = dir.path().join("plugin.log.1");
    let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    if !rotated.exists() || size >= 8 << 20 {
        failures.push(format!("the full log was not rotated (now {size} bytes, .1 exists: {})", rotated.exists()));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn spawn_in(ns: &Netns, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
