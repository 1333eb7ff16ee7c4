"""Several boxes at once: each is its own VM, created and used concurrently.

python examples/many_boxes.py [COUNT]
"""

import asyncio
import os
import sys

import boxlite

# A local OCI image layout, so the example runs offline (`make image` builds it); with a
# registry at hand, use image="alpine:latest" instead of rootfs_path=IMAGE.
IMAGE = os.environ.get("BOXLITE_EXAMPLE_IMAGE", "build/images/busybox")


async def one(runtime: boxlite.Boxlite, index: int) -> str:
    options = boxlite.BoxOptions(rootfs_path=IMAGE, memory_mib=256, auto_remove=True, env={"INDEX": str(index)})
    async with await runtime.create(options) as box:
        # Every box has its own filesystem: this write is invisible to the others.
        execution = await box.exec("sh", ["-c", 'echo "box $INDEX" > /root/me; cat /root/me; ls /root | wc -l'])
        result = await execution.wait()
        return result.stdout.replace("\n", " ").strip()


async def main(count: int) -> None:
    async with boxlite.Boxlite.default() as runtime:
        results = await asyncio.gather(*(one(runtime, i) for i in range(count)))
        for line in results:
            print(line)
        metrics = await runtime.metrics()
        print(f"boxes created: {metrics.boxes_created_total}, commands run: {metrics.total_commands_run}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
