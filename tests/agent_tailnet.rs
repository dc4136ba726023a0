//! Root-only, real daemons: Headscale and one tailscaled per node, each in a network namespace
//! this test creates, with `headcni agent` on every node and pods set up by the real `headcni`
//! CNI plugin. Proves the zero-config join, route advertisement and approval (only the node's
//! own routes), pod-to-pod traffic across the tailnet with pod source addresses, masquerading
//! towards the outside, the metrics of the plugin's ADDs, survival of agent, tailscaled and
//! Headscale restarts, and `--cleanup`.
//!
//! Needs `HEADCNI_TEST_PEERS=<dir>` with `headscale`, `tailscaled` and `tailscale` (or the
//! harness's `HEADSCALE_BIN`, `TAILSCALED_BIN`, `TAILSCALE_BIN`; e.g. Headscale v0.29.2 and
//! Tailscale v1.102.3), `ip`, `curl`, `nft` and `ping`, and runs as root; otherwise it is
//! skipped. The CNI part also needs host-local (`HEADCNI_TEST_CNI_PATH`, default /usr/lib/cni).
//!
//!     HEADCNI_TEST_PEERS=/path/to/bin cargo test --test agent_tailnet -- --nocapture

mod common;

use common::{Netns, run};
use headcni::agent::report::AgentReport;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The two scenarios share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const HS_ADDR: &str = "172.31.98.2";
const HS_URL: &str = "http://172.31.98.2:8080";
const INET_ADDR: &str = "172.31.99.2";
const TAG: &str = "tag:headcni";
const METRICS_PORT: u16 = 9100;

struct Peers {
    headscale: PathBuf,
    tailscaled: PathBuf,
    tailscale: PathBuf,
}

/// The binaries: `HEADCNI_TEST_PEERS=<dir>` holding all three, or each one by the variables the
/// integration harness exports (`HEADSCALE_BIN`, `TAILSCALED_BIN`, `TAILSCALE_BIN`).
fn peers() -> Option<Peers> {
    let dir = std::env::var_os("HEADCNI_TEST_PEERS").map(PathBuf::from);
    let pick = |var: &str, name: &str| -> Option<PathBuf> {
        std::env::var_os(var).map(PathBuf::from).or_else(|| dir.as_ref().map(|d| d.join(name)))
    };
    let p = Peers {
        headscale: pick("HEADSCALE_BIN", "headscale")?,
        tailscaled: pick("TAILSCALED_BIN", "tailscaled")?,
        tailscale: pick("TAILSCALE_BIN", "tailscale")?,
    };
    [&p.headscale, &p.tailscaled, &p.tailscale].iter().all(|b| b.is_file()).then_some(p)
}

fn headcni() -> PathBuf {
    common::headcni_exe()
}

