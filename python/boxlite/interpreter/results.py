"""What a code run returns: output, rich results, the error, and how the run ended.

Plain data classes, built by the host from the kernel's frames (never trusted: every field is
checked for its type when a frame is read, see ``protocol``). Rich results show themselves in
Jupyter through the ``_repr_*_`` methods.
"""

from __future__ import annotations

import base64
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

#: MIME type -> the ``CodeResult`` attribute that holds it.
MIME_FIELDS: dict[str, str] = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}


@dataclass
class CodeResult:
    """One rich output of a run: the value of its last expression (``is_main_result``) or an
    object passed to ``display()``. Each format the object offered is an attribute; ``png``,
    ``jpeg`` and ``pdf`` are base64 text. ``data`` maps every MIME type to its value,
    including ones without an attribute."""

    data: dict[str, Any] = field(default_factory=dict)
    is_main_result: bool = False

    @property
    def text(self) -> str | None:
        return self._get("text/plain")

    @property
    def html(self) -> str | None:
        return self._get("text/html")

    @property
    def markdown(self) -> str | None:
        return self._get("text/markdown")

    @property
    def svg(self) -> str | None:
        return self._get("image/svg+xml")

    @property
    def png(self) -> str | None:
        return self._get("image/png")

    @property
    def jpeg(self) -> str | None:
        return self._get("image/jpeg")

    @property
    def pdf(self) -> str | None:
        return self._get("application/pdf")

    @property
    def latex(self) -> str | None:
        return self._get("text/latex")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    @property
    def javascript(self) -> str | None:
        return self._get("application/javascript")

    @property
    def extra(self) -> dict[str, Any]:
        """Formats without an attribute of their own."""
        return {mime: value for mime, value in self.data.items() if mime not in MIME_FIELDS}

    def formats(self) -> list[str]:
        """The names of the formats present (``"text"``, ``"png"``, ...; other MIME types
        as they are)."""
        return [MIME_FIELDS.get(mime, mime) for mime in self.data]

    def _get(self, mime: str) -> str | None:
        value = self.data.get(mime)
        return value if isinstance(value, str) else None

    # Jupyter shows a result by the richest of these it supports.
    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {
            mime: value
            for mime, value in self.data.items()
            if (include is None or mime in include) and (exclude is None or mime not in exclude)
        }

    def _repr_html_(self) -> str | None:
        return self.html

    def _repr_markdown_(self) -> str | None:
        return self.markdown

    def _repr_svg_(self) -> str | None:
        return self.svg

    def _repr_png_(self) -> bytes | None:
        return base64.b64decode(self.png) if self.png is not None else None

    def _repr_jpeg_(self) -> bytes | None:
        return base64.b64decode(self.jpeg) if self.jpeg is not None else None

    def _repr_latex_(self) -> str | None:
        return self.latex

    def _repr_json_(self) -> Any:
        return self.json

    def __str__(self) -> str:
        return self.text or ""

    def __repr__(self) -> str:
        return f"CodeResult(formats={self.formats()}, is_main_result={self.is_main_result})"


@dataclass
class CodeError:
    """An error the code raised: returned in ``CodeExecution.error``, not raised on the host."""

    name: str
    value: str
    traceback: str = ""

    def __str__(self) -> str:
        return self.traceback or f"{self.name}: {self.value}"


@dataclass
class CodeLogs:
    """The run's output as it arrived, chunk by chunk."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class CodeOutput:
    """A chunk of output, as ``stream_code`` yields it."""

    stream: Literal["stdout", "stderr"]
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class CodeContext:
    """A long-lived interpreter process in the box; runs in one context share its state."""

    id: str
    language: str
    cwd: str | None = None


@dataclass
class CodeExecution:
    """The outcome of ``run_code``.

    ``timed_out`` means the run passed its timeout and was interrupted; ``context_restarted``
    means its interpreter had to be killed (or had died) and was started afresh, so earlier
    state is gone. ``notes`` say such things in words."""

    results: list[CodeResult] = field(default_factory=list)
    logs: CodeLogs = field(default_factory=CodeLogs)
    error: CodeError | None = None
    execution_count: int | None = None
    timed_out: bool = False
    context_restarted: bool = False
    notes: list[str] = field(default_factory=list)
    #: For ``run()``: the exit status ``sys.exit(n)`` asked for (or a shell's last status).
    exit_code: int | None = None

    @property
    def text(self) -> str | None:
        """The main result's text (the value of the last expression), if there was one."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    @property
    def stdout(self) -> str:
        return "".join(self.logs.stdout)

    @property
    def stderr(self) -> str:
        return "".join(self.logs.stderr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [{"data": r.data, "is_main_result": r.is_main_result} for r in self.results],
            "logs": {"stdout": list(self.logs.stdout), "stderr": list(self.logs.stderr)},
            "error": None if self.error is None else vars(self.error).copy(),
            "execution_count": self.execution_count,
            "timed_out": self.timed_out,
            "context_restarted": self.context_restarted,
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def _ipython_display_(self) -> None:
        """In a notebook, a run shows everything it produced: its output, each rich result
        (images, tables) in order, and its error."""
        from IPython.display import display

        if self.stdout:
            sys.stdout.write(self.stdout)
        if self.stderr:
            sys.stderr.write(self.stderr)
        for result in self.results:
            display(result)  # type: ignore[no-untyped-call]
        if self.error is not None:
            sys.stderr.write(str(self.error))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        # Front ends without `_ipython_display_` get the main result, or the text of the run.
        for result in self.results:
            if result.is_main_result:
                return result._repr_mimebundle_(include, exclude)
        text = self.stdout + self.stderr + (str(self.error) if self.error else "")
        return {"text/plain": text}
