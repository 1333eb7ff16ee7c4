"""The main job: boot a box from an OCI image layout, run a command in it, print its output."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

import boxlite


async def main(layout: str) -> int:
    accel, reason = boxlite.accelerator()
    print(f"boxlite {boxlite.__version__}; accelerator: {accel} ({reason})")
    with tempfile.TemporaryDirectory(prefix="boxlite-demo-") as home:
        async with boxlite.Boxlite(boxlite.Options(home_dir=home)) as runtime:
            started = time.monotonic()
            box = await runtime.create(boxlite.BoxOptions(rootfs_path=layout, cpus=1, memory_mib=256))
            print(f"box {box.id} ready in {time.monotonic() - started:.2f}s")
            execution = await box.exec("sh", ["-c", "echo hello from $(uname -sr) in a box; id; ls /"])
            async for line in execution.stdout():
                print(f"  | {line}", end="")
            result = await execution.wait()
            print(f"exit code {result.exit_code}")
            metrics = await box.metrics()
            stages = [
                ("filesystem setup", metrics.stage_filesystem_setup_ms),
                ("image prepare", metrics.stage_image_prepare_ms),
                ("guest rootfs", metrics.stage_guest_rootfs_ms),
                ("box config", metrics.stage_box_config_ms),
                ("box spawn", metrics.stage_box_spawn_ms),
                ("container init", metrics.stage_container_init_ms),
            ]
            print("stage timings: " + ", ".join(f"{name} {ms} ms" for name, ms in stages))
            print(f"total create {metrics.total_create_duration_ms} ms, guest boot {metrics.guest_boot_duration_ms} ms")
            await box.stop()
            return result.exit_code


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: demo.py OCI_LAYOUT_DIR")
    sys.exit(asyncio.run(main(sys.argv[1])))
