"""Run a few commands in a box and look at their results.

python examples/simple_exec.py
"""

import asyncio
import os

import boxlite

# A local OCI image layout, so the example runs offline (`make image` builds it); with a
# registry at hand, use image="alpine:latest" instead of rootfs_path=IMAGE.
IMAGE = os.environ.get("BOXLITE_EXAMPLE_IMAGE", "build/images/busybox")


async def main() -> None:
    # The box is created on entry and stopped (and, by default, deleted) on exit.
    async with boxlite.SimpleBox(rootfs_path=IMAGE, memory_mib=256) as box:
        result = await box.exec("uname", "-sr")
        print("kernel:", result.stdout.strip())

        result = await box.exec("sh", "-c", 'echo "$GREETING from $(pwd)"', env={"GREETING": "hello"}, cwd="/tmp")
        print(result.stdout.strip())

        # A non-zero exit is a result, not an exception.
        result = await box.exec("sh", "-c", "echo oops >&2; exit 3")
        print(f"exit code {result.exit_code}, stderr {result.stderr.strip()!r}")

        # A timeout kills the command and raises.
        try:
            await box.exec("sleep", "60", timeout=1)
        except boxlite.ExecTimeoutError as e:
            print("timed out:", e)

        info = await box.info()
        print(f"box {info.id} runs on {info.accelerator} (hardware isolated: {info.hardware_isolated})")


if __name__ == "__main__":
    asyncio.run(main())
