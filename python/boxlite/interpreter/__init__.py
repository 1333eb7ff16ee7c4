"""Stateful code contexts in a box: the engine behind ``CodeBox.run_code``.

Each context is a long-lived interpreter process in the box (``session.Kernel``); Python and
Node run a small kernel that speaks frames (docs/interpreter.md), shells are driven by the host.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .._runtime import Box
from ..errors import InvalidArgumentError, InvalidStateError, NotFoundError
from .languages import language as find_language
from .results import CodeContext, CodeError, CodeExecution, CodeLogs, CodeOutput, CodeResult
from .session import Emit, Kernel, on_loop

__all__ = [
    "CodeContext",
    "CodeError",
    "CodeExecution",
    "CodeLogs",
    "CodeOutput",
    "CodeResult",
    "CodeStream",
    "Interpreter",
]

ContextLike = CodeContext | str | None
Callback = Callable[[Any], Any] | None


class Interpreter:
    """The contexts of one box, by id; each language has a default one, made on first use."""

    def __init__(self, box: Callable[[], Box]) -> None:
        self._box = box
        self._kernels: dict[str, Kernel] = {}
        self._defaults: dict[str, str] = {}

    async def create_context(
        self, language: str | None = None, cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> CodeContext:
        lang = find_language(language)
        box = self._box()

        async def create() -> CodeContext:
            kernel = Kernel(box, lang, cwd, dict(env) if env else None)
            await kernel.start()
            self._kernels[kernel.context.id] = kernel
            return kernel.context

        return await on_loop(create())

    def list_contexts(self) -> list[CodeContext]:
        return [kernel.context for kernel in self._kernels.values()]

    async def restart_context(self, context: CodeContext | str) -> None:
        kernel = self._find(context)
        await on_loop(kernel.restart())

    async def remove_context(self, context: CodeContext | str) -> None:
        kernel = self._find(context)
        del self._kernels[kernel.context.id]
        self._defaults = {k: v for k, v in self._defaults.items() if v != kernel.context.id}
        await on_loop(kernel.stop())

    async def interrupt(self, context: ContextLike = None) -> None:
        kernels = [self._find(context)] if context is not None else list(self._kernels.values())
        for kernel in kernels:
            await on_loop(kernel.interrupt())

    async def close(self) -> None:
        """Ends every context (when the box stops)."""
        kernels, self._kernels, self._defaults = list(self._kernels.values()), {}, {}
        for kernel in kernels:
            await on_loop(kernel.stop())

    def stream(
        self, code: str, language: str | None = None, context: ContextLike = None, timeout: float | None = None
    ) -> CodeStream:
        if not isinstance(code, str):
            raise InvalidArgumentError(f"code must be a str, not {type(code).__name__}")
        if timeout is not None and timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, not {timeout}")
        return CodeStream(self, code, language, context, timeout)

    async def _run(
        self, code: str, language: str | None, context: ContextLike, timeout: float | None, emit: Emit
    ) -> CodeExecution:
        if context is not None:
            kernel = self._find(context)
            if language is not None and find_language(language).name != kernel.language.name:
                raise InvalidArgumentError(
                    f"context {kernel.context.id} runs {kernel.language.name}, not {language}: "
                    "leave `language` out or pass a context of that language"
                )
        else:
            kernel = await self._default(find_language(language).name)
        return await kernel.run(code, timeout, emit)

    async def _default(self, language: str) -> Kernel:
        context_id = self._defaults.get(language)
        if context_id is None or context_id not in self._kernels:
            context = await self.create_context(language)
            self._defaults[language] = context.id
            context_id = context.id
        return self._kernels[context_id]

    def _find(self, context: CodeContext | str | None) -> Kernel:
        context_id = context.id if isinstance(context, CodeContext) else context
        kernel = self._kernels.get(str(context_id))
        if kernel is None:
            raise NotFoundError(f"no code context {context_id!r} in this box: create one with create_context()")
        return kernel


_END = object()


class CodeStream:
    """A run's output as it arrives: ``async for item in stream`` yields ``CodeOutput`` chunks
    and ``CodeResult`` objects; afterwards ``stream.execution`` is the whole ``CodeExecution``."""

    def __init__(
        self, interpreter: Interpreter, code: str, language: str | None, context: ContextLike, timeout: float | None
    ) -> None:
        self._args = (code, language, context, timeout)
        self._interpreter = interpreter
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Future[CodeExecution] | None = None
        self._execution: CodeExecution | None = None

    @property
    def execution(self) -> CodeExecution:
        if self._execution is None:
            raise InvalidStateError("the run has not finished: iterate the stream (or await wait()) first")
        return self._execution

    def _start(self) -> asyncio.Queue[Any]:
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: CodeOutput | CodeResult) -> None:
            try:
                caller.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                pass  # the caller's loop is closed: nobody is left to read the run

        code, language, context, timeout = self._args
        self._task = asyncio.ensure_future(on_loop(self._interpreter._run(code, language, context, timeout, emit)))
        self._task.add_done_callback(lambda _: queue.put_nowait(_END))
        self._queue = queue
        return queue

    def __aiter__(self) -> CodeStream:
        return self

    async def __anext__(self) -> CodeOutput | CodeResult:
        queue = self._queue or self._start()
        item = await queue.get()
        if item is _END:
            assert self._task is not None
            self._execution = self._task.result()
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def wait(self) -> CodeExecution:
        """Reads the rest of the run and returns its ``CodeExecution``."""
        async for _ in self:
            pass
        return self.execution


async def call_back(callback: Callback, value: Any) -> None:
    """Calls a user callback, sync or async."""
    if callback is None:
        return
    outcome = callback(value)
    if inspect.isawaitable(outcome):
        await outcome


async def run_with_callbacks(
    stream: CodeStream,
    on_stdout: Callback = None,
    on_stderr: Callback = None,
    on_result: Callback = None,
    on_error: Callback = None,
) -> CodeExecution:
    async for item in stream:
        if isinstance(item, CodeOutput):
            await call_back(on_stdout if item.stream == "stdout" else on_stderr, item.text)
        else:
            await call_back(on_result, item)
    execution = stream.execution
    if execution.error is not None:
        await call_back(on_error, execution.error)
    return execution
