//! The guest's own pseudo filesystems, the box disk and the mounts inside it.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmdline::{BootConfig, Mode};
use crate::log::log;
use crate::sys;

/// Where the box disk is mounted in the agent's namespace (the box init makes it the box's `/`,
/// the tar helper chroots here).
pub const ROOT: &str = "/rootfs";

/// How long the box disk's device node may take to appear.
const ROOT_DEVICE_WAIT: Duration = Duration::from_secs(5);

pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = sys::cstr(source)?;
    let tgt = sys::cpath(target)?;
    let fs = sys::cstr(fstype)?;
    let data = data.map(sys::cstr).transpose()?;
    // SAFETY: all pointers are valid C strings (or null) for the duration of the call.
    sys::cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })?;
    Ok(())
}

fn mkdir_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let t = Path::new(target);
    if !t.is_dir() {
        std::fs::create_dir_all(t)?;
    }
    mount(source, t, fstype, flags, data)
}

/// The guest's own /proc, /sys, /dev, /dev/pts, /run and /tmp. /dev comes first so that the
/// console exists for logging; failures are logged and the agent carries on.
pub fn early() {
    let nosuid = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    let r = mkdir_mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, None);
    fix_stdio();
    if let Err(e) = r {
        log!("mount /dev: {e}");
    }
    let table: [(&str, &str, &str, libc::c_ulong, Option<&str>); 5] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fs, flags, data) in table {
        if let Err(e) = mkdir_mount(src, target, fs, flags, data) {
            log!("mount {target}: {e}");
        }
    }
}

/// Makes sure descriptors 0, 1 and 2 are open (on /dev/console, else /dev/null): the kernel
/// leaves them closed when the initramfs has no /dev/console, and a pipe landing on fd 1 would
/// be a disaster.
fn fix_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any integer is harmless.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        for dev in [c"/dev/console", c"/dev/null"] {
            // SAFETY: valid C string; the descriptor is deliberately left open for the process.
            let new = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if new < 0 {
                continue;
            }
            if new != fd {
                // SAFETY: plain descriptor juggling.
                unsafe {
                    libc::dup2(new, fd);
                    libc::close(new);
                }
            }
            break;
        }
    }
}

/// Brings the loopback interface up (127.0.0.1 comes with it), so programs in the box can
/// talk to themselves.
pub fn loopback_up() {
    // SAFETY: ioctls on a fresh datagram socket with a properly sized ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(s, libc::SIOCSIFFLAGS, &req) != 0 {
                log!("bringing up lo: {}", io::Error::last_os_error());
            }
        }
        libc::close(s);
    }
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if path.exists() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mounts the box disk at [`ROOT`] (and grows it, in box mode). Returns the mount points in
/// mount order (for [`unmount_all`]) or why the root is unusable.
pub fn mount_root(cfg: &BootConfig) -> Result<Vec<PathBuf>, String> {
    let Some(dev) = &cfg.root else {
        return Err("no boxlite.root= on the kernel command line".into());
    };
    let root = Path::new(ROOT);
    // virtio_blk probes synchronously while its module loads, so the node is normally
    // there at once; the wait only covers slow udev-less device node creation.
    if !wait_for(Path::new(dev), ROOT_DEVICE_WAIT) {
        return Err(format!(
            "root device {dev} did not appear within {} s",
            ROOT_DEVICE_WAIT.as_secs()
        ));
    }
    if !root.is_dir() {
        std::fs::create_dir_all(root).map_err(|e| format!("creating {ROOT}: {e}"))?;
    }
    mount(dev, root, "ext4", 0, None)
        .map_err(|e| format!("mounting {dev} (ext4) on {ROOT}: {e}"))?;
    let mounted = vec![root.to_path_buf()];
    if cfg.mode == Mode::Unpack {
        // A fresh base disk starts as the image's root: mkfs's empty lost+found is not part
        // of any image (e2fsck recreates it when it needs one).
        let _ = std::fs::remove_dir(root.join("lost+found"));
        return Ok(mounted);
    }
    if let Err(e) = grow_root(dev, root) {
        log!("growing the root filesystem: {e}");
    }
    // The box's /proc, /sys and /dev are mounted by the box init, in the box's namespaces.
    Ok(mounted)
}

/// Grows the mounted ext4 root to fill its disk: a box's overlay may be larger than the
/// image's base disk (`disk_size`). Online, like `resize2fs` does it.
fn grow_root(dev: &str, root: &Path) -> io::Result<()> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
    let device = std::fs::File::open(dev)?;
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { libc::ioctl(device.as_raw_fd(), BLKGETSIZE64, &mut bytes) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let c = sys::cpath(root)?;
    // SAFETY: statvfs fills the struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = st.f_frsize.max(1) as u64;
    let target = bytes / block;
    // f_blocks leaves out the filesystem's own overhead; only grow when it is clearly short.
    if target <= st.f_blocks as u64 + target / 50 {
        return Ok(());
    }
    let dir = std::fs::File::open(root)?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count) through the pointer.
    if unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &target) } != 0 {
        return Err(io::Error::last_os_error());
    }
    log!("root filesystem grown to {} MiB", bytes >> 20);
    Ok(())
}

/// Unmounts `mounts` in reverse order, lazily when busy. Before the root goes, it is
/// remounted read-only so the journal is clean even if the lazy unmount lingers.
pub fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts.iter().rev() {
        let Ok(c) = sys::cpath(m) else { continue };
        if m == Path::new(ROOT) {
            let _ = mount("none", m, "", libc::MS_REMOUNT | libc::MS_RDONLY, None);
        }
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                log!("unmount {}: {e}", m.display());
            } else {
                log!("unmount {}: {e}; detached lazily", m.display());
            }
        }
    }
}
