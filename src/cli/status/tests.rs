//! Tests of gather, assess and render together: what a person sees for a given node.

use super::gather::read_files;
use super::*;
use crate::agent::report::{ProblemReport, RouteReport};
use crate::clients::localapi::{Prefs, Status};
use crate::netlink::nft::NftFamily;
use crate::nodefile::NodeFile;
use std::path::Path;

fn write_conflist(path: &Path, ipam: serde_json::Value) {
    let doc =
        serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "headcni", "ipam": ipam}]});
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, doc.to_string()).unwrap();
}

#[test]
fn ipam_usage_of_headcni_ipam_and_host_local() {
    let dir = tempfile::tempdir().unwrap();
    let conflist = dir.path().join("net.d/10-headcni.conflist");
    let data = dir.path().join("ipam");
    write_conflist(&conflist, serde_json::json!({"type": "headcni-ipam", "dataDir": data}));
    let before = ipam_view(&conflist).unwrap();
    assert_eq!((before.used, before.total, before.error.clone()), (0, None, None));

    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet",
        "ipam": {"type": "headcni-ipam", "subnet": "10.44.0.0/28", "dataDir": data}});
    for cid in ["c1", "c2", "c3"] {
        let env: std::collections::HashMap<String, String> =
            [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", cid), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let req = crate::cni::parse_request(crate::cni::Command::Add, &env, conf.to_string().as_bytes()).unwrap();
        crate::ipam::run_in_process(&req).unwrap();
    }
    let v = ipam_view(&conflist).unwrap();
    assert_eq!((v.used, v.total, v.free), (3, Some(13), Some(10)), "{v:?}");
    assert!(v.text().contains("3 of 13"), "{}", v.text());

    let hl = dir.path().join("hl");
    std::fs::create_dir_all(hl.join("podnet")).unwrap();
    for name in ["10.44.0.2", "10.44.0.3", "lock", "last_reserved_ip.0"] {
        std::fs::write(hl.join("podnet").join(name), "x").unwrap();
    }
    write_conflist(&conflist, serde_json::json!({"type": "host-local", "dataDir": hl}));
    let v = ipam_view(&conflist).unwrap();
    assert_eq!((v.plugin.as_str(), v.used, v.total), ("host-local", 2, None));
}

