"""The CUDA pass against the float64 reference, on both of its backends.

On a GPU its custom kernels run (CuPy or the extension); with
``backend="torch"`` each custom kernel is replaced by its torch form, so the
pass's own logic (half products split into several terms, powers-of-two
scales, models side by side) also runs, and is checked, on the CPU. Fresh
random data, sizes that are multiples of no tile size, outputs poisoned where
the pass must write every element.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

import peekcore
from peekcore.kernels import cuda_kernels_available
from peekcore.kernels.base import ALS, HALS
from peekcore.kernels.cuda import CudaKernel, split_into
from peekcore.kernels.reference import TorchKernel, hals_rows
from peekcore.solvers.resident import gram_inverse, hadamard

pytestmark = pytest.mark.usefixtures("strict_fp32")

STORED = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 13, 11), (29, 5, 7, 3)]
WHERE = [
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(
        ("cuda", None),
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA device and CuPy"),
        ],
    ),
]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("stored", STORED, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=["3way", "4way"])
@pytest.mark.parametrize("update", [ALS, HALS])
@pytest.mark.parametrize("rank", [5, 17])
def test_pass_chunk_matches_float64_reference(rng, where, stored, shape, update, rank):
    dims = shape[1:]
    width = int(np.prod(dims))
    x = torch.from_numpy(np.abs(rng.standard_normal((shape[0], width)))).to(stored)
    factors = [torch.from_numpy(rng.random((n, rank)) + 0.1) for n in dims]
    g_full = hadamard([f.T @ f for f in factors])
    g = gram_inverse(g_full) if update == ALS else g_full
    a0 = torch.from_numpy(rng.random((shape[0], rank)))
    t0 = torch.from_numpy(rng.standard_normal((rank, width)))
    ata0 = torch.from_numpy(rng.standard_normal((rank, rank)))

    reference = TorchKernel("cpu")
    want = reference.new_statistics(rank, width, torch.float64)
    want.t += t0
    want.ata += ata0
    a_want = a0.clone()
    kw = dict(dims=dims, update=update, sweeps=3, want_norm=True)
    n_want = reference.pass_chunk(x.double(), factors, g, a_want, want, **kw)

    kern = CudaKernel(*where)
    dev = kern.device
    got = kern.new_statistics(rank, width, torch.float32)
    got.t += t0.float().to(dev)
    got.ata += ata0.to(dev)
    # ALS must write every row: start from NaN
    a = a0.float() if update == HALS else torch.full((shape[0], rank), float("nan"))
    a = a.to(dev)
    holder = kern.prepare_factors([f.to(dev) for f in factors], torch.float32)
    n = kern.pass_chunk(x.to(dev), holder, g.to(dev), a, got, **kw)
    kern.synchronize()
    assert torch.isfinite(a).all()
    assert ref.rel_error(a, a_want) < 2e-5
    assert ref.rel_error(got.t - t0.float().to(dev), want.t - t0) < 2e-5
    assert ref.rel_error(got.ata - ata0.to(dev), want.ata - ata0) < 2e-5
    assert abs(float(n) - float(n_want)) <= 1e-10 * float(n_want)


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


def _per_block(widths, fn):
    lo = 0
    for w in widths:
        fn(slice(lo, lo + w))
        lo += w


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("hals", [False, True], ids=["als", "hals"])
def test_update_rows_solves_each_model_from_its_own_block(rng, where, hals):
    kern = CudaKernel(*where)
    rows, rank = 301, sum(WIDTHS)
    m, inv_scale, g = _block_diagonal_system(rng, rows, WIDTHS)
    a0 = torch.from_numpy(rng.random((rows, rank))).float()
    msum = (m[:, :rank].double() + m[:, rank:].double()) * inv_scale
    want = torch.empty((rows, rank), dtype=torch.float64)

    def solve(blk):
        if hals:
            want[:, blk] = hals_rows(a0[:, blk].double().clone(), msum[:, blk], g[blk, blk], 3)
        else:
            want[:, blk] = msum[:, blk] @ g[blk, blk]

    _per_block(WIDTHS, solve)
    a = (a0.clone() if hals else torch.full((rows, rank), float("nan"))).to(kern.device)
    dev = kern.device
    kern.update_rows(
        m.to(dev), inv_scale.to(dev), g.to(dev), a, WIDTHS, hals=hals, sweeps=3 if hals else 1
    )
    kern.synchronize()
    assert not torch.isnan(a).any()
    assert ref.rel_error(a, want) < 1e-6


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("widths", [(3,), (33,), WIDTHS], ids=["r3", "r33", "side-by-side"])
def test_hals_update_matches_torch(rng, where, widths):
    kern = CudaKernel(*where)
    rank = sum(widths)
    _, _, g = _block_diagonal_system(rng, 1, widths)
    f = torch.from_numpy(rng.random((203, rank)))
    m = torch.from_numpy(rng.random((203, rank)) * 10)
    want = f.clone()

    def sweep(blk):
        want[:, blk] = hals_rows(f[:, blk].clone(), m[:, blk], g[blk, blk], 4)

    _per_block(widths, sweep)
    dev = kern.device
    got = kern.hals_update(f.to(dev), m.to(dev), g.to(dev), 4, blocks=widths)
    assert ref.rel_error(got, want) < 1e-12


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("stored", STORED, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("method", ["cp_als", "ncp_hals"])
def test_fit_through_the_pass_matches_the_cpu_fit(rng, where, stored, method):
    shape, rank = (203, 19, 3, 7), 4
    x = torch.from_numpy(np.abs(rng.standard_normal(shape))).to(stored)
    fit = getattr(peekcore, method)
    kw = dict(n_iter_max=8, tol=0, random_state=1, chunk_size=61, progress=False)
    want = fit(x.double(), rank, **kw)
    kern = CudaKernel(*where)
    got = fit(x.to(kern.device), rank, kernel=kern, device=kern.device, **kw)
    assert got.metadata["kernel"] == "cuda"
    assert ref.rel_error(torch.from_numpy(got.weights), torch.from_numpy(want.weights)) < 1e-4
    for a, b in zip(got.factors, want.factors, strict=True):
        assert ref.rel_error(torch.from_numpy(a), torch.from_numpy(b)) < 1e-4


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("method", ["cp", "ncp"])
def test_sweep_wider_than_one_kernel_row_matches_cpu(rng, where, method):
    """72 stacked columns (> 64, the row kernel's width): each model runs from its
    own block; the sweep equals the CPU float64 sweep."""
    from peekcore.sweep import rank_sweep

    x = np.abs(ref.low_rank(rng, (230, 11, 9), 3, noise=0.2)[0])
    kw = dict(n_iter_max=6, tol=0, method=method, progress=False)
    want = rank_sweep(x, range(1, 9), 2, **kw)
    kern = CudaKernel(*where)
    data = torch.from_numpy(x).float().to(kern.device)
    got = rank_sweep(data, range(1, 9), 2, kernel=kern, device=kern.device, **kw)
    assert got.models[0][0].metadata["kernel"] == "cuda"
    np.testing.assert_allclose(got.fit, want.fit, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_terms_carry_the_bits_of_float64(rng, dtype):
    """2 float16 terms keep ~22 bits, 3 bfloat16 terms ~24 (values scaled into range)."""
    v = torch.from_numpy(rng.uniform(0.5, 1.0, (200, 7)))
    terms = {torch.float16: 2, torch.bfloat16: 3}[dtype]
    out = torch.empty((200, terms * 7), dtype=dtype)
    split_into(v, out)
    back = sum(out[:, t * 7 : (t + 1) * 7].double() for t in range(terms))
    assert float((back - v).abs().max()) < 2.0**-21
    assert float((out[:, :7].double() - v).abs().max()) > 2.0**-14  # one term is not enough


def test_the_gpu_kernel_needs_a_gpu_unless_it_runs_as_torch():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CudaKernel("cpu", backend="cupy")
    with pytest.raises(ValueError, match="backend must be"):
        CudaKernel("cpu", backend="opencl")
