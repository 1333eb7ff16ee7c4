"""Routes of the image store (shared by every key of the server)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from . import models
from .deps import Key, State

router = APIRouter(prefix="/v1/default/images", tags=["images"])


@router.get("", response_model=models.ImageList)
async def list_images(state: State, key: Key) -> dict[str, Any]:
    return {"images": [i._to_wire() for i in await state.runtime.images.list()]}


@router.post("/pull", response_model=models.ImageInfo)
async def pull(body: models.Pull, state: State, key: Key) -> dict[str, Any]:
    return (await state.runtime.images.pull(body.reference))._to_wire()


@router.delete("/{reference:path}", status_code=204)
async def remove(reference: str, state: State, key: Key) -> Response:
    await state.runtime.images.remove(reference)
    return Response(status_code=204)
