//! Linear directory blocks, each ending in the 12-byte checksum tail.

use crate::csum::crc32c;
use crate::layout::BLOCK;

pub(crate) const FT_REG: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHR: u8 = 3;
pub(crate) const FT_BLK: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_LNK: u8 = 7;

const TAIL: usize = 12;
const USABLE: usize = BLOCK as usize - TAIL;

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Blocks for a directory with the given child name lengths (plus `.` and `..`).
pub(crate) fn blocks_needed(names: impl Iterator<Item = usize>) -> u64 {
    let mut blocks = 1u64;
    let mut used = rec_len(1) + rec_len(2);
    for n in names {
        let r = rec_len(n);
        if used + r > USABLE {
            blocks += 1;
            used = 0;
        }
        used += r;
    }
    blocks
}

/// Encodes a directory: `.`, `..`, then `entries` as (name, inode, file type).
pub(crate) fn encode<'a>(
    me: u32,
    parent: u32,
    entries: impl Iterator<Item = (&'a [u8], u32, u8)>,
    seed: u32,
) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(BLOCK as usize);
    let mut block_start = 0usize;
    let mut last_entry: Option<usize> = None;
    let all = [(&b"."[..], me, FT_DIR), (&b".."[..], parent, FT_DIR)]
        .into_iter()
        .chain(entries);
    out.resize(BLOCK as usize, 0);
    let mut used = 0usize;
    for (name, ino, ft) in all {
        let r = rec_len(name.len());
        if used + r > USABLE {
            finish_block(&mut out, block_start, last_entry, seed);
            block_start = out.len();
            out.resize(block_start + BLOCK as usize, 0);
            used = 0;
        }
        let at = block_start + used;
        out[at..at + 4].copy_from_slice(&ino.to_le_bytes());
        out[at + 4..at + 6].copy_from_slice(&(r as u16).to_le_bytes());
        out[at + 6] = name.len() as u8;
        out[at + 7] = ft;
        out[at + 8..at + 8 + name.len()].copy_from_slice(name);
        last_entry = Some(at);
        used += r;
    }
    finish_block(&mut out, block_start, last_entry, seed);
    out
}

/// Stretches the last entry to the tail and writes the tail with the block's checksum.
fn finish_block(out: &mut [u8], start: usize, last: Option<usize>, seed: u32) {
    if let Some(at) = last.filter(|&a| a >= start) {
        let len = (start + USABLE - at) as u16;
        out[at + 4..at + 6].copy_from_slice(&len.to_le_bytes());
    }
    let tail = start + USABLE;
    out[tail..tail + 4].fill(0);
    out[tail + 4..tail + 6].copy_from_slice(&(TAIL as u16).to_le_bytes());
    out[tail + 6] = 0;
    out[tail + 7] = 0xDE;
    let c = crc32c(seed, &out[start..tail]);
    out[tail + 8..tail + 12].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measure_matches_encode() {
        let names: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("file-{i:05}").into_bytes())
            .collect();
        let n = blocks_needed(names.iter().map(Vec::len));
        let data = encode(12, 2, names.iter().map(|n| (n.as_slice(), 13, FT_REG)), 1);
        assert_eq!(data.len() as u64, n * BLOCK);
        assert!(n > 1);
    }
}
