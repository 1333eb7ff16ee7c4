//! Spawn a program confined the way Firecracker's jailer confines its VMM.
//!
//! The program runs as PID 1 of fresh mount, network, PID, IPC, UTS and cgroup namespaces (plus a
//! user namespace whenever the host allows one), inside a minimal root built on a tmpfs and
//! entered with `pivot_root` (the host's root is detached). Only the listed binds, a minimal
//! `/dev`, a private `/tmp` and, on request, a `/proc` of its own PID namespace exist. It holds no
//! capabilities (securebits locked, `no_new_privs`), runs as a dedicated unprivileged id when the
//! host runs as root, has rlimits, an optional seccomp filter and, where a delegated cgroup v2
//! exists, memory/CPU/pids limits. Every descriptor is closed but stdio and the kept ones.
//!
//! Linux only: elsewhere [`spawn`] returns [`JailError::Unsupported`].

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

mod error;
pub use error::JailError;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as imp;

#[cfg(not(target_os = "linux"))]
mod unsupported;
#[cfg(not(target_os = "linux"))]
use unsupported as imp;

pub use imp::JailedChild;

/// First id of the range [`derived_jail_id`] picks from: 0x7000_0000..0x7100_0000 sits above
/// systemd's container range (0x80000..0x6FFFFFFF) and below the ids tools treat as negative.
pub const JAIL_ID_BASE: u32 = 0x7000_0000;
/// How many ids [`derived_jail_id`] spreads boxes over.
pub const JAIL_ID_COUNT: u32 = 0x0100_0000;

/// What to confine a program with. Paths are absolute; binds appear at the same path inside.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// An existing, empty directory. The jail mounts a tmpfs on it inside its own mount
    /// namespace and builds its tree there, so the host's directory stays empty.
    pub root: PathBuf,
    /// Read-only binds (non-recursive: mounts below a bound directory are not visible).
    /// Sources are resolved with the caller's rights: never list a path inside a directory a
    /// jail can write, it could have become a symlink.
    pub ro_binds: Vec<PathBuf>,
    /// Read-write binds, mounted `nosuid,nodev,noexec`.
    pub rw_binds: Vec<PathBuf>,
    /// Device nodes to bind under `/dev` (e.g. [`default_devices`], plus `/dev/kvm` for KVM).
    pub devices: Vec<PathBuf>,
    /// The ids the program runs as. `None` runs it as the caller, which is refused when the
    /// caller is root: root must name a dedicated unprivileged id ([`JailSpec::new`] does).
    pub uid_gid: Option<(u32, u32)>,
    /// Supplementary groups inside (root callers only; e.g. the `kvm` group). Unprivileged
    /// callers keep their own groups, which a user namespace cannot drop.
    pub groups: Vec<u32>,
    pub user_namespace: UserNamespace,
    pub rlimits: Rlimits,
    /// Applied only where a delegated, writable cgroup v2 exists; see [`JailedChild::cgroup`].
    pub cgroup: Option<CgroupLimits>,
    pub seccomp: Seccomp,
    /// Mount a `/proc` showing only the jail's own PID namespace (`subset=pid`). QEMU runs
    /// without one: it falls back from `/proc/self/exe` to `argv[0]` (tested).
    pub mount_proc: bool,
    /// Size of the private `/tmp` tmpfs in MiB; `None` leaves `/tmp` out.
    pub tmp_size_mib: Option<u64>,
    pub hostname: String,
    /// The program's whole environment (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    /// Descriptors (>= 3) left open, at the same numbers; every other one is closed. Pass
    /// sockets, pipes and files only: a directory descriptor is a way out of the jail's root.
    pub keep_fds: Vec<RawFd>,
    /// SIGKILL the jail when the caller dies; also kill it when its handle is dropped.
    pub die_with_parent: bool,
}

impl JailSpec {
    /// A spec with safe defaults: no binds, the standard devices, [`Rlimits::default`], the
    /// VMM seccomp filter, a 16 MiB `/tmp`, no `/proc`, and, when the caller is root,
    /// [`derived_jail_id`] of `root`'s path as uid and gid.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let uid_gid = imp::caller_is_root().then(|| {
            let id = derived_jail_id(root.as_os_str().as_encoded_bytes());
            (id, id)
        });
        Self {
            root,
            ro_binds: Vec::new(),
            rw_binds: Vec::new(),
            devices: default_devices(),
            uid_gid,
            groups: Vec::new(),
            user_namespace: UserNamespace::Auto,
            rlimits: Rlimits::default(),
            cgroup: None,
            seccomp: Seccomp::Vmm,
            mount_proc: false,
            tmp_size_mib: Some(16),
            hostname: "jail".into(),
            env: Vec::new(),
            keep_fds: Vec::new(),
            die_with_parent: true,
        }
    }
}

/// Whether the jail gets its own user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserNamespace {
    /// Unprivileged callers: one (required). Root: none, like Firecracker's jailer: the
    /// namespaces stay owned by the host's user namespace, the tree is built with root's
    /// rights, then the program drops to [`JailSpec::uid_gid`].
    #[default]
    Auto,
    /// Always one (root: it maps only the jail's ids, and bind sources must then be
    /// reachable by the jail's uid, since the tree is built as that uid). Fails with
    /// [`JailError::UserNamespaces`] when unavailable.
    Require,
    /// Never (root only).
    Disable,
}

/// Resource limits; each `Some` sets both the soft and the hard limit (clamped to the
/// caller's hard limit, which cannot be raised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimits {
    pub nofile: Option<u64>,
    /// Processes and threads. Counted per user namespace; without one, per uid across the
    /// host, so jails sharing an id share it.
    pub nproc: Option<u64>,
    pub core: Option<u64>,
    pub address_space: Option<u64>,
    pub memlock: Option<u64>,
}

