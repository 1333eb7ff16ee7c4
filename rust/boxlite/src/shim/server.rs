//! The shim process itself.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;
use std::time::Duration;

use boxlite_net::NetCounters;
use boxlite_proto::{Body, Frame, GuestSetup, Message, NetworkStats, StreamId};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::network::PreparedNetwork;
use super::{ShimConfig, ShimStatus};
use crate::agent::{
    bounded, read_frame, write_frames, AgentClient, ChannelEvent, ChannelHandle, MESSAGE_LIMIT,
    REQUEST_TIMEOUT,
};
use crate::error::{BoxliteError, BoxliteResult, NetworkError, StorageError};
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
    // The folders' daemons before the engine, which connects to them as it starts.
    let daemons = super::volumes::start(&config).await?;
    let mut vm = super::start::start_vm(&engine, &config).await?;
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
    if let Err(e) = configure(&vm.client, &config, guest_network).await {
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
    // A pause writes into the box directory, which the home's parent directories may soon
    // hide from us: hold it open.
    let box_dir = match config.saved_state.as_ref().and_then(|p| p.parent()) {
        Some(dir) => Some(
            std::fs::File::open(dir)
                .map_err(|e| BoxliteError::io(format!("opening {}", dir.display()), e))?,
        ),
        None => None,
    };
    // Everything that needed the caller's rights is done (ports bound, the engine jailed, the
    // client socket listening; after this the home's parent directories may be out of
    // reach): the supervisor goes on as the box's own unprivileged id.
    if let Some(jail) = config.vm.jail.as_ref().filter(|_| crate::sys::is_root()) {
        let id = boxlite_jail::derived_jail_id(jail.id_key.as_bytes());
        if let Err(e) = crate::sys::drop_privileges(id) {
            vm.child.kill_and_wait().await;
            return Err(BoxliteError::io("dropping the supervisor's privileges", e));
        }
    }
    report(&ShimStatus::Ready {
        engine_pid: vm.child.pid(),
        spawn_ms: vm.spawn_ms as u64,
        boot_ms: vm.boot_ms as u64,
        ports,
    });
    // Nobody reads stdout any more; a closed pipe must not kill us later.
    silence_stdout();

    let agent = vm.client.clone();
    let mut clients = tokio::task::JoinSet::new();
    let (pause_tx, mut pause_rx) = mpsc::unbounded_channel::<PauseRequest>();
    // Why the box ends, once decided: what every client is told.
    let (ending_tx, ending_rx) = watch::channel::<Option<String>>(None);
    let serve = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    clients.spawn(serve_client(
                        stream,
                        agent.clone(),
                        ready.clone(),
                        counters.clone(),
                        pause_tx.clone(),
                        ending_rx.clone(),
                    ));
                }
                Err(e) => tracing::warn!(%e, "accept failed"),
            }
        }
    };
    // The agent connection is the box: whatever ends it (a protocol violation, a missed
    // heartbeat, the engine's exit, a pause) ends the box, so that no client waits on a dead
    // agent.
    let ending = tokio::select! {
        _ = serve => Ending::Reason("the box supervisor stopped serving".to_string()),
        exit = vm.child.wait() => Ending::Reason(format!("the box's VM exited ({})", exit.0)),
        _ = agent.closed() => Ending::AgentClosed,
        reason = heartbeat(&agent) => Ending::Reason(reason),
        Some(done) = pause_rx.recv() => Ending::Pause(done),
    };
    let reason = match ending {
        Ending::Reason(reason) => reason,
        // An engine that died takes the agent connection with it: say that, rather than how
        // the socket broke.
        Ending::AgentClosed => match tokio::time::timeout(ENGINE_EXIT_GRACE, vm.child.wait()).await
        {
            Ok(exit) => format!("the box's VM exited ({})", exit.0),
            Err(_) => agent_failure(&agent),
        },
        Ending::Pause(done) => {
            let result = pause(&agent, &mut vm, &config, box_dir.as_ref()).await;
            let reason = match &result {
                Ok(()) => "the box was paused".to_string(),
                Err(e) => format!("pausing the box failed, so it was stopped: {e}"),
            };
            let _ = done.send(result.map_err(|e| e.to_string()));
            reason
        }
    };
    tracing::warn!(%reason, "the box ends");
    let _ = ending_tx.send(Some(reason.clone()));
    agent.close(&reason);
    let _ = std::fs::remove_file(&config.client_socket);
    // Every client is told why (each fails its pending calls with it), then the VM goes.
    let _ = tokio::time::timeout(CLIENT_GOODBYE, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    clients.abort_all();
    vm.child.kill_and_wait().await;
    daemons.kill_all().await;
    Ok(())
}

