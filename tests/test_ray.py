"""`boxlite.ray` on a real local Ray cluster: a head node without slots and two worker nodes
(2 and 1 `boxlite_slots`, each with its own home), real VMs, handles used from remote tasks,
a killed runtime actor and a removed node, and a shutdown that leaves nothing running.

The module's tests run in order on one cluster (starting one takes ~20 s here)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import boxlite  # noqa: E402
from boxlite.errors import BoxLostError, ConfigError, ResourceExhaustedError  # noqa: E402
from boxlite.ray import NodeCapacity, RayBox, SyncRayBox, SyncRayBoxlite, placement_order  # noqa: E402
from boxlite.ray._actor import actor_name  # noqa: E402
from tests.conftest import engine_pids, pid_alive  # noqa: E402

#: Bound on anything that must not hang (a hang guard, not a timing claim).
PROMPT = 60.0


# ---------------------------------------------------------------------------- placement rule


def cap(node: str, slots: int, boxes: int = 0) -> NodeCapacity:
    return NodeCapacity(node, "10.0.0.1", slots, boxes, running=boxes > 0)


def test_placement_takes_the_node_with_most_free_slots() -> None:
    nodes = [cap("a", 4, 3), cap("b", 2), cap("c", 3, 1)]
    assert placement_order(nodes) == ["b", "c", "a"]  # free 2, 2, 1; b holds fewer boxes
    assert placement_order(nodes, {"b": 2}) == ["c", "a"]  # b is full once its creations land


def test_placement_skips_full_nodes() -> None:
    assert placement_order([cap("a", 1, 1), cap("b", 2, 5)]) == []
    assert placement_order([]) == []


@pytest.mark.parametrize(
    ("runtime_options", "server_options", "message"),
    [
        ({"home_dir": "/x"}, {}, "home_dir"),
        ({"no_such_option": 1}, {}, "no_such_option"),
        ({}, {"max_boxes_per_key": 3}, "cannot set max_boxes_per_key"),
        ({}, {"no_such_field": 1}, "unknown field"),
        ({}, {"orphan_timeout": -1}, "orphan_timeout"),
    ],
)
def test_bad_node_options_are_refused_in_the_driver(
    runtime_options: dict[str, Any], server_options: dict[str, Any], message: str
) -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=message):
        SyncRayBoxlite(runtime_options=runtime_options, server_options=server_options)


def test_import_boxlite_does_not_import_ray() -> None:
    code = "import sys, boxlite; assert 'ray' not in sys.modules and 'boxlite.ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- the cluster


@dataclass
class World:
    cluster: Any
    runtime: SyncRayBoxlite
    base: Path
    wide: str  # the node with 2 slots
    narrow: str  # the node with 1 slot
    nodes: dict[str, Any]  # node id -> the cluster's node object
    boxes: dict[str, SyncRayBox]


def _proc_text(pid: str, name: str) -> str:
    try:
        return Path("/proc", pid, name).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_session_pids(session: str, raylets: set[int]) -> list[int]:
    """Live processes of this Ray session: those naming its directory (GCS, raylets,
    monitors) and those started by its raylets (workers, actors, agents), which rename
    themselves (``ray::IDLE``) but keep ``RAY_RAYLET_PID`` in their environment."""
    markers = {f"RAY_RAYLET_PID={pid} " for pid in raylets}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        mine = session in _proc_text(entry.name, "cmdline") or any(
            m in _proc_text(entry.name, "environ") + " " for m in markers
        )
        if mine and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_for_slots(expected: int) -> None:
    deadline = time.monotonic() + PROMPT
    while sum(n["Resources"].get("boxlite_slots", 0) for n in ray.nodes() if n["Alive"]) < expected:
        assert time.monotonic() < deadline, "the cluster's nodes did not come up"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def world(image_layout: Path) -> Iterator[World]:
    # Short: node homes hold sockets (the core moves them if a path is too long, but why make it).
    base = Path(tempfile.mkdtemp(prefix="blray-"))
    # Ray's session files (logs, sockets, its address file) go here, not to /tmp/ray.
    ray_tmp = Path(tempfile.mkdtemp(prefix="blray-tmp-"))
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    wide = cluster.add_node(num_cpus=1, resources={"boxlite_slots": 2})
    narrow = cluster.add_node(num_cpus=1, resources={"boxlite_slots": 1})
    ray.init(address=cluster.address, log_to_driver=False)  # the start-failure test's traceback is expected
    session = cluster.head_node.get_session_dir_path()
    raylets = {
        p for p in engine_pids(session, "raylet") if _proc_text(str(p), "cmdline").split(" ")[0].endswith("/raylet")
    }
    assert len(raylets) == 3
    runtime = None
    try:
        _wait_for_slots(3)
        runtime = SyncRayBoxlite(
            home_base=str(base), allow_host_paths=True, runtime_options={"templates": False}, timeout=120
        )
        yield World(
            cluster,
            runtime,
            base,
            wide.node_id,
            narrow.node_id,
            {wide.node_id: wide, narrow.node_id: narrow},
            {},
        )
    finally:
        if runtime is not None:
            runtime.close()
        ray.shutdown()
        cluster.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
    leftovers = [pid for pid in engine_pids(str(base)) if pid_alive(pid)]
    for pid in leftovers:
        os.kill(pid, 9)
    assert not leftovers, f"QEMU processes left running: {leftovers}"
    deadline = time.monotonic() + PROMPT
    while ray_session_pids(session, raylets) and time.monotonic() < deadline:
        time.sleep(0.2)
    ray_left = ray_session_pids(session, raylets)
    assert not ray_left, f"processes of the Ray session left running: {ray_left}"
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def options(image_layout: Path) -> boxlite.BoxOptions:
    return boxlite.BoxOptions(rootfs_path=image_layout, cpus=1, memory_mib=256)


# ---------------------------------------------------------------------------- tests, in order


DETACHED_DRIVER = """
import sys, ray, boxlite
from boxlite.ray import SyncRayBoxlite
ray.init(address=sys.argv[1], log_to_driver=False)
rt = SyncRayBoxlite(namespace="kept", detached=True, home_base=sys.argv[2], allow_host_paths=True,
                    runtime_options={"templates": False}, timeout=120)
