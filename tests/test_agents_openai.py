"""boxlite as the OpenAI Agents SDK's sandbox: a SandboxAgent run by the SDK's own Runner, with a
scripted model (no network, no API key), whose shell and file tools really run in a box.

Effects are checked on both sides: what the model is told (the tool outputs of its next turn)
and what is in the box, read through boxlite itself rather than through the adapter.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from agents import Model, ModelResponse, ModelSettings, RunConfig, Runner, Usage
from agents.sandbox import Manifest, SandboxAgent, SandboxPathGrant, SandboxRunConfig
from agents.sandbox.entries import InContainerMountStrategy, RcloneMountPattern, S3Mount
from agents.sandbox.errors import (
    ExecTimeoutError,
    ExecTransportError,
    InvalidManifestPathError,
    WorkspaceArchiveWriteError,
    WorkspaceReadNotFoundError,
)
from agents.sandbox.manifest import Environment
from agents.sandbox.snapshot import LocalSnapshotSpec, NoopSnapshotSpec
from agents.sandbox.types import User
from openai.types.responses import (
    ResponseCustomToolCall,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

import boxlite
from boxlite.integrations.openai_agents import (
    BoxliteSandboxClient,
    BoxliteSandboxClientOptions,
    BoxliteSandboxSession,
)
from testkit.images import python_layout

REPO = Path(__file__).resolve().parent.parent
Items = list[dict[str, Any]]
Turn = Callable[[Items], Awaitable[list[Any]]]


class ScriptedModel(Model):
    """The SDK's model interface, played from a script: each turn sees what the model was sent
    (so it can check the previous tool outputs) and returns the next output items."""

    def __init__(self, turns: list[Turn]) -> None:
        self.turns = list(turns)

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[Any],
        model_settings: ModelSettings,
        tools: list[Any],
        output_schema: Any,
        handoffs: list[Any],
        tracing: Any,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        assert self.turns, "the model was called more often than scripted"
        items = [{"type": "message", "content": input}] if isinstance(input, str) else list(input)
        output = await self.turns.pop(0)(items)
        return ModelResponse(output=output, usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("this scripted model only answers Runner.run")


def shell(call_id: str, cmd: str, **args: Any) -> ResponseFunctionToolCall:
    arguments = json.dumps({"cmd": cmd, **args})
    return ResponseFunctionToolCall(type="function_call", name="exec_command", arguments=arguments, call_id=call_id)


def function(call_id: str, name: str, **args: Any) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(type="function_call", name=name, arguments=json.dumps(args), call_id=call_id)


def patch(call_id: str, text: str) -> ResponseCustomToolCall:
    return ResponseCustomToolCall(type="custom_tool_call", name="apply_patch", input=text, call_id=call_id)


def say(text: str) -> ResponseOutputMessage:
    content = [ResponseOutputText(type="output_text", text=text, annotations=[])]
    return ResponseOutputMessage(type="message", id="msg", role="assistant", status="completed", content=content)


def output_of(items: Items, call_id: str) -> Any:
    """The output the model received for its tool call ``call_id``."""
    for item in items:
        if item.get("type") in ("function_call_output", "custom_tool_call_output") and item["call_id"] == call_id:
            return item["output"]
    raise AssertionError(f"no output for {call_id} in {items}")


def text_of(items: Items, call_id: str) -> str:
    output = output_of(items, call_id)
    assert isinstance(output, str), output
    return output


async def only_box(runtime: boxlite.Boxlite) -> boxlite.Box:
    """The one box of the runtime: the session's, found through boxlite alone."""
    infos = await runtime.list_info()
    assert len(infos) == 1, infos
    assert (infos[0].name or "").startswith("openai-agents-")
    box = await runtime.get(infos[0].id)
    assert box is not None
    return box


def options(**extra: Any) -> BoxliteSandboxClientOptions:
    return BoxliteSandboxClientOptions(**{"rootfs_path": str(python_layout()), "memory_mib": 512, **extra})


# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


