"""The smolagents executor (boxlite.integrations.smolagents): a CodeAgent driven by a scripted
model runs its code actions in a VM, through smolagents' own agent loop, to a final answer
only the VM could have computed."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("smolagents")

from smolagents import CodeAgent, tool
from smolagents.models import ChatMessage, MessageRole, Model
from smolagents.monitoring import LogLevel, TokenUsage
from smolagents.utils import AgentError

import boxlite
from boxlite.integrations.smolagents import BoxliteExecutor
from boxlite.sync import SyncCodeBox
from testkit.images import python_layout

# A 1x1 PNG, for a rich result.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


class ScriptedModel(Model):
    """Answers each step with the next scripted code action; a step may first look at what
    the agent showed it (the observations of earlier steps)."""

    def __init__(self, steps: list[Callable[[str], str]]) -> None:
        super().__init__(model_id="scripted")
        self.steps = steps
        self.prompts: list[str] = []

    def generate(self, messages: list[ChatMessage], *args: Any, **kwargs: Any) -> ChatMessage:
        prompt = "\n".join(_text(message) for message in messages)
        self.prompts.append(prompt)
        code = self.steps[len(self.prompts) - 1](prompt)
        return ChatMessage(
            role=MessageRole.ASSISTANT,
            content=f"Thought: step {len(self.prompts)}\n<code>\n{code}\n</code>",
            token_usage=TokenUsage(input_tokens=0, output_tokens=0),
        )


def _text(message: Any) -> str:
    content = message.content if isinstance(message, ChatMessage) else message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content or [])


@tool
def shout(text: str) -> str:
    """Upper-cases a text.

    Args:
        text: what to upper-case
    """
    return text.upper()


@pytest.fixture(scope="module")
def codebox(sync_codebox: SyncCodeBox) -> SyncCodeBox:
    return sync_codebox


def test_agent_reaches_a_final_answer_computed_in_the_vm(codebox: SyncCodeBox) -> None:
    kernel = codebox.exec("uname", "-r").stdout.strip()
    assert kernel and kernel != platform.release()  # the guest's kernel, not the host's
    # No numpy in the box (nor a network to fetch it): the final-answer tool works without it.
    assert codebox.exec("python3", "-c", "import numpy").exit_code == 1

    def fail(prompt: str) -> str:
        assert f"kernel {kernel}" in prompt  # the first step's output came back to the model
        return "1 / 0"

    def recover(prompt: str) -> str:
        assert "ZeroDivisionError" in prompt  # and so did the failed step's error
        return "final_answer(f'{release} {n * 2}')"

    model = ScriptedModel(
        [
            # `shout` is a tool sent into the box; `release` lives on in its interpreter.
            lambda prompt: (
                "import platform\n"
                "release = platform.release()\n"
                "print('kernel', release)\n"
                "with open('/tmp/agent.txt', 'w') as f:\n"
                "    f.write(shout(release))"
            ),
            fail,
            recover,
        ]
    )
    executor = BoxliteExecutor(codebox=codebox)
    agent = CodeAgent(tools=[shout], model=model, executor=executor, max_steps=5, verbosity_level=LogLevel.OFF)
    answer = agent.run("Which kernel does the sandbox run?", additional_args={"n": 7})

    assert answer == f"{kernel} 14"
    assert len(model.prompts) == 3
    assert codebox.read_file("/tmp/agent.txt").decode() == kernel.upper()
    steps = [step for step in agent.memory.steps if hasattr(step, "code_action")]
    assert steps[1].error is not None and "ZeroDivisionError" in str(steps[1].error)
    assert steps[2].is_final_answer
    agent.cleanup()
    assert codebox.exec("true").exit_code == 0  # a box of the caller's stays up


def test_executor_with_a_box_of_its_own(shared_runtime: boxlite.Boxlite) -> None:
    executor = BoxliteExecutor(
        ["json", "collections.abc", "*"],
        rootfs_path=python_layout(),
        runtime=shared_runtime,
        cpus=1,
        memory_mib=512,
        timeout=3,
    )
    box_id = executor.codebox.id
    with CodeAgent(tools=[], model=ScriptedModel([]), executor=executor, verbosity_level=LogLevel.OFF):
        # Importable already: nothing to pip install.
        assert executor.installed_packages == ["collections", "json"]
        out = executor("x = 21\nprint('doubling')\nx * 2")
        assert (out.output, out.logs, out.is_final_answer) == ("42", "doubling\n", False)
        image = executor(
            f"import base64\nclass Pixel:\n    def _repr_png_(self): return base64.b64decode({PIXEL!r})\nPixel()"
        ).output
        assert image.size == (1, 1)
        with pytest.raises(AgentError, match="ran longer than 3 s"):
            executor("while True: pass")
        assert executor("x").output == "21"  # interrupted, not restarted
        with pytest.raises(AgentError, match=r"(?s)raised NameError: name 'nope' is not defined.*line 1"):
            executor("nope")
    # The agent's `with` cleaned up: the executor's box is gone.
    assert asyncio.run(shared_runtime.get_info(box_id)) is None


def test_bad_arguments_are_refused_before_a_box_starts() -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=r"expected a boxlite\.CodeBox or SyncCodeBox, got str"):
        BoxliteExecutor(codebox="box")  # type: ignore[arg-type]
    with pytest.raises(boxlite.InvalidArgumentError, match=r"no box to go to: \['image'\]"):
        BoxliteExecutor(codebox=boxlite.CodeBox(rootfs_path=python_layout()), image="python:slim")
