//! CNI data types: the ADD result (kept in the 1.1.0 shape internally, written in the shape of the
//! requested version), DNS settings, and the attachment identity used by GC.

use super::error::{CniError, code};
use super::version::CniVersion;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::net::IpAddr;

/// An interface in a result. The host side has no `sandbox`; the container side names its netns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    pub sandbox: Option<String>,
    pub socket_path: Option<String>,
    pub pci_id: Option<String>,
}

/// An address in a result: the address with its prefix length, the gateway, and the index of
/// the interface (into `interfaces`) it sits on. IPAM results leave `interface` unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub interface: Option<usize>,
}

/// A route in a result; the optional fields are 1.1.0 additions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    pub priority: Option<u32>,
    pub table: Option<u32>,
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Self {
        Self { dst, gw, mtu: None, advmss: None, priority: None, table: None, scope: None }
    }
}

/// DNS settings passed through to the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_none() && self.search.is_empty() && self.options.is_empty()
    }
}

/// The success result of ADD (and the shape of `prevResult`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

fn decode_err(field: &str, detail: impl std::fmt::Display) -> CniError {
    CniError::new(code::DECODE_FAILURE, format!("invalid result: field \"{field}\": {detail}"))
}

fn opt_str(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(decode_err(field, format!("expected a string, got {other}"))),
    }
}

fn opt_u32(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<u32>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| if n == 0 { None } else { Some(n) })
            .ok_or_else(|| decode_err(field, format!("expected a non-negative integer, got {n}"))),
        Some(other) => Err(decode_err(field, format!("expected a number, got {other}"))),
    }
}

fn parse_ip(text: &str, field: &str) -> Result<IpAddr, CniError> {
    text.parse().map_err(|_| decode_err(field, format!("\"{text}\" is not an IP address")))
}

fn parse_net(text: &str, field: &str) -> Result<IpNetwork, CniError> {
    text.parse().map_err(|_| decode_err(field, format!("\"{text}\" is not an address/prefix")))
}

