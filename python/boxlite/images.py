"""Images: registries, the local image store, and pulls with progress.

>>> rt = boxlite.Boxlite(boxlite.Options(image_registries=[
...     boxlite.ImageRegistry("registry.local:5000", transport="http", search=True)]))
>>> info = await rt.images.pull("alpine:latest", progress=print)
>>> [i.reference for i in await rt.images.list()]
['registry.local:5000/library/alpine:latest']
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import _native
from .errors import InvalidArgumentError

_TRANSPORTS = ("https", "http")


@dataclass(frozen=True)
class ImageRegistry:
    """How one registry host is reached.

    ``host`` is ``host[:port]`` without a scheme. ``transport="http"`` allows plain HTTP for
    it; ``skip_verify=True`` accepts a TLS certificate that does not verify. With
    ``search=True`` short names (``alpine``) are tried there, in order, before Docker Hub.
    ``username``/``password`` (HTTP basic, or exchanged for a token when the registry asks)
    or ``bearer_token`` are used for this host only.
    """

    host: str
    transport: str = "https"
    skip_verify: bool = False
    search: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise InvalidArgumentError(
                f"invalid argument `image_registries`: host must be a non-empty str, got {self.host!r}"
            )
        if "://" in self.host or "/" in self.host:
            raise InvalidArgumentError(
                f"invalid argument `image_registries`: host {self.host!r} must be host[:port] without a scheme or "
                'path; use transport="http" for plain HTTP'
            )
        if self.transport not in _TRANSPORTS:
            raise InvalidArgumentError(
                f'invalid argument `image_registries`: transport {self.transport!r} must be "https" or "http"'
            )

    def _native_tuple(self) -> tuple[str, str, bool, bool, str | None, str | None, str | None]:
        return (
            self.host,
            self.transport,
            bool(self.skip_verify),
            bool(self.search),
            self.username,
            self.password,
            self.bearer_token,
        )


def _registries(entries: Iterable[ImageRegistry | str]) -> list[ImageRegistry]:
    """``ImageRegistry`` objects as given; a plain ``str`` is a searched HTTPS host (the older
    ``image_registries=["ghcr.io", ...]`` form)."""
    if isinstance(entries, str):
        raise InvalidArgumentError("invalid argument `image_registries`: pass a list of registries, not one string")
    out: list[ImageRegistry] = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(ImageRegistry(entry, search=True))
        elif isinstance(entry, ImageRegistry):
            out.append(entry)
        else:
            raise InvalidArgumentError(
                f"invalid argument `image_registries`: expected ImageRegistry or str, got {entry!r}"
            )
    return out


@dataclass(frozen=True)
class PullProgress:
    """One layer's progress: ``done`` of ``total`` bytes are in the local store."""

    layer: str
    index: int
    layers: int
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.done / self.total


@dataclass(frozen=True)
class ImageInfo:
    """An image in the local store. ``digest`` (also ``id``) is its manifest digest."""

    reference: str
    repository: str
    tag: str | None
    digest: str
    index_digest: str | None
    config_digest: str
    size: int
    layers: int
    architecture: str
    os: str
    created: str | None
    pulled_at: float | None
    env: list[tuple[str, str]]
    entrypoint: list[str]
    cmd: list[str]
    working_dir: str | None
    user: str | None
    exposed_ports: list[str]
    labels: dict[str, str]

    @property
    def id(self) -> str:
        return self.digest

    @classmethod
    def _from_native(cls, data: dict[str, Any]) -> ImageInfo:
        return cls(**{**data, "env": [tuple(pair) for pair in data["env"]]})


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection removed."""

    blobs_removed: int
    disks_removed: int
    bytes_freed: int


ProgressCallback = Callable[[PullProgress], object]


class Images:
    """The image store of a runtime (``Boxlite.images``)."""

    def __init__(self, native: _native.NativeImages) -> None:
        self._native = native

    async def pull(self, reference: str, progress: ProgressCallback | None = None) -> ImageInfo:
        """Pulls ``reference`` (even if cached: a tag may have moved). ``progress`` is called on
        this event loop with a ``PullProgress`` per layer as bytes arrive, ending with
        ``done == total`` for every layer."""
        relay = None
        if progress is not None:
            loop = asyncio.get_running_loop()
            callback = progress

            def relay(layer: str, index: int, layers: int, done: int, total: int) -> None:
                loop.call_soon_threadsafe(callback, PullProgress(layer, index, layers, done, total))

        return ImageInfo._from_native(await self._native.pull(reference, relay))

    async def list(self) -> list[ImageInfo]:
        """Every image in the local store."""
        return [ImageInfo._from_native(d) for d in self._native.list()]

    async def get(self, reference: str) -> ImageInfo:
        """The local image ``reference`` names (no network); ``ImageNotFoundError`` if absent."""
        return ImageInfo._from_native(self._native.get(reference))

    async def remove(self, reference: str) -> None:
        """Removes the image and collects what nothing else uses; ``InvalidStateError`` while a
        box uses it."""
        await self._native.remove(reference)

    async def gc(self) -> GcReport:
        """Removes blobs and base disks no image and no box references."""
        return GcReport(**await self._native.gc())


__all__ = ["GcReport", "ImageInfo", "ImageRegistry", "Images", "PullProgress"]
