//! Delegation (spec section 4): running another plugin, found on CNI_PATH, with the same
//! environment and configuration, and reading back its result or error, within a deadline: a
//! delegate that does not answer in time is killed and reaped, and the verb fails with code 11
//! instead of waiting for ever (the runtime's own timeout would leave the plugin and its
//! delegate behind).

use super::error::{CniError, code, parse_reply};
use super::{CniVersion, Command, Request, is_safe_name};
use serde_json::Value;
use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command as Process, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The most a delegate may print on stdout (a result is a few kilobytes).
pub const MAX_OUTPUT: u64 = 16 << 20;

/// Finds the executable for plugin `kind` on the request's CNI_PATH.
pub fn find(req: &Request, kind: &str) -> Result<PathBuf, CniError> {
    if !is_safe_name(kind) {
        return Err(CniError::invalid_config(format!(
            "plugin type \"{}\" is not a valid plugin name",
            kind.escape_debug()
        )));
    }
    if req.path.is_empty() {
        return Err(CniError::invalid_env(format!("CNI_PATH is required to find the \"{kind}\" plugin")));
    }
    req.path.iter().map(|dir| dir.join(kind)).find(|p| p.is_file()).ok_or_else(|| {
        CniError::invalid_config(format!("plugin \"{kind}\" not found on CNI_PATH"))
            .with_details(req.path_raw.clone().unwrap_or_default())
    })
}

/// Runs `kind` for `command` with `req`'s environment and configuration, for at most
/// `timeout`. Returns the plugin's JSON output (ADD), or `None` when it printed nothing.
pub fn exec(req: &Request, kind: &str, command: Command, timeout: Duration) -> Result<Option<Value>, CniError> {
    let exe = find(req, kind)?;
    let stdin = req.config_bytes();
    let mut attempts = 0;
    let output = loop {
        match spawn(req, &exe, command, &stdin, timeout) {
            // A plugin binary being replaced in place: the runtime's own retry rule.
            Err(e) if e.kind() == ErrorKind::ExecutableFileBusy && attempts < 5 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                return Err(CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "plugin \"{kind}\" ({}) did not answer {command} within {}s: it was stopped",
                        exe.display(),
                        timeout.as_secs_f64()
                    ),
                ));
            }
            Err(e) => {
                return Err(CniError::io(format!("running plugin \"{kind}\" ({}): {e}", exe.display())));
            }
            Ok(out) => break out,
        }
    };
    if output.status.success() {
        if output.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        return serde_json::from_slice(&output.stdout).map(Some).map_err(|e| {
            CniError::new(code::DECODE_FAILURE, format!("plugin \"{kind}\" printed an invalid result: {e}"))
        });
    }
    Err(parse_reply(&output.stdout).unwrap_or_else(|| {
        CniError::internal(format!("plugin \"{kind}\" failed ({}) without an error on stdout", output.status))
    }))
}

/// The spec versions a plugin reports for VERSION.
pub fn versions(req: &Request, kind: &str, timeout: Duration) -> Result<Vec<CniVersion>, CniError> {
    #[derive(serde::Deserialize)]
    struct VersionAnswer {
        #[serde(rename = "supportedVersions", default)]
        supported: Vec<String>,
    }
    let probe = Request {
        config: serde_json::Map::from_iter([("cniVersion".into(), Value::from(req.version.as_str()))]),
        ..req.clone()
    };
    let out = exec(&probe, kind, Command::Version, timeout)?.unwrap_or(Value::Null);
    let reply: VersionAnswer = serde_json::from_value(out)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("plugin \"{kind}\" answered VERSION with {e}")))?;
    Ok(reply.supported.iter().filter_map(|v| CniVersion::parse(v)).collect())
}

/// Runs `kind` like [`exec`]; when the plugin rejects the config's spec version (a plugin
/// built before that version), retries once with the newest version it supports that still
/// defines `command`. The result comes back in that version's layout, which
/// [`crate::cni::CniResult::from_value`] reads like any other.
pub fn exec_negotiated(
    req: &Request,
    kind: &str,
    command: Command,
    timeout: Duration,
) -> Result<Option<Value>, CniError> {
    match exec(req, kind, command, timeout) {
        Err(e) if e.code == code::INCOMPATIBLE_VERSION => {
            let best = versions(req, kind, timeout)?
                .into_iter()
                .filter(|v| *v <= req.version && *v >= command.minimum_version())
                .max()
                .ok_or(e)?;
            log::debug!("plugin {kind} does not speak {}; using {best}", req.version);
            let mut config = req.config.clone();
            config.insert("cniVersion".into(), Value::from(best.as_str()));
            exec(&Request { version: best, ..req.with_config(config) }, kind, command, timeout)
        }
        other => other,
    }
}

/// What a delegate answered: its exit status and what it printed.
struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
}

