//! Copying files between the host and a box as tar streams.
//!
//! What comes out of a box is untrusted: entries are extracted only below a fresh staging
//! directory, only regular files, directories, symlinks and hard links, names made of plain
//! components under the one expected top-level name, modes without setuid/setgid/sticky.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use boxlite_proto::{Message, StreamId, MAX_DATA_CHUNK};
use tokio::sync::mpsc;

use crate::agent::{AgentClient, ChannelEvent};
use crate::error::{task_failed, BoxliteError, BoxliteResult, IoContext};

/// Where a copy lands: the exact path, or inside a directory when the destination ends with
/// `/` (or, on the host, is an existing directory).
fn split_destination(dest: &str, source_name: &str, is_dir: bool) -> (String, String) {
    if dest.ends_with('/') || is_dir {
        (
            dest.trim_end_matches('/').to_string(),
            source_name.to_string(),
        )
    } else {
        let (parent, name) = dest.rsplit_once('/').unwrap_or(("", dest));
        (parent.to_string(), name.to_string())
    }
}

/// How a copy treats directories, existing destinations and symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOptions {
    /// Copy directories with their contents; without it a directory source is refused.
    pub recursive: bool,
    /// Replace an existing destination; without it an existing one is `AlreadyExists`.
    pub overwrite: bool,
    /// Copy what symlinks in the source point to instead of the links (host sources only).
    pub follow_symlinks: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            recursive: true,
            overwrite: true,
            follow_symlinks: false,
        }
    }
}

/// Copies the host file or directory `src` into the box at `dest`.
pub(crate) async fn copy_in(
    client: &AgentClient,
    src: &Path,
    dest: &str,
    options: CopyOptions,
) -> BoxliteResult<()> {
    crate::options::validate_box_path("dest", dest)?;
    if !options.overwrite {
        return Err(BoxliteError::Unsupported(
            "copy_in with overwrite=False (the box replaces existing files)".into(),
        ));
    }
    let meta = if options.follow_symlinks {
        std::fs::metadata(src)
    } else {
        std::fs::symlink_metadata(src)
    }
    .ctx(|| format!("reading {}", src.display()))?;
    if meta.is_dir() && !options.recursive {
        return Err(BoxliteError::invalid(
            "src",
            format!(
                "{} is a directory; copy it with recursive=True",
                src.display()
            ),
        ));
    }
    let source_name = src
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            BoxliteError::invalid("src", format!("{} has no usable file name", src.display()))
        })?
        .to_string();
    let (parent, name) = split_destination(dest, &source_name, false);
    if name.is_empty() || name == "." || name == ".." {
        return Err(BoxliteError::invalid(
            "dest",
            format!("{dest:?} does not name a file"),
        ));
    }
    let parent = if parent.is_empty() {
        "/".to_string()
    } else {
        parent
    };

    let channel = client.open(Message::CopyIn { path: parent })?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let src = src.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut builder = tar::Builder::new(ChunkWriter {
            tx,
            buf: Vec::with_capacity(MAX_DATA_CHUNK),
        });
        builder.follow_symlinks(options.follow_symlinks);
        if meta.is_dir() {
            builder.append_dir_all(&name, &src)?;
        } else {
            builder.append_path_with_name(&src, &name)?;
        }
        builder.into_inner()?.flush()
    });
    while let Some(chunk) = rx.recv().await {
        channel.handle.send_stdin(&chunk).await?;
    }
    producer
        .await
        .map_err(|e| task_failed("archive", e))?
        .map_err(|e| BoxliteError::io("archiving the source", e))?;
    finish_copy_in(channel).await
}

/// Ends a copy-in's tar stream and waits for the guest's verdict.
async fn finish_copy_in(mut channel: crate::agent::Channel) -> BoxliteResult<()> {
    channel.handle.send_eof(StreamId::Stdin)?;
    loop {
        match channel.recv().await? {
            ChannelEvent::Message(Message::Done) => return Ok(()),
            ChannelEvent::Message(Message::Error { kind, message }) => {
                return Err(copy_error(kind, message))
            }
            ChannelEvent::Message(other) => {
                return Err(BoxliteError::protocol(format!(
                    "unexpected reply to CopyIn: {other:?}"
                )))
            }
            ChannelEvent::Data(..) | ChannelEvent::Eof(_) => {}
        }
    }
}

