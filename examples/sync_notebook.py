"""The blocking API inside a running event loop, as in a Jupyter cell.

    python examples/sync_notebook.py

A notebook runs cells inside an event loop, where ``asyncio.run`` refuses to start another.
``boxlite.sync`` drives the async API on its own loop in a background thread, so its calls
work there and in plain scripts alike. (In Jupyter, top-level ``await`` works with the async
API as well.)
"""

import asyncio
import os

from boxlite.sync import SyncSimpleBox

# A local OCI image layout, so the example runs offline (`make image` builds it); with a
# registry at hand, use image="alpine:latest" instead of rootfs_path=IMAGE.
IMAGE = os.environ.get("BOXLITE_EXAMPLE_IMAGE", "build/images/busybox")


def cell() -> None:
    """What a user would type into a notebook cell."""
    with SyncSimpleBox(rootfs_path=IMAGE, memory_mib=256) as box:
        print(box.exec("echo", "hello from a notebook cell").stdout.strip())
        box.write_file("/tmp/note.txt", "kept in the box\n")
        print(box.read_file("/tmp/note.txt").decode().strip())
        execution = box.box.exec("sh", ["-c", "echo one; echo two"])
        for line in execution.stdout():
            print("streamed:", line.rstrip())
        print("exit code:", execution.wait().exit_code)


async def notebook_kernel() -> None:
    # The loop is running here, as it is while a notebook executes a cell.
    asyncio.get_running_loop()
    cell()


if __name__ == "__main__":
    asyncio.run(notebook_kernel())
