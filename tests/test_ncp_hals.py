"""ncp_hals against a float64 numpy HALS, TensorLy, and on degenerate data."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import peekcore
from peekcore.model import CPModel, normalize_factors

SHAPES = [(23, 6, 5), (17, 4, 3, 5)]


def _relu_low_rank(rng, shape, rank, noise=0.1):
    factors = [rng.random((n, rank)) for n in shape]
    x = ref.full(factors)
    x = x + noise * x.std() * rng.standard_normal(shape)
    return np.maximum(x, 0)


@pytest.mark.parametrize("shape", SHAPES, ids=["3way", "4way"])
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["chunk1", "chunk7", "chunkall"])
def test_matches_dense_numpy_hals(rng, kernel, shape, chunk):
    rank, sweeps = 3, 2
    x = _relu_low_rank(rng, shape, rank)
    init = CPModel(np.ones(rank), [rng.random((n, rank)) + 0.05 for n in shape])
    want = normalize_factors(ref.hals(x, init.factors, n_iter=10, sweeps=sweeps))
    kw = dict(n_iter_max=10, tol=0, init=init, sweeps=sweeps, kernel=kernel)
    model = peekcore.ncp_hals(x, rank, chunk_size=chunk or shape[0], **kw)
    assert model.history.inner_sweeps == [sweeps] * 10
    ref.assert_model_close(model, *want, 1e-10)
    assert all(np.all(f >= 0) for f in model.factors)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_objective_never_increases(rng, kernel, dtype):
    x = _relu_low_rank(rng, (40, 9, 8), 4, noise=0.3).astype(dtype)
    m = peekcore.ncp_hals(x, 5, n_iter_max=40, tol=0, random_state=3, kernel=kernel)
    err = np.asarray(m.history.rel_error)
    slack = 1e-12 if dtype == np.float64 else 1e-5
    assert np.all(np.diff(err) <= slack * err[:-1])


def test_quality_against_tensorly_hals(rng, kernel):
    tl = pytest.importorskip("tensorly")
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import non_negative_parafac_hals

    tl.set_backend("numpy")
    shape, rank = (40, 10, 9), 4
    x = _relu_low_rank(rng, shape, rank, noise=0.2)
    factors = [rng.random((n, rank)) for n in shape]
    theirs = non_negative_parafac_hals(
        x,
        rank,
        n_iter_max=100,
        init=CPTensor((np.ones(rank), [f.copy() for f in factors])),
        tol=0,
    )
    err_theirs = 1 - ref.dense_fit(x, list(theirs.factors), np.asarray(theirs.weights))
    ours = peekcore.ncp_hals(
        x,
        rank,
        n_iter_max=100,
        tol=0,
        kernel=kernel,
        init=CPModel(np.ones(rank), factors),
    )
    err_ours = 1 - ref.dense_fit(x, ours.factors, ours.weights)
    assert err_ours <= err_theirs + 1e-3


def _no_nan(model):
    assert np.all(np.isfinite(model.weights))
    assert all(np.all(np.isfinite(f)) for f in model.factors)
    assert all(np.isfinite(model.history.fit))


def test_zero_channel(rng, kernel):
    x = _relu_low_rank(rng, (30, 6, 5), 2)
    x[:, 2, :] = 0
    for fit in (peekcore.ncp_hals, peekcore.cp_als):
        m = fit(x, 2, n_iter_max=30, kernel=kernel)
        _no_nan(m)
        assert m.fit > 0.8


def test_constant_tensor(kernel):
    x = np.full((20, 4, 3), 2.5)
    for rank in (1, 3):
        m = peekcore.ncp_hals(x, rank, n_iter_max=50, kernel=kernel)
        _no_nan(m)
        assert m.fit > 0.999
        m = peekcore.cp_als(x, rank, n_iter_max=50, kernel=kernel)
        _no_nan(m)


def test_rank_above_true_rank(rng, kernel):
    x = _relu_low_rank(rng, (30, 6, 5), 2, noise=0.0)
    m = peekcore.ncp_hals(x, 6, n_iter_max=100, kernel=kernel)
    _no_nan(m)
    assert m.fit > 0.99
    m = peekcore.cp_als(x, 6, n_iter_max=100, kernel=kernel)
    _no_nan(m)


def test_dead_component_is_reseeded_and_recorded(rng, kernel):
    # two zero columns of one component: each freezes the other's update (its HALS
    # denominator, a product of the other modes' column norms, is zero), so it is dead
    shape, rank = (30, 6, 5), 3
    x = _relu_low_rank(rng, shape, rank)
    factors = [rng.random((n, rank)) + 0.1 for n in shape]
    factors[1][:, 2] = 0
    factors[2][:, 2] = 0
    init = CPModel(np.ones(rank), factors)
    m = peekcore.ncp_hals(x, rank, n_iter_max=20, tol=0, kernel=kernel, init=init)
    _no_nan(m)
    events = m.history.reseeds
    assert {"iteration": 1, "mode": 1, "component": 2} in events
    assert {"iteration": 1, "mode": 2, "component": 2} in events
    assert np.all(m.weights > 0)  # the component came back to life


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_one_zero_column_recovers_by_itself(rng, kernel, mode):
    # one zero column is not a dead component: its own update divides by the other
    # modes' column norms, which are not zero, so HALS moves it again without help
    shape, rank, sweeps = (30, 6, 5), 3, 2
    x = _relu_low_rank(rng, shape, rank)
    factors = [rng.random((n, rank)) + 0.1 for n in shape]
    factors[mode][:, 1] = 0
    want = normalize_factors(ref.hals(x, factors, n_iter=8, sweeps=sweeps))
    init = CPModel(np.ones(rank), factors)
    m = peekcore.ncp_hals(x, rank, n_iter_max=8, tol=0, sweeps=sweeps, kernel=kernel, init=init)
    assert m.history.reseeds == []
    ref.assert_model_close(m, *want, 1e-10)
    assert np.all(m.weights > 0)


def test_gram_init_is_not_reseeded_and_matches_dense_hals(rng, kernel):
    import torch

    from peekcore.solvers.init import Initializer
    from peekcore.sources import as_source

    # init="gram" starts the sample factor at zero; the first pass fills it
    x = _relu_low_rank(rng, (40, 8, 6), 3)
    sweeps = 2
    start = Initializer(
        "gram",
        as_source(x),
        nonneg=True,
        chunk_size=x.shape[0],
        compute_dtype=torch.float64,
        device=torch.device("cpu"),
    )
    a0, resident = start.factors(3, 0)
    assert not np.any(a0.numpy())
    init = [a0.numpy()] + [f.numpy() for f in resident]
    want = normalize_factors(ref.hals(x, init, n_iter=6, sweeps=sweeps))
    m = peekcore.ncp_hals(x, 3, n_iter_max=6, tol=0, init="gram", sweeps=sweeps, kernel=kernel)
    assert m.history.reseeds == []
    ref.assert_model_close(m, *want, 1e-10)


def test_negative_values_refused_with_range(rng, kernel):
    x = _relu_low_rank(rng, (30, 6, 5), 2)
    x[17, 1, 1] = -0.5
    x[19, 0, 0] = -0.1
    with pytest.raises(ValueError, match=r"samples 17\.\.19 of the chunk at 10\.\.19.*cp_als"):
        peekcore.ncp_hals(x, 2, chunk_size=10, kernel=kernel)
    with pytest.raises(ValueError, match=r"samples 17\.\.17"):
        x[19, 0, 0] = 0
        peekcore.ncp_hals(x, 2, chunk_size=10, init="gram")


def test_negative_init_refused(rng):
    x = _relu_low_rank(rng, (10, 4, 3), 2)
    bad = CPModel(np.ones(2), [rng.standard_normal((n, 2)) for n in x.shape])
    with pytest.raises(ValueError, match="nonnegative initial model"):
        peekcore.ncp_hals(x, 2, init=bad)


def test_gram_init_nonnegative(rng, kernel):
    x = _relu_low_rank(rng, (40, 8, 6), 3)
    m = peekcore.ncp_hals(x, 3, n_iter_max=30, init="gram", kernel=kernel)
    _no_nan(m)
    assert all(np.all(f >= 0) for f in m.factors)
    assert m.fit > 0.8
