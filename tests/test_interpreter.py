"""The stateful interpreter in a real box: state between runs, contexts, rich results,
streaming, timeouts, interrupts, crashes, output caps, and bash contexts."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from testkit.images import node_layout, python_layout

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def codebox(shared_runtime: boxlite.Boxlite) -> Iterator[boxlite.CodeBox]:
    box = boxlite.CodeBox(rootfs_path=python_layout(), runtime=shared_runtime)
    asyncio.run(box.start())
    yield box
    asyncio.run(box.shutdown())


async def test_state_survives_between_runs(codebox: boxlite.CodeBox) -> None:
    await codebox.run("import os, json\ncounter = 1\nlog = open('/tmp/interp.log', 'w')\nos.chdir('/tmp')")
    await codebox.run("counter += 1\nlog.write('kept open')\nlog.flush()")
    assert await codebox.run("print(counter, os.getcwd(), json.dumps([1]))") == "2 /tmp [1]\n"
    assert (await codebox.read_file("/tmp/interp.log")) == b"kept open"


async def test_run_raises_as_the_published_package_did(codebox: boxlite.CodeBox) -> None:
    with pytest.raises(boxlite.ExecError) as caught:
        await codebox.run("print('partial')\nraise ValueError('bad value')")
    assert (caught.value.exit_code, caught.value.stdout) == (1, "partial\n")
    assert "ValueError: bad value" in caught.value.stderr and "<cell-" in caught.value.stderr
    with pytest.raises(boxlite.ExecError) as exited:
        await codebox.run("import sys; sys.exit(3)")
    assert exited.value.exit_code == 3


async def test_run_code_returns_results_errors_and_counts(codebox: boxlite.CodeBox) -> None:
    first = await codebox.run_code("value = 6 * 7\nvalue")
    assert first.text == "42" and first.error is None and first.results[0].is_main_result
    failed = await codebox.run_code("print('before')\n{}['missing']")
    assert failed.stdout == "before\n" and failed.text is None
    assert failed.error is not None and (failed.error.name, failed.error.value) == ("KeyError", "'missing'")
    assert "KeyError" in failed.error.traceback
    assert failed.execution_count is not None and first.execution_count is not None
    assert failed.execution_count > first.execution_count


async def test_rich_results_carry_every_format(codebox: boxlite.CodeBox) -> None:
    code = (
        "import base64\n"
        "class Chart:\n"
        "    def _repr_png_(self): return base64.b64decode(" + repr(TINY_PNG) + ")\n"
        "    def _repr_html_(self): return '<table><tr><td>1</td></tr></table>'\n"
        "    def _repr_markdown_(self): return '**bold**'\n"
        "display(Chart())\n"
        "class Data:\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_latex_(self): return r'$x^2$'\n"
        "    def _repr_svg_(self): return '<svg></svg>'\n"
        "Data()"
    )
    execution = await codebox.run_code(code)
    chart, data = execution.results
    assert not chart.is_main_result and data.is_main_result
    assert base64.b64decode(chart.png or "") == base64.b64decode(TINY_PNG)
    assert (chart.html, chart.markdown) == ("<table><tr><td>1</td></tr></table>", "**bold**")
    assert (data.json, data.latex, data.svg) == ({"a": [1, 2]}, "$x^2$", "<svg></svg>")
    assert set(chart.formats()) == {"text", "png", "html", "markdown"}


async def test_output_streams_while_the_code_runs(codebox: boxlite.CodeBox) -> None:
    # The cell waits for a file that only the on_stdout callback writes: it can only finish
    # if its first line reached the host while it was still running.
    code = (
        "import os, time\nprint('waiting', flush=True)\n"
        "while not os.path.exists('/tmp/go'): time.sleep(0.05)\nprint('released')"
    )
    seen: list[str] = []

    async def on_stdout(text: str) -> None:
        seen.append(text)
        if "waiting" in text:
            await codebox.write_file("/tmp/go", "1")

    execution = await codebox.run_code(code, on_stdout=on_stdout, timeout=60)
    assert execution.error is None and seen == ["waiting\n", "released\n"]

    stream = codebox.stream_code("import sys\nprint('o')\nsys.stderr.write('e\\n')\n7")
    items = [item async for item in stream]
    assert [type(i).__name__ for i in items].count("CodeOutput") == 2
    assert {(i.stream, i.text) for i in items if isinstance(i, boxlite.CodeOutput)} == {
        ("stdout", "o\n"),
        ("stderr", "e\n"),
    }
    assert stream.execution.text == "7"


async def test_contexts_are_separate_interpreters(codebox: boxlite.CodeBox) -> None:
    one = await codebox.create_context()
    two = await codebox.create_context(cwd="/tmp", env={"WHO": "two"})
    await codebox.run("name = 'one'", context=one)
    assert (
        await codebox.run_code("import os\n(os.getcwd(), os.environ['WHO'])", context=two)
    ).text == "('/tmp', 'two')"
    missing = await codebox.run_code("name", context=two)
    assert missing.error is not None and missing.error.name == "NameError"
    assert (await codebox.run_code("name", context=one)).text == "'one'"
    assert {one.id, two.id} <= {c.id for c in await codebox.list_contexts()}

    await codebox.restart_context(one)
    assert (await codebox.run_code("'name' in dir()", context=one)).text == "False"
    await codebox.remove_context(two)
    with pytest.raises(boxlite.NotFoundError, match="create_context"):
        await codebox.run_code("1", context=two)
    with pytest.raises(boxlite.InvalidArgumentError, match="runs python"):
        await codebox.run_code("echo", language="bash", context=one)
    await codebox.remove_context(one)


async def test_a_timeout_interrupts_the_cell_and_keeps_the_state(codebox: boxlite.CodeBox) -> None:
    context = await codebox.create_context()
    await codebox.run_code("survivor = 'yes'", context=context)
    execution = await codebox.run_code("while True: pass", context=context, timeout=2)
    assert execution.timed_out and not execution.context_restarted
    assert execution.error is not None and execution.error.name == "KeyboardInterrupt"
    assert (await codebox.run_code("survivor", context=context)).text == "'yes'"
    with pytest.raises(boxlite.ExecTimeoutError):
        await codebox.run("import time\ntime.sleep(30)", timeout=1)

    # Code that ignores the interrupt has its interpreter killed and started afresh.
    stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
    killed = await codebox.run_code(stubborn, context=context, timeout=1)
    assert killed.timed_out and killed.context_restarted
    assert killed.error is not None and killed.error.name == "TimeoutError"
    after = await codebox.run_code("'survivor' in dir()", context=context)
    assert after.text == "False" and after.context_restarted and "state is gone" in after.notes[0]
    await codebox.remove_context(context)


async def test_interrupt_stops_a_running_cell(codebox: boxlite.CodeBox) -> None:
    context = await codebox.create_context()
    started = asyncio.Event()

    async def on_stdout(text: str) -> None:
        started.set()

    task = asyncio.ensure_future(
        codebox.run_code("import time\nprint('go', flush=True)\ntime.sleep(120)", context=context, on_stdout=on_stdout)
    )
    await asyncio.wait_for(started.wait(), 60)
    await codebox.interrupt(context)
    execution = await asyncio.wait_for(task, 60)
    assert execution.error is not None and execution.error.name == "KeyboardInterrupt"
    assert not execution.context_restarted
    await codebox.remove_context(context)


async def test_a_crashed_interpreter_is_restarted_with_a_note(codebox: boxlite.CodeBox) -> None:
    context = await codebox.create_context()
    await codebox.run_code("lost = 1", context=context)
    crashed = await codebox.run_code("import os\nos._exit(3)", context=context)
    assert crashed.error is not None and crashed.error.name == "InterpreterDied"
    assert "status 3" in crashed.error.value
    again = await codebox.run_code("'lost' in dir()", context=context)
    assert again.text == "False" and again.context_restarted
    assert any("died during the previous run" in note for note in again.notes)
    await codebox.remove_context(context)


async def test_output_beyond_the_cap_is_truncated_with_a_marker(codebox: boxlite.CodeBox) -> None:
    execution = await codebox.run_code("import sys\nfor _ in range(40): sys.stdout.write('y' * 65536)\n'end'")
    assert execution.text == "'end'"
    assert len(execution.stdout) < (1 << 20) + 200
    assert execution.stdout.rstrip().endswith("not kept (cap 1048576)]")
    assert str(40 * 65536 - (1 << 20)) in execution.stdout


@pytest.mark.parametrize("shell", ["bash", "sh"])
async def test_shell_contexts_keep_directory_and_variables(codebox: boxlite.CodeBox, shell: str) -> None:
    await codebox.run_code('cd /etc && export GREETING=hello && shout() { echo "$1!"; }', language=shell)
    execution = await codebox.run_code('pwd; echo "$GREETING"; shout hey; echo err >&2', language=shell)
    assert (execution.stdout, execution.stderr, execution.error) == ("/etc\nhello\nhey!\n", "err\n", None)
    failed = await codebox.run_code("ls /nonexistent", language=shell)
    assert failed.error is not None and failed.error.name == "CommandFailed" and failed.exit_code != 0
    assert "nonexistent" in failed.stderr
    timed = await codebox.run_code("sleep 60", language=shell, timeout=1)
    assert timed.timed_out and timed.error is not None
    assert (await codebox.run_code("echo $GREETING", language=shell)).stdout == "hello\n"


async def test_a_language_missing_from_the_image_is_a_clear_error(codebox: boxlite.CodeBox) -> None:
    with pytest.raises(boxlite.UnsupportedError, match="needs `node`"):
        await codebox.run_code("1", language="node")


@pytest.fixture(scope="module")
def nodebox(shared_runtime: boxlite.Boxlite) -> Iterator[boxlite.CodeBox]:
    box = boxlite.CodeBox(rootfs_path=node_layout(), runtime=shared_runtime)
    asyncio.run(box.start())
    yield box
    asyncio.run(box.shutdown())


async def test_node_contexts_keep_state_and_report_errors(nodebox: boxlite.CodeBox) -> None:
    await nodebox.run_code(
        "const base = 40; let calls = 0; function add(n) { calls++; return base + n }", language="node"
    )
    chunks: list[str] = []
    execution = await nodebox.run_code("console.log('adding'); add(2)", language="javascript", on_stdout=chunks.append)
    assert (execution.text, execution.stdout, chunks, execution.error) == ("42", "adding\n", ["adding\n"], None)
    awaited = await nodebox.run_code("await new Promise(r => setTimeout(() => r(calls), 10))", language="node")
    assert awaited.text == "1"
    failed = await nodebox.run_code("null.field", language="node")
    assert failed.error is not None and failed.error.name == "TypeError" and "null" in failed.error.value
    timed = await nodebox.run_code("while (true) {}", language="node", timeout=2)
    assert timed.timed_out and timed.error is not None
    assert not timed.context_restarted  # the interrupt stopped the loop; the state is kept
    assert (await nodebox.run_code("base + calls", language="node")).text == "41"
    # The same box runs Python-less shells too.
    assert (await nodebox.run_code("echo $((6 * 7))", language="bash")).stdout == "42\n"


def test_the_sync_api_runs_contexts(tmp_path: Path, shared_runtime: boxlite.Boxlite) -> None:
    from boxlite.sync_api import SyncCodeBox

    with SyncCodeBox(rootfs_path=python_layout(), runtime=shared_runtime) as box:
        box.run("total = 40")
        chunks: list[str] = []
        execution = box.run_code("print('sync'); total + 2", on_stdout=chunks.append)
        assert (execution.text, chunks) == ("42", ["sync\n"])
        items = list(box.stream_code("print('streamed')"))
        assert [i.text for i in items if isinstance(i, boxlite.CodeOutput)] == ["streamed\n"]


# A 1x1 PNG.
TINY_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
