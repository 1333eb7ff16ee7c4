//! Test helpers: layers written with the `tar` crate, images read back with debugfs, and
//! trees read from umoci's output, in one comparable form.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use tar::{EntryType, Header};

/// A layer under construction.
pub struct Layer(pub tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        h
    }

    pub fn dir(mut self, name: &str, mode: u32) -> Self {
        let mut h = Self::header(EntryType::Directory, mode, 0, 0);
        self.0.append_data(&mut h, name, &b""[..]).unwrap();
        self
    }

    pub fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
        self.file_owned(name, data, mode, 0, 0)
    }

    pub fn file_owned(mut self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(EntryType::Regular, mode, uid, gid);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, name, data).unwrap();
        self
    }

    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(EntryType::Symlink, 0o777, 0, 0);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(EntryType::Link, 0o644, 0, 0);
        self.0.append_link(&mut h, name, target).unwrap();
        self
    }

    pub fn node(mut self, name: &str, kind: EntryType, major: u32, minor: u32, mode: u32) -> Self {
        let mut h = Self::header(kind, mode, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, name, &b""[..]).unwrap();
        self
    }

    pub fn whiteout(self, name: &str) -> Self {
        self.file(name, b"", 0o644)
    }

    /// PAX records for the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.0
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    /// Raw bytes appended as is (headers crafted by hand).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.get_mut().extend_from_slice(bytes);
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A 512-byte old-style header with any name and link name (the `tar` crate refuses `..`).
pub fn raw_header(name: &[u8], kind: EntryType, link: &[u8], size: u64) -> Vec<u8> {
    let mut h = Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h.as_bytes().to_vec()
}

pub fn padded(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(512) * 512, 0);
    v
}

/// Builds an image from `layers` into a fresh temp dir.
pub fn build(
    layers: &[Vec<u8>],
    opts: &boxlite_ext4::BuildOptions,
) -> (
    tempfile::TempDir,
    PathBuf,
    Result<boxlite_ext4::BuildReport, boxlite_ext4::Ext4Error>,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.ext4");
    let out = fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let r = boxlite_ext4::build(layers.iter().map(|l| l.as_slice()), &out, opts);
    (dir, path, r)
}

