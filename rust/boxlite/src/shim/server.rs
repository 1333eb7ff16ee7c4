//! The shim process itself.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use boxlite_net::NetCounters;
use boxlite_proto::{Body, Frame, GuestSetup, Message, NetworkStats, StreamId};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::network::PreparedNetwork;
use super::{ShimConfig, ShimStatus};
use crate::agent::{read_frame, write_frames, AgentClient, ChannelEvent, ChannelHandle};
use crate::error::{BoxliteError, BoxliteResult, GuestError, NetworkError};
use crate::vm::launch;
use crate::vmm::qemu::QemuEngine;

/// Entry point of the `boxlite-shim` binary: `boxlite-shim <shim.json>`.
pub fn main() -> ExitCode {
    let Some(config_path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: boxlite-shim SHIM_CONFIG_JSON");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&ShimStatus::Failed {
                error: (&BoxliteError::io("starting the shim runtime", e)).into(),
            });
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config_path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&ShimStatus::Failed { error: (&e).into() });
            ExitCode::FAILURE
        }
    }
}

fn report(status: &ShimStatus) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, status);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

async fn run(config_path: PathBuf) -> BoxliteResult<()> {
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| BoxliteError::io(format!("reading {}", config_path.display()), e))?;
    let config: ShimConfig = serde_json::from_str(&text)
        .map_err(|e| BoxliteError::Internal(format!("bad shim config: {e}")))?;
    let engine = QemuEngine::at(config.qemu.clone());
    // Ports and the netdev socket first: a taken port fails before any VM exists.
    let network = match (&config.network, &config.vm.network) {
        (Some(network), Some(device)) => Some(PreparedNetwork::prepare(network, device)?),
        _ => None,
    };
    let vm = launch(&engine, &config.vm, config.boot_timeout).await?;
    let ready = vm.ready.clone();
    let (counters, ports, guest_network) = match network {
        Some(network) => {
            let counters = network.counters.clone();
            let ports = network.ports.clone();
            let guest = network.guest();
            tokio::spawn(async move {
                if let Err(e) = network.serve().await {
                    tracing::warn!(%e, "the box's network stopped");
                }
            });
            (Some(counters), ports, Some(guest))
        }
        None => (None, Vec::new(), None),
    };
    if let Err(e) = configure(&vm.client, &config.hostname, guest_network).await {
        vm.child.kill_and_wait().await;
        return Err(e);
    }

    let _ = std::fs::remove_file(&config.client_socket);
    let listener = UnixListener::bind(&config.client_socket).map_err(|e| {
        BoxliteError::io(
            format!("listening on {}", config.client_socket.display()),
            e,
        )
    })?;
    report(&ShimStatus::Ready {
        engine_pid: vm.child.pid(),
        spawn_ms: vm.spawn_ms as u64,
        boot_ms: vm.boot_ms as u64,
        ports,
    });
    // Nobody reads stdout any more; a closed pipe must not kill us later.
    silence_stdout();

    let agent = vm.client.clone();
    let serve = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve_client(
                        stream,
                        agent.clone(),
                        ready.clone(),
                        counters.clone(),
                    ));
                }
                Err(e) => tracing::warn!(%e, "accept failed"),
            }
        }
    };
    tokio::select! {
        _ = serve => {}
        exit = vm.child.wait() => tracing::info!(status = %exit.0, "engine exited; shim ends"),
    }
    let _ = std::fs::remove_file(&config.client_socket);
    Ok(())
}

/// Tells the agent who the box is: clock, fresh entropy, hostname, network.
async fn configure(
    agent: &AgentClient,
    hostname: &str,
    network: Option<boxlite_proto::net::GuestNetwork>,
) -> BoxliteResult<()> {
    let setup = GuestSetup {
        hostname: hostname.to_owned(),
        network,
        time_ms: crate::state::now_ms().max(0) as u64,
        entropy: crate::sys::random_bytes(64)
            .map_err(|e| BoxliteError::io("reading host randomness", e))?,
    };
    match agent.request(Message::Configure(setup)).await {
        Ok(Message::Done) => Ok(()),
        // The agent refused (an interface that would not come up, ...).
        Err(BoxliteError::Guest(GuestError::Protocol { reason })) => {
            Err(NetworkError::Setup { reason }.into())
        }
        Err(e) => Err(e),
        Ok(other) => Err(BoxliteError::protocol(format!(
            "unexpected reply to Configure: {other:?}"
        ))),
    }
}

fn silence_stdout() {
    // SAFETY: plain open/dup2 on our own descriptors.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            libc::dup2(fd, 1);
            libc::close(fd);
        }
    }
}

