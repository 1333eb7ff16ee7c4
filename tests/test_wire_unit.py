"""The wire shapes remote runtimes share: value objects and errors survive a round trip, and a
malformed or hostile message becomes a typed error (no VM needed)."""

from __future__ import annotations

import inspect

import pytest

import boxlite
from boxlite import _native, errors

BOX = {
    "box_id": "01JBOX",
    "name": "web",
    "status": "running",
    "pid": 4242,
    "image": "alpine:latest",
    "cpus": 2,
    "memory_mib": 512,
    "created_at": "2026-12-01T10:00:00Z",
    "started_at": "2026-12-01T10:00:02Z",
    "accelerator": "tcg",
    "auto_remove": True,
    "network": {
        "mode": "enabled",
        "allow_net": ["pypi.org"],
        "published_ports": [{"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 80, "protocol": "tcp"}],
    },
}


def test_box_info_round_trip() -> None:
    info = boxlite.BoxInfo._from_wire(BOX)
    assert (info.id, info.name, info.status, info.running, info.pid) == ("01JBOX", "web", "running", True, 4242)
    assert (info.image, info.cpus, info.memory_mib, info.auto_delete) == ("alpine:latest", 2, 512, 1)
    assert info.network.allow_net == ["pypi.org"]
    assert info.network.published_ports[0].host_port == 8080
    wire = info._to_wire()
    assert wire["box_id"] == wire["id"] == "01JBOX"
    assert wire["updated_at"] == "2026-12-01T10:00:02Z"
    again = boxlite.BoxInfo._from_wire(wire)
    assert again._to_wire() == wire


def test_box_info_from_the_published_shape() -> None:
    """The published server's box response (no boxlite fields) still reads."""
    published = {k: BOX[k] for k in ("box_id", "name", "status", "pid", "image", "cpus", "memory_mib", "created_at")}
    published |= {"updated_at": "2026-12-01T10:00:03Z", "labels": {"team": "a"}}
    info = boxlite.BoxInfo._from_wire(published)
    assert info.status == "running" and info.network.published_ports == []


@pytest.mark.parametrize(
    "bad",
    [{}, {"status": "running"}, {**BOX, "cpus": "two"}, {**BOX, "box_id": "", "id": None}, {**BOX, "cpus": -1}],
)
def test_malformed_box_info_is_a_parse_error(bad: dict[str, object]) -> None:
    with pytest.raises(boxlite.ParseError, match="malformed box info"):
        boxlite.BoxInfo._from_wire(bad)


def test_metrics_round_trip() -> None:
    runtime = _native.RuntimeMetrics._from_wire({"boxes_created_total": 3, "total_commands_executed": 7})
    assert (runtime.boxes_created_total, runtime.total_commands_run, runtime.total_exec_errors) == (3, 7, 0)
    assert _native.RuntimeMetrics._from_wire(runtime._to_wire())._to_wire() == runtime._to_wire()
    box = _native.BoxMetrics._from_wire({"commands_run_total": 2, "cpu_percent": 12.5, "from_a_newer_server": 1})
    assert (box.commands_executed_total, box.cpu_percent, box.memory_bytes) == (2, 12.5, None)
    assert box._to_wire()["exec_errors_total"] == 0
    assert _native.BoxMetrics._from_wire(box._to_wire())._to_wire() == box._to_wire()


def error_classes() -> list[type[errors.BoxliteError]]:
    found = [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.BoxliteError) and cls is not errors.ExecError and not cls.__name__.startswith("_")
    ]
    assert len(found) > 30
    return found


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_every_error_comes_back_as_its_class(cls: type[errors.BoxliteError]) -> None:
    error = cls("what happened; what to do")
    body = {"error": errors.error_to_wire(error)}
    back = errors.error_from_wire(body, errors.http_status(error))
    assert type(back) is cls
    assert str(back) == "what happened; what to do"


def test_http_status_of_common_errors() -> None:
    assert errors.http_status(errors.BoxNotFoundError("x")) == 404
    assert errors.http_status(errors.AuthenticationError("x")) == 401
    assert errors.http_status(errors.InvalidArgumentError("x")) == 400
    assert errors.http_status(errors.ResourceExhaustedError("x")) == 429
    assert errors.http_status(errors.ExecTimeoutError("x")) == 504
    assert errors.http_status(errors.ExecStartError("no such command")) == 400
    assert errors.http_status(errors.InternalError("x")) == 500


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"error": {"type": "__class__", "code": "not_found", "message": "m"}}, 404, errors.NotFoundError),
        ({"error": {"type": "ExecError", "message": "m"}}, 500, errors.InternalError),
        ({"error": {"type": "os", "message": "m"}}, 429, errors.ResourceExhaustedError),
        ("<html>bad gateway</html>", 502, errors.UpstreamUnavailableError),
        (None, 418, errors.InternalError),
        ({"error": {"type": "BoxLostError", "message": 5}}, 503, errors.BoxLostError),
    ],
)
def test_a_hostile_or_foreign_error_body_still_gives_a_typed_error(
    body: object, status: int, expected: type[errors.BoxliteError]
) -> None:
    error = errors.error_from_wire(body, status)
    assert type(error) is expected
    assert str(error)
