"""Tar archives to and from a remote box.

What the server sends is untrusted, so it is read here by hand rather than with ``tarfile``
(Python 3.11.2 has no extraction filters, and ``tarfile`` reads extended headers of any size
into memory): every header is checked before anything is written, only below a fresh staging
directory, only names made of plain components under the one expected top-level name, only
regular files, directories, symlinks that stay inside the copied tree and hard links to files
of the same archive; modes lose setuid/setgid/sticky; file content counts against a byte budget
checked at each header; runs of zeros become holes, so a sparse file stays sparse. Parent
directories must be real directories (never symlinks) and files are opened with
``O_NOFOLLOW``, so nothing is ever written through a link.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import GuestProtocolError, InvalidArgumentError

BLOCK = 512
#: Bytes an extended header (a long name, a pax record set) may have at most.
META_LIMIT = 64 * 1024
#: Runs of zeros this long (and aligned) are left as holes.
HOLE_BLOCK = 4096
#: Characters of a name quoted in messages at most.
SHOWN = 200


def bounded(text: str, limit: int = SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def quoted(text: str) -> str:
    """``text`` in double quotes, as the core quotes names in its messages."""
    return '"' + bounded(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


class RefusedEntry(GuestProtocolError):
    """An archive entry that breaks the rules above."""

    def __init__(self, why: str) -> None:
        super().__init__(f"guest protocol error: refused an entry from the box: {bounded(why, 1000)}")


class _Input:
    """Exact reads over an iterator of byte chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = b""
        self._at = 0

    def _fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf = self._buf[self._at :] + bytes(chunk)
                self._at = 0
                return True
        return False

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one), or ``b""`` at the end of the input."""
        if self._at >= len(self._buf) and not self._fill():
            return b""
        piece = self._buf[self._at : self._at + limit]
        self._at += len(piece)
        return piece

    def read_exact(self, size: int, what: str) -> bytes:
        parts = []
        left = size
        while left:
            piece = self.read_some(left)
            if not piece:
                raise RefusedEntry(f"the archive ends inside {what}")
            parts.append(piece)
            left -= len(piece)
        return b"".join(parts)

    def skip(self, size: int, what: str) -> None:
        while size:
            piece = self.read_some(min(size, 1 << 20))
            if not piece:
                raise RefusedEntry(f"the archive ends inside {what}")
            size -= len(piece)


def _number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise RefusedEntry(f"a negative {what} in a header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise RefusedEntry(f"a header with a bad {what} field") from None


def _text(field: bytes) -> str:
    return os.fsdecode(field.split(b"\0", 1)[0])


@dataclass
class Entry:
    name: str
    kind: bytes
    size: int
    mode: int
    mtime: int
    linkname: str


def _checksum_ok(block: bytes) -> bool:
    want = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b & 0x80)
    return want in (unsigned, signed)


def _pax_records(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    at = 0
    while at < len(data):
        if data[at] == 0:
            break
        space = data.find(b" ", at)
        if space < 0:
            raise RefusedEntry("a malformed pax header")
        try:
            length = int(data[at:space])
        except ValueError:
            raise RefusedEntry("a malformed pax header") from None
        record = data[space + 1 : at + length]
        if length <= 0 or at + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise RefusedEntry("a malformed pax header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = os.fsdecode(value)
        at += length
    return records


def entries(source: _Input) -> Iterator[Entry]:
    """The entries of a tar stream; the caller reads or skips each entry's content (``size``
    bytes, then padding) before asking for the next."""
    long_name: str | None = None
    long_link: str | None = None
    pax: dict[str, str] = {}
    while True:
        block = source.read_some(BLOCK)
        if not block:
            raise RefusedEntry("the archive has no end marker")
        if len(block) < BLOCK:
            block += source.read_exact(BLOCK - len(block), "a header")
        if block == bytes(BLOCK):
            return
        if not _checksum_ok(block):
            raise RefusedEntry("a header with a wrong checksum")
        kind = block[156:157]
        size = _number(block[124:136], "size")
        if kind in (b"L", b"K", b"x", b"g"):
            if size > META_LIMIT:
                raise RefusedEntry(f"an extended header of {size} bytes (at most {META_LIMIT})")
            data = source.read_exact(size, "an extended header")
            source.skip(-size % BLOCK, "an extended header")
            if kind == b"L":
                long_name = _text(data)
            elif kind == b"K":
                long_link = _text(data)
            elif kind == b"x":
                pax.update(_pax_records(data))
            continue  # a global pax header ("g") changes nothing we use
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:
            name = _text(block[345:500]) + "/" + name
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise RefusedEntry("a pax header with a bad size")
        entry = Entry(
            name=pax.get("path", long_name if long_name is not None else name),
            kind=kind,
            size=size,
            mode=_number(block[100:108], "mode"),
            mtime=_number(block[136:148], "mtime"),
            linkname=pax.get("linkpath", long_link if long_link is not None else _text(block[157:257])),
        )
        long_name = long_link = None
        pax = {}
        yield entry


def plain_parts(name: str) -> list[str] | None:
    """The components of a relative name made only of plain names (a trailing ``/`` allowed),
    else ``None``."""
    if not name or name.startswith("/") or "\0" in name:
        return None
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def _symlink_stays_inside(parts: list[str], target: str) -> bool:
    """Whether a link at ``parts`` pointing to ``target`` resolves inside the tree of
    ``parts[0]``. Only leading ``..`` are allowed, so they climb real directories (the link's
    own), and every link is held to the same rule, so following several stays inside too."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    steps = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(steps) and steps[ups] == "..":
        ups += 1
    if ".." in steps[ups:]:
        return False
    return ups <= len(parts) - 2  # parts[:-1] are the link's directories, the first is the top


