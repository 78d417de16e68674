"""A new user's first hour (issue 15): the command line as a person runs it.

Each test runs the installed ``peek`` script in a subprocess from a temporary
folder, as a user would, and checks one thing that used to break or confuse.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from peekcli import run_peek, run_peek_json

from peekcore import datasets
from peekcore.report import figures

pytestmark = pytest.mark.slow  # each test starts the script (a few seconds of imports)


@pytest.fixture
def npy(tmp_path):
    rng = np.random.default_rng(15)
    np.save(tmp_path / "x.npy", np.abs(rng.standard_normal((30, 5, 4))).astype(np.float32))
    return tmp_path / "x.npy"


def test_grey_images_get_a_channel_axis(tmp_path):
    """An N x H x W array reached the model unchanged (expected input ... to have 1 channels)."""
    grey = datasets.digits().inputs[:40, 0]  # 40 x 8 x 8
    np.save(tmp_path / "grey.npy", grey)
    code, res, err = run_peek_json(
        "capture",
        "--model",
        "peekcore.demo:DigitsCNN",
        "--data",
        "grey.npy",
        "--layers",
        "act1",
        "--store",
        "acts.zarr",
        cwd=tmp_path,
    )
    assert code == 0, err
    assert res["layers"]["act1"][0] == 40
    assert any("read as 40 x 1 x 8 x 8" in note for note in res["notes"])


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_subcommand(tmp_path, npy, where):
    """`peek info sweep.npz --json` gave `unrecognized arguments: --json`."""
    argv = ["fit", "x.npy", "--rank", "2", "--iters", "3", "--out", "m.npz"]
    argv = ["--json", *argv] if where == "before" else [*argv, "--json"]
    out = run_peek(*argv, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rank"] == 2
    out = run_peek("info", "m.npz", "--json", cwd=tmp_path)
    assert json.loads(out.stdout)["kind"] == "CP model"


def test_json_errors_are_one_json_document(tmp_path, npy):
    for argv, kind, code in (
        (["fit", "missing.npy", "--rank", "2"], "FileNotFoundError", 1),
        (["fit", "x.npy", "--rank", "0"], None, 1),
        (["info", "x.npy", "--no-such-option"], "UsageError", 2),
        (["sweep", "x.npy", "--ranks", "3-1"], None, 1),
    ):
        out = run_peek(*argv, "--json", cwd=tmp_path)
        doc = json.loads(out.stdout)  # the whole of stdout is one document
        assert out.returncode == code
        assert set(doc) == {"error", "kind"} and doc["error"]
        assert kind is None or doc["kind"] == kind


def test_only_rank_0_prints_under_torchrun(tmp_path, npy):
    """torchrun sets RANK: the other processes print nothing on stdout."""
    argv = ["--json", "fit", "x.npy", "--rank", "2", "--iters", "2"]
    assert run_peek(*argv, cwd=tmp_path, env={"RANK": "1"}).stdout == ""
    assert json.loads(run_peek(*argv, cwd=tmp_path, env={"RANK": "0"}).stdout)["rank"] == 2


def test_missing_extras_name_the_pip_line(tmp_path, monkeypatch):
    (tmp_path / "cls").mkdir()
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision fails
    with pytest.raises(ImportError, match=r'pip install "peekcore\[vision\]"'):
        datasets.image_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "peekcore\[report\]"'):
        figures._mpl()
