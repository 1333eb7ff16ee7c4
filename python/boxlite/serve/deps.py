"""What routes ask for: the server's state and the caller's key name."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from .auth import key_name
from .state import ServeState


# async: FastAPI would run plain functions in a worker thread, a thread hop per request.
async def get_state(conn: HTTPConnection) -> ServeState:
    return state_of(conn)


async def get_key(conn: HTTPConnection) -> str:
    return key_name(state_of(conn).config.keys, conn.headers)


def state_of(conn: HTTPConnection) -> ServeState:
    state: ServeState = conn.app.state.serve
    return state


State = Annotated[ServeState, Depends(get_state)]
Key = Annotated[str, Depends(get_key)]
