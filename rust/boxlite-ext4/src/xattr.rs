//! Extended attributes: which names ext4 stores (and as what), POSIX ACLs in ext4's own
//! on-disk format, and the in-inode and block encodings.

use crate::csum::crc32c;

/// One attribute as ext4 stores it: a name index (the prefix) and the rest of the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Xattr {
    pub index: u8,
    pub name: Box<[u8]>,
    pub value: Box<[u8]>,
}

const USER: u8 = 1;
const ACL_ACCESS: u8 = 2;
const ACL_DEFAULT: u8 = 3;
const TRUSTED: u8 = 4;
const SECURITY: u8 = 6;

/// What the attributes are attached to: the kernel accepts different names on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    File,
    Dir,
    Symlink,
    Special,
}

/// Turns an entry's PAX xattrs into what ext4 keeps, updating `mode` for an access ACL as
/// setxattr(2) does. Names the kernel refuses with EOPNOTSUPP/EPERM (unknown namespaces,
/// `user.*` on symlinks and devices, ACLs on symlinks, default ACLs on non-directories) are
/// dropped, as the guest's extraction ignores those errors; malformed ones are errors.
pub(crate) fn normalize(
    raw: Vec<(Vec<u8>, Vec<u8>)>,
    target: Target,
    mode: &mut u16,
) -> Result<Vec<Xattr>, String> {
    let mut out: Vec<Xattr> = Vec::new();
    for (full, value) in raw {
        if full.len() > 255 + "security.".len() {
            return Err("xattr name longer than 255 bytes".into());
        }
        if value.len() > 65536 {
            return Err(format!(
                "xattr {} has a {} byte value (limit 65536)",
                String::from_utf8_lossy(&full),
                value.len()
            ));
        }
        let (index, name): (u8, &[u8]) = if full == b"system.posix_acl_access" {
            (ACL_ACCESS, b"")
        } else if full == b"system.posix_acl_default" {
            (ACL_DEFAULT, b"")
        } else if let Some(n) = full.strip_prefix(b"user.") {
            (USER, n)
        } else if let Some(n) = full.strip_prefix(b"trusted.") {
            (TRUSTED, n)
        } else if let Some(n) = full.strip_prefix(b"security.") {
            (SECURITY, n)
        } else {
            continue;
        };
        if (index >= TRUSTED || index == USER)
            && (name.is_empty() || name.len() > 255 || name.contains(&0))
        {
            return Err(format!(
                "invalid xattr name {:?}",
                String::from_utf8_lossy(&full)
            ));
        }
        let value = match index {
            USER if matches!(target, Target::Symlink | Target::Special) => continue,
            ACL_ACCESS | ACL_DEFAULT if target == Target::Symlink => continue,
            ACL_DEFAULT if target != Target::Dir => continue,
            ACL_ACCESS => {
                let acl = Acl::parse(&value)?;
                let (equivalent, perms) = acl.mode_bits(*mode);
                *mode = (*mode & !0o777) | perms;
                if equivalent {
                    // setxattr stores nothing for an ACL the mode already says.
                    out.retain(|x| x.index != ACL_ACCESS);
                    continue;
                }
                acl.to_disk()
            }
            ACL_DEFAULT => {
                let acl = Acl::parse(&value)?;
                if acl.0.is_empty() {
                    out.retain(|x| x.index != ACL_DEFAULT);
                    continue;
                }
                acl.to_disk()
            }
            _ => value,
        };
        out.retain(|x| !(x.index == index && *x.name == *name));
        out.push(Xattr {
            index,
            name: name.into(),
            value: value.into(),
        });
    }
    // The order ext4 keeps block entries in (lookups stop at the first greater entry).
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// A POSIX ACL: (tag, perm, id) entries.
struct Acl(Vec<(u16, u16, u32)>);

impl Acl {
    /// The xattr format (version 2), validated like the kernel's posix_acl_valid.
    fn parse(v: &[u8]) -> Result<Self, String> {
        let bad = || "malformed POSIX ACL xattr".to_string();
        if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) || v[..4] != 2u32.to_le_bytes() {
            return Err(bad());
        }
        let entries: Vec<(u16, u16, u32)> = v[4..]
            .chunks_exact(8)
            .map(|c| {
                (
                    u16::from_le_bytes([c[0], c[1]]),
                    u16::from_le_bytes([c[2], c[3]]),
                    u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect();
        if entries.is_empty() {
            return Ok(Self(entries));
        }
        // Order: USER_OBJ, USER*, GROUP_OBJ, GROUP*, MASK, OTHER; MASK required with named entries.
        let mut state = ACL_USER_OBJ;
        let mut needs_mask = false;
        let mut last_id: Option<u32> = None;
        for &(tag, perm, id) in &entries {
            if perm & !7 != 0 {
                return Err(bad());
            }
            state = match (tag, state) {
                (ACL_USER_OBJ, ACL_USER_OBJ) => ACL_USER,
                (ACL_USER, ACL_USER) | (ACL_GROUP, ACL_GROUP) => {
                    if last_id.is_some_and(|l| id <= l) {
                        return Err(bad());
                    }
                    last_id = Some(id);
                    needs_mask = true;
                    state
                }
                (ACL_GROUP_OBJ, ACL_USER) => {
                    last_id = None;
                    ACL_GROUP
                }
                (ACL_MASK, ACL_GROUP) => ACL_OTHER,
                (ACL_OTHER, ACL_OTHER) => 0,
                (ACL_OTHER, ACL_GROUP) if !needs_mask => 0,
                _ => return Err(bad()),
            };
        }
        if state != 0 {
            return Err(bad());
        }
        Ok(Self(entries))
    }

    /// posix_acl_equiv_mode: whether the mode says it all, and the permission bits.
    fn mode_bits(&self, mode: u16) -> (bool, u16) {
        let mut bits = 0u16;
        let mut mask = None;
        let mut equivalent = true;
        for &(tag, perm, _) in &self.0 {
            match tag {
                ACL_USER_OBJ => bits |= (perm & 7) << 6,
                ACL_GROUP_OBJ => bits |= (perm & 7) << 3,
                ACL_OTHER => bits |= perm & 7,
                ACL_MASK => {
                    mask = Some(perm & 7);
                    equivalent = false;
                }
                _ => equivalent = false,
            }
        }
        if self.0.is_empty() {
            return (true, mode & 0o777);
        }
        if let Some(m) = mask {
            bits = (bits & !0o070) | (m << 3);
        }
        (equivalent, bits)
    }

    /// ext4's on-disk format (version 1): short entries except for named users and groups.
    fn to_disk(&self) -> Vec<u8> {
        let mut out = 1u32.to_le_bytes().to_vec();
        for &(tag, perm, id) in &self.0 {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            if tag == ACL_USER || tag == ACL_GROUP {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        out
    }
}

fn entry_len(x: &Xattr) -> usize {
    (16 + x.name.len() + 3) & !3
}

fn value_len(x: &Xattr) -> usize {
    (x.value.len() + 3) & !3
}

/// Bytes after the 128-byte base inode and its 32 extra bytes: magic, entries, values.
pub(crate) const IBODY_SPACE: usize = 256 - 128 - 32;
const BLOCK_HEADER: usize = 32;

/// Splits attributes between the inode body and an xattr block: in the inode while they
/// fit, the rest in the block. Errors when even the block cannot hold them.
pub(crate) fn place(
    attrs: &[Xattr],
    block_size: usize,
) -> Result<(Vec<usize>, Vec<usize>), String> {
    let mut ibody = Vec::new();
    let mut block = Vec::new();
    let mut ibody_used = 4 + 4; // magic + terminator
    let mut block_used = BLOCK_HEADER + 4;
    for (i, x) in attrs.iter().enumerate() {
        let need = entry_len(x) + value_len(x);
        if ibody_used + need <= IBODY_SPACE {
            ibody_used += need;
            ibody.push(i);
        } else {
            block_used += need;
            block.push(i);
        }
    }
    if block_used > block_size {
        return Err(format!(
            "xattrs take {block_used} bytes, more than fit in an inode and a {block_size}-byte block"
        ));
    }
    Ok((ibody, block))
}

fn write_entry(out: &mut [u8], x: &Xattr, value_offs: usize, hash: u32) {
    out[0] = x.name.len() as u8;
    out[1] = x.index;
    out[2..4].copy_from_slice(&(value_offs as u16).to_le_bytes());
    out[4..8].copy_from_slice(&0u32.to_le_bytes());
    out[8..12].copy_from_slice(&(x.value.len() as u32).to_le_bytes());
    out[12..16].copy_from_slice(&hash.to_le_bytes());
    out[16..16 + x.name.len()].copy_from_slice(&x.name);
}

/// The in-inode attribute area (`IBODY_SPACE` bytes), empty when there are none.
pub(crate) fn encode_ibody(attrs: &[&Xattr], out: &mut [u8]) {
    if attrs.is_empty() {
        return;
    }
    out[..4].copy_from_slice(&0xEA02_0000u32.to_le_bytes());
    let area = &mut out[4..];
    let mut entry = 0;
    let mut value_end = area.len();
    for x in attrs {
        value_end -= value_len(x);
        area[value_end..value_end + x.value.len()].copy_from_slice(&x.value);
        // In-inode entries carry no hash (the kernel leaves it 0 there too).
        write_entry(&mut area[entry..], x, value_end, 0);
        entry += entry_len(x);
    }
}

/// ext4_xattr_hash_entry, with the name bytes taken as signed chars as x86 kernels do.
fn entry_hash(x: &Xattr) -> u32 {
    let mut h: u32 = 0;
    for &c in x.name.iter() {
        h = (h << 5) ^ (h >> 27) ^ (c as i8 as i32 as u32);
    }
    let mut padded = x.value.to_vec();
    padded.resize(value_len(x), 0);
    for w in padded.chunks_exact(4) {
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
    }
    h
}

/// An xattr block without its checksum (that depends on the block's number): shared by
/// every inode with the same attributes, up to the kernel's refcount limit.
pub(crate) fn encode_block(attrs: &[&Xattr], block_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; block_size];
    out[..4].copy_from_slice(&0xEA02_0000u32.to_le_bytes());
    out[8..12].copy_from_slice(&1u32.to_le_bytes());
    let mut entry = BLOCK_HEADER;
    let mut value_end = block_size;
    let mut block_hash: u32 = 0;
    for x in attrs {
        value_end -= value_len(x);
        out[value_end..value_end + x.value.len()].copy_from_slice(&x.value);
        let hash = entry_hash(x);
        write_entry(&mut out[entry..], x, value_end, hash);
        entry += entry_len(x);
        block_hash = (block_hash << 16) ^ (block_hash >> 16) ^ hash;
    }
    out[12..16].copy_from_slice(&block_hash.to_le_bytes());
    out
}

/// Sets the refcount and the checksum of a block from [`encode_block`] living at `block_nr`.
pub(crate) fn seal_block(block: &mut [u8], refcount: u32, block_nr: u64, fs_seed: u32) {
    block[4..8].copy_from_slice(&refcount.to_le_bytes());
    block[16..20].fill(0);
    let c = crc32c(fs_seed, &block_nr.to_le_bytes());
    let c = crc32c(c, block);
    block[16..20].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(t, p, i) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    #[test]
    fn names_map_to_ext4_indexes() {
        let mut mode = 0o644;
        let out = normalize(
            vec![
                (b"user.b".to_vec(), b"2".to_vec()),
                (b"security.capability".to_vec(), vec![1; 20]),
                (b"user.a".to_vec(), b"1".to_vec()),
                (b"weird.x".to_vec(), b"dropped".to_vec()),
                (b"user.a".to_vec(), b"last wins".to_vec()),
            ],
            Target::File,
            &mut mode,
        )
        .unwrap();
        let got: Vec<(u8, &[u8], &[u8])> =
            out.iter().map(|x| (x.index, &*x.name, &*x.value)).collect();
        assert_eq!(
            got,
            vec![
                (1, &b"a"[..], &b"last wins"[..]),
                (1, b"b", b"2"),
                (6, b"capability", &[1; 20][..])
            ]
        );
        let none = normalize(
            vec![(b"user.a".to_vec(), b"1".to_vec())],
            Target::Symlink,
            &mut mode,
        )
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn acls_update_the_mode_and_convert() {
        let mut mode = 0o4755;
        let plain = acl(&[(1, 6, 0), (4, 4, 0), (0x20, 0, 0)]);
        let out = normalize(
            vec![(b"system.posix_acl_access".to_vec(), plain)],
            Target::File,
            &mut mode,
        )
        .unwrap();
        assert!(out.is_empty());
        assert_eq!(mode, 0o4640);
        let named = acl(&[
            (1, 7, 0),
            (2, 5, 1000),
            (4, 5, 0),
            (0x10, 1, 0),
            (0x20, 0, 0),
        ]);
        let out = normalize(
            vec![(b"system.posix_acl_access".to_vec(), named)],
            Target::File,
            &mut mode,
        )
        .unwrap();
        assert_eq!(mode, 0o4710);
        assert_eq!(out[0].index, ACL_ACCESS);
        assert_eq!(out[0].value.len(), 4 + 4 + 8 + 4 + 4 + 4);
        let unordered = acl(&[(4, 5, 0), (1, 7, 0), (0x20, 0, 0)]);
        assert!(normalize(
            vec![(b"system.posix_acl_access".to_vec(), unordered)],
            Target::File,
            &mut mode
        )
        .is_err());
    }

    #[test]
    fn placement_prefers_the_inode() {
        let small = Xattr {
            index: 1,
            name: b"a".to_vec().into(),
            value: vec![1; 8].into(),
        };
        let big = Xattr {
            index: 1,
            name: b"b".to_vec().into(),
            value: vec![2; 1000].into(),
        };
        let (i, b) = place(&[small.clone(), big.clone()], 4096).unwrap();
        assert_eq!((i, b), (vec![0], vec![1]));
        let huge = Xattr {
            index: 1,
            name: b"c".to_vec().into(),
            value: vec![3; 5000].into(),
        };
        assert!(place(&[huge], 4096).is_err());
    }
}
