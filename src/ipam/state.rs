//! The IPAM state and its file format, without any I/O: bytes in, bytes out.
//!
//! One text file holds a network's whole state. It is small to write, fast to read, and damage
//! to it is detected rather than misread:
//!
//! ```text
//! headcni-ipam-state 1
//! boot 6f1c9f0e-7d7f-4a39-9f54-1b2f7c1d0a11
//! set 0 used 2 last 10.244.1.3
//! range 0 10.244.1.0/24 10.244.1.2 10.244.1.254 10.244.1.1
//! exclude 0 10.244.1.128/28
//! records 2
//! ip 10.244.1.2 3f5a...c1 eth0 1764403200 default web-0 /var/run/netns/cni-1234
//! ip 10.244.1.3 9b1e...07 eth0 1764403201 kube-system dns-0 /var/run/netns/cni-5678
//! end 2 5d0c43a8e1f2b7c9
//! ```
//!
//! - The header names the boot the allocations were made in, each range set (its ranges with
//!   gateway, its exclusions, the number of addresses in use and the sequential cursor), and the
//!   number of records. `headcni ipam stats` and STATUS read totals from it without the records.
//! - One `ip` line per allocation: address, container id, ifname, time allocated (Unix seconds),
//!   pod namespace, pod name, netns path. Free-text fields are %-escaped (space, '%', control
//!   characters) and `-` stands for "unknown". Records are sorted by address, IPv4 first, which
//!   is the sorted used set the allocator needs, with no sort at load time.
//! - The `end` line repeats the record count and carries a 64-bit checksum of every byte before
//!   it: a truncated file has no valid `end` line, and garbage anywhere fails the checksum.

use super::allocator::{Interval, Pool};
use ipnetwork::IpNetwork;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Version of the format written; a file with a higher version is refused, not misread.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "headcni-ipam-state";
/// How an absent text field is written.
const UNKNOWN: &str = "-";

/// Why a state file could not be read; `line` is 1-based, 0 for the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", line_prefix(*.line), .reason)]
pub struct FormatError {
    pub line: usize,
    pub reason: String,
    /// The file was written by a newer HeadCNI: not damage, and not for repair to touch.
    pub newer_version: Option<u32>,
}

fn line_prefix(line: usize) -> String {
    if line > 0 { format!("line {line}: ") } else { String::new() }
}

impl FormatError {
    fn at(line: usize, reason: impl Into<String>) -> Self {
        Self { line, reason: reason.into(), newer_version: None }
    }
}

/// Address family of an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    fn index(self) -> usize {
        match self {
            Self::V4 => 0,
            Self::V6 => 1,
        }
    }
}

/// An address as the allocator sees it.
pub fn offset(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address at `offset` in `family` (IPv4 offsets are always below 2^32 by construction).
pub fn address(family: Family, offset: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(offset).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(offset)),
    }
}

/// One range of a range set: a subnet, the part of it handed out, and its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSpec {
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: Option<IpAddr>,
}

impl RangeSpec {
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == Family::of(self.start) && self.span().contains(offset(ip))
    }

    pub fn span(&self) -> Interval {
        Interval::new(offset(self.start), offset(self.end))
    }

    /// Addresses never handed out: the network address, the IPv4 broadcast address and the
    /// gateway.
    pub fn reserved(&self) -> Vec<Interval> {
        let mut out = vec![Interval::new(offset(self.subnet.network()), offset(self.subnet.network()))];
        if let IpNetwork::V4(net) = self.subnet {
            let broadcast = offset(IpAddr::V4(net.broadcast()));
            out.push(Interval::new(broadcast, broadcast));
        }
        if let Some(gw) = self.gateway {
            out.push(Interval::new(offset(gw), offset(gw)));
        }
        out
    }

    /// Addresses this range can hand out (its span minus its reserved addresses and `excludes`).
    pub fn pool(&self, excludes: &[IpNetwork]) -> Pool {
        let mut holes = self.reserved();
        holes.extend(exclude_intervals(excludes, Family::of(self.start)));
        Pool::new(&[self.span()], &holes)
    }
}

fn exclude_intervals(excludes: &[IpNetwork], family: Family) -> impl Iterator<Item = Interval> + '_ {
    excludes.iter().filter(move |n| Family::of(n.network()) == family).map(|n| {
        let lo = offset(n.network());
        let host_bits = u32::from(if n.is_ipv4() { 32u8 } else { 128u8 } - n.prefix());
        let size_minus_one = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
        Interval::new(lo, lo.saturating_add(size_minus_one))
    })
}

