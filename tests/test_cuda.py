"""GPU-only paths (skipped without a GPU and CuPy): sources streamed to the card,
zero-copy CuPy input, CUDA-graph replay. The pass itself, on the GPU and in its
torch form on the CPU, is in ``test_kernels.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

import peekcore
from peekcore.kernels import cuda_kernels_available

pytestmark = [
    pytest.mark.usefixtures("strict_fp32"),
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA device and CuPy"),
]


def test_host_sources_stream_to_the_gpu(rng):
    shape, rank = (150, 11, 9), 3
    x = np.abs(rng.standard_normal(shape)).astype(np.float32)
    kw = dict(n_iter_max=5, tol=0, random_state=2, chunk_size=40, device="cuda")
    resident = peekcore.cp_als(torch.from_numpy(x).cuda(), rank, **kw)
    pinned = peekcore.cp_als(torch.from_numpy(x).pin_memory(), rank, **kw)
    pageable = peekcore.cp_als(x, rank, **kw)
    for m in (pinned, pageable):
        np.testing.assert_allclose(m.weights, resident.weights, rtol=1e-6)


def test_cupy_array_is_read_zero_copy(rng):
    import cupy

    x = np.abs(rng.standard_normal((60, 7, 6))).astype(np.float32)
    kw = dict(n_iter_max=4, tol=0, random_state=0, device="cuda")
    a = peekcore.cp_als(cupy.asarray(x), 3, **kw)
    b = peekcore.cp_als(torch.from_numpy(x).cuda(), 3, **kw)
    np.testing.assert_array_equal(a.weights, b.weights)


# ------------------------------------------------------------------ CUDA graphs


def _graphs_off(monkeypatch, fn):
    """``fn()`` with CUDA-graph replay turned off (the eager reference)."""
    with monkeypatch.context() as m:
        m.setenv("PEEKCORE_CUDA_GRAPHS", "0")
        return fn()


@pytest.mark.parametrize("stored", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("method", ["cp_als", "ncp_hals"])
def test_graph_replay_equals_eager_iterations(rng, monkeypatch, stored, method):
    """Data on the card: iterations after the first replay one captured graph, with
    the results of eager iterations."""
    shape, rank = (211, 13, 3, 7), 5
    x = torch.from_numpy(np.abs(rng.standard_normal(shape))).to(stored).cuda()
    fit = getattr(peekcore, method)
    kw = dict(n_iter_max=9, tol=0, random_state=3, chunk_size=67, device="cuda")
    eager = _graphs_off(monkeypatch, lambda: fit(x, rank, **kw))
    graphed = fit(x, rank, **kw)
    assert eager.metadata["graphed_iterations"] == 0
    assert graphed.metadata["graphed_iterations"] == kw["n_iter_max"] - 1  # all but the first
    np.testing.assert_allclose(graphed.history.fit, eager.history.fit, rtol=0, atol=1e-6)
    for a, b in zip(graphed.factors, eager.factors, strict=True):
        assert ref.rel_error(torch.from_numpy(a), torch.from_numpy(b)) < 1e-5


def test_graphs_follow_a_sweep_whose_models_stop_at_different_times(rng, monkeypatch):
    """Each time a model converges the stack shrinks and a new graph is captured."""
    from peekcore.sweep import rank_sweep

    x, _ = _planted(rng, (160, 12, 9), 3)
    kw = dict(n_iter_max=25, tol=1e-5, device="cuda")
    eager = _graphs_off(monkeypatch, lambda: rank_sweep(x, [1, 2, 3, 4], 2, **kw))
    graphed = rank_sweep(x, [1, 2, 3, 4], 2, **kw)
    stops = {len(m.history.fit) for row in graphed.models for m in row}
    assert len(stops) > 1, "the case should make models stop at different iterations"
    for row_g, row_e in zip(graphed.models, eager.models, strict=True):
        for g, e in zip(row_g, row_e, strict=True):
            assert len(g.history.fit) == len(e.history.fit)
            assert g.metadata["graphed_iterations"] > 0
            np.testing.assert_allclose(g.history.fit, e.history.fit, rtol=0, atol=1e-6)
    np.testing.assert_allclose(graphed.corcondia, eager.corcondia, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("failure", ["capture", "disagreement"])
def test_a_graph_that_fails_falls_back_to_eager_with_a_warning(rng, monkeypatch, failure):
    from peekcore.solvers import graphs

    x = torch.from_numpy(np.abs(rng.standard_normal((90, 8, 7)))).float().cuda()
    kw = dict(n_iter_max=6, tol=0, random_state=0, device="cuda")
    eager = _graphs_off(monkeypatch, lambda: peekcore.cp_als(x, 3, **kw))
    if failure == "capture":

        def broken_graph(*args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(graphs.torch.cuda, "graph", broken_graph)
    else:
        monkeypatch.setattr(graphs, "agree", lambda *args: False)
    with pytest.warns(RuntimeWarning, match="CUDA-graph replay"):
        model = peekcore.cp_als(x, 3, **kw)
    assert model.metadata["graphed_iterations"] == 0
    np.testing.assert_allclose(model.history.fit, eager.history.fit, rtol=0, atol=1e-7)
    for a, b in zip(model.factors, eager.factors, strict=True):
        assert ref.rel_error(torch.from_numpy(a), torch.from_numpy(b)) < 1e-6


def _planted(rng, shape, rank):
    """A nonnegative rank-``rank`` float32 tensor on the card plus 5% noise."""
    factors = [rng.random((n, rank)) for n in shape]
    x = np.einsum("ir,jr,kr->ijk", *factors)
    x = x + 0.05 * x.std() * rng.standard_normal(shape)
    return torch.from_numpy(x).float().cuda(), factors
