"""Request bodies of the REST API built from the API's own arguments."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from .._native import BoxOptions
from ..errors import InvalidArgumentError, UnsupportedError

#: Fields sent as they are when they differ from ``BoxOptions()``'s.
_PLAIN = ("image", "rootfs_path", "cpus", "memory_mib", "disk_size_gb", "working_dir", "user", "tty", "detach")
_PORT_KEYS = ("host_port", "guest_port", "protocol", "host_ip")


def _unsupported(field: str) -> UnsupportedError:
    return UnsupportedError(f"not supported: BoxOptions.{field} on a remote runtime (the REST API has no such field)")


def create_body(options: BoxOptions, name: str | None) -> dict[str, Any]:
    """The ``POST /boxes`` body for ``options``: the fields that differ from ``BoxOptions()``'s,
    so the server applies the same defaults a local runtime would."""
    default = BoxOptions()
    body: dict[str, Any] = {}
    for field in _PLAIN:
        value = getattr(options, field)
        if value != getattr(default, field):
            body[field] = os.fspath(value) if field == "rootfs_path" else value
    if options.env:
        body["env"] = dict(options.env)
    for field in ("entrypoint", "cmd"):
        value = getattr(options, field)
        if value is not None:
            body[field] = list(value)
    if options.auto_delete not in (0, 1):
        raise _unsupported("auto_delete (other than 0 or 1)")
    if options.auto_remove != default.auto_remove:
        body["auto_remove"] = options.auto_remove
    if options.volumes:
        body["volumes"] = [_volume(v) for v in options.volumes]
    if options.ports:
        body["ports"] = [_port(p) for p in options.ports]
    if options.network is not None:
        body["network"] = _network(options.network)
    for field in ("advanced", "auto_stop"):
        if getattr(options, field) is not None:
            raise _unsupported(field)
    if options.secrets:
        raise _unsupported("secrets")
    if not options.auto_resume:
        raise _unsupported("auto_resume")
    chosen = name if name is not None else options.name
    if chosen is not None:
        body["name"] = chosen
    return body


def _volume(volume: Any) -> dict[str, Any]:
    if isinstance(volume, Mapping):
        host, guest, read_only = volume.get("host_path"), volume.get("guest_path"), volume.get("read_only", False)
    else:
        host, guest, *rest = volume
        read_only = rest[0] if rest else False
    return {"host_path": os.fspath(host) if host is not None else None, "guest_path": guest, "read_only": read_only}


def _port(port: Any) -> dict[str, Any]:
    if isinstance(port, Mapping):
        return {k: port[k] for k in _PORT_KEYS if k in port}
    return dict(zip(_PORT_KEYS, port, strict=False))


def _network(spec: Any) -> dict[str, Any]:
    if spec.inbound is not None:
        raise _unsupported("network.inbound")
    return {"mode": spec.mode, "allow_net": list(spec.allow_net)}


def env_dict(env: Any) -> dict[str, str] | None:
    """``exec``'s ``env`` (a mapping or ``(name, value)`` tuples) as the JSON object the API
    takes, refused as the local runtime refuses it."""
    if env is None:
        return None
    if isinstance(env, str):
        raise InvalidArgumentError("invalid argument `env`: expected a mapping or (name, value) pairs, got a str")
    items: Iterable[Any] = env.items() if hasattr(env, "items") else env
    out: dict[str, str] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise InvalidArgumentError(f"invalid argument `env`: expected (name, value) pairs of str, got {item}")
        out[item[0]] = item[1]
    return out


__all__ = ["create_body", "env_dict"]
