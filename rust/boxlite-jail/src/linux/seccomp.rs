//! The jail's classic-BPF seccomp filter ([`crate::Seccomp::Vmm`]), built in the parent.

use libc::sock_filter;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_AARCH64: u32 = 0xC000_00B7;

// struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6].
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
// The low 32 bits of args[0]: socket's family and clone's namespace flags live there, and
// the kernel truncates `int family` to them too.
#[cfg(target_endian = "little")]
const OFFSET_ARG0_LOW: u32 = 16;
#[cfg(target_endian = "big")]
const OFFSET_ARG0_LOW: u32 = 20;

const RET_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const RET_KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

fn ret_errno(errno: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
}

const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

#[cfg(target_arch = "x86_64")]
const ARCH: Option<u32> = Some(AUDIT_ARCH_X86_64);
#[cfg(target_arch = "aarch64")]
const ARCH: Option<u32> = Some(AUDIT_ARCH_AARCH64);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH: Option<u32> = None;

/// Syscalls a VMM never makes, answered with EPERM.
fn denied() -> Vec<libc::c_long> {
    #[allow(unused_mut)]
    let mut list = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_mount_setattr,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_vhangup,
        libc::SYS_fanotify_init,
    ];
    #[cfg(target_arch = "x86_64")]
    list.extend([
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_modify_ldt,
        libc::SYS_uselib,
    ]);
    list
}

/// Syscalls answered with ENOSYS, so callers take their fallback path.
fn unimplemented() -> Vec<libc::c_long> {
    vec![
        // clone3 passes flags in memory, which BPF cannot inspect; glibc falls back to clone.
        libc::SYS_clone3,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const LD_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JGE: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
const JSET: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
const RET: u32 = libc::BPF_RET | libc::BPF_K;

/// Kills a process calling in with another architecture's numbers, refuses x32 calls, and
/// leaves the syscall number loaded.
fn prologue(arch: u32) -> Vec<sock_filter> {
    let mut prog = vec![
        stmt(LD_ABS, OFFSET_ARCH),
        jump(JEQ, arch, 1, 0),
        stmt(RET, RET_KILL),
        stmt(LD_ABS, OFFSET_NR),
    ];
    if arch == AUDIT_ARCH_X86_64 {
        // x32 syscalls share the arch value; their numbers have bit 30 set.
        prog.push(jump(JGE, 0x4000_0000, 0, 1));
        prog.push(stmt(RET, ret_errno(libc::ENOSYS)));
    }
    prog
}

/// The filter program, or why this architecture has none.
pub(super) fn vmm_filter() -> Result<Vec<sock_filter>, String> {
    let arch = ARCH.ok_or_else(|| {
        format!(
            "no seccomp filter for {}; use Seccomp::Disabled",
            std::env::consts::ARCH
        )
    })?;
    let mut prog = prologue(arch);
    for nr in denied() {
        prog.push(jump(JEQ, nr as u32, 0, 1));
        prog.push(stmt(RET, ret_errno(libc::EPERM)));
    }
    for nr in unimplemented() {
        prog.push(jump(JEQ, nr as u32, 0, 1));
        prog.push(stmt(RET, ret_errno(libc::ENOSYS)));
    }
    // clone: threads and plain forks yes, new namespaces no.
    prog.extend([
        jump(JEQ, libc::SYS_clone as u32, 0, 4),
        stmt(LD_ABS, OFFSET_ARG0_LOW),
        jump(JSET, NAMESPACE_FLAGS, 0, 1),
        stmt(RET, ret_errno(libc::EPERM)),
        stmt(RET, RET_ALLOW),
    ]);
    // socket / socketpair: AF_UNIX only. Reload nr: the clone block may not have run.
    for nr in [libc::SYS_socket, libc::SYS_socketpair] {
        prog.extend([
            stmt(LD_ABS, OFFSET_NR),
            jump(JEQ, nr as u32, 0, 4),
            stmt(LD_ABS, OFFSET_ARG0_LOW),
            jump(JEQ, libc::AF_UNIX as u32, 0, 1),
            stmt(RET, RET_ALLOW),
            stmt(RET, ret_errno(libc::EAFNOSUPPORT)),
        ]);
    }
    prog.push(stmt(RET, RET_ALLOW));
    Ok(prog)
}

/// Calls that set a file's mode, with the index of their mode argument.
fn mode_setting_calls() -> Vec<(libc::c_long, u32)> {
    /// fchmodat2 (Linux 6.6) has one number on every architecture; libc may not name it.
    const SYS_FCHMODAT2: libc::c_long = 452;
    #[allow(unused_mut)]
    let mut calls = vec![
        (libc::SYS_openat, 3),
        (libc::SYS_mknodat, 2),
        (libc::SYS_fchmod, 1),
        (libc::SYS_fchmodat, 2),
        (SYS_FCHMODAT2, 2),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        (libc::SYS_open, 2),
        (libc::SYS_creat, 1),
        (libc::SYS_mknod, 1),
        (libc::SYS_chmod, 1),
    ]);
    calls
}

/// Refuses (EPERM) every mode with the set-user-ID or set-group-ID bit, so that a file
/// server cannot leave set-id files on the host whatever its client asks. `openat2` passes
/// its mode in memory, which BPF cannot read: it is answered ENOSYS so callers use `openat`.
pub(super) fn no_setid_filter() -> Result<Vec<sock_filter>, String> {
    let arch = ARCH.ok_or_else(|| format!("no seccomp filter for {}", std::env::consts::ARCH))?;
    let mut prog = prologue(arch);
    prog.push(jump(JEQ, libc::SYS_openat2 as u32, 0, 1));
    prog.push(stmt(RET, ret_errno(libc::ENOSYS)));
    let setid: u32 = libc::S_ISUID | libc::S_ISGID;
    for (nr, arg) in mode_setting_calls() {
        prog.extend([
            stmt(LD_ABS, OFFSET_NR),
            jump(JEQ, nr as u32, 0, 3),
            stmt(LD_ABS, OFFSET_ARG0_LOW + 8 * arg),
            jump(JSET, setid, 0, 1),
            stmt(RET, ret_errno(libc::EPERM)),
        ]);
    }
    prog.push(stmt(RET, RET_ALLOW));
    Ok(prog)
}

/// An allow-everything filter, for probing.
pub(super) fn allow_all() -> Vec<sock_filter> {
    vec![stmt(RET, RET_ALLOW)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setid_filter_ends_in_allow_and_checks_every_mode_call() {
        let Ok(prog) = no_setid_filter() else { return };
        assert_eq!(prog.last().map(|i| i.k), Some(RET_ALLOW));
        let eperm = prog
            .iter()
            .filter(|i| i.k == ret_errno(libc::EPERM))
            .count();
        assert_eq!(eperm, mode_setting_calls().len());
    }

    #[test]
    fn filter_is_well_formed() {
        let Ok(prog) = vmm_filter() else { return };
        assert!(
            prog.len() < 4096,
            "BPF programs are limited to 4096 instructions"
        );
        assert_eq!(prog.last().map(|i| i.k), Some(RET_ALLOW));
        // Every jump stays inside the program.
        for (index, insn) in prog.iter().enumerate() {
            if u32::from(insn.code) & 0x07 == libc::BPF_JMP {
                let furthest = index + 1 + usize::from(insn.jt.max(insn.jf));
                assert!(furthest < prog.len(), "jump out of range at {index}");
            }
        }
    }
}
