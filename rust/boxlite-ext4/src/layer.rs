//! OCI layer semantics on the in-memory tree, matching the guest's tarfs.rs (and umoci):
//! whiteouts, opaque directories, hard links, replacement of lower entries.

use std::collections::BTreeMap;
use std::io::Read;

use crate::data::{write_file, ImageWriter};
use crate::layout::Allocator;
use crate::tarstream::{Entry, Kind as TarKind, TarReader};
use crate::tree::{Kind, Meta, Node, NodeId, Tree, Walk, ROOT};
use crate::xattr::{self, Target};
use crate::Ext4Error;

/// Longest path the guest could create (PATH_MAX less the NUL), and the longest name.
const MAX_PATH: usize = 4095;
const MAX_NAME: usize = 255;
/// Most names of one inode (ext4's EXT4_LINK_MAX).
pub(crate) const MAX_LINKS: u32 = 65000;

/// Counters over every layer.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub entries: u64,
}

pub(crate) struct LayerApplier<'a, 'f> {
    pub tree: &'a mut Tree,
    pub writer: &'a mut ImageWriter<'f>,
    pub alloc: &'a mut Allocator,
    pub counts: &'a mut Counts,
    /// 1-based index of the layer being applied (the stamp of names it touches).
    pub stamp: u32,
    pub layer: usize,
}

/// An entry name as clean components: `.` and empty parts dropped; `..` and absolute names
/// refused (as tarfs.rs does). The archive root is no component at all.
fn clean(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path in archive".into());
    }
    if raw.contains(&0) {
        return Err("NUL byte in name".into());
    }
    let mut out = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path leaves the archive root".into()),
            p if p.len() > MAX_NAME => return Err("name component longer than 255 bytes".into()),
            p => out.push(p),
        }
    }
    if raw.len() > MAX_PATH {
        return Err("path longer than 4095 bytes".into());
    }
    Ok(out)
}

enum Whiteout<'p> {
    No,
    Remove(&'p [u8]),
    Opaque,
    Ignore,
}

fn classify(name: &[u8]) -> Whiteout<'_> {
    if name == b".wh..wh..opq" {
        Whiteout::Opaque
    } else if name.starts_with(b".wh..wh.") {
        Whiteout::Ignore
    } else if let Some(target) = name.strip_prefix(b".wh.") {
        if target.is_empty() || target == b"." || target == b".." {
            Whiteout::Ignore
        } else {
            Whiteout::Remove(target)
        }
    } else {
        Whiteout::No
    }
}

impl LayerApplier<'_, '_> {
    fn entry_err(&self, e: &Entry, reason: impl Into<String>) -> Ext4Error {
        Ext4Error::Entry {
            layer: self.layer,
            entry: e.name(),
            reason: reason.into(),
        }
    }

    /// Applies every entry of one layer.
    pub fn apply<R: Read>(&mut self, tar: &mut TarReader<R>) -> Result<(), Ext4Error> {
        while let Some(entry) = tar.next_entry()? {
            self.counts.entries += 1;
            self.entry(tar, entry)?;
        }
        tar.drain()
    }

    fn entry<R: Read>(&mut self, tar: &mut TarReader<R>, e: Entry) -> Result<(), Ext4Error> {
        let path = e.path.clone();
        let comps = clean(&path).map_err(|m| self.entry_err(&e, m))?;
        if e.kind == TarKind::Other {
            return Ok(());
        }
        let Some((&last, parents)) = comps.split_last() else {
            // The archive root: a directory entry sets the root's metadata.
            if e.kind == TarKind::Dir {
                let meta = self.meta(&e, Target::Dir)?;
                self.tree.node_mut(ROOT).meta = meta;
            }
            return Ok(());
        };
        match classify(last) {
            Whiteout::No => {}
            Whiteout::Ignore => return Ok(()),
            Whiteout::Remove(target) => return self.whiteout(parents, target),
            Whiteout::Opaque => return self.opaque(parents),
        }
        let walk = Walk {
            create: true,
            stamp: Some(self.stamp),
        };
        let parent = self
            .tree
            .walk(parents, walk)
            .map_err(|w| self.entry_err(&e, w.message()))?
            .ok_or_else(|| self.entry_err(&e, "parent directory missing"))?;
        match e.kind {
            TarKind::Dir => {
                let meta = self.meta(&e, Target::Dir)?;
                let existing = self.tree.lookup(parent, last).map(|c| c.id);
                match existing {
                    Some(id) if matches!(self.tree.node(id).kind, Kind::Dir(_)) => {
                        // Merge: keep the contents, take this entry's metadata.
                        self.tree.node_mut(id).meta = meta;
                        self.tree.link(parent, last, id, self.stamp);
                    }
                    _ => {
                        let id = self.tree.add(Node {
                            kind: Kind::Dir(BTreeMap::new()),
                            meta,
                        });
                        self.tree.link(parent, last, id, self.stamp);
                    }
                }
            }
            TarKind::File => {
                let meta = self.meta(&e, Target::File)?;
                self.tree.unlink(parent, last);
                if !self.alloc.has_room(tar.data_left()) {
                    return Err(self.alloc.full_error(tar.data_left()));
                }
                let extents =
                    write_file(tar, self.writer, self.alloc, e.size, e.sparse.as_deref())?;
                let id = self.tree.add(Node {
                    kind: Kind::File {
                        size: e.size,
                        extents,
                    },
                    meta,
                });
                self.tree.link(parent, last, id, self.stamp);
            }
            TarKind::Symlink => {
                let target = &e.link;
                if target.is_empty() {
                    return Err(self.entry_err(&e, "symlink with an empty target"));
                }
                if target.len() > MAX_PATH || target.contains(&0) {
                    return Err(self.entry_err(&e, "symlink target too long or with a NUL byte"));
                }
                let mut meta = self.meta(&e, Target::Symlink)?;
                meta.mode = 0o777;
                self.tree.unlink(parent, last);
                let id = self.tree.add(Node {
                    kind: Kind::Symlink(target.clone().into()),
                    meta,
                });
                self.tree.link(parent, last, id, self.stamp);
            }
            TarKind::HardLink => self.hard_link(&e, &path, parent, last)?,
            TarKind::Char | TarKind::Block | TarKind::Fifo => {
                let (major, minor) = e.dev;
                if major > 0xfff || minor > 0xf_ffff {
                    return Err(self.entry_err(&e, "device number out of range"));
                }
                let meta = self.meta(&e, Target::Special)?;
                let kind = match e.kind {
                    TarKind::Char => Kind::Char(major, minor),
                    TarKind::Block => Kind::Block(major, minor),
                    _ => Kind::Fifo,
                };
                self.tree.unlink(parent, last);
                let id = self.tree.add(Node { kind, meta });
                self.tree.link(parent, last, id, self.stamp);
            }
            TarKind::Other => {}
        }
        Ok(())
    }

