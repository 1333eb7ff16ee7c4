"""The exec session: the commands of one event loop over one WebSocket to the server
(``GET .../session``, docs/serve.md#exec-session), instead of a request and a new WebSocket per
command. Each command has a tag; its output, stdin and exit travel with that tag."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..errors import BoxliteError, InvalidStateError, error_from_wire

if TYPE_CHECKING:
    from .client import RestClient
    from .execution import RestOutputStream

TAG = struct.Struct(">I")
STDOUT, STDERR = 1, 2
#: Stdin bytes per WebSocket message at most.
STDIN_CHUNK = 64 * 1024


class Channel:
    """One command's side of the session: where its output and exit go, how its stdin leaves."""

    def __init__(self, session: ExecSession, tag: int, stdout: RestOutputStream, stderr: RestOutputStream) -> None:
        self.session = session
        self.tag = tag
        self.stdout = stdout
        self.stderr = stderr
        loop = asyncio.get_running_loop()
        self.started: asyncio.Future[tuple[str, int]] = loop.create_future()
        self.end: asyncio.Future[dict[str, Any]] = loop.create_future()
        for future in (self.started, self.end):
            future.add_done_callback(_retrieve)

    async def send_stdin(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        prefix = TAG.pack(self.tag)
        for at in range(0, len(view), STDIN_CHUNK):
            await self.session.send(prefix + view[at : at + STDIN_CHUNK])

    async def send_eof(self) -> None:
        await self.session.send(json.dumps({"type": "stdin_eof", "tag": self.tag}))

    def control(self, kind: str, **fields: int) -> None:
        """A signal or resize, sent without waiting (from any thread)."""
        self.session.control({"type": kind, "tag": self.tag, **fields})

    def fail(self, error: BoxliteError) -> None:
        for future in (self.started, self.end):
            if not future.done():
                future.set_exception(error)
        self.close_streams()

    def close_streams(self) -> None:
        self.stdout._end()
        self.stderr._end()


class ExecSession:
    """One open session socket and the commands on it."""

    def __init__(self, client: RestClient, ws: ClientConnection) -> None:
        self.client = client
        self.ws = ws
        self._tags = itertools.count(1)
        self._channels: dict[int, Channel] = {}
        self._loop = asyncio.get_running_loop()
        self._last_sent: asyncio.Task[None] | None = None  # the newest message in the queue
        self._receiver = self._loop.create_task(self._receive())

    @property
    def open(self) -> bool:
        return not self._receiver.done()

    def _in_turn(self, message: str | bytes) -> asyncio.Task[None]:
        """Sends ``message`` once every message queued before it is sent: stdin, signals and
        resizes leave in the order they were given (on the loop's thread)."""
        before = self._last_sent

        async def send() -> None:
            if before is not None and not before.done():
                await asyncio.wait({before})
            await self.ws.send(message)

        task = self._loop.create_task(send())
        task.add_done_callback(_retrieve)
        self._last_sent = task
        return task

    async def send(self, message: str | bytes) -> None:
        try:
            await asyncio.shield(self._in_turn(message))
        except ConnectionClosed:
            raise InvalidStateError("the command has ended; its stdin is closed") from None

    async def start(self, body: dict[str, Any], stdout: RestOutputStream, stderr: RestOutputStream) -> Channel:
        """Sends the exec and waits for ``started``; the server's refusal raises typed."""
        tag = next(self._tags)
        channel = Channel(self, tag, stdout, stderr)
        self._channels[tag] = channel
        try:
            await self.ws.send(json.dumps({"type": "exec", "tag": tag, **body}))
        except ConnectionClosed as e:
            self._channels.pop(tag, None)
            raise self.client.lost("while starting a command", str(e)) from None
        try:
            await asyncio.shield(channel.started)
        except BaseException:
            if self._channels.pop(tag, None) is not None:  # cancelled: the command may start anyway
                self._in_turn(json.dumps({"type": "kill", "tag": tag}))
            raise
        return channel

    def control(self, message: dict[str, Any]) -> None:
        """Sends ``message`` without waiting, from the session's loop or any other thread (a
        blocking caller's): like a local signal, it leaves at once and is not answered."""
        text = json.dumps(message)
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._in_turn(text)
        else:  # queued before anything this caller sends after it (the loop runs callbacks in order)
            self._loop.call_soon_threadsafe(self._in_turn, text)

    async def _receive(self) -> None:
        reason = "the server closed the session"
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self._output(message)
                else:
                    self._event(message)
            reason = f"the server closed the session ({self.ws.close_code})"
        except ConnectionClosed as e:
            reason = f"the session broke ({e})"
        except BoxliteError as e:
            reason = str(e)
            await self.ws.close()
        except asyncio.CancelledError:
            reason = "its event loop ended"
            self.ws.transport.close()  # the loop ends (asyncio.run): no close handshake to wait for
            raise
        finally:
            channels, self._channels = self._channels, {}
            for channel in channels.values():
                channel.fail(self.client.lost("while a command ran", reason))

    def _output(self, message: bytes) -> None:
        if len(message) < TAG.size + 1:
            raise self.client.bad_reply("a session frame without a tag and stream")
        (tag,) = TAG.unpack_from(message)
        channel = self._channels.get(tag)
        if channel is None:
            return
        stream = message[TAG.size]
        if stream == STDOUT:
            channel.stdout._put(message[TAG.size + 1 :])
        elif stream == STDERR:
            channel.stderr._put(message[TAG.size + 1 :])
        else:
            raise self.client.bad_reply("an output frame of an unknown stream")

    def _event(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("tag"), int):
            raise self.client.bad_reply("a session message that is not a JSON object with a tag")
        channel = self._channels.get(event["tag"])
        if channel is None:
            return
        kind = event.get("type")
        if kind == "started":
            execution_id, pid = event.get("execution_id"), event.get("pid")
            if not isinstance(execution_id, str) or not isinstance(pid, int):
                raise self.client.bad_reply("an execution without an id or pid")
            channel.started.set_result((execution_id, pid))
        elif kind == "exit":
            del self._channels[channel.tag]
            channel.end.set_result(event)
            channel.close_streams()
        elif kind == "error":
            del self._channels[channel.tag]
            channel.fail(error_from_wire(event, 500))

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._receiver, return_exceptions=True)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """An outcome nobody asked for must not be logged as "never retrieved"."""
    if not future.cancelled():
        future.exception()


__all__ = ["Channel", "ExecSession"]
