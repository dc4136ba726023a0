//! The verbs' logic over the fakes of both seams: no root, no kernel state, no processes. What
//! the kernel does with the same calls is proven by tests/plugin_netns.rs (as root).

use super::fake::{FakeDataplane, FakeIpam, HOST_NETNS};
use super::*;
use crate::cni::{Plugin, code};
use serde_json::{Value, json};
use std::collections::HashMap;

const POD_A: &str = "/fake/netns/pod-a";
const POD_B: &str = "/fake/netns/pod-b";

struct Setup {
    plugin: HeadCni<FakeDataplane, FakeIpam>,
    run_dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let plugin = HeadCni::new(FakeDataplane::with_pods(&[POD_A, POD_B]), FakeIpam::default());
        Self { plugin, run_dir: tempfile::tempdir().unwrap() }
    }

    fn dp(&self) -> &FakeDataplane {
        &self.plugin.dataplane
    }

    fn ipam(&self) -> &FakeIpam {
        &self.plugin.ipam
    }

    fn conf(&self, extra: Value) -> Value {
        let mut conf = json!({"cniVersion": "1.1.0", "name": "net1", "type": "headcni", "pod_cidr": "10.1.0.0/24",
            "mtu": 1280, "run_dir": self.run_dir.path(), "ipam": {"type": "fake-ipam"}});
        if let (Some(c), Value::Object(e)) = (conf.as_object_mut(), extra) {
            c.extend(e);
        }
        conf
    }

    fn request(&self, command: &str, cid: &str, netns: Option<&str>, conf: &Value) -> Request {
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("CNI_COMMAND".into(), command.into());
        if !cid.is_empty() {
            env.insert("CNI_CONTAINERID".into(), cid.into());
            env.insert("CNI_IFNAME".into(), "eth0".into());
        }
        if let Some(ns) = netns {
            env.insert("CNI_NETNS".into(), ns.into());
        }
        let command = Command::parse(command).unwrap();
        cni::parse_request(command, &env, conf.to_string().as_bytes()).unwrap()
    }

    fn add(&self, cid: &str, netns: &str) -> Result<CniResult, CniError> {
        self.plugin.add(&self.request("ADD", cid, Some(netns), &self.conf(json!({}))))
    }

    fn with_prev(&self, result: &CniResult) -> Value {
        self.conf(json!({"prevResult": result.to_value(cni::CniVersion::V1_1_0)}))
    }
}

#[test]
fn add_creates_the_pair_and_answers_the_result() {
    let s = Setup::new();
    let result = s.add("ctr-a", POD_A).unwrap();
    let host_name = attachment::host_veth_name("ctr-a", "eth0");
    assert_eq!(result.interfaces.len(), 2);
    assert_eq!(result.interfaces[0].name, host_name);
    assert_eq!(result.interfaces[1].name, "eth0");
    assert_eq!(result.interfaces[1].sandbox.as_deref(), Some(POD_A));
    assert_eq!(result.ips.len(), 1);
    assert_eq!(result.ips[0].address.to_string(), "10.1.0.2/24");
    // The link-local gateway, not the IPAM's 10.1.0.1 (which no pod ever gets).
    assert_eq!(result.ips[0].gateway.map(|g| g.to_string()).as_deref(), Some("169.254.1.1"));
    assert_eq!(result.ips[0].interface, Some(1));
    let routes: Vec<String> = result.routes.iter().map(|r| format!("{} via {:?}", r.dst, r.gw)).collect();
    assert_eq!(routes, ["0.0.0.0/0 via Some(169.254.1.1)"]);

    assert_eq!(s.dp().pod_links(POD_A), ["eth0"]);
    assert_eq!(s.dp().host_ends(), std::slice::from_ref(&host_name));
    let kernel = s.dp().kernel.borrow();
    assert_eq!(kernel.host[&host_name].alias, attachment::link_alias("net1", "ctr-a", "eth0"));
    assert_eq!(kernel.host[&host_name].link.spec.mtu, 1280);
    assert!(kernel.forwarding_v4 && !kernel.forwarding_v6);
    assert!(kernel.guard, "no pod veth without the anti-spoofing guard");
    assert_eq!(kernel.host[&host_name].link.spec.shape, attachment::GatewayShape::LinkLocal);
    assert_eq!(s.ipam().calls(), [Command::Add]);
    assert_eq!(s.dp().closes.get(), 1, "the kernel work ended before the result is written");
}

