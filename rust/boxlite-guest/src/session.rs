//! One channel's process (an exec, or the agent's own tar helper) and the thread that pumps
//! its stdio: stdin from the host with credits back, stdout/stderr to the host within the
//! credit window, signals, resizes, the timeout, and the final reply.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boxlite_proto::{
    ErrorKind, ExecTrace, ExitStatus, Frame, Message, StreamId, TtySize, MAX_DATA_CHUNK,
    STREAM_WINDOW,
};

use crate::exec::{self, Plan};
use crate::log::log;
use crate::port::{DataFrame, Outbox, Window};
use crate::reaper::{ExitSink, Reaper};
use crate::sys::{self, Notifier};

/// How long output pipes may stay open after the process exited (a background child holding
/// them) before the agent closes them and reports the exit.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Stdin the host may have queued beyond its window before the agent drops it (a host
/// ignoring flow control).
const STDIN_QUEUE_LIMIT: usize = 4 * STREAM_WINDOW as usize;

/// How long output of a process that writes in small pieces is left to gather before the
/// next read. Bounds the added latency; the first bytes after a pause go out at once.
const COALESCE: Duration = Duration::from_millis(2);

/// Bytes of a helper's stderr kept for its error message.
const COLLECT_LIMIT: usize = 16 * 1024;

#[derive(Default)]
struct Shared {
    stdin: VecDeque<Vec<u8>>,
    stdin_bytes: usize,
    stdin_eof: bool,
    /// Credit granted by the host and not yet taken by the pump: stdout, stderr.
    credit: [u32; 2],
    signals: Vec<i32>,
    resize: Option<TtySize>,
    exit: Option<libc::c_int>,
    detached: bool,
}

/// The state of one channel shared between the port reader, the reaper and the pump.
pub struct Session {
    pub channel: u32,
    generation: u64,
    shared: Mutex<Shared>,
    wake: Notifier,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("channel", &self.channel)
            .finish()
    }
}

impl Session {
    pub fn new(channel: u32, generation: u64) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            channel,
            generation,
            shared: Mutex::new(Shared::default()),
            wake: Notifier::new()?,
        }))
    }

    fn update(&self, f: impl FnOnce(&mut Shared)) {
        f(&mut sys::lock(&self.shared));
        self.wake.notify();
    }

    pub fn push_stdin(&self, data: Vec<u8>) {
        if data.is_empty() {
            return;
        }
        self.update(|s| {
            if s.stdin_bytes + data.len() > STDIN_QUEUE_LIMIT {
                log!(
                    "channel {}: host ignores the stdin window; dropping {} bytes",
                    self.channel,
                    data.len()
                );
                return;
            }
            s.stdin_bytes += data.len();
            s.stdin.push_back(data);
        });
    }

    pub fn close_stdin(&self) {
        self.update(|s| s.stdin_eof = true);
    }

    pub fn credit(&self, stream: StreamId, bytes: u32) {
        let i = match stream {
            StreamId::Stdout => 0,
            StreamId::Stderr => 1,
            StreamId::Stdin => return,
        };
        self.update(|s| s.credit[i] = s.credit[i].saturating_add(bytes));
    }

    pub fn signal(&self, signal: i32) {
        self.update(|s| s.signals.push(signal));
    }

    pub fn resize(&self, size: TtySize) {
        self.update(|s| s.resize = Some(size));
    }

    /// The host that opened this channel is gone: stop waiting for its credit, drop output.
    pub fn detach(&self) {
        self.update(|s| s.detached = true);
    }

    fn send(&self, out: &Outbox, frame: Frame) {
        out.send(self.generation, &frame);
    }

    fn reply(&self, out: &Outbox, msg: Message) {
        self.send(out, Frame::control(self.channel, msg));
    }

    fn error(&self, out: &Outbox, kind: ErrorKind, message: String) {
        self.reply(out, Message::Error { kind, message });
    }
}

