"""Blocking twins of ``RayBoxlite`` and ``RayBox``, for drivers and tasks without an event
loop (Ray tasks cannot be ``async def``). They run the async calls on the sync API's private
loop, as ``boxlite.SyncBoxlite`` does."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from .._native import BoxInfo, BoxMetrics, BoxOptions, CopyOptions
from .._runtime import EnvLike, PathLike
from ..sync import SyncExecution, _run
from ._handle import DEFAULT_TIMEOUT, RayBox
from ._placement import SLOTS_RESOURCE, NodeCapacity
from ._runtime import DEFAULT_NAMESPACE, START_TIMEOUT, RayBoxlite


class SyncRayBox:
    """Blocking twin of ``RayBox``; picklable like it (pass it to tasks)."""

    def __init__(self, box: RayBox) -> None:
        self._box = box

    def __reduce__(self) -> tuple[Any, ...]:
        return (SyncRayBox, (self._box,))

    @property
    def box(self) -> RayBox:
        """The async handle behind this one."""
        return self._box

    @property
    def id(self) -> str:
        return self._box.id

    @property
    def name(self) -> str | None:
        return self._box.name

    @property
    def node_id(self) -> str:
        return self._box.node_id

    @property
    def url(self) -> str:
        return self._box.url

    @property
    def default_command(self) -> list[str]:
        return self._box.default_command

    def is_lost(self) -> bool:
        return _run(self._box.is_lost())

    def info(self) -> BoxInfo:
        return _run(self._box.info())

    def exec(
        self,
        command: str | None = None,
        args: Iterable[str] | None = None,
        env: EnvLike = None,
        tty: bool | tuple[int, int] | None = None,
        user: str | None = None,
        timeout_secs: float | None = None,
        cwd: str | None = None,
    ) -> SyncExecution:
        execution = _run(self._box.exec(command, args, env, tty, user, timeout_secs, cwd))
        return SyncExecution(execution)

    def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None:
        _run(self._box.copy_in(host_path, box_path, copy_options))

    def copy_out(
        self, box_path: str, host_path: PathLike, copy_options: CopyOptions | None = None, max_bytes: int | None = None
    ) -> None:
        _run(self._box.copy_out(box_path, host_path, copy_options, max_bytes))

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return _run(self._box.read_file(path, max_bytes))

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        _run(self._box.write_file(path, data, mode))

    def list_dir(self, path: str) -> list[str]:
        return _run(self._box.list_dir(path))

    def start(self) -> None:
        _run(self._box.start())

    def stop(self) -> None:
        _run(self._box.stop())

    def metrics(self) -> BoxMetrics:
        return _run(self._box.metrics())

    def __enter__(self) -> SyncRayBox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Sync{self._box!r}"


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
