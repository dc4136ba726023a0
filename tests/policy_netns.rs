//! Root-only: the NetworkPolicy engine's apply path against the kernel, in namespaces this test
//! creates. A "node" namespace routes between three "pods" (veth pairs named as the plugin
//! names them, addresses of both families) and an "outside" host; the engine is fed pods,
//! namespaces and policies as its watches would report them and applies its rule set to the
//! node's table `inet headcni-policy`. Real TCP connections then show what passes: allowed
//! peers and ports, denied ones, the node's own probes, replies of connections the other side
//! opened, and an established connection that keeps working while unrelated policies and pods
//! change a hundred times.

mod common;

use common::Netns;
use headcni::agent::policy::compile::TABLE;
use headcni::agent::policy::engine::{Applier, Engine, Followed, Item, Seen};
use headcni::agent::policy::metrics::PolicyMetrics;
use headcni::agent::policy::model::{Labels, Pod, Policy};
use headcni::netlink::nft::Nft;
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn nft_installed() -> bool {
    Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// A process started inside a namespace, killed (by its PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &Netns, args: &[&str]) -> Proc {
    let mut full = vec!["netns", "exec", ns.name.as_str()];
    full.extend_from_slice(args);
    Proc(
        Command::new("ip")
            .args(&full)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// An echo server on `port` (both families).
fn listen(ns: &Netns, port: u16) -> Proc {
    spawn_in(ns, &["socat", &format!("TCP6-LISTEN:{port},ipv6only=0,reuseaddr,fork"), "EXEC:cat"])
}

/// Whether a TCP connection from `ns` to `addr:port` is accepted within 1 s.
fn connects(ns: &Netns, addr: &str, port: u16) -> bool {
    ns.exec(&["nc", "-z", "-w", "1", addr, &port.to_string()]).status.success()
}

struct World {
    node: Netns,
    pods: Vec<Netns>,
    outside: Netns,
}

const V4: [&str; 3] = ["10.244.1.2", "10.244.1.3", "10.244.1.4"];
const V6: [&str; 3] = ["fd00:10:244:1::2", "fd00:10:244:1::3", "fd00:10:244:1::4"];

fn world() -> World {
    let node = Netns::new("npn");
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    node.exec_ok(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let mut pods = Vec::new();
    for i in 0..3 {
        let pod = Netns::new(&format!("npp{i}"));
        let host = format!("hcnp{i}");
        node.ip(&format!("link add {host} type veth peer name eth0 netns {}", pod.name));
        node.ip(&format!("addr add 10.244.1.1/32 dev {host}"));
        node.ip(&format!("addr add fd00:10:244:1::1/128 dev {host} nodad"));
        node.ip(&format!("link set {host} up"));
        node.ip(&format!("route add {}/32 dev {host}", V4[i]));
        node.ip(&format!("-6 route add {}/128 dev {host}", V6[i]));
        pod.ip(&format!("addr add {}/32 dev eth0", V4[i]));
        pod.ip(&format!("addr add {}/128 dev eth0 nodad", V6[i]));
        pod.ip("link set eth0 up");
        pod.ip("route add 10.244.1.1 dev eth0 scope link");
        pod.ip("route add default via 10.244.1.1 dev eth0");
        pod.ip("-6 route add default via fd00:10:244:1::1 dev eth0 onlink");
        pods.push(pod);
    }
    let outside = Netns::new("npo");
    node.ip(&format!("link add ext0 type veth peer name eth0 netns {}", outside.name));
    node.ip("addr add 10.99.0.1/24 dev ext0");
    node.ip("link set ext0 up");
    outside.ip("addr add 10.99.0.2/24 dev eth0");
    outside.ip("link set eth0 up");
    outside.ip("route add 10.244.1.0/24 via 10.99.0.1");
    // A service address for x/web as kube-proxy makes one: DNAT before routing, and a pod that
    // reaches itself through it masqueraded (its own address would come back as a martian).
    for rule in [
        "add table ip svc",
        "add chain ip svc pre { type nat hook prerouting priority -100 ; }",
        "add chain ip svc post { type nat hook postrouting priority 100 ; }",
        "add rule ip svc pre ip daddr 10.96.0.10 tcp dport 80 dnat to 10.244.1.2:8080",
        "add rule ip svc post ip saddr 10.244.1.2 ip daddr 10.244.1.2 masquerade",
    ] {
        let mut args = vec!["nft"];
        args.extend(rule.split(' '));
        node.exec_ok(&args);
    }
    // Neighbours resolved before any policy (a first IPv6 packet waits out a solicitation).
    for i in 0..3 {
        assert!(node.ping(V4[i]) && node.ping(V6[i]), "pod {i} unreachable from the node");
    }
    World { node, pods, outside }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(i: usize, ns: &str, app: &str) -> Item {
    Item::Pod(Pod {
        namespace: ns.into(),
        name: format!("p{i}"),
        labels: labels(&[("app", app)]),
        ips: vec![V4[i].parse().unwrap(), V6[i].parse().unwrap()],
        node: Some("n1".into()),
        host_network: false,
        named_ports: vec![],
    })
}

fn policy(ns: &str, name: &str, spec: serde_json::Value) -> Item {
    let spec: NetworkPolicySpec = serde_json::from_value(spec).unwrap();
    let p = Policy::from_spec(ns, name, &spec);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    Item::Policy(p)
}

/// An engine bound to the node's namespace, with everything listed as a watch would list it.
fn engine(w: &World, dir: &std::path::Path, items: Vec<(Followed, Item)>) -> Engine {
    let nft = Nft::connect_in(&headcni::netlink::Netns::open(&w.node.path()).unwrap()).unwrap();
    let mut e = Engine::new("n1", dir, PolicyMetrics::default(), Applier::new(nft, TABLE));
    for kind in [Followed::Policies, Followed::Pods, Followed::Namespaces] {
        e.take(kind, Seen::Relist);
    }
    for (kind, item) in items {
        e.take(kind, Seen::Listed(item));
    }
    for kind in [Followed::Policies, Followed::Pods, Followed::Namespaces] {
        e.take(kind, Seen::Done);
    }
    e
}

fn namespaces() -> Vec<(Followed, Item)> {
    ["x", "y"]
        .iter()
        .map(|n| (Followed::Namespaces, Item::Namespace(n.to_string(), labels(&[("kubernetes.io/metadata.name", n)]))))
        .collect()
}

#[test]
fn policies_allow_what_they_say_and_nothing_else() {
    require_root!();
    if !nft_installed() {
        eprintln!("skipped: no nft tool");
        return;
    }
    let w = world();
    let _servers: Vec<Proc> = w
        .pods
        .iter()
        .flat_map(|p| [listen(p, 8080), listen(p, 9999)])
        .chain([listen(&w.outside, 9000), listen(&w.outside, 9001)])
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (web, client, other) = (&w.pods[0], &w.pods[1], &w.pods[2]);
    // Before any policy everything passes (so that a refusal below is the policy's).
    for (from, to, port) in
        [(client, V4[0], 9999), (other, V4[0], 8080), (other, "10.99.0.2", 9001), (web, "10.96.0.10", 80)]
    {
        assert!(connects(from, to, port), "no policy: {to}:{port} must be reachable");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut items = namespaces();
    items.extend([
        (Followed::Pods, pod(0, "x", "web")),
        (Followed::Pods, pod(1, "x", "client")),
        (Followed::Pods, pod(2, "y", "other")),
        // x/web: ingress only from x's clients on TCP 8080.
        (
            Followed::Policies,
            policy(
                "x",
                "web",
                serde_json::json!({
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                 "ports": [{"protocol": "TCP", "port": 8080}]}]
                }),
            ),
        ),
        // y: egress only to the outside network on TCP 9000.
        (
            Followed::Policies,
            policy(
                "y",
                "out",
                serde_json::json!({
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.99.0.0/24"}}],
                                "ports": [{"port": 9000}]}]
                }),
            ),
        ),
    ]);
    let mut e = engine(&w, dir.path(), items);
    let stats = e.apply(None).unwrap();
    assert_eq!((stats.local_pods, stats.isolated_ingress, stats.isolated_egress), (3, 1, 1), "{stats:?}");
    assert!(w.node.exec_ok(&["nft", "list", "table", "inet", TABLE]).contains("hook forward"));

    let cases: &[(&Netns, &str, u16, bool, &str)] = &[
        (client, V4[0], 8080, true, "x/client -> web:8080 (allowed peer and port)"),
        (client, V6[0], 8080, true, "x/client -> web:8080 over IPv6"),
        (client, V4[0], 9999, false, "x/client -> web:9999 (port not allowed)"),
        (other, V4[0], 8080, false, "y/other -> web:8080 (egress of y and ingress of web deny)"),
        (other, "10.99.0.2", 9000, true, "y/other -> outside:9000 (ipBlock, port)"),
        (other, "10.99.0.2", 9001, false, "y/other -> outside:9001 (port not allowed)"),
        (web, V4[2], 8080, true, "x/web -> y/other (y's ingress is not isolated; replies pass)"),
        (web, V6[2], 8080, true, "x/web -> y/other over IPv6"),
        (client, V4[2], 9999, true, "x/client -> y/other"),
        (&w.node, V4[0], 9999, true, "the node's own probes reach an isolated pod"),
        (&w.outside, V4[0], 8080, false, "outside -> web (not a client)"),
        (&w.outside, V4[1], 9999, true, "outside -> x/client (not isolated)"),
        (client, "10.96.0.10", 80, true, "x/client -> web through its service address"),
        (web, "10.96.0.10", 80, true, "web -> itself through its service address (no policy applies)"),
    ];
    for (from, to, port, want, what) in cases {
        assert_eq!(connects(from, to, *port), *want, "{what}");
    }

    // Enforcement off: the table goes, and everything passes again.
    Applier::new(Nft::connect_in(&headcni::netlink::Netns::open(&w.node.path()).unwrap()).unwrap(), TABLE)
        .remove()
        .unwrap();
    assert!(!w.node.exec(&["nft", "list", "table", "inet", TABLE]).status.success(), "the table is gone");
    assert!(connects(client, V4[0], 9999) && connects(other, V4[0], 8080));
}

/// Reads lines of a child's stdout on a thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn an_established_connection_survives_a_hundred_unrelated_changes() {
    require_root!();
    if !nft_installed() {
        eprintln!("skipped: no nft tool");
        return;
    }
    let w = world();
    let _servers = [listen(&w.pods[0], 8080), listen(&w.pods[2], 8080)];
    std::thread::sleep(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let web_policy = || {
        policy(
            "x",
            "web",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]
            }),
        )
    };
    let mut items = namespaces();
    items.extend([
        (Followed::Pods, pod(0, "x", "web")),
        (Followed::Pods, pod(1, "x", "client")),
        (Followed::Pods, pod(2, "y", "other")),
        (Followed::Policies, web_policy()),
    ]);
    let mut e = engine(&w, dir.path(), items);
    e.apply(None).unwrap();

    // One connection client -> web, kept open, echoing a line after each change.
    let mut conn = spawn_in(&w.pods[1], &["socat", "-", &format!("TCP:{}:8080", V4[0])]);
    let rx = lines(&mut conn.0);
    let mut stdin = conn.0.stdin.take().unwrap();
    let mut echo = |i: usize| -> bool {
        writeln!(stdin, "line {i}").unwrap();
        stdin.flush().unwrap();
        rx.recv_timeout(Duration::from_secs(2)).is_ok_and(|l| l == format!("line {i}"))
    };
    assert!(echo(0), "the connection works before any change");

    for i in 1..=100 {
        // Unrelated: policies selecting y/other come and go, change their peers and ports, and
        // y/other's labels change; x/web's own policy is listed again unchanged.
        let spec = serde_json::json!({
            "podSelector": {"matchLabels": {"app": if i % 2 == 0 { "other" } else { "other2" }}},
            "ingress": [{"from": [{"ipBlock": {"cidr": format!("10.{}.0.0/16", i % 50)}}],
                         "ports": [{"port": 1000 + i, "endPort": 2000 + i}]}]
        });
        if i % 3 == 0 {
            e.take(Followed::Policies, Seen::Deleted(("y".into(), format!("p{}", i - 1))));
        } else {
            e.take(Followed::Policies, Seen::Applied(policy("y", &format!("p{i}"), spec)));
        }
        e.take(Followed::Pods, Seen::Applied(pod(2, "y", if i % 4 < 2 { "other" } else { "other2" })));
        e.take(Followed::Policies, Seen::Applied(web_policy()));
        e.apply(None).unwrap();
        assert!(echo(i), "the established connection broke at change {i}");
    }
    // The changes did take effect: y/other is isolated now by the policies left.
    let listed = w.node.exec_ok(&["nft", "list", "table", "inet", TABLE]);
    assert!(listed.contains("drop"), "{listed}");
    // And a new connection from a denied peer is still refused.
    assert!(!connects(&w.pods[2], V4[0], 8080), "y/other -> x/web must stay denied");
    assert!(connects(&w.pods[1], V4[0], 8080), "x/client -> x/web stays allowed");
}

