"""The application: ``create_app(runtime, config)`` serves one runtime home over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .._runtime import Boxlite
from ..errors import ResourceExhaustedError
from . import boxes, executions, files, http_errors, images, metrics, models, session
from .config import ServeConfig
from .deps import Key, State
from .state import ServeState

#: Every route may answer with the error body (docs/serve.md#errors).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": models.ErrorBody, "description": text}
    for status, text in (
        (400, "invalid argument"),
        (401, "missing or wrong API key"),
        (404, "no such box, execution or image (for this key)"),
        (405, "method not allowed"),
        (409, "already exists, or the box's state does not allow it"),
        (413, "request body over --max-body-bytes"),
        (422, "the request does not have the documented shape"),
        (429, "a limit of this server was reached"),
        (500, "internal error"),
        (501, "unsupported"),
        (502, "upstream failure"),
        (503, "engine or upstream unavailable"),
        (504, "timed out"),
    )
}


class BodyLimit:
    """Refuses bodies over ``limit`` bytes with 413: at once by their Content-Length, else
    while they are read (chunked ones too)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            error = ResourceExhaustedError(str(http_errors.too_large(self.limit).detail))
            return await http_errors.error_response(error, 413)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise http_errors.too_large(self.limit)
            return message

        await self.app(scope, limited, send)


public = APIRouter(tags=["server"])


@public.get("/healthz", response_model=models.Health)
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@public.get("/v1/config", response_model=models.ServerConfig)
async def server_config(state: State) -> dict[str, Any]:
    return {
        "version": __version__,
        "capabilities": {
            # These operations have no routes on this server yet.
            "snapshots_enabled": False,
            "clone_enabled": False,
            "export_enabled": False,
            "import_enabled": False,
            "host_paths_enabled": state.config.allow_host_paths,
            # GET /v1/default/session: many commands over one WebSocket (docs/serve.md#exec-session).
            "exec_session": True,
        },
        "limits": state.config.limits(),
    }


@public.get("/v1/me", response_model=models.Me)
async def me(state: State, key: Key) -> dict[str, Any]:
    return {"key": key, "boxes": await state.boxes_of(key), "limits": state.config.limits()}


def create_app(runtime: Boxlite, config: ServeConfig) -> FastAPI:
    state = ServeState(runtime, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.prune()
        state.execs.start()
        try:
            yield
        finally:
            await state.execs.close()
            state.close()

    app = FastAPI(
        title="boxlite",
        version=__version__,
        summary="Boxes (OCI images in their own VMs) over HTTP",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.serve = state
    http_errors.install(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    for router in (
        public,
        boxes.router,
        executions.router,
        session.router,
        files.router,
        images.router,
        metrics.router,
    ):
        app.include_router(router, responses=ERRORS)
    return app
