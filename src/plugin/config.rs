//! The `headcni` plugin's configuration: the documented keys exactly as users paste them,
//! validated with errors that name the offending field, and resolved against the node file for
//! whatever the config leaves to the agent (pod CIDRs, MTU).

use crate::cni::{CniError, Dns, Request, code, fields};
use crate::nodefile::{self, MAX_MTU, MIN_MTU, NodeFile};
use ipnetwork::IpNetwork;
use serde_json::{Map, Value, json};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Pod MTU when neither the config nor the node file sets one: Tailscale's default tun MTU.
pub const DEFAULT_MTU: u32 = 1280;
pub const DEFAULT_TAILSCALE_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";
/// How long a delegated (exec'd) IPAM plugin may take before it is stopped.
pub const DEFAULT_DELEGATE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub pod_cidrs: Vec<IpNetwork>,
    pub service_cidrs: Vec<IpNetwork>,
    pub mtu: Option<u32>,
    pub enable_ipv6: bool,
    pub enable_network_policy: bool,
    pub headscale_url: Option<String>,
    pub tailscale_socket: PathBuf,
    pub dns: Dns,
    pub ipam: IpamBlock,
    pub run_dir: PathBuf,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<String>,
    /// `delegate_timeout` (seconds): how long an exec'd IPAM plugin may take.
    pub delegate_timeout: Duration,
}

/// The `ipam` section: the delegate's type plus what HeadCNI needs to know about its ranges.
#[derive(Debug, Clone)]
pub struct IpamBlock {
    pub kind: String,
    pub block: Map<String, Value>,
    /// Subnets named explicitly by `subnet` or `ranges`; empty when the plugin fills them in.
    pub subnets: Vec<IpNetwork>,
}

/// What an operation works with once the node file has filled the gaps of the config.
#[derive(Debug, Clone)]
pub struct Network {
    pub pod_cidrs: Vec<IpNetwork>,
    pub mtu: u32,
    /// The network configuration as handed to the IPAM delegate (ranges filled in).
    pub ipam_config: Map<String, Value>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::invalid_config(msg)
}

fn get<'a>(conf: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    fields::get(conf, key)
}

fn string(conf: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, CniError> {
    Ok(fields::string(conf, key, field)?.map(str::to_string))
}

fn boolean(conf: &Map<String, Value>, key: &str, default: bool) -> Result<bool, CniError> {
    Ok(fields::boolean(conf, key, key)?.unwrap_or(default))
}

fn abs_path(conf: &Map<String, Value>, key: &str) -> Result<Option<PathBuf>, CniError> {
    Ok(fields::abs_path(conf, key, key)?)
}

/// Parses a CIDR that must name a network (no host bits), e.g. pod_cidr.
fn network_cidr(text: &str, field: &str) -> Result<IpNetwork, CniError> {
    let net: IpNetwork =
        text.parse().map_err(|_| invalid(format!("{field} \"{text}\" is not a CIDR such as 10.244.0.0/24")))?;
    if net.network() != net.ip() {
        return Err(invalid(format!(
            "{field} \"{text}\" has host bits set; did you mean {}/{}?",
            net.network(),
            net.prefix()
        )));
    }
    crate::cidr::check(&net).map_err(|e| invalid(format!("{field}: {e}")))?;
    Ok(net)
}

/// A CIDR list given as one string, comma separated ("10.244.0.0/24,fd00::/64") or as a list.
fn cidr_list(conf: &Map<String, Value>, key: &str) -> Result<Vec<IpNetwork>, CniError> {
    let items: Vec<String> = match get(conf, key) {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => s.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| invalid(format!("{key} entries must be strings"))))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(invalid(format!("{key} must be a CIDR string, got {other}"))),
    };
    items.iter().map(|s| network_cidr(s, key)).collect()
}

fn parse_ip(text: &str, field: &str) -> Result<IpAddr, CniError> {
    Ok(fields::ip(text, field)?)
}

