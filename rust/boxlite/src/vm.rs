//! Booting a VM to a ready agent, and shutting it down.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boxlite_proto::{Message, PROTOCOL_VERSION};
use tokio::net::UnixListener;

use crate::agent::AgentClient;
use crate::error::{BoxliteError, BoxliteResult, EngineError, GuestError, IoContext};
use crate::process::{log_tail, GuardedChild};
use crate::units::Seconds;
use crate::vmm::qemu::qmp::{Qmp, QmpError};
use crate::vmm::{Engine, VmConfig};

/// Console bytes quoted in boot errors.
const CONSOLE_TAIL_BYTES: usize = 4096;

/// A VM whose agent reported ready.
#[derive(Debug)]
pub(crate) struct RunningVm {
    pub child: GuardedChild,
    pub client: AgentClient,
    /// Engine start to agent ready.
    pub boot_ms: u128,
    /// Time to spawn the engine process.
    pub spawn_ms: u128,
    /// The agent's `Ready` message (for a restored VM: the one its template's agent sent).
    pub ready: Message,
    /// The engine's control connection, when the VM has a control socket.
    pub qmp: Option<Qmp>,
}

/// A saved VM state to start from instead of booting.
#[derive(Debug, Clone)]
pub(crate) struct SavedState {
    /// The device state (and, unless `ram_shared`, the RAM) written by a migration.
    pub state: PathBuf,
    /// The RAM is a file the VM maps (`MemorySource::PrivateFile`), not part of the stream.
    pub ram_shared: bool,
    /// What the agent said when the saved VM booted.
    pub ready: Message,
}

/// Deadline for loading a saved state: the device state is a few hundred KB, the RAM of a
/// paused box a few hundred MB written to a local file.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Spawns the VM and waits for its agent; on any failure the engine is killed and reaped.
pub(crate) async fn launch(
    engine: &dyn Engine,
    config: &VmConfig,
    boot_timeout: Seconds,
) -> BoxliteResult<RunningVm> {
    let socket = &config.agent_socket;
    remove_stale(socket)?;
    let listener =
        UnixListener::bind(socket).ctx(|| format!("listening on {}", socket.display()))?;
    let started = Instant::now();
    let child = engine.spawn(config)?;
    let spawn_ms = started.elapsed().as_millis();
    let deadline = tokio::time::Instant::from_std(started + boot_timeout.as_duration());

    let outcome = async {
        let stream = tokio::select! {
            accepted = tokio::time::timeout_at(deadline, listener.accept()) => match accepted {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(e)) => return Err(BoxliteError::io("accepting the engine's agent connection", e)),
                Err(_) => return Err(boot_timeout_error(boot_timeout, &config.console_log)),
            },
            exit = child.wait() => return Err(engine_exited(&exit.0, &config.console_log)),
        };
        // The engine is connected; the path is no longer needed.
        let _ = std::fs::remove_file(socket);
        let (client, ready) = AgentClient::start(stream);
        let ready = tokio::select! {
            ready = tokio::time::timeout_at(deadline, ready) => match ready {
                Ok(Ok(message)) => message,
                Ok(Err(_)) => {
                    // Usually the engine itself died; its own words are in the console log.
                    let grace = std::time::Duration::from_secs(2);
                    if let Ok(exit) = tokio::time::timeout(grace, child.wait()).await {
                        return Err(engine_exited(&exit.0, &config.console_log));
                    }
                    let reason = client.closed_reason().unwrap_or_default();
                    return Err(BoxliteError::protocol(format!("the agent hung up before it was ready: {reason}")));
                }
                Err(_) => return Err(boot_timeout_error(boot_timeout, &config.console_log)),
            },
            exit = child.wait() => return Err(engine_exited(&exit.0, &config.console_log)),
        };
        check_ready(&ready)?;
        Ok((client, ready))
    }
    .await;
    drop(listener);
    let outcome = match outcome {
        Ok((client, ready)) => match &config.qmp_socket {
            Some(path) => match Qmp::connect(path, deadline.into_std()).await {
                Ok(qmp) => Ok((client, ready, Some(qmp))),
                Err(e) => Err(control_error(e)),
            },
            None => Ok((client, ready, None)),
        },
        Err(e) => Err(e),
    };
    running_or_gone(child, socket, outcome, started, spawn_ms).await
}

