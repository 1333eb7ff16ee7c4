"""The exceptions boxlite raises: one class per failure you can act on.

Every error from the native core arrives as an instance of one of these classes (the one
mapping is in ``rust/boxlite-py/src/errors.rs``); its message says what happened and what to
do. The published ``boxlite`` package's names exist too (``NotFoundError``,
``AlreadyExistsError``, ``UnsupportedError``, ``EngineError``, ...): each of our classes
derives from the published one it refines, so code that catches those catches ours. As in the
published package, every error raised by the core is also a ``RuntimeError``.
"""

from __future__ import annotations

import builtins


class BoxliteError(Exception):
    """Base class of every boxlite error."""

    #: A stable snake_case name of the failure (``"image_not_found"``, ...).
    kind: str = "internal"
    #: The published package's error code.
    code: str = "internal"


class _NativeError(BoxliteError, RuntimeError):
    """A failure reported by the core."""


class InvalidArgumentError(_NativeError, ValueError):
    """An argument was rejected before anything was done; the message names the field."""

    code = "invalid_argument"


class NotFoundError(_NativeError, LookupError):
    """What was named does not exist."""

    code = "not_found"


class BoxNotFoundError(NotFoundError):
    """No box has this id or name."""


class ImageNotFoundError(NotFoundError):
    """The image reference names nothing the registry or layout has."""


class AlreadyExistsError(_NativeError):
    """The name is taken (a box, a file with ``overwrite=False``, ...)."""

    code = "already_exists"


class InvalidStateError(_NativeError):
    """The box is in a state that does not allow the operation."""

    code = "invalid_state"


class StoppedError(InvalidStateError):
    """The published package's error for a handle used after ``stop()``; boxlite handles stay
    usable (``exec`` starts the box again), so it is never raised here."""

    code = "stopped"


class UnsupportedError(_NativeError, NotImplementedError):
    """The option or feature is not available in this version."""

    code = "unsupported"


#: The name this package used before matching the published one.
NotSupportedError = UnsupportedError


class ImageError(_NativeError):
    """An image could not be fetched or read."""

    code = "image_pull_failed"


class ImagePullError(ImageError):
    """The image could not be fetched or read (network, corrupt content, bad layout)."""


class RegistryUnauthorizedError(ImageError, PermissionError):
    """The registry refused the configured credentials."""


class EngineError(_NativeError):
    """The VM engine failed."""

    code = "engine_unavailable"


class EngineUnavailableError(EngineError):
    """The VM engine cannot run: no QEMU, no guest bundle, or no usable accelerator."""


class TimeoutError(BoxliteError):
    """The published package's timeout class (it shadows the builtin name, as there).
    boxlite's timeouts derive from it and from the builtin ``TimeoutError``."""


class BootTimeoutError(EngineError, TimeoutError, builtins.TimeoutError):
    """The guest did not become ready in time; the message ends with its console output."""


class ExecutionError(_NativeError):
    """A command in a box could not run to its end."""

    code = "execution_failed"


class ExecStartError(ExecutionError):
    """The command could not be started in the box (not found, bad user, missing cwd)."""


class ExecTimeoutError(ExecutionError, TimeoutError, builtins.TimeoutError):
    """The command ran past its timeout and was killed."""


class GuestProtocolError(_NativeError):
    """The guest agent misbehaved or the connection to it was lost (e.g. the VM died)."""

    code = "guest_protocol"


class NetworkError(_NativeError):
    """A box's network could not be set up or used."""

    code = "network_unavailable"


class PortInUseError(NetworkError):
    """A published port's host address is taken; nothing was started."""


class StorageError(_NativeError):
    """A disk image, the image cache or a box directory could not be prepared."""

    code = "storage_error"


class DatabaseError(_NativeError):
    """The state database failed."""

    code = "database_error"


class MetadataError(_NativeError):
    """Stored metadata could not be read."""

    code = "metadata_error"


class ConfigError(_NativeError):
    """The configuration is wrong (for remote runtimes: also refused credentials)."""

    code = "config_error"


class ResourceExhaustedError(_NativeError):
    """A limit was reached."""

    code = "resource_exhausted"


class SessionReapedError(_NativeError):
    """An execution's session is gone."""

    code = "session_reaped"


