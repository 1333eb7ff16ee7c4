//! The Linux jail: plan in the parent, clone into new namespaces, set up in the child, exec.

mod binds;
mod cgroup;
mod child;
mod plan;
mod seccomp;
mod sys;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::{Capabilities, CgroupOutcome, JailError, JailSpec, JailStdio, Stdio};
pub(crate) use binds::{program_binds, qemu_binds};
use child::{ChildFds, Failure, Stage};
use plan::Plan;

type Job = Box<dyn FnOnce() + Send>;

/// Clones happen on one long-lived thread with every signal blocked: the kernel sends the
/// parent-death signal when the *thread* that cloned exits, and a blocked mask means no
/// handler of the caller's runs in the child before it resets them.
fn on_spawner<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    thread_local! {
        static IS_SPAWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    // A job may probe, which clones too: run it in place.
    if IS_SPAWNER.with(|is| is.get()) {
        return job();
    }
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("boxlite-jail".into())
            .spawn(move || {
                IS_SPAWNER.with(|is| is.set(true));
                sys::set_signal_mask(true);
                for job in rx {
                    job();
                }
            })
            .expect("starting the boxlite-jail spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    // A panicking job must not end the thread: its exit would SIGKILL every jail.
    let job: Job = Box::new(move || {
        let _ = reply_tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)));
    });
    sender
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send(job)
        .expect("the boxlite-jail spawner thread never exits");
    match reply_rx
        .recv()
        .expect("the boxlite-jail spawner thread answers every job")
    {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A classic-BPF program ready to install.
pub(crate) type Filter = Vec<libc::sock_filter>;

pub(crate) fn no_setid_filter() -> Result<Filter, JailError> {
    seccomp::no_setid_filter().map_err(JailError::InvalidSpec)
}

pub(crate) fn install_filter(filter: &Filter) -> io::Result<()> {
    sys::install_seccomp(filter).map_err(io::Error::from_raw_os_error)
}

pub(crate) fn caller_is_root() -> bool {
    sys::geteuid() == 0
}

pub(crate) fn spawn(
    spec: &JailSpec,
    program: &Path,
    args: &[OsString],
    stdio: JailStdio,
) -> Result<JailedChild, JailError> {
    let spec = spec.clone();
    let program = program.to_path_buf();
    let args = args.to_vec();
    on_spawner(move || spawn_on_this_thread(&spec, &program, &args, stdio))
}

/// Parent ends of piped stdio, child ends of everything.
struct StdioFds {
    parent: [Option<File>; 3],
    child: [Option<OwnedFd>; 3],
}

fn open_stdio(stdio: JailStdio) -> Result<StdioFds, JailError> {
    let mut fds = StdioFds {
        parent: [None, None, None],
        child: [None, None, None],
    };
    let streams = [stdio.stdin, stdio.stdout, stdio.stderr];
    for (index, stream) in streams.into_iter().enumerate() {
        fds.child[index] = match stream {
            Stdio::Inherit => None,
            Stdio::Fd(fd) => Some(fd),
            Stdio::Null => Some(
                File::options()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| JailError::io("opening /dev/null", e))?
                    .into(),
            ),
            Stdio::Piped => {
                let (read, write) = sys::pipe().map_err(|e| JailError::io("creating a pipe", e))?;
                let (parent, child) = if index == 0 {
                    (write, read)
                } else {
                    (read, write)
                };
                fds.parent[index] = Some(File::from(parent));
                Some(child)
            }
        };
    }
    Ok(fds)
}

