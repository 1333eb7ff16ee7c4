"""The figures. Each is `async def fig_<name>(ctx) -> list[Figure]` and can run alone."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import engine
import network
import remote
from common import Figure, Ratio, ratio, read_text

import boxlite
from testkit.images import built_images
from testkit.oci import layout_size, umoci_unpack
from testkit.registry import Registry

MIB = 1024 * 1024


class Ctx:
    """What the figures share within one run of the suite."""

    def __init__(self, image: Path, quick: bool, stream_mib: int, tmp: Path) -> None:
        self.image = image
        self.quick = quick
        self.stream_mib = stream_mib
        self.tmp = tmp
        self.accel, self.accel_reason = boxlite.accelerator()
        self.native = engine.build_native()
        self.memory_mib = 256
        self.cpus = 1
        self._home: Path | None = None
        self._homes = 0
        self.product_argv: list[str] | None = None
        self.results: dict[str, Figure] = {}
        self.net_cache: dict[str, Any] | None = None  # the network guest's boots (net_runs)

    def runs(self, full: int, quick: int = 2) -> int:
        return quick if self.quick else full

    def new_home(self, label: str) -> Path:
        self._homes += 1
        path = self.tmp / f"{self._homes:02d}-{label}"
        path.mkdir(parents=True)
        return path

    def options(self, layout: Path | None = None) -> boxlite.BoxOptions:
        return boxlite.BoxOptions(rootfs_path=layout or self.image, cpus=self.cpus, memory_mib=self.memory_mib)

    async def cached_home(self) -> Path:
        """A runtime home whose base disk for the demo image is already built."""
        if self._home is None:
            home = self.new_home("cached")
            rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
            box = await rt.create(self.options())
            self.remember_argv(box)
            await box.stop()
            self._home = home
        return self._home

    def remember_argv(self, box: boxlite.Box) -> None:
        pid = info_get(box, "pid")
        if self.product_argv is None and pid:
            try:
                self.product_argv = engine.engine_argv(int(pid))
            except OSError:
                pass

    def floor_argv(self) -> list[str]:
        return engine.floor_argv(self.accel, self.memory_mib, self.cpus, self.native["floor_cpio"])

    def base_disk(self) -> Path | None:
        if self._home is None:
            return None
        disks = sorted((self._home / "images" / "disks").glob("*.ext4"))
        return disks[0] if disks else None


async def timed(awaitable: Awaitable[Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = await awaitable
    return value, (time.perf_counter() - started) * 1000


async def run_in_box(box: boxlite.Box, cmd: str, *args: str) -> boxlite.ExecResult:
    result = await (await box.exec(cmd, list(args))).wait()
    if result.exit_code != 0:
        raise RuntimeError(f"`{cmd} {' '.join(args)}` failed in the box ({result.exit_code}): {result.stderr[-500:]}")
    return result


def info_get(box: boxlite.Box, key: str) -> Any:
    """A field of box.info(), whether it is a dict or an object (the API is moving)."""
    info = box.info()
    return info.get(key) if isinstance(info, dict) else getattr(info, key, None)


def box_dir(home: Path, box: boxlite.Box) -> Path:
    return home / "boxes" / str(box.id)


def guest_uptimes(console: str) -> dict[str, float]:
    """Guest-side milestones from the agent's console lines (`... (uptime N ms)`)."""
    out: dict[str, float] = {}
    for line in console.splitlines():
        m = re.search(r"uptime (\d+) ms", line)
        if not m:
            continue
        value = float(m.group(1))
        if "starting" in line:
            out["agent_start"] = value
        elif "modules loaded" in line:
            out["root_mounted"] = value
        elif "ready" in line:
            out["ready"] = value
    return out


# 1 + 2: the boot floor, and cold create -> first exec result --------------------------------


async def fig_boot(ctx: Ctx, with_create: bool) -> list[Figure]:
    """Floor boots alone, or interleaved with cold creates (same run, same noise)."""
    floor = Figure("boot_floor", "Boot floor: bare QEMU, same kernel, to an init that powers off")
    cold = Figure("cold_create", "Cold create -> first exec result (image cached)")
    n = ctx.runs(10, 3)
    argv = ctx.floor_argv()
    floor.extra["argv"] = argv
    f_init: list[float] = []
    f_exit: list[float] = []
    f_guest: list[float] = []
    c: dict[str, list[float]] = {}
    rt = None
    if with_create:
        home = await ctx.cached_home()
        rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
    for _ in range(n):
        boot = engine.floor_boot(argv)
        f_init.append(boot.init_ms)
        f_exit.append(boot.exit_ms)
        f_guest.append(boot.guest_boottime_ms)
        if rt is None:
            continue
        started = time.perf_counter()
        box = await rt.create(ctx.options())
        created = time.perf_counter()
        await run_in_box(box, "true")
        done = time.perf_counter()
        ctx.remember_argv(box)
        m = await box.metrics()
        console = read_text(box_dir(home, box) / "console.log")
        await box.stop()
        sample = {
            "total_ms": (done - started) * 1000,
            "create_ms": (created - started) * 1000,
            "first_exec_ms": (done - created) * 1000,
            "stage_filesystem_setup_ms": m.stage_filesystem_setup_ms,
            "stage_image_prepare_ms": m.stage_image_prepare_ms,
            "stage_guest_rootfs_ms": m.stage_guest_rootfs_ms,
            "stage_box_config_ms": m.stage_box_config_ms,
            "stage_box_spawn_ms": m.stage_box_spawn_ms,
            "stage_container_init_ms": m.stage_container_init_ms,
            "total_create_duration_ms": m.total_create_duration_ms,
        }
        for key, value in guest_uptimes(console).items():
            sample[f"guest_uptime_at_{key}_ms"] = value
        for key, value in sample.items():
            if value is not None:
                c.setdefault(key, []).append(float(value))
    floor.add("spawn_to_init_ms", f_init, "ms")
    floor.add("spawn_to_exit_ms", f_exit, "ms")
    floor.add("guest_uptime_at_init_ms", f_guest, "ms")
    floor.add("before_kernel_clock_ms", [a - b for a, b in zip(f_init, f_guest, strict=True)], "ms")
    floor.notes.append(
        "spawn_to_init is the floor the ratios use: QEMU start, firmware, kernel decompression and boot to the "
        "first instruction of /init; before_kernel_clock is the part before the guest's CLOCK_BOOTTIME starts"
    )
    out = [floor]
    if rt is not None:
        for key, values in c.items():
            cold.add(key, values, "ms")
        base = floor.median("spawn_to_init_ms")
        cold.ratios.append(Ratio("cold create -> first exec / boot floor", ratio(cold.median("total_ms"), base), 1.1))
        cold.extra["floor_exit_ratio"] = ratio(cold.median("total_ms"), floor.median("spawn_to_exit_ms"))
        if ctx.product_argv:
            cold.extra["product_argv"] = ctx.product_argv
            mismatch = {
                k: (v, engine.argv_summary(argv)[k])
                for k, v in engine.argv_summary(ctx.product_argv).items()
                if k != "append" and v != engine.argv_summary(argv)[k]
            }
            append = engine.argv_summary(ctx.product_argv)["append"]
            if not append.startswith(engine.BASE_KERNEL_ARGS):
                mismatch["append"] = (append, engine.BASE_KERNEL_ARGS)
            if mismatch:
                floor.notes.append(f"the floor's QEMU options differ from the box's: {mismatch}")
        out.append(cold)
    return out


