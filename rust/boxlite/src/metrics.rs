//! Runtime-wide counters and per-box metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;

/// Runtime-wide counters, shared by every box of one runtime. Cheap to clone; all clones see
/// the same numbers. Updated with relaxed atomics: each counter is exact, a snapshot of
/// several is not a transaction.
#[derive(Debug, Clone, Default)]
pub struct RuntimeMetrics {
    counters: Arc<RuntimeCounters>,
}

#[derive(Debug, Default)]
struct RuntimeCounters {
    boxes_created: AtomicU64,
    boxes_failed: AtomicU64,
    running_boxes: AtomicU64,
    commands_run: AtomicU64,
    run_errors: AtomicU64,
}

impl RuntimeMetrics {
    /// Boxes whose creation succeeded.
    pub fn boxes_created_total(&self) -> u64 {
        self.counters.boxes_created.load(Relaxed)
    }
    /// Boxes that failed to create or start.
    pub fn boxes_failed_total(&self) -> u64 {
        self.counters.boxes_failed.load(Relaxed)
    }
    /// Boxes running now.
    pub fn num_running_boxes(&self) -> u64 {
        self.counters.running_boxes.load(Relaxed)
    }
    /// Commands started with `exec`, successful or not.
    pub fn total_commands_run(&self) -> u64 {
        self.counters.commands_run.load(Relaxed)
    }
    /// `exec` calls that failed to start or timed out.
    pub fn total_run_errors(&self) -> u64 {
        self.counters.run_errors.load(Relaxed)
    }

    /// Counters that start at the given totals: another runtime's numbers as its server
    /// reported them.
    pub fn from_totals(
        created: u64,
        failed: u64,
        running: u64,
        commands: u64,
        errors: u64,
    ) -> Self {
        let counters = RuntimeCounters {
            boxes_created: AtomicU64::new(created),
            boxes_failed: AtomicU64::new(failed),
            running_boxes: AtomicU64::new(running),
            commands_run: AtomicU64::new(commands),
            run_errors: AtomicU64::new(errors),
        };
        Self {
            counters: Arc::new(counters),
        }
    }

    pub(crate) fn box_created(&self) {
        self.counters.boxes_created.fetch_add(1, Relaxed);
    }
    pub(crate) fn box_failed(&self) {
        self.counters.boxes_failed.fetch_add(1, Relaxed);
    }
    pub(crate) fn box_started(&self) {
        self.counters.running_boxes.fetch_add(1, Relaxed);
    }
    pub(crate) fn box_stopped(&self) {
        // Never wraps below zero, even if a stop is reported twice.
        let _ = self
            .counters
            .running_boxes
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }
    pub(crate) fn command_run(&self) {
        self.counters.commands_run.fetch_add(1, Relaxed);
    }
    pub(crate) fn run_error(&self) {
        self.counters.run_errors.fetch_add(1, Relaxed);
    }
}

/// A snapshot of one box's statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BoxMetrics {
    pub commands_run_total: u64,
    pub run_errors_total: u64,
    /// Bytes sent to the box's processes (stdin).
    pub bytes_sent_total: u64,
    /// Bytes received from the box's processes (stdout and stderr).
    pub bytes_received_total: u64,
    /// From `create` being called to the box being ready.
    pub total_create_duration_ms: Option<u128>,
    /// From the engine process starting to the guest agent reporting ready.
    pub guest_boot_duration_ms: Option<u128>,
    pub cpu_percent: Option<f32>,
    pub memory_bytes: Option<u64>,
    pub network_bytes_sent: Option<u64>,
    pub network_bytes_received: Option<u64>,
    pub network_tcp_connections: Option<u64>,
    pub network_tcp_errors: Option<u64>,
    /// Bytes used on the box's root filesystem, as the guest sees it.
    pub disk_bytes_used: Option<u64>,
    /// Size of the box's root filesystem.
    pub disk_bytes_total: Option<u64>,
    /// Stage 1: the box directory and its files.
    pub stage_filesystem_setup_ms: Option<u128>,
    /// Stage 2: the image pulled or found in the cache.
    pub stage_image_prepare_ms: Option<u128>,
    /// Stage 3: the image's base disk built or found, the box's overlay made.
    pub stage_guest_rootfs_ms: Option<u128>,
    /// Stage 4: the engine configuration (command line, devices) built.
    pub stage_box_config_ms: Option<u128>,
    /// Stage 5: the engine process spawned.
    pub stage_box_spawn_ms: Option<u128>,
    /// Stage 6: from spawn to the guest agent ready. For a box started from a template: the
    /// template's state loaded and the guest configured (no kernel boot, module loading, root
    /// mount or filesystem growth happen).
    pub stage_container_init_ms: Option<u128>,
    /// The box's last start loaded a template instead of booting a kernel.
    pub started_from_template: bool,
}

