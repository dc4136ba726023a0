//! `headcni agent` flags (each also read from its environment variable) and their validation
//! into an [`AgentConfig`].

use super::hostnet::{self, DEFAULT_RULE_PRIORITY, RULE_PRIORITIES, TAILSCALE_FIRST_RULE};
use super::node::{validate_node_name, validate_pod_cidrs};
use super::state::DEFAULT_STATE_DIR;
use crate::cidr::overlaps;
use crate::clients::kube::{Kind, ObjectRef};
use crate::clients::localapi::DEFAULT_SOCKET;
use crate::clients::secret::{Secret, SecretSource};
use crate::netlink::sysctl::{PROC_SYS, SysctlRoot};
use crate::nodefile::{DEFAULT_RUN_DIR, MAX_MTU, MIN_MTU};
use clap::Args;
use ipnetwork::IpNetwork;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// The environment variable that may carry the pre-auth key (from a Kubernetes Secret).
pub const AUTH_KEY_ENV: &str = "HEADCNI_AUTH_KEY";

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Node whose Node.spec.podCIDR(s) to use; also the default tailnet hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// kubeconfig for the Kubernetes API (default: the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's pod CIDR (repeatable, one per family); overrides the Node's podCIDRs.
    #[arg(long = "pod-cidr", env = "HEADCNI_POD_CIDRS", value_delimiter = ',')]
    pub pod_cidrs: Vec<String>,
    /// The cluster's pod network (repeatable); traffic to it is never masqueraded.
    #[arg(long = "cluster-cidr", env = "HEADCNI_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<String>,
    /// The cluster's service network (repeatable).
    #[arg(long = "service-cidr", env = "HEADCNI_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidrs: Vec<String>,
    /// tailscaled's LocalAPI socket.
    #[arg(long, env = "HEADCNI_TAILSCALE_SOCKET", default_value = DEFAULT_SOCKET)]
    pub tailscale_socket: PathBuf,
    /// Headscale's URL: the control server for the join, and its REST API for approvals.
    #[arg(long, env = "HEADCNI_HEADSCALE_URL")]
    pub headscale_url: Option<String>,
    /// File holding the pre-auth key for the join (or set HEADCNI_AUTH_KEY from a Secret).
    #[arg(long, env = "HEADCNI_AUTH_KEY_FILE")]
    pub auth_key_file: Option<PathBuf>,
    /// File holding a Headscale API key: approve this node's pod CIDRs (else rely on autoApprovers).
    #[arg(long, env = "HEADCNI_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Send the API key to an http:// Headscale (in clear text): only where the path to it is
    /// trusted (loopback, an encrypted tunnel, a test network).
    #[arg(long, env = "HEADCNI_ALLOW_HTTP_API_KEY", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_http_api_key: bool,
    /// Controller mode: publish this node's tailnet node key in its Node's annotation
    /// headcni.io/node-key, where `headcni controller` binds the two and approves the Node's
    /// pod CIDRs. The agent then needs no API key.
    #[arg(long, env = "HEADCNI_PUBLISH_IDENTITY", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub publish_identity: bool,
    /// CA bundle (PEM) for an https Headscale with a private certificate.
    #[arg(long, env = "HEADCNI_HEADSCALE_CA_FILE")]
    pub headscale_ca_file: Option<PathBuf>,
    /// Tailnet hostname (default: the node name).
    #[arg(long, env = "HEADCNI_HOSTNAME")]
    pub hostname: Option<String>,
    /// Tags to request at the join (comma list). Leave empty with a tagged pre-auth key.
    #[arg(long, env = "HEADCNI_ADVERTISE_TAGS", value_delimiter = ',')]
    pub advertise_tags: Vec<String>,
    /// Pod MTU: auto (the tailnet interface's MTU) or a number.
    #[arg(long, env = "HEADCNI_MTU", default_value = "auto")]
    pub mtu: String,
    /// Masquerade pod traffic that leaves the cluster.
    #[arg(long, env = "HEADCNI_MASQUERADE", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub masquerade: bool,
    /// Enforce NetworkPolicies on this node (the conflist's `enable_network_policy`): follow
    /// NetworkPolicies, Pods and Namespaces and keep nft table inet headcni-policy. Off: the
    /// table is removed and nothing is followed. Needs --node-name and the Kubernetes API.
    #[arg(long, env = "HEADCNI_ENABLE_NETWORK_POLICY", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub enable_network_policy: bool,
    /// Directory of the node file and the event spool.
    #[arg(long, env = "HEADCNI_RUN_DIR", default_value = DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Directory of the agent's persistent state (the routes it added and approved).
    #[arg(long, env = "HEADCNI_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Priority of the "to <pod CIDR> lookup main" rules (before Tailscale's at 5210).
    #[arg(long, env = "HEADCNI_RULE_PRIORITY", default_value_t = DEFAULT_RULE_PRIORITY)]
    pub rule_priority: u32,
    /// Port of the metrics and health server.
    #[arg(long, env = "HEADCNI_METRICS_PORT", default_value_t = 8080)]
    pub metrics_port: u16,
    /// Path of the metrics.
    #[arg(long, env = "HEADCNI_METRICS_PATH", default_value = "/metrics")]
    pub metrics_path: String,
    /// Address of the metrics and health server.
    #[arg(long, env = "HEADCNI_METRICS_BIND", default_value = "0.0.0.0")]
    pub metrics_bind: IpAddr,
    /// The directory that stands for /proc/sys: the agent reads and sets its net sysctls
    /// (forwarding) under <DIR>/net. In a container, where /proc/sys is read-only, mount the
    /// host's /proc/sys/net at e.g. /host/proc/sys/net and pass /host/proc/sys.
    #[arg(long, env = "HEADCNI_PROC_SYS_DIR", default_value = PROC_SYS)]
    pub proc_sys_dir: PathBuf,
    /// The CNI configuration directory the container runtime reads (the host's, mounted at the
    /// same path): checked (is HeadCNI's configuration the one in use, is its MTU within the
    /// tailnet's), and where --publish-conflist puts the conflist.
    #[arg(long, env = "HEADCNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// HeadCNI's conflist in --conf-dir.
    #[arg(long, env = "HEADCNI_CONFLIST_NAME", default_value = "10-headcni.conflist")]
    pub conflist_name: String,
    /// Keep HeadCNI the only network of the node: every other network configuration that is
    /// or later appears in --conf-dir is set aside (renamed with the suffix .headcni-aside, as
    /// `headcni install --exclusive` does once), and the uninstall puts them back.
    #[arg(long, env = "HEADCNI_EXCLUSIVE")]
    pub exclusive: bool,
    /// The uninstall signal, NAMESPACE/NAME of a ConfigMap: when its data.teardown is "true"
    /// the agent withdraws this node's routes, removes its rules and nft tables, stops
    /// reconciling and answers not ready, until it is "false" again.
    #[arg(long, env = "HEADCNI_TEARDOWN_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub teardown_configmap: Option<String>,
    /// The conflist `headcni install --stage-dir` prepared: the agent puts it into --conf-dir
    /// once the node file is written (the node's network turns ready only when the plugin can
    /// attach pods), and removes it on the uninstall signal.
    #[arg(long, env = "HEADCNI_PUBLISH_CONFLIST")]
    pub publish_conflist: Option<PathBuf>,
    /// The runtime's CNI binary directory (the host's, mounted at the same path): the uninstall
    /// signal and --cleanup remove headcni and headcni-ipam from it.
    #[arg(long, env = "HEADCNI_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Withdraw the routes HeadCNI advertised and approved, remove its rules, nft tables and
    /// node file, and exit.
    #[arg(long)]
    pub cleanup: bool,
}

