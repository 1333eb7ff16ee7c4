//! The internal journal: a clean jbd2 superblock (v2, no features: the kernel turns on what
//! it uses at mount) followed by blocks the image leaves as holes, i.e. zeros.

use crate::layout::BLOCK;

pub(crate) fn superblock(blocks: u64, uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    let mut put = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    put(0x00, 0xC03B_3998); // magic
    put(0x04, 4); // superblock v2
    put(0x08, 0); // header sequence
    put(0x0C, BLOCK as u32);
    put(0x10, blocks as u32); // s_maxlen
    put(0x14, 1); // s_first
    put(0x18, 1); // s_sequence
    put(0x1C, 0); // s_start: clean, nothing to replay
    put(0x40, 1); // s_nr_users
    b[0x30..0x40].copy_from_slice(uuid);
    b
}

/// mke2fs's journal size (up to 128 MiB) for a filesystem of `blocks`, but never under 16 MiB once the
/// image reaches 64 MiB: a box grows its filesystem later and keeps this journal.
pub(crate) fn default_blocks(total: u64) -> u64 {
    match total {
        t if t < 16384 => 1024,
        t if t < 256 * 1024 => 4096,
        t if t < 512 * 1024 => 8192,
        t if t < 4096 * 1024 => 16384,
        // Capped at 128 MiB so that it always fits the inode's four extents.
        _ => 32768,
    }
}
