//! The CNI protocol (spec 1.1.0), free of any Linux networking: reading the environment and the
//! network configuration, checking what each verb requires, negotiating versions, dispatching to a
//! [`Plugin`], and writing the result or the error to stdout. Environment, stdin and stdout are
//! parameters so that the whole protocol runs in-process in tests.

pub mod delegate;
pub mod error;
pub mod fields;
pub mod types;
pub mod version;

pub use error::{CniError, code};
pub use types::{Attachment, CniResult, Dns, Interface, IpConfig, Route};
pub use version::CniVersion;

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::PathBuf;

/// The six verbs of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }

    /// The oldest config version under which the spec defines this verb.
    pub fn minimum_version(self) -> CniVersion {
        match self {
            Self::Check => CniVersion::V0_4_0,
            Self::Status | Self::Gc => CniVersion::V1_1_0,
            _ => CniVersion::V0_3_0,
        }
    }

    fn needs_container(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }

    fn needs_netns(self) -> bool {
        matches!(self, Self::Add | Self::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the protocol reads its environment variables from.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var_os(key).and_then(|v| v.into_string().ok())
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// What a plugin implements; the protocol layer has already validated the request for the verb.
pub trait Plugin {
    fn add(&self, req: &Request) -> Result<CniResult, CniError>;
    fn del(&self, req: &Request) -> Result<(), CniError>;
    fn check(&self, req: &Request) -> Result<(), CniError>;
    fn status(&self, req: &Request) -> Result<(), CniError>;
    fn gc(&self, req: &Request) -> Result<(), CniError>;
}

/// One validated invocation: the verb, its environment and the network configuration.
#[derive(Debug, Clone)]
pub struct Request {
    pub command: Command,
    /// Empty for GC and STATUS, which carry no container.
    pub container_id: String,
    pub netns: Option<PathBuf>,
    /// Empty for GC and STATUS.
    pub ifname: String,
    /// CNI_ARGS as received, for passing on to delegates.
    pub args_raw: Option<String>,
    pub args: Vec<(String, String)>,
    /// CNI_PATH as received, for passing on to delegates.
    pub path_raw: Option<String>,
    pub path: Vec<PathBuf>,
    pub version: CniVersion,
    /// The network name (validated: usable as a file name).
    pub network: String,
    /// The whole plugin configuration object as received on stdin.
    pub config: Map<String, Value>,
}

impl Request {
    /// A CNI_ARGS value by key (e.g. `K8S_POD_NAMESPACE`).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The `prevResult` of a chained invocation, decoded.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        match self.config.get("prevResult") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => CniResult::from_value(v)
                .map(Some)
                .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("prevResult: {}", e.msg))),
        }
    }

    /// The attachments GC must keep. libcni sends both the spec's key and the name of the first
    /// 1.1 draft; an empty list means that nothing is valid. Neither key is an error (code 7):
    /// a GC that does not say what is still in use must not take everything for garbage.
    pub fn valid_attachments(&self) -> Result<Vec<Attachment>, CniError> {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            if let Some(v) = self.config.get(key).filter(|v| !v.is_null()) {
                return serde_json::from_value(v.clone()).map_err(|e| {
                    CniError::invalid_config(format!("\"{key}\" must be a list of {{containerID, ifname}}: {e}"))
                });
            }
        }
        Err(CniError::invalid_config(
            "GC needs \"cni.dev/valid-attachments\", the attachments still in use: without it nothing is removed",
        ))
    }

    /// The configuration re-encoded, as handed to a delegated plugin.
    pub fn config_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.config).unwrap_or_default()
    }

    /// The same request with another configuration object (for delegation).
    pub fn with_config(&self, config: Map<String, Value>) -> Request {
        Request { config, ..self.clone() }
    }
}