    /// Ownership, mode, time and xattrs of an entry.
    fn meta(&self, e: &Entry, target: Target) -> Result<Meta, Ext4Error> {
        if let Some(field) = e.bad_field {
            return Err(self.entry_err(e, format!("bad {field}")));
        }
        let uid = u32::try_from(e.uid).map_err(|_| self.entry_err(e, "bad uid"))?;
        let gid = u32::try_from(e.gid).map_err(|_| self.entry_err(e, "bad gid"))?;
        let mut mode = (e.mode & 0o7777) as u16;
        let xattrs = xattr::normalize(e.xattrs.clone(), target, &mut mode)
            .map_err(|m| self.entry_err(e, m))?;
        xattr::place(&xattrs, crate::layout::BLOCK as usize).map_err(|m| self.entry_err(e, m))?;
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime: e.mtime,
            xattrs,
        })
    }

    /// `.wh.NAME`: delete NAME of the lower layers (never what this layer made).
    fn whiteout(&mut self, parents: &[&[u8]], target: &[u8]) -> Result<(), Ext4Error> {
        let lookup = Walk {
            create: false,
            stamp: None,
        };
        // A parent that is missing or not a directory holds nothing to delete.
        let Ok(Some(dir)) = self.tree.walk(parents, lookup) else {
            return Ok(());
        };
        if let Some(child) = self.tree.lookup(dir, target) {
            if child.layer != self.stamp {
                self.tree.unlink(dir, target);
            }
        }
        Ok(())
    }

    /// `DIR/.wh..wh..opq`: hide what the lower layers have in DIR.
    fn opaque(&mut self, dir: &[&[u8]]) -> Result<(), Ext4Error> {
        let mark = Walk {
            create: false,
            stamp: Some(self.stamp),
        };
        let target = match dir.split_last() {
            None => Some(ROOT),
            Some((&last, parents)) => {
                let parent = self.tree.walk(parents, mark).unwrap_or_default();
                parent.and_then(|p| {
                    let id = self.tree.lookup(p, last).map(|c| c.id)?;
                    // The directory itself counts as this layer's (tarfs notes it).
                    self.tree.link(p, last, id, self.stamp);
                    Some(id)
                })
            }
        };
        if let Some(id) = target {
            if matches!(self.tree.node(id).kind, Kind::Dir(_)) {
                self.tree.make_opaque(id, self.stamp);
            }
        }
        Ok(())
    }

    fn hard_link(
        &mut self,
        e: &Entry,
        path: &[u8],
        parent: NodeId,
        last: &[u8],
    ) -> Result<(), Ext4Error> {
        let target_comps =
            clean(&e.link).map_err(|m| self.entry_err(e, format!("hard link target: {m}")))?;
        let Some((&t_last, t_parents)) = target_comps.split_last() else {
            return Err(self.entry_err(e, "hard link to the archive root"));
        };
        let lookup = Walk {
            create: false,
            stamp: None,
        };
        let t_dir = self
            .tree
            .walk(t_parents, lookup)
            .map_err(|w| self.entry_err(e, format!("hard link target: {}", w.message())))?;
        let target = t_dir
            .and_then(|d| self.tree.lookup(d, t_last))
            .map(|c| c.id)
            .ok_or_else(|| self.entry_err(e, "hard link target does not exist"))?;
        if matches!(self.tree.node(target).kind, Kind::Dir(_)) {
            return Err(self.entry_err(e, "hard link to a directory"));
        }
        // `a` linked to itself (same clean path) is a no-op, as in tarfs.
        let same = clean(path).ok() == Some(target_comps.clone());
        if same {
            return Ok(());
        }
        self.tree.unlink(parent, last);
        self.tree.link(parent, last, target, self.stamp);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_like_tarfs() {
        assert_eq!(clean(b"./a//b/./c/").unwrap(), vec![&b"a"[..], b"b", b"c"]);
        assert!(clean(b"./").unwrap().is_empty());
        assert!(clean(b"/etc/passwd").is_err());
        assert!(clean(b"a/../../b").is_err());
        assert!(clean(b"..").is_err());
        assert_eq!(
            clean(b"a/..b/c..").unwrap(),
            vec![&b"a"[..], b"..b", b"c.."]
        );
    }
}
