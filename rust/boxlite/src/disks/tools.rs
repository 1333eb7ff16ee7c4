//! Host tools the disk code runs, found once with an install hint when missing.

use std::path::PathBuf;
use std::process::Command;

use crate::error::{BoxliteError, BoxliteResult, StorageError};

/// Finds `name` in PATH or the sbin directories (mkfs lives there and root's PATH may lack it).
pub(crate) fn find_tool(name: &str, package: &str) -> BoxliteResult<PathBuf> {
    crate::vmm::qemu::find_in_path(name)
        .or_else(|| {
            ["/usr/sbin", "/sbin", "/usr/bin"]
                .iter()
                .map(|d| PathBuf::from(d).join(name))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            BoxliteError::engine_unavailable(
                format!("{name} not found"),
                format!("install the {package} package"),
            )
        })
}

/// Runs a tool to completion off the async threads; a failure carries its stderr.
pub(crate) async fn run_tool(mut command: Command) -> BoxliteResult<()> {
    let shown = format!("{command:?}");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| crate::error::task_failed("tool", e))?
        .map_err(|e| BoxliteError::io(format!("running {shown}"), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(StorageError::Tool {
            tool: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }
        .into())
    }
}
