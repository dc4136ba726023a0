//! Every example in conflist/ is parsed with the plugin's own parser and exercised: two pods
//! attached through the whole chain in network namespaces, pinging each other, checked, and
//! detached without leftovers (root only for the exercise).

mod common;

use common::{Bin, Chain, Netns};
use headcni::plugin::config::PluginConfig;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conflist");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    files
}

fn load(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_example_parses() {
    for path in examples() {
        let conflist = load(&path);
        assert!(headcni::cni::is_safe_name(conflist["name"].as_str().unwrap()), "{}", path.display());
        headcni::cni::CniVersion::from_config(conflist["cniVersion"].as_str().unwrap()).unwrap();
        let first = conflist["plugins"][0].as_object().unwrap().clone();
        assert_eq!(first["type"], "headcni", "{}", path.display());
        PluginConfig::parse(&first).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Points the example's files at scratch paths, as an installer would on a real node.
fn localise(conflist: &mut Value, scratch: &Path) {
    let plugin = &mut conflist["plugins"][0];
    plugin["run_dir"] = json!(scratch.join("run"));
    plugin["log_file"] = json!(scratch.join("headcni.log"));
    plugin["ipam"]["dataDir"] = json!(scratch.join("ipam"));
}

#[test]
fn every_example_attaches_pods() {
    require_root!();
    for path in examples() {
        let host = Netns::new("h");
        let bin = Bin::new();
        let scratch = tempfile::tempdir().unwrap();
        // What the agent would have written for this node.
        std::fs::create_dir_all(scratch.path().join("run")).unwrap();
        std::fs::write(
            scratch.path().join("run/subnet.env"),
            "HEADCNI_POD_CIDRS=10.244.40.0/24,fd00:10:244:40::/64\nHEADCNI_MTU=1280\n",
        )
        .unwrap();
        let mut conflist = load(&path);
        localise(&mut conflist, scratch.path());
        let mut chain = Chain::from_conflist(&bin, &host, &conflist);
        // Debian's bandwidth 1.1.1 crashes on CHECK without shaping settings, so give it some.
        chain.runtime_config = json!({
            "portMappings": [{"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
                          "egressRate": 100_000_000, "egressBurst": 1_000_000}
        });

        let (a, b) = (Netns::new("a"), Netns::new("b"));
        let ra = chain.add("ctr-a", &a);
        let rb = chain.add("ctr-b", &b);
        let ip_b = rb["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
        assert!(a.ping(&ip_b), "{}: pod a cannot reach pod b", path.display());
        if conflist["plugins"][0]["enable_ipv6"] == json!(true) {
            let v6 = rb["ips"].as_array().unwrap().iter().find_map(|ip| {
                ip["address"].as_str().filter(|s| s.contains(':')).map(|s| s.split('/').next().unwrap().to_string())
            });
            let v6 = v6.unwrap_or_else(|| panic!("{}: no IPv6 address", path.display()));
            assert!(a.exec(&["ping", "-6", "-c", "1", "-W", "2", &v6]).status.success(), "{}", path.display());
        }
        chain.check("ctr-a", &a, &ra);
        chain.del("ctr-a", &a, &ra);
        chain.del("ctr-b", &b, &rb);
        let left: Vec<_> = host.links().into_iter().filter(|l| l.starts_with("hc")).collect();
        assert!(left.is_empty(), "{}: {left:?}", path.display());
        assert!(!host.routes(false).contains("10.244."), "{}", path.display());
    }
}
