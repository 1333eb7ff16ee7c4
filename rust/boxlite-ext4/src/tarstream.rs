//! A streaming tar reader with bounds: header fields are parsed by the `tar` crate, but the
//! stream, the extension headers (GNU long names, PAX) and sparse maps are handled here so
//! that none of them can make us hold more than a fixed amount of memory.

use std::io::{self, Read};

use tar::{GnuExtSparseHeader, GnuSparseHeader, Header};

use crate::Ext4Error;

const RECORD: u64 = 512;
/// Longest GNU long name / long link accepted.
const MAX_LONG_NAME: u64 = 64 * 1024;
/// Largest PAX extended header accepted (xattrs included).
const MAX_PAX: u64 = 1024 * 1024;
/// Most data segments of one GNU sparse file.
const MAX_SPARSE_SEGMENTS: usize = 1 << 16;

/// What an entry is, as far as layers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
    /// Anything else (volume labels, GNU dump dirs...): nothing to create.
    Other,
}

/// One entry, extensions applied. Its data is read through [`TarReader::read_data`].
#[derive(Debug)]
pub(crate) struct Entry {
    pub kind: Kind,
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: (i64, u32),
    pub dev: (u32, u32),
    /// PAX `SCHILY.xattr.*` records, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The file's size (its real size for a sparse file).
    pub size: u64,
    /// For GNU sparse files: the data segments `(offset, len)` stored one after the other.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Set when a PAX record could not be parsed; reported by the layer logic with the name.
    pub bad_field: Option<&'static str>,
}

