//! The gateway's DNS server: queries are parsed with smoltcp's DNS wire types, answers come
//! from the host's resolver (`getaddrinfo`) and are filtered by the policy.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use smoltcp::wire::{DnsFlags, DnsOpcode, DnsPacket, DnsQuestion};

use crate::policy::{normalize_name, NameMatch, Policy};
use crate::{DNS_TTL_SECS, HOST_ALIAS_IP, HOST_ALIAS_NAME};

/// A records per answer at most (keeps UDP answers well under 512 bytes).
const MAX_ANSWERS: usize = 16;

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;

const RCODE_NOERROR: u8 = 0;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_NOTIMP: u8 = 4;

/// One question, kept to answer it later.
#[derive(Debug, Clone)]
pub(crate) struct Query {
    id: u16,
    rd: bool,
    /// The question section as received (name, type, class).
    question: Vec<u8>,
    qtype: u16,
    /// The name, if it is a plain host name.
    name: Option<String>,
}

/// What to do with a DNS message from the guest.
#[derive(Debug)]
pub(crate) enum Action {
    /// Send this answer.
    Reply(Vec<u8>),
    /// Ask the host's resolver for `name`'s IPv4 addresses, then [`finish`].
    Lookup {
        query: Query,
        name: String,
        how: NameMatch,
    },
}

/// Decides what to answer to `msg`; `None` for messages that get no answer at all.
pub(crate) fn handle(msg: &[u8], policy: &Policy) -> Option<Action> {
    let query = match parse(msg)? {
        Ok(q) => q,
        Err(reply) => return Some(Action::Reply(reply)),
    };
    let Some(name) = query.name.clone() else {
        return Some(Action::Reply(response(&query, RCODE_NXDOMAIN, &[])));
    };
    let wants_a = query.qtype == TYPE_A || query.qtype == TYPE_ANY;
    if name == HOST_ALIAS_NAME {
        let reply = match (policy.host_alias_allowed(), wants_a) {
            (false, _) => response(&query, RCODE_NXDOMAIN, &[]),
            (true, true) => response(&query, RCODE_NOERROR, &[HOST_ALIAS_IP]),
            (true, false) => response(&query, RCODE_NOERROR, &[]),
        };
        return Some(Action::Reply(reply));
    }
    let Some(how) = policy.name_allowed(&name) else {
        return Some(Action::Reply(response(&query, RCODE_NXDOMAIN, &[])));
    };
    if !wants_a {
        // The guest has no IPv6 and other types are not served: "no data", not "no name".
        return Some(Action::Reply(response(&query, RCODE_NOERROR, &[])));
    }
    Some(Action::Lookup { query, name, how })
}

/// The answer once the host's resolver has spoken; addresses of restricted boxes are
/// recorded in the policy as reachable for the answer's TTL.
pub(crate) fn finish(
    query: &Query,
    how: NameMatch,
    result: Lookup,
    policy: &mut Policy,
    now: Instant,
) -> Vec<u8> {
    match result {
        Lookup::Found(mut addrs) => {
            addrs.truncate(MAX_ANSWERS);
            for a in &addrs {
                policy.learn(IpAddr::V4(*a), how, now);
            }
            response(query, RCODE_NOERROR, &addrs)
        }
        Lookup::NoName => response(query, RCODE_NXDOMAIN, &[]),
        Lookup::Failed => response(query, RCODE_SERVFAIL, &[]),
    }
}

/// A SERVFAIL for `query` (too many lookups in flight).
pub(crate) fn servfail(query: &Query) -> Vec<u8> {
    response(query, RCODE_SERVFAIL, &[])
}

/// `None`: not a query (drop it). `Some(Err(reply))`: a query refused with an error code.
fn parse(msg: &[u8]) -> Option<Result<Query, Vec<u8>>> {
    let packet = DnsPacket::new_checked(msg).ok()?;
    let flags = packet.flags();
    if flags.contains(DnsFlags::RESPONSE) {
        return None;
    }
    let id = packet.transaction_id();
    let rd = flags.contains(DnsFlags::RECURSION_DESIRED);
    if packet.opcode() != DnsOpcode::Query {
        return Some(Err(header_only(id, rd, RCODE_NOTIMP)));
    }
    if packet.question_count() != 1 {
        return Some(Err(header_only(id, rd, RCODE_FORMERR)));
    }
    let payload = packet.payload();
    let Ok((_, question)) = DnsQuestion::parse(payload) else {
        return Some(Err(header_only(id, rd, RCODE_FORMERR)));
    };
    let raw = payload.get(..question.name.len() + 4)?;
    Some(Ok(Query {
        id,
        rd,
        question: raw.to_vec(),
        qtype: question.type_.into(),
        name: decode_name(question.name),
    }))
}

