#!/usr/bin/env python3
"""Build the OCI image layouts the image tests push to their local registries.

    tests/images/build.py [OUT_ROOT]        (default: build/test-images)

Prints the directory that holds the layouts, OUT_ROOT/<key>/, where <key> is a hash of this
script and of images/busybox_layout.py: images are built once per machine and reused until one
of the scripts changes. The directory holds:

  alpine/     tag latest: the busybox image (images/busybox_layout.py), the alpine stand-in
  python/     tag slim:   a minimal merged-/usr Debian with python3, in three layers (base
              libraries and dash, the interpreter, the standard library), from Debian packages
              fetched with `apt-get download` and unpacked with `dpkg-deb --fsys-tarfile`
  layers/     tag latest: python/ plus two layers with a whiteout, a directory whiteout, an
              opaque directory, hard links (also across layers), symlinks, setuid/setgid/sticky
              modes, files owned by uid 1234, a user.* xattr, a FIFO, and an image config
              with Env/WorkingDir/User/Entrypoint/Cmd/ExposedPorts/Labels
  multiarch/  tag latest: an image index with the alpine manifest for this host and tiny
              images for two other platforms
  foreign/    tag latest: an image index with only other platforms

Python standard library plus apt-get and dpkg-deb. Blobs are deterministic for the same
packages: fixed mtimes on added files, sorted entries, gzip without timestamps.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUSYBOX_LAYOUT = REPO / "images" / "busybox_layout.py"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = "1970-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The python:slim stand-in, layer by layer.
BASE_PACKAGES = [
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libcrypt1",
    "libuuid1",
    "dash",
]
PYTHON_PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "python3-minimal"]
STDLIB_PACKAGES = ["libpython3.11-stdlib"]
# Package content that a container does not need.
SKIP_PREFIXES = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/lintian/",
    "usr/share/locale/",
    "usr/lib/x86_64-linux-gnu/gconv/",
    "usr/lib/aarch64-linux-gnu/gconv/",
)
# merged /usr: what Debian packages ship in /bin, /lib... lives under /usr.
MERGED = ("bin", "sbin", "lib", "lib64")

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"

OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


class Layer:
    """An uncompressed layer tar being assembled; entries keep their insertion order."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.names: set[str] = set()

    def add(
        self,
        name: str,
        kind: bytes = tarfile.REGTYPE,
        mode: int = 0o644,
        data: bytes | None = None,
        link: str = "",
        uid: int = 0,
        gid: int = 0,
        xattrs: dict[str, str] | None = None,
        mtime: int = 0,
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = mtime
        info.linkname = link
        info.size = len(data) if data is not None else 0
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)
        self.names.add(name.rstrip("/"))

    def add_member(self, info: tarfile.TarInfo, data: bytes | None) -> None:
        self.tar.addfile(info, io.BytesIO(data) if data is not None else None)
        self.names.add(info.name.rstrip("/"))

    def finish(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def merged_usr(name: str) -> str:
    first, _, rest = name.partition("/")
    if first in MERGED:
        return f"usr/{first}/{rest}" if rest else f"usr/{first}"
    return name


def download(packages: list[str], cache: Path) -> list[Path]:
    """The .deb files of `packages` (candidate versions), fetched into `cache` once."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        names = subprocess.run(
            ["apt-get", "download", "--print-uris", *packages], check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError as e:
        sys.exit(f"build.py: apt-get cannot find {packages}: {e.stderr.strip()} (run `apt-get update`?)")
    files = [line.split()[1] for line in names.splitlines() if line.startswith("'")]
    if len(files) != len(packages):
        sys.exit(f"build.py: expected {len(packages)} packages from apt-get, got {files}")
    missing = [f for f in files if not (cache / f).is_file()]
    if missing:
        subprocess.run(["apt-get", "download", "-q", *packages], check=True, cwd=cache, capture_output=True)
    return [cache / f for f in files]


def add_debs(layer: Layer, debs: Iterable[Path], seen_dirs: set[str]) -> None:
    """Appends the files of `debs` (merged /usr, docs skipped, directories once)."""
    for deb in debs:
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                name = merged_usr(member.name.removeprefix("./").rstrip("/"))
                if not name or name.startswith(SKIP_PREFIXES) or name + "/" in SKIP_PREFIXES:
                    continue
                if member.isdir():
                    if name in seen_dirs or name in MERGED:
                        continue
                    seen_dirs.add(name)
                elif name in layer.names:
                    continue
                member.name = name
                if member.islnk():
                    member.linkname = merged_usr(member.linkname.removeprefix("./"))
                member.uname = member.gname = ""
                payload = tar.extractfile(member).read() if member.isreg() else None  # type: ignore[union-attr]
                layer.add_member(member, payload)


class Layout:
    """An OCI image layout being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        self.manifests: list[dict[str, object]] = []

    def blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = sha256(data)
        path = self.root / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def image(
        self, arch: str, layers: list[bytes], config: dict[str, object], history: str
    ) -> tuple[dict[str, object], bytes]:
        """Writes layers (uncompressed tars, gzipped here), config and manifest; returns the
        manifest descriptor (with platform) and the manifest bytes."""
        layer_descs = [self.blob(gzip_bytes(tar), MT_LAYER) for tar in layers]
        image_config = {
            "architecture": arch,
            "os": "linux",
            "created": EPOCH,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in layers]},
            "history": [{"created": EPOCH, "created_by": history} for _ in layers],
        }
        config_desc = self.blob(canonical(image_config), MT_CONFIG)
        manifest = canonical(
            {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc, "layers": layer_descs}
        )
        desc = {**self.blob(manifest, MT_MANIFEST), "platform": {"architecture": arch, "os": "linux"}}
        return desc, manifest

    def tag(self, desc: dict[str, object], tag: str) -> None:
        annotations = {**dict(desc.get("annotations", {})), REF_NAME: tag}  # type: ignore[call-overload]
        self.manifests.append({**desc, "annotations": annotations})

    def index(self, entries: list[dict[str, object]]) -> dict[str, object]:
        """Writes an image index blob of `entries`; returns its descriptor."""
        data = canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries})
        return self.blob(data, MT_INDEX)

    def close(self) -> None:
        (self.root / "oci-layout").write_bytes(canonical({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}
        (self.root / "index.json").write_bytes(canonical(index))


def base_files(layer: Layer) -> None:
    """The directories and files a Debian root has besides its packages."""
    for name, mode in (
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("run", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr", 0o755),
        ("usr/bin", 0o755),
        ("usr/lib", 0o755),
        ("usr/lib64", 0o755),
        ("usr/sbin", 0o755),
        ("usr/local", 0o755),
        ("usr/local/bin", 0o755),
        ("var", 0o755),
        ("var/tmp", 0o1777),
    ):
        layer.add(name, tarfile.DIRTYPE, mode)
    layer.add("home/app", tarfile.DIRTYPE, 0o755, uid=1000, gid=1000)
    for name in MERGED:
        layer.add(name, tarfile.SYMTYPE, 0o777, link=f"usr/{name}")
    layer.add("etc/passwd", data=PASSWD.encode())
    layer.add("etc/group", data=GROUP.encode())
    layer.add("etc/os-release", data=b'PRETTY_NAME="boxlite python:slim stand-in (Debian)"\nID=debian\n')
    layer.add("usr/bin/sh", tarfile.SYMTYPE, 0o777, link="dash")


def python_layers(arch: str, debs: Path) -> list[bytes]:
    seen: set[str] = set()
    base = Layer()
    base_files(base)
    seen.update(base.names)
    add_debs(base, download(BASE_PACKAGES, debs), seen)
    interpreter = Layer()
    add_debs(interpreter, download(PYTHON_PACKAGES, debs), seen)
    stdlib = Layer()
    add_debs(stdlib, download(STDLIB_PACKAGES, debs), seen)
    return [base.finish(), interpreter.finish(), stdlib.finish()]


PYTHON_CONFIG = {"Env": [PATH_ENV, "LANG=C.UTF-8", "PYTHON_VERSION=3.11"], "Cmd": ["python3"]}


def special_layers() -> list[bytes]:
    """Two layers exercising what an unpacker must get right."""
    a = Layer()
    a.add("data", tarfile.DIRTYPE, 0o755)
    a.add("data/keep.txt", data=b"version 1\n")
    a.add("data/gone.txt", data=b"deleted by the next layer\n")
    a.add("data/gone-dir", tarfile.DIRTYPE, 0o755)
    a.add("data/gone-dir/inner", data=b"inner\n")
    a.add("data/dir", tarfile.DIRTYPE, 0o750)
    a.add("data/dir/old1", data=b"hidden by the opaque marker\n")
    a.add("data/dir/old2", data=b"hidden too\n")
    a.add("data/hard1", data=b"one inode, several names\n", mode=0o640)
    a.add("data/hard2", tarfile.LNKTYPE, link="data/hard1")
    a.add("data/link", tarfile.SYMTYPE, 0o777, link="keep.txt")
    a.add("data/abslink", tarfile.SYMTYPE, 0o777, link="/data/keep.txt")
    a.add("data/dangling", tarfile.SYMTYPE, 0o777, link="/nonexistent/target")
    a.add("data/suid", data=b"#!/bin/sh\necho suid\n", mode=0o4755)
    a.add("data/sgid-dir", tarfile.DIRTYPE, 0o2775, gid=1000)
    a.add("data/sticky", tarfile.DIRTYPE, 0o1777)
    a.add("data/owned", data=b"owned by 1234\n", mode=0o640, uid=1234, gid=1234)
    a.add("data/owned-dir", tarfile.DIRTYPE, 0o750, uid=1234, gid=5678)
    a.add("data/owned-dir/file", data=b"x\n", mode=0o600, uid=1234, gid=5678)
    a.add("data/xattr", data=b"has an xattr\n", xattrs={"user.boxlite": "hello"})
    a.add("data/fifo", tarfile.FIFOTYPE, 0o644)
    a.add("data/empty", data=b"")
    a.add("data/unicode-é.txt", data="é\n".encode())
    a.add("data/big", data=bytes(range(256)) * 4096)
    a.add("home/app/.profile", data=b"# app\n", uid=1000, gid=1000)

    b = Layer()
    b.add("data/.wh.gone.txt")
    b.add("data/.wh.gone-dir")
    b.add("data/dir/.wh..wh..opq")
    b.add("data/dir/new", data=b"after the opaque marker\n")
    b.add("data/keep.txt", data=b"version 2\n", mode=0o600)
    b.add("data/hard3", tarfile.LNKTYPE, link="data/hard1")
    b.add("data/link2", tarfile.SYMTYPE, 0o777, link="dir/new")
    b.add("data/later", tarfile.DIRTYPE, 0o700, uid=1234, gid=1234)
    b.add("data/later/deep", data=b"deep\n", mode=0o444, uid=1234, gid=1234)
    return [a.finish(), b.finish()]


LAYERS_CONFIG = {
    "Env": [PATH_ENV, "LANG=C.UTF-8", "LAYERS_TEST=from-image"],
    "Entrypoint": [],
    "Cmd": ["python3"],
    "WorkingDir": "/data",
    "User": "app",
    "ExposedPorts": {"8080/tcp": {}},
    "Labels": {"org.boxlite.test": "layers"},
}


def tiny_image(layout: Layout, arch: str) -> dict[str, object]:
    """An image for another platform: one small layer, never run."""
    layer = Layer()
    layer.add("etc", tarfile.DIRTYPE, 0o755)
    layer.add("etc/arch", data=f"{arch}\n".encode())
    desc, _ = layout.image(arch, [layer.finish()], {"Cmd": ["sh"]}, f"tiny {arch}")
    return desc


def build(out: Path, debs: Path) -> None:
    arch = OCI_ARCH.get(platform.machine(), platform.machine())
    others = [a for a in ("arm64", "s390x", "ppc64le") if a != arch][:2]

    subprocess.run(
        [sys.executable, str(BUSYBOX_LAYOUT), str(out / "alpine"), "--tag", "latest"],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    python = Layout(out / "python")
    py_layers = python_layers(arch, debs)
    desc, _ = python.image(arch, py_layers, PYTHON_CONFIG, "tests/images/build.py python")
    python.tag(desc, "slim")
    python.close()

    layers = Layout(out / "layers")
    desc, _ = layers.image(arch, py_layers + special_layers(), LAYERS_CONFIG, "tests/images/build.py layers")
    layers.tag(desc, "latest")
    layers.close()

    # multiarch: the alpine image for this host plus tiny ones for two other platforms.
    multi = Layout(out / "multiarch")
    alpine_index = json.loads((out / "alpine" / "index.json").read_text())
    alpine_desc = alpine_index["manifests"][0]
    for blob in (out / "alpine" / "blobs" / "sha256").iterdir():
        shutil.copyfile(blob, multi.root / "blobs" / "sha256" / blob.name)
    host_entry = {k: v for k, v in alpine_desc.items() if k != "annotations"}
    entries = [tiny_image(multi, others[0]), host_entry, tiny_image(multi, others[1])]
    multi.tag(multi.index(entries), "latest")
    multi.close()

    foreign = Layout(out / "foreign")
    foreign.tag(foreign.index([tiny_image(foreign, a) for a in others]), "latest")
    foreign.close()


def key() -> str:
    h = hashlib.sha256()
    for path in (Path(__file__).resolve(), BUSYBOX_LAYOUT):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_root", nargs="?", default=str(REPO / "build" / "test-images"))
    args = ap.parse_args()
    root = Path(args.out_root).resolve()
    target = root / key()
    if not (target / "done").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            build(tmp, root / "debs")
            (tmp / "done").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        # Images of older versions of the scripts are not used again.
        for old in root.iterdir():
            if old.is_dir() and old != target and len(old.name) == 16 and (old / "done").is_file():
                shutil.rmtree(old, ignore_errors=True)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
