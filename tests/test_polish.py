"""Gaps a review found: float token ids, devices peekcore cannot compute on, negative workers.

Each test here failed before its fix: float token ids into an ``nn.Embedding``
got torch's bare "Expected tensor for argument #1 'indices'"; ``device="meta"``
was accepted and failed inside torch; ``num_workers=-1`` was accepted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import peekcore
from peekcore.cli import main
from peekcore.datasets import as_inputs
from peekcore.errors import InvalidArgumentError, InvalidTypeError

# ---------------------------------------------------------------- float token ids


def _embedder() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 5)).eval()


def _ids(n: int = 12) -> np.ndarray:
    return np.random.default_rng(2).integers(0, 20, (n, 7))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_token_ids_into_an_embedding_are_refused_by_dtype(tmp_path, dtype):
    ids = _ids().astype(dtype)
    store = tmp_path / "s.zarr"
    with pytest.raises(InvalidTypeError) as info:
        peekcore.capture(_embedder(), ids, ["1"], store, dtype="float32")
    msg = str(info.value)
    name = np.dtype(dtype).name  # as given, not the float32 it was converted to
    assert f"inputs are {name}" in msg and "integer indices" in msg
    assert "x.astype('int64')" in msg and "transform=lambda t: t.long()" in msg
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's error, kept as the cause
    assert not store.exists()
    with pytest.raises(InvalidTypeError, match=f"inputs are {name}"):
        peekcore.ModelSource(_embedder(), ids, "1")
    # converted as the error says, they are captured: against a float64 reference
    got = peekcore.capture(_embedder(), ids.astype("int64"), ["1"], store, dtype="float32")
    want = _embedder().double()(torch.as_tensor(ids.astype("int64"))).detach().numpy()
    np.testing.assert_allclose(
        np.asarray(got["1"].read()), want.transpose(0, 2, 1), rtol=1e-5, atol=1e-6
    )


def test_edits_of_a_model_given_float_token_ids_say_how_to_convert():
    from peekcore import CPModel
    from peekcore.edits import edited_outputs

    rng = np.random.default_rng(4)
    cp = CPModel(np.ones(2), [rng.random((12, 2)), rng.random((6, 2)), rng.random((7, 2))])
    with pytest.raises(InvalidTypeError, match=r"inputs are float64.*astype\('int64'\)"):
        edited_outputs(_embedder(), "0", cp, _ids().astype(np.float64), remove=[0])


def test_a_float_model_that_fails_otherwise_keeps_torchs_error(tmp_path):
    # a shape error is not a dtype error: no advice to convert to integers
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    with pytest.raises(RuntimeError, match="mat1 and mat2") as info:
        peekcore.capture(net, np.ones((5, 6), np.float32), ["0"], tmp_path / "s.zarr")
    assert not isinstance(info.value, InvalidTypeError)


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "mps"])
def test_a_device_peekcore_cannot_compute_on_is_refused_by_name(tmp_path, device):
    store = tmp_path / "s.zarr"
    with pytest.raises(InvalidArgumentError) as info:
        peekcore.capture(_embedder(), _ids(), ["1"], store, device=device)
    msg = str(info.value)
    assert f"device '{torch.device(device)}'" in msg
    assert "'cpu', 'cuda' or 'cuda:N'" in msg
    assert ("hold no values" in msg) == (torch.device(device).type == "meta")
    assert not store.exists()
    with pytest.raises(InvalidArgumentError, match="'cpu', 'cuda' or 'cuda:N'"):
        peekcore.ModelSource(_embedder(), _ids(), "1", device=device)
    with pytest.raises(InvalidArgumentError, match="'cpu', 'cuda' or 'cuda:N'"):
        peekcore.cp_als(np.ones((4, 3, 2), np.float32), 1, device=device)


def test_a_model_on_the_meta_device_is_refused_before_a_store_exists(tmp_path):
    model = _embedder().to("meta")
    store = tmp_path / "s.zarr"
    with pytest.raises(InvalidArgumentError, match="the model's device 'meta'.*'cpu', 'cuda'"):
        peekcore.capture(model, _ids(), ["1"], store)
    assert not store.exists()


def test_peek_capture_refuses_the_meta_device(tmp_path, capsys):
    argv = "--json capture --model peekcore.demo:DigitsCNN --data digits --layers act1"
    code = main([*argv.split(), "--store", str(tmp_path / "s.zarr"), "--device", "meta"])
    res = json.loads(capsys.readouterr().out)
    assert code == 1 and res["kind"] == "InvalidArgumentError"
    assert "device 'meta'" in res["error"] and "'cpu', 'cuda' or 'cuda:N'" in res["error"]
    assert not (tmp_path / "s.zarr").exists()


# ---------------------------------------------------------------- workers


@pytest.mark.parametrize(
    ("workers", "error", "words"),
    [
        (-1, InvalidArgumentError, "num_workers must be a nonnegative integer"),
        (1.5, InvalidTypeError, "num_workers must be a nonnegative integer"),
        (True, InvalidTypeError, "give a whole number"),
    ],
)
def test_num_workers_is_a_nonnegative_integer(tmp_path, workers, error, words):
    x = np.ones((6, 4), np.float32)
    with pytest.raises(error, match=words):
        as_inputs(x, batch_size=2, num_workers=workers)
    store = tmp_path / "s.zarr"
    with pytest.raises(error, match=words):
        peekcore.capture(nn.Sequential(nn.Linear(4, 2)), x, ["0"], store, num_workers=workers)
    assert not store.exists()
    assert as_inputs(x, batch_size=2, num_workers=0).num_workers == 0