fn spawn(req: &Request, exe: &PathBuf, command: Command, stdin: &[u8], timeout: Duration) -> std::io::Result<Output> {
    let deadline = Instant::now() + timeout;
    let mut cmd = Process::new(exe);
    cmd.env("CNI_COMMAND", command.as_str()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let vars = [
        ("CNI_CONTAINERID", Some(req.container_id.clone()).filter(|s| !s.is_empty())),
        ("CNI_IFNAME", Some(req.ifname.clone()).filter(|s| !s.is_empty())),
        ("CNI_NETNS", req.netns.as_ref().map(|p| p.display().to_string())),
        ("CNI_ARGS", req.args_raw.clone()),
        ("CNI_PATH", req.path_raw.clone()),
    ];
    for (key, value) in vars {
        match value {
            Some(v) => cmd.env(key, v),
            None => cmd.env_remove(key),
        };
    }
    let mut child = cmd.spawn()?;
    // The configuration goes in and the answer comes out on threads of their own, so that a
    // delegate that reads nothing, or never closes its stdout, cannot hold this one past the
    // deadline.
    let (tx, rx) = mpsc::channel::<std::io::Result<Vec<u8>>>();
    if let Some(mut pipe) = child.stdin.take() {
        let input = stdin.to_vec();
        std::thread::spawn(move || {
            // A plugin that exits without reading its stdin is reported by its exit status.
            let _ = pipe.write_all(&input);
        });
    }
    if let Some(pipe) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let read = pipe.take(MAX_OUTPUT).read_to_end(&mut out).map(|_| out);
            let _ = tx.send(read);
        });
    } else {
        let _ = tx.send(Ok(Vec::new()));
    }
    let stdout = match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(read) => read,
        Err(_) => return Err(stop(&mut child, timeout)),
    };
    // Its stdout is closed: the delegate has exited, or is about to (short, growing pauses: the
    // exit is a matter of microseconds).
    let mut pause = Duration::from_micros(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            return Err(stop(&mut child, timeout));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: stdout? })
}

/// Kills and reaps a delegate that ran out of time; answers the error that says so.
fn stop(child: &mut Child, timeout: Duration) -> std::io::Error {
    let _ = child.kill();
    let _ = child.wait();
    std::io::Error::new(ErrorKind::TimedOut, format!("no answer within {timeout:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::{CniVersion, Request};
    use serde_json::{Map, json};
    use std::os::unix::fs::PermissionsExt;

    const T: Duration = Duration::from_secs(30);

    fn request(dir: &std::path::Path) -> Request {
        let config: Map<String, Value> =
            serde_json::from_value(json!({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "fake"}})).unwrap();
        Request {
            command: Command::Add,
            container_id: "c1".into(),
            netns: Some("/proc/self/ns/net".into()),
            ifname: "eth0".into(),
            args_raw: Some("K8S_POD_NAME=p".into()),
            args: vec![("K8S_POD_NAME".into(), "p".into())],
            path_raw: Some(dir.display().to_string()),
            path: vec![dir.to_path_buf()],
            version: CniVersion::V1_0_0,
            network: "n".into(),
            config,
        }
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn passes_env_and_config_and_reads_the_result() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "fake",
            r#"conf=$(cat)
case "$conf" in *'"name":"n"'*) got=conf ;; *) got=none ;; esac
printf '{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.9/24"}],"seen":"%s %s %s %s"}' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_ARGS" "$got""#,
        );
        let out = exec(&request(dir.path()), "fake", Command::Add, T).unwrap().unwrap();
        assert_eq!(out["ips"][0]["address"], "10.0.0.9/24");
        assert_eq!(out["seen"], "ADD c1 K8S_POD_NAME=p conf");
    }

    #[test]
    fn relays_the_delegates_error() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "fake", r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"later"}'; exit 1"#);
        let err = exec(&request(dir.path()), "fake", Command::Del, T).unwrap_err();
        assert_eq!((err.code, err.msg.as_str()), (11, "later"));

        script(dir.path(), "fake", "exit 3");
        let err = exec(&request(dir.path()), "fake", Command::Del, T).unwrap_err();
        assert_eq!(err.code, code::INTERNAL);
    }

    #[test]
    fn missing_or_unsafe_plugins_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = exec(&request(dir.path()), "absent", Command::Add, T).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("not found on CNI_PATH"));
        let err = exec(&request(dir.path()), "../bin/sh", Command::Add, T).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        let mut req = request(dir.path());
        req.path.clear();
        assert_eq!(exec(&req, "fake", Command::Add, T).unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn a_delegate_that_hangs_is_stopped_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        // Reads nothing, holds its stdout open, never exits (until killed).
        script(dir.path(), "fake", "exec sleep 600");
        let t0 = Instant::now();
        let err = exec(&request(dir.path()), "fake", Command::Add, Duration::from_millis(300)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert!(err.msg.contains("did not answer ADD within 0.3s"), "{err}");
        // A delegate that answers in time is unaffected by the threads around it.
        script(dir.path(), "fake", r#"cat >/dev/null; printf '{"cniVersion":"1.0.0"}'"#);
        assert!(exec(&request(dir.path()), "fake", Command::Add, T).unwrap().is_some());
    }
}
