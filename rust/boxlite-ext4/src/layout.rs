//! Block geometry and allocation.
//!
//! Data is written while the layers stream in, before the number of groups or inodes is
//! known. So the layout keeps everything that depends on those counts at the end: file data
//! first (from block `1 + GDT_AREA` on), then directories and other metadata, the journal,
//! and finally bitmaps and inode tables (flex_bg lets them live anywhere). The only fixed
//! obstacles are the superblock copies with their GDT area, whose positions do not depend on
//! the final size because the GDT area has a fixed length.

use crate::Ext4Error;

pub(crate) const BLOCK: u64 = 4096;
pub(crate) const BLOCKS_PER_GROUP: u64 = 32768;
/// Group descriptor blocks plus reserved GDT blocks after every superblock copy: 128 blocks of
/// 64 descriptors cover 8192 groups (1 TiB), the limit for both the image and online growth
/// through the resize inode (the kernel converts to meta_bg beyond that).
pub(crate) const GDT_AREA: u64 = 128;
pub(crate) const MAX_GROUPS: u64 = GDT_AREA * (BLOCK / 64);
/// Longest initialized extent.
pub(crate) const MAX_EXTENT: u64 = 32768;

/// Whether `group` holds a superblock copy (sparse_super: 0, 1 and powers of 3, 5, 7).
pub(crate) fn has_super(group: u64) -> bool {
    fn power_of(mut n: u64, base: u64) -> bool {
        while n > 1 && n.is_multiple_of(base) {
            n /= base;
        }
        n == 1
    }
    group <= 1 || power_of(group, 3) || power_of(group, 5) || power_of(group, 7)
}

/// Groups after 0 that hold superblock copies, below `groups`, in ascending order.
pub(crate) fn backup_groups(groups: u64) -> Vec<u64> {
    (1..groups).filter(|&g| has_super(g)).collect()
}

/// Blocks at the start of `group` taken by the superblock copy and its GDT area.
pub(crate) fn group_overhead(group: u64) -> u64 {
    if has_super(group) {
        1 + GDT_AREA
    } else {
        0
    }
}

/// A run of physical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: u64,
    pub len: u64,
}

/// Hands out blocks in ascending order, stepping over the superblock copies.
#[derive(Debug, Clone)]
pub(crate) struct Allocator {
    next: u64,
    limit: u64,
    /// The requested image size in bytes, for the error; `None` when computed.
    requested: Option<u64>,
}

impl Allocator {
    pub fn new(limit: u64, requested: Option<u64>) -> Self {
        Self {
            next: 1 + GDT_AREA,
            limit,
            requested,
        }
    }

    /// The first block not handed out yet.
    pub fn next(&self) -> u64 {
        self.next
    }

    fn skip_reserved(&mut self) {
        let group = self.next / BLOCKS_PER_GROUP;
        let end = group * BLOCKS_PER_GROUP + group_overhead(group);
        if self.next < end {
            self.next = end;
        }
    }

    fn full(&self, needed: u64) -> Ext4Error {
        match self.requested {
            Some(size) => Ext4Error::NoSpace {
                size,
                needed: needed.saturating_mul(BLOCK),
            },
            None => Ext4Error::TooLarge(format!(
                "the content needs more than {} bytes",
                self.limit * BLOCK
            )),
        }
    }

    /// Whether `bytes` more could fit at all (a cheap bound before streaming a file).
    pub fn has_room(&self, bytes: u64) -> bool {
        self.next.saturating_add(bytes.div_ceil(BLOCK)) <= self.limit
    }

    pub fn full_error(&self, bytes: u64) -> Ext4Error {
        self.full(self.next.saturating_add(bytes.div_ceil(BLOCK)))
    }

    /// Up to `want` (>= 1) contiguous blocks at the next free position.
    pub fn run(&mut self, want: u64) -> Result<Run, Ext4Error> {
        self.skip_reserved();
        let start = self.next;
        let mut end = start.saturating_add(want.min(MAX_EXTENT));
        // Stop before the next superblock copy.
        let first_group = start / BLOCKS_PER_GROUP + 1;
        let last_group = (end - 1) / BLOCKS_PER_GROUP;
        for g in first_group..=last_group {
            if has_super(g) {
                end = g * BLOCKS_PER_GROUP;
                break;
            }
        }
        if end > self.limit {
            return Err(self.full(end));
        }
        self.next = end;
        Ok(Run {
            start,
            len: end - start,
        })
    }

    /// `count` blocks, as few runs as the superblock copies allow.
    pub fn runs(&mut self, mut count: u64) -> Result<Vec<Run>, Ext4Error> {
        let mut out = Vec::new();
        while count > 0 {
            let r = self.run(count)?;
            count -= r.len;
            out.push(r);
        }
        Ok(out)
    }

    /// `count` contiguous blocks (an inode table), skipping what cannot hold them.
    pub fn contiguous(&mut self, count: u64) -> Result<u64, Ext4Error> {
        loop {
            self.skip_reserved();
            let start = self.next;
            let end = start.saturating_add(count);
            let crosses = (start / BLOCKS_PER_GROUP + 1..=(end - 1) / BLOCKS_PER_GROUP)
                .find(|&g| has_super(g));
            match crosses {
                Some(g) => self.next = g * BLOCKS_PER_GROUP,
                None => {
                    if end > self.limit {
                        return Err(self.full(end));
                    }
                    self.next = end;
                    return Ok(start);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn backups_follow_sparse_super() {
        assert_eq!(backup_groups(130), vec![1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
    }

    #[test]
    fn runs_step_over_superblock_copies() {
        let mut a = Allocator::new(10 * BLOCKS_PER_GROUP, None);
        let r = a.run(100).unwrap();
        assert_eq!(
            r,
            Run {
                start: 129,
                len: 100
            }
        );
        let r = a.run(40000).unwrap();
        assert_eq!(r.start, 229);
        assert_eq!(r.start + r.len, BLOCKS_PER_GROUP);
        let r = a.run(10).unwrap();
        assert_eq!(r.start, BLOCKS_PER_GROUP + 129);
        // Group 2 has no copy: a run may cross into it.
        a.next = 2 * BLOCKS_PER_GROUP - 5;
        assert_eq!(a.run(10).unwrap().len, 10);
        a.next = 3 * BLOCKS_PER_GROUP - 5;
        let t = a.contiguous(10).unwrap();
        assert_eq!(t, 3 * BLOCKS_PER_GROUP + 129);
        let mut small = Allocator::new(200, Some(200 * BLOCK));
        assert!(matches!(small.run(100), Err(Ext4Error::NoSpace { .. })));
    }
}
