//! Cgroup v2 limits for a jail, applied only in a delegated, writable cgroup; every failure is
//! a reason to skip, never a reason to fail the spawn.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::CgroupLimits;

/// The cgroup v2 mount point and the caller's own cgroup in it.
fn own_cgroup() -> Result<PathBuf, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    // Fields: id parent major:minor root mount-point options ... - fstype source options.
    let mount = mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .ok_or("no cgroup v2 file system is mounted (cgroup v1 only)")?;
    let own = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or("the caller is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
    let path = path.trim_start_matches('/');
    Ok(if path.is_empty() {
        mount
    } else {
        mount.join(path)
    })
}

fn words(path: &Path) -> Result<Vec<String>, String> {
    fs::read_to_string(path)
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn required(limits: &CgroupLimits) -> Vec<&'static str> {
    let mut needed = Vec::new();
    if limits.memory_max.is_some() {
        needed.push("memory");
    }
    if limits.cpu_max.is_some() {
        needed.push("cpu");
    }
    if limits.pids_max.is_some() {
        needed.push("pids");
    }
    needed
}

/// Checks that `parent` can hold a child cgroup with `needed` controllers, without
/// changing anything.
fn check_parent(parent: &Path, needed: &[&str]) -> Result<(), String> {
    let available = words(&parent.join("cgroup.controllers"))?;
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|c| !available.iter().any(|a| a == c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} offers the controllers [{}], not [{}] (on a hybrid cgroup v1/v2 host they \
             belong to v1); delegate them to a cgroup v2 and pass it as CgroupLimits.parent",
            parent.display(),
            available.join(" "),
            missing.join(" ")
        ));
    }
    let writable = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes()).is_ok_and(|c| {
        // SAFETY: a NUL-terminated path and a flag; access() only reads them.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    });
    if !writable {
        return Err(format!(
            "{} is not writable by this user (not delegated); pass a delegated cgroup as \
             CgroupLimits.parent (systemd: Delegate=yes)",
            parent.display()
        ));
    }
    Ok(())
}

/// The cgroup [`CgroupLimits`] with no parent would use, if it is usable for all of memory,
/// cpu and pids (for [`crate::probe`]).
pub(super) fn probe() -> Result<PathBuf, String> {
    let parent = own_cgroup()?;
    check_parent(&parent, &["memory", "cpu", "pids"])?;
    Ok(parent)
}

/// Creates the jail's cgroup under `parent` (the caller's own when `None`) with the limits
/// written, ready for the child's pid.
pub(super) fn create(limits: &CgroupLimits) -> Result<PathBuf, String> {
    let parent = match &limits.parent {
        Some(parent) => parent.clone(),
        None => own_cgroup()?,
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "boxlite-jail-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    create_in(&parent, &name, limits)
}

pub(super) fn create_in(
    parent: &Path,
    name: &str,
    limits: &CgroupLimits,
) -> Result<PathBuf, String> {
    let needed = required(limits);
    check_parent(parent, &needed)?;
    let enabled = words(&parent.join("cgroup.subtree_control"))?;
    let to_enable: Vec<String> = needed
        .iter()
        .filter(|c| !enabled.iter().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if !to_enable.is_empty() {
        fs::write(parent.join("cgroup.subtree_control"), to_enable.join(" ")).map_err(|e| {
            let why = if e.raw_os_error() == Some(libc::EBUSY) {
                " (it has processes of its own: a cgroup with members cannot enable \
                 controllers for children; pass an empty delegated cgroup as CgroupLimits.parent)"
            } else {
                ""
            };
            format!(
                "cannot enable {} in {}/cgroup.subtree_control: {e}{why}",
                to_enable.join(" "),
                parent.display()
            )
        })?;
    }
    let dir = parent.join(name);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    let mut writes = Vec::new();
    if let Some(bytes) = limits.memory_max {
        writes.push(("memory.max", bytes.to_string()));
    }
    if let Some(cpu) = limits.cpu_max {
        writes.push(("cpu.max", format!("{} {}", cpu.quota_us, cpu.period_us)));
    }
    if let Some(pids) = limits.pids_max {
        writes.push(("pids.max", pids.to_string()));
    }
    for (file, value) in writes {
        if let Err(e) = fs::write(dir.join(file), &value) {
            remove(&dir);
            return Err(format!(
                "cannot write {value} to {}/{file}: {e}",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// Moves `pid` into `dir` (before the child runs anything of its own).
pub(super) fn attach(dir: &Path, pid: libc::pid_t) -> Result<(), String> {
    fs::write(dir.join("cgroup.procs"), pid.to_string())
        .map_err(|e| format!("cannot move pid {pid} into {}: {e}", dir.display()))
}

/// Removes a jail's cgroup once its processes are gone (the kernel may lag a moment).
pub(super) fn remove(dir: &Path) {
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            // Not a real cgroup (tests): its files are ordinary files.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                let _ = fs::remove_dir_all(dir);
                return;
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuMax;

    fn fake_parent(controllers: &str, subtree: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("cgroup.controllers"), controllers).expect("write");
        fs::write(dir.path().join("cgroup.subtree_control"), subtree).expect("write");
        dir
    }

    fn limits() -> CgroupLimits {
        CgroupLimits {
            parent: None,
            memory_max: Some(256 << 20),
            cpu_max: Some(CpuMax {
                quota_us: 50_000,
                period_us: 100_000,
            }),
            pids_max: Some(64),
        }
    }

    #[test]
    fn writes_limits_and_enables_controllers() {
        let parent = fake_parent("cpuset cpu io memory pids", "");
        let dir = create_in(parent.path(), "j", &limits()).expect("applied");
        let read = |f: &str| fs::read_to_string(dir.join(f)).expect("read");
        assert_eq!(read("memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("pids.max"), "64");
        let enabled =
            fs::read_to_string(parent.path().join("cgroup.subtree_control")).expect("read");
        assert_eq!(enabled, "+memory +cpu +pids");
        attach(&dir, 4242).expect("attach");
        assert_eq!(read("cgroup.procs"), "4242");
        remove(&dir);
        assert!(!dir.exists());
    }

    #[test]
    fn missing_controllers_are_a_reason_not_an_error() {
        // What this machine's hybrid hierarchy offers in cgroup v2.
        let parent = fake_parent("hugetlb", "");
        let reason = create_in(parent.path(), "j", &limits()).expect_err("skipped");
        assert!(reason.contains("not [memory cpu pids]"), "{reason}");
        assert!(!parent.path().join("j").exists());
    }

    #[test]
    fn only_needed_controllers_matter() {
        let parent = fake_parent("pids", "pids");
        let only_pids = CgroupLimits {
            pids_max: Some(8),
            ..CgroupLimits::default()
        };
        let dir = create_in(parent.path(), "j", &only_pids).expect("applied");
        assert_eq!(fs::read_to_string(dir.join("pids.max")).expect("read"), "8");
        assert!(!dir.join("memory.max").exists());
    }
}
