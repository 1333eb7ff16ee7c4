"""Box handles that work from any driver or task: a small picklable address (the node's
runtime actor, its URL and key, the box id) and calls over the REST client. A call that cannot
reach the node asks Ray whether its runtime actor still lives; if not, the box is lost
(``BoxLostError``), and stays lost for this handle without asking again."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ray.exceptions import ActorUnavailableError, RayActorError

from .._native import BoxInfo, BoxMetrics, CopyOptions, ExecResult
from .._runtime import Box, Boxlite, EnvLike, Execution, PathLike
from ..errors import (
    AuthenticationError,
    BoxLostError,
    BoxNotFoundError,
    GuestProtocolError,
    UpstreamUnavailableError,
)
from ._actor import NodeAddress

if TYPE_CHECKING:
    from ._sync import SyncRayBox

T = TypeVar("T")

#: Seconds any one request to a node's server may take (a box's boot is one request).
DEFAULT_TIMEOUT = 300.0
#: Seconds to wait for a node's runtime actor to answer when deciding whether it is gone.
PING_TIMEOUT = 10.0
#: Seconds between checks of the node's runtime while an execution is waited for.
WATCH_INTERVAL = 10.0

#: Failures after which the node's runtime may be gone: the server cannot be reached, or a
#: different server (another key) now listens on its port.
_UNREACHABLE = (UpstreamUnavailableError, AuthenticationError, OSError)
#: Failures that may mean the node's runtime is gone, or is going: the above, or the box's VM
#: lost mid-call.
_MAYBE_LOST = (*_UNREACHABLE, GuestProtocolError)
#: Seconds a guest connection lost is given to turn out as the runtime's death: Ray kills a
#: worker's child processes (the boxes' VMs) a moment before the worker itself, so the server
#: may still report the VM's end before it goes.
DYING_GRACE = 3.0


async def ray_result(ref: Any, timeout: float) -> Any:
    """The value of a Ray object ref, awaited without blocking the event loop, at most
    ``timeout`` seconds (``asyncio.TimeoutError``)."""
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)


async def runtime_gone(actor: Any, timeout: float = PING_TIMEOUT) -> str | None:
    """Why the node's runtime is gone (its actor or node died, its server ended), or None
    when it answers or cannot be told apart from a slow one within ``timeout``."""
    try:
        serving = await ray_result(actor.ping.remote(), timeout)
    except ActorUnavailableError:
        return None  # unreachable for now (a network blip); Ray says when it is dead
    except RayActorError as error:
        return f"its runtime actor died ({type(error).__name__})"
    except asyncio.TimeoutError:
        return None
    return None if serving else "its server stopped"


_runtimes: dict[tuple[str, str, float], Boxlite] = {}


def rest_runtime(address: NodeAddress, timeout: float) -> Boxlite:
    """The REST runtime talking to the node's server (one per server and process: it keeps
    a connection pool per event loop)."""
    from ..rest.options import ApiKeyCredential, BoxliteRestOptions

    key = (address.url, address.key, timeout)
    if key not in _runtimes:
        options = BoxliteRestOptions(url=address.url, credential=ApiKeyCredential(address.key), timeout=timeout)
        _runtimes[key] = Boxlite.rest(options)
    return _runtimes[key]


class RayBox:
    """A box on one node of the Ray cluster. Pass it to tasks and actors like any value: it
    carries only the node's address and the box id. Its methods are those of ``boxlite.Box``
    (``info()`` is a coroutine here); ``sync()`` gives the blocking twin for plain tasks."""

    def __init__(
        self,
        address: NodeAddress,
        actor: Any,
        box_id: str,
        name: str | None = None,
        default_command: Iterable[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._address = address
        self._actor = actor
        self._id = box_id
        self._name = name
        self._default_command = list(default_command)
        self._timeout = timeout
        self._lost: str | None = None  # why the box is lost, once known
        self._rest_box: Box | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        state = (self._address, self._actor, self._id, self._name, self._default_command, self._timeout)
        return (RayBox, state)

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def node_id(self) -> str:
        """The Ray node the box runs on."""
        return self._address.node_id

    @property
    def url(self) -> str:
        """The node's ``boxlite serve`` address this box is reached through."""
        return self._address.url

    @property
    def default_command(self) -> list[str]:
        return list(self._default_command)

    def sync(self) -> SyncRayBox:
        """The blocking twin of this handle."""
        from ._sync import SyncRayBox

        return SyncRayBox(self)

    async def _box(self) -> Box:
        if self._lost is not None:
            raise BoxLostError(self._lost)
        if self._rest_box is None:
            box = await rest_runtime(self._address, self._timeout).get(self._id)
            if box is None:
                raise BoxNotFoundError(f"box {self._id} no longer exists on Ray node {self.node_id[:12]}")
            self._rest_box = box
        return self._rest_box

    async def _lost_error(self, cause: BaseException) -> BoxLostError | None:
        """The ``BoxLostError`` that ``cause`` turns out to mean, or None if the node's
        runtime is alive (or cannot be told apart from a slow one)."""
        if self._lost is None:
            if isinstance(cause, BoxLostError):
                self._lost = str(cause)
            elif isinstance(cause, _UNREACHABLE):
                await self._check()
            elif isinstance(cause, GuestProtocolError):
                deadline = asyncio.get_running_loop().time() + DYING_GRACE
                await self._check()
                while self._lost is None and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(DYING_GRACE / 6)
                    await self._check()
        return None if self._lost is None else BoxLostError(self._lost)

    async def _check(self) -> None:
        """Asks Ray whether the node's runtime is gone; if so, the box is lost from now on."""
        reason = await runtime_gone(self._actor)
        if reason is not None and self._lost is None:
            self._lost = (
                f"box {self._id} was on Ray node {self.node_id[:12]} ({self.url}), and {reason}; "
                "it cannot be reached any more: create a new box"
            )
            self._rest_box = None

    async def _call(self, op: Callable[[Box], Awaitable[T]]) -> T:
        try:
            return await asyncio.wait_for(self._on_box(op), self._timeout)
        except asyncio.TimeoutError:
            late = UpstreamUnavailableError(
                f"the boxlite server of Ray node {self.node_id[:12]} ({self.url}) did not finish within "
                f"{self._timeout:g} s"
            )
            raise (await self._lost_error(late) or late) from None
        except _MAYBE_LOST as error:
            lost = await self._lost_error(error)
            if lost is None:
                raise
            raise lost from error

    async def _on_box(self, op: Callable[[Box], Awaitable[T]]) -> T:
        return await op(await self._box())

    async def is_lost(self) -> bool:
        """Whether the node's runtime is gone (asks Ray unless already known)."""
        if self._lost is None:
            await self._check()
        return self._lost is not None

    async def info(self) -> BoxInfo:
        """What the box is and its state now (a coroutine here: it asks the node)."""

        async def ask(_: Box) -> BoxInfo:
            info = await rest_runtime(self._address, self._timeout).get_info(self._id)
            if info is None:
                raise BoxNotFoundError(f"box {self._id} no longer exists on Ray node {self.node_id[:12]}")
            return info

        return await self._call(ask)

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
        """As ``Box.exec``; a lost node surfaces as ``BoxLostError`` from the execution too."""
        execution = await self._call(
            lambda box: box.exec(command, args, env=env, tty=tty, user=user, timeout_secs=timeout_secs, cwd=cwd)
        )
        return Execution(cast(Any, _WatchedExecution(execution._native, self)))

    async def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None:
        """Copies a file or directory of *this process's* machine into the box."""
        await self._call(lambda box: box.copy_in(os.fspath(host_path), box_path, copy_options))

    async def copy_out(
        self,
        box_path: str,
        host_path: PathLike,
        copy_options: CopyOptions | None = None,
        max_bytes: int | None = None,
    ) -> None:
        """Copies a box file or directory to *this process's* machine."""
        await self._call(lambda box: box.copy_out(box_path, os.fspath(host_path), copy_options, max_bytes))

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await self._call(lambda box: box.read_file(path, max_bytes))

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self._call(lambda box: box.write_file(path, data, mode))

    async def list_dir(self, path: str) -> list[str]:
        return await self._call(lambda box: box.list_dir(path))

    async def start(self) -> None:
        await self._call(lambda box: box.start())

    async def stop(self) -> None:
        await self._call(lambda box: box.stop())

    async def metrics(self) -> BoxMetrics:
        return await self._call(lambda box: box.metrics())

    async def __aenter__(self) -> RayBox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"RayBox(id={self._id!r}, name={self._name!r}, node={self.node_id[:12]!r})"


