//! Thin wrappers over the raw calls the jail makes. Everything the child uses between clone
//! and exec is async-signal-safe: a syscall, no allocation, no locks; errors are errnos.

use std::ffi::{c_char, c_int, c_ulong, CStr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub(super) type Errno = i32;

#[cfg(target_env = "gnu")]
pub(super) type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub(super) type Resource = c_int;

pub(super) fn errno() -> Errno {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(rc: c_int) -> Result<c_int, Errno> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

fn check_long(rc: libc::c_long) -> Result<libc::c_long, Errno> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

/// A fork-like clone into new namespaces: returns 0 in the child, its pid in the parent.
///
/// # Safety
/// The caller is multithreaded: in the child, only async-signal-safe calls (no allocation,
/// no locks, no panics) until `execve` or `_exit`, and the child must never return into
/// code that would unwind or run destructors of shared state.
pub(super) unsafe fn clone_process(flags: c_int) -> Result<libc::pid_t, Errno> {
    // SAFETY: a NULL stack makes clone behave like fork (the child gets a copy of this
    // stack); the caller upholds the async-signal-safety contract in the child.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    check_long(rc).map(|pid| pid as libc::pid_t)
}

pub(super) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(super) fn close(fd: RawFd) {
    // SAFETY: closing a descriptor the child owns (its copy of a parent's descriptor).
    unsafe { libc::close(fd) };
}

pub(super) fn read_byte(fd: RawFd) -> Result<usize, Errno> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into a one-byte buffer.
        let rc = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        match rc {
            n if n >= 0 => return Ok(n as usize),
            _ if errno() == libc::EINTR => continue,
            _ => return Err(errno()),
        }
    }
}

pub(super) fn write_all(fd: RawFd, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writes from a live slice of the given length.
        let rc = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if rc < 0 && errno() == libc::EINTR {
            continue;
        }
        if rc <= 0 {
            return;
        }
        bytes = bytes.get(rc as usize..).unwrap_or(&[]);
    }
}

/// Duplicates `fd` to the lowest free descriptor >= `min`, close-on-exec.
pub(super) fn dup_above(fd: RawFd, min: RawFd) -> Result<RawFd, Errno> {
    // SAFETY: F_DUPFD_CLOEXEC only creates a descriptor.
    check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })
}

pub(super) fn dup2(fd: RawFd, target: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 replaces `target` (one of 0..=2) in this process only.
    check(unsafe { libc::dup2(fd, target) }).map(drop)
}

pub(super) fn set_cloexec(fd: RawFd, on: bool) -> Result<(), Errno> {
    let flags = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: changes one descriptor's flags.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

pub(super) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only queries.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Marks `first..=last` close-on-exec (Linux 5.11+).
pub(super) fn close_range_cloexec(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets descriptor flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            last,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    check_long(rc).map(drop)
}

pub(super) fn nofile_soft_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return 1024;
    }
    limit.rlim_cur
}

pub(super) fn hard_limit(resource: Resource) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(resource, &mut limit) } < 0 {
        return libc::RLIM_INFINITY;
    }
    limit.rlim_max
}

pub(super) fn setrlimit(resource: Resource, value: u64) -> Result<(), Errno> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct.
    check(unsafe { libc::setrlimit(resource, &limit) }).map(drop)
}

fn opt_ptr(s: Option<&CStr>) -> *const c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

pub(super) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: c_ulong,
    data: Option<&CStr>,
) -> Result<(), Errno> {
    // SAFETY: NUL-terminated strings or NULL, as mount(2) accepts.
    check(unsafe {
        libc::mount(
            opt_ptr(source),
            target.as_ptr(),
            opt_ptr(fstype),
            flags,
            opt_ptr(data).cast(),
        )
    })
    .map(drop)
}

pub(super) fn umount_detach(target: &CStr) -> Result<(), Errno> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub(super) fn mkdir(path: &CStr, mode: libc::mode_t) -> Result<(), Errno> {
    // SAFETY: a NUL-terminated path.
    match check(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Err(libc::EEXIST) | Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates an empty file to bind a file onto.
pub(super) fn touch(path: &CStr) -> Result<(), Errno> {
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: a NUL-terminated path; the descriptor is closed at once.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags, 0o644 as libc::c_uint) })?;
    close(fd);
    Ok(())
}

pub(super) fn symlink(target: &CStr, link: &CStr) -> Result<(), Errno> {
    // SAFETY: NUL-terminated paths.
    check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }).map(drop)
}

