"""Faults and bad inputs of capture and the live ModelSource (issue 16, items 8 and 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_capture import SmallCNN, Wrap
from test_store import Counting
from torch import nn

import peekcore
from peekcore.capture import ModelSource, capture
from peekcore.errors import InvalidTypeError, OutputPathError


@pytest.fixture
def images(rng):
    return rng.standard_normal((53, 1, 8, 8)).astype(np.float32)


class LateNoise(nn.Module):
    """Deterministic for the first batch; later batches get noise that no seed controls
    (a generator of its own, advanced by every call), as a model with state would."""

    def __init__(self, first: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.first = first
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x):
        out = self.conv(x)
        if torch.equal(x, self.first):
            return out
        return out + 1e-3 * torch.randn(out.shape, generator=self.gen)


def test_model_source_stops_at_the_first_batch_that_differs_from_the_first_pass(images):
    src = ModelSource(Wrap(LateNoise(torch.from_numpy(images[:8]))), images, "m", batch_size=8)
    first = list(src.chunks(8))  # the first pass records each batch's digest
    assert sum(len(c) for c in first) == 53
    second = src.chunks(8)
    np.testing.assert_array_equal(next(second), first[0])  # batch 0 is the same
    with pytest.raises(RuntimeError, match=r"pass 2 for the batch starting at sample 8.*not "):
        next(second)  # batch 1 is not: refused before any of its samples is yielded
    with pytest.raises(RuntimeError, match=r"not deterministic.*peekcore.capture"):
        peekcore.cp_als(src, 2, n_iter_max=3)


def test_model_source_digests_pass_deterministic_models_and_short_passes(images):
    src = ModelSource(SmallCNN(), images, "conv2", batch_size=8)
    partial = src.chunks(16)
    next(partial)  # a pass stopped early records the batches it reached
    partial.close()
    full = [torch.cat(list(src.chunks(size))) for size in (5, 16, 53)]
    for other in full[1:]:
        assert torch.equal(other, full[0])
    assert len(src._digests) == 7  # every batch of 8 of the 53 samples


def test_capture_refuses_layers_none(images, tmp_path):
    with pytest.raises(InvalidTypeError, match=r"layers must be a layer name or a list.*None"):
        capture(SmallCNN(), images, None, tmp_path / "s.zarr")
    with pytest.raises(InvalidTypeError, match="layers must be"):
        capture(SmallCNN(), images, 3, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_capture_refuses_a_store_path_under_a_file_before_any_work(images, tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    calls = Counting.calls
    for store in (tmp_path / "notes.txt" / "s.zarr", tmp_path / "notes.txt" / "a" / "s.zarr"):
        with pytest.raises(OutputPathError, match=r"notes.txt is a file, not a folder"):
            capture(Counting(), images, "conv1", store)
    assert Counting.calls == calls  # refused before the model ran
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


FULL_DISK = """
import resource, sys
import numpy as np
import peekcore
from test_capture import SmallCNN

resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
try:
    peekcore.capture(SmallCNN(), (x, np.arange(40) % 3), ["conv1", "conv2"], sys.argv[1],
                     dtype="float32", chunk_size=8, batch_size=8)
except Exception as err:
    print(type(err).__name__, err)
"""


def _files(path):
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


@pytest.mark.slow  # a child process that fills the disk, then two captures: 5-6 s
@pytest.mark.parametrize("limit", [300, 13000])  # while creating the store; in a chunk write
def test_a_full_disk_is_said_plainly_and_the_capture_resumes_to_the_same_bytes(tmp_path, limit):
    # before: raw "[Errno 27] File too large", or "RuntimeError: writing the store failed:
    # 20480 requested and 13000 written"
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    store = tmp_path / "s.zarr"
    cmd = [sys.executable, "-c", FULL_DISK, str(store), str(limit)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"OutputPathError writing the store {store} failed: the disk")
    assert ("resume" in run.stdout) == (limit == 13000)
    assert sorted(os.listdir(tmp_path)) == (["s.zarr"] if limit == 13000 else [])
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    kw = dict(dtype="float32", chunk_size=8, batch_size=8)
    data = (x, np.arange(40) % 3)
    capture(SmallCNN(), data, ["conv1", "conv2"], store, **kw)  # resumes
    ref = capture(SmallCNN(), data, ["conv1", "conv2"], tmp_path / "ref.zarr", **kw)
    assert _files(store) == _files(ref.path)
