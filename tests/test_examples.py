"""Every script in examples/ runs as it is, against local images, and says what it should."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from testkit.images import python_layout

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# What each example must print (in order) when it works.
EXPECTED = {
    "simple_exec.py": [
        "kernel: Linux ",
        "hello from /tmp",
        "exit code 3, stderr 'oops'",
        "timed out: `sleep 60` timed out after 1s",
        "(hardware isolated: ",
    ],
    "streaming.py": [
        "got: tick 1",
        "got: tick 2",
        "got: tick 3",
        "exit code: 0",
        "upper-cased: STREAMED THROUGH A VM",
        "binary bytes: 100000",
        "the sleep was killed",
    ],
    "files.py": [
        "hello from a script",
        "listing: ['hello.sh']",
        "passwd starts with: root:x:0:0:",
        "sorted on the host: ['1', '2', '3']",
    ],
    "code_execution.py": [
        "3.11",
        "285",
        "failed with exit code 1 -> ValueError: bad input",
        "the endless loop was interrupted",
        "still there: 10",
    ],
    "sync_notebook.py": [
        "hello from a notebook cell",
        "kept in the box",
        "streamed: one",
        "streamed: two",
        "exit code: 0",
    ],
    "agents_langchain.py": [
        "run_python -> result: [1, 2, 3]",
        "run_python -> sum times seven: 42",
        "run_shell -> exit code 0\nhello from Linux",
        "write_file -> wrote 15 bytes to /tmp/notes.txt",
        "list_files -> ",
        "notes.txt",
        "read_file -> kept in the box",
        "model: All done.",
        "result: 3",
    ],
    "agents_smolagents.py": ["the box runs Linux ", "answer: 45, computed on Linux "],
    "many_boxes.py": ["box 0 1", "box 1 1", "box 2 1", "boxes created: 3, commands run: 3"],
    "ray_cluster.py": ["boxes on 2 different nodes", "words counted in boxes: 3, 4", "1 of 1 slots", "closed"],
    "mcp_client.py": [
        "tools: create_box, exec, list_boxes, list_files, read_file, remove_box, run_code, write_file",
        "exec: Linux",
        "run_code: 285",
        "tool error: True",
    ],
    "agents_openai.py": [
        "Created hello.py",
        "Process exited with code 0",
        "285 computed on Linux",
        "final answer: hello.py ran in the box and printed 285.",
    ],
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_as_is(name: str, home: Path, image_layout: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
    env.update(
        BOXLITE_HOME=str(home),
        BOXLITE_EXAMPLE_IMAGE=str(image_layout),
        BOXLITE_EXAMPLE_PYTHON_IMAGE=str(python_layout()),
    )
    # Ray's session files go to a short temporary directory (its socket paths are bounded)
    # that is removed afterwards, not to /tmp/ray.
    ray_tmp = tempfile.mkdtemp(prefix="blex-")
    env["RAY_TMPDIR"] = ray_tmp
    try:
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / name)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    position = 0
    for needle in EXPECTED[name]:
        found = out.stdout.find(needle, position)
        assert found >= 0, f"{needle!r} missing (in order) from:\n{out.stdout}"
        position = found + len(needle)
    # Examples clean up after themselves: no box is left in the home.
    listed = subprocess.run(
        [sys.executable, "-m", "boxlite", "--home", str(home), "ps", "-a", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout == ""