async def fig_boot_floor(ctx: Ctx) -> list[Figure]:
    return await fig_boot(ctx, with_create=False)


async def fig_cold_create(ctx: Ctx) -> list[Figure]:
    return await fig_boot(ctx, with_create=True)


# 3: warm exec round trip ----------------------------------------------------------------------


def host_spawn_ms(n: int) -> list[float]:
    true = shutil.which("true") or "/bin/true"
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([true], check=True)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def install_helper(ctx: Ctx, box: boxlite.Box) -> str:
    await box.copy_in(ctx.native["guest_helper"], "/tmp/guest_helper")
    await run_in_box(box, "chmod", "755", "/tmp/guest_helper")
    return "/tmp/guest_helper"


async def fig_warm_exec(ctx: Ctx) -> list[Figure]:
    fig = Figure("warm_exec", "Warm exec round trip: `true` in a running box")
    n = ctx.runs(300, 30)
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=await ctx.cached_home()))
    box = await rt.create(ctx.options())
    try:
        helper = await install_helper(ctx, box)
        for _ in range(10):  # warm up: the first execs translate the agent's exec path
            await run_in_box(box, "true")
        started_ms: list[float] = []
        total_ms: list[float] = []
        hops: dict[str, list[float]] = {}
        for _ in range(n):
            t0 = time.perf_counter()
            execution = await box.exec("true", [])
            t1 = time.perf_counter()
            result = await execution.wait()
            t2 = time.perf_counter()
            if result.exit_code != 0:
                raise RuntimeError(f"`true` exited {result.exit_code}")
            started_ms.append((t1 - t0) * 1000)
            total_ms.append((t2 - t0) * 1000)
            for hop, ms in guest_hops_ms(result).items():
                hops.setdefault(hop, []).append(ms)
        out = await run_in_box(box, helper, "spawn", str(n), "/bin/true")
        guest_ms = [int(x) / 1e6 for x in out.stdout.split()]
    finally:
        await box.stop()
    host_ms = host_spawn_ms(n)
    fig.add("round_trip_ms", total_ms, "ms", p99=True)
    fig.add("exec_started_ms", started_ms, "ms", p99=True)
    fig.add("guest_fork_exec_wait_ms", guest_ms, "ms", p99=True)
    fig.add("host_native_spawn_ms", host_ms, "ms", p99=True)
    for hop, values in hops.items():
        fig.add(f"guest_{hop}_ms", values, "ms")
    fig.ratios.append(
        Ratio(
            "round trip p50 / guest's own fork+exec+wait p50",
            ratio(fig.median("round_trip_ms"), fig.median("guest_fork_exec_wait_ms")),
            1.5,
        )
    )
    fig.notes.append(
        "guest_fork_exec_wait is a static C loop inside the box (fork, execve /bin/true, waitpid); "
        "host_native_spawn is subprocess.run(['true']) on the host, for scale; exec_started is box.exec() "
        "returning (the guest said Started); guest_* are the agent's own hops of each exec (its monotonic "
        "clock, each from the previous hop): request decoded -> cloned child runs -> final process calls "
        "execve -> execve done and Started sent -> exit seen -> exit report queued"
    )
    return [fig]


async def fig_interpreter(ctx: Ctx) -> list[Figure]:
    fig = Figure("interpreter", "Code run round trip: `x = 1` in a warm context vs `python3 -c` per run")
    n = ctx.runs(100, 10)
    home = ctx.new_home("interpreter")
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
    codebox = boxlite.CodeBox(rootfs_path=built_images() / "python", runtime=rt, cpus=1, memory_mib=256)
    await codebox.start()
    try:
        first_ms = (await timed(codebox.run("x = 1")))[1]  # starts the default context
        for _ in range(5):
            await codebox.run("x = 1")
            await codebox.exec("python3", "-c", "x = 1")
        run_ms: list[float] = []
        exec_ms: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            await codebox.run("x = 1")
            t1 = time.perf_counter()
            result = await codebox.exec("python3", "-c", "x = 1")
            t2 = time.perf_counter()
            if result.exit_code != 0:
                raise RuntimeError(f"python3 -c exited {result.exit_code}: {result.stderr}")
            run_ms.append((t1 - t0) * 1000)
            exec_ms.append((t2 - t1) * 1000)
        rich_ms = [(await timed(codebox.run_code("x + 1")))[1] for _ in range(n)]
    finally:
        await codebox.stop()
        rt.close()
    fig.add("run_warm_context_ms", run_ms, "ms", p99=True)
    fig.add("exec_python3_c_ms", exec_ms, "ms", p99=True)
    fig.add("run_code_last_value_ms", rich_ms, "ms", p99=True)
    fig.add("first_run_starts_context_ms", [first_ms], "ms")
    fig.ratios.append(
        Ratio(
            "run('x = 1') p50 in a warm context / exec('python3', '-c', 'x = 1') p50",
            ratio(fig.median("run_warm_context_ms"), fig.median("exec_python3_c_ms")),
            0.1,
        )
    )
    fig.notes.append(
        "the python:slim stand-in, 1 vCPU, 256 MiB; run_code_last_value returns the value of `x + 1` as a "
        "rich result; first_run_starts_context is the first run, which starts the interpreter"
    )
    return [fig]