pub(super) fn chdir(path: &CStr) -> Result<(), Errno> {
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

pub(super) fn pivot_root(new_root: &CStr, put_old: &CStr) -> Result<(), Errno> {
    // SAFETY: NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check_long(rc).map(drop)
}

pub(super) fn sethostname(name: &CStr) -> Result<(), Errno> {
    let bytes = name.to_bytes();
    // SAFETY: a buffer of the given length.
    check(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) }).map(drop)
}

pub(super) fn setsid() -> Result<(), Errno> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

fn prctl(option: c_int, arg: c_ulong) -> Result<(), Errno> {
    // SAFETY: the prctl options used here take integer arguments only.
    check(unsafe { libc::prctl(option, arg, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong) }).map(drop)
}

pub(super) fn set_death_signal() -> Result<(), Errno> {
    prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as c_ulong)
}

pub(super) fn set_securebits(bits: c_int) -> Result<(), Errno> {
    prctl(libc::PR_SET_SECUREBITS, bits as c_ulong)
}

pub(super) fn drop_bounding(cap: u32) -> Result<(), Errno> {
    prctl(libc::PR_CAPBSET_DROP, c_ulong::from(cap))
}

pub(super) fn clear_ambient() -> Result<(), Errno> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        )
    })
    .map(drop)
}

pub(super) fn set_no_new_privs() -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            1 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
            0 as c_ulong,
        )
    })
    .map(drop)
}

pub(super) fn install_seccomp(filter: &[libc::sock_filter]) -> Result<(), Errno> {
    let prog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program; `prog` and `filter` outlive the call.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as c_ulong,
            &prog as *const libc::sock_fprog,
        )
    })
    .map(drop)
}

pub(super) fn setresgid(gid: libc::gid_t) -> Result<(), Errno> {
    // SAFETY: integer arguments; a raw syscall so only this thread's ids change (the child
    // has one thread, and glibc's wrapper would signal threads that exist only in the parent).
    check_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

pub(super) fn setresuid(uid: libc::uid_t) -> Result<(), Errno> {
    // SAFETY: as in setresgid.
    check_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

pub(super) fn setgroups(groups: &[libc::gid_t]) -> Result<(), Errno> {
    // SAFETY: as in setresgid; a slice of gids of the given length.
    check_long(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) })
        .map(drop)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Clears the effective, permitted and inheritable sets.
pub(super) fn clear_capabilities() -> Result<(), Errno> {
    let header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: version-3 capset reads one header and two data structs.
    check_long(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) }).map(drop)
}

/// Restores every signal to its default action (exec keeps ignored ones ignored).
pub(super) fn reset_signal_dispositions() {
    for signal in 1..65 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask; failures (signals libc
        // reserves) are harmless.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

pub(super) fn set_signal_mask(block_all: bool) {
    // SAFETY: sigset operations on a local set, then this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if block_all {
            libc::sigfillset(&mut set);
        } else {
            libc::sigemptyset(&mut set);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Whether every write end of the pipe `fd` reads from is closed.
pub(super) fn pipe_hung_up(fd: RawFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, no timeout.
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    rc > 0 && pollfd.revents & libc::POLLHUP != 0
}

pub(super) fn execve(program: &CStr, argv: &[*const c_char], envp: &[*const c_char]) -> Errno {
    // SAFETY: NULL-terminated arrays of pointers into CStrings the plan owns.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    errno()
}

pub(super) fn exit(code: c_int) -> ! {
    // SAFETY: _exit ends the process at once, without running the parent's atexit handlers.
    unsafe { libc::_exit(code) }
}

pub(super) fn kill(pid: libc::pid_t, signal: c_int) -> std::io::Result<()> {
    // SAFETY: sends a signal; the caller guarantees `pid` is its unreaped child.
    if unsafe { libc::kill(pid, signal) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps `pid`: Ok(None) when it is still running (with `nohang`).
pub(super) fn waitpid(pid: libc::pid_t, nohang: bool) -> std::io::Result<Option<c_int>> {
    let mut status = 0;
    loop {
        let flags = if nohang { libc::WNOHANG } else { 0 };
        // SAFETY: waitpid writes the status into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc == pid {
            return Ok(Some(status));
        }
        if rc == 0 {
            return Ok(None);
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

/// Blocks until `pid` has exited, without reaping it.
pub(super) fn wait_exited(pid: libc::pid_t) -> std::io::Result<()> {
    loop {
        // SAFETY: waitid fills a local siginfo.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
}

pub(super) fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

pub(super) fn getegid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::getegid() }
}

/// The mount flags (`ST_*` mapped to `MS_*`) of the mount `path` lives on.
pub(super) fn mount_flags(path: &CStr) -> std::io::Result<c_ulong> {
    // SAFETY: statvfs fills a zeroed struct from a NUL-terminated path.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        st
    };
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}