fn spawn_on_this_thread(
    spec: &JailSpec,
    program: &Path,
    args: &[OsString],
    stdio: JailStdio,
) -> Result<JailedChild, JailError> {
    let root_caller = caller_is_root();
    let userns = plan::use_user_namespace(spec, root_caller)?;
    if userns {
        if let Err(reason) = user_namespaces_usable() {
            return Err(userns_error(reason.clone()));
        }
    }
    let plan = plan::build(spec, program, args)?;
    let mut stdio = open_stdio(stdio)?;
    let (sync_read, sync_write) = sys::pipe().map_err(|e| JailError::io("creating a pipe", e))?;
    let (error_read, error_write) = sys::pipe().map_err(|e| JailError::io("creating a pipe", e))?;
    let mut cgroup = match &spec.cgroup {
        None => CgroupOutcome::NotRequested,
        Some(limits) => match cgroup::create(limits) {
            Ok(dir) => CgroupOutcome::Applied(dir),
            Err(reason) => CgroupOutcome::Skipped(reason),
        },
    };
    let raw = |fd: &Option<OwnedFd>| fd.as_ref().map_or(-1, |fd| fd.as_raw_fd());
    let fds = ChildFds {
        sync_read: sync_read.as_raw_fd(),
        sync_write: sync_write.as_raw_fd(),
        error_write: error_write.as_raw_fd(),
        stdio: [
            raw(&stdio.child[0]),
            raw(&stdio.child[1]),
            raw(&stdio.child[2]),
        ],
    };

    // SAFETY: in the child, child::run only makes raw syscalls on what `plan` and `fds`
    // prepared, and ends in execve or _exit.
    let pid = match unsafe { sys::clone_process(plan.clone_flags) } {
        Ok(0) => child::run(&plan, &fds),
        Ok(pid) => pid,
        Err(errno) => {
            if let CgroupOutcome::Applied(dir) = &cgroup {
                cgroup::remove(dir);
            }
            return Err(clone_error(errno, userns));
        }
    };
    drop((sync_read, error_write, std::mem::take(&mut stdio.child)));

    let released = release(pid, &plan, &mut cgroup, sync_write, error_read);
    if let Err(error) = released {
        // Kill and reap the half-built jail, then drop its cgroup.
        let _ = sys::kill(pid, libc::SIGKILL);
        let _ = sys::waitpid(pid, false);
        if let CgroupOutcome::Applied(dir) = &cgroup {
            cgroup::remove(dir);
        }
        return Err(match error {
            Released::Error(error) => error,
            Released::Failed(failure) => failure_error(failure, &plan, userns),
        });
    }
    Ok(JailedChild {
        pid,
        reaped: Mutex::new(None),
        cgroup,
        user_namespace: userns,
        kill_on_drop: spec.die_with_parent,
        stdin: stdio.parent[0].take(),
        stdout: stdio.parent[1].take(),
        stderr: stdio.parent[2].take(),
    })
}

enum Released {
    Error(JailError),
    Failed(Failure),
}

impl From<JailError> for Released {
    fn from(error: JailError) -> Self {
        Released::Error(error)
    }
}

/// The parent's half of the setup: id maps, cgroup, then let the child go and wait for its
/// exec (EOF on the close-on-exec error pipe) or its failure record.
fn release(
    pid: libc::pid_t,
    plan: &Plan,
    cgroup: &mut CgroupOutcome,
    sync_write: OwnedFd,
    error_read: OwnedFd,
) -> Result<(), Released> {
    if let Some(maps) = &plan.maps {
        write_maps(pid, maps)?;
    }
    if let CgroupOutcome::Applied(dir) = &*cgroup {
        if let Err(reason) = cgroup::attach(dir, pid) {
            cgroup::remove(dir);
            *cgroup = CgroupOutcome::Skipped(reason);
        }
    }
    // Held until the result is in: the child checks it to learn whether we died.
    let go = File::from(sync_write);
    (&go)
        .write_all(&[1])
        .map_err(|e| JailError::io("releasing the jailed child", e))?;
    let mut record = [0u8; child::RECORD_LEN];
    let read = read_full(File::from(error_read), &mut record)
        .map_err(|e| JailError::io("reading the jail's setup result", e))?;
    drop(go);
    if read == 0 {
        return Ok(());
    }
    match Failure::decode(&record) {
        Some(failure) if read == child::RECORD_LEN => Err(Released::Failed(failure)),
        _ => Err(JailError::io("jail setup", io::Error::other("malformed failure record")).into()),
    }
}