GUEST_HOPS = (
    ("clone", "child_started_us"),
    ("enter_box_and_confine", "execve_called_us"),
    ("execve_and_started", "started_us"),
    ("run_to_exit_seen", "exit_seen_us"),
    ("report", "reported_us"),
)


def guest_hops_ms(result: boxlite.ExecResult) -> dict[str, float]:
    """The agent's trace of one exec as the time of each hop, in ms (empty without a trace)."""
    trace = getattr(result, "guest_trace", None)
    if not trace:
        return {}
    hops, previous = {}, 0
    for hop, key in GUEST_HOPS:
        at = trace.get(key) or previous
        hops[hop] = (at - previous) / 1000
        previous = at
    return hops


# 4: streaming throughput ----------------------------------------------------------------------


async def fig_streaming(ctx: Ctx) -> list[Figure]:
    fig = Figure("streaming", f"stdout throughput: {ctx.stream_mib} MiB from `head -c` in the box")
    n = ctx.runs(2, 1)
    size = ctx.stream_mib * MIB
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=await ctx.cached_home()))
    box = await rt.create(ctx.options())
    rates: list[float] = []
    guest_rates: list[float] = []
    try:
        helper = await install_helper(ctx, box)
        for _ in range(n):
            started = time.perf_counter()
            execution = await box.exec("head", ["-c", str(size), "/dev/zero"])
            received = 0
            async for chunk in execution.stdout(binary=True):
                received += len(chunk)
            result = await execution.wait()
            seconds = time.perf_counter() - started
            if received != size or result.exit_code != 0:
                raise RuntimeError(f"streamed {received} of {size} bytes, exit {result.exit_code}")
            rates.append(size / MIB / seconds)
            out = await run_in_box(box, helper, "time", "/bin/busybox", "head", "-c", str(size), "/dev/zero")
            guest_rates.append(size / MIB / (int(out.stdout.strip()) / 1e9))
    finally:
        await box.stop()
    fig.add("box_to_host_MiB_per_s", rates, "MiB/s")
    fig.add("guest_to_devnull_MiB_per_s", guest_rates, "MiB/s")
    fig.ratios.append(
        Ratio(
            "box stdout rate / guest's own rate to /dev/null",
            ratio(fig.median("box_to_host_MiB_per_s"), fig.median("guest_to_devnull_MiB_per_s")),
            0.5,
            higher_is_better=True,
        )
    )
    return [fig]


# 5: concurrency --------------------------------------------------------------------------------


async def fig_concurrency(ctx: Ctx) -> list[Figure]:
    fig = Figure("concurrency", "N boxes created at once: wall time to all ready")
    home = await ctx.cached_home()
    cores = os.cpu_count() or 1
    walls: dict[int, list[float]] = {}
    for n_boxes in (1, 2, 4, 8):
        for _ in range(ctx.runs(3 if n_boxes == 1 else 2, 1)):
            rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
            started = time.perf_counter()
            results = await asyncio.gather(*(rt.create(ctx.options()) for _ in range(n_boxes)), return_exceptions=True)
            wall = (time.perf_counter() - started) * 1000
            boxes = [b for b in results if isinstance(b, boxlite.Box)]
            for b in boxes:
                await b.stop()
            errors = [r for r in results if not isinstance(r, boxlite.Box)]
            if errors:
                raise RuntimeError(f"{len(errors)} of {n_boxes} boxes failed: {errors[0]!r}")
            walls.setdefault(n_boxes, []).append(wall)
    for n_boxes, values in walls.items():
        fig.add(f"N={n_boxes}_wall_ms", values, "ms")
    one = fig.median("N=1_wall_ms")
    for n_boxes in (2, 4, 8):
        fig.extra[f"ratio_N{n_boxes}_to_N1"] = ratio(fig.median(f"N={n_boxes}_wall_ms"), one)
    limit = 1.1 * max(1.0, 8 / cores)
    fig.ratios.append(
        Ratio("wall(N=8) / wall(N=1)", fig.extra["ratio_N8_to_N1"], limit, note=f"target 1.1 x 8/{cores} cores")
    )
    return [fig]


# 6: memory ------------------------------------------------------------------------------------


def process_rss_mib(pid: int) -> float:
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parent_pid(pid: int) -> int:
    stat = read_text(f"/proc/{pid}/stat")
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else 0


RUNTIME_PROBE = """
import asyncio, json, os, sys
def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
out = {"interpreter_mib": rss()}
import boxlite
out["after_import_mib"] = rss()
async def main():
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=sys.argv[2]))
    box = await rt.create(boxlite.BoxOptions(rootfs_path=sys.argv[1], cpus=1, memory_mib=256))
    await (await box.exec("true", [])).wait()
    out["one_box_running_mib"] = rss()
    await box.stop()
asyncio.run(main())
print(json.dumps(out))
"""


def runtime_rss_probe(image: Path, home: Path) -> dict[str, float]:
    """RSS of a fresh Python process: bare, after `import boxlite`, with one box running."""
    argv = [sys.executable, "-c", RUNTIME_PROBE, str(image), str(home)]
    probe = subprocess.run(argv, capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"runtime RSS probe failed: {probe.stderr[-300:]}")
    return dict(json.loads(probe.stdout.strip().splitlines()[-1]))


