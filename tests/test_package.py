"""The Python package's surface: version, errors, options validation, metrics types."""

from __future__ import annotations

import builtins

import pytest

import boxlite
from boxlite import _native, errors

# The extra built-in base each Python class must have (beyond BoxliteError and RuntimeError).
BUILTIN_BASE: dict[type[BaseException], type[BaseException] | None] = {
    boxlite.InvalidArgumentError: ValueError,
    boxlite.BoxNotFoundError: LookupError,
    boxlite.ImageNotFoundError: LookupError,
    boxlite.RegistryUnauthorizedError: PermissionError,
    boxlite.BootTimeoutError: builtins.TimeoutError,
    boxlite.ExecTimeoutError: builtins.TimeoutError,
    boxlite.BoxliteIOError: OSError,
    boxlite.UnsupportedError: NotImplementedError,
}


def test_version_matches_the_native_module() -> None:
    assert boxlite.__version__ == _native.__version__
    assert boxlite.__version__.count(".") == 2


def test_every_core_failure_arrives_as_its_class_with_its_message() -> None:
    examples = _native._error_examples()
    # One example per core variant (the Rust mapping is exhaustive; this checks the Python side).
    assert len(examples) >= 20
    for index, (kind, class_name) in enumerate(examples):
        cls = getattr(errors, class_name)
        with pytest.raises(cls) as caught:
            _native._raise_example(index)
        err = caught.value
        assert type(err) is cls, (kind, class_name)
        assert isinstance(err, boxlite.BoxliteError)
        assert isinstance(err, RuntimeError), "core errors are RuntimeErrors, as in the published package"
        extra = next((b for c, b in BUILTIN_BASE.items() if issubclass(cls, c)), None)
        if extra is not None:
            assert isinstance(err, extra)
        assert err.kind == kind
        assert str(err)  # a message, never empty


def test_error_messages_carry_the_details() -> None:
    messages: dict[str, int] = {}
    for index, (kind, _) in enumerate(_native._error_examples()):
        messages.setdefault(kind, index)
    with pytest.raises(boxlite.InvalidArgumentError, match=r"invalid argument `cpus`: must be at least 1"):
        _native._raise_example(messages["invalid_argument"])
    with pytest.raises(boxlite.EngineUnavailableError, match="install the qemu-system-x86 package"):
        _native._raise_example(messages["engine_unavailable"])
    with pytest.raises(boxlite.BootTimeoutError, match=r"(?s)within 5s.*Linux"):
        _native._raise_example(messages["boot_timeout"])


def test_published_error_names_catch_ours() -> None:
    assert issubclass(boxlite.BoxNotFoundError, boxlite.NotFoundError)
    assert issubclass(boxlite.ImageNotFoundError, boxlite.NotFoundError)
    assert issubclass(boxlite.ImagePullError, boxlite.ImageError)
    assert issubclass(boxlite.EngineUnavailableError, boxlite.EngineError)
    assert issubclass(boxlite.BootTimeoutError, boxlite.TimeoutError)
    assert issubclass(boxlite.ExecTimeoutError, boxlite.ExecutionError)
    assert boxlite.NotSupportedError is boxlite.UnsupportedError
    assert boxlite.TimeoutError is not builtins.TimeoutError
    err = boxlite.ExecError("ls /nope", 2, "no such file")
    assert (err.command, err.exit_code, err.stderr) == ("ls /nope", 2, "no such file")
    assert str(err) == "Command 'ls /nope' failed with exit code 2: no such file"


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
        ({"rootfs_path": "/x", "image": "alpine"}, "image"),
        ({"rootfs_path": "/x", "cpus": 0}, "cpus"),
        ({"rootfs_path": "/x", "memory_mib": 64}, "memory"),
        ({"rootfs_path": "/x", "working_dir": "tmp"}, "working_dir"),
        ({"rootfs_path": "/x", "env": [("A=B", "1")]}, "env"),
        ({"rootfs_path": "/x", "env": [("A\0", "1")]}, "env"),
        ({"rootfs_path": "/x", "detach": True}, "detach"),
        ({"rootfs_path": "/x", "cmd": ["a\0"]}, "cmd"),
    ],
)
def test_box_options_are_checked_by_the_core(kwargs: dict[str, object], field: str) -> None:
    # As in the published package, options are plain values until used: the core checks them
    # when a box is created, or on demand with validate().
    options = boxlite.BoxOptions(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(boxlite.InvalidArgumentError, match=f"`{field}`"):
        options.validate()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"env": ["A=1"]}, "env"),
        ({"env": "A=1"}, "env"),
        ({"cmd": "echo hi"}, "cmd"),
        ({"disk_size_gb": -1}, "disk_size_gb"),
    ],
)
def test_box_options_refuse_wrong_shapes_at_construction(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(boxlite.InvalidArgumentError, match=f"`{field}`"):
        boxlite.BoxOptions(rootfs_path="/x", **kwargs)  # type: ignore[arg-type]


def test_box_options_follow_the_published_defaults_and_shapes() -> None:
    o = boxlite.BoxOptions("alpine")
    assert (o.image, o.cpus, o.memory_mib, o.auto_remove, o.auto_delete, o.detach, o.tty) == (
        "alpine",
        1,
        1024,
        True,
        1,
        False,
        False,
    )
    o.cpus = 2
    o.memory_mib = 256
    assert (o.cpus, o.memory_mib) == (2, 256)
    kept = boxlite.BoxOptions("alpine", auto_delete=0, detach=True)
    assert (kept.auto_remove, kept.auto_delete) == (False, 0)
    kept.validate()
    with pytest.raises(boxlite.UnsupportedError, match="auto_stop"):
        boxlite.BoxOptions("alpine", auto_stop=60).validate()


def test_box_options_accept_env_as_mapping_or_pairs() -> None:
    a = boxlite.BoxOptions(rootfs_path="/x", env={"A": "1"})
    b = boxlite.BoxOptions(rootfs_path="/x", env=[("A", "1")])
    assert a.env == b.env == [("A", "1")]
    assert 'rootfs_path="/x"' in repr(a)


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
