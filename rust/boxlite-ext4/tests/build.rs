#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::Path;

use boxlite_ext4::{BuildOptions, Ext4Error};
use common::*;
use tar::EntryType;

const CAP: &[u8] = &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// Three layers exercising every OCI case umoci and the guest's tarfs handle.
fn semantic_layers() -> Vec<Vec<u8>> {
    let long_dir = format!("deep/{}", "d".repeat(120));
    let long_file = format!("{long_dir}/{}", "f".repeat(200));
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut many = Layer::new().dir("./many/", 0o755);
    for i in 0..3000 {
        many = many.file(
            &format!("many/entry-with-a-longish-name-{i:05}"),
            format!("{i}").as_bytes(),
            0o644,
        );
    }
    let l1 = many
        .dir("./", 0o755)
        .dir("./etc/", 0o755)
        .file("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .file("etc/shadow", b"secret", 0o600)
        .dir("usr/", 0o755)
        .dir("usr/lib/", 0o755)
        .symlink("lib", "usr/lib")
        .dir("bin/", 0o755)
        .file("bin/busybox", &big, 0o4755)
        .file("bin/sgid", b"sgid", 0o2711)
        .symlink("bin/sh", "busybox")
        .symlink("bin/long", &format!("/{}", "t".repeat(100)))
        .hardlink("bin/ls", "bin/busybox")
        .dir("tmp/", 0o1777)
        .file_owned("home/owned", b"mine", 0o640, 1234, 4321)
        .pax(&[("uid", b"4000000000"), ("gid", b"3000000000")])
        .file("home/bigids", b"big ids", 0o644)
        .pax(&[
            ("SCHILY.xattr.user.note", b"hello"),
            ("SCHILY.xattr.security.capability", CAP),
        ])
        .file("bin/ping", b"ping", 0o755)
        .pax(&[
            ("SCHILY.xattr.trusted.overlay", b"y"),
            ("SCHILY.xattr.user.dir", b"d"),
        ])
        .dir("xdir/", 0o750)
        .node("dev/null", EntryType::Char, 1, 3, 0o666)
        .node("dev/sda", EntryType::Block, 8, 0, 0o660)
        .node("dev/big", EntryType::Char, 300, 70000, 0o600)
        .node("run/fifo", EntryType::Fifo, 0, 0, 0o644)
        .file(&long_file, b"long name", 0o644)
        .dir("opt/", 0o755)
        .dir("opt/old/", 0o755)
        .file("opt/old/file", b"old", 0o644)
        .dir("opt/keep/", 0o755)
        .file("opt/keep/lower", b"lower", 0o644)
        .file("var/thing", b"was a file", 0o644)
        .dir("var/dir/", 0o755)
        .file("var/dir/inside", b"inside", 0o644)
        .file("dup", b"first", 0o644)
        .file("dup", b"second", 0o600)
        .file("empty", b"", 0o644)
        .pax(&[("path", b"pax/named-by-pax")])
        .file("pax/short", b"pax path", 0o644)
        .pax(&[("linkpath", b"../named-by-pax")])
        .symlink("pax/link", "ignored")
        .finish();
    let l2 = Layer::new()
        .whiteout("etc/.wh.shadow")
        .dir("opt/keep/", 0o755)
        .file("opt/keep/new", b"new", 0o644)
        .whiteout("opt/.wh..wh..opq")
        .file("opt/added", b"added", 0o644)
        .dir("var/thing/", 0o700)
        .file("var/dir", b"now a file", 0o644)
        .file("bin/sh", b"now a file", 0o755)
        .file("lib/through-symlink.so", b"via lib", 0o755)
        .hardlink("bin/ls2", "bin/busybox")
        .whiteout("missing/.wh.nothing")
        .whiteout(".wh.nonexistent")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/bash\n", 0o644)
        .finish();
    let l3 = Layer::new()
        .whiteout(".wh.tmp")
        .whiteout("many/.wh.entry-with-a-longish-name-00007")
        .file("var/thing", b"file again", 0o644)
        .dir("xdir/", 0o755)
        .finish();
    vec![l1, l2, l3]
}

#[test]
fn semantics_match_umoci() {
    let layers = semantic_layers();
    let (dir, image, report) = build(&layers, &BuildOptions::default());
    let report = report.unwrap();
    assert_clean(&image);
    assert!(report.files > 3000, "{report:?}");
    let root = is_root();
    let ours = dump_image(&image, true);

    let work = tempfile::tempdir().unwrap();
    oci_layout(&work.path().join("layout"), &layers);
    let Some(rootfs) = umoci_unpack(&work.path().join("layout"), &work.path().join("bundle"))
    else {
        eprintln!("umoci is not installed: comparing with the expected tree only");
        return;
    };
    let theirs = dump_dir(&rootfs, true);
    assert!(theirs.len() > 3000 && ours.len() > 3000);
    let keys: Vec<&String> = ours.keys().chain(theirs.keys()).collect();
    let mut differ = Vec::new();
    for k in keys {
        let (a, b) = (ours.get(k), theirs.get(k));
        let (Some(a), Some(b)) = (a, b) else {
            differ.push(format!(
                "{k}: ours {:?} theirs {:?}",
                a.map(|i| i.kind),
                b.map(|i| i.kind)
            ));
            continue;
        };
        let mut a = a.clone();
        let mut b = b.clone();
        if !root {
            // Rootless umoci: no owners, no device nodes, only user.* xattrs.
            if a.kind == 'c' || a.kind == 'b' {
                continue;
            }
            a.uid = b.uid;
            a.gid = b.gid;
            a.xattrs.retain(|n, _| n.starts_with("user."));
            // Where rootless umoci keeps the owners it could not set.
            b.xattrs.remove("user.rootlesscontainers");
        }
        b.xattrs.retain(|n, _| !n.starts_with("security.selinux"));
        if a != b {
            differ.push(format!("{k}:\n  ours   {a:?}\n  theirs {b:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} differences:\n{}",
        differ.len(),
        differ.join("\n")
    );

    // Spot checks that the layers exercised what they should.
    assert!(!ours.contains_key("etc/shadow") && !ours.contains_key("opt/old"));
    assert!(!ours.contains_key("opt/keep/lower") && ours.contains_key("opt/keep/new"));
    assert!(
        !ours.contains_key("tmp") && !ours.contains_key("many/entry-with-a-longish-name-00007")
    );
    assert_eq!(ours["usr/lib/through-symlink.so"].content, b"via lib");
    assert_eq!(ours["lib"].kind, 'l');
    assert_eq!(
        ours["bin/ls"].links,
        vec!["bin/busybox", "bin/ls", "bin/ls2"]
    );
    assert_eq!(ours["bin/busybox"].mode, 0o4755);
    assert_eq!(ours["bin/sgid"].mode, 0o2711);
    assert_eq!(ours["dup"].content, b"second");
    assert_eq!(ours["var/thing"].content, b"file again");
    assert_eq!(ours["var/dir"].kind, 'f');
    assert_eq!(ours["xdir"].mode, 0o755);
    assert_eq!(
        (ours["home/bigids"].uid, ours["home/bigids"].gid),
        (4_000_000_000, 3_000_000_000)
    );
    assert_eq!(ours["bin/ping"].xattrs["security.capability"], CAP);
    assert_eq!(ours["dev/big"].rdev, (300, 70000));
    assert_eq!(ours["pax/named-by-pax"].content, b"pax path");
    assert_eq!(ours["pax/link"].target, b"../named-by-pax");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn debugfs_sees_what_the_layers_say() {
    let (_dir, image, report) = build(&semantic_layers(), &BuildOptions::default());
    report.unwrap();
    let out = debugfs(
        &image,
        &[
            "stat /bin/busybox".into(),
            "ls -l /bin".into(),
            "cat /etc/passwd".into(),
            "ea_list /bin/ping".into(),
            "stat /dev/null".into(),
            "stat /home/owned".into(),
        ],
    );
    assert!(out.contains("Mode:  04755"), "{out}");
    assert!(out.contains("Links: 3"), "{out}");
    assert!(out.contains("root:x:0:0::/root:/bin/bash"), "{out}");
    assert!(out.contains("user.note (5) = \"hello\""), "{out}");
    assert!(out.contains("security.capability (20)"), "{out}");
    assert!(out.contains("Device major/minor number: 01:03"), "{out}");
    assert!(out.contains("User:  1234   Group:  4321"), "{out}");
    for name in ["busybox", "ls2", "ping", "sgid", "long"] {
        assert!(out.contains(name), "{name} missing from ls:\n{out}");
    }
}

/// Builds hostile input; asserts the typed error and that only the image was written.
fn hostile(
    layers: Vec<Vec<u8>>,
    opts: BuildOptions,
) -> Result<boxlite_ext4::BuildReport, Ext4Error> {
    let (dir, image, r) = build(&layers, &opts);
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("image.ext4")]);
    if r.is_ok() {
        assert_clean(&image);
    }
    r
}

/// (name, type, link name, data) of a hand-made entry.
type RawEntry<'a> = (&'a [u8], EntryType, &'a [u8], &'a [u8]);

fn raw_layer(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        out.extend(raw_header(name, *kind, link, data.len() as u64));
        out.extend(padded(data));
    }
    out.extend([0u8; 1024]);
    out
}

#[test]
fn escaping_names_are_refused() {
    let cases: Vec<Vec<u8>> = vec![
        raw_layer(&[(b"../evil", EntryType::Regular, b"", b"x")]),
        raw_layer(&[(b"a/../../evil", EntryType::Regular, b"", b"x")]),
        raw_layer(&[(b"/etc/passwd", EntryType::Regular, b"", b"x")]),
        raw_layer(&[(b"link", EntryType::Link, b"../../etc/passwd", b"")]),
        raw_layer(&[(b"link", EntryType::Link, b"/etc/passwd", b"")]),
        raw_layer(&[(b"link", EntryType::Link, b"missing", b"")]),
        raw_layer(&[
            (b"d/", EntryType::Directory, b"", b""),
            (b"link", EntryType::Link, b"d", b""),
        ]),
        raw_layer(&[
            (b"f", EntryType::Regular, b"", b"x"),
            (b"f/x", EntryType::Regular, b"", b"x"),
        ]),
        raw_layer(&[
            (b"a", EntryType::Symlink, b"b", b""),
            (b"b", EntryType::Symlink, b"a", b""),
            (b"a/x", EntryType::Regular, b"", b"x"),
        ]),
        raw_layer(&[
            (b"dangling", EntryType::Symlink, b"nowhere/deeper", b""),
            (b"dangling/x", EntryType::Regular, b"", b"x"),
        ]),
        raw_layer(&[(b"s", EntryType::Symlink, b"", b"")]),
        Layer::new()
            .pax(&[("path", b"a\0b")])
            .file("x", b"x", 0o644)
            .finish(),
    ];
    for (i, layer) in cases.into_iter().enumerate() {
        let err = hostile(vec![layer], BuildOptions::default()).unwrap_err();
        assert!(
            matches!(err, Ext4Error::Entry { layer: 0, .. }),
            "case {i}: {err:?}"
        );
    }
}

#[test]
fn symlinks_never_leave_the_image() {
    let marker = format!("boxlite-ext4-escape-{}", std::process::id());
    let layer = raw_layer(&[
        (b"tmp/", EntryType::Directory, b"", b""),
        (b"up", EntryType::Symlink, b"../../../../../../tmp", b""),
        (b"abs", EntryType::Symlink, b"/tmp", b""),
        (
            format!("up/{marker}").as_bytes(),
            EntryType::Regular,
            b"",
            b"one",
        ),
        (
            format!("abs/{marker}-2").as_bytes(),
            EntryType::Regular,
            b"",
            b"two",
        ),
        (b"etc-link", EntryType::Symlink, b"/etc", b""),
        (b"hl", EntryType::Link, b"etc-link", b""),
    ]);
    let (dir, image, r) = build(&[layer], &BuildOptions::default());
    r.unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(!Path::new("/tmp").join(&marker).exists());
    assert_clean(&image);
    let tree = dump_image(&image, false);
    assert_eq!(tree[&format!("tmp/{marker}")].content, b"one");
    assert_eq!(tree[&format!("tmp/{marker}-2")].content, b"two");
    // A hard link to a symlink links the symlink itself.
    assert_eq!(tree["hl"].kind, 'l');
    assert_eq!(tree["hl"].target, b"/etc");
}

#[test]
fn short_huge_and_truncated_entries_are_typed_errors() {
    // 1 GiB declared, 10 bytes present.
    let mut huge = raw_header(b"huge", EntryType::Regular, b"", 1 << 30);
    huge.extend(padded(b"0123456789"));
    let err = hostile(vec![huge.clone()], BuildOptions::default()).unwrap_err();
    assert!(matches!(err, Ext4Error::Truncated { .. }), "{err:?}");
    let small = BuildOptions {
        size: Some(64 << 20),
        ..Default::default()
    };
    let err = hostile(vec![huge], small).unwrap_err();
    assert!(matches!(err, Ext4Error::NoSpace { .. }), "{err:?}");

    let full = Layer::new()
        .file("a", &[7u8; 5000], 0o644)
        .file("b", b"b", 0o644)
        .finish();
    for cut in [100, 700, 3000, 6000] {
        let err = hostile(vec![full[..cut].to_vec()], BuildOptions::default()).unwrap_err();
        assert!(
            matches!(err, Ext4Error::Truncated { .. }),
            "cut {cut}: {err:?}"
        );
    }
    let mut bad_sum = full.clone();
    bad_sum[0] ^= 1;
    let err = hostile(vec![bad_sum], BuildOptions::default()).unwrap_err();
    assert!(matches!(err, Ext4Error::Tar { .. }), "{err:?}");
    // A PAX header claiming 2 GiB of records.
    let mut pax = raw_header(b"PaxHeader", EntryType::XHeader, b"", 2 << 30);
    pax.extend([0u8; 512]);
    let err = hostile(vec![pax], BuildOptions::default()).unwrap_err();
    assert!(matches!(err, Ext4Error::Tar { .. }), "{err:?}");
    let sparse = Layer::new()
        .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
        .file("s", b"x", 0o644)
        .finish();
    let err = hostile(vec![sparse], BuildOptions::default()).unwrap_err();
    assert!(matches!(err, Ext4Error::Unsupported { .. }), "{err:?}");
}

#[test]
fn whiteouts_of_the_root() {
    let lower = Layer::new()
        .file("a", b"a", 0o644)
        .dir("d/", 0o755)
        .file("d/x", b"x", 0o644)
        .finish();
    let upper = Layer::new()
        .file("kept", b"kept", 0o644)
        .whiteout(".wh..wh..opq")
        .whiteout(".wh.")
        .whiteout("./.wh..")
        .whiteout(".wh..wh.plnk")
        .file("after", b"after", 0o644)
        .finish();
    let report = hostile(vec![lower, upper], BuildOptions::default()).unwrap();
    assert_eq!(report.dirs, 1);
    let (_d, image, _) = build(
        &[
            Layer::new().file("a", b"a", 0o644).finish(),
            Layer::new()
                .whiteout(".wh..wh..opq")
                .file("kept", b"k", 0o644)
                .finish(),
        ],
        &BuildOptions::default(),
    );
    let tree = dump_image(&image, false);
    assert_eq!(tree.keys().collect::<Vec<_>>(), vec!["kept"]);
}

/// An old-GNU sparse entry: data segments with holes between (10 extents: a tree block).
fn gnu_sparse(name: &str, segments: &[(u64, &[u8])], real: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    let stored: u64 = segments.iter().map(|(_, d)| d.len() as u64).sum();
    h.set_size(stored);
    let octal = |field: &mut [u8], v: u64| {
        let s = format!("{:0width$o}", v, width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    };
    octal(&mut h.as_gnu_mut().unwrap().realsize, real);
    let mut ext_blocks: Vec<tar::GnuExtSparseHeader> = Vec::new();
    for (i, (off, data)) in segments.iter().enumerate() {
        let slot = if i < 4 {
            &mut h.as_gnu_mut().unwrap().sparse[i]
        } else {
            let j = (i - 4) % 21;
            if j == 0 {
                ext_blocks.push(tar::GnuExtSparseHeader::new());
            }
            &mut ext_blocks.last_mut().unwrap().sparse[j]
        };
        octal(&mut slot.offset, *off);
        octal(&mut slot.numbytes, data.len() as u64);
    }
    if !ext_blocks.is_empty() {
        h.as_gnu_mut().unwrap().isextended[0] = 1;
        let n = ext_blocks.len();
        for (k, b) in ext_blocks.iter_mut().enumerate() {
            b.isextended[0] = u8::from(k + 1 < n);
        }
    }
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    for b in &ext_blocks {
        out.extend_from_slice(b.as_bytes());
    }
    let data: Vec<u8> = segments.iter().flat_map(|(_, d)| d.to_vec()).collect();
    out.extend(padded(&data));
    out
}

#[test]
fn gnu_sparse_files_keep_their_holes() {
    let chunk = vec![0xABu8; 4096];
    let segments: Vec<(u64, &[u8])> = (0..10u64).map(|i| (i * 1_048_576, &chunk[..])).collect();
    let real = 10 * 1_048_576 + 5;
    let mut layer = gnu_sparse("sparse", &segments, real);
    layer.extend(raw_header(b"after", EntryType::Regular, b"", 5));
    layer.extend(padded(b"after"));
    layer.extend([0u8; 1024]);
    let (_dir, image, r) = build(&[layer], &BuildOptions::default());
    r.unwrap();
    assert_clean(&image);
    let tree = dump_image(&image, false);
    let content = &tree["sparse"].content;
    assert_eq!(content.len() as u64, real);
    let mut expected = vec![0u8; real as usize];
    for (off, d) in &segments {
        expected[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    assert!(content == &expected);
    assert_eq!(tree["after"].content, b"after");
    let stat = debugfs(&image, &["stat /sparse".into()]);
    // 10 data blocks and one extent tree block.
    assert!(stat.contains("Blockcount: 88"), "{stat}");
}

#[test]
fn acls_and_shared_xattr_blocks() {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 7u16, 0u32),
        (2, 5, 1000),
        (4, 5, 0),
        (0x10, 5, 0),
        (0x20, 0, 0),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let big = vec![b'v'; 1500];
    let mut l = Layer::new()
        .pax(&[("SCHILY.xattr.system.posix_acl_access", &acl)])
        .file("acl", b"x", 0o600);
    for i in 0..3 {
        l = l
            .pax(&[("SCHILY.xattr.user.big", &big[..])])
            .file(&format!("shared{i}"), b"s", 0o644);
    }
    let (_dir, image, r) = build(&[l.finish()], &BuildOptions::default());
    r.unwrap();
    assert_clean(&image);
    let out = debugfs(
        &image,
        &[
            "ea_list /acl".into(),
            "stat /acl".into(),
            "stat /shared0".into(),
            "stat /shared2".into(),
        ],
    );
    assert!(out.contains("system.posix_acl_access"), "{out}");
    assert!(out.contains("Mode:  0750"), "{out}");
    let acls: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("File ACL: "))
        .collect();
    assert_eq!(acls[1], acls[2], "{out}");
    assert_ne!(acls[1], "File ACL: 0");
    let tree = dump_image(&image, true);
    assert_eq!(tree["shared1"].xattrs["user.big"], big);
    let too_big = Layer::new()
        .pax(&[("SCHILY.xattr.user.huge", &vec![1u8; 5000][..])])
        .file("h", b"h", 0o644)
        .finish();
    let err = hostile(vec![too_big], BuildOptions::default()).unwrap_err();
    assert!(matches!(err, Ext4Error::Entry { .. }), "{err:?}");
}

#[test]
fn sizes_and_growth() {
    let layers = semantic_layers();
    let sized = BuildOptions {
        size: Some(300 << 20),
        label: Some("boxlite-root".into()),
    };
    let (dir, image, r) = build(&layers, &sized);
    let report = r.unwrap();
    assert_eq!(report.image_size, 300 << 20);
    assert_clean(&image);
    let sb = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(&image)
        .output()
        .unwrap();
    let sb = String::from_utf8_lossy(&sb.stdout);
    for feature in [
        "has_journal",
        "resize_inode",
        "flex_bg",
        "metadata_csum",
        "64bit",
        "extent",
    ] {
        assert!(sb.contains(feature), "{feature} missing:\n{sb}");
    }
    assert!(sb.contains("boxlite-root"));
    assert!(!dump_image(&image, false).contains_key("lost+found"));

    // Offline growth as a proxy for the guest's online EXT4_IOC_RESIZE_FS: 4x, then past
    // 64 groups (a second descriptor block, taken from the reserved GDT blocks).
    for (name, size) in [("x4", 4 * report.image_size), ("10g", 10u64 << 30)] {
        let grown = dir.path().join(name);
        std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&image)
            .arg(&grown)
            .status()
            .unwrap();
        fs::File::options()
            .write(true)
            .open(&grown)
            .unwrap()
            .set_len(size)
            .unwrap();
        let out = std::process::Command::new("resize2fs")
            .arg(&grown)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_clean(&grown);
        let tree = dump_image(&grown, false);
        assert_eq!(tree["etc/passwd"].content, b"root:x:0:0::/root:/bin/bash\n");
        fs::remove_file(&grown).unwrap();
    }

    let tiny = BuildOptions {
        size: Some(8 << 20),
        ..Default::default()
    };
    let err = build(&layers, &tiny).2.unwrap_err();
    assert!(matches!(err, Ext4Error::NoSpace { .. }), "{err:?}");
}

#[test]
fn an_empty_image_is_valid() {
    let (_d, image, r) = build(&[], &BuildOptions::default());
    let report = r.unwrap();
    assert_eq!(report.image_size, 64 << 20);
    assert_clean(&image);
}
