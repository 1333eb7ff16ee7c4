"""Host folders in a box (virtio-fs): options, real round trips, read-only and ownership
enforced by the host's daemon, sharing between boxes, restarts, and a non-root host user."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import REPO, engine_pids, make_runtime, pid_alive, run


def host_dir(path: Path) -> Path:
    """A folder the box may write: on a root host, guest root acts on it as the box's own
    unprivileged id (docs/security.md), so it must be writable by others."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def daemons_of(marker: str) -> list[int]:
    return [pid for pid in engine_pids(marker, "virtiofsd") if pid_alive(pid)]


async def sh(box: boxlite.Box, script: str) -> boxlite.ExecResult:
    return await run(box, "sh", "-c", script)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("volumes")
    root.chmod(0o755)
    rw, ro = host_dir(root / "rw"), host_dir(root / "ro")
    (ro / "given.txt").write_text("from the host\n")
    yield {"rw": rw, "ro": ro}
    # Every box using them is gone by now: so must their daemons be.
    leftovers = daemons_of(str(root))
    for pid in leftovers:
        os.kill(pid, 9)
    assert not leftovers, f"virtiofsd left running: {leftovers}"


@pytest.fixture(scope="module")
def vol_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("volhome") / "home"
    yield home
    leftovers = [p for p in engine_pids(str(home)) if pid_alive(p)] + daemons_of(str(home))
    for pid in leftovers:
        os.kill(pid, 9)
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def vol_runtime(vol_home: Path) -> Iterator[boxlite.Boxlite]:
    rt = make_runtime(vol_home)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def vol_box(vol_runtime: boxlite.Boxlite, image_layout: Path, folders: dict[str, Path]) -> Iterator[boxlite.Box]:
    """One box with a rw and a ro folder, allowed to mount (so that a remount can be tried)."""
    advanced = boxlite.AdvancedBoxOptions(
        security=boxlite.SecurityOptions(seccomp_enabled=False),
        capabilities=boxlite.ContainerCapabilities(add=["sys_admin"]),
    )
    options = boxlite.BoxOptions(
        rootfs_path=image_layout,
        memory_mib=256,
        volumes=[
            (str(folders["rw"]), "/data"),
            {"host_path": str(folders["ro"]), "guest_path": "/ro", "read_only": True},
        ],
        advanced=advanced,
    )
    box = asyncio.run(vol_runtime.create(options))
    yield box
    asyncio.run(box.stop())


def test_option_shapes_and_rules(image_layout: Path, tmp_path: Path) -> None:
    def opts(volumes: list) -> boxlite.BoxOptions:  # type: ignore[type-arg]
        return boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, volumes=volumes)

    with pytest.raises(TypeError):
        opts([(str(tmp_path), "/d", "ro")])
    with pytest.raises(
        RuntimeError,
        match='unknown volume dict key "target"; expected one of managed_volume, host_path, guest_path, read_only',
    ):
        opts([{"host_path": str(tmp_path), "target": "/d"}])
    with pytest.raises(RuntimeError, match="not both"):
        opts([{"managed_volume": "v", "host_path": str(tmp_path), "guest_path": "/d"}])
    with pytest.raises(RuntimeError, match="requires managed_volume or host_path"):
        opts([{"guest_path": "/d"}])
    with pytest.raises(boxlite.UnsupportedError):
        opts([{"managed_volume": "v", "guest_path": "/d"}]).validate()
    cases = [
        ((str(tmp_path / "missing"), "/d"), "missing"),
        ((str(tmp_path), "relative"), "absolute"),
        ((str(tmp_path), "/proc/x"), "reserved"),
        ((str(tmp_path), "/"), "reserved"),
    ]
    for volume, words in cases:
        with pytest.raises(boxlite.InvalidArgumentError, match=words):
            opts([volume]).validate()
    opts([(str(tmp_path), "/d", True)]).validate()


async def test_errors_come_before_any_boot(
    vol_runtime: boxlite.Boxlite, image_layout: Path, tmp_path: Path, vol_home: Path
) -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match="missing"):
        await vol_runtime.create(
            boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, volumes=[(str(tmp_path / "missing"), "/d")])
        )
    with pytest.raises(boxlite.InvalidArgumentError, match="absolute"):
        await vol_runtime.create(
            boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, volumes=[(str(tmp_path), "d")])
        )


