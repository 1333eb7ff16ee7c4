"""The async API: ``Boxlite`` makes ``Box``es; ``Box.exec`` starts ``Execution``s.

A typed skin over the native core: options, records and every rule live there
(``boxlite._native``); this module adds the Python idioms (async iteration, context managers,
awaitable results, terminal sizes).
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
import os
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _native
from ._native import BoxInfo, BoxOptions, CopyOptions, ExecResult, Options
from .errors import AlreadyExistsError, BoxliteError, InvalidStateError, UnsupportedError
from .images import Images

if TYPE_CHECKING:
    from .rest.options import BoxliteRestOptions

PathLike = str | os.PathLike[str]
EnvLike = Mapping[str, str] | Iterable[tuple[str, str]] | None
T = TypeVar("T")


class Completed(Generic[T]):
    """The result of something that already happened. Awaiting it gives the value, so code
    written for an API where the call is a coroutine (the published ``boxlite`` package's
    ``kill()``, ``resize_tty()``, ...) keeps working; not awaiting it is fine too."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, T]:
        return self.value
        yield  # pragma: no cover - makes this a generator

    def __repr__(self) -> str:
        return f"Completed({self.value!r})"


class ExecutionId(str):
    """An execution's id: a ``str`` that may also be called (``execution.id()``), as in the
    published package."""

    __slots__ = ()

    def __call__(self) -> str:
        return str(self)


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Re-cuts byte chunks into text lines (each ending in a newline, except maybe the last)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for chunk in chunks:
        pending += decoder.decode(chunk)
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line + "\n"
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator


class ExecStdin:
    """Writes to a command's stdin; ``close()`` sends end-of-file."""

    def __init__(self, native: _native.StdinWriter) -> None:
        self._native = native
        self._closed = False

    async def write(self, data: bytes | str) -> None:
        """Sends ``data`` (``str`` is encoded as UTF-8), waiting while the command has not
        read what came before."""
        await self._native.write(data.encode() if isinstance(data, str) else bytes(data))

    async def send_input(self, data: bytes | str) -> None:
        """The published package's name for ``write``."""
        await self.write(data)

    async def close(self) -> None:
        """Sends end-of-file; the command reads EOF once it has read everything before."""
        self._closed = True
        await self._native.close()

    def is_closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> ExecStdin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Execution:
    """A command running in a box."""

    def __init__(self, native: _native.NativeExecution) -> None:
        self._native = native

    @property
    def id(self) -> ExecutionId:
        """A unique id of this execution (also callable: ``execution.id()``)."""
        return ExecutionId(self._native.id)

    @property
    def pid(self) -> int:
        """The process id inside the box."""
        return self._native.pid

    def stdout(self, binary: bool = False) -> AsyncIterator[Any]:
        """The output as text lines, or as ``bytes`` chunks with ``binary=True``. Can be taken
        once; afterwards (and after ``wait()``) it is empty."""
        return self._stream(self._native.stdout(), binary)

    def stderr(self, binary: bool = False) -> AsyncIterator[Any]:
        """Like ``stdout()``, for stderr (empty under a tty)."""
        return self._stream(self._native.stderr(), binary)

    @staticmethod
    def _stream(native: _native.OutputStream | None, binary: bool) -> AsyncIterator[Any]:
        if native is None:
            return _empty()
        return native if binary else _lines(native)

    def stdin(self) -> ExecStdin | None:
        """The stdin writer (once). Stdin stays open until closed, or until ``wait()`` is
        called without having taken it."""
        native = self._native.stdin()
        return None if native is None else ExecStdin(native)

    async def wait(self) -> ExecResult:
        """Waits for the command to end; raises ``ExecTimeoutError`` if it timed out.

        Cancelling the waiting task (``asyncio.wait_for``, Ctrl-C under ``asyncio.run``)
        kills the command: its process group gets SIGKILL."""
        try:
            return await self._native.wait()
        except asyncio.CancelledError:
            self._kill_quietly()
            raise

    def kill(self, signal: int = 9) -> Completed[None]:
        """Sends ``signal`` (default SIGKILL) to the command's process group, at once (the
        result may be awaited, as in the published package)."""
        self._native.kill(signal)
        return Completed(None)

    def signal(self, sig: int) -> Completed[None]:
        """Sends the signal ``sig`` (a number or ``signal.Signals``) to the command's process
        group."""
        return self.kill(int(sig))

    def resize_tty(self, rows: int, cols: int) -> Completed[None]:
        """Tells the command's terminal its new size (for ``tty`` executions; e.g. on
        SIGWINCH)."""
        self._native.resize_tty(rows, cols)
        return Completed(None)

    def _kill_quietly(self) -> None:
        try:
            self._native.kill(9)
        except BoxliteError:
            pass  # already gone, or the box with it

    def __repr__(self) -> str:
        return f"Execution(id={self.id!r}, pid={self.pid})"


