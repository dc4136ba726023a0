//! Root-only: the nf_tables client against the real kernel, inside namespaces this test
//! creates. `nft list` (if installed) checks what the kernel understood, and real UDP traffic
//! from a "pod" checks that masquerading happens exactly where it should.

mod common;

use common::{Netns, run};
use headcni::netlink::nft::{MasqueradeSpec, Nft, NftFamily};
use std::net::SocketAddr;
use std::time::Duration;

fn nft_installed() -> bool {
    std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn spec(sources: &[&str], exempt: &[&str]) -> MasqueradeSpec {
    MasqueradeSpec {
        family: NftFamily::Ipv4,
        table: "headcni".into(),
        chain: "postrouting".into(),
        sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
        exempt_destinations: exempt.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// pod (10.244.1.10) -- node (forwarding, the nft table) -- out (198.51.100.2, plus a "peer
/// pod" 10.244.2.5 and a tailnet address 100.64.0.7 reachable through it).
struct Topology {
    pod: Netns,
    node: Netns,
    out: Netns,
}

fn topology() -> Topology {
    let pod = Netns::new("pod");
    let node = Netns::new("node");
    let out = Netns::new("out");
    node.ip(&format!("link add vpod type veth peer name eth0 netns {}", pod.name));
    node.ip(&format!("link add vout type veth peer name eth0 netns {}", out.name));
    node.ip("addr add 10.244.1.1/32 dev vpod");
    node.ip("link set vpod up");
    node.ip("route add 10.244.1.10/32 dev vpod");
    node.ip("addr add 198.51.100.1/24 dev vout");
    node.ip("link set vout up");
    node.ip("route add 10.244.2.0/24 via 198.51.100.2");
    node.ip("route add 100.64.0.0/10 via 198.51.100.2");
    node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    pod.ip("addr add 10.244.1.10/32 dev eth0");
    pod.ip("link set eth0 up");
    pod.ip("route add 10.244.1.1/32 dev eth0 scope link");
    pod.ip("route add default via 10.244.1.1 dev eth0");
    out.ip("addr add 198.51.100.2/24 dev eth0");
    out.ip("addr add 10.244.2.5/32 dev eth0");
    out.ip("addr add 100.64.0.7/32 dev eth0");
    out.ip("link set eth0 up");
    out.ip("route add 10.244.1.0/24 via 198.51.100.1");
    Topology { pod, node, out }
}

/// Sends a datagram from the pod to `dst` and answers the source address `out` saw.
fn source_seen(t: &Topology, dst: &str) -> String {
    let out_ns = headcni::netlink::Netns::open(&t.out.path()).unwrap();
    let pod_ns = headcni::netlink::Netns::open(&t.pod.path()).unwrap();
    let listen: SocketAddr = format!("{dst}:40000").parse().unwrap();
    let server = out_ns.bind_udp(listen).unwrap();
    server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let client = pod_ns.bind_udp("0.0.0.0:0".parse().unwrap()).unwrap();
    client.send_to(b"hello", listen).unwrap();
    let mut buf = [0u8; 16];
    let (_, from) = server.recv_from(&mut buf).expect("datagram from the pod");
    from.ip().to_string()
}

#[test]
fn masquerade_table_is_replaced_atomically_and_masquerades_only_leaving_traffic() {
    require_root!();
    let t = topology();
    let node_ns = headcni::netlink::Netns::open(&t.node.path()).unwrap();
    let mut nft = Nft::connect_in(&node_ns).unwrap();

    // Before: no masquerading, the outside sees the pod's own address.
    assert_eq!(source_seen(&t, "198.51.100.2"), "10.244.1.10");
    assert!(!nft.table_exists(NftFamily::Ipv4, "headcni").unwrap());

    let s = spec(&["10.244.1.0/24"], &["10.244.0.0/16", "100.64.0.0/10"]);
    nft.replace_masquerade(&s).unwrap();
    assert!(nft.table_exists(NftFamily::Ipv4, "headcni").unwrap());
    assert_eq!(nft.rule_count(NftFamily::Ipv4, "headcni", "postrouting").unwrap(), 3);

    if nft_installed() {
        let listed = t.node.exec_ok(&["nft", "list", "table", "ip", "headcni"]);
        eprintln!("{listed}");
        for needle in [
            "type nat hook postrouting priority srcnat; policy accept;",
            "ip daddr 10.244.0.0/16 return",
            "ip daddr 100.64.0.0/10 return",
            "ip saddr 10.244.1.0/24 counter packets 0 bytes 0 masquerade",
            "comment \"headcni: pod traffic leaving the cluster\"",
        ] {
            assert!(listed.contains(needle), "`{needle}` missing from:\n{listed}");
        }
    }

    // Leaving the cluster: masqueraded to the node's address. To a peer pod or the tailnet: not.
    assert_eq!(source_seen(&t, "198.51.100.2"), "198.51.100.1");
    assert_eq!(source_seen(&t, "10.244.2.5"), "10.244.1.10");
    assert_eq!(source_seen(&t, "100.64.0.7"), "10.244.1.10");

    // Replacing is idempotent and takes the new content (here: the tailnet is no longer exempt).
    nft.replace_masquerade(&s).unwrap();
    let s2 = spec(&["10.244.1.0/24"], &["10.244.0.0/16"]);
    nft.replace_masquerade(&s2).unwrap();
    assert_eq!(nft.rule_count(NftFamily::Ipv4, "headcni", "postrouting").unwrap(), 2);
    assert_eq!(source_seen(&t, "100.64.0.7"), "198.51.100.1");

    // Removal leaves nothing behind, and a second removal is fine.
    assert!(nft.delete_table(NftFamily::Ipv4, "headcni").unwrap());
    assert!(!nft.delete_table(NftFamily::Ipv4, "headcni").unwrap());
    assert_eq!(nft.rule_count(NftFamily::Ipv4, "headcni", "postrouting").unwrap(), 0);
    if nft_installed() {
        assert_eq!(t.node.exec_ok(&["nft", "list", "tables"]).trim(), "");
    }
    assert_eq!(source_seen(&t, "198.51.100.2"), "10.244.1.10");
}

#[test]
fn ipv6_table_and_other_tables_are_left_alone() {
    require_root!();
    let node = Netns::new("n6");
    let ns = headcni::netlink::Netns::open(&node.path()).unwrap();
    let mut nft = Nft::connect_in(&ns).unwrap();
    if nft_installed() {
        // Someone else's table in the same namespace must survive everything we do.
        node.exec_ok(&["nft", "add", "table", "ip", "other"]);
    }
    let s = MasqueradeSpec {
        family: NftFamily::Ipv6,
        table: "headcni".into(),
        chain: "postrouting".into(),
        sources: vec!["fd00:10:244:1::/64".parse().unwrap()],
        exempt_destinations: vec!["fd7a:115c:a1e0::/48".parse().unwrap(), "fd00:10:244::/48".parse().unwrap()],
    };
    nft.replace_masquerade(&s).unwrap();
    assert!(nft.table_exists(NftFamily::Ipv6, "headcni").unwrap());
    assert!(!nft.table_exists(NftFamily::Ipv4, "headcni").unwrap());
    if nft_installed() {
        let listed = node.exec_ok(&["nft", "list", "table", "ip6", "headcni"]);
        assert!(listed.contains("ip6 daddr fd7a:115c:a1e0::/48 return"), "{listed}");
        assert!(listed.contains("ip6 saddr fd00:10:244:1::/64 counter"), "{listed}");
    }
    assert!(nft.delete_table(NftFamily::Ipv6, "headcni").unwrap());
    if nft_installed() {
        assert_eq!(node.exec_ok(&["nft", "list", "tables"]).trim(), "table ip other");
    }
    // The root namespace was never touched: our table does not exist there.
    let _ = run("true", &[]);
}
