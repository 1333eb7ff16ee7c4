//! TCP: guest connections re-originated from host sockets, published ports opened into the
//! guest, and DNS over TCP. Each connection is one smoltcp socket plus (usually) one host
//! socket, relayed without intermediate copies.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::{IpAddress, IpListenEndpoint, Ipv4Repr, TcpControl, TcpPacket, TcpRepr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::counters::NetCounters;
use crate::policy::{Deny, Policy, Verdict};
use crate::sniff::{Inspect, Sniff, SNIFF_LIMIT};
use crate::stack::{DnsReplyTo, Event, Stack};
use crate::{DNS_PORT, GATEWAY_IP, GUEST_IP, HOST_ALIAS_IP};

/// Buffers of a DNS-over-TCP session (queries and answers are small).
const DNS_TCP_BUFFER: usize = 4096;
/// Closed relay sockets kept for the next connections. A relay socket's two buffers
/// (`tcp_buffer_bytes` each) are allocated zeroed; reusing them takes that memset and its page
/// faults off the SYN -> SYN-ACK path (a quarter of the stack's CPU when a guest opens many
/// connections). At most this many are kept: 2 MiB with the default buffers.
const SPARE_SOCKETS: usize = 4;
/// A relayed connection whose guest stops answering (no ACK while data waits) for this long
/// is reset.
const GUEST_SILENCE_TIMEOUT: Duration = Duration::from_secs(120);

/// A connection as the guest sees it: its own address and the destination it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct TcpKey {
    pub(crate) guest: SocketAddrV4,
    pub(crate) remote: SocketAddrV4,
}

#[derive(Debug)]
pub(crate) enum Conn {
    /// The host connect is in progress; the guest's SYN waits to be replayed.
    Connecting {
        syn: Vec<u8>,
        inspect: Option<Inspect>,
    },
    Relay(Relay),
    Dns(DnsSession),
}

impl Conn {
    fn handle(&self) -> Option<SocketHandle> {
        match self {
            Conn::Connecting { .. } => None,
            Conn::Relay(r) => Some(r.handle),
            Conn::Dns(d) => Some(d.handle),
        }
    }
}

#[derive(Debug)]
pub(crate) struct DnsSession {
    handle: SocketHandle,
    /// A query is with the resolver; the next one waits.
    waiting: bool,
}

/// One relayed connection.
#[derive(Debug)]
pub(crate) struct Relay {
    handle: SocketHandle,
    host: TcpStream,
    /// The name check still to pass before the first byte goes out.
    inspect: Option<Inspect>,
    /// The host sent EOF (our FIN to the guest is queued).
    host_eof: bool,
    /// The guest's EOF was passed on to the host.
    host_shut: bool,
    /// Aborted by the stack; the error is counted.
    failed: bool,
    /// Opened by the stack towards the guest (a published port).
    inbound: bool,
}

impl Stack {
    pub(crate) fn on_tcp(&mut self, frame: &[u8], ip: &Ipv4Repr, payload: &[u8]) {
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let Ok(packet) = TcpPacket::new_checked(payload) else {
            return;
        };
        let src = IpAddress::Ipv4(ip.src_addr);
        let dst = IpAddress::Ipv4(ip.dst_addr);
        let Ok(repr) = TcpRepr::parse(&packet, &src, &dst, &caps) else {
            return;
        };
        let key = TcpKey {
            guest: SocketAddrV4::new(ip.src_addr, repr.src_port),
            remote: SocketAddrV4::new(ip.dst_addr, repr.dst_port),
        };
        let new_syn = repr.control == TcpControl::Syn && repr.ack_number.is_none();
        match self.tcp.get(&key) {
            // Retransmitted SYN: it is replayed once the host answers.
            Some(Conn::Connecting { .. }) => {}
            Some(_) => self.ingest(frame),
            // Not a connection we know: smoltcp answers with RST.
            None if !new_syn => self.ingest(frame),
            None => self.on_syn(key, frame),
        }
    }

