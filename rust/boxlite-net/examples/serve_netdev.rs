//! Serves one QEMU `-netdev stream` connection with this crate's stack, nothing else of the
//! product: what `bench/` uses to time the network path on its own.
//!
//! ```text
//! serve_netdev SOCKET_PATH [GUEST_MAC]
//! ```
//!
//! Listens on the unix socket `SOCKET_PATH`, prints `serve_netdev: listening` once it does,
//! takes QEMU's one connection and runs `boxlite_net::serve` on it with
//! `allow_net = ["host.boxlite.internal"]` (so 192.168.127.254:P in the guest is the host's
//! 127.0.0.1:P) until QEMU closes it. Then prints one line with the counters and the
//! process's CPU time: `serve_netdev: bytes_sent=N bytes_received=N tcp_connections=N
//! tcp_errors=N wall_s=F user_s=F sys_s=F`. Runs the stack as a task of a two-worker tokio
//! runtime, as the box's shim does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use boxlite_net::{AllowEntry, NetCounters, NetworkConfig};

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), mac) = (args.next().map(PathBuf::from), args.next()) else {
        eprintln!("usage: serve_netdev SOCKET_PATH [GUEST_MAC]");
        return ExitCode::from(2);
    };
    let mac = match mac.as_deref().map(parse_mac) {
        None => [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        Some(Some(mac)) => mac,
        Some(None) => {
            eprintln!("serve_netdev: GUEST_MAC must look like 52:54:00:12:34:56");
            return ExitCode::from(2);
        }
    };
    let mut config = NetworkConfig::new(mac);
    config.allow_net = vec!["host.boxlite.internal"
        .parse::<AllowEntry>()
        .expect("a valid allow_net entry")];
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("serve_netdev: starting tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let counters = Arc::new(NetCounters::new());
    let started = Instant::now();
    let served = runtime.block_on(async {
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        println!("serve_netdev: listening on {}", path.display());
        let (stream, _) = listener.accept().await?;
        // On a worker thread, as in the shim (block_on's own thread is not a worker).
        let counters = counters.clone();
        tokio::spawn(async move { boxlite_net::serve(stream, config, Vec::new(), counters).await })
            .await
            .map_err(std::io::Error::other)?
            .map_err(std::io::Error::other)
    });
    let _ = std::fs::remove_file(&path);
    let stats = counters.snapshot();
    let (user, sys) = cpu_seconds();
    println!(
        "serve_netdev: bytes_sent={} bytes_received={} tcp_connections={} tcp_errors={} \
         wall_s={:.3} user_s={user:.3} sys_s={sys:.3}",
        stats.bytes_sent,
        stats.bytes_received,
        stats.tcp_connections,
        stats.tcp_errors,
        started.elapsed().as_secs_f64(),
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve_netdev: {e}");
            ExitCode::FAILURE
        }
    }
}
