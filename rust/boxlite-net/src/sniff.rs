//! The host name a client names before any byte is forwarded: TLS SNI (ClientHello) or the
//! HTTP/1 `Host` header.

use crate::policy::normalize_name;

/// Bytes of a connection's start looked at, at most. A ClientHello is a few KiB (post-quantum
/// key shares included); request headers larger than this are refused.
pub(crate) const SNIFF_LIMIT: usize = 32 * 1024;

/// The outcome of looking at a connection's first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sniff {
    /// Not enough bytes yet.
    NeedMore,
    /// The host name the client asked for, normalized.
    Name(String),
    /// Not the expected protocol, or no (valid) name in it.
    Invalid,
}

/// Which protocol a checked port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inspect {
    Tls,
    Http,
}

impl Inspect {
    pub(crate) fn for_port(port: u16) -> Option<Inspect> {
        match port {
            443 => Some(Inspect::Tls),
            80 => Some(Inspect::Http),
            _ => None,
        }
    }

    pub(crate) fn sniff(self, data: &[u8]) -> Sniff {
        match self {
            Inspect::Tls => tls_sni(data),
            Inspect::Http => http_host(data),
        }
    }
}

fn name(raw: &[u8]) -> Sniff {
    match std::str::from_utf8(raw).ok().map(normalize_name) {
        Some(Ok(n)) => Sniff::Name(n),
        _ => Sniff::Invalid,
    }
}

/// A cursor over a byte slice that fails (None) rather than panics.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The server name of a TLS ClientHello, which may span several handshake records.
pub(crate) fn tls_sni(data: &[u8]) -> Sniff {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const MAX_RECORD: usize = 16384 + 2048;
    let mut records = Cur(data);
    let mut hs: Vec<u8> = Vec::new();
    loop {
        let Some(head) = records.take(5) else {
            return Sniff::NeedMore;
        };
        if head[0] != HANDSHAKE || head[1] != 3 {
            return Sniff::Invalid;
        }
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if len == 0 || len > MAX_RECORD {
            return Sniff::Invalid;
        }
        let Some(body) = records.take(len) else {
            return Sniff::NeedMore;
        };
        hs.extend_from_slice(body);
        if hs[0] != CLIENT_HELLO {
            return Sniff::Invalid;
        }
        if hs.len() < 4 {
            continue;
        }
        let need =
            4 + ((usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]));
        if need > SNIFF_LIMIT {
            return Sniff::Invalid;
        }
        if hs.len() >= need {
            return client_hello_sni(&hs[4..need]).unwrap_or(Sniff::Invalid);
        }
    }
}

fn client_hello_sni(body: &[u8]) -> Option<Sniff> {
    const SERVER_NAME: usize = 0;
    let mut c = Cur(body);
    c.take(2 + 32)?; // version, random
    c.vec8()?; // session id
    c.vec16()?; // cipher suites
    c.vec8()?; // compression methods
    let mut exts = Cur(c.vec16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Cur(Cur(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let host = list.vec16()?;
            if name_type == 0 {
                return Some(name(host));
            }
        }
        return Some(Sniff::Invalid);
    }
    // No SNI at all.
    Some(Sniff::Invalid)
}

/// The `Host` of an HTTP/1 request (port removed).
pub(crate) fn http_host(data: &[u8]) -> Sniff {
    let window = &data[..data.len().min(SNIFF_LIMIT)];
    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if window.len() >= SNIFF_LIMIT || !plausible_request(window) {
            Sniff::Invalid
        } else {
            Sniff::NeedMore
        };
    };
    let head = &window[..end];
    if !plausible_request(head) {
        return Sniff::Invalid;
    }
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        let value = line[colon + 1..].trim_ascii();
        if value.starts_with(b"[") {
            // An IPv6 literal is not a name.
            return Sniff::Invalid;
        }
        let host = match value.iter().rposition(|&b| b == b':') {
            Some(i) if value[i + 1..].iter().all(u8::is_ascii_digit) => &value[..i],
            Some(_) => return Sniff::Invalid,
            None => value,
        };
        return name(host);
    }
    Sniff::Invalid
}

/// Whether the bytes so far can be the start of an HTTP/1 request line (`METHOD ...`).
fn plausible_request(data: &[u8]) -> bool {
    let method_len = data.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match data.get(method_len) {
        None => method_len == data.len() && method_len <= 16,
        Some(b' ') => method_len > 0,
        Some(_) => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal but well-formed TLS 1.2/1.3 ClientHello with `sni` (or none).
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&[3, 3]);
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        // An unrelated extension first (supported_versions).
        exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        if let Some(host) = sni {
            let h = host.as_bytes();
            let list_len = 3 + h.len();
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            exts.extend_from_slice(&(list_len as u16).to_be_bytes());
            exts.push(0);
            exts.extend_from_slice(&(h.len() as u16).to_be_bytes());
            exts.extend_from_slice(h);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn finds_sni() {
        let hello = client_hello(Some("Files.PythonHosted.org"));
        assert_eq!(
            tls_sni(&hello),
            Sniff::Name("files.pythonhosted.org".into())
        );
        for cut in 0..hello.len() {
            assert_eq!(tls_sni(&hello[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
        assert_eq!(tls_sni(&client_hello(None)), Sniff::Invalid);
        assert_eq!(tls_sni(b"GET / HTTP/1.1\r\n"), Sniff::Invalid);
        assert_eq!(tls_sni(&client_hello(Some("1.2.3.4"))), Sniff::Invalid);
    }

    #[test]
    fn finds_sni_across_records() {
        let one = client_hello(Some("pypi.org"));
        let hs = &one[5..];
        let (a, b) = hs.split_at(10);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[22, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(tls_sni(&two), Sniff::Name("pypi.org".into()));
        assert_eq!(tls_sni(&two[..20]), Sniff::NeedMore);
    }

    #[test]
    fn finds_http_host() {
        let req = b"GET /simple/ HTTP/1.1\r\nUser-Agent: pip\r\nhOsT:  PyPI.org:8080 \r\n\r\n";
        assert_eq!(http_host(req), Sniff::Name("pypi.org".into()));
        assert_eq!(http_host(&req[..20]), Sniff::NeedMore);
        assert_eq!(http_host(b"GE"), Sniff::NeedMore);
        assert_eq!(http_host(b"GET / HTTP/1.0\r\n\r\n"), Sniff::Invalid);
        assert_eq!(http_host(b"\x16\x03\x01"), Sniff::Invalid);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniff::Invalid
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"),
            Sniff::Invalid
        );
        let huge = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; SNIFF_LIMIT]].concat();
        assert_eq!(http_host(&huge), Sniff::Invalid);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = tls_sni(&data);
            let _ = http_host(&data);
        }

        #[test]
        fn mutated_hellos_never_panic(
            flips in proptest::collection::vec((0usize..120, proptest::num::u8::ANY), 0..8),
        ) {
            let mut hello = client_hello(Some("example.com"));
            for (i, b) in flips {
                if let Some(x) = hello.get_mut(i) { *x = b; }
            }
            let _ = tls_sni(&hello);
        }
    }
}
