//! The box init: PID 1 of the box's own pid namespace, in the box's own mount and ipc
//! namespaces, whose root is the box disk. Every user command joins its namespaces (see
//! `exec.rs`), so user processes see each other (`ps` works) and never the agent, its devices
//! or its mounts; the box init reaps the box's orphans.
//!
//! It is the agent re-executed as `boxlite-init` (a fresh single-threaded process may allocate
//! and mount freely) and builds the box's view before anything of the box runs:
//!
//! - the agent's own /dev, /proc, /sys, /run and /tmp are detached from its namespace;
//! - the box root is `nodev`: a device node a box root makes with `CAP_MKNOD` cannot be
//!   opened (what Docker gets from the devices cgroup);
//! - /dev is a fresh tmpfs, also `nodev`, into which only null, zero, full, random, urandom
//!   and tty are bind-mounted (bind mounts keep their own flags), plus a new devpts instance,
//!   /dev/ptmx, /dev/shm, /dev/mqueue and the fd/stdin/stdout/stderr links. No console, no
//!   disks, no agent port, no /dev/mem;
//! - /proc is mounted for the box's pid namespace, with Docker's read-only paths (/proc/sys,
//!   /proc/sysrq-trigger, ...) and masked paths (/proc/kcore, /proc/keys, ...): a writable
//!   `/proc/sys/kernel/core_pattern` or `modprobe` would run any box file as full root in the
//!   agent's namespaces, `sysrq-trigger` could reboot the VM;
//! - /sys is read-only (driver `unbind` files and the like);
//! - the box root is moved onto `/` and entered (pivot_root is impossible from an initramfs;
//!   `..` from the moved root never leads below it, and nothing else reaches the old root).
//!
//! The box shares the VM's network and UTS namespaces: the network is the box's own (set up
//! by the agent on `Configure`), as is the hostname, and changing either needs capabilities
//! user commands do not have.
//!
//! Then it keeps no capabilities, becomes non-dumpable and un-OOM-killable, says `ok` on its
//! stdout (a pipe to the agent, held open for life: the agent learns of its death from the
//! hang-up) and reaps forever.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::exec::{self, Plan, Stdio};
use crate::log::log;
use crate::mounts::{self, ROOT};
use crate::reaper::{ExitSink, Reaper};
use crate::sandbox;
use crate::sys;

/// The box init's `argv[0]` (what `ps` shows as the box's PID 1); `main` dispatches on it.
pub const ARGV0: &str = "boxlite-init";

/// How long the box init may take to set the box up (a software CPU is slow).
const READY_WAIT: Duration = Duration::from_secs(20);

const DEVPTS_SUPER_MAGIC: i64 = 0x1cd1;

/// Character devices a box gets (Docker's default set): name, major, minor.
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Docker's read-only paths.
const READONLY: [&str; 5] = [
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// Docker's masked paths.
const MASKED: [&str; 11] = [
    "proc/asound",
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

// ---------------------------------------------------------------------------------------
// The agent's side.

/// The box's namespaces, held open by the agent for every exec to join.
#[derive(Debug)]
pub struct BoxNs {
    pub init_pid: libc::pid_t,
    pub ipc: OwnedFd,
    pub mnt: OwnedFd,
    pub pid: OwnedFd,
    /// The box's devpts (an `O_PATH` directory), where execs with a tty get their terminal.
    pub pts: OwnedFd,
    /// The read end of the box init's stdout: it hangs up when the box init dies.
    life: OwnedFd,
}

impl BoxNs {
    pub fn alive(&self) -> bool {
        let mut fds = [sys::pollfd(self.life.as_raw_fd(), 0)];
        match sys::poll(&mut fds, Some(Duration::ZERO)) {
            Ok(0) => true,
            _ => fds[0].revents & (libc::POLLHUP | libc::POLLERR) == 0,
        }
    }
}

enum State {
    Idle,
    Starting { pid: libc::pid_t, status: OwnedFd },
    Ready(Arc<BoxNs>),
    Stopped,
}

/// The box init as the agent sees it: started as soon as the agent said `Ready` (it sets the
/// box up while the host answers), waited for by the first exec, started again by the next
/// exec if it ever died (a new box init means a fresh pid namespace: every process of the old
/// one is gone with it).
pub struct BoxInit {
    state: Mutex<State>,
    reaper: Arc<Reaper>,
}

impl std::fmt::Debug for BoxInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxInit")
    }
}

