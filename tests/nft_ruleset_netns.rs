//! Root-only: the rule-set encoder of `netlink::nft::ruleset` against the real kernel, inside
//! namespaces this test creates. `nft list` reads back what the kernel understood (every
//! construct must print as nft itself would write it), incremental batches move between rule
//! sets, and packets between two "pods" behind a "node" show that the kernel evaluates the
//! rules as written.

mod common;

use common::Netns;
use headcni::netlink::nft::Nft;
use headcni::netlink::nft::ruleset::*;
use std::net::IpAddr;

const TABLE: &str = "rstest";

fn nft_installed() -> bool {
    std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn nft(ns: &Netns) -> Nft {
    Nft::connect_in(&headcni::netlink::Netns::open(&ns.path()).unwrap()).unwrap()
}

fn list(ns: &Netns) -> String {
    ns.exec_ok(&["nft", "list", "table", "inet", TABLE])
}

/// The table's text with its sets and chains in name order (the kernel lists them in the order
/// they were created).
fn normalized(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.starts_with("\t") && !line.starts_with("\t\t") && line != "\t}" {
            current = String::new();
        }
        current.push_str(line.trim_end());
        current.push('\n');
        if line == "\t}" {
            blocks.push(std::mem::take(&mut current));
        }
    }
    blocks.sort();
    blocks
}

fn interval(elems: &[(&str, &str)]) -> Set {
    let v = if elems.first().is_some_and(|(x, _)| x.contains(':')) { IpVersion::V6 } else { IpVersion::V4 };
    let mut s = Set::new(KeyType::Addr(v), SetKind::Interval);
    for (x, y) in elems {
        s.insert(Elem::Range(a(x), a(y)));
    }
    s
}

fn vmap(v: IpVersion, elems: &[(&str, Verdict)]) -> Set {
    let mut s = Set::new(KeyType::Addr(v), SetKind::VerdictMap);
    for (x, verdict) in elems {
        s.insert_verdict(Elem::Addr(a(x)), verdict.clone());
    }
    s
}

/// Every construct of the vocabulary once.
fn sample() -> Ruleset {
    let mut r = Ruleset::default();
    r.sets.insert(
        "peers4".into(),
        interval(&[("10.0.0.1", "10.0.0.1"), ("10.1.0.0", "10.1.255.255"), ("10.2.0.5", "10.2.0.9")]),
    );
    r.sets.insert("peers6".into(), interval(&[("fd00::1", "fd00::1")]));
    let mut named = Set::new(KeyType::AddrProtoPort(IpVersion::V4), SetKind::Plain);
    named.insert(Elem::AddrProtoPort(a("10.0.0.1"), IPPROTO_TCP, 80));
    r.sets.insert("named4".into(), named);
    r.sets.insert(
        "in4".into(),
        vmap(IpVersion::V4, &[("10.0.0.1", Verdict::Goto("g1".into())), ("10.0.0.2", Verdict::Return)]),
    );
    r.sets.insert("in6".into(), vmap(IpVersion::V6, &[]));
    let mut pending = Set::new(KeyType::Group, SetKind::VerdictMap);
    pending.insert_verdict(Elem::Group(0x8000_0001), Verdict::Drop);
    r.sets.insert("pending".into(), pending);
    r.chains.insert(
        "g1".into(),
        Chain {
            base: None,
            rules: vec![
                Rule::new(
                    vec![
                        Match::AddrInSet(AddrField::Source, IpVersion::V4, "peers4".into()),
                        Match::L4Proto(IPPROTO_TCP),
                        Match::DportRange(80, 90),
                    ],
                    Verdict::Return,
                ),
                Rule::new(vec![Match::DaddrProtoPortInSet(IpVersion::V4, "named4".into())], Verdict::Return),
                Rule::new(
                    vec![
                        Match::AddrInSet(AddrField::Source, IpVersion::V6, "peers6".into()),
                        Match::L4Proto(IPPROTO_UDP),
                        Match::DportRange(53, 53),
                    ],
                    Verdict::Return,
                ),
                Rule::new(vec![], Verdict::Drop).counted().with_comment("isolated"),
            ],
        },
    );
    r.chains.insert(
        "ingress".into(),
        Chain {
            base: None,
            rules: vec![
                Rule {
                    matches: vec![],
                    counter: false,
                    action: Action::AddrVmap(AddrField::Destination, IpVersion::V4, "in4".into()),
                    comment: None,
                },
                Rule {
                    matches: vec![],
                    counter: false,
                    action: Action::AddrVmap(AddrField::Destination, IpVersion::V6, "in6".into()),
                    comment: None,
                },
                Rule {
                    matches: vec![],
                    counter: false,
                    action: Action::GroupVmap(Iface::Output, "pending".into()),
                    comment: None,
                },
            ],
        },
    );
    r.chains.insert(
        "forward".into(),
        Chain {
            base: Some(BaseHook { hook: Hook::Forward, priority: -5 }),
            rules: vec![
                Rule::new(vec![Match::CtState(CT_ESTABLISHED | CT_RELATED)], Verdict::Accept),
                Rule::new(vec![Match::Icmpv6TypeRange(133, 137)], Verdict::Accept),
                Rule::new(vec![Match::AddrIn(AddrField::Source, "fe80::/10".parse().unwrap())], Verdict::Accept),
                Rule::new(vec![Match::IfnamePrefix(Iface::Output, "hc".into())], Verdict::Jump("ingress".into())),
            ],
        },
    );
    r.validate().unwrap();
    r
}