/// Checks one host-local style range object: subnet, and rangeStart/rangeEnd/gateway inside it.
fn check_range(range: &Map<String, Value>, field: &str) -> Result<IpNetwork, CniError> {
    let subnet_text = string(range, "subnet", &format!("{field}.subnet"))?
        .ok_or_else(|| invalid(format!("{field}.subnet is required")))?;
    let subnet: IpNetwork =
        subnet_text.parse().map_err(|_| invalid(format!("{field}.subnet \"{subnet_text}\" is not a CIDR")))?;
    let subnet = IpNetwork::new(subnet.network(), subnet.prefix()).unwrap_or(subnet);
    crate::cidr::check(&subnet).map_err(|e| invalid(format!("{field}.subnet: {e}")))?;
    for key in ["rangeStart", "rangeEnd", "gateway"] {
        let sub_field = format!("{field}.{key}");
        if let Some(text) = string(range, key, &sub_field)? {
            let ip = parse_ip(&text, &sub_field)?;
            if !subnet.contains(ip) {
                return Err(invalid(format!("{sub_field} {ip} is outside subnet {subnet}")));
            }
        }
    }
    Ok(subnet)
}

fn parse_ipam(conf: &Map<String, Value>) -> Result<IpamBlock, CniError> {
    let block = match get(conf, "ipam") {
        Some(Value::Object(b)) => b.clone(),
        Some(other) => return Err(invalid(format!("ipam must be an object, got {other}"))),
        None => return Err(invalid("ipam is required (for example {\"type\": \"headcni-ipam\"})")),
    };
    let kind = string(&block, "type", "ipam.type")?.ok_or_else(|| invalid("ipam.type is required"))?;
    if !crate::cni::is_safe_name(&kind) {
        return Err(invalid(format!("ipam.type \"{}\" is not a plugin name", kind.escape_debug())));
    }
    let mut subnets = Vec::new();
    if get(&block, "subnet").is_some() {
        subnets.push(check_range(&block, "ipam")?);
    }
    match get(&block, "ranges") {
        None => {}
        Some(Value::Array(sets)) => {
            for (i, set) in sets.iter().enumerate() {
                let set =
                    set.as_array().ok_or_else(|| invalid(format!("ipam.ranges[{i}] must be a list of ranges")))?;
                for (j, range) in set.iter().enumerate() {
                    let field = format!("ipam.ranges[{i}][{j}]");
                    let range = range.as_object().ok_or_else(|| invalid(format!("{field} must be an object")))?;
                    subnets.push(check_range(range, &field)?);
                }
            }
        }
        Some(other) => return Err(invalid(format!("ipam.ranges must be a list, got {other}"))),
    }
    match get(&block, "routes") {
        None => {}
        Some(Value::Array(routes)) => {
            for (i, route) in routes.iter().enumerate() {
                let field = format!("ipam.routes[{i}]");
                let route = route.as_object().ok_or_else(|| invalid(format!("{field} must be an object")))?;
                let dst = string(route, "dst", &format!("{field}.dst"))?
                    .ok_or_else(|| invalid(format!("{field}.dst is required")))?;
                dst.parse::<IpNetwork>().map_err(|_| invalid(format!("{field}.dst \"{dst}\" is not a CIDR")))?;
                if let Some(gw) = string(route, "gw", &format!("{field}.gw"))? {
                    parse_ip(&gw, &format!("{field}.gw"))?;
                }
            }
        }
        Some(other) => return Err(invalid(format!("ipam.routes must be a list, got {other}"))),
    }
    Ok(IpamBlock { kind, block, subnets })
}

fn parse_dns(conf: &Map<String, Value>) -> Result<Dns, CniError> {
    let Some(value) = get(conf, "dns") else { return Ok(Dns::default()) };
    let dns: Dns = serde_json::from_value(value.clone())
        .map_err(|e| invalid(format!("dns must be {{nameservers, domain, search, options}}: {e}")))?;
    for ns in &dns.nameservers {
        parse_ip(ns, "dns.nameservers")?;
    }
    Ok(dns)
}

