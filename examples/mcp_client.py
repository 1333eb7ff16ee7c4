"""Talk to `boxlite mcp` as an AI agent's host would: start the server over stdio with the `mcp`
package's client, list its tools and call them (`pip install 'boxlite[mcp]'`).

python examples/mcp_client.py
"""

import asyncio
import os
import sys

from mcp import Client, StdioServerParameters

# A local OCI image layout with python3, so the example runs offline (`make test-images`
# builds one); with a registry at hand, drop --rootfs and the server uses python:slim.
PYTHON_IMAGE = os.environ.get("BOXLITE_EXAMPLE_PYTHON_IMAGE", "build/test-images/current/python")


async def main() -> None:
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "boxlite", "mcp", "--rootfs", PYTHON_IMAGE, "--memory", "512MiB"],
        env=dict(os.environ),  # BOXLITE_HOME and the like reach the server
    )
    async with Client(server) as client:
        tools = (await client.list_tools()).tools
        print("tools:", ", ".join(sorted(tool.name for tool in tools)))

        # The first call boots the server's default box.
        result = await client.call_tool("exec", {"command": "uname", "args": ["-s"]})
        print("exec:", result.structured_content["stdout"].strip())

        # run_code keeps the interpreter's state between calls.
        await client.call_tool("run_code", {"code": "squares = [i * i for i in range(10)]"})
        result = await client.call_tool("run_code", {"code": "sum(squares)"})
        print("run_code:", result.structured_content["results"][0]["text"])

        # A failing call is an MCP tool error the model can read, not a crash.
        result = await client.call_tool("read_file", {"path": "/no/such/file"})
        print("tool error:", result.is_error)
    # Closing the client closed the server's stdin: it stopped and deleted its box.


if __name__ == "__main__":
    asyncio.run(main())