#[test]
fn every_construct_reads_back_as_nft_writes_it() {
    require_root!();
    if !nft_installed() {
        eprintln!("skipped: no nft tool to read the table back");
        return;
    }
    let node = Netns::new("rs");
    let mut nft = nft(&node);
    let r = sample();
    nft.commit(TABLE, &r.replace_all()).unwrap();
    let text = list(&node);
    for needle in [
        "set peers4 {",
        "type ipv4_addr",
        "flags interval",
        "10.0.0.1, 10.1.0.0/16,",
        "10.2.0.5-10.2.0.9",
        "type ipv4_addr . inet_proto . inet_service",
        "10.0.0.1 . tcp . 80",
        "type ipv4_addr : verdict",
        "10.0.0.1 : goto g1, 10.0.0.2 : return",
        "type devgroup : verdict",
        "2147483649 : drop",
        "ip saddr @peers4 tcp dport 80-90 return",
        "ip daddr . meta l4proto . th dport @named4 return",
        "ip6 saddr @peers6 udp dport 53 return",
        "counter packets 0 bytes 0 drop comment \"isolated\"",
        "ip daddr vmap @in4",
        "ip6 daddr vmap @in6",
        "oifgroup vmap @pending",
        "type filter hook forward priority filter - 5; policy accept;",
        "ct state established,related accept",
        "icmpv6 type 133-137 accept",
        "ip6 saddr fe80::/10 accept",
        "oifname \"hc*\" jump ingress",
    ] {
        assert!(text.contains(needle), "nft list lacks {needle:?}:\n{text}");
    }
    let listing = nft.list_table(TABLE).unwrap();
    assert!(listing.matches(&r), "{listing:?}");
    assert_eq!(listing.set("peers4").unwrap().elements, 3);
    assert_eq!(listing.chain("g1").unwrap().rules[3].packets, Some(0));
    assert_eq!(listing.chain("g1").unwrap().rules[3].comment.as_deref(), Some("isolated"));
    // Replacing it again, whatever it holds, works and gives the same.
    nft.commit(TABLE, &r.replace_all()).unwrap();
    assert_eq!(list(&node), text);
    // An empty rule set replaces it by an empty table.
    nft.commit(TABLE, &Ruleset::default().replace_all()).unwrap();
    assert!(nft.list_table(TABLE).unwrap().chains.is_empty());
}

