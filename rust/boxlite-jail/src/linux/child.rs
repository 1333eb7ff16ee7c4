//! The child between clone and exec. The caller is multithreaded, so only raw syscalls on data
//! the [`Plan`] prepared: no allocation, no locks, no panics. A failure is reported to the
//! parent as a fixed-size record on the error pipe.

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::plan::{Op, Plan};
use super::sys::{self, Errno};

/// Where the child failed (the parent turns it into a [`crate::JailError`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum Stage {
    DeathSignal = 1,
    Stdio,
    CloseFds,
    ParentGone,
    MakePrivate,
    Op,
    PivotRoot,
    Hostname,
    Session,
    Rlimit,
    Securebits,
    Groups,
    SetGid,
    SetUid,
    Capabilities,
    NoNewPrivs,
    Seccomp,
    Exec,
}

impl Stage {
    const ALL: [Stage; 18] = [
        Stage::DeathSignal,
        Stage::Stdio,
        Stage::CloseFds,
        Stage::ParentGone,
        Stage::MakePrivate,
        Stage::Op,
        Stage::PivotRoot,
        Stage::Hostname,
        Stage::Session,
        Stage::Rlimit,
        Stage::Securebits,
        Stage::Groups,
        Stage::SetGid,
        Stage::SetUid,
        Stage::Capabilities,
        Stage::NoNewPrivs,
        Stage::Seccomp,
        Stage::Exec,
    ];

