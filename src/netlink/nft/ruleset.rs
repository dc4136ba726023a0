//! Whole rule sets of one `inet` table described as data: named sets (plain, interval, and
//! verdict maps, with concatenated keys), chains of rules built from a small vocabulary of
//! matches, their differences turned into one atomic batch, and the table read back.
//!
//! The vocabulary (as `nft` prints each item):
//!
//! | [`Match`] | nft |
//! |---|---|
//! | `CtState` | `ct state established,related` |
//! | `IfnamePrefix` | `iifname "hc*"` |
//! | `L4Proto` | `meta l4proto tcp` |
//! | `AddrIn` | `ip6 saddr fe80::/10` |
//! | `AddrInSet` | `ip saddr @set` |
//! | `DportRange` | `th dport 80-90` |
//! | `DaddrProtoPortInSet` | `ip daddr . meta l4proto . th dport @set` |
//! | `SaddrDaddrInSet` | `ip saddr . ip daddr @set` |
//! | `Icmpv6TypeRange` | `icmpv6 type 133-137` |
//!
//! and a rule ends in a verdict (`accept`, `drop`, `return`, `jump`, `goto`) or in a verdict
//! map lookup (`ip saddr vmap @map`, `oifgroup vmap @map`). Address matches carry the family
//! check nft adds by itself (`meta nfproto ipv4`): in an `inet` table an IPv6 packet must never
//! be read as an IPv4 header.
//!
//! [`Ruleset::changes_from`] turns the difference between what was applied and what is wanted
//! into [`Change`]s in an order the kernel accepts within one transaction (sets before the
//! rules that use them, chains before the map elements that jump to them, references gone
//! before what they referred to); [`Nft::commit`](super::Nft::commit) sends them as one batch,
//! which the kernel applies atomically: a packet sees the old rule set or the new one, never a
//! mix. [`Ruleset::replace_all`] is the same for a table whose contents are unknown (created,
//! deleted and created again in the batch).

use super::{
    Buf, NF_ACCEPT, NF_DROP, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFT_CMP_EQ, NFT_META_IIFNAME, NFT_MSG_DELTABLE,
    NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWTABLE, NFT_PAYLOAD_NETWORK_HEADER,
    NFT_REG_1, NFT_REG_VERDICT, NFTA_BITWISE_DREG, NFTA_BITWISE_LEN, NFTA_BITWISE_MASK, NFTA_BITWISE_SREG,
    NFTA_BITWISE_XOR, NFTA_CHAIN_HOOK, NFTA_CHAIN_NAME, NFTA_CHAIN_POLICY, NFTA_CHAIN_TABLE, NFTA_CHAIN_TYPE,
    NFTA_CMP_DATA, NFTA_CMP_OP, NFTA_CMP_SREG, NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_EXPR_DATA, NFTA_EXPR_NAME,
    NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY, NFTA_IMMEDIATE_DATA, NFTA_IMMEDIATE_DREG, NFTA_LIST_ELEM, NFTA_META_DREG,
    NFTA_META_KEY, NFTA_PAYLOAD_BASE, NFTA_PAYLOAD_DREG, NFTA_PAYLOAD_LEN, NFTA_PAYLOAD_OFFSET, NFTA_RULE_CHAIN,
    NFTA_RULE_EXPRESSIONS, NFTA_RULE_TABLE, NFTA_RULE_USERDATA, NFTA_TABLE_FLAGS, NFTA_TABLE_NAME, NFTA_VERDICT_CODE,
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, Nft,
    NftError, attr_str, attributes, batch, comment, error_code, expr, message, nested, nft_type, parse_messages,
};
use ipnetwork::IpNetwork;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

type Result<T> = std::result::Result<T, NftError>;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
/// The data type of a verdict map's values.
const NFT_DATA_VERDICT_TYPE: u32 = 0xffff_ff00;
/// libnftnl's set user data: the key's byte order (what `nft list` prints keys with).
const NFTNL_UDATA_SET_KEYBYTEORDER: u8 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;

const NFTA_VERDICT_CHAIN: u16 = 2;

const NFT_META_OIFNAME: u32 = 7;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_META_IIFGROUP: u32 = 21;
const NFT_META_OIFGROUP: u32 = 22;

const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_STATE: u32 = 0;

const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;

const NFT_CMP_NEQ: u32 = 1;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;

const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;

const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// The 32-bit registers a concatenation is loaded into (register 1 is 00..03).
const NFT_REG32_00: u32 = 8;

const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_FORWARD: u32 = 2;

// nft's data type numbers (what `nft list` shows keys as).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_DEVGROUP: u32 = 35;
const TYPE_BITS: u32 = 6;

const ENOENT: i32 = 2;

/// A set's elements go into messages of at most this size (a nested netlink attribute's
/// length is 16 bits).
const MAX_ELEMENTS_BYTES: usize = 48 * 1024;

/// Connection tracking states (bits of `ct state`).
pub const CT_ESTABLISHED: u32 = 1 << 1;
pub const CT_RELATED: u32 = 1 << 2;
pub const CT_NEW: u32 = 1 << 3;

/// IP protocol numbers the policy vocabulary names.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;

/// The IP version of an address match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpVersion {
    V4,
    V6,
}

impl IpVersion {
    pub fn of(addr: &IpAddr) -> Self {
        if addr.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    fn nfproto(self) -> u8 {
        match self {
            Self::V4 => NFPROTO_IPV4,
            Self::V6 => NFPROTO_IPV6,
        }
    }

    fn addr_len(self) -> u32 {
        match self {
            Self::V4 => 4,
            Self::V6 => 16,
        }
    }

    /// Offset of the source (or destination) address in the network header.
    fn addr_offset(self, field: AddrField) -> u32 {
        match (self, field) {
            (Self::V4, AddrField::Source) => 12,
            (Self::V4, AddrField::Destination) => 16,
            (Self::V6, AddrField::Source) => 8,
            (Self::V6, AddrField::Destination) => 24,
        }
    }

    fn nft_name(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }
}

/// Which address of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrField {
    Source,
    Destination,
}

/// Which interface of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Iface {
    Input,
    Output,
}

/// A verdict: of a rule, or the value of a verdict map's element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl Verdict {
    /// The chain this verdict continues in, if any.
    pub fn chain(&self) -> Option<&str> {
        match self {
            Self::Jump(c) | Self::Goto(c) => Some(c),
            _ => None,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Accept => f.write_str("accept"),
            Self::Drop => f.write_str("drop"),
            Self::Return => f.write_str("return"),
            Self::Jump(c) => write!(f, "jump {c}"),
            Self::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

/// One condition of a rule; a rule matches when all of its conditions do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Match {
    /// `ct state` has one of these bits ([`CT_ESTABLISHED`], ...).
    CtState(u32),
    /// The interface's name starts with the prefix (`iifname "hc*"`).
    IfnamePrefix(Iface, String),
    /// `meta l4proto P`.
    L4Proto(u8),
    /// The address lies in the network (and the packet is of its family).
    AddrIn(AddrField, IpNetwork),
    /// The address is in the named set (and the packet is of the family).
    AddrInSet(AddrField, IpVersion, String),
    /// The transport header's destination port lies in `lo..=hi` (follow an `L4Proto`).
    DportRange(u16, u16),
    /// `ip daddr . meta l4proto . th dport` is in the named set.
    DaddrProtoPortInSet(IpVersion, String),
    /// The pair (source, destination) is in the set (of [`KeyType::AddrPair`]).
    SaddrDaddrInSet(IpVersion, String),
    /// An ICMPv6 message whose type lies in `lo..=hi`.
    Icmpv6TypeRange(u8, u8),
}

/// What a rule does when it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Verdict(Verdict),
    /// The verdict stored for the packet's address in a verdict map (no element: the rule
    /// does not match).
    AddrVmap(AddrField, IpVersion, String),
    /// The verdict stored for the interface's group (`iifgroup vmap @map`).
    GroupVmap(Iface, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    /// Count the packets and bytes the rule acts on (read back by [`Nft::list_table`]).
    pub counter: bool,
    pub action: Action,
    /// Stored with the rule (what `nft list` shows as its comment).
    pub comment: Option<String>,
}

impl Rule {
    pub fn new(matches: Vec<Match>, verdict: Verdict) -> Self {
        Self { matches, counter: false, action: Action::Verdict(verdict), comment: None }
    }

    pub fn counted(mut self) -> Self {
        self.counter = true;
        self
    }

    pub fn with_comment(mut self, text: impl Into<String>) -> Self {
        self.comment = Some(text.into());
        self
    }

    /// The sets (and maps) the rule reads.
    pub fn sets(&self) -> impl Iterator<Item = &str> {
        let from_matches = self.matches.iter().filter_map(|m| match m {
            Match::AddrInSet(_, _, s) | Match::DaddrProtoPortInSet(_, s) | Match::SaddrDaddrInSet(_, s) => {
                Some(s.as_str())
            }
            _ => None,
        });
        let from_action = match &self.action {
            Action::AddrVmap(_, _, m) | Action::GroupVmap(_, m) => Some(m.as_str()),
            Action::Verdict(_) => None,
        };
        from_matches.chain(from_action)
    }

    /// The chain the rule's own verdict continues in.
    pub fn target(&self) -> Option<&str> {
        match &self.action {
            Action::Verdict(v) => v.chain(),
            _ => None,
        }
    }
}

/// The netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Input,
    Forward,
}

