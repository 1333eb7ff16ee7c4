"""boxlite as a sandbox of the OpenAI Agents SDK (``pip install 'boxlite[openai-agents]'``).

Each sandbox session is a box: a ``SandboxAgent``'s shell commands, file reads and writes,
patches and workspace snapshots all happen in that box's VM.

    from agents import Runner
    from agents.run import RunConfig
    from agents.sandbox import SandboxAgent, SandboxRunConfig
    from boxlite.integrations.openai_agents import BoxliteSandboxClient, BoxliteSandboxClientOptions

    async with BoxliteSandboxClient() as client:
        config = RunConfig(sandbox=SandboxRunConfig(
            client=client, options=BoxliteSandboxClientOptions(image="python:slim")))
        result = await Runner.run(SandboxAgent(name="dev"), "Run the tests.", run_config=config)

The box is made when the session is created and stopped when it shuts down; stopping deletes
it unless ``keep_box=True`` (then ``client.delete(session)`` or closing the client does).
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, Literal, cast

try:
    from agents.sandbox.errors import (
        ExecTimeoutError,
        ExecTransportError,
        ExposedPortUnavailableError,
        WorkspaceArchiveReadError,
        WorkspaceArchiveWriteError,
        WorkspaceReadNotFoundError,
        WorkspaceStartError,
    )
    from agents.sandbox.manifest import Manifest
    from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
    from agents.sandbox.session.dependencies import Dependencies
    from agents.sandbox.session.manager import Instrumentation
    from agents.sandbox.session.pty_output import collect_pty_output
    from agents.sandbox.session.pty_types import (
        PTY_PROCESSES_MAX,
        PtyExecUpdate,
        allocate_pty_process_id,
        clamp_pty_yield_time_ms,
        process_id_to_prune_from_meta,
        resolve_pty_write_yield_time_ms,
    )
    from agents.sandbox.session.runtime_helpers import RESOLVE_WORKSPACE_PATH_HELPER, RuntimeHelperScript
    from agents.sandbox.session.sandbox_client import BaseSandboxClient, BaseSandboxClientOptions
    from agents.sandbox.session.sandbox_session import SandboxSession
    from agents.sandbox.session.sandbox_session_state import SandboxSessionState
    from agents.sandbox.session.workspace_payloads import coerce_write_payload
    from agents.sandbox.snapshot import SnapshotBase, SnapshotSpec, resolve_snapshot
    from agents.sandbox.types import ExecResult, ExposedPortEndpoint, User
    from agents.sandbox.util.tar_utils import UnsafeTarMemberError, should_skip_tar_member, validate_tarfile
    from agents.sandbox.workspace_paths import sandbox_path_grant_host_path, sandbox_path_str
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "boxlite.integrations.openai_agents needs the OpenAI Agents SDK: pip install 'boxlite[openai-agents]'"
    ) from error

from pydantic import ConfigDict, Field, field_validator

from .. import errors as boxlite_errors
from .._native import BoxOptions, NetworkSpec
from .._runtime import Box, Boxlite, ExecStdin, Execution

__all__ = [
    "BoxliteSandboxClient",
    "BoxliteSandboxClientOptions",
    "BoxliteSandboxSession",
    "BoxliteSandboxSessionState",
]

#: The image a session's box runs when the options name none (as ``CodeBox``).
DEFAULT_IMAGE = "python:slim"
_TTY_SIZE = (24, 80)
_CHUNK = 1 << 20
# A command that cannot be started is reported as a shell would report it: exit 127.
_START_FAILED_EXIT_CODE = 127
_FILE_MISSING, _NOT_A_FILE = 44, 45

Volume = tuple[str, str, bool]


class BoxliteSandboxClientOptions(BaseSandboxClientOptions):
    """What each session's box is made of. Give ``image`` (a registry reference) or
    ``rootfs_path`` (a local OCI image layout); neither means ``python:slim``.

    ``volumes`` are host folders shared live with the box: ``(host_path, guest_path)`` or
    ``(host_path, guest_path, read_only)``; they must lie outside the workspace root (they are
    not part of workspace snapshots). ``exposed_ports`` are guest TCP ports published on a free
    host port of 127.0.0.1 (``session.resolve_exposed_port(port)`` says which).
    ``network="disabled"`` gives the box no network; ``allow_net`` limits where it may
    connect. ``keep_box=True`` keeps a stopped box (its whole disk, not just the workspace) so
    ``client.resume(state)`` can start it again; ``client.delete(session)`` removes it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["boxlite"] = "boxlite"
    image: str | None = None
    rootfs_path: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    disk_size_gb: float | None = None
    env: dict[str, str] = Field(default_factory=dict)
    volumes: tuple[Volume, ...] = ()
    exposed_ports: tuple[int, ...] = ()
    network: Literal["enabled", "disabled"] = "enabled"
    allow_net: tuple[str, ...] | None = None
    keep_box: bool = False

    @field_validator("volumes", mode="before")
    @classmethod
    def _volume_triples(cls, value: object) -> object:
        if not isinstance(value, (list, tuple)):
            return value
        triples: list[object] = []
        for volume in value:
            if isinstance(volume, Mapping):
                unknown = set(volume) - {"host_path", "guest_path", "read_only"}
                if unknown:
                    raise ValueError(f"unknown volume keys {sorted(unknown)}; use host_path, guest_path, read_only")
                volume = (volume.get("host_path"), volume.get("guest_path"), volume.get("read_only", False))
            elif isinstance(volume, (list, tuple)) and len(volume) == 2:
                volume = (*volume, False)
            if isinstance(volume, (list, tuple)) and volume and not isinstance(volume[0], str):
                volume = (str(volume[0]), *volume[1:])  # a Path
            triples.append(volume)
        return tuple(triples)


