//! Delegation (spec section 4): running another plugin, found on CNI_PATH, with the same
//! environment and configuration, and reading back its result or error.

use super::error::{CniError, code, parse_reply};
use super::{CniVersion, Command, Request, is_safe_name};
use serde_json::Value;
use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::time::Duration;

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

/// Runs `kind` for `command` with `req`'s environment and configuration.
/// Returns the plugin's JSON output (ADD), or `None` when it printed nothing.
pub fn exec(req: &Request, kind: &str, command: Command) -> Result<Option<Value>, CniError> {
    let exe = find(req, kind)?;
    let stdin = req.config_bytes();
    let mut attempts = 0;
    let output = loop {
        match spawn(req, &exe, command, &stdin) {
            // A plugin binary being replaced in place: the runtime's own retry rule.
            Err(e) if e.kind() == ErrorKind::ExecutableFileBusy && attempts < 5 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(200));
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
pub fn versions(req: &Request, kind: &str) -> Result<Vec<CniVersion>, CniError> {
    #[derive(serde::Deserialize)]
    struct VersionAnswer {
        #[serde(rename = "supportedVersions", default)]
        supported: Vec<String>,
    }
    let probe = Request {
        config: serde_json::Map::from_iter([("cniVersion".into(), Value::from(req.version.as_str()))]),
        ..req.clone()
    };
    let out = exec(&probe, kind, Command::Version)?.unwrap_or(Value::Null);
    let reply: VersionAnswer = serde_json::from_value(out)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("plugin \"{kind}\" answered VERSION with {e}")))?;
    Ok(reply.supported.iter().filter_map(|v| CniVersion::parse(v)).collect())
}

/// Runs `kind` like [`exec`]; when the plugin rejects the config's spec version (a plugin
/// built before that version), retries once with the newest version it supports that still
/// defines `command`. The result comes back in that version's layout, which
/// [`crate::cni::CniResult::from_value`] reads like any other.
pub fn exec_negotiated(req: &Request, kind: &str, command: Command) -> Result<Option<Value>, CniError> {
    match exec(req, kind, command) {
        Err(e) if e.code == code::INCOMPATIBLE_VERSION => {
            let best = versions(req, kind)?
                .into_iter()
                .filter(|v| *v <= req.version && *v >= command.minimum_version())
                .max()
                .ok_or(e)?;
            log::debug!("plugin {kind} does not speak {}; using {best}", req.version);
            let mut config = req.config.clone();
            config.insert("cniVersion".into(), Value::from(best.as_str()));
            exec(&Request { version: best, ..req.with_config(config) }, kind, command)
        }
        other => other,
    }
}

fn spawn(req: &Request, exe: &PathBuf, command: Command, stdin: &[u8]) -> std::io::Result<std::process::Output> {
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
    if let Some(mut pipe) = child.stdin.take() {
        // A plugin that exits without reading its stdin is reported by its exit status.
        if let Err(e) = pipe.write_all(stdin)
            && e.kind() != ErrorKind::BrokenPipe
        {
            return Err(e);
        }
    }
    child.wait_with_output()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::{CniVersion, Request};
    use serde_json::{Map, json};
    use std::os::unix::fs::PermissionsExt;

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
        let out = exec(&request(dir.path()), "fake", Command::Add).unwrap().unwrap();
        assert_eq!(out["ips"][0]["address"], "10.0.0.9/24");
        assert_eq!(out["seen"], "ADD c1 K8S_POD_NAME=p conf");
    }

    #[test]
    fn relays_the_delegates_error() {
        let dir = tempfile::tempdir().unwrap();
        script(dir.path(), "fake", r#"echo '{"cniVersion":"1.0.0","code":11,"msg":"later"}'; exit 1"#);
        let err = exec(&request(dir.path()), "fake", Command::Del).unwrap_err();
        assert_eq!((err.code, err.msg.as_str()), (11, "later"));

        script(dir.path(), "fake", "exit 3");
        let err = exec(&request(dir.path()), "fake", Command::Del).unwrap_err();
        assert_eq!(err.code, code::INTERNAL);
    }

    #[test]
    fn missing_or_unsafe_plugins_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = exec(&request(dir.path()), "absent", Command::Add).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("not found on CNI_PATH"));
        let err = exec(&request(dir.path()), "../bin/sh", Command::Add).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        let mut req = request(dir.path());
        req.path.clear();
        assert_eq!(exec(&req, "fake", Command::Add).unwrap_err().code, code::INVALID_ENV);
    }
}
