//! `headcni controller` flags (each also read from its environment variable) and their
//! validation into a [`ControllerConfig`]. Headscale is reached over https only: the API key
//! is an admin credential of the whole tailnet and never crosses a network in the clear.

use super::election::Timings;
use crate::clients::kube::{InvalidRef, Kind, ObjectRef};
use crate::clients::secret::SecretSource;
use clap::Args;
use ipnetwork::IpNetwork;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Headscale's URL; https only.
    #[arg(long, env = "HEADCNI_HEADSCALE_URL")]
    pub headscale_url: String,
    /// File holding the Headscale API key.
    #[arg(long, env = "HEADCNI_API_KEY_FILE")]
    pub api_key_file: PathBuf,
    /// CA bundle (PEM) of Headscale's certificate, when it is not publicly trusted.
    #[arg(long, env = "HEADCNI_HEADSCALE_CA_FILE")]
    pub headscale_ca_file: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API (default: the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The Lease of the leader election, NAMESPACE/NAME.
    #[arg(long, env = "HEADCNI_LEASE", value_name = "NAMESPACE/NAME")]
    pub lease: String,
    /// The ConfigMap holding the record of what the controller approved, NAMESPACE/NAME.
    #[arg(long, env = "HEADCNI_RECORD_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub record_configmap: String,
    /// The uninstall signal (the agents' --teardown-configmap): when "true", withdraw every
    /// approval the controller made and answer not ready.
    #[arg(long, env = "HEADCNI_TEARDOWN_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub teardown_configmap: Option<String>,
    /// This replica's name in the election (default: the pod's name, POD_NAME).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The cluster's pod network (repeatable): approvals overlapping it are the controller's to
    /// keep exact on bound tailnet nodes, also where no Node holds a part of it yet.
    #[arg(long = "cluster-cidr", env = "HEADCNI_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<String>,
    /// Delete a Kubernetes Node's tailnet node from Headscale when the Node is deleted.
    #[arg(long, env = "HEADCNI_DELETE_TAILNET_NODES", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub delete_tailnet_nodes: bool,
    /// Seconds between two full passes when nothing changes.
    #[arg(long, env = "HEADCNI_RESYNC_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub resync_seconds: u64,
    /// Port of the metrics and health server.
    #[arg(long, env = "HEADCNI_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address of the metrics and health server.
    #[arg(long, env = "HEADCNI_METRICS_BIND", default_value = "0.0.0.0")]
    pub metrics_bind: IpAddr,
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub headscale_url: String,
    pub api_key: SecretSource,
    pub headscale_ca_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub lease: ObjectRef,
    pub record: ObjectRef,
    pub teardown: Option<ObjectRef>,
    pub identity: String,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub delete_tailnet_nodes: bool,
    pub resync: Duration,
    pub metrics_addr: SocketAddr,
    pub timings: Timings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--headscale-url {0}: the controller sends an admin API key and talks to Headscale over https only \
         (give the CA of a private certificate with --headscale-ca-file)"
    )]
    NotHttps(String),
    #[error(transparent)]
    Ref(#[from] InvalidRef),
    #[error("--cluster-cidr {value:?}: {reason}")]
    Cidr { value: String, reason: String },
    #[error("--identity {0:?}: give the pod's name (POD_NAME), printable and at most 200 characters")]
    Identity(String),
}

impl ControllerConfig {
    /// Validates the flags; `random_suffix` makes each process a new candidate.
    pub fn from_args(a: &ControllerArgs, hostname: &str, random_suffix: &str) -> Result<Self, ConfigError> {
        let url = a.headscale_url.trim().trim_end_matches('/').to_string();
        if !url.to_ascii_lowercase().starts_with("https://") {
            return Err(ConfigError::NotHttps(url));
        }
        let lease = ObjectRef::parse(Kind::Lease, "--lease", &a.lease)?;
        let record = ObjectRef::parse(Kind::ConfigMap, "--record-configmap", &a.record_configmap)?;
        let teardown = a
            .teardown_configmap
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| ObjectRef::parse(Kind::ConfigMap, "--teardown-configmap", s))
            .transpose()?;
        let base = a.identity.clone().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| hostname.to_string());
        if base.len() > 200 || base.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ConfigError::Identity(base));
        }
        let mut cluster_cidrs = Vec::new();
        for v in a.cluster_cidrs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let bad = |reason: &str| ConfigError::Cidr { value: v.to_string(), reason: reason.into() };
            let net: IpNetwork = v.parse().map_err(|_| bad("not a CIDR"))?;
            if net.network() != net.ip() {
                return Err(bad("host bits are set"));
            }
            if net.prefix() == 0 {
                return Err(bad("a default route is not a pod network"));
            }
            cluster_cidrs.push(net);
        }
        Ok(Self {
            headscale_url: url,
            api_key: SecretSource::File(a.api_key_file.clone()),
            headscale_ca_file: a.headscale_ca_file.clone(),
            kubeconfig: a.kubeconfig.clone(),
            lease,
            record,
            teardown,
            identity: format!("{base}_{random_suffix}"),
            cluster_cidrs,
            delete_tailnet_nodes: a.delete_tailnet_nodes,
            resync: Duration::from_secs(a.resync_seconds),
            metrics_addr: SocketAddr::new(a.metrics_bind, a.metrics_port),
            timings: Timings::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    fn parse(extra: &[&str]) -> Result<ControllerConfig, String> {
        let url = "--headscale-url=https://hs.example:8443/";
        let mut argv = vec![
            "c",
            extra.iter().find(|a| a.starts_with("--headscale-url=")).copied().unwrap_or(url),
            "--api-key-file=/k",
            "--lease=kube-system/headcni-controller",
            "--record-configmap=kube-system/headcni-approvals",
        ];
        argv.extend(extra.iter().filter(|a| !a.starts_with("--headscale-url=")));
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        ControllerConfig::from_args(&cli.args, "host", "ab12").map_err(|e| e.to_string())
    }

    #[test]
    fn https_only_and_checked_refs() {
        let c = parse(&["--identity=headcni-controller-x", "--cluster-cidr=10.244.0.0/16"]).unwrap();
        assert_eq!(c.headscale_url, "https://hs.example:8443");
        assert_eq!(c.identity, "headcni-controller-x_ab12");
        assert_eq!(c.lease.to_string(), "Lease kube-system/headcni-controller");
        assert_eq!(parse(&[]).unwrap().identity, "host_ab12");
        let err = parse(&["--headscale-url=http://hs.example:8080"]).unwrap_err();
        assert!(err.contains("https only"), "{err}");
        assert!(parse(&["--lease=nope"]).is_err());
        assert!(parse(&["--cluster-cidr=10.244.0.1/16"]).unwrap_err().contains("host bits"));
        assert!(parse(&["--cluster-cidr=0.0.0.0/0"]).is_err());
        assert!(parse(&["--resync-seconds=1"]).is_err());
        assert!(parse(&["--identity=a b"]).is_err());
    }
}