impl Entry {
    pub fn name(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

pub(crate) struct TarReader<R> {
    r: R,
    layer: usize,
    pos: u64,
    /// Data bytes of the current entry not read yet, then its padding.
    remaining: u64,
    padding: u64,
    /// Name of the current entry, for truncation errors.
    current: String,
    done: bool,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R, layer: usize) -> Self {
        Self {
            r,
            layer,
            pos: 0,
            remaining: 0,
            padding: 0,
            current: String::new(),
            done: false,
        }
    }

    fn tar_err(&self, reason: impl Into<String>) -> Ext4Error {
        Ext4Error::Tar {
            layer: self.layer,
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn truncated(&self) -> Ext4Error {
        Ext4Error::Truncated {
            layer: self.layer,
            entry: self.current.clone(),
        }
    }

    /// Fills `buf`; `Ok(false)` on a clean end of stream before the first byte.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool, Ext4Error> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(self.truncated()),
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Ext4Error::Read {
                        layer: self.layer,
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    fn fill_exact(&mut self, buf: &mut [u8]) -> Result<(), Ext4Error> {
        if buf.is_empty() || self.fill(buf)? {
            Ok(())
        } else {
            Err(self.truncated())
        }
    }

    fn discard(&mut self, mut n: u64) -> Result<(), Ext4Error> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.fill_exact(&mut scratch[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes of the current entry's stored data.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<(), Ext4Error> {
        if buf.len() as u64 > self.remaining {
            return Err(self.tar_err("read past the entry's data"));
        }
        self.fill_exact(buf)?;
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    /// Stored data bytes of the current entry not read yet.
    pub fn data_left(&self) -> u64 {
        self.remaining
    }

    fn skip_entry(&mut self) -> Result<(), Ext4Error> {
        let n = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        self.discard(n)
    }

    fn start_data(&mut self, size: u64) {
        self.remaining = size;
        self.padding = (RECORD - size % RECORD) % RECORD;
    }

    /// Reads a whole extension body of `size` bytes, refusing more than `limit`.
    fn read_body(&mut self, size: u64, limit: u64, what: &str) -> Result<Vec<u8>, Ext4Error> {
        if size > limit {
            return Err(self.tar_err(format!("{what} of {size} bytes (limit {limit})")));
        }
        let mut body = vec![0u8; size as usize];
        self.start_data(size);
        self.read_data(&mut body)?;
        self.skip_entry()?;
        Ok(body)
    }

    /// Reads the rest of the stream (the caller's reader verifies digests at its end).
    pub fn drain(&mut self) -> Result<(), Ext4Error> {
        let mut scratch = vec![0u8; 64 * 1024];
        loop {
            match self.r.read(&mut scratch) {
                Ok(0) => return Ok(()),
                Ok(n) => self.pos += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Ext4Error::Read {
                        layer: self.layer,
                        source,
                    })
                }
            }
        }
    }

    /// The next entry; `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Ext4Error> {
        if self.done {
            return Ok(None);
        }
        self.skip_entry()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        let mut block = [0u8; RECORD as usize];
        loop {
            self.current = "(header)".into();
            if !self.fill(&mut block)? {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(self.truncated());
                }
                self.done = true;
                return Ok(None);
            }
            if block.iter().all(|&b| b == 0) {
                // End of archive (tar writes two zero records; one is enough).
                self.done = true;
                return Ok(None);
            }
            let header = Header::from_byte_slice(&block);
            self.check_sum(header)?;
            let size = header
                .entry_size()
                .map_err(|e| self.tar_err(format!("bad size field: {e}")))?;
            match header.entry_type().as_byte() {
                b'L' => {
                    self.current = "(GNU long name)".into();
                    if long_name.is_some() {
                        return Err(self.tar_err("two GNU long names for one entry"));
                    }
                    long_name = Some(self.read_body(size, MAX_LONG_NAME, "GNU long name")?);
                }
                b'K' => {
                    self.current = "(GNU long link)".into();
                    if long_link.is_some() {
                        return Err(self.tar_err("two GNU long links for one entry"));
                    }
                    long_link = Some(self.read_body(size, MAX_LONG_NAME, "GNU long link")?);
                }
                b'x' => {
                    self.current = "(PAX header)".into();
                    if pax.is_some() {
                        return Err(self.tar_err("two PAX headers for one entry"));
                    }
                    pax = Some(self.read_body(size, MAX_PAX, "PAX header")?);
                }
                b'g' => {
                    // Global PAX headers are not applied (as by the `tar` crate and umoci).
                    self.current = "(PAX global header)".into();
                    self.start_data(size);
                    self.skip_entry()?;
                }
                _ => {
                    return self
                        .finish_entry(header, size, long_name, long_link, pax)
                        .map(Some)
                }
            }
        }
    }

    fn check_sum(&self, header: &Header) -> Result<(), Ext4Error> {
        let bytes = header.as_bytes();
        let field = &bytes[148..156];
        let unsigned: u32 = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 8 * 32;
        let signed: i32 = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .map(|&b| i32::from(b as i8))
            .sum::<i32>()
            + 8 * 32;
        let stored = header
            .cksum()
            .map_err(|_| self.tar_err(format!("bad checksum field {field:?}")))?;
        if stored == unsigned || stored as i32 == signed {
            Ok(())
        } else {
            Err(self.tar_err("header checksum mismatch"))
        }
    }

    fn finish_entry(
        &mut self,
        header: &Header,
        stored: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Option<Vec<u8>>,
    ) -> Result<Entry, Ext4Error> {
        let typeflag = header.entry_type().as_byte();
        let mut path = match long_name {
            Some(n) => cstr(n),
            None => header.path_bytes().into_owned(),
        };
        let mut link = match long_link {
            Some(n) => cstr(n),
            None => header
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default(),
        };
        let mut entry = Entry {
            kind: Kind::Other,
            path: Vec::new(),
            link: Vec::new(),
            mode: header.mode().unwrap_or(0),
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            dev: (0, 0),
            xattrs: Vec::new(),
            size: stored,
            sparse: None,
            bad_field: None,
        };
        match header.uid() {
            Ok(v) => entry.uid = v,
            Err(_) => entry.bad_field = Some("uid"),
        }
        match header.gid() {
            Ok(v) => entry.gid = v,
            Err(_) => entry.bad_field = Some("gid"),
        }
        match header.mtime().ok().and_then(|t| i64::try_from(t).ok()) {
            Some(t) => entry.mtime = (t, 0),
            None => entry.bad_field = Some("mtime"),
        }
        if header.mode().is_err() {
            entry.bad_field = Some("mode");
        }
        let mut stored = stored;
        let mut pax_sparse = false;
        if let Some(pax) = &pax {
            for ext in tar::PaxExtensions::new(pax) {
                let ext = ext.map_err(|e| self.tar_err(format!("bad PAX record: {e}")))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let text = std::str::from_utf8(value).ok().map(str::trim);
                match key {
                    b"path" => path = value.to_vec(),
                    b"linkpath" => link = value.to_vec(),
                    b"size" => match text.and_then(|t| t.parse::<u64>().ok()) {
                        Some(s) => stored = s,
                        None => return Err(self.tar_err("bad PAX size")),
                    },
                    b"uid" => match text.and_then(|t| t.parse::<u64>().ok()) {
                        Some(v) => entry.uid = v,
                        None => entry.bad_field = Some("PAX uid"),
                    },
                    b"gid" => match text.and_then(|t| t.parse::<u64>().ok()) {
                        Some(v) => entry.gid = v,
                        None => entry.bad_field = Some("PAX gid"),
                    },
                    b"mtime" => match text.and_then(parse_pax_time) {
                        Some(t) => entry.mtime = t,
                        None => entry.bad_field = Some("PAX mtime"),
                    },
                    k if k.starts_with(b"GNU.sparse.") => pax_sparse = true,
                    k => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            entry.xattrs.push((name.to_vec(), value.to_vec()));
                        }
                    }
                }
            }
        }
        entry.path = path;
        entry.link = link;
        self.current = entry.name();
        entry.size = stored;
        entry.kind = match typeflag {
            b'0' | 0 | b'7' | b'S' => Kind::File,
            b'1' => Kind::HardLink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            _ => Kind::Other,
        };
        if entry.kind == Kind::File && entry.path.ends_with(b"/") {
            entry.kind = Kind::Dir;
        }
        if matches!(entry.kind, Kind::Char | Kind::Block) {
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            entry.dev = (major, minor);
        }
        if pax_sparse && entry.kind == Kind::File {
            return Err(Ext4Error::Unsupported {
                layer: self.layer,
                entry: entry.name(),
                what: "PAX-format (GNU.sparse.*) sparse file".into(),
            });
        }
        if typeflag == b'S' {
            let gnu = header
                .as_gnu()
                .ok_or_else(|| self.tar_err("sparse entry without a GNU header"))?;
            let mut segments = Vec::new();
            let mut add = |s: &GnuSparseHeader, this: &Self| -> Result<(), Ext4Error> {
                if s.is_empty() {
                    return Ok(());
                }
                let off = s.offset().map_err(|_| this.tar_err("bad sparse offset"))?;
                let len = s.length().map_err(|_| this.tar_err("bad sparse length"))?;
                if segments.len() >= MAX_SPARSE_SEGMENTS {
                    return Err(Ext4Error::Unsupported {
                        layer: this.layer,
                        entry: this.current.clone(),
                        what: format!("more than {MAX_SPARSE_SEGMENTS} sparse segments"),
                    });
                }
                segments.push((off, len));
                Ok(())
            };
            for s in &gnu.sparse {
                add(s, self)?;
            }
            let mut extended = gnu.is_extended();
            while extended {
                let mut ext = GnuExtSparseHeader::new();
                self.fill_exact(ext.as_mut_bytes())?;
                for s in &ext.sparse {
                    add(s, self)?;
                }
                extended = ext.is_extended();
            }
            let real = gnu
                .real_size()
                .map_err(|_| self.tar_err("bad sparse real size"))?;
            let mut end = 0u64;
            let mut total = 0u64;
            for &(off, len) in &segments {
                let seg_end = off
                    .checked_add(len)
                    .ok_or_else(|| self.tar_err("sparse segment overflows"))?;
                if off < end || seg_end > real {
                    return Err(self.tar_err("sparse segments out of order or past the end"));
                }
                end = seg_end;
                total += len;
            }
            if total != stored {
                return Err(self.tar_err("sparse segments do not add up to the stored size"));
            }
            segments.retain(|&(_, len)| len > 0);
            entry.size = real;
            entry.sparse = Some(segments);
        }
        self.start_data(stored);
        Ok(entry)
    }
}

