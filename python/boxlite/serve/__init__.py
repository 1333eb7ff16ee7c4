"""``boxlite serve``: one runtime home over HTTP (FastAPI + uvicorn), for the REST client and
the Ray runtime. See docs/serve.md.

``import boxlite.serve`` loads no web framework; ``create_app`` does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ApiKey, ServeConfig

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["ApiKey", "ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
