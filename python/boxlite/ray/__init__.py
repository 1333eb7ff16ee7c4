"""boxlite on a Ray cluster: ``RayBoxlite`` places boxes on the nodes that advertise
``boxlite_slots``; ``RayBox`` handles work from any driver, task or actor (docs/scale-out.md).

>>> import ray, boxlite
>>> from boxlite.ray import SyncRayBoxlite
>>> ray.init(address="auto")
>>> with SyncRayBoxlite() as rt:
...     box = rt.create(boxlite.BoxOptions(image="alpine"))
...     print(box.node_id, box.exec("uname", ["-a"]).wait().exit_code)

Importing this package imports ``ray`` (``import boxlite`` never does).
"""

from __future__ import annotations

from ..errors import BoxLostError
from ._actor import HOME_ENV, NodeAddress
from ._handle import DEFAULT_TIMEOUT, RayBox
from ._placement import SLOTS_RESOURCE, NodeCapacity, placement_order
from ._runtime import DEFAULT_NAMESPACE, RayBoxlite
from ._sync import SyncRayBox, SyncRayBoxlite

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_TIMEOUT",
    "HOME_ENV",
    "SLOTS_RESOURCE",
    "BoxLostError",
    "NodeAddress",
    "NodeCapacity",
    "RayBox",
    "RayBoxlite",
    "SyncRayBox",
    "SyncRayBoxlite",
    "placement_order",
]
