"""Box lifecycle: states, persistence, detach and reattach from other processes, crash
recovery, removal, many boxes at once, disk size and a full disk."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import boxlite
from conftest import engine_pids, make_runtime, pid_alive, run, settle_templates


def options(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    """Small boxes that stay when stopped (the published default removes them)."""
    kwargs.setdefault("auto_remove", False)
    return boxlite.BoxOptions(rootfs_path=layout, memory_mib=256, **kwargs)  # type: ignore[arg-type]


def python(script: str, timeout: float = 300) -> str:
    """Runs a Python snippet in a fresh process; returns its stdout."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def test_wrong_states_names_and_unknown_boxes(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(options(image_layout, name="first"))
    with pytest.raises(boxlite.InvalidStateError, match="running"):
        await box.start()
    with pytest.raises(boxlite.AlreadyExistsError, match="already exists"):
        await runtime.create(options(image_layout, name="first"))
    with pytest.raises(boxlite.InvalidStateError, match="force"):
        await runtime.remove("first")
    assert await runtime.get("ghost") is None
    assert await runtime.get_info("ghost") is None
    with pytest.raises(boxlite.BoxNotFoundError):
        await runtime.remove("01ARZ3NDEKTSV4RRFFQ69G5FAV")

    same = await runtime.get("first")
    assert same is not None and same.id == box.id
    info = await runtime.get_info(box.id.lower())
    assert (info.name, info.status, info.state.running, info.cpus, info.memory_mib) == (
        "first",
        "running",
        True,
        1,
        256,
    )
    assert info.pid is not None and pid_alive(info.pid)
    assert info.started_at is not None and info.created_at <= info.started_at

    await runtime.remove("first", force=True)
    assert not pid_alive(info.pid)
    assert [i.id for i in await runtime.list_info()] == []
    assert not (runtime.home_dir / "boxes" / box.id).exists()


