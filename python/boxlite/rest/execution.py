"""A command running in a remote box: the execution's WebSocket feeds its output streams and
carries its stdin; the shapes are those of ``_native.NativeExecution``, ``OutputStream`` and
``StdinWriter``, so ``boxlite.Execution`` and ``boxlite.ExecStdin`` wrap them unchanged.

The WebSocket is opened as soon as the command has started, so output streams live; what the
caller does not take through ``stdout()``/``stderr()`` is collected by ``wait()``, as locally.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .._native import ExecResult, _check_signal, _check_tty_size
from ..errors import BoxliteError, ExecTimeoutError, InvalidArgumentError, InvalidStateError, error_from_wire

if TYPE_CHECKING:
    from .client import RestClient
    from .session import Channel

#: Stdin bytes per WebSocket message at most.
STDIN_CHUNK = 64 * 1024
#: The close code of an attach refused because another client is attached.
ATTACHED_ELSEWHERE = 4409


class RestOutputStream:
    """Output chunks (``bytes``) as they arrive; ends when the command's output does."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._ended = False

    def _put(self, data: bytes) -> None:
        self._queue.put_nowait(data)

    def _end(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self) -> RestOutputStream:
        return self

    async def __anext__(self) -> bytes:
        if self._ended:
            raise StopAsyncIteration
        chunk = await self._queue.get()
        if chunk is None:
            self._ended = True
            raise StopAsyncIteration
        return chunk


class RestStdinWriter:
    """Writes to the command's stdin over its WebSocket; ``close()`` sends end-of-file."""

    def __init__(self, execution: RestExecution) -> None:
        self._execution = execution
        self._closed = False

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise InvalidArgumentError("invalid argument `stdin`: stdin is already closed")
        channel = self._execution._channel
        if channel is not None:
            await channel.send_stdin(data)
            return
        ws = await self._execution._connection()
        view = memoryview(bytes(data))
        try:
            for at in range(0, len(view), STDIN_CHUNK):
                await ws.send(view[at : at + STDIN_CHUNK])
        except ConnectionClosed:
            raise InvalidStateError(f"`{self._execution.command}` has ended; its stdin is closed") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        channel = self._execution._channel
        if channel is not None:
            try:
                await channel.send_eof()
            except BoxliteError:
                pass  # the session broke; wait() reports why
            return
        try:
            ws = await self._execution._connection()
            await ws.send(json.dumps({"type": "stdin_eof"}))
        except ConnectionClosed:
            pass  # the command has ended: nothing reads its stdin any more
        except BoxliteError:
            pass  # the attach failed; wait() reports why