pub fn fsck(image: &Path) -> (i32, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

pub fn assert_clean(image: &Path) {
    let (code, text) = fsck(image);
    assert_eq!(code, 0, "e2fsck -fn found problems:\n{text}");
}

/// Runs debugfs commands (one process) and returns stdout.
pub fn debugfs(image: &Path, cmds: &[String]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cmds");
    fs::write(&script, cmds.join("\n") + "\n").unwrap();
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(&script)
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One file's state, as compared between images and umoci's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// `d`, `f`, `l`, `c`, `b`, `p`.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: Vec<u8>,
    pub target: Vec<u8>,
    pub rdev: (u32, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Other names of the same inode (hard links), sorted, self included; empty if one.
    pub links: Vec<String>,
}

pub type Dump = BTreeMap<String, Item>;

fn kind_of(mode: u32) -> char {
    match mode & 0o170000 {
        0o040000 => 'd',
        0o100000 => 'f',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        _ => '?',
    }
}

fn quote(p: &str) -> String {
    format!("\"{}\"", p)
}

/// The whole tree of an image, through debugfs only.
pub fn dump_image(image: &Path, with_xattrs: bool) -> Dump {
    let scratch = tempfile::tempdir().unwrap();
    let mut out = Dump::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut level = vec![String::new()];
    let mut regular = Vec::new();
    let mut symlinks = Vec::new();
    let mut devices = Vec::new();
    while !level.is_empty() {
        let cmds: Vec<String> = level
            .iter()
            .map(|d| format!("ls -p {}", quote(&format!("/{d}"))))
            .collect();
        let text = debugfs(image, &cmds);
        let mut next = Vec::new();
        let mut current = level.iter();
        let mut dir = String::new();
        for line in text.lines() {
            let parts: Vec<&str> = line.split('/').collect();
            if parts.len() < 7 || !parts[0].is_empty() {
                continue;
            }
            let (ino, mode, uid, gid, name) = (parts[1], parts[2], parts[3], parts[4], parts[5]);
            if name == "." {
                dir = current.next().cloned().unwrap_or_default();
                continue;
            }
            if name == ".." {
                continue;
            }
            let mode = u32::from_str_radix(mode, 8).unwrap();
            let path = if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            };
            let kind = kind_of(mode);
            let ino: u64 = ino.parse().unwrap();
            match kind {
                'd' => next.push(path.clone()),
                'f' => {
                    inodes.entry(ino).or_default().push(path.clone());
                    regular.push(path.clone());
                }
                'l' => symlinks.push(path.clone()),
                'c' | 'b' => devices.push(path.clone()),
                _ => {}
            }
            out.insert(
                path,
                Item {
                    kind,
                    mode: mode & 0o7777,
                    // debugfs prints ids with %d.
                    uid: uid.parse::<i64>().unwrap() as u32,
                    gid: gid.parse::<i64>().unwrap() as u32,
                    content: Vec::new(),
                    target: Vec::new(),
                    rdev: (0, 0),
                    xattrs: BTreeMap::new(),
                    links: Vec::new(),
                },
            );
        }
        level = next;
    }
    // Contents of regular files and long symlinks.
    let mut cmds = Vec::new();
    for (i, p) in regular.iter().enumerate() {
        cmds.push(format!(
            "dump {} {}",
            quote(&format!("/{p}")),
            scratch.path().join(format!("f{i}")).display()
        ));
    }
    let stat_cmds: Vec<String> = symlinks
        .iter()
        .chain(&devices)
        .map(|p| format!("stat {}", quote(&format!("/{p}"))))
        .collect();
    for (i, p) in symlinks.iter().enumerate() {
        cmds.push(format!(
            "dump {} {}",
            quote(&format!("/{p}")),
            scratch.path().join(format!("l{i}")).display()
        ));
    }
    debugfs(image, &cmds);
    for (i, p) in regular.iter().enumerate() {
        out.get_mut(p).unwrap().content =
            fs::read(scratch.path().join(format!("f{i}"))).unwrap_or_default();
    }
    let stats = debugfs(image, &stat_cmds);
    let mut blocks = stats.split("Inode: ").skip(1);
    for (i, p) in symlinks.iter().enumerate() {
        let block = blocks.next().unwrap_or("");
        let item = out.get_mut(p).unwrap();
        if let Some(line) = block.lines().find(|l| l.starts_with("Fast link dest: ")) {
            let t = line.trim_start_matches("Fast link dest: ");
            item.target = t.as_bytes()[1..t.len() - 1].to_vec();
        } else {
            let size: usize = block
                .split("Size: ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut data = fs::read(scratch.path().join(format!("l{i}"))).unwrap_or_default();
            data.truncate(size);
            item.target = data;
        }
    }
    for p in &devices {
        let block = blocks.next().unwrap_or("");
        let dev = block
            .lines()
            .find(|l| l.contains("Device major/minor number:"))
            .unwrap_or("");
        // "Device major/minor number: 01:03 (hex 01:03)"
        let nums = dev.split("number:").nth(1).unwrap_or("").trim();
        let mm = nums.split_whitespace().next().unwrap_or("0:0");
        let (a, b) = mm.split_once(':').unwrap_or(("0", "0"));
        out.get_mut(p).unwrap().rdev = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
    }
    if with_xattrs {
        let names: Vec<String> = out.keys().cloned().collect();
        let cmds: Vec<String> = names
            .iter()
            .map(|p| format!("ea_list {}", quote(&format!("/{p}"))))
            .collect();
        let text = debugfs(image, &cmds);
        let mut wanted = Vec::new();
        for (section, p) in text.split("debugfs: ea_list").skip(1).zip(&names) {
            for line in section.lines().skip(1) {
                let Some(rest) = line.strip_prefix("  ") else {
                    continue;
                };
                let Some((name, _)) = rest.split_once(" (") else {
                    continue;
                };
                wanted.push((p.clone(), name.to_string()));
            }
        }
        let cmds: Vec<String> = wanted
            .iter()
            .enumerate()
            .map(|(i, (p, n))| {
                format!(
                    "ea_get -f {} {} {}",
                    scratch.path().join(format!("x{i}")).display(),
                    quote(&format!("/{p}")),
                    n
                )
            })
            .collect();
        debugfs(image, &cmds);
        for (i, (p, n)) in wanted.iter().enumerate() {
            let v = fs::read(scratch.path().join(format!("x{i}"))).unwrap_or_default();
            out.get_mut(p).unwrap().xattrs.insert(n.clone(), v);
        }
    }
    for paths in inodes.values().filter(|v| v.len() > 1) {
        let mut sorted = paths.clone();
        sorted.sort();
        for p in paths {
            out.get_mut(p).unwrap().links = sorted.clone();
        }
    }
    out
}

/// The same view of a directory tree on the host (umoci's rootfs).
pub fn dump_dir(root: &Path, with_xattrs: bool) -> Dump {
    let mut out = Dump::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let m = fs::symlink_metadata(&path).unwrap();
            let ft = m.file_type();
            let kind = kind_of(m.mode());
            let mut item = Item {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                content: Vec::new(),
                target: Vec::new(),
                rdev: (0, 0),
                xattrs: BTreeMap::new(),
                links: Vec::new(),
            };
            if ft.is_dir() {
                stack.push(path.clone());
            } else if ft.is_file() {
                item.content = fs::read(&path).unwrap();
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
            } else if ft.is_symlink() {
                item.target = fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec();
            } else if ft.is_char_device() || ft.is_block_device() {
                item.rdev = (libc::major(m.rdev()), libc::minor(m.rdev()));
            }
            if with_xattrs {
                item.xattrs = host_xattrs(&path);
            }
            out.insert(rel, item);
        }
    }
    for paths in inodes.values().filter(|v| v.len() > 1) {
        let mut sorted = paths.clone();
        sorted.sort();
        for p in paths {
            out.get_mut(p).unwrap().links = sorted.clone();
        }
    }
    out
}