    /// A new connection from the guest: policy, limits, then the host connect.
    fn on_syn(&mut self, key: TcpKey, frame: &[u8]) {
        let dst = *key.remote.ip();
        let port = key.remote.port();
        let (target, fallback, inspect) = if dst == GATEWAY_IP {
            if port == DNS_PORT {
                return self.open_dns_session(key, frame);
            }
            return self.refuse_syn(key, frame, Deny::Gateway);
        } else if dst == HOST_ALIAS_IP {
            if !self.policy.host_alias_allowed() {
                return self.refuse_syn(key, frame, Deny::HostAlias);
            }
            (
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)),
                None,
            )
        } else {
            match self.policy.check_ip(IpAddr::V4(dst), Instant::now()) {
                Verdict::Allow => (SocketAddr::V4(key.remote), None, None),
                Verdict::ViaName => (SocketAddr::V4(key.remote), None, Inspect::for_port(port)),
                Verdict::Deny(why) => return self.refuse_syn(key, frame, why),
            }
        };
        #[cfg(test)]
        let (target, fallback) = match self.redirect {
            Some(r) => (r, None),
            None => (target, fallback),
        };
        if self.tcp.len() >= self.limits.max_tcp_connections
            || self.pending_connects >= self.limits.max_pending_connects
        {
            tracing::debug!(guest = %key.guest, dst = %key.remote, "tcp: over the box's limits, refused");
            self.counters.tcp_error();
            return self.ingest(frame);
        }
        self.tcp.insert(
            key,
            Conn::Connecting {
                syn: frame.to_vec(),
                inspect,
            },
        );
        self.pending_connects += 1;
        let timeout = self.limits.connect_timeout;
        self.tasks.spawn(async move {
            let result = connect(target, fallback, timeout).await;
            Event::Connected { key, result }
        });
    }

    fn refuse_syn(&mut self, key: TcpKey, frame: &[u8], why: Deny) {
        tracing::debug!(guest = %key.guest, dst = %key.remote, %why, "tcp: denied");
        self.counters.tcp_error();
        // No socket takes it, so smoltcp answers RST at once.
        self.ingest(frame);
    }

    pub(crate) fn on_connected(&mut self, key: TcpKey, result: io::Result<TcpStream>) {
        let Some(Conn::Connecting { syn, inspect }) = self.tcp.get_mut(&key) else {
            return;
        };
        let syn = std::mem::take(syn);
        let inspect = *inspect;
        self.pending_connects = self.pending_connects.saturating_sub(1);
        let host = match result {
            Ok(host) => host,
            Err(e) => {
                tracing::debug!(dst = %key.remote, error = %e, "tcp: host connect failed");
                self.tcp.remove(&key);
                self.counters.tcp_error();
                return self.ingest(&syn);
            }
        };
        let _ = host.set_nodelay(true);
        let mut sock = self.relay_socket();
        sock.set_timeout(Some(smol(GUEST_SILENCE_TIMEOUT)));
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(*key.remote.ip())),
            port: key.remote.port(),
        };
        if sock.listen(endpoint).is_err() {
            self.tcp.remove(&key);
            self.counters.tcp_error();
            return;
        }
        let handle = self.sockets.add(sock);
        // The SYN is the only frame smoltcp sees now, so this socket takes exactly it.
        self.ingest(&syn);
        if self.sockets.get::<tcp::Socket>(handle).state() != State::SynReceived {
            let removed = self.sockets.remove(handle);
            self.recycle(removed);
            self.tcp.remove(&key);
            self.counters.tcp_error();
            return;
        }
        self.counters.tcp_opened();
        self.tcp.insert(
            key,
            Conn::Relay(Relay {
                handle,
                host,
                inspect,
                host_eof: false,
                host_shut: false,
                failed: false,
                inbound: false,
            }),
        );
    }

    fn open_dns_session(&mut self, key: TcpKey, frame: &[u8]) {
        if self.tcp.len() >= self.limits.max_tcp_connections {
            return self.refuse_syn(key, frame, Deny::Gateway);
        }
        let mut sock = new_socket(DNS_TCP_BUFFER, DNS_TCP_BUFFER);
        sock.set_timeout(Some(smol(GUEST_SILENCE_TIMEOUT)));
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(GATEWAY_IP)),
            port: DNS_PORT,
        };
        if sock.listen(endpoint).is_err() {
            return;
        }
        let handle = self.sockets.add(sock);
        self.ingest(frame);
        if self.sockets.get::<tcp::Socket>(handle).state() != State::SynReceived {
            self.sockets.remove(handle);
            return;
        }
        self.tcp.insert(
            key,
            Conn::Dns(DnsSession {
                handle,
                waiting: false,
            }),
        );
    }

    pub(crate) fn dns_tcp_reply(&mut self, key: TcpKey, reply: &[u8]) {
        let Some(Conn::Dns(session)) = self.tcp.get_mut(&key) else {
            return;
        };
        session.waiting = false;
        let sock = self.sockets.get_mut::<tcp::Socket>(session.handle);
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        if sock.send_capacity() - sock.send_queue() < 2 + reply.len() {
            sock.abort();
            return;
        }
        let _ = sock.send_slice(&len.to_be_bytes());
        let _ = sock.send_slice(reply);
    }

    /// A host connection accepted on a published port: open a connection into the guest.
    pub(crate) fn open_inbound(&mut self, host: TcpStream, guest_port: u16) {
        let _ = host.set_nodelay(true);
        let port = self.alloc_port();
        let key = TcpKey {
            guest: SocketAddrV4::new(GUEST_IP, guest_port),
            remote: SocketAddrV4::new(GATEWAY_IP, port),
        };
        let mut sock = self.relay_socket();
        // Until the guest answers; lifted once established.
        sock.set_timeout(Some(smol(self.limits.connect_timeout)));
        let remote = (IpAddress::Ipv4(GUEST_IP), guest_port);
        let local = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(GATEWAY_IP)),
            port,
        };
        if sock.connect(self.iface.context(), remote, local).is_err() {
            self.counters.tcp_error();
            self.recycle(smoltcp::socket::Socket::Tcp(sock));
            return;
        }
        let handle = self.sockets.add(sock);
        self.counters.tcp_opened();
        self.tcp.insert(
            key,
            Conn::Relay(Relay {
                handle,
                host,
                inspect: None,
                host_eof: false,
                host_shut: false,
                failed: false,
                inbound: true,
            }),
        );
    }

    /// A closed socket for a relay: a spare one if any, else a new one. Nagle is off; the
    /// caller sets the timeout (every other option is never changed from smoltcp's default).
    fn relay_socket(&mut self) -> tcp::Socket<'static> {
        let buf = self.limits.tcp_buffer_bytes;
        let mut sock = self
            .spare_sockets
            .pop()
            .unwrap_or_else(|| new_socket(buf, buf));
        sock.set_nagle_enabled(false);
        sock
    }

    /// Keeps a socket removed from the set for [`Stack::relay_socket`] if it is a closed
    /// relay-sized TCP socket and fewer than [`SPARE_SOCKETS`] are kept; drops it otherwise.
    pub(crate) fn recycle(&mut self, removed: smoltcp::socket::Socket<'static>) {
        keep_spare(
            &mut self.spare_sockets,
            self.limits.tcp_buffer_bytes,
            removed,
        );
    }

    pub(crate) fn poll_accepts(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let now = Instant::now();
        for i in 0..self.forwards.len() {
            if self.forwards[i].retry_at.is_some_and(|t| t > now) {
                continue;
            }
            self.forwards[i].retry_at = None;
            // At the cap the host kernel's backlog holds new callers; a connection ending
            // is progress, so the loop comes back here.
            while self.tcp.len() < self.limits.max_tcp_connections {
                match self.forwards[i].listener.poll_accept(cx) {
                    Poll::Ready(Ok((stream, _peer))) => {
                        let guest_port = self.forwards[i].guest_port;
                        self.open_inbound(stream, guest_port);
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "published port: accept failed");
                        self.forwards[i].retry_at = Some(now + Duration::from_millis(100));
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        progress
    }

    /// Moves bytes on every connection; serves DNS-over-TCP queries.
    pub(crate) fn pump_tcp(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut queries: Vec<(TcpKey, Vec<u8>)> = Vec::new();
        let Stack {
            tcp,
            sockets,
            policy,
            counters,
            scratch,
            ..
        } = self;
        for (key, conn) in tcp.iter_mut() {
            match conn {
                Conn::Connecting { .. } => {}
                Conn::Relay(r) => {
                    let sock = sockets.get_mut::<tcp::Socket>(r.handle);
                    progress |= r.pump(cx, sock, policy, counters, scratch);
                }
                Conn::Dns(d) => {
                    let sock = sockets.get_mut::<tcp::Socket>(d.handle);
                    if let Some(q) = d.take_query(sock) {
                        queries.push((*key, q));
                        progress = true;
                    }
                }
            }
        }
        for (key, q) in queries {
            if !self.on_dns(DnsReplyTo::Tcp(key), &q) {
                if let Some(Conn::Dns(d)) = self.tcp.get_mut(&key) {
                    d.waiting = false;
                }
            }
        }
        progress
    }

    /// Drops connections that are over. Returns whether any was.
    pub(crate) fn reap_tcp(&mut self) -> bool {
        let Stack {
            tcp,
            sockets,
            counters,
            spare_sockets,
            limits,
            ..
        } = self;
        let before = tcp.len();
        tcp.retain(|_, conn| {
            let Some(handle) = conn.handle() else {
                return true;
            };
            let sock = sockets.get::<tcp::Socket>(handle);
            let state = sock.state();
            let done = match state {
                State::Listen => true,
                State::Closed => sock.remote_endpoint().is_none(),
                State::TimeWait => match conn {
                    Conn::Relay(r) => sock.recv_queue() == 0 || r.host_shut || r.failed,
                    _ => true,
                },
                _ => false,
            };
            if !done {
                return true;
            }
            if let Conn::Relay(r) = conn {
                let clean = state == State::TimeWait || (r.host_eof && r.host_shut);
                if !clean {
                    reset_on_close(&r.host);
                    if !r.failed {
                        counters.tcp_error();
                    }
                }
                counters.tcp_closed();
            }
            keep_spare(
                spare_sockets,
                limits.tcp_buffer_bytes,
                sockets.remove(handle),
            );
            false
        });
        before != tcp.len()
    }
}

impl DnsSession {
    /// The next complete query on the session, if any.
    fn take_query(&mut self, sock: &mut tcp::Socket<'static>) -> Option<Vec<u8>> {
        if self.waiting {
            return None;
        }
        let mut len = [0u8; 2];
        if sock.peek_slice(&mut len).ok()? == 2 {
            let n = usize::from(u16::from_be_bytes(len));
            if 2 + n > sock.recv_capacity() {
                sock.abort();
                return None;
            }
            if sock.recv_queue() >= 2 + n {
                let mut msg = vec![0u8; 2 + n];
                let got = sock.recv_slice(&mut msg).ok()?;
                msg.truncate(got);
                self.waiting = true;
                return Some(msg.split_off(2.min(msg.len())));
            }
        }
        if sock.recv_queue() == 0 && sock.state() == State::CloseWait {
            sock.close();
        }
        None
    }
}

impl Relay {
    /// Moves what can move both ways. Returns whether anything did.
    fn pump(
        &mut self,
        cx: &mut Context<'_>,
        sock: &mut tcp::Socket<'static>,
        policy: &Policy,
        counters: &NetCounters,
        scratch: &mut [u8],
    ) -> bool {
        if self.failed {
            return false;
        }
        let state = sock.state();
        if matches!(
            state,
            State::Closed | State::Listen | State::SynSent | State::SynReceived
        ) {
            return false;
        }
        if self.inbound && state == State::Established && sock.timeout().is_some() {
            sock.set_timeout(Some(smol(GUEST_SILENCE_TIMEOUT)));
            self.inbound = false;
        }
        let mut progress = false;
        if let Some(kind) = self.inspect {
            let want = sock.recv_queue().min(SNIFF_LIMIT).min(scratch.len());
            let got = sock.peek_slice(&mut scratch[..want]).unwrap_or(0);
            let guest_done = !matches!(
                state,
                State::Established | State::FinWait1 | State::FinWait2
            );
            match kind.sniff(&scratch[..got]) {
                Sniff::Name(name) if policy.name_allowed(&name).is_some() => {
                    self.inspect = None;
                    progress = true;
                }
                Sniff::NeedMore
                    if !guest_done
                        && got < SNIFF_LIMIT
                        && sock.recv_queue() < sock.recv_capacity() =>
                {
                    return false;
                }
                other => {
                    tracing::debug!(?other, why = %Deny::Name, "tcp: denied by name");
                    self.fail(sock, counters);
                    return true;
                }
            }
        }

        // Guest -> host.
        if !self.host_shut {
            while sock.recv_queue() > 0 {
                let host = &mut self.host;
                let r = sock.recv(|buf| match Pin::new(&mut *host).poll_write(cx, buf) {
                    Poll::Ready(Ok(n)) => (n, Ok(Some(n))),
                    Poll::Ready(Err(e)) => (0, Err(e)),
                    Poll::Pending => (0, Ok(None)),
                });
                match r {
                    Ok(Ok(Some(n))) if n > 0 => {
                        counters.sent(n);
                        progress = true;
                    }
                    Ok(Ok(None)) | Err(_) => break,
                    Ok(Ok(Some(_))) => {
                        self.fail(sock, counters);
                        return true;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "tcp: host write failed");
                        self.fail(sock, counters);
                        return true;
                    }
                }
            }
            let guest_fin = matches!(
                sock.state(),
                State::CloseWait | State::LastAck | State::Closing | State::TimeWait
            );
            if guest_fin
                && sock.recv_queue() == 0
                && Pin::new(&mut self.host).poll_shutdown(cx).is_ready()
            {
                self.host_shut = true;
                progress = true;
            }
        }

        // Host -> guest.
        if !self.host_eof && sock.may_send() {
            while sock.send_queue() < sock.send_capacity() {
                let host = &mut self.host;
                let r = sock.send(|buf| {
                    if buf.is_empty() {
                        return (0, Ok(None));
                    }
                    let mut rb = ReadBuf::new(buf);
                    match Pin::new(&mut *host).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            (n, Ok(Some(n)))
                        }
                        Poll::Ready(Err(e)) => (0, Err(e)),
                        Poll::Pending => (0, Ok(None)),
                    }
                });
                match r {
                    Ok(Ok(Some(0))) => {
                        self.host_eof = true;
                        sock.close();
                        progress = true;
                        break;
                    }
                    Ok(Ok(Some(n))) => {
                        counters.received(n);
                        progress = true;
                    }
                    Ok(Ok(None)) | Err(_) => break,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "tcp: host read failed");
                        self.fail(sock, counters);
                        return true;
                    }
                }
            }
        }
        progress
    }

    fn fail(&mut self, sock: &mut tcp::Socket<'static>, counters: &NetCounters) {
        sock.abort();
        self.failed = true;
        counters.tcp_error();
    }
}

