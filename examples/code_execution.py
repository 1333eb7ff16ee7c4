"""Run untrusted Python in a box: CodeBox keeps state between runs, returns stdout and raises on
failure (run_code is the rich form: docs/interpreter.md).

python examples/code_execution.py
"""

import asyncio
import os

import boxlite

# A local OCI image layout with python3, so the example runs offline (`make test-images`
# builds one); with a registry at hand, drop rootfs_path and CodeBox uses python:slim.
PYTHON_IMAGE = os.environ.get("BOXLITE_EXAMPLE_PYTHON_IMAGE", "build/test-images/current/python")


async def main() -> None:
    # Without rootfs_path, CodeBox uses the python:slim image from a registry.
    async with boxlite.CodeBox(rootfs_path=PYTHON_IMAGE) as codebox:
        print(await codebox.run("import sys; print(sys.version.split()[0])"), end="")
        await codebox.run("squares = [i * i for i in range(10)]")  # state is kept between runs
        print(await codebox.run("print(sum(squares))"), end="")

        try:
            await codebox.run("raise ValueError('bad input')")
        except boxlite.ExecError as e:
            print("failed with exit code", e.exit_code, "->", e.stderr.strip().splitlines()[-1])

        try:
            await codebox.run("while True: pass", timeout=2)
        except boxlite.ExecTimeoutError:
            print("the endless loop was interrupted after 2 s")
        print("still there:", (await codebox.run_code("len(squares)")).text)


if __name__ == "__main__":
    asyncio.run(main())