/// A NUL-terminated name field as bytes (GNU long names end with NUL).
fn cstr(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(n) = v.iter().position(|&b| b == 0) {
        v.truncate(n);
    }
    v
}

/// A PAX time (`1700000000.5`, `-3.25`) as seconds and nanoseconds.
pub(crate) fn parse_pax_time(s: &str) -> Option<(i64, u32)> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = int.starts_with('-');
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    if negative && nanos > 0 {
        // -3.25 is 3.25 s before the epoch: -4 s + 0.75 s.
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_pax_time("1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time("-3.25"), Some((-4, 750_000_000)));
        assert_eq!(parse_pax_time("1.2x"), None);
    }

    #[test]
    fn long_names_and_pax_come_through() {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("dir/{}", "n".repeat(200));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..]), ("uid", b"4000000000")])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut h, "d/", &b""[..]).unwrap();
        let data = b.into_inner().unwrap();
        let mut r = TarReader::new(data.as_slice(), 0);
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.path, long.as_bytes());
        let mut buf = [0u8; 3];
        r.read_data(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        let e = r.next_entry().unwrap().unwrap();
        assert_eq!(e.kind, Kind::Dir);
        assert_eq!(e.uid, 4_000_000_000);
        assert_eq!(e.xattrs, vec![(b"user.k".to_vec(), b"v".to_vec())]);
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn truncation_is_reported() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(10_000);
        b.append_data(&mut h, "f", &vec![1u8; 10_000][..]).unwrap();
        let data = b.into_inner().unwrap();
        let cut = &data[..3000];
        let mut r = TarReader::new(cut, 0);
        let _ = r.next_entry().unwrap().unwrap();
        let mut buf = vec![0u8; 10_000];
        assert!(matches!(
            r.read_data(&mut buf),
            Err(Ext4Error::Truncated { .. })
        ));
        let mut r = TarReader::new(&data[..100], 0);
        assert!(matches!(r.next_entry(), Err(Ext4Error::Truncated { .. })));
    }
}
