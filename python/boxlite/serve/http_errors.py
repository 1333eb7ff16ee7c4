"""Every failure becomes one error body, here and nowhere else:
``{"error": {"message", "type", "code"}}`` with the status ``boxlite.errors.http_status`` gives
(docs/serve.md). Also the framework's own failures: unknown routes, validation (422) and
oversize bodies (413)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import errors
from ..errors import BoxliteError

log = logging.getLogger("boxlite.serve")

#: The class a framework status stands for (its type on the wire).
_FOR_STATUS: dict[int, type[BoxliteError]] = {
    401: errors.AuthenticationError,
    404: errors.NotFoundError,
    413: errors.ResourceExhaustedError,
    429: errors.ResourceExhaustedError,
    501: errors.UnsupportedError,
}


def error_body(error: BoxliteError) -> dict[str, Any]:
    return {"error": errors.error_to_wire(error)}


def error_response(
    error: BoxliteError, status: int | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    status = status or errors.http_status(error)
    extra = dict(headers or {})
    if status == 401:
        extra.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse(error_body(error), status_code=status, headers=extra)


def too_large(limit: int) -> HTTPException:
    """Raised while a body is read (also from inside FastAPI's own body parsing, which passes
    HTTP exceptions through)."""
    return HTTPException(
        413, f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)"
    )


async def _on_boxlite_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BoxliteError)
    return error_response(exc)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    cls = _FOR_STATUS.get(status) or (errors.InternalError if status >= 500 else errors.InvalidArgumentError)
    return error_response(cls(str(exc.detail)), status, exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for item in exc.errors()[:10]:
        where = ".".join(str(part) for part in item.get("loc", ()))
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    message = "invalid request: " + "; ".join(problems)
    return error_response(errors.InvalidArgumentError(message), 422)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected failure in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(errors.InternalError(f"internal error ({type(exc).__name__}); see the server log"), 500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(BoxliteError, _on_boxlite_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)
