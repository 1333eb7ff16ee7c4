//! End to end: a smoltcp guest stand-in on one end of the netdev stream, the stack on the
//! other, real host sockets on loopback behind it.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use boxlite_net::{bind_forwards, NetStats, PortForward};
use common::{alias, arp_request, config, start, start_unprimed, GUEST_MAC, STEP};
use smoltcp::socket::tcp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const NOERROR: u8 = 0;
const NXDOMAIN: u8 = 3;
const A: u16 = 1;
const AAAA: u16 = 28;

/// A loopback TCP echo server (echoes until EOF, then closes).
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

/// A port on loopback where nothing listens.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

async fn wait_stats(
    g: &mut common::Guest,
    counters: &boxlite_net::NetCounters,
    f: impl Fn(&NetStats) -> bool,
) -> NetStats {
    g.until(STEP, |_| {
        let s = counters.snapshot();
        f(&s).then_some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_allowed_names_only() {
    let (mut g, _counters, task) = start(config(&["host.boxlite.internal", "localhost"]), vec![]);
    assert_eq!(
        g.dns("host.boxlite.internal", A).await,
        (NOERROR, vec![Ipv4Addr::new(192, 168, 127, 254)])
    );
    // Allowed names are resolved by the host's resolver.
    let (rc, addrs) = g.dns("localhost", A).await;
    assert_eq!(rc, NOERROR);
    assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
    assert_eq!(g.dns("example.com", A).await, (NXDOMAIN, vec![]));
    assert_eq!(g.dns("sub.localhost", A).await, (NXDOMAIN, vec![]));
    // No IPv6 in the guest: AAAA has no data.
    assert_eq!(
        g.dns("host.boxlite.internal", AAAA).await,
        (NOERROR, vec![])
    );
    // DNS over TCP answers the same.
    assert_eq!(
        g.dns_tcp("host.boxlite.internal", A).await,
        (NOERROR, vec![Ipv4Addr::new(192, 168, 127, 254)])
    );
    assert_eq!(g.dns_tcp("example.com", A).await.0, NXDOMAIN);
    drop(g);
    task.await.expect("join").expect("serve ends cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_alias_needs_its_name_in_allow_net() {
    let port = echo_server().await;
    // Empty allow_net: the internet, but not the host.
    let (mut g, counters, _task) = start(config(&[]), vec![]);
    assert_eq!(g.dns("host.boxlite.internal", A).await, (NXDOMAIN, vec![]));
    let t = Instant::now();
    assert!(g.tcp_connect(alias(port)).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(counters.snapshot().tcp_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_talks_to_a_host_server_through_the_alias() {
    let port = echo_server().await;
    let (mut g, counters, task) = start(config(&["host.boxlite.internal"]), vec![]);
    let h = g.tcp_connect(alias(port)).await.expect("connected");
    assert_eq!(counters.snapshot().tcp_connections, 1);
    let msg = pattern(700_000);
    let mut back = Vec::new();
    let mut sent = 0;
    // Send and receive together: the echo would stall on a full window otherwise.
    g.until(STEP, |g| {
        let s = g.tcp(h);
        if sent < msg.len() && s.can_send() {
            sent += s.send_slice(&msg[sent..]).expect("send");
        }
        let _ = s.recv(|b| {
            back.extend_from_slice(b);
            (b.len(), ())
        });
        (back.len() == msg.len()).then_some(())
    })
    .await;
    assert!(back == msg, "echo differs");
    g.close(h).await;
    let stats = wait_stats(&mut g, &counters, |s| s.tcp_connections == 0).await;
    assert_eq!(stats.bytes_sent, msg.len() as u64);
    assert_eq!(stats.bytes_received, msg.len() as u64);
    assert_eq!(stats.tcp_errors, 0);
    drop(g);
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_one_after_another_each_carry_their_own_bytes() {
    // The stack reuses a closed connection's socket for the next one: whatever ended the
    // last connection (a clean close, a guest reset), the next one starts fresh.
    let port = echo_server().await;
    let (mut g, counters, task) = start(config(&["host.boxlite.internal"]), vec![]);
    let mut total = 0u64;
    for i in 0..12usize {
        let h = g.tcp_connect(alias(port)).await.expect("connected");
        let msg: Vec<u8> = (0..1000 + i * 3000).map(|k| (k * 13 + i) as u8).collect();
        g.send_all(h, &msg).await;
        assert!(g.recv_exact(h, msg.len()).await == msg, "echo {i} differs");
        total += msg.len() as u64;
        if i % 4 == 3 {
            g.tcp(h).abort();
        } else {
            g.close(h).await;
        }
        wait_stats(&mut g, &counters, |s| s.tcp_connections == 0).await;
    }
    let stats = counters.snapshot();
    assert_eq!(stats.bytes_sent, total);
    assert_eq!(stats.bytes_received, total);
    assert_eq!(stats.tcp_errors, 3, "the three guest resets");
    drop(g);
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_destinations_are_refused_at_once() {
    let (mut g, counters, _task) = start(config(&["pypi.org", "host.boxlite.internal"]), vec![]);
    let denied = [
        "10.0.0.1:80",
        "169.254.169.254:80",
        "192.168.127.1:80",
        "172.16.5.5:22",
        // Public but not learned from an allowed name.
        "203.0.113.10:443",
        "198.51.100.7:80",
    ];
    for dst in denied {
        let dst: SocketAddrV4 = dst.parse().expect("addr");
        let t = Instant::now();
        assert!(g.tcp_connect(dst).await.is_err(), "{dst} connected");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{dst}: {:?}",
            t.elapsed()
        );
    }
    // Allowed, but nothing listens on the host: refused too, not hung.
    let t = Instant::now();
    assert!(g.tcp_connect(alias(closed_port())).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(counters.snapshot().tcp_errors, denied.len() as u64 + 1);
    assert_eq!(counters.snapshot().tcp_connections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_port_reaches_a_guest_server() {
    let forwards = vec![PortForward::tcp(0, 8080)];
    let listeners = bind_forwards(&forwards).expect("bind");
    let addr = listeners[0].local_addr().expect("addr");
    let mut cfg = config(&[]);
    cfg.forwards = forwards;
    let (mut g, counters, task) = start(cfg, listeners);
    let l = g.tcp_listen(8080);
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.expect("read");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.expect("eof");
        (buf, rest)
    });
    g.until(STEP, |g| {
        (g.tcp(l).state() == tcp::State::Established).then_some(())
    })
    .await;
    assert_eq!(g.recv_exact(l, 4).await, b"ping");
    g.send_all(l, b"pong").await;
    g.tcp(l).close();
    g.until(STEP, |_| client.is_finished().then_some(())).await;
    let (reply, rest) = client.await.expect("client");
    assert_eq!(&reply, b"pong");
    assert!(rest.is_empty());
    let stats = wait_stats(&mut g, &counters, |s| s.tcp_connections == 0).await;
    assert_eq!((stats.bytes_sent, stats.bytes_received), (4, 4));
    assert_eq!(stats.tcp_errors, 0);
    drop(g);
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_port_serves_concurrent_clients() {
    const CLIENTS: usize = 20;
    let forwards = vec![PortForward::tcp(0, 80)];
    let listeners = bind_forwards(&forwards).expect("bind");
    let addr = listeners[0].local_addr().expect("addr");
    let mut cfg = config(&[]);
    cfg.forwards = forwards;
    let (mut g, counters, task) = start(cfg, listeners);
    g.buffer = 16 * 1024;
    // smoltcp has no backlog: one listening socket per expected client.
    let mut socks: Vec<_> = (0..CLIENTS).map(|_| g.tcp_listen(80)).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(format!("GET /{i}\n").as_bytes())
                    .await
                    .expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).await.expect("read");
                out
            })
        })
        .collect();
    // The guest server: answer each request line with its path, then close.
    let mut served = 0;
    let mut pending: Vec<(tokio::task::JoinHandle<String>, usize)> =
        clients.into_iter().zip(0..).collect();
    g.until(Duration::from_secs(30), |g| {
        for h in socks.iter().copied() {
            let s = g.tcp(h);
            if s.state() != tcp::State::Established || !s.can_recv() {
                continue;
            }
            let mut line = Vec::new();
            let _ = s.peek(64).map(|b| line.extend_from_slice(b));
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                let _ = s.recv_slice(&mut vec![0; end + 1]);
                let path = String::from_utf8_lossy(&line[4..end]).to_string();
                let _ = s.send_slice(format!("you asked for {path}").as_bytes());
                s.close();
                served += 1;
            }
        }
        (served == CLIENTS).then_some(())
    })
    .await;
    // Keep the guest running while the clients read their answers.
    g.until(STEP, |_| {
        pending.iter().all(|(h, _)| h.is_finished()).then_some(())
    })
    .await;
    for (h, i) in pending.drain(..) {
        assert_eq!(h.await.expect("client"), format!("you asked for /{i}"));
    }
    socks.clear();
    let stats = wait_stats(&mut g, &counters, |s| s.tcp_connections == 0).await;
    assert_eq!(stats.tcp_errors, 0);
    drop(g);
    task.await.expect("join").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_port_to_a_closed_guest_port_fails_fast() {
    let forwards = vec![PortForward::tcp(0, 9999)];
    let listeners = bind_forwards(&forwards).expect("bind");
    let addr = listeners[0].local_addr().expect("addr");
    let mut cfg = config(&[]);
    cfg.forwards = forwards;
    let (mut g, counters, _task) = start(cfg, listeners);
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        let t = Instant::now();
        let r = s.read_to_end(&mut buf).await;
        (r.map(|_| buf.len()), t.elapsed())
    });
    g.until(STEP, |_| client.is_finished().then_some(())).await;
    let (r, took) = client.await.expect("client");
    // Reset (or at worst closed) with nothing read, quickly.
    assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    wait_stats(&mut g, &counters, |s| {
        s.tcp_errors == 1 && s.tcp_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_goes_through_the_alias_and_counts() {
    let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let port = server.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await;
        }
    });
    let (mut g, counters, _task) = start(config(&["host.boxlite.internal"]), vec![]);
    let got = g
        .udp_exchange(alias(port), b"hello udp", Duration::from_secs(5))
        .await;
    assert_eq!(got.as_deref(), Some(&b"hello udp"[..]));
    let s = counters.snapshot();
    assert_eq!((s.bytes_sent, s.bytes_received), (9, 9));
    // A denied destination gets nothing back (and nothing leaves the host).
    let none = g
        .udp_exchange(
            "10.1.2.3:53".parse().expect("addr"),
            b"x",
            Duration::from_millis(300),
        )
        .await;
    assert!(none.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reset_is_passed_on_and_counted() {
    let port = echo_server().await;
    let (mut g, counters, _task) = start(config(&["host.boxlite.internal"]), vec![]);
    let h = g.tcp_connect(alias(port)).await.expect("connected");
    g.send_all(h, b"abc").await;
    assert_eq!(g.recv_exact(h, 3).await, b"abc");
    g.tcp(h).abort();
    let stats = wait_stats(&mut g, &counters, |s| s.tcp_connections == 0).await;
    assert_eq!(stats.tcp_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arp_is_answered_for_the_gateway_and_the_alias_only() {
    use smoltcp::wire::{ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol};
    let (mut g, _counters, _task) = start_unprimed(config(&[]), vec![]);
    let me = Ipv4Addr::new(192, 168, 127, 2);
    for (target, answered) in [
        (Ipv4Addr::new(192, 168, 127, 1), true),
        (Ipv4Addr::new(192, 168, 127, 254), true),
        (Ipv4Addr::new(192, 168, 127, 77), false),
        (Ipv4Addr::new(10, 0, 0, 1), false),
    ] {
        let req = arp_request(GUEST_MAC, me, target, [0xff; 6]);
        let mut framed = (req.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&req);
        g.write_raw(&framed).await;
        let start = Instant::now();
        let mut replied = false;
        while start.elapsed() < Duration::from_millis(200) && !replied {
            g.step(Duration::from_millis(10)).await;
            for f in g.take_rx() {
                let eth = EthernetFrame::new_checked(&f[..]).expect("eth");
                if eth.ethertype() != EthernetProtocol::Arp {
                    continue;
                }
                let arp = ArpPacket::new_checked(eth.payload()).expect("arp");
                if let Ok(ArpRepr::EthernetIpv4 {
                    source_protocol_addr,
                    source_hardware_addr,
                    ..
                }) = ArpRepr::parse(&arp)
                {
                    assert_eq!(source_hardware_addr.0, boxlite_net::GATEWAY_MAC);
                    replied |= source_protocol_addr == target;
                }
            }
        }
        assert_eq!(replied, answered, "ARP for {target}");
    }
}
