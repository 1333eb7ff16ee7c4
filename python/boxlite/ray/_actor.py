"""The runtime actor of one node: ``boxlite serve`` in-process on the node's address, with a
fresh API key and a home on the node's disk. Handles reach its boxes over HTTP, so they work
from any process of the cluster; Ray is only used to start, find and watch the actor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from ..errors import BoxliteError

#: The environment variable (read on each node) naming where node homes are made.
HOME_ENV = "BOXLITE_RAY_HOME"


@dataclass(frozen=True)
class NodeConfig:
    """What a node's runtime is started with; the first ``RayBoxlite`` to start a node's
    actor decides it."""

    slots: int
    owner: str
    home_base: str | None = None
    allow_host_paths: bool = False
    start_timeout: float = 60.0
    runtime_options: dict[str, Any] = field(default_factory=dict)
    server_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeAddress:
    """Where a node's runtime answers (``url`` with ``key``) and what it holds to."""

    node_id: str
    url: str
    key: str
    slots: int
    home: str
    owner: str


def node_home(base: str | None, node_id: str) -> Path:
    """The node's home: ``<base>/<node id prefix>``, the base defaulting to
    ``$BOXLITE_RAY_HOME`` or ``<temp dir>/boxlite-ray`` on the node. The id keeps nodes that
    share a disk (several Ray nodes on one machine) apart."""
    root = base or os.environ.get(HOME_ENV) or os.path.join(tempfile.gettempdir(), "boxlite-ray")
    return Path(root) / node_id[:16]


def _listen(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, 0), family=family)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _clear_home(home: Path) -> None:
    """Removes the boxes a previous runtime of this node left: their API key died with it,
    so no handle can reach them any more."""
    if not (home / "boxes").is_dir():
        return
    from .._native import Options
    from .._runtime import Boxlite

    async def clear() -> None:
        async with Boxlite(Options(home_dir=home, templates=False)) as runtime:
            for info in await runtime.list_info():
                with contextlib.suppress(BoxliteError):  # one broken leftover must not block the node
                    await runtime.remove(info.id, force=True)

    asyncio.run(clear())


class NodeRuntime:
    """The actor body (wrapped with ``ray.remote`` by ``actor_class``)."""

    def __init__(self, config: NodeConfig) -> None:
        import uvicorn

        from .._native import Options
        from .._runtime import Boxlite
        from ..serve.app import create_app
        from ..serve.config import ApiKey, ServeConfig

        self._node_id = ray.get_runtime_context().get_node_id()
        self._home = node_home(config.home_base, self._node_id)
        self._home.mkdir(parents=True, exist_ok=True)
        _clear_home(self._home)
        self._key = secrets.token_urlsafe(32)
        self._config = config
        serve_config = ServeConfig(
            keys=(ApiKey.from_secret(self._key, "ray"),),
            allow_host_paths=config.allow_host_paths,
            max_boxes_per_key=config.slots,
            **config.server_options,
        )
        self._runtime = Boxlite(Options(home_dir=self._home, **config.runtime_options))
        host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        listener = _listen(host)
        app = create_app(self._runtime, serve_config)
        # As `boxlite serve` runs it (boxlite.serve.run).
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="on", ws="websockets-sansio", timeout_graceful_shutdown=5)
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener]}, name="boxlite-serve", daemon=True
        )
        self._thread.start()
        self._wait_started(config.start_timeout)
        self._url = _url(host, listener.getsockname()[1])

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the boxlite server on this node exited while starting (home {self._home})")
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise RuntimeError(f"the boxlite server on this node did not start within {timeout:g} s")
            time.sleep(0.02)

    def address(self) -> NodeAddress:
        return NodeAddress(
            node_id=self._node_id,
            url=self._url,
            key=self._key,
            slots=self._config.slots,
            home=str(self._home),
            owner=self._config.owner,
        )

    def ping(self) -> bool:
        """Whether the server still runs (the actor answering says the process does)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> bool:
        """Ends the server, then the runtime, which stops every box of the node. Whether the
        server ended in time."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self._runtime.close()
        return not self._thread.is_alive()


def actor_name(node_id: str) -> str:
    return f"boxlite-node-{node_id}"


_actor_class: Any = None


def actor_class() -> Any:
    """``NodeRuntime`` as a Ray actor class (made once per process)."""
    global _actor_class
    if _actor_class is None:
        _actor_class = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(NodeRuntime)
    return _actor_class
