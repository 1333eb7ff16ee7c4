"""Images from registries: references, short-name search, auth, platforms, the content store,
concurrent and offline use, progress, removal and garbage collection.

Every registry here is a real ``docker-registry`` on 127.0.0.1 (or our tampering proxy in front
of one), filled with the test kit's images built from Debian packages (``testkit.images``); every box
is a real VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxlite
from conftest import make_runtime, run
from testkit.images import built_images
from testkit.oci import layout_blobs, manifest_digest, umoci_unpack, with_config
from testkit.registry import Proxy, Registry, free_port

HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


@pytest.fixture(scope="session")
def images() -> Path:
    return built_images()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Iterator[Registry]:
    """An anonymous registry holding every test image."""
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        reg.fill(images)
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Iterator[Registry]:
    """A registry behind htpasswd basic auth, holding the alpine stand-in."""
    reg = Registry(tmp_path_factory.mktemp("auth-registry"), users={"alice": "s3cret"}).start()
    try:
        reg.push(images / "alpine", "latest", "library/alpine")
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[Proxy]:
    p = Proxy(registry.host).start()
    yield p
    p.stop()


def mirror(host: str, **kwargs: object) -> boxlite.ImageRegistry:
    return boxlite.ImageRegistry(host, transport="http", search=True, **kwargs)  # type: ignore[arg-type]


def store_blobs(home: Path) -> set[str]:
    return {"sha256:" + p.name for p in (home / "images" / "store" / "blobs" / "sha256").iterdir()}


def ingest_files(home: Path) -> list[str]:
    return [p.name for p in (home / "images" / "ingest").iterdir()]


def base_disks(home: Path) -> set[str]:
    return {p.name for p in (home / "images" / "disks").glob("*.ext4")}


# ---------------------------------------------------------------------------------------------
# Pulls without VMs


async def test_short_names_come_from_search_registries_and_a_cached_image_needs_no_network(
    home: Path, registry: Registry, images: Path
) -> None:
    proxy = Proxy(registry.host).start()
    try:
        rt = make_runtime(home, image_registries=[mirror(proxy.host)])
        info = await rt.images.pull("alpine")
        assert info.reference == f"{proxy.host}/library/alpine:latest"
        assert info.digest == manifest_digest(images / "alpine", "latest")
        assert info.architecture == HOST_ARCH and info.os == "linux"
        assert info.cmd == ["sh"] and info.env[0][0] == "PATH"
        assert info.pulled_at is not None and info.size > 0 and info.layers == 1
        # A tag of the same image and a digest reference resolve locally too.
        assert (await rt.images.get("alpine:latest")).digest == info.digest
        assert (await rt.images.get(f"alpine@{info.digest}")).reference == info.reference
        with pytest.raises(boxlite.ImageNotFoundError, match="not in the local image store"):
            await rt.images.get("alpine:3.20")
        # The store is a valid OCI layout that standard tools read.
        store = home / "images" / "store"
        out = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{store}:{info.reference}"], check=True, capture_output=True
        ).stdout
        assert json.loads(out)["layers"][0]["digest"] in store_blobs(home)
        assert [i.reference for i in await rt.images.list()] == [info.reference]
        # get() never touches the network.
        proxy.requests.clear()
        await rt.images.get("alpine")
        assert proxy.requests == []
    finally:
        proxy.stop()


async def test_registries_without_code_env_and_config_file(home: Path, registry: Registry, tmp_path: Path) -> None:
    home.mkdir(parents=True)
    (home / "registries.json").write_text(
        json.dumps({"registries": [{"host": registry.host, "transport": "http", "search": True}]})
    )
    rt = make_runtime(home)
    assert (await rt.images.pull("python:slim")).reference == f"{registry.host}/library/python:slim"

    other = tmp_path / "other-home"
    script = "import asyncio, boxlite, sys\nrt = boxlite.Boxlite(boxlite.Options(home_dir=sys.argv[1]))\n"
    script += "print(asyncio.run(rt.images.pull('alpine')).reference)\n"
    env = {**os.environ, "BOXLITE_REGISTRIES": f"http://{registry.host}"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(other)], env=env, check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == f"{registry.host}/library/alpine:latest"


async def test_bad_references_and_registries_are_invalid_arguments(home: Path) -> None:
    rt = make_runtime(home)
    for bad in ["Alpine", "alpine:", "a//b", "alpine@sha256:123", "exa_mple.com/x"]:
        with pytest.raises(boxlite.InvalidArgumentError, match=re.escape(f'"{bad}"')):
            await rt.images.pull(bad)
    with pytest.raises(boxlite.InvalidArgumentError, match="image"):
        await rt.create(boxlite.BoxOptions(image="UPPER:case:bad"))
    with pytest.raises(boxlite.InvalidArgumentError, match="scheme"):
        boxlite.ImageRegistry("http://x.io")
    with pytest.raises(boxlite.InvalidArgumentError, match="transport"):
        boxlite.ImageRegistry("x.io", transport="ftp")
    with pytest.raises(boxlite.InvalidArgumentError, match="image_registries"):
        make_runtime(home, image_registries=[boxlite.ImageRegistry("x.io", password="p")])


async def test_missing_images_and_platforms(home: Path, registry: Registry, images: Path) -> None:
    rt = make_runtime(home, image_registries=[mirror(registry.host)])
    with pytest.raises(boxlite.ImageNotFoundError, match=f"{registry.host}/library/nope:latest"):
        await rt.images.pull(f"{registry.host}/library/nope")
    with pytest.raises(boxlite.ImageNotFoundError, match="alpine:no-such-tag"):
        await rt.images.pull(f"{registry.host}/library/alpine:no-such-tag")
    with pytest.raises(boxlite.ImageNotFoundError, match="nope") as missing_box:
        await rt.create(boxlite.BoxOptions(image=f"{registry.host}/library/nope"))
    assert "nope" in str(missing_box.value)

    # Pinned by digest: fetched by digest and stored under the pinned name.
    digest = manifest_digest(images / "alpine", "latest")
    pinned = await rt.images.pull(f"{registry.host}/library/alpine@{digest}")
    assert (pinned.reference, pinned.digest, pinned.tag) == (f"{registry.host}/library/alpine@{digest}", digest, None)
    with pytest.raises(boxlite.ImageNotFoundError):
        await rt.images.pull(f"{registry.host}/library/alpine@sha256:{'0' * 64}")

    # An index with this platform: its manifest is picked; one without: the error lists them.
    info = await rt.images.pull(f"{registry.host}/boxlite/multiarch")
    assert info.digest == manifest_digest(images / "alpine", "latest")
    assert info.index_digest == manifest_digest(images / "multiarch", "latest")
    with pytest.raises(boxlite.ImageNotFoundError) as foreign:
        await rt.images.pull(f"{registry.host}/boxlite/foreign")
    message = str(foreign.value)
    assert f"no image for linux/{HOST_ARCH}" in message
    others = [a for a in ("arm64", "s390x", "ppc64le") if a != HOST_ARCH][:2]
    assert all(f"linux/{a}" in message for a in others), message


async def test_network_failure_is_a_pull_error_with_the_cause(home: Path) -> None:
    rt = make_runtime(home, image_registries=[mirror(f"127.0.0.1:{free_port()}")])
    with pytest.raises(boxlite.ImagePullError, match=r"(?i)connect"):
        await rt.images.pull("alpine:latest")


async def test_basic_and_bearer_auth(home: Path, auth_registry: Registry, registry: Registry) -> None:
    host = auth_registry.host
    good = make_runtime(
        home / "good",
        image_registries=[boxlite.ImageRegistry(host, transport="http", username="alice", password="s3cret")],
    )
    assert (await good.images.pull(f"{host}/library/alpine")).layers == 1
    for name, registries in [
        ("anonymous", [boxlite.ImageRegistry(host, transport="http")]),
        ("wrong password", [boxlite.ImageRegistry(host, transport="http", username="alice", password="nope")]),
    ]:
        rt = make_runtime(home / name.replace(" ", "-"), image_registries=registries)
        with pytest.raises(boxlite.RegistryUnauthorizedError, match=host) as refused:
            await rt.images.pull(f"{host}/library/alpine")
        assert isinstance(refused.value, PermissionError)
        assert rt.images is not None and await rt.images.list() == []

    # The WWW-Authenticate Bearer challenge: credentials are exchanged for a token.
    proxy = Proxy(registry.host).start()
    proxy.bearer = ("bob", "hunter2")
    try:
        token_rt = make_runtime(
            home / "token",
            image_registries=[boxlite.ImageRegistry(proxy.host, transport="http", username="bob", password="hunter2")],
        )
        assert (await token_rt.images.pull(f"{proxy.host}/library/alpine")).layers == 1
        assert any(r.startswith("GET /token") for r in proxy.requests)
        static = make_runtime(
            home / "static",
            image_registries=[boxlite.ImageRegistry(proxy.host, transport="http", bearer_token=proxy.token)],
        )
        assert (await static.images.pull(f"{proxy.host}/library/alpine")).layers == 1
        refused_rt = make_runtime(
            home / "refused",
            image_registries=[boxlite.ImageRegistry(proxy.host, transport="http", username="bob", password="wrong")],
        )
        with pytest.raises(boxlite.RegistryUnauthorizedError, match=proxy.host):
            await refused_rt.images.pull(f"{proxy.host}/library/alpine")
    finally:
        proxy.stop()


async def test_a_corrupted_blob_is_rejected_and_nothing_is_committed(home: Path, proxy: Proxy, images: Path) -> None:
    rt = make_runtime(home, image_registries=[mirror(proxy.host)])
    blobs = layout_blobs(images / "python", "slim")
    victim = max(blobs, key=lambda d: blobs[d])
    proxy.corrupt.add(victim)
    with pytest.raises(boxlite.ImagePullError, match=victim):
        await rt.images.pull("python:slim")
    assert victim not in store_blobs(home)
    assert await rt.images.list() == []
    assert ingest_files(home) == [], "no partial download may stay behind"
    with pytest.raises(boxlite.ImagePullError, match=victim):
        await rt.create(boxlite.BoxOptions(image="python:slim"))
    assert list((home / "boxes").iterdir()) == []
    # The registry serves the real bytes again: the pull completes.
    proxy.corrupt.clear()
    info = await rt.images.pull("python:slim")
    assert set(blobs) <= store_blobs(home)
    assert info.digest == manifest_digest(images / "python", "slim")


async def test_progress_reports_every_layer_to_the_end(home: Path, registry: Registry, images: Path) -> None:
    rt = make_runtime(home, image_registries=[mirror(registry.host)])
    events: list[boxlite.PullProgress] = []
    threads: set[int] = set()

    def on_progress(p: boxlite.PullProgress) -> None:
        events.append(p)
        threads.add(threading.get_ident())

    info = await rt.images.pull("python:slim", progress=on_progress)
    layer_sizes = {d: s for d, s in layout_blobs(images / "python", "slim").items()}
    by_layer: dict[str, list[boxlite.PullProgress]] = {}
    for event in events:
        by_layer.setdefault(event.layer, []).append(event)
    assert len(by_layer) == info.layers == 3
    for layer, seen in by_layer.items():
        assert seen[0].done == 0 and seen[-1].done == seen[-1].total == layer_sizes[layer]
        assert [e.done for e in seen] == sorted(e.done for e in seen)
        assert {e.layers for e in seen} == {3}
    # Delivered on the event loop's thread, before pull() returned.
    assert threads == {threading.get_ident()}
    # A second pull finds every layer present and reports each as done at once.
    events.clear()
    await rt.images.pull("python:slim", progress=on_progress)
    finals = [e for e in events if e.done == e.total]
    assert len(finals) == 3


async def test_concurrent_pulls_in_one_process_download_each_blob_once(home: Path, proxy: Proxy, images: Path) -> None:
    proxy.delay = 0.01
    rt = make_runtime(home, image_registries=[mirror(proxy.host)])
    a, b = await asyncio.gather(rt.images.pull("python:slim"), rt.images.pull("python:slim"))
    assert a.digest == b.digest == manifest_digest(images / "python", "slim")
    downloads = proxy.blob_downloads()
    assert downloads == {d: 1 for d in layout_blobs(images / "python", "slim")}, downloads


async def test_concurrent_pulls_in_two_processes_download_each_blob_once(
    home: Path, proxy: Proxy, images: Path
) -> None:
    proxy.delay = 0.02
    script = (
        "import asyncio, boxlite, sys\n"
        "reg = boxlite.ImageRegistry(sys.argv[2], transport='http', search=True)\n"
        "rt = boxlite.Boxlite(boxlite.Options(home_dir=sys.argv[1], image_registries=[reg]))\n"
        "print(asyncio.run(rt.images.pull('python:slim')).digest)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(home), proxy.host], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [manifest_digest(images / "python", "slim")] * 2
    downloads = proxy.blob_downloads()
    assert downloads == {d: 1 for d in layout_blobs(images / "python", "slim")}, downloads
    assert ingest_files(home) == []


# ---------------------------------------------------------------------------------------------
# Boxes from pulled images


DUMP = r"""
import hashlib, json, os, stat, sys