#[test]
fn an_exhausted_pool_is_a_problem_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (a, report, live) = healthy(dir.path());
    let data = dir.path().join("ipam");
    write_conflist(&a.conf_dir.join(&a.conflist_name), serde_json::json!({"type": "headcni-ipam", "dataDir": data}));
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet",
        "ipam": {"type": "headcni-ipam", "subnet": "10.44.0.0/30", "dataDir": data}});
    let env: std::collections::HashMap<String, String> =
        [("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "only"), ("CNI_IFNAME", "eth0"), ("CNI_NETNS", "/x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let req = crate::cni::parse_request(crate::cni::Command::Add, &env, conf.to_string().as_bytes()).unwrap();
    crate::ipam::run_in_process(&req).unwrap();
    let live = Live { files: read_files(&a), ..live };
    let v = assess(&a, Some(report), &live, 0);
    let p = v.problems.iter().find(|p| p.message.contains("exhausted")).expect("exhaustion reported");
    assert!(p.fix.as_deref().unwrap_or("").contains("headcni ipam gc"));
}

fn args(dir: &Path) -> StatusArgs {
    StatusArgs {
        json: false,
        tailscale_socket: dir.join("ts.sock"),
        run_dir: dir.join("run"),
        conf_dir: dir.join("net.d"),
        conflist_name: "10-headcni.conflist".into(),
        proc_sys_dir: PROC_SYS.into(),
        cluster: false,
        kubeconfig: None,
        namespace: "kube-system".into(),
        selector: String::new(),
        via: cluster::Via::Auto,
        metrics_port: 8080,
    }
}

fn status(name: &str) -> Status {
    let text =
        std::fs::read_to_string(format!("{}/tests/fixtures/tailscale/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn prefs(name: &str) -> Prefs {
    let text =
        std::fs::read_to_string(format!("{}/tests/fixtures/tailscale/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    Prefs::from_json(serde_json::from_str(&text).unwrap())
}

fn healthy(dir: &Path) -> (StatusArgs, AgentReport, Live) {
    let a = args(dir);
    std::fs::create_dir_all(&a.conf_dir).unwrap();
    std::fs::write(a.conf_dir.join("10-headcni.conflist"), r#"{"name":"headcni","plugins":[{"type":"headcni"}]}"#)
        .unwrap();
    let pod: IpNetwork = "10.244.1.0/24".parse().unwrap();
    NodeFile { node_name: Some("node-1".into()), pod_cidrs: vec![pod], mtu: Some(1280), ..Default::default() }
        .store(&nodefile::path_in(&a.run_dir))
        .unwrap();
    let report = AgentReport {
        updated_at: 1000,
        node_name: Some("node-1".into()),
        pod_cidrs: vec![pod],
        pod_cidr_source: "node".into(),
        routes: vec![RouteReport { cidr: pod, advertised: true, approved: Some(true), admitted: Some(true) }],
        approval: "api".into(),
        masquerade: true,
        mtu: Some(1280),
        ready: true,
        ..Default::default()
    };
    let live = Live {
        status: Some(Ok(status("status-peer-approved.json"))),
        prefs: Some(prefs("prefs-joined.json")),
        forwarding_v4: Some(true),
        forwarding_v6: None,
        rules: Some(crate::agent::hostnet::policy_rules(&[pod], &["10.244.0.0/16".parse().unwrap()], 5200)),
        unreachable: Some(vec![pod]),
        guard: Some(true),
        tables: Some(vec![(NftFamily::Ipv4, 3)]),
        link: Some(("tailscale0".into(), 1280)),
        files: read_files(&a),
    };
    (a, report, live)
}

#[test]
fn all_good_renders_one_screen() {
    let dir = tempfile::tempdir().unwrap();
    let (a, report, live) = healthy(dir.path());
    let v = assess(&a, Some(report), &live, 1010);
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    let mut out = Vec::new();
    render(&v, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.lines().count() <= 24, "{text}");
    for needle in [
        "route        10.244.1.0/24: advertised, approved, admitted by the packet filter (approved by the agent)",
        "peer         node-1 100.64.0.1: accepting 10.244.1.0/24, idle",
        "All good.",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
}

#[test]
fn each_wrong_thing_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut report, mut live) = healthy(dir.path());
    report.routes[0].approved = Some(false);
    report.problems.push(ProblemReport {
        id: "approval".into(),
        severity: Severity::Waiting,
        message: "route 10.244.1.0/24 pending approval in Headscale".into(),
        hint: Some("autoApprovers".into()),
    });
    let mut p = prefs("prefs-default.json");
    p.advertise_routes = vec!["10.244.1.0/24".into()];
    live.prefs = Some(p);
    live.forwarding_v4 = Some(false);
    live.tables = Some(vec![]);
    live.link = Some(("tailscale0".into(), 1200));
    std::fs::remove_file(nodefile::path_in(&a.run_dir)).unwrap();
    std::fs::write(a.conf_dir.join("05-other.conflist"), "{}").unwrap();
    live.files = read_files(&a);
    let v = assess(&a, Some(report), &live, 1010);
    let text: Vec<String> =
        v.problems.iter().map(|p| format!("{} → {}", p.message, p.fix.clone().unwrap_or_default())).collect();
    let all = text.join("\n");
    for needle in [
        "not approved in Headscale",
        "pending approval",
        "accept-routes is off",
        "SNAT is on",
        "IPv4 forwarding is off",
        "no masquerade table",
        "pod MTU 1280 is larger than tailscale0's MTU 1200",
        "node file",
        "uses 05-other.conflist",
        "sorts before 10-headcni.conflist",
    ] {
        assert!(all.contains(needle), "{needle} missing:\n{all}");
    }
    assert!(v.problems.iter().all(|p| p.fix.is_some()), "{all}");
}

#[test]
fn no_agent_and_no_tailscaled() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path());
    let live = Live { status: Some(Err("tailscaled is not reachable".into())), ..Default::default() };
    let v = assess(&a, None, &live, 5000);
    let all: Vec<&str> = v.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(all.iter().any(|m| m.contains("has not reported")), "{all:?}");
    assert!(all.iter().any(|m| m.contains("not reachable")), "{all:?}");
    assert!(all.iter().any(|m| m.contains("no CNI configuration")), "{all:?}");
    let (a, report, live) = healthy(dir.path());
    let v = assess(&a, Some(report), &live, 1000 + STALE_AFTER_SECS + 1);
    assert!(v.problems.iter().any(|p| p.message.contains("last report")));
}

#[test]
fn a_silent_agent_is_found_within_twice_its_report_interval() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut report, live) = healthy(dir.path());
    report.report_interval_secs = Some(6);
    let v = assess(&a, Some(report.clone()), &live, 1012);
    assert!(v.agent_running && v.problems.is_empty(), "{:?}", v.problems);
    let v = assess(&a, Some(report), &live, 1013);
    assert!(!v.agent_running);
    let p = v.problems.iter().find(|p| p.message.contains("silent")).expect("reported");
    assert_eq!(p.severity, Severity::Error);
    assert!(p.message.contains("13s old") && p.message.contains("every 6s"), "{p:?}");
    let mut out = Vec::new();
    render(&v, &mut out).unwrap();
    assert!(String::from_utf8(out).unwrap().contains("agent        SILENT (last report 13s ago)"));
}

#[test]
fn another_networks_configuration_in_use_is_an_error_even_when_the_agent_warned_first() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut report, mut live) = healthy(dir.path());
    std::fs::write(a.conf_dir.join("05-flannel.conflist"), r#"{"name":"cbr0","plugins":[{"type":"flannel"}]}"#)
        .unwrap();
    live.files = read_files(&a);
    // The agent's report carries the same finding as a warning (it kept working, not ready).
    let message = format!(
        "the container runtime uses 05-flannel.conflist (network \"cbr0\"), which sorts before 10-headcni.conflist \
         in {}: pods on this node do not get HeadCNI's network",
        a.conf_dir.display()
    );
    report.ready = false;
    report.problems.push(ProblemReport {
        id: "cni_config".into(),
        severity: Severity::Warning,
        message: message.clone(),
        hint: None,
    });
    let v = assess(&a, Some(report), &live, 1010);
    let p = v.problems.iter().find(|p| p.message == message).expect("reported once");
    assert_eq!(p.severity, Severity::Error);
    assert_eq!(v.problems.iter().filter(|p| p.message == message).count(), 1);
}

