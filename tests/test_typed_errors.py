"""Every refusal of peekcore is a typed error under PeekcoreError, and still the builtin it was."""

from __future__ import annotations

import ast
import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import peekcore
from peekcore import errors
from peekcore.cli import main
from peekcore.errors import (
    DataError,
    FileFormatError,
    InvalidArgumentError,
    MissingInputError,
    NotFittedError,
    PeekcoreError,
)

PACKAGE = Path(peekcore.__file__).parent

#: Raises of a bare builtin exception class that stay, each with the reason.
ALLOWED = {
    # the module __getattr__ protocol: Python's attribute lookup expects a plain AttributeError
    ("__init__.py", "AttributeError"),
    # `python -m peekcore` leaves with main()'s exit code
    ("__main__.py", "SystemExit"),
}

BUILTIN_ERRORS = {
    name
    for name in dir(builtins)
    if isinstance(getattr(builtins, name), type)
    and issubclass(getattr(builtins, name), BaseException)
}


def _bare_raises() -> list[tuple[str, int, str]]:
    """``(file, line, class)`` of each ``raise Builtin(...)`` / ``raise Builtin`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue  # a bare `raise` re-raises what was caught: allowed
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BUILTIN_ERRORS:
                found.append((path.relative_to(PACKAGE).as_posix(), node.lineno, exc.id))
    return found


def test_no_bare_builtin_raises_outside_the_allow_list():
    found = _bare_raises()
    bad = [
        f"peekcore/{f}:{line}: raise {name}" for f, line, name in found if (f, name) not in ALLOWED
    ]
    assert not bad, "raise a class of peekcore.errors instead:\n" + "\n".join(bad)
    # the allow-list holds nothing stale: each entry still names a raise
    assert {(f, name) for f, _, name in found} == ALLOWED


def test_the_scan_sees_a_bare_raise(tmp_path, monkeypatch):
    """The scan would catch one: a file with `raise ValueError(...)` in a copy of the package."""
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "mod.py").write_text("def f():\n    raise ValueError('no')\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert _bare_raises() == [("mod.py", 2, "ValueError")]


def test_each_class_keeps_its_builtin():
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, PeekcoreError)
        if cls is not PeekcoreError:
            builtin_bases = [b for b in cls.__mro__ if b.__module__ == "builtins"]
            assert builtin_bases[0] is not Exception, f"{name} subclasses no specific builtin"
    from peekcore.distributed import PeerFailure

    assert issubclass(PeerFailure, PeekcoreError) and issubclass(PeerFailure, RuntimeError)


def test_ncp_hals_on_negative_data_is_a_data_error(rng):
    x = rng.random((12, 4, 3))
    x[5, 1, 2] = -0.5
    with pytest.raises(DataError, match="nonnegative data") as info:
        peekcore.ncp_hals(x, 2, n_iter_max=2)
    assert isinstance(info.value, ValueError)


def test_bad_rank_is_an_invalid_argument(rng):
    with pytest.raises(InvalidArgumentError, match="rank must be at least 1") as info:
        peekcore.cp_als(rng.standard_normal((8, 3, 3)), 0)
    assert isinstance(info.value, ValueError)


def test_report_of_a_missing_or_foreign_file(tmp_path, rng):
    from peekcore.report._common import load_result

    with pytest.raises(MissingInputError, match="no such file") as info:
        load_result(tmp_path / "nowhere.npz")
    assert isinstance(info.value, FileNotFoundError)
    np.save(tmp_path / "x.npy", rng.standard_normal((3, 2)))
    with pytest.raises(FileFormatError, match="plain NumPy array") as info:
        load_result(tmp_path / "x.npy")
    assert isinstance(info.value, ValueError)


def test_unfitted_estimator_is_attribute_and_value_error():
    from peekcore.estimator import CP

    est = CP(rank=2)
    with pytest.raises(NotFittedError) as info:
        est.transform(np.ones((3, 4)))
    assert isinstance(info.value, AttributeError) and isinstance(info.value, ValueError)


def test_rank_profile_refuses_a_meta_device_before_any_capture(tmp_path, monkeypatch):
    def no_capture(*args, **kwargs):
        raise AssertionError("capture ran before the device was checked")

    monkeypatch.setattr(peekcore, "capture", no_capture)  # rank_profile imports it from there
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = np.zeros((3, 4), dtype=np.float32)
    for options in ({"capture_options": {"device": "meta"}}, {"sweep_options": {"device": "meta"}}):
        with pytest.raises(InvalidArgumentError, match=r"\['device'\] 'meta'"):
            peekcore.rank_profile([("a", model, 0.5)], data, "1", store=tmp_path / "s", **options)
    assert not (tmp_path / "s").exists()  # refused before anything was written
    from peekcore.profile.checkpoints import accuracy

    with pytest.raises(InvalidArgumentError, match="accuracy's device 'meta'"):
        accuracy(data, np.zeros(3, dtype=np.int64), device="meta")


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["fit", "{tmp}/missing.npy", "--rank", "2"], "MissingInputError"),
        (["fit", "{tmp}/x.npy", "--rank", "0"], "InvalidArgumentError"),
        (["info", "{tmp}/x.npy"], "FileFormatError"),
    ],
)
def test_cli_json_kind_is_the_typed_class(tmp_path, rng, capsys, argv, kind):
    np.save(tmp_path / "x.npy", rng.standard_normal((10, 3, 3)))
    code = main(["--json", *(a.format(tmp=tmp_path) for a in argv)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1  # as before: 1 for a refusal, 2 only for usage errors
    assert doc["kind"] == kind and doc["error"]
