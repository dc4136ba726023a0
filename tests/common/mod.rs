//! Helpers shared by the root-only tests: named network namespaces that are deleted on drop,
//! and shell commands that must succeed.
#![allow(dead_code)]

use std::process::{Command, Output};

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips the calling test (returns from it) unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!("test skipped: requires root (network namespaces)");
            return;
        }
    };
}

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

pub fn sh(script: &str) -> String {
    String::from_utf8_lossy(&run("sh", &["-ec", script]).stdout).into_owned()
}

/// A named network namespace, unique to this process and test, deleted (with every process
/// still inside it) on drop.
pub struct NamedNetns {
    pub name: String,
}

impl NamedNetns {
    pub fn new(tag: &str) -> Self {
        let name = format!("hcat{}-{tag}", std::process::id());
        assert!(name.len() <= 32, "namespace name too long: {name}");
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside the namespace and returns stdout; panics on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&run("ip", &all).stdout).into_owned()
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &str) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args.split_whitespace());
        run("ip", &all);
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>()
                    && let Some(pid) = rustix::process::Pid::from_raw(pid)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
