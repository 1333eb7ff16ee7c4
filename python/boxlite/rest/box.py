"""A box of a remote runtime, in the shape of ``_native.NativeBox`` (``boxlite.Box`` wraps it).

File copies travel as tar archives over the files route. The core checks the path in the box
and reads what comes back (``_native._check_box_path``, ``_native._extract_untrusted``: the
same code as a local copy); the host side of a copy (the source, the destination, the options)
is checked here the same way as the core does, with the same messages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar

from .._native import BoxInfo, BoxMetrics, CopyOptions, _check_box_path, _extract_untrusted, _first_entry_kind
from ..errors import (
    AlreadyExistsError,
    BoxliteError,
    BoxliteIOError,
    GuestProtocolError,
    InvalidArgumentError,
    UnsupportedError,
)
from .archive import quoted, write_archive
from .execution import RestExecution, RestOutputStream
from .wire import env_dict

if TYPE_CHECKING:
    from .client import RestClient

T = TypeVar("T")

TAR = "application/x-tar"
#: ``read_file``'s default limit, as locally.
READ_FILE_LIMIT = 64 * 1024 * 1024
#: ``copy_out``'s default limit, as locally.
COPY_OUT_LIMIT = 1024 * 1024 * 1024
#: Bytes per chunk of an upload.
UPLOAD_CHUNK = 256 * 1024


def unsupported(what: str) -> NoReturn:
    raise UnsupportedError(f"not supported: {what} on a remote runtime (the REST API has no such operation)")


def _invalid(field: str, reason: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"invalid argument `{field}`: {reason}")


def validate_box_path(field: str, path: str) -> None:
    if not path.startswith("/"):
        raise _invalid(field, f"{quoted(path)} must be an absolute path inside the box")
    if "\0" in path:
        raise _invalid(field, "contains a NUL byte")


def split_destination(dest: str, source_name: str, is_dir: bool) -> tuple[str, str]:
    """Where a copy lands: ``dest`` exactly, or inside it when it ends with ``/`` or is a
    directory."""
    if dest.endswith("/") or is_dir:
        return dest.rstrip("/"), source_name
    parent, _, name = dest.rpartition("/")
    return parent, name


def _io_error(context: str, error: OSError) -> BoxliteIOError:
    return BoxliteIOError(f"{context}: {error.strerror or error} (os error {error.errno})")


class _Upload:
    """A file's content in chunks, stopping when the caller was cancelled."""

    def __init__(self, file: BinaryIO, cancelled: threading.Event) -> None:
        self._file = file
        self._cancelled = cancelled

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self._file.read(UPLOAD_CHUNK):
            if self._cancelled.is_set():
                raise BoxliteError("the copy was cancelled")
            yield chunk


def _until_cancelled(chunks: Iterator[bytes], cancelled: threading.Event) -> Iterator[bytes]:
    for chunk in chunks:
        if cancelled.is_set():
            raise BoxliteError("the copy was cancelled")
        yield chunk


async def _in_thread(work: Callable[[threading.Event], T]) -> T:
    """Runs blocking ``work`` in a worker thread; cancelling the caller tells it to stop."""
    cancelled = threading.Event()
    try:
        return await asyncio.to_thread(work, cancelled)
    except asyncio.CancelledError:
        cancelled.set()
        raise


