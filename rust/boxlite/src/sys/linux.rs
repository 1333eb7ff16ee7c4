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

pub(super) fn is_being_killed(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let exiting = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| {
            let rest = text[text.rfind(')')? + 2..].to_string();
            // Field 9: the kernel's task flags.
            rest.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_EXITING != 0);
    let kill_pending = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .is_some_and(|text| {
            text.lines()
                .filter_map(|l| {
                    l.strip_prefix("SigPnd:")
                        .or_else(|| l.strip_prefix("ShdPnd:"))
                })
                .filter_map(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .any(|mask| mask & SIGKILL_BIT != 0)
        });
    exiting || kill_pending
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

pub(super) fn drop_privileges(id: u32) -> std::io::Result<()> {
    let check = |ret: libc::c_int| {
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain syscalls; the order matters: groups and gid while still root. Changing
    // credentials clears the parent-death signal, so it is read first and armed again.
    unsafe {
        let mut death_signal: libc::c_int = 0;
        check(libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut death_signal as *mut libc::c_int,
        ))?;
        let parent = libc::getppid();
        // Empty the bounding set too (needs CAP_SETPCAP, so while still root).
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                break; // past the last capability this kernel knows
            }
        }
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(id, id, id))?;
        check(libc::setresuid(id, id, id))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        if death_signal != 0 {
            check(libc::prctl(libc::PR_SET_PDEATHSIG, death_signal))?;
            // The parent may have died while the signal was not armed.
            if libc::getppid() != parent {
                libc::raise(death_signal);
            }
        }
    }
    Ok(())
}