fn log(msg: &str) {
    eprintln!("[agent_tailnet] {msg}");
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// A daemon: SIGTERM on drop, SIGKILL if it lingers.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| panic!("{name}: {e}"));
        Proc { name: name.into(), child }
    }

    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_raw(self.child.id() as i32).unwrap()
    }

    /// SIGTERM and wait; answers the exit code and how long it took.
    fn stop(&mut self, grace: Duration) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        if let Ok(Some(st)) = self.child.try_wait() {
            return (st.code(), Duration::ZERO);
        }
        let _ = rustix::process::kill_process(self.pid(), rustix::process::Signal::TERM);
        while t0.elapsed() < grace {
            if let Ok(Some(st)) = self.child.try_wait() {
                return (st.code(), t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM; killing", self.name);
        let _ = self.child.kill();
        let st = self.child.wait().ok();
        (st.and_then(|s| s.code()), t0.elapsed())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

struct Node {
    i: u8,
    ns: Netns,
    dir: PathBuf,
    pod_cidr: String,
    tailscaled: Option<Proc>,
    agent: Option<Proc>,
    pods: Vec<Netns>,
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("tailscaled.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    fn report(&self) -> Option<AgentReport> {
        AgentReport::load(&self.run_dir())
    }
    fn address(&self) -> String {
        format!("172.31.98.{}", 10 + self.i)
    }
    fn tailscale(&self, peers: &Peers, args: &[&str]) -> String {
        let out = Command::new(&peers.tailscale).arg("--socket").arg(self.socket()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    /// Whether tailscaled talks to the peer named `host` over a direct UDP path rather than
    /// through DERP (which Headscale serves, so it goes away with Headscale).
    fn direct_to(&self, peers: &Peers, host: &str) -> bool {
        let v: Value = serde_json::from_str(&self.tailscale(peers, &["status", "--json"])).unwrap_or(Value::Null);
        v["Peer"].as_object().is_some_and(|m| {
            m.values().any(|p| p["HostName"] == host && p["CurAddr"].as_str().is_some_and(|a| !a.is_empty()))
        })
    }
    fn prefs_routes(&self, peers: &Peers) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.tailscale(peers, &["debug", "prefs"])).unwrap_or(Value::Null);
        v["AdvertiseRoutes"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r.as_str().map(String::from)).collect())
            .unwrap_or_default()
    }
}

struct Cluster {
    peers: Peers,
    dir: tempfile::TempDir,
    /// The Kubernetes API the agents read their Nodes from, when there is one.
    kube: Option<FakeKube>,
    // Drop order: processes (fields below nodes are dropped after), then namespaces.
    headscale: Option<Proc>,
    nodes: Vec<Node>,
    hs_ns: Netns,
    inet: Netns,
    ul: Netns,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.agent.take();
            n.tailscaled.take();
        }
        self.headscale.take();
        self.kube.take();
        if std::thread::panicking() {
            for f in std::fs::read_dir(self.dir.path().join("logs")).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(f.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("===== {} (tail)", f.path().display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn write_secret(path: &Path, value: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path).unwrap();
    f.write_all(value.as_bytes()).unwrap();
}

impl Cluster {
    /// Whether node 1 and node 2 talk to each other over direct paths, not through DERP.
    fn direct_both_ways(&self) -> bool {
        self.nodes[0].direct_to(&self.peers, "node-2") && self.nodes[1].direct_to(&self.peers, "node-1")
    }
    /// The underlay (172.31.98.0/24, outside every cluster and service CIDR of the test): a bridge
    /// in `ul` joining Headscale, the nodes and a router to `inet` (172.31.99.0/24).
    fn new(peers: Peers, nodes: u8, auto_approve: &[&str]) -> Cluster {
        Self::with_acls(peers, nodes, auto_approve, &[])
    }

    /// A cluster whose policy also has `extra_acls`.
    fn with_acls(peers: Peers, nodes: u8, auto_approve: &[&str], extra_acls: &[Value]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let ul = Netns::new("ul");
        // A fixed address: a bridge without one takes the lowest of its ports' addresses and
        // changes it as ports join, leaving the nodes' ARP entry for the router stale.
        ul.ip("link add br0 address 02:48:43:00:00:01 type bridge");
        ul.ip("addr add 172.31.98.1/24 dev br0");
        ul.ip("link set br0 up");
        ul.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let attach = |ns: &Netns, name: &str, addr: &str| {
            ul.ip(&format!("link add {name} type veth peer name eth0 netns {}", ns.name));
            ul.ip(&format!("link set {name} master br0 up"));
            ns.ip(&format!("addr add {addr}/24 dev eth0"));
            ns.ip("link set eth0 up");
        };
        let hs_ns = Netns::new("hs");
        attach(&hs_ns, "vhs", HS_ADDR);
        let inet = Netns::new("inet");
        ul.ip(&format!("link add vinet type veth peer name eth0 netns {}", inet.name));
        ul.ip("addr add 172.31.99.1/24 dev vinet");
        ul.ip("link set vinet up");
        inet.ip(&format!("addr add {INET_ADDR}/24 dev eth0"));
        inet.ip("link set eth0 up");
        inet.ip("route add 172.31.98.0/24 via 172.31.99.1");

        let mut cluster = Cluster { peers, dir, kube: None, headscale: None, nodes: Vec::new(), hs_ns, inet, ul };
        cluster.write_headscale_config(auto_approve, extra_acls);
        cluster.start_headscale();
        for i in 1..=nodes {
            let ns = Netns::new(&format!("n{i}"));
            cluster.ul.ip(&format!("link add vn{i} type veth peer name eth0 netns {}", ns.name));
            cluster.ul.ip(&format!("link set vn{i} master br0 up"));
            ns.ip(&format!("addr add 172.31.98.{}/24 dev eth0", 10 + i));
            ns.ip("link set eth0 up");
            ns.ip("route add default via 172.31.98.1");
            let ndir = cluster.dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&ndir).unwrap();
            std::fs::write(ndir.join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
            let mut node = Node {
                i,
                ns,
                dir: ndir,
                pod_cidr: format!("10.244.{i}.0/24"),
                tailscaled: None,
                agent: None,
                pods: Vec::new(),
            };
            start_tailscaled(&cluster.peers, cluster.dir.path(), &mut node);
            cluster.nodes.push(node);
        }
        cluster
    }

    fn hs_dir(&self) -> PathBuf {
        self.dir.path().join("headscale")
    }

    fn write_headscale_config(&self, auto_approve: &[&str], extra_acls: &[Value]) {
        let d = self.hs_dir();
        std::fs::create_dir_all(d.join("lib")).unwrap();
        let cfg = format!(
            "server_url: {HS_URL}\nlisten_addr: {HS_ADDR}:8080\nmetrics_listen_addr: 127.0.0.1:9090\n\
             grpc_listen_addr: 127.0.0.1:50443\nnoise:\n  private_key_path: {d}/lib/noise.key\n\
             prefixes:\n  v4: 100.64.0.0/10\n  v6: fd7a:115c:a1e0::/48\n  allocation: sequential\n\
             derp:\n  server:\n    enabled: true\n    region_id: 999\n    region_code: headcni\n    region_name: headcni\n\
             \x20   stun_listen_addr: {HS_ADDR}:3478\n    private_key_path: {d}/lib/derp.key\n\
             \x20   automatically_add_embedded_derp_region: true\n    ipv4: {HS_ADDR}\n  urls: []\n  paths: []\n\
             \x20 auto_update_enabled: false\ndisable_check_updates: true\n\
             database:\n  type: sqlite\n  sqlite:\n    path: {d}/lib/db.sqlite\n\
             log:\n  level: info\npolicy:\n  mode: file\n  path: {d}/policy.hujson\n\
             dns:\n  magic_dns: false\n  base_domain: headcni.invalid\n  override_local_dns: false\n  nameservers:\n    global: []\n\
             unix_socket: {d}/headscale.sock\nunix_socket_permission: \"0770\"\nlogtail:\n  enabled: false\n",
            d = d.display()
        );
        std::fs::write(d.join("config.yaml"), cfg).unwrap();
        let approvers: serde_json::Map<String, Value> =
            auto_approve.iter().map(|r| (r.to_string(), json!([TAG]))).collect();
        let mut acls = vec![
            json!({"action": "accept", "src": [TAG, "10.244.0.0/16"], "dst": [format!("{TAG}:*"), "10.244.0.0/16:*"]}),
        ];
        acls.extend(extra_acls.iter().cloned());
        let policy = json!({
            "tagOwners": {TAG: ["headcni@"]},
            "autoApprovers": {"routes": approvers},
            "acls": acls,
        });
        std::fs::write(d.join("policy.hujson"), serde_json::to_string_pretty(&policy).unwrap()).unwrap();
    }

    fn hs_cli(&self, args: &[&str]) -> String {
        let out = Command::new(&self.peers.headscale)
            .arg("-c")
            .arg(self.hs_dir().join("config.yaml"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "headscale {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start_headscale(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hs_ns.name])
            .arg(&self.peers.headscale)
            .arg("-c")
            .arg(self.hs_dir().join("config.yaml"))
            .arg("serve");
        self.headscale = Some(Proc::spawn("headscale", cmd, &self.dir.path().join("logs/headscale.log")));
        let ul = self.ul.name.clone();
        wait_until("Headscale /health", Duration::from_secs(30), || {
            Command::new("ip")
                .args(["netns", "exec", &ul, "curl", "-fsS", "--max-time", "1", &format!("{HS_URL}/health")])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        let sock = self.hs_dir().join("headscale.sock");
        wait_until("Headscale socket", Duration::from_secs(10), || sock.exists());
    }

    fn keys(&self) -> (PathBuf, PathBuf) {
        let auth = self.dir.path().join("authkey");
        let api = self.dir.path().join("apikey");
        if !auth.exists() {
            self.hs_cli(&["users", "create", "headcni"]);
            let out = self.hs_cli(&[
                "preauthkeys",
                "create",
                "--reusable",
                "--expiration",
                "24h",
                "--tags",
                TAG,
                "-o",
                "json",
            ]);
            let key: Value = serde_json::from_str(&out).unwrap();
            write_secret(&auth, key["key"].as_str().unwrap());
            let api_key = self.hs_cli(&["apikeys", "create", "--expiration", "24h"]);
            write_secret(&api, api_key.trim());
            write_secret(
                &self.dir.path().join("apikey.header"),
                &format!("Authorization: Bearer {}\n", api_key.trim()),
            );
        }
        (auth, api)
    }

    fn start_agent(&mut self, i: usize, api_key: bool) {
        let (auth, api) = self.keys();
        let node = &mut self.nodes[i];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns.name]).arg(headcni()).arg("agent");
        cmd.args(["--node-name", &format!("node-{}", node.i), "--pod-cidr", &node.pod_cidr]);
        cmd.args(["--cluster-cidr", "10.244.0.0/16", "--service-cidr", "10.96.0.0/12", "--headscale-url", HS_URL]);
        cmd.arg("--tailscale-socket").arg(node.socket());
        cmd.arg("--run-dir").arg(node.run_dir()).arg("--state-dir").arg(node.dir.join("state"));
        cmd.args(["--metrics-bind", "127.0.0.1", "--metrics-port", &METRICS_PORT.to_string()]);
        cmd.arg("--auth-key-file").arg(&auth);
        if api_key {
            // Headscale is plain http inside the test's namespaces.
            cmd.arg("--api-key-file").arg(&api).arg("--allow-http-api-key");
        }
        cmd.env("HEADCNI_LOG_LEVEL", "info");
        // The node's own CNI configuration directory, empty: never the machine's.
        let conf_dir = node.dir.join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        cmd.env("HEADCNI_CONF_DIR", &conf_dir);
        node.agent = Some(Proc::spawn(
            &format!("agent-n{}", node.i),
            cmd,
            &self.dir.path().join(format!("logs/agent-n{}.log", node.i)),
        ));
    }

    /// Headscale's REST API at `path` (under /api/v1/, with the API key), by curl in the underlay:
    /// a GET, or a POST of `body`.
    fn hs_api(&self, path: &str, body: Option<&Value>) -> std::process::Output {
        let header = format!("@{}", self.dir.path().join("apikey.header").display());
        let url = format!("{HS_URL}/api/v1/{path}");
        let body = body.map(Value::to_string);
        let mut args = vec!["curl", "-fsS", "--max-time", "5", "-H", header.as_str()];
        if let Some(body) = &body {
            args.extend(["-H", "Content-Type: application/json", "-d", body.as_str()]);
        }
        args.push(&url);
        self.ul.exec(&args)
    }

    /// Headscale's node list.
    fn hs_node_list(&self) -> std::process::Output {
        self.hs_api("node", None)
    }

    /// Whether Headscale lists every one of `names` as online (its map poll connected); false
    /// while Headscale does not answer.
    fn hs_online(&self, names: &[&str]) -> bool {
        let v: Value = serde_json::from_slice(&self.hs_node_list().stdout).unwrap_or(Value::Null);
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        names.iter().all(|name| nodes.iter().any(|n| n["givenName"] == *name && n["online"] == true))
    }

    /// Headscale's nodes: (id, name, available, approved).
    fn hs_nodes(&self) -> Vec<(String, String, Vec<String>, Vec<String>)> {
        let out = self.hs_node_list();
        assert!(out.status.success(), "listing Headscale's nodes: {}", String::from_utf8_lossy(&out.stderr));
        let out = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&out).unwrap();
        let list = |n: &Value, k: &str| -> Vec<String> {
            n[k].as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
        };
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap_or("").to_string(),
                    n["givenName"].as_str().unwrap_or("").to_string(),
                    list(n, "availableRoutes"),
                    list(n, "approvedRoutes"),
                )
            })
            .collect()
    }

    fn metrics(&self, i: usize) -> String {
        self.nodes[i].ns.exec_ok(&[
            "curl",
            "-fsS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{METRICS_PORT}/metrics"),
        ])
    }

    /// A pod on node `i`, set up by the real CNI plugin (ADD) as a runtime would.
    fn add_pod(&mut self, i: usize, k: u8) -> String {
        self.add_pod_with(i, k, json!({}))
    }

    /// A pod as [`Cluster::add_pod`] makes it, with `extra` merged into the configuration.
    fn add_pod_with(&mut self, i: usize, k: u8, extra: Value) -> String {
        let cni_path = std::env::var("HEADCNI_TEST_CNI_PATH").unwrap_or_else(|_| "/usr/lib/cni".into());
        let pod = Netns::new(&format!("n{}p{k}", self.nodes[i].i));
        let node = &self.nodes[i];
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "headcni", "type": "headcni",
            "run_dir": node.run_dir(), "log_file": node.dir.join("cni.log"),
            "ipam": {"type": "host-local", "dataDir": node.dir.join("ipam")},
        });
        if let (Some(c), Value::Object(e)) = (conf.as_object_mut(), extra) {
            c.extend(e);
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns.name])
            .arg(headcni())
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("pod{}x{k}", node.i))
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "CNI ADD: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ip = result["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().to_string();
        self.nodes[i].pods.push(pod);
        ip
    }
}

