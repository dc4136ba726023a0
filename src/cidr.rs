//! The sanity check every pod, cluster, service and IPAM range passes wherever it enters
//! HeadCNI: the agent's flags and the Node objects it reads, the plugin's configuration and the
//! node file, and headcni-ipam's ranges (`headcni install` writes nothing the plugin's own
//! parser would refuse). One function, so that no entry point is laxer than another.
//!
//! A range is refused when it names no network (host bits set), covers too much of the address
//! space (anything wider than a /8: a pod CIDR `128.0.0.0/1` would be advertised, exempted from
//! masquerading and routed into the tailnet), or touches addresses no pod may have: the
//! unspecified and "this network" ranges, loopback, link-local (the pod gateway lives there),
//! multicast, IPv4's reserved 240.0.0.0/4, and IPv4-mapped IPv6 (`::ffff:0:0/96`, which is IPv4
//! in disguise).
//!
//! Beside it, the arithmetic on ranges that the agent's parts share: containment, overlap and a
//! network's first and last address.

use ipnetwork::IpNetwork;

/// The widest range accepted, per family.
pub const MIN_PREFIX: u8 = 8;

/// Ranges no pod address may come from, with what they are.
const FORBIDDEN: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/127", "unspecified and loopback"),
    ("::ffff:0:0/96", "IPv4-mapped IPv6"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// The first and the last address of `net` (IPv6 has no broadcast, but the same last address).
pub fn address_range(net: &IpNetwork) -> (std::net::IpAddr, std::net::IpAddr) {
    match net {
        IpNetwork::V4(n) => (n.network().into(), n.broadcast().into()),
        IpNetwork::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix());
            let host = if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            (n.network().into(), std::net::Ipv6Addr::from(u128::from(n.network()) | host).into())
        }
    }
}

/// Whether `outer` contains all of `inner`.
pub fn covers(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4() && outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

/// Whether two networks share any address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    covers(a, b) || covers(b, a)
}

/// Checks one range meant for pod, cluster or service addresses. The error says what is wrong
/// with it (the caller names the field).
pub fn check(net: &IpNetwork) -> Result<(), String> {
    if net.ip() != net.network() {
        return Err(format!("{net} has host bits set (did you mean {}/{}?)", net.network(), net.prefix()));
    }
    if net.prefix() < MIN_PREFIX {
        return Err(format!(
            "{net} covers too much of the address space: pod, cluster and service ranges must be /{MIN_PREFIX} or \
             narrower"
        ));
    }
    for (text, what) in FORBIDDEN {
        let Ok(bad) = text.parse::<IpNetwork>() else { continue };
        if overlaps(net, &bad) {
            return Err(format!("{net} overlaps {bad} ({what} addresses), which no pod may use"));
        }
    }
    Ok(())
}

/// Checks a node's pod CIDRs against the cluster CIDRs: each must lie inside a cluster CIDR of
/// its family, when one of that family is known.
pub fn check_inside_cluster(pods: &[IpNetwork], cluster: &[IpNetwork]) -> Result<(), String> {
    for pod in pods {
        let same_family: Vec<&IpNetwork> = cluster.iter().filter(|c| c.is_ipv4() == pod.is_ipv4()).collect();
        if !same_family.is_empty() && !same_family.iter().any(|c| covers(c, pod)) {
            let list = cluster.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
            return Err(format!("pod CIDR {pod} is not inside the cluster CIDR ({list})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn ordinary_ranges_pass() {
        for ok in ["10.244.0.0/16", "10.244.1.0/24", "10.0.0.0/8", "10.96.0.0/12", "fd00:10:244::/56", "2001:db8::/32"]
        {
            assert_eq!(check(&net(ok)), Ok(()), "{ok}");
        }
    }

    #[test]
    fn what_the_findings_showed_is_refused() {
        for (bad, needle) in [
            ("128.0.0.0/1", "too much"),
            ("0.0.0.0/0", "too much"),
            ("::/0", "too much"),
            ("10.0.0.0/7", "too much"),
            ("::ffff:10.0.0.0/120", "IPv4-mapped"),
            ("127.0.0.0/16", "loopback"),
            ("::1/128", "loopback"),
            ("169.254.0.0/24", "link-local"),
            ("fe80::/64", "link-local"),
            ("224.1.0.0/16", "multicast"),
            ("ff02::/16", "multicast"),
            ("255.255.255.0/24", "reserved"),
            ("0.1.0.0/16", "this network"),
            ("10.244.1.5/24", "host bits"),
        ] {
            let err = check(&net(bad)).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn pod_cidrs_lie_inside_the_cluster() {
        let cluster = [net("10.244.0.0/16"), net("fd00:10:244::/56")];
        assert!(check_inside_cluster(&[net("10.244.3.0/24"), net("fd00:10:244:3::/64")], &cluster).is_ok());
        let err = check_inside_cluster(&[net("10.9.0.0/24")], &cluster).unwrap_err();
        assert!(err.contains("10.9.0.0/24 is not inside"), "{err}");
        assert!(check_inside_cluster(&[net("10.9.0.0/24")], &[]).is_ok(), "no cluster CIDR known");
        assert!(check_inside_cluster(&[net("fd00:9::/64")], &cluster[..1]).is_ok(), "none of that family");
    }
}