async def restored_engine_memory(ctx: Ctx) -> dict[str, list[float]]:
    """The engine memory of idle boxes started from a template (their guest RAM is the
    template's file, mapped copy-on-write)."""
    home = ctx.new_home("memory-templates")
    rt = boxlite.Boxlite(boxlite.Options(home_dir=home, templates=True))
    await (await rt.create(ctx.options())).stop()
    if not wait_for_template(home):
        return {}
    boxes = [await rt.create(ctx.options()) for _ in range(ctx.runs(3, 1))]
    samples: dict[str, list[float]] = {}
    try:
        for box in boxes:
            await run_in_box(box, "true")
        await asyncio.sleep(3)  # idle
        for box in boxes:
            if not (await box.metrics()).started_from_template:
                continue
            for key, value in engine.engine_memory(int(info_get(box, "pid")), ctx.memory_mib).items():
                samples.setdefault(key, []).append(value)
    finally:
        for box in boxes:
            await box.stop()
    return samples


async def fig_memory(ctx: Ctx) -> list[Figure]:
    fig = Figure("memory", "Memory per idle box (host side)")
    home = await ctx.cached_home()
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
    n = ctx.runs(3, 1)
    boxes = [await rt.create(ctx.options()) for _ in range(n)]
    samples: dict[str, list[float]] = {}
    shim_rss: list[float] = []
    try:
        for box in boxes:
            await run_in_box(box, "true")
        await asyncio.sleep(3)  # idle
        for box in boxes:
            pid = int(info_get(box, "pid"))
            for key, value in engine.engine_memory(pid, ctx.memory_mib).items():
                samples.setdefault(key, []).append(value)
            parent = parent_pid(pid)
            if parent and parent != os.getpid():
                shim_rss.append(process_rss_mib(parent))
    finally:
        for box in boxes:
            await box.stop()
    for key, values in samples.items():
        fig.add(f"engine_{key}", values, "MiB")
    for key, values in (await restored_engine_memory(ctx)).items():
        fig.add(f"from_template_engine_{key}", values, "MiB")
    if shim_rss:
        fig.add("per_box_supervisor_rss_mib", shim_rss, "MiB")
    fig.ratios.append(
        Ratio(
            "engine PSS beyond the guest RAM it touched", fig.median("engine_beyond_guest_ram_pss_mib"), 32, unit="MiB"
        )
    )
    if "from_template_engine_beyond_guest_ram_pss_mib" in fig.metrics:
        fig.ratios.append(
            Ratio(
                "the same, box started from a template",
                fig.median("from_template_engine_beyond_guest_ram_pss_mib"),
                32,
                unit="MiB",
            )
        )
    try:
        for key, value in runtime_rss_probe(ctx.image, home).items():
            fig.add(f"runtime_process_{key}", [value], "MiB")
    except RuntimeError as e:
        fig.notes.append(str(e))
    fig.notes.append(
        "guest RAM touched = Rss of the QEMU mapping the size of the guest's memory; everything else in the QEMU "
        "process is the engine's own cost (the TCG translation cache is the largest part under TCG); "
        "runtime_process_* is a fresh Python process: bare, after `import boxlite`, with one box running"
    )
    return [fig]


# 7: images ------------------------------------------------------------------------------------


async def boxlite_pull_seconds(registry: str, ref: str, home: Path) -> float:
    """`runtime.images.pull(ref)` into a fresh home, timed. Raises NotImplementedError with the
    reason when this build of boxlite has no image store yet."""
    options: dict[str, Any] = {"home_dir": home, "templates": False}
    if hasattr(boxlite, "ImageRegistry"):
        options["image_registries"] = [boxlite.ImageRegistry(registry, transport="http")]  # type: ignore[attr-defined]
    try:
        rt = boxlite.Boxlite(boxlite.Options(**options))
    except TypeError as e:
        raise NotImplementedError(f"boxlite.Options does not take image_registries yet ({e})") from e
    store = getattr(rt, "images", None)
    if store is None or not hasattr(store, "pull"):
        raise NotImplementedError("boxlite.Boxlite(...).images.pull does not exist in this build (issue 6)")
    started = time.perf_counter()
    await store.pull(ref)
    return time.perf_counter() - started