/// Sends one datagram from `from` (a namespace) to `to` and answers the source `to` saw.
fn source_seen(from: &Path, to_ns: &Path, to: &str, port: u16) -> Option<String> {
    let dst: std::net::SocketAddr = format!("{to}:{port}").parse().unwrap();
    let server = headcni::netlink::Netns::open(to_ns).unwrap().bind_udp(dst).unwrap();
    server.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let client = headcni::netlink::Netns::open(from).unwrap().bind_udp("0.0.0.0:0".parse().unwrap()).unwrap();
    for _ in 0..6 {
        let _ = client.send_to(b"headcni", dst);
        let mut buf = [0u8; 16];
        if let Ok((_, src)) = server.recv_from(&mut buf) {
            return Some(src.ip().to_string());
        }
    }
    None
}

fn ping(from: &Netns, to: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &from.name, "ping", "-c", "1", "-W", "1", to])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn root_untouched() {
    let rules = String::from_utf8_lossy(&run("ip", &["rule"]).stdout).into_owned();
    assert!(!rules.contains("proto 104"), "a HeadCNI rule in the root namespace:\n{rules}");
    if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
        let tables = String::from_utf8_lossy(&out.stdout);
        assert!(!tables.contains("headcni"), "a HeadCNI table in the root namespace:\n{tables}");
    }
}

macro_rules! require_peers {
    () => {{
        require_root!();
        match peers() {
            Some(p) => p,
            None => {
                eprintln!(
                    "test skipped: set HEADCNI_TEST_PEERS to a directory with headscale, tailscaled and tailscale"
                );
                return;
            }
        }
    }};
}