box = rt.create(boxlite.BoxOptions(rootfs_path=sys.argv[3], cpus=1, memory_mib=256), "kept")
assert box.exec("sh", ["-c", "echo kept > /root/note"]).wait().exit_code == 0
print(box.node_id)
"""  # and it ends without close()


def test_a_detached_runtime_outlives_its_driver(world: World, image_layout: Path) -> None:
    home_base = Path(tempfile.mkdtemp(prefix="blkept-"))
    try:
        driver = [sys.executable, "-c", DETACHED_DRIVER, world.cluster.address, str(home_base), str(image_layout)]
        done = subprocess.run(driver, capture_output=True, text=True, timeout=3 * PROMPT)
        assert done.returncode == 0, done.stderr[-3000:]
        node = done.stdout.split()[-1]

        kept = SyncRayBoxlite(namespace="kept")
        box = kept.get("kept")
        assert box is not None and box.node_id == node
        assert box.read_file("/root/note") == b"kept\n"  # the box and its VM outlived the driver
        kept.close()  # ends only what this one started: nothing
        assert box.exec("echo", ["still"]).wait().stdout == "still\n"

        SyncRayBoxlite(namespace="kept").end_runtimes()
        with pytest.raises(ValueError):
            ray.get_actor(actor_name(node), namespace="kept")
        _wait_until_no_engines(home_base)
    finally:
        shutil.rmtree(home_base, ignore_errors=True)


def test_boxes_spread_by_free_slots(world: World, image_layout: Path) -> None:
    async def two() -> list[RayBox]:
        rt = world.runtime.runtime
        return list(await asyncio.gather(rt.create(options(image_layout), "first"), rt.create(options(image_layout))))

    from boxlite.sync import _run

    first, second = (SyncRayBox(b) for b in _run(two()))
    # Whichever is placed first goes to the wide node (most free slots); then both nodes have
    # one free slot and the one holding fewer boxes (counting creations under way) takes the
    # other.
    assert {first.node_id, second.node_id} == {world.wide, world.narrow}
    by_node = {box.node_id: box for box in (first, second)}
    world.boxes.update(first=first, wide=by_node[world.wide], narrow=by_node[world.narrow])

    capacity = {c.node_id: c for c in world.runtime.nodes()}
    assert (capacity[world.wide].boxes, capacity[world.wide].free) == (1, 1)
    assert (capacity[world.narrow].boxes, capacity[world.narrow].free) == (1, 0)
    homes = sorted(p.name for p in world.base.iterdir())
    assert homes == sorted(n[:16] for n in (world.wide, world.narrow))  # one home per node


def test_a_full_node_refuses_without_booting(world: World, image_layout: Path) -> None:
    with pytest.raises(ResourceExhaustedError, match="no free boxlite slot"):
        world.runtime.create(options(image_layout), node_id=world.narrow)


def test_detached_boxes_are_refused(world: World, image_layout: Path) -> None:
    detached = boxlite.BoxOptions(rootfs_path=image_layout, detach=True, auto_remove=False)
    with pytest.raises(boxlite.InvalidArgumentError, match="detach"):
        world.runtime.create(detached)


def test_no_node_with_the_resource_is_a_config_error(world: World, image_layout: Path) -> None:
    with SyncRayBoxlite(resource="no_such_slots", namespace="other") as other:
        with pytest.raises(ConfigError, match="no_such_slots"):
            other.create(options(image_layout))


def test_a_runtime_that_cannot_start_says_why(world: World, image_layout: Path) -> None:
    blocker = world.base / "not-a-directory"
    blocker.write_text("")
    with SyncRayBoxlite(namespace="broken", home_base=str(blocker), start_timeout=PROMPT) as broken:
        with pytest.raises(boxlite.UpstreamUnavailableError, match=r"could not start: .*not-a-directory"):
            broken.create(options(image_layout))


def test_handles_find_and_list(world: World) -> None:
    first = world.boxes["first"]
    found = world.runtime.get("first")
    assert found is not None and (found.id, found.node_id) == (first.id, first.node_id)
    assert world.runtime.get("no-such-box") is None
    infos = {i.id: i for i in world.runtime.list_info()}
    assert {b.id for b in world.boxes.values()} <= set(infos)
    assert len(infos) == 2
    assert all(infos[b.id].status == "running" for b in world.boxes.values())
    assert world.runtime.get_info("first").name == "first"  # type: ignore[union-attr]


@ray.remote(num_cpus=0)
def work_in_task(box: SyncRayBox, payload: bytes) -> tuple[str, int, bytes, str]:
    """Runs in a Ray worker: copies a file in, runs a command, copies the result out."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "in")
        src.mkdir()
        (src / "data.bin").write_bytes(payload)
        box.copy_in(src, "/work")
        result = box.exec("sh", ["-c", "wc -c < /work/data.bin; cp /work/data.bin /work/back.bin"]).wait()
        box.copy_out("/work/back.bin", Path(tmp, "out.bin"))
        back = Path(tmp, "out.bin").read_bytes()
    return ray.get_runtime_context().get_node_id(), result.exit_code, back, result.stdout.strip()