def skopeo_pull_seconds(ref: str) -> float:
    """`skopeo copy` of `ref` into a fresh OCI layout, timed."""
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-skopeo-") as tmp:
        started = time.perf_counter()
        subprocess.run(
            ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{tmp}/layout:latest"],
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - started


def umoci_unpack_seconds(layout: Path, tag: str) -> float:
    """`umoci unpack` of the layout into a fresh bundle, timed."""
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-umoci-") as tmp:
        started = time.perf_counter()
        umoci_unpack(layout, tag, Path(tmp) / "bundle")
        return time.perf_counter() - started


async def fig_images(ctx: Ctx) -> list[Figure]:
    pull = Figure("image_pull", "Pull of the python:slim stand-in from a local registry vs `skopeo copy`")
    unpack = Figure("image_unpack", "Unpack to a base disk (first create, cold home) vs `umoci unpack`")
    # The tests' python:slim stand-in (testkit.images), tag slim.
    layout = built_images() / "python"
    size = layout_size(layout)
    for fig in (pull, unpack):
        fig.extra["image"] = str(layout)
        fig.extra["image_bytes"] = size
    # Unpack: what the first create from a new layout spends building the base disk.
    n = ctx.runs(3, 1)
    rootfs_ms: list[float] = []
    umoci_ms: list[float] = []
    for _ in range(n):
        rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=ctx.new_home("unpack")))
        box = await rt.create(ctx.options(layout))
        m = await box.metrics()
        await box.stop()
        if m.stage_guest_rootfs_ms is not None:
            rootfs_ms.append(float(m.stage_guest_rootfs_ms))
        umoci_ms.append(umoci_unpack_seconds(layout, "slim") * 1000)
    unpack.add("boxlite_base_disk_build_ms", rootfs_ms, "ms")
    unpack.add("umoci_unpack_ms", umoci_ms, "ms")
    unpack.ratios.append(
        Ratio(
            "base disk build / umoci unpack",
            ratio(unpack.median("boxlite_base_disk_build_ms"), unpack.median("umoci_unpack_ms")),
            2.0,
        )
    )
    unpack.notes.append(
        "boxlite_base_disk_build is stage_guest_rootfs_ms of the first create in a cold home: sizing the layers, "
        "mkfs.ext4, booting the unpack VM, streaming and applying the layers in the guest, power-off, and the "
        "box's qcow2 overlay"
    )
    # Pull: needs the image store (issue 6); otherwise recorded as not available.
    try:
        with tempfile.TemporaryDirectory(prefix="boxlite-bench-registry-") as tmp, Registry(Path(tmp)) as reg:
            registry = reg.host
            ref = reg.push(layout, "slim", "library/python")
            skopeo_ms: list[float] = []
            pulls_ms: list[float] = []
            pull_error: str | None = None
            for _ in range(n):
                skopeo_ms.append(skopeo_pull_seconds(ref) * 1000)
                if pull_error is None:
                    try:
                        pulls_ms.append(await boxlite_pull_seconds(registry, ref, ctx.new_home("pull")) * 1000)
                    except NotImplementedError as e:
                        pull_error = str(e)
            pull.add("skopeo_copy_ms", skopeo_ms, "ms")
            if pulls_ms:
                pull.add("boxlite_pull_ms", pulls_ms, "ms")
                pull.ratios.append(
                    Ratio(
                        "boxlite pull / skopeo copy",
                        ratio(pull.median("boxlite_pull_ms"), pull.median("skopeo_copy_ms")),
                        1.1,
                    )
                )
            else:
                pull.notes.append(f"boxlite pull not available: {pull_error}")
                pull.ratios.append(Ratio("boxlite pull / skopeo copy", None, 1.1, note=f"not available: {pull_error}"))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        pull.not_available(f"local registry or skopeo failed: {e}")
    return [pull, unpack]


# 8: stop and restart --------------------------------------------------------------------------


async def fig_stop_restart(ctx: Ctx) -> list[Figure]:
    fig = Figure("stop_restart", "Stop latency, and restart (stop -> start -> first exec) of a box with state")
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=await ctx.cached_home()))
    n = ctx.runs(5, 2)
    box = await rt.create(
        boxlite.BoxOptions(rootfs_path=ctx.image, cpus=ctx.cpus, memory_mib=ctx.memory_mib, auto_remove=False)
    )
    stop_ms: list[float] = []
    restart_ms: list[float] = []
    cold_ms: list[float] = []
    try:
        await run_in_box(box, "sh", "-c", "echo kept > /root/state && sync")
        for _ in range(n):
            _, ms = await timed(box.stop())
            stop_ms.append(ms)
            # A cold create -> first exec in the same iteration, for the comparison.
            started = time.perf_counter()
            other = await rt.create(ctx.options())
            await run_in_box(other, "true")
            cold_ms.append((time.perf_counter() - started) * 1000)
            await other.stop()
            started = time.perf_counter()
            await box.start()
            result = await run_in_box(box, "cat", "/root/state")
            restart_ms.append((time.perf_counter() - started) * 1000)
            if result.stdout.strip() != "kept":
                raise RuntimeError(f"state lost across stop/start: {result.stdout!r}")
    finally:
        await box.stop()
        await rt.remove(box.id)
    fig.add("stop_ms", stop_ms, "ms")
    fig.add("restart_to_first_exec_ms", restart_ms, "ms")
    fig.add("cold_create_to_first_exec_ms", cold_ms, "ms")
    fig.ratios.append(
        Ratio(
            "restart / cold create -> first exec (same iterations)",
            ratio(fig.median("restart_to_first_exec_ms"), fig.median("cold_create_to_first_exec_ms")),
            1.0,
        )
    )
    return [fig]


# 9 + 10: the network path alone: the same guest through slirp and through our stack --------


NET_DOWNLOAD_MIB = 100
NET_CONNECTS = 200


def net_runs(ctx: Ctx) -> dict[str, Any]:
    """Boots of the network guest (bench/network.py), slirp and our stack alternating (the
    order flips every round), each downloading 100 MiB and making 200 connects. Measured once
    per run of the suite; net_download and net_connect both read it."""
    if ctx.net_cache is not None:
        return ctx.net_cache
    guest = network.build_guest()
    stack_bin = network.build_stack()
    rounds = ctx.runs(5, 1)
    runs: dict[str, list[network.NetRun]] = {"slirp": [], "stack": []}
    with network.HostServer(NET_DOWNLOAD_MIB * MIB) as server:
        local = [network.local_rate_mib_s(server) for _ in range(3)]
        for i in range(rounds):
            for mode in ("slirp", "stack") if i % 2 == 0 else ("stack", "slirp"):
                runs[mode].append(
                    network.boot(
                        mode,
                        accel=ctx.accel,
                        memory_mib=ctx.memory_mib,
                        cpus=ctx.cpus,
                        cpio=guest["net_cpio"],
                        stack_bin=stack_bin,
                        server=server,
                        connects=NET_CONNECTS,
                    )
                )
    argv = {
        mode: network.net_argv(ctx.accel, ctx.memory_mib, ctx.cpus, guest["net_cpio"], mode, Path("NET_SOCKET"))
        for mode in runs
    }
    ctx.net_cache = {"runs": runs, "local": local, "argv": argv, "stack_line": runs["stack"][-1].stack_line}
    return ctx.net_cache


