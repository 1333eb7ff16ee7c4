//! Tar work inside the box: copy in, copy out, and applying OCI layers.
//!
//! This runs in a helper process (the agent re-executed with a hidden subcommand) that first
//! chroots into the box root, in a private mount namespace without the box's /proc and /sys:
//! whatever an archive names - `..`, absolute symlinks, links through /proc - resolves
//! inside the box. Entry names with `..` components or absolute paths are refused on top.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use boxlite_proto::ErrorKind;
use tar::{EntryType, Header, HeaderMode};

use crate::sys;

/// A failed tar operation, in the protocol's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OpError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    fn io(context: impl std::fmt::Display, e: io::Error) -> Self {
        let kind = match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{context}: {e}"))
    }
}

/// Entry point of `boxlite-guest __boxlite_tar <op> <root> <path>`; returns the exit code.
/// Failures are reported as one `kind<TAB>message` line on stderr.
pub fn helper_main(args: &[String]) -> i32 {
    let result = match args {
        [op, root, path] => enter_root(root).and_then(|()| run_op(op, path)),
        _ => Err(OpError::new(
            ErrorKind::InvalidArgument,
            "usage: __boxlite_tar copy-in|copy-out|unpack-layer ROOT PATH",
        )),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            let kind = serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "io".into());
            let msg = e.message.replace(['\n', '\t'], " ");
            let _ = sys::write(2, format!("{kind}\t{msg}\n").as_bytes());
            1
        }
    }
}

fn run_op(op: &str, path: &str) -> Result<(), OpError> {
    // SAFETY: the helper owns its stdin and stdout and nothing else uses them.
    let (stdin, stdout) = unsafe { (File::from_raw_fd(0), File::from_raw_fd(1)) };
    let same_owner = true;
    match op {
        "copy-in" => {
            let mut input = BufReader::with_capacity(256 * 1024, stdin);
            copy_in(&mut input, Path::new(path), same_owner)?;
            let _ = io::copy(&mut input, &mut io::sink());
            Ok(())
        }
        "copy-out" => copy_out(Path::new(path), stdout),
        "unpack-layer" => {
            let mut input = BufReader::with_capacity(256 * 1024, stdin);
            unpack_layer(&mut input, Path::new("/"), same_owner)?;
            let _ = io::copy(&mut input, &mut io::sink());
            Ok(())
        }
        other => Err(OpError::new(
            ErrorKind::InvalidArgument,
            format!("unknown tar operation {other:?}"),
        )),
    }
}

/// Private mount namespace, chroot into `root`, hide its /proc and /sys, umask 0.
fn enter_root(root: &str) -> Result<(), OpError> {
    let c = sys::cstr(root).map_err(|e| OpError::io("root", e))?;
    // SAFETY: plain syscalls on valid C strings.
    unsafe {
        let private = libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0;
        if libc::chroot(c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
            return Err(OpError::io(
                format!("entering the box root {root}"),
                io::Error::last_os_error(),
            ));
        }
        if private {
            // /proc/<pid>/root and friends would lead out of the chroot.
            libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH);
            libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH);
        }
        libc::umask(0);
    }
    Ok(())
}

/// An archive entry name as a relative path: `.` and empty components dropped; `..` and
/// absolute names refused. The archive root itself is the empty path.
pub fn clean_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.first() == Some(&b'/') {
        return Err(format!(
            "absolute path {:?} in archive",
            String::from_utf8_lossy(raw)
        ));
    }
    let mut out = PathBuf::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(format!(
                    "path {:?} in archive leaves its root",
                    String::from_utf8_lossy(raw)
                ))
            }
            p => out.push(OsStr::from_bytes(p)),
        }
    }
    Ok(out)
}

/// What an OCI layer entry name means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whiteout {
    /// An ordinary entry.
    No,
    /// `dir/.wh.name`: delete `dir/name` of the lower layers.
    Remove(PathBuf),
    /// `dir/.wh..wh..opq`: hide everything the lower layers put in `dir`.
    Opaque(PathBuf),
    /// Another `.wh..wh.*` (aufs metadata): ignore.
    Ignore,
}

