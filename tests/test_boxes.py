"""Box creation, isolation between boxes, stop, the accelerator choice, and bad input."""

from __future__ import annotations

import tarfile
import uuid
from pathlib import Path

import pytest

import boxlite
from conftest import engine_pids, make_runtime, pid_alive, run
from testkit.oci import entry, tar_of, with_config, with_layer


async def test_create_exec_stop_leaves_nothing_running(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))
    info = box.info()
    assert info.status == "running"
    assert info.accelerator in {"kvm", "hvf", "tcg"}
    assert info.hardware_isolated == (info.accelerator != "tcg")
    pid = info.pid
    assert pid_alive(pid)
    assert (await run(box, "echo", "hi")).stdout == "hi\n"

    metrics = await box.metrics()
    stages = [
        metrics.stage_filesystem_setup_ms,
        metrics.stage_image_prepare_ms,
        metrics.stage_guest_rootfs_ms,
        metrics.stage_box_config_ms,
        metrics.stage_box_spawn_ms,
        metrics.stage_container_init_ms,
    ]
    assert all(ms is not None for ms in stages), stages
    assert metrics.total_create_duration_ms is not None
    assert metrics.total_create_duration_ms >= sum(ms or 0 for ms in stages)
    assert metrics.guest_boot_duration_ms is not None

    rt_metrics = runtime.metrics()
    assert (rt_metrics.boxes_created_total, rt_metrics.num_running_boxes) == (1, 1)
    await box.stop()
    assert not pid_alive(pid)
    assert runtime.metrics().num_running_boxes == 0
    # Removed at stop (the published default): its directory and record are gone.
    assert not box.dir.exists()
    assert await runtime.get(box.id) is None
    with pytest.raises(boxlite.BoxNotFoundError):
        box.info()
    with pytest.raises(boxlite.BoxNotFoundError):
        await box.exec("true")


async def test_two_boxes_from_one_base_do_not_see_each_others_writes(
    runtime: boxlite.Boxlite, image_layout: Path
) -> None:
    a = await runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))
    b = await runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))
    await run(a, "sh", "-c", "echo from-a > /root/mark; rm /bin/ls")
    seen = await run(b, "sh", "-c", "cat /root/mark 2>&1; ls / >/dev/null && echo ls-ok")
    assert "from-a" not in seen.stdout
    assert "ls-ok" in seen.stdout
    again = await run(a, "cat", "/root/mark")
    assert again.stdout == "from-a\n"
    # One base disk, built once, shared by both.
    assert len(list((runtime.home_dir / "images" / "disks").glob("*.ext4"))) == 1
    await a.stop()
    await b.stop()


async def test_state_survives_stop_and_start(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, auto_remove=False))
    await run(box, "sh", "-c", "echo kept > /root/state")
    await box.stop()
    await box.start()
    assert (await run(box, "cat", "/root/state")).stdout == "kept\n"
    await box.stop()


async def test_image_config_defaults_apply(runtime: boxlite.Boxlite, tmp_path: Path, image_layout: Path) -> None:
    layout = tmp_path / "layout"
    with_config(image_layout, layout, {"WorkingDir": "/home/app", "User": "app", "Env": ["PATH=/bin", "X=img"]})
    box = await runtime.create(boxlite.BoxOptions(rootfs_path=layout, env=[("Y", "box")], memory_mib=256))
    result = await run(box, "sh", "-c", 'echo "$(pwd) $(id -u) $X $Y $PATH"')
    assert result.stdout == "/home/app 1000 img box /bin\n"
    override = await run(box, "sh", "-c", 'echo "$(pwd) $(id -u) $X"', cwd="/", user="root", env={"X": "cmd"})
    assert override.stdout == "/ 0 cmd\n"
    await box.stop()


def test_auto_chooses_tcg_here_quickly() -> None:
    name, reason = boxlite.accelerator()
    if Path("/sys/module/kvm_pvm").exists() or not Path("/dev/kvm").exists():
        assert name == "tcg", reason
        assert "TCG" in reason


async def test_forced_tcg_is_honoured(home: Path, image_layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXLITE_ACCEL", "tcg")
    rt = make_runtime(home)
    box = await rt.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))
    assert box.info().accelerator == "tcg"
    await box.stop()


