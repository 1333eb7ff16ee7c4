"""``RayBoxlite``: the local runtime's API over a Ray cluster. Each node that advertises
``boxlite_slots`` gets a runtime actor when a box is first placed there; new boxes go to the
node with the most free slots."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._native import BoxInfo, BoxOptions
from .._runtime import Box, Boxlite
from ..errors import (
    AlreadyExistsError,
    BoxliteError,
    BoxLostError,
    BoxNotFoundError,
    ConfigError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UpstreamUnavailableError,
)
from ._actor import NodeAddress, NodeConfig, actor_class, actor_name
from ._handle import DEFAULT_TIMEOUT, PING_TIMEOUT, RayBox, ray_result, rest_runtime, runtime_gone
from ._placement import SLOTS_RESOURCE, NodeCapacity, node_slots, placement_order

#: The Ray namespace the runtime actors are named in.
DEFAULT_NAMESPACE = "boxlite"
#: Seconds a node's runtime actor may take to start (it clears its home and starts a server).
START_TIMEOUT = 120.0


@dataclass
class _Node:
    """A node's runtime actor as this process knows it."""

    actor: Any
    address: NodeAddress
    rest: Boxlite


class RayBoxlite:
    """Boxes on the nodes of a Ray cluster, with the API of ``boxlite.Boxlite``.

    ``namespace`` names the Ray namespace of the runtime actors (every ``RayBoxlite`` in it
    shares them). The first one to start a node's actor sets its ``home_base`` (default
    ``$BOXLITE_RAY_HOME`` or ``<temp dir>/boxlite-ray`` on the node), ``allow_host_paths``
    (``rootfs_path`` and volumes name paths on the node), ``runtime_options`` (keyword
    arguments of ``boxlite.Options`` there) and ``server_options`` (fields of
    ``boxlite.serve.ServeConfig``). ``timeout`` bounds each request to a node's server.
    ``detached=True`` starts runtimes that outlive this driver (Ray's detached actors): their
    boxes stay for other drivers of the namespace until ``close()`` here or, once this driver
    is gone, ``end_runtimes()`` from another.
    Ray must be initialised (``ray.init``) first, or ``address`` is passed to ``ray.init``.
    """

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
        _check_options(runtime_options or {}, server_options or {})
        if not ray.is_initialized():
            ray.init(address=address)
        self.namespace = namespace
        self.resource = resource
        self._home_base = home_base
        self._allow_host_paths = allow_host_paths
        self._runtime_options = dict(runtime_options or {})
        self._server_options = dict(server_options or {})
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._detached = detached
        self._owner = secrets.token_hex(8)
        self._nodes: dict[str, _Node] = {}
        self._made: dict[str, RayBox] = {}
        self._last_info: dict[str, dict[str, Any]] = {}
        self._pending: Counter[str] = Counter()
        self._closed = False

    # -- nodes --------------------------------------------------------------------------------

    async def _slots(self) -> dict[str, tuple[str, int]]:
        return node_slots(await asyncio.to_thread(ray.nodes), self.resource)

    async def _known(self, node_id: str) -> _Node | None:
        """The node's runtime if one runs (started by anyone in the namespace), else None."""
        node = self._nodes.get(node_id)
        if node is not None:
            if await runtime_gone(node.actor) is None:
                return node
            del self._nodes[node_id]
        try:
            actor = await asyncio.to_thread(ray.get_actor, actor_name(node_id), self.namespace)
        except ValueError:
            return None
        return await self._connect(actor)

    async def _connect(self, actor: Any, starting: bool = False) -> _Node | None:
        """The actor's node runtime; None if it died (``starting``: an error saying why)."""
        try:
            address: NodeAddress = await ray_result(actor.address.remote(), self._start_timeout)
        except RayActorError as error:
            if not starting:
                return None
            raise UpstreamUnavailableError(
                f"the boxlite runtime of a Ray node could not start: {_last_line(error)} (the whole "
                "traceback is in that node's Ray worker logs: `ray logs`)"
            ) from None
        except asyncio.TimeoutError:
            raise UpstreamUnavailableError(
                f"a boxlite runtime actor did not answer within {self._start_timeout:g} s"
            ) from None
        node = _Node(actor, address, rest_runtime(address, self._timeout))
        self._nodes[address.node_id] = node
        return node

    async def _ensure(self, node_id: str, slots: int) -> _Node:
        """The node's runtime, started now if none runs."""
        node = await self._known(node_id)
        if node is not None:
            return node
        config = NodeConfig(
            slots=slots,
            owner=self._owner,
            home_base=self._home_base,
            allow_host_paths=self._allow_host_paths,
            start_timeout=self._start_timeout,
            runtime_options=self._runtime_options,
            server_options=self._server_options,
        )
        actor = actor_class().options(
            name=actor_name(node_id),
            namespace=self.namespace,
            get_if_exists=True,
            lifetime="detached" if self._detached else None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        handle = await asyncio.to_thread(actor.remote, config)
        try:
            node = await self._connect(handle, starting=True)
        except UpstreamUnavailableError:
            ray.kill(handle, no_restart=True)
            raise
        assert node is not None
        return node

    async def _count(self, node: _Node) -> int | None:
        """How many boxes the node's runtime holds; None if it cannot say."""
        try:
            return len(await node.rest.list_info())
        except (UpstreamUnavailableError, OSError):
            return None

    async def nodes(self) -> list[NodeCapacity]:
        """Every alive node that advertises the slots resource, with its boxes now."""
        slots = await self._slots()

        async def capacity(node_id: str, where: str, total: int) -> NodeCapacity:
            node = await self._known(node_id)
            boxes = None if node is None else await self._count(node)
            if boxes is None:
                return NodeCapacity(node_id, where, total)
            return NodeCapacity(node_id, where, total, boxes, running=True)

        return list(await asyncio.gather(*(capacity(n, a, s) for n, (a, s) in slots.items())))

    # -- boxes --------------------------------------------------------------------------------

    async def create(self, options: BoxOptions, name: str | None = None, *, node_id: str | None = None) -> RayBox:
        """Creates a box on the node with the most free slots (or on ``node_id``) and boots
        it; returns its handle. ``ResourceExhaustedError`` when no node has a free slot,
        ``AlreadyExistsError`` when a box of the cluster has the name."""
        self._check_open()
        if options.detach:
            raise InvalidArgumentError(
                "detach=True is not for RayBoxlite: a box lives as long as its node's runtime actor"
            )
        name = name if name is not None else options.name
        if name is not None and await self.get(name) is not None:
            raise AlreadyExistsError(f"a box named {name!r} already exists in the cluster")
        capacities = await self.nodes()
        if not capacities:
            raise ConfigError(
                f"no alive Ray node advertises the {self.resource!r} resource; start nodes with "
                f"`ray start --resources='{{\"{self.resource}\": 4}}'` (or resources= in ray.init)"
            )
        if node_id is not None:
            chosen = [c for c in capacities if c.node_id == node_id]
            if not chosen:
                raise InvalidArgumentError(f"node {node_id!r} is not an alive node with {self.resource!r}")
            capacities = chosen
        order = placement_order(capacities, self._pending)
        by_id = {c.node_id: c for c in capacities}
        for candidate in order:
            self._pending[candidate] += 1
            try:
                node = await self._ensure(candidate, by_id[candidate].slots)
                box = await self._create_on(node, options, name)
            finally:
                self._pending[candidate] -= 1
            if box is None:
                continue
            handle = RayBox(node.address, node.actor, box.id, box.name, box.default_command, self._timeout)
            self._made[box.id] = handle
            info = await node.rest.get_info(box.id)
            if info is not None:
                self._remember(info)
            return handle
        used = sum(c.boxes for c in capacities)
        total = sum(c.slots for c in capacities)
        raise ResourceExhaustedError(
            f"no free boxlite slot: {used} boxes in {total} slots on {len(capacities)} node(s); remove boxes "
            f"or add nodes with the {self.resource!r} resource"
        )

    async def _create_on(self, node: _Node, options: BoxOptions, name: str | None) -> Box | None:
        """The box made on ``node``; None when the node filled up or went away meanwhile."""
        try:
            return await asyncio.wait_for(node.rest.create(options, name), self._timeout)
        except ResourceExhaustedError:
            return None  # filled by another creator meanwhile
        except UpstreamUnavailableError:
            if await runtime_gone(node.actor) is None:
                raise
            self._nodes.pop(node.address.node_id, None)
            return None
        except asyncio.TimeoutError:
            raise UpstreamUnavailableError(
                f"creating a box on Ray node {node.address.node_id[:12]} took longer than {self._timeout:g} s"
            ) from None

    def _remember(self, info: BoxInfo) -> None:
        to_wire = getattr(info, "_to_wire", None)
        if callable(to_wire) and info.id in self._made:
            self._last_info[info.id] = dict(to_wire())

    def _lost_info(self, box_id: str) -> BoxInfo | None:
        wire = self._last_info.get(box_id)
        from_wire = getattr(BoxInfo, "_from_wire", None)
        if wire is None or not callable(from_wire):
            return None
        return from_wire({**wire, "status": "lost", "running": False, "pid": None})  # type: ignore[no-any-return]

    def _find_made(self, id_or_name: str) -> RayBox | None:
        if id_or_name in self._made:
            return self._made[id_or_name]
        return next((b for b in self._made.values() if b.name == id_or_name), None)

    async def _running_nodes(self) -> list[_Node]:
        slots = await self._slots()
        found = await asyncio.gather(*(self._known(node_id) for node_id in slots))
        return [node for node in found if node is not None]

    async def get(self, id_or_name: str) -> RayBox | None:
        """The box with this id or name on any node, or None. A box this runtime made on a
        node that is gone is returned too: its calls raise ``BoxLostError``."""
        made = self._find_made(id_or_name)
        if made is not None and await made.is_lost():
            return made
        for node in await self._running_nodes():
            try:
                box = await node.rest.get(id_or_name)
            except (UpstreamUnavailableError, OSError):
                continue
            if box is None:
                continue
            made = self._made.get(box.id)
            if made is not None and made.url == node.address.url:
                return made
            return RayBox(node.address, node.actor, box.id, box.name, box.default_command, self._timeout)
        return None

    async def get_info(self, id_or_name: str) -> BoxInfo | None:
        box = await self.get(id_or_name)
        if box is None:
            return None
        try:
            info = await box.info()
        except BoxLostError:
            return self._lost_info(box.id)
        self._remember(info)
        return info

    async def list_info(self, state: str | None = None) -> list[BoxInfo]:
        """Every box of the cluster's runtimes in this namespace, by node; the boxes this
        runtime made on nodes that are gone follow with status ``"lost"``."""
        infos: list[BoxInfo] = []
        seen: set[str] = set()
        listed: set[str] = set()  # the servers that answered
        for node in await self._running_nodes():
            try:
                answer = await node.rest.list_info()
            except (UpstreamUnavailableError, OSError):
                continue
            listed.add(node.address.url)
            for info in answer:
                made = self._made.get(info.id)
                if made is not None and made.url != node.address.url:
                    continue  # an id reused by a later runtime of the node cannot be ours
                seen.add(info.id)
                self._remember(info)
                infos.append(info)
        for box_id, made in list(self._made.items()):
            if box_id in seen:
                continue
            if made.url in listed:
                self._forget(box_id)  # its server answered without it: removed (auto_remove, elsewhere)
            elif await made.is_lost():
                lost = self._lost_info(box_id)
                if lost is not None:
                    infos.append(lost)
        return infos if state is None else [i for i in infos if i.status == state]

    async def remove(self, id_or_name: str, force: bool = False) -> None:
        """Deletes a box; a lost one is only forgotten. ``BoxNotFoundError`` if none."""
        box = await self.get(id_or_name)
        if box is None:
            raise BoxNotFoundError(f"no box {id_or_name!r} on any node of the cluster")
        if await box.is_lost():
            self._forget(box.id)
            return
        node = self._nodes.get(box.node_id)
        if node is None:
            raise UpstreamUnavailableError(f"the runtime of Ray node {box.node_id[:12]} does not answer")
        await node.rest.remove(box.id, force)
        self._forget(box.id)

    def _forget(self, box_id: str) -> None:
        self._made.pop(box_id, None)
        self._last_info.pop(box_id, None)

    # -- the end ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            from ..errors import InvalidStateError

            raise InvalidStateError("this RayBoxlite is closed")

    async def close(self) -> None:
        """Stops the boxes this runtime made, then ends the node runtimes it started (boxes
        others made there stop with them). Every step is bounded; a node that is gone is
        skipped."""
        if self._closed:
            return
        self._closed = True

        async def stop(box: RayBox) -> None:
            with contextlib.suppress(BoxliteError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(box.stop(), self._timeout)

        await asyncio.gather(*(stop(b) for b in self._made.values()))
        mine = [n for n in self._nodes.values() if n.address.owner == self._owner]
        await asyncio.gather(*(self._end(node) for node in mine))
        self._nodes.clear()

    async def end_runtimes(self) -> None:
        """Ends every runtime of this namespace, whoever started it, and so every box on them:
        for detached runtimes whose driver is gone. Bounded like ``close()``."""
        nodes = await self._running_nodes()
        await asyncio.gather(*(self._end(node) for node in nodes))
        self._nodes.clear()

    async def _end(self, node: _Node) -> None:
        with contextlib.suppress(RayActorError, asyncio.TimeoutError):
            await ray_result(node.actor.stop.remote(self._timeout), self._timeout + PING_TIMEOUT)
        with contextlib.suppress(Exception):  # already dead is fine
            ray.kill(node.actor, no_restart=True)

    async def shutdown(self, timeout: float | None = None) -> None:
        """The published package's name for ``close()``."""
        await self.close()

    async def __aenter__(self) -> RayBoxlite:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"RayBoxlite(namespace={self.namespace!r}, nodes={len(self._nodes)}, boxes={len(self._made)})"


def _last_line(error: BaseException) -> str:
    """The last line of a Ray error's text: the exception its remote traceback ends with."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


#: ServeConfig fields each node's runtime sets itself.
_SERVER_OWNED = ("keys", "allow_host_paths", "max_boxes_per_key")


def _check_options(runtime_options: Mapping[str, Any], server_options: Mapping[str, Any]) -> None:
    """Refuses, here in the driver, options a node's runtime would fail to start with."""
    from .._native import Options
    from ..serve.config import ServeConfig

    if "home_dir" in runtime_options:
        raise InvalidArgumentError("runtime_options cannot set home_dir: each node's home is <home_base>/<node id>")
    try:
        Options(**runtime_options)
    except TypeError as e:
        raise InvalidArgumentError(f"runtime_options: {e}") from None
    owned = sorted(set(server_options) & set(_SERVER_OWNED))
    if owned:
        raise InvalidArgumentError(
            f"server_options cannot set {', '.join(owned)}: RayBoxlite sets them (a fresh key per node, "
            "allow_host_paths, the node's slots)"
        )
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(server_options) - known)
    if unknown:
        raise InvalidArgumentError(
            f"server_options: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    ServeConfig(**server_options)
