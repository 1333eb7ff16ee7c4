//! Copying files between the host and a box as tar streams.
//!
//! What comes out of a box is untrusted: entries are extracted only below a fresh staging
//! directory, only regular files, directories, symlinks and hard links, names made of plain
//! components under the one expected top-level name, modes without setuid/setgid/sticky. The
//! stream is extracted as it arrives (never buffered whole), within a byte budget checked
//! against each file's size before it is written, and runs of zeros become holes, so a sparse
//! file stays sparse on the host.
//!
//! Every step waits on the guest at most [`REQUEST_TIMEOUT`] without progress.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use boxlite_proto::{Message, StreamId, MAX_DATA_CHUNK};
use tokio::sync::mpsc;

use crate::agent::{bounded, AgentClient, Channel, ChannelEvent, MESSAGE_LIMIT, REQUEST_TIMEOUT};
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

/// Bytes `read_file` returns at most unless told otherwise (`max_bytes`); a larger file is an
/// `InvalidArgument` error before its content is read.
pub const READ_FILE_LIMIT: u64 = 64 * 1024 * 1024;

/// Bytes of file content `copy_out` writes to the host at most unless told otherwise
/// (`max_bytes`): the sizes of the regular files copied, added up (a sparse file counts with its
/// full size, although it stays sparse on the host). Going over is an `InvalidArgument` error,
/// raised at the header of the file that does not fit, before any of it is written.
pub const COPY_OUT_LIMIT: u64 = 1024 * 1024 * 1024;

/// Runs of zeros this long (and aligned) are left as holes when a file is written on the host.
const HOLE_BLOCK: usize = 4096;

/// The checks every copy makes of its path in the box (absolute, no NUL, on the box's disk),
/// for backends that move the bytes by other means (the Python package's REST client).
pub fn check_box_path(field: &str, path: &str) -> BoxliteResult<()> {
    crate::options::validate_box_path(field, path)?;
    check_reachable(field, path)
}

/// Refuses paths in the box's `/proc`, `/sys` and `/dev`: the agent's copy helper sees the box's
/// disk only (the box's commands see the kernel's filesystems and a fresh /dev mounted over
/// those directories), so a write there would land on the disk beneath, invisible, and a read
/// would find nothing.
fn check_reachable(field: &str, path: &str) -> BoxliteResult<()> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    match parts.first() {
        Some(&top @ ("proc" | "sys" | "dev")) => Err(BoxliteError::invalid(
            field,
            format!(
                "{:?} is in the box's /{top}, which file copies do not reach (they work on the \
                 box's disk only); use exec instead, e.g. `cat {}` or `sh -c 'echo ... > {}'`",
                bounded(path, MESSAGE_LIMIT),
                bounded(path, MESSAGE_LIMIT),
                bounded(path, MESSAGE_LIMIT)
            ),
        )),
        _ => Ok(()),
    }
}

/// What is at a path in the box, as the agent's copy helper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Missing,
    /// The helper could not look (a parent is not a directory, ...): the operation itself will
    /// meet the same obstacle and report it.
    Unknown,
    File,
    Symlink,
    Directory,
    /// A device, FIFO or socket.
    Special,
}

/// Looks at `path` in the box without reading it: asks for it as a copy-out, reads the first
/// entry's header and stops the helper.
async fn probe(client: &AgentClient, path: &str) -> BoxliteResult<Found> {
    let mut channel = client.open(Message::CopyOut {
        path: path.to_string(),
    })?;
    let mut head = Vec::new();
    let found = loop {
        match channel.recv_within(REQUEST_TIMEOUT, "copy_out").await? {
            ChannelEvent::Data(stream, data) => {
                channel.handle.credit(stream, data.len());
                if head.len() < PROBE_LIMIT {
                    head.extend_from_slice(&data);
                }
                match first_entry_type(&head) {
                    Some(found) => break found,
                    None if head.len() >= PROBE_LIMIT => {
                        break Err(BoxliteError::protocol(format!(
                            "the box sent a bad archive for {:?}: no entry in its first {PROBE_LIMIT} bytes",
                            bounded(path, MESSAGE_LIMIT)
                        )))
                    }
                    None => {}
                }
            }
            ChannelEvent::Eof(_) => {}
            // An empty archive: something the helper does not archive (a socket).
            ChannelEvent::Message(Message::Done) => return Ok(Found::Special),
            ChannelEvent::Message(Message::Error {
                kind: boxlite_proto::ErrorKind::NotFound,
                ..
            }) => return Ok(Found::Missing),
            ChannelEvent::Message(Message::Error { .. }) => return Ok(Found::Unknown),
            ChannelEvent::Message(other) => return Err(unexpected("CopyOut", &other)),
        }
    };
    // Enough seen: stop the helper rather than let it stream the whole file.
    let _ = channel.handle.send_message(Message::Signal {
        signal: libc::SIGKILL,
    });
    found
}

/// Archive bytes a probe reads at most to find the first entry (long names come first).
const PROBE_LIMIT: usize = 256 * 1024;