/// Bytes `read_file` returns at most; larger files are refused (use `copy_out`).
pub const READ_FILE_LIMIT: u64 = 64 * 1024 * 1024;

/// The contents of the regular file `path` in the box, read by the agent (the image needs no
/// tools for it). The tar stream is parsed in memory; nothing touches the host's disk.
pub(crate) async fn read_file(client: &AgentClient, path: &str) -> BoxliteResult<Vec<u8>> {
    crate::options::validate_box_path("path", path)?;
    let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        return Err(BoxliteError::invalid(
            "path",
            format!("{path:?} does not name a file"),
        ));
    }
    let mut channel = client.open(Message::CopyOut {
        path: path.to_string(),
    })?;
    // A tar of one file: its content, headers and padding.
    let cap = READ_FILE_LIMIT + 64 * 1024;
    let mut archive = Vec::new();
    loop {
        match channel.recv().await? {
            ChannelEvent::Data(stream, data) => {
                let len = data.len();
                if archive.len() as u64 + len as u64 > cap {
                    let _ = channel.handle.send_message(Message::Signal {
                        signal: libc::SIGKILL,
                    });
                    return Err(BoxliteError::invalid(
                        "path",
                        format!(
                            "{path:?} is larger than read_file's {READ_FILE_LIMIT} bytes; use copy_out"
                        ),
                    ));
                }
                archive.extend_from_slice(&data);
                channel.handle.credit(stream, len);
            }
            ChannelEvent::Eof(_) => {}
            ChannelEvent::Message(Message::Done) => break,
            ChannelEvent::Message(Message::Error { kind, message }) => {
                return Err(copy_error(kind, message))
            }
            ChannelEvent::Message(other) => {
                return Err(BoxliteError::protocol(format!(
                    "unexpected reply to CopyOut: {other:?}"
                )))
            }
        }
    }
    single_file(&archive, name).map_err(|why| match why {
        SingleFile::NotRegular => {
            BoxliteError::invalid("path", format!("{path:?} is not a regular file in the box"))
        }
        SingleFile::Malformed(why) => {
            BoxliteError::protocol(format!("the box sent a bad archive for {path:?}: {why}"))
        }
    })
}

enum SingleFile {
    NotRegular,
    Malformed(String),
}

/// The content of the first entry of `archive`, which must be the regular file `name`.
fn single_file(archive: &[u8], name: &str) -> Result<Vec<u8>, SingleFile> {
    let malformed = |e: std::io::Error| SingleFile::Malformed(e.to_string());
    let mut entries = tar::Archive::new(archive);
    let mut entry = entries
        .entries()
        .map_err(malformed)?
        .next()
        .ok_or_else(|| SingleFile::Malformed("no entry".into()))?
        .map_err(malformed)?;
    let entry_name = entry
        .path()
        .map_err(malformed)?
        .to_string_lossy()
        .into_owned();
    if entry_name.trim_end_matches('/') != name {
        return Err(SingleFile::Malformed(format!(
            "unexpected entry {entry_name:?}"
        )));
    }
    if entry.header().entry_type() != tar::EntryType::Regular {
        return Err(SingleFile::NotRegular);
    }
    let mut data = Vec::with_capacity(entry.size().min(READ_FILE_LIMIT) as usize);
    entry.read_to_end(&mut data).map_err(malformed)?;
    Ok(data)
}

/// `write_file`'s arguments: an absolute file path and permission bits.
pub(crate) fn validate_write(path: &str, mode: u32) -> BoxliteResult<()> {
    crate::options::validate_box_path("path", path)?;
    let name = path.rsplit('/').next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        return Err(BoxliteError::invalid(
            "path",
            format!("{path:?} must be an absolute file path in the box"),
        ));
    }
    if mode > 0o7777 {
        return Err(BoxliteError::invalid(
            "mode",
            format!("{mode:#o} is not a permission mode (0 to 0o7777)"),
        ));
    }
    Ok(())
}