/// Sets a link's interface group with the call the plugin makes (iproute2 refuses groups with
/// the high bit set).
fn set_group(ns: &Netns, link: &str, group: u32) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nl = headcni::netlink::Netlink::connect_in(&headcni::netlink::Netns::open(&ns.path()).unwrap()).unwrap();
        let index = nl.link(link).await.unwrap().unwrap().index;
        nl.set_group(index, group).await.unwrap();
    });
    let shown = ns.exec_ok(&["ip", "-d", "link", "show", link]);
    assert!(!shown.contains("group default"), "{shown}");
}

#[test]
fn a_new_pod_gets_its_namespace_rules_before_its_address_is_known() {
    require_root!();
    if !nft_installed() {
        eprintln!("skipped: no nft tool");
        return;
    }
    let w = world();
    let _servers = [listen(&w.pods[0], 8080), listen(&w.pods[0], 9999)];
    std::thread::sleep(Duration::from_millis(300));
    let (client, other) = (&w.pods[1], &w.pods[2]);
    let dir = tempfile::tempdir().unwrap();
    // x/web p0 is scheduled here and attached, but its Pod does not show its addresses yet.
    let unaddressed = || match pod(0, "x", "web") {
        Item::Pod(p) => Item::Pod(Pod { ips: vec![], ..p }),
        other => other,
    };
    let mut items = namespaces();
    items.extend([
        (Followed::Pods, unaddressed()),
        (Followed::Pods, pod(1, "x", "client")),
        (Followed::Pods, pod(2, "y", "other")),
        (
            Followed::Policies,
            policy(
                "x",
                "web",
                serde_json::json!({
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                 "ports": [{"port": 8080}]}]
                }),
            ),
        ),
    ]);
    let mut e = engine(&w, dir.path(), items);
    let stats = e.apply(None).unwrap();
    assert_eq!(stats.pending_pods, 1, "{stats:?}");
    // An untagged interface: the address is all the rules could go by, and it is not known.
    assert!(connects(other, V4[0], 8080), "untagged: the window the tag closes");
    // Tagged with its namespace's group (as the plugin does): the rules of the pods of x still
    // waiting for their addresses hold at once.
    set_group(&w.node, "hcnp0", headcni::podgroup::namespace_group("x"));
    let cases: &[(&Netns, &str, u16, bool, &str)] = &[
        (client, V4[0], 8080, true, "x/client -> new web pod:8080"),
        (other, V4[0], 8080, false, "y/other -> new web pod (not a client)"),
        (client, V4[0], 9999, false, "x/client -> new web pod:9999 (port not allowed)"),
        (other, V6[0], 8080, false, "y/other -> new web pod over IPv6"),
    ];
    for (from, to, port, want, what) in cases {
        assert_eq!(connects(from, to, *port), *want, "before its addresses are known: {what}");
    }
    // Its addresses arrive: the same rules, now by address.
    e.take(Followed::Pods, Seen::Applied(pod(0, "x", "web")));
    let stats = e.apply(None).unwrap();
    assert_eq!((stats.pending_pods, stats.isolated_ingress), (0, 1), "{stats:?}");
    for (from, to, port, want, what) in cases {
        assert_eq!(connects(from, to, *port), *want, "once its addresses are known: {what}");
    }
}