#[test]
fn tailnet_with_api_key_approval_restarts_and_cleanup() {
    let peers = require_peers!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t_all = Instant::now();
    let mut c = Cluster::new(peers, 3, &[]);
    // Node 3 is a bystander without an agent: joined by hand, advertising a route of its own.
    let (auth, _) = c.keys();
    let out = c.nodes[2].tailscale(
        &c.peers,
        &[
            "up",
            "--login-server",
            HS_URL,
            "--auth-key",
            &format!("file:{}", auth.display()),
            "--hostname",
            "bystander",
            "--advertise-routes",
            "10.77.0.0/24",
            "--accept-dns=false",
            "--timeout",
            "60s",
        ],
    );
    assert!(out.is_empty() || !out.contains("error"), "{out}");
    // Both agents start at once: the zero-config join.
    c.start_agent(0, true);
    c.start_agent(1, true);
    let joined = wait_until("both nodes ready", Duration::from_secs(60), || {
        c.nodes[..2].iter().all(|n| n.report().is_some_and(|r| r.ready))
    });
    // Approved in Headscale, and in force on the node: its packet filter lets the other node's
    // pods in (Headscale sends the filter for a new route after the route itself).
    let approved = wait_until("both routes approved and admitted", Duration::from_secs(60), || {
        c.nodes[..2].iter().all(|n| {
            n.report().is_some_and(|r| {
                r.routes.iter().all(|x| x.approved == Some(true) && x.admitted == Some(true))
                    && !r.problems.iter().any(|p| p.id == "approval/packet_filter")
            })
        })
    }) + joined;
    log(&format!(
        "join: both agents ready {:.2}s after start; routes approved and admitted after {:.2}s",
        joined.as_secs_f64(),
        approved.as_secs_f64()
    ));
    for i in 1..=2 {
        let text = std::fs::read_to_string(c.dir.path().join(format!("logs/agent-n{i}.log"))).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains("] ready: ")) {
            log(&format!("agent n{i}: {}", line.split("] ").nth(1).unwrap_or(line)));
        }
    }

    // Headscale: each node has exactly its pod CIDR approved; the bystander nothing.
    let hs = c.hs_nodes();
    let by_name = |n: &str| hs.iter().find(|x| x.1 == n).cloned().unwrap_or_else(|| panic!("{n} not in {hs:?}"));
    assert_eq!(by_name("node-1").3, vec!["10.244.1.0/24"]);
    assert_eq!(by_name("node-2").3, vec!["10.244.2.0/24"]);
    let by = by_name("bystander");
    assert_eq!(by.2, vec!["10.77.0.0/24"], "the bystander advertises");
    assert!(by.3.is_empty(), "and the agents never approve it: {by:?}");

    // Prefs: routes, accept-routes, no SNAT.
    let prefs: Value = serde_json::from_str(&c.nodes[0].tailscale(&c.peers, &["debug", "prefs"])).unwrap();
    assert_eq!(prefs["AdvertiseRoutes"], json!(["10.244.1.0/24"]));
    assert_eq!(prefs["RouteAll"], true);
    assert_eq!(prefs["NoSNAT"], true);
    assert_eq!(prefs["CorpDNS"], false);

    // Pods by the real plugin; traffic across the tailnet keeps the pod source address.
    let pod1 = c.add_pod(0, 1);
    let pod2 = c.add_pod(1, 1);
    let ping_ok = wait_until("pod1 -> pod2 ping", Duration::from_secs(30), || ping(&c.nodes[0].pods[0], &pod2));
    log(&format!("pods {pod1} and {pod2}: first ping across the tailnet after {:.2}s", ping_ok.as_secs_f64()));
    // Right after joining, tailscaled rebinds its sockets once (the agent prompts its link
    // monitor to see its new addresses, see hostnet::LINK_MONITOR_TABLE); pods added in that
    // moment may lose a packet while the paths are found again. Once both nodes talk directly,
    // every packet must pass, also the first one of a connection opened from the other side
    // (it needs the packet filter that the wait above checked).
    let direct =
        wait_until("a direct path between node 1 and node 2", Duration::from_secs(30), || c.direct_both_ways());
    log(&format!("direct paths both ways {:.2}s after the first ping", direct.as_secs_f64()));
    assert!(ping(&c.nodes[1].pods[0], &pod1));
    let seen = source_seen(&c.nodes[0].pods[0].path(), &c.nodes[1].pods[0].path(), &pod2, 40001);
    assert_eq!(seen.as_deref(), Some(pod1.as_str()), "the pod source address survives the tailnet");
    // Leaving the cluster: masqueraded to the node's underlay address.
    let seen = source_seen(&c.nodes[0].pods[0].path(), &c.inet.path(), INET_ADDR, 40002);
    if seen.as_deref() != Some(c.nodes[0].address().as_str()) {
        for cmd in [
            &["nft", "list", "ruleset"][..],
            &["ip", "rule"],
            &["ip", "route", "show", "table", "all"],
            &["ip", "-s", "link"],
            &["ip", "neigh"],
            &["sysctl", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth0.rp_filter"],
        ] {
            eprintln!("node 1: {}\n{}", cmd.join(" "), c.nodes[0].ns.exec_ok(cmd));
        }
        for (name, ns) in [("ul", &c.ul), ("inet", &c.inet)] {
            for cmd in [&["ip", "-s", "link"][..], &["ip", "neigh"], &["ip", "route"], &["nft", "list", "ruleset"]] {
                eprintln!("{name}: {}\n{}", cmd.join(" "), ns.exec_ok(cmd));
            }
        }
        eprintln!("retry: {:?}", source_seen(&c.nodes[0].pods[0].path(), &c.inet.path(), INET_ADDR, 40003));
    }
    assert_eq!(seen.as_deref(), Some(c.nodes[0].address().as_str()), "masqueraded towards the outside");

    // Metrics count the ADD that happened on node 1.
    let m = c.metrics(0);
    assert!(m.contains("headcni_ip_allocations_total{family=\"ipv4\"} 1"), "{m}");
    assert!(m.contains("headcni_pod_network_setup_duration_seconds_count 1"), "{m}");
    assert!(m.contains("headcni_routes_advertised 1") && m.contains("headcni_routes_approved 1"), "{m}");
    // The gauges follow the agent's passes (every 10 s when all is well).
    wait_until("node-2's route counted as accepted", Duration::from_secs(15), || {
        c.metrics(0).contains("headcni_routes_accepted_from_peers 1")
    });
    assert!(m.contains("headcni_tailnet_backend_state{state=\"Running\"} 1"), "{m}");
    let ready = c.nodes[0].ns.exec_ok(&["curl", "-fsS", &format!("http://127.0.0.1:{METRICS_PORT}/readyz")]);
    assert_eq!(ready.trim(), "ok");

    // headcni status on node 1.
    let out = Command::new("ip")
        .args(["netns", "exec", &c.nodes[0].ns.name])
        .arg(headcni())
        .args(["status", "--json"])
        .arg("--tailscale-socket")
        .arg(c.nodes[0].socket())
        .arg("--run-dir")
        .arg(c.nodes[0].run_dir())
        .arg("--conf-dir")
        .arg(c.dir.path())
        .output()
        .unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["routes"][0]["approved"], true, "{st}");
    assert_eq!(st["masqueradeTables"][0].as_str().unwrap().split(' ').next(), Some("ip"), "{st}");
    let problems: Vec<String> = st["problems"].as_array().unwrap().iter().map(|p| p["message"].to_string()).collect();
    assert!(
        problems.iter().all(|p| p.contains("no CNI configuration")),
        "only the conflist is missing here: {problems:?}"
    );
    assert!(st["peers"].as_array().unwrap().iter().any(|p| p["routes"] == json!(["10.244.2.0/24"])), "{st}");

    // 1. The agent restarts: SIGTERM leaves the pods working; the new agent changes nothing.
    let (code, took) = c.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    log(&format!("agent SIGTERM: exited in {:.2}s", took.as_secs_f64()));
    assert!(ping(&c.nodes[0].pods[0], &pod2), "pods keep working without the agent");
    assert!(headcni::nodefile::path_in(&c.nodes[0].run_dir()).exists());
    let before = c.hs_nodes();
    c.start_agent(0, true);
    wait_until("agent 1 ready again", Duration::from_secs(30), || {
        c.nodes[0].report().is_some_and(|r| {
            r.ready
                && r.routes[0].approved == Some(true)
                && r.updated_at >= headcni::agent::serve::now().saturating_sub(1)
        })
    });
    assert_eq!(c.hs_nodes(), before, "nothing to change after a restart");

    // 2. Headscale restarts: pod traffic does not stop; the agents carry on. That holds for
    //    nodes with a direct path (relayed traffic goes through the DERP server that Headscale
    //    embeds), which the two have had since the first pings.
    assert!(c.direct_both_ways(), "node 1 and node 2 talk directly");
    c.headscale.take();
    assert!(ping(&c.nodes[0].pods[0], &pod2), "the data plane does not need Headscale");
    c.start_headscale();
    assert!(ping(&c.nodes[0].pods[0], &pod2));
    let t = Instant::now();
    wait_until("node 1 and node 2 online in Headscale again", Duration::from_secs(60), || {
        c.hs_online(&["node-1", "node-2"])
    });
    log(&format!("Headscale restart: both nodes online again after {:.2}s", t.elapsed().as_secs_f64()));

    // 3. tailscaled restarts on node 1. Traffic resumes over a new WireGuard session; when node
    //    2 hears node 1's new disco key from Headscale only after that, it resets the session
    //    again (tailscale does that for a peer that restarted) and node 1's next packets are
    //    dropped until one side starts another handshake: hence the wait, not a single ping.
    let t = Instant::now();
    c.nodes[0].tailscaled.take();
    start_tailscaled(&c.peers, c.dir.path(), &mut c.nodes[0]);
    wait_until("pods talk again after a tailscaled restart", Duration::from_secs(60), || {
        ping(&c.nodes[0].pods[0], &pod2) && ping(&c.nodes[1].pods[0], &pod1)
    });
    log(&format!("tailscaled restart: pod traffic back both ways {:.2}s after the restart", t.elapsed().as_secs_f64()));

    // 4. tailscaled on node 2 loses its state: the agent joins again as a new node and
    //    approves its route for it.
    c.nodes[1].tailscaled.take();
    std::fs::remove_dir_all(c.nodes[1].dir.join("ts-state")).unwrap();
    let t = Instant::now();
    start_tailscaled(&c.peers, c.dir.path(), &mut c.nodes[1]);
    wait_until("pods talk again after node 2 re-registered", Duration::from_secs(90), || {
        ping(&c.nodes[0].pods[0], &pod2)
    });
    log(&format!(
        "node 2 lost its tailscaled state: pod traffic back after {:.2}s (rejoin + approval)",
        t.elapsed().as_secs_f64()
    ));
    let hs = c.hs_nodes();
    let fresh: Vec<_> = hs.iter().filter(|n| n.1.starts_with("node-2")).collect();
    assert_eq!(fresh.len(), 2, "{hs:?}");
    assert!(
        fresh.iter().any(|n| n.3 == vec!["10.244.2.0/24"] && n.0 != before.iter().find(|b| b.1 == "node-2").unwrap().0)
    );

    // 5. Cleanup on node 1 (the chart's uninstall).
    c.nodes[0].agent.as_mut().unwrap().stop(Duration::from_secs(10));
    let (_, api) = c.keys();
    let out = Command::new("ip")
        .args(["netns", "exec", &c.nodes[0].ns.name])
        .arg(headcni())
        .args(["agent", "--cleanup", "--headscale-url", HS_URL])
        .arg("--api-key-file")
        .arg(&api)
        .arg("--allow-http-api-key")
        .arg("--tailscale-socket")
        .arg(c.nodes[0].socket())
        .arg("--run-dir")
        .arg(c.nodes[0].run_dir())
        .arg("--state-dir")
        .arg(c.nodes[0].dir.join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(c.nodes[0].prefs_routes(&c.peers).is_empty());
    let hs = c.hs_nodes();
    let n1 = hs.iter().find(|n| n.1 == "node-1").unwrap();
    assert!(n1.3.is_empty(), "approval withdrawn: {n1:?}");
    assert_eq!(hs.iter().find(|n| n.1 == "bystander").unwrap().3, Vec::<String>::new());
    let rules = c.nodes[0].ns.exec_ok(&["ip", "rule"]);
    assert!(!rules.contains("proto 104"), "{rules}");
    let tables = c.nodes[0].ns.exec_ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("headcni"), "{tables}");
    assert!(!headcni::nodefile::path_in(&c.nodes[0].run_dir()).exists());
    root_untouched();
    // The secrets never reached a log.
    let secrets = [std::fs::read_to_string(&auth).unwrap(), std::fs::read_to_string(&api).unwrap()];
    for i in 1..=2 {
        let text = std::fs::read_to_string(c.dir.path().join(format!("logs/agent-n{i}.log"))).unwrap();
        for secret in &secrets {
            assert!(!text.contains(secret.trim()), "a key in agent-n{i}.log");
        }
    }
    log(&format!("scenario done in {:.1}s", t_all.elapsed().as_secs_f64()));
}

