"""What routes ask for: the server's state and the caller's key name."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from .auth import key_name
from .state import ServeState


def get_state(conn: HTTPConnection) -> ServeState:
    state: ServeState = conn.app.state.serve
    return state


def get_key(conn: HTTPConnection) -> str:
    return key_name(get_state(conn).config.keys, conn.headers)


State = Annotated[ServeState, Depends(get_state)]
Key = Annotated[str, Depends(get_key)]