/// HeadCNI's files in the runtime's CNI directories, as the agent manages them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniFiles {
    /// (staged conflist, where it is published).
    pub conflist: Option<(PathBuf, PathBuf)>,
    /// The directory holding headcni and headcni-ipam.
    pub bin_dir: Option<PathBuf>,
}

impl CniFiles {
    /// The published conflist, and with `staged_too` the staged one.
    pub fn conflists(&self, staged_too: bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Some((staged, published)) = &self.conflist {
            out.push(published.clone());
            if staged_too {
                out.push(staged.clone());
            }
        }
        out
    }
}

/// Where the pod CIDRs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CidrSource {
    Static(Vec<IpNetwork>),
    InCluster,
    Kubeconfig(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: Option<String>,
    pub cidr_source: CidrSource,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    pub tailscale_socket: PathBuf,
    pub headscale_url: Option<String>,
    pub headscale_ca_file: Option<PathBuf>,
    pub auth_key: Option<SecretSource>,
    pub api_key: Option<SecretSource>,
    /// Controller mode: publish the node key on the Node (--publish-identity).
    pub publish_identity: bool,
    pub hostname: String,
    pub advertise_tags: Vec<String>,
    pub mtu: Option<u32>,
    pub masquerade: bool,
    /// NetworkPolicy enforcement (needs the node name and the Kubernetes API).
    pub network_policy: bool,
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub rule_priority: u32,
    pub metrics_addr: SocketAddr,
    pub metrics_path: String,
    pub sysctl_root: SysctlRoot,
    pub conf_dir: PathBuf,
    pub conflist_name: String,
    /// --exclusive: other networks' configurations are set aside whenever they appear.
    pub exclusive: bool,
    pub teardown_configmap: Option<ObjectRef>,
    /// --kubeconfig; `None`: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub cni_files: CniFiles,
    pub cleanup: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn cidrs(flag: &str, list: &[String]) -> Result<Vec<IpNetwork>, ConfigError> {
    list.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let net: IpNetwork = s.parse().map_err(|_| ConfigError(format!("{flag} {s:?} is not a CIDR")))?;
            crate::cidr::check(&net).map_err(|e| ConfigError(format!("{flag}: {e}")))?;
            Ok(net)
        })
        .collect()
}

