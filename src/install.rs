//! `headcni install`: puts HeadCNI on a node. Copies the running binary into the CNI bin
//! directory (atomically, so runtimes executing the old one are unaffected), links
//! `headcni-ipam` to it, and writes the conflist, last, because a runtime treats the conflist's
//! appearance as "network ready". Idempotent; `--uninstall` removes exactly these three files
//! and nothing that belongs to anyone else.
//!
//! Every run first makes a [`Plan`] with every check a real run makes (the chained plugins
//! that are present, their spec versions, other networks' files that would win, the files it
//! would replace); `--dry-run` prints that plan and the conflist and changes nothing.
//! `--exclusive` moves other networks' configurations aside ([`crate::cniconf`]), and
//! `--uninstall` brings them back.

use crate::cni::{CniVersion, is_safe_name};
use crate::cniconf::{Move, SET_ASIDE_SUFFIX, restore_plan, set_aside_plan};
use crate::fsutil::{self, Durability};
use crate::ipam::allocator::Strategy;
use crate::nodefile::{MAX_MTU, MIN_MTU};
use crate::plugin::PLUGIN_NAME;
use crate::plugin::config::PluginConfig;
use serde_json::{Map, Value, json};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} is not HeadCNI's; leaving it alone ({why})")]
    Foreign { path: PathBuf, why: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io { what, path, source }
}

/// The IPAM plugin the conflist delegates to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IpamKind {
    #[value(name = "headcni-ipam")]
    HeadcniIpam,
    #[value(name = "host-local")]
    HostLocal,
}

