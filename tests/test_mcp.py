"""`boxlite mcp`: the MCP server driven by the `mcp` package's own client, over streamable HTTP
(one server shared by most tests) and over stdio (the server as the client's subprocess), with
real boxes. Every server runs as `python -m boxlite mcp` in its own home; after it exits no
QEMU of that home may be left."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, ImageContent, TextContent

from boxlite import cli
from boxlite._runtime import PACKAGE_GUEST_DIR
from conftest import REPO, assert_no_engines, engine_pids, pid_alive
from testkit.images import python_layout

TOOLS = {"run_code", "exec", "read_file", "write_file", "list_files", "create_box", "list_boxes", "remove_box"}
shared_loop = pytest.mark.asyncio(loop_scope="module")


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
    env["BOXLITE_TEMPLATES"] = "0"  # one or two boxes per home: a template would only cost CPU
    return env


def server_args(home: Path, *extra: str) -> list[str]:
    rootfs = str(python_layout())
    return ["-m", "boxlite", "--home", str(home), "mcp", "--rootfs", rootfs, "--memory", "512MiB", *extra]


def server_pids(home: Path) -> list[int]:
    """Live boxlite processes of `home`: the server and its boxes' supervisors."""
    return [pid for pid in engine_pids(str(home), "boxlite") if pid_alive(pid) and pid != os.getpid()]


def assert_all_gone(home: Path, within: float = 30.0) -> None:
    """The server, its supervisors and their QEMUs of `home` are gone (waiting a little:
    the client does not wait for the server's exit)."""
    deadline = time.monotonic() + within
    while server_pids(home) or [p for p in engine_pids(str(home)) if pid_alive(p)]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not server_pids(home), "a boxlite process of the home is still running"
    assert_no_engines(home)


def structured(result: CallToolResult) -> Any:
    assert not result.is_error, result.content
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    assert isinstance(result.content[0], TextContent)
    return result.content[0].text


def guest_kernel_release() -> str:
    manifest = json.loads((PACKAGE_GUEST_DIR / "manifest.json").read_text())
    release: str = manifest["kernel"]["release"]
    return release