pub const WHITEOUT_PREFIX: &str = ".wh.";
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

pub fn classify_whiteout(rel: &Path) -> Whiteout {
    let Some(name) = rel.file_name() else {
        return Whiteout::No;
    };
    let name = name.as_bytes();
    let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
    if name == OPAQUE_MARKER.as_bytes() {
        Whiteout::Opaque(parent)
    } else if name.starts_with(b".wh..wh.") {
        Whiteout::Ignore
    } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        if target.is_empty() || target == b"." || target == b".." {
            Whiteout::Ignore
        } else {
            Whiteout::Remove(parent.join(OsStr::from_bytes(target)))
        }
    } else {
        Whiteout::No
    }
}

/// A PAX time (`1700000000.5`, `-3.25`) as seconds and nanoseconds.
pub fn parse_pax_time(s: &str) -> Option<(i64, i64)> {
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    let negative = int.starts_with('-');
    let secs: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: i64 = digits.parse().ok()?;
    if negative && nanos > 0 {
        // -3.25 is 3.25 s before the epoch: -4 s + 0.75 s.
        return Some((secs - 1, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

/// Ownership, permissions, time and xattrs of one entry.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Self> {
        let h = entry.header();
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad {what}"));
        let mut meta = Self {
            mode: h.mode()? & 0o7777,
            uid: u32::try_from(h.uid()?).map_err(|_| bad("uid"))?,
            gid: u32::try_from(h.gid()?).map_err(|_| bad("gid"))?,
            mtime: (i64::try_from(h.mtime()?).map_err(|_| bad("mtime"))?, 0),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value().unwrap_or("");
                match key {
                    "uid" => meta.uid = value.trim().parse().map_err(|_| bad("PAX uid"))?,
                    "gid" => meta.gid = value.trim().parse().map_err(|_| bad("PAX gid"))?,
                    "mtime" => {
                        meta.mtime = parse_pax_time(value).ok_or_else(|| bad("PAX mtime"))?
                    }
                    k => {
                        if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                            if let Ok(name) = CString::new(name) {
                                meta.xattrs.push((name, ext.value_bytes().to_vec()));
                            }
                        }
                    }
                }
            }
        }
        Ok(meta)
    }

    fn times(&self) -> [libc::timespec; 2] {
        let t = libc::timespec {
            tv_sec: self.mtime.0 as libc::time_t,
            tv_nsec: self.mtime.1 as libc::c_long,
        };
        [t, t]
    }
}

fn xattr_error_matters(e: &io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        Some(libc::ENOTSUP) | Some(libc::EPERM) | Some(libc::EACCES)
    )
}

/// Applies `meta` through an open descriptor: owner, then mode (chown clears set-id bits),
/// then xattrs (chown clears file capabilities), then times.
fn apply_meta_fd(f: &File, meta: &Meta, same_owner: bool) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: syscalls on an open descriptor with valid pointers.
    unsafe {
        if same_owner {
            sys::cvt(libc::fchown(fd, meta.uid, meta.gid))?;
        }
        sys::cvt(libc::fchmod(fd, meta.mode))?;
        for (name, value) in &meta.xattrs {
            if libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) != 0 {
                let e = io::Error::last_os_error();
                if xattr_error_matters(&e) {
                    return Err(e);
                }
            }
        }
        sys::cvt(libc::futimens(fd, meta.times().as_ptr()))?;
    }
    Ok(())
}

