"""The async SDK surface a user expects (and the published package's names for it), against
real VMs: runtime, options, boxes, files, executions, cancellation, SimpleBox and CodeBox."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import make_runtime, run
from testkit.images import python_layout
from testkit.oci import with_config
from testkit.wheels import pure_wheel


def options(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    """Small boxes that stay when stopped (the published default removes them)."""
    kwargs.setdefault("auto_remove", False)
    return boxlite.BoxOptions(rootfs_path=layout, memory_mib=256, **kwargs)  # type: ignore[arg-type]


async def processes(box: boxlite.Box, pattern: str) -> list[str]:
    """Command lines of the box's processes that mention `pattern` (ps itself excluded)."""
    result = await run(box, "ps", "-o", "args")
    return [line for line in result.stdout.splitlines() if pattern in line and not line.startswith("ps ")]


async def until_gone(box: boxlite.Box, pattern: str) -> None:
    """Waits for no process matching `pattern` to be left in the box (fails after a while)."""
    for _ in range(200):
        if not await processes(box, pattern):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"still running in the box: {await processes(box, pattern)}")


# ------------------------------------------------------------------------------------- options


def test_box_options_follow_the_published_field_order_and_defaults() -> None:
    o = boxlite.BoxOptions("alpine:latest", None, 2, 1024)
    assert (o.image, o.cpus, o.memory_mib, o.auto_remove, o.detach, o.tty) == (
        "alpine:latest",
        2,
        1024,
        True,
        False,
        False,
    )
    d = boxlite.BoxOptions(image="alpine", cpus=None, memory_mib=None)
    assert (d.cpus, d.memory_mib) == (1, 1024)
    assert repr(d) == 'BoxOptions(image="alpine", cpus=1, memory_mib=1024)'
    full = boxlite.BoxOptions(rootfs_path=Path("/x"), name="n", entrypoint=["/bin/sh"], cmd=["-c", "true"], tty=True)
    assert (full.entrypoint, full.cmd, full.tty, full.name) == (["/bin/sh"], ["-c", "true"], True, "n")


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"image": "a", "rootfs_path": "/x"}, boxlite.InvalidArgumentError, "either image or rootfs_path"),
        ({"image": ""}, boxlite.InvalidArgumentError, "`image`"),
        ({"image": "a", "name": ""}, boxlite.InvalidArgumentError, "`name`"),
        (
            {"image": "a", "volumes": [{"managed_volume": "v", "guest_path": "/b"}]},
            boxlite.NotSupportedError,
            "managed",
        ),
        ({"image": "a", "volumes": [("/nonexistent-boxlite-folder", "/b")]}, boxlite.InvalidArgumentError, "volumes"),
        ({"image": "a", "ports": [(8080, 80, "udp")]}, boxlite.NotSupportedError, "UDP"),
        ({"image": "a", "network": boxlite.NetworkSpec("bridge")}, boxlite.InvalidArgumentError, "network mode"),
        ({"image": "a", "secrets": ["s"]}, boxlite.NotSupportedError, "secrets"),
        (
            {"image": "a", "advanced": boxlite.AdvancedBoxOptions(health_check=boxlite.HealthCheckOptions())},
            boxlite.NotSupportedError,
            "health_check",
        ),
        (
            {
                "image": "a",
                "advanced": boxlite.AdvancedBoxOptions(capabilities=boxlite.ContainerCapabilities(["CAP_NOPE"])),
            },
            boxlite.InvalidArgumentError,
            "CAP_NOPE",
        ),
        (
            {"image": "a", "advanced": boxlite.AdvancedBoxOptions(security=boxlite.SecurityOptions(max_processes=0))},
            boxlite.InvalidArgumentError,
            "max_processes",
        ),
        (
            {
                "image": "a",
                "advanced": boxlite.AdvancedBoxOptions(security=boxlite.SecurityOptions(network_enabled=False)),
            },
            boxlite.InvalidArgumentError,
            "NetworkSpec",
        ),
        ({"image": "a", "auto_stop": 60}, boxlite.NotSupportedError, "auto_stop"),
    ],
)
def test_box_options_refuse_what_they_cannot_do(
    kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        boxlite.BoxOptions(**kwargs).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"image": "a", "entrypoint": "sh -c"}, boxlite.InvalidArgumentError),
        ({"image": "a", "cmd": ["ok", 3]}, boxlite.InvalidArgumentError),
        ({"image": "a", "tty": "yes"}, TypeError),
        ({"image": "a", "cpus": "2"}, TypeError),
        ({"image": "a", "advanced": {"security": None}}, TypeError),
    ],
)
def test_box_options_refuse_wrong_types_at_construction(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        boxlite.BoxOptions(**kwargs)  # type: ignore[arg-type]


def test_empty_unsupported_fields_are_accepted() -> None:
    o = boxlite.BoxOptions(image="a", volumes=[], ports=(), secrets=[], auto_stop=None, auto_resume=True)
    o.validate()
    assert o.image == "a"


# ------------------------------------------------------------------------------------- runtime


async def test_runtime_default_home_get_or_create_list_and_shutdown(
    home: Path, image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOXLITE_HOME", str(home))
    rt = boxlite.Boxlite.default()
    assert rt.home_dir == home

    box, created = await rt.get_or_create(options(image_layout), name="keeper")
    assert created and box.name == "keeper"
    again, created_again = await rt.get_or_create(options(image_layout, name="keeper"))
    assert (again.id, created_again) == (box.id, False)
    await box.stop()
    restarted, created_third = await rt.get_or_create(options(image_layout), name="keeper")
    assert (restarted.id, created_third, restarted.info().status) == (box.id, False, "running")

    other = await rt.create(options(image_layout), name="other")
    with pytest.raises(boxlite.InvalidArgumentError, match="differs"):
        await rt.create(options(image_layout, name="a"), name="b")
    assert {i.name for i in await rt.list_info("running")} == {"keeper", "other"}
    await other.stop()
    assert [i.name for i in await rt.list_info(state="stopped")] == ["other"]
    assert (await rt.get_info("other")).state.running is False

    metrics = await rt.metrics()  # awaitable, as in the published package, and plain
    assert metrics.boxes_created_total == rt.metrics().boxes_created_total == 2
    assert metrics.total_commands_executed == metrics.total_commands_run
    assert metrics.total_exec_errors == metrics.total_run_errors

    await rt.shutdown()
    assert {i.status for i in await rt.list_info()} == {"stopped"}
    await rt.remove("keeper")
    await rt.remove("other")
    assert await rt.list_info() == []


async def test_async_with_runtime_stops_its_boxes(home: Path, image_layout: Path) -> None:
    async with make_runtime(home) as rt:
        box = await rt.create(options(image_layout))
        pid = box.info().pid
    assert box.info().status == "stopped"
    assert pid is not None


# ------------------------------------------------------------------------------------- boxes


async def test_box_info_is_plain_and_awaitable(shared_box: boxlite.Box) -> None:
    info = shared_box.info()
    awaited = await shared_box.info()
    assert awaited.id == info.id == shared_box.id
    assert info.state.status == "running" and info.state.running and info.running
    assert info.state.pid == info.pid
    assert info.hardware_isolated == (info.accelerator != "tcg")
    assert repr(shared_box).startswith(f"Box(id={shared_box.id!r}")


async def test_write_read_and_list_files(shared_box: boxlite.Box) -> None:
    payload = bytes(range(256)) * 1000
    await shared_box.write_file("/data/files/blob.bin", payload)
    await shared_box.write_file("/data/files/run.sh", "#!/bin/sh\necho ran\n", mode=0o750)
    await shared_box.write_file("/data/files/with space.txt", b"")
    assert await shared_box.read_file("/data/files/blob.bin") == payload
    assert (await run(shared_box, "/data/files/run.sh")).stdout == "ran\n"
    modes = await run(shared_box, "stat", "-c", "%a %U", "/data/files/run.sh", "/data/files/blob.bin")
    assert modes.stdout.split("\n")[:2] == ["750 root", "644 root"]
    assert await shared_box.list_dir("/data/files") == ["blob.bin", "run.sh", "with space.txt"]
    assert await shared_box.list_dir("/data/files/") == ["blob.bin", "run.sh", "with space.txt"]
    assert "etc" in await shared_box.list_dir("/")
    await shared_box.write_file("/data/files/blob.bin", "replaced")
    assert await shared_box.read_file("/data/files/blob.bin") == b"replaced"


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda box: box.read_file("/no/such/file"), "/no/such/file"),
        (lambda box: box.read_file("/etc"), "not a regular file"),
        (lambda box: box.list_dir("/no/such/dir"), "/no/such/dir"),
        (lambda box: box.list_dir("/etc/passwd"), "/etc/passwd"),
        (lambda box: box.list_dir("relative"), "absolute"),
        (lambda box: box.write_file("relative", b""), "absolute"),
        (lambda box: box.write_file("/tmp/dir/", b""), "absolute file path"),
        (lambda box: box.write_file("/tmp/x", b"", mode=0o17777), "mode"),
    ],
)
async def test_file_helpers_fail_with_typed_errors(shared_box: boxlite.Box, call: object, pattern: str) -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=pattern):
        await call(shared_box)  # type: ignore[operator]


