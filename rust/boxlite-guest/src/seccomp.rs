//! The seccomp filter of user commands: a classic BPF program written by hand (the agent is a
//! static Rust binary, so no libseccomp), in the spirit of Docker's default profile.
//!
//! Docker's profile is an allow-list; this is a deny-list of the same significant calls, which
//! keeps every ordinary program working whatever new syscalls it uses. Shape of the program:
//!
//! ```text
//!   ld  arch;  jeq AUDIT_ARCH_X86_64 ? skip : next;  ret KILL_PROCESS    (i386 int 0x80 ...)
//!   ld  nr;    jge X32_SYSCALL_BIT ? next : skip;    ret ERRNO(ENOSYS)   (the x32 aliases)
//!   per denied call:      jeq NR ? next : skip;      ret ERRNO(EPERM)
//!   per argument rule:    jeq NR ? next : over;  ld arg;  ...;  ret ERRNO / ret ALLOW
//!   ret ALLOW
//! ```
//!
//! Every jump is forward and short, so the 8-bit BPF jump offsets always suffice; the kernel's
//! per-syscall action cache then makes every call that no argument rule looks at free.
//! A call is denied only when the box lacks the capability that would make it legitimate
//! (Docker's `includes.caps`): granting `CAP_SYS_ADMIN` also lets `mount` through, and so on.
//!
//! Deliberately allowed, unlike older Docker releases: `ptrace`, `process_vm_readv/writev` and
//! `kcmp` (Docker allows them on kernels >= 4.8). The pid namespace hides everything outside the
//! box, the box init is non-dumpable, and the agent's memory is non-dumpable (its short-lived
//! exec children share it until `execve`, already visible in the box): without
//! `CAP_SYS_PTRACE` none of them can be traced or read. So debuggers work in a box and reach
//! nothing else. (Granting `CAP_SYS_PTRACE` gives that up, as granting `CAP_SYS_ADMIN` or
//! `CAP_SYS_MODULE` does.)
//! `adjtimex` stays allowed as in Docker (read-only queries need no privilege; changes need
//! `CAP_SYS_TIME`).

use libc::sock_filter;

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;

pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel refuses longer programs (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;

/// `struct seccomp_data` offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of argument `i` (little-endian).
const fn off_arg_low(i: u32) -> u32 {
    16 + 8 * i
}

/// The namespace flags of `clone` (Docker's mask 0x7E020000): NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET.
const CLONE_NS_FLAGS: u32 = 0x7E02_0000;

/// Personalities Docker allows: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32 and the
/// query 0xffffffff.
const PERSONALITIES: [u32; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

// Capability numbers the rules depend on.
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_RAWIO: u32 = 17;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_PACCT: u32 = 20;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_BOOT: u32 = 22;
const CAP_SYS_TIME: u32 = 25;
const CAP_SYS_TTY_CONFIG: u32 = 26;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A denied call: its name (for tests and logs), number, the capabilities any of which lets it
/// through (none: always denied) and the errno it fails with.
#[derive(Debug, Clone, Copy)]
pub struct Deny {
    #[cfg_attr(not(test), allow(dead_code))]
    pub name: &'static str,
    pub nr: libc::c_long,
    pub unless: &'static [u32],
    pub errno: i32,
}

const fn deny(name: &'static str, nr: libc::c_long, unless: &'static [u32]) -> Deny {
    Deny {
        name,
        nr,
        unless,
        errno: libc::EPERM,
    }
}

// x86_64 numbers the libc crate does not name (the calls were removed in Linux 2.6).
const SYS_CREATE_MODULE: libc::c_long = 174;
const SYS_GET_KERNEL_SYMS: libc::c_long = 177;
const SYS_QUERY_MODULE: libc::c_long = 178;

const ADMIN: &[u32] = &[CAP_SYS_ADMIN];
const ALWAYS: &[u32] = &[];

/// The denied calls (x86_64 numbers).
pub const DENIED: &[Deny] = &[
    // Kernel code and the machine itself.
    deny("kexec_load", libc::SYS_kexec_load, &[CAP_SYS_BOOT]),
    deny(
        "kexec_file_load",
        libc::SYS_kexec_file_load,
        &[CAP_SYS_BOOT],
    ),
    deny("reboot", libc::SYS_reboot, &[CAP_SYS_BOOT]),
    deny("init_module", libc::SYS_init_module, &[CAP_SYS_MODULE]),
    deny("finit_module", libc::SYS_finit_module, &[CAP_SYS_MODULE]),
    deny("delete_module", libc::SYS_delete_module, &[CAP_SYS_MODULE]),
    deny("iopl", libc::SYS_iopl, &[CAP_SYS_RAWIO]),
    deny("ioperm", libc::SYS_ioperm, &[CAP_SYS_RAWIO]),
    deny("swapon", libc::SYS_swapon, ADMIN),
    deny("swapoff", libc::SYS_swapoff, ADMIN),
    deny("acct", libc::SYS_acct, &[CAP_SYS_PACCT]),
    deny("syslog", libc::SYS_syslog, &[CAP_SYSLOG]),
    deny("vhangup", libc::SYS_vhangup, &[CAP_SYS_TTY_CONFIG]),
    // Time is not namespaced.
    deny("settimeofday", libc::SYS_settimeofday, &[CAP_SYS_TIME]),
    deny("clock_settime", libc::SYS_clock_settime, &[CAP_SYS_TIME]),
    deny("clock_adjtime", libc::SYS_clock_adjtime, &[CAP_SYS_TIME]),
    // Mounts and namespaces (the box's are set up by the agent).
    deny("mount", libc::SYS_mount, ADMIN),
    deny("umount2", libc::SYS_umount2, ADMIN),
    deny("pivot_root", libc::SYS_pivot_root, ADMIN),
    deny("unshare", libc::SYS_unshare, ADMIN),
    deny("setns", libc::SYS_setns, ADMIN),
    deny("open_tree", libc::SYS_open_tree, ADMIN),
    deny("move_mount", libc::SYS_move_mount, ADMIN),
    deny("fsopen", libc::SYS_fsopen, ADMIN),
    deny("fsconfig", libc::SYS_fsconfig, ADMIN),
    deny("fsmount", libc::SYS_fsmount, ADMIN),
    deny("fspick", libc::SYS_fspick, ADMIN),
    deny("mount_setattr", libc::SYS_mount_setattr, ADMIN),
    deny("quotactl", libc::SYS_quotactl, ADMIN),
    deny("quotactl_fd", libc::SYS_quotactl_fd, ADMIN),
    deny("lookup_dcookie", libc::SYS_lookup_dcookie, ADMIN),
    // glibc falls back to clone(2) on ENOSYS, whose flags the filter can see (clone3's are in
    // memory); Docker does the same.
    Deny {
        name: "clone3",
        nr: libc::SYS_clone3,
        unless: ADMIN,
        errno: libc::ENOSYS,
    },
    deny(
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        &[CAP_DAC_READ_SEARCH],
    ),
    // Large kernel attack surface, not needed by ordinary programs.
    deny("bpf", libc::SYS_bpf, &[CAP_SYS_ADMIN, CAP_BPF]),
    deny(
        "perf_event_open",
        libc::SYS_perf_event_open,
        &[CAP_SYS_ADMIN, CAP_PERFMON],
    ),
    deny("userfaultfd", libc::SYS_userfaultfd, &[CAP_SYS_PTRACE]),
    // The kernel keyring is not namespaced.
    deny("keyctl", libc::SYS_keyctl, ALWAYS),
    deny("add_key", libc::SYS_add_key, ALWAYS),
    deny("request_key", libc::SYS_request_key, ALWAYS),
    // Docker denies io_uring since 25.0 (a steady source of kernel bugs).
    deny("io_uring_setup", libc::SYS_io_uring_setup, ALWAYS),
    deny("io_uring_enter", libc::SYS_io_uring_enter, ALWAYS),
    deny("io_uring_register", libc::SYS_io_uring_register, ALWAYS),
    // Obsolete.
    deny("uselib", libc::SYS_uselib, ALWAYS),
    deny("create_module", SYS_CREATE_MODULE, ALWAYS),
    deny("get_kernel_syms", SYS_GET_KERNEL_SYMS, ALWAYS),
    deny("query_module", SYS_QUERY_MODULE, ALWAYS),
    deny("nfsservctl", libc::SYS_nfsservctl, ALWAYS),
    deny("_sysctl", libc::SYS__sysctl, ALWAYS),
    deny("sysfs", libc::SYS_sysfs, ALWAYS),
    deny("ustat", libc::SYS_ustat, ALWAYS),
];

/// A jump target: the next instruction or a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    Next,
    Label(usize),
}

#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u16,
    jt: To,
    jf: To,
    k: u32,
}

