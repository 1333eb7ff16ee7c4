"""Prototypes for a faster box boot, measured without changing the product.

    python bench/profile.py [--rounds 8] [--only baseline,pvh,...]

Each variant is a modified copy of the QEMU invocation the runtime uses for a box (same
machine, accelerator, CPU, memory, devices and kernel command line; see engine.box_argv), with
the product's own guest bundle and agent, booting a base disk made from the demo image. The
clock runs from spawning QEMU to the agent's first frame (Ready) on the agent socket. Variants
run interleaved, round after round, so the machine's noise hits all of them alike.

    python bench/profile.py --e2e [--rounds 16]

With --e2e it instead alternates cold create -> first exec through the real runtime between the
stock guest bundle and prototype bundles (given with BOXLITE_GUEST_DIR).

Writes bench/results/profile.json and profile.md (or profile-e2e.md). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ for its own modules, the repository root for the test kit (testkit/).
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import common
import engine

import boxlite
from testkit.oci import umoci_unpack

SIG_MAGIC = b"~Module signature appended~\n"
NET_MODULES = ("failover.ko", "net_failover.ko", "virtio_net.ko")
# Built-in initcalls a box does not need at boot (measured with initcall_debug):
# init_kprobe_trace ~40 ms, cubictcp_register ~40 ms (parses the kernel's BTF), crypto_kdf108_init
# ~13 ms (a self-test that cryptomgr.notests does not cover).
BLACKLIST = "initcall_blacklist=init_kprobe_trace,cubictcp_register,crypto_kdf108_init"
BOX_ARGS = "boxlite.root=/dev/vda boxlite.mode=box"


def read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """The entries of an uncompressed newc archive as (name, mode, data, (rdevmajor, rdevminor))."""
    entries = []
    pos = 0
    while True:
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"not a newc archive at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        pos += 110
        name = data[pos : pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, body, (rmaj, rmin)))


def strip_signature(module: bytes) -> bytes:
    """A kernel module without its appended PKCS#7 signature (loads unverified, tainting)."""
    if not module.endswith(SIG_MAGIC):
        return module
    info = module[-len(SIG_MAGIC) - 12 : -len(SIG_MAGIC)]
    (sig_len,) = struct.unpack(">I", info[8:12])
    return module[: -len(SIG_MAGIC) - 12 - sig_len]


def variant_initramfs(src: Path, out: Path, *, strip: bool, drop: tuple[str, ...]) -> Path:
    entries = []
    for name, mode, body, rdev in read_newc(src.read_bytes()):
        if name == "etc/boxlite/modules":
            body = b"".join(line + b"\n" for line in body.splitlines() if line.decode().strip() not in drop)
        elif name.startswith("lib/modules/") and name.endswith(".ko"):
            if Path(name).name in drop:
                continue
            if strip:
                body = strip_signature(body)
        entries.append((name, mode, body, rdev))
    out.write_bytes(engine.newc_archive(entries))
    return out


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """The uncompressed ELF kernel inside an LZ4 bzImage (it has a PVH entry note)."""
    if out.is_file() and out.stat().st_mtime >= bzimage.stat().st_mtime:
        return out
    data = bzimage.read_bytes()
    start = data.find(bytes.fromhex("02214c18"))  # LZ4 legacy frame magic
    if start < 0:
        raise RuntimeError("no LZ4 stream in the bzImage (this prototype needs an LZ4 kernel)")
    done = subprocess.run(["lz4", "-dc"], input=data[start:], capture_output=True, check=False)
    if not done.stdout.startswith(b"\x7fELF"):
        raise RuntimeError(f"lz4 did not give an ELF kernel: {done.stderr[-300:]!r}")
    out.write_bytes(done.stdout)
    return out


def base_disk(layout: Path, out: Path) -> Path:
    """An ext4 base disk holding the image's root filesystem, made the way the runtime makes
    one (same mkfs options, 1 GiB), but filled on the host with `mkfs.ext4 -d` from an
    `umoci unpack` of a trusted image: only for these boot measurements."""
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-rootfs-") as tmp:
        umoci_unpack(layout, "latest", Path(tmp) / "bundle")
        mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
        opts = ["-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0"]
        subprocess.run(
            [mkfs, *opts, "-L", "boxlite-root", "-d", f"{tmp}/bundle/rootfs", str(out), "1G"],
            check=True,
            capture_output=True,
        )
    return out


