//! Starting a box's shim and connecting to it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;

use boxlite_proto::PROTOCOL_VERSION;
use tokio::net::UnixStream;

use super::{ShimConfig, ShimStatus};
use crate::agent::AgentClient;
use crate::error::{BoxliteError, BoxliteResult};
use crate::process::{log_tail, ChildOptions, GuardedChild};
use crate::state::ProcessId;

/// A shim this process started and whose guest is ready.
#[derive(Debug)]
pub(crate) struct ShimHandle {
    /// Present unless detached: killing it (or our death) takes the VM down.
    pub child: GuardedChild,
    pub process: ProcessId,
    pub engine_pid: u32,
    pub spawn_ms: u128,
    pub boot_ms: u128,
    /// The published ports as bound.
    pub ports: Vec<crate::options::PortSpec>,
}

/// Bytes of the shim's own log kept on disk.
const SHIM_LOG_LIMIT: u64 = 256 * 1024;

/// Writes the config, starts the shim and waits for its status line. `on_spawned` learns the
/// shim's identity as soon as it exists (so a crash mid-boot can be cleaned up later).
pub(crate) async fn spawn(
    shim_binary: &Path,
    box_dir: &Path,
    config: &ShimConfig,
    detach: bool,
    on_spawned: impl FnOnce(ProcessId),
) -> BoxliteResult<ShimHandle> {
    let config_path = box_dir.join("shim.json");
    let json = serde_json::to_vec_pretty(config)
        .map_err(|e| BoxliteError::Internal(format!("shim config: {e}")))?;
    std::fs::write(&config_path, json)
        .map_err(|e| BoxliteError::io(format!("writing {}", config_path.display()), e))?;
    let mut command = Command::new(shim_binary);
    command.arg(&config_path);
    let log_path = box_dir.join("shim.log");
    let options = ChildOptions {
        log_path: log_path.clone(),
        log_limit: SHIM_LOG_LIMIT,
        die_with_parent: !detach,
        capture_stdout: true,
    };
    let (child, stdout) = GuardedChild::spawn(command, &options)?;
    if let Some(process) = ProcessId::of(child.pid()) {
        on_spawned(process);
    }
    let stdout = stdout.ok_or_else(|| BoxliteError::Internal("shim stdout not captured".into()))?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .map_err(|e| crate::error::task_failed("shim status", e))?
    .map_err(|e| BoxliteError::io("reading the shim status", e))?;
    let status: ShimStatus = match serde_json::from_str(line.trim()) {
        Ok(status) => status,
        Err(_) => {
            let exit = child.kill_and_wait().await;
            return Err(BoxliteError::Internal(format!(
                "the box supervisor ended without a status ({}): {}",
                exit.0,
                log_tail(&log_path, 4096)
            )));
        }
    };
    match status {
        ShimStatus::Ready {
            engine_pid,
            spawn_ms,
            boot_ms,
            ports,
        } => {
            let process = ProcessId::of(child.pid()).ok_or_else(|| {
                BoxliteError::Internal("the box supervisor vanished right after booting".into())
            })?;
            Ok(ShimHandle {
                child,
                process,
                engine_pid,
                spawn_ms: spawn_ms.into(),
                boot_ms: boot_ms.into(),
                ports,
            })
        }
        ShimStatus::Failed { error } => {
            child.wait().await;
            Err(error.into())
        }
    }
}

/// Connects to a running shim; resolves once the guest's `Ready` has been relayed.
pub(crate) async fn connect(socket: &Path) -> BoxliteResult<AgentClient> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        BoxliteError::connection_lost(format!(
            "cannot reach the box supervisor at {}: {e}",
            socket.display()
        ))
    })?;
    let (client, ready) = AgentClient::start(stream);
    let ready = tokio::time::timeout(std::time::Duration::from_secs(10), ready)
        .await
        .map_err(|_| BoxliteError::protocol("the box supervisor did not greet"))?
        .map_err(|_| BoxliteError::protocol("the box supervisor hung up"))?;
    match ready {
        boxlite_proto::Message::Ready { version, .. } if version == PROTOCOL_VERSION => Ok(client),
        other => Err(BoxliteError::protocol(format!(
            "unexpected greeting from the box supervisor: {other:?}"
        ))),
    }
}

/// Where to find the `boxlite-shim` binary: `$BOXLITE_SHIM`, the configured path, next to
/// the running executable, then `PATH`.
pub(crate) fn locate_shim(configured: Option<&Path>) -> BoxliteResult<PathBuf> {
    let candidates = std::env::var_os("BOXLITE_SHIM")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(configured.map(Path::to_path_buf))
        .chain(
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("boxlite-shim"))),
        )
        .chain(crate::vmm::qemu::find_in_path("boxlite-shim"));
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        BoxliteError::engine_unavailable(
            "the boxlite-shim binary was not found",
            "build it (`cargo build --release -p boxlite --bin boxlite-shim`) and set BOXLITE_SHIM, or reinstall the package",
        )
    })
}