fn read_full(mut file: File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn write_maps(pid: libc::pid_t, maps: &plan::Maps) -> Result<(), JailError> {
    let write = |file: &str, content: &str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, content).map_err(|e| JailError::Setup {
            step: format!("writing {content:?} to {path}"),
            hint: "the caller needs CAP_SETUID/CAP_SETGID to map ids other than its own".into(),
            source: e,
        })
    };
    if maps.deny_setgroups {
        write("setgroups", "deny")?;
    }
    write("uid_map", &maps.uid_map)?;
    write("gid_map", &maps.gid_map)
}

fn userns_hint() -> String {
    let mut hints = vec![
        "enable them: sysctl -w user.max_user_namespaces=15000".to_string(),
        "sysctl -w kernel.unprivileged_userns_clone=1 (Debian/Ubuntu kernels)".to_string(),
        "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile \
         allowing userns (Ubuntu 23.10+)"
            .to_string(),
    ];
    if caller_is_root() {
        hints.push("or, as root, set user_namespace: UserNamespace::Disable".into());
    }
    hints.join("; ")
}

fn userns_error(reason: String) -> JailError {
    JailError::UserNamespaces {
        reason,
        hint: userns_hint(),
    }
}

fn clone_error(errno: i32, userns: bool) -> JailError {
    let source = io::Error::from_raw_os_error(errno);
    match errno {
        libc::EPERM | libc::ENOSPC | libc::EUSERS | libc::EINVAL if userns => {
            userns_error(format!("clone(CLONE_NEWUSER) failed: {source}"))
        }
        libc::EPERM => JailError::Setup {
            step: "creating namespaces".into(),
            hint: "without a user namespace this needs CAP_SYS_ADMIN (root in a container \
                   may lack it): set user_namespace: UserNamespace::Require"
                .into(),
            source,
        },
        _ => JailError::io("cloning the jailed child", source),
    }
}

fn failure_error(failure: Failure, plan: &Plan, userns: bool) -> JailError {
    let source = io::Error::from_raw_os_error(failure.errno);
    let errno = failure.errno;
    let (step, hint) = match failure.stage {
        Stage::Exec => {
            let hint = match errno {
                libc::ENOENT => {
                    "the program or its ELF interpreter/libraries are not bound: \
                                 add program_binds() of it to ro_binds"
                }
                libc::EACCES => {
                    "the jail's uid cannot execute it, or it sits on a noexec \
                                 (read-write) bind"
                }
                libc::EAGAIN => "RLIMIT_NPROC is exhausted for the jail's uid",
                _ => "check the program and its binds",
            };
            return JailError::Exec {
                program: plan.program_path.clone(),
                hint: hint.into(),
                source,
            };
        }
        Stage::Op => {
            let name = plan
                .op_names
                .get(failure.index as usize)
                .cloned()
                .unwrap_or_else(|| format!("step {}", failure.index));
            let hint = if name.starts_with("mounting /proc") {
                "mounting a fresh /proc needs a fully visible host /proc (no masked entries, \
                 as in some containers); set mount_proc: false"
            } else if errno == libc::EPERM && userns {
                "the kernel or an LSM forbids mounts in user namespaces \
                 (kernel.apparmor_restrict_unprivileged_userns?)"
            } else if (errno == libc::EACCES || errno == libc::ENOENT) && plan.switch_ids_early {
                "in a user namespace the tree is built as the jail's uid: every bind source \
                 and its parent directories must be reachable by it"
            } else if errno == libc::EACCES || errno == libc::ENOENT {
                "the path must exist and be reachable by the caller"
            } else if errno == libc::EINVAL {
                "a non-recursive bind of a directory with mounts below it is refused in a user \
                 namespace: bind the sub-paths instead"
            } else {
                "check the spec's paths"
            };
            (name, hint)
        }
        Stage::DeathSignal => ("arming the parent-death signal".into(), "unexpected"),
        Stage::Stdio => ("setting up stdio".into(), "check the Stdio descriptors"),
        Stage::CloseFds => ("closing inherited descriptors".into(), "unexpected"),
        Stage::ParentGone => ("waiting for the parent".into(), "the parent exited"),
        Stage::MakePrivate => (
            "making the mount namespace private".into(),
            "mounts are forbidden here (an LSM or a seccomp filter on the caller?)",
        ),
        Stage::PivotRoot => (
            "pivot_root into the jail".into(),
            "the jail root must be a directory on a normal file system",
        ),
        Stage::Hostname => ("setting the hostname".into(), "check JailSpec::hostname"),
        Stage::Session => ("setsid".into(), "unexpected"),
        Stage::Rlimit => (
            format!("setting rlimit #{}", failure.index),
            "lower the limit: raising a hard limit needs CAP_SYS_RESOURCE",
        ),
        Stage::Securebits => ("locking securebits".into(), "unexpected"),
        Stage::Groups => (
            "setting supplementary groups".into(),
            "every group must be a valid gid",
        ),
        Stage::SetGid => (
            format!("switching to gid {}", plan.gid),
            "the gid must be mapped",
        ),
        Stage::SetUid => (
            format!("switching to uid {}", plan.uid),
            "the uid must be mapped",
        ),
        Stage::Capabilities => ("dropping capabilities".into(), "unexpected"),
        Stage::NoNewPrivs => ("setting no_new_privs".into(), "unexpected"),
        Stage::Seccomp => (
            "installing the seccomp filter".into(),
            "the kernel needs CONFIG_SECCOMP_FILTER; or set seccomp: Seccomp::Disabled",
        ),
    };
    JailError::Setup {
        step,
        hint: hint.into(),
        source,
    }
}

