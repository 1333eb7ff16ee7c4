"""The REST client without VMs: hostile archives from a server are refused by the core's reader
(the one a local copy_out uses) before anything lands outside the staging directory; server
errors come back as the same ``boxlite.errors`` classes (also from proxies and dead servers);
options; what a remote runtime does not offer.

The error tests talk to a real HTTP server on loopback that answers canned responses."""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

import boxlite
from boxlite._native import _extract_untrusted, _first_entry_kind
from boxlite.rest.box import RestBox
from boxlite.rest.client import RestClient
from boxlite.rest.wire import create_body, env_dict

# -------------------------------------------------------------------------------- archives


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x", **attrs: object) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = int(attrs.pop("mode", 0o644))  # type: ignore[call-overload]
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


def chunks(data: bytes, size: int = 700) -> Iterator[bytes]:
    """Odd-sized pieces, as a network delivers them."""
    for at in range(0, len(data), size):
        yield data[at : at + size]


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """A staging directory inside a tree the test watches for anything written outside."""
    root = tmp_path / "staging"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    return root


def extract(data: bytes, root: Path, expected: str = "top", recursive: bool = True, max_bytes: int = 1 << 30) -> None:
    _extract_untrusted(chunks(data), root, expected, recursive, max_bytes)


def everything_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


