"""``fixed_modes``: factors left at their initial values, the others as plain ALS / HALS."""

from __future__ import annotations

import numpy as np
import pytest
from reference import full, gram_except, low_rank, mttkrp

import peekcore
from peekcore.model import CPModel


def _reference(x, factors, n_iter, fixed, sweeps=0):
    """Dense float64 ALS (``sweeps=0``) or HALS over the modes not in ``fixed``."""
    factors = [np.array(f, dtype=np.float64) for f in factors]
    for _ in range(n_iter):
        for mode in range(x.ndim):
            if mode in fixed:
                continue
            m, g = mttkrp(x, factors, mode), gram_except(factors, mode)
            if not sweeps:
                factors[mode] = np.linalg.solve(g, m.T).T
                continue
            f = factors[mode]
            for _ in range(sweeps):
                for r in range(f.shape[1]):
                    f[:, r] = np.maximum(0, f[:, r] + (m[:, r] - f @ g[:, r]) / g[r, r])
    return factors


@pytest.mark.parametrize("fixed", [[0], [1], [2], [0, 2]])
@pytest.mark.parametrize("method", ["als", "hals"])
def test_fixed_modes_equal_the_dense_reference(rng, kernel, fixed, method):
    x, _ = low_rank(rng, (40, 6, 7), 3, noise=0.05)
    x = np.abs(x) if method == "hals" else x
    start = [rng.random((n, 3)) + 0.1 for n in x.shape]
    init = CPModel(np.ones(3), start)
    fit = peekcore.cp_als if method == "als" else peekcore.ncp_hals
    extra = {} if method == "als" else {"sweeps": 2}
    model = fit(
        x, 3, init=init, n_iter_max=4, tol=0, fixed_modes=fixed, chunk_size=7, kernel=kernel,
        **extra,
    )  # fmt: skip
    want = _reference(x, start, 4, fixed, sweeps=extra.get("sweeps", 0))
    got = full(model.factors, model.weights)
    np.testing.assert_allclose(got, full(want), rtol=1e-9, atol=1e-9 * np.abs(x).max())
    resid = np.linalg.norm(x - full(want)) / np.linalg.norm(x)
    assert model.fit == pytest.approx(1 - resid, abs=1e-9)


def test_bad_fixed_modes_are_refused(rng):
    x = rng.standard_normal((5, 3, 4))
    for bad, match in [([3], "not a mode"), ([1, 1], "twice"), ([0, 1, 2], "every mode")]:
        with pytest.raises(ValueError, match=match):
            peekcore.cp_als(x, 2, fixed_modes=bad, n_iter_max=1)
    with pytest.raises(TypeError, match="list of mode numbers"):
        peekcore.cp_als(x, 2, fixed_modes=1, n_iter_max=1)
