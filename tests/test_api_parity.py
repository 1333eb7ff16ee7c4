"""The same API, locally and through `boxlite serve`: every test runs twice, on a local runtime
and on `Boxlite.rest(...)` talking to a real server (`python -m boxlite serve`) on loopback,
with the same assertions. One box per runtime is shared where a fresh one is not needed; after
each runtime's tests no QEMU of its home may be left."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import boxlite
from conftest import REPO, assert_no_engines, make_runtime

#: The async tests share the module's event loop, as its async fixtures do.
shared_loop = pytest.mark.asyncio(loop_scope="module")

KEY = "parity-" + secrets.token_hex(12)
#: A second key of the server: the sync API's boxes are its own, as a separate local home's are.
SYNC_KEY = "parity-sync-" + secrets.token_hex(12)
SERVER_START = 120.0


class Server:
    """`python -m boxlite serve` on a free loopback port, over ``home``."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.log = root / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
        env["BOXLITE_TEMPLATES"] = "0"  # as make_runtime: one cold boot per box
        argv = [sys.executable, "-m", "boxlite", "serve", "--home", str(self.home), "--port", "0"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*argv, "--allow-host-paths", "--api-key", KEY, "--api-key", SYNC_KEY],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + SERVER_START
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", self.log.read_text(errors="replace"))
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the server did not stop within 120 s of SIGTERM") from None

    def options(self, key: str = KEY) -> boxlite.BoxliteRestOptions:
        return boxlite.BoxliteRestOptions(url=self.url, credential=boxlite.ApiKeyCredential(key))


