//! From the finished tree to the image: inode numbers, metadata blocks, geometry, bitmaps,
//! inode tables, group descriptors, superblocks, the journal and the resize inode.

use std::collections::HashMap;

use crate::csum::inode_seed;
use crate::data::ImageWriter;
use crate::dir;
use crate::extent::{self, Extent};
use crate::inode::{self, InodeFields, EXTENTS_FL, INODE_SIZE};
use crate::journal;
use crate::layer::MAX_LINKS;
use crate::layout::{
    backup_groups, group_overhead, has_super, Allocator, Run, BLOCK, BLOCKS_PER_GROUP, GDT_AREA,
    MAX_GROUPS,
};
use crate::superblock::{Desc, Super, BG_INODE_UNINIT, BG_INODE_ZEROED, DESC_SIZE};
use crate::tree::{Kind, NodeId, Tree, ROOT};
use crate::xattr::{self, Xattr};
use crate::{BuildReport, Ext4Error};

const FIRST_INO: u32 = 11;
const RESIZE_INO: u32 = 7;
const JOURNAL_INO: u32 = 8;
/// Inodes per group unless more are needed (one per 16 KiB, mke2fs's default ratio).
const DEFAULT_IPG: u64 = 8192;
const MAX_IPG: u64 = 8 * BLOCK;
/// Shares of one xattr block (the kernel's EXT4_XATTR_REFCOUNT_MAX).
const XATTR_REFCOUNT_MAX: u32 = 1024;
/// Symlink targets shorter than this live in the inode.
const FAST_SYMLINK: usize = 60;

pub(crate) struct Inputs<'f> {
    pub tree: Tree,
    pub alloc: Allocator,
    pub writer: ImageWriter<'f>,
    pub size: Option<u64>,
    pub label: [u8; 16],
    pub now: (i64, u32),
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    pub entries: u64,
}

/// Per inode: blocks allocated here (directories, symlinks, extent trees) and its xattrs.
#[derive(Default)]
struct Plan {
    /// Data extents of directories and long symlinks.
    extents: Vec<Extent>,
    /// Extent tree blocks (files, directories and symlinks with more than four extents).
    tree: Vec<u64>,
    /// 1-based index into the xattr blocks; 0 for none.
    xattr_block: u32,
}

struct Geometry {
    blocks: u64,
    groups: u64,
    ipg: u64,
    journal: Vec<Run>,
    block_bitmaps: Vec<u64>,
    inode_bitmaps: Vec<u64>,
    inode_tables: Vec<u64>,
    end: u64,
}

fn groups_for(blocks: u64) -> u64 {
    blocks.div_ceil(BLOCKS_PER_GROUP)
}

/// Size of an image that holds `end` blocks: a little slack, at least 64 MiB, and no last
/// group too small to hold its own superblock copy.
fn computed_blocks(end: u64) -> u64 {
    let with_slack = end + (end / 8).max(2048);
    let mut blocks = with_slack.max(16384).div_ceil(256) * 256;
    let last = blocks % BLOCKS_PER_GROUP;
    let g = blocks / BLOCKS_PER_GROUP;
    if last != 0 && last < group_overhead(g) + 256 {
        blocks = g * BLOCKS_PER_GROUP + group_overhead(g) + 256;
    }
    blocks
}

/// A requested size in blocks, dropping a last group too small for its superblock copy.
pub(crate) fn fixed_blocks(size: u64) -> u64 {
    let blocks = size / BLOCK;
    let last = blocks % BLOCKS_PER_GROUP;
    let g = blocks / BLOCKS_PER_GROUP;
    if g > 0 && last != 0 && last < group_overhead(g) + 256 {
        g * BLOCKS_PER_GROUP
    } else {
        blocks
    }
}

fn ipg_for(inodes: u64, groups: u64) -> u64 {
    inodes
        .div_ceil(groups)
        .div_ceil(16)
        .saturating_mul(16)
        .max(DEFAULT_IPG)
}