/// The dotted, normalized form of an uncompressed wire name; `None` for compressed or
/// non-host names.
fn decode_name(mut wire: &[u8]) -> Option<String> {
    let mut text = String::new();
    loop {
        let (&len, rest) = wire.split_first()?;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        let label = rest.get(..len as usize)?;
        if !text.is_empty() {
            text.push('.');
        }
        text.push_str(std::str::from_utf8(label).ok()?);
        wire = &rest[len as usize..];
    }
    normalize_name(&text).ok()
}

fn header(out: &mut Vec<u8>, id: u16, rd: bool, rcode: u8, questions: u16, answers: u16) {
    out.resize(12, 0);
    let mut p = DnsPacket::new_unchecked(&mut out[..]);
    p.set_transaction_id(id);
    let mut flags = DnsFlags::RESPONSE | DnsFlags::RECURSION_AVAILABLE;
    if rd {
        flags |= DnsFlags::RECURSION_DESIRED;
    }
    p.set_flags(flags);
    p.set_opcode(DnsOpcode::Query);
    p.set_question_count(questions);
    p.set_answer_record_count(answers);
    p.set_authority_record_count(0);
    p.set_additional_record_count(0);
    // smoltcp has no setter for the response code: the low nibble of byte 3.
    out[3] = (out[3] & 0xF0) | (rcode & 0x0F);
}

fn header_only(id: u16, rd: bool, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    header(&mut out, id, rd, rcode, 0, 0);
    out
}

fn response(query: &Query, rcode: u8, addrs: &[Ipv4Addr]) -> Vec<u8> {
    let addrs = &addrs[..addrs.len().min(MAX_ANSWERS)];
    let mut out = Vec::with_capacity(12 + query.question.len() + 16 * addrs.len());
    header(&mut out, query.id, query.rd, rcode, 1, addrs.len() as u16);
    out.extend_from_slice(&query.question);
    for a in addrs {
        // Name: a pointer to the question's name at offset 12.
        out.extend_from_slice(&[0xC0, 0x0C, 0, TYPE_A as u8, 0, 1]);
        out.extend_from_slice(&DNS_TTL_SECS.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&a.octets());
    }
    out
}

/// What the host's resolver said about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found(Vec<Ipv4Addr>),
    NoName,
    Failed,
}

