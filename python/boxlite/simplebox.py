"""Convenience boxes: ``SimpleBox`` runs commands and returns results; ``CodeBox`` runs Python."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ._runtime import Box, Boxlite, BoxOptions, ExecResult, PathLike
from .errors import ExecError, InvalidStateError

#: The image `CodeBox` uses unless told otherwise.
CODEBOX_IMAGE = "python:slim"


class SimpleBox:
    """A box for running commands: ``async with SimpleBox(image=...) as box: await box.exec(...)``.

    The box is created on entry and stopped (and removed, once removal exists) on exit.
    """

    def __init__(
        self,
        image: str | None = None,
        *,
        rootfs_path: PathLike | None = None,
        runtime: Boxlite | None = None,
        **box_options: Any,
    ) -> None:
        self._options = BoxOptions(image=image, rootfs_path=rootfs_path, **box_options)
        self._runtime = runtime
        self._box: Box | None = None

    @property
    def box(self) -> Box:
        if self._box is None:
            raise InvalidStateError("the box is not started: use `async with` or `await start()`")
        return self._box

    @property
    def id(self) -> str:
        return self.box.id

    async def start(self) -> SimpleBox:
        if self._box is None:
            if self._runtime is None:
                self._runtime = Boxlite.default()
            self._box = await self._runtime.create(self._options)
        return self

    async def exec(
        self,
        cmd: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Runs ``cmd args...`` to completion and returns its result."""
        execution = await self.box.exec(cmd, list(args), env=env, cwd=cwd, user=user, timeout_secs=timeout)
        return await execution.wait()

    async def shutdown(self) -> None:
        if self._box is not None:
            await self._box.stop()
            self._box = None

    async def __aenter__(self) -> SimpleBox:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()


class CodeBox(SimpleBox):
    """A box for running Python code; ``run(code)`` returns its stdout."""

    def __init__(self, image: str | None = None, *, rootfs_path: PathLike | None = None, **kwargs: Any) -> None:
        if image is None and rootfs_path is None:
            image = CODEBOX_IMAGE
        super().__init__(image, rootfs_path=rootfs_path, **kwargs)

    async def run(self, code: str, timeout: float | None = None) -> str:
        """Runs ``code`` with ``python3 -c``; returns stdout, raises ``ExecError`` on failure."""
        result = await self.exec("python3", "-c", code, timeout=timeout)
        if result.exit_code != 0:
            raise ExecError(
                f"code exited with {result.exit_code}: {result.stderr.strip()}",
                exit_code=result.exit_code,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result.stdout

    async def install_package(self, name: str, timeout: float | None = None) -> str:
        return await self.install_packages([name], timeout=timeout)

    async def install_packages(self, names: list[str], timeout: float | None = None) -> str:
        result = await self.exec("python3", "-m", "pip", "install", "--quiet", *names, timeout=timeout)
        if result.exit_code != 0:
            raise ExecError(
                f"pip install {shlex.join(names)} failed: {result.stderr.strip()}",
                exit_code=result.exit_code,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result.stdout
