//! The python stand-in image (Debian packages repacked as a python-like image) built into
//! ext4 and compared, file by file, with `umoci unpack` of the same OCI layout.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The stand-in's OCI layout: `BOXLITE_STANDIN_LAYOUT`, else the repo's cached one, else
/// made (and cached) by the repo's image script.
fn python_layout() -> PathBuf {
    if let Some(p) = std::env::var_os("BOXLITE_STANDIN_LAYOUT") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cached = std::fs::read_dir(repo.join("build/test-images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("python"))
        .find(|p| p.join("index.json").is_file());
    if let Some(layout) = cached {
        return layout;
    }
    let out = Command::new("python3")
        .arg("tests/images/build.py")
        .arg("build/test-images")
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    let dir = if Path::new(&dir).is_absolute() {
        PathBuf::from(dir)
    } else {
        repo.join(dir)
    };
    dir.join("python")
}

#[test]
fn python_standin_matches_umoci() {
    let layout = python_layout();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index = json(&layout.join("index.json"));
    let manifest = json(&blob(index["manifests"][0]["digest"].as_str().unwrap()));
    let layers: Vec<Vec<u8>> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let data = std::fs::read(blob(l["digest"].as_str().unwrap())).unwrap();
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(data.as_slice())
                .read_to_end(&mut out)
                .unwrap();
            out
        })
        .collect();
    let (_dir, image, report) = build(&layers, &boxlite_ext4::BuildOptions::default());
    let report = report.unwrap();
    assert!(report.files > 500, "{report:?}");
    assert_clean(&image);
    let ours = dump_image(&image, true);

    let work = tempfile::tempdir().unwrap();
    let tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or("latest")
        .to_string();
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !is_root() {
        cmd.arg("--rootless");
    }
    let bundle = work.path().join("bundle");
    cmd.arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle);
    let Ok(out) = cmd.output() else {
        eprintln!("umoci is not installed: skipping the comparison");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = dump_dir(&bundle.join("rootfs"), true);
    assert_eq!(ours.len(), theirs.len());
    let mut differ = Vec::new();
    for (k, b) in &theirs {
        let Some(a) = ours.get(k) else {
            differ.push(format!("{k}: missing"));
            continue;
        };
        let mut a = a.clone();
        let mut b = b.clone();
        if !is_root() {
            a.uid = b.uid;
            a.gid = b.gid;
            a.xattrs.retain(|n, _| n.starts_with("user."));
            // Where rootless umoci keeps the owners it could not set.
            b.xattrs.remove("user.rootlesscontainers");
        }
        if a != b {
            differ.push(format!("{k}:\n  ours   {a:?}\n  theirs {b:?}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
