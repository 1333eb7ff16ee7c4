"""Routes of the runtime's and a box's metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from . import models
from .deps import Key, State

router = APIRouter(prefix="/v1/default", tags=["metrics"])


@router.get("/metrics", response_model=models.RuntimeMetrics)
async def runtime_metrics(state: State, key: Key) -> dict[str, Any]:
    return state.runtime.metrics()._to_wire()


@router.get("/boxes/{box}/metrics", response_model=models.BoxMetrics)
async def box_metrics(box: str, state: State, key: Key) -> dict[str, Any]:
    return (await (await state.box(box, key)).metrics())._to_wire()
