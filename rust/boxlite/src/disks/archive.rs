//! The box archive (`.boxlite`): a tar of exactly two regular files, `manifest.json` (the
//! box's options and image, the disk's size and sha256) then `disk.qcow2` (the box's disk
//! flattened: no backing file).
//!
//! Archives are untrusted input. Reading never resolves a member name as a host path: the
//! tar stream is read entry by entry, only the two expected names and types are accepted,
//! every size is bounded before anything is written, the disk is hashed while copied to the
//! one file the caller names, and checked with `qemu-img info` before anyone opens it as a
//! disk.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::tools::find_tool;
use crate::error::{BoxliteError, BoxliteResult, DiskError, IoContext};

pub(crate) const MANIFEST_MEMBER: &str = "manifest.json";
pub(crate) const DISK_MEMBER: &str = "disk.qcow2";
pub(crate) const FORMAT: &str = "boxlite-box-archive";
pub(crate) const VERSION: u32 = 1;

/// Larger manifests are refused unread.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// The largest disk an archive may declare (guest-visible size).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 40;

/// What an archive says about its box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub format: String,
    pub version: u32,
    pub box_id: String,
    pub name: Option<String>,
    /// The box's options, as `BoxOptions` serializes them.
    pub options: serde_json::Value,
    /// The image reference or layout path the box was made from.
    pub image: String,
    pub image_config: serde_json::Value,
    /// The base disk the box was made on (informational: the disk is flattened).
    pub base_disk: Option<BaseDiskInfo>,
    pub disk: DiskEntry,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BaseDiskInfo {
    pub file: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiskEntry {
    pub member: String,
    pub format: String,
    pub virtual_size: u64,
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    /// The checks that need nothing but the manifest.
    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(format!(
                "format {:?} version {} (this boxlite reads {FORMAT:?} version {VERSION})",
                self.format, self.version
            ));
        }
        let disk = &self.disk;
        if disk.member != DISK_MEMBER || disk.format != "qcow2" {
            return Err(format!(
                "disk member {:?} of format {:?}",
                disk.member, disk.format
            ));
        }
        if disk.virtual_size == 0 || disk.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(format!("disk size {} out of range", disk.virtual_size));
        }
        // A flattened qcow2 holds at most its virtual size plus its metadata.
        if disk.bytes > max_file_bytes(disk.virtual_size) {
            return Err(format!(
                "disk file of {} bytes for a {}-byte disk",
                disk.bytes, disk.virtual_size
            ));
        }
        if disk.sha256.len() != 64 || !disk.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("bad disk checksum".into());
        }
        Ok(())
    }
}

fn max_file_bytes(virtual_size: u64) -> u64 {
    virtual_size + virtual_size / 64 + (16 << 20)
}

/// Writes an archive of `manifest` and the flattened disk file `disk` to `out`.
pub(crate) fn write(out: impl Write, manifest: &Manifest, disk: &Path) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    let text = serde_json::to_vec_pretty(manifest)?;
    let mut header = tar::Header::new_ustar();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_mtime((manifest.created_at_ms / 1000).max(0) as u64);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, MANIFEST_MEMBER, text.as_slice())?;
    let mut file = std::fs::File::open(disk)?;
    let mut header = tar::Header::new_ustar();
    header.set_size(file.metadata()?.len());
    header.set_mode(0o644);
    header.set_mtime(header.mtime().unwrap_or(0));
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, DISK_MEMBER, &mut file)?;
    builder.into_inner()?.flush()
}

/// The sha256 (hex) and length of a file.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let n = std::io::copy(&mut file, &mut HashWriter(&mut hasher))?;
    Ok((hex::encode(hasher.finalize()), n))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads the archive at `path`, writing its disk to `disk_out` (created new); returns the