class RestBox:
    """One box on the server."""

    def __init__(self, client: RestClient, wire: dict[str, Any]) -> None:
        self._client = client
        box_id = wire.get("id", wire.get("box_id"))
        if not isinstance(box_id, str) or not box_id:
            raise client.bad_reply("a box without an id")
        self._id = box_id
        name = wire.get("name")
        self._name = name if isinstance(name, str) else None
        command = wire.get("default_command")
        self._default_command = list(command) if isinstance(command, list) else None

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def dir(self) -> str:
        unsupported("Box.dir (the box directory is on the server)")

    @property
    def default_command(self) -> list[str]:
        if self._default_command is None:
            wire = self._client.request_sync("GET", self._path())
            command = wire.get("default_command") if isinstance(wire, dict) else None
            if not isinstance(command, list):
                raise self._client.bad_reply("a box without its default_command")
            self._default_command = [str(word) for word in command]
        return list(self._default_command)

    def _path(self, *rest: str) -> str:
        return self._client.box_path(self._id, *rest)

    def info(self) -> BoxInfo:
        return BoxInfo._from_wire(self._client.request_sync("GET", self._path()))

    async def exec(
        self,
        program: str | None = None,
        args: list[str] | None = None,
        *,
        env: Any = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: tuple[int, int] | None = None,
        timeout_secs: float | None = None,
    ) -> RestExecution:
        argv = list(args or [])
        if not all(isinstance(a, str) for a in argv) or not (program is None or isinstance(program, str)):
            raise TypeError("exec(): the program and every argument must be str")
        body: dict[str, Any] = {"command": program, "args": argv, "env": env_dict(env) or {}}
        if cwd is not None:
            body["working_dir"] = cwd
        if user is not None:
            body["user"] = user
        if timeout_secs is not None:
            body["timeout_seconds"] = timeout_secs
        if tty is not None:
            rows, cols = tty
            body.update(tty=True, tty_rows=rows, tty_cols=cols)
        shown = " ".join([program if program is not None else "(default command)", *argv])
        if len(shown) > 200:
            shown = shown[:200] + "..."
        session = await self._client.exec_session()
        if session is not None:
            channel = await session.start({**body, "box": self._id}, RestOutputStream(), RestOutputStream())
            tagged_id, tagged_pid = await channel.started
            return RestExecution(self._client, self._id, tagged_id, tagged_pid, shown, timeout_secs, channel)
        started = await self._client.request("POST", self._path("exec"), json_body=body, long=True)
        if not isinstance(started, dict):
            raise self._client.bad_reply("no execution for an exec")
        execution_id, pid = started.get("execution_id"), started.get("pid")
        if not isinstance(execution_id, str) or not isinstance(pid, int):
            raise self._client.bad_reply("an execution without an id or pid")
        return RestExecution(self._client, self._id, execution_id, pid, shown, timeout_secs)

    # -- files ---------------------------------------------------------------------------------

    async def copy_in(
        self, host_path: str | os.PathLike[str], box_path: str, options: CopyOptions | None = None
    ) -> None:
        options = options or CopyOptions()
        _check_box_path("dest", box_path)
        if not options.overwrite:
            raise UnsupportedError("not supported: copy_in with overwrite=False (the box replaces existing files)")
        src = Path(os.fspath(host_path))
        is_dir = await asyncio.to_thread(_is_dir_source, src, options.follow_symlinks)
        if is_dir and not options.recursive:
            raise _invalid("src", f"{src} is a directory; copy it with recursive=True")
        source_name = src.name
        if source_name in ("", ".", "..") or not _is_utf8(source_name):
            raise _invalid("src", f"{src} has no usable file name")
        onto_dir = not is_dir and not box_path.endswith("/") and await self._kind_of(box_path) == "directory"
        parent, name = split_destination(box_path, source_name, onto_dir)
        if name in ("", ".", ".."):
            raise _invalid("dest", f"{quoted(box_path)} does not name a file")
        parent = parent or "/"

        def upload(cancelled: threading.Event) -> None:
            with tempfile.TemporaryFile() as archive:
                try:
                    write_archive(archive, src, name, follow_symlinks=options.follow_symlinks)
                except OSError as e:
                    raise _io_error("archiving the source", e) from None
                archive.seek(0)
                self._client.request_sync(
                    "PUT",
                    self._path("files"),
                    params={"path": parent},
                    content=_Upload(archive, cancelled),
                    headers={"Content-Type": TAR},
                    long=True,
                )

        await _in_thread(upload)

    async def _kind_of(self, box_path: str) -> str:
        """What is at ``box_path`` in the box (``"directory"``, ``"file"``, ``"symlink"``, or
        ``"other"`` for missing or unknown): the first header of its archive."""

        def probe(cancelled: threading.Event) -> str:
            try:
                with self._client.stream_sync(
                    "GET", self._path("files"), params={"path": box_path}, headers={"Accept": TAR}
                ) as chunks:
                    return _first_entry_kind(_until_cancelled(chunks, cancelled))
            except BoxliteError:
                return "other"  # missing, or unreadable: the copy itself meets it and says so

        return await _in_thread(probe)

    async def copy_out(
        self,
        box_path: str,
        host_path: str | os.PathLike[str],
        options: CopyOptions | None = None,
        max_bytes: int | None = None,
    ) -> None:
        options = options or CopyOptions()
        _check_box_path("src", box_path)
        if options.follow_symlinks:
            raise UnsupportedError(
                "not supported: copy_out with follow_symlinks=True (links in the box are copied as links)"
            )
        source_name = box_path.rstrip("/").rpartition("/")[2]
        if source_name in ("", ".", ".."):
            raise _invalid("src", f"{quoted(box_path)} does not name a file")
        parent, target = await asyncio.to_thread(_destination, os.fspath(host_path), source_name, options.overwrite)
        limit = COPY_OUT_LIMIT if max_bytes is None else max_bytes
        params = {"path": box_path}
        if max_bytes is not None:
            params["max_bytes"] = str(max_bytes)

        def download(cancelled: threading.Event) -> None:
            try:
                staging = Path(tempfile.mkdtemp(prefix=".boxlite-copy-", dir=parent))
            except OSError as e:
                raise _io_error(f"creating a staging directory in {parent}", e) from None
            try:
                with self._client.stream_sync("GET", self._path("files"), params=params, headers={"Accept": TAR}) as c:
                    try:
                        _extract_untrusted(
                            _until_cancelled(c, cancelled), staging, source_name, options.recursive, limit
                        )
                    except OSError as e:
                        raise _io_error(f"extracting {source_name} into {staging}", e) from None
                if not os.path.lexists(staging / source_name):
                    raise GuestProtocolError(f"guest protocol error: the box sent no {quoted(source_name)}")
                _replace(staging / source_name, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        await _in_thread(download)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        params = {"path": path}
        if max_bytes is not None:
            params["max_bytes"] = str(max_bytes)
        limit = READ_FILE_LIMIT if max_bytes is None else max_bytes
        data = await self._client.read_limited(self._path("files"), params, limit + 1)
        if len(data) > limit:
            raise _invalid(
                "max_bytes",
                f"{quoted(path)} is over read_file's limit of {limit} bytes; pass a larger max_bytes or use copy_out",
            )
        return data

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        if not isinstance(mode, int) or not 0 <= mode <= 0xFFFFFFFF:
            raise OverflowError("mode must be a permission mode (0 to 0o7777)")
        await self._client.request(
            "PUT",
            self._path("files"),
            params={"path": path, "mode": format(mode, "04o")},
            content=bytes(data),
            headers={"Content-Type": "application/octet-stream"},
            long=True,
        )

    async def list_dir(self, path: str) -> list[str]:
        """As locally: the image's ``find`` lists the directory."""
        validate_box_path("path", path)
        prefix = path.rstrip("/") + "/"
        execution = await self.exec("find", [prefix, "-mindepth", "1", "-maxdepth", "1", "-print0"], user="0:0")
        result = await execution.wait()
        if result.exit_code != 0:
            lines = result.stderr.strip().splitlines()
            reason = lines[-1] if lines else f"find exited with {result.exit_code}"
            raise _invalid("path", f"cannot list {quoted(path)} in the box: {reason}")
        names = []
        for entry in result.stdout_bytes.split(b"\0"):
            if entry:
                raw = entry[len(prefix.encode()) :] if entry.startswith(prefix.encode()) else entry
                names.append(raw.decode(errors="replace"))
        return sorted(names)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._client.request("POST", self._path("start"), long=True)

    async def stop(self) -> None:
        await self._client.request("POST", self._path("stop"), long=True)

    async def metrics(self) -> BoxMetrics:
        return BoxMetrics._from_wire(await self._client.request("GET", self._path("metrics")))

    async def pause(self) -> None:
        unsupported("Box.pause")

    async def resume(self) -> None:
        unsupported("Box.resume")

    async def fork(self, name: str | None = None) -> RestBox:
        unsupported("Box.fork")

    @property
    def snapshot(self) -> Any:
        unsupported("Box.snapshot")

    async def clone_box(self, *, options: Any = None, name: str | None = None) -> RestBox:
        unsupported("Box.clone_box")

    async def export(self, *, options: Any = None, dest: str | os.PathLike[str]) -> str:
        unsupported("Box.export")


def _is_dir_source(src: Path, follow_symlinks: bool) -> bool:
    try:
        meta = src.stat() if follow_symlinks else src.lstat()
    except OSError as e:
        raise _io_error(f"reading {src}", e) from None
    return stat.S_ISDIR(meta.st_mode)


def _destination(dest: str, source_name: str, overwrite: bool) -> tuple[Path, Path]:
    """Where ``copy_out`` writes: the directory and the path in it, checked as locally."""
    parent_text, name = split_destination(dest, source_name, os.path.isdir(dest))
    parent = Path(parent_text or ("/" if dest.startswith("/") else "."))
    if not parent.is_dir():
        raise _invalid("dest", f"{parent} is not a directory")
    target = parent / name
    if not overwrite and os.path.lexists(target):
        raise AlreadyExistsError(f"a file named {quoted(str(target))} already exists")
    return parent, target


def _is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _replace(staged: Path, target: Path) -> None:
    """Moves the extracted copy to ``target``, replacing a directory there (not a link)."""
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.rename(staged, target)
    except OSError as e:
        raise _io_error(f"moving the copy to {target}", e) from None


__all__ = ["RestBox"]