class RestExecution:
    """One execution on the server: ``id``, ``pid``, its streams, ``wait``, ``kill``,
    ``resize_tty``."""

    def __init__(
        self,
        client: RestClient,
        box_id: str,
        execution_id: str,
        pid: int,
        command: str,
        timeout: float | None,
        channel: Channel | None = None,
    ) -> None:
        self._client = client
        self._box_id = box_id
        self._id = execution_id
        self._pid = pid
        self.command = command
        self._timeout = timeout
        self._channel = channel
        self._stdin: RestStdinWriter | None = RestStdinWriter(self)
        loop = asyncio.get_running_loop()
        self._ws: asyncio.Future[ClientConnection] = loop.create_future()
        self._ws.add_done_callback(_retrieve)
        if channel is not None:  # the exec session carries it
            self._stdout_feed, self._stderr_feed, self._end = channel.stdout, channel.stderr, channel.end
        else:
            self._stdout_feed, self._stderr_feed = RestOutputStream(), RestOutputStream()
            self._end = loop.create_future()
            self._end.add_done_callback(_retrieve)
            self._pump = loop.create_task(self._run())
        self._stdout: RestOutputStream | None = self._stdout_feed
        self._stderr: RestOutputStream | None = self._stderr_feed

    @property
    def id(self) -> str:
        return self._id

    @property
    def pid(self) -> int:
        return self._pid

    def stdout(self) -> RestOutputStream | None:
        stream, self._stdout = self._stdout, None
        return stream

    def stderr(self) -> RestOutputStream | None:
        stream, self._stderr = self._stderr, None
        return stream

    def stdin(self) -> RestStdinWriter | None:
        writer, self._stdin = self._stdin, None
        return writer

    async def wait(self) -> ExecResult:
        """As locally: stdin not taken is closed, output not taken is collected, and a command
        killed by its timeout is an ``ExecTimeoutError``."""
        writer = self.stdin()
        if writer is not None:
            await writer.close()
        stdout, stderr, end = await asyncio.gather(
            _collect(self.stdout()), _collect(self.stderr()), asyncio.shield(self._end)
        )
        if end.get("timed_out"):
            message = end.get("error_message")
            if not (isinstance(message, str) and message):
                message = f"`{self.command}` timed out after {_seconds(self._timeout or 0)} and was killed"
            raise ExecTimeoutError(message)
        exit_code, signal = end.get("exit_code"), end.get("signal")
        if not (isinstance(signal, int) or signal is None):
            raise self._client.bad_reply("an exit status with a bad signal")
        if exit_code is None:
            exit_code = 128 + signal if signal is not None else -1
        if not isinstance(exit_code, int):
            raise self._client.bad_reply("an exit status with a bad exit code")
        message = end.get("error_message")
        return ExecResult(
            exit_code,
            error_message=message if isinstance(message, str) else None,
            signal=signal,
            stdout_bytes=stdout,
            stderr_bytes=stderr,
        )

    def kill(self, signal: int = 9) -> None:
        _check_signal(signal)
        self._control("signal", signal=signal)

    def resize_tty(self, rows: int, cols: int) -> None:
        _check_tty_size(rows, cols)
        self._control("resize", rows=rows, cols=cols)

    def _control(self, kind: str, **fields: int) -> None:
        """Over the exec session: queued behind what was sent before and not waited for, as
        locally (the core checked the values). A server without the session gets a request,
        made before this returns, so stdin written after it cannot overtake it."""
        if self._channel is not None:
            self._channel.control(kind, **fields)
            return
        self._client.request_sync("POST", self._client.execution_path(self._box_id, self._id, kind), json_body=fields)

    # -- the attach ----------------------------------------------------------------------------

    async def _connection(self) -> ClientConnection:
        return await asyncio.shield(self._ws)

    async def _run(self) -> None:
        path = self._client.execution_path(self._box_id, self._id, "attach")
        try:
            try:
                ws = await self._client.websocket(path)
            except BoxliteError as e:
                self._ws.set_exception(e)
                self._finish(e)
                return
            except BaseException:
                self._ws.cancel()
                raise
            self._ws.set_result(ws)
            try:
                await self._receive(ws)
            finally:
                await ws.close()
        except BoxliteError:
            pass  # handed to wait() through self._end
        finally:
            if not self._end.done():
                self._end.set_exception(InvalidStateError(f"the attach to `{self.command}` was cancelled"))
            self._stdout_feed._end()
            self._stderr_feed._end()

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self._output(message)
                    continue
                event = self._event(message)
                if event.get("type") == "exit":
                    self._end.set_result(event)
                    return
                if event.get("type") == "error":
                    self._finish(error_from_wire(event, 500))
                    return
            reason = f"the server closed the connection ({ws.close_code})"
        except ConnectionClosed as e:
            reason = f"the connection broke ({e})"
        except BoxliteError as e:
            self._finish(e)
            return
        if ws.close_code == ATTACHED_ELSEWHERE:
            self._finish(InvalidStateError(f"another client is attached to execution {self._id} of `{self.command}`"))
            return
        await self._recover(reason)

    def _output(self, message: bytes) -> None:
        if message[:1] == b"\x01":
            self._stdout_feed._put(message[1:])
        elif message[:1] == b"\x02":
            self._stderr_feed._put(message[1:])
        else:
            raise self._client.bad_reply("an output message of an unknown stream")

    def _event(self, text: str) -> dict[str, Any]:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise self._client.bad_reply("an attach message that is not a JSON object")
        return event

    async def _recover(self, reason: str) -> None:
        """The attach ended without an exit status: ask for it once; the output is lost."""
        try:
            state = await self._client.request("GET", self._client.execution_path(self._box_id, self._id))
        except BoxliteError:
            state = None
        result = state.get("result") if isinstance(state, dict) else None
        if isinstance(result, dict) and isinstance(state, dict) and state.get("status") == "exited":
            self._end.set_result(result)
            return
        self._finish(self._client.lost(f"while `{self.command}` ran", reason))

    def _finish(self, error: BaseException) -> None:
        if not self._end.done():
            self._end.set_exception(error if isinstance(error, BoxliteError) else InvalidStateError(str(error)))


def _seconds(value: float) -> str:
    """A duration as the core writes it: ``500ms`` below a second, else ``1.5s``, ``30s``."""
    if value < 1:
        return f"{int(value * 1000)}ms"
    return f"{round(value, 3):g}s"


async def _collect(stream: RestOutputStream | None) -> bytes:
    if stream is None:
        return b""
    return b"".join([chunk async for chunk in stream])


def _retrieve(future: asyncio.Future[Any]) -> None:
    """An outcome nobody asked for must not be logged as "never retrieved"."""
    if not future.cancelled():
        future.exception()


__all__ = ["RestExecution", "RestOutputStream", "RestStdinWriter"]
