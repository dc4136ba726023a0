//! Root-only: the agent's data plane against the kernel, in a namespace this test creates:
//! forwarding, HeadCNI's tagged policy rules (and nobody else's) and what they make of routing
//! next to Tailscale's rules and table 52, the `unreachable` route of the pod CIDR, the
//! anti-spoofing guard, both masquerade tables, and the tailnet interface's MTU.

mod common;

use common::Netns;
use headcni::agent::hostnet::{HostNetwork, KernelHostNetwork, OWN_PROTOCOL, masquerade_specs, policy_rules};
use headcni::netlink::nft::NftFamily;
use headcni::netlink::sysctl::SysctlRoot;
use ipnetwork::IpNetwork;

fn nets(list: &[&str]) -> Vec<IpNetwork> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[tokio::test]
async fn rules_tables_forwarding_and_mtu() {
    require_root!();
    let ns = Netns::new("dp");
    // Someone else's rule at the same priority must survive everything.
    ns.ip("rule add to 10.9.0.0/16 lookup main pref 5200");
    ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"]);
    let dp = KernelHostNetwork::in_netns(headcni::netlink::Netns::open(&ns.path()).unwrap()).unwrap();

    let changes = dp.ensure_forwarding(true, true).await.unwrap();
    assert_eq!(changes.items.len(), 2, "{changes:?}");
    assert_eq!(dp.read_sysctl("ipv4/ip_forward").unwrap(), "1");
    assert_eq!(dp.read_sysctl("ipv6/conf/all/forwarding").unwrap(), "1");
    assert!(dp.ensure_forwarding(true, true).await.unwrap().items.is_empty());

    // --proc-sys-dir: another directory standing for /proc/sys, here one whose net is a link
    // to procfs (as the chart's bind mount of the host's /proc/sys/net is): procfs resolves it
    // for the namespace of the thread that opens it, so the test namespace's sysctls change,
    // and the root namespace's stay as they are.
    let root_forwarding = headcni::netlink::sysctl::read("ipv4/ip_forward").unwrap();
    ns.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=0"]);
    let host = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/proc/sys/net", host.path().join("net")).unwrap();
    let root = SysctlRoot::new(host.path()).unwrap();
    let moved_dp =
        KernelHostNetwork::in_netns(headcni::netlink::Netns::open(&ns.path()).unwrap()).unwrap().with_sysctl_root(root);
    assert_eq!(moved_dp.read_sysctl("ipv4/ip_forward").unwrap(), "0");
    assert_eq!(moved_dp.ensure_forwarding(true, false).await.unwrap().items, vec!["set net/ipv4/ip_forward=1"]);
    assert_eq!(ns.exec_ok(&["sysctl", "-n", "net.ipv4.ip_forward"]).trim(), "1");
    assert_eq!(headcni::netlink::sysctl::read("ipv4/ip_forward").unwrap(), root_forwarding, "root namespace untouched");
    // A root without the net tree: the error names the file.
    let empty = tempfile::tempdir().unwrap();
    let broken = KernelHostNetwork::in_netns(headcni::netlink::Netns::open(&ns.path()).unwrap())
        .unwrap()
        .with_sysctl_root(SysctlRoot::new(empty.path()).unwrap());
    let err = broken.ensure_forwarding(true, false).await.unwrap_err().to_string();
    assert!(err.contains("/net/ipv4/ip_forward"), "{err}");

    let pods = nets(&["10.244.1.0/24", "fd00:10:244:1::/64"]);
    let cluster = nets(&["10.244.0.0/16", "fd00:10:244::/56"]);
    let rules = policy_rules(&pods, &cluster, 5200);
    assert_eq!(dp.ensure_rules(&rules).await.unwrap().items.len(), 10, "2 own, 2 goto, 4 to table 52, 2 suppress");
    assert!(dp.ensure_rules(&rules).await.unwrap().items.is_empty(), "idempotent");
    let mut have = dp.own_rules().await.unwrap();
    let mut want = rules.clone();
    for l in [&mut have, &mut want] {
        l.sort_by_key(|r| (r.priority, r.ipv6, r.dst.map(|d| d.to_string())));
    }
    assert_eq!(have, want, "the kernel reports the rules exactly as they were made");
    let v4 = ns.exec_ok(&["ip", "rule"]);
    for line in [
        format!("5200:\tfrom all to 10.244.1.0/24 lookup main proto {OWN_PROTOCOL}"),
        "5201:\tfrom all fwmark 0x80000/0xff0000 goto 5203 proto 104".into(),
        "5202:\tfrom all to 10.244.0.0/16 lookup 52 proto 104".into(),
        "5202:\tfrom all to 100.64.0.0/10 lookup 52 proto 104".into(),
        "5203:\tfrom all lookup main suppress_prefixlength 0 proto 104".into(),
    ] {
        assert!(v4.contains(&line), "{line:?} missing:\n{v4}");
    }
    let v6 = ns.exec_ok(&["ip", "-6", "rule"]);
    assert!(v6.contains("from all to fd00:10:244:1::/64 lookup main proto 104"), "{v6}");
    assert!(v6.contains("5202:\tfrom all to fd7a:115c:a1e0::/48 lookup 52 proto 104"), "{v6}");

    // What the rules make of routing beside Tailscale's rules and a table 52 holding a peer's
    // route to this node's LAN, the other nodes' pod CIDRs and the default route of an exit node
    // this node was told to use (a peer that merely offers one puts nothing in table 52).
    ns.ip("link add eth0 type veth peer name eth0p");
    ns.ip("link add tailscale0 mtu 1280 type veth peer name peer0");
    for l in ["eth0", "eth0p", "tailscale0", "peer0"] {
        ns.ip(&format!("link set {l} up"));
    }
    ns.ip("addr add 192.168.50.2/24 dev eth0");
    ns.ip("addr add 100.64.0.7/32 dev tailscale0");
    ns.ip("route add default via 192.168.50.1");
    ns.ip("route add 10.0.0.0/8 via 192.168.50.1");
    for r in ["192.168.50.0/24", "0.0.0.0/0", "10.244.2.0/24"] {
        ns.ip(&format!("route add {r} dev tailscale0 table 52"));
    }
    ns.ip("rule add pref 5210 fwmark 0x80000/0xff0000 lookup main");
    ns.ip("rule add pref 5270 lookup 52");
    let dev = |args: &str| {
        let mut all = vec!["ip", "route", "get"];
        all.extend(args.split_whitespace());
        let out = ns.exec_ok(&all);
        out.split_whitespace().skip_while(|w| *w != "dev").nth(1).unwrap_or("").to_string()
    };
    assert_eq!(dev("192.168.50.9"), "eth0", "the LAN stays on the LAN");
    assert_eq!(dev("192.168.50.9 mark 0x80000"), "eth0", "tailscaled's own packets too");
    assert_eq!(dev("10.0.5.5"), "eth0", "main's specific routes win over an exit node in use");
    assert_eq!(dev("8.8.8.8"), "tailscale0", "only what main routes by its default route follows it");
    assert_eq!(dev("10.244.2.5"), "tailscale0", "another node's pods: the tailnet, despite main's 10/8");
    assert_eq!(dev("10.244.2.5 mark 0x80000"), "eth0", "tailscaled's own packets never to table 52");
    assert_eq!(dev("100.64.0.9"), "tailscale0");
    ns.ip("route flush table 52");
    ns.ip("rule del pref 5270");
    ns.ip("rule del pref 5210");
    ns.ip("link del tailscale0");
    ns.ip("route del 10.0.0.0/8");

    // The pod CIDR and the priority change: the old rules go, the foreign one stays.
    let moved = nets(&["10.244.7.0/24"]);
    dp.ensure_rules(&policy_rules(&moved, &[], 5190)).await.unwrap();
    let v4 = ns.exec_ok(&["ip", "rule"]);
    assert!(v4.contains("5190:\tfrom all to 10.244.7.0/24 lookup main proto 104"), "{v4}");
    assert!(v4.contains("5191:\tfrom all fwmark 0x80000/0xff0000 goto 5193 proto 104"), "{v4}");
    assert!(v4.contains("5193:\tfrom all lookup main suppress_prefixlength 0 proto 104"), "{v4}");
    assert!(!v4.contains("10.244.1.0/24") && !v4.contains("5201:") && !v4.contains("5203:"), "{v4}");
    assert!(v4.contains("to 10.9.0.0/16 lookup main"), "{v4}");
    assert!(!ns.exec_ok(&["ip", "-6", "rule"]).contains("fd00:10:244"));
    dp.ensure_rules(&rules).await.unwrap();

    // The unreachable route of the pod CIDR: added, kept, and never over someone else's.
    assert_eq!(dp.ensure_unreachable(&pods).await.unwrap().items.len(), 2);
    assert!(dp.ensure_unreachable(&pods).await.unwrap().items.is_empty());
    let routes = ns.exec_ok(&["ip", "route"]);
    assert!(routes.contains("unreachable 10.244.1.0/24 proto 104"), "{routes}");
    let get = ns.exec(&["ip", "route", "get", "10.244.1.77"]);
    assert!(!get.status.success(), "an unassigned pod address is unreachable, not sent to the default route");
    ns.ip("route add 10.244.9.0/24 via 192.168.50.1");
    let err = dp.ensure_unreachable(&nets(&["10.244.9.0/24"])).await.unwrap_err().to_string();
    assert!(err.contains("not HeadCNI's"), "{err}");
    assert!(ns.exec_ok(&["ip", "route"]).contains("10.244.9.0/24 via 192.168.50.1"), "someone else's route stays");
    assert_eq!(dp.own_unreachable().await.unwrap().len(), 0, "the stale ones went first");
    dp.ensure_unreachable(&pods).await.unwrap();

    // The guard: created, complete, put back after someone flushed it.
    assert!(!dp.guard_intact().unwrap());
    assert_eq!(dp.ensure_guard().await.unwrap().items.len(), 1);
    assert!(dp.guard_intact().unwrap() && dp.ensure_guard().await.unwrap().items.is_empty());
    let guard = ns.exec_ok(&["nft", "list", "table", "inet", "headcni-guard"]);
    assert!(guard.contains("type filter hook prerouting priority raw; policy accept;"), "{guard}");
    assert!(guard.contains("iifname \"hc*\" fib saddr . iif oif missing counter packets 0 bytes 0 drop"), "{guard}");
    ns.exec_ok(&["nft", "flush", "chain", "inet", "headcni-guard", "prerouting"]);
    assert!(!dp.guard_intact().unwrap());
    assert_eq!(dp.ensure_guard().await.unwrap().items.len(), 1);

    let specs = masquerade_specs(&pods, &nets(&["10.244.0.0/16", "fd00:10:244::/48"]));
    assert_eq!(dp.ensure_masquerade(&specs).await.unwrap().items.len(), 2);
    assert!(dp.ensure_masquerade(&specs).await.unwrap().items.is_empty(), "unchanged: not rewritten");
    assert_eq!(dp.masquerade_table(NftFamily::Ipv4).unwrap(), Some(3), "two exemptions, one masquerade");
    assert_eq!(dp.masquerade_table(NftFamily::Ipv6).unwrap(), Some(3));
    // Someone flushed the ruleset: the next pass puts the tables back.
    ns.exec_ok(&["nft", "flush", "ruleset"]);
    assert_eq!(dp.ensure_masquerade(&specs).await.unwrap().items.len(), 2);
    assert_eq!(dp.ensure_guard().await.unwrap().items.len(), 1, "the guard too");
    // IPv4 only now: the ip6 table goes.
    let v4only = masquerade_specs(&nets(&["10.244.1.0/24"]), &[]);
    let c = dp.ensure_masquerade(&v4only).await.unwrap();
    assert!(c.items.iter().any(|i| i.contains("removed nft table ip6 headcni")), "{c:?}");

    assert_eq!(dp.tailnet_link(&[]).await.unwrap(), None);
    ns.ip("link add tailscale0 mtu 1280 type veth peer name peer0");
    ns.ip("addr add 100.64.0.7/32 dev tailscale0");
    assert_eq!(dp.tailnet_link(&[]).await.unwrap(), Some(("tailscale0".into(), 1280)));
    ns.ip("link set tailscale0 name ts-custom");
    assert_eq!(dp.tailnet_link(&["100.64.0.7".parse().unwrap()]).await.unwrap(), Some(("ts-custom".into(), 1280)));

    assert_eq!(dp.remove_rules().await.unwrap(), 10);
    assert_eq!(dp.remove_unreachable().await.unwrap(), 2);
    assert!(dp.remove_guard().await.unwrap());
    assert!(!dp.remove_guard().await.unwrap());
    assert_eq!(dp.remove_masquerade().await.unwrap(), 1);
    assert_eq!(dp.remove_masquerade().await.unwrap(), 0);
    let v4 = ns.exec_ok(&["ip", "rule"]);
    assert!(!v4.contains("proto 104") && v4.contains("to 10.9.0.0/16"), "{v4}");
    assert!(!ns.exec_ok(&["ip", "route"]).contains("proto 104"));
}
