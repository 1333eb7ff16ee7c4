"""One context's interpreter process in the box, driven from the host.

A ``Kernel`` lives on the interpreter's own event loop (``loop()``), so a context keeps
working whichever loop its caller runs (pytest's per-test loops, ``asyncio.run`` twice, the
sync API's thread). It reads the kernel's output all the time, turns frames into events for
the run in progress, and enforces the run's timeout and output caps.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

from .._runtime import Box, ExecStdin, Execution
from ..errors import BoxliteError, ExecStartError, UnsupportedError
from .languages import Language
from .protocol import Dropped, Frame, FrameReader, Raw
from .results import CodeContext, CodeError, CodeExecution, CodeOutput, CodeResult

T = TypeVar("T")

#: Output kept per stream per run; the rest is counted and replaced by a marker.
OUTPUT_CAP = 1 << 20
#: Rich results kept per run (bytes of their data).
RESULTS_CAP = 64 << 20
#: How long an interpreter may take to start (a cold interpreter under TCG takes seconds).
START_TIMEOUT = 120.0
#: How long an interrupted run may take to stop before its interpreter is killed.
INTERRUPT_GRACE = 3.0

_LOST = "so earlier state is gone"
NOTE_STOPPED = f"the interpreter of this context had stopped; this run started a new one, {_LOST}"
NOTE_KILLED = f"the interpreter of this context was killed during the previous run; this run started a new one, {_LOST}"
NOTE_EXITED = f"the interpreter of this context exited after the previous run; this run started a new one, {_LOST}"
NOTE_DIED = f"the interpreter of this context died during the previous run; this run started a new one, {_LOST}"

Emit = Callable[[CodeOutput | CodeResult], None]


def loop() -> asyncio.AbstractEventLoop:
    """The interpreter's event loop, in a daemon thread of its own (shared with the sync API)."""
    from ..sync import _background_loop

    return _background_loop()


async def on_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Awaits `coro` on the interpreter's loop, from any loop."""
    target = loop()
    if asyncio.get_running_loop() is target:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, target))


class _Run:
    """What one run has gathered so far."""

    def __init__(self, run_id: str, emit: Emit) -> None:
        self.id = run_id
        self.emit = emit
        self.execution = CodeExecution()
        self.kept = {"stdout": 0, "stderr": 0}
        self.lost = {"stdout": 0, "stderr": 0}
        self.result_bytes = 0
        self.done = asyncio.Event()
        self.stderr_synced = False
        self.done_seen = False

    def output(self, stream: str, text: str) -> None:
        if not text:
            return
        room = OUTPUT_CAP - self.kept[stream]
        if len(text) > room:
            self.lost[stream] += len(text) - max(room, 0)
            text = text[: max(room, 0)]
        if not text:
            return
        self.kept[stream] += len(text)
        logs = self.execution.logs.stdout if stream == "stdout" else self.execution.logs.stderr
        logs.append(text)
        self.emit(CodeOutput(stream, text))  # type: ignore[arg-type]

    def result(self, data: dict[str, Any], main: bool) -> None:
        size = sum(len(str(value)) for value in data.values())
        if self.result_bytes + size > RESULTS_CAP:
            self.note(f"a rich result of {size} bytes was left out: the run passed {RESULTS_CAP >> 20} MiB of results")
            return
        self.result_bytes += size
        result = CodeResult(data=data, is_main_result=main)
        self.execution.results.append(result)
        self.emit(result)

    def note(self, text: str) -> None:
        if text not in self.execution.notes:
            self.execution.notes.append(text)

    def finish(self) -> CodeExecution:
        for stream, lost in self.lost.items():
            if lost:
                marker = f"\n[output truncated: {lost} more characters of {stream} not kept (cap {OUTPUT_CAP})]\n"
                logs = self.execution.logs.stdout if stream == "stdout" else self.execution.logs.stderr
                logs.append(marker)
                self.emit(CodeOutput(stream, marker))  # type: ignore[arg-type]
        return self.execution


