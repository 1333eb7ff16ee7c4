//! The request dispatcher: one reader loop over the port, one handler per request type.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::BufReader;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boxlite_proto::{
    Body, ErrorKind, ExecRequest, Frame, FrameError, Message, StreamId, PROTOCOL_VERSION,
};

use crate::boxinit::BoxInit;
use crate::exec::{self, Confinement, Refusal};
use crate::log::log;
use crate::metrics::{self, CpuSample};
use crate::mounts::{self, ROOT};
use crate::port::{self, Incoming, Outbox};
use crate::reaper::Reaper;
use crate::sandbox::{self, Policy};
use crate::session::{self, Job, Session};
use crate::sys;
use crate::workers::Workers;

/// How many finished channels are remembered (their late stdin is still credited).
const CLOSED_REMEMBERED: usize = 256;

pub struct Agent {
    out: Arc<Outbox>,
    reaper: Arc<Reaper>,
    workers: Arc<Workers>,
    channels: Mutex<HashMap<u32, Arc<Session>>>,
    /// The last channels that finished, to recognise their late frames.
    closed: Mutex<VecDeque<u32>>,
    /// Why the box root is not usable, if it is not.
    root_error: Option<String>,
    /// What `mounts::mount_root` mounted, for shutdown.
    mounts: Vec<PathBuf>,
    cpu: Mutex<CpuSample>,
    /// The box's namespaces (absent when there is no box root to run commands in).
    box_init: Option<BoxInit>,
    /// How user commands are confined: Docker's defaults until `Configure` says otherwise.
    policy: Mutex<Arc<Policy>>,
    /// The link as last brought up (by `PrepareTemplate` or `Configure`): a `Configure` for
    /// the same link only sets the MAC.
    link: Mutex<Option<boxlite_proto::net::GuestNetwork>>,
    /// The box has volumes: the box init starts once `Configure` has mounted them.
    defer_box_init: bool,
    /// Where volumes are mounted, unmounted first at shutdown.
    volume_mounts: Mutex<Vec<PathBuf>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("root_error", &self.root_error)
            .finish()
    }
}

fn message_name(m: &Message) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

impl Agent {
    pub fn new(
        out: Arc<Outbox>,
        reaper: Arc<Reaper>,
        root_error: Option<String>,
        mounts: Vec<PathBuf>,
        box_init: Option<BoxInit>,
        defer_box_init: bool,
    ) -> Arc<Self> {
        let last_cap = sandbox::last_cap();
        Arc::new(Self {
            out,
            reaper,
            workers: Workers::new(),
            channels: Mutex::new(HashMap::new()),
            closed: Mutex::new(VecDeque::new()),
            root_error,
            mounts,
            cpu: Mutex::new(CpuSample::default()),
            box_init,
            policy: Mutex::new(Arc::new(Policy::default_for(last_cap))),
            link: Mutex::new(None),
            defer_box_init,
            volume_mounts: Mutex::new(Vec::new()),
        })
    }