impl Hook {
    fn number(self) -> u32 {
        match self {
            Self::Input => NF_INET_LOCAL_IN,
            Self::Forward => NF_INET_FORWARD,
        }
    }

    fn from_number(n: u32) -> Option<Self> {
        match n {
            NF_INET_LOCAL_IN => Some(Self::Input),
            NF_INET_FORWARD => Some(Self::Forward),
            _ => None,
        }
    }
}

/// A base chain's hook: a `filter` chain with policy accept at `priority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseHook {
    pub hook: Hook,
    pub priority: i32,
}

/// A chain and its rules, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<BaseHook>,
    pub rules: Vec<Rule>,
}

/// The key of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// An address of one family.
    Addr(IpVersion),
    /// An interface group (`iifgroup`, `oifgroup`).
    Group,
    /// `ip daddr . meta l4proto . th dport`.
    AddrProtoPort(IpVersion),
    /// `ip saddr . ip daddr`.
    AddrPair(IpVersion),
}

impl KeyType {
    fn len(self) -> u32 {
        match self {
            Self::Addr(v) => v.addr_len(),
            Self::Group => 4,
            Self::AddrProtoPort(v) => v.addr_len() + 8,
            Self::AddrPair(v) => 2 * v.addr_len(),
        }
    }

    fn nft_type(self) -> u32 {
        let addr = |v: IpVersion| if v == IpVersion::V4 { TYPE_IPADDR } else { TYPE_IP6ADDR };
        match self {
            Self::Addr(v) => addr(v),
            Self::Group => TYPE_DEVGROUP,
            Self::AddrProtoPort(v) => (((addr(v) << TYPE_BITS) | TYPE_INET_PROTOCOL) << TYPE_BITS) | TYPE_INET_SERVICE,
            Self::AddrPair(v) => (addr(v) << TYPE_BITS) | addr(v),
        }
    }

    fn byteorder(self) -> u32 {
        if self == Self::Group { BYTEORDER_HOST } else { BYTEORDER_BIG_ENDIAN }
    }
}

/// What kind of set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetKind {
    /// Exact keys.
    Plain,
    /// Address ranges (`flags interval`).
    Interval,
    /// Keys with a verdict each (`map ... : verdict`).
    VerdictMap,
}

/// A set's definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SetType {
    pub key: KeyType,
    pub kind: SetKind,
}

/// One element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Elem {
    Addr(IpAddr),
    /// All addresses from the first to the second, inclusive (interval sets only).
    Range(IpAddr, IpAddr),
    Group(u32),
    /// (address, IP protocol, port).
    AddrProtoPort(IpAddr, u8, u16),
    /// (source, destination).
    AddrPair(IpAddr, IpAddr),
}

/// A set and its elements (with a verdict each in a verdict map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetType,
    pub elements: BTreeMap<Elem, Option<Verdict>>,
}

impl Set {
    pub fn new(key: KeyType, kind: SetKind) -> Self {
        Self { kind: SetType { key, kind }, elements: BTreeMap::new() }
    }

    pub fn insert(&mut self, elem: Elem) {
        self.elements.insert(elem, None);
    }

    pub fn insert_verdict(&mut self, elem: Elem, verdict: Verdict) {
        self.elements.insert(elem, Some(verdict));
    }
}

/// What one table should hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
}

/// One step of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Creates the table (valid whether or not it exists).
    AddTable,
    /// Deletes the table; must follow an `AddTable` in the batch (then it is valid whether or
    /// not the table existed before).
    DeleteTable,
    AddSet(String, SetType),
    DeleteSet(String),
    AddElements(String, SetType, Vec<(Elem, Option<Verdict>)>),
    DeleteElements(String, SetType, Vec<Elem>),
    AddChain(String, Option<BaseHook>),
    /// Deletes every rule of the chain.
    FlushChain(String),
    DeleteChain(String),
    /// Appends a rule.
    AddRule(String, Rule),
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    // Up to 31 bytes: what every kernel accepts (newer ones take 255).
    let ok = !name.is_empty()
        && name.len() <= 31
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok { Ok(()) } else { Err(NftError::Invalid(format!("bad {kind} name {name:?}"))) }
}

fn elem_fits(key: KeyType, kind: SetKind, elem: &Elem) -> bool {
    let version = |a: &IpAddr| IpVersion::of(a);
    match (key, elem) {
        (KeyType::Addr(v), Elem::Addr(a)) => kind != SetKind::Interval && version(a) == v,
        (KeyType::Addr(v), Elem::Range(a, b)) => {
            kind == SetKind::Interval && version(a) == v && version(b) == v && a <= b
        }
        (KeyType::Group, Elem::Group(_)) => kind != SetKind::Interval,
        (KeyType::AddrProtoPort(v), Elem::AddrProtoPort(a, _, _)) => kind != SetKind::Interval && version(a) == v,
        (KeyType::AddrPair(v), Elem::AddrPair(a, b)) => kind != SetKind::Interval && version(a) == v && version(b) == v,
        _ => false,
    }
}

impl Ruleset {
    /// Refuses what the kernel would refuse, before anything is sent: bad names, elements
    /// that do not fit their set, overlapping ranges, verdicts where none belong, references
    /// to sets or chains that are not there.
    pub fn validate(&self) -> Result<()> {
        for (name, set) in &self.sets {
            check_name("set", name)?;
            if set.kind.kind == SetKind::Interval && !matches!(set.kind.key, KeyType::Addr(_)) {
                return Err(NftError::Invalid(format!("set {name}: only address sets hold ranges")));
            }
            let mut last_end: Option<IpAddr> = None;
            for (elem, verdict) in &set.elements {
                if !elem_fits(set.kind.key, set.kind.kind, elem) {
                    return Err(NftError::Invalid(format!("set {name}: element {elem:?} does not fit")));
                }
                if verdict.is_some() != (set.kind.kind == SetKind::VerdictMap) {
                    return Err(NftError::Invalid(format!("set {name}: element {elem:?} and its verdict")));
                }
                if let Some(v) = verdict.as_ref().and_then(Verdict::chain)
                    && !self.chains.contains_key(v)
                {
                    return Err(NftError::Invalid(format!("set {name}: no chain {v}")));
                }
                if let Elem::Range(a, b) = elem {
                    // BTreeMap order is by start: each range must begin after the last one ends.
                    if last_end.is_some_and(|e| *a <= e) {
                        return Err(NftError::Invalid(format!("set {name}: range {a}-{b} overlaps another")));
                    }
                    last_end = Some(*b);
                }
            }
        }
        for (name, chain) in &self.chains {
            check_name("chain", name)?;
            for rule in &chain.rules {
                for set in rule.sets() {
                    let Some(s) = self.sets.get(set) else {
                        return Err(NftError::Invalid(format!("chain {name}: no set {set}")));
                    };
                    let is_map = s.kind.kind == SetKind::VerdictMap;
                    let used_as_map =
                        matches!(&rule.action, Action::AddrVmap(_, _, m) | Action::GroupVmap(_, m) if m == set);
                    if is_map != used_as_map {
                        return Err(NftError::Invalid(format!("chain {name}: set {set} used as the wrong kind")));
                    }
                }
                if let Some(target) = rule.target()
                    && !self.chains.contains_key(target)
                {
                    return Err(NftError::Invalid(format!("chain {name}: no chain {target}")));
                }
                if let Some(Match::DportRange(lo, hi)) =
                    rule.matches.iter().find(|m| matches!(m, Match::DportRange(..)))
                    && lo > hi
                {
                    return Err(NftError::Invalid(format!("chain {name}: port range {lo}-{hi}")));
                }
            }
        }
        Ok(())
    }

