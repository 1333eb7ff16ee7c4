"""The LangChain tools (boxlite.integrations.langchain) in a real tool-calling loop: a scripted
chat model bound to the tools asks for calls, langchain-core runs them into ToolMessages, and
what the tools did is checked in the VM."""

from __future__ import annotations

import asyncio
import base64
import platform
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

import boxlite
from boxlite.integrations.langchain import BoxlitePythonTool, boxlite_tools
from boxlite.sync import SyncCodeBox
from testkit.images import python_layout

Turn = Callable[[list[BaseMessage]], AIMessage]


class ScriptedChatModel(BaseChatModel):
    """A chat model whose answers are scripted turns; each turn sees the conversation so far
    (the tools' results included). It refuses to call a tool it was not bound to."""

    turns: list[Any]
    conversations: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        offered = {tool["function"]["name"] for tool in kwargs.get("tools", [])}
        self.conversations.append(list(messages))
        message = self.turns[len(self.conversations) - 1](messages)
        for call in message.tool_calls:
            assert call["name"] in offered, f"{call['name']} was not bound"
        return ChatResult(generations=[ChatGeneration(message=message)])


def call(name: str, **args: Any) -> Turn:
    return lambda messages: AIMessage(
        content="", tool_calls=[{"name": name, "args": args, "id": f"call-{len(messages)}"}]
    )


def last_tool_output(messages: list[BaseMessage]) -> str:
    message = messages[-1]
    assert isinstance(message, ToolMessage)
    return str(message.content)


def run_agent(model: ScriptedChatModel, tools: list[BaseTool], task: str) -> list[BaseMessage]:
    """The classic loop: the model asks for tool calls, each tool answers with a ToolMessage."""
    by_name = {tool.name: tool for tool in tools}
    bound = model.bind_tools(tools)
    messages: list[BaseMessage] = [HumanMessage(task)]
    while True:
        reply = bound.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        messages.extend(by_name[c["name"]].invoke(c) for c in reply.tool_calls)


async def arun_agent(model: ScriptedChatModel, tools: list[BaseTool], task: str) -> list[BaseMessage]:
    by_name = {tool.name: tool for tool in tools}
    bound = model.bind_tools(tools)
    messages: list[BaseMessage] = [HumanMessage(task)]
    while True:
        reply = await bound.ainvoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        messages.extend(await asyncio.gather(*(by_name[c["name"]].ainvoke(c) for c in reply.tool_calls)))


@pytest.fixture(scope="module")
def codebox(sync_codebox: SyncCodeBox) -> SyncCodeBox:
    return sync_codebox


def test_sync_loop_does_its_work_in_the_vm(codebox: SyncCodeBox) -> None:
    kernel = codebox.exec("uname", "-r").stdout.strip()
    assert kernel and kernel != platform.release()  # the guest's kernel, not the host's
    model = ScriptedChatModel(
        turns=[
            call("run_python", code="import platform\nrelease = platform.release()\nrelease"),
            # The next cell uses the variable of the previous one: one interpreter.
            call("run_python", code="open('/tmp/release.txt', 'w').write(release.upper())"),
            call("run_shell", command="mkdir -p /srv/out && wc -c < /tmp/release.txt > /srv/out/size"),
            call("write_file", path="/srv/out/note.md", content="# notes\nkernel seen\n"),
            call("list_files", path="/srv/out"),
            call("read_file", path="/tmp/release.txt"),
            lambda messages: AIMessage(content=f"the sandbox runs {last_tool_output(messages)}"),
        ]
    )
    messages = run_agent(model, boxlite_tools(codebox), "Which kernel does the sandbox run?")

    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.name for m in tool_messages] == [
        "run_python",
        "run_python",
        "run_shell",
        "write_file",
        "list_files",
        "read_file",
    ]
    assert all(m.status == "success" for m in tool_messages)
    assert tool_messages[0].content == f"result: {kernel!r}"
    assert tool_messages[0].artifact["results"][0]["data"]["text/plain"] == repr(kernel)
    assert tool_messages[2].content == "exit code 0"
    assert tool_messages[4].content == "note.md\nsize"
    # The model saw every tool's answer; its last word came from the VM.
    assert model.conversations[-1][-1] == tool_messages[-1]
    assert messages[-1].content == f"the sandbox runs {kernel.upper()}"
    assert codebox.read_file("/tmp/release.txt").decode() == kernel.upper()
    assert codebox.read_file("/srv/out/size").decode().strip() == str(len(kernel))
    assert codebox.read_file("/srv/out/note.md") == b"# notes\nkernel seen\n"


