//! A small nf_tables client over a raw NETLINK_NETFILTER socket: enough to own one NAT table
//! per address family with a masquerade chain, and one reverse-path guard table, to replace
//! each atomically, to delete them, and to look at them. No `nft` binary and no libnftnl are
//! involved.
//!
//! The masquerade tables HeadCNI keeps (shown as `nft list table ip headcni` prints it):
//!
//! ```text
//! table ip headcni {
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip daddr 10.244.0.0/16 return          # one rule per exempt destination
//!         ip daddr 100.64.0.0/10 return
//!         ip saddr 10.244.1.0/24 counter masquerade   # one rule per pod CIDR
//!     }
//! }
//! ```
//!
//! The guard ([`GuardSpec`], as `nft list table inet headcni-guard` prints it):
//!
//! ```text
//! table inet headcni-guard {
//!     chain prerouting {
//!         type filter hook prerouting priority raw; policy accept;
//!         iifname "hc*" fib saddr . iif oif missing counter drop
//!     }
//! }
//! ```
//!
//! Separate `ip` and `ip6` masquerade tables avoid matching on the protocol. A replacement is one batch
//! (add table, delete table, add table, chain and rules) that the kernel applies atomically:
//! there is never a moment without masquerading, and the add-then-delete idiom makes the
//! batch valid whether or not the table existed (it needs no DESTROY message, so it works on
//! every kernel HeadCNI supports).
//!
//! The socket belongs to the namespace it was opened in ([`Nft::connect_in`]).

pub mod ruleset;

use super::Netns;
use ipnetwork::IpNetwork;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use rtnetlink::sys as netlink_sys;
use std::io;
use std::time::Duration;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

const NLA_F_NESTED: u16 = 0x8000;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;

const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;

const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;

const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_IIFNAME: u32 = 6;

const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_OIF: u32 = 1;
const NFTA_FIB_F_SADDR: u32 = 1 << 0;
const NFTA_FIB_F_IIF: u32 = 1 << 3;
const NFTA_FIB_F_PRESENT: u32 = 1 << 5;

const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_RETURN: i32 = -5;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;
/// The `srcnat` priority of a NAT chain on the postrouting hook.
pub const PRIORITY_SRCNAT: i32 = 100;
/// The `raw` priority: ahead of connection tracking, so a dropped packet leaves no state.
pub const PRIORITY_RAW: i32 = -300;

/// libnftnl's user-data type for a rule comment (what `nft ... comment "..."` stores).
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

const ENOENT: i32 = 2;

/// How long to wait for the kernel's answer before giving up.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nf_tables {op}: {source}")]
    Io { op: String, source: io::Error },
    #[error("nf_tables {op}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { op: String, errno: i32 },
    #[error("nf_tables {op}: malformed answer from the kernel: {msg}")]
    Protocol { op: String, msg: String },
    #[error("nf_tables: {0}")]
    Invalid(String),
}

impl NftError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, NftError>;

/// The nf_tables family of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum NftFamily {
    /// `ip`
    Ipv4,
    /// `ip6`
    Ipv6,
    /// `inet`: both (the guard)
    Inet,
}

impl NftFamily {
    fn nfproto(self) -> u8 {
        match self {
            NftFamily::Inet => 1,
            NftFamily::Ipv4 => 2,
            NftFamily::Ipv6 => 10,
        }
    }

    /// The name `nft` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            NftFamily::Ipv4 => "ip",
            NftFamily::Ipv6 => "ip6",
            NftFamily::Inet => "inet",
        }
    }

    pub fn of(net: &IpNetwork) -> NftFamily {
        if net.is_ipv4() { NftFamily::Ipv4 } else { NftFamily::Ipv6 }
    }

    /// (source offset, destination offset, address length) in the network header; `None` for
    /// `inet`, whose packets have either header.
    fn addr_layout(self) -> Option<(u32, u32, u32)> {
        match self {
            NftFamily::Ipv4 => Some((12, 16, 4)),
            NftFamily::Ipv6 => Some((8, 24, 16)),
            NftFamily::Inet => None,
        }
    }
}

impl std::fmt::Display for NftFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One masquerading table: traffic from `sources` is masqueraded unless it goes to one of
/// `exempt_destinations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqueradeSpec {
    pub family: NftFamily,
    pub table: String,
    pub chain: String,
    pub sources: Vec<IpNetwork>,
    pub exempt_destinations: Vec<IpNetwork>,
}

