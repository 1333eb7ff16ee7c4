"""LangChain tools backed by a box: run Python (stateful), run shell commands, read, write
and list files.

>>> from boxlite.integrations.langchain import boxlite_tools
>>> async with boxlite.CodeBox() as codebox:
...     tools = boxlite_tools(codebox)            # bind them to a chat model
...     await tools[0].ainvoke({"code": "x = 6 * 7"})
...     await tools[0].ainvoke({"code": "x"})     # 'result: 42'

Every tool works with ``invoke`` and ``ainvoke``. It takes a ``CodeBox`` or a
``boxlite.sync.SyncCodeBox``; the box is the caller's to start and stop. Failures of the box
(a missing file, a timeout) become ``ToolException`` (shown to the model, as
``handle_tool_error=True``), a Python exception in the code is part of the output.
Needs ``pip install 'boxlite[langchain]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

from .. import sync as _sync
from ..errors import BoxliteError, ExecTimeoutError, InvalidArgumentError
from ..simplebox import CodeBox
from ..sync import SyncCodeBox

__all__ = [
    "BoxliteListFilesTool",
    "BoxlitePythonTool",
    "BoxliteReadFileTool",
    "BoxliteShellTool",
    "BoxliteWriteFileTool",
    "boxlite_tools",
]

#: Longest text a tool hands back to the model; the rest is cut (the model's context is finite).
MAX_OUTPUT_CHARS = 20_000


def _async_box(box: object) -> CodeBox:
    if isinstance(box, SyncCodeBox):
        return box._inner
    if isinstance(box, CodeBox):
        return box
    raise InvalidArgumentError(f"box: expected a boxlite.CodeBox or boxlite.sync.SyncCodeBox, got {type(box).__name__}")


def _clip(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters cut]"


class _BoxTool(BaseTool):
    """A tool that acts on a box; subclasses write ``_act`` once, for both invoke paths."""

    box: Any = Field(exclude=True)
    timeout: float | None = None
    """Seconds a code run or command may take (None: no limit)."""
    handle_tool_error: bool | str | Callable[[ToolException], Any] | None = True

    def __init__(self, box: CodeBox | SyncCodeBox, **kwargs: Any) -> None:
        _async_box(box)  # a clear error before pydantic's
        super().__init__(box=box, **kwargs)

    async def _act(self, codebox: CodeBox, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def _guarded(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._act(_async_box(self.box), *args, **kwargs)
        except ExecTimeoutError as e:
            raise ToolException(f"timed out: {e}") from e
        except BoxliteError as e:
            raise ToolException(f"{type(e).__name__}: {e}") from e

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        # The box's interpreter answers from any loop; blocking callers use the sync API's.
        return _sync._run(self._guarded(*args, **kwargs))

    async def _arun(self, *args: Any, **kwargs: Any) -> Any:
        return await self._guarded(*args, **kwargs)


class PythonInput(BaseModel):
    code: str = Field(description="Python source to run; variables and imports persist between calls")


class BoxlitePythonTool(_BoxTool):
    """Runs Python in the box's interpreter (state persists between calls). The message is the
    output as text; the artifact is ``CodeExecution.to_dict()`` (rich results such as images)."""

    name: str = "run_python"
    description: str = (
        "Run Python code in an isolated sandbox VM. State (variables, imports) persists between calls. "
        "Returns stdout, stderr, the value of the last expression and any error with its traceback."
    )
    args_schema: type[BaseModel] = PythonInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"

    async def _act(self, codebox: CodeBox, code: str) -> tuple[str, dict[str, Any]]:
        execution = await codebox.run_code(code, timeout=self.timeout)
        parts = []
        if execution.stdout:
            parts.append(execution.stdout.rstrip("\n"))
        if execution.stderr:
            parts.append("stderr:\n" + execution.stderr.rstrip("\n"))
        for result in execution.results:
            # Rich formats (images, html...) go to the artifact; the model reads their names.
            shown = result.text or ""
            rich = [name for name in result.formats() if name != "text"]
            if rich:
                shown += f" [{', '.join(rich)}]"
            parts.append(f"{'result' if result.is_main_result else 'display'}: {shown.strip()}")
        if execution.timed_out:
            parts.append(f"timed out after {self.timeout:g} s" if self.timeout is not None else "timed out")
        if execution.context_restarted:
            parts.append("the interpreter was restarted: earlier variables and imports are gone")
        if execution.error is not None:
            parts.append(execution.error.traceback or f"{execution.error.name}: {execution.error.value}")
        return _clip("\n".join(parts) or "(no output)"), execution.to_dict()


class ShellInput(BaseModel):
    command: str = Field(description="A shell command line, run with `sh -c`")


class BoxliteShellTool(_BoxTool):
    """Runs a shell command line in the box (``sh -c``) and reports its exit code and output."""

    name: str = "run_shell"
    description: str = (
        "Run a shell command in an isolated sandbox VM (with `sh -c`). Returns the exit code, stdout and stderr."
    )
    args_schema: type[BaseModel] = ShellInput

    async def _act(self, codebox: CodeBox, command: str) -> str:
        result = await codebox.exec("sh", "-c", command, timeout=self.timeout)
        parts = [f"exit code {result.exit_code}"]
        if result.stdout:
            parts.append(result.stdout.rstrip("\n"))
        if result.stderr:
            parts.append("stderr:\n" + result.stderr.rstrip("\n"))
        return _clip("\n".join(parts))


class PathInput(BaseModel):
    path: str = Field(description="An absolute path in the sandbox")


class BoxliteReadFileTool(_BoxTool):
    """Reads a text file of the box."""

    name: str = "read_file"
    description: str = "Read a UTF-8 text file from the sandbox VM."
    args_schema: type[BaseModel] = PathInput

    async def _act(self, codebox: CodeBox, path: str) -> str:
        data = await codebox.read_file(path)
        try:
            return _clip(data.decode())
        except UnicodeDecodeError:
            raise ToolException(f"{path} is not UTF-8 text ({len(data)} bytes)") from None


class WriteInput(BaseModel):
    path: str = Field(description="An absolute path in the sandbox")
    content: str = Field(description="The whole new content of the file (UTF-8 text)")


class BoxliteWriteFileTool(_BoxTool):
    """Writes (creates or replaces) a text file of the box."""

    name: str = "write_file"
    description: str = "Create or overwrite a text file in the sandbox VM."
    args_schema: type[BaseModel] = WriteInput

    async def _act(self, codebox: CodeBox, path: str, content: str) -> str:
        data = content.encode()
        await codebox.write_file(path, data)
        return f"wrote {len(data)} bytes to {path}"


class ListInput(BaseModel):
    path: str = Field(default="/", description="An absolute directory path in the sandbox")


class BoxliteListFilesTool(_BoxTool):
    """Lists a directory of the box."""

    name: str = "list_files"
    description: str = "List the entries of a directory in the sandbox VM, one per line."
    args_schema: type[BaseModel] = ListInput

    async def _act(self, codebox: CodeBox, path: str = "/") -> str:
        names = await codebox.list_dir(path)
        return _clip("\n".join(sorted(names))) if names else f"{path} is empty"


def boxlite_tools(box: CodeBox | SyncCodeBox, timeout: float | None = None) -> list[BaseTool]:
    """The tools for one box: ``run_python``, ``run_shell``, ``read_file``, ``write_file`` and
    ``list_files``. ``timeout`` (seconds) limits each code run and command."""
    return [
        BoxlitePythonTool(box=box, timeout=timeout),
        BoxliteShellTool(box=box, timeout=timeout),
        BoxliteReadFileTool(box=box),
        BoxliteWriteFileTool(box=box),
        BoxliteListFilesTool(box=box),
    ]