root = sys.argv[1]
skip = set(sys.argv[2:])
out = {}
inodes = {}
for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    dirnames[:] = sorted(d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)) not in skip)
    for name in sorted(dirnames + filenames):
        full = os.path.join(dirpath, name)
        rel = os.path.normpath(os.path.join(rel_dir, name))
        if rel in skip:
            continue
        st = os.lstat(full)
        entry = {"mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid,
                 "type": stat.S_IFMT(st.st_mode)}
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                entry["sha256"] = hashlib.sha256(f.read()).hexdigest()
            if st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(full)
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError:
            names = []
        entry["xattrs"] = {n: os.getxattr(full, n, follow_symlinks=False).hex()
                           for n in sorted(names) if n.startswith("user.")}
        out[rel] = entry
for paths in inodes.values():
    for p in paths:
        out[p]["links"] = sorted(paths)
json.dump(out, sys.stdout, sort_keys=True)
"""


def umoci_tree(layout: Path, tag: str, tmp: Path) -> dict[str, dict[str, object]]:
    bundle = tmp / "bundle"
    umoci_unpack(layout, tag, bundle)
    script = tmp / "dump.py"
    script.write_text(DUMP)
    out = subprocess.run(
        [sys.executable, "-B", str(script), str(bundle / "rootfs"), *NOT_IMAGE],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out))


# Not part of the image: the box root's mount points and the dump script itself.
# What is not the image's: pseudo filesystems, the dump script, and the files the runtime writes
# at every boot, as Docker does (the box's hostname and name resolution).
NOT_IMAGE = ["proc", "sys", "dev", "run/dump.py", "etc/hostname", "etc/hosts", "etc/resolv.conf"]


async def test_a_multilayer_image_in_a_box_equals_umoci_unpack(
    home: Path, registry: Registry, images: Path, tmp_path: Path
) -> None:
    assert os.geteuid() == 0, "umoci unpack keeps file owners only when run as root"
    expected = umoci_tree(images / "layers", "latest", tmp_path)
    # Spot checks that the image really exercises the hard cases.
    data = {k.removeprefix("data/"): v for k, v in expected.items() if k.startswith("data/")}
    assert "gone.txt" not in data and "gone-dir" not in data and "dir/old1" not in data and "dir/new" in data
    assert data["hard3"]["links"] == ["data/hard1", "data/hard2", "data/hard3"]
    assert data["suid"]["mode"] == "0o4755" and data["owned"]["uid"] == 1234
    assert data["xattr"]["xattrs"] == {"user.boxlite": b"hello".hex()}

    rt = make_runtime(home, image_registries=[mirror(registry.host)])
    try:
        box = await rt.create(boxlite.BoxOptions(image=f"{registry.host}/boxlite/layers", memory_mib=256))
        assert box.info().image == f"{registry.host}/boxlite/layers:latest"
        # The image config: WorkingDir, User, Env; the box's env adds to it.
        probe = await run(
            box, "python3", "-B", "-c", "import os; print(os.getcwd(), os.getuid(), os.environ['LAYERS_TEST'])"
        )
        assert probe.stdout.split() == ["/data", "1000", "from-image"], probe
        await box.write_file("/run/dump.py", DUMP)
        dumped = await run(box, "python3", "-B", "/run/dump.py", "/", *NOT_IMAGE, user="root")
        assert dumped.exit_code == 0, dumped.stderr
        actual = json.loads(dumped.stdout)
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        differ = {k: (expected[k], actual[k]) for k in set(expected) & set(actual) if expected[k] != actual[k]}
        assert (missing, extra, differ) == ([], [], {})
        metrics = await box.metrics()
        assert metrics.stage_image_prepare_ms is not None
        await box.stop()
    finally:
        await rt.close()


async def test_codebox_runs_on_the_python_slim_stand_in(home: Path, registry: Registry) -> None:
    rt = make_runtime(home, image_registries=[mirror(registry.host)])
    try:
        async with boxlite.CodeBox(runtime=rt, memory_mib=256) as codebox:
            assert (await codebox.run("import json; print(json.dumps({'answer': 6 * 7}))")).strip() == '{"answer": 42}'
    finally:
        await rt.close()


async def test_offline_recreate_from_the_cache(home: Path, tmp_path: Path, images: Path) -> None:
    reg = Registry(tmp_path / "registry").start()
    try:
        reg.push(images / "alpine", "latest", "library/alpine")
        rt = make_runtime(home, image_registries=[mirror(reg.host)])
        first = await rt.create(boxlite.BoxOptions(image="alpine", memory_mib=256))
        pulled = (await first.metrics()).stage_image_prepare_ms
        assert (await run(first, "echo", "online")).stdout == "online\n"
        await first.stop()
    finally:
        reg.stop()
    # The registry is gone: a pull fails, a box from the cached image does not.
    with pytest.raises(boxlite.ImagePullError, match=r"(?i)connect"):
        await rt.images.pull("alpine")
    second = await rt.create(boxlite.BoxOptions(image="alpine", memory_mib=256))
    try:
        assert (await run(second, "echo", "offline")).stdout == "offline\n"
        cached = (await second.metrics()).stage_image_prepare_ms
        assert cached is not None and pulled is not None
        # A fresh runtime on the same home (another process would do the same) works too.
        again = make_runtime(home, image_registries=[mirror(reg.host)])
        assert (await again.images.get("alpine")).reference == f"{reg.host}/library/alpine:latest"
    finally:
        await second.stop()
        await rt.close()


async def test_remove_is_refused_while_a_box_uses_the_image_and_gc_collects_the_rest(
    home: Path, registry: Registry, images: Path, image_layout: Path, tmp_path: Path
) -> None:
    # A layout image of its own (the busybox layout is byte-identical to the alpine stand-in).
    own_layout = tmp_path / "own-layout"
    with_config(image_layout, own_layout, {"Env": ["PATH=/bin", "OWN=1"]})
    rt = make_runtime(home, image_registries=[mirror(registry.host)])
    alpine_blobs = set(layout_blobs(images / "alpine", "latest"))
    python_blobs = set(layout_blobs(images / "python", "slim"))
    try:
        await rt.images.pull("python:slim")
        box = await rt.create(boxlite.BoxOptions(image="alpine", memory_mib=256, auto_remove=False))
        layout_box = await rt.create(boxlite.BoxOptions(rootfs_path=own_layout, memory_mib=256, auto_remove=False))
        assert len(base_disks(home)) >= 1
        with pytest.raises(boxlite.InvalidStateError, match=box.id):
            await rt.images.remove("alpine")
        await box.stop()
        with pytest.raises(boxlite.InvalidStateError, match="remove the box first"):
            await rt.images.remove("alpine")

        # Garbage: a stray blob and an abandoned download; referenced content stays.
        blobs_dir = home / "images" / "store" / "blobs" / "sha256"
        (blobs_dir / ("0" * 64)).write_bytes(b"stray")
        (home / "images" / "ingest" / f"sha256-{'1' * 64}.x.partial").write_bytes(b"half")
        disks_before = base_disks(home)
        report = await rt.images.gc()
        assert report.blobs_removed == 1 and report.disks_removed == 0
        assert alpine_blobs | python_blobs <= store_blobs(home)
        assert ingest_files(home) == [] and base_disks(home) == disks_before

        # Once the box is gone the image can go, with its blobs and its base disk.
        await rt.remove(box.id, force=True)
        await rt.images.remove("alpine")
        assert not (alpine_blobs & store_blobs(home))
        assert python_blobs <= store_blobs(home)
        assert [i.reference for i in await rt.images.list()] == [f"{registry.host}/library/python:slim"]
        with pytest.raises(boxlite.ImageNotFoundError):
            await rt.images.remove("alpine")
        # The layout box keeps its base disk; after it is removed, gc takes that too.
        assert len(base_disks(home)) == 1
        await rt.remove(layout_box.id, force=True)
        assert (await rt.images.gc()).disks_removed == 1
        assert base_disks(home) == set()
        await rt.images.remove("python:slim")
        assert store_blobs(home) == set()
    finally:
        await rt.close()
