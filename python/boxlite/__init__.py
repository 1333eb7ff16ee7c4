"""boxlite: run untrusted code in boxes, each an OCI image in its own lightweight VM.

>>> import boxlite
>>> async def main() -> None:
...     async with boxlite.Boxlite(boxlite.Options(home_dir="/tmp/bl")) as rt:
...         box = await rt.create(boxlite.BoxOptions(rootfs_path="/path/to/oci-layout"))
...         result = await (await box.exec("echo", ["hi"])).wait()
...         print(result.stdout)
"""

from __future__ import annotations

from . import _native
from ._native import BoxMetrics, RuntimeMetrics
from ._runtime import Box, BoxInfo, Boxlite, BoxOptions, BoxState, ExecResult, ExecStdin, Execution, Options
from .errors import (
    BootTimeoutError,
    BoxliteError,
    BoxliteIOError,
    BoxNotFoundError,
    DatabaseError,
    EngineUnavailableError,
    ExecError,
    ExecStartError,
    ExecTimeoutError,
    GuestProtocolError,
    ImageNotFoundError,
    ImagePullError,
    InternalError,
    InvalidArgumentError,
    InvalidStateError,
    NotSupportedError,
    RegistryUnauthorizedError,
    StorageError,
)
from .images import GcReport, ImageInfo, ImageRegistry, Images, PullProgress
from .simplebox import CodeBox, SimpleBox
from .sync import SyncBox, SyncBoxlite, SyncCodeBox, SyncExecution, SyncSimpleBox

__version__: str = _native.__version__


def accelerator() -> tuple[str, str]:
    """``(name, reason)``: the accelerator boxes run on here (``kvm``, ``hvf`` or ``tcg``)."""
    return _native.accelerator()


__all__ = [
    "__version__",
    "accelerator",
    "Boxlite",
    "Options",
    "ImageRegistry",
    "Images",
    "ImageInfo",
    "PullProgress",
    "GcReport",
    "BoxOptions",
    "Box",
    "BoxInfo",
    "BoxState",
    "Execution",
    "SimpleBox",
    "CodeBox",
    "SyncBoxlite",
    "SyncBox",
    "SyncExecution",
    "SyncSimpleBox",
    "SyncCodeBox",
    "ExecStdin",
    "ExecResult",
    "RuntimeMetrics",
    "BoxMetrics",
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
