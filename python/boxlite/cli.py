"""The ``boxlite`` command line: Docker-like commands over one runtime home.

    boxlite run [-it] [--rm] [-d] [--name N] [-e K=V] [-w DIR] [--cpus N] [--memory 512MiB]
                (IMAGE | --rootfs PATH) [CMD...]
    boxlite exec [-it] BOX CMD...
    boxlite ps [-a] | start BOX... | stop BOX... | rm [-f] BOX...
    boxlite pull IMAGE | images | rmi IMAGE... | cp SRC DEST | info
    boxlite mcp [--transport stdio|http] [--image IMAGE | --rootfs PATH]: boxes as MCP tools
    boxlite serve [--host H] [--port P] [--api-key KEY]...: the boxes over HTTP (docs/serve.md)

Boxes made here are detached (they outlive this process, like a Docker container outlives
``docker``), so ``start`` and ``exec`` work from later invocations. ``run`` without ``-d``
runs its command and stops the box again (``--rm`` deletes it). ``run`` and ``exec`` exit
with the command's exit code; boxlite's own failures print one ``boxlite: error: ...`` line
and exit 125 (126/127 when the command cannot be started, as Docker does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from . import __version__, accelerator
from ._native import BoxInfo, BoxOptions, ImageInfo, NetworkSpec, Options, PullProgress
from ._runtime import Box, Boxlite, ExecStdin, Execution
from .errors import BoxliteError, BoxNotFoundError, ExecStartError, InvalidArgumentError, InvalidStateError
from .serve.config import add_flags as serve_flags  # imports no web framework

PROG = "boxlite"
#: Exit codes for failures that are not the command's own (Docker's conventions).
EXIT_BOXLITE = 125
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


class CliError(InvalidArgumentError):
    """A usage problem found by the CLI itself (bad memory size, ambiguous box prefix...);
    exits 2 like argparse's own usage errors."""


# ---------------------------------------------------------------------------- parsing helpers

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_UNITS_MIB = {
    "": 1.0,
    "m": 1.0,
    "mb": 1.0,
    "mi": 1.0,
    "mib": 1.0,
    "g": 1024.0,
    "gb": 1024.0,
    "gi": 1024.0,
    "gib": 1024.0,
    "k": 1 / 1024,
    "kb": 1 / 1024,
    "ki": 1 / 1024,
    "kib": 1 / 1024,
}


def parse_memory_mib(text: str) -> int:
    """``512``, ``512m``, ``512MiB``, ``1g``, ``1.5GiB`` -> MiB (a plain number is MiB)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS_MIB:
        raise CliError(f"invalid memory size {text!r}: use a number with an optional unit, e.g. 512MiB or 1GiB")
    return round(float(match.group(1)) * _UNITS_MIB[unit])


def parse_disk_gb(text: str) -> float:
    """``10``, ``10G``, ``512MiB`` -> GiB (a plain number is GiB)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS_MIB:
        raise CliError(f"invalid disk size {text!r}: use a number with an optional unit, e.g. 10GiB")
    value = float(match.group(1))
    return value if unit == "" else value * _UNITS_MIB[unit] / 1024


def parse_env(items: Sequence[str]) -> list[tuple[str, str]]:
    """``K=V`` pairs; a bare ``K`` takes the value from this environment (skipped if unset)."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise CliError(f"invalid environment variable {item!r}: expected NAME=VALUE")
        if not sep:
            if key not in os.environ:
                continue
            value = os.environ[key]
        pairs.append((key, value))
    return pairs


def parse_publish(items: Sequence[str]) -> list[tuple[int, int, str, str]]:
    """Docker's ``-p [IP:]HOST:GUEST[/PROTO]``; the core checks the numbers."""
    ports = []
    for item in items:
        spec, _, protocol = item.partition("/")
        parts = spec.rsplit(":", 2)
        if len(parts) == 2:
            parts.insert(0, "127.0.0.1")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise CliError(f"invalid -p {item!r}: expected [IP:]HOST_PORT:GUEST_PORT[/tcp]")
        host_ip, host_port, guest_port = parts
        ports.append((int(host_port), int(guest_port), protocol or "tcp", host_ip.strip("[]")))
    return ports


