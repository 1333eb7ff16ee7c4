"""The blocking API, for scripts and notebooks.

Every call runs the async API on one private event loop in a background thread and waits for
it, so it works the same in a plain script and inside a running event loop (a Jupyter cell, an
async web handler), where ``asyncio.run`` would refuse.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._native import (
    BoxInfo,
    BoxMetrics,
    BoxOptions,
    CloneOptions,
    CopyOptions,
    ExecResult,
    ExportOptions,
    GcReport,
    ImageInfo,
    Options,
    RuntimeMetrics,
    SnapshotHandle,
    SnapshotInfo,
    SnapshotOptions,
)
from ._runtime import Box, Boxlite, EnvLike, ExecStdin, Execution, ExecutionId, PathLike
from .errors import InvalidStateError
from .images import Images, ProgressCallback
from .interpreter import CodeContext, CodeError, CodeExecution, CodeOutput, CodeResult, CodeStream
from .simplebox import CodeBox, SimpleBox

if TYPE_CHECKING:
    from .rest.options import BoxliteRestOptions

T = TypeVar("T")
_S = TypeVar("_S", bound="SyncSimpleBox")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="boxlite-sync", daemon=True)
            thread.start()
            _loop = loop
        return _loop


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs `coro` on the private loop and blocks until it is done. An interrupt while
    blocked (Ctrl-C) cancels it there, exactly as cancelling an async task would (a waited-for
    execution is killed), and waits briefly for that to happen before re-raising."""
    loop = _background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise InvalidStateError("the sync API cannot be called from its own event loop thread")
    finished = threading.Event()

    async def tracked() -> T:
        try:
            return await coro
        finally:
            finished.set()

    future = asyncio.run_coroutine_threadsafe(tracked(), loop)
    try:
        return future.result()
    except BaseException:
        if not future.done():
            future.cancel()
            finished.wait(_CANCEL_GRACE)
        raise


#: How long an interrupted call waits for its cancellation to reach the box.
_CANCEL_GRACE = 5.0


def _iterate(stream: AsyncIterator[T]) -> Iterator[T]:
    async def next_item() -> tuple[bool, T | None]:
        try:
            return True, await stream.__anext__()
        except StopAsyncIteration:
            return False, None

    while True:
        more, item = _run(next_item())
        if not more:
            return
        yield item  # type: ignore[misc]


class SyncExecStdin:
    """Blocking stdin writer of a ``SyncExecution``."""

    def __init__(self, stdin: ExecStdin) -> None:
        self._stdin = stdin

    def write(self, data: bytes | str) -> None:
        _run(self._stdin.write(data))

    def send_input(self, data: bytes | str) -> None:
        """The published package's name for ``write``."""
        self.write(data)

    def close(self) -> None:
        _run(self._stdin.close())

    def is_closed(self) -> bool:
        return self._stdin.is_closed()

    def __enter__(self) -> SyncExecStdin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncExecution:
    """Blocking twin of ``Execution``. Interrupting ``wait()`` (Ctrl-C) kills the command."""

    def __init__(self, execution: Execution) -> None:
        self._execution = execution
        self._stdin: SyncExecStdin | None = None

    @property
    def id(self) -> ExecutionId:
        return self._execution.id

    @property
    def pid(self) -> int:
        return self._execution.pid

    def stdout(self, binary: bool = False) -> Iterator[Any]:
        """Text lines (or ``bytes`` chunks with ``binary=True``) as they come."""
        return _iterate(self._execution.stdout(binary))

    def stderr(self, binary: bool = False) -> Iterator[Any]:
        return _iterate(self._execution.stderr(binary))

    def stdin(self) -> SyncExecStdin | None:
        """The stdin writer (once), or None once taken."""
        native = self._execution.stdin()
        return None if native is None else SyncExecStdin(native)

    def write_stdin(self, data: bytes | str, close: bool = False) -> None:
        """Writes to stdin (taking the writer on first use); ``close=True`` sends EOF after."""
        if self._stdin is None:
            self._stdin = self.stdin()
            if self._stdin is None:
                raise InvalidStateError("stdin of this execution was already taken")
        self._stdin.write(data)
        if close:
            self._stdin.close()

    def wait(self) -> ExecResult:
        return _run(self._execution.wait())

    def kill(self, signal: int = 9) -> None:
        self._execution.kill(signal)

    def signal(self, sig: int) -> None:
        self._execution.signal(sig)

    def resize_tty(self, rows: int, cols: int) -> None:
        self._execution.resize_tty(rows, cols)

    def __repr__(self) -> str:
        return f"Sync{self._execution!r}"


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    # Native futures bind to the loop they are made on: make them on the private loop.
    return await make()


