//! Turns a [`JailSpec`] into a [`Plan`]: every path, string and number the child needs,
//! validated and allocated before cloning, so the child only makes syscalls.

use std::collections::HashSet;
use std::ffi::{c_char, c_int, c_ulong, CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::sys::{self, Resource};
use crate::{JailError, JailSpec, Seccomp, UserNamespace};

/// One step of building the jail's tree.
pub(super) enum Op {
    Mkdir(CString),
    Touch(CString),
    Tmpfs {
        target: CString,
        flags: c_ulong,
        data: CString,
    },
    /// A non-recursive bind, then a remount with `remount` flags.
    Bind {
        source: CString,
        target: CString,
        remount: c_ulong,
    },
    Proc(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Remount {
        target: CString,
        flags: c_ulong,
    },
}

/// The id maps the parent writes for a child in a new user namespace.
pub(super) struct Maps {
    pub uid_map: String,
    pub gid_map: String,
    pub deny_setgroups: bool,
}

pub(super) struct Plan {
    pub clone_flags: c_int,
    pub maps: Option<Maps>,
    pub root: CString,
    pub ops: Vec<Op>,
    /// What each op does, for error messages.
    pub op_names: Vec<String>,
    pub hostname: CString,
    pub rlimits: Vec<(Resource, u64)>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub set_groups: bool,
    /// In a user namespace, take the jail's (mapped) ids before building the tree: files
    /// cannot be created by an id the namespace does not map (EOVERFLOW). The namespace's
    /// capabilities survive, since its uid 0 is unmapped.
    pub switch_ids_early: bool,
    pub last_cap: u32,
    pub seccomp: Option<Vec<libc::sock_filter>>,
    pub die_with_parent: bool,
    /// Sorted, all >= 3.
    pub keep_fds: Vec<c_int>,
    pub program: CString,
    pub program_path: PathBuf,
    _argv: Vec<CString>,
    pub argv: Vec<*const c_char>,
    _envp: Vec<CString>,
    pub envp: Vec<*const c_char>,
}

const NAMESPACES: c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

pub(super) fn cstring(bytes: impl Into<Vec<u8>>, what: &str) -> Result<CString, JailError> {
    CString::new(bytes).map_err(|_| JailError::InvalidSpec(format!("{what} contains a NUL byte")))
}

fn path_cstring(path: &Path) -> Result<CString, JailError> {
    cstring(path.as_os_str().as_bytes(), &path.display().to_string())
}

/// Absolute, without `.`/`..`, not `/` itself.
fn check_path(path: &Path, what: &str) -> Result<(), JailError> {
    let clean = path.is_absolute()
        && path.components().count() > 1
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if clean {
        Ok(())
    } else {
        Err(JailError::InvalidSpec(format!(
            "{what} {} must be an absolute path without . or .. and not /",
            path.display()
        )))
    }
}

/// `root` joined with the absolute `path`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    ReadOnly,
    ReadWrite,
    Device,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::ReadOnly => "read-only",
            Kind::ReadWrite => "read-write",
            Kind::Device => "device",
        }
    }
}

struct Builder {
    root: PathBuf,
    ops: Vec<Op>,
    names: Vec<String>,
    created: HashSet<PathBuf>,
}

impl Builder {
    fn push(&mut self, op: Op, name: String) {
        self.ops.push(op);
        self.names.push(name);
    }

    /// Creates the directories leading to `path` (absolute, inside the jail).
    fn parents(&mut self, path: &Path) -> Result<(), JailError> {
        let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
        ancestors.reverse();
        for dir in ancestors.into_iter().filter(|d| *d != Path::new("/")) {
            self.mkdir(dir)?;
        }
        Ok(())
    }

    fn mkdir(&mut self, dir: &Path) -> Result<(), JailError> {
        if self.created.insert(dir.to_path_buf()) {
            let host = under(&self.root, dir);
            self.push(
                Op::Mkdir(path_cstring(&host)?),
                format!("creating {}", dir.display()),
            );
        }
        Ok(())
    }

    fn touch(&mut self, file: &Path) -> Result<(), JailError> {
        if self.created.insert(file.to_path_buf()) {
            let host = under(&self.root, file);
            self.push(
                Op::Touch(path_cstring(&host)?),
                format!("creating {}", file.display()),
            );
        }
        Ok(())
    }

