"""Resuming a capture from a map-style Dataset compares the content of its items.

A generic Dataset's ``data_fingerprint`` is only a description (class and
length), so the resume check also compares the store's ``inputs_fingerprint``
and ``labels_fingerprint`` (the items' content) and refuses a Dataset whose
items change between reads. Partial stores are made as in ``test_store.py``:
a model that raises ``KeyboardInterrupt`` part way, like a process that dies.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import peekcore
import peekcore.datasets as datasets_module
from peekcore import ActivationStore
from peekcore.capture import ModelSource, capture
from peekcore.errors import StoreError

N, D = 30, 4
KW = dict(dtype="float32", batch_size=5, chunk_size=5)


class Items(Dataset):
    """A user's own map-style data set: items ``(input tensor, int label)``; counts reads."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.from_numpy(self.x[i]), int(self.y[i])


class Augmented(Items):
    """Random augmentation: noise from torch's global RNG on every read."""

    def __getitem__(self, i: int):
        x, y = super().__getitem__(i)
        return x + 0.1 * torch.rand(x.shape), y


class Dies(nn.Module):
    """A fixed linear layer whose forward raises after ``budget`` batches (a killed capture)."""

    budget = -1

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 3)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if Dies.budget == 0:
            raise KeyboardInterrupt
        Dies.budget -= 1
        return self.fc(x)


@pytest.fixture
def data(rng):
    return rng.standard_normal((N, D)).astype(np.float32), rng.integers(0, 3, N)


def partial(data_set, path, monkeypatch, budget: int = 3):
    """A store holding the first ``budget`` batches, as a capture killed there leaves it."""
    monkeypatch.setattr(Dies, "budget", budget)
    with pytest.raises(KeyboardInterrupt):
        capture(Dies(), data_set, "fc", path, **KW)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(path)
    monkeypatch.setattr(Dies, "budget", -1)


def files(root):
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def wrap(data_set, how: str):
    return data_set if how == "dataset" else DataLoader(data_set, batch_size=5)


@pytest.mark.parametrize("how", ["dataset", "loader"])
def test_another_dataset_of_the_same_class_and_length_is_refused(data, tmp_path, monkeypatch, how):
    x, y = data
    path = tmp_path / "s.zarr"
    partial(wrap(Items(x, y), how), path, monkeypatch)
    # same class and length (the data_fingerprint, a description, is equal): other inputs
    with pytest.raises(StoreError, match=r"(?s)cannot be resumed.*inputs_fingerprint \(the model"):
        capture(Dies(), wrap(Items(x + 1, y), how), "fc", path, **KW)
    # the same inputs with other labels
    with pytest.raises(StoreError, match=r"labels_fingerprint \(the labels") as err:
        capture(Dies(), wrap(Items(x, (y + 1) % 3), how), "fc", path, **KW)
    assert "inputs_fingerprint" not in str(err.value)
    # nothing was written by the refused calls: the right data still resume it
    resumed = capture(Dies(), wrap(Items(x, y), how), "fc", path, **KW)
    np.testing.assert_array_equal(resumed.labels[:], y)


def test_the_same_dataset_resumes_to_the_uninterrupted_store(data, tmp_path, monkeypatch):
    x, y = data
    path = tmp_path / "s.zarr"
    partial(Items(x, y), path, monkeypatch)
    again = Items(x.copy(), y.copy())  # another object with the same items, as in a new process
    resumed = capture(Dies(), again, "fc", path, **KW)
    whole = capture(Dies(), Items(x, y), "fc", tmp_path / "whole.zarr", **KW)
    assert files(resumed.path) == files(whole.path)
    settings = resumed.attrs["settings"]
    want = peekcore.datasets.as_inputs(Items(x, y), batch_size=5)
    assert settings["inputs_fingerprint"] == want.inputs_fingerprint
    assert settings["labels_fingerprint"] == want.labels_fingerprint is not None
    fc = Dies().fc  # float64 reference of the stored layer
    want = x.astype(np.float64) @ fc.weight.detach().double().numpy().T
    np.testing.assert_allclose(resumed["fc"][:], want + fc.bias.detach().double().numpy(), 1e-5)