#[test]
fn the_host_end_carries_the_namespace_group_when_policies_are_enforced() {
    let s = Setup::new();
    let add = |cid: &str, pod: &str, extra: Value| {
        let mut req = s.request("ADD", cid, Some(pod), &s.conf(extra));
        req.args.push(("K8S_POD_NAMESPACE".into(), "shop".into()));
        s.plugin.add(&req).unwrap();
        s.dp().kernel.borrow().host[&attachment::host_veth_name(cid, "eth0")].link.spec.group
    };
    assert_eq!(add("ctr-a", POD_A, json!({})), Some(crate::podgroup::namespace_group("shop")), "on by default");
    assert_eq!(add("ctr-b", POD_B, json!({"enable_network_policy": false})), None);
}

#[test]
fn add_refuses_an_existing_interface_and_a_bad_namespace_before_asking_the_ipam() {
    let s = Setup::new();
    s.add("ctr-a", POD_A).unwrap();
    let err = s.add("ctr-b", POD_A).unwrap_err();
    assert_eq!(err.code, code::INTERFACE_EXISTS, "{err}");

    let err = s.add("ctr-c", HOST_NETNS).unwrap_err();
    assert_eq!(err.code, code::INVALID_ENV);
    assert!(err.msg.contains("own network namespace"), "{err}");
    let err = s.add("ctr-d", "/fake/netns/gone").unwrap_err();
    assert_eq!(err.code, code::INVALID_ENV);
    assert!(err.msg.contains("/fake/netns/gone"), "{err}");

    assert_eq!(s.ipam().calls(), [Command::Add], "only the first ADD reached the IPAM");
    assert_eq!(s.dp().host_ends().len(), 1);
}

#[test]
fn a_failed_ipam_changes_nothing() {
    let s = Setup::new();
    s.ipam().fail.borrow_mut().push(Command::Add);
    let err = s.add("ctr-a", POD_A).unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN_LATER, "the IPAM's code reaches the runtime: {err}");
    assert!(s.dp().pod_links(POD_A).is_empty());
    assert!(s.dp().host_ends().is_empty());
    assert!(!s.dp().kernel.borrow().forwarding_v4, "nothing was configured");
    assert_eq!(s.ipam().calls(), [Command::Add], "nothing to release");
}

#[test]
fn a_failed_attach_is_rolled_back_and_the_address_released() {
    let s = Setup::new();
    s.dp().fail.borrow_mut().attach = true;
    let err = s.add("ctr-a", POD_A).unwrap_err();
    assert_eq!(err.code, code::INTERNAL, "{err}");
    assert!(s.dp().pod_links(POD_A).is_empty(), "the pod end went with the host end");
    assert!(s.dp().host_ends().is_empty());
    assert_eq!(s.ipam().calls(), [Command::Add, Command::Del]);
    assert!(s.ipam().held().is_empty());

    // The same attachment works once the kernel does.
    s.dp().fail.borrow_mut().attach = false;
    s.add("ctr-a", POD_A).unwrap();
    assert_eq!(s.dp().pod_links(POD_A), ["eth0"]);
}

#[test]
fn an_ipam_result_without_an_address_is_rolled_back() {
    let s = Setup::new();
    *s.ipam().add_answer.borrow_mut() = Some(json!({"cniVersion": "1.0.0", "ips": []}));
    let err = s.add("ctr-a", POD_A).unwrap_err();
    assert!(err.msg.contains("returned no address"), "{err}");
    assert_eq!(s.ipam().calls(), [Command::Add, Command::Del]);
    assert!(s.dp().host_ends().is_empty());
}

#[test]
fn add_replaces_the_host_end_a_killed_add_left_behind() {
    let s = Setup::new();
    s.add("ctr-a", POD_A).unwrap();
    // The pod end is gone (the sandbox was recreated), the host end is still there.
    s.dp().kernel.borrow_mut().pods.get_mut(std::path::Path::new(POD_A)).unwrap().clear();
    s.add("ctr-a", POD_A).unwrap();
    assert_eq!(s.dp().host_ends().len(), 1);
    assert_eq!(s.dp().pod_links(POD_A), ["eth0"]);
}

#[test]
fn del_releases_and_removes_and_may_repeat() {
    let s = Setup::new();
    let result = s.add("ctr-a", POD_A).unwrap();
    let del = s.request("DEL", "ctr-a", Some(POD_A), &s.with_prev(&result));
    s.plugin.del(&del).unwrap();
    assert!(s.dp().host_ends().is_empty() && s.dp().pod_links(POD_A).is_empty());
    assert!(s.ipam().held().is_empty());
    // Again, and without a namespace or prevResult: all already gone is success.
    s.plugin.del(&del).unwrap();
    s.plugin.del(&s.request("DEL", "ctr-a", None, &s.conf(json!({})))).unwrap();
    assert_eq!(s.ipam().calls(), [Command::Add, Command::Del, Command::Del, Command::Del]);
    assert_eq!(s.dp().closes.get(), 4);
}

