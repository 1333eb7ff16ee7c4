//! The filesystem being built, in memory: metadata only (file data is already in the image),
//! and path resolution that follows symlinks confined to the root, as a chroot would.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};

use crate::extent::Extent;
use crate::xattr::Xattr;

pub(crate) type NodeId = u32;
pub(crate) const ROOT: NodeId = 0;
/// Symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: u32 = 40;

#[derive(Debug, Clone)]
pub(crate) struct Meta {
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub xattrs: Vec<Xattr>,
}

#[derive(Debug)]
pub(crate) struct Child {
    pub id: NodeId,
    /// The layer that last created or walked through this name (whiteouts spare those).
    pub layer: u32,
}

#[derive(Debug)]
pub(crate) enum Kind {
    Dir(BTreeMap<Box<[u8]>, Child>),
    File { size: u64, extents: Vec<Extent> },
    Symlink(Box<[u8]>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub kind: Kind,
    pub meta: Meta,
}

/// Why a path could not be resolved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WalkError {
    /// A component is neither a directory nor a symlink to one.
    NotDir,
    /// More than 40 symlinks.
    Loop,
    /// A symlink on the way points at nothing (no directory is made inside a symlink target).
    Dangling,
}

impl WalkError {
    pub fn message(&self) -> &'static str {
        match self {
            WalkError::NotDir => "a parent path component is not a directory",
            WalkError::Loop => "too many levels of symbolic links",
            WalkError::Dangling => "a parent path component is a dangling symlink",
        }
    }
}

/// How to walk to a directory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Walk {
    /// Make missing directories (with `implicit` metadata), like `mkdir -p`.
    pub create: bool,
    /// Stamp every name walked through with this layer.
    pub stamp: Option<u32>,
}

pub(crate) struct Tree {
    pub nodes: Vec<Node>,
    /// Metadata of directories nobody described (the root, missing parents).
    pub implicit: Meta,
}

impl Tree {
    pub fn new(implicit: Meta) -> Self {
        Self {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: implicit.clone(),
            }],
            implicit,
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        (self.nodes.len() - 1) as NodeId
    }

    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<Box<[u8]>, Child>> {
        match &self.node(dir).kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Box<[u8]>, Child>> {
        match &mut self.node_mut(dir).kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<&Child> {
        self.children(dir).and_then(|c| c.get(name))
    }

    /// Walks `comps` (clean components: no `.`, `..` or empty ones) from the root to a
    /// directory, following symlinks inside the tree: absolute targets start again at the
    /// root and `..` stops there. `Ok(None)`: a component is missing and `create` is off.
    pub fn walk(&mut self, comps: &[&[u8]], how: Walk) -> Result<Option<NodeId>, WalkError> {
        let mut stack: Vec<NodeId> = vec![ROOT];
        // Components from symlink targets, consumed before the rest of `comps`.
        let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
        let mut next = 0;
        let mut followed = 0;
        loop {
            let (name, original): (Cow<'_, [u8]>, bool) = match pending.pop_front() {
                Some(c) => (Cow::Owned(c), false),
                None if next < comps.len() => {
                    next += 1;
                    (Cow::Borrowed(comps[next - 1]), true)
                }
                None => break,
            };
            match &*name {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = *stack.last().unwrap_or(&ROOT);
            let child = match self.children_mut(cur).and_then(|c| c.get_mut(&*name)) {
                Some(child) => {
                    if let Some(layer) = how.stamp {
                        child.layer = layer;
                    }
                    Some(child.id)
                }
                None => None,
            };
            let Some(id) = child else {
                if !how.create {
                    return Ok(None);
                }
                if !original {
                    return Err(WalkError::Dangling);
                }
                let dir = self.add(Node {
                    kind: Kind::Dir(BTreeMap::new()),
                    meta: self.implicit.clone(),
                });
                let layer = how.stamp.unwrap_or(0);
                if let Some(c) = self.children_mut(cur) {
                    c.insert(name.into_owned().into(), Child { id: dir, layer });
                }
                stack.push(dir);
                continue;
            };
            match &self.node(id).kind {
                Kind::Dir(_) => stack.push(id),
                Kind::Symlink(target) => {
                    followed += 1;
                    if followed > MAX_SYMLINKS {
                        return Err(WalkError::Loop);
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    for part in target.split(|&b| b == b'/').rev() {
                        pending.push_front(part.to_vec());
                    }
                }
                _ => return Err(WalkError::NotDir),
            }
        }
        Ok(stack.last().copied())
    }

    /// Removes `name` from `dir` (the node stays in the arena until the image is laid out,
    /// where only what is reachable from the root counts).
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Option<Child> {
        self.children_mut(dir).and_then(|c| c.remove(name))
    }

    pub fn link(&mut self, dir: NodeId, name: &[u8], id: NodeId, layer: u32) {
        if let Some(c) = self.children_mut(dir) {
            c.insert(name.into(), Child { id, layer });
        }
    }

    /// Opaque directory: drop everything lower layers put in `dir`, keeping names this layer
    /// made or walked through (and, inside those, the same rule again).
    pub fn make_opaque(&mut self, dir: NodeId, layer: u32) {
        let mut todo = vec![dir];
        while let Some(d) = todo.pop() {
            let mut keep_dirs = Vec::new();
            if let Some(children) = self.children_mut(d) {
                children.retain(|_, c| c.layer == layer);
                keep_dirs.extend(children.values().map(|c| c.id));
            }
            todo.extend(
                keep_dirs
                    .into_iter()
                    .filter(|&id| matches!(self.node(id).kind, Kind::Dir(_))),
            );
        }
    }
}
