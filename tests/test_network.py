"""A box's network, against real VMs and real host sockets on loopback: egress through the
user-mode stack with its allow-list, DNS, published ports, a box without a network, and the
network counters in the box's metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import make_runtime, run
from testkit.hostserver import HostServer
from testkit.images import python_layout
from testkit.wheels import pure_wheel

HOST = "host.boxlite.internal"


def options(layout: Path, **kwargs: object) -> boxlite.BoxOptions:
    return boxlite.BoxOptions(rootfs_path=layout, memory_mib=256, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def python_image() -> Path:
    return python_layout()


@pytest.fixture(scope="module")
def host_server() -> Iterator[HostServer]:
    server = HostServer(b"x" * 300_000)
    yield server
    server.close()


@pytest.fixture(scope="module")
def allowed_box(shared_runtime: boxlite.Boxlite, python_image: Path) -> Iterator[boxlite.Box]:
    """A python box that may reach only the host's loopback, with a published port."""
    box = asyncio.run(
        shared_runtime.create(
            options(python_image, network=boxlite.NetworkSpec(allow_net=[HOST]), ports=[(0, 8000)]),
            name="allowed",
        )
    )
    yield box
    asyncio.run(box.stop())


async def test_dns_answers_allowed_names_only(allowed_box: boxlite.Box) -> None:
    resolved = await run(allowed_box, "getent", "hosts", HOST)
    assert (resolved.exit_code, resolved.stdout.split()) == (0, ["192.168.127.254", HOST])
    denied = await run(allowed_box, "getent", "hosts", "example.com")
    assert denied.exit_code == 2  # NXDOMAIN: getent's "key not found"
    hosts = (await run(allowed_box, "cat", "/etc/hosts")).stdout
    assert "allowed" in hosts and HOST in hosts
    assert (await run(allowed_box, "hostname")).stdout == "allowed\n"
    resolv = (await run(allowed_box, "cat", "/etc/resolv.conf")).stdout
    assert "nameserver 192.168.127.1" in resolv


async def test_the_host_is_reached_only_through_its_name(allowed_box: boxlite.Box, host_server: HostServer) -> None:
    fetch = f"import urllib.request; print(len(urllib.request.urlopen('http://{HOST}:{host_server.port}/').read()))"
    assert (await run(allowed_box, "python3", "-c", fetch)).stdout == "300000\n"

    # The host's loopback by address, and a loopback port nobody allowed: refused at once.
    for target in ("127.0.0.1", "192.168.127.1", "169.254.169.254", "10.0.0.1"):
        probe = (
            "import socket, time; t = time.monotonic(); s = socket.socket(); s.settimeout(10)\n"
            "try:\n"
            f"    s.connect(('{target}', {host_server.port})); print('connected')\n"
            "except OSError as e:\n"
            "    print(type(e).__name__, round(time.monotonic() - t, 2))"
        )
        out = (await run(allowed_box, "python3", "-c", probe)).stdout.split()
        assert out[0] != "connected", target
        assert float(out[1]) < 1.0, f"{target}: refused after {out[1]} s"


