"""Image stand-ins for the tests and the benchmarks, built from Debian packages.

`build_all(root)` writes, into ``root/<key>/`` where ``<key>`` hashes this builder and the
layout writer (so images are built once per machine and again only when these change):

  alpine/     tag latest: the busybox image (the one `make image` makes), the alpine stand-in
  python/     tag slim:   a python:slim stand-in: a merged-/usr Debian in three layers (base
              libraries, dash, bash and a static busybox; the python3.11 interpreter; the
              standard library with pip, setuptools and wheel)
  node/       tag slim:   a node:slim stand-in: the same base layer, then Debian 12's Node.js 18
              in two layers (the C++ runtime, ICU, libuv and the other libraries node links
              against; node itself with the JavaScript modules Debian keeps apart from it)
  layers/     tag latest: python/ plus two layers with a whiteout, a directory whiteout, an
              opaque directory, hard links (also across layers), symlinks, setuid/setgid/sticky
              modes, files owned by uid 1234, a user.* xattr, a FIFO, and an image config
              with Env/WorkingDir/User/Entrypoint/Cmd/ExposedPorts/Labels
  multiarch/  tag latest: an image index with the alpine manifest for this host and tiny
              images for two other platforms
  foreign/    tag latest: an image index with only other platforms

Debian packages are fetched with `apt-get download` into ``root/debs`` (Debian's archive is a
registry we may use) and read with `dpkg-deb --fsys-tarfile`; they are signed packages, not
untrusted layers. The busybox is the host's static one (Debian's busybox-static).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from testkit import oci
from testkit.oci import PATH_ENV, Descriptor, Layer, Layout

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / "build" / "test-images"
BUSYBOX = Path("/bin/busybox")
# The sources whose content decides the images (the cache key).
SOURCES = (Path(__file__).resolve(), Path(oci.__file__).resolve())

OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# ELF e_machine -> OCI architecture.
ELF_ARCH = {62: "amd64", 183: "arm64"}

# Users of both stand-ins: app (1000) is also in the supplementary group extra (2000).
PASSWD = """\
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
"""
GROUP = """\
root:x:0:
app:x:1000:app
extra:x:2000:app
nogroup:x:65534:
"""


# The directories both stand-ins have, by mode.
ROOT_DIRS = {
    0o755: ("dev", "etc", "home", "usr", "usr/bin", "usr/sbin"),
    0o555: ("proc", "sys"),
    0o700: ("root",),
    0o1777: ("tmp",),
}


def skeleton(layer: Layer, dirs: Iterable[str] = ()) -> None:
    """The root both stand-ins share: the usual directories and `dirs` (mode 755, 1777 for a
    tmp), the users and groups above, and app's home."""
    for mode, names in ROOT_DIRS.items():
        for name in names:
            layer.add(name, tarfile.DIRTYPE, mode)
    for name in dirs:
        layer.add(name, tarfile.DIRTYPE, 0o1777 if name.endswith("tmp") else 0o755)
    layer.add("home/app", tarfile.DIRTYPE, 0o755, uid=1000, gid=1000)
    layer.add("etc/passwd", data=PASSWD.encode())
    layer.add("etc/group", data=GROUP.encode())


def host_arch() -> str:
    return OCI_ARCH.get(platform.machine(), platform.machine())


# ------------------------------------------------------------------------------- busybox


def elf_arch(data: bytes) -> str:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit("testkit: the busybox binary is not a 64-bit ELF file")
    machine = int.from_bytes(data[18:20], "little")
    if machine not in ELF_ARCH:
        raise SystemExit(f"testkit: unsupported ELF machine {machine}")
    return ELF_ARCH[machine]


def busybox_applets(busybox: Path) -> list[str]:
    """The applets' paths (bin/ls, usr/bin/wc, ...) in the usual bin directories: not
    /linuxrc (an initrd-only applet) nor bin/busybox itself, which stays the real binary."""
    out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True).stdout
    paths = {p for p in out.split() if p.split("/", 1)[0] in ("bin", "sbin", "usr") and p != "bin/busybox"}
    if "bin/sh" not in paths:
        raise SystemExit("testkit: this busybox has no sh applet")
    return sorted(paths)