/// A tiny classic-BPF assembler: loads of `seccomp_data` words, conditional jumps to labels,
/// returns. [`Asm::finish`] resolves the labels and checks every offset fits.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<Insn>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, code: u16, jt: To, jf: To, k: u32) {
        self.code.push(Insn { code, jt, jf, k });
    }

    /// A new label, placed later with [`Asm::place`].
    pub fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    pub fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }

    /// `A = seccomp_data[offset]` (32 bits).
    pub fn load(&mut self, offset: u32) {
        self.push(BPF_LD | BPF_W | BPF_ABS, To::Next, To::Next, offset);
    }

    /// `if A == k goto t else goto f`.
    pub fn jeq(&mut self, k: u32, t: To, f: To) {
        self.push(BPF_JMP | BPF_JEQ | BPF_K, t, f, k);
    }

    /// `if A >= k goto t else goto f` (unsigned).
    pub fn jge(&mut self, k: u32, t: To, f: To) {
        self.push(BPF_JMP | BPF_JGE | BPF_K, t, f, k);
    }

    /// `if A & k != 0 goto t else goto f`.
    pub fn jset(&mut self, k: u32, t: To, f: To) {
        self.push(BPF_JMP | BPF_JSET | BPF_K, t, f, k);
    }

    pub fn ret(&mut self, action: u32) {
        self.push(BPF_RET | BPF_K, To::Next, To::Next, action);
    }

    /// The program, or why it cannot be one (an unplaced label, a jump too far or backwards,
    /// too many instructions, not ending in a return).
    pub fn finish(self) -> Result<Vec<sock_filter>, String> {
        if self.code.is_empty() || self.code.len() > MAX_INSNS {
            return Err(format!("{} instructions", self.code.len()));
        }
        if self.code.last().map(|i| i.code) != Some(BPF_RET | BPF_K) {
            return Err("the program does not end with a return".into());
        }
        let resolve = |at: usize, to: To| -> Result<u8, String> {
            let target = match to {
                To::Next => return Ok(0),
                To::Label(l) => self.labels[l].ok_or(format!("label {l} not placed"))?,
            };
            let off = target
                .checked_sub(at + 1)
                .ok_or(format!("instruction {at} jumps backwards"))?;
            if target >= self.code.len() {
                return Err(format!("instruction {at} jumps past the end"));
            }
            u8::try_from(off).map_err(|_| format!("instruction {at} jumps {off} ahead"))
        };
        self.code
            .iter()
            .enumerate()
            .map(|(at, i)| {
                Ok(sock_filter {
                    code: i.code,
                    jt: resolve(at, i.jt)?,
                    jf: resolve(at, i.jf)?,
                    k: i.k,
                })
            })
            .collect()
    }
}