class SyncSnapshots:
    """Blocking twin of ``Box.snapshot``."""

    def __init__(self, handle: SnapshotHandle) -> None:
        self._handle = handle

    def create(self, *, options: SnapshotOptions | None = None, name: str) -> SnapshotInfo:
        return _run(_call(lambda: self._handle.create(options=options, name=name)))

    def list(self) -> list[SnapshotInfo]:
        return _run(_call(self._handle.list))

    def get(self, name: str) -> SnapshotInfo | None:
        return _run(_call(lambda: self._handle.get(name)))

    def remove(self, name: str) -> None:
        _run(_call(lambda: self._handle.remove(name)))

    def restore(self, name: str) -> None:
        _run(_call(lambda: self._handle.restore(name)))


class _AsyncBox(Protocol):
    """What a blocking box needs of the async box behind it: ``Box``, or ``boxlite.ray.RayBox``."""

    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def default_command(self) -> list[str]: ...
    async def exec(
        self,
        command: str | None = None,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] | None = None,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> Execution: ...
    async def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None: ...
    async def copy_out(
        self, box_path: str, host_path: PathLike, copy_options: CopyOptions | None = None, max_bytes: int | None = None
    ) -> None: ...
    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes: ...
    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None: ...
    async def list_dir(self, path: str) -> list[str]: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def metrics(self) -> BoxMetrics: ...


_B = TypeVar("_B", bound=_AsyncBox)
_SB = TypeVar("_SB", bound="_SyncBoxCalls[Any]")


class _SyncBoxCalls(Generic[_B]):
    """The blocking calls every box offers, each run on the private loop; ``with box:`` stops
    it at the end. ``SyncBox`` and ``boxlite.ray.SyncRayBox`` add their own."""

    def __init__(self, box: _B) -> None:
        self._box = box

    @property
    def box(self) -> _B:
        """The async box behind this one."""
        return self._box

    @property
    def id(self) -> str:
        return self._box.id

    @property
    def name(self) -> str | None:
        return self._box.name

    @property
    def default_command(self) -> list[str]:
        return self._box.default_command

    def exec(
        self,
        command: str | None = None,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] | None = None,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> SyncExecution:
        """Starts a command and returns at once; see ``Box.exec``."""
        execution = _run(self._box.exec(command, args, env, tty, user, timeout_secs, cwd))
        return SyncExecution(execution)

    def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None:
        _run(self._box.copy_in(host_path, box_path, copy_options))

    def copy_out(
        self,
        box_path: str,
        host_path: PathLike,
        copy_options: CopyOptions | None = None,
        max_bytes: int | None = None,
    ) -> None:
        _run(self._box.copy_out(box_path, host_path, copy_options, max_bytes))

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return _run(self._box.read_file(path, max_bytes))

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        _run(self._box.write_file(path, data, mode))

    def list_dir(self, path: str) -> list[str]:
        return _run(self._box.list_dir(path))

    def start(self) -> None:
        _run(self._box.start())

    def stop(self) -> None:
        _run(self._box.stop())

    def metrics(self) -> BoxMetrics:
        return _run(self._box.metrics())

    def __enter__(self: _SB) -> _SB:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Sync{self._box!r}"


class SyncBox(_SyncBoxCalls[Box]):
    """Blocking twin of ``Box``; ``with box:`` stops it at the end."""

    @property
    def dir(self) -> Path:
        return self._box.dir

    def info(self) -> BoxInfo:
        return self._box.info()

    def pause(self) -> None:
        _run(self._box.pause())

    def resume(self) -> None:
        _run(self._box.resume())

    def fork(self, name: str | None = None) -> SyncBox:
        return SyncBox(_run(self._box.fork(name)))

    @property
    def snapshot(self) -> SyncSnapshots:
        return SyncSnapshots(self._box.snapshot)

    def clone_box(self, *, options: CloneOptions | None = None, name: str | None = None) -> SyncBox:
        return SyncBox(_run(self._box.clone_box(options=options, name=name)))

    def export(self, *, options: ExportOptions | None = None, dest: PathLike) -> str:
        return _run(self._box.export(options=options, dest=dest))