async def test_runner_drives_shell_files_and_a_terminal_in_the_box(runtime: boxlite.Boxlite, tmp_path: Path) -> None:
    async def run_shell(items: Items) -> list[Any]:
        return [shell("c1", "echo made-by-shell > shell.txt && pwd && head -1 /etc/os-release")]

    async def create_file(items: Items) -> list[Any]:
        out = text_of(items, "c1")
        assert "Process exited with code 0" in out, out
        assert "/workspace" in out and "boxlite slim stand-in (Debian)" in out, out  # the box's OS
        box = await only_box(runtime)
        assert await box.read_file("/workspace/shell.txt") == b"made-by-shell\n"
        return [
            patch("c2", "*** Begin Patch\n*** Add File: notes/todo.md\n+- boot a box\n+- run a tool\n*** End Patch\n")
        ]

    async def update_file(items: Items) -> list[Any]:
        assert text_of(items, "c2") == "Created notes/todo.md"
        box = await only_box(runtime)
        # (the SDK's patch editor writes the lines without a final newline)
        assert await box.read_file("/workspace/notes/todo.md") == b"- boot a box\n- run a tool"
        await box.exec("chmod", ["755", "/workspace/notes/todo.md"])
        await box.write_file("/workspace/pic.png", PNG)  # for view_image, below
        update = (
            "*** Begin Patch\n*** Update File: notes/todo.md\n@@\n-- run a tool\n+- run a tool: done\n*** End Patch\n"
        )
        return [patch("c3", update)]

    async def read_back(items: Items) -> list[Any]:
        assert text_of(items, "c3") == "Updated notes/todo.md"
        return [shell("c4", "cat notes/todo.md; echo; stat -c %a notes/todo.md")]

    async def view_image(items: Items) -> list[Any]:
        out = text_of(items, "c4")
        assert "- boot a box\n- run a tool: done\n755" in out, out  # the patch kept the file's mode
        return [function("c5", "view_image", path="pic.png")]

    async def start_interactive(items: Items) -> list[Any]:
        image = output_of(items, "c5")
        image_url = image[0]["image_url"] if isinstance(image, list) else image["image_url"]
        assert image_url == "data:image/png;base64," + base64.b64encode(PNG).decode()
        return [shell("c6", "read name; echo hello $name", tty=True, yield_time_ms=500)]

    async def answer_it(items: Items) -> list[Any]:
        out = text_of(items, "c6")
        running = re.search(r"Process running with session ID (\d+)", out)
        assert running, out
        return [
            function("c7", "write_stdin", session_id=int(running.group(1)), chars="boxlite\n", yield_time_ms=30_000)
        ]

    async def finish(items: Items) -> list[Any]:
        out = text_of(items, "c7")
        assert "hello boxlite" in out and "Process exited with code 0" in out, out
        return [say("all done")]

    model = ScriptedModel(
        [run_shell, create_file, update_file, read_back, view_image, start_interactive, answer_it, finish]
    )
    agent = SandboxAgent(name="worker", instructions="Work in the box.", model=model)
    async with BoxliteSandboxClient(runtime) as client:
        config = RunConfig(
            tracing_disabled=True,
            sandbox=SandboxRunConfig(
                client=client, options=options(), snapshot=LocalSnapshotSpec(base_path=tmp_path / "snapshots")
            ),
        )
        result = await Runner.run(agent, "Do the chores.", run_config=config)
    assert result.final_output == "all done"
    assert not model.turns
    # The Runner's cleanup snapshotted the workspace (as a tar relative to the root) and
    # deleted the box.
    assert await runtime.list_info() == []
    (snapshot,) = (tmp_path / "snapshots").iterdir()
    listing = subprocess.run(["tar", "-tf", snapshot], capture_output=True, text=True, check=True).stdout
    assert "./notes/todo.md" in listing.split()