impl MasqueradeSpec {
    fn validate(&self) -> Result<()> {
        check_names(&[&self.table, &self.chain])?;
        if self.family.addr_layout().is_none() {
            return Err(NftError::Invalid(format!("a masquerade table must be ip or ip6, not {}", self.family)));
        }
        for net in self.sources.iter().chain(&self.exempt_destinations) {
            if NftFamily::of(net) != self.family {
                return Err(NftError::Invalid(format!("{net} does not belong in a table of family {}", self.family)));
            }
        }
        Ok(())
    }
}

fn check_names(names: &[&str]) -> Result<()> {
    for name in names {
        if name.is_empty() || name.len() > 255 || name.bytes().any(|b| b == 0) {
            return Err(NftError::Invalid(format!("bad table or chain name {name:?}")));
        }
    }
    Ok(())
}

/// A reverse-path guard in an `inet` table: packets that arrive on an interface whose name
/// starts with `ifname_prefix` are dropped unless the host routes their source address back
/// out of that very interface (`fib saddr . iif oif missing`). For a pod veth, whose only
/// routes are the host routes to the pod's own addresses (and, for IPv6, the link-local
/// prefix), that admits exactly the pod's own addresses: a strict reverse-path check on these
/// interfaces only, on the wire (raw sockets included), ahead of connection tracking, with no
/// state per pod and no sysctl (rp_filter's effective value is the maximum of the "all" and
/// the interface setting, so a host's loose "all" would silently weaken a per-veth one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardSpec {
    pub table: String,
    pub chain: String,
    pub ifname_prefix: String,
}