impl PluginConfig {
    pub fn from_request(req: &Request) -> Result<Self, CniError> {
        Self::parse(&req.config)
    }

    pub fn parse(conf: &Map<String, Value>) -> Result<Self, CniError> {
        let mtu = match get(conf, "mtu") {
            None => None,
            Some(v) => {
                let mtu = v.as_u64().ok_or_else(|| invalid(format!("mtu must be a number, got {v}")))?;
                if !(u64::from(MIN_MTU)..=u64::from(MAX_MTU)).contains(&mtu) {
                    return Err(invalid(format!("mtu {mtu} is outside {MIN_MTU}..{MAX_MTU}")));
                }
                u32::try_from(mtu).ok()
            }
        };
        let pod_cidrs = cidr_list(conf, "pod_cidr")?;
        let service_cidrs = cidr_list(conf, "service_cidr")?;
        let enable_ipv6 = boolean(conf, "enable_ipv6", false)?;
        let enable_network_policy = boolean(conf, "enable_network_policy", true)?;
        let headscale_url = string(conf, "headscale_url", "headscale_url")?;
        if let Some(url) = &headscale_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(invalid(format!("headscale_url \"{url}\" must start with https:// or http://")));
        }
        let tailscale_socket =
            abs_path(conf, "tailscale_socket")?.unwrap_or_else(|| PathBuf::from(DEFAULT_TAILSCALE_SOCKET));
        let dns = parse_dns(conf)?;
        let ipam = parse_ipam(conf)?;
        let run_dir = abs_path(conf, "run_dir")?.unwrap_or_else(|| PathBuf::from(nodefile::DEFAULT_RUN_DIR));
        let log_file = abs_path(conf, "log_file")?;
        let log_level = string(conf, "log_level", "log_level")?;
        let delegate_timeout = match get(conf, "delegate_timeout") {
            None => DEFAULT_DELEGATE_TIMEOUT,
            Some(v) => match v.as_f64() {
                Some(secs) if (0.1..=600.0).contains(&secs) => Duration::from_secs_f64(secs),
                _ => {
                    return Err(invalid(format!(
                        "delegate_timeout must be a number of seconds within 0.1..600, got {v}"
                    )));
                }
            },
        };

