"""The node:slim stand-in (`testkit.images.node_layout()`) in a real VM, and the Node.js kernel
(python/boxlite/interpreter/kernels/node_kernel.js) spoken to directly over its wire protocol
through `box.exec` with stdin, as the host's CodeBox starts it: `node -e <kernel source>`."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import boxlite
from conftest import run
from testkit.images import node_layout, python_layout

REPO = Path(__file__).resolve().parent.parent
KERNEL = REPO / "python" / "boxlite" / "interpreter" / "kernels" / "node_kernel.js"
PREFIX = b"\x1e\x1fBOXLITE:"
WAIT = 120.0  # node's first start under TCG takes a while


def manifest_layers(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


def test_node_stand_in_is_the_python_base_plus_two_layers() -> None:
    python, node = manifest_layers(python_layout()), manifest_layers(node_layout())
    assert len(node) == 3 and node[0] == python[0] and set(node[1:]).isdisjoint(python)


@pytest.fixture(scope="module")
def nodebox(shared_runtime: boxlite.Boxlite) -> Iterator[boxlite.Box]:
    options = boxlite.BoxOptions(rootfs_path=node_layout(), cpus=1, memory_mib=256)
    box = asyncio.run(shared_runtime.create(options))
    yield box
    asyncio.run(box.stop())


async def test_node_bash_and_the_ca_bundle(nodebox: boxlite.Box) -> None:
    version = await run(nodebox, "node", "--version")
    # Nothing on stderr: Debian's node warns at every start when the CA bundle is missing.
    assert version.exit_code == 0 and version.stdout.startswith("v18.") and version.stderr == ""
    script = "console.log(require('tls').rootCertificates.length > 100, process.features.inspector)"
    checks = await run(nodebox, "node", "-e", script)
    assert (checks.exit_code, checks.stdout, checks.stderr) == (0, "true true\n", "")
    shell = await run(nodebox, "bash", "-c", 'echo "${BASH_VERSINFO[0]}" $((6 * 7))')
    assert (shell.exit_code, shell.stdout) == (0, "5 42\n")


class Frames:
    """The kernel's stdout split into lines; frames parsed, other lines kept."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = b""
        self.raw: list[bytes] = []

    async def next(self) -> dict[str, Any]:
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                before, prefix, frame = line.partition(PREFIX)
                if not prefix:
                    self.raw.append(line)
                    continue
                if before:
                    self.raw.append(before)
                message: dict[str, Any] = json.loads(frame)
                return message
            chunk = await asyncio.wait_for(anext(self.chunks), WAIT)
            self.buffer += chunk

    async def until_done(self, run_id: str) -> list[dict[str, Any]]:
        messages = [await self.next()]
        while messages[-1]["type"] != "done":
            messages.append(await self.next())
        assert messages[-1]["id"] == run_id, messages
        return messages


def request(run_id: str, code: str) -> bytes:
    return json.dumps({"op": "run", "id": run_id, "code": code}).encode() + b"\n"


async def test_the_kernel_keeps_state_and_reports_errors_and_interrupts(nodebox: boxlite.Box) -> None:
    kernel = await nodebox.exec("node", ["-e", KERNEL.read_text()], cwd="/tmp")
    stdin = kernel.stdin()
    assert stdin is not None
    frames = Frames(kernel.stdout(binary=True))

    ready = await frames.next()
    assert ready["type"] == "ready" and ready["language"] == "node" and ready["version"].startswith("18.")
    assert ready["pid"] == kernel.pid

    await stdin.write(request("one", "let total = 40; console.log('cwd', process.cwd()); total"))
    first = await frames.until_done("one")
    assert first == [
        {"type": "stdout", "text": "cwd /tmp\n"},
        {"type": "result", "data": {"text/plain": "40"}, "main": True},
        {"type": "done", "id": "one", "execution_count": 1},
    ]
    await stdin.write(request("two", "total += await Promise.resolve(2); ({ total })"))
    second = await frames.until_done("two")
    assert second == [
        {"type": "result", "data": {"text/plain": "{ total: 42 }"}, "main": True},
        {"type": "done", "id": "two", "execution_count": 2},
    ]

    await stdin.write(request("bad", "function f() { return undefinedName }\nf()"))
    error, done = await frames.until_done("bad")
    assert (error["type"], error["name"], error["value"]) == ("error", "ReferenceError", "undefinedName is not defined")
    frames_of_the_cell = error["traceback"].splitlines()[1:]
    assert frames_of_the_cell[0].startswith("    at f (cell-3:1:") and frames_of_the_cell[1:] == ["    at cell-3:2:1"]
    assert done == {"type": "done", "id": "bad", "execution_count": 3}

    # SIGINT to the process group, as the host's interrupt sends it, ends a busy cell.
    await stdin.write(request("busy", "console.log('spinning'); while (true) { total++ }"))
    assert await frames.next() == {"type": "stdout", "text": "spinning\n"}
    await asyncio.sleep(1)
    kernel.signal(signal.SIGINT)
    error, done = await frames.until_done("busy")
    assert (error["name"], done["execution_count"]) == ("Interrupted", 4)
    await stdin.write(request("after", "total > 42"))
    assert (await frames.until_done("after"))[0]["data"] == {"text/plain": "true"}

    await stdin.close()  # end of input: the kernel exits
    result = await asyncio.wait_for(kernel.wait(), WAIT)
    assert (result.exit_code, result.stderr) == (0, "")
    assert frames.raw == [] and frames.buffer == b""