class Kernel:
    """A context: one interpreter process in the box, and the runs sent to it."""

    def __init__(self, box: Box, lang: Language, cwd: str | None, env: dict[str, str] | None) -> None:
        self.box = box
        self.language = lang
        self.context = CodeContext(id=uuid.uuid4().hex[:12], language=lang.name, cwd=cwd)
        self.env = dict(env or {})
        self._execution: Execution | None = None
        self._stdin: ExecStdin | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[None]] = set()
        self._run: _Run | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._lock = asyncio.Lock()
        self._runs = 0
        self._restart_note: str | None = None
        self.alive = False

    # -------------------------------------------------------------------------------- lifetime

    async def start(self) -> None:
        argv = self.language.argv()
        try:
            execution = await self.box.exec(argv[0], list(argv[1:]), env=self.env or None, cwd=self.context.cwd)
        except ExecStartError as error:
            raise UnsupportedError(
                f"cannot start a {self.language.name} context: {error}. The image needs "
                f"`{self.language.program}` on its PATH: install it or use an image that has it"
            ) from error
        self._execution = execution
        self._stdin = execution.stdin()
        self._ready = asyncio.get_running_loop().create_future()
        self._pumps = [
            asyncio.ensure_future(self._pump(execution.stdout(binary=True), "stdout")),
            asyncio.ensure_future(self._pump(execution.stderr(binary=True), "stderr")),
        ]
        self.alive = True
        greeting = self.language.greeting()
        try:
            if greeting is not None:
                await self._write(greeting)
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except (asyncio.TimeoutError, BoxliteError, _Died) as error:
            await self.stop()
            status = await self._exit_status()
            raise UnsupportedError(
                f"the {self.language.name} interpreter did not start ({_describe(error, status)}). "
                f"The image needs `{self.language.program}` on its PATH: install it or use an image that has it"
            ) from None

    async def stop(self) -> None:
        """Kills the interpreter (its state is lost)."""
        self.alive = False
        if self._execution is not None:
            try:
                self._execution.kill(signal.SIGKILL)
            except BoxliteError:
                pass  # already gone
        for pump in self._pumps:
            pump.cancel()
        self._pumps = []
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(_Died("killed"))
            self._ready.exception()

    async def restart(self, note: str | None = None) -> None:
        await self.stop()
        await self.start()
        self._restart_note = note

    async def _exit_status(self) -> int | None:
        if self._execution is None:
            return None
        try:
            result = await asyncio.wait_for(self._execution.wait(), 5)
        except (asyncio.TimeoutError, BoxliteError):
            return None
        return result.exit_code

    # ------------------------------------------------------------------------------------ runs

    async def run(self, code: str, timeout: float | None, emit: Emit) -> CodeExecution:
        async with self._lock:
            return await self._run_locked(code, timeout, emit)

    async def _run_locked(self, code: str, timeout: float | None, emit: Emit) -> CodeExecution:
        run = _Run(uuid.uuid4().hex, emit)
        if not self.alive:
            await self.start()
            run.execution.context_restarted = True
            run.note(
                self._restart_note
                or "the interpreter of this context had stopped; this run started a new one, so earlier state is gone"
            )
        elif self._restart_note:
            run.execution.context_restarted = True
            run.note(self._restart_note)
        self._restart_note = None
        self._run = run
        try:
            cell_path = f"/tmp/.boxlite-cell-{run.id}"
            if self.language.shell:
                await self.box.write_file(cell_path, code)
            await self._write(self.language.request(run.id, code, cell_path))
            await self._wait(run, timeout)
        except asyncio.CancelledError:
            # The caller gave up: stop the cell, but keep the context for the next run.
            self._spawn(self._interrupt_or_kill(run))
            raise
        finally:
            self._run = None
        return run.finish()

    async def _wait(self, run: _Run, timeout: float | None) -> None:
        if timeout is not None:
            try:
                await asyncio.wait_for(run.done.wait(), timeout)
                return
            except asyncio.TimeoutError:
                run.execution.timed_out = True
                run.note(f"the run passed its timeout of {timeout:g} s and was interrupted")
                self._signal(signal.SIGINT)
                await self._watch(run)
        await run.done.wait()

    async def _watch(self, run: _Run) -> None:
        """Gives an interrupted run ``INTERRUPT_GRACE`` to end, then kills its interpreter."""
        # A signal that lands as a cell starts or ends can be lost (Node drops it then):
        # send it again every second of the grace period before giving up on the state.
        for attempt in range(int(INTERRUPT_GRACE)):
            if attempt:
                self._signal(signal.SIGINT)
            try:
                await asyncio.wait_for(run.done.wait(), INTERRUPT_GRACE / int(INTERRUPT_GRACE))
                return
            except asyncio.TimeoutError:
                pass
        if run.done.is_set():
            return
        await self.stop()
        run.execution.context_restarted = True
        run.execution.error = CodeError(
            "TimeoutError" if run.execution.timed_out else "Interrupted",
            "the code did not stop when interrupted, so its interpreter was killed",
        )
        run.note("the interpreter was killed; the next run starts a new one, so earlier state is gone")
        self._restart_note = NOTE_KILLED
        run.done.set()

    async def interrupt(self) -> None:
        """Interrupts the running cell (KeyboardInterrupt in Python); kills the interpreter if
        it does not stop within ``INTERRUPT_GRACE`` (the next run starts a new one)."""
        run = self._run
        if run is None:
            return
        run.note("the run was interrupted")
        self._signal(signal.SIGINT)
        self._spawn(self._watch(run))

    async def _interrupt_or_kill(self, run: _Run) -> None:
        self._signal(signal.SIGINT)
        await self._watch(run)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _signal(self, signum: int) -> None:
        if self._execution is not None:
            try:
                self._execution.kill(signum)
            except BoxliteError:
                pass

    async def _write(self, data: bytes) -> None:
        if self._stdin is None:
            raise _Died("no stdin")
        try:
            await self._stdin.write(data)
        except BoxliteError as error:
            raise _Died(str(error)) from error

    # ---------------------------------------------------------------------------------- output

    async def _pump(self, stream: AsyncIterator[bytes], name: str) -> None:
        reader = FrameReader()
        try:
            async for chunk in stream:
                for event in reader.feed(chunk):
                    self._on_event(name, event)
        except BoxliteError:
            pass  # the box went away: the same as the end of the stream
        for event in reader.close():
            self._on_event(name, event)
        if name == "stdout":
            await self._on_exit()

    def _on_event(self, stream: str, event: Raw | Frame | Dropped) -> None:
        run = self._run
        if isinstance(event, Raw):
            if run is not None:
                run.output(stream, event.text)
            return
        if isinstance(event, Dropped):
            if run is not None:
                run.note(f"the interpreter sent {event.reason}; it was left out")
            return
        kind, fields = event.type, event.fields
        if kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(fields)
            return
        if run is None:
            return  # output between runs (a background process) belongs to no run
        if kind in ("stdout", "stderr"):
            if self.language.shell and stream == "stderr":
                run.stderr_synced = True
                self._maybe_done(run)
            else:
                run.output(kind, fields["text"])
        elif kind == "truncated":
            if fields.get("stream") in run.lost:
                run.lost[fields["stream"]] += fields.get("chars", 0)
        elif kind == "result":
            run.result(fields["data"], fields.get("main", False))
        elif kind == "error":
            run.execution.error = CodeError(fields["name"], fields.get("value", ""), fields.get("traceback", ""))
            if "exit_code" in fields:
                run.execution.exit_code = fields["exit_code"]
        elif kind == "done" and fields["id"] == run.id:
            self._runs += 1
            run.execution.execution_count = fields.get("execution_count", self._runs)
            if self.language.shell:
                status = fields.get("exit_code", 0)
                run.execution.exit_code = status
                if status != 0 and run.execution.error is None:
                    name = "Interrupted" if status == 130 else "CommandFailed"
                    run.execution.error = CodeError(name, f"exit status {status}")
                run.done_seen = True
                self._maybe_done(run)
            else:
                run.done.set()

    def _maybe_done(self, run: _Run) -> None:
        if run.stderr_synced and run.done_seen:
            run.done.set()

    async def _on_exit(self) -> None:
        was_alive, self.alive = self.alive, False
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(_Died("the interpreter exited"))
            self._ready.exception()
        run = self._run
        if run is None or run.done.is_set():
            if was_alive:
                self._restart_note = NOTE_EXITED
            return
        status = await self._exit_status()
        run.execution.context_restarted = True
        if run.execution.error is None or not run.execution.timed_out:
            what = "was killed" if status is None or status < 0 or status > 128 else f"exited with status {status}"
            run.execution.error = CodeError(
                "InterpreterDied", f"the {self.language.name} interpreter {what} during this run"
            )
        run.note("the interpreter died during this run; the next run starts a new one, so earlier state is gone")
        self._restart_note = NOTE_DIED
        run.done.set()


class _Died(Exception):
    """The interpreter went away."""


def _describe(error: BaseException, status: int | None) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return f"no answer within {START_TIMEOUT:g} s"
    if status == 127:
        return "command not found"
    return f"exit status {status}" if status is not None else str(error) or type(error).__name__
