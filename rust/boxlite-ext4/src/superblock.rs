//! The superblock and group descriptors.

use crate::csum::crc32c;
use crate::inode::{EXTRA_ISIZE, INODE_SIZE};
use crate::layout::{BLOCKS_PER_GROUP, GDT_AREA};

pub(crate) const DESC_SIZE: usize = 64;

// Features (and why): a journal, xattrs, reserved GDT blocks for online growth through the
// resize inode, htree-capable directories for later writes; file types in directory
// entries, extents, 64-bit block numbers, flex_bg (metadata outside its group); sparse
// superblock copies, large files, i_blocks beyond 2^32, over 65000 subdirectories, 32 extra
// inode bytes (nanosecond and creation times), checksums on all metadata.
const COMPAT: u32 = 0x4 | 0x8 | 0x10 | 0x20;
const INCOMPAT: u32 = 0x2 | 0x40 | 0x80 | 0x200;
const RO_COMPAT: u32 = 0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x400;

/// What the superblock says about the filesystem.
#[derive(Debug, Clone)]
pub(crate) struct Super {
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes_per_group: u32,
    pub groups: u64,
    pub free_inodes: u64,
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    pub label: [u8; 16],
    pub now: u32,
    /// The journal inode's `i_block` and size, backed up in the superblock.
    pub journal_i_block: [u8; 60],
    pub journal_size: u64,
}

impl Super {
    pub fn desc_blocks(&self) -> u64 {
        (self.groups * DESC_SIZE as u64).div_ceil(4096)
    }

    /// The 1024-byte superblock as stored in group `group`.
    pub fn encode(&self, group: u64) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        let p32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let p16 =
            |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let inodes = u64::from(self.inodes_per_group) * self.groups;
        p32(&mut b, 0x00, inodes as u32);
        p32(&mut b, 0x04, self.blocks as u32);
        p32(&mut b, 0x0C, self.free_blocks as u32);
        p32(&mut b, 0x10, self.free_inodes as u32);
        p32(&mut b, 0x14, 0); // first data block
        p32(&mut b, 0x18, 2); // 4096-byte blocks
        p32(&mut b, 0x1C, 2);
        p32(&mut b, 0x20, BLOCKS_PER_GROUP as u32);
        p32(&mut b, 0x24, BLOCKS_PER_GROUP as u32);
        p32(&mut b, 0x28, self.inodes_per_group);
        p32(&mut b, 0x30, self.now); // write time
        p16(&mut b, 0x36, 0xFFFF); // no mount-count checks
        p16(&mut b, 0x38, 0xEF53);
        p16(&mut b, 0x3A, 1); // clean
        p16(&mut b, 0x3C, 1); // errors: continue
        p32(&mut b, 0x40, self.now); // last check
        p32(&mut b, 0x4C, 1); // dynamic revision
        p32(&mut b, 0x54, 11); // first non-reserved inode
        p16(&mut b, 0x58, INODE_SIZE as u16);
        p16(&mut b, 0x5A, group as u16);
        p32(&mut b, 0x5C, COMPAT);
        p32(&mut b, 0x60, INCOMPAT);
        p32(&mut b, 0x64, RO_COMPAT);
        b[0x68..0x78].copy_from_slice(&self.uuid);
        b[0x78..0x88].copy_from_slice(&self.label);
        p16(&mut b, 0xCE, (GDT_AREA - self.desc_blocks()) as u16);
        p32(&mut b, 0xE0, 8); // journal inode
        b[0xEC..0xFC].copy_from_slice(&self.hash_seed);
        b[0xFC] = 1; // half_md4
        b[0xFD] = 1; // journal backup: inode blocks
        p16(&mut b, 0xFE, DESC_SIZE as u16);
        p32(&mut b, 0x100, 0x0004 | 0x0008); // default mount options: user_xattr, acl
        p32(&mut b, 0x108, self.now); // mkfs time
        b[0x10C..0x10C + 60].copy_from_slice(&self.journal_i_block);
        p32(&mut b, 0x10C + 60, (self.journal_size >> 32) as u32);
        p32(&mut b, 0x10C + 64, self.journal_size as u32);
        p32(&mut b, 0x150, (self.blocks >> 32) as u32);
        p32(&mut b, 0x158, (self.free_blocks >> 32) as u32);
        p16(&mut b, 0x15C, EXTRA_ISIZE);
        p16(&mut b, 0x15E, EXTRA_ISIZE);
        p32(&mut b, 0x160, 1); // signed directory hash
        b[0x174] = 4; // 16 groups per flex group
        b[0x175] = 1; // crc32c
        let c = crc32c(!0, &b[..0x3FC]);
        p32(&mut b, 0x3FC, c);
        b
    }
}

/// One group's descriptor fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct Desc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub flags: u16,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

pub(crate) const BG_INODE_UNINIT: u16 = 0x1;
pub(crate) const BG_INODE_ZEROED: u16 = 0x4;

impl Desc {
    pub fn encode(&self, group: u32, fs_seed: u32, out: &mut [u8]) {
        let b = &mut out[..DESC_SIZE];
        b.fill(0);
        let p32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let p16 = |b: &mut [u8], at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        p32(b, 0x00, self.block_bitmap as u32);
        p32(b, 0x04, self.inode_bitmap as u32);
        p32(b, 0x08, self.inode_table as u32);
        p16(b, 0x0C, self.free_blocks as u16);
        p16(b, 0x0E, self.free_inodes as u16);
        p16(b, 0x10, self.used_dirs as u16);
        p16(b, 0x12, self.flags);
        p16(b, 0x18, self.block_bitmap_csum as u16);
        p16(b, 0x1A, self.inode_bitmap_csum as u16);
        p16(b, 0x1C, self.itable_unused as u16);
        p32(b, 0x20, (self.block_bitmap >> 32) as u32);
        p32(b, 0x24, (self.inode_bitmap >> 32) as u32);
        p32(b, 0x28, (self.inode_table >> 32) as u32);
        p16(b, 0x2C, (self.free_blocks >> 16) as u16);
        p16(b, 0x2E, (self.free_inodes >> 16) as u16);
        p16(b, 0x30, (self.used_dirs >> 16) as u16);
        p16(b, 0x32, (self.itable_unused >> 16) as u16);
        p16(b, 0x38, (self.block_bitmap_csum >> 16) as u16);
        p16(b, 0x3A, (self.inode_bitmap_csum >> 16) as u16);
        let c = crc32c(fs_seed, &group.to_le_bytes());
        let c = crc32c(c, &b[..0x1E]);
        let c = crc32c(c, &[0, 0]);
        let c = crc32c(c, &b[0x20..DESC_SIZE]);
        p16(b, 0x1E, c as u16);
    }
}