/// A jailed program: PID 1 of its own PID namespace, our direct child. Killing it takes
/// down everything in the jail (the kernel kills a PID namespace with its init).
#[derive(Debug)]
pub struct JailedChild {
    pid: libc::pid_t,
    /// Set once reaped, under the lock, so a kill never hits a recycled pid.
    reaped: Mutex<Option<ExitStatus>>,
    cgroup: CgroupOutcome,
    user_namespace: bool,
    kill_on_drop: bool,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

impl JailedChild {
    /// The program's pid as the host sees it.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// SIGKILLs the jail (Ok if it already exited).
    pub fn kill(&self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Sends `signal`. As PID 1 of its namespace the program receives only signals it
    /// handles (QEMU handles SIGTERM), and SIGKILL.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if reaped.is_some() {
            return Ok(());
        }
        sys::kill(self.pid, signal)
    }

    /// Waits for the program to exit and reaps it (callable from any thread, any number of
    /// times).
    pub fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            match sys::wait_exited(self.pid) {
                Ok(()) => {}
                // Another thread reaped it between our check and the wait.
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {}
                Err(e) => return Err(e),
            }
        }
    }

    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        let mut reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = *reaped {
            return Ok(Some(status));
        }
        match sys::waitpid(self.pid, true) {
            Ok(Some(raw)) => {
                let status = ExitStatus::from_raw(raw);
                *reaped = Some(status);
                if let CgroupOutcome::Applied(dir) = &self.cgroup {
                    cgroup::remove(dir);
                }
                Ok(Some(status))
            }
            Ok(None) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Err(io::Error::other(format!(
                "jailed child {} was reaped by someone else (a waitpid(-1) in this process?)",
                self.pid
            ))),
            Err(e) => Err(e),
        }
    }

    /// Whether [`crate::JailSpec::cgroup`] was applied, or why not (log it).
    pub fn cgroup(&self) -> &CgroupOutcome {
        &self.cgroup
    }

    /// Whether the jail runs in its own user namespace.
    pub fn user_namespace(&self) -> bool {
        self.user_namespace
    }
}

