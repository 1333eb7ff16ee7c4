"""Boxes as Model Context Protocol tools: ``boxlite mcp`` serves a pool of boxes over stdio or
streamable HTTP with the ``mcp`` package (``pip install 'boxlite[mcp]'``).

Every tool takes an optional ``box_id``; without one it works on the server's default box,
which is created on first use. ``create_box`` adds boxes to the pool (up to ``max_boxes``),
``remove_box`` stops and deletes one. The pool's boxes live only as long as the server: they
are stopped when it exits (stdin closed, SIGTERM, Ctrl-C), and, being children of its process,
die with it even when it is killed.

    pool = BoxPool(home="/tmp/bl", rootfs_path="build/test-images/current/python")
    asyncio.run(serve(pool, transport="http", port=8000))  # or "stdio"
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import ipaddress
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import BoxliteError, ExecTimeoutError, InvalidArgumentError
from ..interpreter import CodeExecution
from ..simplebox import CodeBox
from .pool import BoxPool, PoolMember

__all__ = ["BoxPool", "PoolMember", "create_server", "serve"]  # the pool is re-exported here

#: Seconds a command or code run may take unless the call says otherwise.
DEFAULT_TIMEOUT = 300.0
#: The largest file ``read_file`` returns (the model reads it all).
MAX_READ_BYTES = 8 * 1024 * 1024
#: Result formats sent as MCP image content rather than as text.
IMAGE_MIME_TYPES = ("image/png", "image/jpeg")
#: Binary result formats (base64), left out of the structured result's ``data``.
BINARY_MIME_TYPES = frozenset({*IMAGE_MIME_TYPES, "application/pdf"})

INSTRUCTIONS = """\
Each box is an isolated Linux VM. Tools act on the default box unless given a box_id (from
create_box or list_boxes). run_code keeps interpreter state between calls (per box, language
and context name); exec runs one command to completion. Boxes are deleted when this server exits.
"""


# ---------------------------------------------------------------------------- tool schemas

BoxIdArg = Annotated[
    str | None,
    Field(description="Box id or name from create_box/list_boxes; omit for the default box."),
]
TimeoutArg = Annotated[
    float | None,
    Field(gt=0, description=f"Seconds before the run is stopped (default {DEFAULT_TIMEOUT:g})."),
]
PathArg = Annotated[str, Field(min_length=1, description="Absolute path in the box.")]


class ExecOutput(BaseModel):
    exit_code: int = Field(description="The command's exit status (non-zero is a result, not an error).")
    stdout: str
    stderr: str


class FileContent(BaseModel):
    path: str
    size: int = Field(description="Size in bytes.")
    encoding: Literal["utf-8", "base64"] = Field(description="How content is encoded (base64 if not UTF-8 text).")
    content: str


class WriteOutput(BaseModel):
    path: str
    size: int = Field(description="Bytes written.")


class FileEntry(BaseModel):
    name: str
    type: Literal["file", "directory", "symlink", "other", "unknown"]
    size: int | None = Field(description="Size in bytes (of the link itself for a symlink).")


class ListOutput(BaseModel):
    path: str
    entries: list[FileEntry]


class BoxEntry(BaseModel):
    box_id: str
    name: str | None
    image: str
    status: str
    is_default: bool = Field(description="Whether calls without a box_id go to this box.")


class BoxList(BaseModel):
    boxes: list[BoxEntry]
    max_boxes: int


class RemoveOutput(BaseModel):
    box_id: str
    removed: bool


class CodeResultItem(BaseModel):
    mime_types: list[str] = Field(description="Every format the result came in.")
    text: str | None = Field(description="Its text/plain form.")
    data: dict[str, Any] = Field(
        description="Its non-binary formats by MIME type; images come as image content blocks."
    )
    is_main_result: bool = Field(description="True for the value of the last expression.")


class CodeErrorInfo(BaseModel):
    name: str
    value: str
    traceback: str


class RunCodeOutput(BaseModel):
    stdout: str
    stderr: str
    results: list[CodeResultItem]
    error: CodeErrorInfo | None = Field(description="The exception the code raised, if any.")
    execution_count: int | None
    timed_out: bool
    context_restarted: bool = Field(description="The interpreter was restarted: earlier state is gone.")
    notes: list[str]


# ---------------------------------------------------------------------------- the tools

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _tool_errors(fn: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """boxlite's errors become MCP tool errors the model can read (the SDK would hide the
    text of an unexpected exception)."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(*args, **kwargs)
        except ExecTimeoutError as e:
            raise ToolError(f"timed out: {e}") from e
        except BoxliteError as e:
            raise ToolError(f"{type(e).__name__}: {e}") from e

    return wrapper


def _decode(data: bytes) -> tuple[Literal["utf-8", "base64"], str]:
    try:
        return "utf-8", data.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(data).decode("ascii")


_STAT_TYPES: dict[str, Literal["file", "directory", "symlink"]] = {
    "regular file": "file",
    "regular empty file": "file",
    "directory": "directory",
    "symbolic link": "symlink",
}


