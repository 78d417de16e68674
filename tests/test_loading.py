"""Loading models by import spec and from torch.save files (peekcore.loading)."""

from __future__ import annotations

import pathlib
import textwrap

import numpy as np
import pytest
import torch
from peekcli import run_peek_json

from peekcore.errors import InvalidArgumentError, UnsafeFileError
from peekcore.loading import import_object, load_checkpoint, load_model, require

MODEL_SOURCE = textwrap.dedent(
    """
    import torch

    class SmallCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
            self.act = torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(x))

    def smallcnn():
        torch.manual_seed(0)
        return SmallCNN()
    """
)


class _Payload:
    """Unpickling this creates a file: what a hostile model file could do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_payload_does_not_run_without_trust(tmp_path):
    marker = tmp_path / "created-by-unpickling"
    evil = tmp_path / "evil.pt"
    torch.save(_Payload(marker), evil)
    for call in (lambda: load_checkpoint(evil), lambda: load_model(str(evil))):
        with pytest.raises(UnsafeFileError, match="--trust-model-file") as info:
            call()
        assert "run any code" in str(info.value)
        assert not marker.exists()
    # the opt-in really does unpickle (so the refusal above is what kept the file away)
    with pytest.raises(TypeError, match="not a model"):
        load_checkpoint(evil, trust=True)
    assert marker.exists()


def test_whole_model_needs_trust_and_state_dict_needs_builder(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MODEL_SOURCE)
    monkeypatch.chdir(tmp_path)
    net = import_object("mymodels:smallcnn")()
    whole, weights = tmp_path / "whole.pt", tmp_path / "weights.pth"
    torch.save(net, whole)
    torch.save(net.state_dict(), weights)
    with pytest.raises(UnsafeFileError):
        load_model(str(whole))
    x = torch.randn(2, 1, 5, 5)
    assert torch.equal(load_model(str(whole), trust=True)(x), net(x))
    with pytest.raises(InvalidArgumentError, match="state dict") as info:
        load_model(str(weights))
    assert "--trust-model-file" in str(info.value) and "--weights" in str(info.value)
    cls = import_object("mymodels:SmallCNN")
    loaded = load_checkpoint(weights, builder=cls)
    assert torch.equal(loaded(x), net(x))
    assert torch.equal(load_model("mymodels:SmallCNN", weights=str(weights))(x), net(x))


@pytest.mark.parametrize(
    ("load", "spec", "error", "why"),
    [
        (load_model, "x.npy", InvalidArgumentError, "numpy array, not a model.*--data"),
        (load_model, "notes.txt", InvalidArgumentError, "not a file written by torch.save"),
        (import_object, "nomodule:Net", InvalidArgumentError,
         "no module named 'nomodule'.*current folder"),
        (import_object, "mymodels:Nope", InvalidArgumentError, "has no attribute 'Nope'.*SmallCNN"),
        (import_object, "sub/missing.py:Net", InvalidArgumentError, "no such file"),
        (import_object, "mymodels", InvalidArgumentError, "not an import spec"),
        (load_model, "mymodels:torch", TypeError, "not a torch.nn.Module"),
    ],
    ids=["array", "text-file", "no-module", "no-attribute", "no-file", "no-colon", "not-a-module"],
)  # fmt: skip
def test_spec_errors_say_what_to_give(tmp_path, monkeypatch, load, spec, error, why):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels.py").write_text(MODEL_SOURCE)
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(error, match=why):
        load(spec)


def test_require_names_the_pip_line():
    with pytest.raises(ImportError, match=r'pip install "peekcore\[vision\]"'):
        require("peekcore_no_such_module", "vision", "reading a folder of images")
    assert require("numpy", "demo", "x") is np


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["mymodels:smallcnn", "nets/mymodels.py:SmallCNN"])
def test_both_spec_forms_work_from_the_current_folder(tmp_path, spec):
    """The installed peek script did not look in the current folder (No module named ...)."""
    folder = tmp_path / ("nets" if "/" in spec else "")
    folder.mkdir(exist_ok=True)
    (folder / "mymodels.py").write_text(MODEL_SOURCE)
    np.save(tmp_path / "images.npy", np.random.default_rng(0).random((10, 1, 6, 6), np.float32))
    options = "--data images.npy --layers act --store acts.zarr --dtype float32".split()
    code, res, err = run_peek_json("capture", "--model", spec, *options, cwd=tmp_path)
    assert code == 0, err
    assert res["layers"] == {"act": [10, 3, 6, 6]}


@pytest.mark.slow
def test_capture_refuses_an_array_as_model(tmp_path):
    """It said `unpickling stack underflow`."""
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 6, 6), np.float32))
    argv = "capture --model x.npy --data x.npy --layers a --store s".split()
    code, res, err = run_peek_json(*argv, cwd=tmp_path)
    assert code == 1 and "numpy array, not a model" in res["error"]
    assert res["kind"] == "InvalidArgumentError" and "unpickling" not in err