#[test]
fn del_goes_on_past_failures_and_reports_them_all_with_the_first_code() {
    let s = Setup::new();
    s.add("ctr-a", POD_A).unwrap();
    s.ipam().fail.borrow_mut().push(Command::Del);
    s.dp().fail.borrow_mut().detach = true;
    let err = s.plugin.del(&s.request("DEL", "ctr-a", Some(POD_A), &s.conf(json!({})))).unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN_LATER, "the first failure's code: {err}");
    assert!(err.msg.starts_with("DEL finished with errors: "), "{err}");
    assert!(err.msg.contains("fake IPAM refuses DEL") && err.msg.contains("vanished"), "both failures: {err}");

    // The same rule whichever failed first: the veth alone.
    s.ipam().fail.borrow_mut().clear();
    let err = s.plugin.del(&s.request("DEL", "ctr-a", Some(POD_A), &s.conf(json!({})))).unwrap_err();
    assert_eq!(err.code, code::INTERNAL, "{err}");
}

#[test]
fn check_passes_after_add_and_names_every_drift() {
    let s = Setup::new();
    let result = s.add("ctr-a", POD_A).unwrap();
    let check = s.request("CHECK", "ctr-a", Some(POD_A), &s.with_prev(&result));
    s.plugin.check(&check).unwrap();

    let host_name = attachment::host_veth_name("ctr-a", "eth0");
    {
        let mut k = s.dp().kernel.borrow_mut();
        let link = k.pods.get_mut(std::path::Path::new(POD_A)).unwrap().get_mut("eth0").unwrap();
        link.spec.mtu = 1500;
        k.host.remove(&host_name);
    }
    let err = s.plugin.check(&check).unwrap_err();
    assert_eq!(err.code, code::CHECK_FAILED);
    assert!(err.details.contains("MTU 1500") && err.details.contains(&host_name), "{}", err.details);

    let no_prev = s.request("CHECK", "ctr-a", Some(POD_A), &s.conf(json!({})));
    assert_eq!(s.plugin.check(&no_prev).unwrap_err().code, code::INVALID_CONFIG);
}

#[test]
fn check_asks_the_ipam_first() {
    let s = Setup::new();
    let result = s.add("ctr-a", POD_A).unwrap();
    s.ipam().state.borrow_mut().held.clear();
    let err = s.plugin.check(&s.request("CHECK", "ctr-a", Some(POD_A), &s.with_prev(&result))).unwrap_err();
    assert_eq!(err.code, code::CHECK_FAILED);
    assert!(err.msg.contains("holds no address"), "{err}");
}

#[test]
fn gc_removes_only_this_networks_stale_pairs() {
    let s = Setup::new();
    s.add("ctr-a", POD_A).unwrap();
    s.add("ctr-b", POD_B).unwrap();
    // A pair of another network on the same node.
    let other = s.request("ADD", "ctr-x", Some("/fake/netns/pod-x"), &s.conf(json!({"name": "net2"})));
    s.dp().kernel.borrow_mut().pods.insert("/fake/netns/pod-x".into(), Default::default());
    s.plugin.add(&other).unwrap();

    let gc = s.conf(json!({"cni.dev/valid-attachments": [{"containerID": "ctr-a", "ifname": "eth0"}]}));
    s.plugin.gc(&s.request("GC", "", None, &gc)).unwrap();
    let mut left = s.dp().host_ends();
    left.sort();
    let mut want = vec![attachment::host_veth_name("ctr-a", "eth0"), attachment::host_veth_name("ctr-x", "eth0")];
    want.sort();
    assert_eq!(left, want);
    assert!(s.dp().pod_links(POD_B).is_empty());
    assert_eq!(s.ipam().calls().last(), Some(&Command::Gc));
}

#[test]
fn gc_goes_on_past_failures_and_reports_them_all_with_the_first_code() {
    let s = Setup::new();
    s.dp().fail.borrow_mut().host_links = true;
    s.ipam().fail.borrow_mut().push(Command::Gc);
    let gc = s.conf(json!({"cni.dev/valid-attachments": []}));
    let err = s.plugin.gc(&s.request("GC", "", None, &gc)).unwrap_err();
    assert_eq!(err.code, code::INTERNAL, "{err}");
    assert!(err.msg.starts_with("GC finished with errors: "), "{err}");
    assert!(err.msg.contains("host links") && err.msg.contains("fake IPAM refuses GC"), "{err}");
    assert_eq!(s.ipam().calls(), [Command::Gc], "the IPAM's GC ran although the links could not be listed");
}

