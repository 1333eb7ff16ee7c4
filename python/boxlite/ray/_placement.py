"""Where a new box goes: the node with the most free slots. Pure functions over what the
nodes report, so the rule is tested without a cluster."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: The Ray resource a node advertises its box capacity with (``ray start --resources``).
SLOTS_RESOURCE = "boxlite_slots"


@dataclass(frozen=True)
class NodeCapacity:
    """One node's box capacity as last seen: ``slots`` from its Ray resource, ``boxes`` the
    boxes its runtime holds (stopped ones too: ``exec`` starts them again), ``running``
    whether its runtime actor is up (a node without one has no boxes yet)."""

    node_id: str
    address: str
    slots: int
    boxes: int = 0
    running: bool = False

    @property
    def free(self) -> int:
        return max(self.slots - self.boxes, 0)


def node_slots(nodes: Iterable[Mapping[str, object]], resource: str = SLOTS_RESOURCE) -> dict[str, tuple[str, int]]:
    """``{node id: (address, slots)}`` of the alive nodes in ``ray.nodes()`` output that
    advertise at least one slot of ``resource``."""
    found: dict[str, tuple[str, int]] = {}
    for node in nodes:
        resources = node.get("Resources")
        if not node.get("Alive") or not isinstance(resources, Mapping):
            continue
        slots = int(float(resources.get(resource, 0) or 0))
        if slots > 0:
            found[str(node["NodeID"])] = (str(node.get("NodeManagerAddress", "")), slots)
    return found


def placement_order(nodes: Iterable[NodeCapacity], pending: Mapping[str, int] | None = None) -> list[str]:
    """The ids of the nodes that have a free slot once ``pending`` creations (per node id)
    are counted, most free slots first; ties go to the node with fewer boxes, then by id so
    the order is stable."""
    pending = pending or {}
    free = {n.node_id: n.free - pending.get(n.node_id, 0) for n in nodes}
    boxes = {n.node_id: n.boxes + pending.get(n.node_id, 0) for n in nodes}
    usable = [node_id for node_id, slots in free.items() if slots > 0]
    return sorted(usable, key=lambda node_id: (-free[node_id], boxes[node_id], node_id))
