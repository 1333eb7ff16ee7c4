"""Routes of commands in a box, and the WebSocket attach (docs/serve.md#attach)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, Response, WebSocket, WebSocketDisconnect

from ..errors import BoxliteError, InvalidArgumentError, InvalidStateError
from . import models
from .auth import key_name
from .deps import Key, State, state_of
from .exec_registry import ServerExecution
from .http_errors import error_body
from .state import ServeState

log = logging.getLogger("boxlite.serve")
router = APIRouter(prefix="/v1/default/boxes/{box}", tags=["executions"])

#: WebSocket close codes: 4000 + the HTTP status the failure would have.
CLOSE_UNAUTHENTICATED, CLOSE_NOT_FOUND, CLOSE_BUSY = 4401, 4404, 4409


@router.post("/exec", status_code=201, response_model=models.ExecStarted)
async def start(box: str, body: models.ExecRequest, state: State, key: Key) -> dict[str, Any]:
    started = await start_exec(state, box, body, key)
    # A client gone before it learns the id never attaches: the orphan timeout kills the command.
    return {"execution_id": started.id, "pid": started.pid}


async def start_exec(state: ServeState, box: str, body: models.ExecRequest, key: str) -> ServerExecution:
    """Starts a command in ``box`` (owned by ``key``) under the server's limits (also for the
    exec session)."""
    target = await state.box(box, key)
    state.execs.reserve()
    try:
        execution = await target.exec(
            body.command,
            body.args,
            env=body.env,
            tty=(body.tty_rows, body.tty_cols) if body.tty else None,
            user=body.user,
            timeout_secs=body.timeout_seconds,
            cwd=body.working_dir,
        )
        started = state.execs.track(execution, target.id, key)
    finally:
        state.execs.release()
    if body.stdin is not None:
        await started.feed(body.stdin.encode())
        await started.feed(None)
    return started


async def _find(state: State, box: str, exec_id: str, key: str) -> ServerExecution:
    target = await state.box(box, key)
    return state.execs.get(exec_id, target.id, key)


@router.get("/executions/{exec_id}", response_model=models.ExecStatus)
async def status(box: str, exec_id: str, state: State, key: Key) -> dict[str, Any]:
    return (await _find(state, box, exec_id, key)).status()


@router.delete("/executions/{exec_id}", status_code=204)
async def kill(box: str, exec_id: str, state: State, key: Key) -> Response:
    """SIGKILL to the command's process group; a finished command is forgotten."""
    execution = await _find(state, box, exec_id, key)
    if execution.running:
        execution.signal(9)
    else:
        state.execs.forget(execution)
    return Response(status_code=204)


@router.post("/executions/{exec_id}/signal", status_code=204)
async def send_signal(box: str, exec_id: str, body: models.Signal, state: State, key: Key) -> Response:
    (await _find(state, box, exec_id, key)).signal(body.signal)
    return Response(status_code=204)


@router.post("/executions/{exec_id}/resize", status_code=204)
async def resize(box: str, exec_id: str, body: models.Resize, state: State, key: Key) -> Response:
    (await _find(state, box, exec_id, key)).resize(body.rows, body.cols)
    return Response(status_code=204)


# ---------------------------------------------------------------------------- attach


async def refuse(ws: WebSocket, error: BoxliteError, code: int) -> None:
    await ws.accept()
    await ws.send_text(json.dumps({"type": "error", **error_body(error)}))
    await ws.close(code)


@router.websocket("/executions/{exec_id}/attach")
async def attach(ws: WebSocket, box: str, exec_id: str) -> None:
    state = state_of(ws)
    try:
        key = key_name(state.config.keys, ws.headers)
    except BoxliteError as e:
        return await refuse(ws, e, CLOSE_UNAUTHENTICATED)
    try:
        execution = await _find(state, box, exec_id, key)
        execution.attach()
    except InvalidStateError as e:
        return await refuse(ws, e, CLOSE_BUSY)
    except BoxliteError as e:
        return await refuse(ws, e, CLOSE_NOT_FOUND)
    delivered = False
    try:
        await ws.accept()
        to_client = asyncio.ensure_future(_to_client(ws, execution))
        from_client = asyncio.ensure_future(_from_client(ws, execution))
        await asyncio.wait({to_client, from_client}, return_when=asyncio.FIRST_COMPLETED)
        from_client.cancel()
        to_client.cancel()
        await asyncio.gather(from_client, to_client, return_exceptions=True)
        delivered = to_client.done() and not to_client.cancelled() and to_client.exception() is None
    finally:
        execution.detach()
    if not delivered and execution.running:
        state.execs.forget(execution)  # the client vanished: nobody would ever read or stop it


async def _to_client(ws: WebSocket, execution: ServerExecution) -> None:
    async for channel, data in execution.output.frames():
        await ws.send_bytes(bytes((channel,)) + data)
    await execution.finished.wait()
    if execution.error is not None:
        await ws.send_text(json.dumps({"type": "error", **error_body(execution.error)}))
        await ws.close(1011)
        return
    assert execution.result is not None
    await ws.send_text(
        json.dumps({"type": "exit", **execution.result, "output_dropped_bytes": execution.output.dropped})
    )
    await ws.close(1000)


async def _from_client(ws: WebSocket, execution: ServerExecution) -> None:
    """Stdin and control messages until the client leaves."""
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await execution.feed(message["bytes"])
            elif message.get("text") is not None:
                await _control(execution, message["text"])


async def _control(execution: ServerExecution, text: str) -> None:
    try:
        message = json.loads(text)
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "stdin_eof":
            await execution.feed(None)
        elif kind == "signal":
            execution.signal(int(message["signal"]))
        elif kind == "resize":
            execution.resize(int(message["rows"]), int(message["cols"]))
        else:
            raise InvalidArgumentError(f"unknown attach message type {kind!r}")
    except (ValueError, KeyError, TypeError, BoxliteError) as e:
        log.info("ignored attach message %.100r: %s", text, e)  # not fatal: the command goes on
