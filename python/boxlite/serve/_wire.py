"""Wire shapes of the core's values (docs/serve.md, the REST contract).

The core owns them (``BoxInfo._to_wire()``, ...); until a build has them, the same dicts are
made here from the public attributes. Errors: ``boxlite.errors.error_to_wire``.
"""

from __future__ import annotations

from typing import Any

_BOX_INFO_KEYS = (
    "name",
    "status",
    "running",
    "pid",
    "image",
    "cpus",
    "memory_mib",
    "created_at",
    "started_at",
    "accelerator",
    "hardware_isolated",
    "detach",
    "auto_remove",
)


def _core(value: Any) -> dict[str, Any] | None:
    to_wire = getattr(value, "_to_wire", None)
    return dict(to_wire()) if callable(to_wire) else None


def _properties(value: Any) -> dict[str, Any]:
    """Every public property of a native value class."""
    names = [n for n, v in vars(type(value)).items() if not n.startswith("_") and not callable(v)]
    return {n: getattr(value, n) for n in sorted(names)}


def box_info(info: Any) -> dict[str, Any]:
    wire = _core(info)
    if wire is not None:
        return wire
    out: dict[str, Any] = {"box_id": info.id, "id": info.id}
    out.update({k: getattr(info, k, None) for k in _BOX_INFO_KEYS})
    out["exit_code"] = getattr(info.state, "exit_code", None)
    out["updated_at"] = info.started_at or info.created_at
    out["labels"] = dict(getattr(info, "labels", None) or {})
    net = info.network
    out["network"] = {
        "mode": net.mode,
        "allow_net": list(net.allow_net),
        "published_ports": [
            {"host_ip": p.host_ip, "host_port": p.host_port, "guest_port": p.guest_port, "protocol": p.protocol}
            for p in net.published_ports
        ],
    }
    return out


def metrics(value: Any) -> dict[str, Any]:
    """``BoxMetrics`` or ``RuntimeMetrics``: every property as a key."""
    return _core(value) or _properties(value)


def image_info(info: Any) -> dict[str, Any]:
    wire = _core(info)
    if wire is not None:
        return wire
    out = _properties(info)
    out["env"] = [list(pair) for pair in out.get("env", [])]
    return out