class UpstreamUnavailableError(_NativeError):
    """A service boxlite depends on is unavailable."""

    code = "upstream_unavailable"


class AuthenticationError(ConfigError, PermissionError):
    """A remote runtime refused the credential (missing, wrong or revoked API key)."""

    code = "unauthenticated"


class BoxLostError(UpstreamUnavailableError):
    """The machine or runtime that held the box is gone (a dead node, a stopped server); the
    box cannot be reached any more. Create a new one."""

    code = "box_lost"


class BoxliteIOError(_NativeError, OSError):
    """An operating-system I/O error, with what boxlite was doing."""

    code = "io"


class InternalError(_NativeError):
    """A bug in boxlite; please report it with the message."""


class ParseError(BoxliteError):
    """Text could not be parsed."""


class ExecError(BoxliteError):
    """A command in a box exited non-zero; carries its result. ``ExecError(command,
    exit_code, stderr)`` as in the published package."""

    def __init__(self, command: str, exit_code: int = 1, stderr: str = "", *, stdout: str = "") -> None:
        super().__init__(f"Command '{command}' failed with exit code {exit_code}: {stderr}")
        self.command = command
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


#: The HTTP status of each failure on the wire, most specific class first (``boxlite serve``).
_HTTP_STATUS: tuple[tuple[type[BoxliteError], int], ...] = (
    (AuthenticationError, 401),
    (InvalidArgumentError, 400),
    (ParseError, 400),
    (NotFoundError, 404),
    (AlreadyExistsError, 409),
    (InvalidStateError, 409),
    (ResourceExhaustedError, 429),
    (UnsupportedError, 501),
    (ExecTimeoutError, 504),
    (ExecStartError, 400),
    (BootTimeoutError, 504),
    (BoxLostError, 503),
    (UpstreamUnavailableError, 502),
    (EngineError, 503),
)


def http_status(error: BoxliteError) -> int:
    """The HTTP status ``boxlite serve`` answers ``error`` with (500 for anything unlisted)."""
    for cls, status in _HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_to_wire(error: BoxliteError) -> dict[str, str]:
    """The inner object of an error body: ``{"message", "type", "code"}``; ``type`` is the
    class name, which ``error_from_wire`` turns back into the same class."""
    return {"message": str(error), "type": type(error).__name__, "code": error.code}


def _class_for_code(code: str) -> type[BoxliteError] | None:
    for value in globals().values():
        if isinstance(value, type) and issubclass(value, BoxliteError) and value.__dict__.get("code") == code:
            return value
    return None


def error_from_wire(body: object, status: int) -> BoxliteError:
    """The exception an error response stands for. ``body`` is the parsed JSON (``{"error":
    {...}}`` or its inner object); a body that is not one still gives a typed error by HTTP
    status. The server's text is never evaluated, only looked up among these classes."""
    detail = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {}
    message = detail.get("message")
    message = message if isinstance(message, str) and message else f"the server answered HTTP {status}"
    name = detail.get("type")
    cls = globals().get(name) if isinstance(name, str) and not name.startswith("_") else None
    if not (isinstance(cls, type) and issubclass(cls, BoxliteError) and cls is not ExecError):
        code = detail.get("code")
        cls = _class_for_code(code) if isinstance(code, str) else None
    if cls is None:
        cls = next((c for c, s in _HTTP_STATUS if s == status), InternalError)
    return cls(message)


__all__ = [
    "AlreadyExistsError",
    "AuthenticationError",
    "BoxLostError",
    "BootTimeoutError",
    "BoxNotFoundError",
    "BoxliteError",
    "BoxliteIOError",
    "ConfigError",
    "DatabaseError",
    "EngineError",
    "EngineUnavailableError",
    "ExecError",
    "ExecStartError",
    "ExecTimeoutError",
    "ExecutionError",
    "GuestProtocolError",
    "ImageError",
    "ImageNotFoundError",
    "ImagePullError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidStateError",
    "MetadataError",
    "NetworkError",
    "NotFoundError",
    "NotSupportedError",
    "ParseError",
    "PortInUseError",
    "RegistryUnauthorizedError",
    "ResourceExhaustedError",
    "SessionReapedError",
    "StoppedError",
    "StorageError",
    "TimeoutError",
    "UnsupportedError",
    "UpstreamUnavailableError",
]
