"""Where a remote runtime is and how to authenticate to it (``boxlite.Boxlite.rest``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ConfigError

#: Where ``BoxliteRestOptions()`` points without a ``url``: ``boxlite serve`` on this machine.
DEFAULT_URL = "http://localhost:8100"


@dataclass(frozen=True)
class ApiKeyCredential:
    """An API key, sent as ``Authorization: Bearer <key>`` on every request."""

    key: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key or any(c in self.key for c in "\r\n\0"):
            raise ConfigError("ApiKeyCredential needs a non-empty key without line breaks or NUL bytes")

    def __repr__(self) -> str:
        return "ApiKeyCredential(key=***)"


@dataclass(frozen=True)
class BoxliteRestOptions:
    """A ``boxlite serve`` server (or anything speaking its API; docs/rest-client.md).

    ``url`` is the server's root (``http://host:8100``, or ``https://host/some/path`` behind a
    proxy). ``credential`` is the API key (``None`` for a server without keys, which listens on
    loopback only). ``path_prefix`` is the route namespace (``/v1/<path_prefix>/boxes``; ``None``
    means ``default``, the one ``boxlite serve`` has). ``timeout`` bounds connecting and each
    quick request, in seconds; creating, starting and stopping boxes and file transfers wait
    as long as the server takes (it bounds them by its own boot and stop timeouts)."""

    url: str = DEFAULT_URL
    credential: ApiKeyCredential | None = None
    path_prefix: str | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"BoxliteRestOptions.url must start with http:// or https://, not {self.url!r}")
        if self.credential is not None and not isinstance(self.credential, ApiKeyCredential):
            raise ConfigError("BoxliteRestOptions.credential must be an ApiKeyCredential (or None)")
        prefix = self.path_prefix
        if prefix is not None and (not prefix or not all(c.isalnum() or c in "-_." for c in prefix)):
            raise ConfigError(
                f"BoxliteRestOptions.path_prefix must be one path segment of letters, digits, '-', '_' "
                f"or '.', not {prefix!r}"
            )
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"BoxliteRestOptions.timeout must be a positive number of seconds, not {self.timeout!r}")

    @classmethod
    def from_env(cls) -> BoxliteRestOptions:
        """Options from ``BOXLITE_REST_URL`` (default ``http://localhost:8100``) and
        ``BOXLITE_API_KEY`` (optional)."""
        key = os.environ.get("BOXLITE_API_KEY")
        return cls(
            url=os.environ.get("BOXLITE_REST_URL") or DEFAULT_URL,
            credential=ApiKeyCredential(key) if key else None,
        )


__all__ = ["DEFAULT_URL", "ApiKeyCredential", "BoxliteRestOptions"]