def tiny_png() -> bytes:
    """A valid 1x1 PNG, made without any imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------- without a VM


def test_import_boxlite_loads_no_adapter() -> None:
    code = "import boxlite, sys; assert not any(m.startswith('boxlite.integrations') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, env=server_env())


def test_bad_options_are_refused_before_serving(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra, code, message in (
        (["--port", "70000"], 2, "invalid --port 70000"),
        (["--timeout", "0"], 2, "invalid --timeout"),
        (["--max-boxes", "0"], 125, "max_boxes must be at least 1"),
    ):
        argv = server_args(tmp_path / "home", "--transport", "http", *extra)[2:]  # without `-m boxlite`
        assert cli.main(argv) == code
        assert message in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # refused before a runtime was opened


def test_sigint_stops_an_idle_server(tmp_path: Path) -> None:
    """Ctrl-C before any box exists: a clean exit, no box made."""
    log = tmp_path / "server.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, *server_args(tmp_path / "home", "--transport", "http", "--port", "0")],
            env=server_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_for_url(proc, log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------- one HTTP server


def wait_for_url(proc: subprocess.Popen[bytes], log: Path, within: float = 60.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = re.search(r"serving on (http://\S+)", log.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


class HttpServer:
    def __init__(self, home: Path, log: Path) -> None:
        self.home = home
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, *server_args(home, "--transport", "http", "--port", "0", "--max-boxes", "2")],
                env=server_env(),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.url = wait_for_url(self.proc, log)


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    root = tmp_path_factory.mktemp("mcp-http")
    server = HttpServer(root / "home", root / "server.log")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        assert_all_gone(server.home)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(http_server: HttpServer) -> AsyncIterator[Client]:
    # The client is entered and left in one task of its own (its cancel scopes require it);
    # the tests share it.
    ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def hold() -> None:
        async with Client(http_server.url) as connected:
            ready.set_result(connected)
            await done.wait()

    holder = asyncio.ensure_future(hold())
    await asyncio.wait({holder, ready}, return_when=asyncio.FIRST_COMPLETED)
    if holder.done():
        holder.result()  # the connection failed: say why
    try:
        yield ready.result()
    finally:
        done.set()
        with contextlib.suppress(Exception):  # the server may be gone already (SIGTERM test)
            await holder


@shared_loop
async def test_tools_are_listed_with_schemas(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description, tool.name
        assert tool.input_schema["type"] == "object"
        assert tool.output_schema is not None, tool.name
        if tool.name not in ("create_box", "list_boxes"):
            assert "box_id" in tool.input_schema["properties"], tool.name
    run_code = tools["run_code"]
    assert run_code.input_schema["required"] == ["code"]
    assert set(run_code.output_schema["properties"]) >= {"stdout", "stderr", "results", "error", "execution_count"}
    exec_tool = tools["exec"]
    assert set(exec_tool.input_schema["properties"]) == {"command", "args", "cwd", "env", "timeout", "box_id"}
    assert set(exec_tool.output_schema["properties"]) == {"exit_code", "stdout", "stderr"}
    assert tools["read_file"].annotations is not None and tools["read_file"].annotations.read_only_hint


@shared_loop
async def test_exec_runs_in_the_vm(client: Client) -> None:
    out = structured(await client.call_tool("exec", {"command": "uname", "args": ["-r"]}))
    assert out["exit_code"] == 0
    assert out["stdout"].strip() == guest_kernel_release()  # the box's own kernel, not the host's
    script = "echo $GREETING from $(pwd); echo oops >&2; exit 3"
    out = structured(
        await client.call_tool(
            "exec", {"command": "sh", "args": ["-c", script], "cwd": "/tmp", "env": {"GREETING": "hello"}}
        )
    )
    assert out == {"exit_code": 3, "stdout": "hello from /tmp\n", "stderr": "oops\n"}
    boxes = structured(await client.call_tool("list_boxes"))["boxes"]
    assert len(boxes) == 1 and boxes[0]["is_default"] and boxes[0]["status"] == "running"


@shared_loop
async def test_files_round_trip(client: Client) -> None:
    await client.call_tool("exec", {"command": "mkdir", "args": ["-p", "/work/sub"]})
    text = "héllo\nwörld\n"
    written = structured(await client.call_tool("write_file", {"path": "/work/notes.txt", "content": text}))
    assert written == {"path": "/work/notes.txt", "size": len(text.encode())}
    read = structured(await client.call_tool("read_file", {"path": "/work/notes.txt"}))
    assert read == {"path": "/work/notes.txt", "size": len(text.encode()), "encoding": "utf-8", "content": text}

    blob = bytes(range(256))
    encoded = base64.b64encode(blob).decode()
    args = {"path": "/work/sub/data.bin", "content": encoded, "encoding": "base64", "mode": "755"}
    structured(await client.call_tool("write_file", args))
    read = structured(await client.call_tool("read_file", {"path": "/work/sub/data.bin"}))
    assert (read["encoding"], base64.b64decode(read["content"])) == ("base64", blob)
    mode = structured(await client.call_tool("exec", {"command": "stat", "args": ["-c", "%a", "/work/sub/data.bin"]}))
    assert mode["stdout"].strip() == "755"

    listing = structured(await client.call_tool("list_files", {"path": "/work"}))
    assert listing["entries"] == [
        {"name": "notes.txt", "type": "file", "size": len(text.encode())},
        {"name": "sub", "type": "directory", "size": listing["entries"][1]["size"]},
    ]


@shared_loop
async def test_errors_are_tool_errors(client: Client) -> None:
    assert "/no/such/file" in error_text(await client.call_tool("read_file", {"path": "/no/such/file"}))
    assert "ExecStartError" in error_text(await client.call_tool("exec", {"command": "no-such-program"}))
    assert "no box 'nope'" in error_text(await client.call_tool("exec", {"command": "true", "box_id": "nope"}))
    timed_out = await client.call_tool("exec", {"command": "sleep", "args": ["30"], "timeout": 1})
    assert "timed out" in error_text(timed_out)
    bad_mode = {"path": "/tmp/x", "content": "", "mode": "999"}
    assert "mode" in error_text(await client.call_tool("write_file", bad_mode))
    bad_base64 = {"path": "/tmp/x", "content": "%%%", "encoding": "base64"}
    assert "not valid base64" in error_text(await client.call_tool("write_file", bad_base64))
    # The server took all that in its stride.
    assert structured(await client.call_tool("exec", {"command": "true"}))["exit_code"] == 0


@shared_loop
async def test_run_code_keeps_state(client: Client) -> None:
    first = structured(await client.call_tool("run_code", {"code": "import os\nx = 41\nprint('set')"}))
    assert first["stdout"] == "set\n" and first["error"] is None
    second = structured(await client.call_tool("run_code", {"code": "x + 1"}))
    assert [r["text"] for r in second["results"] if r["is_main_result"]] == ["42"]
    assert second["execution_count"] == first["execution_count"] + 1

    failed = structured(await client.call_tool("run_code", {"code": "1 / 0"}))
    assert failed["error"]["name"] == "ZeroDivisionError" and "division" in failed["error"]["value"]

    other = structured(await client.call_tool("run_code", {"code": "x", "context": "scratch"}))
    assert other["error"]["name"] == "NameError"  # a named context has its own state
    again = structured(await client.call_tool("run_code", {"code": "x = 'mine'; x", "context": "scratch"}))
    assert again["results"][0]["text"] == "'mine'"
    assert structured(await client.call_tool("run_code", {"code": "x"}))["results"][0]["text"] == "41"


@shared_loop
async def test_run_code_images_come_as_image_content(client: Client) -> None:
    png = base64.b64encode(tiny_png()).decode()
    code = f"import base64\nclass Pic:\n    def _repr_png_(self): return base64.b64decode('{png}')\nPic()\n"
    result = await client.call_tool("run_code", {"code": code})
    out = structured(result)
    images = [block for block in result.content if isinstance(block, ImageContent)]
    assert [(i.mime_type, i.data) for i in images] == [("image/png", png)]
    assert set(out["results"][0]["mime_types"]) == {"image/png", "text/plain"}
    assert "image/png" not in out["results"][0]["data"]  # the picture is sent once, as an image


@shared_loop
async def test_a_pool_of_boxes(client: Client) -> None:
    made = structured(await client.call_tool("create_box", {"name": "second"}))
    assert made["name"] == "second" and not made["is_default"]
    await client.call_tool("write_file", {"path": "/tmp/where", "content": "second", "box_id": "second"})
    here = structured(await client.call_tool("exec", {"command": "cat", "args": ["/tmp/where"], "box_id": "second"}))
    assert here["stdout"] == "second"
    default = await client.call_tool("read_file", {"path": "/tmp/where"})
    assert default.is_error  # the default box is another VM
    assert "pool is full" in error_text(await client.call_tool("create_box"))  # --max-boxes 2

    boxes = structured(await client.call_tool("list_boxes"))
    assert sorted(b["name"] or "" for b in boxes["boxes"]) == ["", "second"] and boxes["max_boxes"] == 2
    removed = structured(await client.call_tool("remove_box", {"box_id": made["box_id"][:8]}))
    assert removed == {"box_id": made["box_id"], "removed": True}
    boxes = structured(await client.call_tool("list_boxes"))["boxes"]
    assert [b["is_default"] for b in boxes] == [True]
    assert "no box 'second'" in error_text(await client.call_tool("exec", {"command": "true", "box_id": "second"}))


def test_http_refuses_other_sites(http_server: HttpServer) -> None:
    """On loopback the server turns away requests that name another site (DNS rebinding)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with httpx.Client(timeout=30) as http:
        assert http.post(http_server.url, json=body, headers={**headers, "Host": "evil.example"}).status_code == 421
        origin = {**headers, "Origin": "http://evil.example"}
        assert http.post(http_server.url, json=body, headers=origin).status_code == 403