FILE_KINDS = (b"0", b"\0", b"7")


class _Extraction:
    def __init__(self, root: Path, expected: str, recursive: bool, max_bytes: int) -> None:
        self.root = root
        self.expected = expected
        self.recursive = recursive
        self.max_bytes = max_bytes
        self.written = 0
        self.files: set[str] = set()
        self.dirs: list[tuple[Path, int]] = []

    def parent_of(self, parts: list[str]) -> Path:
        """The directory an entry goes in, made of real directories (missing ones created)."""
        path = self.root
        for part in parts[:-1]:
            path = path / part
            try:
                info = path.lstat()
            except FileNotFoundError:
                path.mkdir(mode=0o755)
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise RefusedEntry(f"{'/'.join(parts)}: {quoted(str(path.relative_to(self.root)))} is not a directory")
        return path

    def clear(self, target: Path, name: str) -> None:
        """Makes room for a non-directory at ``target``: a file or link there is replaced."""
        try:
            info = target.lstat()
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            raise RefusedEntry(f"{name}: it would replace a directory")
        target.unlink()
        self.files.discard(name)

    def entry(self, entry: Entry, source: _Input) -> None:
        name = entry.name.rstrip("/") or entry.name
        parts = plain_parts(entry.name)
        if parts is None or parts[0] != self.expected:
            raise RefusedEntry(name)
        name = "/".join(parts)
        kind = entry.kind
        if kind == b"5":
            if not self.recursive:
                raise InvalidArgumentError(
                    f"invalid argument `src`: {quoted(self.expected)} is a directory; copy it with recursive=True"
                )
            self.directory(parts, entry)
        elif kind in FILE_KINDS:
            self.written += entry.size
            if self.written > self.max_bytes:
                raise InvalidArgumentError(
                    f"invalid argument `max_bytes`: {quoted(self.expected)} holds more than copy_out's limit of "
                    f"{self.max_bytes} bytes of files ({bounded(name)} is {entry.size} bytes); pass a larger max_bytes"
                )
            self.file(parts, name, entry, source)
            source.skip(-entry.size % BLOCK, name)
            return
        elif kind == b"2":
            if not _symlink_stays_inside(parts, entry.linkname):
                raise RefusedEntry(f"symlink {name} -> {bounded(entry.linkname)} points outside the copied tree")
            target = self.parent_of(parts) / parts[-1]
            self.clear(target, name)
            os.symlink(entry.linkname, target)
        elif kind == b"1":
            self.hard_link(parts, name, entry.linkname)
        elif kind == b"S":
            raise RefusedEntry(f"{name}: sparse entries are not supported")
        # Devices, FIFOs and other kinds make no sense on the host: skipped, as locally.
        source.skip(entry.size + (-entry.size % BLOCK), name)

    def directory(self, parts: list[str], entry: Entry) -> None:
        path = self.parent_of(parts) / parts[-1]
        try:
            info = path.lstat()
        except FileNotFoundError:
            path.mkdir(mode=0o700)
            self.dirs.append((path, entry.mode))
            return
        if not stat.S_ISDIR(info.st_mode):
            raise RefusedEntry(f"{'/'.join(parts)}: a directory would replace a file or link")
        self.dirs.append((path, entry.mode))

    def file(self, parts: list[str], name: str, entry: Entry, source: _Input) -> None:
        target = self.parent_of(parts) / parts[-1]
        self.clear(target, name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        try:
            _write_sparse(fd, source, entry.size, name)
            os.ftruncate(fd, entry.size)
            os.fchmod(fd, entry.mode & 0o777)
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(fd, (entry.mtime, entry.mtime))  # a time the host cannot hold is not kept
        finally:
            os.close(fd)
        self.files.add(name)

    def hard_link(self, parts: list[str], name: str, link: str) -> None:
        link_parts = plain_parts(link)
        if link_parts is None or "/".join(link_parts) not in self.files:
            raise RefusedEntry(f"hard link {name} -> {bounded(link)} names no file of this archive")
        source = self.parent_of(link_parts) / link_parts[-1]
        if not stat.S_ISREG(source.lstat().st_mode):
            raise RefusedEntry(f"hard link {name} -> {bounded(link)} names no file of this archive")
        target = self.parent_of(parts) / parts[-1]
        self.clear(target, name)
        os.link(source, target, follow_symlinks=False)
        self.files.add(name)

    def finish(self) -> None:
        # Modes of directories last, so a read-only one could still be filled; the owner keeps
        # full access so the copy can be moved and removed.
        for path, mode in reversed(self.dirs):
            os.chmod(path, (mode & 0o777) | 0o700, follow_symlinks=False)


def _write_sparse(fd: int, source: _Input, size: int, name: str) -> None:
    offset = 0
    while offset < size:
        data = source.read_some(min(size - offset, 16 * HOLE_BLOCK))
        if not data:
            raise RefusedEntry(f"{name}: the content ends after {offset} of {size} bytes")
        at = 0
        while at < len(data):
            end = min(at + HOLE_BLOCK, len(data))
            if data[at:end].count(0) == end - at:
                at = end
                continue
            stop = end
            while stop < len(data):
                following = min(stop + HOLE_BLOCK, len(data))
                if data[stop:following].count(0) == following - stop:
                    break
                stop = following
            os.pwrite(fd, data[at:stop], offset + at)
            at = stop
        offset += len(data)


def extract_untrusted(
    chunks: Iterable[bytes], root: Path, expected: str, *, recursive: bool = True, max_bytes: int
) -> None:
    """Extracts a tar of ``expected`` (and, for a directory, what is under it) below the
    directory ``root``, under the rules of this module; raises ``GuestProtocolError`` for an
    entry that breaks them, ``InvalidArgumentError`` for a directory without ``recursive`` or
    more than ``max_bytes`` of file content."""
    source = _Input(chunks)
    extraction = _Extraction(root, expected, recursive, max_bytes)
    for entry in entries(source):
        extraction.entry(entry, source)
    extraction.finish()
    if not os.path.lexists(root / expected):
        raise GuestProtocolError(f"guest protocol error: the box sent no {quoted(expected)}")


def first_kind(chunks: Iterable[bytes]) -> str:
    """What the first entry of a tar stream is: ``"directory"``, ``"file"``, ``"symlink"`` or
    ``"other"`` (also for an empty or unreadable stream)."""
    try:
        for entry in entries(_Input(chunks)):
            if entry.kind == b"5":
                return "directory"
            if entry.kind == b"2":
                return "symlink"
            return "file" if entry.kind in (*FILE_KINDS, b"1") else "other"
    except GuestProtocolError:
        pass
    return "other"


def write_archive(out: BinaryIO, source: Path, name: str, *, follow_symlinks: bool) -> None:
    """Writes a tar of the host file or directory ``source`` to ``out``, named ``name`` in it
    (what is below a directory follows under ``name/``)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, dereference=follow_symlinks) as tar:
        tar.add(source, arcname=name, recursive=True)


__all__ = ["RefusedEntry", "extract_untrusted", "first_kind", "plain_parts", "write_archive"]