/// The live counters behind [`BoxMetrics`], updated by the box's executions.
#[derive(Debug, Default)]
pub(crate) struct BoxCounters {
    pub commands_run: AtomicU64,
    pub run_errors: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// The six stage timings of one box start, plus its totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StageTimings {
    pub filesystem_setup_ms: Option<u128>,
    pub image_prepare_ms: Option<u128>,
    pub guest_rootfs_ms: Option<u128>,
    pub box_config_ms: Option<u128>,
    pub box_spawn_ms: Option<u128>,
    pub container_init_ms: Option<u128>,
    pub total_create_ms: Option<u128>,
    pub guest_boot_ms: Option<u128>,
    pub from_template: bool,
}

impl BoxCounters {
    pub fn snapshot(&self, stages: &StageTimings) -> BoxMetrics {
        BoxMetrics {
            commands_run_total: self.commands_run.load(Relaxed),
            run_errors_total: self.run_errors.load(Relaxed),
            bytes_sent_total: self.bytes_sent.load(Relaxed),
            bytes_received_total: self.bytes_received.load(Relaxed),
            total_create_duration_ms: stages.total_create_ms,
            guest_boot_duration_ms: stages.guest_boot_ms,
            stage_filesystem_setup_ms: stages.filesystem_setup_ms,
            stage_image_prepare_ms: stages.image_prepare_ms,
            stage_guest_rootfs_ms: stages.guest_rootfs_ms,
            stage_box_config_ms: stages.box_config_ms,
            stage_box_spawn_ms: stages.box_spawn_ms,
            stage_container_init_ms: stages.container_init_ms,
            started_from_template: stages.from_template,
            ..BoxMetrics::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exact_under_contention() {
        let metrics = RuntimeMetrics::default();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = metrics.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.box_created();
                        m.command_run();
                        m.run_error();
                        m.box_started();
                        m.box_stopped();
                    }
                    m.box_failed();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(metrics.boxes_created_total(), 80_000);
        assert_eq!(metrics.total_commands_run(), 80_000);
        assert_eq!(metrics.total_run_errors(), 80_000);
        assert_eq!(metrics.boxes_failed_total(), 8);
        assert_eq!(metrics.num_running_boxes(), 0);
    }

    #[test]
    fn running_gauge_never_goes_negative() {
        let metrics = RuntimeMetrics::default();
        metrics.box_stopped();
        assert_eq!(metrics.num_running_boxes(), 0);
        metrics.box_started();
        assert_eq!(metrics.num_running_boxes(), 1);
    }

    #[test]
    fn box_snapshot_carries_counters_and_stages() {
        let counters = BoxCounters::default();
        counters.commands_run.fetch_add(3, Relaxed);
        counters.bytes_received.fetch_add(42, Relaxed);
        let stages = StageTimings {
            box_spawn_ms: Some(5),
            total_create_ms: Some(900),
            ..Default::default()
        };
        let m = counters.snapshot(&stages);
        assert_eq!(m.commands_run_total, 3);
        assert_eq!(m.bytes_received_total, 42);
        assert_eq!(m.stage_box_spawn_ms, Some(5));
        assert_eq!(m.total_create_duration_ms, Some(900));
        assert_eq!(m.cpu_percent, None);
    }
}
