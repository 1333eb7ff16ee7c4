"""Programs written for the published ``boxlite`` package (0.10.8) run unchanged: each point
of its documented behaviour that this version has, checked against real VMs. Where we
differ on purpose, docs/python.md says so."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import boxlite
from conftest import engine_pids, make_runtime, pid_alive, run

FIXTURES = Path(__file__).parent / "fixtures"


def small(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    return boxlite.BoxOptions(rootfs_path=layout, memory_mib=256, **kwargs)  # type: ignore[arg-type]


def test_sync_api_module_has_the_published_names() -> None:
    from boxlite.sync_api import SyncBox, SyncBoxlite, SyncCodeBox, SyncExecution, SyncImageHandle, SyncSimpleBox

    assert SyncBoxlite is boxlite.SyncBoxlite
    assert {SyncBox, SyncCodeBox, SyncExecution, SyncImageHandle, SyncSimpleBox} <= {
        getattr(boxlite, name) for name in boxlite.__all__
    }


def test_published_exception_names_catch_what_the_core_raises(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path / "home")
    # A missing box: NotFoundError (remove raises, get returns None).
    with pytest.raises(boxlite.NotFoundError):
        asyncio.run(rt.remove("nobody"))
    # Unsupported options: UnsupportedError.
    with pytest.raises(boxlite.UnsupportedError):
        boxlite.BoxOptions("alpine", volumes=[{"managed_volume": "v", "guest_path": "/b"}]).validate()
    # Every core error is also a RuntimeError, as there.
    with pytest.raises(RuntimeError):
        asyncio.run(rt.remove("nobody"))


def test_option_defaults_equal_the_published_ones() -> None:
    o = boxlite.BoxOptions("alpine")
    assert (o.cpus, o.memory_mib, o.auto_remove, o.auto_delete, o.detach, o.tty, o.auto_resume) == (
        1,
        1024,
        True,
        1,
        False,
        False,
        True,
    )
    # A detached box must outlive its handle: with the default remove-on-stop it is refused.
    with pytest.raises(boxlite.InvalidArgumentError, match="auto_remove"):
        boxlite.BoxOptions("alpine", detach=True).validate()
    boxlite.BoxOptions("alpine", detach=True, auto_delete=0).validate()
    # The published names of the other option classes.
    c = boxlite.CopyOptions()
    assert (c.recursive, c.overwrite, c.follow_symlinks) == (True, True, False)
    assert boxlite.BoxStateInfo is boxlite.BoxState


async def test_a_box_is_removed_when_stopped_by_default(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(small(image_layout))
    assert (await run(box, "echo", "hi")).stdout == "hi\n"
    await box.stop()
    assert await runtime.get(box.id) is None
    assert not box.dir.exists()


async def test_get_and_get_info_return_none_for_a_missing_box(runtime: boxlite.Boxlite) -> None:
    assert await runtime.get("no-such-box") is None
    assert await runtime.get_info("no-such-box") is None
    assert await runtime.get("01ARZ3NDEKTSV4RRFFQ69G5FAV") is None


async def test_exec_on_a_stopped_box_starts_it(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(small(image_layout, auto_remove=False))
    await run(box, "sh", "-c", "echo kept > /root/state")
    await box.stop()
    assert box.info().status == "stopped"
    result = await run(box, "cat", "/root/state")
    assert (result.stdout, box.info().status) == ("kept\n", "running")
    await box.stop()


async def test_copy_options_are_accepted_and_honoured(
    runtime: boxlite.Boxlite, image_layout: Path, tmp_path: Path
) -> None:
    box = await runtime.create(small(image_layout))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("inside")
    (tmp_path / "target.txt").write_text("target")
    (tree / "link").symlink_to(tmp_path / "target.txt")

    await box.copy_in(tree, "/root/plain", copy_options=boxlite.CopyOptions())
    assert (await run(box, "readlink", "/root/plain/link")).stdout.strip() == str(tmp_path / "target.txt")
    await box.copy_in(tree, "/root/followed", boxlite.CopyOptions(follow_symlinks=True))
    assert (await run(box, "cat", "/root/followed/link")).stdout == "target"
    with pytest.raises(boxlite.InvalidArgumentError, match="recursive"):
        await box.copy_in(tree, "/root/flat", boxlite.CopyOptions(recursive=False))

    out = tmp_path / "out"
    out.mkdir()
    await box.copy_out("/root/plain/sub", out, copy_options=boxlite.CopyOptions())
    assert (out / "sub" / "f.txt").read_text() == "inside"
    with pytest.raises(boxlite.AlreadyExistsError):
        await box.copy_out("/root/plain/sub", out, boxlite.CopyOptions(overwrite=False))
    with pytest.raises(boxlite.InvalidArgumentError, match="recursive"):
        await box.copy_out("/root/plain/sub", tmp_path / "flat", boxlite.CopyOptions(recursive=False))
    assert not (tmp_path / "flat").exists()
    await box.stop()


async def test_close_works_awaited_or_not(home: Path, image_layout: Path) -> None:
    awaited = make_runtime(home)
    box = await awaited.create(small(image_layout))
    pid = box.info().pid
    await awaited.close()
    assert pid is not None and not pid_alive(pid)

    # Not awaited inside a loop: the stop is under way at once and completes by itself.
    fire_and_forget = make_runtime(home)
    box2 = await fire_and_forget.create(small(image_layout))
    pid2 = box2.info().pid
    fire_and_forget.close()
    for _ in range(300):
        if pid2 is None or not pid_alive(pid2):
            break
        await asyncio.sleep(0.1)
    assert pid2 is not None and not pid_alive(pid2)


def test_close_without_an_event_loop_returns_when_done(home: Path, image_layout: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, boxlite
        rt = boxlite.Boxlite(boxlite.Options(home_dir={str(home)!r}))
        box = asyncio.run(rt.create(boxlite.BoxOptions(rootfs_path={str(image_layout)!r}, memory_mib=256)))
        pid = box.info().pid
        rt.close()  # plain call, no loop: the published package's close() is synchronous
        print(pid)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not pid_alive(int(out.stdout))
    assert [p for p in engine_pids(str(home)) if pid_alive(p)] == []


async def test_a_home_of_the_first_release_opens_and_keeps_its_boxes(home: Path, image_layout: Path) -> None:
    """The first release kept a box's default command in `<box>/command.json` and had no
    schema version. Make a box, turn its home back into exactly that release's format
    (tests/fixtures/home-v0.sql is that release's own `.dump`), and open it."""
    rt = make_runtime(home)
    box = await rt.create(
        small(image_layout, name="legacy", auto_remove=False, env={"GREETING": "hello"}, working_dir="/tmp")
    )
    box_id = box.id
    await box.stop()
    del box, rt

    db = sqlite3.connect(home / "boxlite.db")
    row = db.execute("SELECT options, image, image_config, base_disk, created_at_ms FROM boxes").fetchone()
    options, image, image_config, base_disk, created = row
    v0_options = {k: v for k, v in json.loads(options).items() if k not in ("entrypoint", "cmd", "tty")}
    dump = (FIXTURES / "home-v0.sql").read_text()
    schema = dump[dump.index("CREATE TABLE") : dump.index(");", dump.index("CREATE TABLE")) + 2]
    db.executescript(f"DROP TABLE boxes; {schema} PRAGMA user_version = 0;")
    db.execute(
        "INSERT INTO boxes VALUES (?, 'legacy', ?, ?, ?, ?, 'stopped', NULL, NULL, NULL, ?, NULL)",
        (box_id, json.dumps(v0_options), image, image_config, base_disk, created),
    )
    db.commit()
    db.close()
    legacy_command = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo $GREETING from $(pwd)"], "tty": False}
    (home / "boxes" / box_id / "command.json").write_text(json.dumps(legacy_command))

    reopened = make_runtime(home)
    legacy = await reopened.get("legacy")
    assert legacy is not None and legacy.id == box_id
    assert legacy.default_command == ["/bin/sh", "-c", "echo $GREETING from $(pwd)"]
    assert not (home / "boxes" / box_id / "command.json").exists(), "no box state outside the database"
    result = await (await legacy.exec()).wait()
    assert result.stdout == "hello from /tmp\n"
    await reopened.remove("legacy", force=True)