/// A range set: the ranges one address per ADD is taken from (one family), and the blocks
/// excluded from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub ranges: Vec<RangeSpec>,
    pub excludes: Vec<IpNetwork>,
}

impl SetSpec {
    /// The family of the set (a set is never empty and never mixes families).
    pub fn family(&self) -> Family {
        self.ranges.first().map(|r| Family::of(r.start)).unwrap_or(Family::V4)
    }

    pub fn pool(&self) -> Pool {
        let spans: Vec<Interval> = self.ranges.iter().map(RangeSpec::span).collect();
        let mut holes: Vec<Interval> = self.ranges.iter().flat_map(RangeSpec::reserved).collect();
        holes.extend(exclude_intervals(&self.excludes, self.family()));
        Pool::new(&spans, &holes)
    }

    pub fn range_of(&self, ip: IpAddr) -> Option<&RangeSpec> {
        self.ranges.iter().find(|r| r.contains(ip))
    }

    /// Short description for messages, e.g. "10.244.1.0/24" or "10.0.0.0/24,10.0.1.0/24".
    pub fn describe(&self) -> String {
        self.ranges.iter().map(|r| r.subnet.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// A range set as recorded in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetState {
    pub spec: SetSpec,
    /// The last address handed out from this set (the sequential cursor).
    pub last: Option<IpAddr>,
    /// Addresses of the set in use when the file was written.
    pub used: u128,
}

/// The header of a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub boot_id: String,
    pub sets: Vec<SetState>,
    pub records: usize,
}

/// One allocation, decoded. Empty strings stand for "unknown".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub address: IpAddr,
    pub container_id: String,
    pub ifname: String,
    pub allocated_at: u64,
    pub pod_namespace: String,
    pub pod_name: String,
    pub netns: String,
}

impl Allocation {
    fn encode(&self) -> String {
        format!(
            "ip {} {} {} {} {} {} {}",
            self.address,
            escape(&self.container_id),
            escape(&self.ifname),
            self.allocated_at,
            escape(&self.pod_namespace),
            escape(&self.pod_name),
            escape(&self.netns)
        )
    }

    fn decode(line: &str) -> Result<Self, String> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [tag, address, cid, ifname, at, ns, pod, netns] = fields[..] else {
            return Err(format!("expected 8 fields, found {}", fields.len()));
        };
        if tag != "ip" {
            return Err(format!("expected an \"ip\" record, found \"{}\"", tag.escape_debug()));
        }
        let container_id = unescape(cid)?;
        if !crate::cni::is_safe_name(&container_id) {
            return Err(format!("invalid container id \"{}\"", container_id.escape_debug()));
        }
        let ifname = unescape(ifname)?;
        if ifname.is_empty() {
            return Err("empty ifname".into());
        }
        Ok(Self {
            address: address.parse().map_err(|_| format!("invalid address \"{}\"", address.escape_debug()))?,
            container_id,
            ifname,
            allocated_at: at.parse().map_err(|_| format!("invalid time \"{}\"", at.escape_debug()))?,
            pod_namespace: unescape(ns)?,
            pod_name: unescape(pod)?,
            netns: unescape(netns)?,
        })
    }

    /// "namespace/name" of the pod, or "-" when the runtime did not say.
    pub fn pod(&self) -> String {
        match (self.pod_namespace.as_str(), self.pod_name.as_str()) {
            ("", "") => UNKNOWN.to_string(),
            (ns, name) => format!("{ns}/{name}"),
        }
    }
}

/// Escapes a free-text field so that it is one space-free token.
pub fn escape(s: &str) -> Cow<'_, str> {
    if s.is_empty() {
        return Cow::Borrowed(UNKNOWN);
    }
    if s == UNKNOWN {
        return Cow::Borrowed("%2D");
    }
    let needs = |c: char| c == ' ' || c == '%' || c.is_control() || c.is_whitespace();
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Reverses [`escape`].
pub fn unescape(s: &str) -> Result<String, String> {
    if s == UNKNOWN {
        return Ok(String::new());
    }
    if s.is_empty() {
        return Err("empty field".into());
    }
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("bad %-escape")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "escaped field is not UTF-8".to_string())
}

