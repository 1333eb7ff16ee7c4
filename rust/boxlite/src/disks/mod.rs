//! Disks: per-image base disks (ext4, written on the host, cached by manifest digest) and
//! per-box qcow2 overlays on them (or on a template's frozen overlay); frozen layers that
//! snapshots, clones and forks share (`layers`); the box archive format (`archive`).

pub(crate) mod archive;
mod base;
pub(crate) mod layers;
mod overlay;
mod tools;

pub(crate) use base::BaseDiskStore;
pub(crate) use overlay::{
    copy_clone_disk, create_clone_overlay, create_clone_prototype, create_overlay,
};
pub(crate) use tools::{find_tool, run_tool};