def add_busybox(layer: Layer, busybox: Path, place: Callable[[str], str] = str) -> None:
    """The static busybox at ``place("bin/busybox")`` and a symlink to it for every applet
    (at ``place(path)``) whose path the layer does not hold yet."""
    home = place("bin/busybox")
    layer.add(home, mode=0o755, data=busybox.read_bytes())
    for applet in busybox_applets(busybox):
        name = place(applet)
        if name not in layer.names:
            layer.add(name, tarfile.SYMTYPE, 0o777, link=f"/{home}")


def busybox_image(layout: Layout, busybox: Path = BUSYBOX) -> Descriptor:
    """Writes the busybox image into `layout` (untagged); returns its manifest descriptor.

    One layer: the root skeleton with /bin and /sbin, the static busybox at /bin/busybox and a
    symlink to it for every applet."""
    arch = elf_arch(busybox.read_bytes())
    layer = Layer()
    skeleton(layer, ("bin", "sbin"))
    add_busybox(layer, busybox)
    dirs = {info.name for info, _ in layer.entries if info.isdir()}
    missing = {name.rsplit("/", 1)[0] for name in layer.names if "/" in name} - dirs
    if missing:
        raise SystemExit(f"testkit: busybox applets in directories the image lacks: {sorted(missing)}")
    config = {"Env": [PATH_ENV], "Cmd": ["sh"], "WorkingDir": "/"}
    return layout.image(arch, [layer.finish()], config, "testkit/images.py busybox")


def busybox_layout(out: Path, tag: str = "latest", busybox: Path = BUSYBOX) -> str:
    """The busybox image tagged `tag` in the layout `out` (its other tags are kept); returns
    the manifest digest."""
    layout = Layout(out)
    desc = busybox_image(layout, busybox)
    layout.tag(desc, tag)
    layout.close()
    return str(desc["digest"])


# ------------------------------------------------------------------------ Debian packages


# The python:slim stand-in, layer by layer.
BASE_PACKAGES = [
    "libc6",
    "libgcc-s1",
    "gcc-12-base",
    "zlib1g",
    "libexpat1",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libcrypt1",
    "libuuid1",
    "libsqlite3-0",
    "libtinfo6",
    "libncursesw6",
    "libreadline8",
    "dash",
    "bash",  # python:slim and node:slim have it (and the interpreter's bash language needs it)
    "libc-bin",  # getent and ldconfig, as in python:slim
]
PYTHON_PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "python3-minimal"]
STDLIB_PACKAGES = [
    "libpython3.11-stdlib",
    "media-types",
    "python3-distutils",
    "python3-lib2to3",
    "python3-pip",
    "python3-setuptools",
    "python3-pkg-resources",
    "python3-wheel",
]
# Package content that a container does not need.
SKIP_PREFIXES = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/lintian/",
    "usr/share/locale/",
    "usr/lib/x86_64-linux-gnu/gconv/",
    "usr/lib/aarch64-linux-gnu/gconv/",
)
# Debian marks its interpreter as externally managed (pip refuses to install); python:slim does not.
SKIP_NAMES = ("EXTERNALLY-MANAGED",)
# merged /usr: what Debian packages ship in /bin, /lib... lives under /usr.
MERGED = ("bin", "sbin", "lib", "lib64")


def merged_usr(name: str) -> str:
    first, _, rest = name.partition("/")
    if first in MERGED:
        return f"usr/{first}/{rest}" if rest else f"usr/{first}"
    return name


