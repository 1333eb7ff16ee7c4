"""Images for the image figures: a `python:slim` stand-in layout and a local registry.

The stand-in is the busybox demo image's layer plus a second gzip layer holding a Python
standard library tree (Debian's /usr/lib/python3.X on the host, else this interpreter's), about
the size and file count of the real image's biggest layer. Built reproducibly (sorted entries,
mtime 0, root owner, gzip without a timestamp) into build/bench/images/python-slim and reused.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from common import BUILD

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
STANDIN_VERSION = "1"  # bump when the builder changes


def stdlib_dir() -> Path:
    debian = sorted(glob.glob("/usr/lib/python3.[0-9]*"))
    debian = [d for d in debian if Path(d, "os.py").is_file()]
    if debian:
        return Path(debian[-1])
    return Path(sysconfig.get_paths()["stdlib"])


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _stdlib_layer(src: Path, prefix: str) -> tuple[bytes, str, int]:
    """A gzip tar of `src` placed at `prefix`; returns (gzip bytes, diff_id, file count)."""
    raw = io.BytesIO()
    files = 0
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parents = Path(prefix).parts
        for i in range(1, len(parents) + 1):
            info = tarfile.TarInfo("/".join(parents[:i]))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for root, dirs, names in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "test", "site-packages", "dist-packages"))
            rel = Path(root).relative_to(src)
            for name in sorted(names):
                path = Path(root) / name
                arc = f"{prefix}/{rel / name}" if rel != Path(".") else f"{prefix}/{name}"
                info = tarfile.TarInfo(arc)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "root", "root"
                if path.is_symlink():
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                    tar.addfile(info)
                elif path.is_file():
                    data = path.read_bytes()
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                    files += 1
            for d in dirs:
                info = tarfile.TarInfo(f"{prefix}/{rel / d}" if rel != Path(".") else f"{prefix}/{d}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(info)
    tar_bytes = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=6, filename="") as z:
        z.write(tar_bytes)
    return gz.getvalue(), diff_id, files


def python_standin(busybox_layout: Path) -> Path:
    """Builds (once) and returns the stand-in layout directory (tag `latest`)."""
    out = BUILD / "images" / "python-slim"
    stamp = out / ".standin-version"
    if (out / "index.json").is_file() and stamp.is_file() and stamp.read_text() == STANDIN_VERSION:
        return out
    src = stdlib_dir()
    bb_index = json.loads((busybox_layout / "index.json").read_text())
    bb_blobs = busybox_layout / "blobs" / "sha256"
    bb_manifest = json.loads((bb_blobs / bb_index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    bb_config = json.loads((bb_blobs / bb_manifest["config"]["digest"].split(":")[1]).read_bytes())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="python-slim.", dir=out.parent))
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layers = []
        for layer in bb_manifest["layers"]:
            data = (bb_blobs / layer["digest"].split(":")[1]).read_bytes()
            _blob(blobs, data)
            layers.append(layer)
        gz, diff_id, files = _stdlib_layer(src, f"usr/local/lib/{src.name}")
        digest, size = _blob(blobs, gz)
        layers.append({"mediaType": MT_LAYER, "digest": digest, "size": size})
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Env": [*bb_config.get("config", {}).get("Env", []), "LANG=C.UTF-8"],
                "Cmd": ["python3"],
                "Labels": {"org.boxlite.bench": f"python:slim stand-in ({files} stdlib files from {src})"},
            },
            "rootfs": {"type": "layers", "diff_ids": [*bb_config["rootfs"]["diff_ids"], diff_id]},
            "history": [],
        }
        cfg_digest, cfg_size = _blob(blobs, json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": cfg_digest, "size": cfg_size},
            "layers": layers,
        }
        man_digest, man_size = _blob(blobs, json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [
                {
                    "mediaType": MT_MANIFEST,
                    "digest": man_digest,
                    "size": man_size,
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }
            ],
        }
        (tmp / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))
        (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (tmp / ".standin-version").write_text(STANDIN_VERSION)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def layout_size(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_registry() -> Iterator[str]:
    """Debian's docker-registry on a free 127.0.0.1 port, storage in a temporary directory.
    Yields `127.0.0.1:PORT`; stopped at the end."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise FileNotFoundError("docker-registry not found: install the docker-registry package")
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-registry-") as tmp:
        port = free_port()
        config = Path(tmp) / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {tmp}/data\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        proc = subprocess.Popen(
            [binary, "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("docker-registry did not start")
                time.sleep(0.1)
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def skopeo_push(layout: Path, ref: str) -> None:
    subprocess.run(
        ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:latest", f"docker://{ref}"],
        check=True,
        capture_output=True,
    )


def skopeo_pull_seconds(ref: str) -> float:
    """`skopeo copy` of `ref` into a fresh OCI layout, timed."""
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-skopeo-") as tmp:
        started = time.perf_counter()
        subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp}/layout:latest"],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


def umoci_unpack_seconds(layout: Path) -> float:
    """`umoci unpack` of the layout into a fresh bundle, timed (rootless when not root)."""
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-umoci-") as tmp:
        argv = ["umoci", "unpack", "--image", f"{layout}:latest", f"{tmp}/bundle"]
        if os.geteuid() != 0:
            argv.insert(2, "--rootless")
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        return time.perf_counter() - started


if __name__ == "__main__":
    path = python_standin(Path(sys.argv[1]) if len(sys.argv) > 1 else BUILD.parent / "images" / "busybox")
    print(path, layout_size(path))
