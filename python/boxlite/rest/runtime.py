"""A remote runtime in the shape of ``_native.Runtime``: ``boxlite.Boxlite.rest(options)``
wraps it, so ``Boxlite``, ``Box``, ``Execution`` behave as they do locally."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn
from urllib.parse import quote

from .._native import BoxInfo, BoxOptions, ImageInfo, RuntimeMetrics
from ..errors import BoxliteError, ConfigError, NotFoundError
from .box import RestBox, unsupported
from .client import RestClient
from .options import BoxliteRestOptions
from .wire import create_body


class RestImages:
    """The server's image store (shared by every key of the server): ``list``, ``pull`` and
    ``remove`` go to it; ``get`` and ``gc`` have no route."""

    def __init__(self, client: RestClient) -> None:
        self._client = client
        self._root = f"{client.root}/images"

    def list(self) -> list[ImageInfo]:
        answer = self._client.request_sync("GET", self._root)
        images = answer.get("images") if isinstance(answer, dict) else None
        if not isinstance(images, list):
            raise self._client.bad_reply("an image list without `images`")
        return [ImageInfo._from_wire(wire) for wire in images]

    async def pull(self, reference: str, progress: Any = None) -> ImageInfo:
        """Pulls on the server; ``progress`` is not called (the API reports no progress)."""
        body = {"reference": reference}
        return ImageInfo._from_wire(await self._client.request("POST", f"{self._root}/pull", json_body=body, long=True))

    def get(self, reference: str) -> NoReturn:
        unsupported("Images.get (list() gives every image of the server)")

    async def remove(self, reference: str) -> None:
        await self._client.request("DELETE", f"{self._root}/{quote(reference, safe='/:@')}", long=True)

    async def gc(self) -> NoReturn:
        unsupported("Images.gc (the server collects its own store)")


class RestRuntime:
    """The boxes of one ``boxlite serve`` server (those the API key may see)."""

    def __init__(self, options: BoxliteRestOptions) -> None:
        if not isinstance(options, BoxliteRestOptions):
            raise ConfigError(f"Boxlite.rest takes a BoxliteRestOptions, not {type(options).__name__}")
        self.options = options
        self.client = RestClient(options)
        self._images = RestImages(self.client)
        # Boxes made or fetched through this runtime: close() stops them, as locally.
        self._handled: dict[str, RestBox] = {}

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def home_dir(self) -> str:
        unsupported("Boxlite.home_dir (the home is on the server)")

    def guest_dir(self) -> str:
        unsupported("the guest directory (it is on the server)")

    def images(self) -> RestImages:
        return self._images

    def metrics(self) -> RuntimeMetrics:
        return RuntimeMetrics._from_wire(self.client.request_sync("GET", f"{self.client.root}/metrics"))

    def _handle(self, wire: Any) -> RestBox:
        if not isinstance(wire, dict):
            raise self.client.bad_reply("a box that is not a JSON object")
        box = RestBox(self.client, wire)
        self._handled[box.id] = box
        return box

    async def create(self, options: BoxOptions, name: str | None = None) -> RestBox:
        body = create_body(options, name)
        return self._handle(await self.client.request("POST", f"{self.client.root}/boxes", json_body=body, long=True))

    async def get(self, id_or_name: str) -> RestBox | None:
        try:
            wire = await self.client.request("GET", self.client.box_path(id_or_name))
        except NotFoundError:
            return None
        return self._handle(wire)

    async def get_info(self, id_or_name: str) -> BoxInfo | None:
        try:
            wire = await self.client.request("GET", self.client.box_path(id_or_name))
        except NotFoundError:
            return None
        return BoxInfo._from_wire(wire)

    async def list_info(self) -> list[BoxInfo]:
        answer = await self.client.request("GET", f"{self.client.root}/boxes")
        boxes = answer.get("boxes") if isinstance(answer, dict) else None
        if not isinstance(boxes, list):
            raise self.client.bad_reply("a box list without `boxes`")
        return [BoxInfo._from_wire(wire) for wire in boxes]

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        await self.client.request(
            "DELETE", self.client.box_path(id_or_name), params={"force": "true" if force else "false"}, long=True
        )
        for box_id, box in list(self._handled.items()):
            if id_or_name in (box_id, box.name):
                del self._handled[box_id]

    async def import_box(self, archive_path: Any, name: str | None = None, *, untrusted: bool = False) -> RestBox:
        unsupported("Boxlite.import_box")

    def boxes(self) -> list[RestBox]:
        return list(self._handled.values())

    def close(self) -> asyncio.Future[None]:
        """Stops the boxes this runtime made or fetched, concurrently, then closes the
        connections (a later call opens new ones)."""
        return asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        stops = [
            self.client.request("POST", self.client.box_path(box_id, "stop"), long=True) for box_id in self._handled
        ]
        results = await asyncio.gather(*stops, return_exceptions=True)
        await self.client.aclose()
        _first_error(results)

    def close_blocking(self) -> None:
        results: list[Any] = []
        for box_id in list(self._handled):
            try:
                self.client.request_sync("POST", self.client.box_path(box_id, "stop"), long=True)
            except BoxliteError as e:
                results.append(e)
        self.client.close_sync()
        _first_error(results)


def _first_error(results: list[Any]) -> None:
    """Raises the first failure of a close; a box removed meanwhile is no failure."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, NotFoundError):
            raise result


__all__ = ["RestImages", "RestRuntime"]
