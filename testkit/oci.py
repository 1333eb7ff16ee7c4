"""OCI image layouts, written deterministically, derived from one another, and read back.

Same inputs give byte-identical blobs and so identical digests: layer entries sorted by path
(parents first, hard links after what they may point at), mtime 0, numeric owners only, gzip
without a timestamp or file name, canonical JSON for configs, manifests and indexes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = "1970-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Descriptor = dict[str, Any]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything run-specific.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def _path_key(item: tuple[tarfile.TarInfo, bytes | None]) -> tuple[bool, list[str]]:
    info = item[0]
    return (info.islnk(), info.name.split("/"))


class Layer:
    """An uncompressed layer tar being assembled.

    Entries are written sorted by path components (a directory before its contents), hard
    links after everything else so their targets come first. `keep_order` writes them as added
    instead, and `tar_format` picks the header format: for crafted layers whose order or names
    are what a test is about. `names` holds the paths added so far.
    """

    def __init__(self, *, keep_order: bool = False, tar_format: int = tarfile.PAX_FORMAT) -> None:
        self.keep_order = keep_order
        self.tar_format = tar_format
        self.entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
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
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.linkname = link
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.add_member(info, data)

    def add_member(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        """Adds `info` as it is (name included) but for the fields that would differ by run."""
        info.mtime = 0
        info.uname = info.gname = ""
        info.size = len(data) if data is not None else 0
        self.entries.append((info, data))
        self.names.add(info.name.rstrip("/"))

    def finish(self) -> bytes:
        entries = self.entries if self.keep_order else sorted(self.entries, key=_path_key)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=self.tar_format) as tar:
            for info, data in entries:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


class Layout:
    """An OCI image layout directory being written (created if missing). The tags already in its
    `index.json` are kept unless `tag` points them elsewhere; `close` writes the index."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        index = root / "index.json"
        self.manifests: list[Descriptor] = json.loads(index.read_text())["manifests"] if index.is_file() else []

    def blob(self, data: bytes, media_type: str) -> Descriptor:
        digest = sha256(data)
        path = self.blobs / digest.split(":", 1)[1]
        if not path.exists():
            _write_atomically(path, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def read(self, digest: str) -> Any:
        """A JSON blob (manifest, config or index) of this layout."""
        return json.loads((self.blobs / digest.split(":", 1)[1]).read_bytes())

    def image(self, arch: str, layers: list[bytes], config: dict[str, Any], history: str | list[str]) -> Descriptor:
        """Writes the layers (uncompressed tars, gzipped here), the image config around `config`
        and the manifest; returns the manifest's descriptor, with its platform. `history` is
        the created_by of every layer, or one per layer."""
        created_by = history if isinstance(history, list) else [history] * len(layers)
        image_config = {
            "architecture": arch,
            "os": "linux",
            "created": EPOCH,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar) for tar in layers]},
            "history": [{"created": EPOCH, "created_by": by} for by in created_by],
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": self.blob(canonical(image_config), MT_CONFIG),
            "layers": [self.blob(gzip_bytes(tar), MT_LAYER) for tar in layers],
        }
        return {**self.blob(canonical(manifest), MT_MANIFEST), "platform": {"architecture": arch, "os": "linux"}}

    def index(self, entries: list[Descriptor]) -> Descriptor:
        """Writes an image index blob of `entries` (kept in this order); returns its descriptor."""
        return self.blob(canonical({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}), MT_INDEX)

    def tag(self, desc: Descriptor, tag: str) -> None:
        self.manifests = [m for m in self.manifests if _tag_of(m) != tag]
        self.manifests.append({**desc, "annotations": {**desc.get("annotations", {}), REF_NAME: tag}})

    def close(self) -> None:
        self.manifests.sort(key=lambda m: (_tag_of(m) or "", m["digest"]))
        _write_atomically(self.root / "oci-layout", canonical({"imageLayoutVersion": "1.0.0"}))
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}
        _write_atomically(self.root / "index.json", canonical(index))


def _tag_of(desc: Descriptor) -> str | None:
    tag = desc.get("annotations", {}).get(REF_NAME)
    return None if tag is None else str(tag)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------ reading layouts


def manifest_desc(layout: Path, tag: str) -> Descriptor:
    """The entry of `layout`'s index.json tagged `tag`."""
    index = json.loads((layout / "index.json").read_text())
    return next(m for m in index["manifests"] if _tag_of(m) == tag)


def manifest_digest(layout: Path, tag: str) -> str:
    return str(manifest_desc(layout, tag)["digest"])


def layout_blobs(layout: Path, tag: str) -> dict[str, int]:
    """``{digest: size}`` of the config and layers of ``layout:tag`` (an image manifest)."""
    manifest = Layout(layout).read(manifest_digest(layout, tag))
    out = {manifest["config"]["digest"]: manifest["config"]["size"]}
    out.update({layer["digest"]: layer["size"] for layer in manifest["layers"]})
    return out


def layout_size(layout: Path) -> int:
    """Bytes of all the blobs in `layout`."""
    return sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> None:
    """`umoci unpack` of ``layout:tag`` into a new runtime bundle (rootless unless root, and
    then without file owners)."""
    argv = ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)]
    if os.geteuid() != 0:
        argv.insert(2, "--rootless")
    subprocess.run(argv, check=True, capture_output=True)


# ------------------------------------------------------------------------ derived layouts


def _rewrite(src: Path, dst: Path, edit: Callable[[Layout, dict[str, Any], dict[str, Any]], None]) -> None:
    """Copies `src` to `dst` and lets `edit(layout, manifest, config)` change the first image."""
    shutil.copytree(src, dst)
    layout = Layout(dst)
    desc = layout.manifests[0]
    manifest = layout.read(desc["digest"])
    config = layout.read(manifest["config"]["digest"])
    edit(layout, manifest, config)
    manifest["config"] = layout.blob(canonical(config), MT_CONFIG)
    layout.manifests[0] = {**desc, **layout.blob(canonical(manifest), MT_MANIFEST)}
    layout.close()


def with_config(src: Path, dst: Path, patch: dict[str, Any]) -> None:
    """A copy of the layout whose image config has `patch` merged into `config`."""
    _rewrite(src, dst, lambda _layout, _manifest, config: config["config"].update(patch))


def with_layer(src: Path, dst: Path, layer_tar: bytes) -> None:
    """A copy of the layout with one more (uncompressed) layer on top."""

    def edit(layout: Layout, manifest: dict[str, Any], config: dict[str, Any]) -> None:
        manifest["layers"].append(layout.blob(layer_tar, MT_LAYER_TAR))
        config["rootfs"]["diff_ids"].append(sha256(layer_tar))

    _rewrite(src, dst, edit)


def tar_of(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    """A GNU tar of the given headers, in the given order (names are written as given, even
    hostile ones); `data` holds the contents of regular files by name."""
    layer = Layer(keep_order=True, tar_format=tarfile.GNU_FORMAT)
    for info in entries:
        layer.add_member(info, (data or {}).get(info.name))
    return layer.finish()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info
