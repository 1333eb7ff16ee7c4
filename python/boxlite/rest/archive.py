"""Tar archives sent to a remote box, and how names are quoted in messages.

What comes back from a server is untrusted and is read by the core
(``_native._extract_untrusted``, the reader of a local ``copy_out``), never here."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import BinaryIO

#: Characters of a name quoted in messages at most.
SHOWN = 200


def bounded(text: str, limit: int = SHOWN) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def quoted(text: str) -> str:
    """``text`` in double quotes, as the core quotes names in its messages."""
    return '"' + bounded(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_archive(out: BinaryIO, source: Path, name: str, *, follow_symlinks: bool) -> None:
    """Writes a tar of the host file or directory ``source`` to ``out``, named ``name`` in it
    (what is below a directory follows under ``name/``)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, dereference=follow_symlinks) as tar:
        tar.add(source, arcname=name, recursive=True)


__all__ = ["bounded", "quoted", "write_archive"]
