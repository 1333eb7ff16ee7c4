//! Turning an [`ExecRequest`] into a running process: validation, user resolution and a
//! hand-written clone/exec. `std::process` is not used because it waits for children itself
//! (racing the reaper, see `reaper.rs`) and cannot enter the box before resolving the program.
//!
//! A user command is confined (see `boxinit.rs` and `sandbox.rs`): the agent's clone child
//! joins the box's ipc, mount and pid namespaces (`setns` on the box init's), then clones the
//! final process with `CLONE_PARENT`, so that it is born inside the box's pid namespace yet is
//! the agent's child (the reaper gets its status, the timeout kills its process group by the
//! agent's pid for it). That process cuts its capability bounding set, installs the seccomp
//! filter (which needs `CAP_SYS_ADMIN`, still held), switches user, sets its capabilities and
//! executes. Until `execve` it shares the agent's memory, which is why the agent is
//! non-dumpable (`main.rs`): nothing in the box can ptrace or read it meanwhile.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use boxlite_proto::{ErrorKind, ExecRequest, TtySize};

use crate::boxinit::BoxNs;
use crate::mounts::ROOT;
use crate::reaper::{ExitSink, Reaper};
use crate::sandbox::{self, Policy};
use crate::sys;
use crate::user::{self, Ids, UserError};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Capacity asked for the stdio pipes of a process.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// The hidden subcommand under which the agent re-executes itself for tar work.
pub const TAR_SUBCOMMAND: &str = "__boxlite_tar";

/// How the child's descriptors 0, 1, 2 are wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// A pipe for each `true`, /dev/null for each `false`.
    Pipes {
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
    /// One pseudo-terminal for all three; it becomes the controlling terminal.
    Tty(TtySize),
}

/// Everything the child needs, prepared before it starts (the child must not allocate).
#[derive(Debug)]
pub struct Plan {
    /// Paths to try with `execve`, in order (the PATH search, done inside the box).
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub ids: Option<Ids>,
    pub stdio: Stdio,
    /// `CLONE_NEW*` flags: namespaces the child is created in (the box init's).
    pub new_namespaces: libc::c_int,
    /// How a user command is confined; `None` for the agent's own helpers.
    pub confine: Option<Confinement>,
}

/// The box a user command runs in and what it may do there.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub ns: Arc<BoxNs>,
    pub policy: Arc<Policy>,
}

/// A refused request, already in the protocol's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

fn invalid(message: String) -> Refusal {
    Refusal::new(ErrorKind::InvalidArgument, message)
}

fn c_arg(what: &str, s: &str) -> Result<CString, Refusal> {
    CString::new(s).map_err(|_| invalid(format!("{what} contains a NUL byte")))
}

/// The `execve` paths for `program`: itself when it contains a slash, else one per
/// `PATH` entry (an empty entry means the working directory), like `execvp`.
pub fn candidates(program: &str, path_var: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    path_var
        .split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{program}", dir.trim_end_matches('/'))
        })
        .collect()
}

/// Checks `req` and resolves its user against the box's databases.
pub fn plan_exec(req: &ExecRequest) -> Result<Plan, Refusal> {
    if req.program.is_empty() {
        return Err(invalid("the program is empty".into()));
    }
    let mut argv = vec![c_arg("the program", &req.program)?];
    for a in &req.args {
        argv.push(c_arg("an argument", a)?);
    }
    let mut envp = Vec::with_capacity(req.env.len() + 1);
    let mut path_var = None;
    for (k, v) in &req.env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(invalid(format!("invalid environment variable name {k:?}")));
        }
        if k == "PATH" {
            path_var = Some(v.as_str());
        }
        envp.push(c_arg("an environment value", &format!("{k}={v}"))?);
    }
    if path_var.is_none() {
        envp.push(c_arg("PATH", &format!("PATH={DEFAULT_PATH}"))?);
    }
    let candidates = candidates(&req.program, path_var.unwrap_or(DEFAULT_PATH))
        .iter()
        .map(|c| c_arg("the program", c))
        .collect::<Result<_, _>>()?;
    let cwd = match req.cwd.as_deref() {
        None | Some("") => "/",
        Some(c) => c,
    };
    let cwd = c_arg("the working directory", cwd)?;
    let read = |rel: &str| -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Ok(mut f) = sys::open_in_root(Path::new(ROOT), rel, 0) {
            let _ = f.read_to_string(&mut s);
        }
        s
    };
    let ids = user::resolve(req.user.as_deref(), &read("etc/passwd"), &read("etc/group")).map_err(
        |e| match e {
            UserError::NotFound(m) => Refusal::new(ErrorKind::NotFound, m),
            UserError::Invalid(m) => invalid(m),
        },
    )?;
    let stdio = match req.tty {
        Some(size) => Stdio::Tty(size),
        None => Stdio::Pipes {
            stdin: true,
            stdout: true,
            stderr: true,
        },
    };
    Ok(Plan {
        candidates,
        argv,
        envp,
        cwd,
        ids: Some(ids),
        stdio,
        new_namespaces: 0,
        // Filled in by the agent before the spawn (it may wait for the box init).
        confine: None,
    })
}

