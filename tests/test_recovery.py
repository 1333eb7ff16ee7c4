"""What a crash, a full disk or a race leaves behind: nothing. Creations whose creator died are
rolled back, a dead engine is noticed by start() itself, a full home is a storage error at once,
a dropped handle does not stop its box, and many create/exec/stop/remove cycles leave fds,
processes and the home flat. Real VMs, real processes killed with SIGKILL, a real full
filesystem (a loop-mounted ext4)."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import engine_pids, make_runtime, pid_alive, run, settle_templates


def small(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    return boxlite.BoxOptions(rootfs_path=layout, memory_mib=256, **kwargs)  # type: ignore[arg-type]


CREATOR = textwrap.dedent(
    """
    import asyncio, sys, boxlite
    async def main():
        rt = boxlite.Boxlite(boxlite.Options(home_dir=sys.argv[1]))
        print("creating", flush=True)
        await rt.create(boxlite.BoxOptions(rootfs_path=sys.argv[2], memory_mib=256, name="named",
                                           detach=sys.argv[3] == "detach", auto_remove=False))
        print("created", flush=True)
        await asyncio.sleep(600)
    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    ("delay", "detach"),
    [(0.3, False), (0.8, False), (1.5, False), (0.3, True), (0.8, True), (1.5, True)],
)
async def test_a_creator_killed_mid_create_leaves_nothing_and_frees_the_name(
    home: Path, image_layout: Path, delay: float, detach: bool
) -> None:
    # The base disk exists already, so the kill points fall into the record, spawn and boot.
    await make_runtime(home).create(small(image_layout, name="warm", auto_remove=False))
    proc = subprocess.Popen(
        [sys.executable, "-c", CREATOR, str(home), str(image_layout), "detach" if detach else "attached"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "creating\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rt = make_runtime(home)
    box = await rt.create(small(image_layout, name="named"))  # the name is free again
    assert (await run(box, "echo", "ok")).stdout == "ok\n"
    await box.stop()
    # Nothing of the killed creation is left: no record, no directory, no engine.
    assert {i.name for i in await rt.list_info()} == {"warm"}
    assert len(list((home / "boxes").iterdir())) == 1
    await rt.remove("warm", force=True)
    for _ in range(100):
        if not [p for p in engine_pids(str(home)) if pid_alive(p)]:
            break
        await asyncio.sleep(0.1)


async def test_start_right_after_the_engine_died_starts_it(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(small(image_layout, auto_remove=False))
    for _ in range(5):
        engine = box.info().pid
        assert engine is not None
        os.kill(engine, signal.SIGKILL)
        await box.start()  # at once: not "it is running"
        assert box.info().status == "running" and box.info().pid != engine
        assert (await run(box, "echo", "again")).stdout == "again\n"
    await box.stop()


async def test_a_dropped_handle_does_not_stop_its_box(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home)
    box = await rt.create(small(image_layout, name="kept"))
    engine = box.info().pid
    del box
    gc.collect()
    await asyncio.sleep(1)
    again = await rt.get("kept")
    assert again is not None and again.info().pid == engine and pid_alive(engine or 0)
    assert (await run(again, "echo", "still here")).stdout == "still here\n"
    del again
    gc.collect()
    await rt.close()  # the runtime stops what it started
    assert not pid_alive(engine or 0)


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Path]:
    """A home on its own 160 MiB ext4 filesystem (loop-mounted), to fill up."""
    image = tmp_path / "fs.img"
    mount = tmp_path / "fs"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(160 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    home = mount / "home"
    try:
        yield home
    finally:
        for pid in engine_pids(str(home)):
            if pid_alive(pid):
                os.kill(pid, 9)
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_home_is_a_storage_error_at_once(small_home: Path, image_layout: Path) -> None:
    rt = make_runtime(small_home)
    box = await rt.create(small(image_layout, auto_remove=False))  # base disk and one box fit
    await box.stop()
    filler = small_home / "filler"
    free = shutil.disk_usage(small_home).free
    with filler.open("wb") as f:
        f.write(b"\0" * (free - 4 * 1024 * 1024))  # real blocks, not a sparse file
    started = time.monotonic()
    with pytest.raises(boxlite.StorageError, match=r"(?i)no space left"):
        await rt.create(small(image_layout, name="too-much"))
    assert time.monotonic() - started < 15, "refused at once, not after a boot timeout"
    with pytest.raises(boxlite.StorageError, match=r"(?i)no space left"):
        await box.start()
    assert box.info().status in ("stopped", "failed")
    assert {i.name for i in await rt.list_info()} == {None}, "no record of the refused box"
    filler.unlink()
    await box.start()  # space again: it runs
    assert (await run(box, "echo", "room")).stdout == "room\n"
    await box.stop()


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def home_size(home: Path) -> int:
    return sum(f.stat().st_blocks for f in home.rglob("*") if f.is_file() and not f.is_symlink()) * 512


@pytest.mark.slow
async def test_many_create_exec_stop_remove_cycles_stay_flat(home: Path, image_layout: Path) -> None:
    """A soak: 200 cycles; descriptors, threads, host processes and the home's size do not
    grow. The boxes start from a memory template, as they do by default."""
    rt = make_runtime(home, templates=True)
    options = small(image_layout)
    await (await rt.create(options)).stop()  # the base disk and the template, outside the measurement
    settle_templates(home)

    def sample() -> tuple[int, int, int, int]:
        gc.collect()
        children = subprocess.run(["pgrep", "-c", "-P", str(os.getpid())], capture_output=True, text=True)
        return fds(), threads(), int(children.stdout.strip() or 0), home_size(home)

    samples = []
    for cycle in range(200):
        box = await rt.create(options)
        assert (await run(box, "echo", str(cycle))).stdout == f"{cycle}\n"
        if cycle == 0:
            assert (await box.metrics()).started_from_template
        await box.stop()  # removed at stop (the default)
        if cycle in (20, 199):
            samples.append(sample())
    (fds_a, threads_a, children_a, size_a), (fds_b, threads_b, children_b, size_b) = samples
    assert fds_b <= fds_a + 2, (fds_a, fds_b)
    assert threads_b <= threads_a + 2, (threads_a, threads_b)
    assert children_b <= children_a, (children_a, children_b)
    assert size_b <= size_a + 1024 * 1024, (size_a, size_b)
    assert await rt.list_info() == []
    assert [p for p in engine_pids(str(home)) if pid_alive(p)] == []