@ray.remote(num_cpus=0)
def async_in_task(box: RayBox) -> str:
    async def go() -> str:
        execution = await box.exec("cat", ["/etc/hostname"])
        lines = [line async for line in execution.stdout()]
        await execution.wait()
        return "".join(lines).strip()

    return asyncio.run(go())


def test_exec_and_copy_from_a_remote_task(world: World) -> None:
    box = world.boxes["wide"]  # the task runs on the other node
    payload = os.urandom(70_000)
    on = NodeAffinitySchedulingStrategy(world.narrow, soft=False)
    node, code, back, count = ray.get(work_in_task.options(scheduling_strategy=on).remote(box, payload), timeout=PROMPT)
    assert node == world.narrow != box.node_id
    assert (code, count, back) == (0, str(len(payload)), payload)

    hostname = ray.get(async_in_task.options(scheduling_strategy=on).remote(box.box), timeout=PROMPT)
    assert hostname == box.exec("cat", ["/etc/hostname"]).wait().stdout.strip()


def test_a_vm_lost_on_a_live_node_is_not_a_lost_box(world: World, image_layout: Path) -> None:
    box = world.boxes["wide"]
    sleeping = box.exec("sleep", ["600"])
    vms = engine_pids(str(world.base / world.wide[:16]))
    assert len(vms) == 1, "the node should run this box's VM alone"
    os.kill(vms[0], 9)
    with pytest.raises(boxlite.GuestProtocolError):
        sleeping.wait()
    assert not box.is_lost()  # its runtime still answers: the box is there, its VM is not
    with pytest.raises(boxlite.BoxNotFoundError):
        box.info()  # an auto-removed box whose VM ended is gone, as locally
    replacement = world.runtime.create(options(image_layout), node_id=world.wide)
    assert replacement.exec("echo", ["back"]).wait().stdout == "back\n"
    world.boxes["wide"] = replacement


