"""The kernel frame protocol, host side: splitting a kernel's output into frames and raw text.

A kernel's output is untrusted. A frame is one line holding ``PREFIX`` and a JSON object;
anything else is raw output. Lines are capped at ``MAX_FRAME`` bytes (a longer frame is dropped
and reported), and every frame is checked field by field before the host acts on it.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

PREFIX = b"\x1e\x1fBOXLITE:"
#: The longest frame kept: room for a large rich result (an image) in one message.
MAX_FRAME = 32 << 20


@dataclass
class Raw:
    """Output that is not a frame (a child process writing straight to the stream)."""

    text: str


@dataclass
class Frame:
    """A checked message from the kernel."""

    type: str
    fields: dict[str, Any]


@dataclass
class Dropped:
    """A frame longer than ``MAX_FRAME`` or not well formed, left out."""

    reason: str


Event = Raw | Frame | Dropped

_STR, _INT, _BOOL = (str,), (int,), (bool,)
# Every frame type and the type of each of its fields (optional ones may be missing).
_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {"language": _STR, "version": _STR, "pid": _INT},
    "stdout": {"text": _STR},
    "stderr": {"text": _STR},
    "result": {"data": (dict,), "main": _BOOL},
    "error": {"name": _STR, "value": _STR, "traceback": _STR, "exit_code": _INT},
    "done": {"id": _STR, "execution_count": _INT, "exit_code": _INT},
    "truncated": {"stream": _STR, "chars": _INT},
}
_REQUIRED = {"stdout": ("text",), "stderr": ("text",), "result": ("data",), "error": ("name",), "done": ("id",)}


def check(message: Any) -> Frame | Dropped:
    """The frame `message` (a decoded JSON value) stands for, or why it was refused."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return Dropped("a frame without a type")
    kind = message["type"]
    schema = _SCHEMA.get(kind)
    if schema is None:
        return Dropped(f"a frame of unknown type {kind[:40]!r}")
    fields: dict[str, Any] = {}
    for name, types in schema.items():
        if name not in message:
            continue
        value = message[name]
        if not isinstance(value, types) or (types is _INT and isinstance(value, bool)):
            return Dropped(f"a {kind!r} frame with a bad {name!r}")
        fields[name] = value
    if any(name not in fields for name in _REQUIRED.get(kind, ())):
        return Dropped(f"a {kind!r} frame missing a field")
    if kind == "result":
        data = fields["data"]
        if not all(isinstance(k, str) and (isinstance(v, str) or k == "application/json") for k, v in data.items()):
            return Dropped("a result with a non-text value")
    return Frame(kind, fields)


class FrameReader:
    """Feeds on a kernel's output chunks and yields frames and raw text, in order."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._skipping = False  # inside a frame too long to keep, until its newline
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        self._buffer += chunk
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            line = bytes(self._buffer[: newline + 1])
            del self._buffer[: newline + 1]
            if self._skipping:
                self._skipping = False
                continue
            self._line(line, events)
        if len(self._buffer) > self.max_frame:
            at = self._buffer.find(PREFIX)
            if at >= 0:
                self._raw(bytes(self._buffer[:at]), events)
                events.append(Dropped(f"a frame over {self.max_frame >> 20} MiB"))
                self._buffer.clear()
                self._skipping = True
            elif not self._skipping:
                keep = len(PREFIX) - 1  # the prefix may straddle chunks
                self._raw(bytes(self._buffer[:-keep]), events)
                del self._buffer[:-keep]
            else:
                self._buffer.clear()
        return events

    def close(self) -> list[Event]:
        """What is left at the end of the stream (a last line without a newline)."""
        events: list[Event] = []
        if self._buffer and not self._skipping:
            self._line(bytes(self._buffer), events)
        self._buffer.clear()
        tail = self._decoder.decode(b"", True)
        if tail:
            events.append(Raw(tail))
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        at = line.find(PREFIX)
        if at < 0:
            self._raw(line, events)
            return
        self._raw(line[:at], events)
        try:
            message = json.loads(line[at + len(PREFIX) :])
        except ValueError:
            events.append(Dropped("a frame that is not JSON"))
            return
        events.append(check(message))

    def _raw(self, data: bytes, events: list[Event]) -> None:
        text = self._decoder.decode(data)
        if text:
            events.append(Raw(text))
