"""Convenience boxes: ``SimpleBox`` runs commands and returns results; ``CodeBox`` runs Python."""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ._native import BoxInfo, BoxMetrics, BoxOptions, CopyOptions, ExecResult
from ._runtime import Box, Boxlite, PathLike
from .errors import ExecError, ExecTimeoutError, InvalidStateError
from .interpreter import (
    CodeContext,
    CodeError,
    CodeExecution,
    CodeResult,
    CodeStream,
    Interpreter,
    run_with_callbacks,
)

_S = TypeVar("_S", bound="SimpleBox")

#: The image `CodeBox` uses unless told otherwise.
CODEBOX_IMAGE = "python:slim"


class SimpleBox:
    """A box for running commands: ``async with SimpleBox(image=...) as box: await box.exec(...)``.

    The box is created (or, with ``reuse_existing=True``, found by ``name``) on entry and
    stopped on exit; with ``auto_remove=True`` (the default) stopping also deletes it. Other
    keyword arguments are ``BoxOptions`` fields. ``runtime`` defaults to
    ``Boxlite.default()``.
    """

    def __init__(
        self,
        image: str | None = None,
        rootfs_path: PathLike | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        runtime: Boxlite | None = None,
        name: str | None = None,
        auto_remove: bool = True,
        reuse_existing: bool = False,
        **box_options: Any,
    ) -> None:
        self._options = BoxOptions(
            image=image,
            rootfs_path=rootfs_path,
            memory_mib=memory_mib,
            cpus=cpus,
            name=name,
            auto_remove=auto_remove,
            **box_options,
        )
        self._runtime = runtime
        self._reuse_existing = reuse_existing
        self._box: Box | None = None
        self._created: bool | None = None

    @property
    def box(self) -> Box:
        """The underlying ``Box`` (for streaming execs, stdin, tty...)."""
        if self._box is None:
            raise InvalidStateError("the box is not started: use `async with` or `await start()`")
        return self._box

    @property
    def id(self) -> str:
        return self.box.id

    @property
    def name(self) -> str | None:
        return self._options.name

    @property
    def created(self) -> bool | None:
        """True if entering made a new box, False if it reused one, None before."""
        return self._created

    async def start(self: _S) -> _S:
        """Creates (or reuses) and boots the box; does nothing if it is already up."""
        if self._box is None:
            if self._runtime is None:
                self._runtime = Boxlite.default()
            if self._reuse_existing:
                self._box, self._created = await self._runtime.get_or_create(self._options)
            else:
                self._box = await self._runtime.create(self._options)
                self._created = True
        return self

    async def info(self) -> BoxInfo:
        return self.box.info()

    async def metrics(self) -> BoxMetrics:
        return await self.box.metrics()

    async def copy_in(self, host_path: PathLike, box_path: str, copy_options: CopyOptions | None = None) -> None:
        await self.box.copy_in(host_path, box_path, copy_options)

    async def copy_out(self, box_path: str, host_path: PathLike, copy_options: CopyOptions | None = None) -> None:
        await self.box.copy_out(box_path, host_path, copy_options)

    async def read_file(self, path: str) -> bytes:
        return await self.box.read_file(path)

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self.box.write_file(path, data, mode)

    async def list_dir(self, path: str) -> list[str]:
        return await self.box.list_dir(path)

    async def exec(
        self,
        cmd: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Runs ``cmd args...`` to completion and returns its result (a non-zero exit is a
        result, not an error). ``timeout`` seconds kills it and raises ``ExecTimeoutError``;
        ``env`` adds variables, ``cwd`` and ``user`` override the box's."""
        execution = await self.box.exec(cmd, list(args), env=env, cwd=cwd, user=user, timeout_secs=timeout)
        return await execution.wait()

    async def stop(self) -> None:
        """Stops the box (deleting it if ``auto_remove``); a later ``start()`` makes or finds
        one again."""
        if self._box is not None:
            box, self._box = self._box, None
            try:
                await box.stop()
            except InvalidStateError:
                pass  # already stopped (or removed) by someone else

    async def shutdown(self) -> None:
        """Same as ``stop()``."""
        await self.stop()

    async def __aenter__(self: _S) -> _S:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()


class CodeBox(SimpleBox):
    """A box for running Python code (default image ``python:slim``); ``run(code)`` returns
    its stdout."""

    def __init__(
        self,
        image: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        runtime: Boxlite | None = None,
        **kwargs: Any,
    ) -> None:
        if image is None and kwargs.get("rootfs_path") is None:
            image = CODEBOX_IMAGE
        super().__init__(image, memory_mib=memory_mib, cpus=cpus, runtime=runtime, **kwargs)
        self._interpreter = Interpreter(lambda: self.box)

    async def run(self, code: str, timeout: float | None = None, *, context: CodeContext | str | None = None) -> str:
        """Runs ``code`` in the box's default Python context, or in ``context`` (state is kept
        between runs), and returns its stdout. Raises ``ExecError`` (exit code, stdout, and stderr with the
        traceback) if it raises, and ``ExecTimeoutError`` if it runs past ``timeout`` seconds
        (it is interrupted). ``run_code`` is the rich form."""
        execution = await self.run_code(code, timeout=timeout, context=context)
        if execution.timed_out:
            raise ExecTimeoutError(f"the code ran past its timeout of {timeout:g} s and was interrupted")
        error = execution.error
        if error is not None:
            stderr = execution.stderr + error.traceback
            if not error.traceback and error.name != "SystemExit":
                stderr += f"{error.name}: {error.value}\n"
            raise ExecError("python3", execution.exit_code or 1, stderr, stdout=execution.stdout)
        return execution.stdout

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        context: CodeContext | str | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[CodeResult], Any] | None = None,
        on_error: Callable[[CodeError], Any] | None = None,
    ) -> CodeExecution:
        """Runs ``code`` in a context (the language's default one unless ``context`` is given)
        and returns its ``CodeExecution``: output, rich results, the value of the last
        expression, and the error it raised (returned, not raised). ``language`` is
        ``"python"`` (default), ``"bash"``, ``"sh"`` or ``"node"``. Callbacks (plain or async
        functions) get output chunks, results and the error as they arrive. Past ``timeout``
        seconds the run is interrupted (and its interpreter restarted if that fails)."""
        await self.start()
        stream = self.stream_code(code, language=language, context=context, timeout=timeout)
        return await run_with_callbacks(stream, on_stdout, on_stderr, on_result, on_error)

    def stream_code(
        self,
        code: str,
        language: str | None = None,
        context: CodeContext | str | None = None,
        timeout: float | None = None,
    ) -> CodeStream:
        """Like ``run_code``, as an async iterator of ``CodeOutput`` and ``CodeResult`` items;
        ``stream.execution`` is the ``CodeExecution`` once it is exhausted."""
        return self._interpreter.stream(code, language=language, context=context, timeout=timeout)

    async def create_context(
        self, language: str = "python", cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> CodeContext:
        """Starts a new context: its own interpreter process, with its own state."""
        await self.start()
        return await self._interpreter.create_context(language, cwd=cwd, env=env)

    async def list_contexts(self) -> list[CodeContext]:
        return self._interpreter.list_contexts()

    async def restart_context(self, context: CodeContext | str) -> None:
        """Starts the context's interpreter afresh (its state is lost)."""
        await self._interpreter.restart_context(context)

    async def remove_context(self, context: CodeContext | str) -> None:
        await self._interpreter.remove_context(context)

    async def interrupt(self, context: CodeContext | str | None = None) -> None:
        """Interrupts the run in progress in ``context`` (all contexts if None), as a
        timeout would."""
        await self._interpreter.interrupt(context)

    async def stop(self) -> None:
        await self._interpreter.close()
        await super().stop()

    async def run_script(self, script_path: PathLike, timeout: float | None = None) -> str:
        """Runs the Python file ``script_path`` (on the host) in the box, like ``run``."""
        code = await asyncio.to_thread(Path(script_path).read_text)
        return await self.run(code, timeout=timeout)

    async def install_package(self, name: str, timeout: float | None = None) -> str:
        """``pip install name`` in the box; returns pip's output, raises ``ExecError`` if it
        fails."""
        return await self.install_packages(name, timeout=timeout)

    async def install_packages(self, *names: str | Iterable[str], timeout: float | None = None) -> str:
        """``pip install`` of several packages: ``install_packages("a", "b")`` or
        ``install_packages(["a", "b"])``."""
        flat: list[str] = []
        for item in names:
            flat.extend([item] if isinstance(item, str) else list(item))
        result = await self.exec("python3", "-m", "pip", "install", *flat, timeout=timeout)
        if result.exit_code != 0:
            raise ExecError(f"pip install {shlex.join(flat)}", result.exit_code, result.stderr, stdout=result.stdout)
        return result.stdout + result.stderr
