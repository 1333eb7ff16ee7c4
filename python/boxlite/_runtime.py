"""The async API: ``Boxlite`` makes ``Box``es; ``Box.exec`` starts ``Execution``s."""

from __future__ import annotations

import codecs
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _native
from .errors import InvalidArgumentError

PathLike = str | os.PathLike[str]
EnvLike = Mapping[str, str] | Iterable[tuple[str, str]] | None

#: The guest bundle shipped inside the installed package, if the wheel carries one.
PACKAGE_GUEST_DIR = Path(__file__).parent / "guest"
#: The per-box supervisor binary shipped inside the installed package.
PACKAGE_SHIM = Path(__file__).parent / "bin" / "boxlite-shim"


def _env_pairs(field_name: str, env: EnvLike) -> list[tuple[str, str]]:
    if env is None:
        return []
    items = env.items() if isinstance(env, Mapping) else env
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise InvalidArgumentError(f"invalid argument `{field_name}`: expected (name, value) pairs, got {item!r}")
        key, value = item
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgumentError(f"invalid argument `{field_name}`: names and values must be str, got {item!r}")
        if not key or "=" in key or "\0" in key:
            raise InvalidArgumentError(
                f"invalid argument `{field_name}`: variable name {key!r} must be non-empty and contain no '=' or NUL"
            )
        pairs.append((key, value))
    return pairs


def _positive_int(field_name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"invalid argument `{field_name}`: expected an int, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"invalid argument `{field_name}`: {value} is below the minimum of {minimum}")
    return value


@dataclass(frozen=True)
class Options:
    """How a runtime is set up.

    ``home_dir`` holds boxes, images and state (default ``$BOXLITE_HOME`` or ``~/.boxlite``).
    ``boot_timeout`` and ``stop_timeout`` are seconds.
    """

    home_dir: PathLike | None = None
    boot_timeout: float | None = None
    stop_timeout: float | None = None


@dataclass(frozen=True)
class BoxOptions:
    """What a box is made of. Checked when constructed; a bad field raises
    ``InvalidArgumentError`` naming it."""

    image: str | None = None
    rootfs_path: PathLike | None = None
    name: str | None = None
    cpus: int = 1
    memory_mib: int = 512
    working_dir: str | None = None
    env: EnvLike = field(default_factory=list)
    user: str | None = None
    disk_size_gb: float | None = None
    auto_remove: bool = False
    detach: bool = False

    def __post_init__(self) -> None:
        if self.image is None and self.rootfs_path is None:
            raise InvalidArgumentError(
                "invalid argument `rootfs_path`: give an OCI image layout directory (rootfs_path) or an image"
            )
        _positive_int("cpus", self.cpus, 1)
        _positive_int("memory_mib", self.memory_mib, 128)
        if self.working_dir is not None and not str(self.working_dir).startswith("/"):
            raise InvalidArgumentError(
                f"invalid argument `working_dir`: {self.working_dir!r} must be an absolute path inside the box"
            )
        if self.disk_size_gb is not None and (
            isinstance(self.disk_size_gb, bool)
            or not isinstance(self.disk_size_gb, int | float)
            or self.disk_size_gb <= 0
        ):
            raise InvalidArgumentError(
                f"invalid argument `disk_size_gb`: expected a positive number, got {self.disk_size_gb!r}"
            )
        object.__setattr__(self, "env", _env_pairs("env", self.env))


@dataclass(frozen=True)
class BoxState:
    """Where a box is in its life: ``status`` is one of configured, starting, running,
    stopping, stopped, failed."""

    status: str
    running: bool
    pid: int | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class BoxInfo:
    """What a box is. ``pid`` is its VM engine process while it runs."""

    id: str
    name: str | None
    state: BoxState
    image: str
    cpus: int
    memory_mib: int
    created_at: datetime
    started_at: datetime | None
    pid: int | None
    accelerator: str
    hardware_isolated: bool
    detach: bool
    auto_remove: bool

    @property
    def status(self) -> str:
        return self.state.status

    @classmethod
    def _from_native(cls, raw: dict[str, Any]) -> BoxInfo:
        def when(ts: float | None) -> datetime | None:
            return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)

        status = raw["status"]
        return cls(
            id=raw["id"],
            name=raw["name"],
            state=BoxState(status=status, running=status == "running", pid=raw["pid"]),
            image=raw["image"],
            cpus=raw["cpus"],
            memory_mib=raw["memory_mib"],
            created_at=when(raw["created_at"]) or datetime.now(tz=timezone.utc),
            started_at=when(raw["started_at"]),
            pid=raw["pid"],
            accelerator=raw["accelerator"],
            hardware_isolated=raw["hardware_isolated"],
            detach=raw["detach"],
            auto_remove=raw["auto_remove"],
        )


class ExecResult:
    """How a command ended: ``exit_code`` (``128 + signal`` if a signal killed it), and the
    ``stdout``/``stderr`` text not already read through the streams."""

    __slots__ = ("error_message", "exit_code", "signal", "stderr", "stderr_bytes", "stdout", "stdout_bytes")

    def __init__(
        self,
        exit_code: int,
        stdout: str = "",
        stderr: str = "",
        error_message: str | None = None,
        *,
        signal: int | None = None,
        stdout_bytes: bytes | None = None,
        stderr_bytes: bytes | None = None,
    ) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.error_message = error_message
        self.signal = signal
        self.stdout_bytes = stdout.encode() if stdout_bytes is None else stdout_bytes
        self.stderr_bytes = stderr.encode() if stderr_bytes is None else stderr_bytes

    @property
    def success(self) -> bool:
        return self.exit_code == 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExecResult):
            return NotImplemented
        return (self.exit_code, self.stdout, self.stderr, self.signal) == (
            other.exit_code,
            other.stdout,
            other.stderr,
            other.signal,
        )

    def __repr__(self) -> str:
        def short(text: str) -> str:
            return repr(text if len(text) <= 60 else text[:57] + "...")

        extra = f", signal={self.signal}" if self.signal is not None else ""
        return (
            f"ExecResult(exit_code={self.exit_code}, stdout={short(self.stdout)}, stderr={short(self.stderr)}{extra})"
        )


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


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

    async def write(self, data: bytes | str) -> None:
        await self._native.write(data.encode() if isinstance(data, str) else bytes(data))

    async def close(self) -> None:
        await self._native.close()


