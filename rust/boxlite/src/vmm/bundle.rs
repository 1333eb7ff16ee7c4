//! Finding the guest bundle: the kernel and the initramfs whose `/init` is the agent.

use std::path::{Path, PathBuf};

use crate::error::{BoxliteError, BoxliteResult, IoContext};

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

    /// A kernel file for engines that load a saved VM (`-incoming`): the bundle kernel's
    /// setup header and a token payload. QEMU still wants a Linux image to lay out its boot
    /// ROM (the saved state expects that ROM), but never runs it, and it keeps whatever
    /// `-kernel` names in memory for the VM's life: ~14 MiB per box for the real one.
    /// Written once into `dir`, named by its content.
    pub fn resume_kernel(&self, dir: &Path) -> BoxliteResult<PathBuf> {
        let stub = resume_kernel_bytes(&self.kernel)?;
        let digest = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(&stub)[..8]);
        let path = dir.join(format!("resume-{digest}.bzimage"));
        if std::fs::read(&path).ok().as_deref() != Some(stub.as_slice()) {
            std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
            crate::fsutil::write_atomically(&path, &stub)?;
        }
        Ok(path)
    }

    /// The bundle's manifest (versions and hashes), if it has one.
    pub fn manifest(&self) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join(MANIFEST_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The setup sectors of an x86 bzImage (boot protocol 2.x) followed by one page of zeros.
fn resume_kernel_bytes(kernel: &Path) -> BoxliteResult<Vec<u8>> {
    const SETUP_SECTS: usize = 0x1f1;
    const MAGIC: std::ops::Range<usize> = 0x202..0x206;
    let mut head = vec![0u8; 64 * 1024];
    let mut file = std::fs::File::open(kernel).ctx(|| format!("opening {}", kernel.display()))?;
    let read = read_up_to(&mut file, &mut head).ctx(|| format!("reading {}", kernel.display()))?;
    head.truncate(read);
    if head.len() < MAGIC.end || &head[MAGIC] != b"HdrS" {
        return Err(BoxliteError::engine_unavailable(
            format!(
                "{} is not a Linux bzImage (no HdrS header)",
                kernel.display()
            ),
            "rebuild the guest bundle with `make guest`",
        ));
    }
    // 0 means 4 (boot protocol); plus the boot sector itself.
    let sectors = match head[SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let setup = (sectors + 1) * 512;
    if head.len() < setup {
        return Err(BoxliteError::engine_unavailable(
            format!(
                "{} is shorter than its own setup header says",
                kernel.display()
            ),
            "rebuild the guest bundle with `make guest`",
        ));
    }
    head.truncate(setup);
    head.resize(setup + 4096, 0);
    Ok(head)
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
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

    fn fake_bzimage(setup_sects: u8, len: usize) -> Vec<u8> {
        let mut image: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image
    }

    #[test]
    fn the_resume_kernel_is_the_setup_header_and_one_page() {
        let dir = tempfile::tempdir().unwrap();
        let image = fake_bzimage(2, 100_000);
        std::fs::write(dir.path().join(KERNEL_FILE), &image).unwrap();
        std::fs::write(dir.path().join(INITRAMFS_FILE), b"i").unwrap();
        let bundle = GuestBundle::at(dir.path()).unwrap();
        let out = dir.path().join("boot");
        let stub = std::fs::read(bundle.resume_kernel(&out).unwrap()).unwrap();
        assert_eq!(stub.len(), 3 * 512 + 4096);
        assert_eq!(&stub[..3 * 512], &image[..3 * 512]);
        assert!(stub[3 * 512..].iter().all(|&b| b == 0));
        // Written once: a second call finds the same file.
        assert_eq!(
            bundle.resume_kernel(&out).unwrap(),
            bundle.resume_kernel(&out).unwrap()
        );
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        // setup_sects 0 means 4.
        std::fs::write(dir.path().join(KERNEL_FILE), fake_bzimage(0, 100_000)).unwrap();
        let stub = std::fs::read(bundle.resume_kernel(&out).unwrap()).unwrap();
        assert_eq!(stub.len(), 5 * 512 + 4096);
    }

    #[test]
    fn a_kernel_without_a_linux_header_has_no_resume_kernel() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KERNEL_FILE), vec![0u8; 8192]).unwrap();
        std::fs::write(dir.path().join(INITRAMFS_FILE), b"i").unwrap();
        let bundle = GuestBundle::at(dir.path()).unwrap();
        assert!(bundle.resume_kernel(dir.path()).is_err());
        // A header that claims more setup than the file has.
        std::fs::write(dir.path().join(KERNEL_FILE), fake_bzimage(60, 4096)).unwrap();
        assert!(bundle.resume_kernel(dir.path()).is_err());
    }
}
