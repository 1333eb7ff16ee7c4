//! Before a VM is saved as a template, the files nearly every command of a box reads first (its
//! shell, loader, C library and account files) are read into the page cache: boxes restored
//! from the template find them in memory instead of reading them through their disk chain
//! (measured under TCG: a clone's first `true` in busybox took ~75 ms with a cold cache, ~30 ms
//! with `/bin/busybox` cached).

use std::io;
use std::path::Path;

use crate::sys;

/// Paths below the box root, each read if it is a regular file (symlinks resolve inside the
/// root); most images have a few of them.
const COMMON_FILES: &[&str] = &[
    "bin/sh",
    "usr/bin/env",
    "lib/ld-musl-x86_64.so.1",
    "lib64/ld-linux-x86-64.so.2",
    "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "lib64/libc.so.6",
    "etc/ld.so.cache",
    "etc/passwd",
    "etc/group",
];

/// A file larger than this is not read (an image's odd `/bin/sh` must not fill the template).
const FILE_LIMIT: u64 = 16 * 1024 * 1024;

/// Reads [`COMMON_FILES`] under `root`; returns the bytes read.
pub fn common_files(root: &Path) -> u64 {
    COMMON_FILES
        .iter()
        .filter_map(|rel| read_file(root, rel).ok())
        .sum()
}

fn read_file(root: &Path, rel: &str) -> io::Result<u64> {
    // Non-blocking: a FIFO planted by the image must not hang the agent.
    let file = sys::open_in_root(root, rel, libc::O_NONBLOCK)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || meta.len() > FILE_LIMIT {
        return Ok(0);
    }
    io::copy(&mut io::Read::take(file, FILE_LIMIT), &mut io::sink())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_regular_files_inside_the_root_only() {
        let root = std::env::temp_dir().join(format!("boxlite-warm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("bin/busybox"), vec![7u8; 4096]).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        // A FIFO and a link out of the root are skipped without blocking.
        let fifo = std::ffi::CString::new(root.join("etc/group").to_str().unwrap()).unwrap();
        // SAFETY: a valid C path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc/hostname", root.join("usr/bin/env"))
            .unwrap();
        assert_eq!(common_files(&root), 4096 + 26);
        let _ = std::fs::remove_dir_all(&root);
    }
}
