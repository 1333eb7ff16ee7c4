//! Running commands in a box: what to run (`BoxCommand`), the running process (`Execution`)
//! and how it ended (`ExecResult`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boxlite_proto::{ExecTrace, ExitStatus, Message, StreamId, TtySize, MAX_PAYLOAD};
use tokio::sync::{mpsc, watch};

use crate::agent::{bounded, Channel, ChannelEvent, ChannelHandle, MESSAGE_LIMIT, REQUEST_TIMEOUT};
use crate::error::{BoxliteError, BoxliteResult, ExecError};
use crate::metrics::{BoxCounters, RuntimeMetrics};
use crate::options::{validate_box_path, validate_env};
use crate::units::Seconds;

/// How long after its own timeout the host waits for a command's end before it gives up on the
/// guest: it then kills the command itself and `wait` fails with `ExecTimeout`. The guest
/// enforces the timeout; this bounds a guest that does not. Documented in docs/python.md.
pub const EXEC_TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// Characters of a command line quoted in messages; a longer one is cut and ends with `...`.
pub const DISPLAY_LIMIT: usize = 200;

/// A command to run in a box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoxCommand {
    pub program: String,
    pub args: Vec<String>,
    /// Added on top of the image's and the box's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; else the box's, else the image's, else `/`.
    pub cwd: Option<String>,
    /// `name`, `uid`, `uid:gid` or `name:group`; else the box's, else the image's, else root.
    pub user: Option<String>,
    /// Run under a pseudo-terminal of this size; stderr then arrives on stdout.
    pub tty: Option<TtySize>,
    /// Kill the command after this long; `wait` then fails with `ExecTimeout`.
    pub timeout: Option<Seconds>,
}

impl BoxCommand {
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            program: program.into(),
            args: vec![],
            env: vec![],
            cwd: None,
            user: None,
            tty: None,
            timeout: None,
        }
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
    pub fn tty(mut self, rows: u16, cols: u16) -> Self {
        self.tty = Some(TtySize { rows, cols });
        self
    }

    /// A terminal size from untrusted numbers: each 1 to 65535.
    pub fn tty_size(rows: i64, cols: i64) -> BoxliteResult<TtySize> {
        let cell = |n: i64| u16::try_from(n).ok().filter(|n| *n > 0);
        match (cell(rows), cell(cols)) {
            (Some(rows), Some(cols)) => Ok(TtySize { rows, cols }),
            _ => Err(BoxliteError::invalid(
                "tty",
                format!(
                    "({rows}, {cols}) is not a terminal size: rows and cols must be 1 to 65535"
                ),
            )),
        }
    }
    pub fn timeout(mut self, timeout: Seconds) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub(crate) fn validate(&self) -> BoxliteResult<()> {
        if self.program.is_empty() {
            return Err(BoxliteError::invalid("cmd", "the command is empty"));
        }
        if self.program.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err(BoxliteError::invalid(
                "args",
                "arguments cannot contain NUL bytes",
            ));
        }
        validate_env("env", &self.env)?;
        if let Some(cwd) = &self.cwd {
            validate_box_path("cwd", cwd)?;
        }
        if let Some(TtySize { rows: 0, .. } | TtySize { cols: 0, .. }) = self.tty {
            return Err(BoxliteError::invalid(
                "tty",
                "rows and cols must be at least 1",
            ));
        }
        if self.timeout == Some(Seconds::from_millis(0)) {
            return Err(BoxliteError::invalid("timeout", "must be more than zero"));
        }
        self.check_size()
    }

    /// A command line and environment that cannot fit in one request frame is refused before
    /// anything is sent (and before a stopped box is started for it). The exact check, with the
    /// image's and the box's environment merged in, is made when the request is sent.
    fn check_size(&self) -> BoxliteResult<()> {
        let argv: usize = self.program.len() + self.args.iter().map(String::len).sum::<usize>();
        let env: usize = self.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        if argv + env <= MAX_PAYLOAD {
            return Ok(());
        }
        let field = if env > argv { "env" } else { "args" };
        Err(BoxliteError::invalid(
            field,
            format!(
                "the command's arguments and environment are {} bytes, over the {MAX_PAYLOAD}-byte \
                 (1 MiB) limit of one request; pass large data through stdin or a file \
                 (write_file, copy_in)",
                argv + env
            ),
        ))
    }

    /// `program args...` for messages, cut to [`DISPLAY_LIMIT`] characters (`...` at the end
    /// when cut): a huge command line is never quoted whole.
    pub fn display(&self) -> String {
        let mut shown = String::new();
        for (i, word) in std::iter::once(&self.program)
            .chain(self.args.iter())
            .enumerate()
        {
            if i > 0 {
                shown.push(' ');
            }
            shown.push_str(word);
            if shown.len() > 4 * DISPLAY_LIMIT {
                break;
            }
        }
        bounded(&shown, DISPLAY_LIMIT)
    }
}

