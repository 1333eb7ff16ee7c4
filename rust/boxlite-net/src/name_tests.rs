//! End-to-end checks of the name rules (TLS SNI, HTTP Host, QUIC) on addresses learned from
//! DNS. The learned address is a documentation address, so the stack's host connections are
//! redirected to a loopback server after the policy has decided: nothing leaves the machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UdpSocket, UnixStream};

use crate::policy::NameMatch;
use crate::sniff::tests::client_hello;
use crate::stack::Stack;
use crate::{NetCounters, NetworkConfig};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Guest, STEP};

const LEARNED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

/// TCP and UDP echo servers on the same loopback port.
async fn echo_servers() -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let udp = UdpSocket::bind(addr).await.expect("udp bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&buf[..n], from).await;
        }
    });
    addr
}

fn start(allow: &[&str], redirect: SocketAddr) -> (Guest, Arc<NetCounters>) {
    let (host_end, guest_end) = UnixStream::pair().expect("pair");
    let mut cfg = NetworkConfig::new(common::GUEST_MAC);
    cfg.allow_net = allow.iter().map(|s| s.parse().expect("entry")).collect();
    let counters = Arc::new(NetCounters::new());
    let mut stack =
        Stack::new(host_end, &cfg, Vec::new(), counters.clone(), Vec::new()).expect("stack");
    stack.redirect = Some(redirect);
    stack
        .policy
        .learn(IpAddr::V4(LEARNED), NameMatch::Named, Instant::now());
    tokio::spawn(stack.run());
    let mut g = Guest::new(guest_end, 1500);
    g.prime_neighbors();
    (g, counters)
}

/// Connects, sends `first` (in two pieces when `split`), and returns what came back before
/// the connection ended or `n` bytes arrived; `None` if it was reset.
async fn exchange(g: &mut Guest, port: u16, first: &[u8], split: bool) -> Option<Vec<u8>> {
    let h = g
        .tcp_connect(SocketAddrV4::new(LEARNED, port))
        .await
        .expect("the learned address accepts");
    if split {
        g.send_all(h, &first[..7]).await;
        g.drain_for(Duration::from_millis(50)).await;
        g.send_all(h, &first[7..]).await;
    } else {
        g.send_all(h, first).await;
    }
    let n = first.len();
    let mut got = Vec::new();
    let reset = g
        .until(STEP, |g| {
            let s = g.tcp(h);
            let _ = s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            });
            if got.len() >= n {
                return Some(false);
            }
            (s.state() == smoltcp::socket::tcp::State::Closed).then_some(true)
        })
        .await;
    if !reset {
        g.close(h).await;
    }
    (!reset).then_some(got)
}

/// Waits until the stack has no connection left, and returns its error count.
async fn settle(g: &mut Guest, counters: &NetCounters) -> u64 {
    g.until(STEP, |_| {
        let s = counters.snapshot();
        (s.tcp_connections == 0).then_some(s.tcp_errors)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_http_must_name_an_allowed_host() {
    let server = echo_servers().await;
    let (mut g, counters) = start(&["*.example.com"], server);

    let good = client_hello(Some("www.example.com"));
    assert_eq!(
        exchange(&mut g, 443, &good, false).await.as_deref(),
        Some(&good[..])
    );
    // A ClientHello arriving in pieces is still read whole.
    assert_eq!(
        exchange(&mut g, 443, &good, true).await.as_deref(),
        Some(&good[..])
    );
    assert_eq!(settle(&mut g, &counters).await, 0);

    assert_eq!(
        exchange(&mut g, 443, &client_hello(Some("evil.test")), false).await,
        None
    );
    assert_eq!(
        exchange(&mut g, 443, &client_hello(None), false).await,
        None
    );
    assert_eq!(
        exchange(
            &mut g,
            443,
            b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n",
            false
        )
        .await,
        None
    );

    let get = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    assert_eq!(
        exchange(&mut g, 80, get, false).await.as_deref(),
        Some(&get[..])
    );
    let evil = b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    assert_eq!(exchange(&mut g, 80, evil, false).await, None);
    assert_eq!(settle(&mut g, &counters).await, 4);

    // Other ports of a learned address carry anything.
    assert_eq!(
        exchange(&mut g, 22, b"SSH-2.0-x\r\n", false)
            .await
            .as_deref(),
        Some(&b"SSH-2.0-x\r\n"[..])
    );

    // An address no allowed name resolved to is refused at once.
    let t = Instant::now();
    assert!(g
        .tcp_connect(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 6), 443))
        .await
        .is_err());
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_is_refused_while_names_decide() {
    let server = echo_servers().await;
    let (mut g, _counters) = start(&["*.example.com"], server);
    let wait = Duration::from_millis(500);
    let quic = g
        .udp_exchange(SocketAddrV4::new(LEARNED, 443), b"quic", wait)
        .await;
    assert!(quic.is_none());
    let other = g
        .udp_exchange(SocketAddrV4::new(LEARNED, 3478), b"stun", wait)
        .await;
    assert_eq!(other.as_deref(), Some(&b"stun"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_addresses_skip_the_name_check() {
    let server = echo_servers().await;
    let (mut g, _counters) = start(&["203.0.113.0/24"], server);
    let hello = client_hello(Some("anything.test"));
    assert_eq!(
        exchange(&mut g, 443, &hello, false).await.as_deref(),
        Some(&hello[..])
    );
    let quic = g
        .udp_exchange(
            SocketAddrV4::new(LEARNED, 443),
            b"quic",
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(quic.as_deref(), Some(&b"quic"[..]));
}