    /// The batch that makes the table exactly this rule set, whatever it held before (or
    /// whether it existed): the table is created, deleted and created again, then filled.
    pub fn replace_all(&self) -> Vec<Change> {
        let mut out = vec![Change::AddTable, Change::DeleteTable, Change::AddTable];
        out.extend(self.changes_from(&Ruleset::default()));
        out
    }

    /// The batch that turns `applied` (what the table holds now) into this rule set. A set
    /// whose type changed, or a base chain whose hook did, cannot be changed in place: then
    /// the whole table is replaced (still one atomic batch).
    pub fn changes_from(&self, applied: &Ruleset) -> Vec<Change> {
        let retyped = self.sets.iter().any(|(n, s)| applied.sets.get(n).is_some_and(|o| o.kind != s.kind));
        let rehooked = self.chains.iter().any(|(n, c)| applied.chains.get(n).is_some_and(|o| o.base != c.base));
        if retyped || rehooked {
            return self.replace_all();
        }
        let mut out = Vec::new();
        // 1. New sets.
        for (name, set) in &self.sets {
            if !applied.sets.contains_key(name) {
                out.push(Change::AddSet(name.clone(), set.kind));
            }
        }
        // 2. New chains (all of them first: rules may jump between new chains); chains whose
        //    rules changed are flushed. Then the elements of the new sets (before the map
        //    elements that name new chains, which must exist by then), then the rules.
        let mut refill = Vec::new();
        for (name, chain) in &self.chains {
            match applied.chains.get(name) {
                None => {
                    out.push(Change::AddChain(name.clone(), chain.base));
                    refill.push(name);
                }
                Some(old) if old.rules != chain.rules => {
                    out.push(Change::FlushChain(name.clone()));
                    refill.push(name);
                }
                Some(_) => {}
            }
        }
        for (name, set) in &self.sets {
            if !applied.sets.contains_key(name) {
                push_elements_add(&mut out, name, set.kind, set.elements.iter());
            }
        }
        for name in refill {
            for rule in &self.chains[name].rules {
                out.push(Change::AddRule(name.clone(), rule.clone()));
            }
        }
        // 3. Elements of sets that stay: removed ones first (a changed verdict is a removal
        //    and an addition), then added ones.
        for (name, set) in &self.sets {
            let Some(old) = applied.sets.get(name) else { continue };
            let removed: Vec<Elem> =
                old.elements.iter().filter(|(e, v)| set.elements.get(*e) != Some(*v)).map(|(e, _)| e.clone()).collect();
            if !removed.is_empty() {
                out.push(Change::DeleteElements(name.clone(), set.kind, removed));
            }
            let added = set.elements.iter().filter(|(e, v)| old.elements.get(*e) != Some(*v));
            push_elements_add(&mut out, name, set.kind, added);
        }
        // 4. What goes: the rules of chains that go (so that no rule reads a set that goes),
        //    then the sets (a map that goes takes its jumps to chains with it), then the chains.
        for name in applied.chains.keys() {
            if !self.chains.contains_key(name) {
                out.push(Change::FlushChain(name.clone()));
            }
        }
        for name in applied.sets.keys() {
            if !self.sets.contains_key(name) {
                out.push(Change::DeleteSet(name.clone()));
            }
        }
        for name in applied.chains.keys() {
            if !self.chains.contains_key(name) {
                out.push(Change::DeleteChain(name.clone()));
            }
        }
        out
    }
}