/// How a command ended, with whatever output `wait` collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// The exit code; `128 + signal` when a signal killed it, as shells report it.
    pub exit_code: i32,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
    /// Output not already taken through [`Execution::stdout`].
    pub stdout: Vec<u8>,
    /// Output not already taken through [`Execution::stderr`].
    pub stderr: Vec<u8>,
    /// Where the guest agent's time went (absent when the agent did not report it, e.g. a
    /// command killed at its host-side deadline).
    pub guest_trace: Option<ExecTrace>,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}

/// Where the per-box and runtime-wide counters of an execution go.
#[derive(Debug, Clone)]
pub(crate) struct ExecCounters {
    pub of_box: Arc<BoxCounters>,
    pub runtime: RuntimeMetrics,
}

impl ExecCounters {
    fn error(&self) {
        self.of_box.run_errors.fetch_add(1, Relaxed);
        self.runtime.run_error();
    }
}

/// A command running in a box. Clones share it.
#[derive(Debug, Clone)]
pub struct Execution {
    inner: Arc<ExecInner>,
}

#[derive(Debug)]
struct ExecInner {
    id: String,
    pid: u32,
    command: String,
    timeout: Option<Seconds>,
    handle: ChannelHandle,
    stdout: Mutex<Option<OutputStream>>,
    stderr: Mutex<Option<OutputStream>>,
    stdin: Mutex<Option<ExecStdin>>,
    exit: watch::Receiver<Option<Result<ExitStatus, String>>>,
    counters: ExecCounters,
    _pump: AbortOnDrop,
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Execution {
    /// Sends the request on `channel` and waits until the guest has started the process (at
    /// most [`REQUEST_TIMEOUT`]).
    pub(crate) async fn start(
        mut channel: Channel,
        command: &BoxCommand,
        counters: ExecCounters,
    ) -> BoxliteResult<Self> {
        counters.of_box.commands_run.fetch_add(1, Relaxed);
        counters.runtime.command_run();
        let shown = command.display();
        let event = match channel.recv_within(REQUEST_TIMEOUT, "exec").await {
            Ok(event) => event,
            Err(e) => {
                counters.error();
                // It may still start late: make sure it does not run unobserved.
                let _ = channel.handle.send_message(Message::Signal {
                    signal: libc::SIGKILL,
                });
                return Err(e);
            }
        };
        let pid = match event {
            ChannelEvent::Message(Message::Started { pid }) => pid,
            ChannelEvent::Message(Message::Error { kind, message }) => {
                counters.error();
                return Err(start_error(&shown, kind, message));
            }
            other => {
                counters.error();
                return Err(BoxliteError::protocol(format!(
                    "expected Started, got {other:?}"
                )));
            }
        };
        let handle = channel.handle.clone();
        let (stdout_tx, stdout_rx) = mpsc::unbounded_channel();
        let (stderr_tx, stderr_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = watch::channel(None);
        let deadline = command
            .timeout
            .map(|t| tokio::time::Instant::now() + t.as_duration() + EXEC_TIMEOUT_GRACE);
        let pump = tokio::spawn(pump(
            channel,
            stdout_tx,
            stderr_tx,
            exit_tx,
            counters.of_box.clone(),
            deadline,
        ));
        let stream = |rx, stream| OutputStream {
            rx,
            handle: handle.clone(),
            stream,
        };
        Ok(Self {
            inner: Arc::new(ExecInner {
                id: ulid::Ulid::new().to_string(),
                pid,
                command: shown,
                timeout: command.timeout,
                stdout: Mutex::new(Some(stream(stdout_rx, StreamId::Stdout))),
                stderr: Mutex::new(Some(stream(stderr_rx, StreamId::Stderr))),
                stdin: Mutex::new(Some(ExecStdin {
                    handle: handle.clone(),
                    counters: counters.of_box.clone(),
                    closed: false,
                })),
                handle,
                exit: exit_rx,
                counters,
                _pump: AbortOnDrop(pump),
            }),
        })
    }

    /// A unique id of this execution.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The process id inside the box.
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The stdout stream; `None` once taken (by an earlier call or by `wait`).
    pub fn stdout(&self) -> Option<OutputStream> {
        self.inner.stdout.lock().ok()?.take()
    }

    /// The stderr stream; `None` once taken. Empty under a tty.
    pub fn stderr(&self) -> Option<OutputStream> {
        self.inner.stderr.lock().ok()?.take()
    }

    /// The stdin writer; `None` once taken. Stdin stays open until the writer is closed or
    /// dropped, or until `wait` is called while it was never taken.
    pub fn stdin(&self) -> Option<ExecStdin> {
        self.inner.stdin.lock().ok()?.take()
    }

    /// Sends `signal` to the command's process group.
    pub fn kill(&self, signal: i32) -> BoxliteResult<()> {
        Self::check_signal(signal)?;
        self.inner.handle.send_message(Message::Signal { signal })
    }

    /// Refuses what [`Execution::kill`] cannot send: a signal number is 1 to 64.
    pub fn check_signal(signal: i32) -> BoxliteResult<()> {
        if (1..=64).contains(&signal) {
            Ok(())
        } else {
            Err(BoxliteError::invalid(
                "signal",
                format!("{signal} is not a signal number"),
            ))
        }
    }

    /// Tells the command's terminal its new size.
    pub fn resize_tty(&self, rows: u16, cols: u16) -> BoxliteResult<()> {
        if rows == 0 || cols == 0 {
            return Err(BoxliteError::invalid(
                "tty",
                "rows and cols must be at least 1",
            ));
        }
        self.inner
            .handle
            .send_message(Message::Resize(TtySize { rows, cols }))
    }

    /// Waits for the command to end. Output streams not taken before are collected into the
    /// result. A command killed by its timeout is an `ExecTimeout` error.
    pub async fn wait(&self) -> BoxliteResult<ExecResult> {
        if let Some(mut stdin) = self.stdin() {
            stdin.close()?;
        }
        let (stdout, stderr, status) = tokio::join!(
            collect(self.stdout()),
            collect(self.stderr()),
            self.exit_status()
        );
        let status = status?;
        if status.timed_out {
            self.inner.counters.error();
            return Err(BoxliteError::from(ExecError::Timeout {
                command: self.inner.command.clone(),
                timeout: self.inner.timeout.unwrap_or_default(),
            }));
        }
        let exit_code = match (status.code, status.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => -1,
        };
        Ok(ExecResult {
            exit_code,
            signal: status.signal,
            stdout,
            stderr,
            guest_trace: status.trace,
        })
    }

    async fn exit_status(&self) -> BoxliteResult<ExitStatus> {
        let mut exit = self.inner.exit.clone();
        let value = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| BoxliteError::protocol("the execution ended without a status"))?
            .clone();
        match value {
            Some(Ok(status)) => Ok(status),
            Some(Err(reason)) => Err(BoxliteError::protocol(format!(
                "`{}` did not finish: {reason}",
                self.inner.command
            ))),
            None => Err(BoxliteError::Internal("exit status vanished".into())),
        }
    }
}

fn start_error(command: &str, kind: boxlite_proto::ErrorKind, message: String) -> BoxliteError {
    use boxlite_proto::ErrorKind as K;
    // The guest's message may quote the program; keep it readable.
    let message = bounded(&message, MESSAGE_LIMIT);
    match kind {
        K::InvalidArgument => BoxliteError::invalid("exec", message),
        K::NotFound | K::SpawnFailed | K::Io | K::Unsupported => {
            BoxliteError::from(ExecError::StartFailed {
                command: command.to_owned(),
                reason: message,
            })
        }
        K::Internal => BoxliteError::protocol(format!("guest agent error: {message}")),
    }
}

async fn collect(stream: Option<OutputStream>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(mut stream) = stream {
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk);
        }
    }
    out
}