#: The guest bundle shipped inside the installed package, if the wheel carries one.
PACKAGE_GUEST_DIR = Path(__file__).parent / "guest"
#: The per-box supervisor binary shipped inside the installed package.
PACKAGE_SHIM = Path(__file__).parent / "bin" / "boxlite-shim"


def _terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size() if os.isatty(1) else os.terminal_size((80, 24))
    return (size.lines, size.columns)


class Box:
    """A box: an OCI image running in its own VM. ``async with box:`` stops it at the end."""

    def __init__(self, native: _native.NativeBox) -> None:
        self._native = native

    @property
    def id(self) -> str:
        return self._native.id

    @property
    def name(self) -> str | None:
        return self._native.name

    def info(self) -> BoxInfo:
        """What the box is and its state now (``await box.info()`` works too)."""
        return self._native.info()

    @property
    def default_command(self) -> list[str]:
        """What ``exec()`` without a command runs: the image's ENTRYPOINT and CMD, with the
        box's ``entrypoint``/``cmd`` options applied as Docker does."""
        return self._native.default_command

    @property
    def dir(self) -> Path:
        """The box directory on the host (its disk, console log, supervisor log)."""
        return Path(self._native.dir)

    async def exec(
        self,
        command: str | None = None,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] | None = None,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> Execution:
        """Starts ``command args...`` in the box and returns at once; ``await (...).wait()``
        for the result. A stopped box is started first. ``env`` (a mapping or pairs) adds to
        the image's and the box's environment. ``tty=True`` runs under a terminal the size of
        this process's (or 24x80); ``tty=(rows, cols)`` sets it.

        Without ``command`` it runs the box's ``default_command`` (plus ``args``), under a
        terminal if the box was created with ``tty=True``."""
        size = _terminal_size() if tty is True else (tty or None)
        native = await self._native.exec(
            command, list(args or []), env=env, cwd=cwd, user=user, tty=size, timeout_secs=timeout_secs
        )
        return Execution(native)

    async def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None:
        """Copies a host file or directory into the box: to ``box_path`` exactly, or into it
        when it ends with ``/``."""
        await self._native.copy_in(os.fspath(host_path), box_path, copy_options)

    async def copy_out(
        self,
        box_path: str,
        host_path: PathLike,
        copy_options: CopyOptions | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """Copies a box file or directory to the host: to ``host_path`` exactly, or into it
        when it is an existing directory or ends with ``/``. At most ``max_bytes`` of file
        content (default 1 GiB) is written; more is an ``InvalidArgumentError`` raised before
        the file that does not fit is written. Sparse files stay sparse."""
        await self._native.copy_out(box_path, os.fspath(host_path), copy_options, max_bytes)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of the regular file ``path`` in the box, read by the guest agent (the
        image needs no tools for it). A file larger than ``max_bytes`` (default 64 MiB) is an
        ``InvalidArgumentError`` before its content is read."""
        data: bytes = await self._native.read_file(path, max_bytes)
        return data

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Writes ``data`` (``str`` as UTF-8) to ``path`` in the box with permission bits
        ``mode``, replacing the file and creating missing parent directories (owned by
        root)."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        await self._native.write_file(path, payload, mode)

    async def list_dir(self, path: str) -> list[str]:
        """The names in the directory ``path`` of the box, sorted (no ``.`` and ``..``).
        Uses the image's ``find`` (busybox or findutils)."""
        names: list[str] = await self._native.list_dir(path)
        return names

    async def start(self) -> None:
        await self._native.start()

    async def stop(self) -> None:
        await self._native.stop()

    async def metrics(self) -> _native.BoxMetrics:
        return await self._native.metrics()

    async def pause(self) -> None:
        """Saves the box's memory and devices to its directory and ends its VM (its CPU and
        RAM are freed, its ports released); ``resume()`` brings it back with its processes
        where they were. Running ``exec`` streams end; the commands go on after the resume.
        ``stop()`` of a paused box resumes it and shuts it down cleanly."""
        await self._native.pause()

    async def resume(self) -> None:
        """Brings a paused box back (``InvalidStateError`` if it is not paused)."""
        await self._native.resume()

    async def fork(self, name: str | None = None) -> Box:
        """A new running box that continues from this one's memory and disk (its processes,
        files and memory-only files as they are now); both go on separately. The child gets
        its own id, ``name``, hostname, network address and fresh entropy; it publishes no
        ports. This box is paused for the copy and resumed (its ``exec`` streams end)."""
        return Box(await self._native.fork(name))

    @property
    def snapshot(self) -> _native.SnapshotHandle:
        """The box's disk snapshots: ``create(name=...)``, ``list()``, ``get(name)``,
        ``remove(name)``, ``restore(name)``. Creating and restoring need a stopped box."""
        return self._native.snapshot

    async def clone_box(self, *, options: _native.CloneOptions | None = None, name: str | None = None) -> Box:
        """A new stopped box with this stopped box's options and files (its own id and
        ``name``). Both share the unchanged disk blocks; writes in one never reach the other."""
        return Box(await self._native.clone_box(options=options, name=name))

    async def export(self, *, options: _native.ExportOptions | None = None, dest: PathLike) -> str:
        """Writes this stopped box (options, image, its disk flattened) to one archive at
        ``dest``, or ``<dest>/<name or id>.boxlite`` when ``dest`` is a directory; returns the
        path. ``Boxlite.import_box`` makes a box from it in any home."""
        path: str = await self._native.export(options=options, dest=os.fspath(dest))
        return path

    async def __aenter__(self) -> Box:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"Box(id={self.id!r}, name={self.name!r})"


class Boxlite:
    """The runtime. ``async with Boxlite(...)`` (or ``with``) stops its boxes at the end."""

    def __init__(self, options: Options | None = None) -> None:
        guest_dir = PACKAGE_GUEST_DIR if PACKAGE_GUEST_DIR.is_dir() else None
        shim = PACKAGE_SHIM if PACKAGE_SHIM.is_file() else None
        self._native = _native.Runtime(options or Options(), guest_dir=guest_dir, shim_path=shim)
        self._images = Images(self._native.images())

    @classmethod
    def default(cls) -> Boxlite:
        """A runtime at ``$BOXLITE_HOME`` or ``~/.boxlite``."""
        return cls(Options())

    @classmethod
    def rest(cls, options: BoxliteRestOptions) -> Boxlite:
        """A runtime whose boxes live on a ``boxlite serve`` server (docs/rest-client.md): the
        same classes and errors as locally. Nothing is sent until the first call."""
        try:
            from .rest.runtime import RestRuntime
        except ImportError as e:
            raise UnsupportedError(f"Boxlite.rest needs the {e.name} package: pip install 'boxlite[rest]'") from e
        return cls._around(RestRuntime(options))

    @classmethod
    def _around(cls, backend: Any) -> Boxlite:
        """A runtime over another backend with ``_native.Runtime``'s methods."""
        runtime = cls.__new__(cls)
        runtime._native = backend
        runtime._images = Images(backend.images())
        return runtime

    @property
    def home_dir(self) -> Path:
        return Path(self._native.home_dir)

    @property
    def images(self) -> Images:
        """The image store: ``pull``, ``list``, ``get``, ``remove``, ``gc``."""
        return self._images

    async def create(self, options: BoxOptions, name: str | None = None) -> Box:
        """Creates a box and boots it; returns when it is ready for commands. ``name`` (or
        ``options.name``) must be unique in this home (``AlreadyExistsError``)."""
        return Box(await self._native.create(options, name))

    async def get_or_create(self, options: BoxOptions, name: str | None = None) -> tuple[Box, bool]:
        """The box named ``name`` (or ``options.name``), started if it is stopped, or a new
        one made from ``options``; returns ``(box, created)``. Without a name it always
        creates."""
        name = name if name is not None else options.name
        if name is None:
            return await self.create(options), True
        for _ in range(3):
            box = await self.get(name)
            if box is None:
                try:
                    return await self.create(options, name), True
                except AlreadyExistsError:
                    continue  # another task or process created it first
            if box.info().status in ("stopped", "configured", "failed"):
                try:
                    await box.start()
                except InvalidStateError:
                    pass  # started meanwhile by someone else
            return box, False
        raise InvalidStateError(f"box {name!r} keeps appearing and disappearing; try again")

    async def get(self, id_or_name: str) -> Box | None:
        """A box by id or name, also one created by another process with the same home (a
        running one is reattached), or ``None``."""
        native = await _resolved(self._native.get(id_or_name))
        return None if native is None else Box(native)

    async def get_info(self, id_or_name: str) -> BoxInfo | None:
        info: BoxInfo | None = await _resolved(self._native.get_info(id_or_name))
        return info

    async def list_info(self, state: str | None = None) -> list[BoxInfo]:
        """Every box of this home, oldest first; only those with status ``state``
        (``"running"``, ``"stopped"``, ...) if given."""
        infos: list[BoxInfo] = await _resolved(self._native.list_info())
        return infos if state is None else [i for i in infos if i.status == state]

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        """Deletes a box (disk and record); a running box needs ``force=True``;
        ``BoxNotFoundError`` if there is none."""
        await self._native.remove(id_or_name, force)

    async def import_box(self, archive_path: PathLike, name: str | None = None, *, untrusted: bool = False) -> Box:
        """A stopped box made from an archive written by ``Box.export``, named ``name`` (else
        unnamed). The archive is verified (checksums, sizes, member names, the disk's format)
        before it is used; a bad one is a ``StorageError`` that leaves nothing behind.
        ``untrusted=True`` also refuses archives whose options use host paths or ports."""
        native = await self._native.import_box(os.fspath(archive_path), name, untrusted=untrusted)
        return Box(native)

    def metrics(self) -> _native.RuntimeMetrics:
        """Runtime-wide counters, live (``await runtime.metrics()`` works too)."""
        return self._native.metrics()

    def close(self) -> Completed[None] | asyncio.Future[None]:
        """Stops every box this runtime started or handles, concurrently. Works awaited or
        not: inside an event loop the stop is under way at once (awaiting waits for it);
        without one it finishes before ``close()`` returns."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._native.close_blocking()
            return Completed(None)
        future: asyncio.Future[None] = self._native.close()
        future.add_done_callback(_consume_error)
        return future

    async def shutdown(self, timeout: float | None = None) -> None:
        """The published package's name for ``close()``. Each box's stop is bounded by
        ``Options.stop_timeout``; ``timeout`` is accepted for compatibility."""
        await self.close()

    async def __aenter__(self) -> Boxlite:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __enter__(self) -> Boxlite:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._native.close_blocking()


async def _resolved(value: Any) -> Any:
    """``value``, or what it gives when it is a coroutine (a remote backend's lookups are)."""
    return await value if inspect.iscoroutine(value) else value


def _consume_error(future: asyncio.Future[None]) -> None:
    """A close nobody awaited must not log "exception was never retrieved"."""
    if not future.cancelled():
        future.exception()
