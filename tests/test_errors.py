"""Bad input gets a clear error that says what was wrong and how to fix it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import peekcore
from peekcore.model import CPModel


def fit(x, rank=2, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("n_iter_max", 3)
    return peekcore.cp_als(x, rank, **kw)


@pytest.fixture
def x(rng):
    return rng.standard_normal((20, 5, 4))


def test_nan_names_the_sample_range(x, kernel):
    x[13, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in samples 10\.\.14"):
        fit(x, chunk_size=5, kernel=kernel)


def test_inf_with_gram_init(x):
    x[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf in samples 0\.\.3"):
        fit(x, chunk_size=4, init="gram")


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(x, rank):
    with pytest.raises(ValueError, match="rank must be at least 1"):
        fit(x, rank)


@pytest.mark.parametrize("rank", [2.5, "3", True, None])
def test_rank_not_an_integer(x, rank):
    with pytest.raises(TypeError, match="rank must be a positive integer"):
        fit(x, rank)


def test_rank_above_sample_count(x):
    with pytest.raises(ValueError, match="exceeds the number of samples"):
        fit(x, 21)


def test_order_below_three_says_why(rng):
    with pytest.raises(ValueError, match=r"order >= 3.*no unique\s+CP decomposition"):
        fit(rng.standard_normal((10, 4)))


def test_empty_sample_mode():
    with pytest.raises(ValueError, match="sample mode is empty"):
        fit(np.zeros((0, 3, 4)))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, bool, np.complex64])
def test_non_float_dtype(dtype):
    with pytest.raises(TypeError, match=r"floating-point data.*astype\(np.float32\)"):
        fit(np.ones((6, 3, 4), dtype=dtype))


def test_all_zero_data():
    with pytest.raises(ValueError, match="all zeros"):
        fit(np.zeros((6, 3, 4)))


def test_custom_source_whose_chunks_change_shape(x):
    class Bad:
        shape = x.shape
        dtype = "float64"

        def chunks(self, chunk_size):
            yield x[:10]
            yield x[10:, :, :3]

    with pytest.raises(ValueError, match=r"chunk at samples 10\.\.20 has shape \(10, 5, 3\)"):
        fit(Bad())


def test_custom_source_with_wrong_count(x):
    class Short:
        shape = x.shape
        dtype = "float64"

        def chunks(self, chunk_size):
            yield x[:15]

    with pytest.raises(ValueError, match="yielded 15 samples.*declares 20"):
        fit(Short())


def test_unknown_input_type():
    with pytest.raises(TypeError, match="cannot read data of type dict"):
        fit({"a": 1})


def test_missing_npy(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        fit(str(tmp_path / "nope.npy"))


def test_half_accumulation_refused(x):
    with pytest.raises(ValueError, match="accumulation in half is not"):
        fit(x, dtype="float16")


def test_bad_init(x):
    with pytest.raises(ValueError, match="init must be"):
        fit(x, init="svd!")
    wrong = CPModel(np.ones(2), [np.ones((n, 2)) for n in (20, 5, 5)])
    with pytest.raises(ValueError, match="initial model has shape"):
        fit(x, init=wrong)


def test_unknown_kernel(x):
    with pytest.raises(ValueError, match="unknown kernel"):
        fit(x, kernel="fortran")


def test_failed_save_leaves_no_partial_file(tmp_path, x, monkeypatch):
    model = fit(x)
    target = tmp_path / "model.npz"
    model.save(target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save(target)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]  # no temp files
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "other.npz")
    assert not (tmp_path / "other.npz").exists()


def test_torch_gpu_tensor_needs_a_gpu_only_when_used(x):
    # a CPU tensor works on the CPU device; a wrong device string fails clearly
    fit(torch.from_numpy(x))
    with pytest.raises(RuntimeError):
        fit(x, device="not-a-device")
