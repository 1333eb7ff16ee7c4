"""Fixtures for the integration tests: real VMs (TCG here), real disks, real images.

Every runtime made here lives in a temporary home; at the end each fixture checks that no
QEMU process of that home is left behind.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The test kit (testkit/, shared with bench/) is a package at the repository root.
sys.path.insert(0, str(REPO))

import boxlite  # noqa: E402
from testkit.images import busybox_layout  # noqa: E402


def engine_pids(marker: str, program: str = "qemu-system") -> list[int]:
    """Pids of `program` processes (QEMU) whose command line mentions `marker` (a home)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if program in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="session")
def image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox OCI layout: prebuilt by `make`, or built here."""
    prebuilt = os.environ.get("BOXLITE_TEST_IMAGE")
    if prebuilt and (Path(prebuilt) / "index.json").is_file():
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("image") / "busybox"
    busybox_layout(out)
    return out


def make_runtime(home: Path, **options: object) -> boxlite.Boxlite:
    """A runtime over `home`. Memory templates are off unless asked for: most tests make one
    box per home, and a template made for it would only cost CPU (docs/templates.md)."""
    options.setdefault("templates", False)
    return boxlite.Boxlite(boxlite.Options(home_dir=home, **options))  # type: ignore[arg-type]


def settle_templates(home: Path, within: float = 120.0) -> None:
    """Waits for the template makers of `home` (background processes that end on their own)."""
    deadline = time.monotonic() + within
    makers = str(home / "templates")  # the maker's job file and its QEMU's files are there
    while any(pid_alive(p) for p in engine_pids(makers, "boxlite-shim") + engine_pids(makers)):
        assert time.monotonic() < deadline, "a template maker is still running"
        time.sleep(0.2)


def assert_no_engines(home: Path) -> None:
    """Fails (after killing them) if QEMU processes of `home` are still running."""
    settle_templates(home)
    leftovers = [pid for pid in engine_pids(str(home)) if pid_alive(pid)]
    for pid in leftovers:
        os.kill(pid, 9)
    assert not leftovers, f"QEMU processes left running: {leftovers}"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A runtime home; the test fails if a QEMU process of it survives the test."""
    path = tmp_path / "home"
    yield path
    assert_no_engines(path)


@pytest.fixture
def runtime(home: Path) -> Iterator[boxlite.Boxlite]:
    rt = make_runtime(home)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("shared") / "home"
    yield path
    assert_no_engines(path)


@pytest.fixture(scope="module")
def shared_runtime(shared_home: Path) -> Iterator[boxlite.Boxlite]:
    rt = make_runtime(shared_home, templates=True)  # several boxes per home: worth it
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def shared_box(shared_runtime: boxlite.Boxlite, image_layout: Path) -> Iterator[boxlite.Box]:
    """One running box for the tests of a module that do not change its lifecycle. The
    native box is not tied to an event loop, so each test awaits it from its own loop."""
    box = asyncio.run(shared_runtime.create(boxlite.BoxOptions(rootfs_path=image_layout, cpus=1, memory_mib=256)))
    yield box
    asyncio.run(box.stop())


@pytest.fixture(scope="module")
def sync_codebox(shared_runtime: boxlite.Boxlite) -> Iterator[boxlite.SyncCodeBox]:
    """A running python:slim stand-in for the tests of a module, through the sync API."""
    from testkit.images import python_layout

    with boxlite.SyncCodeBox(rootfs_path=python_layout(), runtime=shared_runtime, cpus=1, memory_mib=512) as box:
        yield box


async def run(box: boxlite.Box, *argv: str, **kwargs: object) -> boxlite.ExecResult:
    """Runs argv in the box and waits for it."""
    execution = await box.exec(argv[0], list(argv[1:]), **kwargs)  # type: ignore[arg-type]
    return await execution.wait()
