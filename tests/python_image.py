"""A small `python:slim` stand-in as an OCI image layout, built from Debian packages.

    python tests/python_image.py [OUT_DIR]

The image holds Debian's python3.11 (interpreter, standard library, pip) and a static busybox
for the shell tools, so `CodeBox` and the examples can run Python offline. The packages are
fetched with `apt-get download` (Debian's archive is one of the registries we may use),
unpacked with `dpkg-deb -x` into a staging tree on the host (they are signed Debian packages,
not untrusted layers) and written as one deterministic gzip layer. The layout is built once
and cached in `build/images/python-slim`; later calls return the cached one.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "build" / "images" / "python-slim"
DEB_CACHE = REPO / "build" / "cache" / "python-debs"

# The interpreter and the closure of its shared-library dependencies (Debian 12), plus pip.
PACKAGES = [
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "gcc-12-base",
    "libexpat1",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libcrypt1",
    "libsqlite3-0",
    "libuuid1",
    "libtinfo6",
    "libncursesw6",
    "libreadline8",
    "media-types",
    "python3-pip",
    "python3-setuptools",
    "python3-pkg-resources",
    "python3-wheel",
    "python3-distutils",
    "python3-lib2to3",
    "busybox-static",
]

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0]: p for p in dest.glob("*.deb")}
    missing = [p for p in PACKAGES if p not in have]
    if missing:
        subprocess.run(["apt-get", "download", "-q", *missing], cwd=dest, check=True, capture_output=True)
        have = {p.name.split("_")[0]: p for p in dest.glob("*.deb")}
    return [have[p] for p in PACKAGES]


def _stage(debs: list[Path], root: Path) -> None:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    # What python:slim has and Debian's split packaging leaves out.
    for rel in ("bin", "usr/local/bin", "tmp", "root", "etc", "proc", "sys", "dev", "home"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    for link, target in (
        ("usr/bin/python3", "python3.11"),
        ("usr/local/bin/python", "/usr/bin/python3.11"),
        ("usr/local/bin/python3", "/usr/bin/python3.11"),
        ("usr/local/bin/pip", "/usr/bin/pip3"),
    ):
        path = root / link
        if not path.exists() and not path.is_symlink():
            path.symlink_to(target)
    # Debian marks its interpreter as externally managed; python:slim does not.
    for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    busybox = root / "bin" / "busybox"
    applets = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True).stdout
    for applet in applets.split():
        if applet.split("/", 1)[0] not in ("bin", "sbin", "usr") or applet == "bin/busybox":
            continue
        path = root / applet
        if not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to("/bin/busybox")


def _layer(root: Path) -> bytes:
    buf = io.BytesIO()
    paths = sorted((p for p in root.rglob("*")), key=lambda p: p.relative_to(root).parts)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isdir() and path.relative_to(root).as_posix() == "tmp":
                info.mode = 0o1777
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def _write_blob(out: Path, data: bytes) -> dict[str, object]:
    digest = _sha256(data)
    path = out / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def build(out: Path) -> None:
    debs = _download(DEB_CACHE)
    with tempfile.TemporaryDirectory(prefix="boxlite-pyimage-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        _stage(debs, root)
        layer_tar = _layer(root)
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, compresslevel=6, mtime=0) as f:
        f.write(layer_tar)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "blobs" / "sha256").mkdir(parents=True)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": {
            "Env": [PATH_ENV, "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1"],
            "Cmd": ["python3"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [_sha256(layer_tar)]},
        "history": [{"created": EPOCH, "created_by": "tests/python_image.py"}],
    }
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_write_blob(staging, gz.getvalue())}
    cfg = {"mediaType": "application/vnd.oci.image.config.v1+json", **_write_blob(staging, _canonical(config))}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": [layer],
    }
    manifest_desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **_write_blob(staging, _canonical(manifest)),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"org.opencontainers.image.ref.name": "slim"},
    }
    (staging / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [manifest_desc]}
    (staging / "index.json").write_bytes(_canonical(index))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def python_layout(out: Path = DEFAULT_OUT) -> Path:
    """The cached layout, built first if needed (safe against concurrent callers)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "index.json").is_file():
            build(out)
    return out


if __name__ == "__main__":
    print(python_layout(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