class BoxliteSandboxSessionState(SandboxSessionState):
    """A session's persistable state: its box and the options that made it (to make a new
    one when the box is gone at resume)."""

    type: Literal["boxlite"] = "boxlite"
    box_id: str
    options: BoxliteSandboxClientOptions = Field(default_factory=BoxliteSandboxClientOptions)


@dataclass
class _Process:
    """A command started through ``pty_exec_start``: its output queue and how it ended."""

    execution: Execution
    tty: bool
    stdin: ExecStdin | None
    chunks: deque[bytes] = field(default_factory=deque)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    notify: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    last_used: float = field(default_factory=time.monotonic)
    pump: asyncio.Task[None] | None = None

    async def append(self, chunk: bytes) -> None:
        async with self.lock:
            self.chunks.append(chunk)
        self.notify.set()


def _user_name(user: str | User | None) -> str | None:
    return user.name if isinstance(user, User) else user


def _timeout_secs(timeout: float | None) -> float | None:
    # boxlite wants a positive timeout; the SDK's "no time at all" is the shortest one.
    return None if timeout is None else max(timeout, 0.001)


def _text(data: bytes | str) -> str:
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


class BoxliteSandboxSession(BaseSandboxSession):
    """A sandbox session whose workspace lives in a boxlite box (``box``)."""

    state: BoxliteSandboxSessionState

    def __init__(self, *, state: BoxliteSandboxSessionState, box: Box) -> None:
        self.state = state
        self._box = box
        # Commands run in the workspace root once it exists (the first ones make it).
        self._workspace_root_ready = state.workspace_root_ready
        self._processes: dict[int, _Process] = {}
        self._processes_lock = asyncio.Lock()

    @property
    def box(self) -> Box:
        """The box this session runs in."""
        return self._box

    # -- lifecycle ---------------------------------------------------------------------------

    async def running(self) -> bool:
        try:
            return self._box.info().running
        except boxlite_errors.BoxliteError:
            return False

    async def _ensure_backend_started(self) -> None:
        if await self.running():
            return
        try:
            await self._box.start()
        except boxlite_errors.BoxliteError as error:
            raise WorkspaceStartError(
                path=self._workspace_root_path(), context={"box_id": self._box.id}, cause=error
            ) from error

    async def _prepare_backend_workspace(self) -> None:
        root = sandbox_path_str(self._workspace_root_path())
        result = await self._run(["mkdir", "-p", "--", root])
        if not result.ok():
            raise WorkspaceStartError(
                path=self._workspace_root_path(),
                context={"exit_code": result.exit_code, "stderr": _text(result.stderr)},
            )
        self._workspace_root_ready = True

    def _mark_workspace_root_ready_from_probe(self) -> None:
        super()._mark_workspace_root_ready_from_probe()
        self._workspace_root_ready = True

    async def _shutdown_backend(self) -> None:
        try:
            await self._box.stop()
        except (boxlite_errors.InvalidStateError, boxlite_errors.NotFoundError):
            pass  # already stopped, or removed with it

    def _runtime_helpers(self) -> tuple[RuntimeHelperScript, ...]:
        return (RESOLVE_WORKSPACE_PATH_HELPER,)

    def _current_runtime_helper_cache_key(self) -> object | None:
        return self._box.id

    async def _validate_path_access(self, path: Path | str, *, for_write: bool = False) -> Path:
        # Resolve symlinks in the box, so a link cannot lead a read or write out of the
        # workspace.
        return await self._validate_remote_path_access(path, for_write=for_write)

    # -- commands ----------------------------------------------------------------------------

    async def _start(
        self, argv: Sequence[str], *, user: str | None = None, timeout: float | None = None, tty: bool = False
    ) -> Execution:
        env = await self.state.manifest.environment.resolve()
        cwd = self.state.manifest.root if self._workspace_root_ready else None
        return await self._box.exec(
            argv[0],
            list(argv[1:]),
            env=env or None,
            cwd=cwd,
            user=user,
            tty=_TTY_SIZE if tty else None,
            timeout_secs=_timeout_secs(timeout),
        )

    async def _run(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        timeout: float | None = None,
        stdin: IO[bytes] | None = None,
    ) -> ExecResult:
        """Runs ``argv`` to its end (feeding it ``stdin``) and returns its result."""
        try:
            execution = await self._start(argv, user=user, timeout=timeout)
        except boxlite_errors.ExecStartError as error:
            return ExecResult(stdout=b"", stderr=f"{error}\n".encode(), exit_code=_START_FAILED_EXIT_CODE)
        except boxlite_errors.BoxliteError as error:
            raise ExecTransportError(command=argv, context={"box_id": self._box.id}, cause=error) from error
        feed_error: BaseException | None = None
        try:
            if stdin is not None:
                feed_error = await _feed(execution, stdin)
            result = await execution.wait()
        except boxlite_errors.ExecTimeoutError as error:
            raise ExecTimeoutError(command=argv, timeout_s=timeout, cause=error) from error
        except boxlite_errors.BoxliteError as error:
            raise ExecTransportError(command=argv, context={"box_id": self._box.id}, cause=error) from error
        if feed_error is not None and result.exit_code == 0:
            # The command succeeded on input it did not get whole.
            raise ExecTransportError(command=argv, context={"reason": "stdin_write_failed"}, cause=feed_error)
        return ExecResult(stdout=result.stdout_bytes, stderr=result.stderr_bytes, exit_code=result.exit_code)

    async def exec(
        self,
        *command: str | Path,
        timeout: float | None = None,
        shell: bool | list[str] = True,
        user: str | User | None = None,
    ) -> ExecResult:
        # boxlite runs a command as another user itself: no `sudo` in the image needed.
        argv = self._prepare_exec_command(*command, shell=shell, user=None)
        return await self._run(argv, user=_user_name(user), timeout=timeout)

    async def _exec_internal(self, *command: str | Path, timeout: float | None = None) -> ExecResult:
        return await self._run([str(part) for part in command], timeout=timeout)

    # -- files -------------------------------------------------------------------------------

    async def read(self, path: Path, *, user: str | User | None = None) -> io.IOBase:
        workspace_path = await self._validate_path_access(path)
        command = ("cat", "--", sandbox_path_str(workspace_path))
        result = await self.exec(*command, shell=False, user=user)
        if not result.ok():
            await self._raise_read_error_from_exec(
                path=path, workspace_path=workspace_path, command=command, result=result, user=user
            )
        return io.BytesIO(result.stdout)

    async def _read_bounded(self, path: Path, *, max_bytes: int) -> bytes:
        workspace_path = await self._validate_path_access(path)
        script = f'[ -e "$1" ] || exit {_FILE_MISSING}; [ -f "$1" ] || exit {_NOT_A_FILE}; exec head -c "$2" < "$1"'
        result = await self._run(["sh", "-c", script, "sh", sandbox_path_str(workspace_path), str(max_bytes)])
        if result.exit_code == _FILE_MISSING:
            raise WorkspaceReadNotFoundError(path=path)
        if not result.ok():
            raise WorkspaceArchiveReadError(path=path, context={"exit_code": result.exit_code})
        return result.stdout

    async def write(self, path: Path, data: io.IOBase, *, user: str | User | None = None) -> None:
        payload = coerce_write_payload(path=path, data=data)
        workspace_path = await self._validate_path_access(path, for_write=True)
        # `cat >` keeps an existing file's mode and owner (a patched script stays executable).
        argv = [
            "sh",
            "-c",
            'mkdir -p -- "$2" && cat > "$1"',
            "sh",
            sandbox_path_str(workspace_path),
            sandbox_path_str(workspace_path.parent),
        ]
        result = await self._run(argv, user=_user_name(user), stdin=cast(IO[bytes], payload.stream))
        if not result.ok():
            raise WorkspaceArchiveWriteError(
                path=workspace_path, context={"exit_code": result.exit_code, "stderr": _text(result.stderr)}
            )

    async def persist_workspace(self) -> io.IOBase:
        """The workspace as a tar stream (members relative to the root), without the paths the
        session skips in snapshots."""
        root = self._workspace_root_path()
        archive = tempfile.TemporaryFile()
        try:
            execution = await self._start(["tar", "-C", sandbox_path_str(root), "-cf", "-", "."])
            async for chunk in execution.stdout(binary=True):
                archive.write(chunk)
            result = await execution.wait()
        except boxlite_errors.BoxliteError as error:
            archive.close()
            raise WorkspaceArchiveReadError(path=root, context={"box_id": self._box.id}, cause=error) from error
        if result.exit_code != 0:
            archive.close()
            raise WorkspaceArchiveReadError(path=root, context={"exit_code": result.exit_code, "stderr": result.stderr})
        archive.seek(0)
        skip = self._persist_workspace_skip_relpaths()
        if skip:
            return await asyncio.to_thread(_without_members, archive, skip)
        return archive

    async def hydrate_workspace(self, data: io.IOBase) -> None:
        root = self._workspace_root_path()
        archive = await asyncio.to_thread(_checked_archive, data, root)
        try:
            script = 'mkdir -p -- "$1" && exec tar -x -f - -C "$1"'
            result = await self._run(["sh", "-c", script, "sh", sandbox_path_str(root)], stdin=archive)
        finally:
            archive.close()
        if not result.ok():
            raise WorkspaceArchiveWriteError(
                path=root, context={"exit_code": result.exit_code, "stderr": _text(result.stderr)}
            )

    # -- ports -------------------------------------------------------------------------------

    async def _resolve_exposed_port(self, port: int) -> ExposedPortEndpoint:
        try:
            published = self._box.info().network.published_ports
        except boxlite_errors.BoxliteError as error:
            raise ExposedPortUnavailableError(
                port=port, exposed_ports=self.state.exposed_ports, reason="backend_unavailable", cause=error
            ) from error
        for binding in published:
            if binding.guest_port == port and binding.protocol == "tcp":
                return ExposedPortEndpoint(host=binding.host_ip, port=binding.host_port, tls=False)
        raise ExposedPortUnavailableError(
            port=port,
            exposed_ports=self.state.exposed_ports,
            reason="backend_unavailable",
            context={"detail": "the box does not publish this port (is it running?)"},
        )

    # -- interactive processes ---------------------------------------------------------------

    def supports_pty(self) -> bool:
        return True

    async def pty_exec_start(
        self,
        *command: str | Path,
        timeout: float | None = None,
        shell: bool | list[str] = True,
        user: str | User | None = None,
        tty: bool = False,
        yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:
        argv = self._prepare_exec_command(*command, shell=shell, user=None)
        try:
            execution = await self._start(argv, user=_user_name(user), timeout=timeout, tty=tty)
        except boxlite_errors.ExecStartError as error:
            output = f"{error}\n".encode()
            return PtyExecUpdate(
                process_id=None, output=output, exit_code=_START_FAILED_EXIT_CODE, original_token_count=None
            )
        except boxlite_errors.BoxliteError as error:
            raise ExecTransportError(command=argv, context={"box_id": self._box.id}, cause=error) from error

        stdin = execution.stdin()
        if not tty and stdin is not None:
            await stdin.close()  # only a terminal takes input later; a pipe reads end-of-file
            stdin = None
        process = _Process(execution=execution, tty=tty, stdin=stdin)
        process.pump = asyncio.create_task(_pump(process, timeout))
        async with self._processes_lock:
            process_id = allocate_pty_process_id(set(self._processes))
            pruned = self._prune_processes()
            self._processes[process_id] = process
        if pruned is not None:
            await _terminate(pruned)

        wait_ms = 10_000 if yield_time_s is None else int(yield_time_s * 1000)
        return await self._collect(process_id, process, clamp_pty_yield_time_ms(wait_ms), max_output_tokens)

    async def pty_write_stdin(
        self,
        *,
        session_id: int,
        chars: str,
        yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:
        async with self._processes_lock:
            process = self._resolve_pty_session_entry(pty_processes=self._processes, session_id=session_id)
        if chars:
            if process.stdin is None:
                # The SDK's shell tool turns exactly this message into advice for the model.
                raise RuntimeError("stdin is not available for this process")
            if not process.closed.is_set():
                try:
                    await process.stdin.write(chars.encode())
                except boxlite_errors.BoxliteError:
                    pass  # it ended meanwhile; the output below says how
        process.last_used = time.monotonic()
        wait_ms = 250 if yield_time_s is None else int(yield_time_s * 1000)
        wait_ms = resolve_pty_write_yield_time_ms(yield_time_ms=wait_ms, input_empty=chars == "")
        return await self._collect(session_id, process, wait_ms, max_output_tokens)

    async def pty_terminate_all(self) -> None:
        async with self._processes_lock:
            processes = list(self._processes.values())
            self._processes.clear()
        await asyncio.gather(*(_terminate(process) for process in processes))

    async def _collect(
        self, process_id: int, process: _Process, wait_ms: int, max_output_tokens: int | None
    ) -> PtyExecUpdate:
        output, original_token_count, closed = await collect_pty_output(
            output_chunks=process.chunks,
            output_lock=process.lock,
            output_notify=process.notify,
            is_done=process.closed.is_set,
            yield_time_ms=wait_ms,
            max_output_tokens=max_output_tokens,
        )
        if not closed:
            return PtyExecUpdate(
                process_id=process_id, output=output, exit_code=None, original_token_count=original_token_count
            )
        async with self._processes_lock:
            self._processes.pop(process_id, None)
        return PtyExecUpdate(
            process_id=None, output=output, exit_code=process.exit_code, original_token_count=original_token_count
        )

    def _prune_processes(self) -> _Process | None:
        if len(self._processes) < PTY_PROCESSES_MAX:
            return None
        meta = [(pid, p.last_used, p.closed.is_set()) for pid, p in self._processes.items()]
        victim = process_id_to_prune_from_meta(meta)
        return None if victim is None else self._processes.pop(victim, None)


async def _feed(execution: Execution, data: IO[bytes]) -> BaseException | None:
    """Writes ``data`` to the command's stdin and closes it; returns the error that stopped
    the writing, if any (the command ended early: its result says why)."""
    stdin = execution.stdin()
    if stdin is None:
        return RuntimeError("the command's stdin was already taken")
    try:
        while chunk := data.read(_CHUNK):
            await stdin.write(chunk)
        await stdin.close()
    except boxlite_errors.BoxliteError as error:
        return error
    return None


async def _pump(process: _Process, timeout: float | None) -> None:
    """Moves a process's output into its queue as it comes, then records how it ended."""

    async def drain(stream: Any) -> None:
        async for chunk in stream:
            await process.append(bytes(chunk))

    execution = process.execution
    streams = [execution.stdout(binary=True)]
    if not process.tty:
        streams.append(execution.stderr(binary=True))  # a terminal merges it into stdout
    try:
        await asyncio.gather(*(drain(stream) for stream in streams))
        process.exit_code = (await execution.wait()).exit_code
    except boxlite_errors.ExecTimeoutError:
        await process.append(f"\nboxlite: the command ran past its timeout of {timeout:g} s and was killed\n".encode())
        process.exit_code = 124  # as timeout(1) reports it
    except boxlite_errors.BoxliteError as error:
        await process.append(f"\nboxlite: {error}\n".encode())
        process.exit_code = 255
    finally:
        process.closed.set()
        process.notify.set()


async def _terminate(process: _Process) -> None:
    if not process.closed.is_set():
        try:
            process.execution.kill()
        except boxlite_errors.BoxliteError:
            pass  # gone already
    if process.pump is not None:
        try:
            await asyncio.wait_for(asyncio.shield(process.pump), timeout=15)
        except asyncio.TimeoutError:
            process.pump.cancel()


def _without_members(archive: io.BufferedRandom, skip: set[Path]) -> io.BufferedRandom:
    """A copy of the tar ``archive`` without the members under the ``skip`` paths."""
    filtered = tempfile.TemporaryFile()
    with archive, tarfile.open(fileobj=archive, mode="r|") as source, tarfile.open(fileobj=filtered, mode="w|") as out:
        for member in source:
            if should_skip_tar_member(member.name, skip_rel_paths=skip, root_name=None):
                continue
            out.addfile(member, source.extractfile(member) if member.isfile() else None)
    filtered.seek(0)
    return filtered


def _checked_archive(data: io.IOBase, root: Path) -> io.BufferedRandom:
    """``data`` spooled to a file and checked to be a plain tar whose members all stay in the
    workspace (no absolute names, no ``..``, no links out)."""
    archive = tempfile.TemporaryFile()
    try:
        while chunk := data.read(_CHUNK):
            archive.write(chunk.encode() if isinstance(chunk, str) else chunk)
        archive.seek(0)
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            validate_tarfile(tar, allow_external_symlink_targets=False)
        archive.seek(0)
        return archive
    except UnsafeTarMemberError as error:
        archive.close()
        context = {"reason": error.reason, "member": error.member}
        raise WorkspaceArchiveWriteError(path=root, context=context, cause=error) from error
    except (tarfile.TarError, OSError) as error:
        archive.close()
        raise WorkspaceArchiveWriteError(path=root, context={"reason": "not_a_plain_tar"}, cause=error) from error


def _refuse_mounts(manifest: Manifest) -> None:
    mounts = [path.as_posix() for _mount, path in manifest.mount_targets()]
    if mounts:
        raise boxlite_errors.UnsupportedError(
            f"storage mounts are not supported by the boxlite sandbox (manifest mounts at {', '.join(mounts)}); "
            "share host folders with BoxliteSandboxClientOptions(volumes=...) or a path grant with host_path"
        )


def _volumes(options: BoxliteSandboxClientOptions, manifest: Manifest) -> list[Volume]:
    """The options' volumes and the manifest's host path grants, each outside the workspace."""
    volumes = list(options.volumes)
    for grant in manifest.extra_path_grants:
        if grant.host_path is not None:
            volumes.append((str(sandbox_path_grant_host_path(grant)), grant.path, grant.read_only))
    root = PurePosixPath(manifest.root)
    for _host, guest, _read_only in volumes:
        target = PurePosixPath(guest)
        if target == root or root in target.parents or target in root.parents:
            raise boxlite_errors.InvalidArgumentError(
                f"invalid argument `volumes`: {guest} overlaps the workspace root {root}; share host folders "
                "outside it (copy files into the workspace with manifest entries such as LocalDir)"
            )
    return volumes


def _box_options(options: BoxliteSandboxClientOptions, manifest: Manifest, session_id: uuid.UUID) -> BoxOptions:
    network: NetworkSpec | None = None
    if options.network == "disabled":
        if options.allow_net is not None:
            raise boxlite_errors.InvalidArgumentError(
                "invalid argument `allow_net`: a box without network (network='disabled') connects nowhere"
            )
        network = NetworkSpec("disabled")
    elif options.allow_net is not None:
        network = NetworkSpec(allow_net=list(options.allow_net))
    image = options.image
    if image is None and options.rootfs_path is None:
        image = DEFAULT_IMAGE
    box_options = BoxOptions(
        image=image,
        rootfs_path=options.rootfs_path,
        cpus=options.cpus,
        memory_mib=options.memory_mib,
        disk_size_gb=options.disk_size_gb,
        env=dict(options.env),
        volumes=_volumes(options, manifest),
        network=network,
        ports=[(0, port) for port in options.exposed_ports],
        auto_remove=not options.keep_box,
        name=f"openai-agents-{session_id.hex}",
    )
    box_options.validate()
    return box_options


class BoxliteSandboxClient(BaseSandboxClient[BoxliteSandboxClientOptions]):
    """Makes a box per sandbox session, on ``runtime`` (default: ``Boxlite.default()``, closed
    with the client). ``async with`` (or ``await aclose()``) removes the boxes of sessions not
    deleted yet."""

    backend_id = "boxlite"
    supports_default_options = True

    def __init__(
        self,
        runtime: Boxlite | None = None,
        *,
        instrumentation: Instrumentation | None = None,
        dependencies: Dependencies | None = None,
    ) -> None:
        self._runtime = runtime
        self._owns_runtime = runtime is None
        self._instrumentation = instrumentation if instrumentation is not None else Instrumentation()
        self._dependencies = dependencies
        self._box_ids: set[str] = set()

    @property
    def runtime(self) -> Boxlite:
        if self._runtime is None:
            self._runtime = Boxlite.default()
        return self._runtime

    async def create(
        self,
        *,
        snapshot: SnapshotSpec | SnapshotBase | None = None,
        manifest: Manifest | None = None,
        options: BoxliteSandboxClientOptions | Mapping[str, Any] | None = None,
    ) -> SandboxSession:
        options = _coerce_options(options)
        manifest = manifest if manifest is not None else Manifest()
        self._validate_manifest_for_create(manifest)
        _refuse_mounts(manifest)
        session_id = uuid.uuid4()
        box = await self.runtime.create(_box_options(options, manifest, session_id))
        self._box_ids.add(box.id)
        try:
            state = BoxliteSandboxSessionState(
                session_id=session_id,
                manifest=manifest,
                snapshot=resolve_snapshot(snapshot, str(session_id)),
                box_id=box.id,
                options=options,
                exposed_ports=options.exposed_ports,
            )
        except BaseException:
            await self._remove(box.id)
            raise
        return self._wrap_session(BoxliteSandboxSession(state=state, box=box), instrumentation=self._instrumentation)

    async def delete(self, session: SandboxSession) -> SandboxSession:
        inner = session._inner
        if not isinstance(inner, BoxliteSandboxSession):
            raise TypeError("BoxliteSandboxClient.delete expects a session of a BoxliteSandboxClient")
        await inner.shutdown()
        await self._remove(inner.state.box_id)
        return session

    async def resume(self, state: SandboxSessionState) -> SandboxSession:
        if not isinstance(state, BoxliteSandboxSessionState):
            raise TypeError("BoxliteSandboxClient.resume expects a BoxliteSandboxSessionState")
        state.assert_path_grants_rebound()
        _refuse_mounts(state.manifest)
        box = await self.runtime.get(state.box_id)
        preserved = box is not None
        if box is None:
            # The box is gone (deleted, or removed at its stop): a new one, whose workspace
            # the SDK fills from the session's snapshot (or its manifest).
            box = await self.runtime.create(_box_options(state.options, state.manifest, uuid.uuid4()))
            state.box_id = box.id
            state.workspace_root_ready = False
        self._box_ids.add(box.id)
        inner = BoxliteSandboxSession(state=state, box=box)
        inner._set_start_state_preserved(preserved)
        return self._wrap_session(inner, instrumentation=self._instrumentation)

    def deserialize_session_state(self, payload: dict[str, object]) -> SandboxSessionState:
        return self._deserialize_session_state_payload(payload, BoxliteSandboxSessionState)

    async def _remove(self, box_id: str) -> None:
        try:
            await self.runtime.remove(box_id, force=True)
        except boxlite_errors.NotFoundError:
            pass  # removed at its stop already
        self._box_ids.discard(box_id)

    async def aclose(self) -> None:
        """Removes the boxes of sessions not deleted yet, and closes the runtime if the client
        made it."""
        for box_id in list(self._box_ids):
            await self._remove(box_id)
        if self._owns_runtime and self._runtime is not None:
            await self._runtime.close()
            self._runtime = None

    async def __aenter__(self) -> BoxliteSandboxClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _coerce_options(options: BoxliteSandboxClientOptions | Mapping[str, Any] | None) -> BoxliteSandboxClientOptions:
    if options is None:
        return BoxliteSandboxClientOptions()
    if isinstance(options, BoxliteSandboxClientOptions):
        return options
    if isinstance(options, Mapping):
        return BoxliteSandboxClientOptions.model_validate({"type": "boxlite", **options})
    raise boxlite_errors.InvalidArgumentError(
        f"invalid argument `options`: expected BoxliteSandboxClientOptions, got {type(options).__name__}"
    )