class Execution:
    """A command running in a box."""

    def __init__(self, native: _native.NativeExecution) -> None:
        self._native = native

    @property
    def id(self) -> str:
        return self._native.id

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
        """Waits for the command to end; raises ``ExecTimeoutError`` if it timed out."""
        result = await self._native.wait()
        return ExecResult(
            result.exit_code,
            _decode(result.stdout),
            _decode(result.stderr),
            signal=result.signal,
            stdout_bytes=result.stdout,
            stderr_bytes=result.stderr,
        )

    def kill(self, signal: int = 9) -> None:
        """Sends ``signal`` (default SIGKILL) to the command's process group."""
        self._native.kill(signal)

    def resize_tty(self, rows: int, cols: int) -> None:
        self._native.resize_tty(rows, cols)


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
        return BoxInfo._from_native(self._native.info())

    @property
    def dir(self) -> Path:
        """The box directory on the host (its disk, console log, supervisor log)."""
        return Path(self._native.info()["dir"])

    async def exec(
        self,
        cmd: str,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] = False,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> Execution:
        """Starts ``cmd args...`` in the box and returns at once; ``await (...).wait()`` for
        the result. ``env`` adds to the image's and the box's environment. ``tty=True`` runs
        under a terminal the size of this process's (or 24x80); ``tty=(rows, cols)`` sets it."""
        if isinstance(args, str):
            raise InvalidArgumentError("invalid argument `args`: pass a list of arguments, not one string")
        native = await self._native.exec(
            cmd,
            list(args or []),
            env=_env_pairs("env", env),
            cwd=cwd,
            user=user,
            tty=_terminal_size() if tty is True else (tty or None),
            timeout_secs=timeout_secs,
        )
        return Execution(native)

    async def copy_in(self, host_path: PathLike, box_path: str) -> None:
        """Copies a host file or directory into the box: to ``box_path`` exactly, or into it
        when it ends with ``/``."""
        await self._native.copy_in(os.fspath(host_path), box_path)

    async def copy_out(self, box_path: str, host_path: PathLike) -> None:
        """Copies a box file or directory to the host: to ``host_path`` exactly, or into it
        when it is an existing directory or ends with ``/``."""
        await self._native.copy_out(box_path, os.fspath(host_path))

    async def start(self) -> None:
        await self._native.start()

    async def stop(self) -> None:
        await self._native.stop()

    async def metrics(self) -> _native.BoxMetrics:
        return await self._native.metrics()

    async def __aenter__(self) -> Box:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"Box(id={self.id!r}, name={self.name!r}, status={self.info().status!r})"


def _terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size() if os.isatty(1) else os.terminal_size((80, 24))
    return (size.lines, size.columns)


class Boxlite:
    """The runtime. ``async with Boxlite(...)`` stops its boxes at the end."""

    def __init__(self, options: Options | None = None) -> None:
        options = options or Options()
        guest_dir = PACKAGE_GUEST_DIR if PACKAGE_GUEST_DIR.is_dir() else None
        shim = PACKAGE_SHIM if PACKAGE_SHIM.is_file() else None
        self._native = _native.Runtime(
            home_dir=os.fspath(options.home_dir) if options.home_dir is not None else None,
            guest_dir=guest_dir,
            shim_path=shim,
            boot_timeout_secs=options.boot_timeout,
            stop_timeout_secs=options.stop_timeout,
        )

    @classmethod
    def default(cls) -> Boxlite:
        """A runtime at ``$BOXLITE_HOME`` or ``~/.boxlite``."""
        return cls(Options())

    @property
    def home_dir(self) -> Path:
        return Path(self._native.home_dir)

    async def create(self, options: BoxOptions) -> Box:
        """Creates a box and boots it; returns when it is ready for commands."""
        rootfs = os.fspath(options.rootfs_path) if options.rootfs_path is not None else None
        native = await self._native.create(
            rootfs_path=rootfs,
            image=options.image,
            name=options.name,
            cpus=options.cpus,
            memory_mib=options.memory_mib,
            working_dir=options.working_dir,
            env=list(options.env or []),  # type: ignore[arg-type]
            user=options.user,
            disk_size_gb=options.disk_size_gb,
            auto_remove=options.auto_remove,
            detach=options.detach,
        )
        return Box(native)

    async def get(self, id_or_name: str) -> Box:
        """A box by id or name, also one created by another process with the same home
        (a running one is reattached); ``BoxNotFoundError`` otherwise."""
        return Box(self._native.get(id_or_name))

    async def get_info(self, id_or_name: str) -> BoxInfo:
        return BoxInfo._from_native(self._native.get(id_or_name).info())

    async def list_info(self) -> list[BoxInfo]:
        """Every box of this home, oldest first."""
        return [BoxInfo._from_native(raw) for raw in self._native.list_info()]

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        """Deletes a box (disk and record); a running box needs ``force=True``."""
        await self._native.remove(id_or_name, force)

    def metrics(self) -> _native.RuntimeMetrics:
        return self._native.metrics()

    async def close(self) -> None:
        """Stops every box this runtime started."""
        for native in self._native.boxes():
            await native.stop()

    async def __aenter__(self) -> Boxlite:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