fn push_elements_add<'a>(
    out: &mut Vec<Change>,
    name: &str,
    kind: SetType,
    elems: impl Iterator<Item = (&'a Elem, &'a Option<Verdict>)>,
) {
    let list: Vec<(Elem, Option<Verdict>)> = elems.map(|(e, v)| (e.clone(), v.clone())).collect();
    if !list.is_empty() {
        out.push(Change::AddElements(name.to_string(), kind, list));
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

fn addr_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The address after `a` (`None` after the last one).
fn next_addr(a: &IpAddr) -> Option<IpAddr> {
    match a {
        IpAddr::V4(a) => u32::from(*a).checked_add(1).map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        IpAddr::V6(a) => u128::from(*a).checked_add(1).map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    }
}

fn data_value(b: &mut Buf, kind: u16, value: &[u8]) {
    b.nest(kind, |b| b.attr(NFTA_DATA_VALUE, value));
}

fn verdict_data(b: &mut Buf, v: &Verdict) {
    b.nest(NFTA_DATA_VERDICT, |b| {
        let code = match v {
            Verdict::Accept => NF_ACCEPT,
            Verdict::Drop => NF_DROP,
            Verdict::Return => NFT_RETURN as u32,
            Verdict::Jump(_) => NFT_JUMP as u32,
            Verdict::Goto(_) => NFT_GOTO as u32,
        };
        b.be32(NFTA_VERDICT_CODE, code);
        if let Some(chain) = v.chain() {
            b.str(NFTA_VERDICT_CHAIN, chain);
        }
    });
}

fn meta_load(b: &mut Buf, key: u32, dreg: u32) {
    expr(b, "meta", |b| {
        b.be32(NFTA_META_KEY, key);
        b.be32(NFTA_META_DREG, dreg);
    });
}

fn payload_load(b: &mut Buf, base: u32, offset: u32, len: u32, dreg: u32) {
    expr(b, "payload", |b| {
        b.be32(NFTA_PAYLOAD_DREG, dreg);
        b.be32(NFTA_PAYLOAD_BASE, base);
        b.be32(NFTA_PAYLOAD_OFFSET, offset);
        b.be32(NFTA_PAYLOAD_LEN, len);
    });
}

fn cmp(b: &mut Buf, op: u32, value: &[u8]) {
    expr(b, "cmp", |b| {
        b.be32(NFTA_CMP_SREG, NFT_REG_1);
        b.be32(NFTA_CMP_OP, op);
        data_value(b, NFTA_CMP_DATA, value);
    });
}

fn lookup(b: &mut Buf, set: &str, verdict: bool) {
    expr(b, "lookup", |b| {
        b.str(NFTA_LOOKUP_SET, set);
        b.be32(NFTA_LOOKUP_SREG, NFT_REG_1);
        if verdict {
            b.be32(NFTA_LOOKUP_DREG, NFT_REG_VERDICT);
        }
    });
}

fn nfproto(b: &mut Buf, v: IpVersion) {
    meta_load(b, NFT_META_NFPROTO, NFT_REG_1);
    cmp(b, NFT_CMP_EQ, &[v.nfproto()]);
}

fn encode_match(b: &mut Buf, m: &Match) {
    match m {
        Match::CtState(bits) => {
            expr(b, "ct", |b| {
                b.be32(NFTA_CT_KEY, NFT_CT_STATE);
                b.be32(NFTA_CT_DREG, NFT_REG_1);
            });
            expr(b, "bitwise", |b| {
                b.be32(NFTA_BITWISE_SREG, NFT_REG_1);
                b.be32(NFTA_BITWISE_DREG, NFT_REG_1);
                b.be32(NFTA_BITWISE_LEN, 4);
                data_value(b, NFTA_BITWISE_MASK, &bits.to_ne_bytes());
                data_value(b, NFTA_BITWISE_XOR, &[0; 4]);
            });
            cmp(b, NFT_CMP_NEQ, &[0; 4]);
        }
        Match::IfnamePrefix(iface, prefix) => {
            let key = if *iface == Iface::Input { NFT_META_IIFNAME } else { NFT_META_OIFNAME };
            meta_load(b, key, NFT_REG_1);
            cmp(b, NFT_CMP_EQ, prefix.as_bytes());
        }
        Match::L4Proto(p) => {
            meta_load(b, NFT_META_L4PROTO, NFT_REG_1);
            cmp(b, NFT_CMP_EQ, &[*p]);
        }
        Match::AddrIn(field, net) => {
            let v = IpVersion::of(&net.ip());
            nfproto(b, v);
            if net.prefix() == 0 {
                return;
            }
            payload_load(b, NFT_PAYLOAD_NETWORK_HEADER, v.addr_offset(*field), v.addr_len(), NFT_REG_1);
            if u32::from(net.prefix()) < v.addr_len() * 8 {
                let mask = addr_bytes(&net.mask());
                expr(b, "bitwise", |b| {
                    b.be32(NFTA_BITWISE_SREG, NFT_REG_1);
                    b.be32(NFTA_BITWISE_DREG, NFT_REG_1);
                    b.be32(NFTA_BITWISE_LEN, v.addr_len());
                    data_value(b, NFTA_BITWISE_MASK, &mask);
                    data_value(b, NFTA_BITWISE_XOR, &vec![0; mask.len()]);
                });
            }
            cmp(b, NFT_CMP_EQ, &addr_bytes(&net.network()));
        }
        Match::AddrInSet(field, v, set) => {
            nfproto(b, *v);
            payload_load(b, NFT_PAYLOAD_NETWORK_HEADER, v.addr_offset(*field), v.addr_len(), NFT_REG_1);
            lookup(b, set, false);
        }
        Match::DportRange(lo, hi) => {
            payload_load(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG_1);
            if lo == hi {
                cmp(b, NFT_CMP_EQ, &be16(*lo));
            } else {
                cmp(b, NFT_CMP_GTE, &be16(*lo));
                cmp(b, NFT_CMP_LTE, &be16(*hi));
            }
        }
        Match::DaddrProtoPortInSet(v, set) => {
            // The concatenation fills consecutive 32-bit registers: the address, then the
            // protocol and the port, each padded to 4 bytes.
            let words = v.addr_len() / 4;
            nfproto(b, *v);
            payload_load(b, NFT_PAYLOAD_NETWORK_HEADER, v.addr_offset(AddrField::Destination), v.addr_len(), NFT_REG_1);
            meta_load(b, NFT_META_L4PROTO, NFT_REG32_00 + words);
            payload_load(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_00 + words + 1);
            lookup(b, set, false);
        }
        Match::SaddrDaddrInSet(v, set) => {
            // Source and destination are adjacent in the header: one load fills both.
            nfproto(b, *v);
            payload_load(b, NFT_PAYLOAD_NETWORK_HEADER, v.addr_offset(AddrField::Source), 2 * v.addr_len(), NFT_REG_1);
            lookup(b, set, false);
        }
        Match::Icmpv6TypeRange(lo, hi) => {
            meta_load(b, NFT_META_L4PROTO, NFT_REG_1);
            cmp(b, NFT_CMP_EQ, &[IPPROTO_ICMPV6]);
            payload_load(b, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1);
            if lo == hi {
                cmp(b, NFT_CMP_EQ, &[*lo]);
            } else {
                cmp(b, NFT_CMP_GTE, &[*lo]);
                cmp(b, NFT_CMP_LTE, &[*hi]);
            }
        }
    }
}

fn encode_rule(b: &mut Buf, rule: &Rule) {
    for m in &rule.matches {
        encode_match(b, m);
    }
    let counter = |b: &mut Buf| {
        if rule.counter {
            expr(b, "counter", |_| {});
        }
    };
    match &rule.action {
        Action::Verdict(v) => {
            counter(b);
            expr(b, "immediate", |b| {
                b.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                b.nest(NFTA_IMMEDIATE_DATA, |b| verdict_data(b, v));
            });
        }
        Action::AddrVmap(field, v, map) => {
            nfproto(b, *v);
            payload_load(b, NFT_PAYLOAD_NETWORK_HEADER, v.addr_offset(*field), v.addr_len(), NFT_REG_1);
            counter(b);
            lookup(b, map, true);
        }
        Action::GroupVmap(iface, map) => {
            let key = if *iface == Iface::Input { NFT_META_IIFGROUP } else { NFT_META_OIFGROUP };
            meta_load(b, key, NFT_REG_1);
            counter(b);
            lookup(b, map, true);
        }
    }
}

/// The kernel's elements for one of ours: a range is its first address, and the address
/// after its last one flagged as the end (none when it runs to the last address).
fn kernel_elements(elem: &Elem) -> Vec<(Vec<u8>, bool)> {
    match elem {
        Elem::Addr(a) => vec![(addr_bytes(a), false)],
        Elem::Range(a, b) => {
            let mut out = vec![(addr_bytes(a), false)];
            if let Some(end) = next_addr(b) {
                out.push((addr_bytes(&end), true));
            }
            out
        }
        Elem::Group(g) => vec![(g.to_ne_bytes().to_vec(), false)],
        Elem::AddrProtoPort(a, proto, port) => {
            let mut key = addr_bytes(a);
            key.extend_from_slice(&[*proto, 0, 0, 0]);
            key.extend_from_slice(&be16(*port));
            key.extend_from_slice(&[0, 0]);
            vec![(key, false)]
        }
        Elem::AddrPair(a, b) => {
            let mut key = addr_bytes(a);
            key.extend_from_slice(&addr_bytes(b));
            vec![(key, false)]
        }
    }
}

fn encode_element(b: &mut Buf, key: &[u8], end: bool, verdict: Option<&Verdict>) {
    b.nest(NFTA_LIST_ELEM, |b| {
        data_value(b, NFTA_SET_ELEM_KEY, key);
        if end {
            b.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        }
        if let Some(v) = verdict {
            b.nest(NFTA_SET_ELEM_DATA, |b| verdict_data(b, v));
        }
    });
}

fn set_userdata(key: KeyType) -> Vec<u8> {
    let mut out = vec![NFTNL_UDATA_SET_KEYBYTEORDER, 4];
    out.extend_from_slice(&key.byteorder().to_ne_bytes());
    out
}

/// Element messages for one set, split so that each stays well below 64 KiB.
fn element_messages(
    out: &mut Vec<(Vec<u8>, String)>,
    next: &mut dyn FnMut() -> u32,
    table: &str,
    set: &str,
    kind: u16,
    list: &[(Vec<u8>, bool, Option<&Verdict>)],
) {
    let (flags, what) =
        if kind == NFT_MSG_NEWSETELEM { (NLM_F_REQUEST | NLM_F_CREATE, "adding") } else { (NLM_F_REQUEST, "removing") };
    let mut start = 0;
    while start < list.len() {
        let mut size = 0;
        let mut end = start;
        while end < list.len() && size < MAX_ELEMENTS_BYTES {
            size += list[end].0.len() + 64;
            end += 1;
        }
        let chunk = &list[start..end];
        out.push((
            message(nft_type(kind), flags, next(), NFPROTO_INET, 0, |b| {
                b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                b.str(NFTA_SET_ELEM_LIST_SET, set);
                b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                    for (key, is_end, verdict) in chunk {
                        encode_element(b, key, *is_end, *verdict);
                    }
                });
            }),
            format!("{what} {} elements of set {set}", chunk.len()),
        ));
        start = end;
    }
}

