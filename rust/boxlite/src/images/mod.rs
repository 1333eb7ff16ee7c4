//! Images: OCI image layouts on disk, their configs and layers; references, registries, the
//! content store that pulled images live in, and its garbage collector.
//!
//! OCI documents (indexes, manifests, descriptors, platforms, media types) are oci-spec's
//! types, read through `oci.rs`; references are parsed by `oci_client::Reference`; the
//! registry protocol is oci-client's. What is still hand-written, and why, is said at the top
//! of each file.

mod config;
mod digest;
pub(crate) mod gc;
mod layout;
mod manager;
mod oci;
mod pull;
mod reference;
mod registry;
mod store;

pub(crate) use config::merge_env;
pub use config::ImageConfig;
pub use digest::Digest;
pub use gc::GcReport;
pub use layout::{LayerCompression, LayerRef, OciLayout, ResolvedImage};
pub use manager::{ImageInfo, ImageManager};
pub use pull::{ProgressFn, PullProgress};
pub use reference::Reference;
pub use registry::{ImageRegistry, Transport, REGISTRIES_ENV, REGISTRIES_FILE};
