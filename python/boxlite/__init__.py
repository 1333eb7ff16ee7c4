"""boxlite: run untrusted code in boxes, each an OCI image in its own lightweight VM.

>>> import boxlite
>>> async def main() -> None:
...     async with boxlite.Boxlite(boxlite.Options(home_dir="/tmp/bl")) as rt:
...         box = await rt.create(boxlite.BoxOptions(rootfs_path="/path/to/oci-layout"))
...         result = await (await box.exec("echo", ["hi"])).wait()
...         print(result.stdout)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _native
from ._native import (
    AdvancedBoxOptions,
    BoxInfo,
    BoxMetrics,
    BoxOptions,
    BoxState,
    CloneOptions,
    ContainerCapabilities,
    CopyOptions,
    ExecResult,
    ExportOptions,
    GcReport,
    HealthCheckOptions,
    ImageInfo,
    ImageRegistry,
    InboundNetworkSpec,
    NetworkInfo,
    NetworkSpec,
    Options,
    OutboundNetworkSpec,
    PublishedPort,
    PullProgress,
    RuntimeMetrics,
    SecurityOptions,
    SnapshotHandle,
    SnapshotInfo,
    SnapshotOptions,
)
from ._runtime import Box, Boxlite, ExecStdin, Execution
from .errors import (
    AlreadyExistsError,
    AuthenticationError,
    BootTimeoutError,
    BoxliteError,
    BoxliteIOError,
    BoxLostError,
    BoxNotFoundError,
    ConfigError,
    DatabaseError,
    EngineError,
    EngineUnavailableError,
    ExecError,
    ExecStartError,
    ExecTimeoutError,
    ExecutionError,
    GuestProtocolError,
    ImageError,
    ImageNotFoundError,
    ImagePullError,
    InternalError,
    InvalidArgumentError,
    InvalidStateError,
    MetadataError,
    NetworkError,
    NotFoundError,
    NotSupportedError,
    ParseError,
    PortInUseError,
    RegistryUnauthorizedError,
    ResourceExhaustedError,
    SessionReapedError,
    StoppedError,
    StorageError,
    TimeoutError,
    UnsupportedError,
    UpstreamUnavailableError,
)
from .images import ImageHandle, Images
from .interpreter import CodeContext, CodeError, CodeExecution, CodeLogs, CodeOutput, CodeResult, CodeStream
from .simplebox import CodeBox, SimpleBox
from .sync import SyncBox, SyncBoxlite, SyncCodeBox, SyncExecution, SyncImageHandle, SyncSimpleBox

if TYPE_CHECKING:
    from .rest.options import ApiKeyCredential, BoxliteRestOptions

__version__: str = _native.__version__

#: Names imported on first use, so ``import boxlite`` loads no HTTP client.
_LAZY = {"ApiKeyCredential": "rest.options", "BoxliteRestOptions": "rest.options"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The published package's name for ``BoxState``.
BoxStateInfo = BoxState


def accelerator() -> tuple[str, str]:
    """``(name, reason)``: the accelerator boxes run on here (``kvm``, ``hvf`` or ``tcg``)."""
    return _native.accelerator()


__all__ = [
    "__version__",
    "accelerator",
    "Boxlite",
    "BoxliteRestOptions",
    "ApiKeyCredential",
    "Options",
    "ImageRegistry",
    "Images",
    "ImageHandle",
    "ImageInfo",
    "PullProgress",
    "GcReport",
    "BoxOptions",
    "CopyOptions",
    "SnapshotHandle",
    "SnapshotInfo",
    "SnapshotOptions",
    "CloneOptions",
    "ExportOptions",
    "NetworkSpec",
    "OutboundNetworkSpec",
    "InboundNetworkSpec",
    "AdvancedBoxOptions",
    "SecurityOptions",
    "ContainerCapabilities",
    "HealthCheckOptions",
    "NetworkInfo",
    "PublishedPort",
    "Box",
    "BoxInfo",
    "BoxState",
    "BoxStateInfo",
    "Execution",
    "SimpleBox",
    "CodeBox",
    "CodeContext",
    "CodeError",
    "CodeExecution",
    "CodeLogs",
    "CodeOutput",
    "CodeResult",
    "CodeStream",
    "SyncBoxlite",
    "SyncBox",
    "SyncExecution",
    "SyncSimpleBox",
    "SyncCodeBox",
    "SyncImageHandle",
    "ExecStdin",
    "ExecResult",
    "RuntimeMetrics",
    "BoxMetrics",
    "BoxliteError",
    "AlreadyExistsError",
    "AuthenticationError",
    "BootTimeoutError",
    "BoxLostError",
    "BoxNotFoundError",
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
