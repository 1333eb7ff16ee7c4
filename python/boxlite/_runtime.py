"""The async API: ``Boxlite`` makes ``Box``es; ``Box.exec`` starts ``Execution``s."""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import tempfile
from collections.abc import AsyncIterator, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from . import _native
from .errors import (
    BoxliteError,
    BoxNotFoundError,
    InternalError,
    InvalidArgumentError,
    InvalidStateError,
    NotSupportedError,
)
from .images import ImageRegistry, Images, _registries

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
    ``boot_timeout`` and ``stop_timeout`` are seconds. ``image_registries`` says how to reach
    registries and which to search for short names (see ``ImageRegistry``; a plain ``str`` is
    a searched HTTPS host).
    """

    home_dir: PathLike | None = None
    boot_timeout: float | None = None
    stop_timeout: float | None = None
    image_registries: Iterable[ImageRegistry | str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_registries", tuple(_registries(self.image_registries)))


@dataclass(frozen=True, repr=False)
class BoxOptions:
    """What a box is made of. Checked when constructed; a bad field raises
    ``InvalidArgumentError`` naming it, a feature this version lacks ``NotSupportedError``.

    Give ``image`` (a registry reference such as ``"python:slim"``) or ``rootfs_path`` (an
    OCI image layout directory). ``cpus`` defaults to 1 and ``memory_mib`` to 512; ``env``
    takes a mapping or ``(name, value)`` pairs. ``entrypoint`` and ``cmd`` override the
    image's ENTRYPOINT and CMD in the box's default command (``Box.exec()`` without a
    command runs it, under a terminal when ``tty=True``). ``name`` may also be given to
    ``Boxlite.create``. The fields order follows the published ``boxlite`` package.
    """

    image: str | None = None
    rootfs_path: PathLike | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    disk_size_gb: float | None = None
    working_dir: str | None = None
    env: EnvLike = field(default_factory=list)
    volumes: Sequence[Any] = ()
    network: Any = None
    ports: Sequence[Any] = ()
    auto_remove: bool = False
    auto_stop: bool | None = None
    auto_delete: bool | None = None
    auto_resume: bool | None = None
    detach: bool = False
    entrypoint: Sequence[str] | None = None
    cmd: Sequence[str] | None = None
    user: str | None = None
    tty: bool = False
    advanced: Any = None
    secrets: Sequence[Any] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if self.image is None and self.rootfs_path is None:
            raise InvalidArgumentError(
                "invalid argument `rootfs_path`: give an OCI image layout directory (rootfs_path) or an image"
            )
        if self.image is not None and self.rootfs_path is not None:
            raise InvalidArgumentError("invalid argument `image`: give either image or rootfs_path, not both")
        if self.image is not None and (not isinstance(self.image, str) or not self.image.strip()):
            raise InvalidArgumentError(f"invalid argument `image`: expected an image reference, got {self.image!r}")
        object.__setattr__(self, "cpus", 1 if self.cpus is None else _positive_int("cpus", self.cpus, 1))
        memory = 512 if self.memory_mib is None else _positive_int("memory_mib", self.memory_mib, 128)
        object.__setattr__(self, "memory_mib", memory)
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
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise InvalidArgumentError(f"invalid argument `name`: expected a non-empty str, got {self.name!r}")
        if self.user is not None and (not isinstance(self.user, str) or not self.user):
            raise InvalidArgumentError(f"invalid argument `user`: expected a non-empty str, got {self.user!r}")
        for flag in ("auto_remove", "detach", "tty"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidArgumentError(f"invalid argument `{flag}`: expected a bool, got {getattr(self, flag)!r}")
        object.__setattr__(self, "env", _env_pairs("env", self.env))
        for argv_field in ("entrypoint", "cmd"):
            value = getattr(self, argv_field)
            if value is not None:
                object.__setattr__(self, argv_field, _argv(argv_field, value))
        for unsupported in ("volumes", "ports", "secrets"):
            if getattr(self, unsupported):
                raise NotSupportedError(f"`{unsupported}` are not supported by this version of boxlite")
        for unsupported in ("network", "advanced"):
            if getattr(self, unsupported) is not None:
                raise NotSupportedError(f"`{unsupported}` options are not supported by this version of boxlite")
        for unsupported in ("auto_stop", "auto_delete", "auto_resume"):
            if getattr(self, unsupported):
                raise NotSupportedError(
                    f"`{unsupported}=True` is not supported by this version of boxlite (boxes run until stopped; "
                    "use auto_remove=True to delete a box when it stops)"
                )

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            default = _BOX_OPTION_DEFAULTS.get(f.name)
            if value != default and not (f.name in ("env", "volumes", "ports", "secrets") and not value):
                shown.append(f"{f.name}={os.fspath(value) if f.name == 'rootfs_path' else value!r}")
        return f"BoxOptions({', '.join(shown)})"


_BOX_OPTION_DEFAULTS: dict[str, object] = {
    "cpus": 1,
    "memory_mib": 512,
    "auto_remove": False,
    "detach": False,
    "tty": False,
}


def _argv(field_name: str, value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgumentError(f"invalid argument `{field_name}`: expected a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str) or "\0" in item:
            raise InvalidArgumentError(f"invalid argument `{field_name}`: {item!r} is not a string without NUL bytes")
    return list(value)


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

    @property
    def running(self) -> bool:
        return self.state.running

    def __await__(self) -> Generator[Any, None, BoxInfo]:
        """``await box.info()`` works too (the published package's ``info()`` is async)."""
        return self
        yield  # pragma: no cover - makes this a generator

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
            result = await self._native.wait()
        except asyncio.CancelledError:
            self._kill_quietly()
            raise
        return ExecResult(
            result.exit_code,
            _decode(result.stdout),
            _decode(result.stderr),
            signal=result.signal,
            stdout_bytes=result.stdout,
            stderr_bytes=result.stderr,
        )

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
        return BoxInfo._from_native(self._native.info())

    @property
    def default_command(self) -> list[str]:
        """What ``exec()`` without a command runs: the image's ENTRYPOINT and CMD, with the
        box's ``entrypoint``/``cmd`` options applied as Docker does (a new entrypoint drops
        the image's CMD). Empty if neither says anything."""
        raw = self._native.info()
        image = raw["image_config"]
        saved = _read_command(Path(raw["dir"]))
        entrypoint = saved.get("entrypoint")
        cmd = saved.get("cmd")
        if entrypoint is None:
            entrypoint = list(image["entrypoint"])
            if cmd is None:
                cmd = list(image["cmd"])
        return [*entrypoint, *(cmd or [])]

    @property
    def dir(self) -> Path:
        """The box directory on the host (its disk, console log, supervisor log)."""
        return Path(self._native.info()["dir"])

    async def exec(
        self,
        cmd: str | None = None,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] | None = None,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> Execution:
        """Starts ``cmd args...`` in the box and returns at once; ``await (...).wait()`` for
        the result. ``env`` adds to the image's and the box's environment. ``tty=True`` runs
        under a terminal the size of this process's (or 24x80); ``tty=(rows, cols)`` sets it.

        Without ``cmd`` it runs the box's ``default_command`` (the image's ENTRYPOINT/CMD or
        the box's overrides), under a terminal if the box was created with ``tty=True``."""
        if isinstance(args, str):
            raise InvalidArgumentError("invalid argument `args`: pass a list of arguments, not one string")
        if cmd is None:
            argv = self.default_command
            if not argv:
                raise InvalidArgumentError(
                    "invalid argument `cmd`: no command given, and the box has no default "
                    "(its image sets no ENTRYPOINT or CMD and the box options none)"
                )
            cmd, args = argv[0], [*argv[1:], *(args or [])]
            if tty is None:
                tty = bool(_read_command(self.dir).get("tty", False))
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

    async def read_file(self, path: str) -> bytes:
        """The contents of the regular file ``path`` in the box. Read by the guest agent, so
        the image needs no tools for it; ``InvalidArgumentError`` if it is missing or not a
        file."""
        with tempfile.TemporaryDirectory(prefix="boxlite-read-") as tmp:
            target = Path(tmp) / "file"
            await self._native.copy_out(path, os.fspath(target))
            return await asyncio.to_thread(_read_regular, target, path)

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Writes ``data`` (``str`` as UTF-8) to ``path`` in the box with permission bits
        ``mode``, replacing the file and creating missing parent directories (owned by
        root)."""
        if not isinstance(path, str) or not path.startswith("/") or path.endswith("/"):
            raise InvalidArgumentError(f"invalid argument `path`: {path!r} must be an absolute file path in the box")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise InvalidArgumentError(f"invalid argument `mode`: {mode!r} is not a permission mode")
        payload = data.encode() if isinstance(data, str) else bytes(data)
        with tempfile.TemporaryDirectory(prefix="boxlite-write-") as tmp:
            source = Path(tmp) / path.rsplit("/", 1)[1]
            await asyncio.to_thread(_write_with_mode, source, payload, mode)
            await self._native.copy_in(os.fspath(source), path)

    async def list_dir(self, path: str) -> list[str]:
        """The names in the directory ``path`` of the box, sorted (no ``.`` and ``..``).
        Uses the image's ``find`` (busybox or findutils); ``InvalidArgumentError`` if
        ``path`` is not a directory."""
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgumentError(f"invalid argument `path`: {path!r} must be an absolute path in the box")
        prefix = path.rstrip("/") + "/"
        execution = await self.exec("find", [prefix, "-mindepth", "1", "-maxdepth", "1", "-print0"], user="0:0")
        result = await execution.wait()
        if result.exit_code != 0:
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.exit_code}"
            raise InvalidArgumentError(f"invalid argument `path`: cannot list {path!r} in the box: {reason}")
        entries = result.stdout_bytes.split(b"\0")
        return sorted(e[len(prefix) :].decode(errors="surrogateescape") for e in entries if e)

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


#: Per-box file with the ``entrypoint``/``cmd``/``tty`` options (they shape only the
#: default command, which the core does not know about).
_COMMAND_FILE = "command.json"


def _read_command(box_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((box_dir / _COMMAND_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_command(box_dir: Path, options: BoxOptions) -> None:
    if options.entrypoint is None and options.cmd is None and not options.tty:
        return
    data = {"entrypoint": options.entrypoint, "cmd": options.cmd, "tty": options.tty}
    tmp = box_dir / (_COMMAND_FILE + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(box_dir / _COMMAND_FILE)


def _read_regular(target: Path, box_path: str) -> bytes:
    if not target.is_file() or target.is_symlink():
        raise InvalidArgumentError(f"invalid argument `path`: {box_path!r} is not a regular file in the box")
    return target.read_bytes()


def _write_with_mode(target: Path, data: bytes, mode: int) -> None:
    target.write_bytes(data)
    target.chmod(mode)


def _named(options: BoxOptions, name: str | None) -> BoxOptions:
    if name is None or name == options.name:
        return options
    if options.name is not None:
        raise InvalidArgumentError(
            f"invalid argument `name`: {name!r} differs from the options' name {options.name!r}; give one"
        )
    return replace(options, name=name)


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
            image_registries=[r._native_tuple() for r in _registries(options.image_registries)],
        )
        self._images = Images(self._native.images())

    @classmethod
    def default(cls) -> Boxlite:
        """A runtime at ``$BOXLITE_HOME`` or ``~/.boxlite``."""
        return cls(Options())

    @property
    def home_dir(self) -> Path:
        return Path(self._native.home_dir)

    @property
    def images(self) -> Images:
        """The image store: ``pull``, ``list``, ``get``, ``remove``, ``gc``."""
        return self._images

    async def create(self, options: BoxOptions, name: str | None = None) -> Box:
        """Creates a box and boots it; returns when it is ready for commands. ``name`` (or
        ``options.name``) must be unique in this home."""
        options = _named(options, name)
        rootfs = os.fspath(options.rootfs_path) if options.rootfs_path is not None else None
        native = await self._native.create(
            rootfs_path=rootfs,
            image=options.image,
            name=options.name,
            cpus=options.cpus or 1,
            memory_mib=options.memory_mib or 512,
            working_dir=options.working_dir,
            env=list(options.env or []),  # type: ignore[arg-type]
            user=options.user,
            disk_size_gb=options.disk_size_gb,
            auto_remove=options.auto_remove,
            detach=options.detach,
        )
        box = Box(native)
        try:
            await asyncio.to_thread(_write_command, box.dir, options)
        except OSError as e:
            await box.stop()
            raise InternalError(f"could not record the box's command options in {box.dir}: {e}") from e
        return box

    async def get_or_create(self, options: BoxOptions, name: str | None = None) -> tuple[Box, bool]:
        """The box named ``name`` (or ``options.name``), started if it is stopped, or a new
        one made from ``options``; returns ``(box, created)``. Without a name it always
        creates."""
        options = _named(options, name)
        if options.name is None:
            return await self.create(options), True
        for _ in range(3):
            try:
                box = await self.get(options.name)
            except BoxNotFoundError:
                try:
                    return await self.create(options), True
                except InvalidArgumentError as e:
                    if "already exists" in str(e):
                        continue  # another task or process created it first
                    raise
            if box.info().status in ("stopped", "configured"):
                try:
                    await box.start()
                except InvalidStateError:
                    pass  # started meanwhile by someone else
            return box, False
        raise InvalidStateError(f"box {options.name!r} keeps appearing and disappearing; try again")

    async def get(self, id_or_name: str) -> Box:
        """A box by id or name, also one created by another process with the same home
        (a running one is reattached); ``BoxNotFoundError`` otherwise."""
        return Box(self._native.get(id_or_name))

    async def get_info(self, id_or_name: str) -> BoxInfo:
        return BoxInfo._from_native(self._native.get(id_or_name).info())

    async def list_info(self, state: str | None = None) -> list[BoxInfo]:
        """Every box of this home, oldest first; only those with status ``state``
        (``"running"``, ``"stopped"``, ...) if given."""
        infos = [BoxInfo._from_native(raw) for raw in self._native.list_info()]
        return infos if state is None else [i for i in infos if i.status == state]

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        """Deletes a box (disk and record); a running box needs ``force=True``."""
        await self._native.remove(id_or_name, force)

    def metrics(self) -> _native.RuntimeMetrics:
        """Runtime-wide counters, live (``await runtime.metrics()`` works too)."""
        return self._native.metrics()

    async def close(self) -> None:
        """Stops every box this runtime handles (started or reattached here), concurrently."""
        results = await asyncio.gather(*(native.stop() for native in self._native.boxes()), return_exceptions=True)
        for result in results:
            if isinstance(result, InvalidStateError):
                continue  # already stopped or removed
            if isinstance(result, BaseException):
                raise result

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