/// The agent re-executed as `__boxlite_tar <op> <root> <path>`; it chroots itself.
pub fn plan_tar(op: &str, path: &str) -> Result<Plan, Refusal> {
    let exe = c_arg("the agent", "/proc/self/exe")?;
    let argv = ["boxlite-guest", TAR_SUBCOMMAND, op, ROOT, path]
        .iter()
        .map(|a| c_arg("the path", a))
        .collect::<Result<_, _>>()?;
    Ok(Plan {
        candidates: vec![exe],
        argv,
        envp: Vec::new(),
        cwd: c_arg("/", "/")?,
        ids: None,
        stdio: Stdio::Pipes {
            stdin: op != "copy-out",
            stdout: op == "copy-out",
            stderr: true,
        },
        new_namespaces: 0,
        confine: None,
    })
}

/// A started process and the agent's ends of its stdio.
#[derive(Debug)]
pub struct Child {
    /// Its pid in the agent's (the VM's) pid namespace.
    pub pid: libc::pid_t,
    /// Its pid inside the box, for a confined command.
    pub box_pid: Option<libc::pid_t>,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The pty master (also behind `stdin`/`stdout`), for resizing.
    pub tty: Option<OwnedFd>,
    /// When the cloned child ran and when the final process called `execve`
    /// ([`sys::monotonic_us`]).
    pub started_us: u64,
    pub execve_us: u64,
}

/// Where the child was when it failed (sent back over the CLOEXEC error pipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stage {
    Setup = 1,
    Root = 2,
    Cwd = 3,
    User = 4,
    Exec = 5,
    Sandbox = 6,
}

#[derive(Debug)]
pub enum SpawnError {
    /// The agent could not even start the child (pipes, pty, clone).
    Agent(io::Error),
    /// The child failed before `execve` succeeded.
    Child { stage: Stage, errno: i32 },
}

impl SpawnError {
    /// The protocol error for an exec of `req` that failed like this.
    pub fn refusal(&self, program: &str, cwd: Option<&str>) -> Refusal {
        match *self {
            Self::Agent(ref e) => Refusal::new(ErrorKind::Internal, format!("spawning: {e}")),
            Self::Child { stage, errno } => {
                let err = io::Error::from_raw_os_error(errno);
                match stage {
                    Stage::Cwd if errno == libc::ENOENT || errno == libc::ENOTDIR => Refusal::new(
                        ErrorKind::NotFound,
                        format!(
                            "working directory {:?} does not exist in the box",
                            cwd.unwrap_or("/")
                        ),
                    ),
                    Stage::Cwd => Refusal::new(
                        ErrorKind::SpawnFailed,
                        format!("entering working directory {:?}: {err}", cwd.unwrap_or("/")),
                    ),
                    Stage::Exec => {
                        Refusal::new(ErrorKind::SpawnFailed, format!("{program}: {err}"))
                    }
                    Stage::User => {
                        Refusal::new(ErrorKind::SpawnFailed, format!("switching user: {err}"))
                    }
                    Stage::Root => Refusal::new(ErrorKind::Io, format!("entering the box: {err}")),
                    Stage::Sandbox => {
                        Refusal::new(ErrorKind::Internal, format!("confining the process: {err}"))
                    }
                    Stage::Setup => Refusal::new(
                        ErrorKind::SpawnFailed,
                        format!("setting up the process: {err}"),
                    ),
                }
            }
        }
    }
}

