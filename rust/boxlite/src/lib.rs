//! boxlite: an embeddable sandbox runtime. Every box runs an OCI image in its own
//! lightweight VM with its own Linux kernel; the host runs commands in it with streamed I/O.
//!
//! ```no_run
//! # async fn demo() -> boxlite::BoxliteResult<()> {
//! use boxlite::{BoxCommand, BoxOptions, BoxliteOptions, BoxliteRuntime};
//! let runtime = BoxliteRuntime::new(BoxliteOptions::default())?;
//! let litebox = runtime
//!     .create(BoxOptions { rootfs_path: Some("/path/to/oci-layout".into()), ..Default::default() })
//!     .await?;
//! let result = litebox.exec(BoxCommand::new("echo").args(["hi"])).await?.wait().await?;
//! assert_eq!(result.stdout, b"hi\n");
//! litebox.stop().await?;
//! # Ok(()) }
//! ```

mod agent;
mod copy;
mod disks;
mod error;
mod exec;
mod fsutil;
mod ids;
pub mod images;
mod litebox;
mod metrics;
mod options;
mod process;
mod runtime;
#[doc(hidden)]
pub mod shim;
mod state;
mod sys;
mod tarlimit;
mod templates;
mod units;
mod vm;
pub mod vmm;

pub use boxlite_proto::{ExecTrace, TtySize};
pub use copy::{
    check_box_path, extract_untrusted, first_entry_kind, CopyOptions, ExtractLimits,
    COPY_OUT_LIMIT, READ_FILE_LIMIT,
};
pub use error::{
    BoxliteError, BoxliteResult, DiskError, EngineError, ExecError, GuestError, ImageError,
    NetworkError, StateError, StorageError,
};
pub use exec::{BoxCommand, ExecResult, ExecStdin, Execution, OutputStream};
pub use ids::{BoxID, ContainerID};
pub use litebox::{BoxInfo, BoxStatus, LiteBox, SnapshotInfo, ARCHIVE_EXTENSION};
pub use metrics::{BoxMetrics, RuntimeMetrics};
pub use options::{
    default_home, BoxOptions, BoxliteOptions, NetworkOptions, PortProtocol, PortSpec, VolumeSpec,
    DEFAULT_PORT_HOST_IP,
};
pub use runtime::BoxliteRuntime;
pub use units::{rfc3339, Bytes, Seconds};
pub use vmm::{Accel, AccelChoice};

/// The version of this crate (and of the guest protocol it speaks, see `boxlite_proto`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
