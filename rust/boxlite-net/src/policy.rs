//! The egress policy: which names a box may resolve and which addresses it may reach.
//!
//! Decided per connection from the destination address alone (the guest's word is never
//! taken): see the crate documentation for the rules.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::HOST_ALIAS_NAME;

/// How long an address learned from the DNS answer for an allowed name stays reachable:
/// the answers' TTL ([`crate::DNS_TTL_SECS`]) plus a little slack for the guest's clock.
pub const LEARNED_TTL: Duration = Duration::from_secs(crate::DNS_TTL_SECS as u64 + 30);

/// Learned addresses kept at most; beyond, expired ones go, then the oldest.
const MAX_LEARNED: usize = 4096;

/// One `allow_net` entry. Parse user text with [`str::parse`]; [`fmt::Display`] gives it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AllowEntry {
    /// An exact host name, lowercased, without a trailing dot: `pypi.org`.
    Name(String),
    /// `*.example.com`: every name below `example.com` (not `example.com` itself); `*` alone
    /// matches every name.
    Wildcard(String),
    /// One address.
    Ip(IpAddr),
    /// A network.
    Cidr(Cidr),
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntry::Name(n) | AllowEntry::Wildcard(n) => f.write_str(n),
            AllowEntry::Ip(ip) => write!(f, "{ip}"),
            AllowEntry::Cidr(c) => write!(f, "{c}"),
        }
    }
}