/// 64-bit checksum of the state text. Not cryptographic: it catches truncation, torn or
/// zeroed blocks and stray edits. Four independent lanes keep it at memory speed.
pub fn checksum(data: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    let round = |acc: u64, word: u64| acc.wrapping_add(word.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1);
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let mut lanes = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
    let mut stripes = data.chunks_exact(32);
    for stripe in &mut stripes {
        for (lane, chunk) in lanes.iter_mut().zip(stripe.chunks_exact(8)) {
            *lane = round(*lane, word(chunk));
        }
    }
    let mut h = lanes[0].rotate_left(1) ^ lanes[1].rotate_left(7) ^ lanes[2].rotate_left(12) ^ lanes[3].rotate_left(18);
    h = h.wrapping_add(data.len() as u64).wrapping_mul(P3);
    for chunk in stripes.remainder().chunks(8) {
        h = round(h, word(chunk) ^ (chunk.len() as u64) << 56);
    }
    // Final avalanche so that every input bit reaches every output bit.
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// The sorted addresses of one family and their record lines, index for index.
#[derive(Debug, Clone, Default)]
struct Column<'a> {
    offsets: Vec<u128>,
    lines: Vec<Cow<'a, str>>,
}

impl Column<'_> {
    fn remove(&mut self, index: usize) {
        self.offsets.remove(index);
        self.lines.remove(index);
    }
}

/// The state of one network: the header and the allocations, borrowing the lines of the file
/// it was read from so that loading allocates almost nothing and saving copies lines verbatim.
#[derive(Debug, Clone)]
pub struct State<'a> {
    pub boot_id: String,
    pub sets: Vec<SetState>,
    columns: [Column<'a>; 2],
}

/// Where a record line keeps the container id: right after "ip <address> ".
fn attachment_part(line: &str) -> &str {
    let rest = line.get(3..).unwrap_or("");
    rest.find(' ').map(|i| &rest[i..]).unwrap_or("")
}