async def test_read_write_round_trip_both_ways(vol_box: boxlite.Box, folders: dict[str, Path]) -> None:
    (folders["rw"] / "from_host.txt").write_text("hello box\n")
    assert (await run(vol_box, "cat", "/data/from_host.txt")).stdout == "hello box\n"
    result = await sh(vol_box, "mkdir -p /data/sub && echo 'hello host' > /data/sub/from_box.txt")
    assert result.exit_code == 0, result.stderr
    assert (folders["rw"] / "sub" / "from_box.txt").read_text() == "hello host\n"


async def test_read_only_holds_even_after_a_remount(vol_box: boxlite.Box, folders: dict[str, Path]) -> None:
    assert (await run(vol_box, "cat", "/ro/given.txt")).stdout == "from the host\n"
    assert (await sh(vol_box, "echo x > /ro/new.txt")).exit_code != 0
    remount = await sh(vol_box, "mount -o remount,rw /ro && echo remounted")
    assert "remounted" in remount.stdout, remount.stderr  # the guest kernel lets it
    assert (await sh(vol_box, "echo x > /ro/new.txt; echo x >> /ro/given.txt")).exit_code != 0
    assert not (folders["ro"] / "new.txt").exists()
    assert (folders["ro"] / "given.txt").read_text() == "from the host\n"


async def test_a_host_symlink_resolves_inside_the_guest(
    vol_box: boxlite.Box, folders: dict[str, Path], tmp_path: Path
) -> None:
    secret = tmp_path / "host-only"
    secret.mkdir()
    (secret / "secret.txt").write_text("host secret\n")
    (folders["rw"] / "escape").symlink_to(secret)
    (folders["rw"] / "etc").symlink_to("/etc")
    assert (await run(vol_box, "cat", "/data/escape/secret.txt")).exit_code != 0
    assert (await sh(vol_box, "echo pwned > /data/escape/new.txt")).exit_code != 0
    assert not (secret / "new.txt").exists()
    # /etc seen through the link is the box's own.
    guest_hostname = (await run(vol_box, "cat", "/etc/hostname")).stdout
    assert (await run(vol_box, "cat", "/data/etc/hostname")).stdout == guest_hostname


async def test_guest_root_leaves_no_setuid_root_file(vol_box: boxlite.Box, folders: dict[str, Path]) -> None:
    result = await sh(vol_box, "cp /bin/busybox /data/suid && chown 0:0 /data/suid; chmod 4755 /data/suid")
    assert result.exit_code == 0 or "Operation not permitted" in result.stderr, result.stderr
    setgid = await sh(vol_box, "chmod g+s /data/suid")
    st = (folders["rw"] / "suid").stat()
    if os.geteuid() == 0:
        assert st.st_uid != 0 and st.st_gid != 0, "guest root's file is owned by host root"
        # As root the daemon refuses set-id modes outright (its seccomp filter).
        assert result.exit_code != 0 and setgid.exit_code != 0
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(st.st_mode)
        # Created with the bits in the mode of open(2): refused too, nothing left.
        created = await sh(vol_box, "install -m 4755 /bin/busybox /data/suid2")
        assert created.exit_code != 0
        left = folders["rw"] / "suid2"
        assert not left.exists() or not left.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
    else:
        assert st.st_uid == os.geteuid()
    assert not (st.st_uid == 0 and st.st_mode & stat.S_ISUID)


async def test_a_box_with_volumes_cannot_pause(vol_box: boxlite.Box) -> None:
    with pytest.raises(boxlite.UnsupportedError, match="volumes"):
        await vol_box.pause()
    assert (await run(vol_box, "true")).exit_code == 0