async def test_default_command_comes_from_the_image_or_the_options(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    plain = await runtime.create(options(image_layout))
    assert plain.default_command == ["sh"]  # the busybox image's CMD
    ex = await plain.exec(args=["-c", "echo from-default"])  # extra args follow the default command
    assert (await ex.wait()).stdout == "from-default\n"
    await plain.stop()

    custom = await runtime.create(options(image_layout, entrypoint=["echo", "entry"], cmd=["and", "cmd"]), name="c")
    assert custom.default_command == ["echo", "entry", "and", "cmd"]
    assert (await (await custom.exec()).wait()).stdout == "entry and cmd\n"
    # The overrides belong to the box: another runtime on the same home sees them too.
    other = make_runtime(runtime.home_dir)
    assert (await other.get("c")).default_command == ["echo", "entry", "and", "cmd"]
    await custom.stop()

    # A new entrypoint drops the image's CMD, as in Docker; tty=True runs it on a terminal.
    term = await runtime.create(options(image_layout, entrypoint=["tty"], tty=True))
    assert term.default_command == ["tty"]
    assert (await (await term.exec()).wait()).stdout.startswith("/dev/pts/")
    await term.stop()


async def test_a_box_without_any_command_says_so(runtime: boxlite.Boxlite, image_layout: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    with_config(image_layout, bare, {"Cmd": None, "Entrypoint": None})
    box = await runtime.create(options(bare))
    assert box.default_command == []
    with pytest.raises(boxlite.InvalidArgumentError, match="no command given"):
        await box.exec()
    await box.stop()


# ------------------------------------------------------------------------------------- executions


async def test_execution_ids_signals_and_awaitable_controls(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sh", ["-c", "trap 'echo term; exit 4' TERM; echo ready; sleep 30 & wait"])
    assert isinstance(ex.id, str) and ex.id() == ex.id and len(ex.id) == 26
    assert repr(ex) == f"Execution(id={ex.id!r}, pid={ex.pid})"
    lines = ex.stdout()
    assert await lines.__anext__() == "ready\n"  # the trap is in place
    await ex.signal(signal.SIGTERM)
    assert [line async for line in lines] == ["term\n"]
    result = await ex.wait()
    assert (result.exit_code, result.error_message) == (4, None)

    ex2 = await shared_box.exec("sleep", ["30"])
    await ex2.kill()  # the published package awaits kill(); plain calls work too
    assert (await ex2.wait()).signal == 9

    ex3 = await shared_box.exec("sh", ["-c", "read x; stty size"], tty=(10, 40))
    await ex3.resize_tty(20, 60)
    stdin = ex3.stdin()
    assert stdin is not None
    async with stdin:
        await stdin.send_input(b"go\n")
        assert not stdin.is_closed()
    assert stdin.is_closed()
    assert "20 60" in (await ex3.wait()).stdout

    with pytest.raises(boxlite.InvalidArgumentError, match="signal"):
        ex3.signal(0)


async def test_cancelling_wait_kills_the_command(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sleep", ["301"])
    assert await processes(shared_box, "sleep 301")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ex.wait(), timeout=0.5)
    await until_gone(shared_box, "sleep 301")

    ex2 = await shared_box.exec("sleep", ["302"])
    task = asyncio.ensure_future(ex2.wait())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until_gone(shared_box, "sleep 302")
    assert (await run(shared_box, "echo", "alive")).stdout == "alive\n"


async def test_ctrl_c_of_a_script_kills_its_command_in_the_box(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home)
    box = await rt.create(options(image_layout, name="target", detach=True))
    script = textwrap.dedent(
        f"""
        import asyncio, boxlite
        async def main():
            rt = boxlite.Boxlite(boxlite.Options(home_dir={str(home)!r}))
            box = await rt.get("target")
            ex = await box.exec("sleep", ["303"])
            print("started", flush=True)
            try:
                await ex.wait()
            except asyncio.CancelledError:
                for _ in range(100):  # still connected: watch the command disappear
                    ps = await (await box.exec("ps", ["-o", "args"])).wait()
                    if "sleep 303" not in ps.stdout:
                        print("gone", flush=True)
                        break
                    await asyncio.sleep(0.1)
                raise
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert await asyncio.to_thread(proc.stdout.readline) == "started\n"
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.to_thread(proc.communicate, timeout=120)
    assert out == "gone\n", err
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert not await processes(box, "sleep 303")
    await rt.remove("target", force=True)


# ------------------------------------------------------------------------------------- SimpleBox


async def test_simplebox_is_removed_at_exit_unless_told_not_to(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home)
    async with boxlite.SimpleBox(rootfs_path=image_layout, memory_mib=256, runtime=rt) as box:
        assert box.created is True
        result = await box.exec("sh", "-c", 'echo "$X $(pwd) $(id -un)"', env={"X": "1"}, cwd="/tmp", user="app")
        assert (result.exit_code, result.stdout) == (0, "1 /tmp app\n")
        assert (await box.info()).status == "running"
        await box.write_file("/root/f", "x")
        assert await box.read_file("/root/f") == b"x"
        assert await box.list_dir("/root") == ["f"]
        assert (await box.metrics()).commands_executed_total >= 1
        with pytest.raises(boxlite.ExecTimeoutError):
            await box.exec("sleep", "30", timeout=1)
    assert await rt.list_info() == []

    kept = boxlite.SimpleBox(rootfs_path=image_layout, memory_mib=256, runtime=rt, name="kept", auto_remove=False)
    async with kept:
        await kept.exec("sh", "-c", "echo saved > /root/state")
    assert [(i.name, i.status) for i in await rt.list_info()] == [("kept", "stopped")]

    again = boxlite.SimpleBox(rootfs_path=image_layout, memory_mib=256, runtime=rt, name="kept", reuse_existing=True)
    async with again:
        assert again.created is False
        assert (await again.exec("cat", "/root/state")).stdout == "saved\n"
    await rt.remove("kept")


def test_simplebox_refuses_use_before_start_with_typed_errors(image_layout: Path) -> None:
    box = boxlite.SimpleBox(rootfs_path=image_layout)
    with pytest.raises(boxlite.InvalidStateError, match="not started"):
        _ = box.id
    # The core checks the options when the box is made (here, on demand).
    with pytest.raises(boxlite.InvalidArgumentError, match="rootfs_path"):
        boxlite.SimpleBox()._options.validate()
    assert boxlite.CodeBox()._options.image == "python:slim"


# ------------------------------------------------------------------------------------- CodeBox


@pytest.fixture(scope="module")
def python_image() -> Path:
    return python_layout()


@pytest.fixture(scope="module")
def codebox(shared_runtime: boxlite.Boxlite, python_image: Path) -> Iterator[boxlite.CodeBox]:
    box = boxlite.CodeBox(rootfs_path=python_image, runtime=shared_runtime)
    asyncio.run(box.start())
    yield box
    asyncio.run(box.shutdown())


async def test_codebox_runs_code_and_reports_failures(codebox: boxlite.CodeBox, tmp_path: Path) -> None:
    assert await codebox.run("print(6 * 7)") == "42\n"
    with pytest.raises(boxlite.ExecError) as caught:
        await codebox.run("import sys; print('partial'); sys.exit('boom')")
    assert (caught.value.exit_code, caught.value.stdout, caught.value.stderr) == (1, "partial\n", "boom\n")
    with pytest.raises(boxlite.ExecTimeoutError):
        await codebox.run("while True: pass", timeout=1)
    # The interrupted cell is gone; the interpreter, kept between runs, still answers.
    assert await codebox.run("print('alive')") == "alive\n"

    script = tmp_path / "script.py"
    script.write_text("import json\nprint(json.dumps({'ok': True}))\n")
    assert await codebox.run_script(script) == '{"ok": true}\n'


async def test_codebox_installs_packages(codebox: boxlite.CodeBox) -> None:
    for name, value in (("tinypkg", 1), ("otherpkg", 2), ("thirdpkg", 3)):
        await codebox.write_file(
            f"/tmp/wheels/{name}-1.0-py3-none-any.whl", pure_wheel(name, "1.0", f"VALUE = {value}\n")
        )
    await codebox.install_package("/tmp/wheels/tinypkg-1.0-py3-none-any.whl")
    await codebox.install_packages(["/tmp/wheels/otherpkg-1.0-py3-none-any.whl"])
    await codebox.install_packages("/tmp/wheels/thirdpkg-1.0-py3-none-any.whl")
    code = "import tinypkg, otherpkg, thirdpkg; print(tinypkg.VALUE + otherpkg.VALUE + thirdpkg.VALUE)"
    assert await codebox.run(code) == "6\n"
    with pytest.raises(boxlite.ExecError, match=r"'pip install /tmp/nope\.whl' failed"):
        await codebox.install_package("/tmp/nope.whl")
    with pytest.raises(boxlite.ExecError):
        await codebox.install_packages()  # pip itself refuses an empty list


def test_no_runtime_error_escapes_the_package() -> None:
    """Everything the package raises on purpose is a BoxliteError (the lint for it)."""
    package = Path(boxlite.__file__).parent
    offenders = [
        f"{path.name}:{n}"
        for path in package.glob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "raise RuntimeError" in line or "raise ValueError" in line or "raise TypeError" in line
    ]
    assert offenders == []
