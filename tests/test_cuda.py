"""CUDA paths against the CPU float64 reference (skipped without a GPU and CuPy).

Fresh random data, sizes that are multiples of no tile size, outputs poisoned
before each run so that unwritten elements fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import peekcore
from peekcore.kernels import cuda_available
from peekcore.kernels.base import ALS, HALS
from peekcore.kernels.reference import TorchKernel, hals_rows
from peekcore.solvers.resident import gram_inverse, hadamard

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and CuPy"),
]

STORED = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 13, 11), (29, 5, 7, 3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture(autouse=True)
def _strict_fp32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("stored", STORED, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=["3way", "4way"])
@pytest.mark.parametrize("update", [ALS, HALS])
@pytest.mark.parametrize("rank", [5, 17])
def test_pass_chunk_matches_float64_reference(rng, stored, shape, update, rank):
    from peekcore.kernels.cuda import CudaKernel

    dims = shape[1:]
    width = int(np.prod(dims))
    x64 = torch.from_numpy(np.abs(rng.standard_normal((shape[0], width))))
    x = x64.to(stored)  # what is stored; the reference sees exactly these values
    factors = [torch.from_numpy(rng.random((n, rank)) + 0.1) for n in dims]
    g_full = hadamard([f.T @ f for f in factors])
    g = gram_inverse(g_full) if update == ALS else g_full
    a0 = torch.from_numpy(rng.random((shape[0], rank)))
    t0 = torch.from_numpy(rng.standard_normal((rank, width)))
    ata0 = torch.from_numpy(rng.standard_normal((rank, rank)))

    ref = TorchKernel("cpu")
    ref_stats = ref.new_statistics(rank, width, torch.float64)
    ref_stats.t += t0
    ref_stats.ata += ata0
    a_ref = a0.clone()
    n_ref = ref.pass_chunk(
        x.double(), factors, g, a_ref, ref_stats, dims=dims, update=update, sweeps=3, want_norm=True
    )

    dev = torch.device("cuda")
    kern = CudaKernel(dev)
    stats = kern.new_statistics(rank, width, torch.float32)
    stats.t += t0.float().to(dev)
    stats.ata += ata0.to(dev)
    a = (
        a0.float().to(dev)
        if update == HALS
        else torch.full((shape[0], rank), float("nan"), device=dev)
    )
    holder = kern.prepare_factors([f.to(dev) for f in factors], torch.float32)
    n = kern.pass_chunk(
        x.to(dev), holder, g.to(dev), a, stats, dims=dims, update=update, sweeps=3, want_norm=True
    )
    torch.cuda.synchronize()
    assert torch.isfinite(a).all()
    assert _rel(a, a_ref) < 2e-5
    assert _rel(stats.t - t0.float().to(dev), ref_stats.t - t0) < 2e-5
    assert _rel(stats.ata - ata0.to(dev), ref_stats.ata - ata0) < 2e-5
    assert abs(float(n) - float(n_ref)) <= 1e-10 * float(n_ref)


@pytest.mark.parametrize("rank", [3, 33])
def test_hals_update_kernel_matches_torch(rng, rank):
    from peekcore.kernels.cuda import CudaKernel

    kern = CudaKernel("cuda")
    f = torch.from_numpy(rng.random((301, rank)))
    m = torch.from_numpy(rng.random((301, rank)) * rank)
    b = torch.from_numpy(rng.random((50, rank)))
    g = b.T @ b
    want = hals_rows(f.clone(), m, g, 4)
    got = kern.hals_update(f.cuda(), m.cuda(), g.cuda(), 4)
    assert _rel(got, want) < 1e-12


WIDTHS = (5, 17, 1, 9, 64)  # models side by side: 96 columns, one at the kernel's limit


def _block_diagonal_system(rng, rows, widths):
    """MTTKRP split in two float32 terms, powers-of-two scales, a Gram whose
    off-diagonal blocks hold garbage (the kernel must not read them)."""
    rank = sum(widths)
    m = torch.from_numpy(rng.random((rows, 2 * rank))).float()
    inv_scale = torch.exp2(torch.from_numpy(rng.integers(-3, 4, rank)).double())
    g = torch.from_numpy(rng.standard_normal((rank, rank))) * 1e3
    lo = 0
    for w in widths:
        b = torch.from_numpy(rng.random((w + 7, w)))
        g[lo : lo + w, lo : lo + w] = b.T @ b
        lo += w
    return m, inv_scale, g


@pytest.mark.parametrize("hals", [False, True], ids=["als", "hals"])
def test_update_rows_solves_each_model_from_its_own_block(rng, hals):
    from peekcore.kernels.cuda import CudaKernel

    kern = CudaKernel("cuda")
    rows, rank = 301, sum(WIDTHS)
    m, inv_scale, g = _block_diagonal_system(rng, rows, WIDTHS)
    a0 = torch.from_numpy(rng.random((rows, rank))).float()
    msum = (m[:, :rank].double() + m[:, rank:].double()) * inv_scale
    want = torch.empty((rows, rank), dtype=torch.float64)
    lo = 0
    for w in WIDTHS:
        blk = slice(lo, lo + w)
        if hals:
            want[:, blk] = hals_rows(a0[:, blk].double().clone(), msum[:, blk], g[blk, blk], 3)
        else:
            want[:, blk] = msum[:, blk] @ g[blk, blk]
        lo += w
    a = a0.clone() if hals else torch.full((rows, rank), float("nan"))  # ALS writes every entry
    a = a.cuda()
    kern.update_rows(
        m.cuda(), inv_scale.cuda(), g.cuda(), a, WIDTHS, hals=hals, sweeps=3 if hals else 1
    )
    assert not torch.isnan(a).any()
    assert _rel(a, want) < 1e-6


def test_hals_update_kernel_handles_models_side_by_side(rng):
    from peekcore.kernels.cuda import CudaKernel

    kern = CudaKernel("cuda")
    rank = sum(WIDTHS)
    _, _, g = _block_diagonal_system(rng, 1, WIDTHS)
    f = torch.from_numpy(rng.random((203, rank)))
    m = torch.from_numpy(rng.random((203, rank)) * 10)
    want = f.clone()
    lo = 0
    for w in WIDTHS:
        blk = slice(lo, lo + w)
        want[:, blk] = hals_rows(f[:, blk].clone(), m[:, blk], g[blk, blk], 4)
        lo += w
    got = kern.hals_update(f.cuda(), m.cuda(), g.cuda(), 4, blocks=WIDTHS)
    assert _rel(got, want) < 1e-12


def test_nonnegative_sweep_wider_than_one_kernel_row_matches_cpu(rng):
    """72 stacked columns (> 64, the row kernel's width): each model still runs in the
    kernel, from its own block; the sweep equals the CPU float64 sweep."""
    from peekcore.sweep import rank_sweep

    x = np.abs(rng.standard_normal((230, 11, 9)))
    kw = dict(n_iter_max=6, tol=0, method="ncp", progress=False)
    cpu = rank_sweep(x, range(1, 9), 2, **kw)
    gpu = rank_sweep(torch.from_numpy(x).float().cuda(), range(1, 9), 2, device="cuda", **kw)
    assert gpu.models[0][0].metadata["kernel"] == "cuda"
    np.testing.assert_allclose(gpu.fit, cpu.fit, rtol=0, atol=1e-4)


@pytest.mark.parametrize("stored", STORED, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("method", ["cp_als", "ncp_hals"])
def test_fit_on_gpu_matches_cpu(rng, stored, method):
    shape, rank = (203, 19, 3, 7), 4
    x = torch.from_numpy(np.abs(rng.standard_normal(shape))).to(stored)
    fit = getattr(peekcore, method)
    kw = dict(n_iter_max=8, tol=0, random_state=1, chunk_size=61, progress=False)
    cpu = fit(x.double(), rank, **kw)
    gpu = fit(x.cuda(), rank, device="cuda", **kw)
    assert gpu.metadata["kernel"] == "cuda"
    assert _rel(torch.from_numpy(gpu.weights), torch.from_numpy(cpu.weights)) < 1e-4
    for a, b in zip(gpu.factors, cpu.factors, strict=True):
        assert _rel(torch.from_numpy(a), torch.from_numpy(b)) < 1e-4


def test_host_sources_stream_to_the_gpu(rng):
    shape, rank = (150, 11, 9), 3
    x = np.abs(rng.standard_normal(shape)).astype(np.float32)
    kw = dict(n_iter_max=5, tol=0, random_state=2, chunk_size=40, progress=False, device="cuda")
    resident = peekcore.cp_als(torch.from_numpy(x).cuda(), rank, **kw)
    pinned = peekcore.cp_als(torch.from_numpy(x).pin_memory(), rank, **kw)
    pageable = peekcore.cp_als(x, rank, **kw)
    for m in (pinned, pageable):
        np.testing.assert_allclose(m.weights, resident.weights, rtol=1e-6)


def test_cupy_array_is_read_zero_copy(rng):
    import cupy

    x = np.abs(rng.standard_normal((60, 7, 6))).astype(np.float32)
    kw = dict(n_iter_max=4, tol=0, random_state=0, progress=False, device="cuda")
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
    kw = dict(n_iter_max=9, tol=0, random_state=3, chunk_size=67, progress=False, device="cuda")
    eager = _graphs_off(monkeypatch, lambda: fit(x, rank, **kw))
    graphed = fit(x, rank, **kw)
    assert eager.metadata["graphed_iterations"] == 0
    assert graphed.metadata["graphed_iterations"] == kw["n_iter_max"] - 1  # all but the first
    np.testing.assert_allclose(graphed.history.fit, eager.history.fit, rtol=0, atol=1e-6)
    for a, b in zip(graphed.factors, eager.factors, strict=True):
        assert _rel(torch.from_numpy(a), torch.from_numpy(b)) < 1e-5


def test_graphs_follow_a_sweep_whose_models_stop_at_different_times(rng, monkeypatch):
    """Each time a model converges the stack shrinks and a new graph is captured."""
    from peekcore.sweep import rank_sweep

    x, _ = _planted(rng, (160, 12, 9), 3)
    kw = dict(n_iter_max=25, tol=1e-5, device="cuda", progress=False)
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
    kw = dict(n_iter_max=6, tol=0, random_state=0, progress=False, device="cuda")
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
        assert _rel(torch.from_numpy(a), torch.from_numpy(b)) < 1e-6


def _planted(rng, shape, rank):
    """A nonnegative rank-``rank`` float32 tensor on the card plus 5% noise."""
    factors = [rng.random((n, rank)) for n in shape]
    x = np.einsum("ir,jr,kr->ijk", *factors)
    x = x + 0.05 * x.std() * rng.standard_normal(shape)
    return torch.from_numpy(x).float().cuda(), factors
