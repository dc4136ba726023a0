//! Bad input to the real binary: every case gets a JSON error on stdout (and nothing else), the
//! spec's code, a message naming the culprit, a non-zero exit, and leaves nothing behind.

mod common;

use common::{Bin, Env, Netns, Reply, invoke};
use serde_json::{Value, json};

fn valid_conf(scratch: &std::path::Path) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": "errnet", "type": "headcni",
        "pod_cidr": "10.244.30.0/24", "mtu": 1280,
        "ipam": {"type": "host-local", "dataDir": scratch.join("ipam")},
        "log_file": scratch.join("log"), "run_dir": scratch.join("run"),
    })
}

/// Exactly one JSON document on stdout, and it is an error.
fn assert_single_error(reply: &Reply, code: u64, needle: &str) {
    assert_eq!(reply.stdout.trim().lines().count(), 1, "stdout must hold one document: {:?}", reply.stdout);
    reply.error(code, needle);
}

#[test]
fn undecodable_stdin_is_code_6() {
    let bin = Bin::new();
    let env = Env::new("ADD", &bin.cni_path()).container("c1", "eth0", Some(std::path::Path::new("/proc/self/ns/net")));
    for (stdin, needle) in [
        ("", "no network configuration"),
        ("{\"cniVersion\":", "not valid JSON"),
        ("[]", "JSON object"),
        ("\"text\"", "JSON object"),
        ("42", "JSON object"),
    ] {
        assert_single_error(&invoke(&bin.plugin("headcni"), None, &env, stdin), 6, needle);
    }
}

#[test]
fn bad_environment_is_code_4() {
    let bin = Bin::new();
    let scratch = tempfile::tempdir().unwrap();
    let conf = valid_conf(scratch.path()).to_string();
    let exe = bin.plugin("headcni");
    let ns = std::path::Path::new("/proc/self/ns/net");
    let base = || Env::new("ADD", &bin.cni_path()).container("c1", "eth0", Some(ns));

    // Without CNI_COMMAND, `headcni` is the command line; `headcni-ipam` is always a plugin.
    let mut no_command = base();
    no_command.vars.retain(|(k, _)| k != "CNI_COMMAND");
    assert_single_error(&invoke(&bin.plugin("headcni-ipam"), None, &no_command, &conf), 4, "CNI_COMMAND is not set");
    assert_single_error(&invoke(&exe, None, &base().set("CNI_COMMAND", ""), &conf), 4, "CNI_COMMAND");
    assert_single_error(&invoke(&exe, None, &base().set("CNI_COMMAND", "FROB"), &conf), 4, "FROB");
    for var in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
        let mut env = base();
        env.vars.retain(|(k, _)| k != var);
        assert_single_error(&invoke(&exe, None, &env, &conf), 4, var);
    }
    assert_single_error(
        &invoke(&exe, None, &base().set("CNI_IFNAME", "much-too-long-name0"), &conf),
        4,
        "longer than 15",
    );
    for cid in ["../etc/passwd", "a/b", "-x", "a b"] {
        assert_single_error(&invoke(&exe, None, &base().set("CNI_CONTAINERID", cid), &conf), 4, "CNI_CONTAINERID");
    }
    assert_single_error(&invoke(&exe, None, &base().set("CNI_ARGS", "JUSTAKEY"), &conf), 4, "CNI_ARGS");
}

#[test]
fn unknown_versions_are_code_1() {
    let bin = Bin::new();
    let scratch = tempfile::tempdir().unwrap();
    let env = Env::new("ADD", &bin.cni_path()).container("c1", "eth0", Some(std::path::Path::new("/proc/self/ns/net")));
    for version in ["0.2.0", "1.2.0", "9.9.9"] {
        let mut conf = valid_conf(scratch.path());
        conf["cniVersion"] = json!(version);
        assert_single_error(&invoke(&bin.plugin("headcni"), None, &env, &conf.to_string()), 1, version);
    }
}

#[test]
fn version_reply_and_quiet_stdout_at_debug_level() {
    let bin = Bin::new();
    let env = Env::new("VERSION", &bin.cni_path()).set("HEADCNI_LOG_LEVEL", "trace");
    let reply = invoke(&bin.plugin("headcni"), None, &env, r#"{"cniVersion":"1.1.0"}"#).ok();
    assert_eq!(
        reply.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    let ipam = invoke(&bin.plugin("headcni-ipam"), None, &env, r#"{"cniVersion":"1.1.0"}"#).ok();
    assert_eq!(ipam.json()["supportedVersions"].as_array().unwrap().len(), 5);
}

/// Invalid values and a missing netns, in a real host namespace: code 4 or 7, and no link,
/// route or address reservation left behind.
#[test]
fn invalid_values_leave_nothing_behind() {
    require_root!();
    let host = Netns::new("h");
    let pod = Netns::new("p");
    let bin = Bin::new();
    let scratch = tempfile::tempdir().unwrap();
    let exe = bin.plugin("headcni");
    let env = Env::new("ADD", &bin.cni_path()).container("c1", "eth0", Some(&pod.path()));

    let cases: Vec<(Value, u64, &str)> = vec![
        (json!({"mtu": 100}), 7, "mtu 100"),
        (json!({"mtu": 65000}), 7, "mtu 65000"),
        (json!({"pod_cidr": "10.244.300.0/24"}), 7, "pod_cidr"),
        (json!({"ipam": {"type": "host-local", "subnet": "10.244.30.0/24", "gateway": "10.9.9.1"}}), 7, "ipam.gateway"),
        (json!({"ipam": {"type": "host-local", "subnet": "not-a-subnet"}}), 7, "ipam.subnet"),
        (json!({"enable_ipv6": true}), 7, "IPv6"),
        (json!({"ipam": {"type": "no-such-ipam"}}), 7, "no-such-ipam"),
    ];
    for (patch, code, needle) in cases {
        let mut conf = valid_conf(scratch.path());
        for (k, v) in patch.as_object().unwrap() {
            conf[k] = v.clone();
        }
        assert_single_error(&invoke(&exe, Some(&host), &env, &conf.to_string()), code, needle);
    }
    let missing = env.clone().set("CNI_NETNS", "/run/netns/does-not-exist");
    assert_single_error(&invoke(&exe, Some(&host), &missing, &valid_conf(scratch.path()).to_string()), 4, "CNI_NETNS");
    let not_a_netns = env.clone().set("CNI_NETNS", "/etc/hostname");
    assert_single_error(
        &invoke(&exe, Some(&host), &not_a_netns, &valid_conf(scratch.path()).to_string()),
        4,
        "CNI_NETNS",
    );

    assert!(host.links().iter().all(|l| !l.starts_with("hc")), "{:?}", host.links());
    assert!(!pod.links().contains(&"eth0".to_string()));
    let reserved: Vec<_> = std::fs::read_dir(scratch.path().join("ipam").join("errnet"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with("10."))
                .collect()
        })
        .unwrap_or_default();
    assert!(reserved.is_empty(), "{reserved:?}");
}
