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
use crate::error::{BoxliteError, BoxliteResult, IoContext};

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

/// Copies the host file or directory `src` into the box at `dest`.
pub(crate) async fn copy_in(client: &AgentClient, src: &Path, dest: &str) -> BoxliteResult<()> {
    crate::options::validate_box_path("dest", dest)?;
    let meta = std::fs::symlink_metadata(src).ctx(|| format!("reading {}", src.display()))?;
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

    let mut channel = client.open(Message::CopyIn { path: parent })?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let src = src.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut builder = tar::Builder::new(ChunkWriter {
            tx,
            buf: Vec::with_capacity(MAX_DATA_CHUNK),
        });
        builder.follow_symlinks(false);
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
        .map_err(|e| BoxliteError::Internal(format!("archive task failed: {e}")))?
        .map_err(|e| BoxliteError::io("archiving the source", e))?;
    channel.handle.send_eof(StreamId::Stdin)?;
    loop {
        match channel.recv().await? {
            ChannelEvent::Message(Message::Done) => return Ok(()),
            ChannelEvent::Message(Message::Error { kind, message }) => {
                return Err(copy_error(kind, message))
            }
            ChannelEvent::Message(other) => {
                return Err(BoxliteError::GuestProtocol(format!(
                    "unexpected reply to CopyIn: {other:?}"
                )))
            }
            ChannelEvent::Data(..) | ChannelEvent::Eof(_) => {}
        }
    }
}

/// Copies the box path `src` to the host at `dest`.
pub(crate) async fn copy_out(client: &AgentClient, src: &str, dest: &Path) -> BoxliteResult<()> {
    crate::options::validate_box_path("src", src)?;
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
    let extractor = tokio::task::spawn_blocking(move || {
        extract_untrusted(
            ChunkReader {
                rx,
                buf: Vec::new(),
                pos: 0,
            },
            &staging_path,
            &expected,
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
                break Err(BoxliteError::GuestProtocol(format!(
                    "unexpected reply to CopyOut: {other:?}"
                )))
            }
            Err(e) => break Err(e),
        }
    };
    drop(tx);
    let extracted = extractor
        .await
        .map_err(|e| BoxliteError::Internal(format!("extract task failed: {e}")))?;
    outcome?;
    extracted?;
    let staged = staging.path().join(&source_name);
    if std::fs::symlink_metadata(&staged).is_err() {
        return Err(BoxliteError::GuestProtocol(format!(
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
        _ => BoxliteError::Storage(format!("copy failed in the box: {message}")),
    }
}

/// Extracts a tar from the box below `root`, refusing anything but `expected/...` made of
/// plain names, and anything but files, directories and links.
pub(crate) fn extract_untrusted(
    input: impl Read,
    root: &Path,
    expected: &str,
) -> BoxliteResult<()> {
    let bad =
        |why: String| BoxliteError::GuestProtocol(format!("refused an entry from the box: {why}"));
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
        extract_untrusted(data.as_slice(), dir.path(), "out").unwrap();
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
            let err =
                extract_untrusted(tar_with(&entries).as_slice(), dir.path(), "out").unwrap_err();
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
        assert!(extract_untrusted(through.as_slice(), dir.path(), "out").is_err());
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