/// The nfnetlink messages of `changes` for `table` (without the batch delimiters), each with a
/// description for errors. Element lists are split into messages of bounded size.
fn encode_changes(table: &str, changes: &[Change], seq: &mut u32) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    let mut next = || {
        *seq = seq.wrapping_add(1);
        *seq
    };
    let create = NLM_F_REQUEST | NLM_F_CREATE;
    let plain = NLM_F_REQUEST;
    let fam = NFPROTO_INET;
    let mut set_ids = 0u32;
    for change in changes {
        match change {
            Change::AddTable => out.push((
                message(nft_type(NFT_MSG_NEWTABLE), create, next(), fam, 0, |b| {
                    b.str(NFTA_TABLE_NAME, table);
                    b.be32(NFTA_TABLE_FLAGS, 0);
                }),
                format!("adding table inet {table}"),
            )),
            Change::DeleteTable => out.push((
                message(nft_type(NFT_MSG_DELTABLE), plain, next(), fam, 0, |b| b.str(NFTA_TABLE_NAME, table)),
                format!("deleting table inet {table}"),
            )),
            Change::AddSet(name, kind) => {
                set_ids += 1;
                out.push((
                    message(nft_type(NFT_MSG_NEWSET), create, next(), fam, 0, |b| {
                        b.str(NFTA_SET_TABLE, table);
                        b.str(NFTA_SET_NAME, name);
                        let mut flags = 0;
                        if kind.kind == SetKind::Interval {
                            flags |= NFT_SET_INTERVAL;
                        }
                        if kind.kind == SetKind::VerdictMap {
                            flags |= NFT_SET_MAP;
                        }
                        b.be32(NFTA_SET_FLAGS, flags);
                        b.be32(NFTA_SET_KEY_TYPE, kind.key.nft_type());
                        b.be32(NFTA_SET_KEY_LEN, kind.key.len());
                        if kind.kind == SetKind::VerdictMap {
                            b.be32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT_TYPE);
                            b.be32(NFTA_SET_DATA_LEN, 0);
                        }
                        // Required by the kernel: what names the set within the batch.
                        b.be32(NFTA_SET_ID, set_ids);
                        b.attr(NFTA_SET_USERDATA, &set_userdata(kind.key));
                    }),
                    format!("adding set {name}"),
                ))
            }
            Change::DeleteSet(name) => out.push((
                message(nft_type(NFT_MSG_DELSET), plain, next(), fam, 0, |b| {
                    b.str(NFTA_SET_TABLE, table);
                    b.str(NFTA_SET_NAME, name);
                }),
                format!("deleting set {name}"),
            )),
            Change::AddElements(name, _, elems) => {
                let list: Vec<(Vec<u8>, bool, Option<&Verdict>)> = elems
                    .iter()
                    .flat_map(|(e, v)| kernel_elements(e).into_iter().map(move |(k, end)| (k, end, v.as_ref())))
                    .collect();
                element_messages(&mut out, &mut next, table, name, NFT_MSG_NEWSETELEM, &list);
            }
            Change::DeleteElements(name, _, elems) => {
                let list: Vec<(Vec<u8>, bool, Option<&Verdict>)> =
                    elems.iter().flat_map(kernel_elements).map(|(k, end)| (k, end, None)).collect();
                element_messages(&mut out, &mut next, table, name, NFT_MSG_DELSETELEM, &list);
            }
            Change::AddChain(name, base) => out.push((
                message(nft_type(NFT_MSG_NEWCHAIN), create, next(), fam, 0, |b| {
                    b.str(NFTA_CHAIN_TABLE, table);
                    b.str(NFTA_CHAIN_NAME, name);
                    if let Some(base) = base {
                        b.nest(NFTA_CHAIN_HOOK, |b| {
                            b.be32(NFTA_HOOK_HOOKNUM, base.hook.number());
                            b.be32(NFTA_HOOK_PRIORITY, base.priority as u32);
                        });
                        b.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                        b.str(NFTA_CHAIN_TYPE, "filter");
                    }
                }),
                format!("adding chain {name}"),
            )),
            Change::FlushChain(name) => out.push((
                message(nft_type(NFT_MSG_DELRULE), plain, next(), fam, 0, |b| {
                    b.str(NFTA_RULE_TABLE, table);
                    b.str(NFTA_RULE_CHAIN, name);
                }),
                format!("flushing chain {name}"),
            )),
            Change::DeleteChain(name) => out.push((
                message(nft_type(NFT_MSG_DELCHAIN), plain, next(), fam, 0, |b| {
                    b.str(NFTA_CHAIN_TABLE, table);
                    b.str(NFTA_CHAIN_NAME, name);
                }),
                format!("deleting chain {name}"),
            )),
            Change::AddRule(chain, rule) => out.push((
                message(nft_type(NFT_MSG_NEWRULE), create | NLM_F_APPEND, next(), fam, 0, |b| {
                    b.str(NFTA_RULE_TABLE, table);
                    b.str(NFTA_RULE_CHAIN, chain);
                    b.nest(NFTA_RULE_EXPRESSIONS, |b| encode_rule(b, rule));
                    if let Some(c) = &rule.comment {
                        b.attr(NFTA_RULE_USERDATA, &comment(c));
                    }
                }),
                format!("adding a rule to chain {chain}"),
            )),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Reading back

/// A chain as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedChain {
    pub name: String,
    pub base: Option<BaseHook>,
    pub rules: Vec<ListedRule>,
}

/// A rule as the kernel holds it: its comment and, if it counts, its counter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListedRule {
    pub comment: Option<String>,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// A set as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedSet {
    pub name: String,
    pub flags: u32,
    /// Its elements (a range counts once).
    pub elements: usize,
}

/// What a table holds, for checks and diagnosis.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Listing {
    pub chains: Vec<ListedChain>,
    pub sets: Vec<ListedSet>,
}

impl Listing {
    pub fn chain(&self, name: &str) -> Option<&ListedChain> {
        self.chains.iter().find(|c| c.name == name)
    }

    pub fn set(&self, name: &str) -> Option<&ListedSet> {
        self.sets.iter().find(|s| s.name == name)
    }

    /// Whether the table holds exactly the chains (with as many rules each) and the sets (with
    /// as many elements each) of `ruleset`: what a table that nobody else touched looks like.
    pub fn matches(&self, ruleset: &Ruleset) -> bool {
        let chains_ok = self.chains.len() == ruleset.chains.len()
            && ruleset
                .chains
                .iter()
                .all(|(name, c)| self.chain(name).is_some_and(|l| l.rules.len() == c.rules.len() && l.base == c.base));
        let sets_ok = self.sets.len() == ruleset.sets.len()
            && ruleset.sets.iter().all(|(name, s)| self.set(name).is_some_and(|l| l.elements == s.elements.len()));
        chains_ok && sets_ok
    }
}

fn be32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(0..4)?.try_into().ok()?))
}

fn be64_of(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(0..8)?.try_into().ok()?))
}

