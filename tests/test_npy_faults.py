"""``.npy`` data files cut short, before or while they are read (issue 16, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import peekcore
from peekcore.errors import DataError
from peekcore.npyfile import NpyFile
from peekcore.sources import as_source


@pytest.fixture
def npy(rng, tmp_path):
    x = rng.standard_normal((50, 4, 6)).astype(np.float32)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return path, x


def test_npy_chunks_shards_and_fits_equal_the_array(npy):
    path, x = npy
    src = as_source(path)
    assert isinstance(src, NpyFile) and src.shape == x.shape and src.dtype == "float32"
    for size in (7, 50, 64):
        np.testing.assert_array_equal(np.concatenate(list(src.chunks(size))), x)
    np.testing.assert_array_equal(np.concatenate(list(src.shard(10, 33).chunks(5))), x[10:33])
    a = peekcore.cp_als(path, 3, n_iter_max=5, init="random", random_state=1)
    b = peekcore.cp_als(x, 3, n_iter_max=5, init="random", random_state=1)
    np.testing.assert_allclose(a.fit, b.fit, rtol=1e-6)


def test_fortran_ordered_npy_is_still_read(npy, tmp_path):
    _, x = npy
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(x))
    np.testing.assert_array_equal(np.concatenate(list(as_source(path).chunks(16))), x)


@pytest.mark.parametrize("keep", [-1, -300, 100])
def test_a_truncated_npy_is_refused_with_a_clear_error(npy, keep):
    path, _ = npy
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    what = "is truncated" if keep < 0 else "not a readable .npy file"
    with pytest.raises(DataError, match=what):
        as_source(path)
    with pytest.raises(DataError, match=what):
        peekcore.cp_als(path, 2)


SHRINK = """
import os, sys
import numpy as np
from peekcore.sources import as_source
path, mapped = sys.argv[1], sys.argv[2] == "mapped"
src = np.load(path, mmap_mode="r") if mapped else as_source(path)
chunks = iter([src[i : i + 10] for i in range(0, 50, 10)]) if mapped else src.chunks(10)
first = np.array(next(chunks))
os.truncate(path, os.path.getsize(path) // 2)
try:
    rest = [np.array(c) for c in chunks]
except Exception as err:
    print(type(err).__name__, err)
"""


@pytest.mark.slow  # child processes reading a file cut short: 11 s
def test_an_npy_that_shrinks_while_it_is_read_gives_an_error_not_sigbus(npy, tmp_path):
    path, _ = npy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", SHRINK, str(path), "read"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DataError") and "shrank while it was read" in run.stdout
    # what a memory map does (and as_source did): the process dies of SIGBUS
    np.save(path, np.zeros((50, 4, 6), np.float32))
    mapped = subprocess.run(
        [sys.executable, "-c", SHRINK, str(path), "mapped"], capture_output=True, env=env
    )
    assert mapped.returncode == -7  # SIGBUS


def test_capture_refuses_a_truncated_npy_of_inputs(rng, tmp_path):
    from test_capture import SmallCNN

    path = tmp_path / "images.npy"
    np.save(path, rng.standard_normal((20, 1, 8, 8)).astype(np.float32))
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(DataError, match=r"images.npy is truncated: its header declares 20 rows"):
        peekcore.capture(SmallCNN(), path, "conv1", tmp_path / "s.zarr")


CAPTURE_SHRINK = """
import os, sys
import numpy as np
import torch
import peekcore

path, store = sys.argv[1], sys.argv[2]

class Cutter(torch.nn.Module):
    # cuts the input file short once the first batch has run
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            os.truncate(path, 4096)
        return self.conv(x)

try:
    peekcore.capture(Cutter(), path, "conv", store, batch_size=20, chunk_size=20,
                     dtype="float32")
except Exception as err:
    print(type(err).__name__, err)
"""


@pytest.mark.slow  # a capture in a child process: 6 s
def test_capture_from_an_npy_that_shrinks_gives_an_error_not_sigbus(rng, tmp_path):
    # before: the inputs were memory-mapped, and the next batch's read killed the process
    path = tmp_path / "images.npy"
    np.save(path, rng.standard_normal((400, 1, 8, 8)).astype(np.float32))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", CAPTURE_SHRINK, str(path), str(tmp_path / "s.zarr")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DataError") and "shrank while it was read" in run.stdout


def test_capture_from_an_npy_path_equals_capture_from_the_array(rng, tmp_path):
    from test_capture import SmallCNN

    x = rng.standard_normal((37, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "images.npy"
    np.save(path, x)
    kw = dict(batch_size=8, dtype="float32")
    a = peekcore.capture(SmallCNN(), path, ["conv1", "conv2"], tmp_path / "a.zarr", **kw)
    b = peekcore.capture(SmallCNN(), x, ["conv1", "conv2"], tmp_path / "b.zarr", **kw)
    for layer in ("conv1", "conv2"):
        np.testing.assert_array_equal(
            np.concatenate(list(a[layer].chunks(10))), np.concatenate(list(b[layer].chunks(10)))
        )
    # a per-sample transform indexes rows one by one
    t = dict(kw, transform=lambda row: row.float() * 2)
    c = peekcore.capture(SmallCNN(), path, "conv1", tmp_path / "c.zarr", **t)
    d = peekcore.capture(SmallCNN(), x, "conv1", tmp_path / "d.zarr", **t)
    np.testing.assert_array_equal(
        np.concatenate(list(c["conv1"].chunks(10))), np.concatenate(list(d["conv1"].chunks(10)))
    )


def test_npy_array_indexes_as_numpy_does(npy):
    from peekcore.npyfile import NpyArray

    path, x = npy
    a = NpyArray(path)
    assert a.shape == x.shape and a.dtype == x.dtype and len(a) == 50 and a.nbytes == x.nbytes
    for index in (0, 49, -1, -50, slice(3, 17), slice(None), slice(40, 80), slice(10, 2)):
        np.testing.assert_array_equal(a[index], x[index])
    for index in (slice(1, 30, 4), slice(None, None, -3)):
        np.testing.assert_array_equal(a[index], x[index])
    np.testing.assert_array_equal(np.asarray(a), x)
    with pytest.raises(IndexError, match="out of range"):
        a[50]
    with pytest.raises(TypeError):
        a[1.5]


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_an_npy_path_that_is_no_regular_file_is_refused(tmp_path, kind):
    # before: a FIFO blocked until a writer came, then "[Errno 29] Illegal seek"
    path = tmp_path / "x.npy"
    {"fifo": lambda: os.mkfifo(path), "device": lambda: path.symlink_to("/dev/zero"),
     "folder": path.mkdir}[kind]()  # fmt: skip
    with pytest.raises(DataError, match="x.npy is not a regular file"):
        as_source(path)
    with pytest.raises(DataError, match="x.npy is not a regular file"):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
        peekcore.capture(model, path, "0", tmp_path / "s.zarr")


def test_grey_npy_inputs_of_the_command_line_are_read_by_rows(rng, tmp_path):
    # before: peek capture mapped an N x H x W .npy (SIGBUS if it shrank meanwhile)
    from peekcore.demo import DigitsCNN
    from peekcore.loading import load_inputs
    from peekcore.npyfile import NpyArray

    x = rng.standard_normal((12, 8, 8)).astype(np.float32)
    np.save(tmp_path / "grey.npy", x)
    data, notes = load_inputs(str(tmp_path / "grey.npy"), DigitsCNN())
    assert isinstance(data.inputs, NpyArray) and data.inputs.shape == (12, 1, 8, 8)
    np.testing.assert_array_equal(data.inputs[3:7], x[3:7, None])
    np.testing.assert_array_equal(data.inputs[-1], x[-1, None])
    np.testing.assert_array_equal(data.batch(0, 12)[0].numpy(), x[:, None])
    with pytest.raises(ValueError, match="cannot be"):
        NpyArray(tmp_path / "grey.npy", row_shape=(2, 8, 8))
