//! Child processes that die with us: engine processes are spawned from one long-lived thread
//! with `PR_SET_PDEATHSIG`, since the kernel sends that signal when the *thread* that forked
//! exits, and tokio's blocking threads come and go.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::sync::watch;

use crate::error::{BoxliteError, BoxliteResult};

type SpawnReply = mpsc::SyncSender<std::io::Result<Child>>;

fn spawner() -> &'static Mutex<mpsc::Sender<(Command, SpawnReply)>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(Command, SpawnReply)>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        std::thread::Builder::new()
            .name("boxlite-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning the boxlite-spawner thread");
        Mutex::new(tx)
    })
}

/// How a child ended, in words for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitDescription(pub String);

/// How to start a [`GuardedChild`].
#[derive(Debug, Clone)]
pub struct ChildOptions {
    /// Where its output goes, bounded to the newest `log_limit` bytes (in two halves).
    pub log_path: PathBuf,
    pub log_limit: u64,
    /// Killed when this process (more exactly, the spawner thread) dies, and on drop.
    /// Detached children outlive us instead.
    pub die_with_parent: bool,
    /// Hand stdout to the caller instead of the log (a status line protocol).
    pub capture_stdout: bool,
}

/// A child process, reaped by a waiter thread; unless detached, it is killed when this
/// process dies or when the handle is dropped.
#[derive(Debug)]
pub struct GuardedChild {
    pid: u32,
    exit: watch::Receiver<Option<ExitDescription>>,
    kill_on_drop: bool,
}

impl GuardedChild {
    /// Spawns `command` (stdin from /dev/null) in a new session.
    pub fn spawn(
        mut command: Command,
        options: &ChildOptions,
    ) -> BoxliteResult<(Self, Option<ChildStdout>)> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let die_with_parent = options.die_with_parent;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if die_with_parent {
                    crate::sys::die_with_parent_in_child()?;
                }
                libc::setsid();
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        spawner()
            .lock()
            .map_err(|_| BoxliteError::Internal("spawner lock poisoned".into()))?
            .send((command, reply_tx))
            .map_err(|_| BoxliteError::Internal("spawner thread is gone".into()))?;
        let mut child = reply_rx
            .recv()
            .map_err(|_| BoxliteError::Internal("spawner thread dropped the request".into()))?
            .map_err(|e| BoxliteError::io(format!("starting {program}"), e))?;

        let stdout = child.stdout.take();
        let (captured, logged_stdout) = if options.capture_stdout {
            (stdout, None)
        } else {
            (None, stdout)
        };
        log_outputs(
            options,
            [
                logged_stdout.map(|s| Box::new(s) as Box<dyn Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ],
        )?;
        let pid = child.id();
        let exit = watch_exit(move || match child.wait() {
            Ok(status) => ExitDescription(status.to_string()),
            Err(e) => ExitDescription(format!("wait failed: {e}")),
        })?;
        Ok((
            Self {
                pid,
                exit,
                kill_on_drop: die_with_parent,
            },
            captured,
        ))
    }