async def _list_entries(box: CodeBox, path: str) -> list[FileEntry]:
    names = await box.list_dir(path)
    if not names:
        return []
    # One `stat` for all names gives types and sizes; without a usable stat, names alone.
    base = path.rstrip("/") or ""
    result = await box.exec("stat", "-c", "%F/%s", "--", *(f"{base}/{n}" for n in names))
    lines = result.stdout.splitlines()
    if result.exit_code != 0 or len(lines) != len(names):
        return [FileEntry(name=n, type="unknown", size=None) for n in names]
    entries = []
    for name, line in zip(names, lines, strict=True):
        kind, _, size = line.rpartition("/")
        entries.append(
            FileEntry(name=name, type=_STAT_TYPES.get(kind, "other"), size=int(size) if size.isdigit() else None)
        )
    return entries


def _code_output(execution: CodeExecution) -> CallToolResult:
    """A ``CodeExecution`` as structured content, its JSON as text, and its images as image
    content."""
    images: list[ContentBlock] = []
    results = []
    for result in execution.results:
        data = dict(result.data)
        images.extend(
            ImageContent(type="image", data=data[mime], mime_type=mime) for mime in IMAGE_MIME_TYPES if mime in data
        )
        results.append(
            CodeResultItem(
                mime_types=list(data),
                text=data.get("text/plain"),
                data={k: v for k, v in data.items() if k not in BINARY_MIME_TYPES},
                is_main_result=result.is_main_result,
            )
        )
    error = execution.error
    output = RunCodeOutput(
        stdout=execution.stdout,
        stderr=execution.stderr,
        results=results,
        error=None if error is None else CodeErrorInfo(name=error.name, value=error.value, traceback=error.traceback),
        execution_count=execution.execution_count,
        timed_out=execution.timed_out,
        context_restarted=execution.context_restarted,
        notes=list(execution.notes),
    )
    structured = output.model_dump(mode="json")
    text = TextContent(type="text", text=json.dumps(structured, ensure_ascii=False))
    return CallToolResult(content=[text, *images], structured_content=structured)


def create_server(pool: BoxPool, name: str = "boxlite", default_timeout: float = DEFAULT_TIMEOUT) -> MCPServer[Any]:
    """An MCP server whose tools act on ``pool``'s boxes; serve it with ``serve()`` or
    mount ``server.streamable_http_app()`` yourself (then close the pool yourself)."""
    # Tool failures are the model's to read; the server log keeps to warnings.
    server: MCPServer[Any] = MCPServer(name, version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=ToolAnnotations(title="Run code", open_world_hint=False))
    @_tool_errors
    async def run_code(
        code: Annotated[str, Field(description="The code to run.")],
        language: Annotated[
            Literal["python", "bash", "sh", "node"] | None,
            Field(description="Interpreter (default python, or the named context's language)."),
        ] = None,
        context: Annotated[
            str | None,
            Field(
                min_length=1,
                description="Name of an interpreter session; made on first use. Omit for the "
                "language's default session.",
            ),
        ] = None,
        timeout: TimeoutArg = None,
        box_id: BoxIdArg = None,
    ) -> Annotated[CallToolResult, RunCodeOutput]:
        """Run code in a stateful interpreter in the box: variables, imports and the working
        directory persist between calls of the same context. Returns stdout, stderr, rich
        results (the last expression's value, display() outputs; images as image content),
        the error the code raised and the execution count."""
        member = await pool.get(box_id)
        code_context = None
        if context is not None:
            code_context = member.contexts.get(context)
            if code_context is None:
                code_context = await member.box.create_context(language or "python")
                member.contexts[context] = code_context
            elif language is not None and language != code_context.language:
                raise ToolError(f"context {context!r} runs {code_context.language}, not {language}")
        execution = await member.box.run_code(
            code,
            language=None if code_context is not None else language,
            context=code_context,
            timeout=timeout or default_timeout,
        )
        return _code_output(execution)

    @server.tool(name="exec", annotations=ToolAnnotations(title="Run a command", open_world_hint=False))
    @_tool_errors
    async def exec_command(
        command: Annotated[str, Field(min_length=1, description="Program to run, e.g. 'ls' or 'sh'.")],
        args: Annotated[list[str] | None, Field(description="Its arguments, e.g. ['-c', 'echo hi | wc -c'].")] = None,
        cwd: Annotated[str | None, Field(description="Working directory in the box.")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None,
        timeout: TimeoutArg = None,
        box_id: BoxIdArg = None,
    ) -> ExecOutput:
        """Run a command in the box to completion (no shell unless you run one, e.g.
        command='sh', args=['-c', '...']). A command past its timeout is killed."""
        member = await pool.get(box_id)
        result = await member.box.exec(command, *(args or []), env=env, cwd=cwd, timeout=timeout or default_timeout)
        return ExecOutput(exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr)

    @server.tool(annotations=read_only)
    @_tool_errors
    async def read_file(path: PathArg, box_id: BoxIdArg = None) -> FileContent:
        """Read a file from the box (up to 8 MiB): UTF-8 text as is, anything else base64."""
        member = await pool.get(box_id)
        data = await member.box.box.read_file(path, max_bytes=MAX_READ_BYTES)
        encoding, content = _decode(data)
        return FileContent(path=path, size=len(data), encoding=encoding, content=content)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True, open_world_hint=False))
    @_tool_errors
    async def write_file(
        path: PathArg,
        content: Annotated[str, Field(description="The file's new content.")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="How content is encoded (base64 for binary files).")
        ] = "utf-8",
        mode: Annotated[str, Field(pattern=r"^[0-7]{3,4}$", description="Permission bits in octal.")] = "644",
        box_id: BoxIdArg = None,
    ) -> WriteOutput:
        """Write a file in the box, replacing it if it exists (its directory must exist)."""
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except binascii.Error as e:
                raise ToolError(f"content is not valid base64: {e}") from e
        else:
            data = content.encode("utf-8")
        member = await pool.get(box_id)
        await member.box.write_file(path, data, mode=int(mode, 8))
        return WriteOutput(path=path, size=len(data))

    @server.tool(annotations=read_only)
    @_tool_errors
    async def list_files(
        path: Annotated[str, Field(min_length=1, description="Directory in the box.")] = "/",
        box_id: BoxIdArg = None,
    ) -> ListOutput:
        """List a directory of the box: each entry's name, type and size."""
        member = await pool.get(box_id)
        return ListOutput(path=path, entries=await _list_entries(member.box, path))

    @server.tool(annotations=ToolAnnotations(title="Create a box", open_world_hint=False))
    @_tool_errors
    async def create_box(
        image: Annotated[str | None, Field(description="OCI image reference; omit for the server's image.")] = None,
        name: Annotated[str | None, Field(min_length=1, description="A unique name to call it by.")] = None,
        memory_mib: Annotated[int | None, Field(gt=0, description="Memory in MiB.")] = None,
        cpus: Annotated[int | None, Field(gt=0, description="Virtual CPUs.")] = None,
    ) -> BoxEntry:
        """Create and boot one more box (a separate VM); pass its box_id to other tools."""
        member = await pool.create(image=image, name=name, memory_mib=memory_mib, cpus=cpus)
        return _entry(member)

    @server.tool(annotations=read_only)
    @_tool_errors
    async def list_boxes() -> BoxList:
        """List this server's boxes."""
        return BoxList(boxes=[_entry(m) for m in pool.members], max_boxes=pool.max_boxes)

    @server.tool(annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False))
    @_tool_errors
    async def remove_box(
        box_id: Annotated[
            str | None,
            Field(description="Box id or name; omit for the default box (a new one is made when next needed)."),
        ] = None,
    ) -> RemoveOutput:
        """Stop and delete a box with everything in it."""
        removed_id = await pool.remove(box_id)
        return RemoveOutput(box_id=removed_id, removed=True)

    return server


