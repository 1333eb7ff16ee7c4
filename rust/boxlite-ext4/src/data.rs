//! The output image: a write buffer that coalesces consecutive blocks, and file data
//! streamed from a tar entry straight to its final blocks.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;

use crate::extent::Extent;
use crate::layout::{Allocator, BLOCK};
use crate::tarstream::TarReader;
use crate::Ext4Error;

const FLUSH_AT: usize = 8 << 20;

/// Writes blocks into the image, merging runs of consecutive blocks into large writes.
pub(crate) struct ImageWriter<'f> {
    out: &'f File,
    buf: Vec<u8>,
    /// Block number of `buf[0]`.
    start: u64,
}

impl<'f> ImageWriter<'f> {
    pub fn new(out: &'f File) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(FLUSH_AT + (1 << 20)),
            start: 0,
        }
    }

    pub fn flush(&mut self) -> Result<(), Ext4Error> {
        if !self.buf.is_empty() {
            self.out
                .write_all_at(&self.buf, self.start * BLOCK)
                .map_err(Ext4Error::Write)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// A zeroed, writable area for `count` blocks starting at `block`.
    pub fn area(&mut self, block: u64, count: u64) -> Result<&mut [u8], Ext4Error> {
        let end = self.start + (self.buf.len() as u64) / BLOCK;
        if self.buf.is_empty() || block != end || self.buf.len() >= FLUSH_AT {
            self.flush()?;
            self.start = block;
        }
        let at = self.buf.len();
        self.buf.resize(at + (count * BLOCK) as usize, 0);
        Ok(&mut self.buf[at..])
    }

    /// Writes `data` (a whole number of blocks) at `block`.
    pub fn write_blocks(&mut self, block: u64, data: &[u8]) -> Result<(), Ext4Error> {
        let count = (data.len() as u64).div_ceil(BLOCK);
        let area = self.area(block, count)?;
        area[..data.len()].copy_from_slice(data);
        Ok(())
    }

    pub fn file(&self) -> &File {
        self.out
    }
}

/// Most blocks read into the buffer per step.
const CHUNK_BLOCKS: u64 = 256;

/// Streams the current entry's data (`size` bytes, or a GNU sparse map) into newly
/// allocated blocks; returns the file's extents. Holes of sparse files stay unallocated.
pub(crate) fn write_file<R: Read>(
    tar: &mut TarReader<R>,
    writer: &mut ImageWriter<'_>,
    alloc: &mut Allocator,
    size: u64,
    sparse: Option<&[(u64, u64)]>,
) -> Result<Vec<Extent>, Ext4Error> {
    let mut extents: Vec<Extent> = Vec::new();
    let whole = [(0u64, size)];
    let segments = sparse.unwrap_or(&whole);
    // Byte ranges are read in order; a block shared by two segments is filled in two steps,
    // so track the block being assembled.
    let mut open: Option<(u64, u64)> = None; // (logical block, physical block)
    for &(offset, len) in segments {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let lblock = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            if within != 0 || end - pos < BLOCK {
                // A partial block: reuse the open one or start a new one.
                let phys = match open {
                    Some((l, p)) if l == lblock => p,
                    _ => {
                        let r = alloc.run(1)?;
                        writer.area(r.start, 1)?;
                        push_extent(&mut extents, lblock, r.start, 1)?;
                        open = Some((lblock, r.start));
                        r.start
                    }
                };
                let n = ((BLOCK as usize - within) as u64).min(end - pos) as usize;
                let area = writer.area_for_block(phys)?;
                tar.read_data(&mut area[within..within + n])?;
                pos += n as u64;
                continue;
            }
            // Whole blocks: as many as one contiguous run and the buffer allow.
            let want = ((end - pos) / BLOCK).min(CHUNK_BLOCKS);
            let r = alloc.run(want)?;
            let area = writer.area(r.start, r.len)?;
            tar.read_data(&mut area[..(r.len * BLOCK) as usize])?;
            push_extent(&mut extents, lblock, r.start, r.len)?;
            open = Some((lblock + r.len - 1, r.start + r.len - 1));
            pos += r.len * BLOCK;
        }
    }
    Ok(extents)
}

impl ImageWriter<'_> {
    /// The buffered bytes of `block`, which must be the last block in the buffer.
    fn area_for_block(&mut self, block: u64) -> Result<&mut [u8], Ext4Error> {
        let end = self.start + (self.buf.len() as u64) / BLOCK;
        if self.buf.is_empty() || block + 1 != end {
            return Err(Ext4Error::Write(std::io::Error::other(
                "internal: partial block is no longer buffered",
            )));
        }
        let at = self.buf.len() - BLOCK as usize;
        Ok(&mut self.buf[at..])
    }
}

fn push_extent(
    extents: &mut Vec<Extent>,
    logical: u64,
    phys: u64,
    len: u64,
) -> Result<(), Ext4Error> {
    if logical + len > u64::from(u32::MAX) {
        return Err(Ext4Error::TooLarge("a file larger than 16 TiB".into()));
    }
    if let Some(last) = extents.last_mut() {
        if u64::from(last.logical) + u64::from(last.len) == logical
            && last.start + u64::from(last.len) == phys
            && u64::from(last.len) + len <= crate::layout::MAX_EXTENT
        {
            last.len += len as u32;
            return Ok(());
        }
    }
    extents.push(Extent {
        logical: logical as u32,
        start: phys,
        len: len as u32,
    });
    Ok(())
}
