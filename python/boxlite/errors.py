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


__all__ = [
    "AlreadyExistsError",
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
