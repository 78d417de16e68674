"""The kernel contract, one body over every kernel, then what is particular to each.

Every available kernel (the torch reference, the C++ extension, the CUDA
pass with its custom kernels as torch operations on the CPU, the CUDA pass
on a GPU) runs ``pass_chunk`` and the resident HALS update over storage
dtypes x ALS/HALS x one model or models side by side, against a plain float64
numpy reference on fresh random data. Sizes are multiples of no tile size;
outputs the pass must write in full start as NaN.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch

import peekcore
from peekcore import _native
from peekcore.kernels import cuda_kernels_available
from peekcore.kernels.base import ALS, HALS
from peekcore.kernels.cuda import CudaKernel, split_into
from peekcore.kernels.cuda_launch import KERNEL_NAMES, TEMPLATES, _KernelLauncher
from peekcore.kernels.ops import hals_rows
from peekcore.kernels.reference import TorchKernel
from peekcore.kernels.storage import STORAGE_TYPES, storage_code, storage_enum_source

pytestmark = pytest.mark.usefixtures("strict_fp32")
ROOT = Path(__file__).resolve().parent.parent
_GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cuda_kernels_available(), reason="needs a CUDA device and CuPy"),
]
_NATIVE = pytest.mark.skipif(not _native.available(), reason="native extension not built")


def _native_kernel():
    from peekcore.kernels.native import NativeKernel

    return NativeKernel("cpu")


KERNELS = [
    pytest.param(lambda: TorchKernel("cpu"), id="torch"),
    pytest.param(_native_kernel, id="native", marks=_NATIVE),
    pytest.param(lambda: CudaKernel("cpu", backend="torch"), id="cuda-as-torch"),
    pytest.param(lambda: CudaKernel("cuda"), id="cuda", marks=_GPU),
]
STORED = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# one model, or models side by side as a rank sweep stacks them
MODELS = [
    pytest.param((5,), id="r5"),
    pytest.param((17,), id="r17"),
    pytest.param((3, 1, 6), id="stack"),
]


def _dtype_id(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _block_gram(rng, widths, garbage: float = 0.0) -> np.ndarray:
    """An SPD Gram per model on the diagonal; ``garbage`` scales random off-diagonal
    blocks (0: a true block-diagonal Gram)."""
    rank = sum(widths)
    g = rng.standard_normal((rank, rank)) * garbage
    lo = 0
    for w in widths:
        b = rng.random((w + 7, w))
        g[lo : lo + w, lo : lo + w] = b.T @ b
        lo += w
    return g


def _blocks_of(widths):
    lo = 0
    for w in widths:
        yield slice(lo, lo + w)
        lo += w


def _hals64(a: np.ndarray, m: np.ndarray, g: np.ndarray, sweeps: int) -> np.ndarray:
    """Plain float64 HALS sweeps over the columns, in order."""
    a = a.copy()
    for _ in range(sweeps):
        for r in range(a.shape[1]):
            if g[r, r] > 0:
                a[:, r] = np.maximum(0.0, a[:, r] + (m[:, r] - a @ g[:, r]) / g[r, r])
    return a


def _pass64(x, factors, g, a0, update, sweeps):
    """One chunk's pass in float64: new rows, their T and A^T A, and ||X||^2."""
    m = ref.mttkrp(x, [None, *factors], 0)
    a = m @ g if update == ALS else _hals64(a0, m, g, sweeps)
    flat = x.reshape(x.shape[0], -1)
    return a, a.T @ flat, a.T @ a, float(np.sum(flat**2))


@pytest.mark.parametrize("make", KERNELS)
@pytest.mark.parametrize("stored", STORED, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(37, 13, 11), (29, 5, 7, 3)], ids=["3way", "4way"])
@pytest.mark.parametrize("update", [ALS, HALS])
@pytest.mark.parametrize("widths", MODELS)
def test_pass_chunk_matches_float64_reference(rng, make, stored, shape, update, widths):
    kern = make()
    dev = kern.device
    dims, rank = shape[1:], sum(widths)
    width = int(np.prod(dims))
    compute = torch.float64 if stored == torch.float64 else torch.float32
    tol = 1e-12 if compute == torch.float64 else 2e-5
    x = torch.from_numpy(np.abs(rng.standard_normal((shape[0], width)))).to(stored)
    factors = [rng.random((n, rank)) + 0.1 for n in dims]
    in_model = _block_gram(rng, widths) != 0  # each model's block of the Gram, zeros between
    g_full = np.where(in_model, ref.gram_except([np.ones((1, rank)), *factors], 0), 0.0)
    g = np.linalg.inv(g_full) if update == ALS else g_full
    a0 = rng.random((shape[0], rank))
    t0 = rng.standard_normal((rank, width))
    ata0 = rng.standard_normal((rank, rank))

    # the rows a kernel starts from are what it holds: rounded to the compute dtype
    a_start = torch.from_numpy(a0).to(compute)
    x64 = x.double().numpy().reshape(shape)
    a_want, t_want, ata_want, n_want = _pass64(x64, factors, g, a_start.double().numpy(), update, 3)

    stats = kern.new_statistics(rank, width, compute)
    stats.t += torch.from_numpy(t0).to(dev, compute)
    stats.ata += torch.from_numpy(ata0).to(dev)
    a = (
        a_start.clone()
        if update == HALS
        else torch.full((shape[0], rank), float("nan"), dtype=compute)
    )
    a = a.to(dev)
    holder = kern.prepare_factors([torch.from_numpy(f).to(dev) for f in factors], compute)
    blocks = widths if len(widths) > 1 else None
    n = kern.pass_chunk(
        x.to(dev),
        holder,
        torch.from_numpy(g).to(dev),
        a,
        stats,
        dims=dims,
        update=update,
        sweeps=3,
        want_norm=True,
        blocks=blocks,
    )
    kern.synchronize()
    assert torch.isfinite(a).all()
    assert stats.rows == shape[0]
    assert ref.rel_error(a, a_want) < tol
    assert ref.rel_error(stats.t.cpu().double().numpy() - t0, t_want) < tol
    ata = stats.ata.cpu().numpy() - ata0
    for blk in _blocks_of(widths):  # a kernel may skip the blocks between models
        assert ref.rel_error(ata[blk, blk], ata_want[blk, blk]) < tol
    assert abs(float(n) - n_want) <= 1e-10 * n_want


