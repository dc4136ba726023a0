//! In-memory fakes of the plugin's two seams, for unit tests of the verbs without root: a
//! kernel of pod namespaces and host ends ([`FakeDataplane`]) and an IPAM that hands out
//! addresses of 10.1.0.0/24 ([`FakeIpam`]). Each can be told to fail an operation, and each
//! records what it was asked, so a test sees what a verb did and what it left behind.

use super::attachment::{Attached, AttachmentSpec};
use super::dataplane::{Dataplane, DataplaneError, HostLink};
use super::ipam::IpamDelegate;
use crate::cni::{CniError, Command, Request, code};
use crate::netlink::Link;
use serde_json::{Map, Value, json};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The namespace path the fake treats as the plugin's own.
pub const HOST_NETNS: &str = "/fake/netns/host";

/// One end of a veth pair in the fake kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLink {
    pub index: u32,
    pub mac: String,
    /// What [`Dataplane::attach`] configured on the pair.
    pub spec: AttachmentSpec,
}

/// A host end: its pod end lives in `pod` as `spec.ifname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeHostEnd {
    pub link: FakeLink,
    pub alias: String,
    pub pod: PathBuf,
}

/// The fake kernel's state.
#[derive(Debug, Default)]
pub struct FakeKernel {
    /// Pod namespaces that exist, each with its interfaces by name.
    pub pods: BTreeMap<PathBuf, BTreeMap<String, FakeLink>>,
    /// Host ends by name; an entry of `aliased` stands for a link someone else made.
    pub host: BTreeMap<String, FakeHostEnd>,
    pub forwarding_v4: bool,
    pub forwarding_v6: bool,
    /// The anti-spoofing guard exists.
    pub guard: bool,
    next_index: u32,
}

/// Which operations fail, and how.
#[derive(Debug, Default)]
pub struct DataplaneFailures {
    /// `attach` creates the pair, then fails (as a route the kernel refuses would).
    pub attach: bool,
    pub detach: bool,
    pub host_links: bool,
}

#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub kernel: RefCell<FakeKernel>,
    pub fail: RefCell<DataplaneFailures>,
    /// How often a verb ended its kernel work ([`Dataplane::close`]).
    pub closes: std::cell::Cell<usize>,
}

impl FakeDataplane {
    /// A kernel with these pod namespaces, empty.
    pub fn with_pods(pods: &[&str]) -> Self {
        let fake = Self::default();
        for p in pods {
            fake.kernel.borrow_mut().pods.insert(PathBuf::from(p), BTreeMap::new());
        }
        fake
    }

    /// The interface names in a pod.
    pub fn pod_links(&self, pod: &str) -> Vec<String> {
        self.kernel.borrow().pods.get(Path::new(pod)).map(|l| l.keys().cloned().collect()).unwrap_or_default()
    }

    /// The host ends' names.
    pub fn host_ends(&self) -> Vec<String> {
        self.kernel.borrow().host.keys().cloned().collect()
    }
}

impl Dataplane for FakeDataplane {
    type Pod = PathBuf;

    fn open_pod(&self, netns: &Path) -> Result<PathBuf, CniError> {
        if netns == Path::new(HOST_NETNS) {
            return Err(CniError::invalid_env("CNI_NETNS is the plugin's own network namespace"));
        }
        if !self.kernel.borrow().pods.contains_key(netns) {
            return Err(CniError::invalid_env(format!("CNI_NETNS {}: No such file or directory", netns.display())));
        }
        Ok(netns.to_path_buf())
    }

    fn pod_has_link(&self, pod: &PathBuf, ifname: &str) -> Result<bool, DataplaneError> {
        Ok(self.kernel.borrow().pods.get(pod).is_some_and(|l| l.contains_key(ifname)))
    }

    fn ensure_guard(&self) -> Result<bool, DataplaneError> {
        let mut k = self.kernel.borrow_mut();
        let created = !k.guard;
        k.guard = true;
        Ok(created)
    }

    fn enable_forwarding(&self, ipv4: bool, ipv6: bool) -> Result<(), DataplaneError> {
        let mut k = self.kernel.borrow_mut();
        k.forwarding_v4 |= ipv4;
        k.forwarding_v6 |= ipv6;
        Ok(())
    }

    fn attach(&self, pod: &PathBuf, spec: &AttachmentSpec) -> Result<Attached, DataplaneError> {
        let mut k = self.kernel.borrow_mut();
        if k.host.contains_key(&spec.host_name) || k.pods.get(pod).is_some_and(|l| l.contains_key(&spec.ifname)) {
            return Err(DataplaneError::Vanished(format!("{} exists", spec.host_name)));
        }
        k.next_index += 2;
        let (host_index, pod_index) = (k.next_index, k.next_index + 1);
        let mac = |i: u32| format!("0a:58:00:00:00:{:02x}", i % 256);
        let pod_link = FakeLink { index: pod_index, mac: mac(pod_index), spec: spec.clone() };
        let host_link = FakeLink { index: host_index, mac: mac(host_index), spec: spec.clone() };
        // A host route to one of the addresses already exists: the kernel's EEXIST.
        let taken = k.host.values().find_map(|end| {
            let have = &end.link.spec.addresses;
            spec.addresses.iter().find(|a| have.iter().any(|h| h.address.ip() == a.address.ip())).map(|a| (a, end))
        });
        let conflict = taken.map(|(a, end)| DataplaneError::RouteConflict {
            dst: a.pod_host(),
            owner: format!("dev {}, attachment of {}", end.link.spec.host_name, end.alias),
        });
        k.pods.entry(pod.clone()).or_default().insert(spec.ifname.clone(), pod_link.clone());
        k.host.insert(
            spec.host_name.clone(),
            FakeHostEnd { link: host_link.clone(), alias: spec.alias.clone(), pod: pod.clone() },
        );
        if let Some(e) = conflict {
            return Err(e);
        }
        if self.fail.borrow().attach {
            return Err(DataplaneError::Vanished(spec.ifname.clone()));
        }
        let link = |l: &FakeLink, name: &str| Link {
            index: l.index,
            name: name.to_string(),
            mtu: spec.mtu,
            mac: Some(l.mac.clone()),
            up: true,
            kind: Some("veth".into()),
            peer_index: None,
            alias: None,
        };
        Ok(Attached { host: link(&host_link, &spec.host_name), pod: link(&pod_link, &spec.ifname) })
    }