/// tailscaled in the node's namespace (with a private copy of /etc/resolv.conf); waits for its
/// LocalAPI.
fn start_tailscaled(peers: &Peers, dir: &Path, node: &mut Node) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.ns.name, "sh", "-ec"])
        .arg("mount --bind \"$1\" /etc/resolv.conf; shift; exec \"$@\"")
        .arg("sh")
        .arg(node.dir.join("resolv.conf"))
        .arg(&peers.tailscaled)
        .arg(format!("--statedir={}", node.dir.join("ts-state").display()))
        .arg(format!("--socket={}", node.socket().display()))
        .args(["--tun=tailscale0", "--port=41641", "--no-logs-no-support"])
        .env("TS_DEBUG_USE_DERP_HTTP", "1");
    let _ = std::fs::remove_file(node.socket());
    node.tailscaled = Some(Proc::spawn(
        &format!("tailscaled-n{}", node.i),
        cmd,
        &dir.join(format!("logs/tailscaled-n{}.log", node.i)),
    ));
    let sock = node.socket();
    wait_until("tailscaled LocalAPI", Duration::from_secs(20), || {
        sock.exists()
            && Command::new(&peers.tailscale)
                .arg("--socket")
                .arg(&sock)
                .args(["status", "--json"])
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
    });
}