impl GuardSpec {
    fn validate(&self) -> Result<()> {
        check_names(&[&self.table, &self.chain])?;
        // IFNAMSIZ is 16 with the NUL: a prefix must leave room for a name.
        if self.ifname_prefix.is_empty() || self.ifname_prefix.len() > 14 || self.ifname_prefix.contains('\0') {
            return Err(NftError::Invalid(format!("bad interface name prefix {:?}", self.ifname_prefix)));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Message building

/// A netlink attribute writer: lengths are patched in when a nest or message is closed.
#[derive(Debug, Default)]
struct Buf {
    bytes: Vec<u8>,
}

impl Buf {
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.pad();
    }

    fn str(&mut self, kind: u16, value: &str) {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    fn be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Buf)) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One nfnetlink message: header, nfgenmsg and attributes.
fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: impl FnOnce(&mut Buf)) -> Vec<u8> {
    let mut b = Buf::default();
    b.bytes.extend_from_slice(&[0; NLMSG_HDRLEN]);
    b.bytes.push(family);
    b.bytes.push(0); // NFNETLINK_V0
    b.bytes.extend_from_slice(&res_id.to_be_bytes());
    attrs(&mut b);
    let len = b.bytes.len() as u32;
    b.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
    b.bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
    b.bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
    b.bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel.
    b.bytes
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn expr(b: &mut Buf, name: &str, data: impl FnOnce(&mut Buf)) {
    b.nest(NFTA_LIST_ELEM, |b| {
        b.str(NFTA_EXPR_NAME, name);
        b.nest(NFTA_EXPR_DATA, data);
    });
}

/// Loads the source or destination address into register 1 and compares it with `net`.
fn match_prefix(b: &mut Buf, family: NftFamily, destination: bool, net: &IpNetwork) {
    // An inet spec is refused before any message is built (`MasqueradeSpec::validate`).
    let Some((src_off, dst_off, len)) = family.addr_layout() else { return };
    if net.prefix() == 0 {
        return; // matches everything
    }
    expr(b, "payload", |b| {
        b.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
        b.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
        b.be32(NFTA_PAYLOAD_OFFSET, if destination { dst_off } else { src_off });
        b.be32(NFTA_PAYLOAD_LEN, len);
    });
    let full = u32::from(net.prefix()) == len * 8;
    if !full {
        let mask = mask_bytes(net);
        expr(b, "bitwise", |b| {
            b.be32(NFTA_BITWISE_SREG, NFT_REG_1);
            b.be32(NFTA_BITWISE_DREG, NFT_REG_1);
            b.be32(NFTA_BITWISE_LEN, len);
            b.nest(NFTA_BITWISE_MASK, |b| b.attr(NFTA_DATA_VALUE, &mask));
            b.nest(NFTA_BITWISE_XOR, |b| b.attr(NFTA_DATA_VALUE, &vec![0; mask.len()]));
        });
    }
    let value = addr_bytes(net);
    expr(b, "cmp", |b| {
        b.be32(NFTA_CMP_SREG, NFT_REG_1);
        b.be32(NFTA_CMP_OP, NFT_CMP_EQ);
        b.nest(NFTA_CMP_DATA, |b| b.attr(NFTA_DATA_VALUE, &value));
    });
}

fn addr_bytes(net: &IpNetwork) -> Vec<u8> {
    match net {
        IpNetwork::V4(n) => n.network().octets().to_vec(),
        IpNetwork::V6(n) => n.network().octets().to_vec(),
    }
}

fn mask_bytes(net: &IpNetwork) -> Vec<u8> {
    match net {
        IpNetwork::V4(n) => n.mask().octets().to_vec(),
        IpNetwork::V6(n) => n.mask().octets().to_vec(),
    }
}

fn comment(text: &str) -> Vec<u8> {
    // One TLV: type, length (including the NUL), value.
    let mut value: Vec<u8> = text.bytes().filter(|b| *b != 0).take(250).collect();
    value.push(0);
    let mut out = vec![NFTNL_UDATA_RULE_COMMENT, value.len() as u8];
    out.extend_from_slice(&value);
    out
}

/// A base chain: its table, hook, priority and type (policy accept).
struct BaseChain<'a> {
    family: NftFamily,
    table: &'a str,
    chain: &'a str,
    hook: u32,
    priority: i32,
    kind: &'a str,
}

/// The first messages of an atomic replacement of a table holding one base chain: the table
/// added, deleted and added again (valid whether or not it existed), then the chain. The rules
/// follow ([`rule_message`]); the batch delimiters are the caller's.
fn table_with_chain(base: &BaseChain<'_>, next: &mut dyn FnMut() -> u32) -> Vec<(Vec<u8>, String)> {
    let fam = base.family.nfproto();
    let table_msg = |kind: u16, flags: u16, seq: u32| {
        message(nft_type(kind), flags, seq, fam, 0, |b| {
            b.str(NFTA_TABLE_NAME, base.table);
            if kind == NFT_MSG_NEWTABLE {
                b.be32(NFTA_TABLE_FLAGS, 0);
            }
        })
    };
    let what = format!("table {} {}", base.family, base.table);
    let mut out = Vec::new();
    out.push((table_msg(NFT_MSG_NEWTABLE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, next()), format!("adding {what}")));
    out.push((table_msg(NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK, next()), format!("deleting {what}")));
    out.push((table_msg(NFT_MSG_NEWTABLE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, next()), format!("adding {what}")));
    let chain = message(nft_type(NFT_MSG_NEWCHAIN), NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, next(), fam, 0, |b| {
        b.str(NFTA_CHAIN_TABLE, base.table);
        b.str(NFTA_CHAIN_NAME, base.chain);
        b.nest(NFTA_CHAIN_HOOK, |b| {
            b.be32(NFTA_HOOK_HOOKNUM, base.hook);
            b.be32(NFTA_HOOK_PRIORITY, base.priority as u32);
        });
        b.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
        b.str(NFTA_CHAIN_TYPE, base.kind);
    });
    out.push((chain, format!("adding chain {} to {what}", base.chain)));
    out
}

/// One rule appended to a base chain, with a comment.
fn rule_message(base: &BaseChain<'_>, seq: u32, note: &str, body: &dyn Fn(&mut Buf)) -> Vec<u8> {
    let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK;
    message(nft_type(NFT_MSG_NEWRULE), flags, seq, base.family.nfproto(), 0, |b| {
        b.str(NFTA_RULE_TABLE, base.table);
        b.str(NFTA_RULE_CHAIN, base.chain);
        b.nest(NFTA_RULE_EXPRESSIONS, body);
        b.attr(NFTA_RULE_USERDATA, &comment(note));
    })
}

fn verdict(b: &mut Buf, code: u32) {
    expr(b, "immediate", |b| {
        b.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
        b.nest(NFTA_IMMEDIATE_DATA, |b| {
            b.nest(NFTA_DATA_VERDICT, |b| b.be32(NFTA_VERDICT_CODE, code));
        });
    });
}

/// The messages of an atomic replacement of the guard's table (without the batch delimiters).
fn guard_messages(spec: &GuardSpec, seq: &mut u32) -> Vec<(Vec<u8>, String)> {
    let mut next = || {
        *seq = seq.wrapping_add(1);
        *seq
    };
    let base = BaseChain {
        family: NftFamily::Inet,
        table: &spec.table,
        chain: &spec.chain,
        hook: NF_INET_PRE_ROUTING,
        priority: PRIORITY_RAW,
        kind: "filter",
    };
    let mut out = table_with_chain(&base, &mut next);
    let prefix = spec.ifname_prefix.as_bytes().to_vec();
    let rule = rule_message(&base, next(), "headcni: a pod sends only from its own addresses", &|b: &mut Buf| {
        // iifname "<prefix>*": the name's first bytes.
        expr(b, "meta", |b| {
            b.be32(NFTA_META_KEY, NFT_META_IIFNAME);
            b.be32(NFTA_META_DREG, NFT_REG_1);
        });
        expr(b, "cmp", |b| {
            b.be32(NFTA_CMP_SREG, NFT_REG_1);
            b.be32(NFTA_CMP_OP, NFT_CMP_EQ);
            b.nest(NFTA_CMP_DATA, |b| b.attr(NFTA_DATA_VALUE, &prefix));
        });
        // fib saddr . iif oif missing: no route back to the source through this interface.
        expr(b, "fib", |b| {
            b.be32(NFTA_FIB_DREG, NFT_REG_1);
            b.be32(NFTA_FIB_RESULT, NFT_FIB_RESULT_OIF);
            b.be32(NFTA_FIB_FLAGS, NFTA_FIB_F_SADDR | NFTA_FIB_F_IIF | NFTA_FIB_F_PRESENT);
        });
        expr(b, "cmp", |b| {
            b.be32(NFTA_CMP_SREG, NFT_REG_1);
            b.be32(NFTA_CMP_OP, NFT_CMP_EQ);
            b.nest(NFTA_CMP_DATA, |b| b.attr(NFTA_DATA_VALUE, &0u32.to_ne_bytes()));
        });
        expr(b, "counter", |_| {});
        verdict(b, NF_DROP);
    });
    out.push((rule, format!("adding the guard rule to table inet {}", spec.table)));
    out
}

/// The messages of an atomic replacement of `spec`'s table (without the batch delimiters).
fn replace_messages(spec: &MasqueradeSpec, seq: &mut u32) -> Vec<(Vec<u8>, String)> {
    let mut next = || {
        *seq = seq.wrapping_add(1);
        *seq
    };
    let base = BaseChain {
        family: spec.family,
        table: &spec.table,
        chain: &spec.chain,
        hook: NF_INET_POST_ROUTING,
        priority: PRIORITY_SRCNAT,
        kind: "nat",
    };
    let mut out = table_with_chain(&base, &mut next);
    let what = format!("table {} {}", spec.family, spec.table);
    let rule = |seq: u32, note: &str, body: &dyn Fn(&mut Buf)| rule_message(&base, seq, note, body);
    for dst in &spec.exempt_destinations {
        let msg = rule(next(), "headcni: not masqueraded", &|b: &mut Buf| {
            match_prefix(b, spec.family, true, dst);
            verdict(b, NFT_RETURN as u32);
        });
        out.push((msg, format!("adding rule \"daddr {dst} return\" to {what}")));
    }
    for src in &spec.sources {
        let msg = rule(next(), "headcni: pod traffic leaving the cluster", &|b: &mut Buf| {
            match_prefix(b, spec.family, false, src);
            expr(b, "counter", |_| {});
            expr(b, "masq", |_| {});
        });
        out.push((msg, format!("adding rule \"saddr {src} masquerade\" to {what}")));
    }
    out
}

fn batch(kind: u16, seq: u32) -> Vec<u8> {
    message(kind, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, |_| {})
}

// ---------------------------------------------------------------------------------------------
// Answer parsing

struct NlMsg<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn parse_messages(mut data: &[u8]) -> std::result::Result<Vec<NlMsg<'_>>, String> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(format!("message length {len} with {} bytes left", data.len()));
        }
        out.push(NlMsg {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            payload: &data[NLMSG_HDRLEN..len],
        });
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    Ok(out)
}

