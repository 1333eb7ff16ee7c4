//! VM engines: one trait, one folder per engine.

pub mod accel;
pub mod bundle;
pub(crate) mod jail;
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

/// How the engine process is confined (see `boxlite-jail` and docs/security.md): it sees only
/// its own files, the guest bundle and its read-only disks, in fresh namespaces, without
/// capabilities, as a dedicated uid when the host runs as root.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailConfig {
    /// An empty directory the jail builds its root in (inside its own mount namespace).
    pub root: PathBuf,
    /// Picks the dedicated uid/gid when the host runs as root (the box id: stable per box).
    pub id_key: String,
    /// What the engine binary needs (libraries, firmware, modules), found once by the runtime
    /// rather than by every supervisor (that runs `ldd` and QEMU: tens of milliseconds).
    /// Empty: the supervisor finds them itself.
    #[serde(default)]
    pub engine_binds: Vec<PathBuf>,
    /// Directories the engine writes in: the box directory (overlay disk, sockets).
    pub rw_dirs: Vec<PathBuf>,
    /// Further files the engine only reads (the disks under the overlay).
    pub ro_paths: Vec<PathBuf>,
    /// Files the engine opens for writing without owning them: a template's RAM file, which
    /// QEMU 7.2 opens read-write even to map it privately.
    #[serde(default)]
    pub rw_files: Vec<PathBuf>,
}

/// Where a VM's RAM lives. Every VM names its RAM backend (`mem`), so a saved state loads
/// into any of them.
/// A virtio-fs device: the tag the guest mounts, and the socket of its `virtiofsd`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsDevice {
    pub tag: String,
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MemorySource {
    /// Anonymous memory: a box booted cold.
    #[default]
    Anonymous,
    /// A file the guest writes its RAM through to: a template being made.
    SharedFile(PathBuf),
    /// A template's RAM file mapped copy-on-write: a box started from a template. Its pages
    /// are shared with every other box of that template until written.
    PrivateFile(PathBuf),
}

/// Everything an engine needs to start one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Shown in process listings.
    pub name: String,
    pub kernel: PathBuf,
    /// None for an engine that loads a saved VM: its initramfs was unpacked long ago.
    pub initramfs: Option<PathBuf>,
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
    /// Confine the engine process; `None` runs it as the caller.
    #[serde(default)]
    pub jail: Option<JailConfig>,
    #[serde(default)]
    pub memory_source: MemorySource,
    /// A unix socket the engine listens on for control (QMP): save, load, stop, continue.
    #[serde(default)]
    pub qmp_socket: Option<PathBuf>,
    /// Wait for a saved state to be loaded over the control socket instead of booting.
    #[serde(default)]
    pub incoming: bool,
    /// Host folders (virtio-fs); a VM with any has its RAM in a shared memfd (the daemons
    /// map it) and cannot be saved.
    #[serde(default)]
    pub volumes: Vec<FsDevice>,
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