        let has_v6 = |nets: &[IpNetwork]| nets.iter().any(IpNetwork::is_ipv6);
        if !enable_ipv6 && (has_v6(&ipam.subnets) || has_v6(&pod_cidrs)) {
            return Err(invalid("IPv6 ranges are configured but enable_ipv6 is false"));
        }
        if enable_ipv6 && !ipam.subnets.is_empty() && !has_v6(&ipam.subnets) {
            return Err(invalid("enable_ipv6 is true but the ipam section has no IPv6 range"));
        }
        if !pod_cidrs.is_empty() {
            for subnet in &ipam.subnets {
                if !pod_cidrs.iter().any(|p| p.contains(subnet.network()) && p.prefix() <= subnet.prefix()) {
                    return Err(invalid(format!("ipam subnet {subnet} is not inside pod_cidr {}", list(&pod_cidrs))));
                }
            }
        }
        Ok(Self {
            pod_cidrs,
            service_cidrs,
            mtu,
            enable_ipv6,
            enable_network_policy,
            headscale_url,
            tailscale_socket,
            dns,
            ipam,
            run_dir,
            log_file,
            log_level,
            delegate_timeout,
        })
    }

    pub fn node_file_path(&self) -> PathBuf {
        nodefile::path_in(&self.run_dir)
    }

    /// Fills pod CIDRs and MTU from the node file where the config leaves them out.
    /// `prev` (DEL) lets teardown work from the addresses it handed out when the node file is gone.
    pub fn resolve(&self, req: &Request, prev_subnets: &[IpNetwork]) -> Result<Network, CniError> {
        let needs_node_file = self.mtu.is_none() || (self.pod_cidrs.is_empty() && self.ipam.subnets.is_empty());
        let node = if needs_node_file { self.load_node_file()? } else { None };

        let mut pod_cidrs = self.pod_cidrs.clone();
        if pod_cidrs.is_empty()
            && let Some(node) = &node
        {
            pod_cidrs = node.pod_cidrs.clone();
        }
        if !self.enable_ipv6 {
            pod_cidrs.retain(IpNetwork::is_ipv4);
        }
        let mtu = self.mtu.or(node.as_ref().and_then(|n| n.mtu)).unwrap_or(DEFAULT_MTU);

        let mut ipam_block = self.ipam.block.clone();
        if self.ipam.subnets.is_empty() {
            let sources: Vec<IpNetwork> = if pod_cidrs.is_empty() { prev_subnets.to_vec() } else { pod_cidrs.clone() };
            if sources.is_empty() {
                return Err(self.unavailable());
            }
            if self.enable_ipv6 && !sources.iter().any(IpNetwork::is_ipv6) {
                return Err(invalid("enable_ipv6 is true but the node has no IPv6 pod CIDR"));
            }
            let ranges: Vec<Value> = sources.iter().map(|c| json!([{ "subnet": c.to_string() }])).collect();
            ipam_block.insert("ranges".into(), Value::Array(ranges));
        }
        let mut ipam_config = req.config.clone();
        ipam_config.insert("ipam".into(), Value::Object(ipam_block));
        Ok(Network { pod_cidrs, mtu, ipam_config })
    }

    fn load_node_file(&self) -> Result<Option<NodeFile>, CniError> {
        NodeFile::load(&self.node_file_path()).map_err(|e| CniError::invalid_config(e.to_string()))
    }

    /// The error for "no pod CIDR known yet"; STATUS reports it as code 50, ADD as "try again".
    pub fn unavailable(&self) -> CniError {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "no pod CIDR for this node yet: the config has no pod_cidr and {} does not exist (headcni agent writes it)",
                self.node_file_path().display()
            ),
        )
    }
}