async def test_two_boxes_share_a_folder(
    vol_box: boxlite.Box, vol_runtime: boxlite.Boxlite, image_layout: Path, folders: dict[str, Path]
) -> None:
    other = await vol_runtime.create(
        boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, volumes=[(str(folders["rw"]), "/shared")])
    )
    try:
        assert (await sh(other, "echo from-other > /shared/other.txt")).exit_code == 0
        assert (await run(vol_box, "cat", "/data/other.txt")).stdout == "from-other\n"
        assert (await sh(vol_box, "echo from-first > /data/first.txt")).exit_code == 0
        assert (await run(other, "cat", "/shared/first.txt")).stdout == "from-first\n"
    finally:
        await other.stop()


async def test_restart_keeps_the_folder_and_a_deleted_folder_fails_the_start(
    vol_runtime: boxlite.Boxlite, image_layout: Path, tmp_path: Path, vol_home: Path
) -> None:
    folder = host_dir(tmp_path / "kept")
    box = await vol_runtime.create(
        boxlite.BoxOptions(
            rootfs_path=image_layout, memory_mib=256, auto_remove=False, volumes=[(str(folder), "/kept")]
        )
    )
    try:
        assert (await sh(box, "echo one > /kept/a.txt")).exit_code == 0
        await box.stop()
        await box.start()
        assert (await run(box, "cat", "/kept/a.txt")).stdout == "one\n"
        await box.stop()
        shutil.rmtree(folder)
        with pytest.raises(boxlite.InvalidArgumentError, match=str(folder)):
            await box.start()
        assert not [p for p in engine_pids(box.id) if pid_alive(p)]
        assert not daemons_of(str(folder))
    finally:
        await vol_runtime.remove(box.id, force=True)


async def test_boxes_with_volumes_never_use_memory_templates(home: Path, image_layout: Path, tmp_path: Path) -> None:
    rt = make_runtime(home, templates=True)
    try:
        options = boxlite.BoxOptions(
            rootfs_path=image_layout, memory_mib=256, volumes=[(str(host_dir(tmp_path / "t")), "/t")]
        )
        box = await rt.create(options)
        assert not (await box.metrics()).started_from_template
        await box.stop()
        jobs = home / "templates" / "jobs"
        assert not jobs.exists() or not any(jobs.iterdir()), "a template maker was started for a box with volumes"
    finally:
        rt.close()


UNPRIVILEGED = textwrap.dedent(
    """
    import asyncio, json, os, boxlite
    async def main():
        rt = boxlite.Boxlite(boxlite.Options(home_dir=os.environ["HOME_DIR"]))
        folder = os.environ["FOLDER"]
        box = await rt.create(boxlite.BoxOptions(rootfs_path=os.environ["IMAGE"], memory_mib=256,
                                                 volumes=[(folder, "/work")]))
        r = await (await box.exec("sh", ["-c", "cat /work/in.txt && echo out > /work/out.txt"])).wait()
        await box.stop()
        print(json.dumps({"out": r.stdout, "code": r.exit_code}))
    asyncio.run(main())
    """
)


def test_a_host_user_that_is_not_root(image_layout: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="boxlite-vol-unprivileged-"))
    try:
        folder = home / "folder"
        folder.mkdir()
        (folder / "in.txt").write_text("in\n")
        image = home / "image"
        shutil.copytree(image_layout, image)  # pytest's temp dirs are private to root
        if os.geteuid() == 0:
            for path in [home, *home.rglob("*")]:
                os.chown(path, 65534, 65534, follow_symlinks=False)
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            command = [runuser, "-u", "nobody", "--", "/usr/bin/python3", "-c", UNPRIVILEGED]
        else:
            command = ["/usr/bin/python3", "-c", UNPRIVILEGED]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "HOME_DIR": str(home / "boxlite"),
            "IMAGE": str(image),
            "FOLDER": str(folder),
            "PYTHONPATH": str(REPO / "python"),
            "BOXLITE_TEMPLATES": "0",
        }
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen == {"out": "in\n", "code": 0}
        out = folder / "out.txt"
        assert out.read_text() == "out\n"
        assert out.stat().st_uid == (65534 if os.geteuid() == 0 else os.geteuid())
    finally:
        leftovers = [p for p in engine_pids(str(home)) if pid_alive(p)] + daemons_of(str(home))
        for pid in leftovers:
            os.kill(pid, 9)
        shutil.rmtree(home, ignore_errors=True)
        assert not leftovers, f"processes left running: {leftovers}"
