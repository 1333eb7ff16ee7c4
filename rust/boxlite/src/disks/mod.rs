//! Disks: per-image base disks (ext4, built inside a VM, cached by manifest digest) and
//! per-box qcow2 overlays on them.

mod base;
mod overlay;
mod tools;

pub(crate) use base::BaseDiskStore;
pub(crate) use overlay::create_overlay;