fn open_pty(size: TtySize, pts: Option<RawFd>) -> io::Result<(OwnedFd, OwnedFd)> {
    // The box's own devpts instance, so the slave is /dev/pts/N inside the box too.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    let master = match pts {
        Some(dir) => {
            // SAFETY: a valid directory descriptor and C string.
            let fd = sys::cvt(unsafe { libc::openat(dir, c"ptmx".as_ptr(), flags) })?;
            // SAFETY: openat returned a fresh descriptor.
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
        None => sys::open(Path::new("/dev/ptmx"), flags, 0)?,
    };
    let m = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    // SAFETY: ioctls on our own master with correctly typed arguments.
    unsafe {
        sys::cvt(libc::ioctl(m, libc::TIOCSPTLCK, &unlock))?;
        let ws = libc::winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        sys::cvt(libc::ioctl(m, libc::TIOCSWINSZ, &ws))?;
        let slave = sys::cvt(libc::ioctl(
            m,
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        Ok((master, OwnedFd::from_raw_fd(slave)))
    }
}

pub fn set_window_size(master: RawFd, size: TtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize.
    sys::cvt(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a fresh descriptor.
    let new = sys::cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Starts `plan` as a new process; the child is registered with `reaper` (routing its exit status
/// to `sink`) before anyone can reap it. Returns once `execve` succeeded or the child
/// reported why it failed.
pub fn spawn(plan: &Plan, reaper: &Reaper, sink: Arc<dyn ExitSink>) -> Result<Child, SpawnError> {
    let (err_r, err_w) = sys::pipe().map_err(SpawnError::Agent)?;
    let mut child = Child {
        pid: 0,
        box_pid: None,
        stdin: None,
        stdout: None,
        stderr: None,
        tty: None,
        started_us: 0,
        execve_us: 0,
    };
    // The child's ends, closed in the parent once it started.
    let mut theirs: Vec<OwnedFd> = Vec::new();
    let fds: [RawFd; 3];
    let mut tty = false;
    match plan.stdio {
        Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let null =
                sys::open(Path::new("/dev/null"), libc::O_RDWR, 0).map_err(SpawnError::Agent)?;
            let null_fd = null.as_raw_fd();
            theirs.push(null);
            let mut raw = [null_fd; 3];
            for (i, wanted) in [stdin, stdout, stderr].into_iter().enumerate() {
                if !wanted {
                    continue;
                }
                let (r, w) = sys::pipe().map_err(SpawnError::Agent)?;
                // A bigger pipe lets a fast writer run ahead between the agent's reads
                // (fewer, fuller frames and context switches). Best effort.
                // SAFETY: fcntl on a descriptor we own.
                unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
                let (mine, other) = if i == 0 { (w, r) } else { (r, w) };
                raw[i] = other.as_raw_fd();
                theirs.push(other);
                match i {
                    0 => child.stdin = Some(mine),
                    1 => child.stdout = Some(mine),
                    _ => child.stderr = Some(mine),
                }
            }
            fds = raw;
        }
        Stdio::Tty(size) => {
            let pts = plan.confine.as_ref().map(|c| c.ns.pts.as_raw_fd());
            let (master, slave) = open_pty(size, pts).map_err(SpawnError::Agent)?;
            fds = [slave.as_raw_fd(); 3];
            theirs.push(slave);
            child.stdin = Some(dup_cloexec(master.as_raw_fd()).map_err(SpawnError::Agent)?);
            child.stdout = Some(dup_cloexec(master.as_raw_fd()).map_err(SpawnError::Agent)?);
            child.tty = Some(master);
            tty = true;
        }
    }
    let argv: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = plan
        .envp
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let groups: Vec<libc::gid_t> = plan
        .ids
        .as_ref()
        .map(|i| i.groups.clone())
        .unwrap_or_default();
    let ns = plan.confine.as_ref().map(|c| {
        [
            c.ns.ipc.as_raw_fd(),
            c.ns.mnt.as_raw_fd(),
            c.ns.pid.as_raw_fd(),
        ]
    });
    let policy = plan.confine.as_ref().map(|c| &*c.policy);
    // The child runs on its own stack in our address space until it executes (like
    // posix_spawn): no page tables to copy, no copy-on-write faults afterwards - both
    // expensive under a software CPU. This thread is suspended meanwhile (CLONE_VFORK).
    // A confined command needs a second stack: its final process is the child's child.
    let stacks = if ns.is_some() { 2 } else { 1 };
    let mut stack = vec![0u8; CHILD_STACK * stacks];
    let base = stack.as_mut_ptr();
    let top_of = |end: usize| {
        let top = base.wrapping_add(end - 64);
        (top as usize & !15) as *mut libc::c_void
    };
    let top = top_of(CHILD_STACK * stacks);
    let inner_top = top_of(CHILD_STACK);
    let ctx = ChildCtx {
        plan,
        fds,
        tty,
        argv: &argv,
        envp: &envp,
        groups: &groups,
        err: err_w.as_raw_fd(),
        ns,
        policy,
        inner_stack: inner_top,
        grandchild: AtomicI32::new(0),
        box_pid: AtomicI32::new(0),
        started_us: AtomicU64::new(0),
        execve_us: AtomicU64::new(0),
    };
    let mut guard = reaper.lock();
    // SAFETY: `ctx` and `stack` outlive the child's use of them (the call returns only once
    // the child has executed or exited, and a confined child only once its own child has);
    // the children perform only async-signal-safe calls on data prepared here and write
    // nothing but their own stacks and the two atomics of `ctx` (see `child_main`).
    let pid = unsafe {
        libc::clone(
            child_entry,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD | plan.new_namespaces,
            &ctx as *const ChildCtx<'_> as *mut libc::c_void,
        )
    };
    drop(stack);
    if pid < 0 {
        return Err(SpawnError::Agent(io::Error::last_os_error()));
    }
    // A confined command is the grandchild (the child only entered the box and exited).
    let process = if ctx.ns.is_some() {
        ctx.grandchild.load(Ordering::SeqCst)
    } else {
        pid
    };
    if process > 0 {
        guard.register(process, sink);
    }
    drop(guard);
    child.pid = process;
    let box_pid = ctx.box_pid.load(Ordering::SeqCst);
    child.box_pid = (box_pid > 0).then_some(box_pid);
    child.started_us = ctx.started_us.load(Ordering::SeqCst);
    child.execve_us = ctx.execve_us.load(Ordering::SeqCst);
    drop(theirs);
    drop(err_w);

    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match sys::read(err_r.as_raw_fd(), &mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    if got == 0 && process > 0 {
        return Ok(child);
    }
    let stage = match u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) {
        2 => Stage::Root,
        3 => Stage::Cwd,
        4 => Stage::User,
        5 => Stage::Exec,
        6 => Stage::Sandbox,
        _ => Stage::Setup,
    };
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Err(SpawnError::Child { stage, errno })
}

struct ChildCtx<'a> {
    plan: &'a Plan,
    fds: [RawFd; 3],
    tty: bool,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    groups: &'a [libc::gid_t],
    err: RawFd,
    /// The box's ipc, mount and pid namespaces, for a confined command.
    ns: Option<[RawFd; 3]>,
    policy: Option<&'a Policy>,
    /// The final process's stack (confined commands).
    inner_stack: *mut libc::c_void,
    /// Written by the children: the final process's pid in the agent's and the box's pid
    /// namespace.
    grandchild: AtomicI32,
    box_pid: AtomicI32,
    /// Written by the children too ([`sys::monotonic_us`]): when the cloned child ran, and when
    /// the final process called `execve`.
    started_us: AtomicU64,
    execve_us: AtomicU64,
}

/// Stack of the cloned child until it executes.
const CHILD_STACK: usize = 128 * 1024;

extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildCtx` that `spawn` keeps alive while we run.
    unsafe { child_main(&*(arg as *const ChildCtx<'_>)) }
}

extern "C" fn final_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: as for `child_entry`; `child_main` waits for us (CLONE_VFORK).
    unsafe { final_main(&*(arg as *const ChildCtx<'_>)) }
}

/// Reports `(stage, errno)` on the error pipe and exits.
///
/// # Safety
/// Only to be called in the cloned child.
unsafe fn fail(err: RawFd, stage: Stage) -> ! {
    // SAFETY: errno location is thread-local and valid; write/_exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The cloned child: only async-signal-safe calls, no allocation, no return. It shares the
/// agent's memory until `execve`, so it must not write anything but its own stack, the
/// atomics of `ctx` (and errno, which belongs to the suspended parent thread).
///
/// For a confined command it joins the box's namespaces, starts the final process as a
/// sibling (`CLONE_PARENT`: the agent's child, in the box's pid namespace), waits for it to
/// execute (`CLONE_VFORK`) and exits; otherwise it is the final process itself.
///
/// # Safety
/// Only to be called in the cloned child.
unsafe fn child_main(c: &ChildCtx<'_>) -> ! {
    // SAFETY: every call below is async-signal-safe and uses data prepared before clone.
    unsafe {
        c.started_us.store(sys::monotonic_us(), Ordering::SeqCst);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Rust ignores SIGPIPE; a child must not inherit that.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let Some([ipc, mnt, pid]) = c.ns else {
            final_main(c)
        };
        // The mount namespace also sets the root and working directory to the box's `/`.
        if libc::setns(ipc, libc::CLONE_NEWIPC) < 0
            || libc::setns(mnt, libc::CLONE_NEWNS) < 0
            || libc::setns(pid, libc::CLONE_NEWPID) < 0
        {
            fail(c.err, Stage::Root);
        }
        let child = libc::clone(
            final_entry,
            c.inner_stack,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD,
            c as *const ChildCtx<'_> as *mut libc::c_void,
        );
        if child < 0 {
            fail(c.err, Stage::Setup);
        }
        c.grandchild.store(child, Ordering::SeqCst);
        libc::_exit(0)
    }
}

/// The process that becomes the command: session, stdio, working directory, confinement,
/// user, `execve`. Same rules as [`child_main`].
///
/// # Safety
/// Only to be called in a cloned child.
unsafe fn final_main(c: &ChildCtx<'_>) -> ! {
    // SAFETY: as in `child_main`.
    unsafe {
        if c.ns.is_some() {
            c.box_pid.store(libc::getpid(), Ordering::SeqCst);
        }
        if libc::setsid() < 0 {
            fail(c.err, Stage::Setup);
        }
        for (target, &src) in c.fds.iter().enumerate() {
            let target = target as libc::c_int;
            if src == target {
                libc::fcntl(src, libc::F_SETFD, 0);
            } else if libc::dup2(src, target) < 0 {
                fail(c.err, Stage::Setup);
            }
        }
        if c.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(c.err, Stage::Setup);
        }
        // Whatever descriptor some other thread opened without O_CLOEXEC stays out. A
        // confined command, visible in the box from now on, keeps nothing of the agent's
        // but the error pipe even until it executes.
        let err = c.err as libc::c_uint;
        if c.ns.is_some() {
            if err > 3 {
                libc::close_range(3, err - 1, 0);
            }
            libc::close_range(err + 1, libc::c_uint::MAX, 0);
        } else {
            libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            );
        }
        if libc::chdir(c.plan.cwd.as_ptr()) < 0 {
            fail(c.err, Stage::Cwd);
        }
        if let Some(p) = c.policy {
            // Before the user change: lowering a hard limit needs no privilege, and
            // RLIMIT_NPROC is checked against the new user at execve.
            if sandbox::set_limits(&p.rlimits).is_err() {
                fail(c.err, Stage::Sandbox);
            }
            if sandbox::drop_bounding(p.caps, p.last_cap).is_err() {
                fail(c.err, Stage::Sandbox);
            }
            if let Some(filter) = &p.filter {
                if sandbox::install_filter(filter).is_err() {
                    fail(c.err, Stage::Sandbox);
                }
            }
        }
        if let Some(ids) = &c.plan.ids {
            // Raw syscalls: glibc's wrappers would try to broadcast the change to the
            // agent's threads, which its memory (shared until execve) says we have.
            if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) < 0
                || libc::syscall(libc::SYS_setgid, ids.gid) < 0
                || libc::syscall(libc::SYS_setuid, ids.uid) < 0
            {
                fail(c.err, Stage::User);
            }
        }
        if let Some(p) = c.policy {
            // uid 0 keeps the box's set; any other uid has none left after setuid.
            let root = c.plan.ids.as_ref().is_none_or(|i| i.uid == 0);
            if sandbox::set_caps(if root { p.caps } else { 0 }).is_err() {
                fail(c.err, Stage::Sandbox);
            }
        }
        c.execve_us.store(sys::monotonic_us(), Ordering::SeqCst);
        let mut eacces = false;
        let searching = c.plan.candidates.len() > 1;
        for cand in &c.plan.candidates {
            // A failed execve first copies argv and envp into a new address space (~150 us
            // under TCG); a PATH entry that does not hold the program is skipped for the price
            // of a lookup. Any other answer (or a seccomp policy that denies the call) falls
            // through to execve, which decides as before.
            if searching && libc::faccessat(libc::AT_FDCWD, cand.as_ptr(), libc::F_OK, 0) < 0 {
                let errno = *libc::__errno_location();
                if errno == libc::ENOENT || errno == libc::ENOTDIR {
                    continue;
                }
            }
            libc::execve(cand.as_ptr(), c.argv.as_ptr(), c.envp.as_ptr());
            match *libc::__errno_location() {
                libc::EACCES => eacces = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => fail(c.err, Stage::Exec),
            }
        }
        if eacces {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(c.err, Stage::Exec)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn path_search_candidates() {
        assert_eq!(candidates("./x", "/bin"), vec!["./x"]);
        assert_eq!(candidates("/bin/sh", "/usr/bin"), vec!["/bin/sh"]);
        assert_eq!(
            candidates("ls", "/usr/bin/:/bin::"),
            vec!["/usr/bin/ls", "/bin/ls", "./ls", "./ls"]
        );
    }

    #[test]
    fn validation() {
        let check = |req: ExecRequest| plan_exec(&req).err().map(|r| r.kind);
        assert_eq!(
            check(ExecRequest::new("", Vec::<String>::new())),
            Some(ErrorKind::InvalidArgument)
        );
        let mut r = ExecRequest::new("sh", ["-c", "true"]);
        r.env = vec![("A=B".into(), "x".into())];
        assert_eq!(check(r.clone()), Some(ErrorKind::InvalidArgument));
        r.env = vec![("".into(), "x".into())];
        assert_eq!(check(r.clone()), Some(ErrorKind::InvalidArgument));
        r.env = vec![("A\0".into(), "x".into())];
        assert_eq!(check(r.clone()), Some(ErrorKind::InvalidArgument));
        r.env = vec![("A".into(), "x\0".into())];
        assert_eq!(check(r.clone()), Some(ErrorKind::InvalidArgument));
        r.env = vec![];
        r.args = vec!["a\0b".into()];
        assert_eq!(check(r.clone()), Some(ErrorKind::InvalidArgument));
    }

    #[test]
    fn plan_adds_default_path_only_when_missing() {
        // No /rootfs on the build host: the user database is empty, root still resolves.
        let mut r = ExecRequest::new("ls", ["-l"]);
        let p = plan_exec(&r).unwrap();
        assert!(p
            .envp
            .iter()
            .any(|e| e.to_bytes() == format!("PATH={DEFAULT_PATH}").as_bytes()));
        assert_eq!(p.candidates.len(), DEFAULT_PATH.split(':').count());
        r.env = vec![("PATH".into(), "/opt".into())];
        let p = plan_exec(&r).unwrap();
        assert_eq!(p.envp.len(), 1);
        assert_eq!(p.candidates[0].to_bytes(), b"/opt/ls");
        assert_eq!(p.argv.len(), 2);
        assert_eq!(p.cwd.to_bytes(), b"/");
    }
}