/// Reads and validates the request from `env` and `stdin`. VERSION never gets here.
pub fn parse_request(command: Command, env: &dyn Env, stdin: &[u8]) -> Result<Request, (Option<CniVersion>, CniError)> {
    let config = parse_config(stdin).map_err(|e| (None, e))?;
    let version = match config.get("cniVersion") {
        Some(Value::String(v)) => CniVersion::from_config(v).map_err(|e| (None, e))?,
        Some(_) => return Err((None, CniError::invalid_config("\"cniVersion\" must be a string"))),
        None => return Err((None, CniError::invalid_config("network configuration has no \"cniVersion\""))),
    };
    let fail = |e: CniError| (Some(version), e);

    if version < command.minimum_version() {
        return Err(fail(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("{command} needs cniVersion {} or newer, the config has {version}", command.minimum_version()),
        )));
    }
    let network = match config.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(_) => return Err(fail(CniError::invalid_config("\"name\" must be a string"))),
        None => return Err(fail(CniError::invalid_config("network configuration has no \"name\""))),
    };
    validate_network_name(&network).map_err(fail)?;

    let (container_id, ifname) = if command.needs_container() {
        let cid = require(env, "CNI_CONTAINERID", command).map_err(fail)?;
        validate_container_id(&cid).map_err(fail)?;
        let ifname = require(env, "CNI_IFNAME", command).map_err(fail)?;
        validate_ifname(&ifname).map_err(fail)?;
        (cid, ifname)
    } else {
        (String::new(), String::new())
    };
    let netns = match env.var("CNI_NETNS").filter(|s| !s.is_empty()) {
        Some(ns) => Some(PathBuf::from(ns)),
        None if command.needs_netns() => {
            return Err(fail(CniError::invalid_env(format!("CNI_NETNS is required for {command}"))));
        }
        None => None,
    };
    let args_raw = env.var("CNI_ARGS").filter(|s| !s.is_empty());
    let args = match &args_raw {
        Some(raw) => parse_cni_args(raw).map_err(fail)?,
        None => Vec::new(),
    };
    let path_raw = env.var("CNI_PATH").filter(|s| !s.is_empty());
    let path = path_raw
        .as_deref()
        .map(|p| p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
        .unwrap_or_default();

    Ok(Request { command, container_id, netns, ifname, args_raw, args, path_raw, path, version, network, config })
}

fn parse_config(stdin: &[u8]) -> Result<Map<String, Value>, CniError> {
    if stdin.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(CniError::new(code::DECODE_FAILURE, "no network configuration on stdin"));
    }
    let value: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("network configuration is not valid JSON: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(CniError::new(
            code::DECODE_FAILURE,
            format!("network configuration must be a JSON object, got {}", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn require(env: &dyn Env, key: &str, command: Command) -> Result<String, CniError> {
    env.var(key)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::invalid_env(format!("{key} is required for {command}")))
}

/// Letters, digits, '_', '.', '-', starting with a letter or digit (libcni's rule). Container ids
/// end up in file names and link aliases, so nothing else gets through.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    if is_safe_name(id) {
        Ok(())
    } else {
        Err(CniError::invalid_env("CNI_CONTAINERID has invalid characters")
            .with_details("allowed: letters, digits, '_', '.', '-', starting with a letter or digit"))
    }
}

/// Linux interface names: 1-15 bytes, not "." or "..", no '/', ':' or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let problem = if name.len() > 15 {
        Some("is longer than 15 characters")
    } else if name == "." || name == ".." {
        Some("cannot be \".\" or \"..\"")
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        Some("contains '/', ':' or whitespace")
    } else {
        None
    };
    match problem {
        Some(p) => Err(CniError::invalid_env(format!("CNI_IFNAME \"{}\" {p}", name.escape_debug()))),
        None => Ok(()),
    }
}

fn validate_network_name(name: &str) -> Result<(), CniError> {
    if is_safe_name(name) {
        Ok(())
    } else {
        Err(CniError::invalid_config(format!("\"name\" \"{}\" has invalid characters", name.escape_debug()))
            .with_details("allowed: letters, digits, '_', '.', '-', starting with a letter or digit"))
    }
}

/// The character set libcni allows for container ids and network names; safe as a file name.
pub fn is_safe_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn parse_cni_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    raw.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::invalid_env(format!("CNI_ARGS: \"{pair}\" is not KEY=VALUE"))),
        })
        .collect()
}

/// The largest network configuration read from stdin (a conflist's plugin with a prevResult is a
/// few kilobytes): what is larger is refused with code 7, and never read into memory whole.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Runs one CNI invocation end to end and returns the process exit code.
/// stdout receives exactly one JSON document (result, version reply or error) or nothing.
pub fn run(plugin: &dyn Plugin, env: &dyn Env, stdin: &mut dyn Read, stdout: &mut dyn Write) -> i32 {
    let (version, outcome) = dispatch(plugin, env, stdin);
    match outcome {
        Ok(None) => 0,
        Ok(Some(value)) => match write_json(stdout, &value) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("writing the result to stdout failed: {e}");
                1
            }
        },
        Err(err) => {
            let v = version.unwrap_or(CniVersion::LATEST);
            log::error!("{}: code {}: {err}", env.var("CNI_COMMAND").unwrap_or_default(), err.code);
            let reply = serde_json::to_value(err.to_reply(v.as_str())).unwrap_or(Value::Null);
            if let Err(e) = write_json(stdout, &reply) {
                log::error!("writing the error to stdout failed: {e}");
            }
            1
        }
    }
}