def variants(accel: str, build: Path) -> dict[str, tuple[list[str], str | None]]:
    guest = engine.guest_dir()
    kernel, initrd = guest / "vmlinuz", guest / "initramfs.cpio"
    vmlinux = extract_vmlinux(kernel, build / "vmlinux")
    lean = variant_initramfs(initrd, build / "initramfs-lean.cpio", strip=True, drop=NET_MODULES)
    nonet = variant_initramfs(initrd, build / "initramfs-nonet.cpio", strip=False, drop=NET_MODULES)
    nosig = variant_initramfs(initrd, build / "initramfs-nosig.cpio", strip=True, drop=())
    base = f"{engine.BASE_KERNEL_ARGS} {BOX_ARGS}"

    def box(k: Path = kernel, i: Path = initrd, append: str = base, accel_opt: str = accel) -> list[str]:
        argv = engine.box_argv(accel, 256, 1, k, i, append)
        argv[argv.index("-accel") + 1] = accel_opt
        return argv

    return {
        "baseline": (box(), None),
        "pvh_vmlinux": (box(k=vmlinux), None),
        "initcall_blacklist": (box(append=f"{base} {BLACKLIST}"), None),
        "no_net_modules": (box(i=nonet), None),
        "unsigned_modules": (box(i=nosig), None),
        "lean_initramfs": (box(i=lean), None),
        "combined": (box(k=vmlinux, i=lean, append=f"{base} {BLACKLIST}"), None),
        "tb_size_32": (box(accel_opt=f"{accel},tb-size=32"), None),
        "tb_size_16": (box(accel_opt=f"{accel},tb-size=16"), None),
        "tb_size_8": (box(accel_opt=f"{accel},tb-size=8"), None),
    }


def module_times(console: str) -> dict[str, float]:
    """Guest milestones from the agent's console lines."""
    out = {}
    for key, pattern in (("agent_start", r"starting \(uptime (\d+) ms"), ("ready", r"ready \(uptime (\d+) ms")):
        m = re.search(pattern, console)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"modules loaded.*uptime (\d+) ms", console)
    if m:
        out["root_mounted"] = float(m.group(1))
        if "agent_start" in out:
            out["modules_and_mount"] = out["root_mounted"] - out["agent_start"]
    return out


def bundle_dir(build: Path, name: str, kernel: Path, initramfs: Path) -> Path:
    """A guest bundle directory (for BOXLITE_GUEST_DIR) holding `kernel` as vmlinuz; QEMU
    recognises an ELF vmlinux with a PVH note by itself."""
    out = build / f"bundle-{name}"
    out.mkdir(exist_ok=True)
    for src, dst in ((kernel, "vmlinuz"), (initramfs, "initramfs.cpio")):
        target = out / dst
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(src.resolve())
    shutil.copy(engine.guest_dir() / "manifest.json", out / "manifest.json")
    return out


