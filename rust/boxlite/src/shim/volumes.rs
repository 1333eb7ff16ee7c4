//! The box's host folders: one `virtiofsd` per volume, started before the engine (which
//! connects to its socket) and gone with the supervisor (each is a guarded child: killed
//! when its handle drops or the supervisor dies; it also exits when the engine hangs up).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::ShimConfig;
use crate::error::{BoxliteError, BoxliteResult, EngineError};
use crate::process::{log_tail, ChildOptions, GuardedChild};

/// How long a daemon may take to listen on its socket.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Each daemon's log in the box directory, newest bytes kept.
const LOG_LIMIT: u64 = 64 * 1024;

/// The `virtiofsd` boxes use: `$BOXLITE_VIRTIOFSD`, else the one beside the shim (the
/// package's bin directory).
pub(crate) fn locate_virtiofsd(shim: &Path) -> BoxliteResult<PathBuf> {
    std::env::var_os("BOXLITE_VIRTIOFSD")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .chain(shim.parent().map(|d| d.join("virtiofsd")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BoxliteError::engine_unavailable(
                "virtiofsd (needed by boxes with volumes) was not found",
                "run `make develop` (it builds virtiofsd 1.14 into the package), or install it \
                 (`cargo install --locked virtiofsd@1.14.0`) and set BOXLITE_VIRTIOFSD",
            )
        })
}

/// The running daemons; dropping this kills them.
#[derive(Debug, Default)]
pub(crate) struct Daemons(Vec<GuardedChild>);

/// How long the daemons may take to go once the engine is gone.
const EXIT_GRACE: Duration = Duration::from_secs(2);

impl Daemons {
    /// Kills and reaps the daemons. Once the supervisor has dropped to the box's id it can no
    /// longer signal a root daemon; each one exits on its own when the engine hangs up, so
    /// this waits a bounded time for that.
    pub async fn kill_all(&self) {
        let all = async {
            for child in &self.0 {
                child.kill_and_wait().await;
            }
        };
        if tokio::time::timeout(EXIT_GRACE, all).await.is_err() {
            tracing::warn!("a virtiofsd did not exit with the engine");
        }
    }
}

/// The daemon's arguments. Read-only is enforced by the daemon itself, so a guest remount
/// cannot write. Its namespace sandbox confines it to the shared folder (a symlink in the
/// folder resolves inside it). On a root host every guest uid and gid is squashed to the
/// box's unprivileged id: what the guest creates is never owned by host root.
pub(crate) fn daemon_args(
    shared_dir: &Path,
    socket: &Path,
    read_only: bool,
    squash_to: Option<u32>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--shared-dir".into(),
        shared_dir.into(),
        "--socket-path".into(),
        socket.into(),
        "--sandbox".into(),
        "namespace".into(),
        "--seccomp".into(),
        "kill".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    if read_only {
        args.push("--readonly".into());
    }
    if let Some(id) = squash_to {
        for flag in ["--translate-uid", "--translate-gid"] {
            args.push(flag.into());
            args.push(format!("squash-guest:0:{id}:4294967295").into());
        }
    }
    args
}

/// Starts one daemon per volume and waits until each listens; on any failure the ones
/// already started are killed (by the drop) and the error names the folder.
pub(crate) async fn start(config: &ShimConfig) -> BoxliteResult<Daemons> {
    let mut daemons = Daemons::default();
    if config.volumes.is_empty() {
        return Ok(daemons);
    }
    let Some(binary) = &config.virtiofsd else {
        return Err(BoxliteError::Internal(
            "a box with volumes has no virtiofsd".into(),
        ));
    };
    let box_dir = config
        .vm
        .console_log
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let squash_to = config
        .vm
        .jail
        .as_ref()
        .filter(|_| crate::sys::is_root())
        .map(|jail| boxlite_jail::derived_jail_id(jail.id_key.as_bytes()))
        .or_else(|| crate::sys::is_root().then_some(65534));
    // As root the daemon writes as root: whatever the guest asks, it may not give a file the
    // set-user-ID or set-group-ID bit (uid squashing alone leaves set-id files of the box's
    // id that any host user could run).
    let setid_guard = if crate::sys::is_root() {
        Some(
            boxlite_jail::SeccompProgram::no_setid().map_err(|e| EngineError::Unavailable {
                reason: format!("cannot build the volume daemon's seccomp filter: {e}"),
                hint: "volumes need seccomp on this host".into(),
            })?,
        )
    } else {
        None
    };
    for (index, (volume, device)) in config.volumes.iter().zip(&config.vm.volumes).enumerate() {
        // A folder deleted since the box was created fails here, before any VM runs.
        volume.check_host_path()?;
        match std::fs::remove_file(&device.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BoxliteError::io(
                    format!("removing stale socket {}", device.socket.display()),
                    e,
                ))
            }
            _ => {}
        }
        let log_path = box_dir.join(format!("virtiofsd{index}.log"));
        let mut command = Command::new(binary);
        if let Some(guard) = &setid_guard {
            let guard = guard.clone();
            // SAFETY: one prctl between fork and exec.
            unsafe {
                command.pre_exec(move || guard.install());
            }
        }
        command.args(daemon_args(
            &volume.host_path,
            &device.socket,
            volume.read_only,
            squash_to,
        ));
        let options = ChildOptions {
            log_path: log_path.clone(),
            log_limit: LOG_LIMIT,
            die_with_parent: true,
            capture_stdout: false,
        };
        let (child, _) = GuardedChild::spawn(command, &options)?;
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if device.socket.exists() {
                break;
            }
            if child.has_exited() || Instant::now() >= deadline {
                child.kill_and_wait().await;
                return Err(EngineError::Unavailable {
                    reason: format!(
                        "virtiofsd for {} did not start: {}",
                        volume.host_path.display(),
                        log_tail(&log_path, 2048)
                    ),
                    hint: "see docs/security.md (volumes)".into(),
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        daemons.0.push(child);
    }
    Ok(daemons)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_and_squashing_are_the_daemons_job() {
        let text = |args: Vec<std::ffi::OsString>| {
            args.iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let rw = text(daemon_args(Path::new("/d"), Path::new("/s"), false, None));
        assert!(rw.contains("--shared-dir /d --socket-path /s --sandbox namespace"));
        assert!(!rw.contains("--readonly") && !rw.contains("translate"));
        assert!(!rw.contains("--xattr"));
        let ro = text(daemon_args(Path::new("/d"), Path::new("/s"), true, Some(7)));
        assert!(ro.contains("--readonly"));
        assert!(ro.contains("--translate-uid squash-guest:0:7:4294967295"));
        assert!(ro.contains("--translate-gid squash-guest:0:7:4294967295"));
    }
}