    fn from_u32(value: u32) -> Option<Stage> {
        Stage::ALL.iter().copied().find(|s| *s as u32 == value)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Failure {
    pub stage: Stage,
    pub index: u32,
    pub errno: Errno,
}

pub(super) const RECORD_LEN: usize = 12;

impl Failure {
    fn at(stage: Stage) -> impl Fn(Errno) -> Failure {
        move |errno| Failure {
            stage,
            index: 0,
            errno,
        }
    }

    fn encode(self) -> [u8; RECORD_LEN] {
        let mut record = [0u8; RECORD_LEN];
        let (stage, rest) = record.split_at_mut(4);
        let (index, errno) = rest.split_at_mut(4);
        stage.copy_from_slice(&(self.stage as u32).to_ne_bytes());
        index.copy_from_slice(&self.index.to_ne_bytes());
        errno.copy_from_slice(&self.errno.to_ne_bytes());
        record
    }

    pub(super) fn decode(record: &[u8; RECORD_LEN]) -> Option<Failure> {
        let word = |i: usize| {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(&record[i..i + 4]);
            bytes
        };
        Some(Failure {
            stage: Stage::from_u32(u32::from_ne_bytes(word(0)))?,
            index: u32::from_ne_bytes(word(4)),
            errno: i32::from_ne_bytes(word(8)),
        })
    }
}

/// The child's descriptors (raw: the parent owns the `OwnedFd`s).
pub(super) struct ChildFds {
    pub sync_read: RawFd,
    pub sync_write: RawFd,
    pub error_write: RawFd,
    /// The sources for 0, 1, 2; -1 inherits.
    pub stdio: [RawFd; 3],
}

const SECUREBITS: libc::c_int = libc::SECBIT_NOROOT
    | libc::SECBIT_NOROOT_LOCKED
    | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
    | libc::SECBIT_KEEP_CAPS_LOCKED
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;

/// Runs in the cloned child: sets up the jail and executes the program, or reports why not.
pub(super) fn run(plan: &Plan, fds: &ChildFds) -> ! {
    let failure = match setup(plan, fds) {
        Ok(()) => Failure {
            stage: Stage::Exec,
            index: 0,
            errno: sys::execve(&plan.program, &plan.argv, &plan.envp),
        },
        Err(failure) => failure,
    };
    sys::write_all(fds.error_write, &failure.encode());
    sys::exit(126)
}

fn setup(plan: &Plan, fds: &ChildFds) -> Result<(), Failure> {
    sys::close(fds.sync_write);
    if plan.die_with_parent {
        sys::set_death_signal().map_err(Failure::at(Stage::DeathSignal))?;
    }
    stdio(&fds.stdio).map_err(Failure::at(Stage::Stdio))?;
    close_other_fds(&plan.keep_fds).map_err(Failure::at(Stage::CloseFds))?;

    // The parent writes our id maps and cgroup, then one byte; EOF means it died.
    match sys::read_byte(fds.sync_read) {
        Ok(1) => {}
        Ok(_) => return Err(Failure::at(Stage::ParentGone)(0)),
        Err(errno) => return Err(Failure::at(Stage::ParentGone)(errno)),
    }

    if plan.switch_ids_early {
        sys::setresgid(plan.gid).map_err(Failure::at(Stage::SetGid))?;
        sys::setresuid(plan.uid).map_err(Failure::at(Stage::SetUid))?;
    }
    // Nothing we mount may propagate back to the host.
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(Failure::at(Stage::MakePrivate))?;
    for (index, op) in plan.ops.iter().enumerate() {
        apply(op).map_err(|errno| Failure {
            stage: Stage::Op,
            index: index as u32,
            errno,
        })?;
    }
    pivot(&plan.root).map_err(Failure::at(Stage::PivotRoot))?;
    sys::sethostname(&plan.hostname).map_err(Failure::at(Stage::Hostname))?;
    // Its own session: no controlling terminal to inject input into (TIOCSTI).
    sys::setsid().map_err(Failure::at(Stage::Session))?;
    for (index, (resource, value)) in plan.rlimits.iter().enumerate() {
        sys::setrlimit(*resource, *value).map_err(|errno| Failure {
            stage: Stage::Rlimit,
            index: index as u32,
            errno,
        })?;
    }
    drop_privileges(plan)?;
    sys::set_no_new_privs().map_err(Failure::at(Stage::NoNewPrivs))?;
    if let Some(filter) = &plan.seccomp {
        sys::install_seccomp(filter).map_err(Failure::at(Stage::Seccomp))?;
    }
    if plan.die_with_parent {
        // Changing ids cleared the death signal: arm it again, then make sure the parent
        // did not die before (it holds the sync pipe's write end until we exec).
        sys::set_death_signal().map_err(Failure::at(Stage::DeathSignal))?;
        if sys::pipe_hung_up(fds.sync_read) {
            return Err(Failure::at(Stage::ParentGone)(0));
        }
    }
    sys::reset_signal_dispositions();
    sys::set_signal_mask(false);
    Ok(())
}

/// Moves the stdio sources onto 0, 1, 2 (via fresh copies, so sources among 0..=2 survive).
fn stdio(sources: &[RawFd; 3]) -> Result<(), Errno> {
    let mut copies = [-1; 3];
    for (copy, source) in copies.iter_mut().zip(sources) {
        if *source >= 0 {
            *copy = sys::dup_above(*source, 3)?;
        }
    }
    for (target, copy) in (0..).zip(copies) {
        if copy >= 0 {
            sys::dup2(copy, target)?;
            sys::close(copy);
        }
    }
    Ok(())
}

/// Marks every descriptor >= 3 close-on-exec except the kept ones.
fn close_other_fds(keep: &[RawFd]) -> Result<(), Errno> {
    let mut next: u32 = 3;
    for fd in keep {
        let fd = *fd as u32;
        if fd > next {
            mark_cloexec(next, fd - 1)?;
        }
        sys::set_cloexec(fd as RawFd, false)?;
        next = fd + 1;
    }
    mark_cloexec(next, u32::MAX)
}

fn mark_cloexec(first: u32, last: u32) -> Result<(), Errno> {
    match sys::close_range_cloexec(first, last) {
        Ok(()) => Ok(()),
        // Before Linux 5.11: one descriptor at a time, up to the soft limit.
        Err(libc::ENOSYS) | Err(libc::EINVAL) => {
            let end = sys::nofile_soft_limit()
                .min(u64::from(last) + 1)
                .min(1 << 20) as u32;
            for fd in first..end {
                match sys::set_cloexec(fd as RawFd, true) {
                    Ok(()) | Err(libc::EBADF) => {}
                    Err(errno) => return Err(errno),
                }
            }
            Ok(())
        }
        Err(errno) => Err(errno),
    }
}

fn apply(op: &Op) -> Result<(), Errno> {
    match op {
        Op::Mkdir(path) => sys::mkdir(path, 0o755),
        Op::Touch(path) => sys::touch(path),
        Op::Tmpfs {
            target,
            flags,
            data,
        } => sys::mount(Some(c"tmpfs"), target, Some(c"tmpfs"), *flags, Some(data)),
        Op::Bind {
            source,
            target,
            remount,
        } => {
            sys::mount(Some(source), target, None, libc::MS_BIND, None)?;
            sys::mount(None, target, None, *remount, None)
        }
        Op::Proc(target) => {
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            // subset=pid (Linux 5.8+) leaves out /proc/sys, /proc/kcore and the like.
            match sys::mount(
                Some(c"proc"),
                target,
                Some(c"proc"),
                flags,
                Some(c"subset=pid"),
            ) {
                Err(libc::EINVAL) => sys::mount(Some(c"proc"), target, Some(c"proc"), flags, None),
                other => other,
            }
        }
        Op::Symlink { target, link } => sys::symlink(target, link),
        Op::Remount { target, flags } => sys::mount(None, target, None, *flags, None),
    }
}

/// Makes `root` the root and detaches the old one (stacked on it by pivot_root(".", ".")).
fn pivot(root: &CStr) -> Result<(), Errno> {
    sys::chdir(root)?;
    sys::pivot_root(c".", c".")?;
    sys::umount_detach(c".")?;
    sys::chdir(c"/")
}

fn drop_privileges(plan: &Plan) -> Result<(), Failure> {
    // Locked: no capabilities from uid 0, no keeping them across setuid, no ambient ones.
    sys::set_securebits(SECUREBITS).map_err(Failure::at(Stage::Securebits))?;
    for cap in 0..=plan.last_cap {
        match sys::drop_bounding(cap) {
            Ok(()) | Err(libc::EINVAL) => {}
            Err(errno) => {
                return Err(Failure {
                    stage: Stage::Capabilities,
                    index: cap,
                    errno,
                })
            }
        }
    }
    if plan.set_groups {
        sys::setgroups(&plan.groups).map_err(Failure::at(Stage::Groups))?;
    }
    sys::setresgid(plan.gid).map_err(Failure::at(Stage::SetGid))?;
    sys::setresuid(plan.uid).map_err(Failure::at(Stage::SetUid))?;
    // In a user namespace setuid does not clear them: do it explicitly everywhere.
    sys::clear_capabilities().map_err(Failure::at(Stage::Capabilities))?;
    sys::clear_ambient().map_err(Failure::at(Stage::Capabilities))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_records_round_trip() {
        for stage in Stage::ALL {
            let failure = Failure {
                stage,
                index: 7,
                errno: libc::EACCES,
            };
            assert_eq!(Failure::decode(&failure.encode()), Some(failure));
        }
    }
}