/// The agent's reaper reaps the box init like any child; its death is seen on the pipe.
struct Ignore;

impl ExitSink for Ignore {
    fn exited(&self, status: libc::c_int) {
        log!("the box init exited (wait status {status:#x})");
    }
}

impl BoxInit {
    pub fn new(reaper: Arc<Reaper>) -> Self {
        Self {
            state: Mutex::new(State::Idle),
            reaper,
        }
    }

    /// Starts the box init, unless one is already there, without waiting for it.
    pub fn start(&self) {
        let mut state = sys::lock(&self.state);
        if !matches!(*state, State::Idle) {
            return;
        }
        if let Err(e) = self.spawn(&mut state) {
            log!("starting the box init: {e}");
        }
    }

    fn spawn(&self, state: &mut State) -> Result<(), String> {
        let plan = Plan {
            candidates: vec![c"/proc/self/exe".to_owned()],
            argv: vec![cstr(ARGV0)],
            envp: Vec::new(),
            cwd: c"/".to_owned(),
            ids: None,
            stdio: Stdio::Pipes {
                stdin: false,
                stdout: true,
                stderr: false,
            },
            new_namespaces: libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC,
            confine: None,
        };
        let child = exec::spawn(&plan, &self.reaper, Arc::new(Ignore))
            .map_err(|e| exec::SpawnError::refusal(&e, ARGV0, None).message)?;
        let status = child.stdout.ok_or("the box init has no status pipe")?;
        *state = State::Starting {
            pid: child.pid,
            status,
        };
        Ok(())
    }

    /// The box's namespaces, waiting for the box init to be ready and starting a new one if
    /// it died.
    pub fn namespaces(&self) -> Result<Arc<BoxNs>, String> {
        let mut state = sys::lock(&self.state);
        for _attempt in 0..2 {
            match &*state {
                State::Ready(ns) if ns.alive() => return Ok(ns.clone()),
                State::Ready(_) => {
                    log!("the box init died; starting a new one");
                    *state = State::Idle;
                }
                State::Stopped => return Err("the box is shutting down".into()),
                _ => {}
            }
            if matches!(*state, State::Idle) {
                self.spawn(&mut state)?;
            }
            let State::Starting { pid, status } = std::mem::replace(&mut *state, State::Idle)
            else {
                continue;
            };
            match wait_ready(pid, status) {
                Ok(ns) => *state = State::Ready(Arc::new(ns)),
                Err(e) => {
                    // SAFETY: kill(2) of our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return Err(format!("the box init failed: {e}"));
                }
            }
        }
        Err("the box init keeps dying".into())
    }

    /// The box init's pid, if one runs.
    pub fn pid(&self) -> Option<libc::pid_t> {
        match &*sys::lock(&self.state) {
            State::Starting { pid, .. } => Some(*pid),
            State::Ready(ns) => Some(ns.init_pid),
            _ => None,
        }
    }