def test_failures_reach_the_model_as_text(codebox: SyncCodeBox) -> None:
    model = ScriptedChatModel(
        turns=[
            call("run_python", code="print('before')\n1 / 0"),
            call("run_shell", command="echo out; echo err >&2; exit 3"),
            call("read_file", path="/no/such/file"),
            call("run_python", code="import time\nwhile True: time.sleep(0.1)"),
            call("run_shell", command="sleep 60"),
            lambda messages: AIMessage(content="done"),
        ]
    )
    tools = boxlite_tools(codebox, timeout=5)
    tool_messages = [m for m in run_agent(model, tools, "fail") if isinstance(m, ToolMessage)]

    code_error, shell, missing, endless, sleepy = tool_messages
    assert code_error.status == "success"  # an exception in the code is the code's output
    assert str(code_error.content).startswith("before\n")
    assert "ZeroDivisionError: division by zero" in str(code_error.content)
    assert code_error.artifact["error"]["name"] == "ZeroDivisionError"
    assert shell.content == "exit code 3\nout\nstderr:\nerr"
    assert missing.status == "error"  # the box failed: a ToolException, shown to the model
    assert "/no/such/file: No such file or directory" in str(missing.content)
    assert "timed out after 5" in str(endless.content)  # the code ran past its time: output
    assert endless.artifact["timed_out"] is True
    assert sleepy.status == "error"  # the command was killed: the box's failure
    assert "timed out after 5s" in str(sleepy.content)
    # The interpreter survived the interrupted run.
    assert tools[0].invoke({"code": "6 * 7"}) == "result: 42"


def test_tools_insist_on_a_codebox() -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=r"expected a boxlite\.CodeBox"):
        boxlite_tools(object())  # type: ignore[arg-type]
    with pytest.raises(boxlite.InvalidArgumentError, match="got str"):
        BoxlitePythonTool(box="a box")  # type: ignore[arg-type]


async def test_async_loop_with_an_async_codebox(shared_runtime: boxlite.Boxlite) -> None:
    async with boxlite.CodeBox(rootfs_path=python_layout(), runtime=shared_runtime, cpus=1, memory_mib=512) as codebox:
        model = ScriptedChatModel(
            turns=[
                call("run_python", code="total = sum(range(10))\nprint('total is', total)\ndisplay({'total': total})"),
                # Two calls in one turn, run concurrently by the loop.
                lambda messages: AIMessage(
                    content="",
                    tool_calls=[
                        {"name": "run_python", "args": {"code": "total * 2"}, "id": "a"},
                        {"name": "write_file", "args": {"path": "/tmp/answer", "content": "45"}, "id": "b"},
                    ],
                ),
                call("run_shell", command="cat /tmp/answer"),
                lambda messages: AIMessage(content=last_tool_output(messages)),
            ]
        )
        messages = await arun_agent(model, boxlite_tools(codebox), "add up")
        tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
        assert tool_messages[0].content == "total is 45\ndisplay: {'total': 45}"
        assert {(m.tool_call_id, m.content) for m in tool_messages[1:3]} == {
            ("a", "result: 90"),
            ("b", "wrote 2 bytes to /tmp/answer"),
        }
        assert messages[-1].content == "exit code 0\n45"
        assert await codebox.read_file("/tmp/answer") == b"45"
        # A rich result: the model reads its text and formats, the artifact has the image.
        pixel = await boxlite_tools(codebox)[0].ainvoke(
            {
                "name": "run_python",
                "args": {"code": "class Pixel:\n    def _repr_png_(self): return b'PNG bytes'\nPixel()"},
                "id": "p",
                "type": "tool_call",
            }
        )
        assert re.fullmatch(r"result: <__main__\.Pixel object at 0x[0-9a-f]+> \[png\]", pixel.content)
        assert pixel.artifact["results"][0]["data"]["image/png"] == base64.b64encode(b"PNG bytes").decode()
        # A blocking invoke of the same async box works too (from a worker thread here).
        assert await asyncio.to_thread(boxlite_tools(codebox)[0].invoke, {"code": "total"}) == "result: 45"
