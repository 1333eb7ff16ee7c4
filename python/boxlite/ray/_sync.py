"""Blocking twins of ``RayBoxlite`` and ``RayBox``, for drivers and tasks without an event
loop (Ray tasks cannot be ``async def``). They run the async calls on the sync API's private
loop, as ``boxlite.SyncBoxlite`` does."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .._native import BoxInfo, BoxOptions
from ..sync import _run, _SyncBoxCalls
from ._handle import DEFAULT_TIMEOUT, RayBox
from ._placement import SLOTS_RESOURCE, NodeCapacity
from ._runtime import DEFAULT_NAMESPACE, START_TIMEOUT, RayBoxlite


class SyncRayBox(_SyncBoxCalls[RayBox]):
    """Blocking twin of ``RayBox``; picklable like it (pass it to tasks)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (SyncRayBox, (self._box,))

    @property
    def node_id(self) -> str:
        return self._box.node_id

    @property
    def url(self) -> str:
        return self._box.url

    def is_lost(self) -> bool:
        return _run(self._box.is_lost())

    def info(self) -> BoxInfo:
        return _run(self._box.info())


class SyncRayBoxlite:
    """Blocking twin of ``RayBoxlite`` (same arguments); ``with`` closes it at the end."""

    def __init__(
        self,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        home_base: str | None = None,
        resource: str = SLOTS_RESOURCE,
        allow_host_paths: bool = False,
        runtime_options: Mapping[str, Any] | None = None,
        server_options: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        start_timeout: float = START_TIMEOUT,
        address: str | None = None,
        detached: bool = False,
    ) -> None:
        self._runtime = RayBoxlite(
            namespace=namespace,
            home_base=home_base,
            resource=resource,
            allow_host_paths=allow_host_paths,
            runtime_options=runtime_options,
            server_options=server_options,
            timeout=timeout,
            start_timeout=start_timeout,
            address=address,
            detached=detached,
        )

    @property
    def runtime(self) -> RayBoxlite:
        """The async runtime behind this one."""
        return self._runtime

    def nodes(self) -> list[NodeCapacity]:
        return _run(self._runtime.nodes())

    def create(self, options: BoxOptions, name: str | None = None, *, node_id: str | None = None) -> SyncRayBox:
        return SyncRayBox(_run(self._runtime.create(options, name, node_id=node_id)))

    def get(self, id_or_name: str) -> SyncRayBox | None:
        box = _run(self._runtime.get(id_or_name))
        return None if box is None else SyncRayBox(box)

    def get_info(self, id_or_name: str) -> BoxInfo | None:
        return _run(self._runtime.get_info(id_or_name))

    def list_info(self, state: str | None = None) -> list[BoxInfo]:
        return _run(self._runtime.list_info(state))

    def remove(self, id_or_name: str, force: bool = False) -> None:
        _run(self._runtime.remove(id_or_name, force))

    def close(self) -> None:
        _run(self._runtime.close())

    def end_runtimes(self) -> None:
        _run(self._runtime.end_runtimes())

    def shutdown(self, timeout: float | None = None) -> None:
        self.close()

    def __enter__(self) -> SyncRayBoxlite:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sync{self._runtime!r}"
