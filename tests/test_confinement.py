"""The host side of a box is confined: its VM engine runs in a jail (fresh namespaces, only its
own files, no capabilities, seccomp, an unprivileged id) and its supervisor drops to that id
once the box is up. Read from /proc of the real processes, as the host sees them; also for a
host user that is not root."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import REPO, engine_pids, pid_alive, run, settle_templates


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def namespaces(pid: int | str) -> dict[str, str]:
    return {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("mnt", "net", "pid", "ipc", "uts")}


def shim_of(box: boxlite.Box) -> int:
    for pid in engine_pids(box.id, "boxlite-shim"):
        return pid
    raise AssertionError(f"no supervisor found for {box.id}")


@pytest.fixture(scope="module")
def box(shared_runtime: boxlite.Boxlite, image_layout: Path) -> Iterator[boxlite.Box]:
    box = asyncio.run(shared_runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256)))
    yield box
    asyncio.run(box.stop())


def test_the_engine_runs_jailed(box: boxlite.Box) -> None:
    pid = box.info().pid
    assert pid is not None
    st = status(pid)
    uid = int(st["Uid"].split()[0])
    assert os.geteuid() != 0 or uid >= 0x7000_0000, "as root, the engine runs as the box's own id"
    assert st["Uid"].split() == [str(uid)] * 4
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == 0, caps
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert int(st["Seccomp_filters"]) >= 2, "the jail's filter and QEMU's own -sandbox"
    assert st["NSpid"].split()[-1] == "1", "PID 1 of its own pid namespace"
    host = namespaces("self")
    jailed = namespaces(pid)
    assert all(jailed[ns] != host[ns] for ns in host), (jailed, host)
    # Its root holds only what it needs: no host home, no secrets, no other boxes.
    root = Path(f"/proc/{pid}/root")
    tops = {Path(p).parts[1] for p in (box.dir, REPO)}  # the box's files, the guest bundle
    assert set(os.listdir(root)) <= {"dev", "etc", "lib", "lib64", "usr", "tmp", *tops}
    assert not (root / "etc" / "shadow").exists()
    assert not (root / "root").exists() and not (root / "home").exists()
    assert (root / box.dir.relative_to("/")).is_dir()
    other_boxes = [p for p in (root / box.dir.parent.relative_to("/")).iterdir() if p.name != box.id]
    assert other_boxes == []
    # Every descriptor it holds is a pipe, a socket, a device, an anonymous inode or one of
    # the box's own files.
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        allowed = (
            target.startswith(("pipe:", "socket:", "anon_inode:", "/dev/"))
            or target.startswith(str(box.dir))
            or "/guest/" in target
            or "/images/disks/" in target
        )
        assert allowed, target


def test_the_supervisor_drops_to_the_boxs_own_id(box: boxlite.Box) -> None:
    shim = shim_of(box)
    st = status(shim)
    engine = status(box.info().pid or 0)
    assert st["Uid"] == engine["Uid"]
    for caps in ("CapPrm", "CapEff", "CapBnd"):
        assert int(st[caps], 16) == 0, caps
    assert st["NoNewPrivs"] == "1"


async def test_the_box_still_works_in_its_jail(box: boxlite.Box, tmp_path: Path) -> None:
    assert (await run(box, "echo", "from the jail")).stdout == "from the jail\n"
    (tmp_path / "f").write_text("in")
    await box.copy_in(tmp_path / "f", "/root/f")
    await box.copy_out("/root/f", tmp_path / "back")
    assert (tmp_path / "back").read_text() == "in"


UNPRIVILEGED = textwrap.dedent(
    """
    import asyncio, json, os, boxlite
    async def main():
        rt = boxlite.Boxlite(boxlite.Options(home_dir=os.environ["HOME_DIR"]))
        box = await rt.create(boxlite.BoxOptions(rootfs_path=os.environ["IMAGE"], memory_mib=256))
        out = (await (await box.exec("echo", ["unprivileged"])).wait()).stdout
        pid = box.info().pid
        st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines())
        ns = {n: os.readlink(f"/proc/{pid}/ns/{n}") != os.readlink(f"/proc/self/ns/{n}")
              for n in ("mnt", "net", "pid", "ipc", "uts", "user")}
        print(json.dumps({"out": out, "uid": st["Uid"].split()[0], "capeff": st["CapEff"].strip(),
                          "seccomp": st["Seccomp"].strip(), "new_ns": ns}))
        await box.stop()
    asyncio.run(main())
    """
)


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A home the unprivileged user can use (pytest's own temp dirs are private to root)."""
    home = Path(tempfile.mkdtemp(prefix="boxlite-unprivileged-"))
    if os.geteuid() == 0:
        os.chown(home, 65534, 65534)
    yield home
    settle_templates(home / "boxlite")  # the script's box left a template maker behind
    leftovers = [pid for pid in engine_pids(str(home)) if pid_alive(pid)]
    for pid in leftovers:
        os.kill(pid, 9)
    shutil.rmtree(home, ignore_errors=True)
    assert not leftovers, f"QEMU processes left running: {leftovers}"


def test_a_host_user_that_is_not_root_gets_the_same_jail(nobody_home: Path, image_layout: Path) -> None:
    if os.geteuid() != 0:
        nobody_run = ["/usr/bin/python3", "-c", UNPRIVILEGED]  # already unprivileged
    else:
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        nobody_run = [runuser, "-u", "nobody", "--", "/usr/bin/python3", "-c", UNPRIVILEGED]
    home = nobody_home
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "HOME_DIR": str(home / "boxlite"),
        "IMAGE": str(image_layout),
        "PYTHONPATH": str(REPO / "python"),
    }
    result = subprocess.run(nobody_run, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["out"] == "unprivileged\n"
    assert seen["uid"] == str(65534 if os.geteuid() == 0 else os.geteuid())
    assert int(seen["capeff"], 16) == 0 and seen["seccomp"] == "2"
    assert all(seen["new_ns"].values()), seen["new_ns"]