async def test_failures_are_results_and_long_commands_keep_running(runtime: boxlite.Boxlite) -> None:
    async def fail(items: Items) -> list[Any]:
        return [shell("c1", "echo oops >&2; exit 3")]

    async def missing_shell(items: Items) -> list[Any]:
        out = text_of(items, "c1")
        assert "Process exited with code 3" in out and "oops" in out, out
        return [shell("c2", "true", shell="/no/such/shell")]

    async def long_command(items: Items) -> list[Any]:
        out = text_of(items, "c2")
        assert "Process exited with code 127" in out and "cannot start" in out, out  # boxlite's reason
        return [shell("c3", "echo started; sleep 60", yield_time_ms=300)]

    session_id = 0

    async def type_into_it(items: Items) -> list[Any]:
        nonlocal session_id
        out = text_of(items, "c3")
        running = re.search(r"Process running with session ID (\d+)", out)  # past its yield, not killed
        assert running, out
        session_id = int(running.group(1))
        return [function("c4", "write_stdin", session_id=session_id, chars="hi\n")]

    async def poll(items: Items) -> list[Any]:
        out = text_of(items, "c4")
        assert "stdin is not available" in out and "tty=true" in out, out  # no terminal, no input
        return [function("c5", "write_stdin", session_id=session_id, chars="")]

    async def finish(items: Items) -> list[Any]:
        out = text_of(items, "c5")
        assert "Process running with session ID" in out, out
        assert "started" in text_of(items, "c3") + out  # by its yield time, or by the poll
        return [say("ok")]

    model = ScriptedModel([fail, missing_shell, long_command, type_into_it, poll, finish])
    agent = SandboxAgent(name="worker", model=model)
    async with BoxliteSandboxClient(runtime) as client:
        sandbox = SandboxRunConfig(client=client, options=options(), snapshot=NoopSnapshotSpec())
        result = await Runner.run(agent, "Try things.", run_config=RunConfig(tracing_disabled=True, sandbox=sandbox))
        assert result.final_output == "ok"
    # The still running `sleep` was killed at cleanup and the box removed.
    assert await runtime.list_info() == []


async def test_snapshot_restores_the_workspace_into_a_new_box(runtime: boxlite.Boxlite, tmp_path: Path) -> None:
    async with BoxliteSandboxClient(runtime) as client:
        session = await client.create(
            options=options(), snapshot=LocalSnapshotSpec(base_path=tmp_path), manifest=Manifest()
        )
        await session.start()
        await session.write(Path("src/main.py"), io.BytesIO(b"print('kept')\n"))
        await session.write(Path("cache/blob"), io.BytesIO(b"left out"))
        session.register_persist_workspace_skip_path("cache")
        assert (await session.exec("mkdir -p /opt/tool && echo installed > /opt/tool/marker")).exit_code == 0
        first_box = session.state.box_id
        await session.aclose()  # snapshot, then stop: the box is deleted with its stop
        assert await runtime.get(first_box) is None
        with pytest.raises(ExecTransportError) as failed:
            await session.exec("true")
        assert isinstance(failed.value.cause, boxlite.BoxliteError)

        state = client.deserialize_session_state(json.loads(json.dumps(client.serialize_session_state(session.state))))
        resumed = await client.resume(state)
        await resumed.start()
        box = await only_box(runtime)
        assert box.id != first_box
        assert await box.read_file("/workspace/src/main.py") == b"print('kept')\n"
        assert await box.list_dir("/workspace") == ["src"]  # the skipped path is not in the snapshot
        # Only the workspace is in the snapshot.
        assert (await resumed.exec("test -e /opt/tool/marker")).exit_code == 1
        result = await resumed.exec("python3 src/main.py")
        assert (result.exit_code, result.stdout) == (0, b"kept\n")
    # Closing the client removed the box of the session nobody deleted.
    assert await runtime.list_info() == []


async def test_keep_box_resumes_the_same_box(runtime: boxlite.Boxlite) -> None:
    async with BoxliteSandboxClient(runtime) as client:
        session = await client.create(options=options(keep_box=True))
        await session.start()
        made = await session.exec("mkdir -p /opt && echo installed > /opt/marker && echo work > notes.txt")
        assert made.exit_code == 0, made.stderr
        await session.aclose()
        info = await runtime.get_info(session.state.box_id)
        assert info is not None and info.status == "stopped"

        resumed = await client.resume(session.state)
        await resumed.start()
        assert resumed.state.box_id == session.state.box_id
        inner = resumed._inner
        assert isinstance(inner, BoxliteSandboxSession) and inner.box.info().running
        assert (await resumed.read(Path("notes.txt"))).read() == b"work\n"
        assert await inner.box.read_file("/opt/marker") == b"installed\n"  # the whole disk was kept
        with pytest.raises(WorkspaceReadNotFoundError):
            await resumed.read(Path("missing.txt"))
        assert (await resumed.exec("ln -s /etc/passwd leak")).exit_code == 0
        with pytest.raises(InvalidManifestPathError):  # the link leads out of the workspace
            await resumed.read(Path("leak"))
        with pytest.raises(ExecTimeoutError):
            await resumed.exec("sleep 30", timeout=1)
        # An archive that would write outside the workspace is refused before it reaches the box.
        evil = io.BytesIO()
        with tarfile.open(fileobj=evil, mode="w") as tar:
            member = tarfile.TarInfo("../escaped")
            member.size = 3
            tar.addfile(member, io.BytesIO(b"bad"))
        evil.seek(0)
        with pytest.raises(WorkspaceArchiveWriteError):
            await resumed.hydrate_workspace(evil)
        assert (await resumed.exec("test -e /escaped")).exit_code == 1
        # Another user, started so by boxlite (the image has no sudo).
        assert (await resumed.exec("id -un", user="nobody")).stdout == b"nobody\n"
        assert (await resumed.read(Path("notes.txt"), user=User(name="nobody"))).read() == b"work\n"
        await client.delete(resumed)
        assert await runtime.get_info(session.state.box_id) is None