def _entry(member: PoolMember) -> BoxEntry:
    info = member.box.box.info()
    return BoxEntry(
        box_id=member.id, name=info.name, image=member.image, status=info.status, is_default=member.is_default
    )


# ---------------------------------------------------------------------------- serving


class _HttpServer:
    """uvicorn without its own signal handling: ``serve()`` owns SIGINT/SIGTERM for both
    transports and stops the pool after either."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        self.server = Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.sock = sock

    async def serve(self) -> None:
        await self.server.serve(sockets=[self.sock])

    def stop(self) -> None:
        self.server.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(128)  # connections made before uvicorn starts wait in the backlog
    return sock


async def serve(
    pool: BoxPool,
    transport: Literal["stdio", "http"] = "stdio",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    path: str = "/mcp",
    default_timeout: float = DEFAULT_TIMEOUT,
    log: Callable[[str], None] | None = None,
) -> None:
    """Serves ``pool`` until the client closes stdin (stdio), or SIGINT/SIGTERM, then closes
    the pool. ``port=0`` picks a free port; the address is logged (to stderr by default)."""
    say = log or (lambda text: print(f"boxlite mcp: {text}", file=sys.stderr, flush=True))
    if transport not in ("stdio", "http"):
        raise InvalidArgumentError(f"transport must be 'stdio' or 'http', got {transport!r}")
    server = create_server(pool, default_timeout=default_timeout)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    http: _HttpServer | None = None
    try:
        if transport == "stdio":
            runner = asyncio.ensure_future(server.run_stdio_async())
            say("serving on stdio")
        else:
            sock = _bind(host, port)
            bound = sock.getsockname()
            app = server.streamable_http_app(streamable_http_path=path, host=host)
            http = _HttpServer(app, sock)
            runner = asyncio.ensure_future(http.serve())
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            say(f"serving on http://{shown}:{bound[1]}{path}")
            if not _is_loopback(host):
                say("warning: the server has no authentication; anyone who reaches it runs code in its boxes")
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not runner.done():
            if http is not None:
                http.stop()
            else:
                runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        if not runner.cancelled():
            runner.result()  # the transport's own failure, if it had one
    finally:
        # The boxes are stopped whatever ended the serving; a second signal (still handled
        # here) does not cut it short.
        closing = asyncio.ensure_future(pool.close())
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing
            raise
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