impl<'a> State<'a> {
    /// An empty state for `boot_id`.
    pub fn new(boot_id: &str) -> State<'static> {
        State { boot_id: boot_id.to_string(), sets: Vec::new(), columns: Default::default() }
    }

    pub fn len(&self) -> usize {
        self.columns.iter().map(|c| c.offsets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sorted offsets in use in `family`.
    pub fn used(&self, family: Family) -> &[u128] {
        &self.columns[family.index()].offsets
    }

    pub fn is_used(&self, ip: IpAddr) -> bool {
        self.used(Family::of(ip)).binary_search(&offset(ip)).is_ok()
    }

    /// Every allocation, decoded, in address order. Lines that do not decode (possible only in
    /// a file edited by hand, since the checksum guards the rest) are skipped.
    pub fn allocations(&self) -> impl Iterator<Item = Allocation> + '_ {
        self.columns.iter().flat_map(|c| c.lines.iter()).filter_map(|l| Allocation::decode(l).ok())
    }

    fn needle(container_id: &str, ifname: &str) -> String {
        format!(" {} {} ", escape(container_id), escape(ifname))
    }

    /// Addresses held by the attachment `container_id`/`ifname`, in address order.
    pub fn held_by(&self, container_id: &str, ifname: &str) -> Vec<IpAddr> {
        let needle = Self::needle(container_id, ifname);
        let mut out = Vec::new();
        for (family, column) in [Family::V4, Family::V6].into_iter().zip(&self.columns) {
            for (i, line) in column.lines.iter().enumerate() {
                if attachment_part(line).starts_with(&needle) {
                    out.push(address(family, column.offsets[i]));
                }
            }
        }
        out
    }

    /// Adds an allocation; refuses an address already in use (returns false).
    pub fn insert(&mut self, allocation: &Allocation) -> bool {
        let column = &mut self.columns[Family::of(allocation.address).index()];
        let at = offset(allocation.address);
        match column.offsets.binary_search(&at) {
            Ok(_) => false,
            Err(index) => {
                column.offsets.insert(index, at);
                column.lines.insert(index, Cow::Owned(allocation.encode()));
                true
            }
        }
    }

    /// Removes the allocations of `container_id`/`ifname` and returns them.
    pub fn release(&mut self, container_id: &str, ifname: &str) -> Vec<Allocation> {
        let needle = Self::needle(container_id, ifname);
        self.remove_where(|line| attachment_part(line).starts_with(&needle))
    }

    /// Removes every allocation for which `keep` is false and returns them.
    pub fn retain(&mut self, mut keep: impl FnMut(&Allocation) -> bool) -> Vec<Allocation> {
        self.remove_where(|line| Allocation::decode(line).map(|a| !keep(&a)).unwrap_or(false))
    }

    fn remove_where(&mut self, mut remove: impl FnMut(&str) -> bool) -> Vec<Allocation> {
        let mut removed = Vec::new();
        for column in &mut self.columns {
            let mut i = 0;
            while i < column.lines.len() {
                if remove(&column.lines[i]) {
                    if let Ok(a) = Allocation::decode(&column.lines[i]) {
                        removed.push(a);
                    }
                    column.remove(i);
                } else {
                    i += 1;
                }
            }
        }
        removed
    }

    /// Encodes the state, recomputing each set's count of addresses in use.
    pub fn encode(&self) -> Vec<u8> {
        let body_len: usize = self.columns.iter().flat_map(|c| c.lines.iter()).map(|l| l.len() + 1).sum();
        let mut out = String::with_capacity(body_len + 512);
        let _ = writeln!(out, "{MAGIC} {FORMAT_VERSION}");
        let _ = writeln!(out, "boot {}", self.boot_id);
        for (i, set) in self.sets.iter().enumerate() {
            let used = set.spec.pool().used_count(self.used(set.spec.family()));
            let last = set.last.map(|l| l.to_string()).unwrap_or_else(|| UNKNOWN.to_string());
            let _ = writeln!(out, "set {i} used {used} last {last}");
            for r in &set.spec.ranges {
                let gw = r.gateway.map(|g| g.to_string()).unwrap_or_else(|| UNKNOWN.to_string());
                let _ = writeln!(out, "range {i} {} {} {} {gw}", r.subnet, r.start, r.end);
            }
            for e in &set.spec.excludes {
                let _ = writeln!(out, "exclude {i} {e}");
            }
        }
        let _ = writeln!(out, "records {}", self.len());
        for line in self.columns.iter().flat_map(|c| c.lines.iter()) {
            out.push_str(line);
            out.push('\n');
        }
        let sum = checksum(out.as_bytes());
        let _ = writeln!(out, "end {} {sum:016x}", self.len());
        out.into_bytes()
    }

    /// The header with the counts as [`encode`](Self::encode) would write them.
    pub fn header(&self) -> Header {
        let sets = self
            .sets
            .iter()
            .map(|s| SetState { used: s.spec.pool().used_count(self.used(s.spec.family())), ..s.clone() })
            .collect();
        Header { boot_id: self.boot_id.clone(), sets, records: self.len() }
    }

    /// Parses a whole state file written in boot `boot_id`, verifying its checksum first.
    pub fn parse(data: &'a [u8], boot_id: &str) -> Result<State<'a>, FormatError> {
        let (body, trailer) = verified_body(data)?;
        let text = std::str::from_utf8(body).map_err(|e| FormatError::at(0, format!("not UTF-8 text: {e}")))?;
        let (header, records_at, first_record_line) = parse_header(text, true)?;
        if header.boot_id != boot_id {
            return Err(FormatError::at(2, format!("boot id {} does not match its file name", header.boot_id)));
        }
        // The checksum vouches for the count; the cap only guards against a hand-made header.
        let expected = header.records.min(data.len() / 16);
        let mut columns: [Column<'a>; 2] = Default::default();
        for column in &mut columns {
            column.offsets.reserve(expected);
            column.lines.reserve(expected);
        }
        let mut count = 0usize;
        let mut seen_v6 = false;
        for (i, line) in text[records_at..].split_terminator('\n').enumerate() {
            let line_no = first_record_line + i;
            let (family, at) = parse_record_address(line).map_err(|r| FormatError::at(line_no, r))?;
            if family == Family::V4 && seen_v6 {
                return Err(FormatError::at(line_no, "IPv4 record after IPv6 records"));
            }
            seen_v6 |= family == Family::V6;
            let column = &mut columns[family.index()];
            if column.offsets.last().is_some_and(|&prev| prev >= at) {
                return Err(FormatError::at(
                    line_no,
                    format!("address {} out of order or recorded twice", address(family, at)),
                ));
            }
            column.offsets.push(at);
            column.lines.push(Cow::Borrowed(line));
            count += 1;
        }
        if count != header.records || count != trailer.records {
            return Err(FormatError::at(
                0,
                format!("header announces {} records, the end line {}, found {count}", header.records, trailer.records),
            ));
        }
        Ok(State { boot_id: header.boot_id, sets: header.sets, columns })
    }

    /// A state that owns its lines (for keeping beyond the buffer it was read from).
    pub fn into_owned(self) -> State<'static> {
        let columns = self.columns.map(|c| Column {
            offsets: c.offsets,
            lines: c.lines.into_iter().map(|l| Cow::Owned(l.into_owned())).collect(),
        });
        State { boot_id: self.boot_id, sets: self.sets, columns }
    }
}

/// Checks the `end` line and the checksum, returning the bytes the checksum covers.
fn verified_body(data: &[u8]) -> Result<(&[u8], Trailer), FormatError> {
    if data.is_empty() {
        return Err(FormatError::at(0, "the file is empty"));
    }
    let trailer = parse_trailer(data)?;
    let body = &data[..data.len() - trailer.len];
    if checksum(body) != trailer.checksum {
        return Err(FormatError::at(0, "checksum mismatch: the file was altered or damaged"));
    }
    Ok((body, trailer))
}

/// The `end` line of a state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub records: usize,
    pub checksum: u64,
    /// Length of the trailer line in bytes, newline included.
    pub len: usize,
}

