//! What confines a user command besides the box's namespaces: its capabilities and its seccomp
//! filter, compiled once from the host's [`GuestSandbox`] (or its default) and applied by every
//! exec's child right before `execve` (see `exec.rs`).
//!
//! Capabilities follow Docker: the bounding set is cut down to the box's set, so neither a
//! setuid-root program nor a file capability can regain what was dropped; a command running as
//! uid 0 gets the set as permitted and effective; the inheritable and ambient sets stay empty
//! (runc since CVE-2022-24769). `no_new_privs` is not set, so `sudo` and friends keep working.

use std::io;
use std::sync::Arc;

use boxlite_proto::message::GuestSandbox;

use crate::seccomp;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The compiled confinement of user commands.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Bit n: capability n is kept.
    pub caps: u64,
    /// The highest capability this kernel knows (bounding-set drops go up to it).
    pub last_cap: u32,
    pub filter: Option<Arc<[libc::sock_filter]>>,
    /// `(resource, limit)` pairs set (soft and hard) before the command executes.
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// What it was compiled from: a `Configure` asking for the same keeps it (compiling the
    /// seccomp filter costs a box started from a template ~10 ms under TCG).
    pub sandbox: GuestSandbox,
}

impl Policy {
    /// Compiles `sandbox`; an unknown capability name is an `InvalidInput` error naming it.
    pub fn compile(sandbox: &GuestSandbox, last_cap: u32) -> io::Result<Self> {
        let mut caps = 0u64;
        for name in &sandbox.capabilities {
            if name.trim().eq_ignore_ascii_case("ALL") {
                caps = u64::MAX;
                continue;
            }
            let n = GuestSandbox::capability_number(name).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown capability {name:?}"),
                )
            })?;
            caps |= 1 << n;
        }
        // capset refuses bits the kernel does not know.
        caps &= known_caps(last_cap);
        let filter = sandbox
            .seccomp
            .then(|| Arc::from(seccomp::program(caps).into_boxed_slice()));
        let l = &sandbox.limits;
        let rlimits = [
            (libc::RLIMIT_NOFILE, l.open_files),
            (libc::RLIMIT_FSIZE, l.file_size),
            (libc::RLIMIT_NPROC, l.processes),
            (libc::RLIMIT_AS, l.memory),
            (libc::RLIMIT_CPU, l.cpu_time),
        ]
        .into_iter()
        .filter_map(|(resource, limit)| limit.map(|v| (resource, v)))
        .collect();
        Ok(Self {
            caps,
            last_cap,
            filter,
            rlimits,
            sandbox: sandbox.clone(),
        })
    }

    /// `sandbox`'s policy: this one when it was compiled from the same.
    pub fn recompile(&self, sandbox: &GuestSandbox) -> io::Result<Self> {
        if *sandbox == self.sandbox {
            return Ok(self.clone());
        }
        Self::compile(sandbox, self.last_cap)
    }

    /// Docker's defaults.
    pub fn default_for(last_cap: u32) -> Self {
        #[allow(clippy::expect_used)]
        Self::compile(&GuestSandbox::default(), last_cap)
            .expect("the default capability names are known")
    }
}

fn known_caps(last_cap: u32) -> u64 {
    if last_cap >= 63 {
        u64::MAX
    } else {
        (1u64 << (last_cap + 1)) - 1
    }
}

