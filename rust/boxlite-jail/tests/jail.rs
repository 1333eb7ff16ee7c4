//! Proves the confinement from the outside (the host's /proc/<pid>/...) and from the inside
//! (a busybox shell, QEMU, and this test binary re-executed in a jail). Runs as root (CI) and
//! unprivileged; as root, `unprivileged_caller_is_confined_too` re-runs the checks as `nobody`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use boxlite_jail::{
    derived_jail_id, probe, program_binds, qemu_binds, spawn, CgroupLimits, CgroupOutcome, CpuMax,
    JailError, JailSpec, JailStdio, JailedChild, Seccomp, Stdio, UserNamespace,
};

const BUSYBOX: &str = "/bin/busybox";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Set in this binary's environment when it is re-executed as a helper.
const HELPER_ENV: &str = "BOXLITE_JAIL_TEST_HELPER";

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn is_root() -> bool {
    euid() == 0
}

/// A temporary jail root and box directory (writable by the jail's uid).
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    box_dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        assert!(
            Path::new(BUSYBOX).is_file(),
            "these tests need a static busybox at {BUSYBOX} (Debian: busybox-static)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("jail");
        let box_dir = dir.path().join("box");
        std::fs::create_dir(&root).expect("mkdir");
        std::fs::create_dir(&box_dir).expect("mkdir");
        Fixture {
            _dir: dir,
            root,
            box_dir,
        }
    }

    /// busybox read-only, the box read-write and owned by the jail's ids.
    fn spec(&self) -> JailSpec {
        let mut spec = JailSpec::new(&self.root);
        spec.ro_binds = vec![BUSYBOX.into()];
        spec.rw_binds = vec![self.box_dir.clone()];
        if let Some((uid, gid)) = spec.uid_gid {
            std::os::unix::fs::chown(&self.box_dir, Some(uid), Some(gid)).expect("chown box");
        }
        spec
    }
}

/// The uid the jail runs as, as the host sees it.
fn jail_uid(spec: &JailSpec) -> u32 {
    spec.uid_gid.map_or_else(euid, |(uid, _)| uid)
}

fn args(list: &[&str]) -> Vec<OsString> {
    list.iter().map(OsString::from).collect()
}

fn piped() -> JailStdio {
    JailStdio {
        stdin: Stdio::Null,
        stdout: Stdio::Piped,
        stderr: Stdio::Piped,
    }
}

fn spawn_ok(spec: &JailSpec, program: &str, argv: &[&str], stdio: JailStdio) -> JailedChild {
    spawn(spec, Path::new(program), &args(argv), stdio)
        .unwrap_or_else(|e| panic!("spawning {program} in a jail: {e}"))
}