/// Parses the `end` line from the tail of a file (the whole file or just its last bytes).
pub fn parse_trailer(tail: &[u8]) -> Result<Trailer, FormatError> {
    let truncated = || FormatError::at(0, "no valid end line: the file is truncated or damaged");
    let without_newline = tail.strip_suffix(b"\n").ok_or_else(truncated)?;
    let start = without_newline.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
    let line = std::str::from_utf8(&without_newline[start..]).map_err(|_| truncated())?;
    let mut words = line.split(' ');
    let (Some("end"), Some(records), Some(sum), None) = (words.next(), words.next(), words.next(), words.next()) else {
        return Err(truncated());
    };
    if records.is_empty() || !records.bytes().all(|b| b.is_ascii_digit()) {
        return Err(truncated());
    }
    let records = records.parse().map_err(|_| truncated())?;
    // Exactly as written: 16 lowercase hex digits (from_str_radix alone would accept "A" for "a").
    if sum.len() != 16 || !sum.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(truncated());
    }
    let checksum = u64::from_str_radix(sum, 16).map_err(|_| truncated())?;
    Ok(Trailer { records, checksum, len: line.len() + 1 })
}

fn parse_record_address(line: &str) -> Result<(Family, u128), String> {
    let rest = line.strip_prefix("ip ").ok_or_else(|| {
        let shown: String = line.chars().take(40).collect();
        format!("expected an \"ip\" record, found \"{}\"", shown.escape_debug())
    })?;
    if line.bytes().filter(|&b| b == b' ').count() != 7 {
        return Err("a record has 8 fields".into());
    }
    let text = rest.split(' ').next().unwrap_or("");
    let ip: IpAddr = text.parse().map_err(|_| format!("invalid address \"{}\"", text.escape_debug()))?;
    Ok((Family::of(ip), offset(ip)))
}

