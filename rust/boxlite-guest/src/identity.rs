//! Who the box is, applied when the host says so (`Configure`, right after boot or after a
//! restore from a memory image): the wall clock, fresh entropy, the hostname, the network,
//! the box root's resolver files, and how its user commands are confined (`sandbox.rs`).

use std::io;
use std::path::Path;
use std::time::Duration;

use boxlite_proto::message::GuestSetup;
use boxlite_proto::net::GuestNetwork;

use crate::net;
use crate::sandbox::Policy;
use crate::sys;

/// `_IOW('R', 0x03, int[2])`: add entropy to the input pool, crediting it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Applies `setup`; `root` is the box root when it is mounted. Returns the confinement of the
/// box's user commands for the agent to use from now on; a setup it cannot compile (an
/// unknown capability) is an `InvalidInput` error before anything else is changed.
pub fn apply(
    setup: &GuestSetup,
    root: Option<&Path>,
    current: &Policy,
    link: Option<&GuestNetwork>,
) -> io::Result<Policy> {
    let policy = current.recompile(&setup.sandbox)?;
    set_clock(setup.time_ms)?;
    if !setup.entropy.is_empty() {
        reseed(&setup.entropy)?;
    }
    net::set_hostname(&setup.hostname)?;
    if let Some(network) = &setup.network {
        net::configure(network, link)?;
    }
    if let Some(root) = root {
        net::write_resolver_files(root, &setup.hostname, setup.network.as_ref())?;
    }
    Ok(policy)
}

fn set_clock(time_ms: u64) -> io::Result<()> {
    let now = Duration::from_millis(time_ms);
    let ts = libc::timespec {
        tv_sec: now.as_secs() as libc::time_t,
        tv_nsec: now.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid timespec for the duration of the call.
    sys::cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// Mixes `entropy` into the kernel's pool, credited, then reseeds the CRNG so that what
/// `/dev/urandom` and `getrandom` give from now on depends on it (two boxes restored from one
/// memory image must not share random output).
fn reseed(entropy: &[u8]) -> io::Result<()> {
    let words = entropy.len().div_ceil(4);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    let random = sys::open(
        Path::new("/dev/urandom"),
        libc::O_WRONLY | libc::O_CLOEXEC,
        0,
    )?;
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a rand_pool_info of the size it declares, alive for the call.
    sys::cvt(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) })?;
    // SAFETY: an ioctl without an argument.
    sys::cvt(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) })?;
    Ok(())
}