/// Routes an execution's frames: output to its streams, the final status to `exit`. Past
/// `deadline` (the command's timeout plus [`EXEC_TIMEOUT_GRACE`]) the host stops waiting for
/// the guest: it kills the command and reports the timeout itself.
async fn pump(
    mut channel: Channel,
    stdout: mpsc::UnboundedSender<Vec<u8>>,
    stderr: mpsc::UnboundedSender<Vec<u8>>,
    exit: watch::Sender<Option<Result<ExitStatus, String>>>,
    counters: Arc<BoxCounters>,
    deadline: Option<tokio::time::Instant>,
) {
    let mut stdout = Some(stdout);
    let mut stderr = Some(stderr);
    let outcome = loop {
        let event = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, channel.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    let _ = channel.handle.send_message(Message::Signal {
                        signal: libc::SIGKILL,
                    });
                    break Ok(ExitStatus {
                        code: None,
                        signal: Some(libc::SIGKILL),
                        timed_out: true,
                        trace: None,
                    });
                }
            },
            None => channel.recv().await,
        };
        match event {
            Ok(ChannelEvent::Data(stream, data)) => {
                counters
                    .bytes_received
                    .fetch_add(data.len() as u64, Relaxed);
                let target = if stream == StreamId::Stdout {
                    &stdout
                } else {
                    &stderr
                };
                let len = data.len();
                // Nobody listening: credit at once so the guest never stalls on dropped output.
                let delivered = target.as_ref().is_some_and(|tx| tx.send(data).is_ok());
                if !delivered {
                    channel.handle.credit(stream, len);
                }
            }
            Ok(ChannelEvent::Eof(StreamId::Stdout)) => stdout = None,
            Ok(ChannelEvent::Eof(_)) => stderr = None,
            Ok(ChannelEvent::Message(Message::Exited(status))) => break Ok(status),
            Ok(ChannelEvent::Message(Message::Error { message, .. })) => {
                break Err(bounded(&message, MESSAGE_LIMIT))
            }
            Ok(ChannelEvent::Message(_)) => {}
            Err(e) => break Err(e.to_string()),
        }
    };
    drop((stdout, stderr));
    let _ = exit.send(Some(outcome));
}