fn wait_timeout(child: &JailedChild, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > limit {
            child.kill().expect("kill");
            panic!("jailed child {} still running after {limit:?}", child.pid());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `script` in a jailed busybox shell (stderr merged); returns status and output.
fn sh(spec: &JailSpec, script: &str) -> (ExitStatus, String) {
    let full = format!("exec 2>&1\n{script}");
    let mut child = spawn_ok(spec, BUSYBOX, &["sh", "-c", &full], piped());
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    (wait_timeout(&child, Duration::from_secs(60)), out)
}

fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn namespace(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("ns/{kind} of {pid}: {e}"))
        .to_string_lossy()
        .into_owned()
}

fn names(dir: impl AsRef<Path>) -> BTreeSet<String> {
    std::fs::read_dir(dir.as_ref())
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.as_ref().display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// The first path component of `path` (the jail's top-level entry it creates).
fn top(path: &Path) -> String {
    path.components()
        .nth(1)
        .expect("absolute path")
        .as_os_str()
        .to_string_lossy()
        .into_owned()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array (no CLOEXEC: a would-be leak).
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: freshly created, owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// What the host's /proc says about a jailed `sleep`: ids, capabilities, no_new_privs,
/// seccomp, namespaces, descriptors, rlimits and the visible tree.
fn check_sleep_from_the_host(fixture: &Fixture, spec: &mut JailSpec) {
    // A kept descriptor and a stray one (not close-on-exec) that must not leak.
    let (kept, _kept_write) = pipe();
    let (_stray_read, _stray_write) = pipe();
    spec.keep_fds = vec![kept.as_raw_fd()];
    let child = spawn_ok(spec, BUSYBOX, &["sleep", "60"], JailStdio::default());
    let pid = child.pid();
    let uid = jail_uid(spec).to_string();

    let ids = |field: &str| -> Vec<String> {
        status_field(pid, field)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        ids("Uid"),
        vec![uid.clone(); 4],
        "real, effective, saved, fs uid"
    );
    let gid = spec.uid_gid.map_or_else(
        // SAFETY: getegid cannot fail.
        || unsafe { libc::getegid() }.to_string(),
        |(_, g)| g.to_string(),
    );
    assert_eq!(ids("Gid"), vec![gid; 4]);
    if is_root() {
        assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    }
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "filter mode");
    // PID 1 of its own PID namespace.
    let nspid = ids("NSpid");
    assert_eq!(nspid, [pid.to_string(), "1".into()]);

    for kind in ["mnt", "net", "pid", "ipc", "uts", "cgroup"] {
        assert_ne!(
            namespace("self", kind),
            namespace(&pid.to_string(), kind),
            "{kind}"
        );
    }
    let own_user = namespace("self", "user") != namespace(&pid.to_string(), "user");
    assert_eq!(own_user, child.user_namespace());
    assert_eq!(
        child.user_namespace(),
        !is_root() || spec.user_namespace == UserNamespace::Require
    );

    let fds = names(format!("/proc/{pid}/fd"));
    let expected: BTreeSet<String> = ["0", "1", "2"]
        .into_iter()
        .map(String::from)
        .chain([kept.as_raw_fd().to_string()])
        .collect();
    assert_eq!(fds, expected, "only stdio and the kept descriptor");

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(limit("Max open files"), ["4096", "4096"]);
    assert_eq!(limit("Max processes"), ["1024", "1024"]);
    assert_eq!(limit("Max core file size"), ["0", "0"]);

    // Its root holds the binds' top directories, /dev and /tmp, nothing else.
    let root = names(format!("/proc/{pid}/root"));
    let expected: BTreeSet<String> = [top(Path::new(BUSYBOX)), top(&fixture.box_dir)]
        .into_iter()
        .chain(["dev".to_string(), "tmp".to_string()])
        .collect();
    assert_eq!(root, expected);
    let dev = names(format!("/proc/{pid}/root/dev"));
    assert_eq!(
        dev,
        ["full", "null", "random", "urandom", "zero"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    // The host's directory stays empty: the tree lives on the jail's own tmpfs.
    assert!(names(&fixture.root).is_empty());

    child.kill().expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
}

#[test]
fn sleep_is_confined_as_seen_from_the_host() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    check_sleep_from_the_host(&fixture, &mut spec);
}

#[test]
fn root_can_require_a_user_namespace() {
    // As root this maps only the jail's id; unprivileged it is the default path anyway.
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    spec.user_namespace = UserNamespace::Require;
    // The tree is then built as the jail's uid: the box's parents must be reachable.
    let parent = fixture.box_dir.parent().expect("parent");
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    check_sleep_from_the_host(&fixture, &mut spec);
    spec.keep_fds.clear();
    let uid = jail_uid(&spec);
    let (status, out) = sh(&spec, "cat /proc/self/uid_map 2>&1 || echo no-proc");
    assert!(status.success(), "{out}");
    assert!(out.contains("no-proc"), "no /proc unless asked: {out}");
    spec.mount_proc = true;
    let (status, out) = sh(&spec, "cat /proc/self/uid_map");
    assert!(status.success(), "{out}");
    let map: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(map, [uid.to_string(), uid.to_string(), "1".into()]);
}

/// The shell checks every test (and the unprivileged helper) runs inside a jail.
fn check_shell_inside(fixture: &Fixture, spec: &mut JailSpec) {
    spec.mount_proc = true;
    let box_dir = fixture.box_dir.display();
    let script = format!(
        r#"
echo "pid=$$"
echo "uid=$(id -u)"
echo "host=$(hostname)"
echo "root=$(ls -A / | tr '\n' ' ')"
echo "procs=$(ls /proc | grep -E '^[0-9]+$' | tr '\n' ' ')"
for f in /etc/passwd /work /root /usr /sys /proc/1/root/etc; do test -e $f && echo "visible $f"; done
touch /bin/new 2>&1 | sed 's/^/ro-bind: /'
mkdir /newdir 2>&1 | sed 's/^/root: /'
echo written > {box_dir}/from-jail && echo "rw-ok"
echo scratch > /tmp/x && echo "tmp-ok"
cat /proc/self/status | grep -E '^(CapEff|NoNewPrivs)'
busybox ps -o pid > /tmp/ps; echo "ps=$(tail -n +2 /tmp/ps | tr -d ' ' | tr '\n' ' ')"
"#
    );
    let (status, out) = sh(spec, &script);
    assert!(status.success(), "{out}");
    let has = |line: &str| out.lines().any(|l| l.trim() == line);
    assert!(has("pid=1"), "the shell is PID 1: {out}");
    assert!(has(&format!("uid={}", jail_uid(spec))), "{out}");
    assert!(has("host=jail"), "{out}");
    let expected_root = {
        let mut tops: BTreeSet<String> = [top(Path::new(BUSYBOX)), top(&fixture.box_dir)].into();
        tops.extend(["dev", "proc", "tmp"].map(String::from));
        tops.into_iter().collect::<Vec<_>>().join(" ")
    };
    assert!(has(&format!("root={expected_root}")), "{out}");
    assert!(
        !out.contains("visible"),
        "host files leak into the jail: {out}"
    );
    assert!(
        out.contains("ro-bind: touch: /bin/new: Read-only file system"),
        "{out}"
    );
    assert!(
        out.contains("root: mkdir: can't create directory '/newdir': Read-only file system"),
        "{out}"
    );
    assert!(has("rw-ok") && has("tmp-ok"), "{out}");
    assert!(
        has("CapEff:\t0000000000000000") && has("NoNewPrivs:\t1"),
        "{out}"
    );
    // Only the jail's processes: the shell (1) and ps itself.
    let ps = out
        .lines()
        .find_map(|l| l.strip_prefix("ps="))
        .unwrap_or_else(|| panic!("{out}"));
    let pids: Vec<&str> = ps.split_whitespace().collect();
    assert_eq!(pids.len(), 2, "the shell and ps: {out}");
    assert_eq!(pids[0], "1", "{out}");
    assert_eq!(
        std::fs::read_to_string(fixture.box_dir.join("from-jail")).expect("read"),
        "written\n"
    );
}

#[test]
fn a_shell_inside_sees_only_its_binds() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    check_shell_inside(&fixture, &mut spec);
}

/// The network namespace alone (seccomp off, so sockets can be tried): only a down `lo`, no
/// route to a listener on the host's loopback.
#[test]
fn the_network_namespace_has_only_a_down_lo() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    spec.seccomp = Seccomp::Disabled;
    spec.mount_proc = true;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let script = format!(
        "ip link\n\
         tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d ' ' | sed 's/^/iface: /'\n\
         echo hi | busybox nc -w 2 127.0.0.1 {port}; echo \"nc=$?\""
    );
    let (status, out) = sh(&spec, &script);
    assert!(status.success(), "{out}");
    let links: Vec<&str> = out.lines().filter(|l| !l.starts_with(' ')).collect();
    assert!(
        links[0].starts_with("1: lo: <LOOPBACK> "),
        "lo is down: {out}"
    );
    assert!(
        !links[1..].iter().any(|l| l.contains(": <")),
        "one interface: {out}"
    );
    let ifaces: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("iface: "))
        .collect();
    assert_eq!(ifaces, ["lo"]);
    assert!(out.contains("Network is unreachable"), "{out}");
    assert!(out.contains("nc=1"), "{out}");
    assert_eq!(
        listener.accept().map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "nothing reached the host's listener"
    );
}

