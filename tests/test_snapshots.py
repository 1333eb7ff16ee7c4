"""Disk snapshots, clones, export and import (issue 13, disks): real VMs, real qcow2 chains,
real archives. One module home; boxes are booted only where a test needs to read or write
their files."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import REPO, assert_no_engines, engine_pids, make_runtime, pid_alive, run

MEMORY = 256


def options(image_layout: Path, **extra: object) -> boxlite.BoxOptions:
    return boxlite.BoxOptions(  # type: ignore[arg-type]
        rootfs_path=image_layout, memory_mib=MEMORY, cpus=1, auto_remove=False, env=[("KEPT", "yes")], **extra
    )


async def sh(box: boxlite.Box, script: str) -> str:
    result = await run(box, "sh", "-c", script)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def chain(disk: Path) -> list[Path]:
    """The files `disk` rests on, as qemu-img sees them."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(disk)],
        check=True,
        capture_output=True,
    ).stdout
    return [Path(image["filename"]) for image in json.loads(out)[1:]]


def layers(home: Path) -> list[Path]:
    root = home / "layers"
    return sorted(root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def snap_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("snapshots") / "home"
    yield path
    assert_no_engines(path)


@pytest.fixture(scope="module")
def rt(snap_home: Path) -> Iterator[boxlite.Boxlite]:
    runtime = make_runtime(snap_home)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def stopped_box(rt: boxlite.Boxlite, image_layout: Path) -> Iterator[boxlite.Box]:
    """A stopped box whose disk holds /data/f = v1."""
    import asyncio

    async def make() -> boxlite.Box:
        box = await rt.create(options(image_layout), name="origin")
        await sh(box, "mkdir -p /data && echo v1 > /data/f")
        await box.stop()
        return box

    yield asyncio.run(make())


async def test_snapshot_restore_gives_back_the_old_files(
    rt: boxlite.Boxlite, stopped_box: boxlite.Box, snap_home: Path
) -> None:
    snap = stopped_box.snapshot
    info = await snap.create(name="s1")
    assert isinstance(info, boxlite.SnapshotInfo)
    assert (info.name, info.box_id) == ("s1", stopped_box.id)
    assert abs(info.created_at - time.time()) < 120
    assert info.container_disk_bytes > 0 and info.size_bytes > 0
    assert repr(info) == f"SnapshotInfo(name='s1', box_id='{stopped_box.id}', created_at={info.created_at})"
    assert [s.name for s in await snap.list()] == ["s1"]
    assert (await snap.get("s1")) is not None
    assert (await snap.get("nope")) is None
    with pytest.raises(boxlite.AlreadyExistsError):
        await snap.create(name="s1")
    for bad in ["", ".x", "a/b", "a\\b", "a\0b"]:
        with pytest.raises(boxlite.InvalidArgumentError):
            await snap.create(name=bad)
    with pytest.raises(TypeError):
        snap.create("s2")  # type: ignore[misc]
    with pytest.raises(boxlite.NotFoundError, match="snapshot 'nope' not found"):
        await snap.remove("nope")
    with pytest.raises(boxlite.NotFoundError):
        await snap.restore("nope")

    # Changed while running; a running box refuses snapshots and restores.
    await sh(stopped_box, "echo v2 > /data/f && echo new > /data/g")
    with pytest.raises(boxlite.InvalidStateError, match="stop it first"):
        await snap.create(name="live")
    with pytest.raises(boxlite.InvalidStateError, match="stop it first"):
        await snap.restore("s1")
    await stopped_box.stop()
    await snap.create(name="s2", options=boxlite.SnapshotOptions())
    await snap.restore("s1")
    assert await sh(stopped_box, "cat /data/f; ls /data") == "v1\nf\n"
    await stopped_box.stop()
    await snap.restore("s2")
    assert await sh(stopped_box, "cat /data/f /data/g") == "v2\nnew\n"
    await stopped_box.stop()

    # Removing snapshots frees the layers only they kept; the box keeps what it rests on.
    before = layers(snap_home)
    await snap.remove("s1")
    await snap.remove("s2")
    assert await snap.list() == []
    assert len(layers(snap_home)) <= len(before)
    assert await sh(stopped_box, "cat /data/f") == "v2\n"
    await stopped_box.stop()
    await sh_reset(stopped_box)


async def sh_reset(box: boxlite.Box) -> None:
    """Puts the origin box back to /data/f = v1 (other tests start from it)."""
    await sh(box, "echo v1 > /data/f && rm -f /data/g")
    await box.stop()


async def test_a_clone_shares_blocks_and_never_sees_the_other(
    rt: boxlite.Boxlite, stopped_box: boxlite.Box, snap_home: Path
) -> None:
    started = time.monotonic()
    clone = await stopped_box.clone_box(name="twin")
    took = time.monotonic() - started
    assert clone.id != stopped_box.id and clone.name == "twin"
    assert clone.info().status == "stopped"
    assert (clone.info().memory_mib, clone.info().cpus) == (MEMORY, 1)
    disk = clone.dir / "disk.qcow2"
    assert disk.stat().st_blocks * 512 < 1 << 20, "a clone is thin"
    assert took < 5, took
    with pytest.raises(boxlite.AlreadyExistsError):
        await stopped_box.clone_box(name="twin")

    assert await sh(clone, "cat /data/f; echo $KEPT") == "v1\nyes\n"
    await sh(clone, "echo from-clone > /data/f")
    assert await sh(stopped_box, "cat /data/f") == "v1\n"
    await sh(stopped_box, "echo from-origin > /data/o")
    assert await sh(clone, "cat /data/f; ls /data") == "from-clone\nf\n"
    await clone.stop()
    await stopped_box.stop()

    # A copy of the clone, then the clone goes: what its copy rests on stays, through GC too.
    grandchild = await clone.clone_box()
    await rt.remove(clone.id)
    await rt.images.gc()
    assert await sh(grandchild, "cat /data/f") == "from-clone\n"
    await grandchild.stop()
    await rt.remove(grandchild.id)
    await sh(stopped_box, "rm -f /data/o")
    await stopped_box.stop()
    # Nothing unused is kept: the layers left are exactly those the origin's disk rests on.
    assert set(layers(snap_home)) == {p for p in chain(stopped_box.dir / "disk.qcow2") if p.parent.name == "layers"}


async def test_a_running_box_is_not_cloned_or_exported(stopped_box: boxlite.Box, tmp_path: Path) -> None:
    await sh(stopped_box, "true")
    with pytest.raises(boxlite.InvalidStateError, match="stop it first"):
        await stopped_box.clone_box()
    with pytest.raises(boxlite.InvalidStateError, match="stop it first"):
        await stopped_box.export(dest=tmp_path)
    await stopped_box.stop()
    assert list(tmp_path.iterdir()) == []


async def test_export_then_import_into_another_home(stopped_box: boxlite.Box, tmp_path: Path) -> None:
    archive = await stopped_box.export(dest=tmp_path)
    assert archive == str(tmp_path / "origin.boxlite")
    with tarfile.open(archive) as tar:
        assert tar.getnames() == ["manifest.json", "disk.qcow2"]
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest["disk"]["virtual_size"] > 0 and len(manifest["disk"]["sha256"]) == 64
    assert manifest["name"] == "origin"

    other = tmp_path / "other-home"
    rt2 = make_runtime(other)
    try:
        with pytest.raises(boxlite.NotFoundError, match="Archive not found: "):
            await rt2.import_box(tmp_path / "missing.boxlite")
        with pytest.raises(boxlite.StorageError, match="untrusted"):
            await rt2.import_box(archive, untrusted=True)
        box = await rt2.import_box(archive, name="imported")
        assert box.name == "imported" and box.id != stopped_box.id
        info = box.info()
        assert (info.status, info.memory_mib, info.cpus) == ("stopped", MEMORY, 1)
        assert await sh(box, "cat /data/f; echo $KEPT") == "v1\nyes\n"
        await box.stop()
        with pytest.raises(boxlite.AlreadyExistsError):
            await rt2.import_box(archive, name="imported")
        assert len(await rt2.list_info()) == 1
        # Unnamed by default.
        unnamed = await rt2.import_box(archive)
        assert unnamed.name is None
        await rt2.remove(unnamed.id)
    finally:
        rt2.close()
        assert_no_engines(other)


def rewrite(archive: Path, out: Path, members: list[tuple[str, bytes, bytes]]) -> Path:
    """A tar of (name, type flag, data) members."""
    with tarfile.open(out, "w") as tar:
        for name, kind, data in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out


async def test_bad_archives_are_refused_and_leave_nothing(stopped_box: boxlite.Box, tmp_path: Path) -> None:
    good = Path(await stopped_box.export(dest=tmp_path / "good.boxlite"))
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        manifest = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        disk = tar.extractfile("disk.qcow2").read()  # type: ignore[union-attr]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.boxlite").write_bytes(bytes(flipped))
    (tmp_path / "short.boxlite").write_bytes(data[: len(data) // 3])
    bads = [
        tmp_path / "flipped.boxlite",
        tmp_path / "short.boxlite",
        rewrite(good, tmp_path / "dotdot.boxlite", [("../manifest.json", tarfile.REGTYPE, manifest)]),
        rewrite(
            good,
            tmp_path / "abs.boxlite",
            [("manifest.json", tarfile.REGTYPE, manifest), ("/tmp/disk.qcow2", tarfile.REGTYPE, disk)],
        ),
        rewrite(good, tmp_path / "link.boxlite", [("manifest.json", tarfile.SYMTYPE, b"")]),
        rewrite(good, tmp_path / "huge.boxlite", [("manifest.json", tarfile.REGTYPE, b" " * (2 << 20))]),
        rewrite(
            good,
            tmp_path / "extra.boxlite",
            [
                ("manifest.json", tarfile.REGTYPE, manifest),
                ("disk.qcow2", tarfile.REGTYPE, disk),
                ("evil", tarfile.REGTYPE, b"x"),
            ],
        ),
    ]
    # A disk that names a backing file on the host, with a manifest that matches it.
    backed = tmp_path / "backed.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(backed), "1M"],
        check=True,
    )
    backed_bytes = backed.read_bytes()
    m = json.loads(manifest)
    import hashlib

    m["disk"].update(virtual_size=1 << 20, bytes=len(backed_bytes), sha256=hashlib.sha256(backed_bytes).hexdigest())
    bads.append(
        rewrite(
            good,
            tmp_path / "backed.boxlite",
            [("manifest.json", tarfile.REGTYPE, json.dumps(m).encode()), ("disk.qcow2", tarfile.REGTYPE, backed_bytes)],
        )
    )
    # A declared size far beyond the disk's: refused before the disk is read.
    m = json.loads(manifest)
    m["disk"]["bytes"] = m["disk"]["virtual_size"] * 2 + (64 << 20)
    bads.append(
        rewrite(
            good,
            tmp_path / "oversized.boxlite",
            [("manifest.json", tarfile.REGTYPE, json.dumps(m).encode()), ("disk.qcow2", tarfile.REGTYPE, disk)],
        )
    )

    other = tmp_path / "other-home"
    rt2 = make_runtime(other)
    try:
        for bad in bads:
            with pytest.raises(boxlite.StorageError, match="not a usable box archive") as caught:
                await rt2.import_box(bad)
            assert caught.value.kind == "bad_archive"
            assert await rt2.list_info() == []
            assert list((other / "boxes").iterdir()) == [], bad
            assert layers(other) == [], bad
        assert not (Path("/tmp") / "disk.qcow2").exists()
    finally:
        rt2.close()


KILLER = textwrap.dedent(
    """
    import asyncio, sys
    import boxlite

    async def main() -> None:
        rt = boxlite.Boxlite(boxlite.Options(home_dir=sys.argv[1], templates=False))
        box = await rt.get("origin")
        print("go", flush=True)
        if sys.argv[2] == "export":
            await box.export(dest=sys.argv[3])
        else:
            for i in range(1000):
                await box.snapshot.create(name=f"k{i}")
                await box.snapshot.remove(f"k{i}")

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("operation", ["export", "snapshot"])
async def test_kill_9_mid_operation_leaves_the_box_usable(
    rt: boxlite.Boxlite, stopped_box: boxlite.Box, snap_home: Path, tmp_path: Path, operation: str
) -> None:
    if operation == "export":
        # Something to copy for a while.
        await sh(stopped_box, "dd if=/dev/urandom of=/data/big bs=1M count=48 2>/dev/null")
        await stopped_box.stop()
    dest = tmp_path / "out.boxlite"
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    child = subprocess.Popen(
        [sys.executable, "-c", KILLER, str(snap_home), operation, str(dest)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"go\n"
    if operation == "export":
        # Killed while the disk is being flattened.
        deadline = time.monotonic() + 30
        while not list((snap_home / "ingest").glob("export-*")):
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.005)
    else:
        time.sleep(0.4)
    child.send_signal(signal.SIGKILL)
    child.wait()
    # Its qemu-img (if any) finishes on its own; the box cannot start while it reads the disk.
    deadline = time.monotonic() + 60
    while any(pid_alive(p) for p in engine_pids(str(snap_home), "qemu-img")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not dest.exists(), "no archive under the final name"
    box = await rt.get("origin")
    assert box is not None
    assert await sh(box, "cat /data/f") == "v1\n"
    await sh(box, "rm -f /data/big")
    await box.stop()
    for s in await box.snapshot.list():
        await box.snapshot.remove(s.name)
    # A new runtime on the home clears what the killed process left.
    make_runtime(snap_home).close()
    ingest = snap_home / "ingest"
    assert not ingest.is_dir() or list(ingest.iterdir()) == []


def cli(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
    env.update(BOXLITE_TEMPLATES="0", PYTHONPATH=str(REPO / "python"))
    result = subprocess.run(
        [sys.executable, "-m", "boxlite", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


async def test_the_command_line(stopped_box: boxlite.Box, snap_home: Path, tmp_path: Path) -> None:
    assert cli(snap_home, "snapshot", "create", "origin", "cli-snap") == "cli-snap\n"
    listing = cli(snap_home, "snapshot", "ls", "origin")
    assert listing.splitlines()[0].split() == ["NAME", "CREATED", "SIZE", "DISK"]
    assert "cli-snap" in listing
    cli(snap_home, "snapshot", "restore", "origin", "cli-snap")
    cli(snap_home, "snapshot", "rm", "origin", "cli-snap")
    assert "cli-snap" not in cli(snap_home, "snapshot", "ls", "origin")
    clone_id = cli(snap_home, "clone", "origin", "--name", "cli-clone").strip()
    archive = cli(snap_home, "export", "cli-clone", str(tmp_path)).strip()
    assert archive == str(tmp_path / "cli-clone.boxlite")
    other = tmp_path / "other-home"
    imported = cli(other, "import", archive, "--name", "cli-imported").strip()
    assert "cli-imported" in cli(other, "ps", "-a") and imported
    cli(snap_home, "rm", clone_id)


def test_the_sync_api(stopped_box: boxlite.Box, snap_home: Path, tmp_path: Path) -> None:
    from boxlite.sync import SyncBoxlite

    rt = SyncBoxlite(boxlite.Options(home_dir=snap_home, templates=False))
    try:
        box = rt.get("origin")
        assert box is not None
        info = box.snapshot.create(name="sync-snap")
        assert info.name == "sync-snap" and [s.name for s in box.snapshot.list()] == ["sync-snap"]
        assert box.snapshot.get("sync-snap") is not None
        box.snapshot.restore("sync-snap")
        box.snapshot.remove("sync-snap")
        assert box.snapshot.get("sync-snap") is None
        clone = box.clone_box(name="sync-clone")
        archive = clone.export(dest=tmp_path)
        assert archive == str(tmp_path / "sync-clone.boxlite")
        rt.remove(clone.id)
        other = SyncBoxlite(boxlite.Options(home_dir=tmp_path / "other", templates=False))
        try:
            assert other.import_box(archive, "sync-imported").name == "sync-imported"
        finally:
            other.close()
    finally:
        rt.close()
