"""Images: the local image store and pulls with progress.

>>> rt = boxlite.Boxlite(boxlite.Options(image_registries=[
...     boxlite.ImageRegistry("registry.local:5000", transport="http", search=True)]))
>>> info = await rt.images.pull("alpine:latest", progress=print)
>>> [i.reference for i in await rt.images.list()]
['registry.local:5000/library/alpine:latest']
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from . import _native
from ._native import GcReport, ImageInfo, ImageRegistry, PullProgress

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

            def relay(update: PullProgress) -> None:
                loop.call_soon_threadsafe(callback, update)

        return await self._native.pull(reference, relay)

    async def list(self) -> list[ImageInfo]:
        """Every image in the local store."""
        return self._native.list()

    async def get(self, reference: str) -> ImageInfo:
        """The local image ``reference`` names (no network); ``ImageNotFoundError`` if absent."""
        return self._native.get(reference)

    async def remove(self, reference: str) -> None:
        """Removes the image and collects what nothing else uses; ``InvalidStateError`` while a
        box uses it."""
        await self._native.remove(reference)

    async def gc(self) -> GcReport:
        """Removes blobs and base disks no image and no box references."""
        return await self._native.gc()


#: The published package's name for ``Images``.
ImageHandle = Images

__all__ = ["GcReport", "ImageHandle", "ImageInfo", "ImageRegistry", "Images", "PullProgress"]
