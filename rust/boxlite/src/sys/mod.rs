//! What differs between host operating systems, behind small functions: one file per
//! platform (`linux.rs`; another platform is one more file).

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as platform;

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
use other as platform;

use crate::units::Bytes;

/// A process's start time (an opaque, monotonic per-boot value) and whether it is a zombie,
/// or `None` if no such process exists.
pub(crate) fn process_start(pid: u32) -> Option<(u64, bool)> {
    platform::process_start(pid)
}

/// Whether process `pid` has a fatal signal pending or is already exiting (about to be gone).
pub(crate) fn is_being_killed(pid: u32) -> bool {
    platform::is_being_killed(pid)
}

/// Total RAM of this host.
pub(crate) fn host_memory() -> Option<Bytes> {
    platform::host_memory()
}

/// Called between fork and exec: the child gets SIGKILL when the thread that spawned it
/// exits. Only async-signal-safe calls.
pub(crate) fn die_with_parent_in_child() -> std::io::Result<()> {
    platform::die_with_parent_in_child()
}

/// `n` bytes from the kernel's CSPRNG.
pub(crate) fn random_bytes(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Becomes the unprivileged `id` (uid and gid, no supplementary groups), which drops every
/// capability, and forbids regaining privileges (`no_new_privs`). For a root process that has
/// done what needed root.
pub(crate) fn drop_privileges(id: u32) -> std::io::Result<()> {
    platform::drop_privileges(id)
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
pub(crate) fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut stat) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
    }
}

fn c_name(name: &str) -> std::io::Result<std::ffi::CString> {
    if name.contains('/') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a plain file name is needed",
        ));
    }
    std::ffi::CString::new(name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Creates the new file `name` (mode 0600) in the open directory `dir`: works after the path
/// to `dir` became unreachable (a supervisor that dropped its privileges).
pub(crate) fn create_in(dir: &std::fs::File, name: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let name = c_name(name)?;
    // SAFETY: a valid directory descriptor and C string; the result is checked and owned.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a fresh descriptor.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Renames `from` to `to`, both in the open directory `dir`.
pub(crate) fn rename_in(dir: &std::fs::File, from: &str, to: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (from, to) = (c_name(from)?, c_name(to)?);
    // SAFETY: valid descriptors and C strings.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes the file `name` from the open directory `dir`.
pub(crate) fn remove_in(dir: &std::fs::File, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let name = c_name(name)?;
    // SAFETY: a valid descriptor and C string.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod at_tests {
    use super::*;

    #[test]
    fn files_are_made_renamed_and_removed_through_an_open_directory() {
        let dir = tempfile::tempdir().unwrap();
        let handle = std::fs::File::open(dir.path()).unwrap();
        let mut file = create_in(&handle, "a.partial").unwrap();
        std::io::Write::write_all(&mut file, b"x").unwrap();
        assert!(
            create_in(&handle, "a.partial").is_err(),
            "an existing file is not reused"
        );
        rename_in(&handle, "a.partial", "a").unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"x");
        remove_in(&handle, "a").unwrap();
        assert!(!dir.path().join("a").exists());
        assert!(create_in(&handle, "../escape").is_err());
    }
}
