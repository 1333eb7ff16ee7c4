"""A smolagents CodeAgent whose code actions run in a VM (BoxliteExecutor).

    pip install 'boxlite[smolagents]'
    python examples/agents_smolagents.py

A scripted model stands in for an LLM, so the example runs offline; with a real one (any
smolagents model), pass it instead.
"""

import os
from typing import Any

from smolagents import CodeAgent
from smolagents.models import ChatMessage, MessageRole, Model
from smolagents.monitoring import LogLevel

from boxlite.integrations.smolagents import BoxliteExecutor

# A local OCI image layout with python3, so the example runs offline (`make test-images`
# builds one); with a registry at hand, drop rootfs_path and the box uses python:slim.
PYTHON_IMAGE = os.environ.get("BOXLITE_EXAMPLE_PYTHON_IMAGE", "build/test-images/current/python")


class ScriptedModel(Model):
    """Answers each step with the next of the given code actions."""

    def __init__(self, actions: list[str]) -> None:
        super().__init__(model_id="scripted")
        self.actions = iter(actions)

    def generate(self, messages: list[ChatMessage], *args: Any, **kwargs: Any) -> ChatMessage:
        return ChatMessage(
            role=MessageRole.ASSISTANT, content=f"Thought: next step.\n<code>\n{next(self.actions)}\n</code>"
        )


ACTIONS = [
    "import platform\nrelease = platform.release()\nprint('the box runs Linux', release)",
    # The box's interpreter keeps `release` from the step before.
    "final_answer(f'{sum(range(10))}, computed on Linux {release}')",
]


def main() -> None:
    executor = BoxliteExecutor(rootfs_path=PYTHON_IMAGE, timeout=60)
    # Leaving the `with` block stops the executor's box.
    with CodeAgent(tools=[], model=ScriptedModel(ACTIONS), executor=executor, verbosity_level=LogLevel.OFF) as agent:
        answer = agent.run("Add up 0..9 in the sandbox and say where it ran.")
        for step in agent.memory.steps:
            observations = getattr(step, "observations", None)
            if observations:
                print(observations)
    print("answer:", answer)


if __name__ == "__main__":
    main()