/// The VMM filter: no sockets but AF_UNIX, no new namespaces, as busybox sees it.
#[test]
fn seccomp_refuses_inet_netlink_and_namespaces() {
    let fixture = Fixture::new();
    let spec = fixture.spec();
    let (status, out) = sh(
        &spec,
        // Applets that are not built into the shell are run through busybox itself.
        "busybox nc -w 1 127.0.0.1 1; ip link; busybox unshare -U true; busybox unshare -n true; \
         echo done",
    );
    assert!(status.success(), "{out}");
    assert_eq!(
        out.matches("Address family not supported by protocol")
            .count(),
        2,
        "inet and netlink: {out}"
    );
    assert_eq!(out.matches("Operation not permitted").count(), 2, "{out}");
    assert!(out.ends_with("done\n"), "{out}");
}

/// This test binary re-executed inside a jail (`inside_the_jail` below): syscalls and a unix
/// socket connection to the host.
#[test]
fn this_binary_inside_a_jail_reaches_only_a_unix_socket() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    let exe = std::env::current_exe().expect("current_exe");
    spec.ro_binds
        .extend(program_binds(&exe).expect("binds of the test binary"));
    let socket = fixture.box_dir.join("host.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    if let Some((uid, gid)) = spec.uid_gid {
        std::os::unix::fs::chown(&socket, Some(uid), Some(gid)).expect("chown socket");
    }
    spec.env = vec![
        (HELPER_ENV.into(), "inside".into()),
        ("SOCKET".into(), socket.clone().into()),
    ];
    let exe_str = exe.to_str().expect("utf-8 path");
    let argv = [
        "--exact",
        "inside_the_jail",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    let mut child = spawn_ok(&spec, exe_str, &argv, piped());
    let (mut stream, _) = listener.accept().expect("the jail connects");
    let mut greeting = String::new();
    stream.read_to_string(&mut greeting).expect("read");
    assert_eq!(greeting, "hello from the jail");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read");
    let status = wait_timeout(&child, Duration::from_secs(60));
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("INSIDE-OK"), "{out}\n{err}");
}