async def fig_net_download(ctx: Ctx) -> list[Figure]:
    title = f"Guest download of {NET_DOWNLOAD_MIB} MiB from a host loopback server: our stack vs slirp"
    fig = Figure("net_download", title)
    data = net_runs(ctx)
    runs = data["runs"]
    fig.add("stack_MiB_per_s", [r.rate_mib_s for r in runs["stack"]], "MiB/s")
    fig.add("slirp_MiB_per_s", [r.rate_mib_s for r in runs["slirp"]], "MiB/s")
    fig.add("stack_first_byte_ms", [r.first_byte_ms for r in runs["stack"]], "ms")
    fig.add("slirp_first_byte_ms", [r.first_byte_ms for r in runs["slirp"]], "ms")
    fig.add("host_server_local_MiB_per_s", data["local"], "MiB/s")
    fig.add("stack_supervisor_cpu_ms", [r.stack_cpu_s * 1000 for r in runs["stack"]], "ms")
    fig.add("stack_engine_cpu_ms", [r.qemu_cpu_s * 1000 for r in runs["stack"]], "ms")
    fig.add("slirp_engine_cpu_ms", [r.qemu_cpu_s * 1000 for r in runs["slirp"]], "ms")
    paired = [s.rate_mib_s / p.rate_mib_s for s, p in zip(runs["stack"], runs["slirp"], strict=True)]
    fig.extra["paired_rate_ratios"] = paired
    # The guest's clock against the host's (console lines before and after the download).
    fig.extra["guest_over_host_download_seconds"] = [
        r.download_s / r.host_seen_download_s for r in runs["stack"] + runs["slirp"]
    ]
    fig.extra["argv"] = data["argv"]
    fig.extra["serve_netdev_last_line"] = data["stack_line"]
    fig.ratios.append(
        Ratio(
            "our stack's download rate / slirp's (same guest, same server)",
            ratio(fig.median("stack_MiB_per_s"), fig.median("slirp_MiB_per_s")),
            1.0,
            higher_is_better=True,
        )
    )
    fig.notes.append(
        "the bare engine (the floor's kernel, machine, accelerator, CPU model, memory) with a virtio-net-pci and "
        "-netdev user (slirp, guest 10.0.2.15, host as 10.0.2.2) or -netdev stream to serve_netdev (boxlite-net, "
        "guest 192.168.127.2, host as 192.168.127.254); MTU 1500 both; rate timed in the guest from connect() "
        "to the last byte, every byte checked; rounds alternate which goes first; paired per-round ratios "
        + ", ".join(f"{x:.2f}" for x in paired)
        + "; *_cpu_ms is user+sys of the process over the whole boot (download, connects, boot)"
    )
    return [fig]


async def fig_net_connect(ctx: Ctx) -> list[Figure]:
    title = f"TCP connect round trip from the guest to a host loopback port ({NET_CONNECTS} per boot)"
    fig = Figure("net_connect", title)
    runs = net_runs(ctx)["runs"]
    fig.add("stack_connect_ms", [x for r in runs["stack"] for x in r.connect_ms], "ms", p99=True)
    fig.add("slirp_connect_ms", [x for r in runs["slirp"] for x in r.connect_ms], "ms", p99=True)
    fig.ratios.append(
        Ratio(
            "our stack's connect p50 / slirp's (same guest, same server)",
            ratio(fig.median("stack_connect_ms"), fig.median("slirp_connect_ms")),
            1.0,
        )
    )
    fig.notes.append(
        "connect() in the guest, timed with CLOCK_MONOTONIC, then close(); the host port accepts and closes; "
        "the SYN-ACK waits for the host connect in both (slirp and our stack re-originate the connection)"
    )
    return [fig]


# 11: what a network adds to a box's create -> first exec --------------------------------------


async def fig_net_boot_cost(ctx: Ctx) -> list[Figure]:
    fig = Figure("net_boot_cost", "Create -> first exec with a network (the default) and without")
    home = await ctx.cached_home()
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
    n = ctx.runs(8, 2)
    samples: dict[str, dict[str, list[float]]] = {"with": {}, "without": {}}
    for i in range(n):
        for kind in ("with", "without") if i % 2 == 0 else ("without", "with"):
            options = ctx.options()
            if kind == "without":
                options = boxlite.BoxOptions(
                    rootfs_path=ctx.image,
                    cpus=ctx.cpus,
                    memory_mib=ctx.memory_mib,
                    network=boxlite.NetworkSpec("disabled"),
                )
            started = time.perf_counter()
            box = await rt.create(options)
            created = time.perf_counter()
            await run_in_box(box, "true")
            done = time.perf_counter()
            try:
                if i < 2:  # the box has eth0 exactly when it has a network
                    net = (await run_in_box(box, "ls", "/sys/class/net")).stdout.split()
                    if ("eth0" in net) != (kind == "with"):
                        raise RuntimeError(f"a box {kind} a network has interfaces {net}")
                console = read_text(box_dir(home, box) / "console.log")
            finally:
                await box.stop()
            sample = {"total_ms": (done - started) * 1000, "create_ms": (created - started) * 1000}
            for key, value in guest_uptimes(console).items():
                sample[f"guest_uptime_at_{key}_ms"] = value
            for key, value in sample.items():
                samples[kind].setdefault(key, []).append(value)
    for key in samples["with"]:
        fig.add(f"with_network_{key}", samples["with"][key], "ms")
        fig.add(f"without_network_{key}", samples["without"].get(key, []), "ms")
    paired = [a / b for a, b in zip(samples["with"]["total_ms"], samples["without"]["total_ms"], strict=True)]
    fig.extra["paired_total_ratios"] = paired
    fig.extra["ratio_of_medians"] = ratio(fig.median("with_network_total_ms"), fig.median("without_network_total_ms"))
    # Each pair ran back to back, so its ratio shares the machine's load; the median of the
    # pairs moves far less between runs than the ratio of two medians.
    fig.ratios.append(
        Ratio("create -> first exec with a network / without (median of pairs)", statistics.median(paired), 1.05)
    )
    fig.notes.append(
        'the demo image, cached; "without" is NetworkSpec("disabled") (no virtio-net device, no eth0); pairs '
        "alternate which goes first; per-pair ratios " + ", ".join(f"{x:.3f}" for x in paired)
    )
    return [fig]


# 9: memory templates, pause and resume ----------------------------------------------------------