/// How long the engine may take to be seen gone after the agent connection broke.
const ENGINE_EXIT_GRACE: Duration = Duration::from_millis(500);

/// How the supervisor's life ends.
enum Ending {
    Reason(String),
    /// The agent connection ended (the engine may have died with it).
    AgentClosed,
    /// A client asked for a pause; it hears the outcome on the sender.
    Pause(PauseRequest),
}

type PauseRequest = oneshot::Sender<Result<(), String>>;

/// Saves the running VM (RAM and devices) into the box's saved state and ends the engine.
/// The agent is quiesced first, so that no frame is cut in two by the save.
async fn pause(
    agent: &AgentClient,
    vm: &mut crate::vm::RunningVm,
    config: &ShimConfig,
    box_dir: Option<&std::fs::File>,
) -> BoxliteResult<()> {
    let (Some(path), Some(box_dir)) = (config.saved_state.as_ref(), box_dir) else {
        return Err(BoxliteError::Unsupported(
            "this box was started by an older version; stop it instead".into(),
        ));
    };
    let qmp = vm
        .qmp
        .as_mut()
        .ok_or_else(|| BoxliteError::Internal("the box's engine has no control socket".into()))?;
    agent.quiesce(REQUEST_TIMEOUT).await?;
    let name = path
        .file_name()
        .ok_or_else(|| BoxliteError::Internal("the saved state has no file name".into()))?;
    let partial = format!("{}.partial", name.to_string_lossy());
    let file = crate::sys::create_in(box_dir, &partial)
        .map_err(|e| BoxliteError::io(format!("creating {}", path.display()), e))?;
    let saved = crate::vm::save_state(qmp, &file, path, crate::vm::RamInState::Included)
        .await
        .and_then(|()| {
            crate::sys::rename_in(box_dir, &partial, &name.to_string_lossy())
                .map_err(|e| BoxliteError::io("keeping the saved state", e))
        });
    if saved.is_err() {
        let _ = crate::sys::remove_in(box_dir, &partial);
    }
    saved?;
    let _ = file.sync_all();
    let _ = box_dir.sync_all();
    let _ = qmp.quit().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), vm.child.wait()).await;
    Ok(())
}

/// How often the supervisor pings the agent, and how long a ping may stay unanswered before
/// the agent counts as dead (frozen, or not reading). Generous because a software-emulated
/// guest under heavy load answers slowly; documented in docs/python.md.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the supervisor gives its clients to receive the reason it ends before it exits.
const CLIENT_GOODBYE: Duration = Duration::from_millis(500);

/// Pings the agent for as long as it answers; returns why it stopped counting as alive.
async fn heartbeat(agent: &AgentClient) -> String {
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        if agent.is_sealed() {
            continue; // being paused: the agent answers nothing until it is restored
        }
        match agent.request_within(Message::Ping, HEARTBEAT_TIMEOUT).await {
            Ok(Message::Pong) => {}
            Ok(other) => {
                return format!(
                    "the guest agent answered a heartbeat with {}",
                    bounded(&format!("{other:?}"), 200)
                )
            }
            Err(_) if agent.closed_reason().is_some() => return agent_failure(agent),
            Err(_) => {
                return format!(
                    "the guest agent did not answer a heartbeat within {} s",
                    HEARTBEAT_TIMEOUT.as_secs()
                )
            }
        }
    }
}

/// Why the agent connection ended, for the clients.
fn agent_failure(agent: &AgentClient) -> String {
    format!(
        "the guest agent connection ended: {}",
        agent.closed_reason().unwrap_or_default()
    )
}