/// The allocation strategies of headcni-ipam as `--strategy` values, spelled as in the config,
/// with the same aliases the config accepts (`dense-pack`, `dense_pack`).
impl clap::ValueEnum for Strategy {
    fn value_variants<'a>() -> &'a [Self] {
        &[Strategy::Sequential, Strategy::Random, Strategy::Dense]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let value = clap::builder::PossibleValue::new(self.as_str());
        Some(match self {
            Strategy::Dense => value.aliases(["dense-pack", "dense_pack"]),
            _ => value,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Directory of the CNI plugin binaries.
    #[arg(long, env = "HEADCNI_INSTALL_BIN_DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Directory of the CNI network configurations.
    #[arg(long, env = "HEADCNI_INSTALL_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// File name of the conflist in --conf-dir.
    #[arg(long, env = "HEADCNI_INSTALL_CONFLIST_NAME", default_value = "10-headcni.conflist")]
    pub conflist_name: String,
    /// Network name in the conflist.
    #[arg(long, env = "HEADCNI_INSTALL_NETWORK_NAME", default_value = "headcni")]
    pub network_name: String,
    /// IPAM plugin.
    #[arg(long, env = "HEADCNI_INSTALL_IPAM", value_enum, default_value = "headcni-ipam")]
    pub ipam: IpamKind,
    /// Allocation strategy (headcni-ipam only).
    #[arg(long, env = "HEADCNI_INSTALL_STRATEGY", value_enum, default_value = "sequential")]
    pub strategy: Strategy,
    /// Pod MTU: "auto" (from the agent's node file, i.e. tailscale0's MTU) or a number.
    #[arg(long, env = "HEADCNI_INSTALL_MTU", default_value = "auto")]
    pub mtu: String,
    /// Give pods IPv6 addresses from the node's IPv6 pod CIDR (--enable-ipv6, or =true/false).
    #[arg(long, env = "HEADCNI_INSTALL_ENABLE_IPV6", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enable_ipv6: bool,
    /// The conflist's `enable_network_policy`: whether the node's agent enforces NetworkPolicies
    /// (the agent's --enable-network-policy must say the same).
    #[arg(long, env = "HEADCNI_INSTALL_ENABLE_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_network_policy: bool,
    /// DNS nameserver in the CNI result (repeatable).
    #[arg(long = "dns-nameserver", env = "HEADCNI_INSTALL_DNS_NAMESERVERS", value_delimiter = ',')]
    pub dns_nameservers: Vec<String>,
    /// DNS search domain in the CNI result (repeatable).
    #[arg(long = "dns-search", env = "HEADCNI_INSTALL_DNS_SEARCH", value_delimiter = ',')]
    pub dns_search: Vec<String>,
    /// DNS option in the CNI result (repeatable).
    #[arg(long = "dns-option", env = "HEADCNI_INSTALL_DNS_OPTIONS", value_delimiter = ',')]
    pub dns_options: Vec<String>,
    /// Chain the standard portmap plugin (hostPort support) when it is in --bin-dir; a missing
    /// one is left out with a warning.
    #[arg(long, env = "HEADCNI_INSTALL_PORTMAP", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub portmap: bool,
    /// Chain the standard bandwidth plugin (traffic shaping annotations) when it is in
    /// --bin-dir; a missing one is left out with a warning.
    #[arg(long, env = "HEADCNI_INSTALL_BANDWIDTH", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub bandwidth: bool,
    /// Move every other network's configuration in --conf-dir aside (NAME.headcni-aside), so
    /// that the runtime can only use HeadCNI's; --uninstall puts them back.
    #[arg(long, env = "HEADCNI_INSTALL_EXCLUSIVE", default_value_t = false, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub exclusive: bool,
    /// Run directory shared with the agent (node file, metrics events).
    #[arg(long, env = "HEADCNI_RUN_DIR", default_value = crate::nodefile::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Write the conflist into this directory instead of --conf-dir, for `headcni agent
    /// --publish-conflist` to move into --conf-dir once the node can attach pods: a runtime
    /// that takes a conflist's presence for network readiness (containerd 1.6, CRI-O) then
    /// waits for the agent.
    #[arg(long, env = "HEADCNI_INSTALL_STAGE_DIR")]
    pub stage_dir: Option<PathBuf>,
    /// IPAM data directory (headcni-ipam: default /var/lib/headcni/ipam).
    #[arg(long, env = "HEADCNI_INSTALL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Plugin log file.
    #[arg(long, env = "HEADCNI_INSTALL_LOG_FILE")]
    pub log_file: Option<PathBuf>,
    /// Plugin log level (error, warn, info, debug).
    #[arg(long, env = "HEADCNI_INSTALL_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Make every check of a real run, print the conflist and what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove what install put in place (and restore what --exclusive set aside), nothing else.
    #[arg(long)]
    pub uninstall: bool,
}

/// What changed on disk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileChanges {
    pub changed: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
}

fn check_path(flag: &str, path: &Path) -> Result<(), InstallError> {
    if path.is_absolute() && !path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        Ok(())
    } else {
        Err(InstallError::Invalid(format!("--{flag} {} must be an absolute path without \"..\"", path.display())))
    }
}

impl InstallArgs {
    fn validate(&self) -> Result<(), InstallError> {
        check_path("bin-dir", &self.bin_dir)?;
        check_path("conf-dir", &self.conf_dir)?;
        check_path("run-dir", &self.run_dir)?;
        if let Some(p) = &self.data_dir {
            check_path("data-dir", p)?;
        }
        if let Some(p) = &self.stage_dir {
            check_path("stage-dir", p)?;
            if p == &self.conf_dir {
                return Err(InstallError::Invalid("--stage-dir must not be --conf-dir".into()));
            }
        }
        if let Some(p) = &self.log_file {
            check_path("log-file", p)?;
        }
        let name_ok = is_safe_name(&self.conflist_name)
            && (self.conflist_name.ends_with(".conflist") || self.conflist_name.ends_with(".conf"));
        if !name_ok {
            return Err(InstallError::Invalid(format!(
                "--conflist-name {:?} must be a plain file name ending in .conflist",
                self.conflist_name
            )));
        }
        if !is_safe_name(&self.network_name) {
            return Err(InstallError::Invalid(format!(
                "--network-name {:?}: use letters, digits, '_', '.', '-'",
                self.network_name
            )));
        }
        Ok(())
    }

    fn mtu(&self) -> Result<Option<u32>, InstallError> {
        if self.mtu == "auto" {
            return Ok(None);
        }
        match self.mtu.parse::<u32>() {
            Ok(n) if (MIN_MTU..=MAX_MTU).contains(&n) => Ok(Some(n)),
            _ => Err(InstallError::Invalid(format!(
                "--mtu {:?} must be \"auto\" or a number in {MIN_MTU}..{MAX_MTU}",
                self.mtu
            ))),
        }
    }