/// The errno of a failed raw call (0 when it succeeded).
fn errno_of(rc: i64) -> i32 {
    if rc >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }
}

/// Runs only re-executed by the test above, inside the jail.
#[test]
#[ignore = "helper: run inside a jail by this_binary_inside_a_jail_reaches_only_a_unix_socket"]
fn inside_the_jail() {
    if std::env::var(HELPER_ENV).as_deref() != Ok("inside") {
        return;
    }
    let socket_errno = |family| {
        // SAFETY: socket() with constant arguments; only its result is looked at.
        errno_of(unsafe { libc::socket(family, libc::SOCK_STREAM, 0) } as i64)
    };
    assert_eq!(socket_errno(libc::AF_VSOCK), libc::EAFNOSUPPORT, "vsock");
    assert_eq!(socket_errno(libc::AF_INET), libc::EAFNOSUPPORT, "inet");
    assert_eq!(socket_errno(libc::AF_INET6), libc::EAFNOSUPPORT, "inet6");
    assert_eq!(
        socket_errno(libc::AF_NETLINK),
        libc::EAFNOSUPPORT,
        "netlink"
    );
    assert_eq!(socket_errno(libc::AF_PACKET), libc::EAFNOSUPPORT, "packet");
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            errno_of(libc::unshare(libc::CLONE_NEWUSER) as i64),
            libc::EPERM
        );
        assert_eq!(
            errno_of(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)),
            libc::EPERM
        );
        assert_eq!(errno_of(libc::syscall(libc::SYS_bpf, 0, 0, 0)), libc::EPERM);
        assert_eq!(
            errno_of(libc::syscall(libc::SYS_io_uring_setup, 1, 0)),
            libc::ENOSYS
        );
        assert_eq!(
            errno_of(libc::syscall(libc::SYS_userfaultfd, 0)),
            libc::EPERM
        );
        assert_eq!(
            errno_of(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)),
            libc::EPERM
        );
        // Securebits: no root privileges, no keeping capabilities, no ambient ones; locked.
        let bits = libc::prctl(libc::PR_GET_SECUREBITS);
        let wanted = libc::SECBIT_NOROOT
            | libc::SECBIT_NOROOT_LOCKED
            | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
            | libc::SECBIT_KEEP_CAPS_LOCKED
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        assert_eq!(bits, wanted, "securebits {bits:#x}");
        assert_eq!(libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), 1);
    }
    // Threads still work (clone3 is ENOSYS, glibc falls back to clone).
    let answer = std::thread::spawn(|| 42).join().expect("thread");
    assert_eq!(answer, 42);
    let socket = std::env::var("SOCKET").expect("SOCKET");
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    stream.write_all(b"hello from the jail").expect("write");
    drop(stream);
    println!("INSIDE-OK");
}