#[test]
fn tailnet_with_policy_approval_reports_pending_routes() {
    let peers = require_peers!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // autoApprovers cover node 1's pod CIDR only.
    let mut c = Cluster::new(peers, 2, &["10.244.1.0/24"]);
    c.start_agent(0, false);
    c.start_agent(1, false);
    let t = wait_until("node 1 approved by policy", Duration::from_secs(60), || {
        c.nodes[0].report().is_some_and(|r| r.ready && r.routes.iter().all(|x| x.approved == Some(true)))
    });
    log(&format!("policy approval: node 1 ready and approved {:.2}s after the agent started", t.as_secs_f64()));
    wait_until("node 2 reports its route pending", Duration::from_secs(60), || {
        c.nodes[1].report().is_some_and(|r| {
            r.ready
                && r.routes[0].approved == Some(false)
                && r.problems.iter().any(|p| p.message == "route 10.244.2.0/24 pending approval in Headscale")
        })
    });
    let m = c.metrics(1);
    assert!(m.contains("headcni_routes_pending_approval 1"), "{m}");
    assert!(m.contains("headcni_routes_approved 0"), "{m}");
    let out = Command::new("ip")
        .args(["netns", "exec", &c.nodes[1].ns.name])
        .arg(headcni())
        .arg("status")
        .arg("--tailscale-socket")
        .arg(c.nodes[1].socket())
        .arg("--run-dir")
        .arg(c.nodes[1].run_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("route 10.244.2.0/24 is not approved in Headscale"), "{text}");
    assert!(text.contains("autoApprovers"), "{text}");
    // Nothing was approved through the API (there is no key): node 2 stays unapproved.
    let _ = c.keys();
    let hs = c.hs_nodes();
    assert_eq!(hs.iter().find(|n| n.1 == "node-2").unwrap().3, Vec::<String>::new());
    assert_eq!(hs.iter().find(|n| n.1 == "node-1").unwrap().3, vec!["10.244.1.0/24"]);
    root_untouched();
}

/// The part of a Kubernetes API server the agents use, serving fixed Node objects: GET of one
/// Node, the list, and a watch that stays open and quiet (the Nodes do not change). Listens in
/// the underlay namespace; stopped and its threads joined on drop.
struct FakeKube {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    kubeconfig: PathBuf,
}

