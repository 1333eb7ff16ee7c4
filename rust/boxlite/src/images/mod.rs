//! Images: OCI image layouts on disk, their configs and layers.

mod config;
mod digest;
mod layout;

pub(crate) use config::merge_env;
pub use config::ImageConfig;
pub use digest::Digest;
pub use layout::{LayerCompression, LayerRef, OciLayout, ResolvedImage};