/// Lays out the journal, bitmaps and inode tables for an image of `blocks` blocks.
fn try_geometry(base: &Allocator, blocks: u64, inodes: u64) -> Result<Geometry, Ext4Error> {
    let groups = groups_for(blocks);
    let ipg = ipg_for(inodes, groups);
    if ipg > MAX_IPG {
        return Err(Ext4Error::NoSpace {
            size: blocks * BLOCK,
            needed: inodes.div_ceil(MAX_IPG) * BLOCKS_PER_GROUP * BLOCK,
        });
    }
    let mut a = base.clone();
    let journal = a.runs(journal::default_blocks(blocks))?;
    let block_bitmaps = runs_to_blocks(&a.runs(groups)?);
    let inode_bitmaps = runs_to_blocks(&a.runs(groups)?);
    let itb = ipg * INODE_SIZE as u64 / BLOCK;
    let mut inode_tables = Vec::with_capacity(groups as usize);
    for _ in 0..groups {
        inode_tables.push(a.contiguous(itb)?);
    }
    Ok(Geometry {
        blocks,
        groups,
        ipg,
        journal,
        block_bitmaps,
        inode_bitmaps,
        inode_tables,
        end: a.next(),
    })
}

fn runs_to_blocks(runs: &[Run]) -> Vec<u64> {
    runs.iter().flat_map(|r| r.start..r.start + r.len).collect()
}

fn geometry(base: &Allocator, size: Option<u64>, inodes: u64) -> Result<Geometry, Ext4Error> {
    // Enough groups for the inodes at the largest inodes-per-group.
    let min_groups = inodes.div_ceil(MAX_IPG).max(1);
    if let Some(size) = size {
        let blocks = fixed_blocks(size);
        let needed = |end: u64| Ext4Error::NoSpace {
            size,
            needed: computed_blocks(end) * BLOCK,
        };
        if groups_for(blocks) < min_groups {
            return Err(needed(min_groups * BLOCKS_PER_GROUP));
        }
        let g = try_geometry(base, blocks, inodes).map_err(|e| match e {
            Ext4Error::NoSpace { .. } => needed(base.next() + 8192),
            other => other,
        })?;
        if g.end > blocks {
            return Err(needed(g.end));
        }
        return Ok(g);
    }
    // The smallest image with `min_groups` groups.
    let floor = (min_groups - 1) * BLOCKS_PER_GROUP + 16384;
    let mut blocks = computed_blocks(base.next() + 4096).max(floor);
    for _ in 0..32 {
        if groups_for(blocks) > MAX_GROUPS {
            break;
        }
        let g = try_geometry(base, blocks, inodes)?;
        let want = computed_blocks(g.end).max(floor);
        if g.end <= blocks && groups_for(want) == g.groups {
            return Ok(g);
        }
        blocks = want.max(blocks + 256);
    }
    Err(Ext4Error::TooLarge(format!(
        "the content needs more than {} groups (1 TiB)",
        MAX_GROUPS
    )))
}

struct Bitmap(Vec<u8>);

impl Bitmap {
    fn mark(&mut self, start: u64, len: u64) {
        for b in start..start + len {
            self.0[(b / 8) as usize] |= 1 << (b % 8);
        }
    }
}

fn file_type(kind: &Kind) -> (u16, u8) {
    match kind {
        Kind::Dir(_) => (inode::S_IFDIR, dir::FT_DIR),
        Kind::File { .. } => (inode::S_IFREG, dir::FT_REG),
        Kind::Symlink(_) => (inode::S_IFLNK, dir::FT_LNK),
        Kind::Char(..) => (inode::S_IFCHR, dir::FT_CHR),
        Kind::Block(..) => (inode::S_IFBLK, dir::FT_BLK),
        Kind::Fifo => (inode::S_IFIFO, dir::FT_FIFO),
    }
}