def parse_volumes(items: Sequence[str]) -> list[tuple[str, str, bool]]:
    """Docker's ``-v HOST:GUEST[:ro|:rw]``; the core checks the paths."""
    volumes = []
    for item in items:
        parts = item.split(":")
        read_only = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            read_only = parts.pop() == "ro"
        if len(parts) != 2 or not all(parts):
            raise CliError(f"invalid -v {item!r}: expected HOST_PATH:GUEST_PATH[:ro]")
        volumes.append((os.path.abspath(parts[0]), parts[1], read_only))
    return volumes


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop always returns


def human_ago(when: datetime | str | float | None) -> str:
    if when is None:
        return "-"
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    ts = when.timestamp() if isinstance(when, datetime) else when
    seconds = max(0, int(time.time() - ts))
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return f"{seconds} second{'s' if seconds != 1 else ''} ago"


def table(rows: Sequence[Sequence[str]], out: IO[str]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


# ---------------------------------------------------------------------------- the argument parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run OCI images in lightweight VMs (boxes).",
        epilog="Boxes, images and state live in --home (default $BOXLITE_HOME or ~/.boxlite).",
    )
    parser.add_argument("--home", metavar="DIR", help="runtime home directory")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help)

    def exec_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("-i", "--interactive", action="store_true", help="forward stdin to the command")
        p.add_argument("-t", "--tty", action="store_true", help="run the command under a terminal")
        p.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable")
        p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the box")
        p.add_argument("-u", "--user", metavar="USER", help="user[:group] to run as")

    run = command("run", "create a box from an image and run a command in it")
    exec_flags(run)
    run.add_argument("-d", "--detach", action="store_true", help="leave the box running and print its id")
    run.add_argument("--rm", action="store_true", help="delete the box when the command ends")
    run.add_argument("--name", help="a unique name for the box")
    run.add_argument("--cpus", type=int, help="virtual CPUs (default 1)")
    run.add_argument("-m", "--memory", metavar="SIZE", help="memory, e.g. 512MiB or 2GiB (default 1GiB)")
    run.add_argument("--disk", metavar="SIZE", help="disk size, e.g. 10GiB (default: the image's size)")
    run.add_argument("--entrypoint", metavar="CMD", help="override the image's ENTRYPOINT")
    run.add_argument("--rootfs", metavar="PATH", help="an OCI image layout directory to use instead of IMAGE")
    run.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="[IP:]HOST:GUEST[/tcp]",
        help="publish a guest TCP port on the host (host IP default 127.0.0.1; HOST 0 picks a free port)",
    )
    run.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="HOST:GUEST[:ro]",
        help="mount a host folder in the box (read-only with :ro)",
    )
    run.add_argument("--network", choices=["default", "none"], default="default", help="none: no network at all")
    run.add_argument(
        "--allow-net",
        action="append",
        default=[],
        metavar="NAME",
        help="allow connections only to this host name, *.wildcard, IP or CIDR (repeatable; "
        "host.boxlite.internal is the host's loopback)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="IMAGE [CMD...]", help="image and command")

    exe = command("exec", "run a command in a running box")
    exec_flags(exe)
    exe.add_argument("box", metavar="BOX", help="box id, id prefix or name")
    exe.add_argument("argv", nargs=argparse.REMAINDER, metavar="CMD...", help="command and arguments")

    ps = command("ps", "list boxes")
    ps.add_argument("-a", "--all", action="store_true", help="also stopped boxes")
    ps.add_argument("-q", "--quiet", action="store_true", help="only ids")

    for name, help in (("start", "start stopped boxes"), ("stop", "stop running boxes")):
        p = command(name, help)
        p.add_argument("boxes", nargs="+", metavar="BOX")
    rm = command("rm", "delete boxes")
    rm.add_argument("-f", "--force", action="store_true", help="also running boxes (stopped first)")
    rm.add_argument("boxes", nargs="+", metavar="BOX")

    pull = command("pull", "pull an image from its registry")
    pull.add_argument("image", metavar="IMAGE")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress, only the digest")
    images = command("images", "list local images")
    images.add_argument("-q", "--quiet", action="store_true", help="only references")
    rmi = command("rmi", "remove local images")
    rmi.add_argument("images", nargs="+", metavar="IMAGE")

    cp = command("cp", "copy files between a box and the host (BOX:PATH names the box side)")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dest", metavar="DEST")

    snapshot = command("snapshot", "manage a stopped box's disk snapshots")
    snaps = snapshot.add_subparsers(dest="snapshot_command", metavar="ACTION", parser_class=_Parser)
    snaps.required = True
    for action, help in (
        ("create", "freeze the box's disk as snapshot NAME"),
        ("rm", "delete snapshot NAME"),
        ("restore", "put the box's disk back to snapshot NAME"),
    ):
        p = snaps.add_parser(action, help=help, description=help)
        p.add_argument("box", metavar="BOX")
        p.add_argument("name", metavar="NAME")
    ls = snaps.add_parser("ls", help="list a box's snapshots", description="list a box's snapshots")
    ls.add_argument("box", metavar="BOX")

    clone = command("clone", "make a new stopped box from a stopped box (thin: shares its disk blocks)")
    clone.add_argument("box", metavar="BOX")
    clone.add_argument("--name", help="a unique name for the new box")

    export = command("export", "write a stopped box to one archive (.boxlite)")
    export.add_argument("box", metavar="BOX")
    export.add_argument("dest", metavar="DEST", help="a file, or a directory for <name or id>.boxlite")

    imp = command("import", "make a stopped box from an archive written by export")
    imp.add_argument("archive", metavar="ARCHIVE")
    imp.add_argument("--name", help="a unique name for the new box")
    imp.add_argument("--untrusted", action="store_true", help="refuse archives using host paths or ports")

    command("info", "show version, accelerator, isolation, guest bundle and home")
    mcp_flags(command("mcp", "serve boxes to AI agents over the Model Context Protocol (stdio or HTTP)"))
    serve_flags(command("serve", "serve this home's boxes over HTTP (REST + WebSocket; see docs/serve.md)"))
    return parser


def mcp_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="default stdio")
    p.add_argument("--host", default="127.0.0.1", help="http: address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="http: port (default 8000; 0 picks a free one)")
    p.add_argument("--path", default="/mcp", help="http: the endpoint's path (default /mcp)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", help="image of the boxes (default python:slim)")
    source.add_argument("--rootfs", metavar="PATH", help="an OCI image layout directory instead of an image")
    p.add_argument("-m", "--memory", metavar="SIZE", help="memory of each box, e.g. 512MiB (default 1GiB)")
    p.add_argument("--cpus", type=int, help="virtual CPUs of each box (default 1)")
    p.add_argument("--max-boxes", type=int, default=4, metavar="N", help="boxes running at once (default 4)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECS",
        help="limit of a run whose call gives none (default 300)",
    )
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable in every box")
    p.add_argument("--network", choices=["default", "none"], default="default", help="none: boxes have no network")
    p.add_argument(
        "--allow-net",
        action="append",
        default=[],
        metavar="NAME",
        help="allow connections only to this host (repeatable)",
    )


# ---------------------------------------------------------------------------- runtime helpers


def open_runtime(home: str | None) -> Boxlite:
    return Boxlite(Options(home_dir=home))


async def resolve_box(rt: Boxlite, ref: str) -> Box:
    """A box by id, name or unique id prefix."""
    box = await rt.get(ref)
    if box is not None:
        return box
    matches = [info for info in await rt.list_info() if info.id.lower().startswith(ref.lower())]
    if len(matches) == 1:
        found = await rt.get(matches[0].id)
        if found is not None:
            return found
    if len(matches) > 1:
        raise CliError(f"box prefix {ref!r} is ambiguous: {', '.join(m.id for m in matches)}")
    raise BoxNotFoundError(f"no box has the id or name {ref!r} (see `{PROG} ps -a`)")


async def for_each_box(rt: Boxlite, refs: Sequence[str], action: Callable[[Box], Awaitable[None]]) -> int:
    """Applies `action` to every box, reporting each failure; 1 if any failed."""
    failed = 0
    for ref in refs:
        try:
            box = await resolve_box(rt, ref)
            await action(box)
            print(ref)
        except BoxliteError as e:
            print(f"{PROG}: error: {ref}: {e}", file=sys.stderr)
            failed = 1
    return failed


# ---------------------------------------------------------------------------- attaching stdio


class _StdinReader:
    """Reads this process's stdin on a daemon thread (works for ttys, pipes and files, and
    never keeps the process alive) and hands the chunks to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._loop = loop
        self._fd = fd
        threading.Thread(target=self._run, name="boxlite-stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            try:
                self._loop.call_soon_threadsafe(self.queue.put_nowait, chunk)
            except RuntimeError:
                return  # the loop is closed: we are exiting
            if not chunk:
                return


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal at `fd` in raw mode (keys go to the box as typed), restored after."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminal_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
        return (size.lines or 24, size.columns or 80)
    except OSError:
        return (24, 80)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            time.sleep(0.001)
            continue
        view = view[written:]


async def _pump_out(stream: Any, fd: int) -> None:
    async for chunk in stream:
        _write_all(fd, chunk)


async def _pump_in(stdin: ExecStdin, reader: _StdinReader) -> None:
    try:
        while True:
            chunk = await reader.queue.get()
            if not chunk:
                break
            await stdin.write(chunk)
        await stdin.close()
    except BoxliteError:
        pass  # the command ended (or closed its stdin) first


def exec_options(interactive: bool, want_tty: bool) -> tuple[tuple[int, int] | None, bool]:
    """The tty size to ask for (None: no tty), and whether to put our terminal in raw mode."""
    if not want_tty:
        return None, False
    stdin_tty = os.isatty(0)
    fd = 0 if stdin_tty else 1
    return _terminal_size(fd), interactive and stdin_tty


async def attach(execution: Execution, interactive: bool, raw: bool) -> int:
    """Connects this process's stdio to `execution` until it ends; its exit code."""
    loop = asyncio.get_running_loop()
    stdout_fd = sys.stdout.fileno()
    stderr_fd = sys.stderr.fileno()
    sys.stdout.flush()
    sys.stderr.flush()
    tasks = [
        asyncio.ensure_future(_pump_out(execution.stdout(binary=True), stdout_fd)),
        asyncio.ensure_future(_pump_out(execution.stderr(binary=True), stderr_fd)),
    ]
    # Taken here, before wait(): wait() closes a stdin nobody has taken.
    stdin = execution.stdin()
    if stdin is not None:
        if interactive:
            tasks.append(asyncio.ensure_future(_pump_in(stdin, _StdinReader(loop, 0))))
        else:
            await stdin.close()
    resize_installed = False
    if raw:

        def on_resize() -> None:
            with contextlib.suppress(BoxliteError):
                execution.resize_tty(*_terminal_size(0))

        loop.add_signal_handler(signal.SIGWINCH, on_resize)
        resize_installed = True
    try:
        with raw_terminal(0) if raw else contextlib.nullcontext():
            result = await execution.wait()
            await asyncio.gather(*tasks[:2])
    finally:
        if resize_installed:
            loop.remove_signal_handler(signal.SIGWINCH)
        for task in tasks:
            task.cancel()
    return result.exit_code


# ---------------------------------------------------------------------------- commands


async def cmd_run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if args.rootfs is None:
        if not argv:
            raise CliError("give an IMAGE (or --rootfs PATH)")
        image, command = argv[0], argv[1:]
    else:
        image, command = None, argv
    if args.detach and (command or args.interactive or args.tty):
        raise CliError(
            "-d starts a box and leaves it running; run commands in it with "
            f"`{PROG} exec` (commands do not outlive the client that started them)"
        )
    if args.detach and args.rm:
        raise CliError("--rm and -d conflict: a detached box is kept until `boxlite rm`")
    options = BoxOptions(
        image=image,
        rootfs_path=args.rootfs,
        name=args.name,
        cpus=args.cpus,
        memory_mib=parse_memory_mib(args.memory) if args.memory else None,
        disk_size_gb=parse_disk_gb(args.disk) if args.disk else None,
        working_dir=args.workdir,
        env=parse_env(args.env),
        user=args.user,
        entrypoint=[args.entrypoint] if args.entrypoint else None,
        cmd=command or None,
        tty=bool(args.tty),
        # Kept boxes are detached, so `exec`, `start` and `stop` reach them from other
        # processes; a `--rm` box lives only for this run.
        auto_remove=bool(args.rm),
        detach=not args.rm,
        network=NetworkSpec(mode="disabled") if args.network == "none" else NetworkSpec(allow_net=args.allow_net),
        ports=parse_publish(args.publish),
        volumes=parse_volumes(args.volume),
    )
    rt = open_runtime(args.home)
    box = await rt.create(options)
    if args.detach:
        print(box.id)
        return 0
    try:
        size, raw = exec_options(args.interactive, args.tty)
        execution = await box.exec(tty=size or False)
        return await attach(execution, args.interactive, raw)
    finally:
        await _finish_run(rt, box, remove=bool(args.rm))


async def _finish_run(rt: Boxlite, box: Box, remove: bool) -> None:
    """Stops (or deletes) the box of a `run`, even when the run was interrupted."""
    task = asyncio.ensure_future(rt.remove(box.id, force=True) if remove else box.stop())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise CliError("give the command to run")
    rt = open_runtime(args.home)
    box = await resolve_box(rt, args.box)
    status = box.info().status
    if status != "running":
        # As `docker exec`: a command goes into a running box; `start` is explicit here.
        raise InvalidStateError(f"box {args.box} is {status}; start it first with `{PROG} start {args.box}`")
    size, raw = exec_options(args.interactive, args.tty)
    execution = await box.exec(
        argv[0], argv[1:], env=parse_env(args.env), tty=size or False, user=args.user, cwd=args.workdir
    )
    return await attach(execution, args.interactive, raw)


def _created(info: BoxInfo) -> str:
    return human_ago(info.created_at)


async def cmd_ps(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    infos = [i for i in await rt.list_info() if args.all or i.status == "running"]
    if args.quiet:
        for info in infos:
            print(info.id)
        return 0
    rows = [["BOX ID", "IMAGE", "STATUS", "CREATED", "PORTS", "ACCEL", "NAME"]]
    for info in infos:
        status = info.status
        if info.started_at is not None and info.status == "running":
            status = f"running (up {human_ago(info.started_at).removesuffix(' ago')})"
        ports = ", ".join(
            f"{p.host_ip}:{p.host_port}->{p.guest_port}/{p.protocol}" for p in info.network.published_ports
        )
        rows.append([info.id, info.image, status, _created(info), ports, info.accelerator, info.name or ""])
    table(rows, sys.stdout)
    return 0


async def cmd_start(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    return await for_each_box(rt, args.boxes, lambda box: box.start())


async def cmd_stop(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    return await for_each_box(rt, args.boxes, lambda box: box.stop())


async def cmd_rm(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    return await for_each_box(rt, args.boxes, lambda box: rt.remove(box.id, force=args.force))


class PullDisplay:
    """One progress line per layer: redrawn in place on a terminal, a line per finished
    layer otherwise."""

    def __init__(self, out: IO[str], live: bool) -> None:
        self.out = out
        self.live = live
        self.layers: dict[int, PullProgress] = {}
        self.drawn = 0
        self.reported: set[int] = set()

    def __call__(self, progress: PullProgress) -> None:
        self.layers[progress.index] = progress
        if self.live:
            self.redraw()
        elif progress.done >= progress.total and progress.index not in self.reported:
            self.reported.add(progress.index)
            self.out.write(self.line(progress) + "\n")
            self.out.flush()

    @staticmethod
    def line(p: PullProgress) -> str:
        short = p.layer.split(":")[-1][:12]
        width = 30
        filled = width if p.total == 0 else int(width * min(p.done, p.total) / p.total)
        bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
        state = "done" if p.done >= p.total else f"{human_size(p.done)} / {human_size(p.total)}"
        return f"layer {p.index + 1}/{p.layers} {short} [{bar}] {state}"

    def redraw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        for index in sorted(self.layers):
            self.out.write("\x1b[2K" + self.line(self.layers[index]) + "\n")
        self.drawn = len(self.layers)
        self.out.flush()


async def cmd_pull(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    display = None if args.quiet else PullDisplay(sys.stdout, sys.stdout.isatty())
    info = await rt.images.pull(args.image, progress=display)
    if args.quiet:
        print(info.digest)
    else:
        print(f"{info.reference}: pulled {info.digest} ({info.layers} layers, {human_size(info.size)})")
    return 0


def _pulled(info: ImageInfo) -> str:
    return human_ago(info.pulled_at)


async def cmd_images(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    images = await rt.images.list()
    if args.quiet:
        for image in images:
            print(image.reference)
        return 0
    rows = [["REFERENCE", "DIGEST", "SIZE", "LAYERS", "TEMPLATES", "PULLED"]]
    for image in images:
        digest = image.digest.split(":")[-1][:12]
        row = [image.reference, digest, human_size(image.size), str(image.layers), str(image.templates)]
        rows.append([*row, _pulled(image)])
    table(rows, sys.stdout)
    return 0


async def cmd_rmi(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    failed = 0
    for ref in args.images:
        try:
            await rt.images.remove(ref)
            print(f"removed {ref}")
        except BoxliteError as e:
            print(f"{PROG}: error: {ref}: {e}", file=sys.stderr)
            failed = 1
    return failed


def split_box_path(spec: str) -> tuple[str, str] | None:
    """``BOX:/path`` -> (box, path); None for a host path (absolute or relative paths, and
    ``./x:y``, stay host paths)."""
    if spec.startswith(("/", ".")) or ":" not in spec:
        return None
    box, _, path = spec.partition(":")
    if not box or not path:
        return None
    return box, path


async def cmd_cp(args: argparse.Namespace) -> int:
    src, dest = split_box_path(args.src), split_box_path(args.dest)
    if (src is None) == (dest is None):
        raise CliError("give exactly one side as BOX:PATH (e.g. `boxlite cp mybox:/etc/hosts .`)")
    rt = open_runtime(args.home)
    if src is not None:
        box = await resolve_box(rt, src[0])
        await box.copy_out(src[1], args.dest)
    else:
        assert dest is not None
        box = await resolve_box(rt, dest[0])
        await box.copy_in(args.src, dest[1])
    return 0


def _isolation(accel: str) -> str:
    if accel in ("kvm", "hvf"):
        return f"hardware ({accel.upper()}): every box is a hardware-virtualized VM with its own kernel"
    return (
        "software (TCG): every box has its own kernel in an emulated VM, but QEMU does not treat TCG "
        "as a security boundary; the VMM runs confined (seccomp sandbox, one box per process) for "
        "defence in depth"
    )


async def cmd_info(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    accel, reason = accelerator()
    out = [
        ("version", __version__),
        ("home", str(rt.home_dir)),
        ("accelerator", accel),
        ("accelerator reason", reason),
        ("isolation", _isolation(accel)),
    ]
    try:
        guest = Path(rt._native.guest_dir())
        out.append(("guest bundle", str(guest)))
        manifest = _read_manifest(guest / "manifest.json")
        if manifest is None:
            out.append(("guest manifest", "none (a bundle without manifest.json)"))
        else:
            kernel = manifest.get("kernel", {})
            out.append(("guest manifest format", str(manifest.get("format_version", "?"))))
            out.append(("guest kernel", f"{kernel.get('package', '?')} {kernel.get('version', '?')}"))
            for part in ("vmlinuz", "initramfs", "agent"):
                digest = manifest.get(part, {}).get("sha256")
                if digest:
                    out.append((f"guest {part}", f"sha256:{digest[:16]}..."))
    except BoxliteError as e:
        out.append(("guest bundle", f"not found: {e}"))
    infos = await rt.list_info()
    running = sum(1 for i in infos if i.status == "running")
    out.append(("boxes", f"{len(infos)} ({running} running)"))
    try:
        out.append(("images", str(len(await rt.images.list()))))
    except BoxliteError as e:
        out.append(("images", f"unavailable: {e}"))
    width = max(len(k) for k, _ in out) + 1
    for key, value in out:
        print(f"{key + ':':<{width}} {value}")
    return 0


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def cmd_snapshot(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    box = await resolve_box(rt, args.box)
    action = args.snapshot_command
    if action == "create":
        info = await box.snapshot.create(name=args.name)
        print(info.name)
    elif action == "rm":
        await box.snapshot.remove(args.name)
    elif action == "restore":
        await box.snapshot.restore(args.name)
    else:
        rows = [["NAME", "CREATED", "SIZE", "DISK"]]
        for snap in await box.snapshot.list():
            rows.append(
                [
                    snap.name,
                    human_ago(float(snap.created_at)),
                    human_size(snap.size_bytes),
                    human_size(snap.container_disk_bytes),
                ]
            )
        table(rows, sys.stdout)
    return 0


async def cmd_clone(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    box = await resolve_box(rt, args.box)
    clone = await box.clone_box(name=args.name)
    print(clone.id)
    return 0


async def cmd_export(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    box = await resolve_box(rt, args.box)
    print(await box.export(dest=args.dest))
    return 0


async def cmd_import(args: argparse.Namespace) -> int:
    rt = open_runtime(args.home)
    box = await rt.import_box(args.archive, args.name, untrusted=args.untrusted)
    print(box.id)
    return 0


async def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from .integrations.mcp import BoxPool, serve
    except ModuleNotFoundError as e:
        raise CliError(f"`{PROG} mcp` needs the {e.name} package: pip install 'boxlite[mcp]'") from e
    if not 0 <= args.port <= 65535:
        raise CliError(f"invalid --port {args.port}: use 0 to 65535")
    if args.timeout <= 0:
        raise CliError(f"invalid --timeout {args.timeout}: give a positive number of seconds")
    network = NetworkSpec(mode="disabled") if args.network == "none" else NetworkSpec(allow_net=args.allow_net)
    pool = BoxPool(
        home=args.home,
        image=args.image,
        rootfs_path=args.rootfs,
        memory_mib=parse_memory_mib(args.memory) if args.memory else None,
        cpus=args.cpus,
        max_boxes=args.max_boxes,
        box_options={"env": parse_env(args.env), "network": network},
    )
    await serve(pool, args.transport, host=args.host, port=args.port, path=args.path, default_timeout=args.timeout)
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import run
    except ModuleNotFoundError as e:
        raise CliError(f"`{PROG} serve` needs the {e.name} package: pip install 'boxlite[serve]'") from e
    return await run.main(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "exec": cmd_exec,
    "ps": cmd_ps,
    "start": cmd_start,
    "stop": cmd_stop,
    "rm": cmd_rm,
    "pull": cmd_pull,
    "images": cmd_images,
    "rmi": cmd_rmi,
    "cp": cmd_cp,
    "snapshot": cmd_snapshot,
    "clone": cmd_clone,
    "export": cmd_export,
    "import": cmd_import,
    "info": cmd_info,
    "mcp": cmd_mcp,
    "serve": cmd_serve,
}


def _error_exit_code(error: BaseException) -> int:
    if isinstance(error, ExecStartError):
        text = str(error).lower()
        return EXIT_NOT_FOUND if "not found" in text or "no such file" in text else EXIT_CANNOT_RUN
    return EXIT_BOXLITE


def _one_line(error: BaseException) -> str:
    """The first line of the message (a boot timeout's message goes on with the console)."""
    text = str(error).strip() or type(error).__name__
    return text.partition("\n")[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `boxlite` console script; returns (and exits with) the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(COMMANDS[args.command](args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 2
    except InvalidArgumentError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        code = EXIT_BOXLITE
    except BoxliteError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        code = _error_exit_code(e)
    except BrokenPipeError:
        code = 0
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