/// The attributes of an nfnetlink message (after the 4-byte nfgenmsg).
fn attributes(payload: &[u8]) -> Vec<(u16, &[u8])> {
    // After the nfgenmsg header.
    nested(payload.get(4..).unwrap_or_default())
}

/// The attributes packed in `data` (a message's after its header, or a nested attribute's).
fn nested(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & !NLA_F_NESTED;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        let aligned = (len + 3) & !3;
        data = &data[aligned.min(data.len())..];
    }
    out
}

fn attr_str(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

fn error_code(payload: &[u8]) -> Option<i32> {
    payload.get(0..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

// ---------------------------------------------------------------------------------------------
// The socket

/// An nf_tables netlink socket bound to one network namespace.
pub struct Nft {
    socket: Socket,
    seq: u32,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft").field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl Nft {
    /// Opens a socket in the calling thread's namespace.
    pub fn connect() -> Result<Self> {
        let io = |source| NftError::Io { op: "opening a netlink socket".into(), source };
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        rustix::net::sockopt::set_socket_timeout(&socket, rustix::net::sockopt::Timeout::Recv, Some(RECV_TIMEOUT))
            .map_err(|e| io(e.into()))?;
        // A sequence start that differs between processes makes stray answers easy to spot.
        let seq = std::process::id().wrapping_mul(1_000_003);
        Ok(Self { socket, seq })
    }

    /// Opens a socket in `ns` (created on a helper thread inside it).
    pub fn connect_in(ns: &Netns) -> Result<Self> {
        ns.run(Self::connect)
            .map_err(|source| NftError::Io { op: format!("entering {}", ns.path().display()), source })?
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, data: &[u8], op: &str) -> Result<()> {
        self.socket.send(data, 0).map_err(|source| NftError::Io { op: op.to_string(), source })?;
        Ok(())
    }

    fn recv(&self, op: &str) -> Result<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
        self.socket.recv(&mut buf, 0).map_err(|source| NftError::Io { op: op.to_string(), source })?;
        Ok(buf)
    }

    /// Replaces the table described by `spec` in one atomic batch.
    pub fn replace_masquerade(&mut self, spec: &MasqueradeSpec) -> Result<()> {
        spec.validate()?;
        let mut seq = self.seq;
        let msgs = replace_messages(spec, &mut seq);
        self.seq = seq;
        self.run_batch(msgs)
    }

    /// Replaces the guard's table in one atomic batch.
    pub fn replace_guard(&mut self, spec: &GuardSpec) -> Result<()> {
        spec.validate()?;
        let mut seq = self.seq;
        let msgs = guard_messages(spec, &mut seq);
        self.seq = seq;
        self.run_batch(msgs)
    }

    /// Whether `chain` exists in `table`: one request and one answer, however large the rule
    /// set (what a plugin can afford on every ADD).
    pub fn chain_exists(&mut self, family: NftFamily, table: &str, chain: &str) -> Result<bool> {
        let seq = self.next_seq();
        let op = format!("looking up chain {family} {table} {chain}");
        let msg = message(nft_type(NFT_MSG_GETCHAIN), NLM_F_REQUEST | NLM_F_ACK, seq, family.nfproto(), 0, |b| {
            b.str(NFTA_CHAIN_TABLE, table);
            b.str(NFTA_CHAIN_NAME, chain);
        });
        self.send(&msg, &op)?;
        self.await_object(seq, nft_type(NFT_MSG_NEWCHAIN), op)
    }

    /// Reads the answers to a GET of one object until its acknowledgement: whether the object
    /// came (ENOENT: it does not exist).
    fn await_object(&mut self, seq: u32, kind: u16, op: String) -> Result<bool> {
        let mut found = false;
        loop {
            let data = self.recv(&op)?;
            let msgs = parse_messages(&data).map_err(|msg| NftError::Protocol { op: op.clone(), msg })?;
            for m in msgs.iter().filter(|m| m.seq == seq) {
                match m.kind {
                    k if k == kind => found = true,
                    NLMSG_ERROR => {
                        return match error_code(m.payload) {
                            Some(0) => Ok(found),
                            Some(e) if -e == ENOENT => Ok(false),
                            Some(e) => Err(NftError::Kernel { op, errno: -e }),
                            None => Err(NftError::Protocol { op, msg: "short error message".into() }),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Deletes a table; answers whether it existed.
    pub fn delete_table(&mut self, family: NftFamily, table: &str) -> Result<bool> {
        let seq = self.next_seq();
        let msg = message(nft_type(NFT_MSG_DELTABLE), NLM_F_REQUEST | NLM_F_ACK, seq, family.nfproto(), 0, |b| {
            b.str(NFTA_TABLE_NAME, table)
        });
        match self.run_batch(vec![(msg, format!("deleting table {family} {table}"))]) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the table exists.
    pub fn table_exists(&mut self, family: NftFamily, table: &str) -> Result<bool> {
        let seq = self.next_seq();
        let op = format!("looking up table {family} {table}");
        let msg = message(nft_type(NFT_MSG_GETTABLE), NLM_F_REQUEST | NLM_F_ACK, seq, family.nfproto(), 0, |b| {
            b.str(NFTA_TABLE_NAME, table)
        });
        self.send(&msg, &op)?;
        self.await_object(seq, nft_type(NFT_MSG_NEWTABLE), op)
    }

    /// The number of rules in `chain` of `table` (0 when the table does not exist).
    pub fn rule_count(&mut self, family: NftFamily, table: &str, chain: &str) -> Result<usize> {
        let seq = self.next_seq();
        let op = format!("listing rules of {family} {table} {chain}");
        let msg = message(nft_type(NFT_MSG_GETRULE), NLM_F_REQUEST | NLM_F_DUMP, seq, family.nfproto(), 0, |b| {
            b.str(NFTA_RULE_TABLE, table);
            b.str(NFTA_RULE_CHAIN, chain);
        });
        self.send(&msg, &op)?;
        let mut count = 0;
        loop {
            let data = self.recv(&op)?;
            let msgs = parse_messages(&data).map_err(|msg| NftError::Protocol { op: op.clone(), msg })?;
            for m in msgs.iter().filter(|m| m.seq == seq) {
                match m.kind {
                    NLMSG_DONE => return Ok(count),
                    NLMSG_ERROR => {
                        return match error_code(m.payload) {
                            Some(0) => Ok(count),
                            Some(e) if -e == ENOENT => Ok(0),
                            Some(e) => Err(NftError::Kernel { op, errno: -e }),
                            None => Err(NftError::Protocol { op, msg: "short error message".into() }),
                        };
                    }
                    k if k == nft_type(NFT_MSG_NEWRULE) => {
                        // Older kernels ignore the filter: check table and chain ourselves.
                        let attrs = attributes(m.payload);
                        let in_table = attrs.iter().any(|(t, v)| *t == NFTA_RULE_TABLE && attr_str(v) == table);
                        let in_chain = attrs.iter().any(|(t, v)| *t == NFTA_RULE_CHAIN && attr_str(v) == chain);
                        if in_table && in_chain {
                            count += 1;
                        }
                        if m.flags & NLM_F_MULTI == 0 {
                            return Ok(count);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends `msgs` as one batch and waits for every acknowledgement; the first error wins
    /// (the kernel then discards the whole batch).
    fn run_batch(&mut self, msgs: Vec<(Vec<u8>, String)>) -> Result<()> {
        let begin_seq = self.next_seq();
        let mut data = batch(NFNL_MSG_BATCH_BEGIN, begin_seq);
        let mut pending: Vec<(u32, String)> = Vec::new();
        for (msg, op) in &msgs {
            pending.push((u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]]), op.clone()));
            data.extend_from_slice(msg);
        }
        let last = pending.last().map(|(s, _)| *s).unwrap_or(begin_seq);
        self.seq = self.seq.max(last);
        let end_seq = self.next_seq();
        data.extend_from_slice(&batch(NFNL_MSG_BATCH_END, end_seq));
        let op = "sending a batch";
        self.send(&data, op)?;
        while !pending.is_empty() {
            let answer = self.recv(op)?;
            let parsed = parse_messages(&answer).map_err(|msg| NftError::Protocol { op: op.into(), msg })?;
            for m in parsed {
                if m.kind != NLMSG_ERROR {
                    continue;
                }
                // A batch refused as a whole (no CAP_NET_ADMIN, no nf_tables) answers its start.
                if m.seq == begin_seq {
                    match error_code(m.payload) {
                        Some(0) | None => continue,
                        Some(e) => return Err(NftError::Kernel { op: "starting a batch".into(), errno: -e }),
                    }
                }
                let Some(pos) = pending.iter().position(|(s, _)| *s == m.seq) else { continue };
                let (_, what) = pending.remove(pos);
                match error_code(m.payload) {
                    Some(0) => {}
                    Some(e) => return Err(NftError::Kernel { op: what, errno: -e }),
                    None => return Err(NftError::Protocol { op: what, msg: "short error message".into() }),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MasqueradeSpec {
        MasqueradeSpec {
            family: NftFamily::Ipv4,
            table: "headcni".into(),
            chain: "postrouting".into(),
            sources: vec!["10.244.1.0/24".parse().unwrap()],
            exempt_destinations: vec!["10.244.0.0/16".parse().unwrap(), "100.64.0.0/10".parse().unwrap()],
        }
    }

    #[test]
    fn attributes_are_aligned_and_nested_lengths_patched() {
        let mut b = Buf::default();
        b.nest(4, |b| {
            b.str(1, "abc"); // 4 + 4 bytes
            b.be32(2, 7); // 8 bytes
        });
        assert_eq!(b.bytes.len(), 4 + 8 + 8);
        assert_eq!(u16::from_ne_bytes([b.bytes[0], b.bytes[1]]), 20);
        assert_eq!(u16::from_ne_bytes([b.bytes[2], b.bytes[3]]), 4 | NLA_F_NESTED);
        assert_eq!(&b.bytes[16..20], &7u32.to_be_bytes());
    }

    #[test]
    fn replacement_is_add_delete_add_then_chain_and_rules() {
        let mut seq = 0;
        let msgs = replace_messages(&spec(), &mut seq);
        let kinds: Vec<u16> = msgs.iter().map(|(m, _)| u16::from_ne_bytes([m[4], m[5]]) & 0xff).collect();
        assert_eq!(kinds, vec![NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWTABLE, NFT_MSG_NEWCHAIN, 6, 6, 6]);
        // Every message is acknowledged and carries its own sequence number.
        let seqs: Vec<u32> = msgs.iter().map(|(m, _)| u32::from_ne_bytes([m[8], m[9], m[10], m[11]])).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
        for (m, _) in &msgs {
            assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]) as usize, m.len());
            assert!(u16::from_ne_bytes([m[6], m[7]]) & NLM_F_ACK != 0);
            assert_eq!(m[16], 2, "family ip");
        }
    }

    #[test]
    fn prefix_match_masks_only_partial_prefixes() {
        let count = |net: &str| {
            let mut b = Buf::default();
            match_prefix(&mut b, NftFamily::Ipv4, true, &net.parse().unwrap());
            let mut n = 0;
            let mut data = &b.bytes[..];
            while data.len() >= 4 {
                let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
                n += 1;
                data = &data[len..];
            }
            n
        };
        assert_eq!(count("10.0.0.0/8"), 3, "payload, bitwise, cmp");
        assert_eq!(count("10.0.0.1/32"), 2, "payload, cmp");
        assert_eq!(count("0.0.0.0/0"), 0, "matches everything");
    }

    #[test]
    fn mixed_families_are_refused() {
        let mut s = spec();
        s.exempt_destinations.push("fd7a:115c:a1e0::/48".parse().unwrap());
        assert!(s.validate().is_err());
    }

    #[test]
    fn parses_answers() {
        let mut ack = message(NLMSG_ERROR, 0, 9, 0, 0, |_| {});
        ack.truncate(NLMSG_HDRLEN);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        let len = ack.len() as u32;
        ack[0..4].copy_from_slice(&len.to_ne_bytes());
        let mut two = ack.clone();
        two.extend_from_slice(&ack);
        let msgs = parse_messages(&two).unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].seq, 9);
        assert_eq!(error_code(msgs[0].payload), Some(0));
        assert!(parse_messages(&two[..10]).unwrap().is_empty());
        let mut bad = two.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_messages(&bad).is_err());
    }
}