/// Tells the agent who the box is: clock, fresh entropy, hostname, id, network, and how its
/// commands are confined. Sent after every boot or restore, before anything else.
async fn configure(
    agent: &AgentClient,
    config: &ShimConfig,
    network: Option<boxlite_proto::net::GuestNetwork>,
) -> BoxliteResult<()> {
    let setup = GuestSetup {
        hostname: config.hostname.clone(),
        network,
        time_ms: crate::state::now_ms().max(0) as u64,
        entropy: crate::sys::random_bytes(64)
            .map_err(|e| BoxliteError::io("reading host randomness", e))?,
        sandbox: config.sandbox.clone(),
        box_id: config.box_id.clone(),
        after: config.start.setup_after(),
        volumes: config
            .vm
            .volumes
            .iter()
            .zip(&config.volumes)
            .map(|(device, volume)| boxlite_proto::GuestVolume {
                tag: device.tag.clone(),
                path: volume.guest_path.clone(),
                read_only: volume.read_only,
            })
            .collect(),
    };
    match agent
        .reply_within(Message::Configure(Box::new(setup)), REQUEST_TIMEOUT)
        .await?
    {
        Message::Done => Ok(()),
        Message::Error { message, .. }
            if message.starts_with(boxlite_proto::VOLUME_ERROR_PREFIX) =>
        {
            Err(StorageError::Guest {
                context: "mounting the box's volumes".into(),
                reason: bounded(&message, MESSAGE_LIMIT),
            }
            .into())
        }
        // The agent refused (an interface that would not come up, ...).
        Message::Error { message, .. } => Err(NetworkError::Setup {
            reason: bounded(&message, MESSAGE_LIMIT),
        }
        .into()),
        other => Err(BoxliteError::protocol(format!(
            "unexpected reply to Configure: {}",
            bounded(&format!("{other:?}"), 200)
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
    pause: mpsc::UnboundedSender<PauseRequest>,
    mut ending: watch::Receiver<Option<String>>,
) {
    let (mut reader, writer) = stream.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer_task = tokio::spawn(write_frames(writer, out_rx));
    let _ = out_tx.send(Frame::control(0, ready));

    let mut channels: HashMap<u32, RelayedChannel> = HashMap::new();
    loop {
        let frame = tokio::select! {
            frame = read_frame(&mut reader) => frame,
            () = agent.closed() => {
                say_goodbye(&out_tx, &agent, &mut ending).await;
                break;
            }
        };
        // A client that sends garbage or an oversized frame is cut off alone.
        let Ok(Some(frame)) = frame else {
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
            Body::Control(Message::Pause) if !channels.contains_key(&c) => {
                let (done_tx, done_rx) = oneshot::channel();
                let outcome = match pause.send(done_tx) {
                    Ok(()) => done_rx.await.unwrap_or_else(|_| {
                        Err("the box ended before it could be paused".to_string())
                    }),
                    Err(_) => Err("the box is ending".to_string()),
                };
                let reply = match outcome {
                    Ok(()) => Message::Done,
                    Err(message) => Message::Error {
                        kind: boxlite_proto::ErrorKind::Io,
                        message,
                    },
                };
                let _ = out_tx.send(Frame::control(c, reply));
            }
            Body::Control(message) => match channels.get(&c) {
                Some(relayed) => {
                    let _ = relayed.handle.send_message(message);
                }
                None => match agent.open(message) {
                    Err(_) if agent.closed_reason().is_some() => {
                        say_goodbye(&out_tx, &agent, &mut ending).await;
                        break;
                    }
                    // A request the agent must not get (one too large for a frame).
                    Err(e) => {
                        let _ = out_tx.send(Frame::control(
                            c,
                            Message::Error {
                                kind: boxlite_proto::ErrorKind::InvalidArgument,
                                message: e.to_string(),
                            },
                        ));
                    }
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
    // What is queued for the client (the reason of an ending box) still goes out.
    drop(out_tx);
    let mut writer_task = writer_task;
    if tokio::time::timeout(CLIENT_GOODBYE, &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
}

/// Tells a client why the box ends: its pending calls fail with this reason.
async fn say_goodbye(
    out: &mpsc::UnboundedSender<Frame>,
    agent: &AgentClient,
    ending: &mut watch::Receiver<Option<String>>,
) {
    let decided = tokio::time::timeout(2 * ENGINE_EXIT_GRACE, ending.wait_for(Option::is_some))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|reason| reason.clone()));
    let reason = decided.unwrap_or_else(|| agent.closed_reason().unwrap_or_default());
    let _ = out.send(Frame::control(
        0,
        Message::Error {
            kind: boxlite_proto::ErrorKind::Io,
            message: format!("{reason}; the box was stopped"),
        },
    ));
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
