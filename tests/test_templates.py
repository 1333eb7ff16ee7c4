"""Boxes that start from a memory template (issue 12): the first box of an image and shape is
booted cold and a template is made from it in the background; later boxes of that key restore
it, each with its own identity, clock, entropy and disk. Real VMs, real QEMU migration files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import engine_pids, make_runtime, pid_alive, run, settle_templates
from testkit.hostserver import HostServer
from testkit.images import built_images
from testkit.registry import Registry

MEMORY = 256
HOST_ALIAS = "host.boxlite.internal"


def options(image_layout: Path, **extra: object) -> boxlite.BoxOptions:
    return boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=MEMORY, **extra)  # type: ignore[arg-type]


def builds(home: Path) -> list[Path]:
    root = home / "templates" / "builds"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in ("state", "overlay.qcow2", "clone.qcow2", "ram"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


async def first_box_makes_a_template(rt: boxlite.Boxlite, home: Path, image_layout: Path) -> Path:
    box = await rt.create(options(image_layout))
    assert not (await box.metrics()).started_from_template
    await box.stop()
    settle_templates(home)
    made = builds(home)
    assert len(made) == 1, f"expected one template, found {made}"
    return made[0]


async def sh(box: boxlite.Box, script: str) -> str:
    result = await run(box, "sh", "-c", script)
    assert result.exit_code == 0, result.stderr
    return result.stdout


async def test_boxes_from_one_template_are_distinct_and_isolated(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home, templates=True)
    template = await first_box_makes_a_template(rt, home, image_layout)
    before = digest(template)

    boxes = [await rt.create(options(image_layout, name=f"clone-{i}")) for i in range(5)]
    try:
        assert all([(await b.metrics()).started_from_template for b in boxes])
        # A restored engine is handed only the kernel's setup header (QEMU keeps whatever
        # -kernel names in memory) and no initramfs.
        argvs = [(Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0") for pid in engine_pids(str(home))]
        restored = [argv for argv in argvs if b"-incoming" in argv]
        assert len(restored) == 5
        for argv in restored:
            kernel = Path(argv[argv.index(b"-kernel") + 1].decode())
            assert kernel.name.startswith("resume-") and kernel.stat().st_size < 64 * 1024, kernel
            assert b"-initrd" not in argv
        probe = (
            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
            "cat /proc/sys/kernel/random/uuid; hostname; date +%s"
        )
        seen = []
        for b in boxes:
            asked = time.time()
            out = (await sh(b, probe)).split()
            seen.append(out)
            assert asked - 2 <= int(out[3]) <= time.time() + 2, f"the guest clock is off: {out[3]} vs {asked}"
        randoms = [s[0] for s in seen]
        uuids = [s[1] for s in seen]
        assert len(set(randoms)) == 5, f"boxes share random output: {randoms}"
        assert len(set(uuids)) == 5
        assert [s[2] for s in seen] == [f"clone-{i}" for i in range(5)]
        # Each disk is its own overlay on the frozen template disk.
        await sh(boxes[0], "echo mine > /only-in-0 && sync")
        assert await sh(boxes[1], "ls /only-in-0 2>/dev/null || echo absent") == "absent\n"
        # The network is the box's own (its MAC is set again after the restore).
        macs = {await sh(b, "cat /sys/class/net/eth0/address") for b in boxes}
        assert len(macs) == 5
        # The link came up in the template; a clone's own MAC on it carries its traffic both
        # ways, and its resolver files are its own.
        with HostServer(b"served to a clone") as server:
            boxes.append(
                await rt.create(
                    options(image_layout, name="online", network=boxlite.NetworkSpec(allow_net=[HOST_ALIAS]))
                )
            )
            assert (await boxes[-1].metrics()).started_from_template
            fetched = await sh(boxes[-1], f"wget -q -O - http://{HOST_ALIAS}:{server.port}/; echo; hostname")
            assert fetched == "served to a clone\nonline\n"
            hosts = await sh(boxes[-1], "cat /etc/hosts")
            assert "\tonline\n" in hosts and HOST_ALIAS in hosts and "clone-" not in hosts, hosts
    finally:
        await asyncio.gather(*(b.stop() for b in boxes))
    rt.close()
    assert digest(template) == before, "a box changed the template"


async def test_a_corrupted_template_is_retired_and_the_box_boots_cold(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home, templates=True)
    template = await first_box_makes_a_template(rt, home, image_layout)
    state = template / "state"
    state.chmod(0o644)
    with state.open("r+b") as f:  # a flipped byte, same size; the stamp (ctime) changes
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    box = await rt.create(options(image_layout))
    try:
        assert not (await box.metrics()).started_from_template
        assert await sh(box, "echo ok") == "ok\n"
    finally:
        await box.stop()
    settle_templates(home)
    rt.close()
    # The bad template is gone; a fresh one was made and serves the next box.
    rt = make_runtime(home, templates=True)
    assert [b.name for b in builds(home)] != [template.name]
    box = await rt.create(options(image_layout))
    try:
        assert (await box.metrics()).started_from_template
    finally:
        await box.stop()
    rt.close()


async def test_another_shape_boots_cold(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home, templates=True)
    await first_box_makes_a_template(rt, home, image_layout)
    box = await rt.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=MEMORY + 64))
    try:
        assert not (await box.metrics()).started_from_template
    finally:
        await box.stop()
    settle_templates(home)
    rt.close()


@pytest.mark.parametrize("how", ["option", "environment"])
async def test_templates_can_be_turned_off(
    home: Path, image_layout: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "option":
        rt = make_runtime(home, templates=False)
    else:
        monkeypatch.setenv("BOXLITE_TEMPLATES", "0")
        rt = boxlite.Boxlite(boxlite.Options(home_dir=home))
    for _ in range(2):
        box = await rt.create(options(image_layout))
        assert not (await box.metrics()).started_from_template
        await box.stop()
    rt.close()
    assert builds(home) == []


@pytest.fixture(scope="module")
def alpine_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        reg.push(built_images() / "alpine", "latest", "library/alpine")
        yield reg
    finally:
        reg.stop()


async def test_images_show_their_templates_and_gc_removes_them_with_the_image(
    home: Path, alpine_registry: Registry
) -> None:
    registries = [boxlite.ImageRegistry(alpine_registry.host, transport="http")]
    rt = make_runtime(home, templates=True, image_registries=registries)
    reference = f"{alpine_registry.host}/library/alpine:latest"
    box = await rt.create(boxlite.BoxOptions(image=reference, memory_mib=MEMORY, auto_remove=False))
    await box.stop()
    settle_templates(home)
    assert len(builds(home)) == 1
    [image] = await rt.images.list()
    assert image.templates == 1
    await rt.remove(box.id)
    await rt.images.remove(image.reference)  # collects what the image alone kept
    assert builds(home) == []
    assert list((home / "templates" / "index").iterdir()) == []
    rt.close()


# --- pause and resume: the same machinery on a box's own memory --------------------------------


async def test_pause_frees_the_vm_and_resume_brings_processes_back(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    box = await runtime.create(options(image_layout, auto_remove=False))
    await sh(box, "echo kept > /dev/shm/mark; sleep 1000 >/dev/null 2>&1 & echo $! > /sleeper")
    engine = box.info().pid
    await box.pause()
    assert box.info().status == "paused"
    assert engine is not None and not pid_alive(engine), "the paused box's engine still runs"
    with pytest.raises(boxlite.InvalidStateError):
        await box.pause()
    await box.resume()
    assert box.info().status == "running"
    # The same processes, the same memory (a tmpfs lives only there).
    assert await sh(box, "kill -0 $(cat /sleeper) && echo alive; cat /dev/shm/mark") == "alive\nkept\n"
    with pytest.raises(boxlite.InvalidStateError):
        await box.resume()
    # Paused then stopped: it shuts down cleanly (writes still in its memory reach the disk);
    # what lived only in memory is gone at the next start.
    await sh(box, "echo late > /late")
    await box.pause()
    await box.stop()
    assert box.info().status == "stopped"
    await box.start()
    assert await sh(box, "cat /late; ls /dev/shm") == "late\n"
    await box.stop()


async def test_fork_makes_a_box_that_goes_on_separately_from_the_same_memory(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    parent = await runtime.create(options(image_layout, auto_remove=False), name="parent")
    await sh(parent, "echo before > /shared; echo mem > /dev/shm/mem; sleep 1000 >/dev/null 2>&1 & echo $! > /sleeper")
    child = await parent.fork(name="child")
    assert child.name == "child" and child.id != parent.id
    assert (parent.info().status, child.info().status) == ("running", "running")
    # Both continue from the same disk, memory and processes ...
    for box in (parent, child):
        assert (
            await sh(box, "cat /shared /dev/shm/mem; kill -0 $(cat /sleeper) && echo alive") == "before\nmem\nalive\n"
        )
    # ... and diverge from there.
    await sh(parent, "echo parent > /shared")
    await sh(child, "echo child > /shared; echo c > /dev/shm/mem")
    assert await sh(parent, "cat /shared /dev/shm/mem") == "parent\nmem\n"
    assert await sh(child, "cat /shared /dev/shm/mem") == "child\nc\n"
    # The child is a box of its own.
    assert [await sh(b, "hostname") for b in (parent, child)] == ["parent\n", "child\n"]
    randoms = {await sh(b, "head -c 16 /dev/urandom | od -An -tx1") for b in (parent, child)}
    assert len(randoms) == 2
    macs = {await sh(b, "cat /sys/class/net/eth0/address") for b in (parent, child)}
    assert len(macs) == 2
    await child.stop()
    await runtime.remove("child")
    # The parent's disk (now on the frozen layer) survives a cold restart; GC frees the layer
    # once no box rests on it.
    await parent.stop()
    await parent.start()
    assert await sh(parent, "cat /shared") == "parent\n"
    await parent.stop()
    await runtime.remove("parent")
    await runtime.images.gc()
    assert list((runtime.home_dir / "layers").iterdir()) == []


# --- crashes leave nothing half-written ----------------------------------------------------------


async def test_a_maker_killed_mid_build_leaves_nothing_and_the_next_one_succeeds(
    home: Path, image_layout: Path
) -> None:
    rt = make_runtime(home, templates=True)
    await (await rt.create(options(image_layout))).stop()  # starts the maker
    makers = str(home / "templates")
    deadline = time.monotonic() + 60
    while not [p for p in engine_pids(makers) if pid_alive(p)]:  # its VM is booting
        assert time.monotonic() < deadline, "the template maker never started its VM"
        time.sleep(0.05)
    for maker in engine_pids(makers, "boxlite-shim"):
        os.kill(maker, signal.SIGKILL)
    settle_templates(home)  # its VM dies with it
    assert builds(home) == [] and list((home / "templates" / "index").iterdir()) == []
    box = await rt.create(options(image_layout))
    assert not (await box.metrics()).started_from_template
    await box.stop()
    settle_templates(home)
    # The next maker made the template and removed what the killed one left.
    assert len(builds(home)) == 1
    assert [p.name for p in (home / "templates" / "builds").iterdir() if p.name.startswith(".")] == []
    rt.close()


async def test_a_supervisor_killed_mid_pause_leaves_a_stopped_box_that_starts(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    box = await runtime.create(options(image_layout, auto_remove=False))
    await sh(box, "head -c 60000000 /dev/urandom > /dev/shm/fill")  # a save that takes a while
    [shim] = [p for p in engine_pids(str(box.dir), "boxlite-shim") if pid_alive(p)]
    partial = box.dir / "saved.state.partial"
    pausing = asyncio.ensure_future(box.pause())
    deadline = time.monotonic() + 60
    while not partial.exists():
        assert time.monotonic() < deadline and not pausing.done(), "the save never started"
        await asyncio.sleep(0.001)
    os.kill(shim, signal.SIGKILL)
    with pytest.raises(boxlite.BoxliteError):
        await pausing
    assert box.info().status == "stopped"
    assert not (box.dir / "saved.state").exists()
    await box.start()  # cold, from its disk
    assert not partial.exists()
    assert await sh(box, "ls /dev/shm; echo ok") == "ok\n"
    await box.stop()
