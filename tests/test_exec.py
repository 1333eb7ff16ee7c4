"""Commands in a running box: exit status, streams, stdin, env/cwd/user, tty, timeouts, kill,
concurrency, copying files. One box serves the whole module (booting is the slow part)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

import boxlite
from conftest import run


async def test_exit_code_and_separate_streams(shared_box: boxlite.Box) -> None:
    result = await run(shared_box, "sh", "-c", "echo hi; echo oops >&2; exit 7")
    assert (result.exit_code, result.stdout, result.stderr) == (7, "hi\n", "oops\n")
    assert result.signal is None


async def test_issue_example_with_env_and_cwd(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sh", ["-c", 'echo "$A $(pwd)"; exit 3'], env=[("A", "1")], cwd="/tmp")
    chunks = [line async for line in ex.stdout()]
    result = await ex.wait()
    assert chunks == ["1 /tmp\n"]
    assert result.exit_code == 3
    assert result.stdout == ""  # already taken through the stream


HOPS = ("child_started_us", "execve_called_us", "started_us", "exit_seen_us", "reported_us")


async def test_the_agent_reports_the_hops_of_an_exec(shared_box: boxlite.Box) -> None:
    quiet = (await run(shared_box, "true")).guest_trace
    talky = (await run(shared_box, "sh", "-c", "sleep 0.2; echo out")).guest_trace
    assert quiet is not None and talky is not None
    for trace in (quiet, talky):
        order = [trace[k] or 0 for k in HOPS]
        assert order == sorted(order) and order[0] > 0, trace
    assert quiet["first_output_us"] is None
    # The output came after the start and before the exit; the sleep is in between.
    started, first, exited = (talky[k] or 0 for k in ("started_us", "first_output_us", "exit_seen_us"))
    assert started + 200_000 <= first <= exited, talky


async def test_a_signal_death_is_reported_as_such(shared_box: boxlite.Box) -> None:
    result = await run(shared_box, "sh", "-c", "kill -TERM $$")
    assert result.signal == 15
    assert result.exit_code == 128 + 15


async def test_large_outputs_arrive_complete_and_separated(shared_box: boxlite.Box) -> None:
    size = 50 * 1024 * 1024
    script = f"dd if=/dev/zero bs=1048576 count={size // 1048576} 2>/dev/null; echo done >&2"
    ex = await shared_box.exec("sh", ["-c", script])
    total = 0
    digest = hashlib.sha256()
    async for chunk in ex.stdout(binary=True):
        total += len(chunk)
        digest.update(chunk)
    result = await ex.wait()
    assert total == size
    assert digest.hexdigest() == hashlib.sha256(bytes(size)).hexdigest()
    assert result.stderr == "done\n"
    assert result.exit_code == 0


async def test_output_streams_while_the_command_runs(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sh", ["-c", "echo first; sleep 3; echo second"])
    stream = ex.stdout()
    first = await asyncio.wait_for(stream.__anext__(), timeout=2.5)
    assert first == "first\n"
    assert [line async for line in stream] == ["second\n"]
    await ex.wait()


async def test_stdin_round_trip(shared_box: boxlite.Box) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    ex = await shared_box.exec("sh", ["-c", "cat; echo end >&2"])
    stdin = ex.stdin()
    assert stdin is not None and ex.stdin() is None
    received = bytearray()

    async def read() -> None:
        async for chunk in ex.stdout(binary=True):
            received.extend(chunk)

    reader = asyncio.create_task(read())
    await stdin.write(payload)
    await stdin.close()
    await reader
    result = await ex.wait()
    assert bytes(received) == payload
    assert (result.exit_code, result.stderr) == (0, "end\n")


async def test_stdin_is_closed_by_wait_when_never_taken(shared_box: boxlite.Box) -> None:
    result = await run(shared_box, "cat")
    assert (result.exit_code, result.stdout) == (0, "")


async def test_env_layers_image_then_box_then_command(shared_box: boxlite.Box) -> None:
    result = await run(shared_box, "sh", "-c", 'echo "$PATH|$B"', env={"B": "2"})
    assert result.stdout == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|2\n"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, "0 0 0"),
        ("app", "1000 1000 1000 2000"),
        ("1000", "1000 1000 1000 2000"),
        ("1234:4321", "1234 4321 4321"),
        ("nobody", "65534 65534 65534"),
    ],
)
async def test_user_forms(shared_box: boxlite.Box, user: str | None, expected: str) -> None:
    result = await run(shared_box, "sh", "-c", 'echo "$(id -u) $(id -g) $(id -G)"', user=user)
    assert result.stdout.strip() == expected, result


async def test_tty_mode_has_a_terminal_of_the_given_size(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sh", ["-c", "tty; stty size; echo err >&2"], tty=(33, 101))
    result = await ex.wait()
    lines = result.stdout.replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "33 101"
    assert "err" in lines  # stderr shares the terminal
    assert result.stderr == ""


async def test_tty_resize_reaches_the_process(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sh", ["-c", "read x; stty size"], tty=(24, 80))
    ex.resize_tty(50, 132)
    stdin = ex.stdin()
    assert stdin is not None
    await stdin.write(b"go\n")
    result = await ex.wait()
    assert "50 132" in result.stdout.replace("\r", "")


async def test_timeout_kills_the_command_and_says_so(shared_box: boxlite.Box) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    ex = await shared_box.exec("sleep", ["30"], timeout_secs=1)
    with pytest.raises(boxlite.ExecTimeoutError, match="timed out after 1s"):
        await ex.wait()
    assert loop.time() - started < 20
    after = await run(shared_box, "sh", "-c", "ps -o comm | grep -c '^sleep' || true")
    assert after.stdout.strip() == "0"


async def test_kill_sends_the_signal(shared_box: boxlite.Box) -> None:
    ex = await shared_box.exec("sleep", ["30"])
    ex.kill()
    result = await ex.wait()
    assert (result.signal, result.exit_code) == (9, 137)
    ex2 = await shared_box.exec("sh", ["-c", "trap 'echo got-term; exit 4' TERM; sleep 30 & wait"])
    await asyncio.sleep(0.5)
    ex2.kill(15)
    result2 = await ex2.wait()
    assert (result2.exit_code, result2.stdout) == (4, "got-term\n")


async def test_32_concurrent_execs_all_complete(shared_box: boxlite.Box) -> None:
    async def one(i: int) -> boxlite.ExecResult:
        return await run(shared_box, "sh", "-c", f"echo start-{i}; sleep 0.2; echo end-{i} >&2; exit {i % 5}")

    results = await asyncio.gather(*(one(i) for i in range(32)))
    for i, result in enumerate(results):
        assert (result.stdout, result.stderr, result.exit_code) == (f"start-{i}\n", f"end-{i}\n", i % 5)


async def test_copy_round_trip_keeps_tree_modes_and_symlinks(shared_box: boxlite.Box, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "deeper" / "b.bin").write_bytes(os.urandom(300_000))
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("a.txt")
    (src / "dangling").symlink_to("/nowhere/at/all")

    await shared_box.copy_in(src, "/data/tree")
    inside = await run(shared_box, "sh", "-c", "cat /data/tree/link; /data/tree/run.sh; readlink /data/tree/dangling")
    assert inside.stdout == "alpha\nran\n/nowhere/at/all\n", inside

    out = tmp_path / "back"
    await shared_box.copy_out("/data/tree", out)
    assert (out / "a.txt").read_text() == "alpha\n"
    assert (out / "sub/deeper/b.bin").read_bytes() == (src / "sub/deeper/b.bin").read_bytes()
    assert os.readlink(out / "link") == "a.txt"
    assert os.readlink(out / "dangling") == "/nowhere/at/all"
    assert (out / "run.sh").stat().st_mode & 0o777 == 0o755

    single = tmp_path / "single"
    single.mkdir()
    await shared_box.copy_out("/data/tree/a.txt", single)  # into an existing directory
    assert (single / "a.txt").read_text() == "alpha\n"


async def test_copy_errors_are_typed(shared_box: boxlite.Box, tmp_path: Path) -> None:
    with pytest.raises(boxlite.InvalidArgumentError):
        await shared_box.copy_out("/no/such/path", tmp_path / "x")
    with pytest.raises(boxlite.InvalidArgumentError):
        await shared_box.copy_in(tmp_path, "relative/path")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".boxlite-copy-")] == []


@pytest.mark.parametrize(
    ("argv", "kwargs", "error", "pattern"),
    [
        (["no-such-command"], {}, boxlite.ExecStartError, "no-such-command"),
        (["/etc/passwd"], {}, boxlite.ExecStartError, "/etc/passwd"),
        (["true"], {"cwd": "/no/such/dir"}, boxlite.ExecStartError, "/no/such/dir"),
        (["true"], {"user": "ghost"}, boxlite.ExecStartError, "ghost"),
        (["true"], {"env": [("A=B", "1")]}, boxlite.InvalidArgumentError, "env"),
        (["true"], {"env": [("A\0", "1")]}, boxlite.InvalidArgumentError, "env"),
        ([""], {}, boxlite.InvalidArgumentError, "cmd"),
        (["true"], {"cwd": "relative"}, boxlite.InvalidArgumentError, "cwd"),
    ],
)
async def test_bad_exec_input_is_a_typed_error(
    shared_box: boxlite.Box, argv: list[str], kwargs: dict[str, object], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        ex = await shared_box.exec(argv[0], argv[1:], **kwargs)  # type: ignore[arg-type]
        await ex.wait()


async def test_the_path_search_follows_execvp(shared_box: boxlite.Box) -> None:
    await run(
        shared_box,
        "sh",
        "-c",
        "mkdir -p /tmp/pathsearch/a /tmp/pathsearch/b && echo 'echo from-a' > /tmp/pathsearch/a/tool"
        " && printf '#!/bin/sh\\necho from-b\\n' > /tmp/pathsearch/b/tool && chmod 755 /tmp/pathsearch/b/tool",
    )
    # Missing entries, a file where a directory should be, and a file without the execute bit
    # are passed over; the first executable one runs.
    path = "/no/such/dir:/etc/passwd:/tmp/pathsearch/a:/tmp/pathsearch/b"
    result = await run(shared_box, "tool", env=[("PATH", path)])
    assert (result.exit_code, result.stdout) == (0, "from-b\n")
    # Found but not executable anywhere: a permission error, not "not found".
    with pytest.raises(boxlite.ExecStartError, match=r"(?i)permission"):
        await (await shared_box.exec("tool", env=[("PATH", "/no/such/dir:/tmp/pathsearch/a")])).wait()
    with pytest.raises(boxlite.ExecStartError, match=r"(?i)no such file"):
        await (await shared_box.exec("tool", env=[("PATH", "/etc/passwd:/no/such/dir")])).wait()


async def test_metrics_count_commands_and_bytes(shared_box: boxlite.Box) -> None:
    before = await shared_box.metrics()
    await run(shared_box, "echo", "12345")
    with pytest.raises(boxlite.ExecStartError):
        await shared_box.exec("no-such-command")
    after = await shared_box.metrics()
    assert after.commands_run_total == before.commands_run_total + 2
    assert after.run_errors_total == before.run_errors_total + 1
    assert after.bytes_received_total >= before.bytes_received_total + 6
    assert after.memory_bytes is not None and after.memory_bytes > 0
    assert after.cpu_percent is not None and 0.0 <= after.cpu_percent <= 100.0