async def test_volumes_path_grants_env_and_ports(runtime: boxlite.Boxlite, tmp_path: Path) -> None:
    shared, reference = tmp_path / "shared", tmp_path / "reference"
    shared.mkdir(mode=0o777)
    reference.mkdir()
    (reference / "data.txt").write_text("reference data\n")
    manifest = Manifest(
        environment=Environment(value={"GREETING": "from the manifest"}),
        extra_path_grants=(SandboxPathGrant(path="/ref", host_path=str(reference), read_only=True),),
    )
    client = BoxliteSandboxClient(runtime)
    session = await client.create(
        manifest=manifest,
        options=options(volumes=[(shared, "/shared")], env={"BOX_ENV": "from the options"}, exposed_ports=(8000,)),
    )
    async with client, session:
        inner = session._inner
        assert isinstance(inner, BoxliteSandboxSession) and inner.box.info().memory_mib == 512
        result = await session.exec('echo "$GREETING, $BOX_ENV" > /shared/out.txt && cat /ref/data.txt')
        assert result.stdout == b"reference data\n"
        assert (shared / "out.txt").read_text() == "from the manifest, from the options\n"
        assert (await session.exec("echo x > /ref/data.txt")).exit_code != 0  # read-only grant

        await session.write(Path("site/index.html"), io.BytesIO(b"served from the box\n"))
        server = await session.pty_exec_start("python3 -m http.server 8000 --directory site", yield_time_s=0.5)
        assert server.process_id is not None
        endpoint = await session.resolve_exposed_port(8000)
        assert endpoint.host == "127.0.0.1" and endpoint.port > 0

        def fetch() -> bytes:
            for _ in range(120):
                try:
                    with urllib.request.urlopen(f"http://{endpoint.host}:{endpoint.port}/index.html", timeout=5) as r:
                        body: bytes = r.read()
                        return body
                except OSError:
                    time.sleep(0.5)
            raise AssertionError("the server in the box never answered")

        assert await asyncio.to_thread(fetch) == b"served from the box\n"
    assert await runtime.list_info() == []


async def test_what_boxlite_cannot_do_is_refused_before_a_box_is_made(runtime: boxlite.Boxlite, tmp_path: Path) -> None:
    client = BoxliteSandboxClient(runtime)
    mount = S3Mount(bucket="b", mount_strategy=InContainerMountStrategy(pattern=RcloneMountPattern()))
    with pytest.raises(boxlite.UnsupportedError, match="storage mounts are not supported"):
        await client.create(manifest=Manifest(entries={"data": mount}), options=options())
    with pytest.raises(boxlite.InvalidArgumentError, match="overlaps the workspace root"):
        await client.create(options=options(volumes=[(tmp_path, "/workspace/project")]))
    with pytest.raises(boxlite.InvalidArgumentError, match="memory"):
        await client.create(options=options(memory_mib=1))
    with pytest.raises(boxlite.InvalidArgumentError, match="allow_net"):
        await client.create(options=options(network="disabled", allow_net=["pypi.org"]))
    with pytest.raises(ValueError, match="unknown volume keys"):
        options(volumes=[{"host_path": str(tmp_path), "target": "/data"}])
    with pytest.raises(ValueError, match="extra"):
        BoxliteSandboxClientOptions(imgae="python:slim")  # type: ignore[call-arg]
    assert await runtime.list_info() == []


def test_import_boxlite_loads_no_adapter() -> None:
    code = "import boxlite, sys; assert not any(m.startswith('boxlite.integrations') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
