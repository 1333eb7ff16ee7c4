"""A smolagents executor that runs the agent's code in a box's stateful Python interpreter.

>>> from smolagents import CodeAgent
>>> from boxlite.integrations.smolagents import BoxliteExecutor
>>> with CodeAgent(tools=[], model=model, executor=BoxliteExecutor()) as agent:
...     agent.run("What kernel does the sandbox run?")

``BoxliteExecutor()`` starts its own ``CodeBox`` (keyword arguments go to it, e.g.
``image=`` or ``rootfs_path=``) and stops it on ``cleanup()`` (the agent's ``with`` block
calls it); ``BoxliteExecutor(codebox=box)`` uses a ``CodeBox`` or ``SyncCodeBox`` of yours and
leaves it running. smolagents calls the executor synchronously; the box's calls run on the
sync API's loop, so this works inside a running event loop too. Needs ``pip install 'boxlite[smolagents]'``.
"""

from __future__ import annotations

import ast
import base64
import io
from typing import Any, cast

import PIL.Image
from smolagents.default_tools import FinalAnswerTool
from smolagents.local_python_executor import CodeOutput
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.tools import Tool, get_tools_definition_code
from smolagents.utils import AgentError

from .. import CodeContext, CodeExecution
from .._native import ExecResult
from ..errors import ExecError, InvalidArgumentError
from ..simplebox import CodeBox
from ..sync import SyncCodeBox, _run

__all__ = ["BoxliteExecutor"]

# Import names whose pip package is named otherwise.
_PIP_NAMES = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "bs4": "beautifulsoup4",
    "cv2": "opencv-python",
    "yaml": "pyyaml",
}
_IMPORT_NAMES = {package: module for module, package in _PIP_NAMES.items()}