/// Owner and xattrs by path, without following a final symlink.
fn apply_owner_xattrs(path: &Path, meta: &Meta, same_owner: bool, symlink: bool) -> io::Result<()> {
    let c = sys::cpath(path)?;
    // SAFETY: syscalls with a valid C string and buffers.
    unsafe {
        if same_owner {
            sys::cvt(libc::lchown(c.as_ptr(), meta.uid, meta.gid))?;
        }
        for (name, value) in &meta.xattrs {
            if libc::lsetxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            ) != 0
            {
                let e = io::Error::last_os_error();
                // Symlinks only take trusted/security xattrs; never fail on those.
                if !symlink && xattr_error_matters(&e) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn apply_mode_times(path: &Path, meta: &Meta, symlink: bool) -> io::Result<()> {
    let c = sys::cpath(path)?;
    // SAFETY: syscalls with a valid C string and timespec array.
    unsafe {
        if !symlink {
            sys::cvt(libc::chmod(c.as_ptr(), meta.mode))?;
        }
        sys::cvt(libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            meta.times().as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ))?;
    }
    Ok(())
}

/// Removes whatever is at `path` (a whole tree for a directory; a symlink itself, never its
/// target). Missing is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Streams archive entries onto the filesystem below `base`.
struct Extractor {
    base: PathBuf,
    /// OCI layer semantics (whiteouts, root entry metadata).
    layer: bool,
    same_owner: bool,
    /// Paths this layer created, with their ancestors (to keep them when a directory turns
    /// out to be opaque).
    seen: HashSet<PathBuf>,
    /// Directories whose mode and times are set once their contents are in place.
    dirs: Vec<(PathBuf, Meta)>,
    buf: Vec<u8>,
}

impl Extractor {
    fn new(base: &Path, layer: bool, same_owner: bool) -> Self {
        Self {
            base: base.to_path_buf(),
            layer,
            same_owner,
            seen: HashSet::new(),
            dirs: Vec::new(),
            buf: vec![0; 128 * 1024],
        }
    }

    fn run(&mut self, input: &mut dyn Read) -> Result<(), OpError> {
        let mut archive = tar::Archive::new(input);
        let entries = archive
            .entries()
            .map_err(|e| OpError::io("reading the archive", e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| OpError::io("reading the archive", e))?;
            self.entry(&mut entry)?;
        }
        self.finish_dirs()
    }

    fn note(&mut self, rel: &Path) {
        if !self.layer {
            return;
        }
        for a in rel.ancestors() {
            if a.as_os_str().is_empty() || !self.seen.insert(a.to_path_buf()) {
                break;
            }
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), OpError> {
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = clean_path(&raw).map_err(|m| OpError::new(ErrorKind::InvalidArgument, m))?;
        let mut kind = entry.header().entry_type();
        if kind == EntryType::Regular && raw.ends_with(b"/") {
            kind = EntryType::Directory;
        }
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        if self.layer {
            match classify_whiteout(&rel) {
                Whiteout::No => {}
                Whiteout::Ignore => return Ok(()),
                Whiteout::Remove(target) => {
                    if self.seen.contains(&target) {
                        return Ok(());
                    }
                    return remove_any(&self.base.join(&target))
                        .map_err(|e| OpError::io(format!("whiteout {name}"), e));
                }
                Whiteout::Opaque(dir) => {
                    self.note(&dir);
                    return self
                        .opaque(&dir)
                        .map_err(|e| OpError::io(format!("opaque whiteout {name}"), e));
                }
            }
            self.note(&rel);
        }
        let link = entry.link_name_bytes().map(|l| l.into_owned());
        let meta = Meta::read(entry).map_err(|e| OpError::io(format!("entry {name}"), e))?;
        let path = self.base.join(&rel);
        let is_root = rel.as_os_str().is_empty();
        let r = match kind {
            EntryType::Directory => {
                if is_root && !self.layer {
                    // The archive's own root: leave the destination's owner and mode alone.
                    return Ok(());
                }
                self.make_dir(&path, meta)
            }
            _ if is_root => return Ok(()),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.make_file(&path, entry, &meta)
            }
            EntryType::Symlink => self.make_symlink(&path, link.as_deref().unwrap_or(b""), &meta),
            EntryType::Link => self.make_hardlink(&path, link.as_deref().unwrap_or(b"")),
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                self.make_node(&path, kind, major, minor, &meta)
            }
            // Sockets, volume labels and the like have nothing to extract.
            _ => Ok(()),
        };
        r.map_err(|e| OpError::io(format!("entry {name}"), e))
    }

    /// Clears the way for a new entry at `path`. An existing directory is kept when the new
    /// entry is a directory too (returns `true`); anything else is removed.
    fn replace(&self, path: &Path, dir: bool) -> io::Result<bool> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
            Ok(m) if m.is_dir() => {
                if dir {
                    return Ok(true);
                }
                fs::remove_dir_all(path)?;
            }
            Ok(_) => fs::remove_file(path)?,
        }
        if let Some(parent) = path.parent() {
            if !parent.is_dir() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)?;
            }
        }
        Ok(false)
    }

    fn make_dir(&mut self, path: &Path, meta: Meta) -> io::Result<()> {
        if !self.replace(path, true)? {
            match fs::DirBuilder::new().mode(0o700).create(path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        apply_owner_xattrs(path, &meta, self.same_owner, false)?;
        self.dirs.push((path.to_path_buf(), meta));
        Ok(())
    }

    fn make_file(&mut self, path: &Path, data: &mut dyn Read, meta: &Meta) -> io::Result<()> {
        self.replace(path, false)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            f.write_all(&self.buf[..n])?;
        }
        apply_meta_fd(&f, meta, self.same_owner)
    }

    fn make_symlink(&mut self, path: &Path, target: &[u8], meta: &Meta) -> io::Result<()> {
        self.replace(path, false)?;
        std::os::unix::fs::symlink(OsStr::from_bytes(target), path)?;
        apply_owner_xattrs(path, meta, self.same_owner, true)?;
        apply_mode_times(path, meta, true)
    }

    fn make_hardlink(&mut self, path: &Path, target: &[u8]) -> io::Result<()> {
        let rel = clean_path(target).map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        if rel.as_os_str().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "hard link to the archive root",
            ));
        }
        let target = self.base.join(rel);
        if target == path {
            return Ok(());
        }
        self.replace(path, false)?;
        // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        fs::hard_link(&target, path)
    }

    fn make_node(
        &mut self,
        path: &Path,
        kind: EntryType,
        major: u32,
        minor: u32,
        meta: &Meta,
    ) -> io::Result<()> {
        self.replace(path, false)?;
        let fmt = match kind {
            EntryType::Char => libc::S_IFCHR,
            EntryType::Block => libc::S_IFBLK,
            _ => libc::S_IFIFO,
        };
        let c = sys::cpath(path)?;
        // SAFETY: mknod with a valid C string.
        sys::cvt(unsafe {
            libc::mknod(
                c.as_ptr(),
                fmt | (meta.mode & 0o777),
                libc::makedev(major, minor),
            )
        })?;
        apply_owner_xattrs(path, meta, self.same_owner, false)?;
        apply_mode_times(path, meta, false)
    }

    /// `rel` is opaque: remove what lower layers have in it, keeping this layer's entries.
    fn opaque(&mut self, rel: &Path) -> io::Result<()> {
        let dir = self.base.join(rel);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Ok(()),
        }
        for child in fs::read_dir(&dir)? {
            self.remove_lower(&rel.join(child?.file_name()))?;
        }
        Ok(())
    }

    fn remove_lower(&self, rel: &Path) -> io::Result<()> {
        let path = self.base.join(rel);
        if !self.seen.contains(rel) {
            return remove_any(&path);
        }
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            for child in fs::read_dir(&path)? {
                self.remove_lower(&rel.join(child?.file_name()))?;
            }
        }
        Ok(())
    }

    /// Directory modes and times, last to first, now that nothing is created in them.
    fn finish_dirs(&mut self) -> Result<(), OpError> {
        for (path, meta) in self.dirs.drain(..).rev() {
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            apply_mode_times(&path, &meta, false)
                .map_err(|e| OpError::io(format!("directory {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// Unpacks a tar stream into the directory `dest` (created if missing).
pub fn copy_in(input: &mut dyn Read, dest: &Path, same_owner: bool) -> Result<(), OpError> {
    match fs::metadata(dest) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(OpError::new(
                ErrorKind::InvalidArgument,
                format!("{} exists and is not a directory", dest.display()),
            ))
        }
        Err(_) => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dest)
            .map_err(|e| OpError::io(format!("creating {}", dest.display()), e))?,
    }
    Extractor::new(dest, false, same_owner).run(input)
}

/// Applies an uncompressed OCI layer onto the root `root`.
pub fn unpack_layer(input: &mut dyn Read, root: &Path, same_owner: bool) -> Result<(), OpError> {
    Extractor::new(root, true, same_owner).run(input)
}

/// Writes `path` (a file, or a directory tree; symlinks as symlinks) as a tar stream whose
/// entries are named after the last component of `path` (`/etc` gives `etc/...`).
pub fn copy_out(path: &Path, output: impl Write) -> Result<(), OpError> {
    let meta =
        fs::symlink_metadata(path).map_err(|e| OpError::io(format!("{}", path.display()), e))?;
    let name = match path.file_name() {
        Some(n) => PathBuf::from(n),
        None => PathBuf::from("."),
    };
    let mut b = tar::Builder::new(BufWriter::with_capacity(256 * 1024, output));
    b.mode(HeaderMode::Complete);
    append_tree(&mut b, path, &name, meta).map_err(|e| OpError::io("writing the archive", e))?;
    let mut w = b
        .into_inner()
        .map_err(|e| OpError::io("writing the archive", e))?;
    w.flush().map_err(|e| OpError::io("writing the archive", e))
}

fn append_tree<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    meta: fs::Metadata,
) -> io::Result<()> {
    let mut h = Header::new_gnu();
    h.set_metadata_in_mode(&meta, HeaderMode::Complete);
    h.set_size(0);
    let ft = meta.file_type();
    if ft.is_dir() {
        b.append_data(&mut h, name, io::empty())?;
        let mut children: Vec<_> = fs::read_dir(path)?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        children.sort();
        for child in children {
            let cpath = path.join(&child);
            // Something that vanished during the walk is simply not part of the copy.
            let Ok(cmeta) = fs::symlink_metadata(&cpath) else {
                continue;
            };
            append_tree(b, &cpath, &name.join(&child), cmeta)?;
        }
    } else if ft.is_file() {
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let len = meta.len();
        h.set_size(len);
        // A file that shrinks meanwhile is padded, one that grows cut: the archive stays valid.
        let data = f.take(len).chain(io::repeat(0)).take(len);
        b.append_data(&mut h, name, data)?;
    } else if ft.is_symlink() {
        let target = fs::read_link(path)?;
        let bytes = target.as_os_str().as_bytes();
        if bytes.len() < h.as_old().linkname.len() {
            // Byte for byte (`append_link` normalizes, turning `/` into `//`).
            h.set_link_name_literal(bytes)?;
            b.append_data(&mut h, name, io::empty())?;
        } else {
            b.append_link(&mut h, name, target)?;
        }
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        if !ft.is_fifo() {
            let rdev = meta.rdev();
            h.set_device_major(libc::major(rdev))?;
            h.set_device_minor(libc::minor(rdev))?;
        }
        b.append_data(&mut h, name, io::empty())?;
    }
    // Sockets cannot be archived; they are skipped.
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn path_cleaning() {
        assert_eq!(clean_path(b"./a//b/./c/").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(clean_path(b"./").unwrap(), PathBuf::new());
        assert_eq!(clean_path(b"").unwrap(), PathBuf::new());
        assert!(clean_path(b"/etc/passwd").is_err());
        assert!(clean_path(b"a/../../b").is_err());
        assert!(clean_path(b"..").is_err());
        assert_eq!(
            clean_path(b"a/..b/c..").unwrap(),
            PathBuf::from("a/..b/c..")
        );
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(classify_whiteout(Path::new("etc/passwd")), Whiteout::No);
        assert_eq!(
            classify_whiteout(Path::new("etc/.wh.passwd")),
            Whiteout::Remove(PathBuf::from("etc/passwd"))
        );
        assert_eq!(
            classify_whiteout(Path::new(".wh.tmp")),
            Whiteout::Remove(PathBuf::from("tmp"))
        );
        assert_eq!(
            classify_whiteout(Path::new("usr/lib/.wh..wh..opq")),
            Whiteout::Opaque(PathBuf::from("usr/lib"))
        );
        assert_eq!(
            classify_whiteout(Path::new(".wh..wh..opq")),
            Whiteout::Opaque(PathBuf::new())
        );
        assert_eq!(
            classify_whiteout(Path::new("a/.wh..wh.plnk")),
            Whiteout::Ignore
        );
        assert_eq!(classify_whiteout(Path::new("a/.wh.")), Whiteout::Ignore);
        assert_eq!(classify_whiteout(Path::new("a/x.wh.y")), Whiteout::No);
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(
            parse_pax_time("1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time("12.000000001"), Some((12, 1)));
        assert_eq!(parse_pax_time("-3.25"), Some((-4, 750_000_000)));
        assert_eq!(parse_pax_time("x"), None);
        assert_eq!(parse_pax_time("1.2x"), None);
    }

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "boxlite-guest-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn same_owner() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A tar of `(name, kind, data_or_link, mode)` entries.
    fn archive(entries: &[(&str, EntryType, &str, u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for &(name, kind, data, mode) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(1234);
            h.set_gid(4321);
            h.set_mtime(1_000_000);
            match kind {
                EntryType::Symlink | EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, name, data).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, name, data.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, entries: &[(&str, EntryType, &str, u32)]) -> Result<(), OpError> {
        unpack_layer(&mut archive(entries).as_slice(), root, same_owner())
    }

    #[test]
    fn layers_with_whiteouts_and_opaque_dirs() {
        let t = Tmp::new("layers");
        let root = &t.0;
        use EntryType as E;
        apply(
            root,
            &[
                ("etc/", E::Directory, "", 0o755),
                ("etc/passwd", E::Regular, "root:x:0:0::/:/bin/sh\n", 0o644),
                ("etc/shadow", E::Regular, "secret", 0o600),
                ("bin/", E::Directory, "", 0o755),
                ("bin/busybox", E::Regular, "ELF", 0o4755),
                ("bin/sh", E::Symlink, "busybox", 0o777),
                ("bin/ls", E::Link, "bin/busybox", 0o755),
                ("opt/", E::Directory, "", 0o750),
                ("opt/old/", E::Directory, "", 0o755),
                ("opt/old/file", E::Regular, "old", 0o644),
                ("opt/keep/", E::Directory, "", 0o755),
                ("opt/keep/lower", E::Regular, "lower", 0o644),
                ("var/", E::Directory, "", 0o1777),
                ("var/thing", E::Regular, "was a file", 0o644),
            ],
        )
        .unwrap();
        let bb = fs::metadata(root.join("bin/busybox")).unwrap();
        assert_eq!(bb.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(bb.mtime(), 1_000_000);
        if same_owner() {
            assert_eq!((bb.uid(), bb.gid()), (1234, 4321));
        }
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
        assert_eq!(fs::metadata(root.join("bin/ls")).unwrap().ino(), bb.ino());
        let opt = fs::metadata(root.join("opt")).unwrap();
        assert_eq!(opt.permissions().mode() & 0o7777, 0o750);
        assert_eq!(opt.mtime(), 1_000_000);
        assert_eq!(
            fs::metadata(root.join("var")).unwrap().permissions().mode() & 0o7777,
            0o1777
        );

        apply(
            root,
            &[
                ("etc/.wh.shadow", E::Regular, "", 0o644),
                // Entries of this layer before the opaque marker survive it.
                ("opt/keep/", E::Directory, "", 0o755),
                ("opt/keep/new", E::Regular, "new", 0o644),
                ("opt/.wh..wh..opq", E::Regular, "", 0o644),
                ("opt/added", E::Regular, "added", 0o644),
                ("var/thing/", E::Directory, "", 0o700),
                ("bin/sh", E::Regular, "now a file", 0o755),
                ("missing/.wh.nothing", E::Regular, "", 0o644),
                (".wh.nonexistent", E::Regular, "", 0o644),
            ],
        )
        .unwrap();
        assert!(!root.join("etc/shadow").exists());
        assert!(root.join("etc/passwd").exists());
        assert!(!root.join("opt/old").exists());
        assert!(!root.join("opt/keep/lower").exists());
        assert_eq!(
            fs::read_to_string(root.join("opt/keep/new")).unwrap(),
            "new"
        );
        assert_eq!(fs::read_to_string(root.join("opt/added")).unwrap(), "added");
        assert!(root.join("var/thing").is_dir());
        assert!(!fs::symlink_metadata(root.join("bin/sh"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!root.join("missing").exists());
        assert!(!root.join("etc/.wh.shadow").exists());

        // A file replaced by a directory and back, and whiteout of a whole tree.
        apply(
            root,
            &[
                (".wh.opt", E::Regular, "", 0o644),
                ("var/thing", E::Regular, "file again", 0o644),
            ],
        )
        .unwrap();
        assert!(!root.join("opt").exists());
        assert_eq!(
            fs::read_to_string(root.join("var/thing")).unwrap(),
            "file again"
        );
    }

    #[test]
    fn escaping_entries_are_refused() {
        let t = Tmp::new("escape");
        use EntryType as E;
        for bad in [
            vec![("../evil", E::Regular, "x", 0o644)],
            vec![("a/../../evil", E::Regular, "x", 0o644)],
            vec![("link", E::Link, "../../etc/passwd", 0o644)],
        ] {
            // The tar crate refuses to write some of these names; craft them raw.
            let mut data = Vec::new();
            for (name, kind, link, mode) in &bad {
                let mut h = Header::new_old();
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                if *kind == E::Link {
                    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
                    h.set_size(0);
                } else {
                    h.set_size(link.len() as u64);
                }
                h.set_entry_type(*kind);
                h.set_mode(*mode);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                h.set_cksum();
                data.extend_from_slice(h.as_bytes());
                if *kind != E::Link {
                    let mut block = [0u8; 512];
                    block[..link.len()].copy_from_slice(link.as_bytes());
                    data.extend_from_slice(&block);
                }
            }
            data.extend_from_slice(&[0u8; 1024]);
            let err = unpack_layer(&mut data.as_slice(), &t.0, false).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err:?}");
        }
        assert!(!t.0.join("../evil").exists());
    }

    #[test]
    fn copy_out_then_in_round_trips() {
        let src = Tmp::new("src");
        let dst = Tmp::new("dst");
        let tree = src.0.join("tree");
        fs::create_dir_all(tree.join("sub/deeper")).unwrap();
        fs::write(tree.join("a.txt"), "hello").unwrap();
        fs::write(tree.join("sub/deeper/b.bin"), vec![7u8; 100_000]).unwrap();
        fs::set_permissions(tree.join("a.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", tree.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("a.txt", tree.join("rel-link")).unwrap();
        std::os::unix::fs::symlink("/", tree.join("root-link")).unwrap();
        let long_target = format!("/{}", "t".repeat(200));
        std::os::unix::fs::symlink(&long_target, tree.join("long-link")).unwrap();
        let long = "x".repeat(150);
        fs::write(tree.join(&long), "long name").unwrap();

        let mut tarball = Vec::new();
        copy_out(&tree, &mut tarball).unwrap();
        copy_in(
            &mut tarball.as_slice(),
            &dst.0.join("new/place"),
            same_owner(),
        )
        .unwrap();
        let out = dst.0.join("new/place/tree");
        assert_eq!(fs::read_to_string(out.join("a.txt")).unwrap(), "hello");
        assert_eq!(
            fs::metadata(out.join("a.txt"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o640
        );
        assert_eq!(
            fs::read(out.join("sub/deeper/b.bin")).unwrap().len(),
            100_000
        );
        assert_eq!(
            fs::read_link(out.join("abs-link")).unwrap(),
            PathBuf::from("/etc/hostname")
        );
        assert_eq!(
            fs::read_link(out.join("rel-link")).unwrap(),
            PathBuf::from("a.txt")
        );
        assert_eq!(fs::read_to_string(out.join(&long)).unwrap(), "long name");

        // A single file comes out under its own name.
        let mut one = Vec::new();
        copy_out(&tree.join("a.txt"), &mut one).unwrap();
        copy_in(&mut one.as_slice(), &dst.0, same_owner()).unwrap();
        assert_eq!(fs::read_to_string(dst.0.join("a.txt")).unwrap(), "hello");

        let err = copy_out(&tree.join("nope"), Vec::new()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let err = copy_in(&mut one.as_slice(), &tree.join("a.txt"), false).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidArgument);
    }
}
