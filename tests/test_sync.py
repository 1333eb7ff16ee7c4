"""The blocking API (`boxlite.sync`): in a plain script, inside a running event loop (as in a
notebook cell), from several threads, and interrupted with Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import boxlite
from boxlite.sync import SyncBox, SyncBoxlite, SyncCodeBox, SyncSimpleBox
from testkit.images import python_layout


@pytest.fixture
def sync_runtime(home: Path) -> Iterator[SyncBoxlite]:
    with SyncBoxlite(boxlite.Options(home_dir=home)) as rt:
        yield rt


def opts(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    kwargs.setdefault("auto_remove", False)
    return boxlite.BoxOptions(rootfs_path=layout, memory_mib=256, **kwargs)  # type: ignore[arg-type]


def ps_args(box: SyncBox) -> str:
    return box.exec("ps", ["-o", "args"]).wait().stdout


def test_plain_script_use(sync_runtime: SyncBoxlite, image_layout: Path) -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # really no loop here
    box = sync_runtime.create(opts(image_layout), name="plain")
    assert sync_runtime.home_dir == sync_runtime.runtime.home_dir
    ex = box.exec("sh", ["-c", "echo one; echo two; echo err >&2; exit 2"])
    assert list(ex.stdout()) == ["one\n", "two\n"]
    result = ex.wait()
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", "err\n")

    ex = box.exec("cat")
    stdin = ex.stdin()
    assert stdin is not None and ex.stdin() is None
    with stdin:
        stdin.send_input(b"piped ")
        stdin.write("text")
    assert stdin.is_closed()
    assert ex.wait().stdout == "piped text"
    ex = box.exec("tr", ["a-z", "A-Z"])
    ex.write_stdin("abc", close=True)
    assert ex.wait().stdout == "ABC"
    with pytest.raises(boxlite.BoxliteError, match="closed"):
        ex.write_stdin("more")

    box.write_file("/root/sync.txt", "sync\n")
    assert box.read_file("/root/sync.txt") == b"sync\n"
    assert box.list_dir("/root") == ["sync.txt"]
    assert box.info().status == "running" and box.default_command == ["sh"]
    assert box.metrics().commands_executed_total >= 4
    assert sync_runtime.metrics().total_commands_run >= 4

    again, created = sync_runtime.get_or_create(opts(image_layout), name="plain")
    assert (again.id, created) == (box.id, False)
    assert [i.name for i in sync_runtime.list_info("running")] == ["plain"]
    box.stop()
    assert sync_runtime.get_info("plain").status == "stopped"
    sync_runtime.get("plain").start()
    assert sync_runtime.get("plain").exec("echo", ["back"]).wait().stdout == "back\n"
    sync_runtime.remove("plain", force=True)
    assert sync_runtime.list_info() == []
    assert sync_runtime.images.list() == []
    with pytest.raises(boxlite.ImageNotFoundError):
        sync_runtime.images.get("nothing:here")


def test_inside_a_running_event_loop_like_a_notebook_cell(home: Path, image_layout: Path) -> None:
    seen: dict[str, object] = {}

    async def cell() -> None:
        loop = asyncio.get_running_loop()
        # What a notebook user types: blocking calls, right inside the running loop.
        with SyncBoxlite(boxlite.Options(home_dir=home)) as rt:
            box = rt.create(opts(image_layout))
            ex = box.exec("sh", ["-c", "for i in 1 2 3; do echo $i; done"])
            seen["lines"] = list(ex.stdout())
            seen["code"] = ex.wait().exit_code
            with SyncSimpleBox(rootfs_path=image_layout, memory_mib=256, runtime=rt) as simple:
                seen["simple"] = simple.exec("echo", "simple").stdout
                seen["created"] = simple.created
            box.stop()
            seen["boxes"] = [i.status for i in rt.list_info()]
        seen["same loop"] = asyncio.get_running_loop() is loop

    asyncio.run(cell())
    assert seen == {
        "lines": ["1\n", "2\n", "3\n"],
        "code": 0,
        "simple": "simple\n",
        "created": True,
        "boxes": ["stopped"],  # the SimpleBox removed itself
        "same loop": True,
    }


def test_many_threads_share_one_box(sync_runtime: SyncBoxlite, image_layout: Path) -> None:
    box = sync_runtime.create(opts(image_layout))

    def work(i: int) -> str:
        return box.exec("sh", ["-c", f"echo thread-{i}"]).wait().stdout

    with ThreadPoolExecutor(max_workers=6) as pool:
        outputs = list(pool.map(work, range(12)))
    assert outputs == [f"thread-{i}\n" for i in range(12)]
    box.stop()


def test_calling_from_the_sync_loop_itself_is_refused(sync_runtime: SyncBoxlite) -> None:
    from boxlite import sync

    async def from_inside() -> None:
        sync_runtime.list_info()

    future = asyncio.run_coroutine_threadsafe(from_inside(), sync._background_loop())
    with pytest.raises(boxlite.InvalidStateError, match="own event loop"):
        future.result(timeout=60)


def test_ctrl_c_during_wait_kills_the_command(home: Path, image_layout: Path) -> None:
    with SyncBoxlite(boxlite.Options(home_dir=home)) as rt:
        box = rt.create(opts(image_layout, detach=True), name="target")
        script = textwrap.dedent(
            f"""
            import threading, time, boxlite
            from boxlite.sync import SyncBoxlite
            rt = SyncBoxlite(boxlite.Options(home_dir={str(home)!r}))
            box = rt.get("target")
            ex = box.exec("sleep", ["305"])
            # Says so once the main thread is (all but certainly) blocked in wait().
            threading.Timer(0.5, lambda: print("started", flush=True)).start()
            try:
                ex.wait()
            except KeyboardInterrupt:
                for _ in range(100):  # still connected: watch the command disappear
                    if "sleep 305" not in box.exec("ps", ["-o", "args"]).wait().stdout:
                        print("gone", flush=True)
                        break
                    time.sleep(0.1)
            """
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert (proc.returncode, out) == (0, "gone\n"), err
        assert "sleep 305" not in ps_args(box)
        rt.remove("target", force=True)


def test_sync_codebox(home: Path) -> None:
    with (
        SyncBoxlite(boxlite.Options(home_dir=home)) as rt,
        SyncCodeBox(rootfs_path=python_layout(), runtime=rt) as codebox,
    ):
        assert codebox.run("print('sync code')") == "sync code\n"
        with pytest.raises(boxlite.ExecError, match="ZeroDivisionError"):
            codebox.run("1 / 0")
        with pytest.raises(boxlite.ExecTimeoutError):
            codebox.run("import time; time.sleep(60)", timeout=1)
