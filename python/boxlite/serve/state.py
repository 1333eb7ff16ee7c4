"""What the routes share: the runtime, the configuration, which key owns which box, the
running executions and the server's private temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from .._runtime import Box, Boxlite
from ..errors import BoxNotFoundError, ResourceExhaustedError
from .config import ServeConfig
from .exec_registry import ExecRegistry


class Owners:
    """Box id -> the name of the key that made it, kept in ``<home>/serve/owners.json`` so a
    restarted server still knows (key names only, never keys)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        self._owner: dict[str, str] = {k: v for k, v in loaded.items() if isinstance(v, str)}

    def owner(self, box_id: str) -> str | None:
        return self._owner.get(box_id)

    def owned_by(self, key: str) -> set[str]:
        return {box for box, owner in self._owner.items() if owner == key}

    def boxes(self) -> list[str]:
        return list(self._owner)

    def set(self, box_id: str, key: str) -> None:
        self._owner[box_id] = key
        self._save()

    def drop(self, *box_ids: str) -> None:
        if any(self._owner.pop(b, None) is not None for b in list(box_ids)):
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._owner, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


class ServeState:
    def __init__(self, runtime: Boxlite, config: ServeConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.owners = Owners(runtime.home_dir / "serve" / "owners.json")
        self.execs = ExecRegistry(config)
        self.tmp_root = Path(tempfile.mkdtemp(prefix="boxlite-serve-"))
        self._creating: Counter[str] = Counter()
        self._handles: dict[str, Box] = {}  # by id: a lookup per request would cost more

    def close(self) -> None:
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    def temp_dir(self) -> Path:
        """A fresh private directory (0700) for one request's files."""
        return Path(tempfile.mkdtemp(dir=self.tmp_root))

    async def prune(self) -> set[str]:
        """Forgets owners of boxes that no longer exist (removed elsewhere, auto-removed);
        returns the ids that do exist."""
        existing = {info.id for info in await self.runtime.list_info()}
        gone = [b for b in self.owners.boxes() if b not in existing]
        self.owners.drop(*gone)
        self.forget_handles(*gone)
        return existing

    async def box(self, ref: str, key: str) -> Box:
        """The box ``ref`` (id or name) if ``key`` owns it; for anyone else it does not exist."""
        box = self._handles.get(ref) or await self.runtime.get(ref)
        if box is None or self.owners.owner(box.id) != key:
            raise BoxNotFoundError(f"no box has the id or name {ref!r}")
        self._handles[box.id] = box
        return box

    def forget_handles(self, *box_ids: str) -> None:
        """After a box was removed (its id then names nothing)."""
        for box_id in box_ids:
            self._handles.pop(box_id, None)

    async def boxes_of(self, key: str) -> int:
        return len(self.owners.owned_by(key) & await self.prune()) + self._creating[key]

    async def reserve_box(self, key: str) -> None:
        """Counts a create in flight against the key's limit (``release_box`` when done)."""
        limit = self.config.max_boxes_per_key
        if await self.boxes_of(key) >= limit:
            raise ResourceExhaustedError(
                f"this key has {limit} boxes, the most this server allows (--max-boxes-per-key); remove one first"
            )
        self._creating[key] += 1

    def release_box(self, key: str) -> None:
        self._creating[key] -= 1