class _WatchedStream:
    """An output stream whose transport failures become ``BoxLostError`` when the node is
    gone."""

    def __init__(self, stream: Any, box: RayBox) -> None:
        self._stream = stream
        self._box = box

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = await self._stream.__anext__()
        except StopAsyncIteration:
            raise
        except _MAYBE_LOST as error:
            lost = await self._box._lost_error(error)
            if lost is None:
                raise
            raise lost from error
        return chunk


class _WatchedExecution:
    """The REST client's execution with its waits and streams watched for a lost node."""

    def __init__(self, native: Any, box: RayBox) -> None:
        self._native = native
        self._box = box

    @property
    def id(self) -> str:
        return cast(str, self._native.id)

    @property
    def pid(self) -> int:
        return cast(int, self._native.pid)

    def stdout(self) -> _WatchedStream | None:
        stream = self._native.stdout()
        return None if stream is None else _WatchedStream(stream, self._box)

    def stderr(self) -> _WatchedStream | None:
        stream = self._native.stderr()
        return None if stream is None else _WatchedStream(stream, self._box)

    def stdin(self) -> Any:
        return self._native.stdin()

    async def wait(self) -> ExecResult:
        """The result; while waiting, the node's runtime is checked every
        ``WATCH_INTERVAL`` seconds, so a node that dies without closing the connection (a
        power cut, a partition) ends the wait with ``BoxLostError`` once Ray declares it dead."""
        waiting = asyncio.ensure_future(self._native.wait())
        try:
            while not waiting.done():
                await asyncio.wait({waiting}, timeout=WATCH_INTERVAL)
                if not waiting.done() and await self._box.is_lost():
                    raise BoxLostError(cast(str, self._box._lost))
            return cast(ExecResult, waiting.result())
        except _MAYBE_LOST as error:
            lost = await self._box._lost_error(error)
            if lost is None:
                raise
            raise lost from error
        finally:
            waiting.cancel()

    def kill(self, signal: int) -> None:
        self._native.kill(signal)

    def resize_tty(self, rows: int, cols: int) -> None:
        self._native.resize_tty(rows, cols)