    fn detach(&self, host_name: &str) -> Result<bool, DataplaneError> {
        if self.fail.borrow().detach {
            return Err(DataplaneError::Vanished(host_name.to_string()));
        }
        let mut k = self.kernel.borrow_mut();
        let Some(end) = k.host.remove(host_name) else { return Ok(false) };
        if let Some(links) = k.pods.get_mut(&end.pod) {
            links.remove(&end.link.spec.ifname);
        }
        Ok(true)
    }

    fn check(
        &self,
        pod: &PathBuf,
        spec: &AttachmentSpec,
        expected_mac: Option<&str>,
    ) -> Result<Vec<String>, DataplaneError> {
        let k = self.kernel.borrow();
        let mut problems = Vec::new();
        let Some(link) = k.pods.get(pod).and_then(|l| l.get(&spec.ifname)) else {
            problems.push(format!("interface {} is missing from the pod", spec.ifname));
            return Ok(problems);
        };
        if expected_mac.is_some_and(|m| !m.eq_ignore_ascii_case(&link.mac)) {
            problems.push(format!("interface {} has MAC {}", spec.ifname, link.mac));
        }
        if link.spec.mtu != spec.mtu {
            problems.push(format!("interface {} has MTU {}, expected {}", spec.ifname, link.spec.mtu, spec.mtu));
        }
        for a in &spec.addresses {
            if !link.spec.addresses.iter().any(|have| have.address == a.address) {
                problems.push(format!("address {} is missing from {}", a.address, spec.ifname));
            }
        }
        for r in &spec.routes {
            if !link.spec.routes.iter().any(|have| have.dst == r.dst) {
                problems.push(format!("route to {} is missing in the pod", r.dst));
            }
        }
        if let Some(end) = k.host.get(&spec.host_name)
            && end.link.spec.shape != spec.shape
        {
            problems.push(format!("the attachment's gateway is {:?}, expected {:?}", end.link.spec.shape, spec.shape));
        }
        if !k.host.contains_key(&spec.host_name) {
            problems.push(format!("host interface {} is missing", spec.host_name));
        }
        Ok(problems)
    }

    fn host_links(&self) -> Result<Vec<HostLink>, DataplaneError> {
        if self.fail.borrow().host_links {
            return Err(DataplaneError::Vanished("host links".into()));
        }
        let k = self.kernel.borrow();
        Ok(k.host.iter().map(|(name, end)| HostLink { name: name.clone(), alias: end.alias.clone() }).collect())
    }

    fn close(&self) {
        self.closes.set(self.closes.get() + 1);
    }
}

/// The fake IPAM's state: who holds which address, and every call.
#[derive(Debug, Default)]
pub struct FakeIpamState {
    pub held: BTreeMap<(String, String), IpAddr>,
    pub calls: Vec<Command>,
    next: u8,
}

#[derive(Debug, Default)]
pub struct FakeIpam {
    pub state: RefCell<FakeIpamState>,
    /// Verbs that fail (with code 11, try again later).
    pub fail: RefCell<Vec<Command>>,
    /// ADD succeeds but answers this instead of a result.
    pub add_answer: RefCell<Option<Value>>,
}

impl FakeIpam {
    pub fn held(&self) -> Vec<IpAddr> {
        self.state.borrow().held.values().copied().collect()
    }

    pub fn calls(&self) -> Vec<Command> {
        self.state.borrow().calls.clone()
    }
}

impl IpamDelegate for FakeIpam {
    fn run(
        &self,
        req: &Request,
        _config: Map<String, Value>,
        _kind: &str,
        command: Command,
        _timeout: std::time::Duration,
    ) -> Result<Option<Value>, CniError> {
        let mut st = self.state.borrow_mut();
        st.calls.push(command);
        if self.fail.borrow().contains(&command) {
            return Err(CniError::new(code::TRY_AGAIN_LATER, format!("fake IPAM refuses {command}")));
        }
        let key = (req.container_id.clone(), req.ifname.clone());
        match command {
            Command::Add => {
                if let Some(answer) = self.add_answer.borrow().clone() {
                    return Ok(Some(answer));
                }
                st.next += 1;
                let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1 + st.next));
                st.held.insert(key, ip);
                Ok(Some(
                    json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{ip}/24"), "gateway": "10.1.0.1"}]}),
                ))
            }
            Command::Del => {
                st.held.remove(&key);
                Ok(None)
            }
            Command::Check if !st.held.contains_key(&key) => {
                Err(CniError::new(code::CHECK_FAILED, format!("{} holds no address", req.container_id)))
            }
            Command::Gc => {
                let valid = req.valid_attachments()?;
                st.held.retain(|(cid, ifname), _| valid.iter().any(|a| &a.container_id == cid && &a.ifname == ifname));
                Ok(None)
            }
            Command::Check | Command::Status | Command::Version => Ok(None),
        }
    }
}
