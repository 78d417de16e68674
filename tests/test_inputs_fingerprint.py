"""``Inputs.inputs_fingerprint``: the model inputs' identity, whatever form they come in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

import peekcore
from peekcore.datasets import ArrayDataset, as_inputs
from peekcore.errors import StoreError


class Pairs(Dataset):
    """Items ``(numpy image, int label)``: a user's own map-style data set."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class Stream(IterableDataset):
    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __iter__(self):
        yield from torch.from_numpy(self.x)


def prints(data, **kw) -> str:
    return as_inputs(data, batch_size=8, **kw).inputs_fingerprint


def every_form(x: np.ndarray, y: np.ndarray, tmp_path) -> dict:
    """The same inputs ``x`` (float32, N x ...) as each kind of data capture takes."""
    np.save(tmp_path / "x.npy", x)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return {
        "ndarray": x,
        "tensor": xt,
        "npy path": tmp_path / "x.npy",
        "npy str": str(tmp_path / "x.npy"),
        "(x, y)": (x, y),
        "(tensor x, tensor y)": (xt, yt),
        "ArrayDataset(x, y)": ArrayDataset(x, y),
        "TensorDataset(x)": TensorDataset(xt),
        "TensorDataset(x, y)": TensorDataset(xt, yt),
        "own Dataset": Pairs(x, y),
        "DataLoader (x, y)": DataLoader(TensorDataset(xt, yt), batch_size=7),
        "DataLoader own": DataLoader(Pairs(x, y), batch_size=5),
        "Fortran-ordered": np.asfortranarray(x),
        "big-endian": x.astype(">f4"),
    }


@pytest.mark.parametrize("shape", [(50, 1, 6, 6), (4400, 1000)], ids=["whole", "sampled rows"])
def test_every_form_of_the_same_inputs_has_one_fingerprint(rng, tmp_path, shape):
    # 4400 x 1000 float32 is over the 16 MiB hashed whole: 64 rows spread over it
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, 3, shape[0])
    want = prints(x)
    for name, data in every_form(x, y, tmp_path).items():
        assert prints(data) == want, name
    assert prints(x[:40]) == prints(x, n_samples=40) == prints((x, y), n_samples=40)
    assert prints(DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=7, drop_last=True))
    # the labels play no part, the data_fingerprint's do
    assert prints((x, y[::-1].copy())) == want
    assert as_inputs((x, y), batch_size=8).fingerprint != as_inputs(x, batch_size=8).fingerprint


def test_other_inputs_or_order_change_the_fingerprint(rng, tmp_path):
    x = rng.standard_normal((50, 1, 6, 6)).astype(np.float32)
    want = prints(x)
    changed = x.copy()
    changed[23, 0, 4, 1] += 1e-3
    swapped = x.copy()
    swapped[[10, 11]] = swapped[[11, 10]]
    others = {
        "one value": changed,
        "two rows swapped": swapped,
        "reversed": x[::-1].copy(),
        "fewer": x[:49],
        "float64": x.astype(np.float64),
        "bfloat16": torch.from_numpy(x).to(torch.bfloat16),
        "reshaped rows": x.reshape(50, 36),
        "transform": as_inputs(x, batch_size=8, transform=torch.neg),
        "own collate_fn": DataLoader(
            TensorDataset(torch.from_numpy(x)),
            batch_size=5,
            collate_fn=lambda b: default_collate(b),
        ),
    }
    seen = {want}
    for name, data in others.items():
        got = data.inputs_fingerprint if hasattr(data, "inputs_fingerprint") else prints(data)
        assert got not in seen, name
        seen.add(got)
    # a large array's sampled rows: a change in one of them shows
    big = rng.standard_normal((4400, 1000)).astype(np.float32)
    first = prints(big)
    big[4399, 7] += 1.0
    assert prints(big) != first


def test_data_read_only_in_order_match_only_by_description(rng):
    x = rng.standard_normal((12, 3)).astype(np.float32)
    stream = as_inputs(DataLoader(Stream(x), batch_size=4), batch_size=8, n_samples=12)
    assert stream.inputs_fingerprint.startswith("described:")
    assert stream.inputs_fingerprint != prints(x)
    with pytest.raises(TypeError, match="a data item is a dict"):
        prints(DataLoader([{"x": 1.0}] * 3, batch_size=2))


def _drop_inputs_fingerprint(path) -> None:
    """Make ``path`` look like a store captured before inputs fingerprints."""
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["settings"]["inputs_fingerprint"]
    meta.write_text(json.dumps(doc))


def test_capture_records_it_and_a_store_without_it_resumes(rng, tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = rng.standard_normal((30, 4)).astype(np.float32)
    y = rng.integers(0, 2, 30)
    path = tmp_path / "s.zarr"
    store = peekcore.capture(net, (x, y), "1", path, dtype="float32", batch_size=8)
    settings = store.attrs["settings"]
    assert settings["inputs_fingerprint"] == prints(x)
    assert settings["data_fingerprint"] == as_inputs((x, y), batch_size=8).fingerprint
    # a store from before the key is reused as before, and other data are still refused
    _drop_inputs_fingerprint(path)
    again = peekcore.capture(net, (x, y), "1", path, dtype="float32", batch_size=8)
    assert "inputs_fingerprint" not in again.attrs["settings"]
    with pytest.raises(StoreError, match="data_fingerprint"):
        peekcore.capture(net, x, "1", path, dtype="float32", batch_size=8)