impl ExitSink for Session {
    fn exited(&self, status: libc::c_int) {
        self.update(|s| s.exit = Some(status));
    }
}

/// What a session runs.
#[derive(Debug)]
pub enum Job {
    /// A user process: `Started`, stdout/stderr streams, `Exited`.
    Exec {
        plan: Plan,
        program: String,
        cwd: Option<String>,
        timeout: Option<Duration>,
        /// When the agent decoded the request ([`sys::monotonic_us`]): the trace's zero.
        received_us: u64,
    },
    /// The tar helper: for copy-out its stdout is the `Stdout` stream; its stderr carries an
    /// error line. Final reply `Done` or `Error`.
    Tar { plan: Plan, what: &'static str },
}

/// Runs `job` on `session` to its final reply. Blocks; call it on the session's own thread.
pub fn run(session: Arc<Session>, mut job: Job, out: &Outbox, reaper: &Reaper) {
    let (plan, is_exec) = match &job {
        Job::Exec { plan, .. } => (plan, true),
        Job::Tar { plan, .. } => (plan, false),
    };
    let sink: Arc<dyn ExitSink> = session.clone();
    let child = match exec::spawn(plan, reaper, sink) {
        Ok(c) => c,
        Err(e) => {
            let r = match &job {
                Job::Exec { program, cwd, .. } => e.refusal(program, cwd.as_deref()),
                Job::Tar { what, .. } => exec::Refusal::new(
                    ErrorKind::Internal,
                    format!("starting the {what} helper: {e:?}"),
                ),
            };
            log!("channel {}: {}", session.channel, r.message);
            session.error(out, r.kind, r.message);
            return;
        }
    };
    // The box's namespaces are held by the box init's handle only (shutdown closes them).
    if let Job::Exec { plan, .. } = &mut job {
        plan.confine = None;
    }
    if is_exec {
        session.reply(
            out,
            Message::Started {
                // The pid the box's own processes know it by.
                pid: child.box_pid.unwrap_or(child.pid) as u32,
            },
        );
    }
    let started_us = sys::monotonic_us();
    let (child_started_us, execve_us) = (child.started_us, child.execve_us);
    let timeout = match &job {
        Job::Exec { timeout, .. } => *timeout,
        Job::Tar { .. } => None,
    };
    let mut outs = Vec::new();
    if let Some(fd) = child.stdout {
        outs.push(OutStream::new(fd, Target::Stream(StreamId::Stdout)));
    }
    if let Some(fd) = child.stderr {
        let target = if is_exec {
            Target::Stream(StreamId::Stderr)
        } else {
            Target::Collect(Vec::new())
        };
        outs.push(OutStream::new(fd, target));
    }
    if let Some(fd) = &child.stdin {
        let _ = sys::set_nonblocking(fd.as_raw_fd(), true);
    }
    let mut pump = Pump {
        s: &session,
        out,
        pid: child.pid,
        outs,
        stdin: child.stdin,
        tty: child.tty,
        queue: VecDeque::new(),
        front_offset: 0,
        stdin_eof: false,
        detached: false,
        exited: false,
        first_output_us: None,
        exit_seen_us: 0,
    };
    let (status, timed_out, collected) = pump.run(timeout);
    let (code, signal) = sys::decode_wait_status(status);
    match job {
        Job::Exec { received_us, .. } => {
            let since = |t: u64| t.saturating_sub(received_us);
            let trace = ExecTrace {
                child_started_us: since(child_started_us),
                execve_called_us: since(execve_us),
                started_us: since(started_us),
                first_output_us: pump.first_output_us.map(since),
                exit_seen_us: since(pump.exit_seen_us),
                reported_us: since(sys::monotonic_us()),
            };
            session.reply(
                out,
                Message::Exited(ExitStatus {
                    code,
                    signal,
                    timed_out,
                    trace: Some(trace),
                }),
            )
        }
        Job::Tar { what, .. } => {
            if code == Some(0) {
                session.reply(out, Message::Done);
            } else {
                let (kind, message) = parse_helper_error(&collected, what, code, signal);
                log!("channel {}: {message}", session.channel);
                session.error(out, kind, message);
            }
        }
    }
}

/// The helper reports failures as one `kind<TAB>message` line on stderr.
pub fn parse_helper_error(
    stderr: &[u8],
    what: &str,
    code: Option<i32>,
    signal: Option<i32>,
) -> (ErrorKind, String) {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if let Some((kind, message)) = line.split_once('\t') {
        if let Ok(kind) =
            serde_json::from_value::<ErrorKind>(serde_json::Value::String(kind.into()))
        {
            return (kind, message.to_string());
        }
    }
    let why = match (code, signal) {
        (_, Some(s)) => format!("killed by signal {s}"),
        (Some(c), _) => format!("exit status {c}"),
        _ => "unknown status".into(),
    };
    let detail = if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    };
    (ErrorKind::Io, format!("{what} failed ({why}){detail}"))
}

