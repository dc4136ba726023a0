//! Helpers for the root-only tests: named network namespaces removed on drop, and the built
//! binary run as a CNI plugin inside a "host" namespace of the test's own (never the real one).
#![allow(dead_code)]

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips the calling test (with a note) unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!("skipped: needs root (network namespaces)");
            return;
        }
    };
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn unique(tag: &str) -> String {
    format!("hct{}x{}{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst), tag)
}

pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

/// Runs `cmd args...`, panicking with its output unless it succeeds.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn sh_ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh_ok(&["ip", "netns", "add", &name]);
        sh_ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ping(&self, addr: &str) -> bool {
        self.exec(&["ping", "-c", "1", "-W", "2", addr]).status.success()
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = self.exec_ok(&["ip", "-o", "link", "show"]);
        out.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n).to_string()).collect()
    }

    pub fn routes(&self, v6: bool) -> String {
        self.exec_ok(&["ip", if v6 { "-6" } else { "-4" }, "route", "show", "table", "all"])
    }

    /// `ip -n <ns> ...`, which must succeed.
    pub fn ip(&self, args: &str) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args.split_whitespace());
        run("ip", &all);
    }
}

impl Drop for Netns {
    /// Kills what still runs inside (daemons of a failed test), then deletes the namespace.
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Some(pid) = pid.parse::<i32>().ok().and_then(rustix::process::Pid::from_raw) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The `headcni` binary under test: this build's, or the one `HEADCNI_TEST_BIN` names (to run
/// the same tests against another build, e.g. to see a test fail on an earlier version).
pub fn headcni_exe() -> PathBuf {
    std::env::var_os("HEADCNI_TEST_BIN")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_headcni")))
}

/// The system's Python (the tests' packet crafting and connection floods).
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" }
}

/// A bin directory holding `headcni` and its `headcni-ipam` symlink, with the system's
/// reference plugins after it on CNI_PATH.
pub struct Bin {
    pub dir: tempfile::TempDir,
}

impl Bin {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let exe = headcni_exe();
        let exe = exe.as_path();
        std::os::unix::fs::symlink(exe, dir.path().join("headcni")).unwrap();
        std::os::unix::fs::symlink(exe, dir.path().join("headcni-ipam")).unwrap();
        Bin { dir }
    }

    pub fn cni_path(&self) -> String {
        format!("{}:/usr/lib/cni", self.dir.path().display())
    }

    pub fn plugin(&self, kind: &str) -> PathBuf {
        let ours = self.dir.path().join(kind);
        if ours.exists() { ours } else { Path::new("/usr/lib/cni").join(kind) }
    }
}

/// The outcome of one plugin invocation.
#[derive(Debug)]
pub struct Reply {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {:?}", self.stdout))
    }

    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "plugin failed: stdout={} stderr={}", self.stdout, self.stderr);
        self
    }

    /// Asserts a CNI error with `code` whose message mentions `needle`.
    pub fn error(&self, code: u64, needle: &str) {
        assert_ne!(self.code, 0, "expected a failure, got {}", self.stdout);
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        let msg = format!("{} {}", v["msg"].as_str().unwrap_or(""), v["details"].as_str().unwrap_or(""));
        assert!(msg.contains(needle), "error {msg:?} should mention {needle:?}");
    }
}

/// Environment of one invocation.
#[derive(Clone, Default)]
pub struct Env {
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new(command: &str, cni_path: &str) -> Self {
        Env { vars: vec![("CNI_COMMAND".into(), command.into()), ("CNI_PATH".into(), cni_path.into())] }
    }

    pub fn container(mut self, cid: &str, ifname: &str, netns: Option<&Path>) -> Self {
        self.vars.push(("CNI_CONTAINERID".into(), cid.into()));
        self.vars.push(("CNI_IFNAME".into(), ifname.into()));
        if let Some(ns) = netns {
            self.vars.push(("CNI_NETNS".into(), ns.display().to_string()));
        }
        self
    }

    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.into(), value.into()));
        self
    }
}

