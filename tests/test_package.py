"""The Python package's surface: version, errors, options validation, metrics types."""

from __future__ import annotations

import builtins

import pytest

import boxlite
from boxlite import _native, errors

# The Python class and extra built-in base each core error variant must arrive as.
EXPECTED = {
    "invalid_argument": (boxlite.InvalidArgumentError, ValueError),
    "image_not_found": (boxlite.ImageNotFoundError, None),
    "image_pull_failed": (boxlite.ImagePullError, None),
    "registry_unauthorized": (boxlite.RegistryUnauthorizedError, PermissionError),
    "box_not_found": (boxlite.BoxNotFoundError, LookupError),
    "invalid_state": (boxlite.InvalidStateError, None),
    "engine_unavailable": (boxlite.EngineUnavailableError, None),
    "boot_timeout": (boxlite.BootTimeoutError, TimeoutError),
    "guest_protocol": (boxlite.GuestProtocolError, None),
    "exec_start_failed": (boxlite.ExecStartError, None),
    "exec_timeout": (boxlite.ExecTimeoutError, TimeoutError),
    "storage": (boxlite.StorageError, None),
    "database": (boxlite.DatabaseError, None),
    "io": (boxlite.BoxliteIOError, OSError),
    "unsupported": (boxlite.NotSupportedError, NotImplementedError),
    "internal": (boxlite.InternalError, None),
}


def test_version_matches_the_native_module() -> None:
    assert boxlite.__version__ == _native.__version__
    assert boxlite.__version__.count(".") == 2


def test_every_core_error_kind_is_mapped() -> None:
    assert set(_native._error_kinds()) == set(EXPECTED)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_core_error_arrives_as_its_class_with_its_message(kind: str) -> None:
    cls, builtin = EXPECTED[kind]
    with pytest.raises(cls) as caught:
        _native._raise_error(kind)
    err = caught.value
    assert type(err) is cls
    assert isinstance(err, boxlite.BoxliteError)
    if builtin is not None:
        assert isinstance(err, builtin)
    assert err.kind == kind
    assert str(err)  # a message, never empty


def test_error_messages_carry_the_details() -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=r"invalid argument `cpus`: must be at least 1"):
        _native._raise_error("invalid_argument")
    with pytest.raises(boxlite.EngineUnavailableError, match="install the qemu-system-x86 package"):
        _native._raise_error("engine_unavailable")
    with pytest.raises(boxlite.BootTimeoutError, match=r"(?s)within 5s.*Linux"):
        _native._raise_error("boot_timeout")


def test_every_error_class_derives_from_boxlite_error() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, boxlite.BoxliteError)
        assert cls is not builtins.RuntimeError
        assert getattr(boxlite, name) is cls


def test_accelerator_is_reported_with_a_reason() -> None:
    name, reason = boxlite.accelerator()
    assert name in {"kvm", "hvf", "tcg"}
    assert reason


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "rootfs_path"),
        ({"rootfs_path": "/x", "cpus": 0}, "cpus"),
        ({"rootfs_path": "/x", "cpus": "2"}, "cpus"),
        ({"rootfs_path": "/x", "cpus": True}, "cpus"),
        ({"rootfs_path": "/x", "memory_mib": 64}, "memory_mib"),
        ({"rootfs_path": "/x", "working_dir": "tmp"}, "working_dir"),
        ({"rootfs_path": "/x", "env": [("A=B", "1")]}, "env"),
        ({"rootfs_path": "/x", "env": [("A\0", "1")]}, "env"),
        ({"rootfs_path": "/x", "env": ["A=1"]}, "env"),
    ],
)
def test_box_options_reject_bad_fields_at_construction(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=f"`{field}`"):
        boxlite.BoxOptions(**kwargs)  # type: ignore[arg-type]


def test_box_options_accept_env_as_mapping_or_pairs() -> None:
    a = boxlite.BoxOptions(rootfs_path="/x", env={"A": "1"})
    b = boxlite.BoxOptions(rootfs_path="/x", env=[("A", "1")])
    assert a.env == b.env == [("A", "1")]
    assert "rootfs_path='/x'" in repr(a)


def test_runtime_metrics_start_at_zero(tmp_path: object) -> None:
    rt = boxlite.Boxlite(boxlite.Options(home_dir=str(tmp_path)))
    m = rt.metrics()
    assert isinstance(m, boxlite.RuntimeMetrics)
    assert (
        m.boxes_created_total,
        m.boxes_failed_total,
        m.num_running_boxes,
        m.total_commands_run,
        m.total_run_errors,
    ) == (0, 0, 0, 0, 0)


def test_a_home_that_is_a_file_is_an_invalid_argument(tmp_path: object) -> None:
    import pathlib

    f = pathlib.Path(str(tmp_path)) / "file"
    f.write_text("x")
    with pytest.raises(boxlite.InvalidArgumentError, match="home_dir"):
        boxlite.Boxlite(boxlite.Options(home_dir=f))


def test_exec_result_repr_is_readable() -> None:
    r = boxlite.ExecResult(0, "hi\n", "")
    assert repr(r) == "ExecResult(exit_code=0, stdout='hi\\n', stderr='')"
    assert r.success and r.error_message is None