@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "torch.manual_seed"])
def test_augmented_data_are_refused_with_the_way_out(data, tmp_path, monkeypatch, seeded):
    x, y = data
    path = tmp_path / "s.zarr"
    if seeded:  # the same global seed in both processes: the first reads agree across runs
        torch.manual_seed(0)
    partial(Augmented(x, y), path, monkeypatch)
    if seeded:
        torch.manual_seed(0)
    with pytest.raises(StoreError, match=r"(?s)item \d+ .*change between reads") as err:
        capture(Dies(), Augmented(x, y), "fc", path, **KW)
    msg = str(err.value)
    assert "overwrite=True" in msg and "deterministic" in msg
    # the way out it names works, and one pass over augmented data is fine
    store = capture(Dies(), Augmented(x, y), "fc", path, overwrite=True, **KW)
    assert store.n_samples == N


def _drop(path, *keys) -> None:
    """Make ``path`` look like a store captured before these settings were recorded."""
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    for key in keys:
        del doc["attributes"]["settings"][key]
    meta.write_text(json.dumps(doc))


def test_a_store_from_before_content_fingerprints_resumes_as_before(data, tmp_path, monkeypatch):
    x, y = data
    path = tmp_path / "s.zarr"
    partial(Items(x, y), path, monkeypatch)
    _drop(path, "inputs_fingerprint", "labels_fingerprint")
    # checked as before, by description: it resumes, saying what was not checked
    with pytest.warns(
        UserWarning, match=r"(?s)before peekcore recorded.*description.*overwrite"
    ) as seen:
        resumed = capture(Dies(), Items(x, y), "fc", path, **KW)
    assert seen[0].filename == __file__  # said where capture() was called
    whole = capture(Dies(), Items(x, y), "fc", tmp_path / "whole.zarr", **KW)
    np.testing.assert_array_equal(resumed["fc"][:], whole["fc"][:])
    assert "inputs_fingerprint" not in resumed.attrs["settings"]
    # complete now: reused without a word (nothing can be mixed into it)
    assert capture(Dies(), Items(x, y), "fc", path, **KW).n_samples == N
    # data checked by content already (arrays): resumed as before, without a warning
    arrays = tmp_path / "arrays.zarr"
    partial((x, y), arrays, monkeypatch)
    _drop(arrays, "inputs_fingerprint", "labels_fingerprint")
    assert capture(Dies(), (x, y), "fc", arrays, **KW).n_samples == N
    # a store with inputs_fingerprint but from before labels_fingerprint: inputs compared
    mid = tmp_path / "mid.zarr"
    partial(Items(x, y), mid, monkeypatch)
    _drop(mid, "labels_fingerprint")
    with pytest.raises(StoreError, match="inputs_fingerprint"):
        capture(Dies(), Items(x + 1, y), "fc", mid, **KW)
    assert capture(Dies(), Items(x, y), "fc", mid, **KW).n_samples == N


def test_the_fingerprint_is_computed_once_per_capture(data, tmp_path, monkeypatch):
    x, y = data
    calls = []
    real = datasets_module.content_fingerprint
    monkeypatch.setattr(
        datasets_module, "content_fingerprint", lambda *a: calls.append(1) or real(*a)
    )
    items = Items(x, y)
    capture(Dies(), items, "fc", tmp_path / "s.zarr", **KW)
    assert len(calls) == 1
    assert items.reads == 2 * N  # one read of each item for the fingerprint, one to capture
    # ModelSource reads no fingerprint: only its first batch at construction
    items = Items(x, y)
    live = ModelSource(Dies(), items, "fc", dtype="float32", batch_size=5)
    assert len(calls) == 1 and items.reads == 5
    assert live.shape == (N, 3)


def test_model_source_still_refuses_augmented_data_on_the_next_pass(data):
    x, y = data
    live = ModelSource(Dies(), Augmented(x, y), "fc", dtype="float32", batch_size=5)
    with pytest.raises(RuntimeError, match="different activations for the same first batch"):
        next(live.chunks(10))
