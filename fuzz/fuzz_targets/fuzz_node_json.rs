//! A Node object from the API server is untrusted: parsing it and deriving the pod CIDRs never
//! panics, and whatever is accepted is usable (canonical, one per family, passing the range
//! checks), as the agent's checks then require.
#![no_main]

use headcni::agent::config::check_pod_cidrs;
use headcni::agent::node::parse_node;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for name in ["node-1", "n"] {
        if let Ok(Some(nets)) = parse_node(name, data) {
            assert!(!nets.is_empty() && nets.len() <= 2, "{nets:?}");
            assert!(nets.iter().all(|n| n.ip() == n.network()), "not canonical: {nets:?}");
            if nets.len() == 2 {
                assert_ne!(nets[0].is_ipv4(), nets[1].is_ipv4(), "two of one family: {nets:?}");
            }
            assert!(nets.iter().all(|n| headcni::cidr::check(n).is_ok()), "not sane: {nets:?}");
            let _ = check_pod_cidrs(&nets, &[], &[]);
        }
    }
});