/// See [`Stack::recycle`]. Only sockets that are not open (closed or in TIME-WAIT) are kept:
/// `listen` and `connect` reset everything else of the old connection.
fn keep_spare(
    spare: &mut Vec<tcp::Socket<'static>>,
    buffer_bytes: usize,
    removed: smoltcp::socket::Socket<'static>,
) {
    if let smoltcp::socket::Socket::Tcp(sock) = removed {
        if spare.len() < SPARE_SOCKETS
            && !sock.is_open()
            && sock.recv_capacity() == buffer_bytes
            && sock.send_capacity() == buffer_bytes
        {
            spare.push(sock);
        }
    }
}

fn new_socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; rx]),
        tcp::SocketBuffer::new(vec![0u8; tx]),
    )
}

fn smol(d: Duration) -> smoltcp::time::Duration {
    smoltcp::time::Duration::from_micros(d.as_micros().min(u128::from(u64::MAX)) as u64)
}

/// Makes dropping `stream` send RST rather than FIN: the guest's side was reset.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid descriptor and a properly sized option value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Connects to `target`, then `fallback` if `target` refused, within `timeout`.
async fn connect(
    target: SocketAddr,
    fallback: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let attempt = async {
        match TcpStream::connect(target).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fallback {
                Some(alt) => TcpStream::connect(alt).await.map_err(|_| e),
                None => Err(e),
            },
            other => other,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}
