"""An OpenAI Agents SDK SandboxAgent whose tools run in a box.

python examples/agents_openai.py [PYTHON_IMAGE]

The model here is scripted (no network, no API key): it writes a script with the agent's
`apply_patch` tool, runs it with `exec_command`, and answers with what it printed. A real
agent names a model instead (`SandboxAgent(model="gpt-5.4")`) and needs OPENAI_API_KEY; the
sandbox part stays the same. Needs `pip install 'boxlite[openai-agents]'`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from agents import (
    AgentOutputSchemaBase,
    Handoff,
    Model,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    RunConfig,
    Runner,
    Tool,
    TResponseInputItem,
    Usage,
)
from agents.items import TResponseOutputItem, TResponseStreamEvent
from agents.sandbox import SandboxAgent, SandboxRunConfig
from agents.sandbox.snapshot import NoopSnapshotSpec
from openai.types.responses import (
    ResponseCustomToolCall,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)
from openai.types.responses.response_prompt_param import ResponsePromptParam

from boxlite.integrations.openai_agents import BoxliteSandboxClient, BoxliteSandboxClientOptions

# A local OCI image layout with python3, so the example runs offline (`make test-images` builds
# one); with a registry at hand, use BoxliteSandboxClientOptions(image="python:slim").
IMAGE = (
    sys.argv[1]
    if len(sys.argv) > 1
    else os.environ.get("BOXLITE_EXAMPLE_PYTHON_IMAGE", "build/test-images/current/python")
)

HELLO_PATCH = """*** Begin Patch
*** Add File: hello.py
+import os
+print(sum(i * i for i in range(10)), "computed on", os.uname().sysname)
*** End Patch
"""


class ScriptedModel(Model):
    """Stands in for an LLM: each turn prints the tool outputs it was sent and returns the
    next scripted step."""

    def __init__(self, steps: list[list[TResponseOutputItem]]) -> None:
        self.steps = steps
        self.seen: set[str] = set()

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        if not isinstance(input, str):
            for item in input:
                fields: dict[str, Any] = dict(item)  # the whole conversation so far
                is_output = fields.get("type") in ("function_call_output", "custom_tool_call_output")
                if is_output and fields["call_id"] not in self.seen:
                    self.seen.add(fields["call_id"])
                    print(f"--- the model is told ({fields['call_id']}):\n{fields['output']}")
        return ModelResponse(output=self.steps.pop(0), usage=Usage(), response_id=None)

    def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        raise NotImplementedError("this model only answers Runner.run")


def answer(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        type="message",
        id="answer",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


async def main() -> None:
    model = ScriptedModel(
        [
            [ResponseCustomToolCall(type="custom_tool_call", name="apply_patch", input=HELLO_PATCH, call_id="patch")],
            [
                ResponseFunctionToolCall(
                    type="function_call",
                    name="exec_command",
                    # Wait up to 30 s for it to end (a slower command would be left running, and
                    # the model could poll it with `write_stdin`).
                    arguments=json.dumps({"cmd": "python3 hello.py", "yield_time_ms": 30_000}),
                    call_id="run",
                )
            ],
            [answer("hello.py ran in the box and printed 285.")],
        ]
    )
    agent = SandboxAgent(name="coder", instructions="Write and run Python in the workspace.", model=model)

    # One box per sandbox session: made when the run starts, deleted when it ends.
    async with BoxliteSandboxClient() as client:
        config = RunConfig(
            tracing_disabled=True,  # nothing is sent anywhere
            sandbox=SandboxRunConfig(
                client=client,
                options=BoxliteSandboxClientOptions(rootfs_path=IMAGE, memory_mib=512),
                snapshot=NoopSnapshotSpec(),  # no workspace snapshot is kept after the run
            ),
        )
        result = await Runner.run(agent, "Compute the sum of the first ten squares in Python.", run_config=config)
    print("final answer:", result.final_output)


if __name__ == "__main__":
    asyncio.run(main())