/// Asks the host's resolver (blocking `getaddrinfo`, IPv4 only) for `name`'s addresses.
pub(crate) fn lookup_ipv4(name: &str) -> Lookup {
    let Ok(c) = CString::new(name) else {
        return Lookup::NoName;
    };
    // SAFETY: an all-zero addrinfo is a valid "no hints" value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_INET;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut list: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C string and hints; `list` receives a list freed below.
    let rc = unsafe { libc::getaddrinfo(c.as_ptr(), std::ptr::null(), &hints, &mut list) };
    match rc {
        0 => {}
        libc::EAI_NONAME => return Lookup::NoName,
        // Names with no IPv4 address: "no data".
        libc::EAI_NODATA => return Lookup::Found(Vec::new()),
        _ => return Lookup::Failed,
    }
    let mut addrs = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` walks the list getaddrinfo returned, which stays valid until freed.
        let ai = unsafe { &*cur };
        if ai.ai_family == libc::AF_INET && !ai.ai_addr.is_null() {
            // SAFETY: AF_INET entries carry a sockaddr_in.
            let sin = unsafe { &*(ai.ai_addr as *const libc::sockaddr_in) };
            let a = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        cur = ai.ai_next;
    }
    // SAFETY: `list` came from a successful getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(list) };
    Lookup::Found(addrs)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::AllowEntry;

    /// A standard query for `name` of type `qtype`.
    pub(crate) fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0u8; 12];
        q[0..2].copy_from_slice(&id.to_be_bytes());
        q[2] = 0x01; // RD
        q[5] = 1; // one question
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    fn policy(list: &[&str]) -> Policy {
        let entries: Vec<AllowEntry> = list.iter().map(|s| s.parse().expect("entry")).collect();
        Policy::new(&entries, Vec::new())
    }

    fn rcode(reply: &[u8]) -> u8 {
        reply[3] & 0x0F
    }

    fn answers(reply: &[u8]) -> Vec<Ipv4Addr> {
        let p = DnsPacket::new_checked(reply).expect("reply");
        let mut rest = p.payload();
        let (r, _) = DnsQuestion::parse(rest).expect("question");
        rest = r;
        let mut out = Vec::new();
        for _ in 0..p.answer_record_count() {
            let (r, rec) = smoltcp::wire::DnsRecord::parse(rest).expect("record");
            rest = r;
            if let smoltcp::wire::DnsRecordData::A(a) = rec.data {
                out.push(a);
            }
        }
        out
    }

    fn reply(action: Option<Action>) -> Vec<u8> {
        match action {
            Some(Action::Reply(r)) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn denied_names_get_nxdomain() {
        let p = policy(&["pypi.org"]);
        let r = reply(handle(&query(7, "example.com", TYPE_A), &p));
        assert_eq!(r[0..2], [0, 7]);
        assert_eq!(rcode(&r), RCODE_NXDOMAIN);
        assert_eq!(r[2] & 0x80, 0x80, "QR set");
        // The alias is not allowed either.
        let r = reply(handle(&query(8, "host.boxlite.internal", TYPE_A), &p));
        assert_eq!(rcode(&r), RCODE_NXDOMAIN);
        // Numeric names never reach the resolver.
        let open = policy(&[]);
        let r = reply(handle(&query(9, "127.0.0.1", TYPE_A), &open));
        assert_eq!(rcode(&r), RCODE_NXDOMAIN);
    }

    #[test]
    fn alias_is_answered_locally() {
        let p = policy(&["HOST.boxlite.internal"]);
        let r = reply(handle(&query(1, "host.boxlite.internal", TYPE_A), &p));
        assert_eq!(rcode(&r), RCODE_NOERROR);
        assert_eq!(answers(&r), vec![HOST_ALIAS_IP]);
        let r = reply(handle(&query(2, "Host.Boxlite.Internal", 28), &p));
        assert_eq!(rcode(&r), RCODE_NOERROR);
        assert!(answers(&r).is_empty());
    }

    #[test]
    fn allowed_names_are_looked_up_and_learned() {
        let mut p = policy(&["*.example.com"]);
        let Some(Action::Lookup {
            query: q,
            name,
            how,
        }) = handle(&query(3, "www.Example.com", TYPE_A), &p)
        else {
            panic!("expected a lookup");
        };
        assert_eq!(name, "www.example.com");
        assert_eq!(how, NameMatch::Named);
        let now = Instant::now();
        let a = Ipv4Addr::new(93, 184, 216, 34);
        let r = finish(&q, how, Lookup::Found(vec![a]), &mut p, now);
        assert_eq!(answers(&r), vec![a]);
        assert_eq!(
            p.check_ip(IpAddr::V4(a), now),
            crate::policy::Verdict::ViaName
        );
        assert_eq!(
            rcode(&finish(&q, how, Lookup::NoName, &mut p, now)),
            RCODE_NXDOMAIN
        );
        assert_eq!(
            rcode(&finish(&q, how, Lookup::Failed, &mut p, now)),
            RCODE_SERVFAIL
        );
        // AAAA for an allowed name: no data.
        let r = reply(handle(&query(4, "www.example.com", 28), &p));
        assert_eq!(rcode(&r), RCODE_NOERROR);
        assert!(answers(&r).is_empty());
    }

    #[test]
    fn odd_messages() {
        let p = policy(&[]);
        assert!(handle(&[], &p).is_none());
        assert!(handle(&[0; 11], &p).is_none());
        // A response is ignored.
        let mut resp = query(5, "a.com", TYPE_A);
        resp[2] |= 0x80;
        assert!(handle(&resp, &p).is_none());
        // Two questions: FORMERR.
        let mut two = query(6, "a.com", TYPE_A);
        two[5] = 2;
        assert_eq!(rcode(&reply(handle(&two, &p))), RCODE_FORMERR);
        // Status opcode: NOTIMP.
        let mut status = query(6, "a.com", TYPE_A);
        status[2] |= 0x10;
        assert_eq!(rcode(&reply(handle(&status, &p))), RCODE_NOTIMP);
        // Truncated question: FORMERR.
        let q = query(6, "abc.com", TYPE_A);
        assert_eq!(rcode(&reply(handle(&q[..q.len() - 3], &p))), RCODE_FORMERR);
        // A compressed name in a query: NXDOMAIN, never a pointer followed.
        let mut ptr = query(6, "a", TYPE_A);
        ptr.truncate(12);
        ptr.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        assert_eq!(rcode(&reply(handle(&ptr, &p))), RCODE_NXDOMAIN);
    }

    #[test]
    fn looks_up_localhost() {
        match lookup_ipv4("localhost") {
            Lookup::Found(a) => assert!(a.contains(&Ipv4Addr::LOCALHOST), "{a:?}"),
            other => panic!("localhost: {other:?}"),
        }
        // NoName with a working resolver, Failed without one: never an address.
        assert!(!matches!(lookup_ipv4("no-such-name.invalid"), Lookup::Found(a) if !a.is_empty()));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_messages_never_panic(msg in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let mut p = policy(&["*.example.com", "host.boxlite.internal"]);
            if let Some(Action::Lookup { query, how, .. }) = handle(&msg, &p) {
                let _ = finish(&query, how, Lookup::Found(vec![Ipv4Addr::new(1, 2, 3, 4)]), &mut p, Instant::now());
            }
        }

        #[test]
        fn mutated_queries_never_panic(
            flips in proptest::collection::vec((0usize..40, proptest::num::u8::ANY), 0..6),
            cut in 0usize..40,
        ) {
            let mut q = query(1, "www.example.com", TYPE_A);
            for (i, b) in flips {
                if let Some(x) = q.get_mut(i) { *x = b; }
            }
            q.truncate(q.len().saturating_sub(cut));
            let p = policy(&["*.example.com"]);
            let _ = handle(&q, &p);
        }
    }
}