/// The process edge of a plugin role: reads stdin, hands the verb and the raw configuration to
/// `prepare` (which sets up logging before anything can be logged; what the configuration says
/// about logging is the role's business, not the protocol's), and runs the invocation on the
/// process's environment and stdout.
pub fn main(plugin: &dyn Plugin, prepare: &dyn Fn(Option<Command>, &[u8])) -> i32 {
    let mut input = Vec::new();
    // One byte more than allowed tells an oversized configuration from a full one.
    let read = std::io::stdin().take(MAX_CONFIG_BYTES + 1).read_to_end(&mut input);
    let command = std::env::var("CNI_COMMAND").ok().and_then(|c| Command::parse(&c));
    let oversized = input.len() as u64 > MAX_CONFIG_BYTES;
    prepare(command, if oversized { &[] } else { &input });
    if let Err(e) = read {
        log::error!("reading stdin: {e}");
    }
    let mut stdout = std::io::stdout().lock();
    run(plugin, &ProcessEnv, &mut input.as_slice(), &mut stdout)
}

type Dispatched = (Option<CniVersion>, Result<Option<Value>, CniError>);

fn dispatch(plugin: &dyn Plugin, env: &dyn Env, stdin: &mut dyn Read) -> Dispatched {
    let command = match env.var("CNI_COMMAND") {
        None => return (None, Err(CniError::invalid_env("CNI_COMMAND is not set"))),
        Some(c) => match Command::parse(&c) {
            Some(c) => c,
            None => {
                return (
                    None,
                    Err(CniError::invalid_env(format!(
                        "CNI_COMMAND \"{}\" is not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
                        c.escape_debug()
                    ))),
                );
            }
        },
    };
    if command == Command::Version {
        let reply = serde_json::to_value(version::VersionReply::new()).unwrap_or(Value::Null);
        return (None, Ok(Some(reply)));
    }
    let mut input = Vec::new();
    if let Err(e) = stdin.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut input) {
        return (None, Err(CniError::io(format!("reading stdin: {e}"))));
    }
    if input.len() as u64 > MAX_CONFIG_BYTES {
        return (
            None,
            Err(CniError::invalid_config(format!(
                "the network configuration on stdin is larger than {} MiB: refused unread",
                MAX_CONFIG_BYTES >> 20
            ))),
        );
    }
    let req = match parse_request(command, env, &input) {
        Ok(req) => req,
        Err((v, e)) => return (v, Err(e)),
    };
    log::debug!(
        "{command} network={} container={} ifname={} netns={}",
        req.network,
        req.container_id,
        req.ifname,
        req.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    );
    let version = Some(req.version);
    let outcome = match command {
        Command::Add => plugin.add(&req).map(|r| Some(r.to_value(req.version))),
        Command::Del => plugin.del(&req).map(|()| None),
        Command::Check => plugin.check(&req).map(|()| None),
        Command::Status => plugin.status(&req).map(|()| None),
        Command::Gc => plugin.gc(&req).map(|()| None),
        Command::Version => unreachable_version(),
    };
    (version, outcome)
}

fn unreachable_version() -> Result<Option<Value>, CniError> {
    Err(CniError::internal("VERSION is answered before dispatch"))
}

