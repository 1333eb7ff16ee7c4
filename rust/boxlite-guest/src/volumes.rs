//! Host folders in the box (virtio-fs): loaded and mounted at `Configure`, before the box
//! init copies the agent's mounts into the box's namespace, so every command sees them.

use std::path::{Component, Path, PathBuf};

use boxlite_proto::GuestVolume;

use crate::log::log;
use crate::mounts;

/// The modules of virtio-fs, in the initramfs but loaded only for boxes with volumes.
const MODULE_LIST: &str = "/etc/boxlite/modules-volumes";

/// `path` under `root`, refusing `..` (the host checks too; the agent trusts no input).
fn target(root: &Path, path: &str) -> Result<PathBuf, String> {
    let rel = Path::new(path);
    if !rel.is_absolute()
        || rel
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("volume path {path:?} must be absolute and plain"));
    }
    Ok(root.join(rel.strip_prefix("/").unwrap_or(rel)))
}

/// Creates `dir` and its missing parents below `root` without following symlinks out of it:
/// each existing component must be a real directory.
fn make_dirs(root: &Path, dir: &Path) -> Result<(), String> {
    let rel = dir.strip_prefix(root).map_err(|_| "outside the root")?;
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(_) => {
                std::fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?
            }
        }
    }
    Ok(())
}

/// Loads virtio-fs and mounts each volume below `root`; returns the mount points.
pub fn mount_all(root: &Path, volumes: &[GuestVolume]) -> Result<Vec<PathBuf>, String> {
    if volumes.is_empty() {
        return Ok(Vec::new());
    }
    let loaded = crate::modules::load_all(Path::new(MODULE_LIST), Path::new("/lib/modules"));
    log!("volumes: {loaded} kernel modules in");
    let mut done = Vec::new();
    for v in volumes {
        let dir = target(root, &v.path)?;
        make_dirs(root, &dir)?;
        let mut flags = libc::MS_NODEV;
        if v.read_only {
            flags |= libc::MS_RDONLY;
        }
        mounts::mount(&v.tag, &dir, "virtiofs", flags, None)
            .map_err(|e| format!("mounting volume {} at {}: {e}", v.tag, v.path))?;
        done.push(dir);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_stay_below_the_root() {
        let root = Path::new("/rootfs");
        assert_eq!(
            target(root, "/data/x").unwrap(),
            PathBuf::from("/rootfs/data/x")
        );
        assert!(target(root, "data").is_err());
        assert!(target(root, "/a/../../etc").is_err());
    }
}