/// Writes `data` to `path` in the box with `mode`, replacing the file; missing parent
/// directories are created (owned by root).
pub(crate) async fn write_file(
    client: &AgentClient,
    path: &str,
    data: &[u8],
    mode: u32,
) -> BoxliteResult<()> {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    let parent = if parent.is_empty() { "/" } else { parent };
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let mut builder = tar::Builder::new(Vec::with_capacity(data.len() + 2048));
    builder
        .append_data(&mut header, name, data)
        .map_err(|e| BoxliteError::io("archiving the file", e))?;
    let archive = builder
        .into_inner()
        .map_err(|e| BoxliteError::io("archiving the file", e))?;
    let channel = client.open(Message::CopyIn {
        path: parent.to_string(),
    })?;
    for chunk in archive.chunks(MAX_DATA_CHUNK) {
        channel.handle.send_stdin(chunk).await?;
    }
    finish_copy_in(channel).await
}

/// Copies the box path `src` to the host at `dest`.
pub(crate) async fn copy_out(
    client: &AgentClient,
    src: &str,
    dest: &Path,
    options: CopyOptions,
) -> BoxliteResult<()> {
    crate::options::validate_box_path("src", src)?;
    if options.follow_symlinks {
        return Err(BoxliteError::Unsupported(
            "copy_out with follow_symlinks=True (links in the box are copied as links)".into(),
        ));
    }
    let source_name = src
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    if source_name.is_empty() || source_name == "." || source_name == ".." {
        return Err(BoxliteError::invalid(
            "src",
            format!("{src:?} does not name a file"),
        ));
    }
    let dest_text = dest.to_string_lossy();
    let (parent, name) = split_destination(&dest_text, &source_name, dest.is_dir());
    let parent = if parent.is_empty() {
        PathBuf::from(".")
    } else {
        PathBuf::from(parent)
    };
    if !parent.is_dir() {
        return Err(BoxliteError::invalid(
            "dest",
            format!("{} is not a directory", parent.display()),
        ));
    }
    let target = parent.join(&name);
    if !options.overwrite && std::fs::symlink_metadata(&target).is_ok() {
        return Err(BoxliteError::AlreadyExists {
            what: "a file",
            name: target.display().to_string(),
        });
    }
    let staging = tempfile::Builder::new()
        .prefix(".boxlite-copy-")
        .tempdir_in(&parent)
        .ctx(|| format!("creating a staging directory in {}", parent.display()))?;

    let mut channel = client.open(Message::CopyOut {
        path: src.to_string(),
    })?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let staging_path = staging.path().to_path_buf();
    let expected = source_name.clone();
    let recursive = options.recursive;
    let extractor = tokio::task::spawn_blocking(move || {
        extract_untrusted(
            ChunkReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            },
            &staging_path,
            &expected,
            recursive,
        )
    });
    let mut tx = Some(tx);
    let outcome = loop {
        match channel.recv().await {
            Ok(ChannelEvent::Data(stream, data)) => {
                let len = data.len();
                if let Some(sender) = &tx {
                    // The extractor may have stopped on a bad entry; the error comes from it.
                    let _ = sender.send(data).await;
                }
                channel.handle.credit(stream, len);
            }
            Ok(ChannelEvent::Eof(_)) => tx = None,
            Ok(ChannelEvent::Message(Message::Done)) => break Ok(()),
            Ok(ChannelEvent::Message(Message::Error { kind, message })) => {
                break Err(copy_error(kind, message))
            }
            Ok(ChannelEvent::Message(other)) => {
                break Err(BoxliteError::protocol(format!(
                    "unexpected reply to CopyOut: {other:?}"
                )))
            }
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    let extracted = extractor.await.map_err(|e| task_failed("extract", e))?;
    outcome?;
    extracted?;
    let staged = staging.path().join(&source_name);
    if std::fs::symlink_metadata(&staged).is_err() {
        return Err(BoxliteError::protocol(format!(
            "the box sent no {source_name:?}"
        )));
    }
    if let Ok(meta) = std::fs::symlink_metadata(&target) {
        if meta.is_dir() && !meta.file_type().is_symlink() {
            std::fs::remove_dir_all(&target).ctx(|| format!("replacing {}", target.display()))?;
        }
    }
    std::fs::rename(&staged, &target).ctx(|| format!("moving the copy to {}", target.display()))?;
    Ok(())
}

fn copy_error(kind: boxlite_proto::ErrorKind, message: String) -> BoxliteError {
    match kind {
        boxlite_proto::ErrorKind::NotFound | boxlite_proto::ErrorKind::InvalidArgument => {
            BoxliteError::invalid("path", message)
        }
        _ => BoxliteError::guest_storage("copy failed in the box", message),
    }
}

/// Extracts a tar from the box below `root`, refusing anything but `expected/...` made of
/// plain names, and anything but files, directories and links.
pub(crate) fn extract_untrusted(
    input: impl Read,
    root: &Path,
    expected: &str,
    recursive: bool,
) -> BoxliteResult<()> {
    let bad = |why: String| BoxliteError::protocol(format!("refused an entry from the box: {why}"));
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| BoxliteError::io("reading the archive from the box", e))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| BoxliteError::io("reading the archive from the box", e))?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        if !plain_relative(&path)
            || path.components().next() != Some(Component::Normal(expected.as_ref()))
        {
            return Err(bad(format!("{}", path.display())));
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() && !recursive {
            return Err(BoxliteError::invalid(
                "src",
                format!("{expected:?} is a directory; copy it with recursive=True"),
            ));
        }
        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(|e| bad(e.to_string()))?
                .unwrap_or_default()
                .into_owned();
            if !plain_relative(&link) {
                return Err(bad(format!(
                    "hard link {} -> {}",
                    path.display(),
                    link.display()
                )));
            }
        } else if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            // Devices, fifos and the like make no sense on the host: skipped.
            continue;
        }
        let unpacked = entry
            .unpack_in(root)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
        if !unpacked {
            return Err(bad(format!(
                "{} would land outside the destination",
                path.display()
            )));
        }
    }
    Ok(())
}