async def test_an_unknown_accelerator_is_an_invalid_argument(
    home: Path, image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOXLITE_ACCEL", "warp")
    with pytest.raises(boxlite.InvalidArgumentError, match="BOXLITE_ACCEL"):
        await make_runtime(home).create(boxlite.BoxOptions(rootfs_path=image_layout))


async def test_forced_kvm_boots_or_fails_cleanly_never_hangs(
    home: Path, image_layout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Here /dev/kvm is a paravirtual KVM under which a guest kernel hardly advances: a forced
    `kvm` must end in a typed error with the engine gone, never hang. Where KVM is real it boots."""
    rt = make_runtime(home, boot_timeout=20)
    await (await rt.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))).stop()  # base disk, TCG
    monkeypatch.setenv("BOXLITE_ACCEL", "kvm")
    slow_kvm = Path("/sys/module/kvm_pvm").exists()
    rt = make_runtime(home, boot_timeout=20)  # a runtime reads the choice when it first boots
    try:
        box = await rt.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))
    except boxlite.BootTimeoutError as err:
        assert "within 20s" in str(err)
        assert rt.metrics().boxes_failed_total == 1
    except boxlite.EngineUnavailableError as err:
        # QEMU may refuse a paravirtual KVM outright (an MSR it cannot set): a fast, typed
        # failure that quotes the engine.
        assert "exited during boot" in str(err) and "qemu" in str(err).lower(), err
        assert rt.metrics().boxes_failed_total == 1
    else:
        assert not slow_kvm, "a paravirtual KVM booted a guest within the timeout"
        assert box.info().accelerator == "kvm"
        await box.stop()
    assert [p for p in engine_pids(str(home)) if pid_alive(p)] == []


async def test_a_guest_that_never_becomes_ready_is_a_boot_timeout_with_the_console(
    home: Path, image_layout: Path
) -> None:
    rt = make_runtime(home, boot_timeout=60)
    kept = boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256, auto_remove=False)
    await (await rt.create(kept)).stop()  # base disk
    quick = make_runtime(home, boot_timeout=0.3)
    with pytest.raises(boxlite.BootTimeoutError, match="last console output"):
        await quick.create(boxlite.BoxOptions(rootfs_path=image_layout, memory_mib=256))
    assert [p for p in engine_pids(str(home)) if pid_alive(p)] == []
    # The half-created box left no directory behind.
    assert len(list((home / "boxes").iterdir())) == 1


@pytest.mark.parametrize(
    ("make_options", "error", "pattern"),
    [
        (lambda d: boxlite.BoxOptions(rootfs_path=d / "missing"), boxlite.InvalidArgumentError, "does not exist"),
        (lambda d: boxlite.BoxOptions(rootfs_path=d / "file"), boxlite.InvalidArgumentError, "not a directory"),
        (lambda d: boxlite.BoxOptions(rootfs_path=d / "empty"), boxlite.InvalidArgumentError, "no index.json"),
        (lambda d: boxlite.BoxOptions(rootfs_path=d / "nomanifest"), boxlite.InvalidArgumentError, "no image manifest"),
        (lambda d: boxlite.BoxOptions(rootfs_path=d / "empty", cpus=4096), boxlite.InvalidArgumentError, "cpus"),
        (
            lambda d: boxlite.BoxOptions(rootfs_path=d / "empty", memory_mib=1 << 30),
            boxlite.InvalidArgumentError,
            "memory",
        ),
    ],
)
async def test_bad_box_input_is_a_typed_error_and_leaves_nothing(
    runtime: boxlite.Boxlite, tmp_path: Path, make_options: object, error: type[Exception], pattern: str
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nomanifest").mkdir()
    (tmp_path / "nomanifest" / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    with pytest.raises(error, match=pattern):
        await runtime.create(make_options(tmp_path))  # type: ignore[operator]
    assert list((runtime.home_dir / "boxes").iterdir()) == []
    assert list((runtime.home_dir / "images" / "ingest").iterdir()) == []


def test_guest_bundle_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXLITE_GUEST_DIR", str(tmp_path / "nothing-here"))
    rt = make_runtime(tmp_path / "home")
    with pytest.raises(boxlite.EngineUnavailableError, match="BOXLITE_GUEST_DIR"):
        rt._native.guest_dir()
    monkeypatch.delenv("BOXLITE_GUEST_DIR")
    assert Path(rt._native.guest_dir(), "vmlinuz").is_file()


def test_qemu_dies_with_its_parent_process(tmp_path: Path, image_layout: Path) -> None:
    """A Python process that exits without stopping its box leaves no QEMU behind."""
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    script = f"""
import asyncio, boxlite, os
async def main():
    rt = boxlite.Boxlite(boxlite.Options(home_dir={str(home)!r}))
    box = await rt.create(boxlite.BoxOptions(rootfs_path={str(image_layout)!r}, memory_mib=256))
    print(box.info().pid, flush=True)
    os._exit(0)
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(pid)


async def test_a_layer_entry_leaving_the_root_fails_the_image_and_commits_nothing(
    runtime: boxlite.Boxlite, image_layout: Path, tmp_path: Path
) -> None:
    canary = tmp_path / f"canary-{uuid.uuid4().hex}"
    hostile = tar_of([entry("../../../../../../.." + str(canary))], {})
    layout = tmp_path / "hostile"
    with_layer(image_layout, layout, hostile)
    # Refused by the host's ext4 writer, which never resolves a layer path on the host.
    with pytest.raises(boxlite.ImagePullError, match="leaves the archive root"):
        await runtime.create(boxlite.BoxOptions(rootfs_path=layout, memory_mib=256))
    assert not canary.exists()
    images = runtime.home_dir / "images"
    assert list((images / "ingest").iterdir()) == []
    assert list((images / "disks").iterdir()) == []


async def test_links_out_of_the_root_stay_inside_the_box(
    runtime: boxlite.Boxlite, image_layout: Path, tmp_path: Path
) -> None:
    name = f"pwned-{uuid.uuid4().hex}"
    hostile = tar_of(
        [
            entry("escape", tarfile.SYMTYPE, "/../../../../tmp"),
            entry(f"escape/{name}"),
            entry("up", tarfile.SYMTYPE, "../../../.."),
            entry(f"up/{name}-2"),
        ],
        {f"escape/{name}": b"inside\n", f"up/{name}-2": b"inside too\n"},
    )
    layout = tmp_path / "links"
    with_layer(image_layout, layout, hostile)
    box = await runtime.create(boxlite.BoxOptions(rootfs_path=layout, memory_mib=256))
    seen = await run(box, "sh", "-c", f"cat /tmp/{name} /{name}-2")
    assert seen.stdout == "inside\ninside too\n"
    assert not Path("/tmp", name).exists()
    assert not Path("/", f"{name}-2").exists()
    await box.stop()