def wait_for_template(home: Path, within: float = 180.0) -> bool:
    """Waits until the home has a template in its index (the maker runs in the background)."""
    index = home / "templates" / "index"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if index.is_dir() and any(index.iterdir()):
            return True
        time.sleep(0.2)
    return False


def pss_mib(pid: int) -> float:
    for line in read_text(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def fig_templates(ctx: Ctx) -> list[Figure]:
    """Create -> first exec from a template against a cold boot (interleaved, same home), the
    memory of idle boxes of each kind, and pause/resume of a running box."""
    fig = Figure("templates", "Memory templates: create -> first exec, idle memory, pause/resume")
    home = ctx.new_home("templates")
    warm_rt = boxlite.Boxlite(boxlite.Options(home_dir=home, templates=True))
    cold_rt = boxlite.Boxlite(boxlite.Options(home_dir=home, templates=False))
    first = await warm_rt.create(ctx.options())
    await first.stop()
    if not wait_for_template(home):
        return [fig.not_available("no template was made within 180 s (see templates/build.log)")]
    warm: list[float] = []
    cold: list[float] = []
    for _ in range(ctx.runs(10, 3)):
        for rt, samples in ((warm_rt, warm), (cold_rt, cold)):
            started = time.perf_counter()
            box = await rt.create(ctx.options())
            await run_in_box(box, "true")
            samples.append((time.perf_counter() - started) * 1000)
            from_template = (await box.metrics()).started_from_template
            await box.stop()
            if from_template != (rt is warm_rt):
                fig.notes.append("a box did not start the way its runtime asked (template vs cold)")
    fig.add("from_template_create_to_first_exec_ms", warm, "ms")
    fig.add("cold_create_to_first_exec_ms", cold, "ms")
    fig.ratios.append(
        Ratio(
            "template create -> first exec / cold",
            ratio(fig.median("from_template_create_to_first_exec_ms"), fig.median("cold_create_to_first_exec_ms")),
            0.15,
        )
    )

    # Idle memory: many boxes from one template against one cold box, times as many.
    n = ctx.runs(20, 4)
    clones = [await warm_rt.create(ctx.options()) for _ in range(n)]
    try:
        for box in clones:
            await run_in_box(box, "true")
        await asyncio.sleep(5)  # idle
        clone_pss = [pss_mib(int(info_get(b, "pid"))) for b in clones]
    finally:
        for box in clones:
            await box.stop()
    colds = [await cold_rt.create(ctx.options()) for _ in range(ctx.runs(3, 1))]
    try:
        for box in colds:
            await run_in_box(box, "true")
        await asyncio.sleep(5)
        cold_pss = [pss_mib(int(info_get(b, "pid"))) for b in colds]
    finally:
        for box in colds:
            await box.stop()
    fig.add("from_template_idle_engine_pss_mib", clone_pss, "MiB")
    fig.add("cold_idle_engine_pss_mib", cold_pss, "MiB")
    cold_median = fig.median("cold_idle_engine_pss_mib")
    summed = sum(clone_pss)
    fig.extra["idle_boxes"] = n
    fig.extra["summed_template_pss_mib"] = round(summed, 1)
    fig.ratios.append(
        Ratio(
            f"{n} idle boxes from one template, summed PSS / {n} x one cold box",
            ratio(summed, n * cold_median if cold_median else None),
            0.4,
        )
    )
    per_clone = summed / n if n else None
    fig.extra["boxes_in_20_gib_from_template"] = int(20 * 1024 / per_clone) if per_clone else None
    fig.extra["boxes_in_20_gib_cold"] = int(20 * 1024 / cold_median) if cold_median else None

    # Pause and resume with 100 MiB of touched memory (a tmpfs file), then fork.
    pause: list[float] = []
    resume: list[float] = []
    fork: list[float] = []
    box = await cold_rt.create(boxlite.BoxOptions(rootfs_path=ctx.image, cpus=ctx.cpus, memory_mib=512))
    try:
        await run_in_box(box, "sh", "-c", "head -c 104857600 /dev/urandom > /dev/shm/touched")
        for _ in range(ctx.runs(5, 2)):
            started = time.perf_counter()
            await box.pause()
            pause.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await box.resume()
            await run_in_box(box, "true")
            resume.append((time.perf_counter() - started) * 1000)
        for _ in range(ctx.runs(3, 1)):
            started = time.perf_counter()
            child = await box.fork()
            await run_in_box(child, "true")
            fork.append((time.perf_counter() - started) * 1000)
            await child.stop()
    finally:
        await box.stop()
    fig.add("pause_ms", pause, "ms")
    fig.add("resume_to_first_exec_ms", resume, "ms")
    fig.add("fork_to_child_first_exec_ms", fork, "ms")
    fig.notes.append(
        f"{ctx.memory_mib} MiB boxes, {ctx.cpus} vCPU; idle PSS measured 5 s after each box's first command; "
        "pause/resume/fork on a 512 MiB box with 100 MiB written to /dev/shm (its RAM is written whole: "
        "a paused box shares nothing); fork = pause, split disk and state, resume both"
    )
    warm_rt.close()
    cold_rt.close()
    return [fig]


# 13: a host folder (virtio-fs) against the box's own disk and the host itself -------------


VOLUME_FILES = 1500


def small_tree_tar(where: Path) -> Path:
    """A tar of VOLUME_FILES small files in 30 directories (a source tree's shape)."""
    tree = where / "tree"
    for index in range(VOLUME_FILES):
        path = tree / f"d{index % 30:02d}" / f"f{index:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file {index}\n" * (1 + index % 50))
    archive = where / "tree.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(where), "tree"], check=True)
    shutil.rmtree(tree)
    return archive


def host_untar_ms(archive: Path, out: Path) -> float:
    out.mkdir()
    started = time.perf_counter()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(out)], check=True)
    os.sync()
    elapsed = (time.perf_counter() - started) * 1000
    shutil.rmtree(out)
    return elapsed


