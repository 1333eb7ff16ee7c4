"""Files in a box: ``PUT`` a tar (unpacked here, checked member by member, then copied in) or
raw bytes; ``GET`` a tar of a file or directory, or a regular file's bytes."""

from __future__ import annotations

import asyncio
import os
import posixpath
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from .._runtime import Box
from ..errors import InvalidArgumentError
from . import untar
from .deps import Key, State

router = APIRouter(prefix="/v1/default/boxes/{box}", tags=["files"])

TAR = "application/x-tar"
BoxPath = Annotated[str, Query(description="absolute path in the box", pattern=r"^/[^\x00]*$", max_length=4096)]
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _is_tar(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == TAR


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise InvalidArgumentError(f"mode must be octal permission bits such as 0644, got {text!r}")
    return mode


@router.put(
    "/files",
    status_code=204,
    openapi_extra={"requestBody": {"required": True, "content": {TAR: _BINARY, "application/octet-stream": _BINARY}}},
)
async def upload(
    box: str,
    path: BoxPath,
    request: Request,
    state: State,
    key: Key,
    mode: Annotated[str, Query(pattern=r"^[0-7]{1,4}$", description="raw uploads: permission bits, octal")] = "0644",
) -> Response:
    """``application/x-tar``: the members go under the box directory ``path`` (created, merged
    into if it exists); any other type: the bytes become the file ``path``."""
    target = await state.box(box, key)
    if not _is_tar(request.headers.get("content-type")):
        await target.write_file(path, await request.body(), _mode(mode))
        return Response(status_code=204)
    work = state.temp_dir()
    try:
        archive = work / "upload.tar"
        with archive.open("wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        root = work / "root"
        root.mkdir(mode=0o755)
        await asyncio.to_thread(untar.unpack, archive, root, state.config.max_tar_members)
        archive.unlink()
        await _copy_under(target, root, path.rstrip("/"))
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return Response(status_code=204)


async def _copy_under(box: Box, root: Path, where: str) -> None:
    """Each top-level member into ``where``, like ``tar -C where -x``: an existing directory
    keeps its own mode and owner (copying ``root`` itself would replace them)."""
    entries = sorted(os.listdir(root))
    for entry in entries:
        await box.copy_in(root / entry, f"{where}/{entry}")  # missing parents are created
    if not entries and where:
        try:
            await box.list_dir(where)
        except InvalidArgumentError:  # absent (or the image has no `find`): make it
            await box.copy_in(root, where)


def _tar_of(source: Path, name: str, out: Path) -> None:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(source, arcname=name)  # symlinks are stored as links, never followed


async def _stream_then_remove(archive: Path, work: Path) -> AsyncIterator[bytes]:
    try:
        with archive.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                yield chunk
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


@router.get(
    "/files",
    responses={200: {"content": {TAR: _BINARY, "application/octet-stream": _BINARY}}},
    response_class=Response,
)
async def download(
    box: str,
    path: BoxPath,
    request: Request,
    state: State,
    key: Key,
    max_bytes: Annotated[int | None, Query(ge=0, le=1 << 40, description="cap of the file content")] = None,
) -> Response:
    """``Accept: application/x-tar``: a tar of ``path`` whose member names start with its
    base name (as ``tar -C dirname -c basename``); otherwise the bytes of the regular file."""
    target = await state.box(box, key)
    if TAR not in request.headers.get("accept", ""):
        data = await target.read_file(path, max_bytes)
        return Response(data, media_type="application/octet-stream")
    name = posixpath.basename(path.rstrip("/"))
    if not name:
        raise InvalidArgumentError("a tar of / is not offered: name a directory below it")
    work = state.temp_dir()
    try:
        (work / "out").mkdir()
        await target.copy_out(path, work / "out" / name, max_bytes=max_bytes)
        archive = work / "archive.tar"
        await asyncio.to_thread(_tar_of, work / "out" / name, name, archive)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise
    # The generator removes it when done; the background task also when it never started.
    cleanup = BackgroundTask(shutil.rmtree, work, True)
    return StreamingResponse(_stream_then_remove(archive, work), media_type=TAR, background=cleanup)