impl CniResult {
    /// Decodes a result of any supported version (the per-IP "version" field of 0.x is ignored).
    pub fn from_value(value: &Value) -> Result<Self, CniError> {
        let obj = value.as_object().ok_or_else(|| decode_err("result", "expected an object"))?;
        let mut result = CniResult::default();

        if let Some(list) = obj.get("interfaces").filter(|v| !v.is_null()) {
            let list = list.as_array().ok_or_else(|| decode_err("interfaces", "expected a list"))?;
            for (i, item) in list.iter().enumerate() {
                let field = format!("interfaces[{i}]");
                let o = item.as_object().ok_or_else(|| decode_err(&field, "expected an object"))?;
                result.interfaces.push(Interface {
                    name: opt_str(o, "name", &field)?.ok_or_else(|| decode_err(&field, "missing \"name\""))?,
                    mac: opt_str(o, "mac", &field)?,
                    mtu: opt_u32(o, "mtu", &field)?,
                    sandbox: opt_str(o, "sandbox", &field)?,
                    socket_path: opt_str(o, "socketPath", &field)?,
                    pci_id: opt_str(o, "pciID", &field)?,
                });
            }
        }

        if let Some(list) = obj.get("ips").filter(|v| !v.is_null()) {
            let list = list.as_array().ok_or_else(|| decode_err("ips", "expected a list"))?;
            for (i, item) in list.iter().enumerate() {
                let field = format!("ips[{i}]");
                let o = item.as_object().ok_or_else(|| decode_err(&field, "expected an object"))?;
                let address =
                    opt_str(o, "address", &field)?.ok_or_else(|| decode_err(&field, "missing \"address\""))?;
                let gateway = opt_str(o, "gateway", &field)?;
                let interface = match o.get("interface") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|n| usize::try_from(n).ok())
                            .ok_or_else(|| decode_err(&field, "\"interface\" must be an index"))?,
                    ),
                };
                if let Some(idx) = interface
                    && idx >= result.interfaces.len()
                {
                    return Err(decode_err(&field, format!("interface index {idx} out of range")));
                }
                result.ips.push(IpConfig {
                    address: parse_net(&address, &field)?,
                    gateway: gateway.map(|g| parse_ip(&g, &field)).transpose()?,
                    interface,
                });
            }
        }

        if let Some(list) = obj.get("routes").filter(|v| !v.is_null()) {
            let list = list.as_array().ok_or_else(|| decode_err("routes", "expected a list"))?;
            for (i, item) in list.iter().enumerate() {
                let field = format!("routes[{i}]");
                let o = item.as_object().ok_or_else(|| decode_err(&field, "expected an object"))?;
                let dst = opt_str(o, "dst", &field)?.ok_or_else(|| decode_err(&field, "missing \"dst\""))?;
                let gw = opt_str(o, "gw", &field)?;
                // Unlike the other numbers, scope 0 ("global") is a value, not "unset".
                let scope = match o.get("scope") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|s| u8::try_from(s).ok())
                            .ok_or_else(|| decode_err(&field, "scope must be 0..255"))?,
                    ),
                };
                result.routes.push(Route {
                    dst: parse_net(&dst, &field)?,
                    gw: gw.map(|g| parse_ip(&g, &field)).transpose()?,
                    mtu: opt_u32(o, "mtu", &field)?,
                    advmss: opt_u32(o, "advmss", &field)?,
                    priority: opt_u32(o, "priority", &field)?,
                    table: opt_u32(o, "table", &field)?,
                    scope,
                });
            }
        }

        if let Some(dns) = obj.get("dns").filter(|v| !v.is_null()) {
            result.dns = serde_json::from_value(dns.clone()).map_err(|e| decode_err("dns", e))?;
        }
        Ok(result)
    }

    /// Encodes the result in the layout of `version`, dropping fields that version lacks.
    pub fn to_value(&self, version: CniVersion) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version.as_str()));
        if !self.interfaces.is_empty() {
            let list: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut o = Map::new();
                    o.insert("name".into(), json!(i.name));
                    if let Some(mac) = &i.mac {
                        o.insert("mac".into(), json!(mac));
                    }
                    if version.has_extended_fields()
                        && let Some(mtu) = i.mtu
                    {
                        o.insert("mtu".into(), json!(mtu));
                    }
                    if let Some(sandbox) = &i.sandbox {
                        o.insert("sandbox".into(), json!(sandbox));
                    }
                    if version.has_extended_fields() {
                        if let Some(p) = &i.socket_path {
                            o.insert("socketPath".into(), json!(p));
                        }
                        if let Some(p) = &i.pci_id {
                            o.insert("pciID".into(), json!(p));
                        }
                    }
                    Value::Object(o)
                })
                .collect();
            out.insert("interfaces".into(), Value::Array(list));
        }
        if !self.ips.is_empty() {
            let list: Vec<Value> = self
                .ips
                .iter()
                .map(|ip| {
                    let mut o = Map::new();
                    if version.ip_has_version_field() {
                        let family = if ip.address.is_ipv4() { "4" } else { "6" };
                        o.insert("version".into(), json!(family));
                    }
                    o.insert("address".into(), json!(ip.address.to_string()));
                    if let Some(gw) = ip.gateway {
                        o.insert("gateway".into(), json!(gw.to_string()));
                    }
                    if let Some(idx) = ip.interface {
                        o.insert("interface".into(), json!(idx));
                    }
                    Value::Object(o)
                })
                .collect();
            out.insert("ips".into(), Value::Array(list));
        }
        if !self.routes.is_empty() {
            let list: Vec<Value> = self
                .routes
                .iter()
                .map(|r| {
                    let mut o = Map::new();
                    o.insert("dst".into(), json!(r.dst.to_string()));
                    if let Some(gw) = r.gw {
                        o.insert("gw".into(), json!(gw.to_string()));
                    }
                    if version.has_extended_fields() {
                        for (key, val) in [
                            ("mtu", r.mtu),
                            ("advmss", r.advmss),
                            ("priority", r.priority),
                            ("table", r.table),
                            ("scope", r.scope.map(u32::from)),
                        ] {
                            if let Some(v) = val {
                                o.insert(key.into(), json!(v));
                            }
                        }
                    }
                    Value::Object(o)
                })
                .collect();
            out.insert("routes".into(), Value::Array(list));
        }
        // libcni's Go types always emit the dns object, even when empty.
        out.insert("dns".into(), serde_json::to_value(&self.dns).unwrap_or_else(|_| json!({})));
        Value::Object(out)
    }
}