/// Parses the header lines up to and including `records`. Returns the header, the byte offset
/// of the first record and its line number. With `complete == false` a text that ends inside
/// the header is reported as such (line 0, "header incomplete") so the caller can read more.
pub fn parse_header(text: &str, complete: bool) -> Result<(Header, usize, usize), FormatError> {
    let mut reader = LineReader { lines: text.split_inclusive('\n'), consumed: 0, line_no: 0, complete };

    let first = reader.next()?.ok_or_else(|| FormatError::at(1, "missing format line"))?;
    let version = first
        .strip_prefix(MAGIC)
        .and_then(|v| v.strip_prefix(' '))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| FormatError::at(1, "not a headcni-ipam state file"))?;
    if version > FORMAT_VERSION {
        return Err(FormatError {
            line: 1,
            reason: format!(
                "format version {version} was written by a newer headcni (this one reads {FORMAT_VERSION})"
            ),
            newer_version: Some(version),
        });
    }
    let boot_line = reader.next()?.ok_or_else(|| FormatError::at(2, "missing boot line"))?;
    let boot_id = boot_line
        .strip_prefix("boot ")
        .filter(|b| super::store::is_valid_boot_id(b))
        .ok_or_else(|| FormatError::at(2, "expected \"boot <boot id>\""))?
        .to_string();

    let mut sets: Vec<SetState> = Vec::new();
    loop {
        let here = reader.line_no + 1;
        let line = reader.next()?.ok_or_else(|| FormatError::at(here, "missing records line"))?;
        let at = |reason: String| FormatError::at(here, reason);
        let words: Vec<&str> = line.split(' ').collect();
        match words[..] {
            ["records", n] => {
                let records = n.parse().map_err(|_| at(format!("invalid record count \"{}\"", n.escape_debug())))?;
                if let Some((i, _)) = sets.iter().enumerate().find(|(_, s)| s.spec.ranges.is_empty()) {
                    return Err(at(format!("set {i} has no range")));
                }
                return Ok((Header { boot_id, sets, records }, reader.consumed, reader.line_no + 1));
            }
            ["set", index, "used", used, "last", last] => {
                expect_index(index, sets.len()).map_err(&at)?;
                let used = used.parse().map_err(|_| at(format!("invalid count \"{}\"", used.escape_debug())))?;
                let last = optional_ip(last).map_err(&at)?;
                sets.push(SetState { spec: SetSpec { ranges: Vec::new(), excludes: Vec::new() }, last, used });
            }
            ["range", index, subnet, start, end, gateway] => {
                let set = current_set(&mut sets, index).map_err(&at)?;
                let subnet: IpNetwork =
                    subnet.parse().map_err(|_| at(format!("invalid subnet \"{}\"", subnet.escape_debug())))?;
                let start = optional_ip(start).map_err(&at)?.ok_or_else(|| at("range start missing".into()))?;
                let end = optional_ip(end).map_err(&at)?.ok_or_else(|| at("range end missing".into()))?;
                let gateway = optional_ip(gateway).map_err(&at)?;
                let family = Family::of(subnet.network());
                let consistent = [start, end].iter().all(|ip| Family::of(*ip) == family && subnet.contains(*ip))
                    && offset(start) <= offset(end)
                    && gateway.is_none_or(|g| Family::of(g) == family)
                    && set.spec.ranges.first().is_none_or(|r| Family::of(r.start) == family);
                if !consistent {
                    return Err(at("inconsistent range".into()));
                }
                set.spec.ranges.push(RangeSpec { subnet, start, end, gateway });
            }
            ["exclude", index, block] => {
                let set = current_set(&mut sets, index).map_err(&at)?;
                let block: IpNetwork =
                    block.parse().map_err(|_| at(format!("invalid exclusion \"{}\"", block.escape_debug())))?;
                set.spec.excludes.push(block);
            }
            _ => {
                let shown: String = line.chars().take(40).collect();
                return Err(at(format!("unexpected header line \"{}\"", shown.escape_debug())));
            }
        }
    }
}

/// Hands out header lines one at a time, counting bytes and lines.
struct LineReader<'t> {
    lines: std::str::SplitInclusive<'t, char>,
    consumed: usize,
    line_no: usize,
    complete: bool,
}

impl<'t> LineReader<'t> {
    fn next(&mut self) -> Result<Option<&'t str>, FormatError> {
        match self.lines.next() {
            Some(l) if l.ends_with('\n') => {
                self.consumed += l.len();
                self.line_no += 1;
                Ok(Some(&l[..l.len() - 1]))
            }
            _ if !self.complete => Err(FormatError::at(0, "header incomplete")),
            _ => Ok(None),
        }
    }
}

fn expect_index(text: &str, expected: usize) -> Result<(), String> {
    match text.parse::<usize>() {
        Ok(i) if i == expected => Ok(()),
        _ => Err(format!("expected set {expected}, found \"{}\"", text.escape_debug())),
    }
}

fn current_set<'s>(sets: &'s mut [SetState], index: &str) -> Result<&'s mut SetState, String> {
    let expected = sets.len().checked_sub(1).ok_or("range or exclusion before any set")?;
    expect_index(index, expected)?;
    sets.last_mut().ok_or_else(|| "no set".to_string())
}

fn optional_ip(text: &str) -> Result<Option<IpAddr>, String> {
    if text == UNKNOWN {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| format!("invalid address \"{}\"", text.escape_debug()))
}

/// What [`salvage`] recovered from a damaged file.
#[derive(Debug)]
pub struct Salvaged {
    pub state: State<'static>,
    /// Lines that were dropped, with the reason (1-based line numbers).
    pub dropped: Vec<(usize, String)>,
}

