//! The `ipam` section of a network configuration, in both accepted shapes:
//!
//! - the documented one: `{"type":"headcni-ipam","subnet","gateway","allocation_strategy","routes"}`
//!   (plus `rangeStart`/`rangeEnd`, as host-local accepts them at this level);
//! - host-local's: `{"ranges":[[{"subnet","rangeStart","rangeEnd","gateway"}]],"routes","dataDir"}`,
//!   so that switching from host-local means changing `type` only.
//!
//! Each inner list of `ranges` is a range set: one address per ADD comes from each set. A
//! top-level `subnet` is one more set, placed first. `exclude` lists addresses or CIDR blocks
//! never handed out. Every error is code 7 and names the field.

use super::IpamError;
use super::allocator::Strategy;
use super::state::{Family, RangeSpec, SetSpec, offset};
use crate::cni::{Dns, Request, Route, fields};
use ipnetwork::IpNetwork;
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::path::PathBuf;

/// Parent of the per-network store directories.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/headcni/ipam";

#[derive(Debug, Clone)]
pub struct IpamConfig {
    /// Empty when the config names no range (allowed for DEL, GC and CHECK).
    pub sets: Vec<SetSpec>,
    pub strategy: Strategy,
    pub routes: Vec<Route>,
    pub dns: Dns,
    /// The directory holding one store directory per network.
    pub data_dir: PathBuf,
    /// Where allocation and release events for the agent's metrics go.
    pub run_dir: PathBuf,
}

fn invalid(msg: impl Into<String>) -> IpamError {
    IpamError::Config(msg.into())
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    fields::get(obj, key)
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str, field: &str) -> Result<Option<&'a str>, IpamError> {
    Ok(fields::string(obj, key, field)?)
}

fn ip(text: &str, field: &str) -> Result<IpAddr, IpamError> {
    Ok(fields::ip(text, field)?)
}

fn abs_dir(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<PathBuf>, IpamError> {
    Ok(fields::abs_path(obj, key, field)?)
}

fn last_address(net: &IpNetwork) -> IpAddr {
    match net {
        IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
        IpNetwork::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix());
            let mask = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            IpAddr::V6((u128::from(n.network()) | mask).into())
        }
    }
}

fn step(ip: IpAddr, delta: i8) -> IpAddr {
    let family = Family::of(ip);
    let at = offset(ip);
    let moved = if delta >= 0 { at.wrapping_add(delta as u128) } else { at.wrapping_sub(delta.unsigned_abs() as u128) };
    super::state::address(family, moved)
}

/// One range object: `subnet` with optional `rangeStart`, `rangeEnd` and `gateway`, filled in
/// like host-local does (start after the network address, end before the IPv4 broadcast
/// address, gateway = first address).
fn parse_range(obj: &Map<String, Value>, field: &str) -> Result<RangeSpec, IpamError> {
    let subnet_field = format!("{field}.subnet");
    let text = string(obj, "subnet", &subnet_field)?.ok_or_else(|| invalid(format!("{subnet_field} is required")))?;
    let subnet: IpNetwork =
        text.parse().map_err(|_| invalid(format!("{subnet_field} \"{text}\" is not a CIDR such as 10.244.1.0/24")))?;
    if subnet.ip() != subnet.network() {
        return Err(invalid(format!(
            "{subnet_field} \"{text}\" has host bits set; did you mean {}/{}?",
            subnet.network(),
            subnet.prefix()
        )));
    }
    crate::cidr::check(&subnet).map_err(|e| invalid(format!("{subnet_field}: {e}")))?;
    let max_prefix = if subnet.is_ipv4() { 32 } else { 128 };
    if subnet.prefix() + 2 > max_prefix {
        return Err(invalid(format!("{subnet_field} {subnet} is too small to allocate from")));
    }
    let inside = |key: &str| -> Result<Option<IpAddr>, IpamError> {
        let sub_field = format!("{field}.{key}");
        match string(obj, key, &sub_field)? {
            None => Ok(None),
            Some(t) => {
                let addr = ip(t, &sub_field)?;
                if !subnet.contains(addr) {
                    return Err(invalid(format!("{sub_field} {addr} is outside {subnet_field} {subnet}")));
                }
                Ok(Some(addr))
            }
        }
    };
    let network = subnet.network();
    let gateway = inside("gateway")?.unwrap_or_else(|| step(network, 1));
    let start = inside("rangeStart")?.unwrap_or_else(|| step(network, 1));
    let end = inside("rangeEnd")?.unwrap_or_else(|| {
        let last = last_address(&subnet);
        if subnet.is_ipv4() { step(last, -1) } else { last }
    });
    if offset(start) > offset(end) {
        return Err(invalid(format!("{field}.rangeStart {start} is after {field}.rangeEnd {end}")));
    }
    Ok(RangeSpec { subnet, start, end, gateway: Some(gateway) })
}