/// manifest once the disk matched its size and checksum. On error `disk_out` may be left for
/// the caller to remove.
pub(crate) fn read(path: &Path, disk_out: &Path) -> BoxliteResult<Manifest> {
    let bad = |reason: String| -> BoxliteError {
        DiskError::BadArchive {
            path: path.display().to_string(),
            reason,
        }
        .into()
    };
    let file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiskError::ArchiveNotFound {
            path: path.display().to_string(),
        }
        .into(),
        _ => BoxliteError::io(format!("opening {}", path.display()), e),
    })?;
    let (input, meter) = crate::tarlimit::budgeted(std::io::BufReader::new(file));
    let mut archive = tar::Archive::new(input);
    let mut entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    let mut next = |expected: &str| {
        let entry = crate::tarlimit::next_entry(&meter, &mut entries)
            .entry
            .ok_or_else(|| bad(format!("{expected} is missing")))?
            .map_err(|e| bad(format!("reading {expected}: {e}")))?;
        let name = entry.path_bytes().into_owned();
        if name != expected.as_bytes() {
            return Err(bad(format!(
                "unexpected member {:?} (expected {expected})",
                String::from_utf8_lossy(&name)
            )));
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!("{expected} is not a regular file")));
        }
        Ok(entry)
    };

    let entry = next(MANIFEST_MEMBER)?;
    let size = entry.size();
    if size > MAX_MANIFEST_BYTES {
        return Err(bad(format!("manifest of {size} bytes is too large")));
    }
    let mut text = Vec::with_capacity(size as usize);
    entry
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut text)
        .map_err(|e| bad(format!("reading the manifest: {e}")))?;
    if text.len() as u64 != size {
        return Err(bad("the manifest is cut short".into()));
    }
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("bad manifest: {e}")))?;
    manifest.check().map_err(bad)?;

    let mut entry = next(DISK_MEMBER)?;
    if entry.size() != manifest.disk.bytes {
        return Err(bad(format!(
            "the disk is {} bytes, the manifest says {}",
            entry.size(),
            manifest.disk.bytes
        )));
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(disk_out)
        .ctx(|| format!("creating {}", disk_out.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| bad(format!("reading the disk: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .ctx(|| format!("writing {}", disk_out.display()))?;
        copied += n as u64;
    }
    if copied != manifest.disk.bytes {
        return Err(bad(format!(
            "the disk is cut short ({copied} of {} bytes)",
            manifest.disk.bytes
        )));
    }
    if hex::encode(hasher.finalize()) != manifest.disk.sha256.to_ascii_lowercase() {
        return Err(bad("the disk does not match its checksum".into()));
    }
    out.sync_all()
        .ctx(|| format!("syncing {}", disk_out.display()))?;
    drop(entry);
    match entries.next() {
        None => {}
        Some(Ok(extra)) => {
            return Err(bad(format!(
                "unexpected member {:?} after the disk",
                String::from_utf8_lossy(&extra.path_bytes())
            )))
        }
        Some(Err(e)) => return Err(bad(format!("after the disk: {e}"))),
    }
    Ok(manifest)
}

/// What `qemu-img info` says about a disk from an archive; refuses anything but a standalone
/// qcow2 of the declared size (a backing file or external data file would make the VM open
/// a host path the archive chose).
pub(crate) async fn check_disk(path: &Path, virtual_size: u64) -> Result<(), String> {
    let qemu_img = find_tool("qemu-img", "qemu-utils").map_err(|e| e.to_string())?;
    let mut command = Command::new(qemu_img);
    command
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("running qemu-img: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the disk is not a valid qcow2 image: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    check_info(&info, virtual_size)
}

fn check_info(info: &serde_json::Value, virtual_size: u64) -> Result<(), String> {
    if info["format"] != "qcow2" {
        return Err(format!("the disk's format is {}", info["format"]));
    }
    if !info["backing-filename"].is_null() || !info["full-backing-filename"].is_null() {
        return Err("the disk names a backing file".into());
    }
    if !info["format-specific"]["data"]["data-file"].is_null() {
        return Err("the disk names an external data file".into());
    }
    if info["virtual-size"].as_u64() != Some(virtual_size) {
        return Err(format!(
            "the disk's size is {}, the manifest says {virtual_size}",
            info["virtual-size"]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(disk: &[u8]) -> Manifest {
        let (sha, len) = {
            let mut h = Sha256::new();
            h.update(disk);
            (hex::encode(h.finalize()), disk.len() as u64)
        };
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            box_id: "B".into(),
            name: Some("web".into()),
            options: serde_json::json!({}),
            image: "alpine".into(),
            image_config: serde_json::json!({}),
            base_disk: None,
            disk: DiskEntry {
                member: DISK_MEMBER.into(),
                format: "qcow2".into(),
                virtual_size: 1 << 20,
                bytes: len,
                sha256: sha,
            },
            created_at_ms: 0,
        }
    }

    fn archive(dir: &Path, m: &Manifest, disk: &[u8]) -> std::path::PathBuf {
        let disk_file = dir.join("d");
        std::fs::write(&disk_file, disk).unwrap();
        let out = dir.join("a.boxlite");
        write(std::fs::File::create(&out).unwrap(), m, &disk_file).unwrap();
        out
    }

    /// A tar written by hand: any member names, types and sizes.
    fn raw_tar(dir: &Path, members: &[(&str, tar::EntryType, &[u8])]) -> std::path::PathBuf {
        let out = dir.join("raw.boxlite");
        let mut b = tar::Builder::new(std::fs::File::create(&out).unwrap());
        for (name, kind, data) in members {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
        out
    }

    fn reason(err: BoxliteError) -> String {
        assert_eq!(err.kind(), "bad_archive", "{err}");
        err.to_string()
    }

    #[test]
    fn an_archive_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let disk = b"QFI\xfbdisk bytes".to_vec();
        let m = manifest(&disk);
        let a = archive(dir.path(), &m, &disk);
        let out = dir.path().join("out");
        assert_eq!(read(&a, &out).unwrap(), m);
        assert_eq!(std::fs::read(&out).unwrap(), disk);
    }

    #[test]
    fn a_missing_archive_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(&dir.path().join("nope"), &dir.path().join("o")).unwrap_err();
        assert_eq!(err.kind(), "archive_not_found");
        assert!(err.to_string().starts_with("Archive not found: "));
    }

    #[test]
    fn damaged_or_short_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = vec![7u8; 100_000];
        let m = manifest(&disk);
        let a = archive(dir.path(), &m, &disk);
        let bytes = std::fs::read(&a).unwrap();
        // Cut short in the disk.
        std::fs::write(&a, &bytes[..60_000]).unwrap();
        let out = dir.path().join("o1");
        assert!(reason(read(&a, &out).unwrap_err()).contains("disk"));
        // One byte of the disk flipped.
        let mut flipped = bytes.clone();
        flipped[1024 + 50_000] ^= 1;
        std::fs::write(&a, &flipped).unwrap();
        assert!(reason(read(&a, &dir.path().join("o2")).unwrap_err()).contains("checksum"));
        // Not a tar at all.
        std::fs::write(&a, b"hello").unwrap();
        reason(read(&a, &dir.path().join("o3")).unwrap_err());
    }

    #[test]
    fn hostile_members_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let disk = b"x".to_vec();
        let text = serde_json::to_vec(&manifest(&disk)).unwrap();
        let out = dir.path().join("o");
        let cases: Vec<Vec<(&str, tar::EntryType, &[u8])>> = vec![
            vec![("../manifest.json", tar::EntryType::Regular, &text)],
            vec![("/etc/passwd", tar::EntryType::Regular, &text)],
            vec![(MANIFEST_MEMBER, tar::EntryType::Symlink, b"")],
            vec![
                (MANIFEST_MEMBER, tar::EntryType::Regular, &text),
                ("../disk.qcow2", tar::EntryType::Regular, &disk),
            ],
            vec![
                (MANIFEST_MEMBER, tar::EntryType::Regular, &text),
                (DISK_MEMBER, tar::EntryType::Link, b""),
            ],
        ];
        for members in cases {
            let a = raw_tar(dir.path(), &members);
            reason(read(&a, &out).unwrap_err());
            assert!(!out.exists(), "{members:?}");
        }
        // A "long name" of a megabyte before the manifest: refused after 64 KiB of it.
        let long = vec![b'a'; 1 << 20];
        let a = raw_tar(
            dir.path(),
            &[("././@LongLink", tar::EntryType::GNULongName, &long)],
        );
        assert!(reason(read(&a, &out).unwrap_err()).contains("headers of more than"));
        assert!(!out.exists());
        // A member after the disk.
        let a = raw_tar(
            dir.path(),
            &[
                (MANIFEST_MEMBER, tar::EntryType::Regular, &text),
                (DISK_MEMBER, tar::EntryType::Regular, &disk),
                ("extra", tar::EntryType::Regular, b"x"),
            ],
        );
        assert!(reason(read(&a, &out).unwrap_err()).contains("extra"));
    }

    #[test]
    fn sizes_are_bounded_by_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize];
        let a = raw_tar(
            dir.path(),
            &[(MANIFEST_MEMBER, tar::EntryType::Regular, &big)],
        );
        assert!(reason(read(&a, &dir.path().join("o")).unwrap_err()).contains("too large"));
        let mut m = manifest(b"x");
        m.disk.bytes = max_file_bytes(m.disk.virtual_size) + 1;
        assert!(m.check().is_err());
        let mut m = manifest(b"x");
        m.disk.virtual_size = MAX_VIRTUAL_SIZE + 1;
        assert!(m.check().is_err());
        // The disk member's size must be the declared one.
        let mut m = manifest(b"x");
        m.disk.bytes = 5;
        let text = serde_json::to_vec(&m).unwrap();
        let a = raw_tar(
            dir.path(),
            &[
                (MANIFEST_MEMBER, tar::EntryType::Regular, &text),
                (DISK_MEMBER, tar::EntryType::Regular, b"x"),
            ],
        );
        assert!(reason(read(&a, &dir.path().join("o4")).unwrap_err()).contains("says"));
    }

    #[test]
    fn qemu_img_info_must_show_a_standalone_disk_of_the_declared_size() {
        let ok = serde_json::json!({"format": "qcow2", "virtual-size": 10,
            "format-specific": {"type": "qcow2", "data": {}}});
        check_info(&ok, 10).unwrap();
        assert!(check_info(&ok, 11).is_err());
        let mut backed = ok.clone();
        backed["backing-filename"] = "/etc/shadow".into();
        assert!(check_info(&backed, 10).unwrap_err().contains("backing"));
        let mut data = ok.clone();
        data["format-specific"]["data"]["data-file"] = "/dev/sda".into();
        assert!(check_info(&data, 10).unwrap_err().contains("data file"));
        let mut raw = ok;
        raw["format"] = "raw".into();
        assert!(check_info(&raw, 10).is_err());
    }
}