#[test]
fn gc_without_the_valid_attachments_changes_nothing_and_says_so() {
    let s = Setup::new();
    s.add("ctr-a", POD_A).unwrap();
    let err = s.plugin.gc(&s.request("GC", "", None, &s.conf(json!({})))).unwrap_err();
    assert_eq!(err.code, code::INVALID_CONFIG, "{err}");
    assert!(err.msg.contains("nothing is removed"), "{err}");
    assert_eq!(s.dp().host_ends().len(), 1, "the attachment stays");
    assert_eq!(s.ipam().held().len(), 1, "its address stays");
    assert_eq!(s.ipam().calls(), [Command::Add], "the IPAM is not asked to collect anything");
}

#[test]
fn a_host_route_someone_else_owns_fails_the_add_and_replaces_nothing() {
    let s = Setup::new();
    let first = s.add("ctr-a", POD_A).unwrap();
    // Another network hands out the same address on the same node.
    let same = json!({"cniVersion": "1.0.0", "ips": [{"address": first.ips[0].address.to_string()}]});
    *s.ipam().add_answer.borrow_mut() = Some(same);
    let other = s.request("ADD", "ctr-b", Some(POD_B), &s.conf(json!({"name": "net2"})));
    let err = s.plugin.add(&other).unwrap_err();
    assert_eq!(err.code, code::ROUTE_CONFLICT, "{err}");
    assert!(err.msg.contains(&attachment::host_veth_name("ctr-a", "eth0")), "the other owner is named: {err}");
    assert_eq!(s.dp().host_ends(), [attachment::host_veth_name("ctr-a", "eth0")], "the first attachment stays");
    assert!(s.dp().pod_links(POD_B).is_empty(), "the new pair was rolled back");
    assert_eq!(s.ipam().calls(), [Command::Add, Command::Add, Command::Del]);
}

#[test]
fn check_accepts_an_attachment_of_the_previous_shape() {
    let s = Setup::new();
    let mut result = s.add("ctr-a", POD_A).unwrap();
    // What an earlier version reported: the IPAM's gateway, held by the host end.
    let legacy_gw: std::net::IpAddr = "10.1.0.1".parse().unwrap();
    result.ips[0].gateway = Some(legacy_gw);
    result.routes[0].gw = Some(legacy_gw);
    let host_name = attachment::host_veth_name("ctr-a", "eth0");
    {
        let mut k = s.dp().kernel.borrow_mut();
        let link = &mut k.host.get_mut(&host_name).unwrap().link;
        link.spec.shape = attachment::GatewayShape::Legacy;
        link.spec.addresses[0].gateway = legacy_gw;
    }
    let check = s.request("CHECK", "ctr-a", Some(POD_A), &s.with_prev(&result));
    s.plugin.check(&check).unwrap();
    let del = s.request("DEL", "ctr-a", Some(POD_A), &s.with_prev(&result));
    s.plugin.del(&del).unwrap();
    assert!(s.dp().host_ends().is_empty());
}

#[test]
fn status_needs_a_pod_cidr_and_the_ipam() {
    let s = Setup::new();
    s.plugin.status(&s.request("STATUS", "", None, &s.conf(json!({})))).unwrap();
    let no_cidr = s.conf(json!({"pod_cidr": null}));
    let err = s.plugin.status(&s.request("STATUS", "", None, &no_cidr)).unwrap_err();
    assert_eq!(err.code, code::NOT_AVAILABLE, "{err}");
    s.ipam().fail.borrow_mut().push(Command::Status);
    assert!(s.plugin.status(&s.request("STATUS", "", None, &s.conf(json!({})))).is_err());
}

#[test]
fn the_whole_protocol_runs_over_the_fakes() {
    let s = Setup::new();
    let env: HashMap<String, String> = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "ctr-a"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", POD_A),
        ("CNI_PATH", "/nowhere"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut out = Vec::new();
    let code = cni::run(&s.plugin, &env, &mut s.conf(json!({})).to_string().as_bytes(), &mut out);
    assert_eq!(code, 0);
    let printed: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(printed["cniVersion"], "1.1.0");
    assert_eq!(printed["ips"][0]["address"], "10.1.0.2/24");
    assert_eq!(printed["interfaces"][1]["sandbox"], POD_A);
}
