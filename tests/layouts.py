"""Derive OCI image layouts for tests: patch the config, append a crafted layer."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _rewrite(src: Path, dst: Path, edit: Callable[[Path, dict[str, Any], dict[str, Any]], None]) -> None:
    """Copies `src` to `dst`, lets `edit(blobs, manifest, config)` change them, re-digests."""
    shutil.copytree(src, dst)
    blobs = dst / "blobs" / "sha256"
    index = json.loads((dst / "index.json").read_text())
    manifest_desc = index["manifests"][0]
    manifest = json.loads((blobs / manifest_desc["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    edit(blobs, manifest, config)
    manifest["config"]["digest"], manifest["config"]["size"] = put_blob(blobs, json.dumps(config).encode())
    manifest_desc["digest"], manifest_desc["size"] = put_blob(blobs, json.dumps(manifest).encode())
    (dst / "index.json").write_text(json.dumps(index))


def put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def with_config(src: Path, dst: Path, patch: dict[str, Any]) -> None:
    """A copy of the layout whose image config has `patch` merged into `config`."""
    _rewrite(src, dst, lambda _blobs, _manifest, config: config["config"].update(patch))


def with_layer(src: Path, dst: Path, layer_tar: bytes) -> None:
    """A copy of the layout with one more (uncompressed) layer on top."""

    def edit(blobs: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
        digest, size = put_blob(blobs, layer_tar)
        manifest["layers"].append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
        )
        config["rootfs"]["diff_ids"].append(digest)

    _rewrite(src, dst, edit)


def tar_of(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> bytes:
    """A tar of the given headers (names are written as given, even hostile ones)."""
    data = data or {}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info in entries:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return out.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info
