//! Per-box copy-on-write disks.

use std::path::Path;
use std::process::Command;

use super::tools::{find_tool, run_tool};
use crate::error::{BoxliteResult, IoContext};
use crate::units::Bytes;

/// Creates a qcow2 overlay at `overlay` backed by the raw `base` disk (read-only underneath),
/// `size` large if given and larger than the base (the guest grows its filesystem to it).
pub(crate) async fn create_overlay(
    base: &Path,
    overlay: &Path,
    size: Option<Bytes>,
) -> BoxliteResult<()> {
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let base_size = std::fs::metadata(base).map(|m| m.len()).unwrap_or(0);
    let mut command = Command::new(qemu_img);
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay);
    if let Some(size) = size.filter(|s| s.as_u64() > base_size) {
        command.arg(size.as_u64().to_string());
    }
    run_tool(command).await
}

/// Creates an empty overlay on `backing` (a template's overlay, named by the path it will
/// have once the template is in place, so not opened), `size` bytes large: what each box
/// made from the template copies as its disk.
pub(crate) async fn create_clone_prototype(
    backing: &Path,
    prototype: &Path,
    size: u64,
) -> BoxliteResult<()> {
    super::layers::create_overlay_on(backing, prototype, size).await
}

/// A box's disk from its template's prototype overlay (a plain copy: a qcow2 overlay has no
/// identity of its own), writable by its owner.
pub(crate) fn copy_clone_disk(prototype: &Path, disk: &Path) -> BoxliteResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(prototype, disk)
        .ctx(|| format!("copying {} to {}", prototype.display(), disk.display()))?;
    std::fs::set_permissions(disk, std::fs::Permissions::from_mode(0o644))
        .ctx(|| format!("making {} writable", disk.display()))
}

/// Creates a box's overlay on a template's frozen overlay (qcow2 on qcow2). It keeps the
/// template's virtual size: the restored guest already knows its disk's size.
pub(crate) async fn create_clone_overlay(
    template_overlay: &Path,
    overlay: &Path,
) -> BoxliteResult<()> {
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let mut command = Command::new(qemu_img);
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(template_overlay)
        .arg(overlay);
    run_tool(command).await
}