    /// For shutdown: forgets the box init and closes the agent's hold on its namespaces (a
    /// held mount namespace would keep the box disk mounted). No exec starts after this.
    pub fn stop(&self) {
        *sys::lock(&self.state) = State::Stopped;
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// Reads the box init's status line; on `ok`, opens its namespaces. Its stdout stays open as
/// long as it lives, so "no hang-up after the opens" proves the files are its own (its pid
/// cannot have been reused).
fn wait_ready(pid: libc::pid_t, status: OwnedFd) -> Result<BoxNs, String> {
    let fd = status.as_raw_fd();
    let deadline = Instant::now() + READY_WAIT;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {} s", READY_WAIT.as_secs()));
        }
        let mut fds = [sys::pollfd(fd, libc::POLLIN)];
        if sys::poll(&mut fds, Some(left)).map_err(|e| e.to_string())? == 0 {
            continue;
        }
        match sys::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("reading its status: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let text = text.trim();
    // "ok <uptime at its start> <uptime when ready>" (milliseconds).
    let Some(times) = text.strip_prefix("ok") else {
        return Err(if text.is_empty() {
            "it exited without a word".into()
        } else {
            text.trim_start_matches("error ").to_string()
        });
    };
    let open = |rel: &str, flags: libc::c_int| {
        sys::open(Path::new(&format!("/proc/{pid}/{rel}")), flags, 0)
            .map_err(|e| format!("opening /proc/{pid}/{rel}: {e}"))
    };
    let ipc = open("ns/ipc", libc::O_RDONLY)?;
    let mnt = open("ns/mnt", libc::O_RDONLY)?;
    let pidns = open("ns/pid", libc::O_RDONLY)?;
    let pts = open("root/dev/pts", libc::O_PATH | libc::O_DIRECTORY)?;
    // SAFETY: fstatfs fills the struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(pts.as_raw_fd(), &mut st) } != 0
        || st.f_type as i64 != DEVPTS_SUPER_MAGIC
    {
        return Err("the box's /dev/pts is not a devpts".into());
    }
    let ns = BoxNs {
        init_pid: pid,
        ipc,
        mnt,
        pid: pidns,
        pts,
        life: status,
    };
    if !ns.alive() {
        return Err("it died while starting".into());
    }
    log!(
        "box init ready (pid {pid}; started, ready at uptime{times} ms; now {} ms)",
        sys::uptime_ms()
    );
    Ok(ns)
}

// ---------------------------------------------------------------------------------------
// The box init itself.

/// Entry point of the re-executed agent as the box init. Never returns.
pub fn init_main() -> ! {
    // Its command name (started through /proc/self/exe, it would be "exe").
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"boxlite-init".as_ptr(), 0, 0, 0) };
    let start = sys::uptime_ms();
    match setup(Path::new(ROOT)) {
        Ok(()) => {
            let msg = format!("ok {start} {}\n", sys::uptime_ms());
            let _ = sys::write(1, msg.as_bytes());
        }
        Err(e) => {
            let msg = format!("error {}\n", e.replace('\n', " "));
            let _ = sys::write(1, msg.as_bytes());
            std::process::exit(1);
        }
    }
    reap_forever()
}

fn err(what: impl std::fmt::Display, e: io::Error) -> String {
    format!("{what}: {e}")
}

fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    mounts::mount(src, target, fstype, flags, data)
        .map_err(|e| err(format!("mounting {fstype} on {}", target.display()), e))
}

fn bind(src: &Path, target: &Path) -> Result<(), String> {
    mounts::mount(&src.to_string_lossy(), target, "", libc::MS_BIND, None).map_err(|e| {
        err(
            format!("binding {} on {}", src.display(), target.display()),
            e,
        )
    })
}

/// Changes the per-mount flags of the mount at `target` (a bind remount: the filesystem is
/// untouched).
fn remount(target: &Path, flags: libc::c_ulong) -> Result<(), String> {
    mounts::mount(
        "none",
        target,
        "",
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
    .map_err(|e| err(format!("remounting {}", target.display()), e))
}

/// `root/rel` as a directory to mount on: created when missing, refused when it is anything
/// but a directory (a symlink would lead the mount elsewhere).
fn mountpoint(root: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = root.join(rel);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => Ok(p),
        Ok(_) => Err(format!("{} is not a directory", p.display())),
        Err(_) => std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&p)
            .map(|()| p.clone())
            .map_err(|e| err(format!("creating {}", p.display()), e)),
    }
}