@pytest.mark.parametrize("make", KERNELS)
@pytest.mark.parametrize("widths", [(3,), (33,), (5, 17, 1, 9, 64)], ids=["r3", "r33", "stack"])
def test_hals_update_matches_float64_reference(rng, make, widths):
    """The resident update solves each model from its own block of the Gram and
    reads none of the blocks between models (they hold garbage here)."""
    kern = make()
    dev = kern.device
    rank = sum(widths)
    g = _block_gram(rng, widths, garbage=1e3)
    f = rng.random((203, rank))
    m = rng.random((203, rank)) * 10
    want = np.empty_like(f)
    for blk in _blocks_of(widths):
        want[:, blk] = _hals64(f[:, blk], m[:, blk], g[blk, blk], 4)
    t = [torch.from_numpy(v).to(dev) for v in (f, m, g)]
    got = kern.hals_update(*t, 4, blocks=widths if len(widths) > 1 else None)
    assert ref.rel_error(got, want) < 1e-12
    assert ref.rel_error(t[0], f) == 0  # a new tensor; the input is left as it was


def test_reference_hals_rows_matches_plain_float64(rng):
    """The torch HALS sweeps every kernel falls back on equal the plain loop."""
    g = _block_gram(rng, (6,))
    f, m = rng.random((50, 6)), rng.random((50, 6)) * 5
    got = hals_rows(torch.from_numpy(f.copy()), torch.from_numpy(m), torch.from_numpy(g), 3)
    assert ref.rel_error(got, _hals64(f, m, g, 3)) < 1e-13


# ----------------------------------------------- one table for C++, CUDA and Python


def test_storage_enum_in_the_header_is_the_python_table():
    header = (ROOT / "csrc/include/peekcore/pass_math.h").read_text()
    assert storage_enum_source() in header
    assert [s.code for s in STORAGE_TYPES] == list(range(len(STORAGE_TYPES)))
    with pytest.raises(TypeError, match="convert them to one of"):
        storage_code(torch.int8)


def test_kernel_names_are_the_instances_cp_pass_cu_compiles():
    """nvcc builds instantiate by hand what NVRTC instantiates by name: the same set."""
    source = (ROOT / "csrc/cuda/cp_pass.cu").read_text()
    compiled = {
        f"peekcore::{name}<{', '.join(t.strip() for t in args.split(','))}>"
        for name, args in re.findall(r"template __global__ void (\w+)<([^>]*)>", source)
    }
    templated = {n for n in KERNEL_NAMES if "<" in n}
    assert templated == compiled
    assert set(TEMPLATES) == {n.removeprefix("peekcore::").split("<")[0] for n in KERNEL_NAMES}


class _Recorder(_KernelLauncher):
    """Computes every launch as a compiled backend would, and keeps it."""

    name = "recorder"

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.launches = []

    def run(self, launch):
        self.launches.append(launch)