enum Target {
    Stream(StreamId),
    Collect(Vec<u8>),
}

struct OutStream {
    fd: Option<OwnedFd>,
    target: Target,
    window: Window,
    /// Not polled before this instant (output coalescing).
    hold_until: Option<Instant>,
}

impl OutStream {
    fn new(fd: OwnedFd, target: Target) -> Self {
        let _ = sys::set_nonblocking(fd.as_raw_fd(), true);
        let window = match target {
            Target::Stream(_) => Window::new(STREAM_WINDOW),
            Target::Collect(_) => Window::unlimited(),
        };
        Self {
            fd: Some(fd),
            target,
            window,
            hold_until: None,
        }
    }
}

struct Pump<'a> {
    s: &'a Session,
    out: &'a Outbox,
    pid: libc::pid_t,
    outs: Vec<OutStream>,
    stdin: Option<OwnedFd>,
    tty: Option<OwnedFd>,
    /// Stdin taken from the shared queue, not yet written; `front_offset` bytes of the
    /// first chunk are written.
    queue: VecDeque<Vec<u8>>,
    front_offset: usize,
    stdin_eof: bool,
    detached: bool,
    /// The process is gone: output is drained without coalescing.
    exited: bool,
    /// When the first output byte was read and when the exit was seen
    /// ([`sys::monotonic_us`]).
    first_output_us: Option<u64>,
    exit_seen_us: u64,
}