async def test_stopped_boxes_are_listed_and_removable(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    a = await runtime.create(options(image_layout, name="a"))
    b = await runtime.create(options(image_layout))
    await a.stop()
    listed = {i.id: i.status for i in await runtime.list_info()}
    assert listed == {a.id: "stopped", b.id: "running"}
    await runtime.remove(a.id)
    assert [i.id for i in await runtime.list_info()] == [b.id]
    await b.stop()


async def test_auto_remove_deletes_disk_and_record_at_stop(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(options(image_layout, auto_remove=True))
    box_dir = box.dir
    assert (box_dir / "disk.qcow2").exists()
    await box.stop()
    assert not box_dir.exists()
    assert await runtime.list_info() == []


async def test_a_detached_box_outlives_its_creator_and_is_reattached(home: Path, image_layout: Path) -> None:
    created = python(
        f"""
        import asyncio, boxlite
        async def main():
            rt = boxlite.Boxlite(boxlite.Options(home_dir={str(home)!r}))
            box = await rt.create(boxlite.BoxOptions(rootfs_path={str(image_layout)!r}, memory_mib=256,
                                                     name="keeper", detach=True, auto_remove=False))
            ex = await box.exec("sh", ["-c", "echo persisted > /root/note"])
            await ex.wait()
            print(box.id)
        asyncio.run(main())
        """
    )
    rt = make_runtime(home)
    info = await rt.get_info("keeper")
    assert (info.id, info.status, info.detach) == (created, "running", True)
    box = await rt.get("keeper")
    assert (await run(box, "cat", "/root/note")).stdout == "persisted\n"

    # A third process sees and uses it too, while we hold it.
    third = python(
        f"""
        import asyncio, boxlite
        async def main():
            rt = boxlite.Boxlite(boxlite.Options(home_dir={str(home)!r}))
            box = await rt.get("keeper")
            ex = await box.exec("cat", ["/root/note"])
            print((await ex.wait()).stdout.strip())
        asyncio.run(main())
        """
    )
    assert third == "persisted"
    await box.stop()
    assert (await rt.get_info("keeper")).status == "stopped"
    settle_templates(home)  # the creator's runtime left a template maker behind
    assert [p for p in engine_pids(str(home)) if pid_alive(p)] == []
    await box.start()
    assert (await run(box, "cat", "/root/note")).stdout == "persisted\n"
    await rt.remove("keeper", force=True)


async def test_a_killed_host_process_is_recovered(home: Path, image_layout: Path) -> None:
    """kill -9 of the creating process: its attached box dies with it, the detached one
    lives on, and the next runtime on the home sees exactly that."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import asyncio, boxlite, time
                async def main():
                    rt = boxlite.Boxlite(boxlite.Options(home_dir={str(home)!r}))
                    o = dict(rootfs_path={str(image_layout)!r}, memory_mib=256)
                    a = await rt.create(boxlite.BoxOptions(name="attached", auto_remove=False, **o))
                    d = await rt.create(boxlite.BoxOptions(name="detached", detach=True, auto_remove=False, **o))
                    print(a.info().pid, d.info().pid, flush=True)
                    time.sleep(600)
                asyncio.run(main())
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    attached_pid, detached_pid = map(int, line.split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    deadline = time.monotonic() + 10
    while pid_alive(attached_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not pid_alive(attached_pid), "the attached box's VM outlived its creator"
    assert pid_alive(detached_pid)

    rt = make_runtime(home)
    states = {i.name: i.status for i in await rt.list_info()}
    assert states == {"attached": "stopped", "detached": "running"}
    detached = await rt.get("detached")
    assert (await run(detached, "echo", "still here")).stdout == "still here\n"
    attached = await rt.get("attached")
    await attached.start()
    assert (await run(attached, "echo", "back")).stdout == "back\n"
    await rt.remove("attached", force=True)
    await rt.remove("detached", force=True)
    assert not pid_alive(detached_pid)


async def test_killing_the_vm_mid_exec_fails_the_exec_fast_and_the_box_restarts(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    box = await runtime.create(options(image_layout))
    await run(box, "sh", "-c", "echo kept > /root/state; sync")
    ex = await box.exec("sleep", ["60"])
    engine = box.info().pid
    assert engine is not None
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(boxlite.GuestProtocolError, match="exited"):
        await ex.wait()
    assert loop.time() - killed_at < 1.0
    deadline = loop.time() + 5
    while box.info().status != "stopped" and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert box.info().status == "stopped"
    # exec on a stopped box starts it again (as in the published package).
    assert (await run(box, "cat", "/root/state")).stdout == "kept\n"
    assert box.info().status == "running"
    await box.stop()


async def test_two_runtimes_share_one_home(home: Path, image_layout: Path) -> None:
    one = make_runtime(home)
    two = make_runtime(home)
    box = await one.create(options(image_layout, name="shared"))
    other = await two.get("shared")
    assert (await run(other, "echo", "from two")).stdout == "from two\n"
    await other.stop()
    assert box.info().status == "stopped"
    await one.remove("shared")


async def test_eight_boxes_boot_at_once(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    boxes = await asyncio.gather(*(runtime.create(options(image_layout)) for _ in range(8)))
    results = await asyncio.gather(*(run(b, "sh", "-c", f"echo box-{i}") for i, b in enumerate(boxes)))
    assert [r.stdout for r in results] == [f"box-{i}\n" for i in range(8)]
    assert runtime.metrics().num_running_boxes == 8
    assert len({b.info().pid for b in boxes}) == 8
    await asyncio.gather(*(b.stop() for b in boxes))
    assert runtime.metrics().num_running_boxes == 0


async def test_disk_size_grows_the_filesystem_and_a_full_disk_is_enospc(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    big = await runtime.create(options(image_layout, disk_size_gb=3))
    metrics = await big.metrics()
    assert metrics.disk_bytes_total is not None and metrics.disk_bytes_total > 2.5 * 1024**3
    await big.stop()

    small = await runtime.create(options(image_layout))
    neighbour = await runtime.create(options(image_layout))
    full = await run(small, "sh", "-c", "dd if=/dev/zero of=/root/fill bs=1M 2>&1; echo rc=$?")
    assert "No space left on device" in full.stdout
    assert "rc=1" in full.stdout
    assert (await run(small, "echo", "alive")).stdout == "alive\n"
    assert (await run(neighbour, "sh", "-c", "echo ok > /root/x && cat /root/x")).stdout == "ok\n"
    await small.stop()
    await neighbour.stop()