    /// Serves the host forever: waits for it to connect, says `Ready`, dispatches frames
    /// until it disconnects, and starts over.
    pub fn serve(self: &Arc<Self>, port: File) -> ! {
        let fd = port::raw(&port);
        let mut first = true;
        loop {
            port::wait_for_host(fd);
            let generation = self.out.next_generation();
            if !first {
                // Whatever ran for the previous host keeps running, unobserved.
                self.detach_all();
            }
            first = false;
            self.out.send(
                generation,
                &Frame::control(
                    0,
                    Message::Ready {
                        version: PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").to_string(),
                        uptime_ms: sys::uptime_ms(),
                        root_error: self.root_error.clone(),
                    },
                ),
            );
            log!("ready (uptime {} ms)", sys::uptime_ms());
            // The box init sets the box up while the host answers (`Configure`, the first
            // exec): the VM's CPU is otherwise idle meanwhile. The first exec waits for it.
            if let Some(b) = self.box_init.as_ref().filter(|_| !self.defer_box_init) {
                b.start();
            }
            // A fresh buffer per connection: nothing of the last one leaks into this one.
            let mut reader = BufReader::with_capacity(256 * 1024, &port);
            loop {
                match port::read_frame(&mut reader) {
                    Incoming::Frame(frame) => {
                        let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.on_frame(frame)));
                        if r.is_err() {
                            log!("a request handler panicked; still serving");
                        }
                    }
                    Incoming::Bad {
                        channel,
                        kind,
                        error,
                    } => self.on_bad_frame(channel, kind, error),
                    Incoming::Eof => {
                        log!("host disconnected; waiting for it to reconnect");
                        break;
                    }
                    Incoming::Failed(e) => {
                        log!("reading the port: {e}; waiting for the host");
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
    }

    fn reply(&self, channel: u32, msg: Message) {
        self.out
            .send(self.out.generation(), &Frame::control(channel, msg));
    }

    fn error(&self, channel: u32, kind: ErrorKind, message: impl Into<String>) {
        let message = message.into();
        log!("channel {channel}: {message}");
        self.reply(channel, Message::Error { kind, message });
    }

    /// Lets every running request go on unobserved and frees its channel id for the next host.
    fn detach_all(&self) {
        let sessions: Vec<Arc<Session>> =
            sys::lock(&self.channels).drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.detach();
        }
    }

    fn session(&self, channel: u32) -> Option<Arc<Session>> {
        sys::lock(&self.channels).get(&channel).cloned()
    }

    fn recently_closed(&self, channel: u32) -> bool {
        sys::lock(&self.closed).contains(&channel)
    }

    /// Forgets `session`'s channel, unless the channel is another session's by now (the id
    /// was reused by a new host after this one was detached).
    fn close_channel(&self, channel: u32, session: &Arc<Session>) {
        {
            let mut channels = sys::lock(&self.channels);
            match channels.get(&channel) {
                Some(current) if Arc::ptr_eq(current, session) => {
                    channels.remove(&channel);
                }
                _ => return,
            }
        }
        let mut closed = sys::lock(&self.closed);
        if closed.len() >= CLOSED_REMEMBERED {
            closed.pop_front();
        }
        closed.push_back(channel);
    }

    fn on_bad_frame(&self, channel: u32, kind: u8, error: FrameError) {
        log!("malformed frame on channel {channel}: {error}");
        // A request this agent cannot parse (most likely a newer host's) still deserves its
        // one final reply.
        if kind == 0 && matches!(error, FrameError::BadJson(_)) && self.session(channel).is_none() {
            self.reply(
                channel,
                Message::Error {
                    kind: ErrorKind::Unsupported,
                    message: format!("unsupported or malformed request: {error}"),
                },
            );
        }
    }

    fn on_frame(self: &Arc<Self>, frame: Frame) {
        let ch = frame.channel;
        match frame.body {
            Body::Control(msg) => self.on_control(ch, msg),
            Body::Data {
                stream: StreamId::Stdin,
                data,
            } => match self.session(ch) {
                Some(s) => s.push_stdin(data),
                // Stdin that raced the process's exit: dropped, but credited so a host
                // still writing is not left waiting for a window that never reopens.
                None if self.recently_closed(ch) => self.out.send(
                    self.out.generation(),
                    &Frame::credit(ch, StreamId::Stdin, data.len() as u32),
                ),
                None => log!("stdin for channel {ch}, which has no process"),
            },
            Body::Eof {
                stream: StreamId::Stdin,
            } => {
                if let Some(s) = self.session(ch) {
                    s.close_stdin();
                }
            }
            Body::Credit { stream, bytes } => {
                if let Some(s) = self.session(ch) {
                    s.credit(stream, bytes);
                }
            }
            Body::Data { stream, .. } | Body::Eof { stream } => {
                log!("channel {ch}: the host sent {stream:?} data, which flows the other way");
            }
        }
    }

    fn on_control(self: &Arc<Self>, ch: u32, msg: Message) {
        if let Some(s) = self.session(ch) {
            match msg {
                Message::Signal { signal } => s.signal(signal),
                Message::Resize(size) => s.resize(size),
                other => log!(
                    "channel {ch}: {} on a channel that is in use; ignored",
                    message_name(&other)
                ),
            }
            return;
        }
        match msg {
            Message::Configure(setup) => self.do_configure(ch, &setup),
            Message::Ping => self.reply(ch, Message::Pong),
            Message::Exec(req) => self.do_exec(ch, req),
            Message::CopyIn { path } => self.do_copy_in(ch, &path),
            Message::CopyOut { path } => self.do_copy_out(ch, &path),
            Message::UnpackLayer => self.do_unpack_layer(ch),
            Message::Metrics => self.do_metrics(ch),
            Message::Shutdown => self.do_shutdown(ch),
            Message::PrepareTemplate { link } => self.do_prepare_template(ch, link.as_ref()),
            Message::Quiesce => self.do_quiesce(ch),
            // The process may just have finished; its channel is closed, nothing to do.
            Message::Signal { .. } | Message::Resize(_) => {}
            other => self.error(
                ch,
                ErrorKind::Unsupported,
                format!(
                    "{} is not a request this agent serves",
                    message_name(&other)
                ),
            ),
        }
    }

    fn root_ready(&self, ch: u32) -> bool {
        match &self.root_error {
            None => true,
            Some(e) => {
                self.error(
                    ch,
                    ErrorKind::Io,
                    format!("the box root is not mounted: {e}"),
                );
                false
            }
        }
    }

    /// Registers a session for `ch` and runs `job` on its own thread.
    fn start_session(self: &Arc<Self>, ch: u32, job: Job) {
        let session = match Session::new(ch, self.out.generation()) {
            Ok(s) => s,
            Err(e) => return self.error(ch, ErrorKind::Internal, format!("session: {e}")),
        };
        sys::lock(&self.channels).insert(ch, session.clone());
        let mine = session.clone();
        let agent = self.clone();
        let spawned = self.workers.run("session", move || {
            let job = match agent.confine(job) {
                Ok(job) => job,
                Err(r) => {
                    agent.error(ch, r.kind, r.message);
                    agent.close_channel(ch, &mine);
                    return;
                }
            };
            let run = AssertUnwindSafe(|| session::run(session, job, &agent.out, &agent.reaper));
            if std::panic::catch_unwind(run).is_err() {
                agent.error(
                    ch,
                    ErrorKind::Internal,
                    "the agent failed serving this request",
                );
            }
            agent.close_channel(ch, &mine);
        });
        if let Err(e) = spawned {
            sys::lock(&self.channels).remove(&ch);
            self.error(ch, ErrorKind::Internal, format!("starting a thread: {e}"));
        }
    }

    /// Puts a user command into the box's namespaces under the current policy (waiting for
    /// the box init the first time). Without them it does not run at all.
    fn confine(&self, mut job: Job) -> Result<Job, Refusal> {
        if let Job::Exec { plan, .. } = &mut job {
            let Some(box_init) = &self.box_init else {
                return Err(Refusal::new(
                    ErrorKind::Unsupported,
                    "this boot has no box to run commands in",
                ));
            };
            let ns = box_init
                .namespaces()
                .map_err(|e| Refusal::new(ErrorKind::Internal, e))?;
            plan.confine = Some(Confinement {
                ns,
                policy: sys::lock(&self.policy).clone(),
            });
        }
        Ok(job)
    }

    fn do_exec(self: &Arc<Self>, ch: u32, req: ExecRequest) {
        let received_us = sys::monotonic_us();
        if !self.root_ready(ch) {
            return;
        }
        match exec::plan_exec(&req) {
            Ok(plan) => self.start_session(
                ch,
                Job::Exec {
                    plan,
                    program: req.program,
                    cwd: req.cwd,
                    // Zero means no limit, like an absent timeout.
                    timeout: req.timeout_ms.filter(|&t| t > 0).map(Duration::from_millis),
                    received_us,
                },
            ),
            Err(r) => self.error(ch, r.kind, r.message),
        }
    }

    fn start_tar(self: &Arc<Self>, ch: u32, op: &'static str, path: &str) {
        if !self.root_ready(ch) {
            return;
        }
        if path.is_empty() {
            return self.error(ch, ErrorKind::InvalidArgument, "the path is empty");
        }
        match exec::plan_tar(op, path) {
            Ok(plan) => self.start_session(ch, Job::Tar { plan, what: op }),
            Err(r) => self.error(ch, r.kind, r.message),
        }
    }

    fn do_copy_in(self: &Arc<Self>, ch: u32, path: &str) {
        self.start_tar(ch, "copy-in", path);
    }

    fn do_copy_out(self: &Arc<Self>, ch: u32, path: &str) {
        self.start_tar(ch, "copy-out", path);
    }

    fn do_unpack_layer(self: &Arc<Self>, ch: u32) {
        self.start_tar(ch, "unpack-layer", "/");
    }

    /// The last reply before the VM is saved (paused): everything after it stays unsent, so
    /// the host that saves the VM has read every frame the guest wrote.
    fn do_quiesce(&self, ch: u32) {
        self.reply(ch, Message::Done);
        if !self.out.flush(Duration::from_secs(5)) {
            log!("the Quiesce reply could not be flushed");
        }
        self.out.hold();
        log!("quiesced: the VM is being saved");
    }

    fn do_configure(&self, ch: u32, setup: &boxlite_proto::GuestSetup) {
        if setup.after != boxlite_proto::SetupAfter::Boot {
            // A restored VM: the host that ran its commands is gone; they keep running,
            // unobserved, and the new host hears from this request on.
            self.detach_all();
            self.out.release();
        }
        let root = self.root_error.is_none().then_some(Path::new(ROOT));
        if let Err(e) = self.mount_volumes(root, &setup.volumes) {
            let message = format!("{}{e}", boxlite_proto::VOLUME_ERROR_PREFIX);
            return self.error(ch, ErrorKind::Io, message);
        }
        let current = sys::lock(&self.policy).clone();
        let link = sys::lock(&self.link).clone();
        match crate::identity::apply(setup, root, &current, link.as_ref()) {
            Ok(policy) => {
                *sys::lock(&self.link) = setup.network.clone();
                // Every exec from now on; running processes keep what they started with.
                *sys::lock(&self.policy) = Arc::new(policy);
                self.reply(ch, Message::Done)
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => self.error(
                ch,
                ErrorKind::InvalidArgument,
                format!("configuring the box: {e}"),
            ),
            Err(e) => {
                // The link may be half set: the next `Configure` sets it up in full.
                *sys::lock(&self.link) = None;
                self.error(ch, ErrorKind::Io, format!("configuring the box: {e}"))
            }
        }
    }

    /// Mounts the box's volumes once (a later `Configure` finds them there), then lets the
    /// box init copy them into the box's namespace.
    fn mount_volumes(
        &self,
        root: Option<&Path>,
        volumes: &[boxlite_proto::GuestVolume],
    ) -> Result<(), String> {
        let mut mounted = sys::lock(&self.volume_mounts);
        if !volumes.is_empty() && mounted.is_empty() {
            let root = root.ok_or("the box has no root to mount volumes in")?;
            *mounted = crate::volumes::mount_all(root, volumes)?;
        }
        if let Some(b) = self.box_init.as_ref().filter(|_| self.defer_box_init) {
            b.start();
        }
        Ok(())
    }

    /// Settles the VM before it is saved as a template: no user process may be in it (each
    /// box made from it would inherit one), and dirty pages go to the disk the boxes' disks
    /// will be overlays on.
    fn do_prepare_template(&self, ch: u32, link: Option<&boxlite_proto::net::GuestNetwork>) {
        let running = sys::lock(&self.channels).len();
        if running > 0 {
            return self.error(
                ch,
                ErrorKind::InvalidArgument,
                format!("{running} requests are running; a template must be idle"),
            );
        }
        if let Some(link) = link {
            if let Err(e) = crate::net::configure(link, None) {
                return self.error(ch, ErrorKind::Io, format!("bringing the link up: {e}"));
            }
            *sys::lock(&self.link) = Some(link.clone());
        }
        if self.root_error.is_none() {
            // What every box's `Configure` and first command touch, made once here: the
            // resolver files (rewritten in place by each box) and the common files read.
            if let Err(e) = crate::net::write_resolver_files(Path::new(ROOT), "localhost", link) {
                log!("template: resolver files not written: {e}");
            }
            crate::warm::common_files(Path::new(ROOT));
        }
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        self.reply(ch, Message::Done);
    }

    fn do_metrics(&self, ch: u32) {
        let root = self.root_error.is_none().then_some(Path::new(ROOT));
        self.reply(
            ch,
            Message::MetricsReport(metrics::collect(&self.cpu, root)),
        );
    }

    fn do_shutdown(&self, ch: u32) -> ! {
        log!("shutdown requested");
        stop_all_processes(self.box_init.as_ref().and_then(BoxInit::pid));
        // The agent's hold on the box's mount namespace would keep the disk mounted.
        if let Some(b) = &self.box_init {
            b.stop();
        }
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        mounts::unmount_all(&sys::lock(&self.volume_mounts));
        mounts::unmount_all(&self.mounts);
        // SAFETY: as above.
        unsafe { libc::sync() };
        self.reply(ch, Message::Done);
        if !self.out.flush(Duration::from_secs(5)) {
            log!("the Done reply could not be flushed");
        }
        power_off()
    }
}

/// Processes other than the agent, kernel threads and `except` (by /proc, skipping zombies).
fn live_processes(except: Option<libc::pid_t>) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid > 2 && Some(pid as libc::pid_t) != except)
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid ...": comm may contain anything, so split after ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_ascii_whitespace();
            let state = f.next().unwrap_or("Z");
            let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            state != "Z" && state != "X" && ppid != 2
        })
        .count()
}

fn wait_for_no_processes(except: Option<libc::pid_t>, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if live_processes(except) == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// SIGTERM to everything, a moment of grace, then SIGKILL. The box init ignores SIGTERM (it is
/// its namespace's init); it is killed last, which also kills whatever is left in the box.
fn stop_all_processes(box_init: Option<libc::pid_t>) {
    if live_processes(None) == 0 {
        return;
    }
    // SAFETY: kill(-1) from PID 1 signals every other process; no memory involved.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    if !wait_for_no_processes(box_init, Duration::from_secs(2)) {
        log!("processes left after SIGTERM; sending SIGKILL");
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    wait_for_no_processes(None, Duration::from_secs(2));
}

/// Syncs and powers the VM off. Never returns: PID 1 must not exit.
pub fn power_off() -> ! {
    log!("powering off");
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    log!("power off failed: {}", std::io::Error::last_os_error());
    // SAFETY: as above; with `-no-reboot` QEMU exits on a reset too.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
