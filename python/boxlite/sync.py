"""The blocking API, for scripts and notebooks.

Every call runs the async API on one private event loop in a background thread and waits for
it, so it works the same in a plain script and inside a running event loop (a Jupyter cell, an
async web handler), where ``asyncio.run`` would refuse.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ._native import BoxMetrics, RuntimeMetrics
from ._runtime import Box, BoxInfo, Boxlite, BoxOptions, EnvLike, ExecResult, Execution, Options, PathLike
from .errors import InvalidStateError
from .simplebox import CodeBox, SimpleBox

T = TypeVar("T")

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
    """Runs `coro` on the private loop and blocks until it is done."""
    loop = _background_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise InvalidStateError("the sync API cannot be called from its own event loop thread")
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


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


class SyncExecution:
    def __init__(self, execution: Execution) -> None:
        self._execution = execution

    @property
    def id(self) -> str:
        return self._execution.id

    def stdout(self, binary: bool = False) -> Iterator[Any]:
        return _iterate(self._execution.stdout(binary))

    def stderr(self, binary: bool = False) -> Iterator[Any]:
        return _iterate(self._execution.stderr(binary))

    def write_stdin(self, data: bytes | str, close: bool = False) -> None:
        """Writes to stdin (taking the writer on first use); ``close=True`` sends EOF after."""
        writer = getattr(self, "_stdin", None) or self._execution.stdin()
        if writer is None:
            raise ValueError("stdin was already taken")
        self._stdin = writer
        _run(writer.write(data))
        if close:
            _run(writer.close())

    def wait(self) -> ExecResult:
        return _run(self._execution.wait())

    def kill(self, signal: int = 9) -> None:
        self._execution.kill(signal)

    def resize_tty(self, rows: int, cols: int) -> None:
        self._execution.resize_tty(rows, cols)


class SyncBox:
    def __init__(self, box: Box) -> None:
        self._box = box

    @property
    def id(self) -> str:
        return self._box.id

    @property
    def name(self) -> str | None:
        return self._box.name

    def info(self) -> BoxInfo:
        return self._box.info()

    def exec(
        self,
        cmd: str,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] = False,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> SyncExecution:
        execution = _run(self._box.exec(cmd, args, env, tty, user, timeout_secs, cwd))
        return SyncExecution(execution)

    def copy_in(self, host_path: PathLike, box_path: str) -> None:
        _run(self._box.copy_in(host_path, box_path))

    def copy_out(self, box_path: str, host_path: PathLike) -> None:
        _run(self._box.copy_out(box_path, host_path))

    def start(self) -> None:
        _run(self._box.start())

    def stop(self) -> None:
        _run(self._box.stop())

    def metrics(self) -> BoxMetrics:
        return _run(self._box.metrics())

    def __enter__(self) -> SyncBox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SyncBoxlite:
    def __init__(self, options: Options | None = None) -> None:
        self._runtime = Boxlite(options)

    @classmethod
    def default(cls) -> SyncBoxlite:
        return cls(Options())

    def create(self, options: BoxOptions) -> SyncBox:
        return SyncBox(_run(self._runtime.create(options)))

    def get(self, id_or_name: str) -> SyncBox:
        return SyncBox(_run(self._runtime.get(id_or_name)))

    def get_info(self, id_or_name: str) -> BoxInfo:
        return _run(self._runtime.get_info(id_or_name))

    def list_info(self) -> list[BoxInfo]:
        return _run(self._runtime.list_info())

    def remove(self, id_or_name: str, force: bool = False) -> None:
        _run(self._runtime.remove(id_or_name, force))

    def metrics(self) -> RuntimeMetrics:
        return self._runtime.metrics()

    def close(self) -> None:
        _run(self._runtime.close())

    def __enter__(self) -> SyncBoxlite:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class SyncSimpleBox:
    def __init__(self, image: str | None = None, **kwargs: Any) -> None:
        self._inner = SimpleBox(image, **kwargs)

    @property
    def id(self) -> str:
        return self._inner.id

    def start(self) -> SyncSimpleBox:
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

    def shutdown(self) -> None:
        _run(self._inner.shutdown())

    def __enter__(self) -> SyncSimpleBox:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()


class SyncCodeBox(SyncSimpleBox):
    def __init__(self, image: str | None = None, **kwargs: Any) -> None:
        self._inner = CodeBox(image, **kwargs)
        self._code = self._inner

    def run(self, code: str, timeout: float | None = None) -> str:
        return _run(self._code.run(code, timeout=timeout))

    def install_package(self, name: str, timeout: float | None = None) -> str:
        return _run(self._code.install_package(name, timeout=timeout))

    def install_packages(self, names: list[str], timeout: float | None = None) -> str:
        return _run(self._code.install_packages(names, timeout=timeout))


__all__ = ["SyncBox", "SyncBoxlite", "SyncCodeBox", "SyncExecution", "SyncSimpleBox"]