class Side:
    """One runtime under test, and how to make another one (the sync API) of the same kind."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.server = Server(root) if kind == "remote" else None
        self.rt = boxlite.Boxlite.rest(self.server.options()) if self.server else make_runtime(root / "home")

    def sync_runtime(self) -> boxlite.SyncBoxlite:
        if self.server is not None:
            return boxlite.SyncBoxlite.rest(self.server.options(SYNC_KEY))
        return boxlite.SyncBoxlite(boxlite.Options(home_dir=self.root / "sync-home", templates=False))

    def close(self) -> None:
        self.rt.close()
        if self.server is not None:
            self.server.stop()
        for home in ("home", "sync-home"):
            assert_no_engines(self.root / home)


@pytest.fixture(scope="module", params=["local", "remote"])
def side(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    made = Side(request.param, tmp_path_factory.mktemp(request.param))
    yield made
    made.close()


@pytest.fixture(scope="module")
def rt(side: Side) -> boxlite.Boxlite:
    return side.rt


def options(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    kwargs.setdefault("auto_remove", False)
    return boxlite.BoxOptions(rootfs_path=layout, cpus=1, memory_mib=256, **kwargs)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def box(rt: boxlite.Boxlite, image_layout: Path) -> AsyncIterator[boxlite.Box]:
    made = await rt.create(options(image_layout, env={"FROM_BOX": "box-env"}), name="shared")
    yield made
    await rt.remove("shared", force=True)


async def run(box: boxlite.Box, *argv: str, **kwargs: object) -> boxlite.ExecResult:
    return await (await box.exec(argv[0], list(argv[1:]), **kwargs)).wait()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- boxes


@shared_loop
async def test_create_get_list_stop_start_remove(rt: boxlite.Boxlite, image_layout: Path, box: boxlite.Box) -> None:
    life = await rt.create(options(image_layout), name="life")
    info = life.info()
    assert (info.name, info.status, info.running, info.cpus, info.memory_mib) == ("life", "running", True, 1, 256)
    assert (await life.info()).id == life.id  # awaitable too, as locally
    assert life.default_command == ["sh"] and box.default_command == ["sh"]

    for ref in ("life", life.id):
        got = await rt.get(ref)
        assert got is not None and (got.id, got.name) == (life.id, "life")
        got_info = await rt.get_info(ref)
        assert got_info is not None and (got_info.id, got_info.status) == (life.id, "running")
    listed = await rt.list_info()
    assert {i.name for i in listed} == {"shared", "life"}
    assert [i.name for i in listed if i.id == life.id] == ["life"]
    assert {i.name for i in await rt.list_info("running")} == {"shared", "life"}
    assert await rt.list_info("stopped") == []

    with pytest.raises(boxlite.AlreadyExistsError):
        await rt.create(options(image_layout), name="life")
    with pytest.raises(boxlite.InvalidArgumentError, match="working_dir"):
        await rt.create(options(image_layout, working_dir="relative"), name="bad")
    assert await rt.get("bad") is None

    await life.stop()
    assert life.info().status == "stopped" and not life.info().running
    assert [i.name for i in await rt.list_info("stopped")] == ["life"]
    await life.start()
    assert life.info().status == "running"
    assert (await run(life, "echo", "back")).stdout == "back\n"
    await life.stop()
    assert (await run(life, "echo", "started")).stdout == "started\n"  # exec starts a stopped box

    with pytest.raises(boxlite.InvalidStateError):
        await rt.remove("life")  # running: needs force
    await rt.remove("life", force=True)
    assert await rt.get("life") is None and await rt.get_info(life.id) is None
    with pytest.raises(boxlite.BoxNotFoundError):
        await rt.remove("life")
    assert [i.name for i in await rt.list_info()] == ["shared"]


@shared_loop
async def test_metrics(rt: boxlite.Boxlite, box: boxlite.Box) -> None:
    before = (await box.metrics()).commands_run_total
    await run(box, "true")
    await run(box, "false")
    after = await box.metrics()
    assert after.commands_run_total == before + 2
    runtime_metrics = rt.metrics()
    assert runtime_metrics.num_running_boxes >= 1 and runtime_metrics.boxes_created_total >= 1
    assert (await rt.metrics()).total_commands_run >= 2


# ---------------------------------------------------------------------------- exec


@shared_loop
async def test_exec_output_exit_code_and_streams(box: boxlite.Box) -> None:
    result = await run(box, "sh", "-c", "echo out; printf 'no newline' >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr, result.signal) == (3, "out\n", "no newline", None)
    assert not result.success and result.error_message is None

    execution = await box.exec("sh", ["-c", "echo one; echo two; echo err >&2"])
    assert execution.pid > 0 and isinstance(execution.id, str) and execution.id() == execution.id
    assert [line async for line in execution.stdout()] == ["one\n", "two\n"]
    assert [line async for line in execution.stdout()] == []  # taken once
    result = await execution.wait()
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "err\n")  # stdout was taken

    execution = await box.exec("sh", ["-c", "head -c 300000 /dev/zero | tr '\\0' x"])
    chunks = [chunk async for chunk in execution.stdout(binary=True)]
    assert all(isinstance(c, bytes) for c in chunks) and b"".join(chunks) == b"x" * 300000
    assert (await execution.wait()).stdout_bytes == b""

    with pytest.raises(boxlite.ExecStartError):
        await run(box, "/no/such/program")


@shared_loop
async def test_exec_env_cwd_and_user(box: boxlite.Box) -> None:
    result = await run(
        box, "sh", "-c", 'echo "$FROM_BOX $MINE"; pwd; id -u', env={"MINE": "mine"}, cwd="/tmp", user="1234"
    )
    assert result.stdout == "box-env mine\n/tmp\n1234\n"
    result = await run(box, "sh", "-c", "echo $A$B", env=[("A", "pairs"), ("B", "!")])
    assert result.stdout == "pairs!\n"
    with pytest.raises(boxlite.InvalidArgumentError, match="cwd"):
        await box.exec("pwd", cwd="relative")
    with pytest.raises(boxlite.InvalidArgumentError, match="env"):
        await box.exec("env", env="A=1")  # type: ignore[arg-type]


@shared_loop
async def test_exec_streams_live_and_takes_stdin(box: boxlite.Box) -> None:
    execution = await box.exec("sh", ["-c", "echo ready; read line; echo got $line; cat"])
    lines = execution.stdout()
    assert await lines.__anext__() == "ready\n"  # out while the command still waits for input
    stdin = execution.stdin()
    assert stdin is not None and execution.stdin() is None
    await stdin.write("first\n")
    assert await lines.__anext__() == "got first\n"
    await stdin.send_input(b"piped ")
    await stdin.write("bytes")
    await stdin.close()
    assert stdin.is_closed()
    with pytest.raises(boxlite.InvalidArgumentError, match="closed"):
        await stdin.write("more")
    assert [line async for line in lines] == ["piped bytes"]
    assert (await execution.wait()).exit_code == 0

    # wait() without taking stdin closes it, as locally: cat ends.
    assert (await (await box.exec("cat")).wait()).stdout == ""

    payload = os.urandom(1 << 20)  # more than any single message or window on the way
    execution = await box.exec("sh", ["-c", "cat; echo done >&2"])
    stdin = execution.stdin()
    assert stdin is not None
    await stdin.write(payload)
    await stdin.close()
    result = await execution.wait()
    assert (result.stdout_bytes, result.stderr) == (payload, "done\n")


@shared_loop
async def test_exec_timeout(box: boxlite.Box) -> None:
    execution = await box.exec("sleep", ["60"], timeout_secs=1)
    with pytest.raises(boxlite.ExecTimeoutError, match="timed out after 1s"):
        await execution.wait()
    with pytest.raises(boxlite.InvalidArgumentError, match="timeout"):
        await box.exec("true", timeout_secs=-1)


async def pid_running(box: boxlite.Box, pid: int) -> bool:
    return (await run(box, "kill", "-0", str(pid))).exit_code == 0


@shared_loop
async def test_exec_kill_signal_and_cancelled_wait(box: boxlite.Box) -> None:
    execution = await box.exec("sleep", ["60"])
    with pytest.raises(boxlite.InvalidArgumentError, match="not a signal number"):
        execution.kill(0)
    execution.kill()
    result = await execution.wait()
    assert (result.exit_code, result.signal) == (137, 9)

    execution = await box.exec("sh", ["-c", "trap 'echo term; exit 7' TERM; echo armed; while :; do sleep 1; done"])
    lines = execution.stdout()
    assert await lines.__anext__() == "armed\n"
    await execution.signal(15)  # awaitable, as in the published package
    assert [line async for line in lines] == ["term\n"]
    assert (await execution.wait()).exit_code == 7

    execution = await box.exec("sleep", ["60"])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(execution.wait(), 1.0)  # cancelling the wait kills the command
    for _ in range(100):
        if not await pid_running(box, execution.pid):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the command outlived its cancelled wait")


@shared_loop
async def test_exec_tty_resize_and_default_command(box: boxlite.Box) -> None:
    execution = await box.exec("sh", ["-c", "stty size; read x; stty size"], tty=(24, 80))
    lines = execution.stdout()
    assert (await lines.__anext__()).strip() == "24 80"
    with pytest.raises(boxlite.InvalidArgumentError, match="terminal size"):
        execution.resize_tty(0, 100)
    execution.resize_tty(30, 100)
    stdin = execution.stdin()
    assert stdin is not None
    await stdin.write("\n")
    rest = "".join([line async for line in lines])
    assert rest.split()[-2:] == ["30", "100"]
    assert (await execution.wait()).stderr == ""  # a terminal has one output
    with pytest.raises(boxlite.InvalidArgumentError, match="tty"):
        await box.exec("true", tty=(0, 80))

    execution = await box.exec(None, ["-c", "echo default $0"])  # the image's default command: sh
    assert (await execution.wait()).stdout == "default sh\n"


# ---------------------------------------------------------------------------- files


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "empty-dir").mkdir()
    (tree / "hello.txt").write_text("hello\n")
    (tree / "sub" / "data.bin").write_bytes(bytes(range(256)) * 400 + b"\0" * 70000)
    (tree / "sub" / "deeper" / "empty").write_bytes(b"")
    script = tree / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    (tree / "sub" / "link").symlink_to("../hello.txt")
    return tree


def snapshot(tree: Path) -> dict[str, tuple[str, object]]:
    """What a tree holds: kinds, contents, link targets and the executable bit."""
    out: dict[str, tuple[str, object]] = {}
    for path in sorted(tree.rglob("*")):
        rel = str(path.relative_to(tree))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", None)
        else:
            out[rel] = ("file", (path.read_bytes(), bool(path.stat().st_mode & stat.S_IXUSR)))
    return out


@shared_loop
async def test_copy_a_tree_in_and_out(box: boxlite.Box, tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    await box.copy_in(tree, "/root/copied")
    assert (await run(box, "cat", "/root/copied/sub/link")).stdout == "hello\n"
    assert (await run(box, "/root/copied/run.sh")).stdout == "ran\n"
    await box.copy_in(tree / "hello.txt", "/root/copied/")  # into a directory: trailing slash
    before = (await run(box, "stat", "-c", "%a %u", "/tmp")).stdout
    await box.copy_in(tree / "hello.txt", "/tmp/")
    assert (await run(box, "stat", "-c", "%a %u", "/tmp")).stdout == before  # the directory is left as it was
    await box.copy_in(tree / "run.sh", "/root/copied/sub")  # a file onto a directory lands inside
    assert await box.list_dir("/root/copied/sub") == ["data.bin", "deeper", "link", "run.sh"]

    out = tmp_path / "out"
    out.mkdir()
    await box.copy_out("/root/copied", out / "back")
    expected = snapshot(tree)
    expected["sub/run.sh"] = expected["run.sh"]
    assert snapshot(out / "back") == expected
    await box.copy_out("/root/copied", out / "back")  # an existing directory: lands inside
    assert snapshot(out / "back" / "copied") == expected
    await box.copy_out("/root/copied/hello.txt", out)
    assert (out / "hello.txt").read_text() == "hello\n"
    (out / "hello.txt").write_text("old")
    await box.copy_out("/root/copied/hello.txt", out / "hello.txt")  # replaces a file
    assert (out / "hello.txt").read_text() == "hello\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".boxlite-copy-")]

    with pytest.raises(boxlite.InvalidArgumentError, match="max_bytes"):
        await box.copy_out("/root/copied", out / "capped", max_bytes=1000)
    assert not (out / "capped").exists()
    with pytest.raises(boxlite.AlreadyExistsError):
        await box.copy_out("/root/copied/hello.txt", out, boxlite.CopyOptions(overwrite=False))
    with pytest.raises(boxlite.InvalidArgumentError, match="recursive"):
        await box.copy_out("/root/copied", out / "flat", boxlite.CopyOptions(recursive=False))
    with pytest.raises(boxlite.InvalidArgumentError, match="recursive"):
        await box.copy_in(tree, "/root/flat", boxlite.CopyOptions(recursive=False))
    with pytest.raises(boxlite.InvalidArgumentError, match="absolute"):
        await box.copy_in(tree, "relative")
    with pytest.raises(boxlite.InvalidArgumentError, match="/proc"):
        await box.copy_out("/proc/version", out)
    with pytest.raises(boxlite.BoxliteIOError):
        await box.copy_in(tmp_path / "missing", "/root/")
    with pytest.raises(boxlite.UnsupportedError):
        await box.copy_out("/root/copied", out, boxlite.CopyOptions(follow_symlinks=True))


@shared_loop
async def test_read_write_and_list_files(box: boxlite.Box) -> None:
    await box.write_file("/root/notes/a.txt", "text\n")
    await box.write_file("/root/notes/b.bin", b"\0\1\2", mode=0o600)
    assert await box.read_file("/root/notes/a.txt") == b"text\n"
    assert await box.read_file("/root/notes/b.bin") == b"\0\1\2"
    assert (await run(box, "stat", "-c", "%a", "/root/notes/b.bin")).stdout == "600\n"
    assert await box.list_dir("/root/notes") == ["a.txt", "b.bin"]
    await box.write_file("/root/notes/a.txt", "replaced")
    assert await box.read_file("/root/notes/a.txt") == b"replaced"

    with pytest.raises(boxlite.InvalidArgumentError, match="max_bytes"):
        await box.read_file("/root/notes/a.txt", max_bytes=3)
    with pytest.raises(boxlite.InvalidArgumentError):
        await box.read_file("/root/notes/missing")
    with pytest.raises(boxlite.InvalidArgumentError, match="not a regular file"):
        await box.read_file("/root/notes")
    with pytest.raises(boxlite.InvalidArgumentError, match="directory"):
        await box.write_file("/root/notes", "x")
    with pytest.raises(boxlite.InvalidArgumentError, match="cannot list"):
        await box.list_dir("/root/none")


# ---------------------------------------------------------------------------- the sync API


def test_sync_api(side: Side, image_layout: Path) -> None:
    with side.sync_runtime() as sync_rt:
        box = sync_rt.create(options(image_layout), name="sync")
        execution = box.exec("sh", ["-c", "echo one; echo err >&2; exit 2"])
        assert list(execution.stdout()) == ["one\n"]
        result = execution.wait()
        assert (result.exit_code, result.stdout, result.stderr) == (2, "", "err\n")
        execution = box.exec("tr", ["a-z", "A-Z"])
        execution.write_stdin("abc", close=True)
        assert execution.wait().stdout == "ABC"
        with pytest.raises(boxlite.ExecTimeoutError):
            box.exec("sleep", ["60"], timeout_secs=1).wait()
        sleeping = box.exec("sleep", ["60"])
        sleeping.kill()  # from this thread, not the event loop's
        assert sleeping.wait().exit_code == 137
        box.write_file("/root/sync.txt", "sync\n")
        assert box.read_file("/root/sync.txt") == b"sync\n" and box.list_dir("/root") == ["sync.txt"]
        assert box.info().status == "running" and box.default_command == ["sh"]
        assert box.metrics().commands_run_total >= 3 and sync_rt.metrics().total_commands_run >= 3
        assert [i.name for i in sync_rt.list_info("running")] == ["sync"]
        box.stop()
        assert sync_rt.get_info("sync").status == "stopped"  # type: ignore[union-attr]
        again = sync_rt.get("sync")
        assert again is not None and again.exec("echo", ["back"]).wait().stdout == "back\n"
        with pytest.raises(boxlite.AlreadyExistsError):
            sync_rt.create(options(image_layout), name="sync")
        sync_rt.remove("sync", force=True)
        assert sync_rt.get("sync") is None and sync_rt.list_info() == []
        with pytest.raises(boxlite.BoxNotFoundError):
            sync_rt.remove("sync")
