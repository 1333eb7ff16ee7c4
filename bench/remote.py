"""The `boxlite serve` figures: the same work through a server on loopback and in process.

A server is `python -m boxlite serve` in its own home (templates off, like the local runtime
of the other figures); it is reached through the REST client (`Boxlite.rest`) and, for the
exec round trip, also by hand over HTTP + WebSocket, to tell the client's cost from the
server's."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import Figure, Ratio

import boxlite

if TYPE_CHECKING:
    from figures import Ctx


class ServerProcess:
    """`boxlite serve` on 127.0.0.1, a free port, one API key."""

    def __init__(self, home: Path, key: str) -> None:
        self.key = key
        self.log = home.parent / f"{home.name}-server.log"
        env = {k: v for k, v in os.environ.items() if k != "BOXLITE_HOME"}
        env["BOXLITE_TEMPLATES"] = "0"
        argv = [sys.executable, "-m", "boxlite", "serve", "--home", str(home), "--port", "0", "--api-key", key]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [*argv, "--allow-host-paths", "--max-boxes-per-key", "64"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.url = ""

    async def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", self.log.read_text())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"boxlite serve did not start:\n{self.log.read_text()[-2000:]}")

    def runtime(self) -> boxlite.Boxlite:
        options = boxlite.BoxliteRestOptions(url=self.url, credential=boxlite.ApiKeyCredential(self.key))
        return boxlite.Boxlite.rest(options)

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            for _ in range(1200):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                self.proc.kill()
        self.proc.wait()


async def started_server(ctx: Ctx, label: str) -> ServerProcess:
    server = ServerProcess(ctx.new_home(label), secrets.token_hex(16))
    try:
        await server.wait_ready()
    except BaseException:
        await server.stop()
        raise
    return server


async def exec_true(box: boxlite.Box) -> None:
    result = await (await box.exec("true", [])).wait()
    if result.exit_code != 0:
        raise RuntimeError(f"`true` exited {result.exit_code}")


class RawClient:
    """POST .../exec, then the WebSocket attach until the exit frame: the protocol by hand; and
    the exec session (one socket for every exec)."""

    def __init__(self, server: ServerProcess, box_id: str) -> None:
        import httpx

        self.headers = {"Authorization": f"Bearer {server.key}"}
        self.http = httpx.AsyncClient(base_url=server.url, headers=self.headers, timeout=60)
        self.ws_base = server.url.replace("http://", "ws://") + f"/v1/default/boxes/{box_id}/executions/"
        self.box_id = box_id
        self.post_ms: list[float] = []
        self.attach_ms: list[float] = []
        self.session_url = server.url.replace("http://", "ws://") + "/v1/default/session"
        self.session: Any = None
        self.tag = 0

    async def exec_true(self) -> None:
        from websockets.asyncio.client import connect

        t0 = time.perf_counter()
        r = await self.http.post(f"/v1/default/boxes/{self.box_id}/exec", json={"command": "true"})
        r.raise_for_status()
        t1 = time.perf_counter()
        async with connect(self.ws_base + r.json()["execution_id"] + "/attach", additional_headers=self.headers) as ws:
            async for message in ws:
                if isinstance(message, str):
                    t2 = time.perf_counter()  # the result is known; the close handshake is not waited for
                    end = json.loads(message)
                    if end.get("exit_code") != 0:
                        raise RuntimeError(f"`true` ended with {end}")
                    break
        self.post_ms.append((t1 - t0) * 1000)
        self.attach_ms.append((t2 - t1) * 1000)

    async def session_exec_true(self) -> None:
        """The same over one long-lived exec session socket: an exec message, then its exit."""
        from websockets.asyncio.client import connect

        if self.session is None:
            self.session = await connect(self.session_url, additional_headers=self.headers, compression=None)
        self.tag += 1
        await self.session.send(json.dumps({"type": "exec", "tag": self.tag, "box": self.box_id, "command": "true"}))
        async for message in self.session:
            if isinstance(message, str):
                event = json.loads(message)
                if event.get("tag") == self.tag and event.get("type") in ("exit", "error"):
                    if event.get("exit_code") != 0:
                        raise RuntimeError(f"`true` ended with {event}")
                    return

    async def healthz(self) -> None:
        (await self.http.get("/healthz")).raise_for_status()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_per_call(way: Callable[[], Awaitable[None]], calls: int, pids: list[int]) -> list[float]:
    """CPU milliseconds per call spent by each of `pids` (host side only; the VMs not counted)."""
    before = [cpu_seconds(p) for p in pids]
    for _ in range(calls):
        await way()
    return [(cpu_seconds(p) - b) * 1000 / calls for p, b in zip(pids, before, strict=True)]


async def fig_serve_exec_rtt(ctx: Ctx) -> list[Figure]:
    fig = Figure("serve_exec_rtt", "exec('true') + wait through boxlite serve on loopback vs in process")
    n = ctx.runs(200, 20)
    server = await started_server(ctx, "serve-rtt")
    local_rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=await ctx.cached_home()))
    remote_rt = server.runtime()
    # A second client that does not use the exec session: POST .../exec + an attach per exec.
    legacy_rt = server.runtime()
    legacy_rt._native.client.session_offered = False
    boxes: list[boxlite.Box] = []
    raw: RawClient | None = None
    try:
        local = await local_rt.create(ctx.options())
        boxes.append(local)
        remote = await remote_rt.create(ctx.options())
        boxes.append(remote)
        legacy = await legacy_rt.get(remote.id)
        assert legacy is not None
        raw = RawClient(server, remote.id)
        ways: dict[str, Callable[[], Awaitable[None]]] = {
            "local_ms": lambda: exec_true(local),
            "rest_client_ms": lambda: exec_true(remote),
            "rest_client_post_attach_ms": lambda: exec_true(legacy),
            "raw_session_ms": raw.session_exec_true,
            "raw_http_ws_ms": raw.exec_true,
            "http_get_healthz_ms": raw.healthz,
        }
        for _ in range(10):  # warm up: the agents' exec paths, the connections
            for way in ways.values():
                await way()
        raw.post_ms.clear()
        raw.attach_ms.clear()
        times: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for i in range(n):
            for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate: same noise for all
                t0 = time.perf_counter()
                await ways[name]()
                times[name].append((time.perf_counter() - t0) * 1000)
        split = {"raw_post_exec_ms": list(raw.post_ms), "raw_attach_to_exit_ms": list(raw.attach_ms)}
        # CPU time is steadier than wall time on a shared machine: what each exec costs the host.
        calls = ctx.runs(100, 10)
        me, served = os.getpid(), server.proc.pid
        fig.extra["cpu_ms_per_exec"] = {
            "local (this process)": (await cpu_per_call(ways["local_ms"], calls, [me]))[0],
            "rest_client, session (client, server)": await cpu_per_call(ways["rest_client_ms"], calls, [me, served]),
            "rest_client, POST+attach (client, server)": await cpu_per_call(
                ways["rest_client_post_attach_ms"], calls, [me, served]
            ),
            "raw_session (client, server)": await cpu_per_call(ways["raw_session_ms"], calls, [me, served]),
            "raw_http_ws (client, server)": await cpu_per_call(ways["raw_http_ws_ms"], calls, [me, served]),
        }
        fig.extra["load_average"] = os.getloadavg()
    finally:
        for box in boxes:
            await box.stop()
        if raw is not None:
            await raw.http.aclose()
            if raw.session is not None:
                await raw.session.close()
        await server.stop()
        await local_rt.close()
    for name, values in times.items():
        fig.add(name, values, "ms", p99=name != "http_get_healthz_ms")
    for name, values in split.items():
        fig.add(name, values, "ms")
    local_p50 = fig.median("local_ms") or 0.0
    for name in ("rest_client_ms", "rest_client_post_attach_ms", "raw_session_ms", "raw_http_ws_ms"):
        over = fig.median(name)
        fig.ratios.append(
            Ratio(
                f"{name.removesuffix('_ms')} p50 - local p50",
                None if over is None else over - local_p50,
                2.0,
                unit="ms",
                note="goal: at most local + 2 ms on loopback",
            )
        )
    fig.notes.append(
        "two boxes of the demo image (1 vCPU, 256 MiB), one in this process, one in the server's; each "
        "iteration runs every way once, in rotating order; rest_client is Boxlite.rest (exec, then wait) over "
        "its exec session (one WebSocket per event loop carrying every exec); rest_client_post_attach is the "
        "same client without the session (POST .../exec and a new WebSocket attach until the exit frame); "
        "raw_session and raw_http_ws are the two protocols by hand, the latter split into POST and "
        "attach-to-exit; http_get_healthz is the framework's floor (one keep-alive GET)"
    )
    return [fig]


async def fig_serve_concurrent_creates(ctx: Ctx) -> list[Figure]:
    n_boxes = 4 if ctx.quick else 32
    fig = Figure("serve_concurrent_creates", f"{n_boxes} creates at once through boxlite serve vs in process")
    options = boxlite.BoxOptions(rootfs_path=ctx.image, cpus=1, memory_mib=128)
    server = await started_server(ctx, "serve-creates")
    local_rt = boxlite.Boxlite(boxlite.Options(templates=False, home_dir=await ctx.cached_home()))
    remote_rt = server.runtime()
    walls: dict[str, list[float]] = {"local_wall_ms": [], "server_wall_ms": []}
    try:
        await (await remote_rt.create(options)).stop()  # the server's home builds its base disk once
        for run in range(ctx.runs(2, 1)):
            sides = [("local_wall_ms", local_rt), ("server_wall_ms", remote_rt)]
            for name, rt in sides if run % 2 == 0 else sides[::-1]:
                started = time.perf_counter()
                made = await asyncio.gather(*(rt.create(options) for _ in range(n_boxes)), return_exceptions=True)
                wall = (time.perf_counter() - started) * 1000
                boxes = [b for b in made if isinstance(b, boxlite.Box)]
                await asyncio.gather(*(b.stop() for b in boxes), return_exceptions=True)
                errors = [e for e in made if not isinstance(e, boxlite.Box)]
                if errors:
                    raise RuntimeError(f"{len(errors)} of {n_boxes} creates failed ({name}): {errors[0]!r}")
                walls[name].append(wall)
    finally:
        await server.stop()
        await local_rt.close()
    for name, values in walls.items():
        fig.add(name, values, "ms")
    local = fig.median("local_wall_ms")
    served = fig.median("server_wall_ms")
    fig.ratios.append(Ratio("server wall / local wall", None if not local or served is None else served / local, 1.1))
    fig.notes.append(
        f"{n_boxes} boxes of the demo image, 1 vCPU, 128 MiB each, templates off, base disk cached on both "
        f"sides; wall time from the first create call to the last box ready ({os.cpu_count()} cores); the "
        "server's through Boxlite.rest, one HTTP request per box"
    )
    return [fig]