/// Problems that make pod CIDRs unusable: overlap with the tailnet or the service network, or a
/// place outside the cluster CIDR when one is given. (Also applied to CIDRs that come from the
/// Node at run time.)
pub fn check_pod_cidrs(pods: &[IpNetwork], cluster: &[IpNetwork], service: &[IpNetwork]) -> Result<(), String> {
    for pod in pods {
        for tailnet in hostnet::tailnet_ranges() {
            if overlaps(pod, &tailnet) {
                return Err(format!(
                    "pod CIDR {pod} overlaps Tailscale's range {tailnet}: pods there would be unreachable; \
                     choose another cluster CIDR"
                ));
            }
        }
        for svc in service {
            if overlaps(pod, svc) {
                return Err(format!(
                    "pod CIDR {pod} overlaps the service CIDR {svc}: fix the cluster's pod or service network"
                ));
            }
        }
    }
    crate::cidr::check_inside_cluster(pods, cluster).map_err(|e| {
        format!(
            "{e}: traffic between its pods and the cluster would be masqueraded; fix --cluster-cidr or the pod CIDR"
        )
    })
}

fn validate_tag(tag: &str) -> Result<(), ConfigError> {
    let name = tag.strip_prefix("tag:").unwrap_or("");
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0].is_ascii_alphabetic();
    if ok { Ok(()) } else { Err(ConfigError(format!("--advertise-tags: {tag:?} is not a tag (tag:<lowercase name>)"))) }
}

fn validate_hostname(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError(format!("tailnet hostname {name:?} must be one DNS label (letters, digits, '-'; up to 63)")))
    }
}