#[test]
fn incremental_batches_reach_the_same_state_as_a_replacement() {
    require_root!();
    if !nft_installed() {
        eprintln!("skipped: no nft tool to read the table back");
        return;
    }
    let node = Netns::new("rsi");
    let mut nft = nft(&node);
    let mut applied = sample();
    nft.commit(TABLE, &applied.replace_all()).unwrap();

    // A sequence of edits, each applied as a diff, then compared with a fresh table built by
    // replacement in a second namespace.
    let fresh = Netns::new("rsf");
    let mut nft_fresh = self::nft(&fresh);
    type Edit = Box<dyn Fn(&mut Ruleset)>;
    let edits: Vec<Edit> = vec![
        // Ranges that touch and merge, split, shrink, grow, and reach the last address.
        Box::new(|r| {
            *r.sets.get_mut("peers4").unwrap() = interval(&[("10.0.0.1", "10.0.0.2"), ("10.1.0.0", "10.1.255.255")])
        }),
        Box::new(|r| {
            *r.sets.get_mut("peers4").unwrap() =
                interval(&[("10.0.0.1", "10.0.0.1"), ("10.0.0.3", "10.0.0.3"), ("10.1.0.0", "10.1.0.255")])
        }),
        Box::new(|r| {
            *r.sets.get_mut("peers4").unwrap() =
                interval(&[("0.0.0.0", "9.255.255.255"), ("11.0.0.0", "255.255.255.255")])
        }),
        Box::new(|r| {
            *r.sets.get_mut("peers6").unwrap() = interval(&[
                ("::", "fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
                ("fe00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ])
        }),
        // A map element changes its verdict, another goes, a new chain is named.
        Box::new(|r| {
            let g = r.chains["g1"].clone();
            r.chains.insert("g2".into(), Chain { base: None, rules: vec![Rule::new(vec![], Verdict::Return)] });
            r.chains.insert("g1".into(), g);
            *r.sets.get_mut("in4").unwrap() = vmap(
                IpVersion::V4,
                &[("10.0.0.1", Verdict::Goto("g2".into())), ("10.0.0.3", Verdict::Goto("g1".into()))],
            );
        }),
        // The old group chain goes once nothing names it; its set goes with it.
        Box::new(|r| {
            r.chains.remove("g1");
            r.sets.remove("named4");
            r.sets.remove("peers6");
            *r.sets.get_mut("in4").unwrap() = vmap(IpVersion::V4, &[("10.0.0.1", Verdict::Goto("g2".into()))]);
        }),
        // A base chain's rules change.
        Box::new(|r| r.chains.get_mut("forward").unwrap().rules.truncate(1)),
        // Everything goes.
        Box::new(|r| *r = Ruleset::default()),
    ];
    for (i, edit) in edits.iter().enumerate() {
        let mut next = applied.clone();
        edit(&mut next);
        next.validate().unwrap();
        let changes = next.changes_from(&applied);
        nft.commit(TABLE, &changes).unwrap_or_else(|e| panic!("edit {i}: {e}\n{changes:#?}"));
        nft_fresh.commit(TABLE, &next.replace_all()).unwrap();
        assert_eq!(
            normalized(&list(&node)),
            normalized(&list(&fresh)),
            "edit {i}: the diff and the replacement differ"
        );
        assert!(nft.list_table(TABLE).unwrap().matches(&next), "edit {i}");
        applied = next;
    }
}

#[test]
fn a_failing_batch_changes_nothing() {
    require_root!();
    let node = Netns::new("rsx");
    let mut nft = nft(&node);
    let r = sample();
    nft.commit(TABLE, &r.replace_all()).unwrap();
    let before = nft.list_table(TABLE).unwrap();
    // The second change refers to a set that does not exist: the kernel refuses it, and the
    // first change (a new chain) must not be there either.
    let bad = vec![
        Change::AddChain("extra".into(), None),
        Change::AddRule(
            "extra".into(),
            Rule::new(vec![Match::AddrInSet(AddrField::Source, IpVersion::V4, "missing".into())], Verdict::Drop),
        ),
    ];
    let err = nft.commit(TABLE, &bad).unwrap_err().to_string();
    assert!(err.contains("adding a rule to chain extra"), "{err}");
    assert_eq!(nft.list_table(TABLE).unwrap(), before);
}

#[test]
fn thousands_of_elements_go_in_one_batch() {
    require_root!();
    let node = Netns::new("rsb");
    let mut nft = nft(&node);
    let mut r = Ruleset::default();
    let mut s = Set::new(KeyType::Addr(IpVersion::V6), SetKind::Interval);
    for i in 0..20_000u128 {
        let x = IpAddr::V6(std::net::Ipv6Addr::from(0xfd00_u128 << 112 | (i * 4)));
        s.insert(Elem::Range(x, x));
    }
    r.sets.insert("big".into(), s);
    r.validate().unwrap();
    nft.commit(TABLE, &r.replace_all()).unwrap();
    assert_eq!(nft.list_table(TABLE).unwrap().set("big").unwrap().elements, 20_000);
}
