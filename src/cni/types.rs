//! CNI data types: the ADD result (kept in the 1.1.0 shape internally, written in the shape of the
//! requested version), DNS settings, and the attachment identity used by GC.

use super::error::{CniError, code};
use super::fields::{self, FieldError};
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

/// A result field that cannot be decoded: code 6.
fn undecodable(e: FieldError) -> CniError {
    CniError::new(code::DECODE_FAILURE, format!("invalid result: {e}"))
}

fn missing(field: &str, key: &str) -> CniError {
    undecodable(FieldError::new(field, format!("has no \"{key}\"")))
}

/// `obj`'s fields, read as the result decoder wants them: errors are decode failures, and a
/// number 0 counts as unset (as the spec's optional numbers do).
struct ResultFields<'a> {
    obj: &'a Map<String, Value>,
    field: &'a str,
}

impl ResultFields<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}.{key}", self.field)
    }

    fn string(&self, key: &str) -> Result<Option<String>, CniError> {
        fields::string(self.obj, key, &self.name(key)).map(|v| v.map(str::to_string)).map_err(undecodable)
    }

    fn number(&self, key: &str) -> Result<Option<u32>, CniError> {
        fields::number(self.obj, key, &self.name(key)).map(|v| v.filter(|n| *n != 0)).map_err(undecodable)
    }

    fn ip(&self, key: &str) -> Result<Option<IpAddr>, CniError> {
        self.string(key)?.map(|t| fields::ip(&t, &self.name(key)).map_err(undecodable)).transpose()
    }

    fn cidr(&self, key: &str) -> Result<IpNetwork, CniError> {
        let text = self.string(key)?.ok_or_else(|| missing(self.field, key))?;
        fields::cidr(&text, &self.name(key)).map_err(undecodable)
    }
}

/// A JSON object.
type Object = Map<String, Value>;

/// The items of list `key`, each an object, with its field name ("ips[2]").
fn objects<'a>(obj: &'a Object, key: &str) -> Result<Vec<(String, &'a Object)>, CniError> {
    let list = fields::list(obj, key, key).map_err(undecodable)?.unwrap_or_default();
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("{key}[{i}]");
            let o = fields::item_object(item, &field).map_err(undecodable)?;
            Ok((field, o))
        })
        .collect()
}

impl CniResult {
    /// Decodes a result of any supported version (the per-IP "version" field of 0.x is ignored).
    pub fn from_value(value: &Value) -> Result<Self, CniError> {
        let obj = value.as_object().ok_or_else(|| undecodable(FieldError::new("result", "must be an object")))?;
        let mut result = CniResult::default();

        for (field, o) in objects(obj, "interfaces")? {
            let f = ResultFields { obj: o, field: &field };
            result.interfaces.push(Interface {
                name: f.string("name")?.ok_or_else(|| missing(&field, "name"))?,
                mac: f.string("mac")?,
                mtu: f.number("mtu")?,
                sandbox: f.string("sandbox")?,
                socket_path: f.string("socketPath")?,
                pci_id: f.string("pciID")?,
            });
        }

        for (field, o) in objects(obj, "ips")? {
            let f = ResultFields { obj: o, field: &field };
            let address = f.cidr("address")?;
            let gateway = f.ip("gateway")?;
            // An index, where 0 is a value.
            let interface =
                fields::number(o, "interface", &f.name("interface")).map_err(undecodable)?.map(|n| n as usize);
            if let Some(idx) = interface
                && idx >= result.interfaces.len()
            {
                return Err(undecodable(FieldError::new(
                    &field,
                    format!("names interface {idx}, which does not exist"),
                )));
            }
            result.ips.push(IpConfig { address, gateway, interface });
        }

        for (field, o) in objects(obj, "routes")? {
            let f = ResultFields { obj: o, field: &field };
            // Unlike the other numbers, scope 0 ("global") is a value, not "unset".
            let scope = fields::number(o, "scope", &f.name("scope"))
                .map_err(undecodable)?
                .map(|s| u8::try_from(s).map_err(|_| undecodable(FieldError::new(&f.name("scope"), "must be 0..255"))))
                .transpose()?;
            result.routes.push(Route {
                dst: f.cidr("dst")?,
                gw: f.ip("gw")?,
                mtu: f.number("mtu")?,
                advmss: f.number("advmss")?,
                priority: f.number("priority")?,
                table: f.number("table")?,
                scope,
            });
        }

        if let Some(dns) = fields::get(obj, "dns") {
            result.dns = serde_json::from_value(dns.clone()).map_err(|e| {
                undecodable(FieldError::new("dns", format!("must be {{nameservers, domain, search, options}}: {e}")))
            })?;
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