/// Starts the VM from a saved state: spawns the engine waiting for it (`config.incoming`),
/// takes the agent connection, loads the state over the control socket and lets the VM run.
/// The agent does not announce itself again: the caller speaks first (`Configure`). On any
/// failure the engine is killed and reaped.
pub(crate) async fn restore(
    engine: &dyn Engine,
    config: &VmConfig,
    saved: &SavedState,
) -> BoxliteResult<RunningVm> {
    let Some(qmp_path) = &config.qmp_socket else {
        return Err(BoxliteError::Internal(
            "a restored VM needs a control socket".into(),
        ));
    };
    let socket = &config.agent_socket;
    remove_stale(socket)?;
    remove_stale(qmp_path)?;
    let state = std::fs::File::open(&saved.state)
        .ctx(|| format!("opening the saved state {}", saved.state.display()))?;
    let listener =
        UnixListener::bind(socket).ctx(|| format!("listening on {}", socket.display()))?;
    let started = Instant::now();
    let child = engine.spawn(config)?;
    let spawn_ms = started.elapsed().as_millis();
    let deadline = started + RESTORE_TIMEOUT;

    let outcome = async {
        // The engine connects the agent's port while it starts, before it loads anything.
        let stream = tokio::select! {
            accepted = tokio::time::timeout_at(deadline.into(), listener.accept()) => match accepted {
                Ok(Ok((stream, _))) => stream,
                Ok(Err(e)) => return Err(BoxliteError::io("accepting the engine's agent connection", e)),
                Err(_) => return Err(restore_failed("the engine did not connect the agent port")),
            },
            exit = child.wait() => return Err(engine_exited(&exit.0, &config.console_log)),
        };
        let _ = std::fs::remove_file(socket);
        let load = async {
            let mut qmp = Qmp::connect(qmp_path, deadline).await?;
            if saved.ram_shared {
                qmp.set_migration_capabilities(&[("x-ignore-shared", true)]).await?;
            }
            qmp.getfd("incoming", state.as_fd()).await?;
            qmp.migrate_incoming("fd:incoming").await?;
            qmp.wait_migration(&["completed"], Duration::from_millis(1), deadline)
                .await?;
            // The state carries the saved VM's run state (stopped): it must be continued.
            qmp.cont().await?;
            Ok::<_, QmpError>(qmp)
        };
        let qmp = tokio::select! {
            loaded = load => loaded.map_err(control_error)?,
            exit = child.wait() => return Err(engine_exited(&exit.0, &config.console_log)),
        };
        let (client, _no_ready) = AgentClient::start(stream);
        Ok((client, qmp))
    }
    .await;
    drop(listener);
    let outcome = outcome.map(|(client, qmp)| (client, saved.ready.clone(), Some(qmp)));
    running_or_gone(child, socket, outcome, started, spawn_ms).await
}

/// The running VM once its engine is up and its agent answered; on failure the engine is
/// killed and its agent socket removed.
async fn running_or_gone(
    child: GuardedChild,
    socket: &Path,
    outcome: BoxliteResult<(AgentClient, Message, Option<Qmp>)>,
    started: Instant,
    spawn_ms: u128,
) -> BoxliteResult<RunningVm> {
    match outcome {
        Ok((client, ready, qmp)) => Ok(RunningVm {
            child,
            client,
            ready,
            qmp,
            boot_ms: started.elapsed().as_millis(),
            spawn_ms,
        }),
        Err(e) => {
            child.kill_and_wait().await;
            let _ = std::fs::remove_file(socket);
            Err(e)
        }
    }
}

/// Whether a saved state carries the guest's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RamInState {
    /// No: the RAM stays in its shared file (a template).
    Excluded,
    /// Yes: all of it (a paused box, whose RAM is its own).
    Included,
}

