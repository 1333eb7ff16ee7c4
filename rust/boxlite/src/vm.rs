//! Booting a VM to a ready agent, and shutting it down.

use std::path::{Path, PathBuf};
use std::time::Instant;

use boxlite_proto::{Message, PROTOCOL_VERSION};
use tokio::net::UnixListener;

use crate::agent::AgentClient;
use crate::error::{BoxliteError, BoxliteResult, EngineError, GuestError, IoContext};
use crate::process::{log_tail, GuardedChild};
use crate::units::Seconds;
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
    /// The agent's `Ready` message.
    pub ready: Message,
}

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
    match outcome {
        Ok((client, ready)) => Ok(RunningVm {
            child,
            client,
            ready,
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

impl RunningVm {
    /// Asks the agent to sync and power off; kills the engine if that takes past `timeout`.
    pub async fn shutdown(&self, timeout: Seconds) {
        let graceful = async {
            // The agent may power off before its reply leaves; either way we wait for the exit.
            let _ = self.client.request(Message::Shutdown).await;
            self.child.wait().await;
        };
        if tokio::time::timeout(timeout.as_duration(), graceful)
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.child.pid(),
                "graceful shutdown timed out; killing the engine"
            );
        }
        self.child.kill_and_wait().await;
        self.client.close("the box was stopped");
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
    pub engine: std::sync::Arc<dyn Engine>,
    /// The engine binary, for the per-box supervisors.
    pub qemu: PathBuf,
    /// The `boxlite-shim` binary.
    pub shim: PathBuf,
    pub bundle: crate::vmm::GuestBundle,
    pub accel: crate::vmm::Accel,
    pub boot_timeout: Seconds,
    pub stop_timeout: Seconds,
}

/// Unix socket paths are limited to 107 bytes; a deep home directory falls back to a
/// private per-user directory under the system temp dir.
pub(crate) fn socket_path(preferred: PathBuf, id: &str) -> BoxliteResult<PathBuf> {
    const MAX_SOCKET_PATH: usize = 100;
    if preferred.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(preferred);
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("boxlite-{uid}"));
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .ctx(|| format!("securing {}", dir.display()))?;
    Ok(dir.join(format!("{id}.sock")))
}
