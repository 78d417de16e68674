"""pytest-benchmark cases for the pass (run with: pytest benchmarks --benchmark-enable)."""

from __future__ import annotations

import numpy as np
import pytest

import peekcore
from peekcore.model import CPModel

SHAPE = (500, 256, 196)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(SHAPE, dtype=np.float32))
    init = CPModel(np.ones(16), [rng.random((n, 16)) for n in SHAPE])
    return x, init


@pytest.mark.parametrize("kernel", peekcore.kernels.names())
@pytest.mark.parametrize("stored", ["float32", "float16"])
def test_cp_als_iteration(benchmark, data, kernel, stored):
    x, init = data
    x = x.astype(stored)
    benchmark.pedantic(
        lambda: peekcore.cp_als(
            x, 16, n_iter_max=2, tol=0, init=init, kernel=kernel, progress=False
        ),
        rounds=3,
        iterations=1,
    )