/// An IP network: an address with its host bits zero and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// A network; `None` when the prefix is too long for the family or host bits are set.
    /// IPv4-mapped IPv6 networks (`::ffff:a.b.c.d/96+n`) become their IPv4 form.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Cidr> {
        let (addr, prefix_len) = match addr {
            IpAddr::V6(v6) if prefix_len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix_len - 96),
                None => (addr, prefix_len),
            },
            _ => (addr, prefix_len),
        };
        let (bits, width) = bits(addr);
        if prefix_len > width || bits & !mask(width, prefix_len) != 0 {
            return None;
        }
        Some(Cidr { addr, prefix_len })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` (in either form, IPv4-mapped IPv6 counts as IPv4) lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (bits_ip, width) = bits(ip);
        let (bits_net, _) = bits(self.addr);
        bits_ip & mask(width, self.prefix_len) == bits_net
    }

    /// Whether this network lies entirely inside `outer`.
    fn is_within(&self, outer: &Cidr) -> bool {
        self.prefix_len >= outer.prefix_len && outer.contains(self.addr)
    }

    fn is_single_address(&self) -> bool {
        self.prefix_len == bits(self.addr).1
    }

    fn host(ip: IpAddr) -> Cidr {
        let ip = ip.to_canonical();
        Cidr {
            addr: ip,
            prefix_len: bits(ip).1,
        }
    }

    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix_len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix_len,
        }
    }

    const fn v6(first: u16, prefix_len: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0)),
            prefix_len,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn mask(width: u8, prefix_len: u8) -> u128 {
    let full = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    if prefix_len == 0 {
        0
    } else {
        (u128::MAX << (width - prefix_len.min(width))) & full
    }
}

/// Why an `allow_net` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid allow_net entry {entry:?}: {problem}; accepted forms: a host name (pypi.org), a \
     wildcard (*.example.com, or * for every name), an IP address (203.0.113.7, 2001:db8::1) \
     or a CIDR (10.0.0.0/8, fd00::/8)"
)]
pub struct ParseAllowEntryError {
    /// The text as given.
    pub entry: String,
    /// What is wrong with it.
    pub problem: AllowEntryProblem,
}

/// What is wrong with an `allow_net` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowEntryProblem {
    /// Nothing but white space.
    Empty,
    /// A URL or a `host:port`: entries name hosts, every port is allowed.
    UrlOrPort,
    /// The part after `/` is not a prefix length that fits the address.
    BadPrefix,
    /// A network written with host bits set; the network meant is given.
    HostBitsSet {
        /// The network with the host bits cleared.
        network: String,
    },
    /// Looks like an address but does not parse as one.
    BadAddress,
    /// A `*` anywhere but as a whole leading label.
    BadWildcard,
    /// Not a valid host name, with the reason.
    BadName(&'static str),
}

impl fmt::Display for AllowEntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowEntryProblem::Empty => f.write_str("it is empty"),
            AllowEntryProblem::UrlOrPort => f.write_str(
                "URLs and ports are not accepted (name the host; every port is allowed)",
            ),
            AllowEntryProblem::BadPrefix => {
                f.write_str("the prefix length after '/' is not 0-32 (IPv4) or 0-128 (IPv6)")
            }
            AllowEntryProblem::HostBitsSet { network } => {
                write!(
                    f,
                    "the address has bits set beyond the prefix (did you mean {network}?)"
                )
            }
            AllowEntryProblem::BadAddress => f.write_str("it is not a valid IP address"),
            AllowEntryProblem::BadWildcard => {
                f.write_str("'*' is only accepted as a whole leading label, as in *.example.com")
            }
            AllowEntryProblem::BadName(why) => write!(f, "it is not a valid host name: {why}"),
        }
    }
}

impl FromStr for AllowEntry {
    type Err = ParseAllowEntryError;

    fn from_str(s: &str) -> Result<AllowEntry, ParseAllowEntryError> {
        let err = |problem| ParseAllowEntryError {
            entry: s.to_string(),
            problem,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err(AllowEntryProblem::Empty));
        }
        if t.contains("://") {
            return Err(err(AllowEntryProblem::UrlOrPort));
        }
        if let Some((addr, prefix)) = t.split_once('/') {
            let addr = parse_ip(addr).ok_or_else(|| err(AllowEntryProblem::BadAddress))?;
            let prefix: u8 = prefix
                .parse()
                .map_err(|_| err(AllowEntryProblem::BadPrefix))?;
            let width = bits(addr).1;
            if prefix > width {
                return Err(err(AllowEntryProblem::BadPrefix));
            }
            return match Cidr::new(addr, prefix) {
                Some(c) => Ok(AllowEntry::Cidr(c)),
                None => {
                    let (b, w) = bits(addr);
                    let net = b & mask(w, prefix);
                    let net = match addr {
                        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(net as u32)),
                        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(net)),
                    };
                    Err(err(AllowEntryProblem::HostBitsSet {
                        network: format!("{net}/{prefix}"),
                    }))
                }
            };
        }
        if let Some(ip) = parse_ip(t) {
            return Ok(AllowEntry::Ip(ip.to_canonical()));
        }
        if t.starts_with('[') || t.contains(':') {
            return Err(err(AllowEntryProblem::UrlOrPort));
        }
        if t == "*" {
            return Ok(AllowEntry::Wildcard("*".into()));
        }
        if let Some(rest) = t.strip_prefix("*.") {
            if rest.contains('*') {
                return Err(err(AllowEntryProblem::BadWildcard));
            }
            let name = normalize_name(rest).map_err(|why| err(AllowEntryProblem::BadName(why)))?;
            return Ok(AllowEntry::Wildcard(format!("*.{name}")));
        }
        if t.contains('*') {
            return Err(err(AllowEntryProblem::BadWildcard));
        }
        match normalize_name(t) {
            Ok(name) => Ok(AllowEntry::Name(name)),
            Err(NUMERIC_TLD) => Err(err(AllowEntryProblem::BadAddress)),
            Err(why) => Err(err(AllowEntryProblem::BadName(why))),
        }
    }
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    s.parse().ok()
}

const NUMERIC_TLD: &str = "the last label must start with a letter";

/// Lowercases a host name and drops one trailing dot; refuses anything that is not a plain
/// DNS host name. The last label must start with a letter, so that numeric forms the host
/// resolver would read as addresses (`1.2.3.4`, `0x7f000001`) are never names.
pub(crate) fn normalize_name(name: &str) -> Result<String, &'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-', '_' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
        last = label;
    }
    if !last.as_bytes()[0].is_ascii_alphabetic() {
        return Err(NUMERIC_TLD);
    }
    Ok(name.to_ascii_lowercase())
}

/// The kinds of destination the policy tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Loopback,
    /// 0.0.0.0/8 and `::`.
    ThisNetwork,
    LinkLocal,
    Multicast,
    Broadcast,
    /// 240.0.0.0/4.
    Reserved,
    Private,
    Public,
}

const SPECIAL_V4: &[(Cidr, Class)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), Class::ThisNetwork),
    (Cidr::v4(127, 0, 0, 0, 8), Class::Loopback),
    (Cidr::v4(169, 254, 0, 0, 16), Class::LinkLocal),
    (Cidr::v4(224, 0, 0, 0, 4), Class::Multicast),
    (Cidr::v4(255, 255, 255, 255, 32), Class::Broadcast),
    (Cidr::v4(240, 0, 0, 0, 4), Class::Reserved),
    (Cidr::v4(10, 0, 0, 0, 8), Class::Private),
    (Cidr::v4(172, 16, 0, 0, 12), Class::Private),
    (Cidr::v4(192, 168, 0, 0, 16), Class::Private),
    (Cidr::v4(100, 64, 0, 0, 10), Class::Private),
];

const SPECIAL_V6: &[(Cidr, Class)] = &[
    (Cidr::v6(0xfe80, 10), Class::LinkLocal),
    (Cidr::v6(0xff00, 8), Class::Multicast),
    (Cidr::v6(0xfc00, 7), Class::Private),
    // Deprecated site-local addresses are as private as ULAs.
    (Cidr::v6(0xfec0, 10), Class::Private),
];

/// The class of an address and the special range it lies in (the address itself when public).
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4) take the class of
/// that IPv4 address, so `::ffff:127.0.0.1` is loopback.
pub(crate) fn classify(ip: IpAddr) -> (Class, Cidr) {
    let ip = ip.to_canonical();
    match ip {
        IpAddr::V4(_) => SPECIAL_V4
            .iter()
            .find(|(range, _)| range.contains(ip))
            .map_or((Class::Public, Cidr::host(ip)), |&(r, c)| (c, r)),
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                return (Class::Loopback, Cidr::host(ip));
            }
            if v6.is_unspecified() {
                return (Class::ThisNetwork, Cidr::host(ip));
            }
            if let Some(v4) = embedded_v4(v6) {
                let (class, _) = classify(IpAddr::V4(v4));
                if class != Class::Public {
                    return (class, Cidr::host(ip));
                }
            }
            SPECIAL_V6
                .iter()
                .find(|(range, _)| range.contains(ip))
                .map_or((Class::Public, Cidr::host(ip)), |&(r, c)| (c, r))
        }
    }
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // IPv4-compatible (deprecated) ::a.b.c.d.
        [0, 0, 0, 0, 0, 0, _, _] => Some(low),
        // NAT64 well-known prefix 64:ff9b::/96.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        // 6to4 2002:a.b.c.d::/48.
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

/// Why a destination was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deny {
    Loopback,
    ThisNetwork,
    LinkLocal,
    Multicast,
    Broadcast,
    Reserved,
    Private,
    HostAddress,
    NotAllowed,
    /// `host.boxlite.internal` without that name in `allow_net`.
    HostAlias,
    /// A gateway port other than DNS.
    Gateway,
    /// UDP 443 while name rules are active.
    Quic,
    /// TLS SNI or HTTP Host missing or not an allowed name.
    Name,
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Deny::Loopback => "the host's loopback (use host.boxlite.internal)",
            Deny::ThisNetwork => "0.0.0.0/8",
            Deny::LinkLocal => "link-local / cloud metadata",
            Deny::Multicast => "multicast",
            Deny::Broadcast => "broadcast",
            Deny::Reserved => "reserved range",
            Deny::Private => "private range not named in allow_net",
            Deny::HostAddress => "one of the host's own addresses",
            Deny::NotAllowed => "not in allow_net",
            Deny::HostAlias => "host.boxlite.internal is not in allow_net",
            Deny::Gateway => "gateway port other than DNS",
            Deny::Quic => "QUIC while name rules are active",
            Deny::Name => "TLS SNI / HTTP Host is not an allowed name",
        })
    }
}

/// The policy's answer for one destination address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Reachable on any port.
    Allow,
    /// Reachable only because an allowed name resolved to it: TLS (443) and HTTP (80) must
    /// then name an allowed host, and QUIC is refused.
    ViaName,
    Deny(Deny),
}

/// How a name matched `allow_net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameMatch {
    /// `allow_net` is empty: every name.
    Internet,
    /// Matched `*`.
    Any,
    /// Matched an exact name or a `*.domain` wildcard.
    Named,
}

