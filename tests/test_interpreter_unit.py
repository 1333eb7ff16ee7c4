"""Unit tests of the interpreter's host side (frames, results, languages) and of the Python
kernel itself, run here on the host's python3 (no VM: the VM tests are test_interpreter.py)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

import boxlite
from boxlite.interpreter.languages import language
from boxlite.interpreter.protocol import PREFIX, Dropped, Frame, FrameReader, Raw

# ------------------------------------------------------------------------------------- frames


def frame(message: dict[str, Any]) -> bytes:
    return PREFIX + json.dumps(message).encode() + b"\n"


def test_frames_and_raw_text_come_out_in_order() -> None:
    reader = FrameReader()
    data = b"raw line\n" + frame({"type": "stdout", "text": "hi"}) + b"partial" + frame({"type": "done", "id": "a"})
    events = reader.feed(data)
    assert events == [
        Raw("raw line\n"),
        Frame("stdout", {"text": "hi"}),
        Raw("partial"),
        Frame("done", {"id": "a"}),
    ]


def test_frames_split_anywhere_are_reassembled() -> None:
    data = frame({"type": "stdout", "text": "é" * 10}) + "tail é".encode()
    reader = FrameReader()
    events = []
    for i in range(len(data)):
        events += reader.feed(data[i : i + 1])
    events += reader.close()
    assert events[0] == Frame("stdout", {"text": "é" * 10})
    assert "".join(e.text for e in events[1:] if isinstance(e, Raw)) == "tail é"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "stdout", "text": 3}, "bad 'text'"),
        ({"type": "nope"}, "unknown type"),
        ({"text": "x"}, "without a type"),
        ({"type": "result", "data": {"image/png": b"x".hex(), "text/plain": 1}}, "non-text value"),
        ({"type": "done", "id": "a", "execution_count": True}, "bad 'execution_count'"),
        ({"type": "error"}, "missing a field"),
    ],
)
def test_malformed_frames_are_dropped_with_a_reason(message: dict[str, Any], reason: str) -> None:
    (event,) = FrameReader().feed(frame(message))
    assert isinstance(event, Dropped) and reason in event.reason


def test_a_frame_that_is_not_json_is_dropped() -> None:
    (event,) = FrameReader().feed(PREFIX + b"{nope\n")
    assert event == Dropped("a frame that is not JSON")


def test_an_oversized_frame_is_dropped_and_output_after_it_kept() -> None:
    reader = FrameReader(max_frame=1024)
    events = reader.feed(b"before" + PREFIX + b"x" * 5000)
    events += reader.feed(b"y" * 5000 + b"\nafter\n")
    assert events == [Raw("before"), Dropped("a frame over 0 MiB"), Raw("after\n")]


def test_long_raw_output_is_passed_on_without_waiting_for_a_newline() -> None:
    reader = FrameReader(max_frame=1024)
    events = reader.feed(b"z" * 4000)
    assert sum(len(e.text) for e in events if isinstance(e, Raw)) >= 4000 - len(PREFIX)


# ------------------------------------------------------------------------------------ results

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def test_a_result_exposes_each_format() -> None:
    result = boxlite.CodeResult(
        data={"text/plain": "Fig", "image/png": PNG, "text/html": "<b>x</b>", "application/vnd.custom": "c"},
        is_main_result=True,
    )
    assert (result.text, result.html, result.png) == ("Fig", "<b>x</b>", PNG)
    assert result.formats() == ["text", "png", "html", "application/vnd.custom"]
    assert result.extra == {"application/vnd.custom": "c"}
    assert result._repr_png_() == b"\x89PNG\r\n\x1a\nfake"
    assert result._repr_html_() == "<b>x</b>" and result.markdown is None
    assert str(result) == "Fig"


def test_an_execution_summarises_its_parts() -> None:
    execution = boxlite.CodeExecution(
        results=[boxlite.CodeResult({"text/plain": "1"}), boxlite.CodeResult({"text/plain": "42"}, True)],
        logs=boxlite.CodeLogs(stdout=["a", "b\n"], stderr=["w\n"]),
        error=boxlite.CodeError("ValueError", "bad", "Traceback...\nValueError: bad\n"),
        execution_count=3,
    )
    assert (execution.text, execution.stdout, execution.stderr) == ("42", "ab\n", "w\n")
    assert json.loads(execution.to_json())["error"]["name"] == "ValueError"
    assert execution._repr_mimebundle_() == {"text/plain": "42"}
    assert str(execution.error).startswith("Traceback")


def test_languages_and_their_aliases() -> None:
    assert language(None).name == "python" and language("JS").name == "node" and language("shell").name == "bash"
    assert language("bash").shell and not language("python").shell
    with pytest.raises(boxlite.InvalidArgumentError, match="use one of bash, node, python, sh"):
        language("cobol")


# ----------------------------------------------------------------- the Python kernel, on the host


class HostKernel:
    """The Python kernel in a host process, driven over its stdin/stdout."""

    def __init__(self) -> None:
        argv = language("python").argv()
        argv[0] = sys.executable
        env = {**os.environ, "BOXLITE_OUTPUT_CAP": "10000"}
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=env
        )
        self.reader = FrameReader()
        self.pending: list[Any] = []
        assert self.next().type == "ready"

    def next(self) -> Any:
        assert self.process.stdout is not None
        while not self.pending:
            line = self.process.stdout.readline()
            assert line, "the kernel exited"
            self.pending += self.reader.feed(line)
        return self.pending.pop(0)

    def run(self, code: str, interrupt_after: float | None = None) -> list[Frame]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": "run", "id": "r", "code": code}) + "\n").encode())
        self.process.stdin.flush()
        if interrupt_after is not None:
            time.sleep(interrupt_after)
            os.killpg(self.process.pid, signal.SIGINT)
        frames = []
        while True:
            event = self.next()
            assert isinstance(event, Frame), event
            frames.append(event)
            if event.type == "done":
                return frames


@pytest.fixture(scope="module")
def kernel() -> Iterator[HostKernel]:
    host = HostKernel()
    yield host
    host.process.kill()
    host.process.wait()


def of(frames: list[Frame], kind: str) -> list[dict[str, Any]]:
    return [f.fields for f in frames if f.type == kind]


def test_kernel_keeps_state_and_returns_the_last_value(kernel: HostKernel) -> None:
    kernel.run("import math\nx = 41")
    frames = kernel.run("print('out'); math.floor(x + 1.5)")
    assert of(frames, "stdout") == [{"text": "out\n"}]
    assert of(frames, "result") == [{"data": {"text/plain": "42"}, "main": True}]
    assert of(frames, "done")[0]["execution_count"] == 2


def test_kernel_forwards_output_of_child_processes(kernel: HostKernel) -> None:
    frames = kernel.run("import os\nos.system('echo child; echo oops >&2')")
    assert "child\n" in "".join(f["text"] for f in of(frames, "stdout"))
    assert "oops\n" in "".join(f["text"] for f in of(frames, "stderr"))


def test_kernel_reports_errors_without_its_own_frames(kernel: HostKernel) -> None:
    (error,) = of(kernel.run("def f():\n    return 1 / 0\nf()"), "error")
    assert (error["name"], error["value"]) == ("ZeroDivisionError", "division by zero")
    assert 'File "<cell-' in error["traceback"] and "return 1 / 0" in error["traceback"]
    assert "<string>" not in error["traceback"]  # the kernel's own frames are left out
    (syntax,) = of(kernel.run("def broken(:"), "error")
    assert syntax["name"] == "SyntaxError"


def test_kernel_sends_rich_results_from_display_and_repr_methods(kernel: HostKernel) -> None:
    code = (
        "class Rich:\n"
        "    def _repr_html_(self): return '<i>rich</i>'\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "display(Rich())\nRich()"
    )
    shown, main = of(kernel.run(code), "result")
    assert shown["main"] is False and main["main"] is True
    assert main["data"]["text/html"] == "<i>rich</i>"
    assert base64.b64decode(main["data"]["image/png"]) == b"\x89PNG"


def test_kernel_runs_top_level_await(kernel: HostKernel) -> None:
    frames = kernel.run("import asyncio\nawait asyncio.sleep(0)\n'awaited'")
    assert of(frames, "result")[0]["data"]["text/plain"] == "'awaited'"


def test_kernel_turns_sigint_into_keyboard_interrupt_and_lives_on(kernel: HostKernel) -> None:
    kernel.run("kept = 'still here'")
    (error,) = of(kernel.run("import time\ntime.sleep(60)", interrupt_after=0.5), "error")
    assert error["name"] == "KeyboardInterrupt"
    assert of(kernel.run("kept"), "result")[0]["data"]["text/plain"] == "'still here'"


def test_kernel_caps_output_and_counts_the_rest(kernel: HostKernel) -> None:
    frames = kernel.run("print('x' * 50000)")
    assert sum(len(f["text"]) for f in of(frames, "stdout")) == 10000
    assert of(frames, "truncated") == [{"stream": "stdout", "chars": 40001}]


def test_kernel_reports_sys_exit_with_its_status(kernel: HostKernel) -> None:
    frames = kernel.run("import sys\nsys.exit('boom')")
    assert of(frames, "error")[0]["exit_code"] == 1
    assert "boom\n" in "".join(f["text"] for f in of(frames, "stderr"))
    assert of(kernel.run("import sys\nsys.exit(0)"), "error") == []
    assert of(kernel.run("1 + 1"), "result")  # the kernel is still there


def test_kernel_gives_the_cell_no_stdin(kernel: HostKernel) -> None:
    (error,) = of(kernel.run("input()"), "error")
    assert error["name"] == "EOFError"