fn parse_excludes(block: &Map<String, Value>) -> Result<Vec<IpNetwork>, IpamError> {
    let list = match get(block, "exclude") {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(invalid(format!("ipam.exclude must be a list of addresses or CIDRs, got {other}"))),
    };
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("ipam.exclude[{i}]");
            let text = v.as_str().ok_or_else(|| invalid(format!("{field} must be a string, got {v}")))?;
            let net: IpNetwork = match text.parse::<IpAddr>() {
                Ok(addr) => IpNetwork::from(addr),
                Err(_) => {
                    text.parse().map_err(|_| invalid(format!("{field} \"{text}\" is neither an address nor a CIDR")))?
                }
            };
            if net.ip() != net.network() {
                return Err(invalid(format!(
                    "{field} \"{text}\" has host bits set; did you mean {}/{}?",
                    net.network(),
                    net.prefix()
                )));
            }
            Ok(net)
        })
        .collect()
}

fn parse_routes(block: &Map<String, Value>) -> Result<Vec<Route>, IpamError> {
    let list = match get(block, "routes") {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(invalid(format!("ipam.routes must be a list, got {other}"))),
    };
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("ipam.routes[{i}]");
            let obj = v.as_object().ok_or_else(|| invalid(format!("{field} must be an object")))?;
            let dst_field = format!("{field}.dst");
            let dst = string(obj, "dst", &dst_field)?.ok_or_else(|| invalid(format!("{dst_field} is required")))?;
            let dst: IpNetwork = dst.parse().map_err(|_| invalid(format!("{dst_field} \"{dst}\" is not a CIDR")))?;
            let gw_field = format!("{field}.gw");
            let gw = string(obj, "gw", &gw_field)?.map(|g| ip(g, &gw_field)).transpose()?;
            Ok(Route::new(dst, gw))
        })
        .collect()
}

fn parse_sets(block: &Map<String, Value>, excludes: &[IpNetwork]) -> Result<Vec<SetSpec>, IpamError> {
    let mut sets: Vec<(Vec<RangeSpec>, Vec<String>)> = Vec::new();
    if get(block, "subnet").is_some() {
        sets.push((vec![parse_range(block, "ipam")?], vec!["ipam".to_string()]));
    } else {
        for key in ["rangeStart", "rangeEnd", "gateway"] {
            if get(block, key).is_some() {
                return Err(invalid(format!("ipam.{key} needs ipam.subnet")));
            }
        }
    }
    match get(block, "ranges") {
        None => {}
        Some(Value::Array(list)) => {
            for (i, set) in list.iter().enumerate() {
                let set = set
                    .as_array()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| invalid(format!("ipam.ranges[{i}] must be a non-empty list of ranges")))?;
                let mut ranges = Vec::new();
                let mut fields = Vec::new();
                for (j, range) in set.iter().enumerate() {
                    let field = format!("ipam.ranges[{i}][{j}]");
                    let obj = range.as_object().ok_or_else(|| invalid(format!("{field} must be an object")))?;
                    ranges.push(parse_range(obj, &field)?);
                    fields.push(field);
                }
                sets.push((ranges, fields));
            }
        }
        Some(other) => return Err(invalid(format!("ipam.ranges must be a list of lists, got {other}"))),
    }

    // Ranges never overlap (one address would belong to two ranges) and a set has one family.
    let all: Vec<(&RangeSpec, &String)> = sets.iter().flat_map(|(r, f)| r.iter().zip(f)).collect();
    for (i, (a, fa)) in all.iter().enumerate() {
        for (b, fb) in &all[..i] {
            if Family::of(a.start) == Family::of(b.start) && a.span().lo <= b.span().hi && b.span().lo <= a.span().hi {
                return Err(invalid(format!("{fa} ({}-{}) overlaps {fb} ({}-{})", a.start, a.end, b.start, b.end)));
            }
        }
    }
    sets.into_iter()
        .map(|(ranges, fields)| {
            let family = Family::of(ranges[0].start);
            if let Some((_, field)) = ranges.iter().zip(&fields).find(|(r, _)| Family::of(r.start) != family) {
                return Err(invalid(format!("{field} mixes IPv4 and IPv6 in one range set")));
            }
            // Only the exclusions that touch this set are kept with it.
            let excludes = excludes
                .iter()
                .filter(|e| {
                    Family::of(e.network()) == family
                        && ranges.iter().any(|r| {
                            let (lo, hi) = (offset(e.network()), offset(last_address(e)));
                            lo <= r.span().hi && r.span().lo <= hi
                        })
                })
                .copied()
                .collect();
            Ok(SetSpec { ranges, excludes })
        })
        .collect()
}

