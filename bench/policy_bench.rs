//! Helper of bench/policy.sh (not part of the product): the NetworkPolicy engine's compile and
//! apply path on a synthetic cluster, against the table of a network namespace.
//!
//! ```text
//! policy-bench <netns path> <pods> <policies> <runs> [<local ip>...]
//! ```
//!
//! The cluster: `pods` pods in 10 namespaces on two nodes (n1, n2), with labels that the
//! `policies` (ingress from pod and namespace selectors on a port, a quarter of them also with
//! ipBlock egress) select. The local IPs given are extra pods of n1 in namespace `bench`, which
//! no policy selects: traffic between them measures the cost of policies selecting other pods.
//! Prints the time to compile the whole rule set, to replace the table with it, to change one
//! policy and one pod (compile, difference, commit), and the process's peak RSS. The table is
//! left in the namespace for the throughput runs of the script.

use headcni::agent::policy::compile::{TABLE, compile};
use headcni::agent::policy::engine::Applier;
use headcni::agent::policy::model::{Cluster, Labels, Pod, Policy};
use headcni::netlink::nft::Nft;
use k8s_openapi::api::networking::v1::NetworkPolicySpec;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::time::Instant;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn pod(namespace: &str, name: String, labels: Labels, ip: IpAddr, node: &str) -> Pod {
    Pod {
        namespace: namespace.into(),
        name,
        labels,
        ips: vec![ip],
        node: Some(node.into()),
        host_network: false,
        named_ports: vec![],
    }
}

fn policy(j: usize, port_shift: usize) -> Policy {
    let mut spec = serde_json::json!({
        "podSelector": {"matchLabels": {"app": format!("app{}", j % 50)}},
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"tier": format!("t{}", j % 3)}}},
                {"namespaceSelector": {"matchLabels": {"team": format!("team{}", j % 4)}},
                 "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0", "t1"]}]}}
            ],
            "ports": [{"port": 80 + ((j + port_shift) % 20)}, {"protocol": "UDP", "port": 5000, "endPort": 5100}]
        }]
    });
    if j.is_multiple_of(4) {
        spec["egress"] = serde_json::json!([{
            "to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.{}.0.0/16", j % 200)]}}]
        }]);
    }
    let spec: NetworkPolicySpec = serde_json::from_value(spec).unwrap_or_default();
    Policy::from_spec(&format!("ns{}", j % 10), &format!("pol{j}"), &spec)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(netns), Some(Ok(pods)), Some(Ok(policies)), Some(Ok(runs))) = (
        args.first(),
        args.get(1).map(|s| s.parse::<usize>()),
        args.get(2).map(|s| s.parse::<usize>()),
        args.get(3).map(|s| s.parse::<usize>()),
    ) else {
        eprintln!("usage: policy-bench <netns path> <pods> <policies> <runs> [<local ip>...]");
        return ExitCode::from(2);
    };
    let mut c = Cluster::default();
    for n in 0..10 {
        c.namespaces.insert(format!("ns{n}"), labels(&[("team", format!("team{}", n % 4))]));
    }
    c.namespaces.insert("bench".into(), labels(&[("team", "bench".into())]));
    for i in 0..pods {
        let ns = format!("ns{}", i % 10);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 244, (i / 250 + 10) as u8, (i % 250 + 2) as u8));
        let l = labels(&[("app", format!("app{}", i % 50)), ("tier", format!("t{}", i % 3))]);
        c.pods.insert(
            (ns.clone(), format!("p{i}")),
            pod(&ns, format!("p{i}"), l, ip, if i.is_multiple_of(2) { "n1" } else { "n2" }),
        );
    }
    for (k, ip) in args[4..].iter().enumerate() {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            eprintln!("{ip} is not an address");
            return ExitCode::from(2);
        };
        c.pods.insert(
            ("bench".into(), format!("b{k}")),
            pod("bench", format!("b{k}"), labels(&[("app", "iperf".into())]), ip, "n1"),
        );
    }
    for j in 0..policies {
        c.policies.insert((format!("ns{}", j % 10), format!("pol{j}")), policy(j, 0));
    }
    let ns = match headcni::netlink::Netns::open(std::path::Path::new(netns)) {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("{netns}: {e}");
            return ExitCode::from(1);
        }
    };
    let mut applier = match Nft::connect_in(&ns) {
        Ok(nft) => Applier::new(nft, TABLE),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let (mut compile_ms, mut replace_ms, mut policy_ms, mut pod_ms) = (vec![], vec![], vec![], vec![]);
    let mut stats = None;
    for r in 0..runs {
        applier.forget();
        let t = Instant::now();
        let (rs, s) = compile(&c, "n1");
        compile_ms.push(ms(t));
        let t = Instant::now();
        if let Err(e) = applier.apply(&rs) {
            eprintln!("replacing the table: {e}");
            return ExitCode::from(1);
        }
        replace_ms.push(ms(t));
        stats = Some(s);
        // One policy changes its port.
        let t = Instant::now();
        c.policies.insert(("ns3".into(), "pol3".into()), policy(3, r + 1));
        let (rs, _) = compile(&c, "n1");
        if let Err(e) = applier.apply(&rs) {
            eprintln!("one policy: {e}");
            return ExitCode::from(1);
        }
        policy_ms.push(ms(t));
        // One pod comes (on n1, selected by policies) and goes.
        let t = Instant::now();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 9, (r % 250 + 2) as u8));
        let l = labels(&[("app", "app7".into()), ("tier", "t1".into())]);
        c.pods.insert(("ns7".into(), "new".into()), pod("ns7", "new".into(), l, ip, "n1"));
        let (rs, _) = compile(&c, "n1");
        if let Err(e) = applier.apply(&rs) {
            eprintln!("one pod: {e}");
            return ExitCode::from(1);
        }
        pod_ms.push(ms(t));
        c.pods.remove(&("ns7".into(), "new".into()));
    }
    // Leave the table as the cluster says (for the throughput runs).
    let (rs, _) = compile(&c, "n1");
    if let Err(e) = applier.apply(&rs) {
        eprintln!("{e}");
        return ExitCode::from(1);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    #[allow(clippy::print_stdout)]
    {
        println!("pods {pods} policies {policies} runs {runs} stats {stats:?}");
        println!(
            "median ms: compile {:.1}, replace table {:.1}, one policy changed {:.1}, one pod added {:.1}",
            median(&mut compile_ms),
            median(&mut replace_ms),
            median(&mut policy_ms),
            median(&mut pod_ms)
        );
        println!("peak RSS {} KiB", peak_rss_kib());
    }
    ExitCode::SUCCESS
}