impl Pump<'_> {
    /// Pumps until the process exited and its outputs closed. Returns the wait status,
    /// whether the timeout killed it, and the collected helper stderr.
    fn run(&mut self, timeout: Option<Duration>) -> (libc::c_int, bool, Vec<u8>) {
        let kill_at = timeout.map(|t| Instant::now() + t);
        let mut timed_out = false;
        let mut exit: Option<libc::c_int> = None;
        let mut drain_until: Option<Instant> = None;
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            self.s.wake.drain();
            let (signals, resize, credited) = self.absorb(&mut exit);
            let now = Instant::now();
            for sig in signals {
                self.kill(sig);
            }
            if let (Some(size), Some(tty)) = (resize, &self.tty) {
                let _ = exec::set_window_size(tty.as_raw_fd(), size);
            }
            if exit.is_some() && !self.exited {
                self.exited = true;
                self.exit_seen_us = sys::monotonic_us();
                for o in &mut self.outs {
                    o.hold_until = None;
                }
            }
            if exit.is_some() {
                match drain_until {
                    None => drain_until = Some(now + DRAIN_AFTER_EXIT),
                    // Credit after the exit means the host is still reading: give the
                    // remaining output time to come out.
                    Some(d) if credited => drain_until = Some(d.max(now + DRAIN_AFTER_EXIT)),
                    _ => {}
                }
            }
            self.settle_stdin(exit.is_some());
            if exit.is_none() && !timed_out && kill_at.is_some_and(|k| now >= k) {
                self.kill(libc::SIGKILL);
                timed_out = true;
            }
            if drain_until.is_some_and(|d| now >= d) {
                for i in 0..self.outs.len() {
                    let o = &self.outs[i];
                    if o.fd.is_some() && (o.window.is_open() || self.detached) {
                        // What is already in the pipe still goes out, then the stream ends.
                        self.read_out(i, &mut buf);
                        self.close_out(i);
                    }
                }
            }
            if let Some(status) = exit {
                if self.outs.iter().all(|o| o.fd.is_none()) {
                    let collected = self
                        .outs
                        .iter_mut()
                        .find_map(|o| match &mut o.target {
                            Target::Collect(v) => Some(std::mem::take(v)),
                            Target::Stream(_) => None,
                        })
                        .unwrap_or_default();
                    return (status, timed_out, collected);
                }
            }

            let mut fds = vec![sys::pollfd(self.s.wake.raw(), libc::POLLIN)];
            let mut who = vec![None];
            let mut hold: Option<Instant> = None;
            for (i, o) in self.outs.iter_mut().enumerate() {
                if let Some(fd) = &o.fd {
                    if let Some(h) = o.hold_until {
                        if h > now {
                            hold = Some(hold.map_or(h, |x| x.min(h)));
                            continue;
                        }
                        o.hold_until = None;
                    }
                    if o.window.is_open() || self.detached {
                        fds.push(sys::pollfd(fd.as_raw_fd(), libc::POLLIN));
                        who.push(Some(i));
                    }
                }
            }
            let stdin_slot = match &self.stdin {
                Some(fd) if !self.queue.is_empty() => {
                    fds.push(sys::pollfd(fd.as_raw_fd(), libc::POLLOUT));
                    Some(fds.len() - 1)
                }
                _ => None,
            };
            let mut deadline = match (drain_until, hold) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if exit.is_none() && !timed_out {
                deadline = match (deadline, kill_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = sys::poll(&mut fds, wait) {
                log!("channel {}: poll: {e}", self.s.channel);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            for (slot, p) in fds.iter().enumerate() {
                if p.revents == 0 {
                    continue;
                }
                if Some(slot) == stdin_slot {
                    self.write_stdin();
                } else if let Some(Some(i)) = who.get(slot) {
                    self.read_out(*i, &mut buf);
                }
            }
        }
    }

    /// Takes what the other threads left in the shared state.
    fn absorb(&mut self, exit: &mut Option<libc::c_int>) -> (Vec<i32>, Option<TtySize>, bool) {
        let mut sh = sys::lock(&self.s.shared);
        self.queue.extend(sh.stdin.drain(..));
        sh.stdin_bytes = 0;
        if sh.stdin_eof {
            self.stdin_eof = true;
        }
        let mut credited = false;
        for (i, stream) in [StreamId::Stdout, StreamId::Stderr].into_iter().enumerate() {
            let c = std::mem::take(&mut sh.credit[i]);
            if c == 0 {
                continue;
            }
            credited = true;
            for o in &mut self.outs {
                if matches!(o.target, Target::Stream(id) if id == stream) {
                    o.window.grant(c);
                }
            }
        }
        if exit.is_none() {
            *exit = sh.exit;
        }
        if sh.detached && !self.detached {
            self.detached = true;
            for o in &mut self.outs {
                o.window = Window::unlimited();
            }
            // Nobody will send more stdin or read credits for it.
            self.queue.clear();
            self.front_offset = 0;
            self.stdin = None;
        }
        (std::mem::take(&mut sh.signals), sh.resize.take(), credited)
    }

    fn kill(&self, sig: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(-self.pid, sig) } != 0 {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, sig) };
        }
    }

    fn credit_stdin(&self, n: usize) {
        if n > 0 && !self.detached {
            self.s.send(
                self.out,
                Frame::credit(self.s.channel, StreamId::Stdin, n as u32),
            );
        }
    }

    /// Drops stdin that can no longer be delivered (crediting it) and closes stdin on EOF.
    fn settle_stdin(&mut self, exited: bool) {
        if exited || self.stdin.is_none() {
            let queued: usize = self.queue.iter().map(Vec::len).sum();
            let dropped = queued.saturating_sub(self.front_offset);
            self.queue.clear();
            self.front_offset = 0;
            self.credit_stdin(dropped);
            if exited {
                self.stdin = None;
            }
            return;
        }
        if self.stdin_eof && self.queue.is_empty() {
            if let (Some(_), Some(fd)) = (&self.tty, &self.stdin) {
                // A terminal has no half-close: send the EOF character (^D) instead.
                let _ = sys::write(fd.as_raw_fd(), b"\x04");
            }
            self.stdin = None;
        }
    }

    fn write_stdin(&mut self) {
        let Some(fd) = &self.stdin else { return };
        let Some(front) = self.queue.front() else {
            return;
        };
        match sys::write(fd.as_raw_fd(), &front[self.front_offset..]) {
            Ok(n) => {
                self.front_offset += n;
                if self.front_offset >= front.len() {
                    self.queue.pop_front();
                    self.front_offset = 0;
                }
                self.credit_stdin(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                // The reader is gone (EPIPE): what remains can never be delivered.
                self.stdin = None;
                self.settle_stdin(false);
            }
        }
    }

    fn read_out(&mut self, i: usize, buf: &mut [u8]) {
        let Some(o) = self.outs.get_mut(i) else {
            return;
        };
        let Some(fd) = &o.fd else { return };
        let fd = fd.as_raw_fd();
        let want = o.window.next_chunk().min(buf.len());
        if want == 0 {
            return;
        }
        let result = match &mut o.target {
            Target::Stream(stream) => {
                let mut frame = DataFrame::new(self.s.channel, *stream, want);
                let r = frame.read_from(fd, want);
                if matches!(r, Ok(n) if n > 0) && !self.detached {
                    self.out.send_encoded(self.s.generation, frame.finish());
                }
                r
            }
            Target::Collect(v) => {
                let r = sys::read(fd, &mut buf[..want]);
                if let Ok(n) = r {
                    let room = COLLECT_LIMIT.saturating_sub(v.len());
                    v.extend_from_slice(&buf[..n.min(room)]);
                }
                r
            }
        };
        match result {
            Ok(0) => self.close_out(i),
            Ok(n) => {
                if self.first_output_us.is_none() {
                    self.first_output_us = Some(sys::monotonic_us());
                }
                let o = &mut self.outs[i];
                o.window.consume(n);
                // A short read means a slow writer: let its output gather for a moment
                // rather than sending many tiny frames (each costs a lot under TCG).
                if n < want && !self.exited {
                    o.hold_until = Some(Instant::now() + COALESCE);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // EIO is how a pty master says all slaves closed.
            Err(e) => {
                if e.raw_os_error() != Some(libc::EIO) {
                    log!("channel {}: reading output: {e}", self.s.channel);
                }
                self.close_out(i);
            }
        }
    }

    fn close_out(&mut self, i: usize) {
        let Some(o) = self.outs.get_mut(i) else {
            return;
        };
        if o.fd.take().is_none() {
            return;
        }
        if let Target::Stream(stream) = o.target {
            if !self.detached {
                self.s.send(self.out, Frame::eof(self.s.channel, stream));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_error_lines() {
        let (k, m) = parse_helper_error(
            b"warning\nnot_found\tno such path /x\n",
            "copy-out",
            Some(1),
            None,
        );
        assert_eq!(k, ErrorKind::NotFound);
        assert_eq!(m, "no such path /x");
        let (k, m) = parse_helper_error(b"", "unpack", None, Some(9));
        assert_eq!(k, ErrorKind::Io);
        assert!(m.contains("signal 9"), "{m}");
        let (k, m) = parse_helper_error(b"bogus\tx", "unpack", Some(2), None);
        assert_eq!(k, ErrorKind::Io);
        assert!(m.contains("bogus"), "{m}");
    }
}
