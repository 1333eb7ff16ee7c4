//! Writes an ext4 filesystem image straight from OCI layer tar streams.
//!
//! Nothing is extracted and no host path is ever derived from a layer: every entry is
//! applied to an in-memory tree (metadata only, with OCI whiteouts, opaque directories and
//! hard links), file data is streamed directly into its final blocks of the output image,
//! and the metadata is laid out once the last layer is in. The result passes `e2fsck -fn`,
//! carries a journal and reserved GDT blocks so the guest can grow it online, and has no
//! `lost+found` (a box's root equals the image).

mod csum;
mod data;
mod dir;
mod error;
mod extent;
mod image;
mod inode;
mod journal;
mod layer;
mod layout;
mod superblock;
mod tarstream;
mod tree;
mod xattr;

use std::fs::File;
use std::io::{BufReader, Read};
use std::time::{SystemTime, UNIX_EPOCH};

pub use error::Ext4Error;

use layout::{Allocator, BLOCK, BLOCKS_PER_GROUP, MAX_GROUPS};

/// How to build the image.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Size of the image in bytes (rounded down to 4 KiB). `None`: the content plus some
    /// slack, at least 64 MiB.
    pub size: Option<u64>,
    /// Volume label, up to 16 bytes.
    pub label: Option<String>,
}

/// What went into the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BuildReport {
    /// Regular files (inodes, not names).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    pub symlinks: u64,
    /// Device nodes and FIFOs.
    pub specials: u64,
    /// Bytes of regular file content.
    pub bytes: u64,
    /// Tar entries read over all layers.
    pub entries: u64,
    /// Inodes in use (the reserved ones excluded).
    pub inodes: u64,
    /// Size of the image file.
    pub image_size: u64,
    /// Bytes of the filesystem in use (metadata and journal included).
    pub used_bytes: u64,
    pub journal_size: u64,
}

/// Builds an ext4 image into `out` (a regular file opened for writing; it is truncated
/// first) from uncompressed layer tar streams, lowest layer first. Each reader is read to
/// its end, so a reader that verifies a digest at EOF gets to report a mismatch (as
/// [`Ext4Error::Read`]).
pub fn build<R: Read>(
    layers: impl IntoIterator<Item = R>,
    out: &File,
    opts: &BuildOptions,
) -> Result<BuildReport, Ext4Error> {
    let label = label_bytes(opts.label.as_deref())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() as i64, d.subsec_nanos()))
        .unwrap_or((0, 0));
    let limit = match opts.size {
        Some(size) => image::fixed_blocks(size),
        None => MAX_GROUPS * BLOCKS_PER_GROUP,
    };
    if opts.size.is_some() && limit < 2048 {
        return Err(Ext4Error::Options("the image size is under 8 MiB".into()));
    }
    out.set_len(0).map_err(Ext4Error::Write)?;
    let mut writer = data::ImageWriter::new(out);
    let mut alloc = Allocator::new(limit, opts.size);
    let mut tree = tree::Tree::new(tree::Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: now,
        xattrs: Vec::new(),
    });
    let mut counts = layer::Counts::default();
    for (i, reader) in layers.into_iter().enumerate() {
        let mut tar = tarstream::TarReader::new(BufReader::with_capacity(1 << 20, reader), i);
        let mut applier = layer::LayerApplier {
            tree: &mut tree,
            writer: &mut writer,
            alloc: &mut alloc,
            counts: &mut counts,
            stamp: i as u32 + 1,
            layer: i,
        };
        applier.apply(&mut tar)?;
    }
    let mut random = [0u8; 32];
    fill_random(&mut random);
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&random[..16]);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let mut hash_seed = [0u8; 16];
    hash_seed.copy_from_slice(&random[16..]);
    image::finish(image::Inputs {
        tree,
        alloc,
        writer,
        size: opts.size,
        label,
        now,
        uuid,
        hash_seed,
        entries: counts.entries,
    })
}

fn label_bytes(label: Option<&str>) -> Result<[u8; 16], Ext4Error> {
    let mut out = [0u8; 16];
    if let Some(l) = label {
        if l.len() > 16 {
            return Err(Ext4Error::Options(format!(
                "label {l:?} is longer than 16 bytes"
            )));
        }
        out[..l.len()].copy_from_slice(l.as_bytes());
    }
    Ok(out)
}

fn fill_random(buf: &mut [u8]) {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n <= 0 {
            // Without entropy the image is still valid: ids only need to differ in practice.
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            for (i, b) in buf[got..].iter_mut().enumerate() {
                *b = (t >> ((i % 16) * 8)) as u8 ^ (std::process::id() as u8).wrapping_add(i as u8);
            }
            return;
        }
        got += n as usize;
    }
}

const _: () = assert!(BLOCK == 4096);