    /// The standard plugins asked for, with what is lost without each.
    fn wanted_chain(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if self.portmap {
            out.push(("portmap", "hostPort does not work on this node"));
        }
        if self.bandwidth {
            out.push(("bandwidth", "the bandwidth annotations of pods are ignored on this node"));
        }
        out
    }

    /// The configuration objects of the plugins chained after headcni.
    fn chained(present: &[String]) -> Vec<Value> {
        present
            .iter()
            .map(|kind| match kind.as_str() {
                "portmap" => json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
                _ => json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
            })
            .collect()
    }

    /// The headcni plugin object of the conflist.
    fn plugin_object(&self) -> Result<Map<String, Value>, InstallError> {
        let mut ipam = Map::new();
        match self.ipam {
            IpamKind::HeadcniIpam => {
                ipam.insert("type".into(), json!("headcni-ipam"));
                ipam.insert("allocation_strategy".into(), json!(self.strategy.as_str()));
            }
            IpamKind::HostLocal => {
                ipam.insert("type".into(), json!("host-local"));
            }
        }
        if let Some(dir) = &self.data_dir {
            ipam.insert("dataDir".into(), json!(dir));
        }
        let mut plugin = Map::new();
        plugin.insert("type".into(), json!(PLUGIN_NAME));
        if let Some(mtu) = self.mtu()? {
            plugin.insert("mtu".into(), json!(mtu));
        }
        if self.enable_ipv6 {
            plugin.insert("enable_ipv6".into(), json!(true));
        }
        plugin.insert("enable_network_policy".into(), json!(self.enable_network_policy));
        plugin.insert("run_dir".into(), json!(self.run_dir));
        if let Some(f) = &self.log_file {
            plugin.insert("log_file".into(), json!(f));
        }
        if let Some(l) = &self.log_level {
            plugin.insert("log_level".into(), json!(l));
        }
        if !(self.dns_nameservers.is_empty() && self.dns_search.is_empty() && self.dns_options.is_empty()) {
            let mut dns = Map::new();
            for (key, list) in
                [("nameservers", &self.dns_nameservers), ("search", &self.dns_search), ("options", &self.dns_options)]
            {
                if !list.is_empty() {
                    dns.insert(key.into(), json!(list));
                }
            }
            plugin.insert("dns".into(), Value::Object(dns));
        }
        plugin.insert("ipam".into(), Value::Object(ipam));
        Ok(plugin)
    }

    /// Renders the conflist for spec `version`, chaining the plugins in `chain` (as found in
    /// --bin-dir), and checks it with the plugin's own parser.
    pub fn render(&self, versions: &[CniVersion], chain: &[String]) -> Result<String, InstallError> {
        self.validate()?;
        let newest = versions.iter().max().copied().unwrap_or(CniVersion::V1_0_0);
        // Runtimes that predate cniVersions read cniVersion; give them 1.0.0 when possible.
        let base = if versions.contains(&CniVersion::V1_0_0) { CniVersion::V1_0_0 } else { newest };
        let plugin = self.plugin_object()?;
        let mut as_request = plugin.clone();
        as_request.insert("cniVersion".into(), json!(base.as_str()));
        as_request.insert("name".into(), json!(self.network_name));
        PluginConfig::parse(&as_request)
            .map_err(|e| InstallError::Invalid(format!("rendered config rejected: {e}")))?;

        let mut plugins = vec![Value::Object(plugin)];
        plugins.extend(Self::chained(chain));
        let mut sorted: Vec<&str> = versions.iter().map(|v| v.as_str()).collect();
        sorted.sort();
        let conflist = json!({
            "cniVersion": base.as_str(),
            "cniVersions": sorted,
            "name": self.network_name,
            "plugins": plugins,
        });
        let mut text = serde_json::to_string_pretty(&conflist)
            .map_err(|e| InstallError::Invalid(format!("encoding the conflist: {e}")))?;
        text.push('\n');
        Ok(text)
    }

    /// Where the runtime reads the conflist.
    fn conflist_path(&self) -> PathBuf {
        self.conf_dir.join(&self.conflist_name)
    }