def test_killed_runtime_actor_makes_its_boxes_lost(world: World, image_layout: Path) -> None:
    box = world.boxes["narrow"]
    home = world.base / world.narrow[:16]
    vms = engine_pids(str(home))
    assert vms, "the box's VM should be running before the kill"
    sleeping = box.exec("sleep", ["600"])
    # Ray kills an actor's child processes before the actor, so its server may report the VM's
    # end before it goes; kill the VM first to make that order certain.
    for pid in vms:
        os.kill(pid, 9)
    ray.kill(ray.get_actor(actor_name(world.narrow), namespace="boxlite"), no_restart=True)

    with pytest.raises(BoxLostError):
        sleeping.wait()

    with pytest.raises(BoxLostError, match="create a new box"):
        box.exec("true")
    with pytest.raises(BoxLostError):
        box.info()  # remembered: no second round of asking
    assert box.is_lost()
    # A task holding a copy of the handle learns it on its own.
    on = NodeAffinitySchedulingStrategy(world.wide, soft=False)
    with pytest.raises(BoxLostError):
        ray.get(work_in_task.options(scheduling_strategy=on).remote(box, b"x"), timeout=PROMPT)

    lost = [i for i in world.runtime.list_info() if i.id == box.id]
    assert [i.status for i in lost] == ["lost"]
    _wait_until_no_engines(home)  # the box's VM died with its runtime


def test_a_dead_node_gets_a_fresh_runtime_on_demand(world: World, image_layout: Path) -> None:
    # Both nodes have one free slot; the narrow one holds no live box, so it is chosen, and its
    # runtime is started again.
    third = world.runtime.create(options(image_layout), "third")
    assert third.node_id == world.narrow
    assert third.exec("echo", ["again"]).wait().stdout == "again\n"
    world.boxes["third"] = third


def test_removed_node_makes_its_boxes_lost(world: World) -> None:
    box = world.boxes["wide"]
    world.cluster.remove_node(world.nodes[world.wide])
    with pytest.raises(BoxLostError):
        box.exec("true")
    statuses = {i.id: i.status for i in world.runtime.list_info()}
    assert statuses[box.id] == "lost"
    assert statuses[world.boxes["third"].id] == "running"
    _wait_until_no_engines(world.base / world.wide[:16])
    world.runtime.remove(box.id)  # a lost box is forgotten
    assert box.id not in {i.id for i in world.runtime.list_info()}


def test_close_stops_boxes_and_runtimes(world: World) -> None:
    third = world.boxes["third"]
    world.runtime.close()
    with pytest.raises(ValueError):
        ray.get_actor(actor_name(world.narrow), namespace="boxlite")
    _wait_until_no_engines(world.base)
    with pytest.raises(BoxLostError):
        third.exec("true")


def _wait_until_no_engines(home: Path) -> None:
    deadline = time.monotonic() + PROMPT
    while any(pid_alive(p) for p in engine_pids(str(home))):
        assert time.monotonic() < deadline, f"QEMU of {home} still running"
        time.sleep(0.2)
