"""examples/notebook.ipynb runs in a real Jupyter kernel (ipykernel, driven by nbclient): the
sync and async APIs work inside the kernel's event loop, state survives between cells, and
rich results made in the box come back as the notebook's image/png and text/html outputs."""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from conftest import REPO, assert_no_engines, engine_pids, pid_alive
from testkit.images import python_layout

NOTEBOOK = REPO / "examples" / "notebook.ipynb"
# Two boxes boot one after the other under TCG, each starting a Python interpreter.
CELL_TIMEOUT = 600

pytestmark = pytest.mark.timeout(1200)

# Runs first (in the test's copy only): which Python and which boxlite the kernel got.
PROBE = "import sys, boxlite\nprint(sys.executable)\nprint(boxlite.__file__)"


def kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel on this interpreter (the venv's), whatever kernelspecs the machine has."""
    spec = tmp_path / "kernels" / "boxlite-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "boxlite test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return AsyncKernelManager(kernel_name="boxlite-test", kernel_spec_manager=specs)


def kernel_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
    paths = [str(REPO / "python"), str(REPO), env.get("PYTHONPATH", "")]
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        BOXLITE_HOME=str(home),
        BOXLITE_TEMPLATES="0",  # one box per shape here: a template would only cost CPU
        BOXLITE_NOTEBOOK_IMAGE=str(python_layout()),
    )
    return env


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of an 8-bit RGB PNG without filters (what the notebook
    draws); every chunk's CRC is checked."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[bytes, bytes] = {}
    offset = 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, data = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + data), f"bad CRC in {kind!r}"
        chunks[kind] = chunks.get(kind, b"") + data
        offset += 12 + length
    assert list(chunks) == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color, interlace) == (8, 2, 0)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def outputs(notebook: Any, cell_id: str) -> list[Any]:
    (cell,) = [cell for cell in notebook.cells if cell.get("id") == cell_id]
    return list(cell.outputs)


def stdout_of(notebook: Any, cell_id: str) -> str:
    return "".join(o.text for o in outputs(notebook, cell_id) if o.output_type == "stream" and o.name == "stdout")


def result_data(notebook: Any, cell_id: str) -> dict[str, Any]:
    (result,) = [o for o in outputs(notebook, cell_id) if o.output_type in ("execute_result", "display_data")]
    return dict(result.data)


def test_notebook_runs_in_a_jupyter_kernel(tmp_path: Path, home: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells), "commit the notebook with its outputs cleared"
    notebook.cells.insert(0, nbformat.v4.new_code_cell(PROBE, id="probe"))

    client = NotebookClient(
        notebook,
        km=kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT,
        startup_timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_env(home), cleanup_kc=True)
    assert_no_engines(home)  # the notebook stopped its boxes

    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    executable, package = stdout_of(notebook, "probe").splitlines()
    assert executable == sys.executable
    assert Path(package) == REPO / "python" / "boxlite" / "__init__.py"

    assert stdout_of(notebook, "setup").startswith("running on ")
    assert stdout_of(notebook, "use") == "area = 28.27\nradius * 2 = 6\n"

    picture = result_data(notebook, "png")
    assert picture["text/plain"] == "Gradient(16x16)"
    width, height, rows = png_pixels(base64.b64decode(picture["image/png"]))
    assert (width, height) == (16, 16)
    assert (rows[0][:3], rows[15][-3:]) == (bytes([0, 0, 160]), bytes([255, 255, 160]))

    # A CodeExecution as the value shows its stdout and each of its results.
    shown = outputs(notebook, "many")
    assert stdout_of(notebook, "many") == "two pictures\n"
    pictures = [o.data for o in shown if o.output_type == "display_data"]
    assert [p["text/plain"] for p in pictures] == ["Gradient(8x8)", "Gradient(4x4)"]
    assert [png_pixels(base64.b64decode(p["image/png"]))[:2] for p in pictures] == [(8, 8), (4, 4)]

    table = result_data(notebook, "html")["text/html"]
    assert table.startswith("<table><tr><th>radius</th><th>area</th></tr>")
    assert "<tr><td>3</td><td>28.27</td></tr></table>" in table  # radius, from an earlier cell

    assert stdout_of(notebook, "async") == "async: 42\n"

    # Their supervisors are gone too.
    deadline = time.monotonic() + 30
    while any(pid_alive(pid) for pid in engine_pids(str(home), "boxlite-shim")):
        assert time.monotonic() < deadline, "a box supervisor outlived the notebook"
        time.sleep(0.2)