impl IpamConfig {
    pub fn from_request(req: &Request) -> Result<Self, IpamError> {
        Self::parse(&req.config)
    }

    pub fn parse(conf: &Map<String, Value>) -> Result<Self, IpamError> {
        let block = match get(conf, "ipam") {
            Some(Value::Object(b)) => b,
            Some(other) => return Err(invalid(format!("ipam must be an object, got {other}"))),
            None => return Err(invalid("ipam is required")),
        };
        let strategy = match string(block, "allocation_strategy", "ipam.allocation_strategy")? {
            None => Strategy::Sequential,
            Some(s) => Strategy::parse(s).ok_or_else(|| {
                invalid(format!(
                    "ipam.allocation_strategy \"{}\" is not one of sequential, random, dense",
                    s.escape_debug()
                ))
            })?,
        };
        let excludes = parse_excludes(block)?;
        let sets = parse_sets(block, &excludes)?;
        let routes = parse_routes(block)?;
        let dns = match get(block, "dns") {
            None => Dns::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| invalid(format!("ipam.dns must be {{nameservers, domain, search, options}}: {e}")))?,
        };
        let data_dir = abs_dir(block, "dataDir", "ipam.dataDir")?.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let run_dir =
            abs_dir(conf, "run_dir", "run_dir")?.unwrap_or_else(|| PathBuf::from(crate::nodefile::DEFAULT_RUN_DIR));
        Ok(Self { sets, strategy, routes, dns, data_dir, run_dir })
    }

    /// The set an address belongs to, by index.
    pub fn set_of(&self, addr: IpAddr) -> Option<usize> {
        self.sets.iter().position(|s| s.range_of(addr).is_some())
    }
}