    fn bind(&mut self, path: &Path, kind: Kind, create: bool) -> Result<(), JailError> {
        let source = path_cstring(path)?;
        let metadata = std::fs::metadata(path).map_err(|e| {
            JailError::InvalidSpec(format!(
                "{} bind {} is not accessible: {e}",
                kind.name(),
                path.display()
            ))
        })?;
        if create {
            self.parents(path)?;
            if metadata.is_dir() {
                self.mkdir(path)?;
            } else {
                self.touch(path)?;
            }
        }
        // In a user namespace the source mount's nosuid/nodev/noexec/ro are locked: keep them.
        let inherited = sys::mount_flags(&source)
            .map_err(|e| JailError::io(format!("statvfs {}", path.display()), e))?;
        let base = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | inherited;
        let remount = match kind {
            Kind::ReadOnly => base | libc::MS_RDONLY | libc::MS_NODEV,
            Kind::ReadWrite => base | libc::MS_NODEV | libc::MS_NOEXEC,
            Kind::Device => base | libc::MS_NOEXEC,
        };
        let target = path_cstring(&under(&self.root, path))?;
        self.push(
            Op::Bind {
                source,
                target,
                remount,
            },
            format!("binding {} ({})", path.display(), kind.name()),
        );
        Ok(())
    }
}