/// Stops the VM and writes its device state (and RAM, if `ram`) into `file` (new and empty;
/// `path` names it in errors), synced. The VM stays stopped.
pub(crate) async fn save_state(
    qmp: &mut Qmp,
    file: &std::fs::File,
    path: &Path,
    ram: RamInState,
) -> BoxliteResult<()> {
    qmp.stop().await.map_err(control_error)?;
    qmp.set_migration_capabilities(&[("x-ignore-shared", ram == RamInState::Excluded)])
        .await
        .map_err(control_error)?;
    if ram == RamInState::Included {
        // The default bandwidth cap (32 MiB/s) would make saving a GiB take half a minute.
        qmp.unthrottle_migration().await.map_err(control_error)?;
    }
    qmp.getfd("saved-state", file.as_fd())
        .await
        .map_err(control_error)?;
    qmp.migrate("fd:saved-state").await.map_err(control_error)?;
    qmp.wait_migration(
        &["completed"],
        Duration::from_millis(2),
        Instant::now() + SAVE_TIMEOUT,
    )
    .await
    .map_err(control_error)?;
    file.sync_all()
        .ctx(|| format!("syncing {}", path.display()))
}

/// How long writing a saved state may take (a GiB of RAM to a slow disk included).
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

fn control_error(e: QmpError) -> BoxliteError {
    EngineError::Control {
        reason: e.to_string(),
    }
    .into()
}

fn restore_failed(reason: &str) -> BoxliteError {
    EngineError::Control {
        reason: reason.to_string(),
    }
    .into()
}

fn check_ready(ready: &Message) -> BoxliteResult<()> {
    match ready {
        Message::Ready {
            version,
            root_error,
            ..
        } => {
            if *version != PROTOCOL_VERSION {
                return Err(GuestError::Incompatible {
                    guest: *version,
                    host: PROTOCOL_VERSION,
                }
                .into());
            }
            if let Some(error) = root_error {
                return Err(BoxliteError::guest_storage(
                    "the guest could not mount the box disk",
                    error.clone(),
                ));
            }
            Ok(())
        }
        other => Err(BoxliteError::protocol(format!(
            "expected Ready, got {other:?}"
        ))),
    }
}

fn remove_stale(socket: &Path) -> BoxliteResult<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BoxliteError::io(
            format!("removing stale socket {}", socket.display()),
            e,
        )),
    }
}

fn boot_timeout_error(timeout: Seconds, console_log: &Path) -> BoxliteError {
    BoxliteError::from(EngineError::BootTimeout {
        timeout,
        console_tail: log_tail(console_log, CONSOLE_TAIL_BYTES),
    })
}

fn engine_exited(status: &str, console_log: &Path) -> BoxliteError {
    EngineError::ExitedDuringBoot {
        status: status.to_owned(),
        console_tail: log_tail(console_log, CONSOLE_TAIL_BYTES),
    }
    .into()
}

/// What every VM of one runtime shares: the engine, the guest bundle, the accelerator.
#[derive(Debug, Clone)]
pub(crate) struct VmEnv {
    /// The engine binary, for the per-box supervisors.
    pub qemu: PathBuf,
    /// What the engine needs in its jail (empty when engines are not jailed).
    pub engine_binds: Vec<PathBuf>,
    /// The `boxlite-shim` binary.
    pub shim: PathBuf,
    pub bundle: crate::vmm::GuestBundle,
    /// What `-kernel` names for an engine that loads a saved VM (see
    /// `GuestBundle::resume_kernel`); the bundle's kernel when it could not be made.
    pub resume_kernel: PathBuf,
    pub accel: crate::vmm::Accel,
    pub boot_timeout: Seconds,
}

/// Where a box's unix sockets live: its own directory, or, when that path is too long for a
/// socket (107 bytes), a private per-box directory under the system temp dir.
pub(crate) fn socket_dir(box_dir: &Path, box_id: &str) -> BoxliteResult<PathBuf> {
    const LONGEST_NAME: &str = "/agent.sock";
    const MAX_SOCKET_PATH: usize = 100;
    if box_dir.as_os_str().len() + LONGEST_NAME.len() <= MAX_SOCKET_PATH {
        return Ok(box_dir.to_path_buf());
    }
    let dir = fallback_socket_dir(box_id);
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    for secured in [dir.parent().unwrap_or(&dir), &dir] {
        std::fs::set_permissions(secured, std::fs::Permissions::from_mode(0o700))
            .ctx(|| format!("securing {}", secured.display()))?;
    }
    Ok(dir)
}

/// The temp-dir home of a box's sockets when its own directory's path is too long.
pub(crate) fn fallback_socket_dir(box_id: &str) -> PathBuf {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir()
        .join(format!("boxlite-{uid}"))
        .join(box_id)
}
