#!/usr/bin/env python3
"""Build a tiny, reproducible OCI image layout holding a busybox image.

    images/busybox_layout.py OUT_DIR [--tag latest] [--busybox /bin/busybox]

The image has one gzip layer: the static busybox binary (Debian's busybox-static) at
/bin/busybox, a symlink to it for every applet, a few users and groups (root, nobody,
app 1000:1000 with supplementary group extra 2000) and the usual empty directories.
Tests use it as a small, offline stand-in for busybox/alpine images: push it to a local
registry (skopeo copy oci:OUT_DIR:TAG docker://...) or read the layout directly.

Same inputs give byte-identical blobs and so identical digests: fixed mtimes, sorted
entries, fixed owners and names, gzip without timestamp or file name. Prints the
manifest digest on stdout. Python standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
app:x:1000:app
extra:x:2000:app
nogroup:x:65534:
"""
# uid/gid -> name written into the tar headers (only ids that own files here).
NAMES = {0: "root", 1000: "app"}

# Directories: path -> (mode, uid, gid). Parents of every file must be listed too.
DIRS = {
    "bin": (0o755, 0, 0),
    "dev": (0o755, 0, 0),
    "etc": (0o755, 0, 0),
    "home": (0o755, 0, 0),
    "home/app": (0o755, 1000, 1000),
    "proc": (0o555, 0, 0),
    "root": (0o700, 0, 0),
    "sbin": (0o755, 0, 0),
    "sys": (0o555, 0, 0),
    "tmp": (0o1777, 0, 0),
    "usr": (0o755, 0, 0),
    "usr/bin": (0o755, 0, 0),
    "usr/sbin": (0o755, 0, 0),
}

# ELF e_machine -> OCI architecture.
ELF_ARCH = {62: "amd64", 183: "arm64"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def elf_arch(data: bytes) -> str:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        sys.exit("busybox_layout: the busybox binary is not a 64-bit ELF file")
    machine = int.from_bytes(data[18:20], "little")
    if machine not in ELF_ARCH:
        sys.exit(f"busybox_layout: unsupported ELF machine {machine}")
    return ELF_ARCH[machine]


def applet_paths(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout
    paths = set()
    for line in out.split():
        # Only the usual bin directories: skips /linuxrc (an initrd-only applet) and
        # bin/busybox itself, which must stay the real binary.
        if line.split("/", 1)[0] in ("bin", "sbin", "usr") and line != "bin/busybox":
            paths.add(line)
    if "bin/sh" not in paths:
        sys.exit("busybox_layout: this busybox has no sh applet")
    return sorted(paths)


def build_layer(busybox_bytes: bytes, applets: list[str]) -> bytes:
    """The uncompressed layer tar."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name, kind, mode, uid=0, gid=0, data=None, target=""):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname, info.gname = NAMES.get(uid, ""), NAMES.get(gid, "")
        info.mtime = 0
        info.linkname = target
        info.size = len(data) if data is not None else 0
        entries.append((info, data))

    for path, (mode, uid, gid) in DIRS.items():
        add(path, tarfile.DIRTYPE, mode, uid, gid)
    add("bin/busybox", tarfile.REGTYPE, 0o755, data=busybox_bytes)
    add("etc/passwd", tarfile.REGTYPE, 0o644, data=PASSWD.encode())
    add("etc/group", tarfile.REGTYPE, 0o644, data=GROUP.encode())
    for path in applets:
        parent = path.rsplit("/", 1)[0]
        if parent not in DIRS:
            sys.exit(f"busybox_layout: applet {path} is in a directory the image lacks")
        add(path, tarfile.SYMTYPE, 0o777, target="/bin/busybox")

    # Parents sort before children when comparing path components.
    entries.sort(key=lambda e: e[0].name.split("/"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything run-specific.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def write_blob(out_dir: str, data: bytes) -> dict:
    digest = sha256(data)
    path = os.path.join(out_dir, "blobs", "sha256", digest.split(":", 1)[1])
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return {"digest": digest, "size": len(data)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="OCI layout directory (created; other tags in it are kept)")
    ap.add_argument("--tag", default="latest", help="ref name in index.json (default: latest)")
    ap.add_argument("--busybox", default="/bin/busybox", help="static busybox binary (default: /bin/busybox)")
    args = ap.parse_args()

    with open(args.busybox, "rb") as f:
        busybox_bytes = f.read()
    arch = elf_arch(busybox_bytes)
    applets = applet_paths(args.busybox)

    layer_tar = build_layer(busybox_bytes, applets)
    layer_gz = gzip_bytes(layer_tar)
    config = {
        "architecture": arch,
        "os": "linux",
        "created": EPOCH,
        "config": {"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        "history": [{"created": EPOCH, "created_by": "images/busybox_layout.py"}],
    }

    out = args.out_dir
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    layer_desc = {"mediaType": MT_LAYER, **write_blob(out, layer_gz)}
    config_desc = {"mediaType": MT_CONFIG, **write_blob(out, canonical_json(config))}
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": [layer_desc]}
    manifest_desc = {
        "mediaType": MT_MANIFEST,
        **write_blob(out, canonical_json(manifest)),
        "platform": {"architecture": arch, "os": "linux"},
        "annotations": {REF_NAME: args.tag},
    }

    # Keep other tags already in the layout; this tag now points at the new manifest.
    index_path = os.path.join(out, "index.json")
    manifests = []
    if os.path.exists(index_path):
        with open(index_path) as f:
            old = json.load(f).get("manifests", [])
        manifests = [m for m in old if m.get("annotations", {}).get(REF_NAME) != args.tag]
    manifests.append(manifest_desc)
    manifests.sort(key=lambda m: (m.get("annotations", {}).get(REF_NAME, ""), m["digest"]))
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}

    for name, data in (("oci-layout", {"imageLayoutVersion": "1.0.0"}), ("index.json", index)):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(canonical_json(data))
        os.replace(tmp, os.path.join(out, name))

    print(manifest_desc["digest"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
