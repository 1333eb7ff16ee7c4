"""LangChain tools backed by a box: a chat model's tool calls run Python, shell commands and
file operations in a VM.

    pip install 'boxlite[langchain]'
    python examples/agents_langchain.py

A scripted chat model stands in for an LLM, so the example runs offline; with a real one
(any LangChain chat model with tool calling), the loop below stays the same.
"""

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

import boxlite
from boxlite.integrations.langchain import boxlite_tools

# A local OCI image layout with python3, so the example runs offline (`make test-images`
# builds one); with a registry at hand, drop rootfs_path and CodeBox uses python:slim.
PYTHON_IMAGE = os.environ.get("BOXLITE_EXAMPLE_PYTHON_IMAGE", "build/test-images/current/python")


class ScriptedChatModel(GenericFakeChatModel):
    """Replays the given messages; binds tools as a real model would (their JSON schemas)."""

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)


def calls(*steps: tuple[str, dict[str, Any]]) -> AIMessage:
    return AIMessage(
        content="", tool_calls=[{"name": n, "args": a, "id": f"{n}-{i}"} for i, (n, a) in enumerate(steps)]
    )


SCRIPT = [
    calls(("run_python", {"code": "data = [3, 1, 2]\nsorted(data)"})),
    # The interpreter keeps its state: `data` is still there.
    calls(("run_python", {"code": "print('sum times seven:', sum(data) * 7)"})),
    calls(("run_shell", {"command": "echo hello from $(uname -s)"})),
    calls(("write_file", {"path": "/tmp/notes.txt", "content": "kept in the box"}), ("list_files", {"path": "/tmp"})),
    calls(("read_file", {"path": "/tmp/notes.txt"})),
    AIMessage(content="All done."),
]


async def main() -> None:
    async with boxlite.CodeBox(rootfs_path=PYTHON_IMAGE) as codebox:
        tools = {tool.name: tool for tool in boxlite_tools(codebox, timeout=60)}
        model = ScriptedChatModel(messages=iter(SCRIPT)).bind_tools(list(tools.values()))
        messages: list[BaseMessage] = [HumanMessage("Show what the sandbox can do.")]
        while True:
            reply = await model.ainvoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                result = await tools[call["name"]].ainvoke(call)  # a ToolMessage
                messages.append(result)
                print(f"{call['name']} -> {result.content}")
        print("model:", reply.content)

        # Each tool also works on its own, blocking or not.
        print(tools["run_python"].invoke({"code": "len(data)"}))


if __name__ == "__main__":
    asyncio.run(main())
