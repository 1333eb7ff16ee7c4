"""The network path on its own: the same guest booted on the bare engine twice, once with
QEMU's own user-mode network (slirp, `-netdev user`) and once with boxlite's stack
(`-netdev stream` served by `rust/boxlite-net/examples/serve_netdev.rs`), downloading from and
connecting to one host loopback server.

The guest is the boot floor's (bench/engine.py: the box's kernel, machine type, accelerator,
CPU model and memory) with a bigger initramfs: static busybox, the bundle's virtio PCI and
virtio-net modules (taken from the bundle's initramfs.cpio), `/init` (a busybox script that
loads them, configures eth0 with `ip` from the kernel command line's NET_* variables, runs
the measurements, powers off) and `bench/native/net_helper.c`, which times a download and
TCP connects with CLOCK_MONOTONIC and prints `BOXLITE-NET ...` lines on the console.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import engine
from common import BENCH, BUILD, REPO

MIB = 1024 * 1024
# The pattern net_helper.c checks: the little-endian 64-bit word at body offset k is k ^ KEY.
PATTERN_KEY = 0x5A17C0DEB0C5F00D
# Loaded in this order by the guest's /init (virtio_net needs failover and net_failover).
NET_MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
]
GUEST_MAC = "52:54:00:12:34:56"
MARKER = b"BOXLITE-NET"

INIT_SCRIPT = """#!/bin/busybox sh
# The network bench guest (bench/network.py). NET_* come from the kernel command line.
bb=/bin/busybox
$bb mount -t proc proc /proc
for m in {modules}; do $bb insmod /lib/modules/$m.ko || echo "BOXLITE-NET error insmod $m"; done
$bb ip link set lo up
$bb ip link set eth0 mtu "$NET_MTU" up || echo "BOXLITE-NET error no eth0"
$bb ip addr add "$NET_ADDR" dev eth0
$bb ip route add default via "$NET_GW"
echo "BOXLITE-NET ready uptime=$($bb cut -d' ' -f1 /proc/uptime)"
/net_helper download "$NET_HOST" "$NET_HTTP_PORT" /blob || echo "BOXLITE-NET error download"
/net_helper connect "$NET_HOST" "$NET_CONNECT_PORT" "$NET_CONNECTS" || echo "BOXLITE-NET error connect"
echo "BOXLITE-NET done"
$bb poweroff -f
"""


# --- the guest ----------------------------------------------------------------------------


def read_newc(data: bytes) -> dict[str, bytes]:
    """The regular files of an uncompressed newc cpio archive, by name."""
    files: dict[str, bytes] = {}
    at = 0
    while at + 110 <= len(data):
        if data[at : at + 6] != b"070701":
            raise ValueError(f"not a newc archive at offset {at}")
        fields = [int(data[at + 6 + 8 * i : at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[at + 110 : at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        if name == "TRAILER!!!":
            break
        if mode & 0o170000 == 0o100000:
            files[name] = data[at : at + size]
        at += size
        at += -at % 4
    return files


def build_guest() -> dict[str, Path]:
    """Compiles net_helper.c and packs the network guest's initramfs (rebuilt every run: a
    few MB, well under a second)."""
    BUILD.mkdir(parents=True, exist_ok=True)
    src = BENCH / "native" / "net_helper.c"
    helper = BUILD / "net_helper"
    if not engine._newer(helper, src):
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("gcc not found: install the gcc package")
        subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(helper), str(src)], check=True)
    busybox = Path("/bin/busybox")
    if (
        not busybox.is_file()
        or b"Requesting program interpreter"
        in subprocess.run(["readelf", "-lW", str(busybox)], capture_output=True, check=False).stdout
    ):
        raise RuntimeError("a static /bin/busybox is needed (Debian: apt-get install busybox-static)")
    bundle = read_newc((engine.guest_dir() / "initramfs.cpio").read_bytes())
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        ("bin", 0o040755, b"", (0, 0)),
        ("bin/busybox", 0o100755, busybox.read_bytes(), (0, 0)),
        ("dev", 0o040755, b"", (0, 0)),
        ("dev/console", 0o020600, b"", (5, 1)),
        ("proc", 0o040755, b"", (0, 0)),
        ("lib", 0o040755, b"", (0, 0)),
        ("lib/modules", 0o040755, b"", (0, 0)),
    ]
    for name in NET_MODULES:
        data = bundle.get(f"lib/modules/{name}.ko")
        if data is None:
            raise RuntimeError(f"the guest bundle's initramfs has no lib/modules/{name}.ko (guest/modules.txt)")
        entries.append((f"lib/modules/{name}.ko", 0o100644, data, (0, 0)))
    script = INIT_SCRIPT.format(modules=" ".join(NET_MODULES))
    entries.append(("init", 0o100755, script.encode(), (0, 0)))
    entries.append(("net_helper", 0o100755, helper.read_bytes(), (0, 0)))
    cpio = BUILD / "net-initramfs.cpio"
    tmp = cpio.with_suffix(".tmp")
    tmp.write_bytes(engine.newc_archive(entries))
    tmp.replace(cpio)
    return {"net_helper": helper, "net_cpio": cpio}


def build_stack() -> Path:
    """`cargo build --release -p boxlite-net --example serve_netdev` (incremental), in
    $CARGO_TARGET_DIR if set."""
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    subprocess.run(
        ["cargo", "build", "--quiet", "--release", "-p", "boxlite-net", "--example", "serve_netdev"],
        cwd=REPO,
        check=True,
    )
    binary = target / "release" / "examples" / "serve_netdev"
    if not binary.is_file():
        raise RuntimeError(f"cargo built serve_netdev but {binary} is missing")
    return binary


# --- the host server ----------------------------------------------------------------------


def pattern(size: int) -> bytes:
    """`size` bytes (a multiple of 8) of the pattern net_helper checks."""
    words = array("Q", range(0, size, 8))
    key = array("Q", [PATTERN_KEY]) * len(words)
    # XOR word by word without a Python loop: through int.from_bytes on the whole buffer.
    mixed = int.from_bytes(words.tobytes(), "little") ^ int.from_bytes(key.tobytes(), "little")
    return mixed.to_bytes(size, "little")


class HostServer:
    """A loopback HTTP/1.0 server answering every GET with `size` pattern bytes from memory,
    and a second port that accepts connections and closes them (the connect figure)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.body = memoryview(pattern(size))
        self.http = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.sink = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.http_port = self.http.getsockname()[1]
        self.sink_port = self.sink.getsockname()[1]
        self.served = 0
        self.accepted = 0
        self._stop = False
        self._threads = [
            threading.Thread(target=self._serve_http, daemon=True),
            threading.Thread(target=self._serve_sink, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _serve_http(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.http.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                head = f"HTTP/1.0 200 OK\r\nContent-Length: {self.size}\r\n\r\n"
                conn.sendall(head.encode())
                for at in range(0, self.size, 4 * MIB):
                    conn.sendall(self.body[at : at + 4 * MIB])
                self.served += 1
            except OSError:
                pass

    def _serve_sink(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sink.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        for s in (self.http, self.sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> HostServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_rate_mib_s(server: HostServer) -> float:
    """The host server's own rate: the same GET over loopback with curl (or a socket)."""
    curl = shutil.which("curl")
    url = f"http://127.0.0.1:{server.http_port}/blob"
    started = time.perf_counter()
    if curl:
        out = subprocess.run([curl, "-sS", "-o", "/dev/null", "-w", "%{size_download}", url], capture_output=True)
        got = int(out.stdout or b"0")
    else:
        got = 0
        with socket.create_connection(("127.0.0.1", server.http_port)) as s:
            s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
            while chunk := s.recv(1 << 20):
                got += len(chunk)
    seconds = time.perf_counter() - started
    if got < server.size:
        raise RuntimeError(f"the host server sent {got} of {server.size} bytes to a local client")
    return server.size / MIB / seconds


# --- one boot ----------------------------------------------------------------------------


@dataclass
class NetRun:
    mode: str  # "slirp" or "stack"
    download_bytes: int = 0
    download_s: float = float("nan")
    download_connect_ms: float = float("nan")
    first_byte_ms: float = float("nan")
    host_seen_download_s: float = float("nan")  # host clock: console line before -> after
    connect_ms: list[float] = field(default_factory=list)
    boot_to_ready_ms: float = float("nan")
    qemu_cpu_s: float = float("nan")  # user + sys of the QEMU process over the whole run
    stack_cpu_s: float = float("nan")  # user + sys of serve_netdev (stack runs only)
    stack_line: str = ""
    console: str = ""

    @property
    def rate_mib_s(self) -> float:
        return self.download_bytes / MIB / self.download_s


def net_argv(accel: str, memory_mib: int, cpus: int, cpio: Path, mode: str, sock: Path | None) -> list[str]:
    argv = engine.floor_argv(accel, memory_mib, cpus, cpio)
    argv[argv.index("-name") + 1] = f"boxlite-bench-net-{mode}"
    if mode == "slirp":
        netdev = "user,id=n0"
    else:
        netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}"
    return [*argv, "-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,romfile=,mac={GUEST_MAC}"]


def kernel_env(mode: str, server: HostServer, connects: int, mtu: int = 1500) -> str:
    if mode == "slirp":
        addr, gw, host = "10.0.2.15/24", "10.0.2.2", "10.0.2.2"
    else:
        addr, gw, host = "192.168.127.2/24", "192.168.127.1", "192.168.127.254"
    env = {
        "NET_ADDR": addr,
        "NET_GW": gw,
        "NET_HOST": host,
        "NET_MTU": mtu,
        "NET_HTTP_PORT": server.http_port,
        "NET_CONNECT_PORT": server.sink_port,
        "NET_CONNECTS": connects,
    }
    return " ".join(f"{k}={v}" for k, v in env.items())


def boot(
    mode: str,
    *,
    accel: str,
    memory_mib: int,
    cpus: int,
    cpio: Path,
    stack_bin: Path,
    server: HostServer,
    connects: int,
    timeout: float = 300.0,
) -> NetRun:
    """One boot of the network guest with `mode`'s network; returns what the guest measured."""
    run = NetRun(mode)
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-net-") as tmp:
        sock = Path(tmp) / "net.sock"
        stack = None
        if mode == "stack":
            stack = subprocess.Popen(
                [str(stack_bin), str(sock), GUEST_MAC], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            assert stack.stdout is not None
            line = stack.stdout.readline()
            if "listening" not in line:
                stack.kill()
                err = stack.stderr.read() if stack.stderr else ""
                raise RuntimeError(f"serve_netdev did not start: {line!r} {err}")
        argv = net_argv(accel, memory_mib, cpus, cpio, mode, sock)
        argv[argv.index("-append") + 1] = f"{engine.BASE_KERNEL_ARGS} {kernel_env(mode, server, connects)}"
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        buf = b""
        stamps: dict[str, float] = {}
        try:
            fd = proc.stdout.fileno()
            while True:
                remaining = timeout - (time.perf_counter() - started)
                if remaining <= 0:
                    raise TimeoutError(f"the network guest ({mode}) did not finish in {timeout:.0f} s: {buf[-800:]!r}")
                ready, _, _ = select.select([fd], [], [], remaining)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                now = time.perf_counter()
                buf += chunk
                for key in ("ready", "download", "connect", "done"):
                    if key not in stamps and f"BOXLITE-NET {key}".encode() in buf:
                        stamps[key] = now
            _, status, usage = os.wait4(proc.pid, 0)
            run.qemu_cpu_s = usage.ru_utime + usage.ru_stime
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if stack is not None:
                # QEMU closed the stream, so the stack returns by itself; make sure of it.
                try:
                    out, err = stack.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    stack.send_signal(signal.SIGKILL)
                    out, err = stack.communicate()
                run.stack_line = next((x for x in out.splitlines() if "bytes_sent=" in x), "").strip()
                m = re.search(r"user_s=([\d.]+) sys_s=([\d.]+)", run.stack_line)
                if m:
                    run.stack_cpu_s = float(m.group(1)) + float(m.group(2))
                if stack.returncode != 0:
                    raise RuntimeError(f"serve_netdev failed ({stack.returncode}): {err[-500:]}")
    run.console = buf.decode(errors="replace")
    if proc.returncode != 0 and proc.stderr is not None:
        run.console += "\nqemu: " + proc.stderr.read().decode(errors="replace")[-1000:]
    errors = re.findall(r"BOXLITE-NET error [^\r\n]*", run.console)
    if errors:
        raise RuntimeError(f"the network guest ({mode}) failed: {errors}; console: {run.console[-1500:]}")
    m = re.search(r"BOXLITE-NET ready uptime=([\d.]+)", run.console)
    if m:
        run.boot_to_ready_ms = float(m.group(1)) * 1000
    d = re.search(
        r"BOXLITE-NET download bytes=(\d+) ns=(\d+) connect_ns=(\d+) first_byte_ns=(\d+) expected=(-?\d+) ok=(\d)",
        run.console,
    )
    c = re.search(r"BOXLITE-NET connect ns=([\d,]*) ok=(\d)", run.console)
    if not d or not c or d.group(6) != "1" or c.group(2) != "1":
        raise RuntimeError(f"the network guest ({mode}) gave no valid results: {run.console[-1500:]}")
    run.download_bytes = int(d.group(1))
    if run.download_bytes != server.size:
        raise RuntimeError(f"the guest ({mode}) downloaded {run.download_bytes} of {server.size} bytes")
    run.download_s = int(d.group(2)) / 1e9
    run.download_connect_ms = int(d.group(3)) / 1e6
    run.first_byte_ms = int(d.group(4)) / 1e6
    if "ready" in stamps and "download" in stamps:
        run.host_seen_download_s = stamps["download"] - stamps["ready"]
    run.connect_ms = [int(x) / 1e6 for x in c.group(1).split(",") if x]
    if len(run.connect_ms) != connects:
        raise RuntimeError(f"the guest ({mode}) made {len(run.connect_ms)} of {connects} connects")
    return run


def byte_order_check() -> None:
    """The pattern is little-endian words, as x86 reads them."""
    assert struct.unpack("<Q", pattern(16)[8:16])[0] == 8 ^ PATTERN_KEY
