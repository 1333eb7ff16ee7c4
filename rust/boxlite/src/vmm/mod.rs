//! VM engines: one trait, one folder per engine.

pub mod accel;
pub mod bundle;
pub mod qemu;

use std::path::PathBuf;

use crate::error::BoxliteResult;
use crate::process::GuardedChild;
use crate::units::Bytes;

pub use accel::{Accel, AccelChoice};
pub use bundle::GuestBundle;

/// How a disk image is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// A disk attached to the VM as a virtio block device (`/dev/vda`, `/dev/vdb`, ... in order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskAttachment {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Host-side write caching may ignore guest flushes: only for disposable disks that are
    /// flushed when the engine exits (base-disk builds).
    pub volatile: bool,
}

/// A network interface whose frames go to a unix socket the host listens on (QEMU's `stream`
/// netdev: each frame as a 4-byte big-endian length, then the frame).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetDevice {
    pub socket: PathBuf,
    /// `52:54:...` text form.
    pub mac: String,
}

/// Everything an engine needs to start one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Shown in process listings.
    pub name: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Extra kernel command-line words (the engine adds its console settings).
    pub kernel_args: Vec<String>,
    pub cpus: u32,
    pub memory: Bytes,
    pub disks: Vec<DiskAttachment>,
    /// A unix socket the host listens on; the engine connects the agent's port to it.
    pub agent_socket: PathBuf,
    /// Where the guest console goes, bounded.
    pub console_log: PathBuf,
    pub accel: Accel,
    /// The box's network interface; without one the guest has no `eth0`.
    #[serde(default)]
    pub network: Option<NetDevice>,
}

/// Bytes of guest console kept on disk per VM.
pub const CONSOLE_LOG_LIMIT: u64 = 1024 * 1024;

/// A way to run VMs.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// A short name for logs and `boxlite info`.
    fn name(&self) -> &'static str;

    /// Starts the VM; it runs until the guest powers off or the child is killed.
    fn spawn(&self, config: &VmConfig) -> BoxliteResult<GuardedChild>;
}