/// The attributes of a nested attribute's payload.
fn listed_rule(payload: &[u8]) -> (String, ListedRule) {
    let mut chain = String::new();
    let mut rule = ListedRule::default();
    for (kind, value) in attributes(payload) {
        match kind {
            NFTA_RULE_CHAIN => chain = attr_str(value),
            NFTA_RULE_USERDATA => {
                // TLVs: type, length, value.
                let mut data = value;
                while data.len() >= 2 {
                    let (t, l) = (data[0], data[1] as usize);
                    let Some(v) = data.get(2..2 + l) else { break };
                    if t == 0 {
                        rule.comment = Some(attr_str(v));
                    }
                    data = &data[2 + l..];
                }
            }
            NFTA_RULE_EXPRESSIONS => {
                for (_, elem) in nested(value) {
                    let attrs = nested(elem);
                    let name = attrs.iter().find(|(k, _)| *k == NFTA_EXPR_NAME).map(|(_, v)| attr_str(v));
                    if name.as_deref() != Some("counter") {
                        continue;
                    }
                    if let Some((_, data)) = attrs.iter().find(|(k, _)| *k == NFTA_EXPR_DATA) {
                        for (k, v) in nested(data) {
                            match k {
                                NFTA_COUNTER_PACKETS => rule.packets = be64_of(v),
                                NFTA_COUNTER_BYTES => rule.bytes = be64_of(v),
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (chain, rule)
}

impl Nft {
    /// Applies `changes` to table `inet <table>` as one atomic batch: all of them, or (on any
    /// error, which names the change that failed) none.
    pub fn commit(&mut self, table: &str, changes: &[Change]) -> Result<()> {
        check_name("table", table)?;
        if changes.is_empty() {
            return Ok(());
        }
        // Errors answer without the failed message attached (a batch message can be large).
        self.socket
            .set_cap_ack(true)
            .map_err(|source| NftError::Io { op: "setting NETLINK_CAP_ACK".into(), source })?;
        let mut seq = self.seq;
        let mut msgs = encode_changes(table, changes, &mut seq);
        self.seq = seq;
        if msgs.is_empty() {
            return Ok(());
        }
        // Only the last message asks for an acknowledgement: the kernel answers every failed
        // message anyway, and delivers all answers once the whole batch is processed, so the
        // last one's answer ends the exchange (thousands of acknowledgements would not fit in
        // the socket's receive buffer).
        let last = msgs.len() - 1;
        let last_flags = u16::from_ne_bytes([msgs[last].0[6], msgs[last].0[7]]) | NLM_F_ACK;
        msgs[last].0[6..8].copy_from_slice(&last_flags.to_ne_bytes());
        let begin_seq = self.next_seq();
        let mut data = batch(NFNL_MSG_BATCH_BEGIN, begin_seq);
        let mut names: BTreeMap<u32, String> = BTreeMap::new();
        for (msg, op) in &msgs {
            names.insert(u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]), op.clone());
            data.extend_from_slice(msg);
        }
        let last_seq = u32::from_ne_bytes([msgs[last].0[8], msgs[last].0[9], msgs[last].0[10], msgs[last].0[11]]);
        self.seq = self.seq.max(last_seq);
        let end_seq = self.next_seq();
        data.extend_from_slice(&batch(NFNL_MSG_BATCH_END, end_seq));
        // A netlink message must fit the socket's send buffer.
        if data.len() + 4096 > 200 * 1024 {
            rustix::net::sockopt::set_socket_send_buffer_size_force(&self.socket, data.len() + 64 * 1024)
                .map_err(|e| NftError::Io { op: "growing the send buffer".into(), source: e.into() })?;
        }
        let op = format!("sending a batch of {} messages ({} bytes) to table inet {table}", msgs.len(), data.len());
        self.send(&data, &op)?;
        let mut first_error: Option<NftError> = None;
        loop {
            let answer = self.recv(&op)?;
            let parsed = parse_messages(&answer).map_err(|msg| NftError::Protocol { op: op.clone(), msg })?;
            for m in parsed {
                if m.kind != NLMSG_ERROR {
                    continue;
                }
                let code = error_code(m.payload);
                if m.seq == begin_seq {
                    match code {
                        Some(0) | None => continue,
                        Some(e) => return Err(NftError::Kernel { op: "starting a batch".into(), errno: -e }),
                    }
                }
                let Some(what) = names.get(&m.seq) else { continue };
                match code {
                    Some(0) => {}
                    Some(e) => {
                        if first_error.is_none() {
                            first_error = Some(NftError::Kernel { op: what.clone(), errno: -e });
                        }
                    }
                    None => return Err(NftError::Protocol { op: what.clone(), msg: "short error message".into() }),
                }
                if m.seq == last_seq {
                    return match first_error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
            }
        }
    }

    /// Sends a dump request and collects the payloads of its answers of type `want`; an absent
    /// table answers nothing.
    fn dump(&mut self, op: &str, kind: u16, want: u16, attrs: impl FnOnce(&mut Buf)) -> Result<Vec<Vec<u8>>> {
        let seq = self.next_seq();
        let msg = message(nft_type(kind), NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, attrs);
        self.send(&msg, op)?;
        let mut out = Vec::new();
        loop {
            let data = self.recv(op)?;
            let msgs = parse_messages(&data).map_err(|msg| NftError::Protocol { op: op.to_string(), msg })?;
            for m in msgs.iter().filter(|m| m.seq == seq) {
                match m.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        return match error_code(m.payload) {
                            Some(0) => Ok(out),
                            Some(e) if -e == ENOENT => Ok(Vec::new()),
                            Some(e) => Err(NftError::Kernel { op: op.to_string(), errno: -e }),
                            None => Err(NftError::Protocol { op: op.to_string(), msg: "short error message".into() }),
                        };
                    }
                    k if k == nft_type(want) => {
                        out.push(m.payload.to_vec());
                        if m.flags & NLM_F_MULTI == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// What table `inet <table>` holds: its chains with their rules' comments and counters, and
    /// its sets with their element counts. An absent table lists empty.
    pub fn list_table(&mut self, table: &str) -> Result<Listing> {
        check_name("table", table)?;
        let mut listing = Listing::default();
        let in_table =
            |payload: &[u8], attr: u16| attributes(payload).iter().any(|(k, v)| *k == attr && attr_str(v) == table);

        let chains =
            self.dump(&format!("listing the chains of inet {table}"), NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN, |b| {
                b.str(NFTA_CHAIN_TABLE, table)
            })?;
        for payload in chains.iter().filter(|p| in_table(p, NFTA_CHAIN_TABLE)) {
            let attrs = attributes(payload);
            let name = attrs.iter().find(|(k, _)| *k == NFTA_CHAIN_NAME).map(|(_, v)| attr_str(v)).unwrap_or_default();
            let base = attrs.iter().find(|(k, _)| *k == NFTA_CHAIN_HOOK).and_then(|(_, v)| {
                let hook = nested(v);
                let num = hook.iter().find(|(k, _)| *k == NFTA_HOOK_HOOKNUM).and_then(|(_, v)| be32_of(v))?;
                let prio = hook.iter().find(|(k, _)| *k == NFTA_HOOK_PRIORITY).and_then(|(_, v)| be32_of(v))?;
                Some(BaseHook { hook: Hook::from_number(num)?, priority: prio as i32 })
            });
            listing.chains.push(ListedChain { name, base, rules: Vec::new() });
        }
        let rules =
            self.dump(&format!("listing the rules of inet {table}"), NFT_MSG_GETRULE, NFT_MSG_NEWRULE, |b| {
                b.str(NFTA_RULE_TABLE, table)
            })?;
        for payload in rules.iter().filter(|p| in_table(p, NFTA_RULE_TABLE)) {
            let (chain, rule) = listed_rule(payload);
            if let Some(c) = listing.chains.iter_mut().find(|c| c.name == chain) {
                c.rules.push(rule);
            }
        }
        let sets = self.dump(&format!("listing the sets of inet {table}"), NFT_MSG_GETSET, NFT_MSG_NEWSET, |b| {
            b.str(NFTA_SET_TABLE, table)
        })?;
        for payload in sets.iter().filter(|p| in_table(p, NFTA_SET_TABLE)) {
            let attrs = attributes(payload);
            let name = attrs.iter().find(|(k, _)| *k == NFTA_SET_NAME).map(|(_, v)| attr_str(v)).unwrap_or_default();
            let flags = attrs.iter().find(|(k, _)| *k == NFTA_SET_FLAGS).and_then(|(_, v)| be32_of(v)).unwrap_or(0);
            listing.sets.push(ListedSet { name, flags, elements: 0 });
        }
        for set in &mut listing.sets {
            let name = set.name.clone();
            let elems = self.dump(
                &format!("listing the elements of set {name}"),
                NFT_MSG_GETSETELEM,
                NFT_MSG_NEWSETELEM,
                |b| {
                    b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                    b.str(NFTA_SET_ELEM_LIST_SET, &name);
                },
            )?;
            let mut count = 0;
            for payload in &elems {
                for (kind, value) in attributes(payload) {
                    if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
                        continue;
                    }
                    for (_, elem) in nested(value) {
                        let flags = nested(elem)
                            .iter()
                            .find(|(k, _)| *k == NFTA_SET_ELEM_FLAGS)
                            .and_then(|(_, v)| be32_of(v))
                            .unwrap_or(0);
                        // A range is two kernel elements: count its start.
                        if flags & NFT_SET_ELEM_INTERVAL_END == 0 {
                            count += 1;
                        }
                    }
                }
            }
            set.elements = count;
        }
        Ok(listing)
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// What nf_tables knows of a packet when it reaches a hook (for [`Ruleset::evaluate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub iifname: String,
    pub oifname: String,
    pub iifgroup: u32,
    pub oifgroup: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4proto: u8,
    /// The destination port (TCP, UDP, SCTP).
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    /// Its `ct state` bit ([`CT_NEW`], [`CT_ESTABLISHED`], ...).
    pub ct_state: u32,
}

impl Set {
    fn has(&self, elem: &Elem) -> bool {
        match (self.kind.kind, elem) {
            (SetKind::Interval, Elem::Addr(x)) => {
                self.elements.keys().any(|e| matches!(e, Elem::Range(a, b) if a <= x && x <= b))
            }
            _ => self.elements.contains_key(elem),
        }
    }

    fn verdict(&self, elem: &Elem) -> Option<&Verdict> {
        self.elements.get(elem).and_then(Option::as_ref)
    }
}

impl Ruleset {
    fn match_holds(&self, m: &Match, p: &Packet) -> bool {
        let addr = |f: &AddrField| if *f == AddrField::Source { p.src } else { p.dst };
        let set_has = |name: &str, elem: Elem| self.sets.get(name).is_some_and(|s| s.has(&elem));
        match m {
            Match::CtState(bits) => p.ct_state & bits != 0,
            Match::IfnamePrefix(Iface::Input, prefix) => p.iifname.starts_with(prefix.as_str()),
            Match::IfnamePrefix(Iface::Output, prefix) => p.oifname.starts_with(prefix.as_str()),
            Match::L4Proto(proto) => p.l4proto == *proto,
            Match::AddrIn(f, net) => net.contains(addr(f)) && addr(f).is_ipv4() == net.is_ipv4(),
            Match::AddrInSet(f, v, set) => IpVersion::of(&addr(f)) == *v && set_has(set, Elem::Addr(addr(f))),
            Match::DportRange(lo, hi) => p.dport.is_some_and(|d| *lo <= d && d <= *hi),
            Match::DaddrProtoPortInSet(v, set) => {
                IpVersion::of(&p.dst) == *v
                    && p.dport.is_some_and(|d| set_has(set, Elem::AddrProtoPort(p.dst, p.l4proto, d)))
            }
            Match::Icmpv6TypeRange(lo, hi) => {
                p.l4proto == IPPROTO_ICMPV6 && p.icmp_type.is_some_and(|t| *lo <= t && t <= *hi)
            }
            Match::SaddrDaddrInSet(v, set) => IpVersion::of(&p.src) == *v && set_has(set, Elem::AddrPair(p.src, p.dst)),
        }
    }

    /// The verdict nf_tables reaches for `packet` at `hook` with this rule set (the base
    /// chain's policy, accept, when no rule decides): what the kernel does, computed without
    /// it, for tests and diagnosis.
    pub fn evaluate(&self, hook: Hook, packet: &Packet) -> Verdict {
        let Some((base, _)) = self.chains.iter().find(|(_, c)| c.base.is_some_and(|b| b.hook == hook)) else {
            return Verdict::Accept;
        };
        // (chain, next rule) to come back to after a jump.
        let mut stack: Vec<(&str, usize)> = Vec::new();
        let (mut chain, mut pos) = (base.as_str(), 0usize);
        // A rule set without loops ends well within this many steps; a loop is a bug.
        for _ in 0..100_000 {
            let rules = self.chains.get(chain).map(|c| c.rules.as_slice()).unwrap_or_default();
            let Some(rule) = rules.get(pos) else {
                match stack.pop() {
                    Some((c, p)) => (chain, pos) = (c, p),
                    None => return Verdict::Accept,
                }
                continue;
            };
            pos += 1;
            if !rule.matches.iter().all(|m| self.match_holds(m, packet)) {
                continue;
            }
            let verdict = match &rule.action {
                Action::Verdict(v) => Some(v.clone()),
                Action::AddrVmap(f, v, map) => {
                    let a = if *f == AddrField::Source { packet.src } else { packet.dst };
                    if IpVersion::of(&a) == *v {
                        self.sets.get(map).and_then(|s| s.verdict(&Elem::Addr(a))).cloned()
                    } else {
                        None
                    }
                }
                Action::GroupVmap(i, map) => {
                    let g = if *i == Iface::Input { packet.iifgroup } else { packet.oifgroup };
                    self.sets.get(map).and_then(|s| s.verdict(&Elem::Group(g))).cloned()
                }
            };
            match verdict {
                None => {}
                Some(Verdict::Accept) => return Verdict::Accept,
                Some(Verdict::Drop) => return Verdict::Drop,
                Some(Verdict::Return) => match stack.pop() {
                    Some((c, p)) => (chain, pos) = (c, p),
                    None => return Verdict::Accept,
                },
                Some(Verdict::Jump(target)) => {
                    stack.push((chain, pos));
                    let target = self.chains.get_key_value(&target).map(|(k, _)| k.as_str()).unwrap_or("");
                    (chain, pos) = (target, 0);
                }
                Some(Verdict::Goto(target)) => {
                    let target = self.chains.get_key_value(&target).map(|(k, _)| k.as_str()).unwrap_or("");
                    (chain, pos) = (target, 0);
                }
            }
        }
        Verdict::Drop
    }
}

/// How `nft` would print a match (for logs and test messages).
pub fn describe_match(m: &Match) -> String {
    let field = |f: &AddrField| if *f == AddrField::Source { "saddr" } else { "daddr" };
    match m {
        Match::CtState(bits) => {
            let mut names = Vec::new();
            for (bit, name) in [(CT_ESTABLISHED, "established"), (CT_RELATED, "related"), (CT_NEW, "new")] {
                if bits & bit != 0 {
                    names.push(name);
                }
            }
            format!("ct state {}", names.join(","))
        }
        Match::IfnamePrefix(i, p) => format!("{}ifname \"{p}*\"", if *i == Iface::Input { "i" } else { "o" }),
        Match::L4Proto(p) => format!("meta l4proto {p}"),
        Match::AddrIn(f, net) => format!("{} {} {net}", IpVersion::of(&net.ip()).nft_name(), field(f)),
        Match::AddrInSet(f, v, s) => format!("{} {} @{s}", v.nft_name(), field(f)),
        Match::DportRange(lo, hi) if lo == hi => format!("th dport {lo}"),
        Match::DportRange(lo, hi) => format!("th dport {lo}-{hi}"),
        Match::DaddrProtoPortInSet(v, s) => format!("{} daddr . meta l4proto . th dport @{s}", v.nft_name()),
        Match::Icmpv6TypeRange(lo, hi) => format!("icmpv6 type {lo}-{hi}"),
        Match::SaddrDaddrInSet(v, s) => format!("{n} saddr . {n} daddr @{s}", n = v.nft_name()),
    }
}

/// Elements as a set of keys (for callers that compare contents).
pub fn keys(set: &Set) -> BTreeSet<&Elem> {
    set.elements.keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(kind: SetKind, key: KeyType, elems: &[Elem]) -> Set {
        let mut s = Set::new(key, kind);
        for e in elems {
            s.insert(e.clone());
        }
        s
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn base() -> Ruleset {
        let mut r = Ruleset::default();
        r.sets.insert(
            "p".into(),
            set_of(SetKind::Interval, KeyType::Addr(IpVersion::V4), &[Elem::Range(addr("10.0.0.1"), addr("10.0.0.1"))]),
        );
        r.chains.insert(
            "g".into(),
            Chain {
                base: None,
                rules: vec![
                    Rule::new(vec![Match::AddrInSet(AddrField::Source, IpVersion::V4, "p".into())], Verdict::Return),
                    Rule::new(vec![], Verdict::Drop).counted(),
                ],
            },
        );
        let mut map = Set::new(KeyType::Addr(IpVersion::V4), SetKind::VerdictMap);
        map.insert_verdict(Elem::Addr(addr("10.0.0.9")), Verdict::Goto("g".into()));
        r.sets.insert("m".into(), map);
        r.chains.insert(
            "forward".into(),
            Chain {
                base: Some(BaseHook { hook: Hook::Forward, priority: -5 }),
                rules: vec![Rule {
                    matches: vec![],
                    counter: false,
                    action: Action::AddrVmap(AddrField::Destination, IpVersion::V4, "m".into()),
                    comment: None,
                }],
            },
        );
        r
    }

    #[test]
    fn validation_refuses_what_the_kernel_would() {
        assert!(base().validate().is_ok());
        let mut r = base();
        r.chains.remove("g");
        assert!(r.validate().unwrap_err().to_string().contains("no chain g"));
        let mut r = base();
        r.sets.get_mut("p").unwrap().insert(Elem::Addr(addr("10.0.0.2")));
        assert!(r.validate().unwrap_err().to_string().contains("does not fit"));
        let mut r = base();
        r.sets.get_mut("p").unwrap().insert(Elem::Range(addr("10.0.0.0"), addr("10.0.0.3")));
        assert!(r.validate().unwrap_err().to_string().contains("overlaps"));
        let mut r = base();
        r.sets.get_mut("p").unwrap().insert(Elem::Range(addr("10.0.0.5"), addr("10.0.0.4")));
        assert!(r.validate().is_err());
        let mut r = base();
        r.sets.insert("bad name".into(), Set::new(KeyType::Group, SetKind::Plain));
        assert!(r.validate().is_err());
        let mut r = base();
        r.chains.get_mut("g").unwrap().rules[0].matches[0] =
            Match::AddrInSet(AddrField::Source, IpVersion::V4, "m".into());
        assert!(r.validate().unwrap_err().to_string().contains("wrong kind"));
    }

    #[test]
    fn an_unchanged_ruleset_needs_no_change() {
        assert!(base().changes_from(&base()).is_empty());
    }

    #[test]
    fn changes_come_in_an_order_the_kernel_accepts() {
        let old = base();
        let mut new = base();
        // g is replaced by h (a new chain the map now names); p gains an element.
        let g = new.chains.remove("g").unwrap();
        new.chains.insert("h".into(), g);
        new.sets.get_mut("m").unwrap().insert_verdict(Elem::Addr(addr("10.0.0.9")), Verdict::Goto("h".into()));
        new.sets.get_mut("p").unwrap().insert(Elem::Range(addr("10.0.1.0"), addr("10.0.1.255")));
        new.validate().unwrap();
        let changes = new.changes_from(&old);
        let pos = |f: &dyn Fn(&Change) -> bool| changes.iter().position(f).unwrap();
        let add_h = pos(&|c| matches!(c, Change::AddChain(n, _) if n == "h"));
        let rules_h = pos(&|c| matches!(c, Change::AddRule(n, _) if n == "h"));
        let del_elem = pos(&|c| matches!(c, Change::DeleteElements(n, ..) if n == "m"));
        let add_elem = pos(&|c| matches!(c, Change::AddElements(n, _, e) if n == "m" && e.len() == 1));
        let flush_g = pos(&|c| matches!(c, Change::FlushChain(n) if n == "g"));
        let del_g = pos(&|c| matches!(c, Change::DeleteChain(n) if n == "g"));
        assert!(add_h < rules_h && rules_h < add_elem, "{changes:?}");
        assert!(del_elem < add_elem && add_elem < flush_g && flush_g < del_g, "{changes:?}");
        assert!(changes.iter().any(
            |c| matches!(c, Change::AddElements(n, _, e) if n == "p" && e == &vec![(Elem::Range(addr("10.0.1.0"), addr("10.0.1.255")), None)])
        ));
        assert!(!changes.iter().any(|c| matches!(c, Change::DeleteSet(_))), "{changes:?}");
        // Removing everything: rules, then sets, then chains.
        let gone = Ruleset::default().changes_from(&old);
        let kinds: Vec<u8> = gone
            .iter()
            .map(|c| match c {
                Change::FlushChain(_) => 0,
                Change::DeleteSet(_) => 1,
                Change::DeleteChain(_) => 2,
                _ => 9,
            })
            .collect();
        assert!(kinds.is_sorted() && !kinds.contains(&9), "{gone:?}");
        // A set whose type changes: the whole table is replaced.
        let mut retyped = base();
        retyped.sets.get_mut("p").unwrap().kind.kind = SetKind::Plain;
        retyped.sets.get_mut("p").unwrap().elements.clear();
        assert_eq!(retyped.changes_from(&old)[..3], [Change::AddTable, Change::DeleteTable, Change::AddTable]);
    }

    #[test]
    fn ranges_become_a_start_and_the_end_after_them() {
        let r = kernel_elements(&Elem::Range(addr("10.0.0.5"), addr("10.0.0.9")));
        assert_eq!(r, vec![(vec![10, 0, 0, 5], false), (vec![10, 0, 0, 10], true)]);
        let r = kernel_elements(&Elem::Range(addr("0.0.0.0"), addr("255.255.255.255")));
        assert_eq!(r, vec![(vec![0, 0, 0, 0], false)], "no end after the last address");
        let r = kernel_elements(&Elem::AddrProtoPort(addr("10.0.0.1"), 6, 80));
        assert_eq!(r[0].0, vec![10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
    }

    #[test]
    fn concatenated_keys_are_typed_like_nft_does() {
        assert_eq!(KeyType::AddrProtoPort(IpVersion::V4).nft_type(), 0x730d);
        assert_eq!(KeyType::AddrProtoPort(IpVersion::V4).len(), 12);
        assert_eq!(KeyType::AddrProtoPort(IpVersion::V6).len(), 24);
    }

    #[test]
    fn large_element_lists_are_split_into_bounded_messages() {
        let mut s = Set::new(KeyType::Addr(IpVersion::V6), SetKind::Plain);
        for i in 0..5000u128 {
            s.insert(Elem::Addr(IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | i))));
        }
        let changes = vec![Change::AddElements("s".into(), s.kind, s.elements.into_iter().collect())];
        let mut seq = 0;
        let msgs = encode_changes("t", &changes, &mut seq);
        assert!(msgs.len() > 1);
        for (m, _) in &msgs {
            assert!(m.len() < 65535);
        }
    }

    #[test]
    fn listings_compare_by_shape() {
        let r = base();
        let listing = Listing {
            chains: vec![
                ListedChain {
                    name: "forward".into(),
                    base: Some(BaseHook { hook: Hook::Forward, priority: -5 }),
                    rules: vec![ListedRule::default()],
                },
                ListedChain { name: "g".into(), base: None, rules: vec![ListedRule::default(); 2] },
            ],
            sets: vec![
                ListedSet { name: "m".into(), flags: NFT_SET_MAP, elements: 1 },
                ListedSet { name: "p".into(), flags: NFT_SET_INTERVAL, elements: 1 },
            ],
        };
        assert!(listing.matches(&r));
        let mut other = listing.clone();
        other.sets[1].elements = 0;
        assert!(!other.matches(&r));
    }
}