fn plain_relative(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// A `Write` that cuts the stream into chunks for an async sender.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let take = data.len().min(MAX_DATA_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == MAX_DATA_CHUNK {
            self.flush()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(MAX_DATA_CHUNK));
            self.tx
                .blocking_send(chunk)
                .map_err(|_| std::io::Error::other("the copy was abandoned"))?;
        }
        Ok(())
    }
}

/// A `Read` over chunks arriving from the async side.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o4755);
            h.set_size(if kind.is_file() { 2 } else { 0 });
            // Bypass the builder's own path checks: this is what a hostile guest can send.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            let data: &[u8] = if kind.is_file() { b"hi" } else { b"" };
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn extracts_a_plain_tree_without_special_bits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = tar_with(&[
            ("out/", tar::EntryType::Directory, ""),
            ("out/a", tar::EntryType::Regular, ""),
            ("out/l", tar::EntryType::Symlink, "a"),
        ]);
        extract_untrusted(data.as_slice(), dir.path(), "out", true).unwrap();
        let a = dir.path().join("out/a");
        assert_eq!(std::fs::read(&a).unwrap(), b"hi");
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o7000,
            0
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("out/l")).unwrap(),
            Path::new("a")
        );
    }

    #[test]
    fn refuses_entries_that_escape_or_surprise() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        let hostile: Vec<Vec<(&str, tar::EntryType, &str)>> = vec![
            vec![("../victim", tar::EntryType::Regular, "")],
            vec![("/tmp/victim", tar::EntryType::Regular, "")],
            vec![("other/x", tar::EntryType::Regular, "")],
            vec![("out/../../victim", tar::EntryType::Regular, "")],
            vec![("out/h", tar::EntryType::Link, "../../etc/passwd")],
        ];
        for entries in hostile {
            let dir = tempfile::tempdir_in(outside.path()).unwrap();
            let err = extract_untrusted(tar_with(&entries).as_slice(), dir.path(), "out", true)
                .unwrap_err();
            assert!(err.to_string().contains("refused"), "{err}");
        }
        // A symlink that points outside, then a file written through it.
        let dir = tempfile::tempdir_in(outside.path()).unwrap();
        let link_target = outside.path().to_str().unwrap().to_string();
        let through = tar_with(&[
            ("out/", tar::EntryType::Directory, ""),
            ("out/esc", tar::EntryType::Symlink, &link_target),
            ("out/esc/victim", tar::EntryType::Regular, ""),
        ]);
        assert!(extract_untrusted(through.as_slice(), dir.path(), "out", true).is_err());
        assert!(!victim.exists(), "an entry escaped the staging directory");
    }

    #[test]
    fn destinations_split_like_cp() {
        assert_eq!(
            split_destination("/a/b", "src", false),
            ("/a".into(), "b".into())
        );
        assert_eq!(
            split_destination("/a/", "src", false),
            ("/a".into(), "src".into())
        );
        assert_eq!(
            split_destination("/a", "src", true),
            ("/a".into(), "src".into())
        );
    }
}
