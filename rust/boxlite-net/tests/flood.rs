//! A guest flooding the stack: connections, SYNs to denied addresses and UDP flows beyond
//! the limits are refused or bounded, and the host's descriptors stay within the budget.
//! (Its own test binary: descriptors are counted per process.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boxlite_net::Limits;
use common::{alias, config, open_fds, start, STEP};
use smoltcp::socket::tcp;
use tokio::net::{TcpListener, UdpSocket};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_stay_within_the_limits() {
    // A host server that accepts and holds every connection.
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = server.local_addr().expect("addr").port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = server.accept().await {
            keep.lock().expect("lock").push(s);
        }
    });
    let udp_server = UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    let udp_port = udp_server.local_addr().expect("addr").port();

    let limits = Limits {
        max_tcp_connections: 16,
        max_pending_connects: 8,
        max_udp_flows: 8,
        tcp_buffer_bytes: 16 * 1024,
        ..Limits::default()
    };
    // Each relayed connection costs the stack one descriptor and this process's server one.
    let budget = limits.fd_budget(0) + limits.max_tcp_connections;
    let mut cfg = config(&["host.boxlite.internal"]);
    cfg.limits = limits.clone();
    let baseline = open_fds();
    let (mut g, counters, task) = start(cfg, vec![]);
    g.buffer = 8 * 1024;
    let mut peak = 0;

    // 1. Far more connections at once than allowed.
    let socks: Vec<_> = (0..100).map(|_| g.tcp_start(alias(port))).collect();
    let (up, refused) = g
        .until(STEP, |g| {
            peak = peak.max(open_fds());
            let mut up = 0;
            let mut refused = 0;
            for &h in &socks {
                match g.tcp(h).state() {
                    tcp::State::Established => up += 1,
                    tcp::State::Closed => refused += 1,
                    _ => {}
                }
            }
            (up + refused == socks.len()).then_some((up, refused))
        })
        .await;
    assert!(
        (1..=limits.max_tcp_connections).contains(&up),
        "{up} established"
    );
    assert_eq!(up + refused, 100);
    let stats = counters.snapshot();
    assert_eq!(stats.tcp_connections, up as u64);
    assert_eq!(stats.tcp_errors, refused as u64);

    // 2. A SYN flood to denied addresses: RST each, no descriptor used.
    let t = Instant::now();
    let denied: Vec<_> = (0..300u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            g.tcp_start(std::net::SocketAddrV4::new(ip, 80))
        })
        .collect();
    g.until(STEP, |g| {
        peak = peak.max(open_fds());
        denied
            .iter()
            .all(|&h| g.tcp(h).state() == tcp::State::Closed)
            .then_some(())
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // 3. A UDP burst from many source ports: at most max_udp_flows host sockets.
    for _ in 0..10 {
        g.udp_burst(alias(udp_port), 20, 1000).await;
        peak = peak.max(open_fds());
    }
    g.drain_for(Duration::from_millis(200)).await;
    peak = peak.max(open_fds());
    drop(udp_server);

    eprintln!(
        "flood: {up} established, {refused} refused; descriptors peak {peak}, baseline {baseline}, budget {budget}"
    );
    assert!(
        peak <= baseline + budget,
        "peak {peak} descriptors, baseline {baseline}, budget {budget}"
    );

    // Everything closes again.
    for &h in &socks {
        g.tcp(h).abort();
    }
    g.until(STEP, |_| {
        (counters.snapshot().tcp_connections == 0).then_some(())
    })
    .await;
    drop(g);
    task.await.expect("join").expect("serve");
    held.lock().expect("lock").clear();
}