impl Drop for JailedChild {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        if self.kill_on_drop {
            let _ = self.kill();
            let _ = self.wait();
        } else {
            // Detached: reap it whenever it ends, so it never lingers as a zombie.
            let pid = self.pid;
            let cgroup = self.cgroup.clone();
            let _ = std::thread::Builder::new()
                .name("boxlite-jail-reaper".into())
                .spawn(move || {
                    let _ = sys::waitpid(pid, false);
                    if let CgroupOutcome::Applied(dir) = &cgroup {
                        cgroup::remove(dir);
                    }
                });
        }
    }
}

/// Runs `body` in a throwaway child cloned with `flags` and returns its exit code.
fn trial(flags: libc::c_int, body: fn() -> i32) -> Result<i32, i32> {
    on_spawner(move || {
        // SAFETY: the child runs `body`, which only makes raw syscalls, then _exits.
        match unsafe { sys::clone_process(flags) } {
            Ok(0) => sys::exit(body()),
            Ok(pid) => match sys::waitpid(pid, false) {
                Ok(Some(status)) if libc::WIFEXITED(status) => Ok(libc::WEXITSTATUS(status)),
                _ => Ok(255),
            },
            Err(errno) => Err(errno),
        }
    })
}

fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{name}"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn probe_user_namespaces() -> Result<(), String> {
    if sysctl("user/max_user_namespaces").as_deref() == Some("0") {
        return Err("user.max_user_namespaces is 0".into());
    }
    if !caller_is_root() && sysctl("kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Err("kernel.unprivileged_userns_clone is 0".into());
    }
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    fn mount_tmpfs() -> i32 {
        if sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).is_err() {
            return 10;
        }
        if sys::mount(Some(c"tmpfs"), c"/", Some(c"tmpfs"), 0, None).is_err() {
            return 11;
        }
        0
    }
    let restricted = sysctl("kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1");
    match trial(flags, mount_tmpfs) {
        Ok(0) => Ok(()),
        Ok(code) => Err(format!(
            "a new user namespace cannot mount (step {code}){}",
            if restricted {
                ": kernel.apparmor_restrict_unprivileged_userns is 1"
            } else {
                ""
            }
        )),
        Err(errno) => Err(format!(
            "clone(CLONE_NEWUSER) failed: {}{}",
            io::Error::from_raw_os_error(errno),
            if restricted {
                " (kernel.apparmor_restrict_unprivileged_userns is 1)"
            } else {
                ""
            }
        )),
    }
}

/// Cached: whether user namespaces (with mounts in them) work for this process.
pub(super) fn user_namespaces_usable() -> &'static Result<(), String> {
    static USABLE: OnceLock<Result<(), String>> = OnceLock::new();
    USABLE.get_or_init(probe_user_namespaces)
}

fn probe_seccomp() -> Result<(), String> {
    fn install() -> i32 {
        if sys::set_no_new_privs().is_err() {
            return 10;
        }
        // Allocated before the clone: the child only reads it.
        match ALLOW_ALL.get() {
            Some(filter) if sys::install_seccomp(filter).is_ok() => 0,
            _ => 11,
        }
    }
    ALLOW_ALL.get_or_init(seccomp::allow_all);
    match trial(0, install) {
        Ok(0) => Ok(()),
        Ok(code) => Err(format!(
            "installing a seccomp filter failed (step {code}): the kernel needs \
             CONFIG_SECCOMP_FILTER"
        )),
        Err(errno) => Err(format!(
            "cannot fork a probe: {}",
            io::Error::from_raw_os_error(errno)
        )),
    }
}

static ALLOW_ALL: OnceLock<Vec<libc::sock_filter>> = OnceLock::new();

pub(crate) fn probe() -> Capabilities {
    Capabilities {
        root: caller_is_root(),
        user_namespaces: probe_user_namespaces(),
        seccomp: probe_seccomp(),
        cgroup: cgroup::probe(),
    }
}

// The wiring shares a child between a waiter thread and whoever kills it.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<JailedChild>();
};