fn list(nets: &[IpNetwork]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The subnets of the addresses in a previous result (for DEL without a node file).
pub fn subnets_of(result: Option<&crate::cni::CniResult>) -> Vec<IpNetwork> {
    let mut out: Vec<IpNetwork> = Vec::new();
    for ip in result.map(|r| r.ips.as_slice()).unwrap_or_default() {
        if let Ok(net) = IpNetwork::new(ip.address.network(), ip.address.prefix())
            && !out.contains(&net)
        {
            out.push(net);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(v: Value) -> Map<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    /// The two configs of the user's documents, verbatim.
    pub const DOC_HOST_LOCAL: &str = r#"{"cniVersion":"1.0.0","name":"tailscale-cni","type":"headcni",
     "headscale_url":"https://headscale.company.com",
     "tailscale_socket":"/var/run/tailscale/tailscaled.sock",
     "pod_cidr":"10.244.0.0/24","service_cidr":"10.96.0.0/16",
     "ipam":{"type":"host-local","subnet":"10.244.0.0/24","rangeStart":"10.244.0.10",
             "rangeEnd":"10.244.0.254","gateway":"10.244.0.1"},
     "dns":{"nameservers":["10.96.0.10"],
            "search":["default.svc.cluster.local","svc.cluster.local","cluster.local"],
            "options":["ndots:5"]},
     "mtu":1420,"enable_ipv6":false,"enable_network_policy":true}"#;

    pub const DOC_HEADCNI_IPAM: &str = r#"{"cniVersion":"1.0.0","name":"tailscale-cni","type":"headcni",
     "headscale_url":"https://headscale.company.com",
     "tailscale_socket":"/var/run/tailscale/tailscaled.sock",
     "pod_cidr":"10.244.0.0/24","service_cidr":"10.96.0.0/16",
     "ipam":{"type":"headcni-ipam","subnet":"10.244.0.0/24","gateway":"10.244.0.1",
             "allocation_strategy":"sequential",
             "routes":[{"dst":"0.0.0.0/0","gw":"10.244.0.1"}]},
     "dns":{"nameservers":["10.96.0.10"],
            "search":["default.svc.cluster.local","svc.cluster.local","cluster.local"],
            "options":["ndots:5"]},
     "mtu":1420,"enable_ipv6":false,"enable_network_policy":true}"#;

    #[test]
    fn the_documented_configs_parse_as_written() {
        for text in [DOC_HOST_LOCAL, DOC_HEADCNI_IPAM] {
            let c = PluginConfig::parse(&serde_json::from_str(text).unwrap()).unwrap();
            assert_eq!(c.mtu, Some(1420));
            assert_eq!(c.pod_cidrs, vec!["10.244.0.0/24".parse::<IpNetwork>().unwrap()]);
            assert_eq!(c.service_cidrs, vec!["10.96.0.0/16".parse::<IpNetwork>().unwrap()]);
            assert_eq!(c.dns.options, vec!["ndots:5"]);
            assert_eq!(c.ipam.subnets.len(), 1);
            assert!(c.enable_network_policy);
            assert_eq!(c.headscale_url.as_deref(), Some("https://headscale.company.com"));
        }
    }

    #[test]
    fn unknown_keys_are_tolerated() {
        let c = PluginConfig::parse(&conf(json!({"ipam": {"type": "host-local"}, "magic_dns": {"enable": true}})));
        assert!(c.is_ok());
    }

    fn rejected(v: Value) -> String {
        let err = PluginConfig::parse(&conf(v)).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        err.msg
    }

    #[test]
    fn nonsense_is_rejected_naming_the_field() {
        let ipam = json!({"type": "headcni-ipam"});
        let cases = [
            (json!({"ipam": ipam, "mtu": 575}), "mtu 575"),
            (json!({"ipam": ipam, "mtu": 9001}), "mtu 9001"),
            (json!({"ipam": ipam, "mtu": "1420"}), "mtu must be a number"),
            (json!({"ipam": ipam, "pod_cidr": "10.244.0.0/33"}), "pod_cidr"),
            (json!({"ipam": ipam, "pod_cidr": "banana"}), "pod_cidr"),
            (json!({"ipam": ipam, "pod_cidr": "10.244.0.5/24"}), "host bits"),
            (json!({"ipam": ipam, "pod_cidr": "128.0.0.0/1"}), "pod_cidr: 128.0.0.0/1 covers too much"),
            (json!({"ipam": ipam, "service_cidr": "127.0.0.0/16"}), "loopback"),
            (json!({"ipam": {"type": "host-local", "subnet": "0.0.0.0/0"}}), "ipam.subnet: 0.0.0.0/0"),
            (
                json!({"enable_ipv6": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "::ffff:10.0.0.0/120"}]]}}),
                "ipam.ranges[0][0].subnet: ::ffff:10.0.0.0/120 overlaps",
            ),
            (json!({"ipam": ipam, "service_cidr": "10.96.0.0/99"}), "service_cidr"),
            (json!({"ipam": {"type": "host-local", "subnet": "10.1.0.0/x"}}), "ipam.subnet"),
            (json!({"ipam": {"type": "host-local", "subnet": "10.1.0.0/24", "gateway": "10.2.0.1"}}), "ipam.gateway"),
            (
                json!({"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/24", "rangeEnd": "10.1.1.9"}]]}}),
                "ipam.ranges[0][0].rangeEnd",
            ),
            (json!({"ipam": {"type": "host-local", "routes": [{"dst": "nope"}]}}), "ipam.routes[0].dst"),
            (
                json!({"ipam": ipam, "enable_ipv6": true, "pod_cidr": "10.244.0.0/24", "ipam": {"type": "host-local", "subnet": "10.244.0.0/24"}}),
                "no IPv6 range",
            ),
            (json!({"ipam": {"type": "host-local", "subnet": "fd00::/64"}}), "enable_ipv6 is false"),
            (json!({"ipam": ipam, "enable_ipv6": "yes"}), "enable_ipv6"),
            (json!({"ipam": ipam, "headscale_url": "headscale.example"}), "headscale_url"),
            (json!({"ipam": ipam, "run_dir": "relative/dir"}), "run_dir"),
            (json!({"ipam": ipam, "delegate_timeout": 0}), "delegate_timeout"),
            (json!({"ipam": ipam, "delegate_timeout": "60"}), "delegate_timeout"),
            (json!({"ipam": ipam, "dns": {"nameservers": ["not-an-ip"]}}), "dns.nameservers"),
            (json!({}), "ipam is required"),
            (json!({"ipam": {"type": "../x"}}), "ipam.type"),
            (
                json!({"ipam": ipam, "pod_cidr": "10.244.0.0/24", "ipam": {"type": "host-local", "subnet": "10.9.0.0/24"}}),
                "not inside pod_cidr",
            ),
        ];
        for (value, needle) in cases {
            let msg = rejected(value.clone());
            assert!(msg.contains(needle), "{value}: {msg:?} should mention {needle:?}");
        }
    }

    fn request(config: Map<String, Value>) -> Request {
        Request {
            command: crate::cni::Command::Add,
            container_id: "c".into(),
            netns: None,
            ifname: "eth0".into(),
            args_raw: None,
            args: vec![],
            path_raw: None,
            path: vec![],
            version: crate::cni::CniVersion::V1_0_0,
            network: "n".into(),
            config,
        }
    }

    #[test]
    fn node_file_fills_pod_cidrs_mtu_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let nf = NodeFile {
            pod_cidrs: vec!["10.244.3.0/24".parse().unwrap(), "fd00:10:244:3::/64".parse().unwrap()],
            mtu: Some(1230),
            ..Default::default()
        };
        nf.store(&nodefile::path_in(dir.path())).unwrap();
        let raw = conf(json!({"cniVersion": "1.0.0", "name": "n", "run_dir": dir.path(),
            "ipam": {"type": "headcni-ipam", "allocation_strategy": "dense"}}));
        let c = PluginConfig::parse(&raw).unwrap();
        let net = c.resolve(&request(raw.clone()), &[]).unwrap();
        assert_eq!(net.mtu, 1230);
        assert_eq!(net.pod_cidrs, vec!["10.244.3.0/24".parse::<IpNetwork>().unwrap()], "IPv6 is off");
        assert_eq!(net.ipam_config["ipam"]["ranges"], json!([[{"subnet": "10.244.3.0/24"}]]));
        assert_eq!(net.ipam_config["ipam"]["allocation_strategy"], "dense");

        let mut raw6 = raw.clone();
        raw6.insert("enable_ipv6".into(), json!(true));
        let net = PluginConfig::parse(&raw6).unwrap().resolve(&request(raw6), &[]).unwrap();
        assert_eq!(net.ipam_config["ipam"]["ranges"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn without_pod_cidr_or_node_file_the_network_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let raw = conf(json!({"run_dir": dir.path(), "ipam": {"type": "headcni-ipam"}}));
        let c = PluginConfig::parse(&raw).unwrap();
        let err = c.resolve(&request(raw.clone()), &[]).unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert!(err.msg.contains("subnet.env"));
        // DEL can still derive the ranges from what it handed out.
        let net = c.resolve(&request(raw), &["10.244.9.0/24".parse().unwrap()]).unwrap();
        assert_eq!(net.ipam_config["ipam"]["ranges"], json!([[{"subnet": "10.244.9.0/24"}]]));
    }

    #[test]
    fn explicit_ranges_need_no_node_file() {
        let c = PluginConfig::parse(&serde_json::from_str(DOC_HOST_LOCAL).unwrap()).unwrap();
        let raw: Map<String, Value> = serde_json::from_str(DOC_HOST_LOCAL).unwrap();
        let net = c.resolve(&request(raw), &[]).unwrap();
        assert_eq!(net.mtu, 1420);
        assert_eq!(net.ipam_config["ipam"]["subnet"], "10.244.0.0/24");
        assert!(net.ipam_config["ipam"].get("ranges").is_none());
    }
}
