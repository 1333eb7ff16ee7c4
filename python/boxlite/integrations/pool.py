"""The boxes one server hands out: a default box made on first use and more on request, up to
a limit, all stopped together at the end. Used by ``boxlite.integrations.mcp``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._native import Options
from .._runtime import Boxlite, PathLike
from ..errors import InvalidArgumentError, InvalidStateError
from ..interpreter import CodeContext
from ..simplebox import CodeBox

__all__ = ["DEFAULT_MAX_BOXES", "BoxPool", "PoolMember"]

#: How many boxes a pool runs at most unless told otherwise (each is a VM).
DEFAULT_MAX_BOXES = 4


@dataclass
class PoolMember:
    """A box of the pool and the interpreter contexts its ``run_code`` calls named."""

    box: CodeBox
    id: str
    image: str
    is_default: bool = False
    contexts: dict[str, CodeContext] = field(default_factory=dict)


class BoxPool:
    """The boxes one server hands out: a default box made on first use, more on request.

    ``image``/``rootfs_path``, ``memory_mib``, ``cpus`` and ``box_options`` (other
    ``BoxOptions`` fields) shape every box; ``create(image=...)`` may name another. A pool
    opened on ``home`` (or the default home) owns its runtime and closes it in ``close()``;
    one given a ``runtime`` leaves it open.
    """

    def __init__(
        self,
        runtime: Boxlite | None = None,
        *,
        home: PathLike | None = None,
        image: str | None = None,
        rootfs_path: PathLike | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
        max_boxes: int = DEFAULT_MAX_BOXES,
        box_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_boxes < 1:
            raise InvalidArgumentError(f"max_boxes must be at least 1, got {max_boxes}")
        if image is not None and rootfs_path is not None:
            raise InvalidArgumentError("give image or rootfs_path, not both")
        if runtime is not None and home is not None:
            raise InvalidArgumentError("give runtime or home, not both")
        self._owns_runtime = runtime is None
        self.runtime = runtime if runtime is not None else Boxlite(Options(home_dir=home))
        self.image = image
        self.rootfs_path = rootfs_path
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.max_boxes = max_boxes
        self.box_options = dict(box_options or {})
        self._members: dict[str, PoolMember] = {}
        self._default: PoolMember | None = None
        self._creating = asyncio.Lock()
        self._closed = False

    @property
    def members(self) -> list[PoolMember]:
        return list(self._members.values())

    async def get(self, box_id: str | None = None) -> PoolMember:
        """The box named by id, name or unique id prefix; the default box (made now if
        needed) when ``box_id`` is None. Only this pool's boxes are found."""
        if box_id is None:
            if self._default is not None:
                return self._default
            async with self._creating:
                if self._default is None:
                    self._default = await self._create(None, None, None, None, is_default=True)
                return self._default
        member = self._members.get(box_id)
        if member is not None:
            return member
        named = [m for m in self._members.values() if m.box.name == box_id]
        prefixed = [m for m in self._members.values() if m.id.startswith(box_id)]
        for matches in (named, prefixed):
            if len(matches) == 1:
                return matches[0]
        if len(prefixed) > 1:
            raise InvalidArgumentError(f"box id prefix {box_id!r} matches several boxes: give more of it")
        raise InvalidArgumentError(f"no box {box_id!r} in this server's pool (see list_boxes)")

    async def create(
        self,
        image: str | None = None,
        name: str | None = None,
        memory_mib: int | None = None,
        cpus: int | None = None,
    ) -> PoolMember:
        """Boots a new box of the pool (the pool's image unless ``image`` is given)."""
        async with self._creating:
            return await self._create(image, name, memory_mib, cpus, is_default=False)

    async def _create(
        self, image: str | None, name: str | None, memory_mib: int | None, cpus: int | None, *, is_default: bool
    ) -> PoolMember:
        if self._closed:
            raise InvalidStateError("the server is shutting down")
        if len(self._members) >= self.max_boxes:
            raise InvalidStateError(f"the pool is full ({self.max_boxes} boxes): remove one with remove_box first")
        source: dict[str, Any] = {"image": image} if image else {"image": self.image, "rootfs_path": self.rootfs_path}
        box = CodeBox(
            runtime=self.runtime,
            name=name,
            memory_mib=memory_mib or self.memory_mib,
            cpus=cpus or self.cpus,
            **source,
            **self.box_options,
        )
        await box.start()
        if self._closed:  # closed while this box booted: it must not outlive the pool
            await box.stop()
            raise InvalidStateError("the server is shutting down")
        member = PoolMember(box, box.id, image=box.box.info().image, is_default=is_default)
        self._members[member.id] = member
        return member

    async def remove(self, box_id: str | None) -> str:
        """Stops and deletes a box of the pool (the default one if ``box_id`` is None; the
        next call without a box id then makes a new default box); returns its id."""
        if box_id is None and self._default is None:
            raise InvalidArgumentError("there is no default box yet: nothing to remove")
        member = await self.get(box_id)
        removed_id = member.id
        self._members.pop(removed_id, None)
        if member is self._default:
            self._default = None
        await member.box.stop()
        return removed_id

    async def close(self) -> None:
        """Stops every box of the pool (all at once) and, if the pool opened its runtime,
        closes it. Later calls that would make a box fail."""
        self._closed = True
        members, self._members, self._default = list(self._members.values()), {}, None
        await asyncio.gather(*(m.box.stop() for m in members), return_exceptions=True)
        if self._owns_runtime:
            await self.runtime.shutdown()