impl FakeKube {
    fn node(name: &str, cidr: &str) -> Value {
        json!({"kind": "Node", "apiVersion": "v1",
               "metadata": {"name": name, "resourceVersion": "7"},
               "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})
    }

    fn start(ul: &Netns, dir: &Path, nodes: Vec<Value>) -> FakeKube {
        use std::io::{BufRead, BufReader};
        use std::sync::atomic::Ordering;
        let listener =
            headcni::netlink::Netns::open(&ul.path()).unwrap().bind_tcp("172.31.98.1:6443".parse().unwrap()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let list =
            json!({"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"}, "items": nodes});
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let (stream, _) = match listener.accept() {
                    Ok(a) => a,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let (list, flag) = (list.clone(), flag.clone());
                conns.push(std::thread::spawn(move || {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut head = String::new();
                    let _ = reader.read_line(&mut head);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                        line.clear();
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let mut out = stream;
                    let reply = |out: &mut std::net::TcpStream, status: &str, body: &str| {
                        let _ = write!(
                            out,
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    };
                    // A watch (kube-rs asks watch=true) stays open with nothing to say.
                    if path.contains("watch=1") || path.contains("watch=true") {
                        let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                        let _ = out.flush();
                        while !flag.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    } else if path.starts_with("/api/v1/nodes?") {
                        // A list, narrowed to one Node by a field selector (the agent's watch
                        // of its own Node) or of every Node (the cluster's pod CIDRs).
                        let mut list = list.clone();
                        if let Some(name) = path.split("fieldSelector=metadata.name%3D").nth(1) {
                            let name = name.split('&').next().unwrap_or("").to_string();
                            let items = list["items"].as_array_mut().unwrap();
                            items.retain(|n| n["metadata"]["name"] == name.as_str());
                        }
                        reply(&mut out, "200 OK", &list.to_string());
                    } else if let Some(name) = path.strip_prefix("/api/v1/nodes/") {
                        match list["items"].as_array().unwrap().iter().find(|n| n["metadata"]["name"] == name) {
                            Some(n) => reply(&mut out, "200 OK", &n.to_string()),
                            None => reply(&mut out, "404 Not Found", r#"{"kind":"Status","message":"not found"}"#),
                        }
                    } else {
                        reply(&mut out, "404 Not Found", r#"{"kind":"Status","message":"not found"}"#);
                    }
                }));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "current-context: c\ncontexts: [{name: c, context: {cluster: k, user: u}}]\n\
             clusters: [{name: k, cluster: {server: \"http://172.31.98.1:6443\"}}]\nusers: [{name: u, user: {token: t0ken}}]\n",
        )
        .unwrap();
        FakeKube { stop, thread: Some(thread), kubeconfig }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cluster {
    /// The agent on node `i` in Kubernetes mode: its pod CIDR from its Node, no --pod-cidr and
    /// no --cluster-cidr (the other nodes' pod CIDRs are whatever the Nodes say).
    fn start_kube_agent(&mut self, i: usize) {
        let (auth, _) = self.keys();
        let kubeconfig = self.kube.as_ref().unwrap().kubeconfig.clone();
        let node = &mut self.nodes[i];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns.name]).arg(headcni()).arg("agent");
        cmd.args(["--node-name", &format!("node-{}", node.i), "--kubeconfig"]).arg(&kubeconfig);
        cmd.args(["--service-cidr", "10.96.0.0/12", "--headscale-url", HS_URL]);
        cmd.arg("--tailscale-socket").arg(node.socket());
        cmd.arg("--run-dir").arg(node.run_dir()).arg("--state-dir").arg(node.dir.join("state"));
        cmd.args(["--metrics-bind", "127.0.0.1", "--metrics-port", &METRICS_PORT.to_string()]);
        cmd.arg("--auth-key-file").arg(&auth);
        cmd.env("HEADCNI_LOG_LEVEL", "info");
        // The node's own CNI configuration directory, empty: never the machine's.
        let conf_dir = node.dir.join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        cmd.env("HEADCNI_CONF_DIR", &conf_dir);
        node.agent = Some(Proc::spawn(
            &format!("agent-n{}", node.i),
            cmd,
            &self.dir.path().join(format!("logs/agent-n{}.log", node.i)),
        ));
    }

    /// Joins node `i` by hand (no agent) with extra `tailscale up` flags.
    fn join_bystander(&self, i: usize, hostname: &str, extra: &[&str]) {
        let (auth, _) = self.keys();
        let mut args = vec![
            "up".to_string(),
            "--login-server".into(),
            HS_URL.into(),
            "--auth-key".into(),
            format!("file:{}", auth.display()),
            "--hostname".into(),
            hostname.into(),
            "--accept-dns=false".into(),
            "--timeout".into(),
            "60s".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = self.nodes[i].tailscale(&self.peers, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!out.contains("error"), "{hostname}: {out}");
    }

    /// Approves `routes` for Headscale node `name` through the REST API.
    fn hs_approve(&self, name: &str, routes: &[&str]) {
        let id = self.hs_nodes().into_iter().find(|n| n.1 == name).unwrap_or_else(|| panic!("{name} unknown")).0;
        let out = self.hs_api(&format!("node/{id}/approve_routes"), Some(&json!({"routes": routes})));
        assert!(
            out.status.success(),
            "approving {routes:?} for {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The routes of node `ns`'s table 52.
fn table52(ns: &Netns) -> String {
    ns.exec(&["ip", "route", "show", "table", "52"]).stdout.iter().map(|b| *b as char).collect()
}

/// Items 1, 2, 3, 4 and 10 of the data plane's hardening, with real peers: agents in
/// Kubernetes mode without a cluster CIDR (the mode in which the exemption came from the peers'
/// routes), an exit node and a peer that advertises the nodes' own underlay, both approved, and
/// a third node that joins while traffic flows. Every check runs; the failures are reported
/// together.
#[test]
fn tailnet_peers_cannot_bypass_capture_or_spoof() {
    let peers = require_peers!();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let internet_acl = json!({"action": "accept", "src": [TAG], "dst": ["autogroup:internet:*", "172.31.98.0/24:*"]});
    let mut c = Cluster::with_acls(peers, 5, &["10.244.0.0/16"], &[internet_acl]);
    let kube_dir = c.dir.path().join("kube");
    std::fs::create_dir_all(&kube_dir).unwrap();
    let nodes = (1..=3).map(|i| FakeKube::node(&format!("node-{i}"), &format!("10.244.{i}.0/24"))).collect();
    c.kube = Some(FakeKube::start(&c.ul, &kube_dir, nodes));
    let mut failures: Vec<String> = Vec::new();

    // The bystanders: an exit node (node 4) and a router of the underlay (node 5), approved.
    c.join_bystander(3, "exit", &["--advertise-exit-node"]);
    c.join_bystander(4, "lan", &["--advertise-routes", "172.31.98.0/24"]);
    c.hs_approve("exit", &["0.0.0.0/0", "::/0"]);
    c.hs_approve("lan", &["172.31.98.0/24"]);
    c.start_kube_agent(0);
    c.start_kube_agent(1);
    wait_until("nodes 1 and 2 ready", Duration::from_secs(60), || {
        c.nodes[..2].iter().all(|n| n.report().is_some_and(|r| r.ready))
    });
    let p1 = c.add_pod(0, 1);
    let p1b = c.add_pod(0, 2);
    let p2 = c.add_pod(1, 1);
    if !(0..300).any(|_| ping(&c.nodes[0].pods[0], &p2)) {
        for n in &c.nodes[..2] {
            for cmd in [
                &["ip", "rule"][..],
                &["ip", "route", "show", "table", "all"],
                &["ip", "route", "get", &p2, "from", &p1, "iif", "lo"],
                &["nft", "list", "ruleset"],
            ] {
                eprintln!("node {}: {}\n{}", n.i, cmd.join(" "), String::from_utf8_lossy(&n.ns.exec(cmd).stdout));
            }
            eprintln!("node {}: tailscale status\n{}", n.i, n.tailscale(&c.peers, &["status"]));
        }
        panic!("no pod traffic across the tailnet");
    }
    // The traps are set: node 1 accepted the underlay route, and sees the exit node's.
    wait_until("the underlay route in node 1's table 52", Duration::from_secs(30), || {
        table52(&c.nodes[0].ns).contains("172.31.98.0/24")
    });
    wait_until("the exit node in node 1's view", Duration::from_secs(30), || {
        c.nodes[0].tailscale(&c.peers, &["status", "--json"]).contains("0.0.0.0/0")
    });
    // Give the agent a pass after the tailnet changed (a timer pass at the latest).
    let seen = headcni::agent::serve::now();
    wait_until("a pass of node 1's agent after the changes", Duration::from_secs(15), || {
        c.nodes[0].report().is_some_and(|r| r.updated_at > seen + 1)
    });

    // 3. The exit node changes nothing: pods leaving the cluster are still masqueraded.
    let nft = c.nodes[0].ns.exec_ok(&["nft", "list", "table", "ip", "headcni"]);
    if nft.lines().any(|l| l.trim() == "return") || nft.contains("0.0.0.0/0") {
        failures.push(format!("item 3: an exemption covers everything:\n{nft}"));
    }
    let seen = source_seen(&c.nodes[0].pods[0].path(), &c.inet.path(), INET_ADDR, 40011);
    if seen.as_deref() != Some(c.nodes[0].address().as_str()) {
        failures.push(format!("item 3: the outside saw {seen:?}, not node 1's address (masquerading is off)"));
    }
    // 4. The peer advertising the underlay captures none of the node's traffic.
    for dst in ["172.31.98.2", "172.31.98.1", "172.31.98.12"] {
        let route = c.nodes[0].ns.exec_ok(&["ip", "route", "get", dst]);
        if !route.contains("dev eth0") {
            failures.push(format!("item 4: node 1 routes {dst} through the tailnet: {route}"));
        }
    }
    let route = c.nodes[0].ns.exec_ok(&["ip", "route", "get", &p2, "from", &p1, "iif", "lo"]);
    if !route.contains("dev tailscale0") {
        failures.push(format!("item 4: a pod on another node is not reached through the tailnet: {route}"));
    }
    if !c.nodes[0].ns.exec(&["curl", "-fsS", "--max-time", "3", &format!("{HS_URL}/health")]).status.success() {
        failures.push("item 4: node 1 cannot reach Headscale on the underlay".into());
    }
    // 1. A pod forges another pod's source address towards a pod on the other node.
    {
        let dst: std::net::SocketAddr = format!("{p2}:40012").parse().unwrap();
        let server = headcni::netlink::Netns::open(&c.nodes[1].pods[0].path()).unwrap().bind_udp(dst).unwrap();
        server.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let send = |src: &str, tag: &str| {
            spoof_udp(&c.nodes[0].pods[0], src, &p2, 40012, tag);
        };
        let mut got = Vec::new();
        for _ in 0..10 {
            send(&p1b, "forged");
            send(&p1, "genuine");
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                got.push((from.ip().to_string(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
            if got.iter().any(|g| g.1 == "genuine") {
                break;
            }
        }
        if !got.iter().any(|g| g.1 == "genuine") {
            failures.push(format!("item 1: the pod's own datagrams did not cross the tailnet: {got:?}"));
        }
        if let Some(g) = got.iter().find(|g| g.1 == "forged") {
            failures.push(format!("item 1: a forged datagram reached the other node's pod as from {}", g.0));
        }
    }
    // 2. The first address of node 1's pod CIDR is nobody's: a node service bound to all
    //    addresses is not reachable through it from a tailnet peer.
    {
        let mut listener = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.nodes[0].ns.name,
                "socat",
                "TCP-LISTEN:40013,reuseaddr,fork",
                "SYSTEM:echo hello",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reach = |addr: &str| {
            c.nodes[1].pods[0].exec(&["sh", "-c", &format!("echo | nc -w 3 {addr} 40013")]).status.success()
        };
        std::thread::sleep(Duration::from_millis(300));
        if reach("10.244.1.1") {
            failures.push("item 2: a node-1 service answered a tailnet peer on 10.244.1.1".into());
        }
        let _ = listener.kill();
        let _ = listener.wait();
    }
    // 10. Node 3 is a Node before it is a peer: node 1 exempts and routes its pod CIDR already,
    //     and node 3's pods see node 1's pods' own addresses from the first packet.
    let nft = c.nodes[0].ns.exec_ok(&["nft", "list", "table", "ip", "headcni"]);
    let rules = c.nodes[0].ns.exec_ok(&["ip", "rule"]);
    if !nft.contains("ip daddr 10.244.3.0/24 return") {
        failures.push(format!("item 10: before node 3 joins, node 1 does not exempt its pod CIDR:\n{nft}"));
    }
    if !rules.contains("to 10.244.3.0/24") {
        failures.push(format!("item 10: before node 3 joins, node 1 does not send its pod CIDR to table 52:\n{rules}"));
    }
    let p3 = c.add_pod_with(2, 1, json!({"pod_cidr": "10.244.3.0/24", "mtu": 1280}));
    c.start_kube_agent(2);
    wait_until("node 3's pod CIDR in node 1's table 52", Duration::from_secs(60), || {
        table52(&c.nodes[0].ns).contains("10.244.3.0/24")
    });
    let mut sources = Vec::new();
    let t0 = Instant::now();
    let mut port = 40100;
    while sources.len() < 3 && t0.elapsed() < Duration::from_secs(30) {
        // A new flow each time: a masqueraded first packet would stay masqueraded in its flow.
        port += 1;
        if let Some(s) = source_seen(&c.nodes[0].pods[0].path(), &c.nodes[2].pods[0].path(), &p3, port) {
            sources.push(s);
        }
    }
    if sources.is_empty() || sources.iter().any(|s| *s != p1) {
        failures.push(format!("item 10: node 3's pod saw {sources:?}, expected only {p1}"));
    }
    log(&format!("node 3 joined; first datagrams seen from {sources:?} after {:.2}s", t0.elapsed().as_secs_f64()));
    // tailscaled's change notifications reach the agent: someone turns subnet SNAT on, and the
    // agent turns it off again in the pass the notification starts (the time is reported).
    let t0 = Instant::now();
    c.nodes[0].tailscale(&c.peers, &["set", "--snat-subnet-routes=true"]);
    wait_until("node 1's agent to turn subnet SNAT off again", Duration::from_secs(30), || {
        serde_json::from_str::<Value>(&c.nodes[0].tailscale(&c.peers, &["debug", "prefs"]))
            .is_ok_and(|p| p["NoSNAT"] == true)
    });
    log(&format!("subnet SNAT turned off again {:.2}s after it was turned on", t0.elapsed().as_secs_f64()));
    let agent_log = std::fs::read_to_string(c.dir.path().join("logs/agent-n1.log")).unwrap_or_default();
    if !agent_log.contains("tailscaled reports a change (prefs)") {
        failures.push("the agent did not follow tailscaled's change notifications (no prefs change seen)".into());
    }
    root_untouched();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Sends one UDP datagram from inside `pod` with any source address (a raw socket).
fn spoof_udp(pod: &Netns, src: &str, dst: &str, port: u16, payload: &str) {
    const SCRIPT: &str = r#"
import socket, struct, sys
src, dst, port, payload = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
n = 8 + len(payload)
def csum(d):
    if len(d) % 2: d += b"\0"
    s = sum(struct.unpack("!%dH" % (len(d) // 2), d))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff or 0xffff
udp = struct.pack("!HHHH", 40000, port, n, 0) + payload
udp = udp[:6] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 17, n) + udp)) + udp[8:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + n, 1, 0, 64, 17, 0, src, dst)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).sendto(ip + udp, (sys.argv[2], 0))
"#;
    pod.exec_ok(&[common::python3(), "-c", SCRIPT, src, dst, &port.to_string(), payload]);
}