#[test]
fn a_running_agent_that_is_not_ready_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut report, live) = healthy(dir.path());
    report.ready = false;
    report.problems.push(ProblemReport {
        id: "approval".into(),
        severity: Severity::Waiting,
        message: "route 10.244.1.0/24 pending approval in Headscale".into(),
        hint: None,
    });
    let v = assess(&a, Some(report), &live, 1010);
    let p = v.problems.iter().find(|p| p.message.starts_with("the agent is not ready")).expect("reported");
    assert_eq!(p.severity, Severity::Error);
    assert!(p.message.contains("pending approval"), "{p:?}");
}

#[test]
fn a_pasted_conflist_with_a_larger_mtu_is_an_error_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (a, report, mut live) = healthy(dir.path());
    std::fs::write(
        a.conf_dir.join("05-tailscale-cni.conf"),
        r#"{"cniVersion":"1.0.0","name":"tailscale-cni","type":"headcni","mtu":1420,"ipam":{"type":"host-local"}}"#,
    )
    .unwrap();
    live.files = read_files(&a);
    let v = assess(&a, Some(report), &live, 1010);
    assert_eq!(v.pod_mtu, Some(1420));
    let p = v.problems.iter().find(|p| p.message.contains("pod MTU 1420")).expect("reported");
    assert_eq!(p.severity, Severity::Error);
    assert!(p.message.contains("set by 05-tailscale-cni.conf") && p.message.contains("are lost"), "{p:?}");
    assert!(p.fix.as_deref().unwrap().contains("remove \"mtu\""), "{p:?}");
}

