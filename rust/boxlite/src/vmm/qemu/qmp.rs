//! A small client for QEMU's machine protocol (QMP): one command in flight at a time, events
//! kept for whoever asks, a descriptor passed with `getfd` over `SCM_RIGHTS`.
//!
//! Used for what the command line cannot do: saving and loading a VM's state (templates, pause,
//! fork), stopping and continuing it, growing a disk.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// A QMP reply or event longer than this is a broken (or hostile) engine.
const MAX_LINE: usize = 1024 * 1024;

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("QMP I/O: {0}")]
    Io(#[from] io::Error),
    #[error("QMP: the engine closed the connection")]
    Closed,
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("migration {status}: {reason}")]
    Migration { status: String, reason: String },
}

pub type QmpResult<T> = Result<T, QmpError>;

/// One QMP session, after capabilities negotiation.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    buffer: Vec<u8>,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to a QMP socket that QEMU creates at start (`server=on,wait=off`), retrying
    /// until `deadline` while it does not exist yet, then negotiates capabilities.
    pub async fn connect(path: &Path, deadline: Instant) -> QmpResult<Self> {
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        Self::handshake(stream, deadline).await
    }

    /// Negotiates on an already connected stream.
    pub async fn handshake(stream: UnixStream, deadline: Instant) -> QmpResult<Self> {
        let mut qmp = Self {
            stream,
            buffer: Vec::new(),
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message_until(deadline).await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {}",
                brief(&greeting)
            )));
        }
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> QmpResult<Value> {
        self.execute_inner(command, arguments, None).await
    }

    /// Runs one command with `fd` attached (`getfd`, `add-fd`).
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: BorrowedFd<'_>,
    ) -> QmpResult<Value> {
        self.execute_inner(command, arguments, Some(fd)).await
    }

    /// Events received so far (oldest first), emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> QmpResult<Value> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request).expect("a JSON value serializes");
        line.push(b'\n');
        self.send(&line, fd).await?;
        loop {
            let message = self.read_message().await?;
            if message.get("event").is_some() {
                self.events.push_back(message);
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let text = |key: &str| {
                    error
                        .get(key)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "unexpected reply to {command}: {}",
                brief(&message)
            )));
        }
    }

    async fn send(&mut self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> QmpResult<()> {
        let mut sent = 0;
        let mut fd = fd;
        while sent < bytes.len() {
            self.stream.writable().await?;
            let chunk = &bytes[sent..];
            let result = self
                .stream
                .try_io(Interest::WRITABLE, || send_with_fd(&self.stream, chunk, fd));
            match result {
                Ok(n) => {
                    sent += n;
                    // The descriptor travels with the first byte only.
                    fd = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn read_message_until(&mut self, deadline: Instant) -> QmpResult<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.read_message()).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout {
                what: "the QMP greeting".into(),
                after: left,
            }),
        }
    }

    async fn read_message(&mut self) -> QmpResult<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(line)
                    .map_err(|e| QmpError::Protocol(format!("bad JSON from the engine: {e}")));
            }
            if self.buffer.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "a QMP message over {MAX_LINE} bytes"
                )));
            }
            self.stream.readable().await?;
            let mut chunk = [0u8; 8192];
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    // ---- the commands boxlite uses ----

    pub async fn stop(&mut self) -> QmpResult<()> {
        self.execute("stop", Value::Null).await.map(drop)
    }

    pub async fn cont(&mut self) -> QmpResult<()> {
        self.execute("cont", Value::Null).await.map(drop)
    }

    /// Asks QEMU to exit at once (the guest gets no shutdown).
    pub async fn quit(&mut self) -> QmpResult<()> {
        match self.execute("quit", Value::Null).await {
            // QEMU may close the socket before or after its reply.
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn set_migration_capabilities(&mut self, caps: &[(&str, bool)]) -> QmpResult<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(name, state)| json!({ "capability": name, "state": state }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))
            .await
            .map(drop)
    }

    /// Lifts QEMU's default 128 MiB/s cap: a save to a local file should run at disk speed.
    pub async fn unthrottle_migration(&mut self) -> QmpResult<()> {
        self.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 32u64 << 30 }),
        )
        .await
        .map(drop)
    }

    /// Hands `fd` to QEMU under `name` (for `fd:<name>` migration URIs).
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> QmpResult<()> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd)
            .await
            .map(drop)
    }

    pub async fn migrate(&mut self, uri: &str) -> QmpResult<()> {
        self.execute("migrate", json!({ "uri": uri }))
            .await
            .map(drop)
    }

    pub async fn migrate_incoming(&mut self, uri: &str) -> QmpResult<()> {
        self.execute("migrate-incoming", json!({ "uri": uri }))
            .await
            .map(drop)
    }

    pub async fn migrate_continue(&mut self, state: &str) -> QmpResult<()> {
        self.execute("migrate-continue", json!({ "state": state }))
            .await
            .map(drop)
    }

    /// Polls `query-migrate` until its status is one of `targets`; `failed` or `cancelled` is
    /// an error with QEMU's reason.
    pub async fn wait_migration(
        &mut self,
        targets: &[&str],
        poll: Duration,
        deadline: Instant,
    ) -> QmpResult<String> {
        let started = Instant::now();
        loop {
            let info = self.execute("query-migrate", Value::Null).await?;
            let status = info
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string();
            if targets.contains(&status.as_str()) {
                return Ok(status);
            }
            if status == "failed" || status == "cancelled" {
                let reason = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
                    .to_string();
                return Err(QmpError::Migration { status, reason });
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout {
                    what: format!("migration (last status {status})"),
                    after: started.elapsed(),
                });
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Takes an external snapshot of a drive: `file` becomes its new top layer, the old top
    /// is frozen from now on.
    pub async fn snapshot_drive(&mut self, device: &str, file: &Path) -> QmpResult<()> {
        self.execute(
            "blockdev-snapshot-sync",
            json!({
                "device": device,
                "snapshot-file": file.to_string_lossy(),
                "format": "qcow2",
            }),
        )
        .await
        .map(drop)
    }

    pub async fn resize_drive(&mut self, device: &str, bytes: u64) -> QmpResult<()> {
        self.execute("block_resize", json!({ "device": device, "size": bytes }))
            .await
            .map(drop)
    }

    /// `running`, `paused`, `inmigrate`, `postmigrate`, ...
    pub async fn run_state(&mut self) -> QmpResult<String> {
        let status = self.execute("query-status", Value::Null).await?;
        Ok(status
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}

/// The start of a message for an error text (QEMU's replies are trusted no more than needed).
fn brief(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, large enough for one header and one int.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(
                libc::CMSG_DATA(header).cast::<libc::c_int>(),
                fd.as_raw_fd(),
            );
        }
    }
    // SAFETY: msg is fully initialized and refers to live buffers.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A scripted stand-in for QEMU's side: answers each command with the next canned line.
    async fn fake_engine(
        listener: tokio::net::UnixListener,
        replies: Vec<&'static str>,
    ) -> Vec<Value> {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(read).lines();
        let mut seen = Vec::new();
        let mut replies = replies.into_iter();
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(serde_json::from_str(&line).unwrap());
            let Some(reply) = replies.next() else { break };
            write.write_all(reply.as_bytes()).await.unwrap();
            write.write_all(b"\r\n").await.unwrap();
        }
        seen
    }

    #[tokio::test]
    async fn commands_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let engine = tokio::spawn(fake_engine(
            listener,
            vec![
                r#"{"return": {}}"#,
                "{\"event\": \"STOP\", \"timestamp\": {}}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such device\"}}",
                r#"{"return": {"status": "active"}}"#,
                r#"{"return": {"status": "completed"}}"#,
            ],
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, deadline).await.unwrap();
        // The event line is read while waiting for the reply; the error after it is the reply.
        let err = qmp.resize_drive("disk9", 1 << 30).await.unwrap_err();
        assert!(
            matches!(&err, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "no such device"),
            "{err}"
        );
        assert_eq!(qmp.take_events()[0]["event"], "STOP");
        let status = qmp
            .wait_migration(&["completed"], Duration::from_millis(1), deadline)
            .await
            .unwrap();
        assert_eq!(status, "completed");
        drop(qmp);
        let seen = engine.await.unwrap();
        let commands: Vec<&str> = seen
            .iter()
            .map(|v| v["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            commands,
            [
                "qmp_capabilities",
                "block_resize",
                "query-migrate",
                "query-migrate"
            ]
        );
        assert_eq!(seen[1]["arguments"]["size"], 1u64 << 30);
    }

    #[tokio::test]
    async fn a_failed_migration_reports_qemus_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let engine = tokio::spawn(fake_engine(
            listener,
            vec![
                r#"{"return": {}}"#,
                r#"{"return": {"status": "failed", "error-desc": "Size mismatch"}}"#,
            ],
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, deadline).await.unwrap();
        let err = qmp
            .wait_migration(&["completed"], Duration::from_millis(1), deadline)
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::Migration { ref reason, .. } if reason == "Size mismatch"));
        drop(qmp);
        engine.await.unwrap();
    }

    #[tokio::test]
    async fn getfd_passes_a_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let receiver = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"{\"QMP\": {}}\n").unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            stream.write_all(b"{\"return\": {}}\n").unwrap();
            // The getfd request: read it with recvmsg to collect the descriptor.
            let mut data = [0u8; 512];
            let mut iov = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            let mut control = [0u64; 8];
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, 0) };
            assert!(n > 0);
            let header = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            assert!(!header.is_null(), "no descriptor arrived");
            let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<i32>()) };
            stream.write_all(b"{\"return\": {}}\n").unwrap();
            let text = String::from_utf8_lossy(&data[..n as usize]).into_owned();
            // The descriptor is a working copy of the file the client passed.
            let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            file.write_all(b"through the socket").unwrap();
            text
        });
        let file_path = dir.path().join("state");
        let file = std::fs::File::create(&file_path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, deadline).await.unwrap();
        use std::os::fd::AsFd;
        qmp.getfd("mig", file.as_fd()).await.unwrap();
        let text = receiver.join().unwrap();
        assert!(
            text.contains("\"getfd\"") && text.contains("\"mig\""),
            "{text}"
        );
        assert_eq!(std::fs::read(&file_path).unwrap(), b"through the socket");
    }
}