fn qemu_spec(fixture: &Fixture) -> JailSpec {
    let mut spec = fixture.spec();
    spec.ro_binds = qemu_binds(Path::new(QEMU)).expect("qemu binds");
    spec
}

#[test]
fn qemu_binds_cover_binary_libraries_firmware_and_modules() {
    let binds = qemu_binds(Path::new(QEMU)).expect("qemu binds");
    assert!(binds.contains(&PathBuf::from(QEMU)));
    assert!(binds.iter().any(|b| b.ends_with("libc.so.6")), "{binds:?}");
    assert!(
        binds.iter().any(|b| b.join("bios-256k.bin").is_file()),
        "SeaBIOS: {binds:?}"
    );
    assert!(
        binds.iter().any(|b| b.join("linuxboot_dma.bin").is_file()),
        "option ROMs: {binds:?}"
    );
    assert!(
        binds.iter().any(|b| b
            .join(format!("accel-tcg-{}.so", std::env::consts::ARCH))
            .is_file()),
        "the TCG module: {binds:?}"
    );
    assert!(!binds.iter().any(|b| b.ends_with("qemu-bridge-helper")));
}

#[test]
fn qemu_version_runs_in_the_jail() {
    let fixture = Fixture::new();
    let spec = qemu_spec(&fixture);
    let mut child = spawn_ok(&spec, QEMU, &["-version"], piped());
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read");
    assert!(wait_timeout(&child, Duration::from_secs(30)).success());
    assert!(out.starts_with("QEMU emulator version"), "{out}");
}

/// QEMU without /proc (it falls back from /proc/self/exe to argv[0]) connects its QMP monitor
/// to a unix socket the host listens on in the read-write box directory, across the network
/// namespace; the host drives it and reads its confinement from /proc.
#[test]
fn qemu_connects_to_a_host_unix_socket_from_the_jail() {
    let fixture = Fixture::new();
    let spec = qemu_spec(&fixture);
    assert!(!spec.mount_proc);
    let socket = fixture.box_dir.join("qmp.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    if let Some((uid, gid)) = spec.uid_gid {
        std::os::unix::fs::chown(&socket, Some(uid), Some(gid)).expect("chown socket");
    }
    let chardev = format!("socket,id=qmp,path={}", socket.display());
    let argv = [
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
        &chardev,
        "-mon",
        "chardev=qmp,mode=control",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ];
    let child = spawn_ok(&spec, QEMU, &argv, piped());
    let (stream, _) = listener.accept().expect("QEMU connects");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    assert!(line.starts_with("{\"QMP\":"), "{line}");

    let pid = child.pid();
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Ours, then QEMU's own -sandbox on top.
    assert_eq!(status_field(pid, "Seccomp_filters"), "2");
    let uid = jail_uid(&spec).to_string();
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some(uid.as_str())
    );
    assert_ne!(namespace("self", "net"), namespace(&pid.to_string(), "net"));

    let mut writer = stream;
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n")
        .expect("write");
    let status = wait_timeout(&child, Duration::from_secs(30));
    assert!(status.success(), "QEMU quit cleanly: {status:?}");
}

/// Every process in the jail's PID namespace, by host pid.
fn processes_in_pid_namespace(ns: &str) -> Vec<u32> {
    names("/proc")
        .into_iter()
        .filter_map(|n| n.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                .is_ok_and(|l| l.to_string_lossy() == ns)
        })
        .collect()
}

