"""The languages a context can speak, and how each one's interpreter is started in the box."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from importlib import resources

from ..errors import InvalidArgumentError
from .protocol import PREFIX


def _kernel_source(name: str) -> str:
    return resources.files(__package__).joinpath("kernels").joinpath(name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Language:
    name: str
    #: The program the image must have.
    program: str
    #: How the interpreter is started; a kernel's source is appended to it.
    command: tuple[str, ...]
    #: The kernel's file in kernels/ (Python and Node speak frames themselves); None for shells,
    #: which the host drives.
    kernel: str | None = None

    @property
    def shell(self) -> bool:
        return self.kernel is None

    def argv(self) -> list[str]:
        return [*self.command, _kernel_source(self.kernel)] if self.kernel else list(self.command)

    def request(self, run_id: str, code: str, cell_path: str) -> bytes:
        """What goes to the kernel's stdin to run `code`."""
        if not self.shell:
            return (json.dumps({"op": "run", "id": run_id, "code": code}) + "\n").encode()
        # The cell was written to `cell_path`; sourcing it keeps `cd` and variables. The
        # stderr frame tells the host all of the cell's stderr has arrived.
        done = PREFIX.decode() + '{"type":"done","id":"' + run_id + '","exit_code":%d}\\n'
        synced = PREFIX.decode() + '{"type":"stderr","text":""}\\n'
        path = shlex.quote(cell_path)
        return (
            f". {path} </dev/null; __boxlite_status=$?; rm -f {path}; "
            f"printf '{synced}' >&2; printf '{done}' \"$__boxlite_status\"\n"
        ).encode()

    def greeting(self) -> bytes | None:
        """For shells, a command whose frame proves the shell runs (kernels send theirs)."""
        if not self.shell:
            return None
        ready = PREFIX.decode() + '{"type":"ready","language":"' + self.name + '"}\\n'
        return f"trap : INT; printf '{ready}'\n".encode()


_LANGUAGES = {
    "python": Language("python", "python3", ("python3", "-c"), "python_kernel.py"),
    "bash": Language("bash", "bash", ("bash", "--noprofile", "--norc")),
    "sh": Language("sh", "sh", ("sh",)),
    "node": Language("node", "node", ("node", "-e"), "node_kernel.js"),
}
_ALIASES = {"python3": "python", "py": "python", "javascript": "node", "js": "node", "shell": "bash"}


def language(name: str | None) -> Language:
    """The language called `name` (default Python)."""
    key = (name or "python").lower()
    key = _ALIASES.get(key, key)
    found = _LANGUAGES.get(key)
    if found is None:
        known = ", ".join(sorted(_LANGUAGES))
        raise InvalidArgumentError(f"language {name!r} is not supported: use one of {known}")
    return found
