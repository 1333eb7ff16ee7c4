//! Per-box copy-on-write disks.

use std::path::Path;
use std::process::Command;

use super::tools::{find_tool, run_tool};
use crate::error::BoxliteResult;

/// Creates a qcow2 overlay at `overlay` backed by the raw `base` disk (read-only underneath).
pub(crate) async fn create_overlay(base: &Path, overlay: &Path) -> BoxliteResult<()> {
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let mut command = Command::new(qemu_img);
    command
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(overlay);
    run_tool(command).await
}