/// What the first entry of the tar stream `input` is: `"directory"`, `"file"`, `"symlink"` or
/// `"other"` (also for an empty stream), reading at most [`PROBE_LIMIT`] bytes and headers;
/// for backends that probe a box path by other means (the Python package's REST client).
pub fn first_entry_kind(mut input: impl Read) -> BoxliteResult<&'static str> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(found) = first_entry_type(&head) {
            return Ok(match found? {
                Found::Directory => "directory",
                Found::File => "file",
                Found::Symlink => "symlink",
                Found::Missing | Found::Unknown | Found::Special => "other",
            });
        }
        if head.len() >= PROBE_LIMIT {
            return Err(BoxliteError::protocol(format!(
                "a bad archive: no entry in its first {PROBE_LIMIT} bytes"
            )));
        }
        let n = input
            .read(&mut buf)
            .map_err(|e| BoxliteError::io("reading the archive", e))?;
        if n == 0 {
            return Ok("other");
        }
        head.extend_from_slice(&buf[..n]);
    }
}

/// The kind of the first entry of a tar stream's beginning `head`; `None` while more bytes are
/// needed.
fn first_entry_type(head: &[u8]) -> Option<BoxliteResult<Found>> {
    let mut at = 0usize;
    loop {
        let block = head.get(at..at + 512)?;
        if block.iter().all(|b| *b == 0) {
            return Some(Ok(Found::Special));
        }
        let header = tar::Header::from_byte_slice(block);
        let kind = header.entry_type();
        if matches!(
            kind,
            tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
                | tar::EntryType::XHeader
                | tar::EntryType::XGlobalHeader
        ) {
            let size = match header.entry_size() {
                Ok(size) if size <= PROBE_LIMIT as u64 => size as usize,
                _ => {
                    return Some(Err(BoxliteError::protocol(
                        "the box sent a bad archive header",
                    )))
                }
            };
            at += 512 + size.div_ceil(512) * 512;
            continue;
        }
        return Some(Ok(match kind {
            k if k.is_dir() => Found::Directory,
            k if k.is_symlink() => Found::Symlink,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                Found::File
            }
            tar::EntryType::Link => Found::File,
            _ => Found::Special,
        }));
    }
}

/// Copies the host file or directory `src` into the box at `dest`. A file copied onto an
/// existing directory lands inside it (as `cp` does), never replacing the directory.
pub(crate) async fn copy_in(
    client: &AgentClient,
    src: &Path,
    dest: &str,
    options: CopyOptions,
) -> BoxliteResult<()> {
    crate::options::validate_box_path("dest", dest)?;
    check_reachable("dest", dest)?;
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
    let onto_dir =
        !meta.is_dir() && !dest.ends_with('/') && probe(client, dest).await? == Found::Directory;
    let (parent, name) = split_destination(dest, &source_name, onto_dir);
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
        channel
            .handle
            .send_stdin_within(&chunk, Some(REQUEST_TIMEOUT))
            .await?;
    }
    producer
        .await
        .map_err(|e| task_failed("archive", e))?
        .map_err(|e| BoxliteError::io("archiving the source", e))?;
    finish_copy_in(channel).await
}

/// Ends a copy-in's tar stream and waits for the guest's verdict.
async fn finish_copy_in(mut channel: Channel) -> BoxliteResult<()> {
    channel.handle.send_eof(StreamId::Stdin)?;
    loop {
        match channel.recv_within(REQUEST_TIMEOUT, "copy_in").await? {
            ChannelEvent::Message(Message::Done) => return Ok(()),
            ChannelEvent::Message(Message::Error { kind, message }) => {
                return Err(copy_error(kind, message))
            }
            ChannelEvent::Message(other) => return Err(unexpected("CopyIn", &other)),
            ChannelEvent::Data(..) | ChannelEvent::Eof(_) => {}
        }
    }
}

fn unexpected(request: &str, reply: &Message) -> BoxliteError {
    BoxliteError::protocol(format!(
        "unexpected reply to {request}: {}",
        bounded(&format!("{reply:?}"), 200)
    ))
}

/// How a stream fed to a consumer ended.
enum Fed {
    /// The guest finished (`Done`) with everything handed over.
    Done,
    /// The consumer stopped taking bytes before the guest finished.
    ConsumerStopped,
}

