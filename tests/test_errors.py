"""Bad input gets a clear error that says what was wrong and how to fix it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import peekcore
from peekcore.errors import DataError
from peekcore.model import CPModel


def fit(x, rank=2, **kw):
    kw.setdefault("n_iter_max", 3)
    return peekcore.cp_als(x, rank, **kw)


@pytest.fixture
def x(rng):
    return rng.standard_normal((20, 5, 4))


def test_nan_names_the_sample(x, kernel):
    x[13, 2, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN or Inf at sample 13: clean"):
        fit(x, chunk_size=5, kernel=kernel)
    x[11, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"at sample 11 \(and 1 more samples up to 13\)"):
        fit(x, chunk_size=5, kernel=kernel)


def test_inf_with_gram_init(x):
    x[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf at sample 3:"):
        fit(x, chunk_size=4, init="gram")


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(x, rank):
    with pytest.raises(ValueError, match="rank must be at least 1"):
        fit(x, rank)


@pytest.mark.parametrize("rank", [2.5, "3", True, None])
def test_rank_not_an_integer(x, rank):
    with pytest.raises(TypeError, match="rank must be a positive integer"):
        fit(x, rank)


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


@pytest.mark.parametrize(
    ("pieces", "why"),
    [
        (lambda x: [x[:10], x[10:, :, :3]], r"chunk at samples 10\.\.20 has shape \(10, 5, 3\)"),
        (lambda x: [x[:15]], "yielded 15 samples.*declares 20"),
    ],
    ids=["chunks-change-shape", "wrong-count"],
)
def test_custom_source_that_breaks_its_own_shape(x, pieces, why):
    class Bad:
        shape = x.shape
        dtype = "float64"

        def chunks(self, chunk_size):
            yield from pieces(x)

    with pytest.raises(ValueError, match=why):
        fit(Bad())


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
    # a CPU tensor works on the CPU device; a wrong device string fails clearly (torch's own
    # RuntimeError became peekcore's message naming the devices it takes)
    fit(torch.from_numpy(x))
    with pytest.raises(ValueError, match="not a device torch knows: use 'cpu', 'cuda'"):
        fit(x, device="not-a-device")


# ------------------------------------------------ review: all-zero data, seeds, rank, messages


@pytest.mark.parametrize("solver", [peekcore.cp_als, peekcore.ncp_hals], ids=["als", "hals"])
def test_all_zero_data_with_gram_init(solver):
    # the Gram pass measures ||X||^2: it refuses all-zero data as the first fit pass does
    with pytest.raises(ValueError, match="the data is all zeros"):
        solver(np.zeros((6, 3, 4)), 2, init="gram", n_iter_max=3)


@pytest.mark.parametrize(
    "seed",
    [np.random.default_rng(0), np.random.RandomState(0), 1.5, "3", True],
    ids=["Generator", "RandomState", "float", "str", "bool"],
)
@pytest.mark.parametrize("solver", [peekcore.cp_als, peekcore.ncp_hals], ids=["als", "hals"])
def test_random_state_must_be_an_integer_seed(x, solver, seed):
    with pytest.raises(TypeError, match="random_state must be None or a nonnegative integer"):
        solver(np.abs(x), 2, random_state=seed, init="gram", n_iter_max=2)


def test_negative_random_state(x):
    with pytest.raises(ValueError, match="random_state must be None or a nonnegative integer"):
        fit(x, random_state=-1)


def test_rank_limit_is_the_product_of_the_other_modes(rng, x):
    # x is 20 x 5 x 4: mode 0's Gram (5x5 Gram * 4x4 Gram) has rank <= 20
    with pytest.raises(ValueError, match=r"rank 21 .*mode 0.* at most 20.*rank <= 20"):
        fit(x, 21)
    # the same rule for a resident mode: 3 x 40 x 2 has mode 1's Gram of rank <= 6
    with pytest.raises(ValueError, match=r"rank 7 .*mode 1.* at most 6.*rank <= 6"):
        fit(rng.standard_normal((3, 40, 2)), 7)
    fit(rng.standard_normal((3, 40, 2)), 6)  # above N = 3, and well posed


@pytest.mark.parametrize("dtype", ["int32", np.int64, "complex64", "nonsense"])
def test_dtype_argument_names_itself(x, dtype):
    with pytest.raises(ValueError, match=r"dtype= sets the accumulation.*'float32' or 'float64'"):
        fit(x, dtype=dtype)


@pytest.mark.parametrize("every", [None, 2.5, "3", True])
def test_checkpoint_every_must_be_an_integer(x, every, tmp_path):
    with pytest.raises(TypeError, match="checkpoint_every must be a positive integer"):
        fit(x, checkpoint=tmp_path / "c.npz", checkpoint_every=every)


@pytest.mark.parametrize("every", [0, -2])
def test_checkpoint_every_must_be_positive(x, every, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        fit(x, checkpoint=tmp_path / "c.npz", checkpoint_every=every)


def test_float32_overflow_in_gram_pass_is_not_called_nan(x):
    # finite; the squares of sample 5 overflow float32, and the rows sampled to choose a
    # scale (0..3, 8..11, 16..19) do not show it
    big = np.abs(x).astype(np.float32)
    big[5] *= np.float32(1e20)
    assert np.all(np.isfinite(big))
    for solver in (peekcore.cp_als, peekcore.ncp_hals):
        with pytest.raises(ValueError, match=r"overflowed float32.*dtype='float64'") as err:
            solver(big, 2, init="gram", n_iter_max=2)
        assert "NaN" not in str(err.value)
    m = fit(big, init="gram", dtype="float64")  # as the message says
    assert np.isfinite(m.fit)
    # finite float64 whose squares overflow float64 is not "NaN or Inf" either
    huge = np.abs(x)
    huge[5] *= 1e200
    with pytest.raises(ValueError, match=r"samples 5\.\.5 overflowed float64.*rescale") as err:
        fit(huge, chunk_size=1)
    assert "NaN" not in str(err.value)


def test_rank_sweep_checks_seed_and_zeros_too(x):
    from peekcore.sweep import rank_sweep

    kw = dict(n_iter_max=2)
    with pytest.raises(TypeError, match="random_state must be None or a nonnegative integer"):
        rank_sweep(x, [1, 2], random_state=np.random.default_rng(0), **kw)
    with pytest.raises(TypeError, match="rank_sweep needs an integer random_state"):
        rank_sweep(x, [1, 2], random_state=None, **kw)
    sweep = rank_sweep(x, [1, 2], replicates=2, random_state=np.int64(4), **kw)
    seeds = [m.metadata["random_state"] for row in sweep.models for m in row]
    assert seeds == [4, 5, 4, 5] and all(type(s) is int for s in seeds)
    with pytest.raises(ValueError, match="the data is all zeros"):
        rank_sweep(np.zeros((6, 3, 4)), [1, 2], compress=True, **kw)