#[test]
fn kill_and_wait_leave_no_process_behind() {
    let fixture = Fixture::new();
    let spec = fixture.spec();
    let child = spawn_ok(
        &spec,
        BUSYBOX,
        &["sh", "-c", "busybox sleep 1000 & busybox sleep 1000 & wait"],
        JailStdio::default(),
    );
    let ns = namespace(&child.pid().to_string(), "pid");
    let start = Instant::now();
    let inside = loop {
        let inside = processes_in_pid_namespace(&ns);
        if inside.len() == 3 || start.elapsed() > Duration::from_secs(10) {
            break inside;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(inside.len(), 3, "sh and two sleeps: {inside:?}");
    child.kill().expect("kill");
    assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
    // The kernel kills and reaps the whole namespace with its PID 1.
    assert_eq!(processes_in_pid_namespace(&ns), Vec::<u32>::new());
    for pid in inside {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} is gone, not a zombie"
        );
    }
    // Killing or waiting again is harmless.
    child.kill().expect("kill after reap");
    assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));
}

#[test]
fn dropping_the_handle_kills_the_jail_and_detached_ones_get_reaped() {
    let fixture = Fixture::new();
    let spec = fixture.spec();
    let child = spawn_ok(&spec, BUSYBOX, &["sleep", "1000"], JailStdio::default());
    let pid = child.pid();
    drop(child);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "killed and reaped on drop"
    );

    let mut detached = fixture.spec();
    detached.die_with_parent = false;
    let child = spawn_ok(&detached, BUSYBOX, &["sleep", "1"], JailStdio::default());
    let pid = child.pid();
    drop(child);
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "a detached jail keeps running"
    );
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "reaped, not a zombie"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The helper re-executed by `the_jail_dies_with_its_parent`: spawns a jailed sleep, prints
/// its pid and waits to be killed.
#[test]
#[ignore = "helper: run by the_jail_dies_with_its_parent"]
fn helper_spawn_and_hang() {
    if std::env::var(HELPER_ENV).as_deref() != Ok("hang") {
        return;
    }
    let fixture = Fixture::new();
    let spec = fixture.spec();
    let child = spawn_ok(&spec, BUSYBOX, &["sleep", "1000"], JailStdio::default());
    println!("JAILED {}", child.pid());
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn the_jail_dies_with_its_parent() {
    // Orphans come to us instead of the host's init, so we can see how the jail ended.
    // SAFETY: a process-wide flag; the other tests reap their own children.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    // The helper dies by SIGKILL and cannot clean up: its temporary files go in ours.
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut helper = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "helper_spawn_and_hang",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "hang")
        .env("TMPDIR", scratch.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("helper");
    let mut lines = BufReader::new(helper.stdout.take().expect("stdout")).lines();
    let jailed: i32 = loop {
        let line = lines.next().expect("helper output").expect("line");
        if let Some(pid) = line.strip_prefix("JAILED ") {
            break pid.parse().expect("pid");
        }
    };
    helper.kill().expect("kill the parent");
    helper.wait().expect("reap the parent");
    // The jail got SIGKILL from its parent-death signal and was reparented to us.
    let mut status = 0;
    // SAFETY: waits for a specific pid that is now our child.
    let reaped = unsafe { libc::waitpid(jailed, &mut status, 0) };
    assert_eq!(reaped, jailed, "{}", std::io::Error::last_os_error());
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
}

/// The helper re-executed as `nobody` by `unprivileged_caller_is_confined_too`.
#[test]
#[ignore = "helper: run as nobody by unprivileged_caller_is_confined_too"]
fn helper_unprivileged() {
    if std::env::var(HELPER_ENV).as_deref() != Ok("unprivileged") {
        return;
    }
    run_unprivileged_checks();
    println!("UNPRIVILEGED-OK");
}

fn run_unprivileged_checks() {
    assert!(!is_root());
    let capabilities = probe();
    assert_eq!(capabilities.user_namespaces, Ok(()), "{capabilities:?}");
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    assert_eq!(
        spec.uid_gid, None,
        "unprivileged callers jail as themselves"
    );
    check_sleep_from_the_host(&fixture, &mut spec);
    let mut spec = fixture.spec();
    check_shell_inside(&fixture, &mut spec);
    // Mapping any other id needs privileges the caller does not have.
    let mut other = fixture.spec();
    other.uid_gid = Some((4242, 4242));
    assert!(matches!(
        spawn(&other, Path::new(BUSYBOX), &[], JailStdio::default()),
        Err(JailError::InvalidSpec(_))
    ));
    let mut disabled = fixture.spec();
    disabled.user_namespace = UserNamespace::Disable;
    assert!(matches!(
        spawn(&disabled, Path::new(BUSYBOX), &[], JailStdio::default()),
        Err(JailError::InvalidSpec(_))
    ));
}

#[test]
fn unprivileged_caller_is_confined_too() {
    if !is_root() {
        // Already unprivileged: the checks run right here.
        run_unprivileged_checks();
        return;
    }
    let nobody = 65534;
    let output = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "helper_unprivileged", "--ignored", "--nocapture"])
        .env(HELPER_ENV, "unprivileged")
        .env("TMPDIR", "/tmp")
        .uid(nobody)
        .gid(nobody)
        .output()
        .expect("run the helper as nobody");
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{out}\n{err}");
    assert!(
        out.contains("UNPRIVILEGED-OK"),
        "the helper ran its checks: {out}\n{err}"
    );
}