/// Hands a copy-out's tar stream to `tx` chunk by chunk, crediting the guest as the consumer
/// takes them (so at most the window plus the queue is in memory), until the guest's final
/// reply or until the consumer stops.
async fn feed(
    channel: &mut Channel,
    tx: mpsc::Sender<Vec<u8>>,
    request: &str,
) -> BoxliteResult<Fed> {
    let mut tx = Some(tx);
    loop {
        let consumer_gone = async {
            match &tx {
                Some(sender) => sender.closed().await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            event = channel.recv_within(REQUEST_TIMEOUT, "copy_out") => event?,
            () = consumer_gone => return Ok(Fed::ConsumerStopped),
        };
        match event {
            ChannelEvent::Data(stream, data) => {
                let len = data.len();
                if let Some(sender) = &tx {
                    if sender.send(data).await.is_err() {
                        return Ok(Fed::ConsumerStopped);
                    }
                }
                channel.handle.credit(stream, len);
            }
            ChannelEvent::Eof(_) => tx = None,
            ChannelEvent::Message(Message::Done) => return Ok(Fed::Done),
            ChannelEvent::Message(Message::Error { kind, message }) => {
                return Err(copy_error(kind, message))
            }
            ChannelEvent::Message(other) => return Err(unexpected(request, &other)),
        }
    }
}

/// Waits for the guest's final reply, dropping whatever data still comes.
async fn drain(channel: &mut Channel, request: &str) -> BoxliteResult<()> {
    let (tx, mut rx) = mpsc::channel(1);
    let sink = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let fed = feed(channel, tx, request).await;
    sink.abort();
    fed.map(|_| ())
}

fn kill_helper(channel: &Channel) {
    let _ = channel.handle.send_message(Message::Signal {
        signal: libc::SIGKILL,
    });
}

/// The contents of the regular file `path` in the box, read by the agent (the image needs no
/// tools for it), at most `max_bytes` (default [`READ_FILE_LIMIT`]). The size is checked at the
/// archive header, before the content is read; nothing touches the host's disk.
pub(crate) async fn read_file(
    client: &AgentClient,
    path: &str,
    max_bytes: Option<u64>,
) -> BoxliteResult<Vec<u8>> {
    crate::options::validate_box_path("path", path)?;
    check_reachable("path", path)?;
    let name = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    if name.is_empty() || name == "." || name == ".." {
        return Err(BoxliteError::invalid(
            "path",
            format!("{path:?} does not name a file"),
        ));
    }
    let limit = max_bytes.unwrap_or(READ_FILE_LIMIT);
    let mut channel = client.open(Message::CopyOut {
        path: path.to_string(),
    })?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
    let parser =
        tokio::task::spawn_blocking(move || single_file(ChunkReader::new(rx), &name, limit));
    let fed = feed(&mut channel, tx, "CopyOut").await;
    let parsed = parser.await.map_err(|e| task_failed("read_file", e))?;
    let shown = bounded(path, MESSAGE_LIMIT);
    let data = match parsed {
        Ok(data) => data,
        Err(why) => {
            kill_helper(&channel);
            // The guest's own failure (not found, ...) says more than a cut-off archive.
            fed?;
            return Err(match why {
                SingleFile::NotRegular => BoxliteError::invalid(
                    "path",
                    format!("{shown:?} is not a regular file in the box"),
                ),
                SingleFile::TooLarge(size) => BoxliteError::invalid(
                    "max_bytes",
                    format!(
                        "{shown:?} is {size} bytes, over read_file's limit of {limit} bytes; \
                         pass a larger max_bytes or use copy_out"
                    ),
                ),
                SingleFile::Malformed(why) => BoxliteError::protocol(format!(
                    "the box sent a bad archive for {shown:?}: {why}"
                )),
            });
        }
    };
    // The content is in; the guest's verdict still counts (a read error half-way).
    match fed? {
        Fed::Done => {}
        Fed::ConsumerStopped => drain(&mut channel, "CopyOut").await?,
    }
    Ok(data)
}

enum SingleFile {
    NotRegular,
    TooLarge(u64),
    Malformed(String),
}

/// The content of the first entry of `archive`, which must be the regular file `name` of at
/// most `limit` bytes.
fn single_file(archive: impl Read, name: &str, limit: u64) -> Result<Vec<u8>, SingleFile> {
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
            "unexpected entry {:?}",
            bounded(&entry_name, 200)
        )));
    }
    if !is_file_content(entry.header().entry_type()) {
        return Err(SingleFile::NotRegular);
    }
    let size = entry.size();
    if size > limit {
        return Err(SingleFile::TooLarge(size));
    }
    let mut data = Vec::with_capacity(size.min(16 * 1024 * 1024) as usize);
    (&mut entry)
        .take(size)
        .read_to_end(&mut data)
        .map_err(malformed)?;
    if data.len() as u64 != size {
        return Err(SingleFile::Malformed(format!(
            "the file's content ends after {} of {size} bytes",
            data.len()
        )));
    }
    Ok(data)
}

/// Entry types whose content is a regular file's.
fn is_file_content(kind: tar::EntryType) -> bool {
    matches!(
        kind,
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
    )
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
    check_reachable("path", path)
}

/// Writes `data` to `path` in the box with `mode`, replacing a file (or a symlink); missing
/// parent directories are created (owned by root). An existing directory, device, FIFO or
/// socket at `path` is an `InvalidArgument` error and is left alone; a write the guest cannot
/// do is the guest's error.
pub(crate) async fn write_file(
    client: &AgentClient,
    path: &str,
    data: &[u8],
    mode: u32,
) -> BoxliteResult<()> {
    let shown = bounded(path, MESSAGE_LIMIT);
    match probe(client, path).await? {
        Found::Missing | Found::Unknown | Found::File | Found::Symlink => {}
        Found::Directory => {
            return Err(BoxliteError::invalid(
                "path",
                format!(
                    "{shown:?} is a directory in the box; write_file writes a file (name one \
                     inside it, or remove the directory first)"
                ),
            ))
        }
        Found::Special => {
            return Err(BoxliteError::invalid(
                "path",
                format!(
                    "{shown:?} is not a regular file in the box (a device, FIFO or socket); \
                     write_file replaces only files"
                ),
            ))
        }
    }
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
        channel
            .handle
            .send_stdin_within(chunk, Some(REQUEST_TIMEOUT))
            .await?;
    }
    finish_copy_in(channel).await
}

