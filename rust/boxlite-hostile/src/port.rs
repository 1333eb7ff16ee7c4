//! What PID 1 needs to reach the agent port: pseudo filesystems, the virtio modules, the port
//! itself (found by name as the real agent does), and a way to idle or power off.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PORTS_DIR: &str = "/sys/class/virtio-ports";

fn mount(source: &std::ffi::CStr, target: &str, fstype: &std::ffi::CStr) {
    let _ = std::fs::create_dir_all(target);
    let Ok(target) = std::ffi::CString::new(target) else {
        return;
    };
    // SAFETY: valid C strings; a failure is only logged by its absence of effect.
    unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID,
            std::ptr::null(),
        );
    }
}

/// /dev (for the port's node and the console), /proc and /sys (to find the port).
pub fn early_mounts() {
    mount(c"devtmpfs", "/dev", c"devtmpfs");
    mount(c"proc", "/proc", c"proc");
    mount(c"sysfs", "/sys", c"sysfs");
}

/// Loads the modules listed in `list` (one file name a line) from `dir`; returns how many.
pub fn load_modules(list: &Path, dir: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(list) else {
        return 0;
    };
    let mut loaded = 0;
    for name in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let Ok(file) = File::open(dir.join(name)) else {
            continue;
        };
        // SAFETY: finit_module with an open descriptor and an empty parameter string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if r == 0 {
            loaded += 1;
        }
    }
    loaded
}

fn find(name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(PORTS_DIR).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let n = std::fs::read_to_string(e.path().join("name")).ok()?;
        (n.trim_end_matches(['\n', '\0']) == name).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Opens the virtio-serial port called `name`, waiting up to `limit` for it to appear.
pub fn open(name: &str, limit: Duration) -> io::Result<File> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find(name) {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)
            {
                Ok(f) => return Ok(f),
                Err(e) if start.elapsed() >= limit => return Err(e),
                Err(_) => {}
            }
        } else if start.elapsed() >= limit {
            return Err(io::Error::new(io::ErrorKind::NotFound, name.to_string()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the host end of the port is connected (POLLHUP clears).
pub fn wait_for_host(port: &File) {
    loop {
        let mut fds = [libc::pollfd {
            fd: port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        if n < 0 || fds[0].revents & libc::POLLHUP == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes that are no protocol: a xorshift stream (no randomness source needed).
pub fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Does nothing, forever (PID 1 must not exit).
pub fn idle() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    idle()
}

#[cfg(test)]
mod tests {
    #[test]
    fn garbage_is_not_a_frame() {
        let g = super::garbage(64);
        assert_eq!(g.len(), 64);
        assert!(g.iter().any(|b| *b != 0));
        let mut r = g.as_slice();
        assert!(boxlite_proto::Frame::read_from(&mut r).is_err());
    }
}
