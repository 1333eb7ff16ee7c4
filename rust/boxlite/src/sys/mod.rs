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
