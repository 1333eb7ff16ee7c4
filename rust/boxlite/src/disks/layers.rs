//! Frozen disk layers: immutable qcow2 files under `<home>/layers/` that box disks, snapshots
//! and clones rest on (qcow2 backing chains). A layer is shared by everything whose chain
//! reaches it and removed once nothing does (`sweep`, and image GC).
//!
//! Freezing is crash-safe without a journal: the live disk gets a second name in `layers/`
//! (a hard link), its successor overlay is written beside it, and one rename swaps them. A
//! crash before the rename leaves the box on its old disk and an unreferenced extra name,
//! which the next sweep drops.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::tools::{find_tool, run_tool};
use crate::error::{BoxliteResult, IoContext, StorageError};
use crate::images::gc::{backing_chain, box_disk_chains};

/// Frozen layers a box disk may rest on before the next freeze flattens them into one. Image
/// GC follows chains 16 files deep (base disk and template files included).
pub(crate) const MAX_LAYERS: usize = 8;

/// The layers directory of a home.
pub(crate) fn layers_dir(home: &Path) -> PathBuf {
    home.join("layers")
}

/// The virtual size recorded in a qcow2 header (bytes 24..32, big-endian).
pub(crate) fn qcow2_virtual_size(path: &Path) -> BoxliteResult<u64> {
    let mut header = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .ctx(|| format!("reading {}", path.display()))?;
    if &header[..4] != b"QFI\xfb" {
        return Err(StorageError::Damaged {
            path: path.display().to_string(),
            reason: "not a qcow2 file".into(),
        }
        .into());
    }
    Ok(u64::from_be_bytes(
        header[24..32].try_into().unwrap_or_default(),
    ))
}

/// Writes an empty qcow2 overlay at `overlay` on the qcow2 `backing`, `size` bytes large,
/// without opening the backing file (it may not have its final name yet).
pub(crate) async fn create_overlay_on(
    backing: &Path,
    overlay: &Path,
    size: u64,
) -> BoxliteResult<()> {
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let mut command = Command::new(qemu_img);
    command
        .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(overlay)
        .arg(size.to_string());
    run_tool(command).await
}

/// Freezes the box disk `disk` into a new layer and puts the box on a fresh overlay on it;
/// returns the layer. A disk already `MAX_LAYERS` layers deep is first flattened (everything
/// above the base disk merged into one layer), so chains stay bounded. The caller holds the
/// box's lock (nothing writes `disk`) and the image GC lock shared.
pub(crate) async fn freeze(home: &Path, disk: &Path) -> BoxliteResult<PathBuf> {
    let dir = layers_dir(home);
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let layer = dir.join(format!("{}.qcow2", ulid::Ulid::new()));
    let size = qcow2_virtual_size(disk)?;
    let chain = backing_chain(disk).ctx(|| format!("reading {}", disk.display()))?;
    let frozen_layers = chain.iter().filter(|f| f.starts_with(&dir)).count();
    if frozen_layers >= MAX_LAYERS {
        flatten_above_base(disk, &chain, &layer).await?;
    } else {
        std::fs::hard_link(disk, &layer).ctx(|| format!("freezing {}", disk.display()))?;
    }
    let next = disk.with_extension("qcow2.next");
    let swapped = async {
        create_overlay_on(&layer, &next, size).await?;
        set_read_only(&layer)?;
        std::fs::rename(&next, disk).ctx(|| format!("replacing {}", disk.display()))
    }
    .await;
    if let Err(e) = swapped {
        let _ = std::fs::remove_file(&next);
        let _ = std::fs::remove_file(&layer);
        return Err(e);
    }
    crate::fsutil::sync_dir(&dir);
    if let Some(parent) = disk.parent() {
        crate::fsutil::sync_dir(parent);
    }
    Ok(layer)
}

/// The layer a stopped box disk's contents are frozen in: the layer under it when nothing
/// was written since it was last frozen (repeated snapshots and clones of an unchanged box
/// share one layer and add nothing to its chain), else a new one (`freeze`).
pub(crate) async fn freeze_or_reuse(home: &Path, disk: &Path) -> BoxliteResult<PathBuf> {
    let chain = backing_chain(disk).ctx(|| format!("reading {}", disk.display()))?;
    if let Some(below) = chain.first().filter(|l| l.starts_with(layers_dir(home))) {
        if top_is_empty(disk).await? {
            return Ok(below.clone());
        }
    }
    freeze(home, disk).await
}

/// Whether no cluster of `disk` is allocated in the file itself (all reads go to its backing
/// chain), as `qemu-img map` reports it.
async fn top_is_empty(disk: &Path) -> BoxliteResult<bool> {
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let mut command = Command::new(qemu_img);
    command
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(disk);
    let shown = format!("{command:?}");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| crate::error::task_failed("qemu-img", e))?
        .ctx(|| format!("running {shown}"))?;
    if !output.status.success() {
        return Err(StorageError::Tool {
            tool: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        }
        .into());
    }
    let extents: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).map_err(|e| StorageError::Tool {
            tool: shown,
            status: "unreadable output".into(),
            stderr: e.to_string(),
        })?;
    Ok(extents.iter().all(|e| e["depth"].as_u64() != Some(0)))
}