#[derive(Debug, Clone, Copy)]
struct Learned {
    until: Instant,
    private_ok: bool,
}

/// One box's policy, with the addresses learned from its DNS answers.
#[derive(Debug)]
pub(crate) struct Policy {
    internet: bool,
    names: HashSet<String>,
    /// `.example.com` for each `*.example.com`.
    suffixes: Vec<String>,
    any_name: bool,
    nets: Vec<Cidr>,
    host_alias: bool,
    host_addrs: Vec<IpAddr>,
    learned: HashMap<IpAddr, Learned>,
}

impl Policy {
    /// `host_addrs`: the host's own interface addresses (see [`crate::ifaddrs`]).
    pub(crate) fn new(allow: &[AllowEntry], host_addrs: Vec<IpAddr>) -> Policy {
        let mut p = Policy {
            internet: allow.is_empty(),
            names: HashSet::new(),
            suffixes: Vec::new(),
            any_name: false,
            nets: Vec::new(),
            host_alias: false,
            host_addrs: host_addrs.into_iter().map(|a| a.to_canonical()).collect(),
            learned: HashMap::new(),
        };
        for entry in allow {
            match entry {
                AllowEntry::Name(n) => {
                    let n = n.to_ascii_lowercase();
                    if n == HOST_ALIAS_NAME {
                        p.host_alias = true;
                    } else {
                        p.names.insert(n);
                    }
                }
                AllowEntry::Wildcard(w) if w == "*" => p.any_name = true,
                AllowEntry::Wildcard(w) => {
                    let suffix = w.strip_prefix('*').unwrap_or(w).to_ascii_lowercase();
                    p.suffixes.push(suffix);
                }
                AllowEntry::Ip(ip) => p.nets.push(Cidr::host(*ip)),
                AllowEntry::Cidr(c) => p.nets.push(*c),
            }
        }
        p
    }