impl Default for Rlimits {
    /// 4096 descriptors, 1024 threads (QEMU: vCPUs, a thread pool of up to 64 workers, I/O),
    /// no core dumps; address space and memlock unlimited (guest RAM and TCG's buffers).
    fn default() -> Self {
        Self {
            nofile: Some(4096),
            nproc: Some(1024),
            core: Some(0),
            address_space: None,
            memlock: None,
        }
    }
}

/// Cgroup v2 limits for the jail's own child cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// The delegated cgroup directory to create the jail's cgroup in; `None` uses the
    /// caller's own cgroup v2 (which works only if it may have children with controllers).
    pub parent: Option<PathBuf>,
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `cpu.max`.
    pub cpu_max: Option<CpuMax>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// `quota_us` of CPU time per `period_us` (200_000 / 100_000 is two CPUs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuMax {
    pub quota_us: u64,
    pub period_us: u64,
}

/// What became of [`JailSpec::cgroup`]: log a `Skipped` reason, it never fails a spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupOutcome {
    NotRequested,
    /// The jail runs in this cgroup, removed when the child is reaped.
    Applied(PathBuf),
    Skipped(String),
}

/// The jail's own seccomp filter (a program like QEMU may stack its own on top).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seccomp {
    Disabled,
    /// Deny what a VMM never needs: new namespaces (unshare, setns, clone flags), mount
    /// APIs, ptrace and process_vm_*, bpf, perf, kernel modules, kexec, keyrings,
    /// userfaultfd, handle-based opens, clock setting, io_uring (ENOSYS), clone3 (ENOSYS, so
    /// libc falls back to clone), and every socket family but AF_UNIX (no AF_VSOCK escape
    /// around the network namespace). Other architectures' syscalls kill the process.
    #[default]
    Vmm,
}

/// A seccomp filter built ahead of a fork, to be installed between fork and exec of a
/// program that is not otherwise jailed (see [`SeccompProgram::no_setid`]).
#[derive(Debug, Clone)]
pub struct SeccompProgram(imp::Filter);

impl SeccompProgram {
    /// Every call that would give a file the set-user-ID or set-group-ID bit fails with
    /// EPERM (`openat2` with ENOSYS: its mode cannot be inspected). For file servers that
    /// write on the host for a guest.
    pub fn no_setid() -> Result<Self, JailError> {
        imp::no_setid_filter().map(Self)
    }

    /// Installs the filter on the calling thread. Async-signal-safe (one `prctl`), so it may
    /// run in a `pre_exec` hook. Needs `CAP_SYS_ADMIN` or no_new_privs.
    pub fn install(&self) -> std::io::Result<()> {
        imp::install_filter(&self.0)
    }
}

/// Where one of the program's standard streams goes.
#[derive(Debug, Default)]
pub enum Stdio {
    #[default]
    Null,
    Inherit,
    /// A pipe; the caller's end is in [`JailedChild`]'s `stdin`/`stdout`/`stderr`.
    Piped,
    Fd(OwnedFd),
}

/// The program's stdin, stdout and stderr.
#[derive(Debug, Default)]
pub struct JailStdio {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

/// What this host allows, each with the reason (and the fix) when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The caller's effective uid is 0.
    pub root: bool,
    /// Unprivileged-style user namespaces in which mounts work.
    pub user_namespaces: Result<(), String>,
    /// Seccomp filters can be installed.
    pub seccomp: Result<(), String>,
    /// The cgroup v2 directory [`CgroupLimits`] with `parent: None` would use, with memory,
    /// cpu and pids available.
    pub cgroup: Result<PathBuf, String>,
}

/// Spawns `program` (an absolute path that exists inside the jail) with `args` (not
/// including `argv[0]`, which is `program`) confined by `spec`. Blocks until the program has
/// been executed, so setup errors come back here, typed.
pub fn spawn(
    spec: &JailSpec,
    program: &Path,
    args: &[OsString],
    stdio: JailStdio,
) -> Result<JailedChild, JailError> {
    imp::spawn(spec, program, args, stdio)
}

/// Probes what this host allows (takes a few milliseconds: it tries).
pub fn probe() -> Capabilities {
    imp::probe()
}

/// The devices a VMM needs: `/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`,
/// `/dev/urandom` (those that exist).
pub fn default_devices() -> Vec<PathBuf> {
    [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}

/// A stable id in [`JAIL_ID_BASE`]..+[`JAIL_ID_COUNT`] for `key` (e.g. a box id), so jails of
/// different boxes run as different users (FNV-1a; a collision only shares an id).
pub fn derived_jail_id(key: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    JAIL_ID_BASE + hash % JAIL_ID_COUNT
}

/// The files a dynamically linked `binary` needs to run: itself, its ELF interpreter and
/// shared libraries (as `ldd` lists them) and `/etc/ld.so.cache`. Bind them read-only.
pub fn program_binds(binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    imp::program_binds(binary)
}

/// Everything `qemu` (a `qemu-system-*` binary) needs read-only: [`program_binds`], its
/// firmware/data directories (`qemu -L help`: e.g. /usr/share/qemu, /usr/share/seabios,
/// /usr/lib/ipxe/qemu) and its module directory with the accelerator modules' libraries.
/// Add the guest's kernel, initramfs and base disks yourself.
pub fn qemu_binds(qemu: &Path) -> Result<Vec<PathBuf>, JailError> {
    imp::qemu_binds(qemu)
}
