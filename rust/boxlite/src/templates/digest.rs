//! Telling whether a template file changed: a cheap stamp checked on every use and a content
//! digest that reads only the allocated parts of a sparse file.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Chunk of the content digest: a chunk wholly inside a hole is not read.
const CHUNK: u64 = 1024 * 1024;

/// What the filesystem says about a file. Any write to it, through a descriptor or a shared
/// mapping, moves `ctime`, which no unprivileged program can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            blocks: meta.blocks(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }
}

/// A sha256 over the file's size and the sha256 of each 1 MiB chunk, hex. A chunk in a hole
/// counts as the digest of zeros without being read, so the result equals reading every byte
/// and does not depend on how the filesystem reports its extents; a 1 GiB guest RAM file with
/// 136 MiB allocated hashes in ~0.1 s instead of ~0.7 s.
pub(crate) fn sparse_digest(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let zero_chunk: [u8; 32] = Sha256::digest(vec![0u8; CHUNK as usize]).into();
    let mut outer = Sha256::new();
    outer.update(size.to_le_bytes());
    let mut buffer = vec![0u8; CHUNK as usize];
    let mut offset = 0u64;
    while offset < size {
        let len = CHUNK.min(size - offset);
        let data_at = next_data(&file, offset)?;
        if len == CHUNK && data_at.is_none_or(|at| at >= offset + CHUNK) {
            outer.update(zero_chunk);
        } else {
            file.seek(SeekFrom::Start(offset))?;
            let chunk = &mut buffer[..len as usize];
            file.read_exact(chunk)?;
            outer.update(Sha256::digest(&chunk[..]));
        }
        offset += len;
    }
    Ok(hex::encode(outer.finalize()))
}

/// The sha256 of a whole (small) file, hex.
pub(crate) fn file_digest(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The first data offset at or after `offset`, or `None` if only a hole follows.
fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; it does not touch memory.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if at >= 0 {
        return Ok(Some(at as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        // A filesystem without hole reporting: everything counts as data.
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn full_read_digest(path: &Path) -> String {
        let bytes = std::fs::read(path).unwrap();
        let mut outer = Sha256::new();
        outer.update((bytes.len() as u64).to_le_bytes());
        for chunk in bytes.chunks(CHUNK as usize) {
            outer.update(Sha256::digest(chunk));
        }
        hex::encode(outer.finalize())
    }

    #[test]
    fn sparse_and_dense_reads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mut file = File::create(&path).unwrap();
        // Data in the middle of chunk 2, a hole over chunks 3-6, data at the end, a partial tail.
        file.set_len(7 * CHUNK + 12345).unwrap();
        file.seek(SeekFrom::Start(2 * CHUNK + 100)).unwrap();
        file.write_all(b"guest page").unwrap();
        file.seek(SeekFrom::Start(7 * CHUNK + 10)).unwrap();
        file.write_all(b"tail").unwrap();
        drop(file);
        let sparse = sparse_digest(&path).unwrap();
        assert_eq!(sparse, full_read_digest(&path));

        // One changed byte in a chunk that was a hole changes the digest.
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(5 * CHUNK)).unwrap();
        file.write_all(b"x").unwrap();
        drop(file);
        let changed = sparse_digest(&path).unwrap();
        assert_ne!(changed, sparse);
        assert_eq!(changed, full_read_digest(&path));
    }

    #[test]
    fn a_write_moves_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::write(&path, b"device state").unwrap();
        let before = FileStamp::of(&path).unwrap();
        assert_eq!(FileStamp::of(&path).unwrap(), before);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all(b"D").unwrap();
        drop(file);
        let after = FileStamp::of(&path).unwrap();
        assert_eq!(after.size, before.size);
        assert_ne!(after, before);
    }
}
