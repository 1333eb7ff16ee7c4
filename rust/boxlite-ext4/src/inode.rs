//! The 256-byte on-disk inode.

use crate::csum::{crc32c, inode_seed};
use crate::xattr::{encode_ibody, Xattr, IBODY_SPACE};

pub(crate) const INODE_SIZE: usize = 256;
pub(crate) const EXTRA_ISIZE: u16 = 32;
pub(crate) const EXTENTS_FL: u32 = 0x80000;

pub(crate) const S_IFIFO: u16 = 0o010000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFLNK: u16 = 0o120000;

#[derive(Debug)]
pub(crate) struct InodeFields<'a> {
    /// File type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub mtime: (i64, u32),
    /// Change and creation time: when the image was built.
    pub ctime: (i64, u32),
    /// In 512-byte sectors, every block the inode owns (data, tree, xattr block).
    pub sectors: u64,
    pub flags: u32,
    pub i_block: [u8; 60],
    pub xattr_block: u64,
    pub ibody: &'a [&'a Xattr],
}

/// ext4's timestamp: the low 32 bits of the seconds, and an "extra" word with two epoch
/// bits (years up to 2446) and the nanoseconds.
pub(crate) fn encode_time(t: (i64, u32)) -> (u32, u32) {
    let secs = t.0.clamp(i64::from(i32::MIN), 0x3_7FFF_FFFF);
    let epoch = ((secs - i64::from(secs as i32)) >> 32) as u32 & 3;
    let nanos = t.1.min(999_999_999);
    (secs as u32, epoch | (nanos << 2))
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Encodes inode `ino` into `out` (256 bytes), checksum included.
pub(crate) fn encode(ino: u32, f: &InodeFields<'_>, fs_seed: u32, out: &mut [u8]) {
    out[..INODE_SIZE].fill(0);
    let (mt, mt_extra) = encode_time(f.mtime);
    let (ct, ct_extra) = encode_time(f.ctime);
    put16(out, 0x00, f.mode);
    put16(out, 0x02, f.uid as u16);
    put32(out, 0x04, f.size as u32);
    put32(out, 0x08, mt); // atime = mtime, as the extraction sets both
    put32(out, 0x0C, ct);
    put32(out, 0x10, mt);
    put16(out, 0x18, f.gid as u16);
    put16(out, 0x1A, f.links);
    put32(out, 0x1C, f.sectors as u32);
    put32(out, 0x20, f.flags);
    out[0x28..0x64].copy_from_slice(&f.i_block);
    put32(out, 0x68, f.xattr_block as u32);
    put32(out, 0x6C, (f.size >> 32) as u32);
    put16(out, 0x74, (f.sectors >> 32) as u16);
    put16(out, 0x76, (f.xattr_block >> 32) as u16);
    put16(out, 0x78, (f.uid >> 16) as u16);
    put16(out, 0x7A, (f.gid >> 16) as u16);
    put16(out, 0x80, EXTRA_ISIZE);
    put32(out, 0x84, ct_extra);
    put32(out, 0x88, mt_extra);
    put32(out, 0x8C, mt_extra);
    put32(out, 0x90, ct);
    put32(out, 0x94, ct_extra);
    let ibody_at = 128 + EXTRA_ISIZE as usize;
    encode_ibody(f.ibody, &mut out[ibody_at..ibody_at + IBODY_SPACE]);
    let c = crc32c(inode_seed(fs_seed, ino, 0), &out[..INODE_SIZE]);
    put16(out, 0x7C, c as u16);
    put16(out, 0x82, (c >> 16) as u16);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_carry_epoch_bits() {
        assert_eq!(encode_time((0, 5)), (0, 5 << 2));
        assert_eq!(encode_time((-1, 0)), (u32::MAX, 0));
        assert_eq!(encode_time((1 << 31, 0)), (1 << 31, 1));
        assert_eq!(encode_time((i64::MAX, 0)), (0x7FFF_FFFF, 3));
    }
}
