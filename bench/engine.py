"""The bare engine: the boot floor, the product's own QEMU command line, and boots of modified
copies of it (for prototypes that need no change to the product).

The floor boots the same kernel with the same machine type, accelerator, CPU model, memory and
kernel command line base as a box (see rust/boxlite/src/vmm/qemu/mod.rs), but with no devices,
no disk and an initramfs whose /init is a few KiB of freestanding C that prints the guest's
CLOCK_BOOTTIME and powers off.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH, BUILD, read_text

# The runtime's base kernel command line (rust/boxlite/src/vmm/qemu/mod.rs, BASE_KERNEL_ARGS).
BASE_KERNEL_ARGS = "console=ttyS0 panic=-1 quiet loglevel=3 cryptomgr.notests noreplace-smp"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
FLOOR_MARKER = b"BOXLITE-FLOOR"


def guest_dir() -> Path:
    """The guest bundle the Python package uses (same lookup as boxlite.Boxlite)."""
    import boxlite._runtime

    return Path(boxlite._runtime.PACKAGE_GUEST_DIR)


def _newer(target: Path, *sources: Path) -> bool:
    return target.is_file() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


def build_native() -> dict[str, Path]:
    """Compiles the floor's /init and the in-guest helper (gcc -static) and packs the floor's
    initramfs; skipped when up to date. Returns their paths."""
    BUILD.mkdir(parents=True, exist_ok=True)
    gcc = shutil.which("gcc") or shutil.which("cc")
    init_src = BENCH / "native" / "floor_init.c"
    helper_src = BENCH / "native" / "guest_helper.c"
    init = BUILD / "floor-init"
    helper = BUILD / "guest_helper"
    cpio = BUILD / "floor-initramfs.cpio"
    if not _newer(init, init_src) or not _newer(helper, helper_src):
        if gcc is None:
            raise RuntimeError("gcc not found: install the gcc package (the bench compiles two small static programs)")
    if not _newer(init, init_src):
        flags = ["-static", "-nostdlib", "-Os", "-fno-stack-protector", "-fno-asynchronous-unwind-tables"]
        subprocess.run([gcc, *flags, "-o", str(init), str(init_src)], check=True)
    if not _newer(helper, helper_src):
        subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(helper), str(helper_src)], check=True)
    if not _newer(cpio, init):
        data = newc_archive(
            [
                ("dev", 0o040755, b"", (0, 0)),
                ("dev/console", 0o020600, b"", (5, 1)),
                ("init", 0o100755, init.read_bytes(), (0, 0)),
            ]
        )
        tmp = cpio.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(cpio)
    return {"floor_init": init, "guest_helper": helper, "floor_cpio": cpio}


def newc_archive(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """An uncompressed newc cpio archive (owner root, mtime 0) of (name, mode, data, rdev)."""
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1):
        name_z = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_z), 0]
        out += ("070701" + "".join(f"{v:08x}" for v in fields)).encode() + name_z
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def floor_argv(accel: str, memory_mib: int, cpus: int, initramfs: Path, kernel: Path | None = None) -> list[str]:
    """The floor: the box's QEMU invocation without its devices, disk and agent."""
    kernel = kernel or guest_dir() / "vmlinuz"
    return [
        "qemu-system-x86_64",
        *("-name", "boxlite-bench-floor"),
        *("-machine", "q35", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host"),
        *("-smp", str(cpus), "-m", f"{memory_mib}M"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio", "-sandbox", SANDBOX),
        *("-kernel", str(kernel), "-initrd", str(initramfs), "-append", BASE_KERNEL_ARGS),
    ]


@dataclass
class FloorBoot:
    init_ms: float  # host: spawn -> the init's line on the serial port
    exit_ms: float  # host: spawn -> QEMU exited (the init powered off)
    guest_boottime_ms: float  # guest: CLOCK_BOOTTIME when /init started


def floor_boot(argv: list[str], timeout: float = 60.0) -> FloorBoot:
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    buf = b""
    init_ms: float | None = None
    boottime_ms = float("nan")
    try:
        fd = proc.stdout.fileno()
        while True:
            remaining = timeout - (time.perf_counter() - started)
            if remaining <= 0:
                raise TimeoutError(f"the floor VM did not finish within {timeout:.0f} s: {buf[-500:]!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if init_ms is None and FLOOR_MARKER in buf + chunk:
                init_ms = (time.perf_counter() - started) * 1000
            buf += chunk
            if not chunk:
                break
        proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - started)))
        exit_ms = (time.perf_counter() - started) * 1000
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    match = re.search(rb"BOXLITE-FLOOR boottime_ns=(\d+)", buf)
    if init_ms is None or match is None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise RuntimeError(f"the floor VM never reached its init (exit {proc.returncode}): {buf[-500:]!r} {err}")
    boottime_ms = int(match.group(1)) / 1e6
    return FloorBoot(init_ms=init_ms, exit_ms=exit_ms, guest_boottime_ms=boottime_ms)


