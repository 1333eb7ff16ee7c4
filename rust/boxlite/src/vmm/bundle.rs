//! Finding the guest bundle: the kernel and the initramfs whose `/init` is the agent.

use std::path::{Path, PathBuf};

use crate::error::{BoxliteError, BoxliteResult};

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
pub const MANIFEST_FILE: &str = "manifest.json";

/// A guest bundle on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestBundle {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestBundle {
    /// Looks in `$BOXLITE_GUEST_DIR`, then `package_dir` (the one shipped with the installed
    /// package), then `<home>/guest`; the first directory holding a kernel and an initramfs wins.
    pub fn locate(package_dir: Option<&Path>, home: &Path) -> BoxliteResult<Self> {
        let from_env = std::env::var_os("BOXLITE_GUEST_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(dir) = &from_env {
            // An explicit choice that is wrong is an error, not a reason to look elsewhere.
            return Self::at(dir).ok_or_else(|| {
                BoxliteError::engine_unavailable(
                    format!(
                        "BOXLITE_GUEST_DIR={} holds no {KERNEL_FILE} and {INITRAMFS_FILE}",
                        dir.display()
                    ),
                    "point it at a built guest bundle (`make guest` writes one to build/guest)",
                )
            });
        }
        let candidates: Vec<PathBuf> = package_dir
            .map(Path::to_path_buf)
            .into_iter()
            .chain([home.join("guest")])
            .collect();
        candidates.iter().find_map(|dir| Self::at(dir)).ok_or_else(|| {
            let searched: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
            BoxliteError::engine_unavailable(
                format!("no guest bundle (kernel + initramfs) found in {}", searched.join(", ")),
                "build it with `make guest` and set BOXLITE_GUEST_DIR=build/guest, or reinstall the package",
            )
        })
    }

    fn at(dir: &Path) -> Option<Self> {
        let kernel = dir.join(KERNEL_FILE);
        let initramfs = dir.join(INITRAMFS_FILE);
        (kernel.is_file() && initramfs.is_file()).then(|| Self {
            dir: dir.to_path_buf(),
            kernel,
            initramfs,
        })
    }

    /// The bundle's manifest (versions and hashes), if it has one.
    pub fn manifest(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join(MANIFEST_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_without_both_files_is_not_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        assert!(GuestBundle::at(dir.path()).is_none());
        std::fs::write(dir.path().join(KERNEL_FILE), b"k").unwrap();
        assert!(GuestBundle::at(dir.path()).is_none());
        std::fs::write(dir.path().join(INITRAMFS_FILE), b"i").unwrap();
        let bundle = GuestBundle::at(dir.path()).unwrap();
        assert_eq!(bundle.kernel, dir.path().join(KERNEL_FILE));
    }
}
