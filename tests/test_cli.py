"""The `boxlite` command line, run as a user runs it: a separate process per command, real
VMs, a real terminal (a pty) for `-it`, and a real registry for `pull`."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.registry import Registry

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 180.0  # seconds a CLI command or an expected output may take before the test fails


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXLITE_")}
    env["BOXLITE_TEMPLATES"] = "0"  # one box per home mostly; see make_runtime
    env.update(extra)
    return env


def cli(home: Path, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boxlite", "--home", str(home), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=cli_env(**env),
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("boxlite: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def svc(shared_home: Path, image_layout: Path) -> Iterator[str]:
    """A detached box made with `run -d`, for the commands that work on a running box."""
    out = ok(
        cli(shared_home, "run", "-d", "--name", "svc", "--memory", "256MiB", "-e", "A=1", "--rootfs", str(image_layout))
    )
    box_id = out.strip()
    assert re.fullmatch(r"[0-9A-Z]{26}", box_id), out
    yield box_id
    cli(shared_home, "rm", "-f", box_id)


# ------------------------------------------------------------------------------------- run


def test_run_streams_output_and_exits_with_the_command_code(home: Path, image_layout: Path) -> None:
    result = cli(home, "run", "--rm", "--rootfs", str(image_layout), "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert ok(cli(home, "ps", "-a", "-q")) == ""  # --rm deleted it


def test_run_keeps_the_stopped_box_without_rm_and_takes_options(home: Path, image_layout: Path) -> None:
    result = cli(
        home,
        "run",
        "--name",
        "once",
        "--cpus",
        "1",
        "--memory",
        "300MiB",
        "-e",
        "GREETING=hello there",
        "-w",
        "/tmp",
        "-u",
        "app",
        "--rootfs",
        str(image_layout),
        "sh",
        "-c",
        'echo "$GREETING|$(pwd)|$(id -un)"; grep MemTotal /proc/meminfo',
    )
    lines = ok(result).splitlines()
    assert lines[0] == "hello there|/tmp|app"
    mem_kib = int(lines[1].split()[1])
    assert 200 * 1024 < mem_kib <= 300 * 1024
    listed = ok(cli(home, "ps", "-a")).splitlines()
    assert listed[0].split() == ["BOX", "ID", "IMAGE", "STATUS", "CREATED", "PORTS", "ACCEL", "NAME"]
    assert len(listed) == 2 and " stopped " in listed[1] and listed[1].rstrip().endswith("once")
    assert ok(cli(home, "ps")).splitlines()[1:] == []  # not running
    ok(cli(home, "rm", "once"))
    assert ok(cli(home, "ps", "-a", "-q")) == ""


def test_run_mounts_host_folders_with_v(home: Path, image_layout: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    (folder / "in.txt").write_text("in\n")
    script = "cat /in/in.txt; echo out > /rw/out.txt; echo no > /in/no.txt || echo refused"
    result = cli(
        home, "run", "--rm", "-v", f"{folder}:/in:ro", "-v", f"{folder}:/rw", "--rootfs", str(image_layout),
        "sh", "-c", script,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "in\nrefused\n"
    assert (folder / "out.txt").read_text() == "out\n" and not (folder / "no.txt").exists()
    bad = cli(home, "run", "--rm", "-v", "nocolon", "--rootfs", str(image_layout), "true")
    assert "HOST_PATH:GUEST_PATH" in one_error_line(bad)
    missing = cli(home, "run", "--rm", "-v", f"{tmp_path}/missing:/m", "--rootfs", str(image_layout), "true")
    assert "missing" in one_error_line(missing)


def test_run_without_a_command_runs_the_image_default(home: Path, image_layout: Path) -> None:
    # The busybox image's CMD is `sh`; with stdin forwarded it reads the script from there.
    result = cli(home, "run", "--rm", "-i", "--rootfs", str(image_layout), input="echo from-stdin; exit 5\n")
    assert (result.returncode, result.stdout) == (5, "from-stdin\n")
    entry = cli(home, "run", "--rm", "--entrypoint", "echo", "--rootfs", str(image_layout), "a", "b")
    assert ok(entry) == "a b\n"


# ------------------------------------------------------------------------------------- a running box


def test_exec_ps_stop_start_rm_on_a_detached_box(shared_home: Path, svc: str) -> None:
    ps = ok(cli(shared_home, "ps"))
    assert svc in ps and "running" in ps and "svc" in ps
    assert ok(cli(shared_home, "exec", "svc", "sh", "-c", 'echo "A=$A"')) == "A=1\n"
    assert ok(cli(shared_home, "exec", svc[:20], "echo", "by-prefix")) == "by-prefix\n"
    piped = cli(shared_home, "exec", "-i", "svc", "sh", "-c", "tr a-z A-Z; exit 9", input="shout\n")
    assert (piped.returncode, piped.stdout) == (9, "SHOUT\n")
    assert ok(cli(shared_home, "exec", "-e", "B=2", "-w", "/etc", "svc", "sh", "-c", 'echo "$B $(pwd)"')) == "2 /etc\n"

    ok(cli(shared_home, "exec", "svc", "sh", "-c", "echo kept > /root/state"))
    assert ok(cli(shared_home, "stop", "svc")) == "svc\n"
    assert svc not in ok(cli(shared_home, "ps"))
    assert "stopped" in ok(cli(shared_home, "ps", "-a"))
    stopped = cli(shared_home, "exec", "svc", "true")
    assert stopped.returncode == 125 and "stopped" in one_error_line(stopped)
    ok(cli(shared_home, "start", "svc"))
    assert ok(cli(shared_home, "exec", "svc", "cat", "/root/state")) == "kept\n"

    refused = cli(shared_home, "rm", "svc")
    assert refused.returncode == 1 and "force" in one_error_line(refused)


def test_cp_copies_both_ways(shared_home: Path, svc: str, tmp_path: Path) -> None:
    src = tmp_path / "note.txt"
    src.write_text("across\n")
    ok(cli(shared_home, "cp", str(src), "svc:/root/note.txt"))
    assert ok(cli(shared_home, "exec", "svc", "cat", "/root/note.txt")) == "across\n"
    ok(cli(shared_home, "cp", "svc:/etc/passwd", str(tmp_path / "passwd")))
    assert (tmp_path / "passwd").read_text().startswith("root:x:0:0:")
    both = cli(shared_home, "cp", str(src), str(tmp_path / "x"))
    assert both.returncode == 2 and "BOX:PATH" in one_error_line(both)


def test_errors_are_one_line_and_exit_non_zero(shared_home: Path, svc: str, image_layout: Path) -> None:
    missing = cli(shared_home, "exec", "nosuchbox", "true")
    assert missing.returncode == 125 and "nosuchbox" in one_error_line(missing)
    not_found = cli(shared_home, "exec", "svc", "no-such-command")
    assert not_found.returncode == 127 and "no-such-command" in one_error_line(not_found)
    bad_memory = cli(shared_home, "run", "--memory", "12xb", "--rootfs", str(image_layout), "true")
    assert bad_memory.returncode == 2 and "memory" in one_error_line(bad_memory)
    too_small = cli(shared_home, "run", "--memory", "64MiB", "--rootfs", str(image_layout), "true")
    assert too_small.returncode == 125 and "`memory`" in one_error_line(too_small)
    no_layout = cli(shared_home, "run", "--rootfs", str(image_layout / "nope"), "true")
    assert no_layout.returncode == 125
    one_error_line(no_layout)
    usage = cli(shared_home, "frobnicate")
    assert usage.returncode == 2 and "boxlite: error:" in usage.stderr
    assert "Traceback" not in missing.stderr + not_found.stderr + no_layout.stderr


def test_info_reports_version_accelerator_isolation_bundle_and_home(shared_home: Path) -> None:
    import boxlite

    out = ok(cli(shared_home, "info"))
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    accel, reason = boxlite.accelerator()
    assert fields["version"] == boxlite.__version__
    assert fields["home"] == str(shared_home)
    assert fields["accelerator"] == accel
    # The reason carries this run's probe timing; its wording is stable up to the numbers.
    assert re.sub(r"[\d.]+", "N", fields["accelerator reason"]) == re.sub(r"[\d.]+", "N", reason)
    if accel == "tcg":
        assert fields["isolation"].startswith("software (TCG)") and "not" in fields["isolation"]
    else:
        assert fields["isolation"].startswith("hardware")
    assert Path(fields["guest bundle"], "vmlinuz").is_file()
    assert fields["guest kernel"].startswith("linux-image-")
    assert fields["guest agent"].startswith("sha256:")


# ------------------------------------------------------------------------------------- -it through a pty


class Pty:
    """A process on a fresh pseudo-terminal that is its controlling terminal, the way a
    shell runs it."""

    def __init__(self, argv: list[str], rows: int = 30, cols: int = 100) -> None:
        self.master, slave = os.openpty()
        self.set_size(rows, cols)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            env=cli_env(),
        )
        os.close(slave)
        self.output = b""
        self.cursor = 0  # output before this was matched by an earlier expect

    def set_size(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def read_some(self, wait: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], wait)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the terminal is gone
            return False
        # Answer a cursor-position query as a terminal does (busybox's line editor asks,
        # and may take the next typed line for the answer when none comes).
        for _ in range(chunk.count(b"\x1b[6n")):
            os.write(self.master, b"\x1b[1;1R")
        self.output += chunk
        return bool(chunk)

    def expect(self, needle: str, resend: str | None = None) -> None:
        """Reads until `needle` appears after the previous match (sending `resend` again every
        second while waiting, for output that depends on an asynchronous event). Output after
        the match stays unread, so one chunk can satisfy several expects in turn."""
        wanted = needle.encode()
        deadline = time.monotonic() + DEADLINE
        while (found := self.output.find(wanted, self.cursor)) < 0:
            seen = self.output[self.cursor :]
            assert time.monotonic() < deadline, f"never saw {needle!r}: {seen!r}"
            if resend is not None:
                self.send(resend)
            if not self.read_some(1.0) and wanted not in self.output[self.cursor :]:
                raise AssertionError(f"the terminal closed before {needle!r}: {seen!r}")
        self.cursor = found + len(wanted)

    def finish(self) -> int:
        while self.read_some(0.5):
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0.2)[0]:
                break
        code = self.proc.wait(timeout=DEADLINE)
        return code

    def cooked(self) -> bool:
        lflag = termios.tcgetattr(self.master)[3]
        return bool(lflag & termios.ICANON) and bool(lflag & termios.ECHO)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


def test_exec_it_is_an_interactive_shell_with_a_live_size(shared_home: Path, svc: str) -> None:
    term = Pty([sys.executable, "-m", "boxlite", "--home", str(shared_home), "exec", "-it", "svc", "sh"], 30, 100)
    try:
        term.expect("# ")  # the prompt: a shell that believes it is interactive
        term.send("stty size; tty\n")
        term.expect("30 100")
        term.expect("/dev/pts/")
        term.set_size(50, 132)  # the kernel sends SIGWINCH; the CLI passes the new size on
        term.expect("50 132", resend="stty size\n")
        term.send("read line; echo got-$line\n")
        term.send("typed\n")
        term.expect("got-typed")
        term.send("echo hi; exit 3\n")
        term.expect("\nhi\r\n")
        assert term.finish() == 3
        assert term.cooked(), "the terminal was left in raw mode"
    finally:
        term.close()


def test_run_it_boots_a_box_with_a_shell(home: Path, image_layout: Path) -> None:
    argv = [sys.executable, "-m", "boxlite", "--home", str(home), "run", "-it", "--rm", "--rootfs", str(image_layout)]
    term = Pty([*argv, "sh"])
    try:
        term.expect("# ")
        term.send("echo $((6 * 7)); exit 0\n")
        term.expect("42\r\n")
        assert term.finish() == 0
        assert term.cooked()
    finally:
        term.close()
    assert ok(cli(home, "ps", "-a", "-q")) == ""


def test_ctrl_c_in_a_tty_goes_to_the_box(shared_home: Path, svc: str) -> None:
    term = Pty([sys.executable, "-m", "boxlite", "--home", str(shared_home), "exec", "-it", "svc", "sh"])
    try:
        term.expect("# ")
        term.send("sleep 300; echo after-sleep\n")
        term.expect("after-sleep\r\n")  # the echo of the line: the shell has it
        # ^C interrupts the sleep in the box, not the CLI. A ^C that arrives before the shell
        # has handed the terminal to the sleep's process group is the shell's own (plain input
        # to its line editor, or an interrupt it defers until the sleep ends), as on any
        # terminal, so it is sent every second until the shell is back at its prompt.
        term.expect("^C", resend="\x03")
        term.expect("# ", resend="\x03")
        term.send("echo still-here; exit 0\n")
        term.expect("still-here\r\n")
        assert term.finish() == 0
        assert b"after-sleep\r\n" not in term.output.split(b"^C", 1)[1]  # the list was interrupted
    finally:
        term.close()


# ------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, image_layout: Path) -> Iterator[str]:
    """A real local registry (Debian's docker-registry) holding the busybox image as
    library/busybox:latest; yields its host:port."""
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        reg.push(image_layout, "latest", "library/busybox")
        yield reg.host


def test_pull_images_run_and_rmi_through_a_registry(home: Path, registry: str) -> None:
    env = {"BOXLITE_REGISTRIES": f"http://{registry}"}
    pulled = cli(home, "pull", "busybox", **env)
    out = ok(pulled)
    assert re.search(r"^layer 1/1 [0-9a-f]{12} \[=+\] done$", out, re.M), out
    assert re.search(rf"{re.escape(registry)}/library/busybox:latest: pulled sha256:[0-9a-f]{{64}}", out), out

    listed = ok(cli(home, "images", **env)).splitlines()
    assert listed[0].split()[:3] == ["REFERENCE", "DIGEST", "SIZE"]
    assert listed[1].startswith(f"{registry}/library/busybox:latest")
    assert ok(cli(home, "images", "-q", **env)) == f"{registry}/library/busybox:latest\n"

    ran = cli(home, "run", "--rm", "busybox", "sh", "-c", "echo from-registry", **env)
    assert ok(ran) == "from-registry\n"

    assert ok(cli(home, "rmi", "busybox", **env)).startswith("removed")
    assert ok(cli(home, "images", "-q", **env)) == ""
    gone = cli(home, "rmi", "busybox", **env)
    assert gone.returncode == 1 and "busybox" in gone.stderr
    missing = cli(home, "pull", "nothing/here:1", **env)
    assert missing.returncode == 125 and "nothing/here" in one_error_line(missing)


# ------------------------------------------------------------------------------------- packaging


def test_the_wheel_installs_in_a_fresh_venv_with_the_console_script(
    tmp_path: Path, home: Path, image_layout: Path
) -> None:
    """`pip install` of the built wheel, offline, in a new venv: the `boxlite` command, the
    guest bundle and the supervisor come with it, and a box runs from outside the repo."""
    maturin = Path(sys.executable).parent / "maturin"
    wheels = tmp_path / "wheels"
    subprocess.run(
        [str(maturin), "build", "--release", "--quiet", "--out", str(wheels)],
        cwd=REPO,
        check=True,
        timeout=1800,
        capture_output=True,
    )
    (wheel,) = wheels.glob("boxlite-*-abi3-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-index", str(wheel)], check=True, timeout=300)
    command = [str(venv / "bin" / "boxlite"), "--home", str(home)]
    shared = tmp_path / "shared"  # the wheel ships virtiofsd beside the shim
    shared.mkdir()
    (shared / "msg").write_text("from the wheel\n")
    out = subprocess.run(
        [*command, "run", "--rm", "-v", f"{shared}:/shared:ro", "--rootfs", str(image_layout), "cat", "/shared/msg"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert (out.returncode, out.stdout) == (0, "from the wheel\n"), out.stderr
    info = subprocess.run([*command, "info"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, check=True)
    bundle = next(line for line in info.stdout.splitlines() if line.startswith("guest bundle:"))
    assert bundle.split(":", 1)[1].strip().startswith(str(venv)), info.stdout