/// Recovers what can be recovered from a damaged state file: the range sets if the header
/// still parses, and every record line that decodes on its own and does not claim an address
/// an earlier line already claimed.
pub fn salvage(data: &[u8], boot_id: &str) -> Salvaged {
    let mut state = State::new(boot_id);
    let mut dropped = Vec::new();
    let text = String::from_utf8_lossy(data);
    if let Ok((header, _, _)) = parse_header(&text, true) {
        state.sets = header.sets;
    }
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if !line.starts_with("ip ") {
            continue;
        }
        match Allocation::decode(line) {
            Ok(a) => {
                if !state.insert(&a) {
                    dropped.push((line_no, format!("address {} already claimed by an earlier line", a.address)));
                }
            }
            Err(reason) => dropped.push((line_no, reason)),
        }
    }
    Salvaged { state, dropped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOOT: &str = "6f1c9f0e-7d7f-4a39-9f54-1b2f7c1d0a11";

    fn set(subnet: &str, start: &str, end: &str, gw: &str) -> SetState {
        SetState {
            spec: SetSpec {
                ranges: vec![RangeSpec {
                    subnet: subnet.parse().unwrap(),
                    start: start.parse().unwrap(),
                    end: end.parse().unwrap(),
                    gateway: Some(gw.parse().unwrap()),
                }],
                excludes: Vec::new(),
            },
            last: None,
            used: 0,
        }
    }

    fn alloc(ip: &str, cid: &str) -> Allocation {
        Allocation {
            address: ip.parse().unwrap(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            allocated_at: 1_764_403_200,
            pod_namespace: "default".into(),
            pod_name: format!("pod {cid}"),
            netns: format!("/var/run/netns/cni-{cid}"),
        }
    }

    fn sample() -> State<'static> {
        let mut s = State::new(BOOT);
        s.sets.push(set("10.244.1.0/24", "10.244.1.2", "10.244.1.254", "10.244.1.1"));
        s.sets.push(set("fd00:10:244:1::/64", "fd00:10:244:1::2", "fd00:10:244:1::ffff", "fd00:10:244:1::1"));
        s.sets[0].spec.excludes.push("10.244.1.128/28".parse().unwrap());
        s.sets[0].last = Some("10.244.1.3".parse().unwrap());
        for (ip, cid) in [("10.244.1.3", "b"), ("fd00:10:244:1::2", "a"), ("10.244.1.2", "a")] {
            assert!(s.insert(&alloc(ip, cid)));
        }
        s
    }

    #[test]
    fn round_trips_and_keeps_records_sorted() {
        let s = sample();
        let bytes = s.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("headcni-ipam-state 1\nboot 6f1c9f0e"), "{text}");
        assert!(text.contains("set 0 used 2 last 10.244.1.3\n"), "{text}");
        assert!(text.contains("exclude 0 10.244.1.128/28\n"));
        let ips: Vec<&str> = text.lines().filter(|l| l.starts_with("ip ")).map(|l| &l[3..13]).collect();
        assert_eq!(ips, ["10.244.1.2", "10.244.1.3", "fd00:10:24"]);
        let back = State::parse(&bytes, BOOT).unwrap();
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.sets, s.header().sets);
        assert_eq!(back.allocations().collect::<Vec<_>>(), s.allocations().collect::<Vec<_>>());
        assert_eq!(back.allocations().next().unwrap().pod_name, "pod a");
    }

    #[test]
    fn held_by_and_release_match_container_and_ifname() {
        let mut s = sample();
        let a: Vec<IpAddr> = vec!["10.244.1.2".parse().unwrap(), "fd00:10:244:1::2".parse().unwrap()];
        assert_eq!(s.held_by("a", "eth0"), a);
        assert!(s.held_by("a", "eth1").is_empty());
        assert!(s.held_by("", "eth0").is_empty());
        let released = s.release("a", "eth0");
        assert_eq!(released.iter().map(|r| r.address).collect::<Vec<_>>(), a);
        assert_eq!(s.len(), 1);
        assert!(s.release("a", "eth0").is_empty());
        assert!(!s.insert(&alloc("10.244.1.3", "c")), "an address in use is refused");
    }

    #[test]
    fn every_kind_of_damage_is_detected() {
        let good = sample().encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "empty"),
            (good[..good.len() - 1].to_vec(), "truncated"),
            (good[..good.len() / 2].to_vec(), "truncated"),
            (vec![0u8; 4096], "truncated"),
            (b"garbage\n".to_vec(), "truncated"),
            (
                {
                    let mut g = good.clone();
                    g[40] ^= 0x20;
                    g
                },
                "checksum",
            ),
            (
                {
                    let mut g = good.clone();
                    g[100..116].fill(0);
                    g
                },
                "checksum",
            ),
        ];
        for (bytes, needle) in cases {
            let err = State::parse(&bytes, BOOT).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
        }
        let err = State::parse(&good, "00000000-0000-0000-0000-000000000000").unwrap_err();
        assert!(err.to_string().contains("boot id"), "{err}");
    }

    /// A file that passes the checksum but is inconsistent (a buggy or hand-made writer).
    #[test]
    fn structural_errors_name_the_line() {
        let reseal = |text: &str| {
            let sum = checksum(text.as_bytes());
            let n = text.lines().filter(|l| l.starts_with("ip ")).count();
            format!("{text}end {n} {sum:016x}\n").into_bytes()
        };
        let head = format!("headcni-ipam-state 1\nboot {BOOT}\n");
        let rec = |ip: &str| format!("ip {ip} c eth0 1 - - -\n");
        let cases = [
            (
                format!("{head}records 2\n{}{}", rec("10.0.0.2"), rec("10.0.0.2")),
                "line 5: address 10.0.0.2 out of order",
            ),
            (format!("{head}records 2\n{}{}", rec("fd00::2"), rec("10.0.0.2")), "line 5: IPv4 record after IPv6"),
            (format!("{head}records 1\nip 10.0.0.2 c eth0\n"), "line 4: a record has 8 fields"),
            (format!("{head}records 2\n{}", rec("10.0.0.2")), "announces 2 records"),
            (format!("{head}range 0 10.0.0.0/24 10.0.0.2 10.0.0.9 -\nrecords 0\n"), "line 3: range or exclusion"),
            (format!("{head}set 1 used 0 last -\nrecords 0\n"), "line 3: expected set 0"),
            (format!("headcni-ipam-state 9\nboot {BOOT}\nrecords 0\n"), "newer headcni"),
        ];
        for (text, needle) in cases {
            let err = State::parse(&reseal(&text), BOOT).unwrap_err();
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn salvage_keeps_every_decodable_record_once() {
        let good = String::from_utf8(sample().encode()).unwrap();
        let damaged = good.replace("ip 10.244.1.3 b", "ip 10.244.1.X b") + "ip 10.244.1.2 z eth0 1 - - -\n\0\0\0";
        let salvaged = salvage(damaged.as_bytes(), BOOT);
        assert_eq!(salvaged.state.len(), 2);
        assert_eq!(salvaged.state.sets.len(), 2);
        assert_eq!(salvaged.dropped.len(), 2, "{:?}", salvaged.dropped);
        assert!(salvaged.dropped[1].1.contains("already claimed"));
        // What salvage produces is a valid file again.
        State::parse(&salvaged.state.encode(), BOOT).unwrap();
    }

    #[test]
    fn escaping_is_reversible_and_space_free() {
        for s in ["", "-", "a b", "100%", "tab\there", "new\nline", "ünïcode", "%2D", "x\u{2028}y"] {
            let e = escape(s);
            assert!(!e.contains(' ') && !e.contains('\n') && !e.is_empty(), "{e:?}");
            assert_eq!(unescape(&e).unwrap(), s);
        }
        assert!(unescape("%G0").is_err());
        assert!(unescape("%C3").is_err(), "a lone UTF-8 lead byte");
    }

    #[test]
    fn trailer_alone_is_readable_from_the_tail() {
        let bytes = sample().encode();
        let t = parse_trailer(&bytes[bytes.len() - 40..]).unwrap();
        assert_eq!(t.records, 3);
        assert_eq!(t.checksum, checksum(&bytes[..bytes.len() - t.len]));
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = State::parse(&data, BOOT);
            let _ = salvage(&data, BOOT);
        }

        #[test]
        fn any_truncation_or_byte_flip_is_detected(cut in 0usize..10_000, flip in 0usize..10_000, bit in 0u8..8) {
            let good = sample().encode();
            let cut = cut % good.len();
            prop_assert!(State::parse(&good[..cut], BOOT).is_err());
            let mut bad = good.clone();
            let at = flip % good.len();
            bad[at] ^= 1 << bit;
            prop_assert!(State::parse(&bad, BOOT).is_err());
        }

        #[test]
        fn arbitrary_fields_round_trip(
            ns in ".{0,20}", pod in ".{0,40}", netns in ".{0,60}", ifname in "[^/: \\t\\n]{1,15}",
        ) {
            let mut s = State::new(BOOT);
            let a = Allocation {
                address: "10.0.0.5".parse().unwrap(),
                container_id: "c-1".into(),
                ifname: ifname.clone(),
                allocated_at: 7,
                pod_namespace: ns,
                pod_name: pod,
                netns,
            };
            prop_assert!(s.insert(&a));
            let bytes = s.encode();
            let back = State::parse(&bytes, BOOT).unwrap();
            prop_assert_eq!(back.allocations().collect::<Vec<_>>(), vec![a]);
            prop_assert_eq!(back.held_by("c-1", &ifname).len(), 1);
        }
    }
}