/// Copies the box path `src` to the host at `dest`, writing at most `max_bytes` (default
/// [`COPY_OUT_LIMIT`]) of file content.
pub(crate) async fn copy_out(
    client: &AgentClient,
    src: &str,
    dest: &Path,
    options: CopyOptions,
    max_bytes: Option<u64>,
) -> BoxliteResult<()> {
    crate::options::validate_box_path("src", src)?;
    check_reachable("src", src)?;
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
    let limits = ExtractLimits {
        recursive: options.recursive,
        max_bytes: max_bytes.unwrap_or(COPY_OUT_LIMIT),
    };
    let extractor = tokio::task::spawn_blocking(move || {
        extract_untrusted(ChunkReader::new(rx), &staging_path, &expected, limits)
    });
    let fed = feed(&mut channel, tx, "CopyOut").await;
    let extracted = extractor.await.map_err(|e| task_failed("extract", e))?;
    if let Err(e) = extracted {
        kill_helper(&channel);
        // The guest's own failure says more than a cut-off archive.
        fed?;
        return Err(e);
    }
    match fed? {
        Fed::Done => {}
        // The archive ended (its end blocks) before the stream: wait for the verdict.
        Fed::ConsumerStopped => drain(&mut channel, "CopyOut").await?,
    }
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
    let message = bounded(&message, MESSAGE_LIMIT);
    match kind {
        boxlite_proto::ErrorKind::NotFound | boxlite_proto::ErrorKind::InvalidArgument => {
            BoxliteError::invalid("path", message)
        }
        _ => BoxliteError::guest_storage("copy failed in the box", message),
    }
}

/// What [`extract_untrusted`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Directories are accepted.
    pub recursive: bool,
    /// Regular-file bytes written at most, added up over the archive.
    pub max_bytes: u64,
}

/// Extracts a tar from the box below `root`, refusing anything but `expected/...` made of
/// plain names, anything but files, directories and links, and more than `limits.max_bytes`
/// of file content (checked at each header, before the file is written). Regular files are
/// written with holes where their content has runs of zeros.
pub fn extract_untrusted(
    input: impl Read,
    root: &Path,
    expected: &str,
    limits: ExtractLimits,
) -> BoxliteResult<()> {
    let bad = |why: String| {
        BoxliteError::protocol(format!(
            "refused an entry from the box: {}",
            bounded(&why, MESSAGE_LIMIT)
        ))
    };
    let (input, meter) = crate::tarlimit::budgeted(input);
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut entries = archive
        .entries()
        .map_err(|e| BoxliteError::io("reading the archive from the box", e))?;
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 16 * HOLE_BLOCK];
    loop {
        let step = crate::tarlimit::next_entry(&meter, &mut entries);
        let Some(entry) = step.entry else { break };
        let mut entry = entry.map_err(|e| {
            if step.over_budget {
                bad(e.to_string())
            } else {
                BoxliteError::io("reading the archive from the box", e)
            }
        })?;
        let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
        if !plain_relative(&path)
            || path.components().next() != Some(Component::Normal(expected.as_ref()))
        {
            return Err(bad(format!("{}", path.display())));
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() && !limits.recursive {
            return Err(BoxliteError::invalid(
                "src",
                format!("{expected:?} is a directory; copy it with recursive=True"),
            ));
        }
        if is_file_content(kind) {
            let size = entry.size();
            written = written.saturating_add(size);
            if written > limits.max_bytes {
                return Err(BoxliteError::invalid(
                    "max_bytes",
                    format!(
                        "{expected:?} holds more than copy_out's limit of {} bytes of files \
                         ({} is {size} bytes); pass a larger max_bytes",
                        limits.max_bytes,
                        bounded(&path.display().to_string(), 200)
                    ),
                ));
            }
            write_file_sparse(&mut entry, root, &path, size, &mut buf)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            continue;
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
        } else if !(kind.is_dir() || kind.is_symlink()) {
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

/// Writes one regular file of the archive at `root/rel` (a plain relative path): its parent
/// directories must be real directories below `root` (never symlinks), an existing file or
/// symlink there is replaced, never followed. Aligned blocks of zeros are skipped (holes); the
/// mode loses its setuid/setgid/sticky bits.
fn write_file_sparse(
    entry: &mut tar::Entry<'_, impl Read>,
    root: &Path,
    rel: &Path,
    size: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let target = root.join(rel);
    let mut dir = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            dir.push(part);
            match std::fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(std::io::Error::other(format!(
                        "{} is not a directory",
                        dir.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::DirBuilder::new().mode(0o755).create(&dir)?
                }
                Err(e) => return Err(e),
            }
        }
    }
    match std::fs::symlink_metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            return Err(std::io::Error::other("a file would replace a directory"))
        }
        Ok(_) => std::fs::remove_file(&target)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&target)?;
    let mut offset: u64 = 0;
    while offset < size {
        let want = buf.len().min((size - offset) as usize);
        let n = read_full(entry, &mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the content ends after {offset} of {size} bytes"),
            ));
        }
        let mut at = 0;
        while at < n {
            let end = (at + HOLE_BLOCK).min(n);
            if buf[at..end].iter().any(|b| *b != 0) {
                // Join the following non-zero blocks into one write.
                let mut stop = end;
                while stop < n {
                    let next = (stop + HOLE_BLOCK).min(n);
                    if buf[stop..next].iter().all(|b| *b == 0) {
                        break;
                    }
                    stop = next;
                }
                file.write_all_at(&buf[at..stop], offset + at as u64)?;
                at = stop;
            } else {
                at = end;
            }
        }
        offset += n as u64;
    }
    // A trailing hole still counts in the length.
    file.set_len(size)?;
    let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Ok(mtime) = entry.header().mtime() {
        let _ = file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(mtime));
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
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