impl AgentConfig {
    /// Validates the flags. `env` reads the environment (HEADCNI_AUTH_KEY); `system_hostname`
    /// is the fallback name when there is neither --hostname nor --node-name.
    pub fn from_args(
        args: &AgentArgs,
        env: impl Fn(&str) -> Option<String>,
        system_hostname: impl FnOnce() -> String,
    ) -> Result<Self, ConfigError> {
        let node_name = args.node_name.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        if let Some(n) = &node_name {
            validate_node_name(n).map_err(|e| ConfigError(format!("--node-name: {e}")))?;
        }
        let statics: Vec<String> =
            args.pod_cidrs.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        let cluster_cidrs = cidrs("--cluster-cidr", &args.cluster_cidrs)?;
        let service_cidrs = cidrs("--service-cidr", &args.service_cidrs)?;
        let cidr_source = if !statics.is_empty() {
            let pods = validate_pod_cidrs(&statics).map_err(|e| ConfigError(format!("--pod-cidr: {e}")))?;
            check_pod_cidrs(&pods, &cluster_cidrs, &service_cidrs).map_err(ConfigError)?;
            CidrSource::Static(pods)
        } else if args.cleanup {
            CidrSource::Static(Vec::new())
        } else {
            if node_name.is_none() {
                return Err(ConfigError(
                    "no pod CIDR: give --node-name (NODE_NAME) to read the Node's podCIDRs, or --pod-cidr".into(),
                ));
            }
            match &args.kubeconfig {
                Some(p) if !p.as_os_str().is_empty() => CidrSource::Kubeconfig(p.clone()),
                _ => CidrSource::InCluster,
            }
        };

        let headscale_url = args.headscale_url.as_ref().map(|u| u.trim().trim_end_matches('/').to_string());
        let headscale_url = headscale_url.filter(|u| !u.is_empty());
        if let Some(url) = &headscale_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError(format!("--headscale-url {url:?} must start with http:// or https://")));
        }
        let auth_key = match (&args.auth_key_file, env(AUTH_KEY_ENV).map(|k| k.trim().to_string())) {
            (Some(f), _) if !f.as_os_str().is_empty() => Some(SecretSource::File(f.clone())),
            (_, Some(k)) if !k.is_empty() => Some(SecretSource::Value(Secret::new(k))),
            _ => None,
        };
        if auth_key.is_some() && headscale_url.is_none() {
            return Err(ConfigError("an auth key needs --headscale-url (the server to join)".into()));
        }
        let api_key = args.api_key_file.clone().filter(|p| !p.as_os_str().is_empty()).map(SecretSource::File);
        if api_key.is_some() && headscale_url.is_none() {
            return Err(ConfigError("--api-key-file needs --headscale-url".into()));
        }
        if let Some(url) = &headscale_url
            && api_key.is_some()
            && url.starts_with("http://")
            && !args.allow_http_api_key
        {
            return Err(ConfigError(format!(
                "--headscale-url {url} is plain http: the API key would cross the network in clear text; use \
                 https://, or pass --allow-http-api-key where the path to Headscale is trusted"
            )));
        }
        let publish_identity = args.publish_identity && !args.cleanup;
        if publish_identity && api_key.is_some() {
            return Err(ConfigError(
                "--publish-identity (approval by the controller) and --api-key-file (approval by this agent) exclude \
                 each other: in controller mode only the controller holds the API key"
                    .into(),
            ));
        }
        if publish_identity && !matches!(cidr_source, CidrSource::InCluster | CidrSource::Kubeconfig(_)) {
            return Err(ConfigError("--publish-identity needs the Node (--node-name, without --pod-cidr)".into()));
        }

        let hostname = match (&args.hostname, &node_name) {
            (Some(h), _) if !h.trim().is_empty() => h.trim().to_string(),
            (_, Some(n)) => n.split('.').next().unwrap_or(n).to_string(),
            _ => system_hostname(),
        };
        validate_hostname(&hostname)?;
        let advertise_tags: Vec<String> =
            args.advertise_tags.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
        for t in &advertise_tags {
            validate_tag(t)?;
        }
        let mtu = match args.mtu.trim() {
            "" | "auto" => None,
            n => {
                let v: u32 = n.parse().map_err(|_| ConfigError(format!("--mtu {n:?}: expected auto or a number")))?;
                if !(MIN_MTU..=MAX_MTU).contains(&v) {
                    return Err(ConfigError(format!("--mtu {v} is outside {MIN_MTU}..{MAX_MTU}")));
                }
                Some(v)
            }
        };
        if !args.metrics_path.starts_with('/') || ["/healthz", "/readyz"].contains(&args.metrics_path.as_str()) {
            return Err(ConfigError(format!(
                "--metrics-path {:?} must start with / and not be a probe path",
                args.metrics_path
            )));
        }
        let last_priority = 32766 - RULE_PRIORITIES;
        if args.rule_priority == 0 || args.rule_priority > last_priority {
            return Err(ConfigError(format!(
                "--rule-priority {} must be within 1..{last_priority} (HeadCNI's rules take {RULE_PRIORITIES} \
                 priorities from it on)",
                args.rule_priority
            )));
        }
        if args.rule_priority + RULE_PRIORITIES > TAILSCALE_FIRST_RULE {
            log::warn!(
                "--rule-priority {} puts HeadCNI's rules behind Tailscale's (5210-5270): an accepted route covering \
                 this node's pod CIDR, its LAN or the default route would capture the node's traffic",
                args.rule_priority
            );
        }
        let sysctl_root =
            SysctlRoot::new(&args.proc_sys_dir).map_err(|e| ConfigError(format!("--proc-sys-dir: {e}")))?;
        let teardown_configmap = match args.teardown_configmap.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(
                ObjectRef::parse(Kind::ConfigMap, "--teardown-configmap", v).map_err(|e| ConfigError(e.to_string()))?,
            ),
        };
        let absolute = |flag: &str, p: &Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
            match p.as_ref().filter(|p| !p.as_os_str().is_empty()) {
                None => Ok(None),
                Some(p) if p.is_absolute() && p.file_name().is_some() => Ok(Some(p.clone())),
                Some(p) => Err(ConfigError(format!("{flag} {} must be an absolute path", p.display()))),
            }
        };
        let conflist = match absolute("--publish-conflist", &args.publish_conflist)? {
            Some(staged) => {
                let dir = absolute("--conf-dir", &Some(args.conf_dir.clone()))?.unwrap_or_default();
                let published = dir.join(staged.file_name().unwrap_or_default());
                if published == staged {
                    return Err(ConfigError("--publish-conflist must not be inside --conf-dir".into()));
                }
                Some((staged, published))
            }
            None => None,
        };
        if args.enable_network_policy && node_name.is_none() && !args.cleanup {
            return Err(ConfigError(
                "--enable-network-policy needs --node-name (NODE_NAME): the engine enforces the policies of this node's pods".into(),
            ));
        }
        let cni_files = CniFiles { conflist, bin_dir: absolute("--bin-dir", &args.bin_dir)? };
        Ok(Self {
            node_name,
            cidr_source,
            cluster_cidrs,
            service_cidrs,
            tailscale_socket: args.tailscale_socket.clone(),
            headscale_url,
            headscale_ca_file: args.headscale_ca_file.clone().filter(|p| !p.as_os_str().is_empty()),
            auth_key,
            api_key,
            publish_identity,
            hostname,
            advertise_tags,
            mtu,
            masquerade: args.masquerade,
            network_policy: args.enable_network_policy,
            run_dir: args.run_dir.clone(),
            state_dir: args.state_dir.clone(),
            rule_priority: args.rule_priority,
            metrics_addr: SocketAddr::new(args.metrics_bind, args.metrics_port),
            metrics_path: args.metrics_path.clone(),
            sysctl_root,
            conf_dir: args.conf_dir.clone(),
            conflist_name: args.conflist_name.clone(),
            exclusive: args.exclusive,
            teardown_configmap,
            kubeconfig: args.kubeconfig.clone().filter(|p| !p.as_os_str().is_empty()),
            cni_files,
            cleanup: args.cleanup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: AgentArgs,
    }

    fn parse(args: &[&str]) -> AgentArgs {
        let mut all = vec!["t"];
        all.extend_from_slice(args);
        T::try_parse_from(all).unwrap().a
    }

    fn cfg(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_args(&parse(args), |_| None, || "host".into())
    }

    #[test]
    fn network_policy_is_off_unless_asked_and_needs_the_node() {
        assert!(!cfg(&["--pod-cidr", "10.244.1.0/24"]).unwrap().network_policy);
        let on = cfg(&["--node-name", "n1", "--enable-network-policy", "true"]).unwrap();
        assert!(on.network_policy);
        let e = cfg(&["--pod-cidr", "10.244.1.0/24", "--enable-network-policy", "true"]).unwrap_err().to_string();
        assert!(e.contains("--enable-network-policy needs --node-name"), "{e}");
    }

    #[test]
    fn defaults_follow_the_contract() {
        let a = parse(&[]);
        assert_eq!(a.tailscale_socket, PathBuf::from("/var/run/tailscale/tailscaled.sock"));
        assert_eq!(a.metrics_port, 8080);
        assert_eq!(a.metrics_path, "/metrics");
        assert!(a.masquerade);
        assert_eq!(a.run_dir, PathBuf::from("/run/headcni"));
        let c = cfg(&["--node-name", "node-1.example"]).unwrap();
        assert_eq!(c.cidr_source, CidrSource::InCluster);
        assert_eq!(c.hostname, "node-1");
        assert_eq!(c.mtu, None);
        assert_eq!(c.metrics_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.sysctl_root, SysctlRoot::default());
        assert_eq!(c.teardown_configmap, None);
    }

    #[test]
    fn proc_sys_dir_and_teardown_configmap() {
        let c = cfg(&[
            "--node-name",
            "n",
            "--proc-sys-dir=/host/proc/sys",
            "--teardown-configmap=kube-system/headcni-teardown",
        ])
        .unwrap();
        assert_eq!(c.sysctl_root.path(), std::path::Path::new("/host/proc/sys"));
        let cm = c.teardown_configmap.unwrap();
        assert_eq!((cm.namespace.as_str(), cm.name.as_str()), ("kube-system", "headcni-teardown"));
        for (args, needle) in [
            (vec!["--node-name", "n", "--proc-sys-dir", "host/proc/sys"], "--proc-sys-dir"),
            (vec!["--node-name", "n", "--proc-sys-dir", "/host/../etc"], "absolute path"),
            (vec!["--node-name", "n", "--teardown-configmap", "headcni-teardown"], "NAMESPACE/NAME"),
            (vec!["--node-name", "n", "--teardown-configmap", "kube-system/../x"], "DNS subdomain"),
        ] {
            let err = cfg(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert!(cfg(&["--node-name", "n", "--teardown-configmap", ""]).unwrap().teardown_configmap.is_none());
    }

    #[test]
    fn pod_cidrs_from_flags() {
        let c =
            cfg(&["--pod-cidr", "10.244.1.0/24", "--pod-cidr", "fd00:10:244:1::/64", "--masquerade", "false"]).unwrap();
        assert_eq!(
            c.cidr_source,
            CidrSource::Static(vec!["10.244.1.0/24".parse().unwrap(), "fd00:10:244:1::/64".parse().unwrap()])
        );
        assert!(!c.masquerade);
        assert_eq!(c.hostname, "host");
        for (args, needle) in [
            (vec!["--pod-cidr", "10.244.1.1/24"], "host bits"),
            (vec!["--pod-cidr", "100.64.1.0/24"], "Tailscale's range"),
            (vec!["--pod-cidr", "10.96.0.0/24", "--service-cidr", "10.96.0.0/12"], "service CIDR"),
            (vec!["--pod-cidr", "10.1.0.0/24,10.2.0.0/24"], "same family"),
            (vec![], "no pod CIDR"),
        ] {
            let err = cfg(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn secrets_never_come_from_flag_values() {
        let err = T::try_parse_from(["t", "--auth-key", "hskey-auth-x"]);
        assert!(err.is_err(), "there is no --auth-key flag");
        let a = parse(&["--node-name", "n", "--headscale-url", "http://hs:8080/"]);
        let c = AgentConfig::from_args(&a, |k| (k == AUTH_KEY_ENV).then(|| "hskey-auth-x\n".into()), || "h".into())
            .unwrap();
        assert_eq!(c.auth_key.unwrap().load("k").unwrap().expose(), "hskey-auth-x");
        assert_eq!(c.headscale_url.as_deref(), Some("http://hs:8080"));
        let err = cfg(&["--node-name", "n", "--auth-key-file", "/k"]).unwrap_err().to_string();
        assert!(err.contains("--headscale-url"), "{err}");
        let err = cfg(&["--node-name", "n", "--api-key-file", "/k"]).unwrap_err().to_string();
        assert!(err.contains("--headscale-url"), "{err}");
        // An API key over plain http: refused unless explicitly allowed.
        let http = ["--node-name", "n", "--headscale-url", "http://hs:8080", "--api-key-file", "/k"];
        let err = cfg(&http).unwrap_err().to_string();
        assert!(err.contains("clear text") && err.contains("--allow-http-api-key"), "{err}");
        let mut allowed = http.to_vec();
        allowed.push("--allow-http-api-key");
        assert!(cfg(&allowed).is_ok());
        assert!(cfg(&["--node-name", "n", "--headscale-url", "https://hs", "--api-key-file", "/k"]).is_ok());
        assert!(cfg(&["--node-name", "n", "--headscale-url", "http://hs:8080"]).is_ok(), "no API key, no risk");
    }

    #[test]
    fn other_checks() {
        for (args, needle) in [
            (vec!["--node-name", "n", "--mtu", "70000"], "outside"),
            (vec!["--node-name", "n", "--mtu", "big"], "auto or a number"),
            (vec!["--node-name", "n", "--advertise-tags", "headcni"], "not a tag"),
            (vec!["--node-name", "n", "--metrics-path", "/readyz"], "probe path"),
            (vec!["--node-name", "N_1"], "node name"),
            (vec!["--node-name", "n", "--headscale-url", "hs:8080"], "http://"),
            (vec!["--node-name", "n", "--rule-priority", "0"], "1..32762"),
            (vec!["--node-name", "n", "--rule-priority", "32763"], "1..32762"),
        ] {
            let err = cfg(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let c = cfg(&["--node-name", "n", "--advertise-tags", "tag:headcni,tag:k8s", "--mtu", "1230"]).unwrap();
        assert_eq!(c.advertise_tags, vec!["tag:headcni", "tag:k8s"]);
        assert_eq!(c.mtu, Some(1230));
        assert!(cfg(&["--cleanup"]).is_ok(), "cleanup needs no pod CIDR");
    }

    #[test]
    fn cidrs_are_sane_and_pod_cidrs_inside_the_cluster() {
        for (args, needle) in [
            (vec!["--pod-cidr", "128.0.0.0/1"], "too much"),
            (vec!["--pod-cidr", "::ffff:10.0.0.0/120"], "IPv4-mapped"),
            (vec!["--pod-cidr", "10.9.0.0/24", "--cluster-cidr", "10.244.0.0/16"], "not inside the cluster CIDR"),
            (vec!["--pod-cidr", "10.244.1.0/24", "--cluster-cidr", "0.0.0.0/0"], "--cluster-cidr: 0.0.0.0/0"),
            (vec!["--pod-cidr", "10.244.1.0/24", "--service-cidr", "224.0.0.0/8"], "multicast"),
        ] {
            let err = cfg(&args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert!(cfg(&["--pod-cidr", "10.244.1.0/24", "--cluster-cidr", "10.244.0.0/16"]).is_ok());
    }
}
