//! Linux: `/proc` and `prctl`.

use crate::units::Bytes;

pub(super) fn process_start(pid: u32) -> Option<(u64, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22: start time in clock ticks since boot.
    let start_time = fields.get(19)?.parse().ok()?;
    Some((start_time, state == 'Z'))
}

pub(super) fn host_memory() -> Option<Bytes> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(Bytes::from_kib(kib))
}

pub(super) fn die_with_parent_in_child() -> std::io::Result<()> {
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of ours.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may already be gone (the signal was armed too late).
        if libc::getppid() == 1 {
            return Err(std::io::Error::other("parent exited"));
        }
    }
    Ok(())
}