impl ChunkReader {
    fn new(rx: mpsc::Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
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
    use boxlite_proto::Frame;
    use std::os::unix::fs::MetadataExt;

    fn limits() -> ExtractLimits {
        ExtractLimits {
            recursive: true,
            max_bytes: COPY_OUT_LIMIT,
        }
    }

    /// A header with `path` written raw (bypassing the builder's own checks: this is what a
    /// hostile guest can send).
    fn raw_header(path: &str, kind: tar::EntryType, size: u64, link: &str) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o4755);
        h.set_size(size);
        let name = h.as_old_mut().name.as_mut();
        let n = path.len().min(name.len());
        name[..n].copy_from_slice(&path.as_bytes()[..n]);
        if !link.is_empty() {
            let field = h.as_old_mut().linkname.as_mut();
            let n = link.len().min(field.len());
            field[..n].copy_from_slice(&link.as_bytes()[..n]);
        }
        h.set_cksum();
        h
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let size = if kind.is_file() { 2 } else { 0 };
            let h = raw_header(path, *kind, size, link);
            let data: &[u8] = if kind.is_file() { b"hi" } else { b"" };
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn extracts_a_plain_tree_without_special_bits() {
        let dir = tempfile::tempdir().unwrap();
        let data = tar_with(&[
            ("out/", tar::EntryType::Directory, ""),
            ("out/a", tar::EntryType::Regular, ""),
            ("out/l", tar::EntryType::Symlink, "a"),
        ]);
        extract_untrusted(data.as_slice(), dir.path(), "out", limits()).unwrap();
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
            let err = extract_untrusted(tar_with(&entries).as_slice(), dir.path(), "out", limits())
                .unwrap_err();
            assert!(err.to_string().contains("refused"), "{err}");
        }
        // A symlink that points outside, then a file or a directory written through it.
        for kind in [tar::EntryType::Regular, tar::EntryType::Directory] {
            let dir = tempfile::tempdir_in(outside.path()).unwrap();
            let link_target = outside.path().to_str().unwrap().to_string();
            let through = tar_with(&[
                ("out/", tar::EntryType::Directory, ""),
                ("out/esc", tar::EntryType::Symlink, &link_target),
                ("out/esc/victim", kind, ""),
            ]);
            assert!(extract_untrusted(through.as_slice(), dir.path(), "out", limits()).is_err());
            assert!(!victim.exists(), "an entry escaped the staging directory");
        }
        // A file written over a symlink replaces the link, never writes through it.
        let dir = tempfile::tempdir_in(outside.path()).unwrap();
        let over = tar_with(&[
            ("out/", tar::EntryType::Directory, ""),
            ("out/f", tar::EntryType::Symlink, victim.to_str().unwrap()),
            ("out/f", tar::EntryType::Regular, ""),
        ]);
        extract_untrusted(over.as_slice(), dir.path(), "out", limits()).unwrap();
        assert!(!victim.exists());
        assert_eq!(std::fs::read(dir.path().join("out/f")).unwrap(), b"hi");
    }

    /// A tar of one regular file `name` of `size` bytes, zero but for `data` at `at`.
    fn sparse_tar(name: &str, size: u64, at: u64, data: &[u8]) -> Vec<u8> {
        struct Content {
            pos: u64,
            size: u64,
            at: u64,
            data: Vec<u8>,
        }
        impl Read for Content {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = out.len().min((self.size - self.pos) as usize);
                for (i, b) in out[..n].iter_mut().enumerate() {
                    let p = self.pos + i as u64;
                    *b = if p >= self.at && p < self.at + self.data.len() as u64 {
                        self.data[(p - self.at) as usize]
                    } else {
                        0
                    };
                }
                self.pos += n as u64;
                Ok(n)
            }
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(size);
        let content = Content {
            pos: 0,
            size,
            at,
            data: data.to_vec(),
        };
        b.append_data(&mut h, name, content).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn zero_runs_become_holes_on_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * 1024 * 1024;
        let data = vec![7u8; 4096];
        let archive = sparse_tar("big", size, 20 * 1024 * 1024 + 4096, &data);
        extract_untrusted(archive.as_slice(), dir.path(), "big", limits()).unwrap();
        let path = dir.path().join("big");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        // 64 MiB apparent, a few blocks allocated (filesystems without holes are not ours).
        assert!(
            meta.blocks() * 512 < 1024 * 1024,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let mut f = std::fs::File::open(&path).unwrap();
        let mut back = vec![0u8; 8192];
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(20 * 1024 * 1024)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(&back[..4096], &[0u8; 4096][..]);
        assert_eq!(&back[4096..], &data[..]);
    }

    #[test]
    fn a_file_over_the_budget_is_refused_before_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        for (name, size) in [("out/a", 600u64), ("out/b", 600)] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(size);
            b.append_data(&mut h, name, &vec![1u8; size as usize][..])
                .unwrap();
        }
        let archive = b.into_inner().unwrap();
        let tight = ExtractLimits {
            recursive: true,
            max_bytes: 1000,
        };
        let err = extract_untrusted(archive.as_slice(), dir.path(), "out", tight).unwrap_err();
        match &err {
            BoxliteError::InvalidArgument { field, reason } => {
                assert_eq!(field, "max_bytes");
                assert!(reason.contains("1000 bytes"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(dir.path().join("out/a").exists());
        assert!(!dir.path().join("out/b").exists());
        // A header announcing a huge file is refused at once, without its content.
        let mut h = raw_header("out", tar::EntryType::Regular, 1 << 40, "");
        h.set_cksum();
        let mut lie = h.as_bytes().to_vec();
        lie.extend_from_slice(&[0u8; 1024]);
        let err = extract_untrusted(lie.as_slice(), dir.path(), "out", limits()).unwrap_err();
        assert_eq!(err.kind(), "invalid_argument", "{err}");
    }

    /// Panics when read past `limit` bytes: proves a reader stopped before content it must
    /// not take.
    struct Tripwire<'a> {
        data: &'a [u8],
        limit: usize,
        at: usize,
    }

    impl Read for Tripwire<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(self.at < self.limit, "read past byte {}", self.limit);
            let n = buf.len().min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn huge_long_names_and_pax_headers_are_refused_unread() {
        for kind in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
            let dir = tempfile::tempdir().unwrap();
            let mut h = raw_header("././@LongLink", kind, 1 << 40, "");
            h.set_cksum();
            let mut data = h.as_bytes().to_vec();
            data.resize(512 + 4 * 1024 * 1024, b'a');
            let input = Tripwire {
                data: &data,
                limit: 512 + crate::tarlimit::HEADER_BUDGET as usize,
                at: 0,
            };
            let err = extract_untrusted(input, dir.path(), "out", limits()).unwrap_err();
            assert!(err.to_string().contains("headers of more than"), "{err}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn first_entry_kind_skips_long_names() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        let long = format!("d{}", "x".repeat(300));
        b.append_data(&mut h, &long, std::io::empty()).unwrap();
        let archive = b.into_inner().unwrap();
        assert_eq!(first_entry_kind(archive.as_slice()).unwrap(), "directory");
        assert_eq!(first_entry_kind(&b"short"[..]).unwrap(), "other");
        assert_eq!(first_entry_kind(std::io::empty()).unwrap(), "other");
    }

    #[test]
    fn a_truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut archive = sparse_tar("f", 10_000, 0, b"abc");
        archive.truncate(512 + 4096);
        assert!(extract_untrusted(archive.as_slice(), dir.path(), "f", limits()).is_err());
    }

    #[test]
    fn single_file_checks_type_and_size_before_reading() {
        let one = sparse_tar("f", 10, 0, b"0123456789");
        assert_eq!(
            single_file(one.as_slice(), "f", 10).ok(),
            Some(b"0123456789".to_vec())
        );
        assert!(matches!(
            single_file(one.as_slice(), "f", 9),
            Err(SingleFile::TooLarge(10))
        ));
        assert!(matches!(
            single_file(one.as_slice(), "g", 10),
            Err(SingleFile::Malformed(_))
        ));
        let dev = tar_with(&[("zero", tar::EntryType::Char, "")]);
        assert!(matches!(
            single_file(dev.as_slice(), "zero", 10),
            Err(SingleFile::NotRegular)
        ));
        // Only the header of a huge file is read.
        let h = raw_header("big", tar::EntryType::Regular, 1 << 40, "");
        assert!(matches!(
            single_file(h.as_bytes().as_slice(), "big", READ_FILE_LIMIT),
            Err(SingleFile::TooLarge(_))
        ));
    }

    #[test]
    fn first_entry_types() {
        let kind = |archive: Vec<u8>| first_entry_type(&archive).map(|r| r.ok());
        assert_eq!(
            kind(tar_with(&[("d/", tar::EntryType::Directory, "")])),
            Some(Some(Found::Directory))
        );
        assert_eq!(
            kind(tar_with(&[("f", tar::EntryType::Regular, "")])),
            Some(Some(Found::File))
        );
        assert_eq!(
            kind(tar_with(&[("l", tar::EntryType::Symlink, "x")])),
            Some(Some(Found::Symlink))
        );
        assert_eq!(
            kind(tar_with(&[("z", tar::EntryType::Char, "")])),
            Some(Some(Found::Special))
        );
        assert_eq!(kind(vec![0u8; 1024]), Some(Some(Found::Special)));
        assert_eq!(kind(vec![0u8; 100]), None);
        // A long name comes first as its own entry.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        b.append_data(&mut h, "d".repeat(300), std::io::empty())
            .unwrap();
        let long = b.into_inner().unwrap();
        assert_eq!(kind(long.clone()), Some(Some(Found::Directory)));
        assert_eq!(kind(long[..600].to_vec()), None);
    }

    #[test]
    fn proc_and_sys_are_refused_with_a_hint() {
        for path in [
            "/proc/sys/kernel/hostname",
            "/sys",
            "//proc",
            "/tmp/../proc/x",
            "/./sys/x",
            "/dev/null",
            "/dev",
        ] {
            let err = check_reachable("path", path).unwrap_err();
            assert!(err.to_string().contains("use exec"), "{path}: {err}");
        }
        for path in ["/procs", "/tmp/proc", "/", "/etc/passwd"] {
            check_reachable("path", path).unwrap();
        }
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

    /// A scripted agent on the other end of a socket pair.
    mod scripted {
        use super::super::*;
        use boxlite_proto::{Body, Frame};
        use tokio::io::AsyncWriteExt;
        use tokio::net::UnixStream;

        pub fn client() -> (AgentClient, UnixStream) {
            let (host, guest) = UnixStream::pair().unwrap();
            let (client, _ready) = AgentClient::start(host);
            (client, guest)
        }

        pub async fn read(guest: &mut UnixStream) -> Frame {
            crate::agent::read_frame(guest).await.unwrap().unwrap()
        }

        /// Reads until a request arrives; returns it with its channel.
        pub async fn request(guest: &mut UnixStream) -> (u32, Message) {
            loop {
                let frame = read(guest).await;
                if let Body::Control(message) = frame.body {
                    return (frame.channel, message);
                }
            }
        }

        pub async fn send(guest: &mut UnixStream, frame: Frame) {
            guest.write_all(&frame.encode()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn write_file_onto_a_directory_is_refused_and_sends_nothing() {
        let (client, mut guest) = scripted::client();
        let writer = tokio::spawn({
            let client = client.clone();
            async move { write_file(&client, "/tmp/d", b"data", 0o644).await }
        });
        let (ch, req) = scripted::request(&mut guest).await;
        assert_eq!(
            req,
            Message::CopyOut {
                path: "/tmp/d".into()
            }
        );
        let dir = tar_with(&[("d/", tar::EntryType::Directory, "")]);
        scripted::send(&mut guest, Frame::data(ch, StreamId::Stdout, dir)).await;
        // The helper is stopped, and no copy-in follows.
        let (sig_ch, sig) = scripted::request(&mut guest).await;
        assert_eq!(
            (sig_ch, sig),
            (
                ch,
                Message::Signal {
                    signal: libc::SIGKILL
                }
            )
        );
        let err = writer.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, BoxliteError::InvalidArgument { field, reason } if field == "path" && reason.contains("is a directory")),
            "{err}"
        );
        let nothing =
            tokio::time::timeout(Duration::from_millis(100), scripted::read(&mut guest)).await;
        assert!(nothing.is_err(), "something was sent after the refusal");
    }

    #[tokio::test]
    async fn write_file_reports_the_guests_failure() {
        let (client, mut guest) = scripted::client();
        let writer = tokio::spawn({
            let client = client.clone();
            async move { write_file(&client, "/ro/f", b"data", 0o644).await }
        });
        let (ch, _) = scripted::request(&mut guest).await;
        scripted::send(
            &mut guest,
            Frame::control(
                ch,
                Message::Error {
                    kind: boxlite_proto::ErrorKind::NotFound,
                    message: "no such file".into(),
                },
            ),
        )
        .await;
        let (ch, req) = scripted::request(&mut guest).await;
        assert_eq!(req, Message::CopyIn { path: "/ro".into() });
        scripted::send(
            &mut guest,
            Frame::control(
                ch,
                Message::Error {
                    kind: boxlite_proto::ErrorKind::Io,
                    message: "entry f: Read-only file system".into(),
                },
            ),
        )
        .await;
        let err = writer.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), "storage", "{err}");
        assert!(err.to_string().contains("Read-only"), "{err}");
    }

    #[tokio::test]
    async fn read_file_over_its_limit_stops_at_the_header() {
        let (client, mut guest) = scripted::client();
        let reader = tokio::spawn({
            let client = client.clone();
            async move { read_file(&client, "/big", Some(1000)).await }
        });
        let (ch, _) = scripted::request(&mut guest).await;
        let h = raw_header("big", tar::EntryType::Regular, 512 * 1024 * 1024, "");
        scripted::send(
            &mut guest,
            Frame::data(ch, StreamId::Stdout, h.as_bytes().to_vec()),
        )
        .await;
        let (sig_ch, sig) = scripted::request(&mut guest).await;
        assert_eq!(sig_ch, ch);
        assert_eq!(
            sig,
            Message::Signal {
                signal: libc::SIGKILL
            }
        );
        // The killed helper's verdict.
        scripted::send(
            &mut guest,
            Frame::control(
                ch,
                Message::Error {
                    kind: boxlite_proto::ErrorKind::Io,
                    message: "copy-out failed (killed by signal 9)".into(),
                },
            ),
        )
        .await;
        let err = reader.await.unwrap().unwrap_err();
        assert!(
            matches!(&err, BoxliteError::InvalidArgument { field, .. } if field == "max_bytes"),
            "{err}"
        );
        assert!(err.to_string().contains("536870912 bytes"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_fails_copies_after_the_request_timeout() {
        let (client, mut guest) = scripted::client();
        let reader = tokio::spawn({
            let client = client.clone();
            async move { write_file(&client, "/f", b"x", 0o644).await }
        });
        let _ = scripted::request(&mut guest).await;
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), "guest_protocol");
        assert!(err.to_string().contains("30 s"), "{err}");
    }

    /// A name from a small alphabet that covers every trick: parents, roots, dots, the
    /// expected name, a name of the outer directory.
    fn name_strategy() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let part = prop_oneof![
            2 => Just("out"),
            1 => Just(".."),
            1 => Just("."),
            1 => Just(""),
            4 => Just("x"),
            4 => Just("esc"),
            2 => Just("victim"),
        ];
        (proptest::collection::vec(part, 1..4), 0u8..8).prop_map(|(parts, how)| {
            let joined = parts.join("/");
            match how {
                0 => format!("/{joined}"),
                1 => joined,
                // Most names start where the extractor accepts them.
                _ => format!("out/{joined}"),
            }
        })
    }

    fn kind_strategy() -> impl proptest::strategy::Strategy<Value = tar::EntryType> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(tar::EntryType::Regular),
            4 => Just(tar::EntryType::Directory),
            4 => Just(tar::EntryType::Symlink),
            2 => Just(tar::EntryType::Link),
            1 => Just(tar::EntryType::Char),
            1 => Just(tar::EntryType::Fifo),
            1 => Just(tar::EntryType::GNUSparse),
            1 => Just(tar::EntryType::GNULongName),
            1 => Just(tar::EntryType::XHeader),
            1 => Just(tar::EntryType::Continuous),
        ]
    }

    /// Every path below `dir`, symlinks not followed.
    fn tree(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(p.clone());
                }
                out.push(p);
            }
        }
        out.sort();
        out
    }

    /// Extracts the archive `build` makes (given the outer directory, for links that point at
    /// it) into a staging directory inside a fresh outer directory holding a `victim` file;
    /// asserts nothing outside the staging directory changed and the budget held.
    fn extract_confined(build: impl Fn(&Path) -> Vec<u8>, budget: u64) {
        let outer = tempfile::tempdir().unwrap();
        let victim = outer.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let staging = outer.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let before: Vec<PathBuf> = vec![staging.clone(), victim.clone()];
        let limits = ExtractLimits {
            recursive: true,
            max_bytes: budget,
        };
        let archive = build(outer.path());
        let _ = extract_untrusted(archive.as_slice(), &staging, "out", limits);
        let mut outside: Vec<PathBuf> = tree(outer.path())
            .into_iter()
            .filter(|p| !p.starts_with(&staging) || *p == staging)
            .collect();
        outside.sort();
        assert_eq!(
            outside, before,
            "something was created outside the staging directory"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        // Nothing written below the staging directory is larger than the budget in total.
        let written: u64 = tree(&staging)
            .iter()
            .filter_map(|p| std::fs::symlink_metadata(p).ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        assert!(
            written <= budget,
            "{written} bytes written over a {budget} budget"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        #[test]
        fn arbitrary_bytes_never_panic_or_escape(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..3000)) {
            extract_confined(|_| bytes.clone(), 1 << 20);
            let _ = single_file(bytes.as_slice(), "out", 1 << 20);
            let _ = first_entry_type(&bytes);
        }

        #[test]
        fn hostile_archives_never_escape(
            entries in proptest::collection::vec(
                (name_strategy(), kind_strategy(), name_strategy(), 0u64..3000, proptest::num::u8::ANY),
                1..8,
            ),
            flips in proptest::collection::vec((0usize..8192, proptest::num::u8::ANY), 0..4),
            budget in 0u64..6000,
        ) {
            // Links named `/x...` point at the outer directory (where the victim is).
            let build = |outer: &Path| {
                let mut archive = Vec::new();
                for (name, kind, link, size, fill) in &entries {
                    let link = if link.starts_with("/x") {
                        outer.to_string_lossy().into_owned()
                    } else {
                        link.clone()
                    };
                    let h = raw_header(name, *kind, *size, &link);
                    archive.extend_from_slice(h.as_bytes());
                    let padded = size.div_ceil(512) * 512;
                    archive.extend((0..padded).map(|i| if i < *size { *fill } else { 0 }));
                }
                archive.extend_from_slice(&[0u8; 1024]);
                for (at, byte) in &flips {
                    if let Some(b) = archive.get_mut(*at) {
                        *b = *byte;
                    }
                }
                archive
            };
            extract_confined(build, budget);
            let archive = build(Path::new("/tmp/outer"));
            let _ = single_file(archive.as_slice(), "out", budget);
            let _ = first_entry_type(&archive);
        }
    }
}
