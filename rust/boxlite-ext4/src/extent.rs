//! Extent trees: up to four extents live in the inode; more go into leaf blocks under index
//! levels, as deep as needed.

use crate::csum::crc32c;
use crate::layout::Run;

/// `len` blocks of a file from logical block `logical` at physical block `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u32,
}

const MAGIC: u16 = 0xF30A;
const IN_INODE: usize = 4;
/// Entries per tree block: (4096 - 12-byte header - 4-byte tail) / 12.
const PER_BLOCK: usize = 340;

/// The extents of a list of runs laid end to end from logical block 0.
pub(crate) fn from_runs(runs: &[Run]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut logical = 0u64;
    for r in runs {
        out.push(Extent {
            logical: logical as u32,
            start: r.start,
            len: r.len as u32,
        });
        logical += r.len;
    }
    out
}

/// Tree blocks needed for `n` extents.
pub(crate) fn tree_blocks(n: usize) -> u64 {
    let mut total = 0;
    let mut level = n;
    while level > IN_INODE {
        level = level.div_ceil(PER_BLOCK);
        total += level as u64;
    }
    total
}

fn header(out: &mut [u8], entries: usize, max: usize, depth: u16) {
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    out[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    out[6..8].copy_from_slice(&depth.to_le_bytes());
}

fn leaf(out: &mut [u8], e: &Extent) {
    out[0..4].copy_from_slice(&e.logical.to_le_bytes());
    out[4..6].copy_from_slice(&(e.len as u16).to_le_bytes());
    out[6..8].copy_from_slice(&((e.start >> 32) as u16).to_le_bytes());
    out[8..12].copy_from_slice(&(e.start as u32).to_le_bytes());
}

fn index(out: &mut [u8], logical: u32, child: u64) {
    out[0..4].copy_from_slice(&logical.to_le_bytes());
    out[4..8].copy_from_slice(&(child as u32).to_le_bytes());
    out[8..10].copy_from_slice(&((child >> 32) as u16).to_le_bytes());
}

/// Encodes the tree: fills the inode's 60-byte `i_block` and returns the tree blocks to
/// write as `(block number, contents)`. `blocks` must hold `tree_blocks(extents.len())`
/// numbers; `seed` is the inode's checksum seed.
pub(crate) fn encode(
    extents: &[Extent],
    blocks: &[u64],
    seed: u32,
    i_block: &mut [u8; 60],
) -> Vec<(u64, Vec<u8>)> {
    let mut written = Vec::new();
    // Entries of the current level: (first logical block, child or extent).
    let mut level: Vec<(u32, Node)> = extents
        .iter()
        .map(|e| (e.logical, Node::Leaf(*e)))
        .collect();
    let mut depth = 0u16;
    let mut next_block = blocks.iter();
    while level.len() > IN_INODE {
        let mut up = Vec::new();
        for chunk in level.chunks(PER_BLOCK) {
            let mut b = vec![0u8; 4096];
            header(&mut b, chunk.len(), PER_BLOCK, depth);
            for (i, (logical, node)) in chunk.iter().enumerate() {
                let at = 12 + 12 * i;
                match node {
                    Node::Leaf(e) => leaf(&mut b[at..at + 12], e),
                    Node::Index(child) => index(&mut b[at..at + 12], *logical, *child),
                }
            }
            let c = crc32c(seed, &b[..4092]);
            b[4092..].copy_from_slice(&c.to_le_bytes());
            let nr = next_block.next().copied().unwrap_or(0);
            written.push((nr, b));
            up.push((chunk[0].0, Node::Index(nr)));
        }
        level = up;
        depth += 1;
    }
    i_block.fill(0);
    header(i_block, level.len(), IN_INODE, depth);
    for (i, (logical, node)) in level.iter().enumerate() {
        let at = 12 + 12 * i;
        match node {
            Node::Leaf(e) => leaf(&mut i_block[at..at + 12], e),
            Node::Index(child) => index(&mut i_block[at..at + 12], *logical, *child),
        }
    }
    written
}

enum Node {
    Leaf(Extent),
    Index(u64),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_of_trees() {
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(340 * 4), 4);
        assert_eq!(tree_blocks(340 * 4 + 1), 5 + 1);
    }

    #[test]
    fn deep_tree_has_one_root() {
        let extents: Vec<Extent> = (0..2000)
            .map(|i| Extent {
                logical: i * 2,
                start: 1000 + u64::from(i) * 2,
                len: 1,
            })
            .collect();
        let n = tree_blocks(extents.len());
        let blocks: Vec<u64> = (0..n).map(|i| 50 + i).collect();
        let mut ib = [0u8; 60];
        let written = encode(&extents, &blocks, 7, &mut ib);
        assert_eq!(written.len() as u64, n);
        assert_eq!(u16::from_le_bytes([ib[6], ib[7]]), 2);
        assert_eq!(u16::from_le_bytes([ib[2], ib[3]]), 1);
    }
}