def download(packages: list[str], cache: Path) -> list[Path]:
    """The .deb files of `packages` (candidate versions), fetched into `cache` once."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        names = subprocess.run(
            ["apt-get", "download", "--print-uris", *packages], check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"testkit: apt-get cannot find {packages}: {e.stderr.strip()} (run `apt-get update`?)") from e
    files = [line.split()[1] for line in names.splitlines() if line.startswith("'")]
    if len(files) != len(packages):
        raise SystemExit(f"testkit: expected {len(packages)} packages from apt-get, got {files}")
    if any(not (cache / f).is_file() for f in files):
        subprocess.run(["apt-get", "download", "-q", *packages], check=True, cwd=cache, capture_output=True)
    return [cache / f for f in files]


def add_debs(layer: Layer, debs: Iterable[Path], seen_dirs: set[str]) -> None:
    """Adds the files of `debs` (merged /usr, docs skipped, each directory in one layer only)."""
    for deb in debs:
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                name = merged_usr(member.name.removeprefix("./").rstrip("/"))
                if not name or name.startswith(SKIP_PREFIXES) or name + "/" in SKIP_PREFIXES:
                    continue
                if name.rsplit("/", 1)[-1] in SKIP_NAMES:
                    continue
                if member.isdir():
                    if name in seen_dirs or name in MERGED:
                        continue
                    seen_dirs.add(name)
                elif name in layer.names:
                    continue
                member.name = name
                if member.islnk():
                    member.linkname = merged_usr(member.linkname.removeprefix("./"))
                file = tar.extractfile(member) if member.isreg() else None
                layer.add_member(member, file.read() if file is not None else None)


# ------------------------------------------------------------------------ the python image


def debian_root(layer: Layer) -> None:
    """The root skeleton of a merged-/usr Debian: what it has besides its packages."""
    skeleton(layer, ("run", "usr/lib", "usr/lib64", "usr/local", "usr/local/bin", "var", "var/tmp"))
    for name in MERGED:
        layer.add(name, tarfile.SYMTYPE, 0o777, link=f"usr/{name}")
    layer.add("etc/os-release", data=b'PRETTY_NAME="boxlite slim stand-in (Debian)"\nID=debian\n')
    layer.add("usr/bin/sh", tarfile.SYMTYPE, 0o777, link="dash")


def base_layer(debs: Path, busybox: Path = BUSYBOX) -> tuple[bytes, frozenset[str]]:
    """The base both slim stand-ins share (libraries, dash as sh, bash, busybox for the other
    tools), and the directories it holds (the layers above do not repeat them)."""
    seen: set[str] = set()
    base = Layer()
    debian_root(base)
    seen.update(base.names)
    add_debs(base, download(BASE_PACKAGES, debs), seen)
    add_busybox(base, busybox, merged_usr)
    return base.finish(), frozenset(seen)


def python_layers(debs: Path, base: tuple[bytes, frozenset[str]]) -> list[bytes]:
    """`base`, the interpreter, and the standard library with pip: python:slim's shape."""
    seen = set(base[1])
    interpreter = Layer()
    add_debs(interpreter, download(PYTHON_PACKAGES, debs), seen)
    for name in ("python", "python3"):
        interpreter.add(f"usr/local/bin/{name}", tarfile.SYMTYPE, 0o777, link="/usr/bin/python3.11")
    stdlib = Layer()
    add_debs(stdlib, download(STDLIB_PACKAGES, debs), seen)
    stdlib.add("usr/local/bin/pip", tarfile.SYMTYPE, 0o777, link="/usr/bin/pip3")
    return [base[0], interpreter.finish(), stdlib.finish()]


PYTHON_CONFIG = {
    "Env": [PATH_ENV, "LANG=C.UTF-8", "PYTHON_VERSION=3.11", "PYTHONDONTWRITEBYTECODE=1"],
    "Cmd": ["python3"],
    "WorkingDir": "/",
}
PYTHON_HISTORY = [f"testkit/images.py python: {part}" for part in ("base", "interpreter", "stdlib and pip")]


# ------------------------------------------------------------------------ the node image

# The libraries node links against (beyond the base's libc, libssl and zlib).
NODE_RUNTIME_PACKAGES = ["libstdc++6", "libicu72", "libuv1", "libc-ares2", "libbrotli1", "libnghttp2-14"]
# libnode108 loads acorn, cjs-module-lexer and undici from /usr/share/nodejs (Debian unbundles
# them): without them node aborts at startup. Debian's node also reads the CA bundle at every
# start (and warns without it). nodejs itself is pinned below.
NODE_PACKAGES = [
    "libnode108",
    "node-acorn",
    "node-xtend",
    "node-cjs-module-lexer",
    "node-undici",
    "node-busboy",
    "ca-certificates",
]
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"


def candidate_version(package: str) -> str:
    """The version apt would install of `package`."""
    out = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", package], check=True, capture_output=True, text=True
    ).stdout
    versions = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")]
    if not versions:
        raise SystemExit(f"testkit: apt-cache knows no {package} (run `apt-get update`?)")
    return versions[0]


def ca_bundle(debs: Iterable[Path]) -> bytes:
    """The PEM bundle update-ca-certificates (a postinst step, not run here) makes of the
    certificates in `debs`."""
    certs = {}
    for deb in debs:
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("./")
                file = tar.extractfile(member) if member.isreg() else None
                if file is not None and name.startswith("usr/share/ca-certificates/") and name.endswith(".crt"):
                    certs[name] = file.read()
    return b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for _, pem in sorted(certs.items()))