def test_every_launch_fits_its_kernel_and_the_extension_entry():
    """Each launch names a compiled instance, and the extension launcher passes
    exactly the parameters its entry in ``csrc/bindings.cpp`` takes (the stub
    ``_core.pyi`` declares one such entry per kernel)."""
    rec = _Recorder()
    rows, rank, width = 300, 7, 1000
    f16 = torch.float16
    rec.sum_squares(torch.zeros(width, dtype=f16))
    fs = [torch.zeros(10, rank, dtype=torch.float64), torch.zeros(100, rank, dtype=torch.float64)]
    rec.khatri_rao(
        fs, torch.ones(rank, dtype=torch.float64), 2, torch.zeros(width, 2 * rank, dtype=f16)
    )
    a = torch.zeros(rows, rank)
    rec.update_rows(
        torch.zeros(rows, 2 * rank),
        torch.ones(rank),
        torch.eye(rank),
        a,
        (3, 4),
        hals=True,
        sweeps=2,
    )
    rec.split_rows(a, torch.ones(rank), torch.zeros(rows, 2 * rank, dtype=f16))
    rec.add_split(torch.zeros(2 * rank, width), torch.ones(rank), torch.zeros(rank, width))
    assert [x.kernel for x in rec.launches] == list(TEMPLATES)

    # the lambdas' parameter names, e.g. {"sum_squares": ["storage", "x", ..., "stream"]}
    bindings = (ROOT / "csrc/bindings.cpp").read_text()
    params = {
        kernel: [p.split()[-1] for p in args.split(",")]
        for kernel, args in re.findall(r'm\.def\(\s*"cuda_(\w+)",\s*\[=\]\(([^)]*)\)', bindings)
    }
    stub = ast.parse((ROOT / "peekcore/_core.pyi").read_text())
    declared = {
        node.target.id.removeprefix("cuda_")
        for node in stub.body
        if isinstance(node, ast.AnnAssign) and node.target.id.startswith("cuda_")
    }
    assert set(params) == declared == set(TEMPLATES)
    for launch in rec.launches:
        assert launch.name in KERNEL_NAMES
        takes = params[launch.kernel]
        code = [] if launch.dtype is None else ["storage"]
        assert len(takes) == len(code) + len(launch.args) + 5, launch.kernel
        assert takes[: len(code)] == code
        assert takes[-5:] == ["gx", "gy", "block", "shared", "stream"]
    rows_launch = rec.launches[2]
    assert rows_launch.grid == (3, 2)  # 300 rows / 128 threads, one y per model
    assert rows_launch.shared == 8 * 4 * 4  # the widest model's block of G


def test_rows_beyond_the_kernel_run_as_torch():
    """Models wider than the row kernel (or mixed dtypes) are solved by torch operations."""
    rec = _Recorder()
    a = torch.zeros(10, 70)
    rec.update_rows(
        torch.ones(10, 70), torch.ones(70), torch.eye(70), a, (70,), hals=False, sweeps=1
    )
    assert rec.launches == []
    assert torch.equal(a, torch.ones(10, 70))


# --------------------------------------------------------------- the CUDA pass
# On a GPU its custom kernels run (CuPy or the extension); with backend="torch"
# each is replaced by its torch form, so the pass's own logic (half products
# split into several terms, powers-of-two scales, models side by side) also
# runs, and is checked, on the CPU.

WHERE = [
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cuda", None), id="cuda", marks=_GPU),
]
WIDTHS = (5, 17, 1, 9, 64)  # models side by side: 96 columns, one at the kernel's limit


def _block_diagonal_system(rng, rows, widths):
    """MTTKRP split in two float32 terms, powers-of-two scales, a Gram whose
    off-diagonal blocks hold garbage (the kernel must not read them)."""
    rank = sum(widths)
    m = torch.from_numpy(rng.random((rows, 2 * rank))).float()
    inv_scale = torch.exp2(torch.from_numpy(rng.integers(-3, 4, rank)).double())
    g = torch.from_numpy(_block_gram(rng, widths, garbage=1e3))
    return m, inv_scale, g


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("hals", [False, True], ids=["als", "hals"])
def test_update_rows_solves_each_model_from_its_own_block(rng, where, hals):
    kern = CudaKernel(*where)
    rows, rank = 301, sum(WIDTHS)
    m, inv_scale, g = _block_diagonal_system(rng, rows, WIDTHS)
    a0 = torch.from_numpy(rng.random((rows, rank))).float()
    msum = (m[:, :rank].double() + m[:, rank:].double()) * inv_scale
    want = torch.empty((rows, rank), dtype=torch.float64)
    for blk in _blocks_of(WIDTHS):
        if hals:
            want[:, blk] = hals_rows(a0[:, blk].double().clone(), msum[:, blk], g[blk, blk], 3)
        else:
            want[:, blk] = msum[:, blk] @ g[blk, blk]
    a = (a0.clone() if hals else torch.full((rows, rank), float("nan"))).to(kern.device)
    dev = kern.device
    kern.launcher.update_rows(
        m.to(dev), inv_scale.to(dev), g.to(dev), a, WIDTHS, hals=hals, sweeps=3 if hals else 1
    )
    kern.synchronize()
    assert not torch.isnan(a).any()
    assert ref.rel_error(a, want) < 1e-6


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("stored", STORED[1:], ids=_dtype_id)
@pytest.mark.parametrize("method", ["cp_als", "ncp_hals"])
def test_fit_through_the_pass_matches_the_cpu_fit(rng, where, stored, method):
    shape, rank = (203, 19, 3, 7), 4
    x = torch.from_numpy(np.abs(rng.standard_normal(shape))).to(stored)
    fit = getattr(peekcore, method)
    kw = dict(n_iter_max=8, tol=0, random_state=1, chunk_size=61)
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
    kw = dict(n_iter_max=6, tol=0, method=method)
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