class BoxliteExecutor(RemotePythonExecutor):
    """Runs smolagents code actions in a box (``CodeBox.run_code``: one interpreter, so
    variables persist from step to step). ``timeout`` (seconds) limits each action;
    ``context`` picks an interpreter context of the box (default: its default one)."""

    def __init__(
        self,
        additional_imports: list[str] | None = None,
        logger: AgentLogger | None = None,
        codebox: CodeBox | SyncCodeBox | None = None,
        *,
        context: CodeContext | str | None = None,
        timeout: float | None = None,
        allow_pickle: bool = False,
        **codebox_options: Any,
    ) -> None:
        if isinstance(codebox, SyncCodeBox):
            codebox = codebox._inner
        elif codebox is not None and not isinstance(codebox, CodeBox):
            raise InvalidArgumentError(
                f"codebox: expected a boxlite.CodeBox or SyncCodeBox, got {type(codebox).__name__}"
            )
        if codebox is not None and codebox_options:
            raise InvalidArgumentError(
                f"codebox: given, so these options have no box to go to: {sorted(codebox_options)}"
            )
        super().__init__(additional_imports or [], logger or AgentLogger(level=LogLevel.INFO), allow_pickle)
        self.owns_codebox = codebox is None
        self.codebox: CodeBox = codebox if codebox is not None else CodeBox(**codebox_options)
        self.context = context
        self.timeout = timeout
        try:
            _run(self.codebox.start())
            self.installed_packages = self._install(self.additional_imports)
        except BaseException:
            self.cleanup()
            raise
        self.logger.log("boxlite box is running", level=LogLevel.INFO)

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        execution: CodeExecution = _run(self.codebox.run_code(code, context=self.context, timeout=self.timeout))
        logs = _joined(execution.stdout, execution.stderr)
        error = execution.error
        if error is not None and error.name == self.FINAL_ANSWER_EXCEPTION:
            answer = self._deserialize_final_answer(error.value, self.allow_pickle)
            return CodeOutput(output=answer, logs=logs, is_final_answer=True)
        if execution.timed_out:
            lost = " Its interpreter was restarted: earlier variables are gone." if execution.context_restarted else ""
            raise AgentError(f"{logs}The code ran longer than {self.timeout} s and was stopped.{lost}", self.logger)
        if error is not None:
            raise AgentError(f"{logs}The code raised {error.name}: {error.value}\n{error.traceback}", self.logger)
        return CodeOutput(output=_main_value(execution), logs=logs, is_final_answer=False)

    def send_tools(self, tools: dict[str, Tool]) -> None:
        """Defines the agent's tools in the box's interpreter (from their source, as every
        remote executor does), after installing what they require."""
        if "final_answer" in tools:
            self._patch_final_answer_with_exception(cast(FinalAnswerTool, tools["final_answer"]))
        # The final-answer tool's requirements (numpy, PIL) are optional: it imports them
        # only to describe a value of theirs.
        wanted = {
            package
            for name, tool in tools.items()
            if name != "final_answer"
            for package in tool.to_dict()["requirements"]
        }
        wanted -= {"smolagents", *self.installed_packages}
        if wanted:
            self.installed_packages += self.install_packages(sorted(wanted))
        code = get_tools_definition_code(tools)
        logs = self.run_code_raise_errors(_tolerate_missing_imports(code)).logs if code else ""
        if logs:
            self.logger.log(logs)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Installs what the tools import. Those the box lacks are ``pip install``ed if
        possible; a failure is only logged: a tool that does need one fails with an
        ``ImportError`` the model sees. Returns the names, so they are not tried again."""
        try:
            return self._install(additional_imports)
        except ExecError as error:
            self.logger.log(
                f"could not install {' '.join(additional_imports)} in the box: {error}", level=LogLevel.INFO
            )
            return list(additional_imports)

    def _install(self, imports: list[str]) -> list[str]:
        """``pip install``s what the box's Python cannot import of ``imports`` (import or pip
        names); ``ExecError`` if pip fails."""
        # "*" and "pkg.*" are smolagents' import patterns, not packages.
        roots = sorted({name.split(".")[0] for name in imports if name.split(".")[0] not in ("", "*")})
        if not roots:
            return []
        modules = {_IMPORT_NAMES.get(root, root): root for root in roots}
        probe = f"import importlib.util as u\nprint(' '.join(n for n in {sorted(modules)!r} if u.find_spec(n) is None))"
        missing = _run(self.codebox.exec("python3", "-c", probe))
        _check(missing, "python3 -c <import probe>")
        packages = [_PIP_NAMES.get(name, name) for name in missing.stdout.split()]
        if packages:
            self.logger.log(f"pip install {' '.join(packages)} in the box", level=LogLevel.INFO)
            self.logger.log(_run(self.codebox.install_packages(packages)), level=LogLevel.DEBUG)
        return roots

    def cleanup(self) -> None:
        """Stops the box if this executor started it."""
        if self.owns_codebox:
            _run(self.codebox.stop())

    def delete(self) -> None:
        """Same as ``cleanup()`` (the name other remote executors use)."""
        self.cleanup()


def _check(result: ExecResult, command: str) -> None:
    if result.exit_code != 0:
        raise ExecError(command, result.exit_code, result.stderr, stdout=result.stdout)


def _joined(*texts: str) -> str:
    """The texts, each ending with a newline (smolagents appends to the logs as they are)."""
    return "".join(text if text.endswith("\n") else text + "\n" for text in texts if text)


def _tolerate_missing_imports(code: str) -> str:
    """``code`` with each top-level import made optional. smolagents copies every import of
    the tools' methods to the top of their definitions, so one optional package the box
    lacks would stop all of them; the methods import what they use themselves."""
    tree = ast.parse(code)
    tree.body = [
        ast.Try(
            body=[node],
            handlers=[ast.ExceptHandler(type=ast.Name("ImportError", ast.Load()), name=None, body=[ast.Pass()])],
            orelse=[],
            finalbody=[],
        )
        if isinstance(node, (ast.Import, ast.ImportFrom))
        else node
        for node in tree.body
    ]
    return ast.unparse(ast.fix_missing_locations(tree))


def _main_value(execution: CodeExecution) -> Any:
    """The value of the code's last expression: an image as a PIL image, else its text."""
    for result in execution.results:
        if not result.is_main_result:
            continue
        for image in (result.png, result.jpeg):
            if image is not None:
                return PIL.Image.open(io.BytesIO(base64.b64decode(image)))
        if result.text is not None:
            return result.text
        formats = result.formats()
        return result.data[formats[0]] if formats else None
    return None
