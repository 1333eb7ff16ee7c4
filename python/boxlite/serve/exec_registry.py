"""Commands started through the server. Their output is pumped from the start: into a capped
backlog until a client attaches (so nothing is lost before), then to that client at its pace.
A command nobody attends is killed: not attached for ``orphan_timeout``, or its client gone.
Finished ones are forgotten ``exec_retention`` after their exit (docs/serve.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from .._runtime import ExecStdin, Execution
from ..errors import BoxliteError, ExecTimeoutError, InvalidStateError, NotFoundError, ResourceExhaustedError
from .config import ServeConfig

log = logging.getLogger("boxlite.serve")

STDOUT, STDERR = 1, 2
#: Largest output frame sent to a client (the websockets client's default message cap is 1 MiB).
FRAME_BYTES = 256 * 1024


class Output:
    """A command's stdout and stderr chunks on their way to a client.

    ``backlog`` (before the first attach): keeps ``cap`` bytes, drops and counts the rest.
    ``live`` (attached): the pumps wait while ``cap`` bytes are not yet sent.
    ``discard`` (nobody will read it): drops everything."""

    def __init__(self, cap: int, streams: int = 2) -> None:
        self.cap = cap
        self.dropped = 0
        self.mode = "backlog"
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._size = 0
        self._open = streams
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, channel: int, data: bytes) -> None:
        while self.mode == "live" and self._size >= self.cap:
            self._room.clear()
            await self._room.wait()
        if self.mode == "discard":
            return
        if self.mode == "backlog" and self._size + len(data) > self.cap:
            room = max(0, self.cap - self._size)
            self.dropped += len(data) - room
            data = data[:room]
        if data:
            self._chunks.append((channel, data))
            self._size += len(data)
            self._changed.set()

    def stream_ended(self) -> None:
        self._open -= 1
        self._changed.set()

    def go_live(self) -> None:
        if self.mode == "backlog":
            self.mode = "live"

    def discard(self) -> None:
        self.mode = "discard"
        self._chunks.clear()
        self._size = 0
        self._room.set()

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """``(channel, bytes)`` until both streams ended and everything was taken; adjacent
        chunks of one stream are joined, up to ``FRAME_BYTES``."""
        while True:
            while not self._chunks:
                if self._open <= 0:
                    return
                self._changed.clear()
                await self._changed.wait()
            channel, first = self._chunks.popleft()
            parts = [first]
            size = len(first)
            while self._chunks and self._chunks[0][0] == channel and size + len(self._chunks[0][1]) <= FRAME_BYTES:
                size += len(self._chunks[0][1])
                parts.append(self._chunks.popleft()[1])
            self._size -= size
            self._room.set()
            data = b"".join(parts)
            for start in range(0, len(data), FRAME_BYTES):
                yield channel, data[start : start + FRAME_BYTES]


class ServerExecution:
    """One command: its output pumps, its stdin feeder, its result."""

    def __init__(
        self,
        execution: Execution,
        box_id: str,
        owner: str,
        backlog_bytes: int,
        on_exit: Callable[[ServerExecution], None] = lambda _: None,
    ) -> None:
        self.id = str(execution.id)
        self.pid = execution.pid
        self.box_id = box_id
        self.owner = owner
        self.output = Output(backlog_bytes)
        self.result: dict[str, Any] | None = None
        #: A failure that is not the command's own exit (the VM died, ...).
        self.error: BoxliteError | None = None
        self.finished = asyncio.Event()
        self.finished_at = 0.0
        self.attached = False
        self.unattended_since = time.monotonic()
        self._execution = execution
        self._on_exit = on_exit
        self._stdin = execution.stdin()
        # Bounded: a client sending faster than the command reads waits (its messages <= 1 MiB).
        self._stdin_queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        self._pumps = [
            asyncio.ensure_future(self._pump(STDOUT, execution.stdout(binary=True))),
            asyncio.ensure_future(self._pump(STDERR, execution.stderr(binary=True))),
        ]
        self._feeder = asyncio.ensure_future(self._feed(self._stdin))
        self._waiter = asyncio.ensure_future(self._wait())

    @property
    def running(self) -> bool:
        return not self.finished.is_set()

    async def _pump(self, channel: int, stream: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in stream:
                await self.output.put(channel, chunk)
        except BoxliteError:
            pass  # the stream broke with the VM; the waiter reports why
        finally:
            self.output.stream_ended()

    async def _feed(self, stdin: ExecStdin | None) -> None:
        while True:
            data = await self._stdin_queue.get()
            if stdin is None:
                continue
            try:
                if data is None:
                    await stdin.close()
                    return
                await stdin.write(data)
            except BoxliteError:
                stdin = None  # the command is gone; later input is dropped

    async def _wait(self) -> None:
        try:
            r = await self._execution.wait()
            result = {
                "exit_code": r.exit_code,
                "signal": r.signal,
                "error_message": r.error_message,
                "timed_out": False,
            }
        except ExecTimeoutError as e:
            result = {"exit_code": 137, "signal": 9, "error_message": str(e), "timed_out": True}
        except BoxliteError as e:
            self.error = e
            result = {"exit_code": -1, "signal": None, "error_message": str(e), "timed_out": False}
        # The streams end at the exit: everything the command wrote is in the output first.
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._feeder.cancel()
        self.result = result
        self.finished_at = time.monotonic()
        self.finished.set()
        self._on_exit(self)

    async def feed(self, data: bytes | None) -> None:
        """Stdin bytes for the command; ``None`` is end-of-file. Dropped once it ended."""
        if self.running:
            await self._stdin_queue.put(data)

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(BoxliteError):  # it ended meanwhile
                self._execution.signal(sig)

    def resize(self, rows: int, cols: int) -> None:
        if self.running:
            self._execution.resize_tty(rows, cols)

    def attach(self) -> None:
        if self.attached:
            raise InvalidStateError(f"execution {self.id} already has a client attached; one at a time")
        self.attached = True
        self.output.go_live()

    def detach(self) -> None:
        self.attached = False
        self.unattended_since = time.monotonic()
        self.output.discard()

    def status(self) -> dict[str, Any]:
        return {
            "execution_id": self.id,
            "pid": self.pid,
            "status": "running" if self.running else "exited",
            "result": self.result,
            "output_dropped_bytes": self.output.dropped,
        }

    async def cancel(self) -> None:
        """Kills the command and ends its tasks (server shutdown)."""
        self.signal(9)
        tasks = [*self._pumps, self._feeder, self._waiter]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ExecRegistry:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._execs: dict[str, ServerExecution] = {}
        self._running = 0  # also counts forgotten ones until they end
        self._starting = 0
        self._reaper: asyncio.Task[None] | None = None

    def running(self) -> int:
        return self._running

    def _ended(self, execution: ServerExecution) -> None:
        self._running -= 1

    def reserve(self) -> None:
        """Counts a command being started against the limit (``release`` after)."""
        limit = self.config.max_concurrent_execs
        if self.running() + self._starting >= limit:
            raise ResourceExhaustedError(
                f"{limit} commands are running on this server, the most it allows (--max-concurrent-execs); "
                "wait for one to end"
            )
        self._starting += 1

    def release(self) -> None:
        self._starting -= 1

    def track(self, execution: Execution, box_id: str, owner: str) -> ServerExecution:
        """Starts pumping a started command's output and counts it until it ends."""
        tracked = ServerExecution(execution, box_id, owner, self.config.exec_backlog_bytes, self._ended)
        self._running += 1
        self._execs[tracked.id] = tracked
        return tracked

    def get(self, exec_id: str, box_id: str, owner: str) -> ServerExecution:
        found = self._execs.get(exec_id)
        if found is None or found.box_id != box_id or found.owner != owner:
            raise NotFoundError(f"no execution {exec_id!r} in this box (finished ones are kept for a while only)")
        return found

    def forget(self, execution: ServerExecution) -> None:
        """Kills it if it runs and drops it; its tasks end with the command."""
        execution.signal(9)
        execution.output.discard()
        self._execs.pop(execution.id, None)

    def forget_box(self, box_id: str) -> None:
        for execution in [e for e in self._execs.values() if e.box_id == box_id]:
            self.forget(execution)

    def reap(self, now: float) -> None:
        for execution in list(self._execs.values()):
            if execution.attached:
                continue
            if execution.running and now - execution.unattended_since > self.config.orphan_timeout:
                log.info("killing execution %s: no client attached for %ss", execution.id, self.config.orphan_timeout)
                self.forget(execution)
            elif not execution.running and now - execution.finished_at > self.config.exec_retention:
                self.forget(execution)

    async def _reap_forever(self) -> None:
        interval = min(1.0, self.config.orphan_timeout / 4, self.config.exec_retention / 4)
        while True:
            await asyncio.sleep(interval)
            self.reap(time.monotonic())

    def start(self) -> None:
        self._reaper = asyncio.ensure_future(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        executions = list(self._execs.values())
        self._execs.clear()
        await asyncio.gather(*(e.cancel() for e in executions), return_exceptions=True)