def node_layers(debs: Path, base: tuple[bytes, frozenset[str]]) -> list[bytes]:
    """`base`, node's libraries, and node: node:slim's shape (without npm and yarn)."""
    seen = set(base[1])
    runtime = Layer()
    add_debs(runtime, download(NODE_RUNTIME_PACKAGES, debs), seen)
    node = Layer()
    # Debian's nodejs, of libnode108's version: the host may have another nodejs (say, from
    # NodeSource) installed, whose version the archive does not have.
    node_debs = download([f"nodejs={candidate_version('libnode108')}", *NODE_PACKAGES], debs)
    add_debs(node, node_debs, seen)
    node.add(CA_BUNDLE, data=ca_bundle(node_debs))
    node.add("usr/local/bin/node", tarfile.SYMTYPE, 0o777, link="/usr/bin/node")
    return [base[0], runtime.finish(), node.finish()]


NODE_CONFIG = {
    "Env": [PATH_ENV, "LANG=C.UTF-8", "NODE_VERSION=18"],
    "Cmd": ["node"],
    "WorkingDir": "/",
}
NODE_HISTORY = [f"testkit/images.py node: {part}" for part in ("base", "libraries", "node")]


# ------------------------------------------------------------------------ the other images


def special_layers() -> list[bytes]:
    """Two layers exercising what an unpacker must get right."""
    a = Layer()
    a.add("data", tarfile.DIRTYPE, 0o755)
    a.add("data/keep.txt", data=b"version 1\n")
    a.add("data/gone.txt", data=b"deleted by the next layer\n")
    a.add("data/gone-dir", tarfile.DIRTYPE, 0o755)
    a.add("data/gone-dir/inner", data=b"inner\n")
    a.add("data/dir", tarfile.DIRTYPE, 0o750)
    a.add("data/dir/old1", data=b"hidden by the opaque marker\n")
    a.add("data/dir/old2", data=b"hidden too\n")
    a.add("data/hard1", data=b"one inode, several names\n", mode=0o640)
    a.add("data/hard2", tarfile.LNKTYPE, link="data/hard1")
    a.add("data/link", tarfile.SYMTYPE, 0o777, link="keep.txt")
    a.add("data/abslink", tarfile.SYMTYPE, 0o777, link="/data/keep.txt")
    a.add("data/dangling", tarfile.SYMTYPE, 0o777, link="/nonexistent/target")
    a.add("data/suid", data=b"#!/bin/sh\necho suid\n", mode=0o4755)
    a.add("data/sgid-dir", tarfile.DIRTYPE, 0o2775, gid=1000)
    a.add("data/sticky", tarfile.DIRTYPE, 0o1777)
    a.add("data/owned", data=b"owned by 1234\n", mode=0o640, uid=1234, gid=1234)
    a.add("data/owned-dir", tarfile.DIRTYPE, 0o750, uid=1234, gid=5678)
    a.add("data/owned-dir/file", data=b"x\n", mode=0o600, uid=1234, gid=5678)
    a.add("data/xattr", data=b"has an xattr\n", xattrs={"user.boxlite": "hello"})
    a.add("data/fifo", tarfile.FIFOTYPE, 0o644)
    a.add("data/empty", data=b"")
    a.add("data/unicode-é.txt", data="é\n".encode())
    a.add("data/big", data=bytes(range(256)) * 4096)
    a.add("home/app/.profile", data=b"# app\n", uid=1000, gid=1000)

    b = Layer()
    b.add("data/.wh.gone.txt")
    b.add("data/.wh.gone-dir")
    b.add("data/dir/.wh..wh..opq")
    b.add("data/dir/new", data=b"after the opaque marker\n")
    b.add("data/keep.txt", data=b"version 2\n", mode=0o600)
    b.add("data/hard3", tarfile.LNKTYPE, link="data/hard1")
    b.add("data/link2", tarfile.SYMTYPE, 0o777, link="dir/new")
    b.add("data/later", tarfile.DIRTYPE, 0o700, uid=1234, gid=1234)
    b.add("data/later/deep", data=b"deep\n", mode=0o444, uid=1234, gid=1234)
    return [a.finish(), b.finish()]


