"""Stream a command's output as it is produced, and feed it input.

python examples/streaming.py
"""

import asyncio
import os

import boxlite

# A local OCI image layout, so the example runs offline (`make image` builds it); with a
# registry at hand, use image="alpine:latest" instead of rootfs_path=IMAGE.
IMAGE = os.environ.get("BOXLITE_EXAMPLE_IMAGE", "build/images/busybox")


async def main() -> None:
    async with boxlite.Boxlite.default() as runtime:
        box = await runtime.create(boxlite.BoxOptions(rootfs_path=IMAGE, memory_mib=256, auto_remove=True))
        async with box:
            # Lines arrive while the command runs, not when it ends.
            execution = await box.exec("sh", ["-c", "for i in 1 2 3; do echo tick $i; sleep 0.5; done"])
            async for line in execution.stdout():
                print("got:", line.rstrip())
            print("exit code:", (await execution.wait()).exit_code)

            # Write to stdin, close it, read the transformed output.
            execution = await box.exec("tr", ["a-z", "A-Z"])
            stdin = execution.stdin()
            assert stdin is not None
            await stdin.write("streamed through a vm\n")
            await stdin.close()
            result = await execution.wait()
            print("upper-cased:", result.stdout.strip())

            # Binary chunks instead of lines.
            execution = await box.exec("head", ["-c", "100000", "/dev/zero"])
            total = 0
            async for chunk in execution.stdout(binary=True):
                total += len(chunk)
            await execution.wait()
            print("binary bytes:", total)

            # Cancelling a wait kills the command in the box.
            execution = await box.exec("sleep", ["600"])
            try:
                await asyncio.wait_for(execution.wait(), timeout=1)
            except asyncio.TimeoutError:
                print("gave up waiting; the sleep was killed")


if __name__ == "__main__":
    asyncio.run(main())
