"""The exceptions boxlite raises: one class per failure you can act on.

Every error from the native core arrives as an instance of one of these classes (the mapping is
in ``rust/boxlite-py/src/errors.rs``); its message says what happened and what to do.
"""

from __future__ import annotations


class BoxliteError(Exception):
    """Base class of every boxlite error."""

    #: A stable snake_case name of the failure (``"image_not_found"``, ...).
    kind: str = "internal"


class InvalidArgumentError(BoxliteError, ValueError):
    """An argument was rejected before anything was done; the message names the field."""


class ImageNotFoundError(BoxliteError):
    """The image reference names nothing the registry or layout has."""


class ImagePullError(BoxliteError):
    """The image could not be fetched or read (network, corrupt content, bad layout)."""


class RegistryUnauthorizedError(BoxliteError, PermissionError):
    """The registry refused the configured credentials."""


class BoxNotFoundError(BoxliteError, LookupError):
    """No box has this id or name."""


class InvalidStateError(BoxliteError):
    """The box is in a state that does not allow the operation (e.g. exec in a stopped box)."""


class EngineUnavailableError(BoxliteError):
    """The VM engine cannot run: no QEMU, no guest bundle, or no usable accelerator."""


class BootTimeoutError(BoxliteError, TimeoutError):
    """The guest did not become ready in time; the message ends with its console output."""


class GuestProtocolError(BoxliteError):
    """The guest agent misbehaved or the connection to it was lost (e.g. the VM died)."""


class ExecStartError(BoxliteError):
    """The command could not be started in the box (not found, bad user, missing cwd)."""


class ExecTimeoutError(BoxliteError, TimeoutError):
    """The command ran past its timeout and was killed."""


class StorageError(BoxliteError):
    """A disk image, the image cache or a box directory could not be prepared."""


class DatabaseError(BoxliteError):
    """The state database failed."""


class BoxliteIOError(BoxliteError, OSError):
    """An operating-system I/O error, with what boxlite was doing."""


class NotSupportedError(BoxliteError, NotImplementedError):
    """The option or feature is not available in this version."""


class InternalError(BoxliteError):
    """A bug in boxlite; please report it with the message."""


class ExecError(BoxliteError):
    """A command in a box exited non-zero (raised by ``CodeBox.run``); carries its result."""

    def __init__(self, message: str, exit_code: int = 1, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


__all__ = [
    "BoxliteError",
    "InvalidArgumentError",
    "ImageNotFoundError",
    "ImagePullError",
    "RegistryUnauthorizedError",
    "BoxNotFoundError",
    "InvalidStateError",
    "EngineUnavailableError",
    "BootTimeoutError",
    "GuestProtocolError",
    "ExecStartError",
    "ExecTimeoutError",
    "StorageError",
    "DatabaseError",
    "BoxliteIOError",
    "NotSupportedError",
    "InternalError",
    "ExecError",
]