/// The highest capability number of the running kernel (`/proc/sys/kernel/cap_last_cap`).
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets each `(resource, limit)` as both soft and hard limit. Async-signal-safe.
///
/// # Safety
/// Plain syscalls; marked unsafe as it is meant for the raw child.
pub unsafe fn set_limits(limits: &[(libc::__rlimit_resource_t, u64)]) -> io::Result<()> {
    for &(resource, limit) in limits {
        let value = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: a valid rlimit for the call.
        if unsafe { libc::setrlimit(resource, &value) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Cuts the bounding set down to `caps` and empties the ambient set. Needs `CAP_SETPCAP`.
/// Async-signal-safe (raw syscalls only), for the exec child.
///
/// # Safety
/// Plain syscalls; safe to call anywhere, marked unsafe as it is meant for the raw child.
pub unsafe fn drop_bounding(caps: u64, last_cap: u32) -> io::Result<()> {
    for cap in 0..=last_cap.min(63) {
        if caps & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Sets the permitted and effective sets to `caps` and empties the inheritable set (a raw
/// `capset`, for the exec child).
///
/// # Safety
/// As for [`drop_bounding`].
pub unsafe fn set_caps(caps: u64) -> io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |shift: u32| CapData {
        effective: (caps >> shift) as u32,
        permitted: (caps >> shift) as u32,
        inheritable: 0,
    };
    let data = [word(0), word(32)];
    // SAFETY: a v3 header and two data words, as the kernel expects.
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs `filter` on the calling thread. Without `no_new_privs` the kernel demands
/// `CAP_SYS_ADMIN`, so this comes before the capabilities are reduced.
///
/// # Safety
/// `filter` must be a valid program (as [`seccomp::program`] makes them).
pub unsafe fn install_filter(filter: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as libc::c_ushort,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `filter`, alive for the call; the kernel copies it.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_same_sandbox_keeps_its_compiled_policy() {
        let default = Policy::default_for(40);
        let same = default.recompile(&GuestSandbox::default()).unwrap();
        let (Some(a), Some(b)) = (&default.filter, &same.filter) else {
            panic!("the default has a filter");
        };
        assert!(Arc::ptr_eq(a, b), "the same sandbox is not compiled again");
        let other = GuestSandbox {
            seccomp: false,
            ..GuestSandbox::default()
        };
        let changed = default.recompile(&other).unwrap();
        assert!(changed.filter.is_none());
        assert_eq!(changed.sandbox, other);
        assert_eq!(changed.last_cap, 40);
    }

    #[test]
    fn the_default_is_dockers_mask() {
        let p = Policy::default_for(40);
        assert_eq!(p.caps, 0xa80425fb);
        assert!(p.filter.is_some());
    }

    /// The kernel accepts the program and applies it as the BPF tests say (in a forked child,
    /// which exits with the number of the first check that failed).
    #[test]
    fn the_kernel_applies_the_filter() {
        let policy = Policy::default_for(last_cap());
        let filter = policy.filter.unwrap();
        // SAFETY: the child makes raw syscalls only and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let no_new_privs = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0;
                if !no_new_privs || install_filter(&filter).is_err() {
                    libc::_exit(10);
                }
                let errno = || *libc::__errno_location();
                let checks = [
                    libc::syscall(libc::SYS_getppid) > 0,
                    libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) == -1 && errno() == libc::EPERM,
                    libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) == -1
                        && errno() == libc::EPERM,
                    libc::syscall(libc::SYS_clone3, 0, 0) == -1 && errno() == libc::ENOSYS,
                    libc::syscall(libc::SYS_personality, 0xffff_ffffu32) >= 0,
                    libc::syscall(libc::SYS_personality, 0x0040_0000) == -1
                        && errno() == libc::EPERM,
                    libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) == -1 && errno() == libc::EPERM,
                ];
                let failed = checks.iter().position(|ok| !ok).map_or(0, |i| i + 1);
                libc::_exit(failed as i32);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "check number that failed");
    }

    #[test]
    fn names_all_and_unknown_kernels() {
        let s = GuestSandbox {
            capabilities: vec!["chown".into(), "CAP_SYS_ADMIN".into()],
            seccomp: false,
            limits: Default::default(),
        };
        let p = Policy::compile(&s, 40).unwrap();
        assert_eq!(p.caps, 1 | 1 << 21);
        assert!(p.filter.is_none());
        let all = GuestSandbox {
            capabilities: vec!["ALL".into()],
            seccomp: true,
            limits: Default::default(),
        };
        assert_eq!(Policy::compile(&all, 40).unwrap().caps, (1 << 41) - 1);
        // A kernel that knows fewer capabilities gets only those.
        assert_eq!(Policy::compile(&all, 37).unwrap().caps, (1 << 38) - 1);
        let bad = GuestSandbox {
            capabilities: vec!["CAP_FLY".into()],
            seccomp: true,
            limits: Default::default(),
        };
        let e = Policy::compile(&bad, 40).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("CAP_FLY"));
    }

    #[test]
    fn limits_become_rlimits() {
        let mut s = GuestSandbox::default();
        s.limits.open_files = Some(64);
        s.limits.cpu_time = Some(5);
        let p = Policy::compile(&s, 40).unwrap();
        assert_eq!(
            p.rlimits,
            vec![(libc::RLIMIT_NOFILE, 64), (libc::RLIMIT_CPU, 5)]
        );
        assert!(Policy::default_for(40).rlimits.is_empty());
    }
}