/// Runs a plugin executable like [`invoke`], but gives up after `timeout`: the plugin is killed
/// and `None` answered (a plugin that hangs must fail the test, not the suite).
pub fn invoke_within(exe: &Path, host: Option<&Netns>, env: &Env, stdin: &[u8], timeout: Duration) -> Option<Reply> {
    let mut cmd = command(exe, host, env);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    // A plugin that stops reading makes the writer fail with a broken pipe, which is fine.
    let writer = std::thread::spawn(move || pipe.write_all(&input).map(|_| input.len()));
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    Some(Reply {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn command(exe: &Path, host: Option<&Netns>, env: &Env) -> Command {
    let mut cmd = match host {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    for key in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"] {
        cmd.env_remove(key);
    }
    cmd.env("HEADCNI_LOG_LEVEL", "warn");
    // The log lines also reach stderr, which the reply keeps: no log file anywhere.
    cmd.env("HEADCNI_LOG_FILE", "/dev/null");
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    cmd
}

/// Runs a plugin executable, inside `host` when given, with a clean CNI environment.
pub fn invoke(exe: &Path, host: Option<&Netns>, env: &Env, stdin: &str) -> Reply {
    let mut cmd = command(exe, host, env);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Reply {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Executes a conflist the way libcni does: ADD in order passing prevResult along, CHECK each
/// plugin with the final result, DEL in reverse order. `runtimeConfig` carries only the
/// capabilities each plugin declares.
pub struct Chain<'a> {
    pub bin: &'a Bin,
    pub host: &'a Netns,
    pub name: String,
    pub version: String,
    pub plugins: Vec<Value>,
    pub runtime_config: Value,
}

impl<'a> Chain<'a> {
    /// From a conflist document, at its `cniVersion`.
    pub fn from_conflist(bin: &'a Bin, host: &'a Netns, conflist: &Value) -> Self {
        Chain {
            bin,
            host,
            name: conflist["name"].as_str().unwrap().to_string(),
            version: conflist["cniVersion"].as_str().unwrap().to_string(),
            plugins: conflist["plugins"].as_array().unwrap().clone(),
            runtime_config: serde_json::json!({}),
        }
    }

    fn conf_for(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["cniVersion"] = Value::from(self.version.clone());
        conf["name"] = Value::from(self.name.clone());
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            let mut rc = serde_json::Map::new();
            for (cap, enabled) in caps {
                if let (true, Some(v)) = (enabled == &Value::Bool(true), self.runtime_config.get(cap)) {
                    rc.insert(cap.clone(), v.clone());
                }
            }
            conf.as_object_mut().unwrap().remove("capabilities");
            conf["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    pub fn run(&self, command: &str, cid: &str, pod: &Netns, plugin: &Value, prev: Option<&Value>) -> Reply {
        let env = Env::new(command, &self.bin.cni_path()).container(cid, "eth0", Some(&pod.path()));
        let exe = self.bin.plugin(plugin["type"].as_str().unwrap());
        invoke(&exe, Some(self.host), &env, &self.conf_for(plugin, prev).to_string())
    }

    pub fn add(&self, cid: &str, pod: &Netns) -> Value {
        let mut prev: Option<Value> = None;
        for plugin in &self.plugins {
            prev = Some(self.run("ADD", cid, pod, plugin, prev.as_ref()).ok().json());
        }
        prev.unwrap()
    }

    /// Debian's portmap 1.1.1 fails its own CHECK on IPv4-only pods (it insists on an IPv6
    /// DNAT chain), so it is left out; every other plugin, headcni first, is checked.
    pub fn check(&self, cid: &str, pod: &Netns, result: &Value) {
        for plugin in self.plugins.iter().filter(|p| p["type"] != "portmap") {
            self.run("CHECK", cid, pod, plugin, Some(result)).ok();
        }
    }

    pub fn del(&self, cid: &str, pod: &Netns, result: &Value) {
        for plugin in self.plugins.iter().rev() {
            self.run("DEL", cid, pod, plugin, Some(result)).ok();
        }
    }
}