    /// Whether `host.boxlite.internal` (the host's loopback) may be used.
    pub(crate) fn host_alias_allowed(&self) -> bool {
        self.host_alias
    }

    /// Whether the guest may resolve `name` (already normalized). `host.boxlite.internal` is
    /// the caller's business.
    pub(crate) fn name_allowed(&self, name: &str) -> Option<NameMatch> {
        if self.internet {
            return Some(NameMatch::Internet);
        }
        if self.names.contains(name)
            || self
                .suffixes
                .iter()
                .any(|s| name.len() > s.len() && name.ends_with(s.as_str()))
        {
            return Some(NameMatch::Named);
        }
        self.any_name.then_some(NameMatch::Any)
    }

    /// Records that an allowed name resolved to `ip` at `now`. Private addresses learned
    /// this way are reachable only when the name was named (exactly or by `*.domain`).
    pub(crate) fn learn(&mut self, ip: IpAddr, how: NameMatch, now: Instant) {
        if self.internet {
            return;
        }
        if self.learned.len() >= MAX_LEARNED {
            self.prune(now);
        }
        let private_ok = how == NameMatch::Named;
        let e = self.learned.entry(ip.to_canonical()).or_insert(Learned {
            until: now,
            private_ok,
        });
        e.until = e.until.max(now + LEARNED_TTL);
        e.private_ok |= private_ok;
    }

    fn prune(&mut self, now: Instant) {
        self.learned.retain(|_, l| l.until > now);
        if self.learned.len() >= MAX_LEARNED {
            let mut untils: Vec<Instant> = self.learned.values().map(|l| l.until).collect();
            untils.sort_unstable();
            let cut = untils[untils.len() / 2];
            self.learned.retain(|_, l| l.until > cut);
        }
    }

    fn learned(&self, ip: IpAddr, now: Instant) -> Option<Learned> {
        self.learned.get(&ip).copied().filter(|l| l.until > now)
    }