#[test]
fn uninstall_in_progress_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut report, live) = healthy(dir.path());
    report.teardown = "done".into();
    report.ready = false;
    let v = assess(&a, Some(report), &live, 1010);
    assert_eq!(v.uninstall.as_deref(), Some("done"));
    let p = v.problems.iter().find(|p| p.message.contains("being uninstalled")).unwrap();
    assert!(p.fix.as_deref().unwrap().contains("headcni install --uninstall"));
    let mut out = Vec::new();
    render(&v, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("agent        uninstalling, teardown done"), "{text}");
}

#[test]
fn the_controllers_word_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut report, live) = healthy(dir.path());
    report.approval = "controller".into();
    report.controller = Some(crate::binding::ApprovalStatus {
        state: crate::binding::ApprovalState::Approved,
        node_key: "nodekey:00".into(),
        headscale_node: "3".into(),
        approved: vec!["10.244.1.0/24".parse().unwrap()],
        message: String::new(),
    });
    let v = assess(&a, Some(report.clone()), &live, 1010);
    let mut out = Vec::new();
    render(&v, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("approved, admitted by the packet filter (approval by the controller)"), "{text}");
    assert!(text.contains("controller   approved: 10.244.1.0/24 approved on Headscale node 3"), "{text}");
    report.controller = None;
    report.routes[0].admitted = Some(false);
    let v = assess(&a, Some(report), &live, 1010);
    let mut out = Vec::new();
    render(&v, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("controller   no word on this Node yet"), "{text}");
    assert!(text.contains("approved, NOT admitted by the packet filter"), "{text}");
}

#[test]
fn the_policy_engine_shows_its_state_and_its_problems() {
    use crate::agent::policy::engine::PolicyStatus;
    let dir = tempfile::tempdir().unwrap();
    let (a, report, _) = healthy(dir.path());
    let screen = |status: Option<PolicyStatus>| {
        if let Some(s) = status {
            s.save(&a.run_dir);
        }
        let (_, _, live) = healthy(dir.path());
        let v = assess(&a, Some(report.clone()), &live, 1010);
        let mut out = Vec::new();
        render(&v, &mut out).unwrap();
        (v, String::from_utf8(out).unwrap())
    };
    let (_, text) = screen(None);
    assert!(text.contains("netpol       no report"), "{text}");
    let (v, text) = screen(Some(PolicyStatus { enabled: false, ..Default::default() }));
    assert!(text.contains("netpol       off (enable_network_policy false)"), "{text}");
    assert!(v.problems.is_empty());
    let mut on = PolicyStatus { enabled: true, synced: true, policies: 4, applies: 9, ..Default::default() };
    on.stats.policies_in_force = 2;
    on.stats.local_pods = 5;
    on.stats.isolated_ingress = 3;
    let (v, text) = screen(Some(on.clone()));
    assert!(
        text.contains("netpol       on: 2 of 4 policies in force; 5 local pods, isolated 3 ingress, 0 egress"),
        "{text}"
    );
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    on.problems = vec!["the kernel refused the rules: no such file".into()];
    let (v, _) = screen(Some(on));
    assert!(
        v.problems.iter().any(|p| p.severity == Severity::Error && p.message.contains("the kernel refused")),
        "{:?}",
        v.problems
    );
}
