"""Move files in and out of a box.

python examples/files.py
"""

import asyncio
import os
import tempfile
from pathlib import Path

import boxlite

# A local OCI image layout, so the example runs offline (`make image` builds it); with a
# registry at hand, use image="alpine:latest" instead of rootfs_path=IMAGE.
IMAGE = os.environ.get("BOXLITE_EXAMPLE_IMAGE", "build/images/busybox")


async def main() -> None:
    async with boxlite.SimpleBox(rootfs_path=IMAGE, memory_mib=256) as box:
        # Bytes-level helpers.
        await box.write_file("/work/hello.sh", "#!/bin/sh\necho hello from a script\n", mode=0o755)
        print((await box.exec("/work/hello.sh")).stdout.strip())
        print("listing:", await box.list_dir("/work"))
        print("passwd starts with:", (await box.read_file("/etc/passwd")).split(b"\n")[0].decode())

        # Whole trees, with modes and symlinks.
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "project"
            (src / "data").mkdir(parents=True)
            (src / "data" / "numbers.txt").write_text("3\n1\n2\n")
            await box.copy_in(src, "/srv/project")
            await box.exec("sh", "-c", "sort -n /srv/project/data/numbers.txt > /srv/project/sorted.txt")
            out = Path(tmp) / "back"
            await box.copy_out("/srv/project", out)
            print("sorted on the host:", (out / "sorted.txt").read_text().split())


if __name__ == "__main__":
    asyncio.run(main())