    /// Whether the box may reach `ip` (any port) at `now`.
    pub(crate) fn check_ip(&self, ip: IpAddr, now: Instant) -> Verdict {
        let ip = ip.to_canonical();
        let (class, range) = classify(ip);
        if class != Class::Loopback && self.host_addrs.contains(&ip) {
            // Only an entry naming exactly this address opens the host's own services.
            let exact = self
                .nets
                .iter()
                .any(|n| n.is_single_address() && n.contains(ip));
            return if exact {
                Verdict::Allow
            } else {
                Verdict::Deny(Deny::HostAddress)
            };
        }
        // A special range opens only to an entry inside it: 0.0.0.0/0 is "the public
        // internet", never "the metadata service too".
        let explicit_within = |range: &Cidr| {
            self.nets
                .iter()
                .any(|n| n.contains(ip) && n.is_within(range))
        };
        match class {
            Class::Loopback => Verdict::Deny(Deny::Loopback),
            Class::ThisNetwork => Verdict::Deny(Deny::ThisNetwork),
            Class::Multicast => Verdict::Deny(Deny::Multicast),
            Class::Broadcast => Verdict::Deny(Deny::Broadcast),
            Class::Reserved => Verdict::Deny(Deny::Reserved),
            Class::LinkLocal if explicit_within(&range) => Verdict::Allow,
            Class::LinkLocal => Verdict::Deny(Deny::LinkLocal),
            Class::Private if explicit_within(&range) => Verdict::Allow,
            Class::Private => match self.learned(ip, now) {
                Some(l) if l.private_ok => Verdict::ViaName,
                _ => Verdict::Deny(Deny::Private),
            },
            Class::Public if self.internet => Verdict::Allow,
            Class::Public if self.nets.iter().any(|n| n.contains(ip)) => Verdict::Allow,
            Class::Public => match self.learned(ip, now) {
                Some(_) => Verdict::ViaName,
                None => Verdict::Deny(Deny::NotAllowed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[&str]) -> Vec<AllowEntry> {
        list.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn policy(list: &[&str]) -> Policy {
        Policy::new(&entries(list), vec![ip("10.9.8.7"), ip("203.0.113.99")])
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            "PyPI.org.".parse::<AllowEntry>(),
            Ok(AllowEntry::Name("pypi.org".into()))
        );
        assert_eq!(
            " *.Example.COM ".parse::<AllowEntry>(),
            Ok(AllowEntry::Wildcard("*.example.com".into()))
        );
        assert_eq!(
            "*".parse::<AllowEntry>(),
            Ok(AllowEntry::Wildcard("*".into()))
        );
        assert_eq!(
            "203.0.113.7".parse::<AllowEntry>(),
            Ok(AllowEntry::Ip(ip("203.0.113.7")))
        );
        assert_eq!(
            "[2001:db8::1]".parse::<AllowEntry>(),
            Ok(AllowEntry::Ip(ip("2001:db8::1")))
        );
        assert_eq!(
            "::ffff:1.2.3.4".parse::<AllowEntry>(),
            Ok(AllowEntry::Ip(ip("1.2.3.4")))
        );
        let c = "10.0.0.0/8".parse::<AllowEntry>().expect("cidr");
        assert_eq!(c.to_string(), "10.0.0.0/8");
        let c6 = "fd00::/8".parse::<AllowEntry>().expect("cidr6");
        assert_eq!(c6.to_string(), "fd00::/8");
        let mapped = "::ffff:10.0.0.0/104".parse::<AllowEntry>().expect("mapped");
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn refuses_bad_entries_with_a_reason() {
        let problem = |s: &str| s.parse::<AllowEntry>().expect_err(s).problem;
        assert_eq!(problem(""), AllowEntryProblem::Empty);
        assert_eq!(problem("https://pypi.org"), AllowEntryProblem::UrlOrPort);
        assert_eq!(problem("pypi.org:443"), AllowEntryProblem::UrlOrPort);
        assert_eq!(problem("10.0.0.0/33"), AllowEntryProblem::BadPrefix);
        assert_eq!(problem("10.0.0.0/x"), AllowEntryProblem::BadPrefix);
        assert_eq!(
            problem("10.1.2.3/8"),
            AllowEntryProblem::HostBitsSet {
                network: "10.0.0.0/8".into()
            }
        );
        assert_eq!(problem("example.com/8"), AllowEntryProblem::BadAddress);
        assert_eq!(problem("1.2.3"), AllowEntryProblem::BadAddress);
        assert_eq!(problem("0x7f000001"), AllowEntryProblem::BadAddress);
        assert_eq!(problem("a.*.example.com"), AllowEntryProblem::BadWildcard);
        assert_eq!(problem("*.*.example.com"), AllowEntryProblem::BadWildcard);
        assert!(matches!(
            problem("exa mple.com"),
            AllowEntryProblem::BadName(_)
        ));
        assert!(matches!(problem("-bad.com"), AllowEntryProblem::BadName(_)));
        assert!(matches!(problem("a..com"), AllowEntryProblem::BadName(_)));
        let msg = "a b".parse::<AllowEntry>().expect_err("space").to_string();
        assert!(
            msg.contains("\"a b\"") && msg.contains("accepted forms"),
            "{msg}"
        );
    }

    #[test]
    fn names_and_wildcards() {
        let p = policy(&["pypi.org", "*.example.com"]);
        assert_eq!(p.name_allowed("pypi.org"), Some(NameMatch::Named));
        assert_eq!(p.name_allowed("files.pypi.org"), None);
        assert_eq!(p.name_allowed("a.example.com"), Some(NameMatch::Named));
        assert_eq!(p.name_allowed("a.b.example.com"), Some(NameMatch::Named));
        assert_eq!(p.name_allowed("example.com"), None);
        assert_eq!(p.name_allowed("badexample.com"), None);
        assert!(!p.host_alias_allowed());

        let any = policy(&["*"]);
        assert_eq!(any.name_allowed("anything.net"), Some(NameMatch::Any));

        let open = policy(&[]);
        assert_eq!(open.name_allowed("anything.net"), Some(NameMatch::Internet));
        assert!(!open.host_alias_allowed());

        assert!(policy(&["host.boxlite.internal"]).host_alias_allowed());
        assert!(!policy(&["*.boxlite.internal"]).host_alias_allowed());
    }

    #[test]
    fn internet_mode_allows_public_only() {
        let p = policy(&[]);
        let now = Instant::now();
        assert_eq!(p.check_ip(ip("93.184.216.34"), now), Verdict::Allow);
        assert_eq!(p.check_ip(ip("2606:4700::1111"), now), Verdict::Allow);
        for (addr, deny) in [
            ("127.0.0.1", Deny::Loopback),
            ("127.1.2.3", Deny::Loopback),
            ("::1", Deny::Loopback),
            ("::ffff:127.0.0.1", Deny::Loopback),
            ("64:ff9b::7f00:1", Deny::Loopback),
            ("::127.0.0.1", Deny::Loopback),
            ("2002:7f00:1::", Deny::Loopback),
            ("169.254.169.254", Deny::LinkLocal),
            ("fe80::1", Deny::LinkLocal),
            ("0.0.0.0", Deny::ThisNetwork),
            ("0.1.2.3", Deny::ThisNetwork),
            ("::", Deny::ThisNetwork),
            ("224.0.0.1", Deny::Multicast),
            ("ff02::1", Deny::Multicast),
            ("255.255.255.255", Deny::Broadcast),
            ("250.1.1.1", Deny::Reserved),
            ("10.1.2.3", Deny::Private),
            ("172.16.0.1", Deny::Private),
            ("172.31.255.255", Deny::Private),
            ("192.168.1.1", Deny::Private),
            ("100.64.0.1", Deny::Private),
            ("fd12::1", Deny::Private),
            ("::ffff:10.0.0.1", Deny::Private),
            ("10.9.8.7", Deny::HostAddress),
            ("203.0.113.99", Deny::HostAddress),
        ] {
            assert_eq!(p.check_ip(ip(addr), now), Verdict::Deny(deny), "{addr}");
        }
        // Just outside the private ranges.
        assert_eq!(p.check_ip(ip("172.32.0.1"), now), Verdict::Allow);
        assert_eq!(p.check_ip(ip("100.128.0.1"), now), Verdict::Allow);
    }

    #[test]
    fn explicit_entries_open_what_they_name_and_no_more() {
        let p = policy(&["10.1.0.0/16", "169.254.169.254", "0.0.0.0/0", "fd00::/8"]);
        let now = Instant::now();
        assert_eq!(p.check_ip(ip("10.1.2.3"), now), Verdict::Allow);
        assert_eq!(p.check_ip(ip("::ffff:10.1.2.3"), now), Verdict::Allow);
        assert_eq!(
            p.check_ip(ip("10.2.0.1"), now),
            Verdict::Deny(Deny::Private)
        );
        assert_eq!(p.check_ip(ip("169.254.169.254"), now), Verdict::Allow);
        assert_eq!(
            p.check_ip(ip("169.254.0.1"), now),
            Verdict::Deny(Deny::LinkLocal)
        );
        // 0.0.0.0/0 means the public internet only.
        assert_eq!(p.check_ip(ip("198.51.100.1"), now), Verdict::Allow);
        assert_eq!(
            p.check_ip(ip("192.168.0.1"), now),
            Verdict::Deny(Deny::Private)
        );
        assert_eq!(
            p.check_ip(ip("127.0.0.1"), now),
            Verdict::Deny(Deny::Loopback)
        );
        assert_eq!(p.check_ip(ip("fd00::5"), now), Verdict::Allow);
        // Not even a covering entry opens loopback or the host's own addresses.
        let q = policy(&["127.0.0.0/8", "10.0.0.0/8"]);
        assert_eq!(
            q.check_ip(ip("127.0.0.1"), now),
            Verdict::Deny(Deny::Loopback)
        );
        assert_eq!(
            q.check_ip(ip("10.9.8.7"), now),
            Verdict::Deny(Deny::HostAddress)
        );
        let r = policy(&["10.9.8.7"]);
        assert_eq!(r.check_ip(ip("10.9.8.7"), now), Verdict::Allow);
        // A restricted policy refuses other public addresses.
        assert_eq!(
            q.check_ip(ip("93.184.216.34"), now),
            Verdict::Deny(Deny::NotAllowed)
        );
    }

    #[test]
    fn learned_addresses_expire() {
        let mut p = policy(&["pypi.org", "*"]);
        let t0 = Instant::now();
        let public = ip("151.101.0.223");
        assert_eq!(p.check_ip(public, t0), Verdict::Deny(Deny::NotAllowed));
        p.learn(public, NameMatch::Named, t0);
        assert_eq!(p.check_ip(public, t0), Verdict::ViaName);
        let almost = t0 + LEARNED_TTL - Duration::from_millis(1);
        assert_eq!(p.check_ip(public, almost), Verdict::ViaName);
        assert_eq!(
            p.check_ip(public, t0 + LEARNED_TTL),
            Verdict::Deny(Deny::NotAllowed)
        );
        // A new answer extends the lifetime.
        p.learn(public, NameMatch::Named, t0 + Duration::from_secs(100));
        assert_eq!(p.check_ip(public, t0 + LEARNED_TTL), Verdict::ViaName);

        // Private addresses only through names that were named, never through "*".
        let private = ip("10.20.30.40");
        p.learn(private, NameMatch::Any, t0);
        assert_eq!(p.check_ip(private, t0), Verdict::Deny(Deny::Private));
        p.learn(private, NameMatch::Named, t0);
        assert_eq!(p.check_ip(private, t0), Verdict::ViaName);
        // Never loopback, link-local or the host's own addresses.
        for addr in ["127.0.0.1", "169.254.169.254", "10.9.8.7"] {
            p.learn(ip(addr), NameMatch::Named, t0);
            assert!(
                matches!(p.check_ip(ip(addr), t0), Verdict::Deny(_)),
                "{addr}"
            );
        }
    }

    #[test]
    fn learning_is_bounded() {
        let mut p = policy(&["*"]);
        let t0 = Instant::now();
        for i in 0..(MAX_LEARNED as u32 * 2) {
            let when = t0 + Duration::from_millis(u64::from(i));
            p.learn(
                IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)),
                NameMatch::Any,
                when,
            );
        }
        assert!(p.learned.len() <= MAX_LEARNED);
        // The newest is still there.
        let newest = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + MAX_LEARNED as u32 * 2 - 1));
        assert_eq!(p.check_ip(newest, t0), Verdict::ViaName);
    }

    #[test]
    fn internet_mode_learns_nothing() {
        let mut p = policy(&[]);
        let t0 = Instant::now();
        p.learn(ip("10.1.1.1"), NameMatch::Internet, t0);
        assert_eq!(p.check_ip(ip("10.1.1.1"), t0), Verdict::Deny(Deny::Private));
    }

    #[test]
    fn cidr_arithmetic() {
        let c = Cidr::new(ip("192.168.0.0"), 16).expect("cidr");
        assert!(c.contains(ip("192.168.255.1")));
        assert!(!c.contains(ip("192.169.0.1")));
        assert!(!c.contains(ip("::1")));
        assert!(Cidr::new(ip("0.0.0.0"), 0)
            .expect("all")
            .contains(ip("8.8.8.8")));
        assert!(Cidr::new(ip("::"), 0)
            .expect("all6")
            .contains(ip("2001:db8::1")));
        assert!(Cidr::new(ip("10.0.0.1"), 8).is_none());
        assert!(Cidr::new(ip("10.0.0.0"), 33).is_none());
        assert!(Cidr::new(ip("2001:db8::"), 129).is_none());
        assert_eq!(classify(ip("8.8.8.8")).0, Class::Public);
    }
}