#[test]
fn errors_are_typed_and_say_what_to_do() {
    let fixture = Fixture::new();
    let spec = fixture.spec();
    let err = |spec: &JailSpec, program: &str| {
        spawn(spec, Path::new(program), &[], JailStdio::default()).expect_err("refused")
    };
    // Not bound at all.
    assert!(
        matches!(err(&spec, "/bin/sh"), JailError::InvalidSpec(m) if m.contains("program_binds"))
    );
    // Under a bound directory but missing there: the exec fails inside, with a hint.
    let mut dir_bound = spec.clone();
    dir_bound.ro_binds = vec![PathBuf::from("/usr/share/qemu")];
    match err(&dir_bound, "/usr/share/qemu/no-such-program") {
        JailError::Exec { source, hint, .. } => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            assert!(hint.contains("program_binds"), "{hint}");
        }
        other => panic!("{other}"),
    }
    let mut missing = spec.clone();
    missing.ro_binds.push("/no/such/path".into());
    assert!(
        matches!(err(&missing, BUSYBOX), JailError::InvalidSpec(m) if m.contains("/no/such/path"))
    );
    let mut in_proc = spec.clone();
    in_proc.ro_binds.push("/proc/self".into());
    assert!(matches!(err(&in_proc, BUSYBOX), JailError::InvalidSpec(_)));
    let mut bad_fd = spec.clone();
    bad_fd.keep_fds = vec![1];
    assert!(matches!(err(&bad_fd, BUSYBOX), JailError::InvalidSpec(m) if m.contains("keep_fds")));
    // A failure inside the child comes back as the step that failed, and the child is reaped.
    let mut long_name = spec.clone();
    long_name.hostname = "h".repeat(100);
    match err(&long_name, BUSYBOX) {
        JailError::Setup { step, source, .. } => {
            assert_eq!(step, "setting the hostname");
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
        }
        other => panic!("{other}"),
    }
    if is_root() {
        // With a user namespace, root builds the tree as the jail's uid, which cannot reach
        // the jail root (the first step) inside a 0700 directory.
        let mut hidden = spec.clone();
        hidden.user_namespace = UserNamespace::Require;
        let parent = fixture.box_dir.parent().expect("parent");
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        match err(&hidden, BUSYBOX) {
            JailError::Setup { step, source, hint } => {
                assert_eq!(step, "mounting a tmpfs as the jail's root");
                assert_eq!(source.raw_os_error(), Some(libc::EACCES));
                assert!(hint.contains("jail's uid"), "{hint}");
            }
            other => panic!("{other}"),
        }
        let mut as_root = spec.clone();
        as_root.uid_gid = None;
        assert!(
            matches!(err(&as_root, BUSYBOX), JailError::InvalidSpec(m) if m.contains("as root"))
        );
    }
}

