//! `headcni` first in a chain with the standard portmap, tuning and bandwidth plugins, executed
//! the way libcni executes a conflist: ADD in order with prevResult, CHECK each plugin with the
//! final result, DEL in reverse order (root only).

mod common;

use common::{Bin, Chain, Netns};
use serde_json::{Value, json};

fn plugins(scratch: &std::path::Path) -> Vec<Value> {
    vec![
        json!({"type": "headcni", "pod_cidr": "10.244.20.0/24", "mtu": 1280,
               "log_file": scratch.join("log"), "run_dir": scratch.join("run"),
               "ipam": {"type": "host-local", "dataDir": scratch.join("ipam")}}),
        json!({"type": "portmap", "capabilities": {"portMappings": true}}),
        json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
    ]
}

#[test]
fn chained_with_portmap_tuning_and_bandwidth() {
    require_root!();
    let host = Netns::new("h");
    host.exec_ok(&["ip", "addr", "add", "192.168.250.1/32", "dev", "lo"]);
    let bin = Bin::new();
    let scratch = tempfile::tempdir().unwrap();
    let full = Chain {
        bin: &bin,
        host: &host,
        name: "chainnet".into(),
        version: "1.0.0".into(),
        plugins: plugins(scratch.path()),
        runtime_config: json!({
            "portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
                          "egressRate": 100_000_000, "egressBurst": 1_000_000}
        }),
    };
    let alone = Chain {
        bin: &bin,
        host: &host,
        name: "chainnet".into(),
        version: "1.0.0".into(),
        plugins: plugins(scratch.path())[..1].to_vec(),
        runtime_config: json!({}),
    };
    let (a, b) = (Netns::new("a"), Netns::new("b"));
    let result = full.add(&a.name, &a);
    let result_b = alone.add(&b.name, &b);

    // tuning ran in the pod.
    assert_eq!(a.exec_ok(&["sysctl", "-n", "net.core.somaxconn"]).trim(), "512");
    // bandwidth shaped the host end.
    let host_veth = result["interfaces"][0]["name"].as_str().unwrap();
    let qdisc = host.exec_ok(&["tc", "qdisc", "show", "dev", host_veth]);
    assert!(qdisc.contains("tbf"), "{qdisc}");
    // portmap: pod b reaches pod a's port 8080 through the host's port 18080.
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &a.name, "python3", "-c",
               "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',8080));s.listen(1);s.settimeout(10);c,_=s.accept();c.sendall(b'via-portmap');c.close()"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let got = b.exec(&[
        "python3",
        "-c",
        "import socket;s=socket.create_connection(('192.168.250.1',18080),timeout=5);print(s.recv(64).decode())",
    ]);
    let _ = server.wait();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "via-portmap", "{}", String::from_utf8_lossy(&got.stderr));

    full.check(&a.name, &a, &result);
    full.del(&a.name, &a, &result);
    full.del(&a.name, &a, &result);
    alone.del(&b.name, &b, &result_b);

    let links = host.links();
    assert!(links.iter().all(|l| !l.starts_with("hc") && !l.starts_with("bwp")), "links left: {links:?}");
    let nat = host.exec_ok(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("18080"), "port mapping left:\n{nat}");
    assert!(!host.routes(false).contains("10.244.20."));
}
