//! Hosts without a port yet: what cannot be known is `None`, what cannot be done an error.

use crate::units::Bytes;

pub(super) fn process_start(_pid: u32) -> Option<(u64, bool)> {
    None
}

pub(super) fn is_being_killed(_pid: u32) -> bool {
    false
}

pub(super) fn host_memory() -> Option<Bytes> {
    None
}

pub(super) fn die_with_parent_in_child() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "tying a child's life to its parent is not implemented on this platform",
    ))
}

pub(super) fn drop_privileges(_id: u32) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "dropping privileges is not implemented on this platform",
    ))
}
