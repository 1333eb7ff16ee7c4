//! Loading the kernel modules the initramfs ships (virtio transport, console, block, ...).

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::log::log;
use crate::sys;

/// The module file names listed (in load order, one per line) in `list`; blank lines and
/// `#` comments are skipped.
pub fn parse_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Loads every module named in `list` from `dir` with `finit_module`; an already loaded (or
/// built-in) module is fine. Returns how many loaded; failures are logged, not fatal.
pub fn load_all(list: &Path, dir: &Path) -> usize {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) => {
            log!("no module list at {}: {e}", list.display());
            return 0;
        }
    };
    let mut loaded = 0;
    for name in parse_list(&text) {
        let path = dir.join(name);
        let fd = match sys::open(&path, libc::O_RDONLY, 0) {
            Ok(fd) => fd,
            Err(e) => {
                log!("module {}: {e}", path.display());
                continue;
            }
        };
        let params = c"";
        // SAFETY: finit_module with a valid fd and an empty NUL-terminated parameter string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                fd.as_raw_fd(),
                params.as_ptr(),
                0 as libc::c_int,
            )
        };
        if r == 0 {
            loaded += 1;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                log!("loading module {name}: {e}");
            }
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    #[test]
    fn list_parsing() {
        let l = super::parse_list("virtio.ko\n\n# c\n  virtio_ring.ko  \n");
        assert_eq!(l, vec!["virtio.ko", "virtio_ring.ko"]);
    }
}