    /// Spawns `program args...` confined by `spec` (see `boxlite-jail`): its stdout and
    /// stderr go to the log; it dies with this process and with the handle.
    pub fn spawn_jailed(
        spec: &boxlite_jail::JailSpec,
        program: &Path,
        args: &[std::ffi::OsString],
        options: &ChildOptions,
    ) -> BoxliteResult<Self> {
        let stdio = boxlite_jail::JailStdio {
            stdin: boxlite_jail::Stdio::Null,
            stdout: boxlite_jail::Stdio::Piped,
            stderr: boxlite_jail::Stdio::Piped,
        };
        let mut child = boxlite_jail::spawn(spec, program, args, stdio).map_err(|e| {
            crate::error::EngineError::Unavailable {
                reason: format!("cannot start {} in its jail: {e}", program.display()),
                hint: "see docs/security.md (BOXLITE_JAIL=0 runs the engine unconfined)".into(),
            }
        })?;
        if let boxlite_jail::CgroupOutcome::Skipped(reason) = child.cgroup() {
            tracing::debug!(%reason, "engine cgroup limits not applied");
        }
        log_outputs(
            options,
            [
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ],
        )?;
        let pid = child.pid();
        let exit = watch_exit(move || match child.wait() {
            Ok(status) => ExitDescription(status.to_string()),
            Err(e) => ExitDescription(format!("wait failed: {e}")),
        })?;
        Ok(Self {
            pid,
            exit,
            kill_on_drop: spec.die_with_parent,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Sends SIGKILL unless the child was already reaped (so a reused pid is never hit).
    pub fn kill(&self) {
        if !self.has_exited() {
            // SAFETY: plain kill(2) on a pid we have not reaped yet.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Waits until the child has exited and been reaped.
    pub async fn wait(&self) -> ExitDescription {
        self.exited().await
    }

    /// A future of the exit that does not borrow the child, for watchers that must not
    /// keep it alive.
    pub fn exited(&self) -> impl std::future::Future<Output = ExitDescription> + Send + 'static {
        let mut exit = self.exit.clone();
        async move {
            match exit.wait_for(Option::is_some).await {
                Ok(value) => value
                    .clone()
                    .unwrap_or_else(|| ExitDescription("unknown".into())),
                Err(_) => ExitDescription("waiter thread vanished".into()),
            }
        }
    }

    /// Kills the child and waits for it to be reaped.
    pub async fn kill_and_wait(&self) -> ExitDescription {
        self.kill();
        self.wait().await
    }
}

impl Drop for GuardedChild {
    fn drop(&mut self) {
        if self.kill_on_drop {
            self.kill();
        }
    }
}

/// Copies each output into the child's bounded log, one thread each.
fn log_outputs(
    options: &ChildOptions,
    outputs: [Option<Box<dyn Read + Send>>; 2],
) -> BoxliteResult<()> {
    let log = std::sync::Arc::new(Mutex::new(BoundedLog::new(
        options.log_path.clone(),
        options.log_limit,
    )));
    for output in outputs.into_iter().flatten() {
        let log = log.clone();
        std::thread::Builder::new()
            .name("boxlite-console".into())
            .spawn(move || copy_to_log(output, &log))
            .map_err(|e| BoxliteError::io("starting a console thread", e))?;
    }
    Ok(())
}

/// Runs `wait` on a thread of its own and publishes how the child ended.
fn watch_exit(
    wait: impl FnOnce() -> ExitDescription + Send + 'static,
) -> BoxliteResult<watch::Receiver<Option<ExitDescription>>> {
    let (exit_tx, exit_rx) = watch::channel(None);
    std::thread::Builder::new()
        .name("boxlite-waiter".into())
        .spawn(move || {
            let _ = exit_tx.send(Some(wait()));
        })
        .map_err(|e| BoxliteError::io("starting a waiter thread", e))?;
    Ok(exit_rx)
}

fn copy_to_log(mut from: Box<dyn Read + Send>, log: &Mutex<BoundedLog>) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut log) = log.lock() {
                    log.append(&buf[..n]);
                }
            }
        }
    }
}

/// A log file that never grows past `limit` bytes: when full it becomes `<name>.1` and a new
/// one starts, so the newest output is always kept.
#[derive(Debug)]
pub struct BoundedLog {
    path: PathBuf,
    limit: u64,
    written: u64,
    file: Option<std::fs::File>,
}

impl BoundedLog {
    pub fn new(path: PathBuf, limit: u64) -> Self {
        Self {
            path,
            limit: limit.max(2),
            written: 0,
            file: None,
        }
    }

    pub fn append(&mut self, data: &[u8]) {
        if self.written + data.len() as u64 > self.limit / 2 {
            let _ = std::fs::rename(&self.path, rotated(&self.path));
            self.file = None;
            self.written = 0;
        }
        if self.file.is_none() {
            self.file = std::fs::File::create(&self.path).ok();
        }
        let keep = &data[data.len().saturating_sub((self.limit / 2) as usize)..];
        if let Some(file) = &mut self.file {
            if file.write_all(keep).is_ok() {
                self.written += keep.len() as u64;
            }
        }
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `max` bytes of a bounded log (both halves), as text.
pub fn log_tail(path: &Path, max: usize) -> String {
    let mut data = std::fs::read(rotated(path)).unwrap_or_default();
    data.extend(std::fs::read(path).unwrap_or_default());
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_log_keeps_the_newest_bytes_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = BoundedLog::new(path.clone(), 1000);
        for i in 0..500 {
            log.append(format!("line {i}\n").as_bytes());
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(&path) + size(&rotated(&path)) <= 1000);
        let tail = log_tail(&path, 100);
        assert!(tail.ends_with("line 499\n"), "{tail}");
        log.append(&[b'x'; 5000]);
        assert!(size(&path) <= 500);
    }

    fn options(dir: &Path) -> ChildOptions {
        ChildOptions {
            log_path: dir.join("log"),
            log_limit: 4096,
            die_with_parent: true,
            capture_stdout: false,
        }
    }

    #[tokio::test]
    async fn children_are_reaped_and_killable() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let (child, _) = GuardedChild::spawn(cmd, &options(dir.path())).unwrap();
        assert!(!child.has_exited());
        let exit = child.kill_and_wait().await;
        assert!(exit.0.contains("signal: 9"), "{exit:?}");
        assert!(child.has_exited());
        // The pid is gone: signal 0 fails.
        assert_ne!(unsafe { libc::kill(child.pid() as i32, 0) }, 0);
    }

    #[test]
    fn a_missing_program_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = GuardedChild::spawn(Command::new("/nonexistent/qemu"), &options(dir.path()))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
    }
}