async def fig_volumes(ctx: Ctx) -> list[Figure]:
    fig = Figure("volumes", f"Untar of {VOLUME_FILES} small files: into a volume, the box's disk, the host")
    work = ctx.tmp / "volume-bench"
    folder = work / "shared"
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # on a root host guest root writes as the box's own id
    archive = small_tree_tar(work)
    shutil.copy(archive, folder / "tree.tar")
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=await ctx.cached_home()))
    options = boxlite.BoxOptions(
        rootfs_path=ctx.image, cpus=ctx.cpus, memory_mib=ctx.memory_mib, volumes=[(str(folder), "/vol")]
    )
    box = await rt.create(options)
    volume_ms: list[float] = []
    disk_ms: list[float] = []
    host_ms: list[float] = []
    exec_ms: list[float] = []
    try:
        for _ in range(ctx.runs(5, 2)):
            _, ms = await timed(run_in_box(box, "true"))
            exec_ms.append(ms)
            _, ms = await timed(
                run_in_box(box, "sh", "-c", "mkdir /vol/out && tar -xf /vol/tree.tar -C /vol/out && sync")
            )
            volume_ms.append(ms)
            _, ms = await timed(
                run_in_box(box, "sh", "-c", "mkdir /root/out && tar -xf /vol/tree.tar -C /root/out && sync")
            )
            disk_ms.append(ms)
            await run_in_box(box, "rm", "-rf", "/vol/out", "/root/out")
            host_ms.append(host_untar_ms(archive, work / "host-out"))
    finally:
        await box.stop()
        rt.close()
        shutil.rmtree(work, ignore_errors=True)
    fig.add("volume_untar_ms", volume_ms, "ms")
    fig.add("box_disk_untar_ms", disk_ms, "ms")
    fig.add("host_untar_ms", host_ms, "ms")
    fig.add("exec_true_ms", exec_ms, "ms")
    fig.ratios.append(
        Ratio(
            "volume untar / box disk untar",
            ratio(fig.median("volume_untar_ms"), fig.median("box_disk_untar_ms")),
            2.0,
            note="each guest run is one exec (a `true` exec's round trip is listed for scale); "
            "the tar is read from the volume in both",
        )
    )
    return [fig]


async def fig_disk_ops(ctx: Ctx) -> list[Figure]:
    """Clone of a stopped box whose disk holds 200 MiB written by the box: time and host bytes
    each clone adds; snapshot create/restore; export and import throughput."""
    fig = Figure("disk_ops", "Clones, snapshots, export and import of a box with a 200 MiB disk")
    n = ctx.runs(20, 3)
    home = ctx.new_home("disk-ops")
    rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=home))
    box = await rt.create(
        boxlite.BoxOptions(
            rootfs_path=ctx.image, cpus=ctx.cpus, memory_mib=ctx.memory_mib, disk_size_gb=1, auto_remove=False
        )
    )
    try:
        await run_in_box(box, "dd", "if=/dev/urandom", "of=/data.bin", "bs=1M", "count=200")
        await box.stop()

        def used() -> int:
            return sum(p.stat().st_blocks * 512 for p in home.rglob("*") if p.is_file())

        clone_ms: list[float] = []
        clone_bytes: list[float] = []
        clones = []
        for _ in range(n):
            before = used()
            clone, ms = await timed(box.clone_box())
            clone_ms.append(ms)
            clone_bytes.append(used() - before)
            clones.append(clone)
        snap_ms: list[float] = []
        restore_ms: list[float] = []
        for i in range(n):
            _, ms = await timed(box.snapshot.create(name=f"s{i}"))
            snap_ms.append(ms)
            _, ms = await timed(box.snapshot.restore(f"s{i}"))
            restore_ms.append(ms)
        export_dir = ctx.tmp / "disk-ops-export"
        export_dir.mkdir(exist_ok=True)
        archive, export_ms = await timed(box.export(dest=export_dir))
        size = os.stat(archive).st_size
        other = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=ctx.new_home("disk-ops-import")))
        _, import_ms = await timed(other.import_box(archive))
        other.close()
        for clone in clones:
            await rt.remove(clone.id)
    finally:
        await box.stop()
        rt.close()
    fig.add("clone_ms", clone_ms, "ms")
    fig.add("clone_extra_bytes", clone_bytes, "B")
    fig.add("snapshot_create_ms", snap_ms, "ms")
    fig.add("snapshot_restore_ms", restore_ms, "ms")
    fig.add("export_mib_per_s", [size / MIB / (export_ms / 1000)], "MiB/s")
    fig.add("import_mib_per_s", [size / MIB / (import_ms / 1000)], "MiB/s")
    fig.ratios.append(Ratio("clone p50 (target under 100 ms)", fig.median("clone_ms"), 100.0, unit="ms"))
    fig.ratios.append(
        Ratio("host bytes per clone p50 (target under 1 MiB)", fig.median("clone_extra_bytes"), float(MIB), unit="B")
    )
    fig.notes.append(
        f"archive {size / MIB:.0f} MiB (flattened qcow2 of the whole disk); the clone's bytes are "
        "everything the home gained (the new overlay, the new layer's metadata, the database)"
    )
    return [fig]


FIGURES: dict[str, Callable[[Ctx], Awaitable[list[Figure]]]] = {
    "boot_floor": fig_boot_floor,
    "cold_create": fig_cold_create,
    "warm_exec": fig_warm_exec,
    "streaming": fig_streaming,
    "concurrency": fig_concurrency,
    "memory": fig_memory,
    "images": fig_images,
    "stop_restart": fig_stop_restart,
    "net_download": fig_net_download,
    "net_connect": fig_net_connect,
    "net_boot_cost": fig_net_boot_cost,
    "templates": fig_templates,
    "volumes": fig_volumes,
    "disk_ops": fig_disk_ops,
    "interpreter": fig_interpreter,
    "serve_exec_rtt": remote.fig_serve_exec_rtt,
    "serve_concurrent_creates": remote.fig_serve_concurrent_creates,
}