/// The binds in mount order (parents first), dropping binds nested in a bind of the same
/// kind; the flag says whether the mount point must be created (not inside another bind,
/// whose source already holds it).
fn ordered_binds(spec: &JailSpec) -> Result<Vec<(PathBuf, Kind, bool)>, JailError> {
    let mut all: Vec<(PathBuf, Kind)> = Vec::new();
    for (paths, kind) in [
        (&spec.ro_binds, Kind::ReadOnly),
        (&spec.rw_binds, Kind::ReadWrite),
    ] {
        for path in paths {
            check_path(path, &format!("{} bind", kind.name()))?;
            for reserved in ["/proc", "/dev"] {
                if path.starts_with(reserved) {
                    return Err(JailError::InvalidSpec(format!(
                        "bind {} is inside {reserved}, which the jail builds itself (put device \
                         nodes in JailSpec::devices, set mount_proc for /proc)",
                        path.display()
                    )));
                }
            }
            if path == Path::new("/tmp") && spec.tmp_size_mib.is_some() {
                return Err(JailError::InvalidSpec(
                    "a bind of /tmp conflicts with the private /tmp: set tmp_size_mib: None".into(),
                ));
            }
            // The jail's tmpfs on the root would hide it.
            if path.starts_with(&spec.root) {
                return Err(JailError::InvalidSpec(format!(
                    "bind {} is inside the jail root {}",
                    path.display(),
                    spec.root.display()
                )));
            }
            all.push((path.clone(), kind));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut ordered: Vec<(PathBuf, Kind, bool)> = Vec::new();
    for (path, kind) in all {
        if let Some((_, other, _)) = ordered.iter().find(|(p, _, _)| p == &path) {
            if *other != kind {
                return Err(JailError::InvalidSpec(format!(
                    "{} is bound both read-only and read-write",
                    path.display()
                )));
            }
            continue;
        }
        let enclosing = ordered
            .iter()
            .filter(|(p, _, _)| path.starts_with(p))
            .max_by_key(|(p, _, _)| p.as_os_str().len())
            .map(|(_, k, _)| *k);
        match enclosing {
            Some(k) if k == kind => {}
            Some(_) => ordered.push((path, kind, false)),
            None => ordered.push((path, kind, true)),
        }
    }
    Ok(ordered)
}

fn read_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Whether the spawn uses a user namespace, decided from the spec and the host.
pub(super) fn use_user_namespace(spec: &JailSpec, root: bool) -> Result<bool, JailError> {
    match spec.user_namespace {
        UserNamespace::Disable if !root => Err(JailError::InvalidSpec(
            "UserNamespace::Disable needs root: an unprivileged caller can only create \
             namespaces inside a user namespace"
                .into(),
        )),
        UserNamespace::Disable => Ok(false),
        UserNamespace::Require => Ok(true),
        // Root: jailer-style, the namespaces stay owned by the host's user namespace, so the
        // tree is built with root's rights (any bind source, correctly owned mount points).
        UserNamespace::Auto => Ok(!root),
    }
}

pub(super) fn build(spec: &JailSpec, program: &Path, args: &[OsString]) -> Result<Plan, JailError> {
    let root_caller = sys::geteuid() == 0;
    let userns = use_user_namespace(spec, root_caller)?;
    let (euid, egid) = (sys::geteuid(), sys::getegid());

    let (uid, gid) = match spec.uid_gid {
        None if root_caller => {
            return Err(JailError::InvalidSpec(
                "refusing to run a jail as root: set uid_gid to a dedicated unprivileged id \
                 (JailSpec::new uses derived_jail_id)"
                    .into(),
            ))
        }
        None => (euid, egid),
        Some((0, _)) | Some((_, 0)) if root_caller => {
            return Err(JailError::InvalidSpec(
                "uid_gid must not be 0: the jail's id must be unprivileged".into(),
            ))
        }
        Some(ids) if !root_caller && ids != (euid, egid) => {
            return Err(JailError::InvalidSpec(format!(
                "an unprivileged caller (uid {euid}, gid {egid}) can only jail as itself, \
                 not as {ids:?}: use uid_gid: None"
            )))
        }
        Some(ids) => ids,
    };
    if !root_caller && !spec.groups.is_empty() {
        return Err(JailError::InvalidSpec(
            "supplementary groups need root; an unprivileged caller's jail keeps its groups".into(),
        ));
    }
    let mut groups: Vec<u32> = spec.groups.clone();
    groups.sort_unstable();
    groups.dedup();

    let maps = userns.then(|| {
        if root_caller {
            let mut gid_map = format!("{gid} {gid} 1\n");
            for g in groups.iter().filter(|g| **g != gid) {
                gid_map.push_str(&format!("{g} {g} 1\n"));
            }
            Maps {
                uid_map: format!("{uid} {uid} 1\n"),
                gid_map,
                deny_setgroups: false,
            }
        } else {
            Maps {
                uid_map: format!("{euid} {euid} 1\n"),
                gid_map: format!("{egid} {egid} 1\n"),
                deny_setgroups: true,
            }
        }
    });

    check_path(&spec.root, "the jail root")?;
    if !spec.root.is_dir() {
        return Err(JailError::InvalidSpec(format!(
            "the jail root {} is not an existing directory",
            spec.root.display()
        )));
    }
    check_path(program, "the program")?;
    let binds = ordered_binds(spec)?;
    let program_bind = binds
        .iter()
        .filter(|(p, _, _)| program.starts_with(p))
        .max_by_key(|(p, _, _)| p.as_os_str().len());
    match program_bind {
        Some((_, Kind::ReadOnly, _)) => {}
        Some((p, _, _)) => {
            return Err(JailError::InvalidSpec(format!(
                "the program {} is inside the read-write bind {}, which is noexec; bind it \
                 read-only",
                program.display(),
                p.display()
            )))
        }
        None => {
            return Err(JailError::InvalidSpec(format!(
                "the program {} is not inside any read-only bind; add program_binds() of it",
                program.display()
            )))
        }
    }

    let mut b = Builder {
        root: spec.root.clone(),
        ops: Vec::new(),
        names: Vec::new(),
        created: HashSet::new(),
    };
    let root_c = path_cstring(&spec.root)?;
    b.push(
        Op::Tmpfs {
            target: root_c.clone(),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: cstring("mode=0755,size=1m,nr_inodes=16384", "tmpfs options")?,
        },
        "mounting a tmpfs as the jail's root".into(),
    );

    b.mkdir(Path::new("/dev"))?;
    for device in &spec.devices {
        check_path(device, "device")?;
        if device.parent() != Some(Path::new("/dev")) {
            return Err(JailError::InvalidSpec(format!(
                "device {} must be directly in /dev",
                device.display()
            )));
        }
        b.touch(device)?;
        b.bind(device, Kind::Device, false)?;
    }
    if spec.mount_proc {
        for (target, link) in [
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
        ] {
            b.push(
                Op::Symlink {
                    target: cstring(target, target)?,
                    link: path_cstring(&under(&spec.root, Path::new(link)))?,
                },
                format!("linking {link}"),
            );
        }
    }
    if let Some(mib) = spec.tmp_size_mib {
        b.mkdir(Path::new("/tmp"))?;
        b.push(
            Op::Tmpfs {
                target: path_cstring(&under(&spec.root, Path::new("/tmp")))?,
                flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data: cstring(format!("mode=1777,size={mib}m"), "tmpfs options")?,
            },
            "mounting the private /tmp".into(),
        );
    }
    if spec.mount_proc {
        b.mkdir(Path::new("/proc"))?;
        b.push(
            Op::Proc(path_cstring(&under(&spec.root, Path::new("/proc")))?),
            "mounting /proc".into(),
        );
    }
    for (path, kind, create) in &binds {
        b.bind(path, *kind, *create)?;
    }
    b.push(
        Op::Remount {
            target: root_c.clone(),
            flags: libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV,
        },
        "making the jail's root read-only".into(),
    );

    let mut rlimits = Vec::new();
    for (resource, value) in [
        (libc::RLIMIT_NOFILE, spec.rlimits.nofile),
        (libc::RLIMIT_NPROC, spec.rlimits.nproc),
        (libc::RLIMIT_CORE, spec.rlimits.core),
        (libc::RLIMIT_AS, spec.rlimits.address_space),
        (libc::RLIMIT_MEMLOCK, spec.rlimits.memlock),
    ] {
        if let Some(value) = value {
            // Raising a hard limit needs CAP_SYS_RESOURCE: never ask for more than we have.
            rlimits.push((resource, value.min(sys::hard_limit(resource))));
        }
    }

    let seccomp = match spec.seccomp {
        Seccomp::Disabled => None,
        Seccomp::Vmm => Some(super::seccomp::vmm_filter().map_err(JailError::InvalidSpec)?),
    };

    let mut keep_fds = spec.keep_fds.clone();
    keep_fds.sort_unstable();
    keep_fds.dedup();
    for fd in &keep_fds {
        if *fd < 3 || !sys::fd_is_open(*fd) {
            return Err(JailError::InvalidSpec(format!(
                "keep_fds: {fd} is not an open descriptor >= 3 (stdio goes in JailStdio)"
            )));
        }
    }

    let program_c = path_cstring(program)?;
    let mut argv = vec![program_c.clone()];
    for arg in args {
        argv.push(cstring(arg.as_bytes(), "an argument")?);
    }
    let mut envp = Vec::new();
    for (key, value) in &spec.env {
        if key.is_empty() || key.as_bytes().contains(&b'=') {
            return Err(JailError::InvalidSpec(format!(
                "environment variable name {key:?} is empty or contains '='"
            )));
        }
        let mut entry = OsString::from(key);
        entry.push("=");
        entry.push(value);
        envp.push(cstring(OsStr::as_bytes(&entry), "an environment variable")?);
    }
    let pointers = |strings: &[CString]| {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };

    Ok(Plan {
        clone_flags: NAMESPACES | if userns { libc::CLONE_NEWUSER } else { 0 },
        maps,
        root: root_c,
        ops: b.ops,
        op_names: b.names,
        hostname: cstring(spec.hostname.as_bytes(), "the hostname")?,
        rlimits,
        uid,
        gid,
        groups: groups.clone(),
        set_groups: root_caller,
        switch_ids_early: userns,
        last_cap: read_last_cap(),
        seccomp,
        die_with_parent: spec.die_with_parent,
        keep_fds,
        program: program_c,
        program_path: program.to_path_buf(),
        argv: pointers(&argv),
        _argv: argv,
        envp: pointers(&envp),
        _envp: envp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ro: &[&str], rw: &[&str]) -> JailSpec {
        let mut spec = JailSpec::new("/nonexistent-jail-root");
        spec.ro_binds = ro.iter().map(PathBuf::from).collect();
        spec.rw_binds = rw.iter().map(PathBuf::from).collect();
        spec
    }

    #[test]
    fn nested_binds_of_the_same_kind_collapse() {
        let binds = ordered_binds(&spec(&["/usr/share/qemu/keymaps", "/usr/share/qemu"], &[]))
            .expect("valid");
        assert_eq!(
            binds,
            [(PathBuf::from("/usr/share/qemu"), Kind::ReadOnly, true)]
        );
    }

    #[test]
    fn a_read_only_file_inside_a_read_write_dir_is_mounted_on_top() {
        let binds = ordered_binds(&spec(&["/box/config"], &["/box"])).expect("valid");
        assert_eq!(
            binds,
            [
                (PathBuf::from("/box"), Kind::ReadWrite, true),
                (PathBuf::from("/box/config"), Kind::ReadOnly, false)
            ]
        );
    }

    #[test]
    fn reserved_and_relative_paths_are_refused() {
        for bad in ["/proc/self", "/dev/kvm", "relative", "/a/../b", "/"] {
            assert!(ordered_binds(&spec(&[bad], &[])).is_err(), "{bad}");
        }
        assert!(ordered_binds(&spec(&["/x"], &["/x"])).is_err());
        assert!(ordered_binds(&spec(&["/nonexistent-jail-root/a"], &[])).is_err());
    }
}