/// Cgroup limits never fail a spawn: applied where a delegated cgroup v2 with the
/// controllers exists (then the jail is in it), skipped with a reason elsewhere (this machine:
/// a hybrid hierarchy whose v2 part offers only hugetlb).
#[test]
fn cgroup_limits_are_applied_or_skipped_with_a_reason() {
    let fixture = Fixture::new();
    let mut spec = fixture.spec();
    spec.cgroup = Some(CgroupLimits {
        parent: None,
        memory_max: Some(512 << 20),
        cpu_max: Some(CpuMax {
            quota_us: 100_000,
            period_us: 100_000,
        }),
        pids_max: Some(256),
    });
    let child = spawn_ok(&spec, BUSYBOX, &["sleep", "60"], JailStdio::default());
    match child.cgroup().clone() {
        CgroupOutcome::Applied(dir) => {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("procs");
            assert!(procs.lines().any(|p| p == child.pid().to_string()));
            assert_eq!(
                std::fs::read_to_string(dir.join("pids.max"))
                    .expect("pids.max")
                    .trim(),
                "256"
            );
            child.kill().expect("kill");
            child.wait().expect("wait");
            assert!(!dir.exists(), "removed once reaped");
        }
        CgroupOutcome::Skipped(reason) => {
            eprintln!("cgroup limits skipped: {reason}");
            assert!(!reason.is_empty());
            assert!(probe().cgroup.is_err(), "probe agrees: {reason}");
        }
        CgroupOutcome::NotRequested => panic!("requested"),
    }
}

#[test]
fn derived_ids_are_stable_unprivileged_and_spread() {
    let a = derived_jail_id(b"box-a");
    assert_eq!(a, derived_jail_id(b"box-a"));
    assert_ne!(a, derived_jail_id(b"box-b"));
    assert!((0x7000_0000..0x7100_0000).contains(&a));
}

/// Spawn overhead: a jailed `busybox true` against a plain one (printed; only sanity-checked,
/// the machine is shared).
#[test]
fn spawn_overhead_is_measured() {
    let fixture = Fixture::new();
    let spec = fixture.spec();
    let runs = 20;
    let plain = Instant::now();
    for _ in 0..runs {
        let status = Command::new(BUSYBOX).arg("true").status().expect("plain");
        assert!(status.success());
    }
    let plain = plain.elapsed() / runs;
    let jailed = Instant::now();
    for _ in 0..runs {
        let child = spawn_ok(&spec, BUSYBOX, &["true"], JailStdio::default());
        assert!(child.wait().expect("wait").success());
    }
    let jailed = jailed.elapsed() / runs;
    eprintln!(
        "spawn+wait of busybox true: plain {:.2} ms, jailed {:.2} ms, overhead {:.2} ms",
        plain.as_secs_f64() * 1e3,
        jailed.as_secs_f64() * 1e3,
        (jailed.saturating_sub(plain)).as_secs_f64() * 1e3
    );
    assert!(jailed < Duration::from_secs(1), "{jailed:?}");
}

/// Runs `script` under `sh` with the no-setid filter installed; its exit code.
fn sh_without_setid(dir: &Path, script: &str) -> i32 {
    let program = boxlite_jail::SeccompProgram::no_setid().expect("filter builds");
    let mut command = Command::new("/bin/sh");
    command.arg("-c").arg(script).current_dir(dir);
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            program.install()
        });
    }
    command.status().expect("sh runs").code().unwrap_or(-1)
}

#[test]
fn the_no_setid_filter_refuses_set_id_modes_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(sh_without_setid(dir.path(), "echo x > f && chmod 755 f"), 0);
    assert_eq!(mode("f"), 0o755);
    assert_ne!(sh_without_setid(dir.path(), "chmod 4755 f"), 0);
    assert_ne!(sh_without_setid(dir.path(), "chmod g+s f"), 0);
    assert_eq!(mode("f"), 0o755);
    // Created with the bits (openat's mode): refused at creation.
    let create = "python3 -c 'import os; os.open(\"c\", os.O_CREAT | os.O_WRONLY, 0o4755)'";
    assert_ne!(sh_without_setid(dir.path(), create), 0);
    assert!(!dir.path().join("c").exists());
    let plain = "python3 -c 'import os; os.open(\"c\", os.O_CREAT | os.O_WRONLY, 0o755)'";
    assert_eq!(sh_without_setid(dir.path(), plain), 0);
    // Other work goes on.
    assert_eq!(
        sh_without_setid(
            dir.path(),
            "mkdir d && cp f d/g && chmod 700 d/g && rm -r d"
        ),
        0
    );
}
