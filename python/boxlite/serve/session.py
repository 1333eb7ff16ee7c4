"""The exec session: one long-lived WebSocket carrying many commands, each by a client-chosen
integer ``tag`` (docs/serve.md#exec-session). It spares a command the HTTP request and the new
WebSocket of ``POST .../exec`` + attach; the commands are the registry's, under its limits and
orphan rules: when the session closes, the commands it still carries are killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ..errors import BoxliteError, InvalidArgumentError, InvalidStateError
from . import models
from .auth import key_name
from .deps import state_of
from .exec_registry import ServerExecution
from .executions import CLOSE_UNAUTHENTICATED, refuse, start_exec
from .http_errors import error_body
from .state import ServeState

log = logging.getLogger("boxlite.serve")
router = APIRouter(tags=["executions"])

#: Binary frames start with the tag, 4 bytes big-endian; output frames then name the stream.
TAG = struct.Struct(">I")
TAG_MAX = 2**32 - 1


class Session:
    """The commands of one session socket, by tag."""

    def __init__(self, ws: WebSocket, state: ServeState, key: str) -> None:
        self.ws = ws
        self.state = state
        self.key = key
        self.running: dict[int, ServerExecution] = {}
        self._starting: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()  # one message at a time on the socket

    async def send_text(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_text(json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(data)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def receive(self) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await self._stdin(message["bytes"])
                elif message.get("text") is not None:
                    await self._control(message["text"])

    async def _stdin(self, data: bytes) -> None:
        if len(data) < TAG.size:
            log.info("ignored a session frame of %d bytes (no tag)", len(data))
            return
        (tag,) = TAG.unpack_from(data)
        execution = self.running.get(tag)
        if execution is not None:
            await execution.feed(data[TAG.size :])

    async def _control(self, text: str) -> None:
        try:
            message = json.loads(text)
            if not isinstance(message, dict):
                raise InvalidArgumentError("a session message must be a JSON object")
            kind, tag = message.get("type"), message.get("tag")
            if not isinstance(tag, int) or isinstance(tag, bool) or not 0 <= tag <= TAG_MAX:
                raise InvalidArgumentError(f"a session message needs an integer `tag` (0..{TAG_MAX})")
        except (ValueError, BoxliteError) as e:
            log.info("ignored session message %.100r: %s", text, e)
            return
        if kind == "exec":
            if tag in self.running or tag in self._starting:
                error = InvalidStateError(f"tag {tag} is in use by a running command of this session")
                await self.send_text({"type": "error", "tag": tag, **error_body(error)})
                return
            self._starting.add(tag)
            self.spawn(self._start(tag, message))
            return
        execution = self.running.get(tag)
        if execution is None:
            return  # it ended meanwhile, or never started
        try:
            if kind == "stdin_eof":
                await execution.feed(None)
            elif kind == "signal":
                execution.signal(int(message["signal"]))
            elif kind == "kill":
                execution.signal(9)
            elif kind == "resize":
                execution.resize(int(message["rows"]), int(message["cols"]))
            else:
                raise InvalidArgumentError(f"unknown session message type {kind!r}")
        except (ValueError, KeyError, TypeError, BoxliteError) as e:
            log.info("ignored session message %.100r: %s", text, e)  # not fatal: the command goes on

    async def _start(self, tag: int, message: dict[str, Any]) -> None:
        try:
            fields = {k: v for k, v in message.items() if k not in ("type", "tag", "box")}
            box = message.get("box")
            if not isinstance(box, str):
                raise InvalidArgumentError("an exec message needs `box`, the box's id or name")
            try:
                body = models.ExecRequest.model_validate(fields)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise InvalidArgumentError(f"invalid exec message: `{where}`: {first['msg']}") from None
            execution = await start_exec(self.state, box, body, self.key)
        except BoxliteError as e:
            self._starting.discard(tag)
            with contextlib.suppress(Exception):  # the session is gone: nobody to tell
                await self.send_text({"type": "error", "tag": tag, **error_body(e)})
            return
        execution.attach()
        self.running[tag] = execution
        self._starting.discard(tag)
        try:
            await self.send_text({"type": "started", "tag": tag, "execution_id": execution.id, "pid": execution.pid})
            await self._forward(tag, execution)
        except Exception:  # the socket broke; close() kills what it carried
            return
        self.running.pop(tag, None)
        execution.detach()

    async def _forward(self, tag: int, execution: ServerExecution) -> None:
        async for channel, data in execution.output.frames():
            await self.send_bytes(TAG.pack(tag) + bytes((channel,)) + data)
        await execution.finished.wait()
        if execution.error is not None:
            await self.send_text({"type": "error", "tag": tag, **error_body(execution.error)})
            return
        assert execution.result is not None
        end = {"type": "exit", "tag": tag, **execution.result, "output_dropped_bytes": execution.output.dropped}
        await self.send_text(end)

    async def close(self) -> None:
        """The client left: what it still carried is killed, like after a vanished attach."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for execution in self.running.values():
            execution.detach()
            if execution.running:
                self.state.execs.forget(execution)
        self.running.clear()


@router.websocket("/v1/default/session")
async def session(ws: WebSocket) -> None:
    state = state_of(ws)
    try:
        key = key_name(state.config.keys, ws.headers)
    except BoxliteError as e:
        return await refuse(ws, e, CLOSE_UNAUTHENTICATED)
    await ws.accept()
    carried = Session(ws, state, key)
    try:
        await carried.receive()
    finally:
        await carried.close()
