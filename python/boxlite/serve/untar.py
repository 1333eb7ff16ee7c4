"""Unpacking an untrusted tar archive into a fresh private directory.

Every member is checked before anything is written: a relative name without ``..``, only
regular files, directories and symlinks whose target stays inside, no member below a symlink
of the archive, a bounded number of members. Then the members are written by hand (never with
``tarfile.extract``): files with ``O_EXCL | O_NOFOLLOW``, symlinks last, modes without set-id
bits (the owner keeps read access, which the copy into the box needs). Any refusal is an
``InvalidArgumentError`` naming the member."""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path
from typing import IO

from ..errors import InvalidArgumentError

_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink"}
_REFUSED = {
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


#: Bytes of one long name or pax header at most (``tarfile`` holds them in memory whole).
HEADER_LIMIT = 64 * 1024
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)


class _BoundedInfo(tarfile.TarInfo):
    """A member whose extended header is refused at its header when too large to be a name."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > HEADER_LIMIT:
            raise InvalidArgumentError(
                f"refused the tar archive: an extended header of {self.size} bytes (at most {HEADER_LIMIT}); "
                "nothing was written"
            )
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member


def _refuse(member: tarfile.TarInfo, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"refused the tar archive: member {member.name[:200]!r} {why}; nothing was written")


def _clean_name(member: tarfile.TarInfo) -> str:
    """The member's path relative to the root ("" for the root itself)."""
    name = member.name
    if "\x00" in name or len(name) > 4096:
        raise _refuse(member, "has an invalid name")
    if name.startswith("/"):
        raise _refuse(member, "has an absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(member, "has '..' in its name")
    return "/".join(parts)


def check(tar: tarfile.TarFile, max_members: int) -> list[tuple[str, tarfile.TarInfo]]:
    """Every member with its clean name, after checking them all."""
    members: list[tuple[str, tarfile.TarInfo]] = []
    kinds: dict[str, str] = {}
    for member in tar:
        if len(members) >= max_members:
            raise InvalidArgumentError(f"refused the tar archive: more than {max_members} members")
        name = _clean_name(member)
        kind = _KINDS.get(member.type)
        if kind is None:
            raise _refuse(member, "is " + _REFUSED.get(member.type, f"of an unsupported type {member.type!r}"))
        if not name:
            if kind != "dir":
                raise _refuse(member, "names the root but is not a directory")
            continue
        parents = name.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            above = kinds.get("/".join(parents[:depth]))
            if above == "symlink":
                raise _refuse(member, "lies below a symlink of the archive")
            if above == "file":
                raise _refuse(member, "lies below a regular file of the archive")
        if name in kinds and not (kind == "dir" and kinds[name] == "dir"):
            raise _refuse(member, "appears twice")
        if kind == "symlink":
            target = member.linkname
            if not target or "\x00" in target or len(target) > 4096 or target.startswith("/"):
                raise _refuse(member, "is a symlink with an absolute or invalid target")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if resolved == ".." or resolved.startswith("../"):
                raise _refuse(member, "is a symlink pointing outside the archive")
        kinds[name] = kind
        members.append((name, member))
    return members


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        _copy(source, out, member.size)
        os.fchmod(out.fileno(), (member.mode & 0o777) | 0o400)  # the copy into the box reads it
    os.utime(dest, (member.mtime, member.mtime), follow_symlinks=False)


def _copy(source: IO[bytes], out: IO[bytes], size: int) -> None:
    left = size
    while left > 0:
        chunk = source.read(min(left, 1 << 20))
        if not chunk:
            raise InvalidArgumentError("refused the tar archive: it ends inside a member")
        out.write(chunk)
        left -= len(chunk)


def unpack(archive: Path, root: Path, max_members: int) -> None:
    """Checks ``archive`` and writes its members under the empty directory ``root``."""
    try:
        with tarfile.open(archive, mode="r:", tarinfo=_BoundedInfo) as tar:
            members = check(tar, max_members)
            dirs: list[tuple[Path, int]] = []
            for name, member in members:
                dest = root / name
                if member.isdir():
                    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
                    dirs.append((dest, (member.mode & 0o777) | 0o700))
                elif member.isfile():
                    dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    _write_file(tar, member, dest)
            for name, member in members:  # last: nothing is ever written through them
                if member.issym():
                    (root / name).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    os.symlink(member.linkname, root / name)
            for dest, mode in reversed(dirs):  # deepest first, after their contents
                os.chmod(dest, mode)
    except tarfile.TarError as e:
        raise InvalidArgumentError(f"the body is not a valid tar archive (uncompressed): {e}") from None
    except OSError as e:
        raise InvalidArgumentError(f"refused the tar archive: {e.strerror or e}") from None