LAYERS_CONFIG = {
    "Env": [PATH_ENV, "LANG=C.UTF-8", "LAYERS_TEST=from-image"],
    "Entrypoint": [],
    "Cmd": ["python3"],
    "WorkingDir": "/data",
    "User": "app",
    "ExposedPorts": {"8080/tcp": {}},
    "Labels": {"org.boxlite.test": "layers"},
}


def tiny_image(layout: Layout, arch: str) -> Descriptor:
    """An image for another platform: one small layer, never run."""
    layer = Layer()
    layer.add("etc", tarfile.DIRTYPE, 0o755)
    layer.add("etc/arch", data=f"{arch}\n".encode())
    return layout.image(arch, [layer.finish()], {"Cmd": ["sh"]}, f"tiny {arch}")


def _single(root: Path, tag: str, write: Callable[[Layout], Descriptor]) -> Descriptor:
    layout = Layout(root)
    desc = write(layout)
    layout.tag(desc, tag)
    layout.close()
    return desc


def build(out: Path, debs: Path, busybox: Path = BUSYBOX) -> None:
    """Writes every stand-in into `out` (see the module's doc)."""
    arch = host_arch()
    others = [a for a in ("arm64", "s390x", "ppc64le") if a != arch][:2]
    _single(out / "alpine", "latest", lambda layout: busybox_image(layout, busybox))
    base = base_layer(debs, busybox)
    py_layers = python_layers(debs, base)
    _single(out / "python", "slim", lambda layout: layout.image(arch, py_layers, PYTHON_CONFIG, PYTHON_HISTORY))
    node = node_layers(debs, base)
    _single(out / "node", "slim", lambda layout: layout.image(arch, node, NODE_CONFIG, NODE_HISTORY))
    layers_history = [*PYTHON_HISTORY, "testkit/images.py layers: a", "testkit/images.py layers: b"]
    _single(
        out / "layers",
        "latest",
        lambda layout: layout.image(arch, py_layers + special_layers(), LAYERS_CONFIG, layers_history),
    )

    def multiarch(layout: Layout) -> Descriptor:
        # The alpine image (same blobs and digest) for this host, tiny ones for two others.
        return layout.index(
            [tiny_image(layout, others[0]), busybox_image(layout, busybox), tiny_image(layout, others[1])]
        )

    _single(out / "multiarch", "latest", multiarch)
    _single(out / "foreign", "latest", lambda layout: layout.index([tiny_image(layout, a) for a in others]))


# ------------------------------------------------------------------------ the cache


def key() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_all(root: Path = DEFAULT_ROOT) -> Path:
    """``root/<key>``, holding every stand-in: built there first unless an earlier call did.
    A file lock makes concurrent callers (parallel tests, make and cargo) build once.
    ``root/current`` links to it; images of older builders are removed."""
    root = root.resolve()
    target = root / key()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "done").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
            try:
                build(tmp, root / "debs")
                (tmp / "done").write_text("ok\n")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for old in root.iterdir():
                if old.is_dir() and not old.is_symlink() and old != target and (old / "done").is_file():
                    shutil.rmtree(old, ignore_errors=True)
        current = root / "current"
        if not current.is_symlink() or os.readlink(current) != target.name:
            link = root / ".current.tmp"
            link.unlink(missing_ok=True)
            link.symlink_to(target.name)
            os.replace(link, current)
    return target


def built_images() -> Path:
    """The stand-ins' directory: ``$BOXLITE_TEST_IMAGES`` when it holds a finished build (make
    passes it), else `build_all()`."""
    prebuilt = os.environ.get("BOXLITE_TEST_IMAGES")
    if prebuilt and (Path(prebuilt) / "done").is_file():
        return Path(prebuilt)
    return build_all()


def python_layout() -> Path:
    """The python:slim stand-in's layout (tag slim), for `rootfs_path`."""
    return built_images() / "python"


def node_layout() -> Path:
    """The node:slim stand-in's layout (tag slim), for `rootfs_path`."""
    return built_images() / "node"


def main(argv: list[str] | None = None) -> int:
    """``build_all(OUT_ROOT)``; prints the directory (the last line of stdout)."""
    args = sys.argv[1:] if argv is None else argv
    print(build_all(Path(args[0]) if args else DEFAULT_ROOT))
    return 0
