"""Routes of boxes: create, list, get, remove, start, stop. A box belongs to the key that
made it; for every other key it does not exist."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from .._native import BoxOptions, NetworkSpec
from .._runtime import Box
from ..errors import BoxliteError, BoxNotFoundError, InvalidArgumentError
from . import models
from .config import ServeConfig
from .deps import Key, State
from .state import ServeState

log = logging.getLogger("boxlite.serve")
router = APIRouter(prefix="/v1/default/boxes", tags=["boxes"])

HOST_PATHS_OFF = "host paths are disabled on this server; start it with --allow-host-paths"


def box_options(body: models.CreateBox, config: ServeConfig) -> BoxOptions:
    if not config.allow_host_paths and (body.rootfs_path is not None or body.volumes):
        raise InvalidArgumentError(HOST_PATHS_OFF)
    network = None
    if body.network is not None:
        network = NetworkSpec(mode=body.network.mode, allow_net=body.network.allow_net or None)
    return BoxOptions(
        image=body.image,
        rootfs_path=body.rootfs_path,
        cpus=body.cpus,
        memory_mib=body.memory_mib,
        disk_size_gb=body.disk_size_gb,
        working_dir=body.working_dir,
        env=list(body.env.items()),
        volumes=[(v.host_path, v.guest_path, v.read_only) for v in body.volumes or []],
        network=network,
        ports=[p.model_dump(exclude_none=True) for p in body.ports or []],
        auto_remove=body.auto_remove,
        detach=body.detach,
        entrypoint=body.entrypoint,
        cmd=body.cmd,
        user=body.user,
        tty=body.tty,
        name=body.name,
    )


def box_wire(box: Box) -> dict[str, Any]:
    wire = box.info()._to_wire()
    wire["default_command"] = box.default_command
    return wire


async def _discard(state: ServeState, box_id: str) -> None:
    state.owners.drop(box_id)
    state.forget_handles(box_id)
    with contextlib.suppress(BoxliteError):
        await state.runtime.remove(box_id, force=True)


_discarding: set[asyncio.Future[None]] = set()


def _discard_when_created(state: ServeState, creating: asyncio.Future[Box]) -> None:
    """The request went away while its box booted: the box is removed once it exists."""

    def done(future: asyncio.Future[Box]) -> None:
        if not future.cancelled() and future.exception() is None:
            task = asyncio.ensure_future(_discard(state, future.result().id))
            _discarding.add(task)
            task.add_done_callback(_discarding.discard)

    creating.add_done_callback(done)


@router.post("", status_code=201, response_model=models.Box)
async def create(body: models.CreateBox, request: Request, state: State, key: Key) -> dict[str, Any]:
    options = box_options(body, state.config)
    await state.reserve_box(key)
    try:
        creating = asyncio.ensure_future(state.runtime.create(options))
        try:
            box = await asyncio.shield(creating)
        except asyncio.CancelledError:
            _discard_when_created(state, creating)
            raise
        state.owners.set(box.id, key)
    finally:
        state.release_box(key)
    if await request.is_disconnected():
        log.info("client left while box %s was created; removing it", box.id)
        await _discard(state, box.id)
    return box_wire(box)


@router.get("", response_model=models.BoxList)
async def list_boxes(
    state: State, key: Key, status: Annotated[str | None, Query(max_length=64)] = None
) -> dict[str, Any]:
    owned = state.owners.owned_by(key)
    return {"boxes": [i._to_wire() for i in await state.runtime.list_info(status) if i.id in owned]}


@router.get("/{box}", response_model=models.Box)
async def get(box: str, state: State, key: Key) -> dict[str, Any]:
    return box_wire(await state.box(box, key))


@router.head("/{box}")
async def exists(box: str, state: State, key: Key) -> Response:
    await state.box(box, key)
    return Response(status_code=200)


@router.delete("/{box}", status_code=204)
async def remove(
    box: str, state: State, key: Key, force: Annotated[bool, Query(description="also a running box")] = False
) -> Response:
    target = await state.box(box, key)
    await state.runtime.remove(target.id, force)
    state.execs.forget_box(target.id)
    state.owners.drop(target.id)
    state.forget_handles(target.id)
    return Response(status_code=204)


@router.post("/{box}/start", response_model=models.Box)
async def start(box: str, state: State, key: Key) -> dict[str, Any]:
    target = await state.box(box, key)
    await target.start()
    return box_wire(target)


@router.post("/{box}/stop", response_model=models.Box)
async def stop(box: str, state: State, key: Key) -> dict[str, Any]:
    target = await state.box(box, key)
    before = box_wire(target)
    await target.stop()
    state.execs.forget_box(target.id)
    try:
        return box_wire(target)
    except BoxNotFoundError:
        # auto_remove: the stop deleted it; this is its last state.
        state.owners.drop(target.id)
        state.forget_handles(target.id)
        return {**before, "status": "stopped", "running": False, "pid": None}