/// The filter for a box whose commands hold the capabilities in `caps` (bit n = capability n).
pub fn program(caps: u64) -> Vec<sock_filter> {
    let has = |c: &u32| caps & (1u64 << c) != 0;
    let mut a = Asm::new();
    let arch_ok = a.label();
    a.load(OFF_ARCH);
    a.jeq(AUDIT_ARCH_X86_64, To::Label(arch_ok), To::Next);
    a.ret(RET_KILL_PROCESS);
    a.place(arch_ok);
    a.load(OFF_NR);
    let native = a.label();
    a.jge(X32_SYSCALL_BIT, To::Next, To::Label(native));
    a.ret(RET_ERRNO | libc::ENOSYS as u32);
    a.place(native);
    for d in DENIED {
        if d.unless.iter().any(has) {
            continue;
        }
        let next = a.label();
        a.jeq(d.nr as u32, To::Next, To::Label(next));
        a.ret(RET_ERRNO | d.errno as u32);
        a.place(next);
    }
    // personality(2): only the harmless personas (no READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE...).
    let over = a.label();
    let allow = a.label();
    a.jeq(libc::SYS_personality as u32, To::Next, To::Label(over));
    a.load(off_arg_low(0));
    for p in PERSONALITIES {
        a.jeq(p, To::Label(allow), To::Next);
    }
    a.ret(RET_ERRNO | libc::EPERM as u32);
    a.place(allow);
    a.ret(RET_ALLOW);
    a.place(over);
    // clone(2) creating namespaces (the flags are the first argument on x86_64; the kernel
    // uses only their low 32 bits).
    if !has(&CAP_SYS_ADMIN) {
        let over = a.label();
        let deny = a.label();
        a.jeq(libc::SYS_clone as u32, To::Next, To::Label(over));
        a.load(off_arg_low(0));
        a.jset(CLONE_NS_FLAGS, To::Label(deny), To::Next);
        a.ret(RET_ALLOW);
        a.place(deny);
        a.ret(RET_ERRNO | libc::EPERM as u32);
        a.place(over);
    }
    a.ret(RET_ALLOW);
    #[allow(clippy::expect_used)]
    a.finish()
        .expect("the seccomp program is built from short forward jumps only")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub mod tests {
    use super::*;

    /// Runs `prog` like the kernel would on one syscall; returns the action.
    pub fn eval(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                    pc += 1;
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c => {
                    let taken = match c & 0xf0 {
                        BPF_JEQ => acc == i.k,
                        BPF_JGE => acc >= i.k,
                        BPF_JSET => acc & i.k != 0,
                        op => panic!("unexpected jump op {op:#x}"),
                    };
                    pc += 1 + if taken { i.jt } else { i.jf } as usize;
                }
            }
        }
    }

    fn docker_caps() -> u64 {
        boxlite_proto::message::GuestSandbox::default()
            .capabilities
            .iter()
            .map(|c| boxlite_proto::message::GuestSandbox::capability_number(c).unwrap())
            .fold(0, |m, n| m | 1 << n)
    }

    fn call(prog: &[sock_filter], nr: libc::c_long, arg0: u64) -> u32 {
        eval(prog, AUDIT_ARCH_X86_64, nr as u32, [arg0, 0, 0, 0, 0, 0])
    }

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn structure() {
        let prog = program(docker_caps());
        assert!(prog.len() < MAX_INSNS);
        // Architecture first: load it, compare, kill.
        assert_eq!(prog[0].code, BPF_LD | BPF_W | BPF_ABS);
        assert_eq!(prog[0].k, OFF_ARCH);
        assert_eq!(prog[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(prog[2].code, BPF_RET | BPF_K);
        assert_eq!(prog[2].k, RET_KILL_PROCESS);
        assert_eq!(prog[3].k, OFF_NR);
        assert_eq!(prog.last().unwrap().k, RET_ALLOW);
        // Every jump stays inside the program; every load is an aligned field of seccomp_data.
        for (at, i) in prog.iter().enumerate() {
            if i.code & 0x07 == BPF_JMP {
                assert!(at + 1 + (i.jt.max(i.jf) as usize) < prog.len(), "{at}");
            }
            if i.code == BPF_LD | BPF_W | BPF_ABS {
                assert!(i.k % 4 == 0 && i.k < 64, "{at}");
            }
        }
    }

    #[test]
    fn foreign_architectures_are_killed_and_x32_refused() {
        let prog = program(docker_caps());
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        assert_eq!(eval(&prog, AUDIT_ARCH_I386, 1, [0; 6]), RET_KILL_PROCESS);
        let x32_reboot = X32_SYSCALL_BIT | libc::SYS_reboot as u32;
        assert_eq!(
            eval(&prog, AUDIT_ARCH_X86_64, x32_reboot, [0; 6]),
            RET_ERRNO | libc::ENOSYS as u32
        );
    }

    #[test]
    fn docker_default_denies_and_allows() {
        let prog = program(docker_caps());
        for d in DENIED {
            assert_eq!(
                call(&prog, d.nr, 0),
                RET_ERRNO | d.errno as u32,
                "{} should be denied",
                d.name
            );
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_fork,
            libc::SYS_chroot,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_adjtimex,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_mknodat,
            libc::SYS_seccomp,
        ] {
            assert_eq!(call(&prog, nr, 0), RET_ALLOW, "syscall {nr}");
        }
        // clone: threads and forks yes, namespaces no.
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(call(&prog, libc::SYS_clone, thread), RET_ALLOW);
        assert_eq!(
            call(&prog, libc::SYS_clone, libc::SIGCHLD as u64),
            RET_ALLOW
        );
        for ns in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWCGROUP,
        ] {
            let flags = (ns | libc::SIGCHLD) as u64;
            assert_eq!(call(&prog, libc::SYS_clone, flags), EPERM, "{ns:#x}");
        }
        // personality: queries and plain personas yes, READ_IMPLIES_EXEC and the like no.
        for p in PERSONALITIES {
            assert_eq!(call(&prog, libc::SYS_personality, p as u64), RET_ALLOW);
        }
        assert_eq!(call(&prog, libc::SYS_personality, 0x0040_0000), EPERM);
        assert_eq!(call(&prog, libc::SYS_personality, 0x0004_0000), EPERM);
    }

    #[test]
    fn granted_capabilities_lift_their_rules() {
        let prog = program(docker_caps() | 1 << CAP_SYS_ADMIN | 1 << CAP_SYS_MODULE);
        assert_eq!(call(&prog, libc::SYS_mount, 0), RET_ALLOW);
        assert_eq!(call(&prog, libc::SYS_unshare, 0), RET_ALLOW);
        assert_eq!(call(&prog, libc::SYS_bpf, 0), RET_ALLOW);
        assert_eq!(call(&prog, libc::SYS_finit_module, 0), RET_ALLOW);
        let flags = (libc::CLONE_NEWNS | libc::SIGCHLD) as u64;
        assert_eq!(call(&prog, libc::SYS_clone, flags), RET_ALLOW);
        assert_eq!(call(&prog, libc::SYS_reboot, 0), EPERM);
        assert_eq!(call(&prog, libc::SYS_keyctl, 0), EPERM);
    }

    #[test]
    fn the_assembler_refuses_bad_programs() {
        let mut a = Asm::new();
        let l = a.label();
        a.jeq(1, To::Label(l), To::Next);
        a.ret(RET_ALLOW);
        assert!(a.finish().unwrap_err().contains("not placed"));

        let mut a = Asm::new();
        let l = a.label();
        a.jeq(1, To::Label(l), To::Next);
        for _ in 0..300 {
            a.load(OFF_NR);
        }
        a.place(l);
        a.ret(RET_ALLOW);
        assert!(a.finish().unwrap_err().contains("ahead"));

        let mut a = Asm::new();
        a.load(OFF_NR);
        assert!(a.finish().unwrap_err().contains("return"));

        let mut a = Asm::new();
        let l = a.label();
        a.place(l);
        a.load(OFF_NR);
        a.jeq(1, To::Label(l), To::Next);
        a.ret(RET_ALLOW);
        assert!(a.finish().unwrap_err().contains("backwards"));
    }
}