pub(crate) fn finish(mut inp: Inputs<'_>) -> Result<BuildReport, Ext4Error> {
    let tree = &inp.tree;
    let n_nodes = tree.nodes.len();
    // Inode numbers: the root is 2; the rest from 11 on, depth first by name, each
    // directory's entries numbered together.
    let mut ino_of = vec![0u32; n_nodes];
    let mut links = vec![0u32; n_nodes];
    let mut parent = vec![ROOT; n_nodes];
    let mut order: Vec<NodeId> = Vec::new();
    ino_of[ROOT as usize] = 2;
    links[ROOT as usize] = 2;
    let mut stack = vec![ROOT];
    while let Some(d) = stack.pop() {
        let mut subdirs = Vec::new();
        for child in tree.children(d).into_iter().flat_map(|c| c.values()) {
            let id = child.id as usize;
            if ino_of[id] == 0 {
                let ino = FIRST_INO as u64 + order.len() as u64;
                ino_of[id] = u32::try_from(ino)
                    .map_err(|_| Ext4Error::TooLarge("more than 2^32 inodes".into()))?;
                order.push(child.id);
            }
            if matches!(tree.node(child.id).kind, Kind::Dir(_)) {
                links[id] = 2;
                links[d as usize] += 1;
                parent[id] = d;
                subdirs.push(child.id);
            } else {
                links[id] += 1;
                if links[id] > MAX_LINKS {
                    return Err(Ext4Error::TooLarge(format!(
                        "an inode with more than {MAX_LINKS} hard links"
                    )));
                }
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    let max_ino = FIRST_INO as u64 - 1 + order.len() as u64;

    // Metadata blocks, in inode order: directory blocks, long symlinks, extent trees.
    let uuid = inp.uuid;
    let fs_seed = crate::csum::crc32c(!0, &uuid);
    let mut plans: Vec<Plan> = Vec::with_capacity(order.len() + 1);
    let mut xblocks: Vec<(Vec<u8>, u32)> = Vec::new();
    let mut xblock_of: HashMap<Vec<u8>, usize> = HashMap::new();
    let alloc = &mut inp.alloc;
    let all: Vec<NodeId> = std::iter::once(ROOT).chain(order.iter().copied()).collect();
    for &id in &all {
        let node = tree.node(id);
        let mut plan = Plan::default();
        let data_blocks = match &node.kind {
            Kind::Dir(children) => dir::blocks_needed(children.keys().map(|k| k.len())),
            Kind::Symlink(t) if t.len() >= FAST_SYMLINK => 1,
            _ => 0,
        };
        if data_blocks > 0 {
            plan.extents = extent::from_runs(&alloc.runs(data_blocks)?);
        }
        let n_extents = match &node.kind {
            Kind::File { extents, .. } => extents.len(),
            _ => plan.extents.len(),
        };
        let tb = extent::tree_blocks(n_extents);
        if tb > 0 {
            plan.tree = runs_to_blocks(&alloc.runs(tb)?);
        }
        let attrs = &node.meta.xattrs;
        if !attrs.is_empty() {
            let (_, in_block) = xattr::place(attrs, BLOCK as usize).map_err(Ext4Error::TooLarge)?;
            if !in_block.is_empty() {
                let refs: Vec<&Xattr> = in_block.iter().map(|&i| &attrs[i]).collect();
                let content = xattr::encode_block(&refs, BLOCK as usize);
                let idx = match xblock_of.get(&content) {
                    Some(&i) if xblocks[i].1 < XATTR_REFCOUNT_MAX => i,
                    _ => {
                        xblocks.push((content.clone(), 0));
                        xblock_of.insert(content, xblocks.len() - 1);
                        xblocks.len() - 1
                    }
                };
                xblocks[idx].1 += 1;
                plan.xattr_block = idx as u32 + 1;
            }
        }
        plans.push(plan);
    }
    let xblock_nr: Vec<u64> = xblocks
        .iter()
        .map(|_| alloc.run(1).map(|r| r.start))
        .collect::<Result<_, _>>()?;
    let dind = alloc.run(1)?.start;

    let geo = geometry(alloc, inp.size, max_ino)?;
    let groups = geo.groups;
    let ipg = geo.ipg;
    let journal_blocks: u64 = geo.journal.iter().map(|r| r.len).sum();
    let journal_extents = extent::from_runs(&geo.journal);
    let backups = backup_groups(groups);
    let desc_blocks = (groups * DESC_SIZE as u64).div_ceil(BLOCK);
    let reserved_gdt = GDT_AREA - desc_blocks;

    // Block bitmap over the whole image.
    let mut bitmap = Bitmap(vec![0u8; (groups * BLOCKS_PER_GROUP / 8) as usize]);
    for g in 0..groups {
        if has_super(g) {
            bitmap.mark(g * BLOCKS_PER_GROUP, group_overhead(g));
        }
    }
    bitmap.mark(geo.blocks, groups * BLOCKS_PER_GROUP - geo.blocks);
    let mut files = 0u64;
    let mut dirs = 0u64;
    let mut symlinks = 0u64;
    let mut specials = 0u64;
    let mut bytes = 0u64;
    for (k, &id) in all.iter().enumerate() {
        let node = tree.node(id);
        match &node.kind {
            Kind::File { size, extents } => {
                files += 1;
                bytes += size;
                for e in extents {
                    bitmap.mark(e.start, u64::from(e.len));
                }
            }
            Kind::Dir(_) => dirs += 1,
            Kind::Symlink(_) => symlinks += 1,
            _ => specials += 1,
        }
        for e in &plans[k].extents {
            bitmap.mark(e.start, u64::from(e.len));
        }
        for &b in &plans[k].tree {
            bitmap.mark(b, 1);
        }
    }
    for &b in &xblock_nr {
        bitmap.mark(b, 1);
    }
    bitmap.mark(dind, 1);
    for r in &geo.journal {
        bitmap.mark(r.start, r.len);
    }
    let itb = ipg * INODE_SIZE as u64 / BLOCK;
    for g in 0..groups as usize {
        bitmap.mark(geo.block_bitmaps[g], 1);
        bitmap.mark(geo.inode_bitmaps[g], 1);
        bitmap.mark(geo.inode_tables[g], itb);
    }

    let now = inp.now;
    let writer = &mut inp.writer;
    // Directory, symlink and extent tree blocks.
    for (k, &id) in all.iter().enumerate() {
        let node = tree.node(id);
        let ino = ino_of[id as usize];
        let seed = inode_seed(fs_seed, ino, 0);
        let plan = &plans[k];
        let mut data: Option<Vec<u8>> = None;
        match &node.kind {
            Kind::Dir(children) => {
                let entries = children.iter().map(|(name, c)| {
                    let (_, ft) = file_type(&tree.node(c.id).kind);
                    (&name[..], ino_of[c.id as usize], ft)
                });
                data = Some(dir::encode(
                    ino,
                    ino_of[parent[id as usize] as usize],
                    entries,
                    seed,
                ));
            }
            Kind::Symlink(t) if t.len() >= FAST_SYMLINK => {
                let mut b = t.to_vec();
                b.resize(BLOCK as usize, 0);
                data = Some(b);
            }
            _ => {}
        }
        if let Some(data) = data {
            let mut at = 0usize;
            for e in &plan.extents {
                let n = e.len as usize * BLOCK as usize;
                writer.write_blocks(e.start, &data[at..at + n])?;
                at += n;
            }
        }
        if !plan.tree.is_empty() {
            let extents = match &node.kind {
                Kind::File { extents, .. } => extents.as_slice(),
                _ => plan.extents.as_slice(),
            };
            let mut ib = [0u8; 60];
            for (nr, block) in extent::encode(extents, &plan.tree, seed, &mut ib) {
                writer.write_blocks(nr, &block)?;
            }
        }
    }
    for (i, (content, refs)) in xblocks.iter_mut().enumerate() {
        xattr::seal_block(content, *refs, xblock_nr[i], fs_seed);
        writer.write_blocks(xblock_nr[i], content)?;
    }

    // The resize inode: its double-indirect block lists the reserved GDT blocks, and each
    // reserved block (as an indirect block) lists its copies in the backup groups.
    let mut dind_block = vec![0u8; BLOCK as usize];
    let mut reserved_lists = vec![0u8; (reserved_gdt * BLOCK) as usize];
    for r in 0..reserved_gdt {
        let primary = 1 + desc_blocks + r;
        let slot = ((desc_blocks + r) % (BLOCK / 4)) as usize * 4;
        dind_block[slot..slot + 4].copy_from_slice(&(primary as u32).to_le_bytes());
        for (j, &g) in backups.iter().enumerate() {
            let at = (r * BLOCK) as usize + j * 4;
            let copy = primary + g * BLOCKS_PER_GROUP;
            reserved_lists[at..at + 4].copy_from_slice(&(copy as u32).to_le_bytes());
        }
    }
    writer.write_blocks(dind, &dind_block)?;
    writer.write_blocks(
        geo.journal[0].start,
        &journal::superblock(journal_blocks, &uuid),
    )?;

    // Inode tables, inode bitmaps and group statistics.
    let mut descs = vec![Desc::default(); groups as usize];
    let mut table = vec![0u8; (ipg * INODE_SIZE as u64) as usize];
    let mut inode_bitmap = vec![0u8; BLOCK as usize];
    let mut journal_i_block = [0u8; 60];
    for g in 0..groups {
        let first = g * ipg + 1;
        let last = (first + ipg - 1).min(max_ino);
        let used = if last >= first { last - first + 1 } else { 0 };
        let mut dirs_here = 0u32;
        table[..(used * INODE_SIZE as u64) as usize].fill(0);
        for ino in first..first + used {
            let out = &mut table[((ino - first) * INODE_SIZE as u64) as usize..][..INODE_SIZE];
            let ino32 = ino as u32;
            if ino32 < FIRST_INO && ino32 != 2 {
                match ino32 {
                    RESIZE_INO => {
                        let mut ib = [0u8; 60];
                        ib[13 * 4..14 * 4].copy_from_slice(&(dind as u32).to_le_bytes());
                        let owned = 1 + reserved_gdt * (1 + backups.len() as u64);
                        let apb = BLOCK / 4;
                        let f = InodeFields {
                            mode: inode::S_IFREG | 0o600,
                            uid: 0,
                            gid: 0,
                            size: (apb * apb + apb + 12) * BLOCK,
                            links: 1,
                            mtime: now,
                            ctime: now,
                            sectors: owned * (BLOCK / 512),
                            flags: 0,
                            i_block: ib,
                            xattr_block: 0,
                            ibody: &[],
                        };
                        inode::encode(ino32, &f, fs_seed, out);
                    }
                    JOURNAL_INO => {
                        let mut ib = [0u8; 60];
                        let _ = extent::encode(&journal_extents, &[], 0, &mut ib);
                        journal_i_block = ib;
                        let f = InodeFields {
                            mode: inode::S_IFREG | 0o600,
                            uid: 0,
                            gid: 0,
                            size: journal_blocks * BLOCK,
                            links: 1,
                            mtime: now,
                            ctime: now,
                            sectors: journal_blocks * (BLOCK / 512),
                            flags: EXTENTS_FL,
                            i_block: ib,
                            xattr_block: 0,
                            ibody: &[],
                        };
                        inode::encode(ino32, &f, fs_seed, out);
                    }
                    _ => {}
                }
                continue;
            }
            let k = if ino32 == 2 {
                0
            } else {
                (ino32 - FIRST_INO) as usize + 1
            };
            let id = all[k];
            let node = tree.node(id);
            let plan = &plans[k];
            let (ftype, _) = file_type(&node.kind);
            let mut i_block = [0u8; 60];
            let mut flags = 0;
            let mut size = 0u64;
            let mut owned = plan.tree.len() as u64 + u64::from(plan.xattr_block > 0);
            let seed = inode_seed(fs_seed, ino32, 0);
            match &node.kind {
                Kind::File { size: s, extents } => {
                    size = *s;
                    owned += extents.iter().map(|e| u64::from(e.len)).sum::<u64>();
                    flags = EXTENTS_FL;
                    let _ = extent::encode(extents, &plan.tree, seed, &mut i_block);
                }
                Kind::Dir(_) => {
                    dirs_here += 1;
                    flags = EXTENTS_FL;
                    let n: u64 = plan.extents.iter().map(|e| u64::from(e.len)).sum();
                    size = n * BLOCK;
                    owned += n;
                    let _ = extent::encode(&plan.extents, &plan.tree, seed, &mut i_block);
                }
                Kind::Symlink(t) => {
                    size = t.len() as u64;
                    if t.len() < FAST_SYMLINK {
                        i_block[..t.len()].copy_from_slice(t);
                    } else {
                        flags = EXTENTS_FL;
                        owned += 1;
                        let _ = extent::encode(&plan.extents, &plan.tree, seed, &mut i_block);
                    }
                }
                Kind::Char(major, minor) | Kind::Block(major, minor) => {
                    let (major, minor) = (*major, *minor);
                    if major < 256 && minor < 256 {
                        i_block[..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
                    } else {
                        let dev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                        i_block[4..8].copy_from_slice(&dev.to_le_bytes());
                    }
                }
                Kind::Fifo => {}
            }
            let mut nlink = links[id as usize];
            if matches!(node.kind, Kind::Dir(_)) && nlink > MAX_LINKS {
                nlink = 1; // dir_nlink: "many"
            }
            let attrs = &node.meta.xattrs;
            let ibody: Vec<&Xattr> = if attrs.is_empty() {
                Vec::new()
            } else {
                let (in_inode, _) =
                    xattr::place(attrs, BLOCK as usize).map_err(Ext4Error::TooLarge)?;
                in_inode.iter().map(|&i| &attrs[i]).collect()
            };
            let f = InodeFields {
                mode: ftype | node.meta.mode,
                uid: node.meta.uid,
                gid: node.meta.gid,
                size,
                links: nlink as u16,
                mtime: node.meta.mtime,
                ctime: now,
                sectors: owned * (BLOCK / 512),
                flags,
                i_block,
                xattr_block: if plan.xattr_block > 0 {
                    xblock_nr[plan.xattr_block as usize - 1]
                } else {
                    0
                },
                ibody: &ibody,
            };
            inode::encode(ino32, &f, fs_seed, out);
        }
        if used > 0 {
            writer.write_blocks(
                geo.inode_tables[g as usize],
                &table[..((used * INODE_SIZE as u64).div_ceil(BLOCK) * BLOCK) as usize],
            )?;
        }
        inode_bitmap.fill(0);
        for i in 0..used {
            inode_bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        for i in ipg..8 * BLOCK {
            inode_bitmap[(i / 8) as usize] |= 1 << (i % 8);
        }
        let d = &mut descs[g as usize];
        d.inode_bitmap_csum = crate::csum::crc32c(fs_seed, &inode_bitmap[..(ipg / 8) as usize]);
        writer.write_blocks(geo.inode_bitmaps[g as usize], &inode_bitmap)?;
        d.free_inodes = (ipg - used) as u32;
        d.itable_unused = (ipg - used) as u32;
        d.used_dirs = dirs_here;
        d.flags = BG_INODE_ZEROED | if used == 0 { BG_INODE_UNINIT } else { 0 };
        d.block_bitmap = geo.block_bitmaps[g as usize];
        d.inode_bitmap = geo.inode_bitmaps[g as usize];
        d.inode_table = geo.inode_tables[g as usize];
    }

    // Block bitmaps and free counts.
    let mut free_blocks = 0u64;
    for (g, desc) in descs.iter_mut().enumerate() {
        let bits = &bitmap.0[g * BLOCK as usize..(g + 1) * BLOCK as usize];
        let used: u32 = bits.iter().map(|b| b.count_ones()).sum();
        let free = BLOCKS_PER_GROUP as u32 - used;
        free_blocks += u64::from(free);
        desc.free_blocks = free;
        desc.block_bitmap_csum = crate::csum::crc32c(fs_seed, bits);
        writer.write_blocks(geo.block_bitmaps[g], bits)?;
    }
    let free_inodes: u64 = descs.iter().map(|d| u64::from(d.free_inodes)).sum();

    let sb = Super {
        blocks: geo.blocks,
        free_blocks,
        inodes_per_group: ipg as u32,
        groups,
        free_inodes,
        uuid,
        hash_seed: inp.hash_seed,
        label: inp.label,
        now: now.0.clamp(0, i64::from(u32::MAX)) as u32,
        journal_i_block,
        journal_size: journal_blocks * BLOCK,
    };
    let mut gdt = vec![0u8; (desc_blocks * BLOCK) as usize];
    for (g, d) in descs.iter().enumerate() {
        d.encode(g as u32, fs_seed, &mut gdt[g * DESC_SIZE..]);
    }
    for g in std::iter::once(0).chain(backups.iter().copied()) {
        let start = g * BLOCKS_PER_GROUP;
        let mut first = vec![0u8; BLOCK as usize];
        let sb_at = if g == 0 { 1024 } else { 0 };
        first[sb_at..sb_at + 1024].copy_from_slice(&sb.encode(g));
        writer.write_blocks(start, &first)?;
        writer.write_blocks(start + 1, &gdt)?;
        if g == 0 {
            writer.write_blocks(start + 1 + desc_blocks, &reserved_lists)?;
        }
    }
    writer.flush()?;
    let file = writer.file();
    file.set_len(geo.blocks * BLOCK).map_err(Ext4Error::Write)?;
    punch_dead(file, tree, &ino_of);

    let used_blocks = geo.blocks - free_blocks;
    Ok(BuildReport {
        files,
        dirs,
        symlinks,
        specials,
        bytes,
        entries: inp.entries,
        inodes: order.len() as u64 + 1,
        image_size: geo.blocks * BLOCK,
        used_bytes: used_blocks * BLOCK,
        journal_size: journal_blocks * BLOCK,
    })
}

/// Gives back the host space of data that later layers deleted (free blocks, never read).
fn punch_dead(file: &std::fs::File, tree: &Tree, ino_of: &[u32]) {
    use std::os::fd::AsRawFd;
    for (id, node) in tree.nodes.iter().enumerate() {
        if ino_of[id] != 0 {
            continue;
        }
        if let Kind::File { extents, .. } = &node.kind {
            for e in extents {
                // SAFETY: fallocate on an open descriptor; failure only costs host space.
                unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (e.start * BLOCK) as libc::off_t,
                        (u64::from(e.len) * BLOCK) as libc::off_t,
                    );
                }
            }
        }
    }
}
