//! Resource use as the guest kernel sees it.

use std::path::Path;
use std::sync::Mutex;

use boxlite_proto::GuestMetrics;

use crate::sys;

/// Cumulative CPU time from the `cpu` line of /proc/stat, in ticks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    pub busy: u64,
    pub total: u64,
}

pub fn parse_cpu(stat: &str) -> Option<CpuSample> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some(CpuSample {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// Busy share between two samples, 0-100.
pub fn cpu_percent(prev: CpuSample, now: CpuSample) -> f32 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy);
    (busy as f64 * 100.0 / total as f64).clamp(0.0, 100.0) as f32
}

/// `(total, used)` bytes from /proc/meminfo, used = MemTotal - MemAvailable.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim_start_matches(':')
            .split_ascii_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    let total = field("MemTotal").unwrap_or(0);
    let available = field("MemAvailable")
        .or_else(|| field("MemFree"))
        .unwrap_or(0);
    (total, total.saturating_sub(available))
}

/// `(total, used)` bytes of the filesystem holding `path`.
pub fn disk_usage(path: &Path) -> (u64, u64) {
    let Ok(c) = sys::cpath(path) else {
        return (0, 0);
    };
    // SAFETY: statvfs fills the zeroed struct we pass.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frsize = st.f_frsize;
    (
        st.f_blocks * frsize,
        st.f_blocks.saturating_sub(st.f_bfree) * frsize,
    )
}

/// A report; the CPU share covers the time since the previous report (or boot).
pub fn collect(prev_cpu: &Mutex<CpuSample>, root: Option<&Path>) -> GuestMetrics {
    let now = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_cpu(&s))
        .unwrap_or_default();
    let cpu_percent = {
        let mut prev = sys::lock(prev_cpu);
        let p = cpu_percent(*prev, now);
        *prev = now;
        p
    };
    let (memory_total_bytes, memory_used_bytes) = std::fs::read_to_string("/proc/meminfo")
        .map(|s| parse_meminfo(&s))
        .unwrap_or((0, 0));
    let (disk_total_bytes, disk_used_bytes) = root.map(disk_usage).unwrap_or((0, 0));
    GuestMetrics {
        cpu_percent,
        memory_total_bytes,
        memory_used_bytes,
        disk_total_bytes,
        disk_used_bytes,
        uptime_ms: sys::uptime_ms(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_share() {
        let a = parse_cpu("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(
            a,
            CpuSample {
                busy: 150,
                total: 1000
            }
        );
        let b = parse_cpu("cpu  200 0 100 1600 100 0 0 0 0 0\n").unwrap();
        assert!((cpu_percent(a, b) - 15.0).abs() < 0.01);
        assert_eq!(cpu_percent(b, b), 0.0);
        assert!(parse_cpu("nothing").is_none());
    }

    #[test]
    fn meminfo() {
        let (t, u) = parse_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:   600 kB\n");
        assert_eq!((t, u), (1_024_000, 409_600));
        let (t, u) = parse_meminfo("MemTotal: 10 kB\nMemFree: 4 kB\n");
        assert_eq!((t, u), (10_240, 6_144));
    }

    #[test]
    fn disk_of_tmp() {
        let (total, used) = disk_usage(&std::env::temp_dir());
        assert!(total > 0 && used <= total);
        assert_eq!(disk_usage(Path::new("/nonexistent/path")), (0, 0));
    }
}
