"""Data of any magnitude gives the model of the unscaled data (peekcore.solvers.scaling)."""

from __future__ import annotations

import numpy as np
import pytest

import peekcore
from peekcore.solvers.scaling import ScaledSource, choose_scale

SCALES = {"float32": [1e-30, 1e-25, 1e20, 1e30], "float64": [1e-300, 1e-200, 1e200, 1e300]}
# float32: the pass sums in float32 (rounding ~1e-7 a step, over a few iterations)
RTOL = {"float32": 5e-5, "float64": 1e-12}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(3).random((30, 6, 5))


@pytest.mark.parametrize("dtype", list(SCALES))
@pytest.mark.parametrize("solver", ["cp_als", "ncp_hals"])
def test_fit_is_the_same_model_at_any_scale(x, dtype, solver):
    fit = getattr(peekcore, solver)
    # HALS from a random start is not scale-equivariant even in exact arithmetic (the start
    # does not scale with the data); from the Gram start, as ALS, it is
    kw = dict(n_iter_max=8, tol=0, init="gram" if solver == "ncp_hals" else "random")
    ref = fit(x.astype(dtype), 3, **kw)
    for c in SCALES[dtype]:
        m = fit((x * c).astype(dtype), 3, **kw)
        assert m.history.stop_reason == "n_iter_max"
        np.testing.assert_allclose(m.history.fit, ref.history.fit, rtol=RTOL[dtype])
        assert _rel(m.reconstruct() / c, ref.reconstruct()) < RTOL[dtype] * 10
        np.testing.assert_allclose(m.weights / c, ref.weights, rtol=RTOL[dtype] * 10)


@pytest.mark.parametrize("dtype", list(SCALES))
def test_sweep_is_the_same_at_any_scale(x, dtype):
    kw = dict(n_iter_max=6, tol=0)
    ref = peekcore.rank_sweep(x.astype(dtype), "1-3", 2, **kw)
    for c in (SCALES[dtype][0], SCALES[dtype][-1]):
        sweep = peekcore.rank_sweep((x * c).astype(dtype), "1-3", 2, **kw)
        assert sweep.chosen_rank == ref.chosen_rank
        np.testing.assert_allclose(sweep.fit, ref.fit, rtol=RTOL[dtype])
        model, base = sweep.model(), ref.model()
        assert _rel(model.reconstruct() / c, base.reconstruct()) < RTOL[dtype] * 10


def test_scale_is_an_exact_power_of_two_and_only_when_needed(x):
    import torch

    assert choose_scale(peekcore.sources.as_source(x), torch.float64) == 1.0
    assert choose_scale(peekcore.sources.as_source(x * 1e20), torch.float64) == 1.0
    tiny = (x * 1e-25).astype(np.float32)
    scale = choose_scale(peekcore.sources.as_source(tiny), torch.float32)
    assert np.frexp(scale)[0] == 0.5  # a power of two
    chunk = next(ScaledSource(peekcore.sources.as_source(tiny), scale).chunks(30))
    assert chunk.dtype == np.float32 and 0.5 <= np.max(chunk) < 1
    np.testing.assert_array_equal(chunk / np.float32(scale), tiny)  # exact both ways
    # all zeros where it samples: left to the pass to report
    assert choose_scale(peekcore.sources.as_source(np.zeros((4, 2, 2))), torch.float32) == 1.0


def test_init_model_and_checkpoints_follow_the_scale(x, tmp_path):
    tiny = (x * 1e-30).astype(np.float32)
    kw = dict(tol=0, random_state=1)
    first = peekcore.cp_als(tiny, 2, n_iter_max=3, **kw)
    warm = peekcore.cp_als(tiny, 2, n_iter_max=2, init=first, **kw)
    assert warm.fit >= first.fit - 1e-6 and warm.history.fit[0] >= first.history.fit[-1] - 1e-6
    ckpt = tmp_path / "c.npz"
    peekcore.cp_als(tiny, 2, n_iter_max=3, checkpoint=ckpt, **kw)
    resumed = peekcore.cp_als(tiny, 2, n_iter_max=6, resume=ckpt, **kw)
    straight = peekcore.cp_als(tiny, 2, n_iter_max=6, **kw)
    np.testing.assert_array_equal(resumed.weights, straight.weights)