    /// Where install writes it: the stage directory when one is given.
    fn written_conflist_path(&self) -> PathBuf {
        self.stage_dir.as_deref().unwrap_or(&self.conf_dir).join(&self.conflist_name)
    }
}

/// The chained plugins found in --bin-dir, and a warning for each one asked for but missing.
fn present_chain(args: &InstallArgs) -> (Vec<String>, Vec<String>) {
    let mut present = Vec::new();
    let mut warnings = Vec::new();
    for (kind, loss) in args.wanted_chain() {
        let exe = args.bin_dir.join(kind);
        if exe.is_file() {
            present.push(kind.to_string());
        } else {
            warnings.push(format!(
                "{} is missing: {kind} is left out of the chain, so {loss}; install the standard CNI plugins \
                 (containernetworking-plugins) into {} and run install again, or pass --{kind}=false",
                exe.display(),
                args.bin_dir.display()
            ));
        }
    }
    (present, warnings)
}

/// The spec versions every chained plugin present in `bin_dir` speaks, together with headcni's.
fn common_versions(args: &InstallArgs, chain: &[String]) -> Result<Vec<CniVersion>, InstallError> {
    let mut common: Vec<CniVersion> = CniVersion::ALL.to_vec();
    for kind in chain {
        let exe = args.bin_dir.join(kind);
        let supported = match plugin_versions(&exe) {
            Ok(versions) => versions,
            // The installer runs in a FROM scratch image: a distribution's dynamically linked
            // plugin cannot start there. Every plugin release since 2021 speaks 1.0.0; the
            // conflist then leaves 1.1.0 out, which costs only STATUS and GC.
            Err(e) => {
                log::warn!("cannot ask {} for its spec versions ({e}); assuming up to 1.0.0", exe.display());
                CniVersion::ALL.into_iter().filter(|v| *v <= CniVersion::V1_0_0).collect()
            }
        };
        common.retain(|v| supported.contains(v));
    }
    if common.is_empty() {
        return Err(InstallError::Invalid("the chained plugins share no CNI version with headcni".into()));
    }
    Ok(common)
}

fn plugin_versions(exe: &Path) -> io::Result<Vec<CniVersion>> {
    let mut child = Command::new(exe)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        let _ = stdin.write_all(br#"{"cniVersion":"1.1.0"}"#);
    }
    let out = child.wait_with_output()?;
    let reply: Value = serde_json::from_slice(&out.stdout).map_err(io::Error::other)?;
    Ok(reply["supportedVersions"]
        .as_array()
        .map(|l| l.iter().filter_map(|v| v.as_str().and_then(CniVersion::parse)).collect())
        .unwrap_or_default())
}

fn same_content(path: &Path, data: &[u8]) -> bool {
    fs::read(path).map(|old| old == data).unwrap_or(false)
}

fn install_binary(source: &Path, bin_dir: &Path, out: &mut FileChanges) -> Result<(), InstallError> {
    let target = bin_dir.join(PLUGIN_NAME);
    let data = fs::read(source).map_err(io_err("reading", source))?;
    if same_content(&target, &data) {
        out.unchanged.push(target);
        return Ok(());
    }
    // Rename over the old file: a runtime executing the old binary keeps its inode.
    fsutil::write_atomic(&target, &data, 0o755, Durability::PowerLoss).map_err(io_err("writing", &target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &target))?;
    out.changed.push(target);
    Ok(())
}

fn install_symlink(bin_dir: &Path, out: &mut FileChanges) -> Result<(), InstallError> {
    let link = bin_dir.join(crate::ipam::PLUGIN_NAME);
    match fs::read_link(&link) {
        Ok(target) if target == Path::new(PLUGIN_NAME) => {
            out.unchanged.push(link);
            return Ok(());
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(_) => {
            return Err(InstallError::Foreign { path: link, why: "it exists and is not a symlink".into() });
        }
    }
    let tmp = bin_dir.join(format!(".{}.tmp.{}", crate::ipam::PLUGIN_NAME, std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(PLUGIN_NAME, &tmp).map_err(io_err("creating symlink", &tmp))?;
    fs::rename(&tmp, &link).map_err(io_err("renaming symlink to", &link))?;
    out.changed.push(link);
    Ok(())
}

/// Whether the conflist at `path` may be written: absent, or HeadCNI's. `Ok(true)`: it holds
/// `text` already.
fn check_conflist(path: &Path, text: &str) -> Result<bool, InstallError> {
    match fs::read_to_string(path) {
        Ok(old) if old == text => Ok(true),
        Ok(old) if !is_ours(&old) => {
            Err(InstallError::Foreign { path: path.to_path_buf(), why: "its first plugin is not headcni".into() })
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

/// Whether the headcni-ipam link may be written: absent, or a symlink.
fn check_symlink(bin_dir: &Path) -> Result<(), InstallError> {
    let link = bin_dir.join(crate::ipam::PLUGIN_NAME);
    match fs::symlink_metadata(&link) {
        Ok(m) if !m.file_type().is_symlink() => {
            Err(InstallError::Foreign { path: link, why: "it exists and is not a symlink".into() })
        }
        _ => Ok(()),
    }
}

fn install_conflist(path: &Path, text: &str, out: &mut FileChanges) -> Result<(), InstallError> {
    if check_conflist(path, text)? {
        out.unchanged.push(path.to_path_buf());
        return Ok(());
    }
    fsutil::write_atomic(path, text.as_bytes(), 0o644, Durability::PowerLoss).map_err(io_err("writing", path))?;
    out.changed.push(path.to_path_buf());
    Ok(())
}

/// A conflist is HeadCNI's when its first plugin is headcni.
fn is_ours(conflist: &str) -> bool {
    serde_json::from_str::<Value>(conflist).map(|v| crate::cniconf::is_headcni(&v)).unwrap_or(false)
}

/// What an install would do, found by every check a real run makes.
#[derive(Debug)]
pub struct Plan {
    /// The conflist as it would be written.
    pub conflist: String,
    /// Whether the conflist on disk holds exactly that already.
    pub conflist_unchanged: bool,
    /// The standard plugins chained (present in --bin-dir).
    pub chain: Vec<String>,
    /// Other networks' files moved aside (--exclusive).
    pub set_aside: Vec<Move>,
    /// What the operator must hear about: missing plugins, configurations that win over
    /// HeadCNI's, a pod MTU above the tailnet's.
    pub warnings: Vec<String>,
}

/// Makes the plan of an install (not of an uninstall): nothing is changed.
pub fn plan(args: &InstallArgs, source: &Path) -> Result<Plan, InstallError> {
    args.validate()?;
    let (chain, mut warnings) = present_chain(args);
    let conflist = args.render(&common_versions(args, &chain)?, &chain)?;
    fs::metadata(source).map_err(io_err("reading", source))?;
    check_symlink(&args.bin_dir)?;
    let conflist_unchanged = check_conflist(&args.conflist_path(), &conflist)?;
    let dir = &args.conf_dir;
    let set_aside = if args.exclusive {
        let (moves, blocked) = set_aside_plan(dir, &args.conflist_name).map_err(io_err("reading", dir))?;
        for name in blocked {
            warnings.push(format!(
                "{} stays in place: {name}{SET_ASIDE_SUFFIX} exists already (remove one of the two by hand)",
                dir.join(&name).display()
            ));
        }
        moves
    } else {
        let before = crate::cniconf::sorting_before(dir, &args.conflist_name).map_err(io_err("reading", dir))?;
        for name in before {
            warnings.push(format!(
                "{name} sorts before {} in {}: the container runtime uses the first network configuration, so \
                 pods on this node get that network, not HeadCNI's; remove {name}, or install with --exclusive, \
                 which moves other networks' configurations aside ({name}{SET_ASIDE_SUFFIX}) until \
                 --uninstall",
                args.conflist_name,
                dir.display()
            ));
        }
        Vec::new()
    };
    if let Some(mtu) = args.mtu()?
        && let Ok(Some(node)) = crate::nodefile::NodeFile::load(&crate::nodefile::path_in(&args.run_dir))
        && let Some(tailnet) = node.mtu
        && mtu > tailnet
    {
        warnings.push(format!(
            "--mtu {mtu} is larger than the agent's pod MTU {tailnet} (the tailnet interface's): packets \
             larger than {tailnet} bytes between pods on different nodes are lost (large transfers and TLS \
             handshakes hang); use --mtu=auto"
        ));
    }
    Ok(Plan { conflist, conflist_unchanged, chain, set_aside, warnings })
}

/// Installs (or, with --uninstall, removes) HeadCNI on this node.
pub fn run(args: &InstallArgs, source: &Path) -> Result<FileChanges, InstallError> {
    if args.uninstall {
        args.validate()?;
        return uninstall(args);
    }
    let plan = plan(args, source)?;
    apply(args, source, &plan)
}

fn apply(args: &InstallArgs, source: &Path, plan: &Plan) -> Result<FileChanges, InstallError> {
    let mut out = FileChanges::default();
    let conflist = args.written_conflist_path();
    for dir in [&args.bin_dir, conflist.parent().unwrap_or(&args.conf_dir)] {
        fsutil::ensure_dir(dir, 0o755).map_err(io_err("creating", dir))?;
    }
    install_binary(source, &args.bin_dir, &mut out)?;
    install_symlink(&args.bin_dir, &mut out)?;
    install_conflist(&conflist, &plan.conflist, &mut out)?;
    // Only once HeadCNI's configuration is written: where it is staged for the agent, the
    // runtime sees no network until the agent publishes it, which is right (the node turns
    // ready only when pods can be attached), and never another network's by mistake.
    crate::cniconf::apply(&plan.set_aside).map_err(|e| InstallError::Io {
        what: "setting aside",
        path: args.conf_dir.clone(),
        source: e,
    })?;
    out.changed.extend(plan.set_aside.iter().map(|m| m.to.clone()));
    Ok(out)
}

/// Puts the running binary and the headcni-ipam link into `bin_dir` (what install does, for the
/// agent that puts back what an uninstall it then saw called off had removed).
pub fn install_binaries(bin_dir: &Path) -> Result<FileChanges, InstallError> {
    let source = std::env::current_exe().map_err(io_err("finding the running binary", Path::new("/proc/self/exe")))?;
    let mut out = FileChanges::default();
    install_binary(&source, bin_dir, &mut out)?;
    install_symlink(bin_dir, &mut out)?;
    Ok(out)
}

/// Puts the conflist `staged` (written by `install --stage-dir`) at `target`, atomically, when
/// it is not there already; answers whether anything changed. A `target` that is another
/// network's conflist is left alone (an error).
pub fn publish_conflist(staged: &Path, target: &Path) -> Result<bool, InstallError> {
    let text = fs::read_to_string(staged).map_err(io_err("reading", staged))?;
    if !is_ours(&text) {
        return Err(InstallError::Foreign {
            path: staged.to_path_buf(),
            why: "its first plugin is not headcni".into(),
        });
    }
    let mut out = FileChanges::default();
    install_conflist(target, &text, &mut out)?;
    Ok(!out.changed.is_empty())
}

fn uninstall(args: &InstallArgs) -> Result<FileChanges, InstallError> {
    let mut conflists = vec![args.conflist_path()];
    conflists.extend(args.stage_dir.as_ref().map(|_| args.written_conflist_path()));
    remove_installed(Some(&args.bin_dir), &conflists)
}

/// Removes what install puts on a node: the conflists given (only HeadCNI's own), and the
/// headcni-ipam link and the headcni binary in `bin_dir`; answers what it removed.
pub fn remove_installed(bin_dir: Option<&Path>, conflists: &[PathBuf]) -> Result<FileChanges, InstallError> {
    let mut out = FileChanges::default();
    // Other networks' configurations (set aside by --exclusive) back first: the node is never
    // without one.
    let mut dirs: Vec<&Path> = conflists.iter().filter_map(|c| c.parent()).collect();
    dirs.dedup();
    for dir in dirs {
        let (moves, blocked) = restore_plan(dir).map_err(io_err("reading", dir))?;
        for name in blocked {
            log::warn!("{} is left set aside: its original name is taken again", dir.join(name).display());
        }
        crate::cniconf::apply(&moves).map_err(|e| InstallError::Io {
            what: "restoring",
            path: dir.to_path_buf(),
            source: e,
        })?;
        out.changed.extend(moves.into_iter().map(|m| m.to));
    }
    for conflist in conflists {
        if let Ok(text) = fs::read_to_string(conflist) {
            if is_ours(&text) {
                fs::remove_file(conflist).map_err(io_err("removing", conflist))?;
                out.changed.push(conflist.clone());
            } else {
                log::warn!("{} is not HeadCNI's conflist; left in place", conflist.display());
            }
        }
    }
    let Some(bin_dir) = bin_dir else { return Ok(out) };
    let link = bin_dir.join(crate::ipam::PLUGIN_NAME);
    if fs::read_link(&link).map(|t| t == Path::new(PLUGIN_NAME)).unwrap_or(false) {
        fs::remove_file(&link).map_err(io_err("removing", &link))?;
        out.changed.push(link);
    }
    let bin = bin_dir.join(PLUGIN_NAME);
    if bin.is_file() {
        fs::remove_file(&bin).map_err(io_err("removing", &bin))?;
        out.changed.push(bin);
    }
    Ok(out)
}

/// Entry point of `headcni install`: the exit code (see `headcni --help`).
pub fn main(args: &InstallArgs) -> i32 {
    crate::logging::init_stderr("install", "info");
    match run_main(args) {
        Ok(()) => crate::cli::exit::OK,
        Err(e) => {
            crate::logging::fatal("install", &e);
            match e {
                InstallError::Invalid(_) => crate::cli::exit::USAGE,
                _ => crate::cli::exit::FAILED,
            }
        }
    }
}

fn run_main(args: &InstallArgs) -> Result<(), InstallError> {
    let source = std::env::current_exe().map_err(io_err("finding", Path::new("the running binary")))?;
    if args.uninstall {
        if args.dry_run {
            return Err(InstallError::Invalid("--dry-run applies to an install, not to --uninstall".into()));
        }
        for p in run(args, &source)?.changed {
            log::info!("removed or restored {}", p.display());
        }
        return Ok(());
    }
    let plan = plan(args, &source)?;
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    if args.dry_run {
        let conflist = args.conflist_path();
        log::info!("dry run: every check passed; nothing was changed");
        log::info!(
            "dry run: would install {} and its {} link",
            args.bin_dir.join(PLUGIN_NAME).display(),
            crate::ipam::PLUGIN_NAME
        );
        if plan.conflist_unchanged {
            log::info!("dry run: {} is up to date", conflist.display());
        } else {
            log::info!("dry run: would write {} (below)", conflist.display());
        }
        for m in &plan.set_aside {
            log::info!("dry run: would set aside {m}");
        }
        use std::io::Write;
        std::io::stdout().lock().write_all(plan.conflist.as_bytes()).map_err(io_err("writing", Path::new("stdout")))?;
        return Ok(());
    }
    let out = apply(args, &source, &plan)?;
    for p in &out.changed {
        log::info!("installed {}", p.display());
    }
    for p in &out.unchanged {
        log::info!("unchanged {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: InstallArgs,
    }

    fn args(extra: &[&str]) -> InstallArgs {
        let mut argv = vec!["install", "--bin-dir", "/opt/cni/bin", "--conf-dir", "/etc/cni/net.d"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn renders_a_conflist_the_plugin_accepts() {
        let text = args(&["--mtu", "1280", "--dns-nameserver", "10.96.0.10", "--strategy", "dense"])
            .render(&CniVersion::ALL, &["portmap".into(), "bandwidth".into()])
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(v["plugins"][0]["type"], "headcni");
        assert_eq!(v["plugins"][0]["mtu"], 1280);
        assert_eq!(v["plugins"][0]["ipam"]["allocation_strategy"], "dense");
        assert_eq!(v["plugins"][0]["dns"]["nameservers"], json!(["10.96.0.10"]));
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][2]["type"], "bandwidth");
    }

    #[test]
    fn auto_mtu_and_host_local_leave_keys_to_the_node_file() {
        let text = args(&["--ipam", "host-local", "--portmap", "false", "--bandwidth", "false"])
            .render(&[CniVersion::V1_0_0], &[])
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["plugins"][0].get("mtu").is_none());
        assert_eq!(v["plugins"][0]["ipam"], json!({"type": "host-local"}));
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn rejects_bad_flags_by_name() {
        for (extra, needle) in [
            (vec!["--mtu", "100"], "--mtu"),
            (vec!["--mtu", "fast"], "--mtu"),
            (vec!["--network-name", "a/b"], "--network-name"),
            (vec!["--conflist-name", "../x.conflist"], "--conflist-name"),
            (vec!["--run-dir", "relative"], "--run-dir"),
            (vec!["--dns-nameserver", "not-an-ip"], "dns.nameservers"),
        ] {
            let err = args(&extra).render(&CniVersion::ALL, &[]).unwrap_err().to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    }
}
