"""The blocking API under the published package's module name: ``from boxlite.sync_api
import SyncBoxlite`` works as there (see ``boxlite.sync``)."""

from __future__ import annotations

from .sync import (
    SyncBox,
    SyncBoxlite,
    SyncCodeBox,
    SyncExecStdin,
    SyncExecution,
    SyncImageHandle,
    SyncImages,
    SyncSimpleBox,
)

__all__ = [
    "SyncBox",
    "SyncBoxlite",
    "SyncCodeBox",
    "SyncExecStdin",
    "SyncExecution",
    "SyncImageHandle",
    "SyncImages",
    "SyncSimpleBox",
]
