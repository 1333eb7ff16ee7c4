"""What a ``boxlite serve`` server is configured with: its keys, its limits, its timeouts.

No third-party import here: ``boxlite --help`` builds the ``serve`` flags from this module
without loading the web framework.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError

MIB = 1024 * 1024
DEFAULT_PORT = 8100
#: The key name every request gets on a server without keys (loopback only).
ANONYMOUS = "anonymous"

_KEY_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class ApiKey:
    """A bearer key and the name boxes made with it are recorded under (never the key)."""

    name: str
    digest: bytes = field(repr=False)  # sha256 of the key: compared at a fixed length

    @classmethod
    def from_secret(cls, secret: str, name: str | None = None) -> ApiKey:
        if not secret or any(c.isspace() for c in secret):
            raise InvalidArgumentError("an API key must be non-empty and contain no whitespace")
        digest = hashlib.sha256(secret.encode()).digest()
        # A bare key is known by a short hash of it: stable across restarts, useless to guess from.
        return cls(name or f"key-{digest.hex()[:12]}", digest)


@dataclass(frozen=True)
class ServeConfig:
    """Keys and limits of one server. ``keys`` empty means no authentication (loopback only)."""

    keys: tuple[ApiKey, ...] = ()
    allow_host_paths: bool = False
    max_body_bytes: int = 256 * MIB
    max_boxes_per_key: int = 32
    max_concurrent_execs: int = 64
    orphan_timeout: float = 60.0
    exec_retention: float = 60.0
    exec_backlog_bytes: int = 1 * MIB
    max_tar_members: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_boxes_per_key", "max_concurrent_execs", "exec_backlog_bytes"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tar_members < 1:
            raise InvalidArgumentError(f"max_tar_members must be at least 1, got {self.max_tar_members}")
        for name in ("orphan_timeout", "exec_retention"):
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise InvalidArgumentError("two API keys have the same name (or the same key is given twice)")

    def limits(self) -> dict[str, int | float]:
        """The limits as ``GET /v1/config`` shows them."""
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_boxes_per_key": self.max_boxes_per_key,
            "max_concurrent_execs": self.max_concurrent_execs,
            "orphan_timeout_seconds": self.orphan_timeout,
            "exec_retention_seconds": self.exec_retention,
            "exec_backlog_bytes": self.exec_backlog_bytes,
            "max_tar_members": self.max_tar_members,
        }


def parse_keys_file(path: str | Path) -> list[ApiKey]:
    """One key per line, ``#`` comments and blank lines ignored; ``name:key`` names a key."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the API keys file {path}: {e.strerror or e}") from e
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep:
            name, secret = "", line
        elif not _KEY_NAME.match(name):
            raise InvalidArgumentError(
                f"{path}:{number}: a key name is 1-64 letters, digits or _.@- (the line is name:key or key)"
            )
        try:
            keys.append(ApiKey.from_secret(secret, name or None))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{path}:{number}: {e}") from None
    return keys


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (what a server without keys may bind)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- command line


def add_flags(p: argparse.ArgumentParser) -> None:
    """The ``boxlite serve`` flags (docs/serve.md)."""
    d = ServeConfig()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    # The global --home works too; SUPPRESS keeps it when this one is not given.
    p.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS, help="runtime home ($BOXLITE_HOME)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accept this bearer key (repeatable)")
    p.add_argument("--api-keys-file", metavar="FILE", help="accept the keys in FILE (one per line, name:key or key)")
    p.add_argument(
        "--allow-host-paths", action="store_true", help="allow rootfs_path and volumes (server paths) in box options"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N", help="413 beyond (default 256 MiB)"
    )
    p.add_argument(
        "--max-boxes-per-key", type=int, default=d.max_boxes_per_key, metavar="N", help="429 beyond (default 32)"
    )
    p.add_argument(
        "--max-concurrent-execs",
        type=int,
        default=d.max_concurrent_execs,
        metavar="N",
        help="commands running at once on the server; 429 beyond (default 64)",
    )
    p.add_argument(
        "--orphan-timeout",
        type=float,
        default=d.orphan_timeout,
        metavar="SECS",
        help="kill a running command nobody is attached to after this long (default 60)",
    )
    p.add_argument(
        "--exec-retention",
        type=float,
        default=d.exec_retention,
        metavar="SECS",
        help="forget a finished command this long after it ended (default 60)",
    )
    p.add_argument(
        "--exec-backlog-bytes",
        type=int,
        default=d.exec_backlog_bytes,
        metavar="N",
        help="output kept for a command before its first attach (default 1 MiB; more is dropped and counted)",
    )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    keys = [ApiKey.from_secret(k) for k in args.api_key]
    if args.api_keys_file:
        keys += parse_keys_file(args.api_keys_file)
    return ServeConfig(
        keys=tuple(keys),
        allow_host_paths=args.allow_host_paths,
        max_body_bytes=args.max_body_bytes,
        max_boxes_per_key=args.max_boxes_per_key,
        max_concurrent_execs=args.max_concurrent_execs,
        orphan_timeout=args.orphan_timeout,
        exec_retention=args.exec_retention,
        exec_backlog_bytes=args.exec_backlog_bytes,
    )