fn write_json(out: &mut dyn Write, value: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::RefCell;

    /// Records the requests it sees and answers with canned outcomes.
    #[derive(Default)]
    struct Recorder {
        seen: RefCell<Vec<Request>>,
        fail_with: Option<CniError>,
    }

    impl Recorder {
        fn outcome(&self, req: &Request) -> Result<(), CniError> {
            self.seen.borrow_mut().push(req.clone());
            match &self.fail_with {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            }
        }
    }

    impl Plugin for Recorder {
        fn add(&self, req: &Request) -> Result<CniResult, CniError> {
            self.outcome(req)?;
            Ok(CniResult {
                ips: vec![IpConfig { address: "10.1.0.2/24".parse().unwrap(), gateway: None, interface: None }],
                ..Default::default()
            })
        }
        fn del(&self, req: &Request) -> Result<(), CniError> {
            self.outcome(req)
        }
        fn check(&self, req: &Request) -> Result<(), CniError> {
            self.outcome(req)
        }
        fn status(&self, req: &Request) -> Result<(), CniError> {
            self.outcome(req)
        }
        fn gc(&self, req: &Request) -> Result<(), CniError> {
            self.outcome(req)
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn invoke(plugin: &Recorder, env: &HashMap<String, String>, stdin: &str) -> (i32, Value) {
        let mut out = Vec::new();
        let code = run(plugin, env, &mut stdin.as_bytes(), &mut out);
        let value = if out.is_empty() { Value::Null } else { serde_json::from_slice(&out).unwrap() };
        (code, value)
    }

    fn add_env() -> HashMap<String, String> {
        env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"),
        ])
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"net1","type":"headcni"}"#;

    #[test]
    fn version_reply_lists_every_supported_version() {
        let p = Recorder::default();
        let (code, v) = invoke(&p, &env(&[("CNI_COMMAND", "VERSION")]), r#"{"cniVersion":"1.1.0"}"#);
        assert_eq!(code, 0);
        assert_eq!(
            v,
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }

    #[test]
    fn add_parses_env_args_and_path() {
        let p = Recorder::default();
        let (code, v) = invoke(&p, &add_env(), CONF);
        assert_eq!(code, 0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["ips"][0]["address"], "10.1.0.2/24");
        let req = &p.seen.borrow()[0];
        assert_eq!(req.container_id, "abc123");
        assert_eq!(req.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(req.path, vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
        assert_eq!(req.network, "net1");
    }

    #[test]
    fn result_follows_the_config_version() {
        let p = Recorder::default();
        let conf = r#"{"cniVersion":"0.3.1","name":"net1","type":"headcni"}"#;
        let (_, v) = invoke(&p, &add_env(), conf);
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
    }

    fn assert_error(value: &Value, code: u32, needle: &str) {
        assert_eq!(value["code"], code, "{value}");
        let msg = value["msg"].as_str().unwrap();
        assert!(msg.contains(needle), "message {msg:?} should mention {needle:?}");
    }

    #[test]
    fn bad_stdin_is_a_decode_error() {
        let p = Recorder::default();
        for (stdin, needle) in [
            ("", "no network configuration"),
            ("   \n", "no network configuration"),
            ("{\"cniVersion\":", "not valid JSON"),
            ("[1,2]", "must be a JSON object"),
            ("\"text\"", "must be a JSON object"),
        ] {
            let (code, v) = invoke(&p, &add_env(), stdin);
            assert_eq!(code, 1);
            assert_error(&v, code::DECODE_FAILURE, needle);
        }
        assert!(p.seen.borrow().is_empty());
    }

    #[test]
    fn bad_env_is_code_4_and_names_the_variable() {
        let p = Recorder::default();
        let mut e = add_env();
        e.remove("CNI_COMMAND");
        assert_error(&invoke(&p, &e, CONF).1, code::INVALID_ENV, "CNI_COMMAND");

        let mut e = add_env();
        e.insert("CNI_COMMAND".into(), "FROB".into());
        assert_error(&invoke(&p, &e, CONF).1, code::INVALID_ENV, "FROB");

        for var in ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            let mut e = add_env();
            e.remove(var);
            assert_error(&invoke(&p, &e, CONF).1, code::INVALID_ENV, var);
        }
        let mut e = add_env();
        e.insert("CNI_IFNAME".into(), "a-very-long-ifname0".into());
        assert_error(&invoke(&p, &e, CONF).1, code::INVALID_ENV, "longer than 15");

        for bad in ["../etc", "a/b", "-abc", "a b", ""] {
            let mut e = add_env();
            e.insert("CNI_CONTAINERID".into(), bad.into());
            assert_error(&invoke(&p, &e, CONF).1, code::INVALID_ENV, "CNI_CONTAINERID");
        }
        let mut e = add_env();
        e.insert("CNI_ARGS".into(), "K8S_POD_NAME".into());
        assert_error(&invoke(&p, &e, CONF).1, code::INVALID_ENV, "CNI_ARGS");
        assert!(p.seen.borrow().is_empty());
    }

    #[test]
    fn del_does_not_need_a_netns() {
        let p = Recorder::default();
        let mut e = add_env();
        e.insert("CNI_COMMAND".into(), "DEL".into());
        e.remove("CNI_NETNS");
        let (code, v) = invoke(&p, &e, CONF);
        assert_eq!((code, v), (0, Value::Null));
        assert_eq!(p.seen.borrow()[0].netns, None);
    }

    #[test]
    fn gc_and_status_need_only_the_config_and_version_1_1() {
        let p = Recorder::default();
        let conf11 = r#"{"cniVersion":"1.1.0","name":"net1","type":"headcni",
            "cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
        for cmd in ["GC", "STATUS"] {
            let (code, _) = invoke(&p, &env(&[("CNI_COMMAND", cmd)]), conf11);
            assert_eq!(code, 0, "{cmd}");
            let (code, v) = invoke(&p, &env(&[("CNI_COMMAND", cmd)]), CONF);
            assert_eq!(code, 1);
            assert_error(&v, code::INCOMPATIBLE_VERSION, "1.1.0");
        }
        let seen = p.seen.borrow();
        assert_eq!(
            seen[0].valid_attachments().unwrap(),
            vec![Attachment { container_id: "a".into(), ifname: "eth0".into() }]
        );
    }

    #[test]
    fn valid_attachments_prefers_the_spec_key_and_empty_means_none() {
        let p = Recorder::default();
        let conf = r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[],
            "cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#;
        invoke(&p, &env(&[("CNI_COMMAND", "GC")]), conf);
        assert!(p.seen.borrow()[0].valid_attachments().unwrap().is_empty());
        invoke(&p, &env(&[("CNI_COMMAND", "GC")]), r#"{"cniVersion":"1.1.0","name":"n"}"#);
        let err = p.seen.borrow()[1].valid_attachments().unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("nothing is removed"), "{err}");
    }

    #[test]
    fn an_oversized_configuration_is_refused_unread() {
        let p = Recorder::default();
        let mut big = String::from(r#"{"cniVersion":"1.0.0","name":"n","pad":""#);
        big.push_str(&"x".repeat(MAX_CONFIG_BYTES as usize));
        big.push_str(r#""}"#);
        let (code, v) = invoke(&p, &add_env(), &big);
        assert_eq!(code, 1);
        assert_error(&v, code::INVALID_CONFIG, "larger than 1 MiB");
        assert!(p.seen.borrow().is_empty(), "the plugin never ran");
    }

    #[test]
    fn check_needs_version_0_4() {
        let p = Recorder::default();
        let mut e = add_env();
        e.insert("CNI_COMMAND".into(), "CHECK".into());
        let conf = r#"{"cniVersion":"0.3.1","name":"net1"}"#;
        assert_error(&invoke(&p, &e, conf).1, code::INCOMPATIBLE_VERSION, "0.4.0");
    }

    #[test]
    fn config_errors_name_the_field() {
        let p = Recorder::default();
        let (_, v) = invoke(&p, &add_env(), r#"{"name":"n"}"#);
        assert_error(&v, code::INVALID_CONFIG, "cniVersion");
        let (_, v) = invoke(&p, &add_env(), r#"{"cniVersion":"9.9.9","name":"n"}"#);
        assert_error(&v, code::INCOMPATIBLE_VERSION, "9.9.9");
        let (_, v) = invoke(&p, &add_env(), r#"{"cniVersion":"1.0.0"}"#);
        assert_error(&v, code::INVALID_CONFIG, "name");
        let (_, v) = invoke(&p, &add_env(), r#"{"cniVersion":"1.0.0","name":"../x"}"#);
        assert_error(&v, code::INVALID_CONFIG, "name");
        assert_eq!(v["cniVersion"], "1.0.0");
    }

    #[test]
    fn plugin_errors_reach_stdout_with_the_config_version() {
        let p = Recorder { fail_with: Some(CniError::new(code::TRY_AGAIN_LATER, "busy")), ..Default::default() };
        let (code, v) = invoke(&p, &add_env(), CONF);
        assert_eq!(code, 1);
        assert_eq!(v, json!({"cniVersion": "1.0.0", "code": 11, "msg": "busy"}));
    }

    #[test]
    fn unknown_config_keys_are_kept_for_the_plugin() {
        let p = Recorder::default();
        invoke(&p, &add_env(), r#"{"cniVersion":"1.0.0","name":"n","whatever":{"x":1}}"#);
        assert_eq!(p.seen.borrow()[0].config["whatever"]["x"], 1);
    }
}