@pytest.fixture(scope="module")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real pypiserver on the host's loopback serving one wheel."""
    packages = tmp_path_factory.mktemp("packages")
    (packages / "netpkg-1.0-py3-none-any.whl").write_bytes(pure_wheel("netpkg", "1.0", "VALUE = 42\n"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_bin = Path(sys.executable).parent / "pypi-server"
    proc = subprocess.Popen(
        [str(server_bin), "run", "-i", "127.0.0.1", "-p", str(port), "--disable-fallback", str(packages)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/simple/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_codebox_installs_from_an_index_on_the_host(
    shared_runtime: boxlite.Boxlite, python_image: Path, package_index: int
) -> None:
    index = f"http://{HOST}:{package_index}/simple/"
    env = {
        "PIP_INDEX_URL": index,
        "PIP_TRUSTED_HOST": HOST,
        "PIP_RETRIES": "1",  # one retry: pip then says why the connection failed
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    async with boxlite.CodeBox(
        rootfs_path=python_image,
        memory_mib=256,
        runtime=shared_runtime,
        network=boxlite.NetworkSpec(allow_net=[HOST]),
        env=env,
    ) as box:
        await box.install_package("netpkg")
        assert await box.run("import netpkg; print(netpkg.VALUE)") == "42\n"

    # Without the host's name on the list, the same install fails fast and says why.
    async with boxlite.CodeBox(
        rootfs_path=python_image,
        memory_mib=256,
        runtime=shared_runtime,
        network=boxlite.NetworkSpec(allow_net=["pypi.org"]),
        env=env,
    ) as box:
        with pytest.raises(boxlite.ExecError) as caught:
            await box.install_package("netpkg")
        # The name is not on the list: the box's DNS says it does not exist.
        assert "Name or service not known" in caught.value.stderr
        assert HOST in caught.value.stdout + caught.value.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as any server would
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_published_port_serves_concurrent_clients_and_follows_the_box(
    shared_runtime: boxlite.Boxlite, python_image: Path
) -> None:
    fixed = free_port()
    box = await shared_runtime.create(
        options(python_image, auto_remove=False, ports=[{"guest_port": 8000, "host_port": fixed}])
    )
    (port,) = box.info().network.published_ports
    assert (port.host_ip, port.host_port, port.guest_port, port.protocol) == ("127.0.0.1", fixed, 8000, "tcp")
    assert not port_is_free(fixed)
    await box.write_file("/srv/index.html", "served from the box\n")
    server = await box.exec("python3", ["-u", "-m", "http.server", "8000", "-d", "/srv"])
    async for line in server.stdout():  # the server says when it listens (Python starts slowly under TCG)
        if line.startswith("Serving HTTP"):
            break

    def fetch(_: int) -> bytes:
        for _ in range(200):
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port.host_port}/", timeout=10).read()
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the published port never answered")

    fetch(0)  # the server is up
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        bodies = await asyncio.get_running_loop().run_in_executor(None, lambda: list(pool.map(fetch, range(20))))
    assert bodies == [b"served from the box\n"] * 20
    server.kill()

    # Stopped: the port is free again; started: bound again.
    await box.stop()
    assert port_is_free(fixed)
    assert box.info().network.published_ports == []
    await box.start()
    assert not port_is_free(fixed)
    assert [p.host_port for p in box.info().network.published_ports] == [fixed]
    await box.stop()
    await shared_runtime.remove(box.id)


async def test_port_zero_takes_a_free_port(shared_runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await shared_runtime.create(options(image_layout, ports=[(0, 80), (0, 81, "tcp", "127.0.0.1")]))
    chosen = [(p.host_port, p.guest_port) for p in box.info().network.published_ports]
    assert [g for _, g in chosen] == [80, 81] and all(h > 0 for h, _ in chosen) and chosen[0][0] != chosen[1][0]
    await box.stop()


async def test_a_taken_host_port_is_a_typed_error_before_boot(home: Path, image_layout: Path) -> None:
    rt = make_runtime(home)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(boxlite.PortInUseError, match=f"127.0.0.1:{port}"):
            await rt.create(options(image_layout, ports=[(port, 80)]))
    assert await rt.list_info() == []


async def test_a_box_without_a_network_has_no_interface(runtime: boxlite.Boxlite, image_layout: Path) -> None:
    box = await runtime.create(options(image_layout, network=boxlite.NetworkSpec("disabled")))
    links = (await run(box, "ls", "/sys/class/net")).stdout.split()
    assert links == ["lo"]
    started = time.monotonic()
    refused = await run(box, "wget", "-q", "-T", "5", "-O-", "http://192.168.127.1/")
    assert refused.exit_code != 0 and time.monotonic() - started < 2
    assert box.info().network.mode == "disabled"
    metrics = await box.metrics()
    assert metrics.network_bytes_sent is None  # no network, no counters
    await box.stop()


async def test_network_metrics_count_bytes_and_refusals(
    shared_runtime: boxlite.Boxlite, python_image: Path, host_server: HostServer
) -> None:
    box = await shared_runtime.create(options(python_image, network=boxlite.NetworkSpec(allow_net=[HOST])))
    before = await box.metrics()
    upload = 200_000
    script = (
        "import urllib.request, socket\n"
        f"got = len(urllib.request.urlopen('http://{HOST}:{host_server.port}/').read())\n"
        f"req = urllib.request.Request('http://{HOST}:{host_server.port}/', data=b'y' * {upload}, method='POST')\n"
        "urllib.request.urlopen(req).read()\n"
        "s = socket.socket()\n"
        "try:\n"
        "    s.connect(('10.9.8.7', 80))\n"
        "except OSError:\n"
        "    pass\n"
        "print(got)"
    )
    assert (await run(box, "python3", "-c", script)).stdout == "300000\n"
    after = await box.metrics()
    assert before.network_bytes_received is not None and after.network_bytes_received is not None
    assert before.network_bytes_sent is not None and after.network_bytes_sent is not None
    received = after.network_bytes_received - before.network_bytes_received
    sent = after.network_bytes_sent - before.network_bytes_sent
    # Payload bytes: the body plus HTTP headers (a few hundred bytes), nothing like doubled.
    assert 300_000 <= received <= 300_000 + 4096
    assert upload <= sent <= upload + 4096
    assert host_server.received >= upload
    assert after.network_tcp_errors is not None and before.network_tcp_errors is not None
    assert after.network_tcp_errors >= before.network_tcp_errors + 1
    await box.stop()


def test_the_cli_publishes_ports_and_switches_the_network_off(home: Path, image_layout: Path) -> None:
    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "boxlite", "--home", str(home), *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )

    off = cli("run", "--rm", "--network", "none", "--rootfs", str(image_layout), "ls", "/sys/class/net")
    assert (off.returncode, off.stdout) == (0, "lo\n"), off.stderr
    allowed = cli("run", "--rm", "--allow-net", HOST, "--rootfs", str(image_layout), "nslookup", "example.com")
    assert allowed.returncode != 0 and "NXDOMAIN" in allowed.stdout + allowed.stderr
    started = cli("run", "-d", "--name", "web", "-p", "0:8080", "--rootfs", str(image_layout))
    assert started.returncode == 0, started.stderr
    listing = cli("ps")
    assert "127.0.0.1:" in listing.stdout and "->8080/tcp" in listing.stdout
    assert cli("rm", "-f", "web").returncode == 0