/// Merges `disk` and every layer above its base into a standalone layer on that base: a copy
/// of the top rebased (safe mode: every cluster the old chain holds that the base does not is
/// copied in). `qemu-img convert -B` is no use here: it copies the top file's clusters only.
async fn flatten_above_base(disk: &Path, chain: &[PathBuf], layer: &Path) -> BoxliteResult<()> {
    let qemu_img = find_tool("qemu-img", "qemu-utils")?;
    let tmp = layer.with_extension("qcow2.partial");
    let guard = crate::fsutil::RemoveOnDrop(Some(tmp.clone()));
    std::fs::copy(disk, &tmp).ctx(|| format!("copying {}", disk.display()))?;
    let mut command = Command::new(qemu_img);
    command.args(["rebase", "-q", "-f", "qcow2"]);
    match chain.last() {
        // The lowest file is the base disk (raw ext4) or a template's: keep it shared.
        Some(base) => {
            let format = if is_qcow2(base) { "qcow2" } else { "raw" };
            command.args(["-F", format, "-b"]).arg(base);
        }
        None => {
            command.args(["-b", ""]);
        }
    }
    command.arg(&tmp);
    run_tool(command).await?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, layer).ctx(|| format!("renaming into {}", layer.display()))?;
    guard.disarm();
    Ok(())
}

fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == b"QFI\xfb")
}

pub(crate) fn set_read_only(path: &Path) -> BoxliteResult<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .ctx(|| format!("sealing {}", path.display()))
}

/// Removes the layers no box disk, snapshot or template chain reaches; returns the bytes
/// freed. The caller holds the image GC lock exclusively (freezes hold it shared), so no
/// layer is seen between its creation and the overlay that references it.
pub(crate) fn sweep(home: &Path, extra_roots: &[PathBuf]) -> u64 {
    let dir = layers_dir(home);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let Some(chains) = box_disk_chains(&home.join("boxes")) else {
        return 0;
    };
    let mut in_use: BTreeSet<PathBuf> = chains.into_iter().flat_map(|(_, c)| c).collect();
    for root in extra_roots {
        in_use.extend(backing_chain(root).unwrap_or_default());
    }
    let mut freed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !in_use.contains(&path) {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if std::fs::remove_file(&path).is_ok() {
                freed += size;
            }
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img() -> bool {
        find_tool("qemu-img", "qemu-utils").is_ok()
    }

    async fn base(dir: &Path) -> PathBuf {
        let base = dir.join("base.ext4");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let disk = dir.join("boxes").join("B1").join("disk.qcow2");
        std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
        super::super::create_overlay(&base, &disk, None)
            .await
            .unwrap();
        disk
    }

    /// Writes byte `i + 1` over the `i`th 64 KiB cluster of `disk` (with qemu-io).
    async fn write_pattern(disk: &Path, i: u64) {
        let status = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -P {} {} 64k", i + 1, i * 65536))
            .arg(disk)
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
    }

    #[tokio::test]
    async fn freezing_chains_layers_and_flattens_past_the_limit() {
        if !qemu_img() {
            return;
        }
        let home = tempfile::tempdir().unwrap();
        let disk = base(home.path()).await;
        let mut layers = Vec::new();
        for i in 0..MAX_LAYERS {
            // A different cluster written in each layer.
            write_pattern(&disk, i as u64).await;
            layers.push(freeze(home.path(), &disk).await.unwrap());
        }
        let before = home.path().join("before.qcow2");
        create_overlay_on(layers.last().unwrap(), &before, 1 << 20)
            .await
            .unwrap();
        let chain = backing_chain(&disk).unwrap();
        assert_eq!(chain.len(), MAX_LAYERS + 1, "{chain:?}");
        assert_eq!(chain[0], *layers.last().unwrap());
        assert_eq!(qcow2_virtual_size(&disk).unwrap(), 1 << 20);
        // One more: the chain collapses to one layer on the base.
        let flat = freeze(home.path(), &disk).await.unwrap();
        let chain = backing_chain(&disk).unwrap();
        assert_eq!(chain, vec![flat.clone(), home.path().join("base.ext4")]);
        // Every layer's writes made it into the flat one.
        let qemu_img = find_tool("qemu-img", "qemu-utils").unwrap();
        let same = Command::new(qemu_img)
            .args(["compare", "-q"])
            .arg(&before)
            .arg(&disk)
            .status()
            .unwrap();
        assert!(same.success(), "the flattened disk differs");
        std::fs::remove_file(&before).unwrap();
        // The older layers are unused now, the new one is not.
        assert!(sweep(home.path(), &[]) > 0);
        assert!(flat.exists());
        assert!(layers.iter().all(|l| !l.exists()));
    }

    #[tokio::test]
    async fn an_unchanged_disk_reuses_its_layer() {
        if !qemu_img() {
            return;
        }
        let home = tempfile::tempdir().unwrap();
        let disk = base(home.path()).await;
        // Never frozen: a new layer.
        let first = freeze_or_reuse(home.path(), &disk).await.unwrap();
        assert_eq!(freeze_or_reuse(home.path(), &disk).await.unwrap(), first);
        assert_eq!(backing_chain(&disk).unwrap().len(), 2);
        write_pattern(&disk, 3).await;
        let second = freeze_or_reuse(home.path(), &disk).await.unwrap();
        assert_ne!(second, first);
        assert_eq!(backing_chain(&disk).unwrap()[..2], [second, first]);
    }

    #[tokio::test]
    async fn sweep_keeps_what_a_root_or_box_reaches() {
        if !qemu_img() {
            return;
        }
        let home = tempfile::tempdir().unwrap();
        let disk = base(home.path()).await;
        let first = freeze(home.path(), &disk).await.unwrap();
        let anchor = home.path().join("anchor.qcow2");
        create_overlay_on(&first, &anchor, 1 << 20).await.unwrap();
        let second = freeze(home.path(), &disk).await.unwrap();
        // The box rests on both (second -> first): nothing to remove.
        assert_eq!(sweep(home.path(), &[]), 0);
        std::fs::remove_file(&disk).unwrap();
        sweep(home.path(), std::slice::from_ref(&anchor));
        assert!(first.exists() && !second.exists());
        sweep(home.path(), &[]);
        assert!(!first.exists());
    }
}