@shared_loop
async def test_sigterm_stops_every_box(client: Client, http_server: HttpServer) -> None:
    assert [p for p in engine_pids(str(http_server.home)) if pid_alive(p)]  # the default box runs
    http_server.proc.send_signal(signal.SIGTERM)
    assert http_server.proc.wait(timeout=60) == 0, http_server.log.read_text()
    assert_all_gone(http_server.home, within=5)


# ---------------------------------------------------------------------------- stdio


async def test_stdio_server_and_its_end(tmp_path: Path) -> None:
    """The client starts the server; when the client closes its stdin the server stops its
    box and exits."""
    home = tmp_path / "home"
    params = StdioServerParameters(command=sys.executable, args=server_args(home), env=server_env(), cwd=REPO)
    async with Client(params) as stdio:
        assert {tool.name for tool in (await stdio.list_tools()).tools} == TOOLS
        out = structured(await stdio.call_tool("exec", {"command": "sh", "args": ["-c", "echo in the box"]}))
        assert out["stdout"] == "in the box\n"
        structured(await stdio.call_tool("run_code", {"code": "counter = 1"}))
        again = structured(await stdio.call_tool("run_code", {"code": "counter += 1; counter"}))
        assert again["results"][0]["text"] == "2"
        assert "no box" in error_text(await stdio.call_tool("list_files", {"box_id": "missing"}))
        assert [p for p in engine_pids(str(home)) if pid_alive(p)]
    assert_all_gone(home)