async def end_to_end(args: argparse.Namespace, build: Path) -> str:
    """Cold create -> first exec through the real runtime, with the stock bundle and with
    prototype bundles (BOXLITE_GUEST_DIR, read when a runtime starts its first box)."""
    guest = engine.guest_dir()
    vmlinux = extract_vmlinux(guest / "vmlinuz", build / "vmlinux")
    lean = variant_initramfs(guest / "initramfs.cpio", build / "initramfs-lean.cpio", strip=True, drop=NET_MODULES)
    bundles = {
        "stock": None,
        "pvh_vmlinux": bundle_dir(build, "pvh", vmlinux, guest / "initramfs.cpio"),
        "lean_initramfs": bundle_dir(build, "lean", guest / "vmlinuz", lean),
        "pvh_and_lean": bundle_dir(build, "pvh-lean", vmlinux, lean),
    }
    if args.only:
        bundles = {k: v for k, v in bundles.items() if k == "stock" or k in args.only.split(",")}
    options = boxlite.BoxOptions(rootfs_path=args.image.resolve(), cpus=1, memory_mib=256)
    results: dict[str, dict[str, list[float]]] = {k: {} for k in bundles}
    with tempfile.TemporaryDirectory(prefix="boxlite-bench-e2e-") as home:
        os.environ.pop("BOXLITE_GUEST_DIR", None)
        warm = await boxlite.Boxlite(boxlite.Options(home_dir=home)).create(options)
        await warm.stop()
        for round_no in range(args.rounds):
            for name, bundle in bundles.items():
                if bundle is None:
                    os.environ.pop("BOXLITE_GUEST_DIR", None)
                else:
                    os.environ["BOXLITE_GUEST_DIR"] = str(bundle)
                rt = boxlite.Boxlite(boxlite.Options(home_dir=home))
                started = time.perf_counter()
                box = await rt.create(options)
                result = await (await box.exec("true", [])).wait()
                total = (time.perf_counter() - started) * 1000
                metrics = await box.metrics()
                await box.stop()
                if result.exit_code != 0:
                    raise RuntimeError(f"{name}: `true` exited {result.exit_code}")
                r = results[name]
                r.setdefault("total", []).append(total)
                r.setdefault("container_init", []).append(float(metrics.stage_container_init_ms or 0))
            print(f"e2e round {round_no + 1}/{args.rounds} done", flush=True)
    os.environ.pop("BOXLITE_GUEST_DIR", None)
    lines = [
        "| bundle | cold create -> first exec (median) | min | max | paired delta vs stock (median [p10..p90]) "
        "| stage_container_init_ms (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        t = common.summarize(r["total"], "ms")
        pairs = [a - b for a, b in zip(r["total"], results["stock"]["total"], strict=False)]
        d = common.summarize(pairs, "ms") if name != "stock" else None
        delta = "" if not d else f"{d['median']:+.0f} ms [{d['p10']:+.0f}..{d['p90']:+.0f}]"
        ci = statistics.median(r["container_init"])
        lines.append(f"| {name} | {t['median']:.0f} ms | {t['min']:.0f} | {t['max']:.0f} | {delta} | {ci:.0f} ms |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--image", type=Path, default=common.DEFAULT_IMAGE)
    parser.add_argument("--out", type=Path, default=common.BENCH / "results")
    parser.add_argument(
        "--e2e", action="store_true", help="cold create -> first exec through the runtime with prototype bundles"
    )
    args = parser.parse_args()
    accel, reason = boxlite.accelerator()
    build = common.BUILD / "profile"
    build.mkdir(parents=True, exist_ok=True)
    if args.e2e:
        text = asyncio.run(end_to_end(args, build))
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile-e2e.md").write_text(
            f"accelerator {accel}; {args.rounds} interleaved rounds; load {common.fmt_load(os.getloadavg())}\n\n{text}"
        )
        return 0
    native = engine.build_native()
    disk = base_disk(args.image, build / "busybox-base.ext4")
    table = variants(accel, build)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only.split(",")}
    floors = {
        "floor_bzimage": engine.floor_argv(accel, 256, 1, native["floor_cpio"]),
        "floor_pvh_vmlinux": engine.floor_argv(accel, 256, 1, native["floor_cpio"], build / "vmlinux"),
        "floor_initcall_blacklist": engine.floor_argv(accel, 256, 1, native["floor_cpio"]),
    }
    blacklisted = floors["floor_initcall_blacklist"]
    blacklisted[blacklisted.index("-append") + 1] += f" {BLACKLIST}"
    ready: dict[str, list[float]] = {k: [] for k in [*table, *floors]}
    guest: dict[str, dict[str, list[float]]] = {k: {} for k in ready}
    memory: dict[str, list[float]] = {}
    load_start = os.getloadavg()
    print(f"accelerator {accel} ({reason}); load {common.fmt_load(load_start)}", flush=True)
    for round_no in range(args.rounds):
        for name, (argv, append) in table.items():
            hold = 2.0 if round_no == 0 else 0.0
            boot = engine.boot_variant(argv, disk, append=append, hold_s=hold)
            ready[name].append(boot.ready_ms)
            for key, value in module_times(boot.console).items():
                guest[name].setdefault(key, []).append(value)
            if boot.memory:
                memory[name] = [boot.memory["beyond_guest_ram_rss_mib"], boot.memory["tcg_code_cache_mib"]]
        for name, argv in floors.items():
            fb = engine.floor_boot(argv)
            ready[name].append(fb.init_ms)
            guest[name].setdefault("init", []).append(fb.guest_boottime_ms)
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)
    rows = []
    for name, values in ready.items():
        if not values:
            continue
        # Paired with the reference booted in the same round: robust to the machine's drift.
        ref = "floor_bzimage" if name.startswith("floor") else "baseline"
        pairs = [v - r for v, r in zip(values, ready.get(ref, []), strict=False)]
        g = {k: statistics.median(v) for k, v in guest[name].items()}
        rows.append(
            {
                "variant": name,
                "ready_ms": common.summarize(values, "ms"),
                "paired_delta_ms": common.summarize(pairs, "ms") if pairs and name != ref else None,
                "guest_ms": g,
                "memory_mib": memory.get(name),
            }
        )
    lines = [
        f"accelerator {accel}; {args.rounds} interleaved rounds; load {common.fmt_load(load_start)} -> "
        f"{common.fmt_load(os.getloadavg())}",
        "",
        "| variant | host: spawn -> ready (median) | min | max | paired delta vs reference (median [p10..p90]) "
        "| guest: agent start / root mounted / ready | engine beyond guest RAM / TCG cache |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        r = row["ready_ms"]
        d = row["paired_delta_ms"]
        delta = "" if not d else f"{d['median']:+.0f} ms [{d['p10']:+.0f}..{d['p90']:+.0f}]"
        g = row["guest_ms"]
        gtxt = " / ".join(f"{g[k]:.0f}" for k in ("agent_start", "root_mounted", "ready") if k in g)
        if "modules_and_mount" in g:
            gtxt += f" (modules + mount {g['modules_and_mount']:.0f})"
        if "init" in g:
            gtxt = f"init at {g['init']:.0f}"
        mem = "" if not row["memory_mib"] else f"{row['memory_mib'][0]:.0f} / {row['memory_mib'][1]:.0f} MiB"
        lines.append(
            f"| {row['variant']} | {r['median']:.0f} ms | {r['min']:.0f} | {r['max']:.0f} | {delta} | {gtxt} | {mem} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "profile.json", {"date": common.now_iso(), **common.commit_info(), "rows": rows})
    (args.out / "profile.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