HOSTILE = {
    "absolute name": [member("/etc/evil")],
    "parent component": [member("top/../../outside/evil")],
    "other top-level name": [member("other/x")],
    "write through a symlink": [
        member("top", tarfile.DIRTYPE),
        member("top/d", tarfile.DIRTYPE),
        member("top/l", tarfile.SYMTYPE, linkname="d"),
        member("top/l/x"),
    ],
    "write through an outward symlink": [
        member("top", tarfile.DIRTYPE),
        member("top/l", tarfile.SYMTYPE, linkname="../outside"),
        member("top/l/evil"),
    ],
    "hard link outside": [member("top", tarfile.DIRTYPE), member("top/h", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "hard link climbing": [member("top", tarfile.DIRTYPE), member("top/h", tarfile.LNKTYPE, linkname="top/../x")],
    "hard link to nothing of the archive": [
        member("top", tarfile.DIRTYPE),
        member("top/h", tarfile.LNKTYPE, linkname="top/missing"),
    ],
    "hard link through an outward symlink": [
        member("top", tarfile.DIRTYPE),
        member("top/l", tarfile.SYMTYPE, linkname="/etc"),
        member("top/h", tarfile.LNKTYPE, linkname="top/l/passwd"),
    ],
    "file replacing a directory": [member("top", tarfile.DIRTYPE), member("top/d", tarfile.DIRTYPE), member("top/d")],
    "directory replacing a file": [member("top", tarfile.DIRTYPE), member("top/f"), member("top/f", tarfile.DIRTYPE)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_entry_is_refused_and_nothing_lands_outside(case: str, staging: Path) -> None:
    before = everything_under(staging.parent)
    with pytest.raises(boxlite.GuestProtocolError, match="refused an entry from the box"):
        extract(tar_of(*HOSTILE[case]), staging)
    after = everything_under(staging.parent)
    assert {p for p in after - before if not p.startswith("staging")} == set()
    assert not any((staging.parent / "outside").iterdir())
    assert not os.path.lexists(staging / "top" / "h")  # no hard link to anything outside


def test_links_are_kept_as_links_and_never_followed(staging: Path) -> None:
    """As a local copy_out (and ``tar -x``): a symlink is data, whatever it points at."""
    data = tar_of(
        member("top", tarfile.DIRTYPE),
        member("top/abs", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("top/up", tarfile.SYMTYPE, linkname="../outside"),
        member("top/./dot//x", data=b"plain"),  # "." and empty components are no components
    )
    extract(data, staging)
    top = staging / "top"
    assert os.readlink(top / "abs") == "/etc/passwd" and os.readlink(top / "up") == "../outside"
    assert (top / "dot" / "x").read_bytes() == b"plain"
    assert not any((staging.parent / "outside").iterdir())


def raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """A ustar header with a right checksum (for what ``tarfile`` refuses to write)."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def test_malformed_archives_are_refused(staging: Path) -> None:
    # (A stream without end blocks is whole as far as its entries go: the HTTP body's own
    # framing says whether it arrived whole.)
    good = tar_of(member("top"))
    cases = {
        "content cut short": good[:600],
        "wrong checksum": good[:148] + b"0000001\0" + good[156:],
        "sparse entry": raw_header(b"top", b"S", 0) + bytes(1024),
    }
    for why, data in cases.items():
        with pytest.raises(boxlite.BoxliteError, match="reading the archive"):
            extract(data, staging)
        assert why and not any(staging.parent.joinpath("outside").iterdir())


def test_a_huge_extended_header_is_refused_after_a_bounded_read(staging: Path) -> None:
    """The reader keeps long names and pax records in memory: it reads at most 64 KiB of
    headers before an entry, however large one claims to be."""
    budget = 64 * 1024

    def stream(kind: bytes) -> Iterator[bytes]:
        yield raw_header(b"././@LongLink", kind, 1 << 40)
        for _ in range(budget // 4096 + 1):
            yield b"a" * 4096
        raise AssertionError("the reader went on past its header budget")

    for kind in (b"L", b"x"):
        with pytest.raises(boxlite.GuestProtocolError, match=f"headers of more than {budget} bytes"):
            _extract_untrusted(stream(kind), staging, "top", True, 1 << 30)
        assert not any(staging.iterdir())


def test_max_bytes_is_checked_at_each_header_before_the_file_is_written(staging: Path) -> None:
    data = tar_of(member("top", tarfile.DIRTYPE), member("top/a", data=b"a" * 600), member("top/b", data=b"b" * 600))
    with pytest.raises(boxlite.InvalidArgumentError, match="max_bytes") as caught:
        extract(data, staging, max_bytes=1000)
    assert "copy_out's limit of 1000 bytes" in str(caught.value)
    assert (staging / "top" / "a").read_bytes() == b"a" * 600
    assert not (staging / "top" / "b").exists()


def test_a_directory_needs_recursive(staging: Path) -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match="recursive=True"):
        extract(tar_of(member("top", tarfile.DIRTYPE)), staging, recursive=False)
    extract(tar_of(member("top")), staging, recursive=False)
    assert (staging / "top").read_bytes() == b"x"


def test_a_benign_tree_is_extracted_faithfully(staging: Path) -> None:
    long_dir = "top/" + "d" * 120
    sparse = b"\0" * (1 << 20) + b"end"
    data = tar_of(
        member("top", tarfile.DIRTYPE, mode=0o750),
        member(long_dir, tarfile.DIRTYPE),
        member(f"{long_dir}/ünïcode.txt", data=b"hello"),
        member("top/run.sh", data=b"#!/bin/sh\n", mode=0o4755),
        member("top/sparse", data=sparse),
        member("top/empty", data=b""),
        member("top/link", tarfile.SYMTYPE, linkname="run.sh"),
        member(f"{long_dir}/up", tarfile.SYMTYPE, linkname="../run.sh"),
        member("top/hard", tarfile.LNKTYPE, linkname="top/run.sh"),
        member("top/fifo", tarfile.FIFOTYPE),
        member("top/dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("top/run.sh", data=b"#!/bin/sh\necho replaced\n", mode=0o755),  # a later entry wins
    )
    extract(data, staging)
    top = staging / "top"
    assert (top / long_dir[4:] / "ünïcode.txt").read_bytes() == b"hello"
    assert (top / "run.sh").read_bytes() == b"#!/bin/sh\necho replaced\n"
    assert (top / "run.sh").stat().st_mode & 0o7777 == 0o755  # no setuid, ever
    assert os.readlink(top / "link") == "run.sh" and os.readlink(top / long_dir[4:] / "up") == "../run.sh"
    assert (top / "hard").read_bytes() == b"#!/bin/sh\n"  # linked to the first run.sh, then replaced
    assert (top / "sparse").read_bytes() == sparse
    assert (top / "sparse").stat().st_blocks * 512 < 64 * 1024, "the zeros were written instead of left as holes"
    assert (top / "empty").read_bytes() == b""
    assert not (top / "fifo").exists() and not (top / "dev").exists()
    assert top.stat().st_mode & 0o777 == 0o750


def test_gnu_long_names_and_links_are_read(staging: Path) -> None:
    name = "top/" + "n" * 150
    data = tar_of(
        member("top", tarfile.DIRTYPE),
        member(name, data=b"long"),
        member("top/l", tarfile.SYMTYPE, linkname="n" * 150),
        member("top/future", data=b"", mtime=1 << 70),  # a time the host cannot hold: not kept
        fmt=tarfile.GNU_FORMAT,
    )
    extract(data, staging)
    assert (staging / "top" / "future").is_file()
    assert (staging / name).read_bytes() == b"long" and os.readlink(staging / "top" / "l") == "n" * 150


def test_the_probe_reads_only_the_first_header() -> None:
    def kind(*members: tuple) -> str:
        return _first_entry_kind(chunks(tar_of(*members)))

    assert kind(member("d", tarfile.DIRTYPE), member("d/x")) == "directory"
    assert kind(member("f")) == "file"
    assert kind(member("l", tarfile.SYMTYPE, linkname="x")) == "symlink"
    assert _first_entry_kind(iter([b"not a tar"])) == "other" and _first_entry_kind(iter([])) == "other"


# -------------------------------------------------------------------------------- errors


class Canned(http.server.BaseHTTPRequestHandler):
    """Answers ``ROUTES[path] = (status, content type, body)``; records the requests."""

    ROUTES: ClassVar[dict[str, tuple[int, str, bytes]]] = {}
    SEEN: ClassVar[list[tuple[str, str, str | None]]] = []

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        Canned.SEEN.append((self.command, self.path, self.headers.get("Authorization")))
        status, kind, body = Canned.ROUTES.get(path, (404, "application/json", b'{"error": {"message": "no route"}}'))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def canned() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def error_body(kind: str, code: str, message: str) -> tuple[int, str, bytes]:
    """A JSON error answer as ``boxlite serve`` gives it."""
    status = {"not_found": 404, "already_exists": 409, "invalid_argument": 400, "unauthenticated": 401}
    body = json.dumps({"error": {"type": kind, "code": code, "message": message}}).encode()
    return status.get(code, 500), "application/json", body


def with_status(status: int, answer: tuple[int, str, bytes]) -> tuple[int, str, bytes]:
    return status, answer[1], answer[2]


ERRORS = [
    (error_body("BoxNotFoundError", "not_found", "box not found: b"), boxlite.BoxNotFoundError),
    (error_body("AlreadyExistsError", "already_exists", "taken"), boxlite.AlreadyExistsError),
    (error_body("InvalidArgumentError", "invalid_argument", "bad"), boxlite.InvalidArgumentError),
    (error_body("AuthenticationError", "unauthenticated", "bad key"), PermissionError),
    (with_status(504, error_body("ExecTimeoutError", "execution_failed", "slow")), boxlite.ExecTimeoutError),
    # A type this client does not know: its code decides, then its HTTP status.
    (with_status(409, error_body("FutureError", "invalid_state", "later")), boxlite.InvalidStateError),
    (with_status(429, error_body("FutureError", "future_code", "later")), boxlite.ResourceExhaustedError),
    # Never a class outside boxlite.errors, whatever the server names.
    (error_body("SystemExit", "x", "no"), boxlite.InternalError),
    (with_status(400, error_body("ExecError", "x", "no")), boxlite.InvalidArgumentError),
    # A proxy's page instead of the server's JSON.
    ((502, "text/html", b"<html>Bad Gateway</html>"), boxlite.UpstreamUnavailableError),
]


@pytest.mark.parametrize(("answer", "expected"), ERRORS)
async def test_server_errors_become_the_same_classes(canned: str, answer: tuple, expected: type) -> None:
    Canned.ROUTES = {"/v1/default/boxes": answer}
    rt = boxlite.Boxlite.rest(boxlite.BoxliteRestOptions(url=canned, credential=boxlite.ApiKeyCredential("k1")))
    with pytest.raises(expected) as caught:
        await rt.list_info()
    assert isinstance(caught.value, boxlite.BoxliteError)
    if answer[1] == "text/html":
        assert canned in str(caught.value) and "502" in str(caught.value) and "Bad Gateway" in str(caught.value)
    else:
        assert str(caught.value) == json.loads(answer[2])["error"]["message"]
    assert Canned.SEEN[-1][2] == "Bearer k1"
    await rt.close()


async def test_a_missing_box_is_none_and_bad_answers_are_upstream_errors(canned: str) -> None:
    Canned.ROUTES = {
        "/v1/default/boxes/gone": error_body("BoxNotFoundError", "not_found", "gone"),
        "/v1/default/boxes": (200, "application/json", b"not json"),
        "/v1/default/metrics": (200, "application/json", b'{"boxes": 1}'),
    }
    rt = boxlite.Boxlite.rest(boxlite.BoxliteRestOptions(url=canned))
    assert await rt.get("gone") is None and await rt.get_info("gone") is None
    with pytest.raises(boxlite.BoxNotFoundError):
        await rt.remove("gone")
    with pytest.raises(boxlite.UpstreamUnavailableError, match="not JSON"):
        await rt.list_info()
    assert Canned.SEEN[-1][2] is None  # no credential, no header
    await rt.close()


async def test_signals_without_a_session_are_requests_checked_by_the_core(canned: str) -> None:
    """A server without the exec session gets signals and resizes as requests, made before
    the call returns (so stdin written next cannot overtake them); bad values are the core's
    errors, raised before any request."""
    from boxlite.rest.execution import RestExecution

    signal_path = "/v1/default/boxes/b1/executions/e1/signal"
    resize_path = signal_path[: -len("signal")] + "resize"
    Canned.ROUTES = {signal_path: (204, "application/json", b""), resize_path: (204, "", b"")}
    client = RestClient(boxlite.BoxliteRestOptions(url=canned))
    execution = RestExecution(client, "b1", "e1", 7, "sleep 60", None)

    def posts() -> list[str]:
        return [path for method, path, _ in Canned.SEEN if method == "POST"]

    seen = len(posts())
    with pytest.raises(boxlite.InvalidArgumentError, match="not a signal number"):
        execution.kill(0)
    with pytest.raises(boxlite.InvalidArgumentError, match="terminal size"):
        execution.resize_tty(0, 80)
    assert len(posts()) == seen
    execution.kill(15)
    execution.resize_tty(30, 100)
    assert posts()[seen:] == [signal_path, resize_path]


class RecordingSocket:
    """The session's WebSocket, recording what is sent; a send finishes without suspending,
    as a real one does while its buffer has room."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self.close_code = 1000
        self._closed = asyncio.Event()

    async def send(self, message: str | bytes) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        self._closed.set()

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._nothing()

    async def _nothing(self) -> AsyncIterator[str | bytes]:
        await self._closed.wait()
        return
        yield


async def test_session_messages_leave_in_the_order_given() -> None:
    """Signals and resizes return at once, yet never overtake stdin given after them (from
    this loop or another thread)."""
    from boxlite.rest.execution import RestOutputStream
    from boxlite.rest.session import Channel, ExecSession

    ws = RecordingSocket()
    session = ExecSession(RestClient(boxlite.BoxliteRestOptions(url="http://127.0.0.1:9")), ws)  # type: ignore[arg-type]
    channel = Channel(session, 1, RestOutputStream(), RestOutputStream())
    channel.control("resize", rows=30, cols=100)
    await channel.send_stdin(b"\n")
    channel.control("signal", signal=15)
    await asyncio.to_thread(channel.control, "signal", signal=9)
    await channel.send_eof()

    def kind(message: str | bytes) -> str:
        return "stdin" if isinstance(message, bytes) else str(json.loads(message)["type"])

    assert [kind(m) for m in ws.sent] == ["resize", "stdin", "signal", "signal", "stdin_eof"]
    await session.close()


async def test_an_unreachable_server_names_its_url(unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    rt = boxlite.Boxlite.rest(boxlite.BoxliteRestOptions(url=url, timeout=5))
    for call in (rt.list_info(), rt.create(boxlite.BoxOptions(image="alpine")), rt.get("x")):
        with pytest.raises(boxlite.UpstreamUnavailableError, match=f"cannot reach the boxlite server at {url}"):
            await call
    with pytest.raises(boxlite.UpstreamUnavailableError, match=url):
        rt.metrics()
    rt.close()  # nothing was made: nothing to stop


def test_the_sync_api_has_rest_too(unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    with boxlite.SyncBoxlite.rest(boxlite.BoxliteRestOptions(url=url)) as rt:
        with pytest.raises(boxlite.UpstreamUnavailableError, match=url):
            rt.list_info()


# -------------------------------------------------------------------------------- the rest


def test_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXLITE_REST_URL", "https://boxes.example:8100/api")
    monkeypatch.setenv("BOXLITE_API_KEY", "s3cret")
    options = boxlite.BoxliteRestOptions.from_env()
    assert options.url == "https://boxes.example:8100/api" and options.credential == boxlite.ApiKeyCredential("s3cret")
    assert "s3cret" not in repr(options)
    monkeypatch.delenv("BOXLITE_API_KEY")
    monkeypatch.delenv("BOXLITE_REST_URL")
    assert boxlite.BoxliteRestOptions.from_env() == boxlite.BoxliteRestOptions(url="http://localhost:8100")
    client = RestClient(boxlite.BoxliteRestOptions(url="http://h:1/base/", path_prefix="team-a"))
    assert (client.url, client.box_path("a b/c", "exec")) == ("http://h:1/base", "/v1/team-a/boxes/a%20b%2Fc/exec")
    bad: list[dict[str, object]] = [
        {"url": "ftp://x"},
        {"url": "http://x", "timeout": 0},
        {"url": "http://x", "path_prefix": "a/b"},
        {"url": "http://x", "credential": "plain-string"},
    ]
    for kwargs in bad:
        with pytest.raises(boxlite.ConfigError):
            boxlite.BoxliteRestOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(boxlite.ConfigError):
        boxlite.ApiKeyCredential("two\nlines")
    with pytest.raises(boxlite.ConfigError, match="BoxliteRestOptions"):
        boxlite.Boxlite.rest("http://localhost:8100")  # type: ignore[arg-type]


def test_importing_boxlite_loads_no_http_client() -> None:
    code = "import sys, boxlite; boxlite.BoxliteRestOptions; print(sorted({'httpx', 'websockets'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "[]"


def test_create_bodies_send_what_differs_from_the_defaults() -> None:
    assert create_body(boxlite.BoxOptions(image="alpine"), None) == {"image": "alpine"}
    options = boxlite.BoxOptions(
        rootfs_path="/srv/layout",
        cpus=2,
        env={"A": "1"},
        cmd=["sleep", "1"],
        auto_remove=False,
        volumes=[("/data", "/mnt", True)],
        ports=[(8080, 80), {"guest_port": 81}],
        network=boxlite.NetworkSpec(mode="enabled", allow_net=["example.com"]),
        name="n1",
    )
    assert create_body(options, "n2") == {
        "rootfs_path": "/srv/layout",
        "cpus": 2,
        "env": {"A": "1"},
        "cmd": ["sleep", "1"],
        "auto_remove": False,
        "volumes": [{"host_path": "/data", "guest_path": "/mnt", "read_only": True}],
        "ports": [{"host_port": 8080, "guest_port": 80}, {"guest_port": 81}],
        "network": {"mode": "enabled", "allow_net": ["example.com"]},
        "name": "n2",
    }
    for unsupported in (
        boxlite.BoxOptions(auto_delete=5),
        boxlite.BoxOptions(advanced=boxlite.AdvancedBoxOptions()),
        boxlite.BoxOptions(network=boxlite.NetworkSpec(inbound=boxlite.InboundNetworkSpec())),
    ):
        with pytest.raises(boxlite.UnsupportedError, match="remote runtime"):
            create_body(unsupported, None)
    assert env_dict([("A", "1")]) == {"A": "1"} and env_dict(None) is None
    for bad in ("A=1", [("A", 1)], [["A", "1"]]):
        with pytest.raises(boxlite.InvalidArgumentError, match="`env`"):
            env_dict(bad)


async def test_what_a_remote_runtime_does_not_offer_says_so() -> None:
    rt = boxlite.Boxlite.rest(boxlite.BoxliteRestOptions(url="http://127.0.0.1:9"))
    box = boxlite.Box(RestBox(rt._native.client, {"id": "b1", "name": "n", "default_command": ["sh"]}))
    assert (box.id, box.name, box.default_command) == ("b1", "n", ["sh"])
    checks = [
        lambda: box.dir,
        lambda: rt.home_dir,
        lambda: box.snapshot,
        lambda: rt._native.images().get("alpine"),
    ]
    for check in checks:
        with pytest.raises(boxlite.UnsupportedError, match="remote runtime"):
            check()
    for coro in (box.fork(), box.pause(), box.clone_box(), box.export(dest="/tmp"), rt.import_box("/x.boxlite")):
        with pytest.raises(boxlite.UnsupportedError, match="remote runtime"):
            await coro
    with pytest.raises(boxlite.UnsupportedError, match="remote runtime"):
        await rt.images.gc()
