//! Bulk transfer through the stack with the guest stand-in: checks every byte and prints
//! the rate. `BOXLITE_NET_BENCH_MIB` sets the size (default 16 MiB), `BOXLITE_NET_BENCH_MTU`
//! the link MTU (default 1500); run with `--release --nocapture` for a meaningful figure (the guest stand-in is smoltcp too, so this measures
//! both stacks together).

mod common;

use std::time::{Duration, Instant};

use common::{alias, config, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn size() -> usize {
    std::env::var("BOXLITE_NET_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16usize)
        << 20
}

fn byte(i: usize) -> u8 {
    (i % 251) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_download_and_upload() {
    let n = size();
    // Serves `n` bytes, then counts what the client uploads until EOF.
    let server = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = server.local_addr().expect("addr").port();
    let uploaded = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.expect("accept");
        let chunk: Vec<u8> = (0..251 * 256).map(byte).collect();
        let mut sent = 0;
        while sent < n {
            let k = chunk.len().min(n - sent);
            s.write_all(&chunk[..k]).await.expect("write");
            sent += k;
        }
        s.shutdown().await.expect("shutdown");
        let mut total = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = s.read(&mut buf).await.expect("read");
            if k == 0 {
                break;
            }
            total += k;
        }
        total
    });

    let mut cfg = config(&["host.boxlite.internal"]);
    cfg.mtu = std::env::var("BOXLITE_NET_BENCH_MTU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let mtu = cfg.mtu;
    let (mut g, counters, task) = start(cfg, vec![]);
    g.buffer = 1024 * 1024;
    let h = g.tcp_connect(alias(port)).await.expect("connect");

    let t = Instant::now();
    let mut got = 0usize;
    let mut bad = None;
    g.until(Duration::from_secs(600), |g| {
        let s = g.tcp(h);
        while s.can_recv() {
            let _ = s.recv(|b| {
                for (i, &x) in b.iter().enumerate() {
                    if bad.is_none() && x != byte(got + i) {
                        bad = Some(got + i);
                    }
                }
                got += b.len();
                (b.len(), ())
            });
        }
        (got == n || !s.may_recv()).then_some(())
    })
    .await;
    let down = t.elapsed();
    assert_eq!(got, n, "downloaded");
    assert_eq!(bad, None, "first corrupt byte");

    let t = Instant::now();
    let chunk: Vec<u8> = (0..251 * 256).map(byte).collect();
    let mut sent = 0usize;
    g.until(Duration::from_secs(600), |g| {
        let s = g.tcp(h);
        while sent < n && s.can_send() {
            let k = chunk.len().min(n - sent);
            let w = s.send_slice(&chunk[..k]).expect("send");
            if w == 0 {
                break;
            }
            sent += w;
        }
        if sent == n && s.send_queue() == 0 {
            s.close();
            return Some(());
        }
        None
    })
    .await;
    g.until(Duration::from_secs(600), |_| {
        uploaded.is_finished().then_some(())
    })
    .await;
    let up = t.elapsed();
    assert_eq!(uploaded.await.expect("server"), n, "uploaded");

    let mib = n as f64 / (1024.0 * 1024.0);
    eprintln!(
        "throughput through the stack (guest stand-in, MTU {mtu}): download {:.0} MiB/s, upload {:.0} MiB/s ({mib:.0} MiB each)",
        mib / down.as_secs_f64(),
        mib / up.as_secs_f64()
    );
    let stats = counters.snapshot();
    assert_eq!(stats.bytes_received, n as u64);
    assert_eq!(stats.bytes_sent, n as u64);
    drop(g);
    task.await.expect("join").expect("serve");
}
