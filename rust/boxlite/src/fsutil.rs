//! The crate's one way to replace a file atomically and its one file lock.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{BoxliteError, BoxliteResult, IoContext};

/// Writes `data` to a temporary sibling, syncs it, renames it over `path` and syncs the
/// directory: readers see the old content or the new, never a part.
pub(crate) fn write_atomically(path: &Path, data: &[u8]) -> BoxliteResult<()> {
    let tmp = path.with_extension(format!("tmp.{}", ulid::Ulid::new()));
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let mut file = std::fs::File::create(&tmp).ctx(|| format!("writing {}", tmp.display()))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("renaming into {}", path.display()))?;
    guard.disarm();
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes a rename or a new entry in `dir` durable (best effort: not every filesystem can).
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Deletes a file when dropped, unless disarmed: temporaries that must not outlive a failure.
#[derive(Debug)]
pub(crate) struct RemoveOnDrop(pub Option<PathBuf>);

impl RemoveOnDrop {
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Whether a lock lets others hold it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

impl LockMode {
    fn op(self) -> libc::c_int {
        match self {
            Self::Shared => libc::LOCK_SH,
            Self::Exclusive => libc::LOCK_EX,
        }
    }
}

/// An advisory `flock` on a file, across processes; released when dropped, and by the kernel
/// when the process dies, so a crash never leaves a lock behind.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    /// Opens (creating) `path` and waits for the lock.
    pub fn acquire_blocking(path: &Path, mode: LockMode) -> BoxliteResult<Self> {
        let file = open_lock_file(path)?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), mode.op()) } == 0 {
                return Ok(Self { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(BoxliteError::io(format!("locking {}", path.display()), e));
            }
        }
    }

    /// Takes the lock if it is free now; `None` while another holds it.
    pub fn try_acquire(path: &Path, mode: LockMode) -> BoxliteResult<Option<Self>> {
        let file = open_lock_file(path)?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), mode.op() | libc::LOCK_NB) } == 0 {
                return Ok(Some(Self { _file: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(BoxliteError::io(format!("locking {}", path.display()), e)),
            }
        }
    }

    /// Like `acquire_blocking`, waiting off the async threads.
    pub async fn acquire(path: PathBuf, mode: LockMode) -> BoxliteResult<Self> {
        tokio::task::spawn_blocking(move || Self::acquire_blocking(&path, mode))
            .await
            .map_err(|e| BoxliteError::Internal(format!("lock task failed: {e}")))?
    }

    /// Whether some process holds a lock on `path` now (probed without waiting; a missing
    /// file is free).
    pub fn is_held(path: &Path) -> bool {
        let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; a successful probe is released at close.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
    }
}

/// A lock file, created if missing, never truncated (its contents do not matter).
fn open_lock_file(path: &Path) -> BoxliteResult<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("opening lock {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing_dir = dir.path().join("nope").join("f");
        assert!(write_atomically(&missing_dir, b"x").is_err());
    }

    #[test]
    fn locks_exclude_and_share() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        assert!(!FileLock::is_held(&path));
        let shared = FileLock::acquire_blocking(&path, LockMode::Shared).unwrap();
        let also = FileLock::acquire_blocking(&path, LockMode::Shared).unwrap();
        assert!(FileLock::is_held(&path));
        drop((shared, also));
        assert!(!FileLock::is_held(&path));
        let _exclusive = FileLock::acquire_blocking(&path, LockMode::Exclusive).unwrap();
        assert!(FileLock::is_held(&path));
    }
}