class SyncImages:
    """Blocking twin of ``Images`` (``SyncBoxlite.images``). A ``progress`` callback of
    ``pull`` is called on the sync API's background thread."""

    def __init__(self, images: Images) -> None:
        self._images = images

    def pull(self, reference: str, progress: ProgressCallback | None = None) -> ImageInfo:
        return _run(self._images.pull(reference, progress))

    def list(self) -> list[ImageInfo]:
        return _run(self._images.list())

    def get(self, reference: str) -> ImageInfo:
        return _run(self._images.get(reference))

    def remove(self, reference: str) -> None:
        _run(self._images.remove(reference))

    def gc(self) -> GcReport:
        return _run(self._images.gc())


class SyncBoxlite:
    """Blocking twin of ``Boxlite``; ``with SyncBoxlite(...)`` stops its boxes at the end."""

    def __init__(self, options: Options | None = None) -> None:
        self._runtime = Boxlite(options)
        self._images = SyncImages(self._runtime.images)

    @classmethod
    def default(cls) -> SyncBoxlite:
        return cls(Options())

    @classmethod
    def rest(cls, options: BoxliteRestOptions) -> SyncBoxlite:
        """A blocking runtime whose boxes live on a ``boxlite serve`` server
        (``Boxlite.rest``)."""
        runtime = cls.__new__(cls)
        runtime._runtime = Boxlite.rest(options)
        runtime._images = SyncImages(runtime._runtime.images)
        return runtime

    @property
    def runtime(self) -> Boxlite:
        """The async ``Boxlite`` behind this one."""
        return self._runtime

    @property
    def home_dir(self) -> Path:
        return self._runtime.home_dir

    @property
    def images(self) -> SyncImages:
        return self._images

    def create(self, options: BoxOptions, name: str | None = None) -> SyncBox:
        return SyncBox(_run(self._runtime.create(options, name)))

    def get_or_create(self, options: BoxOptions, name: str | None = None) -> tuple[SyncBox, bool]:
        box, created = _run(self._runtime.get_or_create(options, name))
        return SyncBox(box), created

    def import_box(self, archive_path: PathLike, name: str | None = None, *, untrusted: bool = False) -> SyncBox:
        return SyncBox(_run(self._runtime.import_box(archive_path, name, untrusted=untrusted)))

    def get(self, id_or_name: str) -> SyncBox | None:
        box = _run(self._runtime.get(id_or_name))
        return None if box is None else SyncBox(box)

    def get_info(self, id_or_name: str) -> BoxInfo | None:
        return _run(self._runtime.get_info(id_or_name))

    def list_info(self, state: str | None = None) -> list[BoxInfo]:
        return _run(self._runtime.list_info(state))

    def remove(self, id_or_name: str, force: bool = False) -> None:
        _run(self._runtime.remove(id_or_name, force))

    def metrics(self) -> RuntimeMetrics:
        return self._runtime.metrics()

    def close(self) -> None:
        """Stops every box this runtime started or handles."""

        async def close() -> None:
            await self._runtime.close()

        _run(close())

    def shutdown(self, timeout: float | None = None) -> None:
        _run(self._runtime.shutdown(timeout))

    def start(self) -> SyncBoxlite:
        """Returns this runtime, ready (the published package's sync runtime must be started;
        this one always is)."""
        return self

    def stop(self) -> None:
        """Same as ``close()``."""
        self.close()

    def __enter__(self) -> SyncBoxlite:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncSimpleBox:
    """Blocking twin of ``SimpleBox`` (same arguments): ``with SyncSimpleBox(...) as box:``."""

    def __init__(self, image: str | None = None, *args: Any, **kwargs: Any) -> None:
        runtime = kwargs.get("runtime")
        if isinstance(runtime, SyncBoxlite):
            kwargs["runtime"] = runtime.runtime
        self._inner = self._make(image, *args, **kwargs)

    @staticmethod
    def _make(image: str | None, *args: Any, **kwargs: Any) -> SimpleBox:
        return SimpleBox(image, *args, **kwargs)

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def name(self) -> str | None:
        return self._inner.name

    @property
    def created(self) -> bool | None:
        return self._inner.created

    @property
    def box(self) -> SyncBox:
        return SyncBox(self._inner.box)

    def start(self: _S) -> _S:
        _run(self._inner.start())
        return self

    def exec(
        self,
        cmd: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        return _run(self._inner.exec(cmd, *args, env=env, cwd=cwd, user=user, timeout=timeout))

    def info(self) -> BoxInfo:
        return _run(self._inner.info())

    def metrics(self) -> BoxMetrics:
        return _run(self._inner.metrics())

    def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None:
        _run(self._inner.copy_in(host_path, box_path, copy_options))

    def copy_out(self, box_path: str, host_path: PathLike, copy_options: CopyOptions | None = None) -> None:
        _run(self._inner.copy_out(box_path, host_path, copy_options))

    def read_file(self, path: str) -> bytes:
        return _run(self._inner.read_file(path))

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        _run(self._inner.write_file(path, data, mode))

    def list_dir(self, path: str) -> list[str]:
        return _run(self._inner.list_dir(path))

    def stop(self) -> None:
        _run(self._inner.stop())

    def shutdown(self) -> None:
        _run(self._inner.shutdown())

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()


class SyncCodeBox(SyncSimpleBox):
    """Blocking twin of ``CodeBox``."""

    _inner: CodeBox

    @staticmethod
    def _make(image: str | None, *args: Any, **kwargs: Any) -> SimpleBox:
        return CodeBox(image, *args, **kwargs)

    def run(self, code: str, timeout: float | None = None, *, context: CodeContext | str | None = None) -> str:
        return _run(self._inner.run(code, timeout=timeout, context=context))

    def run_code(
        self,
        code: str,
        language: str | None = None,
        context: CodeContext | str | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[CodeResult], Any] | None = None,
        on_error: Callable[[CodeError], Any] | None = None,
    ) -> CodeExecution:
        """``CodeBox.run_code``; the callbacks run in the interpreter's thread."""
        return _run(
            self._inner.run_code(
                code,
                language,
                context,
                timeout,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                on_result=on_result,
                on_error=on_error,
            )
        )

    def stream_code(
        self,
        code: str,
        language: str | None = None,
        context: CodeContext | str | None = None,
        timeout: float | None = None,
    ) -> Generator[CodeOutput | CodeResult, None, CodeExecution]:
        """``CodeBox.stream_code`` as a plain iterator; returns (as ``StopIteration.value``,
        or ``yield from``) the ``CodeExecution``."""
        stream = _run(_make_stream(self._inner, code, language, context, timeout))
        yield from _iterate(stream)
        return stream.execution

    def create_context(
        self, language: str = "python", cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> CodeContext:
        return _run(self._inner.create_context(language, cwd=cwd, env=env))

    def list_contexts(self) -> list[CodeContext]:
        return _run(self._inner.list_contexts())

    def restart_context(self, context: CodeContext | str) -> None:
        _run(self._inner.restart_context(context))

    def remove_context(self, context: CodeContext | str) -> None:
        _run(self._inner.remove_context(context))

    def interrupt(self, context: CodeContext | str | None = None) -> None:
        _run(self._inner.interrupt(context))

    def run_script(self, script_path: PathLike, timeout: float | None = None) -> str:
        return _run(self._inner.run_script(script_path, timeout=timeout))

    def install_package(self, name: str, timeout: float | None = None) -> str:
        return _run(self._inner.install_package(name, timeout=timeout))

    def install_packages(self, *names: str | Iterable[str], timeout: float | None = None) -> str:
        return _run(self._inner.install_packages(*names, timeout=timeout))


async def _make_stream(
    codebox: CodeBox, code: str, language: str | None, context: CodeContext | str | None, timeout: float | None
) -> CodeStream:
    return codebox.stream_code(code, language=language, context=context, timeout=timeout)


#: The published package's name for ``SyncImages``.
SyncImageHandle = SyncImages

__all__ = [
    "SyncBox",
    "SyncBoxlite",
    "SyncCodeBox",
    "SyncExecStdin",
    "SyncExecution",
    "SyncImageHandle",
    "SyncImages",
    "SyncSimpleBox",
]