def engine_argv(pid: int) -> list[str]:
    """The command line of a running engine process (a box's QEMU)."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def argv_summary(argv: list[str]) -> dict[str, str]:
    """The options that must match between a box and the floor."""

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1] if flag in argv else ""

    return {k: value(f"-{k}") for k in ("machine", "accel", "cpu", "smp", "m", "append")}


@dataclass
class VariantBoot:
    ready_ms: float  # host: spawn -> first bytes from the agent (its Ready frame)
    console: str  # everything the guest wrote to the serial port
    memory: dict[str, float] | None = None  # engine_memory() after `hold_s` idle seconds


def box_argv(accel: str, memory_mib: int, cpus: int, kernel: Path, initramfs: Path, append: str) -> list[str]:
    """A box's QEMU invocation as rust/boxlite/src/vmm/qemu/mod.rs builds it, with placeholder
    socket and disk paths (`boot_variant` fills them in)."""
    return [
        "qemu-system-x86_64",
        *("-name", "boxlite-bench-variant"),
        *("-machine", "q35", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host"),
        *("-smp", str(cpus), "-m", f"{memory_mib}M"),
        *("-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"),
        *("-serial", "stdio", "-sandbox", SANDBOX),
        *("-kernel", str(kernel), "-initrd", str(initramfs), "-append", append),
        *("-device", "virtio-serial-pci,id=vser0"),
        *("-chardev", "socket,id=agent,path=AGENT_SOCKET"),
        *("-device", "virtserialport,bus=vser0.0,chardev=agent,name=boxlite.agent"),
        *("-drive", "file=DISK,if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap"),
        *("-device", "virtio-blk-pci,drive=disk0"),
    ]


def boot_variant(
    argv: list[str],
    base_disk: Path,
    *,
    append: str | None = None,
    timeout: float = 60.0,
    hold_s: float = 0.0,
    guest_mib: int = 256,
) -> VariantBoot:
    """Boots a modified copy of a box's QEMU command line: a fresh qcow2 overlay on `base_disk`,
    our own agent socket, and `append` as the kernel command line if given. Returns when the
    agent has sent its first frame (Ready) - after `hold_s` more seconds and a look at the
    engine's memory if asked - then kills the VM."""
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-variant-") as tmp:
        sock_path = Path(tmp) / "agent.sock"
        overlay = Path(tmp) / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base_disk), str(overlay)], check=True
        )
        args = list(argv)
        for i, a in enumerate(args):
            if a.startswith("socket,id=agent,path="):
                args[i] = f"socket,id=agent,path={sock_path}"
            elif a.startswith("file=") and ",if=none," in a:
                args[i] = f"file={overlay}," + a.split(",", 1)[1]
        if append is not None:
            args[args.index("-append") + 1] = append
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(1)
        listener.settimeout(timeout)
        console = Path(tmp) / "console.log"
        memory = None
        with console.open("wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            first = conn.recv(1)
            ready_ms = (time.perf_counter() - started) * 1000
            if not first:
                raise RuntimeError(f"the agent closed its port before it was ready: {console.read_text()[-800:]}")
            if hold_s:
                time.sleep(hold_s)
                memory = engine_memory(proc.pid, guest_mib)
            conn.close()
        finally:
            proc.kill()
            proc.wait()
            listener.close()
        return VariantBoot(ready_ms=ready_ms, console=console.read_text(errors="replace"), memory=memory)


def smaps(pid: int) -> list[dict[str, Any]]:
    """The mappings of `pid` with their size, Rss and Pss in KiB."""
    maps: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for line in read_text(f"/proc/{pid}/smaps").splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if head:
            current = {
                "size_kib": (int(head.group(2), 16) - int(head.group(1), 16)) // 1024,
                "perms": head.group(3),
                "path": head.group(4),
            }
            maps.append(current)
            continue
        field = re.match(r"^(Rss|Pss):\s+(\d+) kB", line)
        if field and current is not None:
            current[field.group(1).lower() + "_kib"] = int(field.group(2))
    return maps


def engine_memory(pid: int, guest_mib: int) -> dict[str, float]:
    """Splits a QEMU process's memory: guest RAM it touched, the TCG code cache, the rest."""
    maps = smaps(pid)
    # Guest RAM: anonymous for a cold box, the template's RAM file for a restored one.
    guest = [
        m
        for m in maps
        if m["size_kib"] == guest_mib * 1024 and "rw" in m["perms"] and (not m["path"] or m["path"].endswith("/ram"))
    ]
    ram = max(guest, key=lambda m: m.get("rss_kib", 0)) if guest else None
    code = [m for m in maps if "x" in m["perms"] and "w" in m["perms"] and not m["path"]]
    tcg = max(code, key=lambda m: m["size_kib"]) if code else None
    rss = sum(m.get("rss_kib", 0) for m in maps)
    pss = sum(m.get("pss_kib", 0) for m in maps)
    files = sum(m.get("pss_kib", 0) for m in maps if m["path"].startswith("/") and m is not ram)
    files_rss = sum(m.get("rss_kib", 0) for m in maps if m["path"].startswith("/") and m is not ram)
    ram_rss = ram.get("rss_kib", 0) if ram else 0
    tcg_rss = tcg.get("rss_kib", 0) if tcg else 0
    return {
        "rss_mib": rss / 1024,
        "pss_mib": pss / 1024,
        "guest_ram_touched_mib": ram_rss / 1024,
        "beyond_guest_ram_rss_mib": (rss - ram_rss) / 1024,
        "beyond_guest_ram_pss_mib": (pss - (ram.get("pss_kib", 0) if ram else 0)) / 1024,
        "tcg_code_cache_mib": tcg_rss / 1024,
        "file_backed_pss_mib": files / 1024,
        "other_anon_rss_mib": (rss - ram_rss - tcg_rss - files_rss) / 1024,
    }