/// Relays one client: its channel `c` maps to a guest channel opened for it. Requests meant
/// for the supervisor itself (the network counters) are answered here.
async fn serve_client(
    stream: UnixStream,
    agent: AgentClient,
    ready: Message,
    counters: Option<Arc<NetCounters>>,
) {
    let (mut reader, writer) = stream.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer_task = tokio::spawn(write_frames(writer, out_rx));
    let _ = out_tx.send(Frame::control(0, ready));

    let mut channels: HashMap<u32, RelayedChannel> = HashMap::new();
    loop {
        let Ok(Some(frame)) = read_frame(&mut reader).await else {
            break;
        };
        let c = frame.channel;
        match frame.body {
            Body::Control(Message::NetworkMetrics) if !channels.contains_key(&c) => {
                let stats = counters
                    .as_ref()
                    .map(|c| c.snapshot())
                    .map(|s| NetworkStats {
                        bytes_sent: s.bytes_sent,
                        bytes_received: s.bytes_received,
                        tcp_connections: s.tcp_connections,
                        tcp_errors: s.tcp_errors,
                    });
                let reply = match stats {
                    Some(stats) => Message::NetworkReport(stats),
                    None => Message::Error {
                        kind: boxlite_proto::ErrorKind::Unsupported,
                        message: "the box has no network".into(),
                    },
                };
                let _ = out_tx.send(Frame::control(c, reply));
            }
            Body::Control(message) => match channels.get(&c) {
                Some(relayed) => {
                    let _ = relayed.handle.send_message(message);
                }
                None => match agent.open(message) {
                    Ok(channel) => {
                        let handle = channel.handle.clone();
                        let stdin = spawn_stdin_forwarder(handle.clone(), c, out_tx.clone());
                        let pump = tokio::spawn(pump_to_client(channel, c, out_tx.clone()));
                        channels.insert(
                            c,
                            RelayedChannel {
                                handle,
                                stdin,
                                pump,
                            },
                        );
                    }
                    Err(_) => break,
                },
            },
            Body::Data {
                stream: StreamId::Stdin,
                data,
            } => {
                if let Some(relayed) = channels.get(&c) {
                    let _ = relayed.stdin.send(StdinItem::Data(data));
                }
            }
            Body::Eof {
                stream: StreamId::Stdin,
            } => {
                if let Some(relayed) = channels.get(&c) {
                    let _ = relayed.stdin.send(StdinItem::Eof);
                }
            }
            Body::Credit { stream, bytes } => {
                if let Some(relayed) = channels.get(&c) {
                    relayed.handle.credit(stream, bytes as usize);
                }
            }
            // Clients never send output streams; a confused one is cut off.
            Body::Data { .. } | Body::Eof { .. } => break,
        }
        channels.retain(|_, relayed| !relayed.pump.is_finished());
    }
    // The client is gone: whatever it still ran would wait forever for credit. Kill it.
    for (_, relayed) in channels.drain() {
        if !relayed.pump.is_finished() {
            let _ = relayed.handle.send_message(Message::Signal {
                signal: libc::SIGKILL,
            });
        }
        relayed.pump.abort();
    }
    writer_task.abort();
}

struct RelayedChannel {
    handle: ChannelHandle,
    stdin: mpsc::UnboundedSender<StdinItem>,
    pump: tokio::task::JoinHandle<()>,
}

enum StdinItem {
    Data(Vec<u8>),
    Eof,
}

/// Forwards a client's stdin in order, waiting for guest credit, and credits the client for
/// each chunk once it is on its way: the client's window is bounded by the guest's.
fn spawn_stdin_forwarder(
    handle: ChannelHandle,
    client_channel: u32,
    out: mpsc::UnboundedSender<Frame>,
) -> mpsc::UnboundedSender<StdinItem> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            match item {
                StdinItem::Data(data) => {
                    let len = data.len() as u32;
                    if handle.send_stdin(&data).await.is_err() {
                        return;
                    }
                    let _ = out.send(Frame::credit(client_channel, StreamId::Stdin, len));
                }
                StdinItem::Eof => {
                    let _ = handle.send_eof(StreamId::Stdin);
                }
            }
        }
    });
    tx
}

async fn pump_to_client(
    mut channel: crate::agent::Channel,
    client_channel: u32,
    out: mpsc::UnboundedSender<Frame>,
) {
    loop {
        let frame = match channel.recv().await {
            Ok(ChannelEvent::Message(message)) => {
                let last = matches!(
                    message,
                    Message::Exited(_)
                        | Message::Done
                        | Message::Error { .. }
                        | Message::Pong
                        | Message::MetricsReport(_)
                );
                let _ = out.send(Frame::control(client_channel, message));
                if last {
                    return;
                }
                continue;
            }
            Ok(ChannelEvent::Data(stream, data)) => Frame::data(client_channel, stream, data),
            Ok(ChannelEvent::Eof(stream)) => Frame::eof(client_channel, stream),
            Err(_) => return,
        };
        if out.send(frame).is_err() {
            return;
        }
    }
}