/// The addresses a runtime asks for: CNI_ARGS `IP=` (one or a comma list), `args.cni.ips` and
/// `runtimeConfig.ips`, as host-local reads them. A prefix length ("10.1.0.5/24") is ignored.
pub fn requested_ips(req: &Request) -> Result<Vec<IpAddr>, IpamError> {
    let mut out = Vec::new();
    if let Some(list) = req.arg("IP") {
        for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            out.push(text.parse().map_err(|_| {
                IpamError::Env(format!("CNI_ARGS IP=\"{}\" is not an IP address", text.escape_debug()))
            })?);
        }
    }
    let from_config = |value: Option<&Value>, field: &str| -> Result<Vec<IpAddr>, IpamError> {
        let Some(value) = value.filter(|v| !v.is_null()) else { return Ok(Vec::new()) };
        let list = value.as_array().ok_or_else(|| invalid(format!("{field} must be a list of addresses")))?;
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                let text = v.as_str().ok_or_else(|| invalid(format!("{field}[{i}] must be a string")))?;
                let addr = text.split('/').next().unwrap_or(text);
                ip(addr, &format!("{field}[{i}]"))
            })
            .collect()
    };
    let args_ips = req.config.get("args").and_then(|a| a.get("cni")).and_then(|c| c.get("ips"));
    out.extend(from_config(args_ips, "args.cni.ips")?);
    let runtime_ips = req.config.get("runtimeConfig").and_then(|r| r.get("ips"));
    out.extend(from_config(runtime_ips, "runtimeConfig.ips")?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(ipam: Value) -> Result<IpamConfig, IpamError> {
        let conf = json!({"cniVersion": "1.0.0", "name": "n", "ipam": ipam});
        IpamConfig::parse(conf.as_object().unwrap())
    }

    fn msg(ipam: Value) -> String {
        match parse(ipam) {
            Err(IpamError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn documented_shape() {
        let c = parse(json!({"type": "headcni-ipam", "subnet": "10.244.0.0/24", "gateway": "10.244.0.1",
            "allocation_strategy": "sequential", "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}]}))
        .unwrap();
        assert_eq!(c.sets.len(), 1);
        let r = &c.sets[0].ranges[0];
        assert_eq!((r.start.to_string(), r.end.to_string()), ("10.244.0.1".into(), "10.244.0.254".into()));
        assert_eq!(r.gateway, Some("10.244.0.1".parse().unwrap()));
        assert_eq!(c.sets[0].pool().capacity(), 253, "network, broadcast and gateway are reserved");
        assert_eq!(c.routes, vec![Route::new("0.0.0.0/0".parse().unwrap(), Some("10.244.0.1".parse().unwrap()))]);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.strategy, Strategy::Sequential);
    }

    #[test]
    fn host_local_shape_with_dual_stack_and_excludes() {
        let c = parse(json!({"type": "host-local", "dataDir": "/tmp/ipam",
            "ranges": [
                [{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.20"},
                 {"subnet": "10.1.1.0/24"}],
                [{"subnet": "fd00::/64", "gateway": "fd00::ffff"}]
            ],
            "exclude": ["10.1.0.12", "10.1.1.0/28", "192.168.0.0/16"], "allocation_strategy": "dense-pack"}))
        .unwrap();
        assert_eq!(c.strategy, Strategy::Dense);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/ipam"));
        assert_eq!(c.sets.len(), 2);
        assert_eq!(c.sets[0].excludes.len(), 2, "192.168.0.0/16 touches no range");
        // 11 - 1 excluded; 10.1.1.1..254 minus gateway .1 and .0-.15.
        assert_eq!(c.sets[0].pool().capacity(), 10 + (254 - 15));
        assert_eq!(c.sets[1].family(), Family::V6);
        assert_eq!(c.sets[1].ranges[0].end, "fd00::ffff:ffff:ffff:ffff".parse::<IpAddr>().unwrap());
        assert_eq!(c.set_of("fd00::5".parse().unwrap()), Some(1));
        assert_eq!(c.set_of("10.1.0.9".parse().unwrap()), None);
    }

    #[test]
    fn no_ranges_is_allowed_for_release() {
        let c = parse(json!({"type": "headcni-ipam"})).unwrap();
        assert!(c.sets.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"subnet": "10.0.0.0/33"}), "ipam.subnet"),
            (json!({"subnet": "10.0.0.5/24"}), "host bits"),
            (json!({"subnet": "10.0.0.0/31"}), "too small"),
            (json!({"subnet": "0.0.0.0/0"}), "ipam.subnet: 0.0.0.0/0 covers too much"),
            (json!({"ranges": [[{"subnet": "::/0"}]]}), "ipam.ranges[0][0].subnet: ::/0 covers too much"),
            (json!({"ranges": [[{"subnet": "::ffff:10.0.0.0/120"}]]}), "IPv4-mapped"),
            (json!({"subnet": "127.0.0.0/24"}), "loopback"),
            (json!({"subnet": "10.0.0.0/24", "gateway": "10.0.1.1"}), "ipam.gateway 10.0.1.1 is outside"),
            (json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.3"}), "after"),
            (json!({"gateway": "10.0.0.1"}), "ipam.gateway needs ipam.subnet"),
            (json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.0.0.0/25"}]]}), "ipam.ranges[1][0]"),
            (json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]}), "mixes IPv4 and IPv6"),
            (json!({"ranges": [[]]}), "ipam.ranges[0]"),
            (json!({"ranges": {"subnet": "10.0.0.0/24"}}), "ipam.ranges"),
            (json!({"ranges": [[{"subnet": 7}]]}), "ipam.ranges[0][0].subnet"),
            (json!({"allocation_strategy": "fastest"}), "ipam.allocation_strategy \"fastest\""),
            (json!({"exclude": ["10.0.0.1/24"]}), "ipam.exclude[0]"),
            (json!({"exclude": "10.0.0.1"}), "ipam.exclude"),
            (json!({"routes": [{"dst": "x"}]}), "ipam.routes[0].dst"),
            (json!({"routes": [{"dst": "0.0.0.0/0", "gw": "y"}]}), "ipam.routes[0].gw"),
            (json!({"dataDir": "relative"}), "ipam.dataDir"),
            (json!({"dataDir": "/var/../etc"}), "ipam.dataDir"),
        ];
        for (ipam, needle) in cases {
            let m = msg(ipam.clone());
            assert!(m.contains(needle), "{ipam}: {m:?} should mention {needle:?}");
        }
        assert!(matches!(
            IpamConfig::parse(json!({"name": "n"}).as_object().unwrap()),
            Err(IpamError::Config(m)) if m.contains("ipam is required")
        ));
    }

    use crate::ipam::allocator::Strategy as Pick;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};

    proptest! {
        /// Whatever the subnet, gateway and exclusion, allocating until exhaustion hands out
        /// every other address exactly once and never the network, broadcast or gateway address
        /// or an excluded one, with every strategy.
        #[test]
        fn reserved_and_excluded_addresses_are_never_handed_out(
            prefix in 26u8..=30, gw_pick in any::<u16>(), ex_pick in any::<u16>(), ex_len in 30u8..=32,
            which in 0usize..3, seed in any::<u64>(),
        ) {
            let size = 1u32 << (32 - prefix);
            let base = 0x0a00_0000u32;
            let host = |pick: u16| std::net::Ipv4Addr::from(base + 1 + u32::from(pick) % (size - 2));
            let gateway = host(gw_pick);
            let excluded = ipnetwork::Ipv4Network::new(host(ex_pick), ex_len).unwrap();
            let excluded = ipnetwork::Ipv4Network::new(excluded.network(), ex_len).unwrap();
            let c = parse(json!({"subnet": format!("10.0.0.0/{prefix}"), "gateway": gateway.to_string(),
                "exclude": [excluded.to_string()]})).unwrap();
            let pool = c.sets[0].pool();
            let strategy = [Pick::Sequential, Pick::Random, Pick::Dense][which];
            let mut state = seed;
            let mut random = |m: u128| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                u128::from(state >> 11) % m
            };
            let mut used: Vec<u128> = Vec::new();
            let mut cursor = None;
            while let Some(a) = pool.next(&used, strategy, cursor, &mut random) {
                let ip = std::net::Ipv4Addr::from(u32::try_from(a).unwrap());
                prop_assert!(ip != std::net::Ipv4Addr::from(base), "network address");
                prop_assert!(ip != std::net::Ipv4Addr::from(base + size - 1), "broadcast address");
                prop_assert!(ip != gateway, "gateway");
                prop_assert!(!excluded.contains(ip), "excluded {}", ip);
                let at = used.partition_point(|&u| u < a);
                prop_assert!(used.get(at) != Some(&a), "{} twice", ip);
                used.insert(at, a);
                cursor = Some(a);
            }
            let reserved: std::collections::BTreeSet<std::net::Ipv4Addr> = (base + 1..base + size - 1)
                .map(std::net::Ipv4Addr::from)
                .filter(|ip| *ip == gateway || excluded.contains(*ip))
                .collect();
            prop_assert_eq!(used.len() as u32, size - 2 - reserved.len() as u32, "every other address, once");
        }
    }
}