fn host_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: buffers we own, sizes passed along.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if n <= 0 {
        return out;
    }
    for name in names[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    out
}

/// Writes `layers` as an OCI image layout (uncompressed layers) for umoci.
pub fn oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    use std::fmt::Write as _;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let digest = sha256_hex(data);
        fs::write(blobs.join(&digest), data).unwrap();
        (digest, data.len())
    };
    let mut diff_ids = String::new();
    let mut layer_json = String::new();
    for (i, l) in layers.iter().enumerate() {
        let (d, size) = put(l);
        let sep = if i > 0 { "," } else { "" };
        write!(diff_ids, "{sep}\"sha256:{d}\"").unwrap();
        write!(layer_json, "{sep}{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:{d}\",\"size\":{size}}}").unwrap();
    }
    let config = format!(
        "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[{diff_ids}]}}}}"
    );
    let (cd, cs) = put(config.as_bytes());
    let manifest = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:{cd}\",\"size\":{cs}}},\"layers\":[{layer_json}]}}"
    );
    let (md, ms) = put(manifest.as_bytes());
    fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}").unwrap();
    fs::write(
        dir.join("index.json"),
        format!("{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:{md}\",\"size\":{ms},\"annotations\":{{\"org.opencontainers.image.ref.name\":\"latest\"}}}}]}}"),
    )
    .unwrap();
}

/// `sha256sum` of bytes (the test machine has coreutils; no hashing crate needed).
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `umoci unpack` of the layout; `None` when umoci is not installed.
pub fn umoci_unpack(layout: &Path, bundle: &Path) -> Option<PathBuf> {
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !is_root() {
        cmd.arg("--rootless");
    }
    cmd.arg("--image")
        .arg(format!("{}:latest", layout.display()))
        .arg(bundle);
    match cmd.output() {
        Ok(o) if o.status.success() => Some(bundle.join("rootfs")),
        Ok(o) => panic!("umoci failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(_) => None,
    }
}