fn setup(root: &Path) -> Result<(), String> {
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // The agent's own pseudo filesystems are no part of the box's namespace.
    for p in ["/tmp", "/run", "/sys", "/dev", "/proc"] {
        let c = sys::cstr(p).map_err(|e| err(p, e))?;
        // SAFETY: a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    remount(root, libc::MS_NODEV)?;
    setup_dev(root)?;
    let proc = mountpoint(root, "proc")?;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", &proc, "proc", nosuid, None)?;
    let sys_dir = mountpoint(root, "sys")?;
    mount("sysfs", &sys_dir, "sysfs", nosuid | libc::MS_RDONLY, None)?;
    for rel in READONLY {
        let p = root.join(rel);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        bind(&p, &p)?;
        remount(&p, nosuid | libc::MS_RDONLY)?;
    }
    let null = root.join("dev/null");
    for rel in MASKED {
        let p = root.join(rel);
        match std::fs::symlink_metadata(&p) {
            Err(_) => continue,
            Ok(m) if m.is_dir() => mount("tmpfs", &p, "tmpfs", nosuid | libc::MS_RDONLY, None)?,
            Ok(_) => bind(&null, &p)?,
        }
    }
    // Enter the box: its root becomes the namespace's `/`.
    let c = sys::cpath(root).map_err(|e| err("root", e))?;
    // SAFETY: valid C strings; chdir/mount/chroot have no memory preconditions.
    unsafe {
        if libc::chdir(c.as_ptr()) != 0 {
            return Err(err("entering the box root", io::Error::last_os_error()));
        }
    }
    mount(".", Path::new("/"), "", libc::MS_MOVE, None)?;
    // SAFETY: as above.
    unsafe {
        if libc::chroot(c".".as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
            return Err(err("entering the box root", io::Error::last_os_error()));
        }
        libc::umask(0o022);
    }
    // Never the OOM killer's pick: the whole box would go with it.
    std::fs::write("/proc/self/oom_score_adj", "-1000")
        .map_err(|e| err("setting oom_score_adj", e))?;
    // Nothing of the box may trace it, read its /proc files or inherit its privileges.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // SAFETY: raw capability syscalls on this process.
    unsafe {
        sandbox::drop_bounding(0, sandbox::last_cap())
            .map_err(|e| err("dropping capabilities", e))?;
        sandbox::set_caps(0).map_err(|e| err("dropping capabilities", e))?;
    }
    Ok(())
}

fn setup_dev(root: &Path) -> Result<(), String> {
    let dev = mountpoint(root, "dev")?;
    mount(
        "tmpfs",
        &dev,
        "tmpfs",
        libc::MS_NOSUID,
        Some("mode=0755,size=65536k"),
    )?;
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        let c = sys::cpath(&p).map_err(|e| err(name, e))?;
        // SAFETY: a valid C string; umask is 0.
        if unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        } != 0
        {
            return Err(err(
                format!("creating {}", p.display()),
                io::Error::last_os_error(),
            ));
        }
        // Its own mount keeps `dev` when /dev becomes `nodev` below.
        bind(&p, &p)?;
    }
    remount(&dev, libc::MS_NOSUID | libc::MS_NODEV)?;
    let dir = |rel: &str, mode: u32| -> Result<PathBuf, String> {
        let p = dev.join(rel);
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&p)
            .map_err(|e| err(format!("creating {}", p.display()), e))?;
        Ok(p)
    };
    let pts = dir("pts", 0o755)?;
    mount(
        "devpts",
        &pts,
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dir("shm", 0o1777)?;
    mount(
        "shm",
        &shm,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    let mqueue = dir("mqueue", 0o755)?;
    if let Err(e) = mount(
        "mqueue",
        &mqueue,
        "mqueue",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    ) {
        // Optional: POSIX message queues work without the mount.
        let _ = std::fs::remove_dir(&mqueue);
        let _ = e;
    }
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link))
            .map_err(|e| err(format!("linking /dev/{link}"), e))?;
    }
    Ok(())
}

/// Reaps every child (the box's orphans) as they exit. SIGCHLD is blocked and waited for, so
/// no signal handler is involved; every other signal keeps its default action, which the
/// kernel never applies to a namespace's init for a signal sent from inside it.
fn reap_forever() -> ! {
    // SAFETY: plain signal-mask and wait calls on valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let mut status = 0;
            while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
            libc::sigwaitinfo(&set, std::ptr::null_mut());
        }
    }
}