/// One output stream of an execution, chunk by chunk as the guest sends it.
#[derive(Debug)]
pub struct OutputStream {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    handle: ChannelHandle,
    stream: StreamId,
}

impl OutputStream {
    /// The next chunk; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        let chunk = self.rx.recv().await?;
        self.handle.credit(self.stream, chunk.len());
        Some(chunk)
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        // Credit what nobody will read so the process is not blocked on a full window.
        self.rx.close();
        while let Ok(chunk) = self.rx.try_recv() {
            self.handle.credit(self.stream, chunk.len());
        }
    }
}

/// Writes to an execution's stdin.
#[derive(Debug)]
pub struct ExecStdin {
    handle: ChannelHandle,
    counters: Arc<BoxCounters>,
    closed: bool,
}

impl ExecStdin {
    /// Sends `data`, waiting while the guest has not consumed earlier input.
    pub async fn write(&mut self, data: &[u8]) -> BoxliteResult<()> {
        if self.closed {
            return Err(BoxliteError::invalid("stdin", "stdin is already closed"));
        }
        self.handle.send_stdin(data).await?;
        self.counters
            .bytes_sent
            .fetch_add(data.len() as u64, Relaxed);
        Ok(())
    }

    /// Closes stdin: the command reads end-of-file.
    pub fn close(&mut self) -> BoxliteResult<()> {
        if !self.closed {
            self.closed = true;
            self.handle.send_eof(StreamId::Stdin)?;
        }
        Ok(())
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The protocol request for `command` once image and box defaults are applied.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_commands_are_refused_before_reaching_the_guest() {
        let cases = [
            (BoxCommand::new(""), "cmd"),
            (BoxCommand::new("sh").env("A=B", "1"), "env"),
            (BoxCommand::new("sh").env("A", "x\0"), "env"),
            (BoxCommand::new("sh").cwd("relative"), "cwd"),
            (BoxCommand::new("sh").args(["a\0b"]), "args"),
            (BoxCommand::new("sh").tty(0, 80), "tty"),
            (
                BoxCommand::new("sh").timeout(Seconds::from_millis(0)),
                "timeout",
            ),
        ];
        for (command, field) in cases {
            match command.validate() {
                Err(BoxliteError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        BoxCommand::new("sh")
            .args(["-c", "true"])
            .env("A", "1")
            .cwd("/tmp")
            .validate()
            .unwrap();
    }

    #[test]
    fn display_joins_program_and_args() {
        assert_eq!(
            BoxCommand::new("echo").args(["a", "b"]).display(),
            "echo a b"
        );
    }

    #[test]
    fn a_huge_command_line_is_quoted_as_a_bounded_prefix() {
        let huge = BoxCommand::new("echo").args(["a".repeat(1 << 20)]);
        let shown = huge.display();
        assert_eq!(shown.chars().count(), DISPLAY_LIMIT + 3);
        assert!(shown.starts_with("echo aaa") && shown.ends_with("..."));
        let many = BoxCommand::new("echo").args(vec!["ab"; 100_000]);
        assert_eq!(many.display().chars().count(), DISPLAY_LIMIT + 3);
    }

    #[test]
    fn a_command_over_the_frame_cap_is_refused_naming_the_limit() {
        for (command, field) in [
            (BoxCommand::new("echo").args(["a".repeat(1 << 20)]), "args"),
            (
                BoxCommand::new("env").env("BIG", "v".repeat(1 << 20)),
                "env",
            ),
        ] {
            match command.validate() {
                Err(BoxliteError::InvalidArgument { field: f, reason }) => {
                    assert_eq!(f, field);
                    assert!(reason.contains("1048576-byte (1 MiB) limit"), "{reason}");
                    assert!(
                        reason.len() < 400,
                        "the message quotes the argument: {reason}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        BoxCommand::new("echo")
            .args(["a".repeat(1 << 19)])
            .validate()
            .unwrap();
    }
}