/// One attachment a runtime still considers valid (GC input).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(rename = "ifname")]
    pub ifname: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "hc1234".into(),
                    mac: Some("aa:bb:cc:dd:ee:ff".into()),
                    mtu: Some(1280),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("11:22:33:44:55:66".into()),
                    mtu: Some(1280),
                    sandbox: Some("/var/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/24".parse().unwrap(),
                    gateway: Some("10.244.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:10:244:1::5/64".parse().unwrap(),
                    gateway: Some("fd00:10:244:1::1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
                mtu: Some(1280),
                scope: Some(0),
                ..Route::new("0.0.0.0/0".parse().unwrap(), None)
            }],
            dns: Dns { nameservers: vec!["10.96.0.10".into()], ..Default::default() },
        }
    }

    /// Golden encodings per version: what a runtime of that version expects to read.
    #[test]
    fn golden_results_for_every_version() {
        let r = sample();
        let golden_0x = |v: &str| {
            json!({
                "cniVersion": v,
                "interfaces": [
                    {"name": "hc1234", "mac": "aa:bb:cc:dd:ee:ff"},
                    {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/p"}
                ],
                "ips": [
                    {"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                    {"version": "6", "address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
                "dns": {"nameservers": ["10.96.0.10"]}
            })
        };
        assert_eq!(r.to_value(CniVersion::V0_3_0), golden_0x("0.3.0"));
        assert_eq!(r.to_value(CniVersion::V0_3_1), golden_0x("0.3.1"));
        assert_eq!(r.to_value(CniVersion::V0_4_0), golden_0x("0.4.0"));
        assert_eq!(
            r.to_value(CniVersion::V1_0_0),
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "hc1234", "mac": "aa:bb:cc:dd:ee:ff"},
                    {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/p"}
                ],
                "ips": [
                    {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                    {"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
                "dns": {"nameservers": ["10.96.0.10"]}
            })
        );
        assert_eq!(
            r.to_value(CniVersion::V1_1_0),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "hc1234", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1280},
                    {"name": "eth0", "mac": "11:22:33:44:55:66", "mtu": 1280, "sandbox": "/var/run/netns/p"}
                ],
                "ips": [
                    {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                    {"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1280, "scope": 0}],
                "dns": {"nameservers": ["10.96.0.10"]}
            })
        );
    }

    #[test]
    fn decodes_what_it_encodes_in_every_version() {
        let r = sample();
        for v in CniVersion::ALL {
            let back = CniResult::from_value(&r.to_value(v)).unwrap();
            assert_eq!(back.ips, r.ips, "{v}");
            assert_eq!(back.interfaces.len(), 2);
            assert_eq!(back.dns, r.dns);
            if v.has_extended_fields() {
                assert_eq!(back, r);
            }
        }
    }

    #[test]
    fn ipam_result_without_interfaces_encodes_without_them() {
        let r = CniResult {
            ips: vec![IpConfig { address: "10.0.0.2/24".parse().unwrap(), gateway: None, interface: None }],
            ..Default::default()
        };
        assert_eq!(
            r.to_value(CniVersion::V1_0_0),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}})
        );
    }

    #[test]
    fn rejects_malformed_results_naming_the_field() {
        let cases = [
            (json!([]), "result"),
            (json!({"ips": [{"address": "nope"}]}), "ips[0]"),
            (json!({"ips": [{"address": "10.0.0.1/24", "interface": 3}]}), "ips[0]"),
            (json!({"routes": [{"gw": "10.0.0.1"}]}), "routes[0]"),
            (json!({"interfaces": [{"mac": "x"}]}), "interfaces[0]"),
            (json!({"dns": {"nameservers": "x"}}), "dns"),
        ];
        for (value, field) in cases {
            let err = CniResult::from_value(&value).unwrap_err();
            assert_eq!(err.code, code::DECODE_FAILURE);
            assert!(err.msg.contains(field), "{} should name {field}", err.msg);
        }
    }
}
