"""cp_als against float64 references: dense numpy ALS, TensorLy, planted models."""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import reference as ref
import torch

import peekcore
from peekcore.diagnostics import factor_match_score
from peekcore.model import CPModel, normalize_factors

SHAPES = [(23, 6, 5), (17, 4, 3, 5)]


def _random_init(rng, shape, rank):
    return CPModel(np.ones(rank), [rng.random((n, rank)) + 0.1 for n in shape])


@pytest.mark.parametrize("shape", SHAPES, ids=["3way", "4way"])
@pytest.mark.parametrize("chunk", [1, 7, None], ids=["chunk1", "chunk7", "chunkall"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(np.float64, 1e-10), (np.float32, 1e-4)], ids=["float64", "float32"]
)
def test_matches_dense_numpy_als(rng, kernel, shape, chunk, dtype, tol):
    """Float64 data to the reference's rounding; float32 data (computed in float32)
    against the same float64 reference, to float32's."""
    rank = 3
    x, _ = ref.low_rank(rng, shape, rank, noise=0.2)
    init = _random_init(rng, shape, rank)
    want = normalize_factors(ref.als(x, init.factors, n_iter=10))
    kw = dict(n_iter_max=10, tol=0, init=init, kernel=kernel, chunk_size=chunk or shape[0])
    model = peekcore.cp_als(x.astype(dtype), rank, **kw)
    assert model.history.n_iter == 10
    assert model.metadata["compute_dtype"] == np.dtype(dtype).name
    ref.assert_model_close(model, *want, tol)


def test_same_fit_as_tensorly_parafac(rng, kernel):
    tl = pytest.importorskip("tensorly")
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    shape, rank = (30, 8, 7), 4
    x, _ = ref.low_rank(rng, shape, rank, noise=0.3)
    init = CPTensor((np.ones(rank), [rng.random((n, rank)) for n in shape]))
    theirs = parafac(
        x,
        rank,
        n_iter_max=20,
        init=init.cp_copy() if hasattr(init, "cp_copy") else init,
        tol=0,
        normalize_factors=False,
    )
    ours = peekcore.cp_als(x, rank, n_iter_max=20, tol=0, init=init, kernel=kernel)
    fit_theirs = ref.dense_fit(x, list(theirs.factors), np.asarray(theirs.weights))
    fit_ours = ref.dense_fit(x, ours.factors, ours.weights)
    assert abs(fit_ours - fit_theirs) < 1e-8


@pytest.mark.parametrize(
    ("shape", "data_seed", "seed"),
    [
        ((60, 12, 10), 1001, 1),
        ((60, 12, 10), 1002, 2),
        ((60, 12, 10), 1003, 3),
        ((40, 6, 5, 7), 77, 5),
    ],
    ids=["3way-seed1", "3way-seed2", "3way-seed3", "4way"],
)
def test_recovers_planted_rank5(kernel, shape, data_seed, seed):
    rank = 5
    x, planted = ref.low_rank(np.random.default_rng(data_seed), shape, rank)
    kw = dict(n_iter_max=500, tol=1e-12, init="random", random_state=seed, kernel=kernel)
    model = peekcore.cp_als(x, rank, **kw)
    assert model.fit > 0.9999
    assert factor_match_score(model, planted) > 0.99


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_reported_fit_equals_dense_fit(rng, kernel, dtype):
    shape, rank = (40, 9, 8), 4
    x, _ = ref.low_rank(rng, shape, rank, noise=0.5)
    model = peekcore.cp_als(x.astype(dtype), rank, n_iter_max=15, tol=0, kernel=kernel)
    assert (
        abs(
            model.fit
            - ref.dense_fit(x.astype(dtype).astype(np.float64), model.factors, model.weights)
        )
        < 1e-6
    )
    # every iteration's fit and error are consistent
    assert np.allclose(np.asarray(model.history.fit) + model.history.rel_error, 1.0)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_input_equals_float32_of_same_values(rng, kernel, half):
    shape, rank = (50, 8, 6), 3
    x, _ = ref.low_rank(rng, shape, rank, noise=0.1)
    xh = torch.from_numpy(x).to(half)
    x32 = xh.to(torch.float32)
    kw = dict(n_iter_max=10, tol=0, random_state=3, kernel=kernel, chunk_size=13)
    mh = peekcore.cp_als(xh, rank, **kw)
    m32 = peekcore.cp_als(x32, rank, **kw)
    assert mh.metadata["dtype"] == str(half).removeprefix("torch.")
    ref.assert_model_close(mh, m32.weights, m32.factors, 1e-5)


def test_float16_numpy_and_memmap_and_npy_path(tmp_path, rng, kernel):
    shape, rank = (33, 7, 5), 3
    x, _ = ref.low_rank(rng, shape, rank, noise=0.1)
    x16 = x.astype(np.float16)
    path = tmp_path / "x.npy"
    np.save(path, x16)
    kw = dict(n_iter_max=8, tol=0, random_state=1, kernel=kernel, chunk_size=10)
    a = peekcore.cp_als(x16, rank, **kw)
    b = peekcore.cp_als(str(path), rank, **kw)
    c = peekcore.cp_als(np.load(path, mmap_mode="r"), rank, **kw)
    for m in (b, c):
        np.testing.assert_array_equal(m.weights, a.weights)


def test_result_independent_of_chunking(rng, kernel):
    shape, rank = (64, 10, 9), 4
    x, _ = ref.low_rank(rng, shape, rank, noise=0.2)
    kw = dict(n_iter_max=12, tol=0, random_state=2, kernel=kernel)
    base = peekcore.cp_als(x, rank, chunk_size=64, **kw)
    for cs in (1, 5, 17):
        m = peekcore.cp_als(x, rank, chunk_size=cs, **kw)
        assert ref.rel_error(m.weights, base.weights) < 1e-11


def test_kernels_agree(rng):
    if "native" not in peekcore.kernels.names():
        pytest.skip("native extension not built")
    shape, rank = (45, 11, 4, 6), 5
    x, _ = ref.low_rank(rng, shape, rank, noise=0.3)
    for dtype, tol in ((np.float64, 1e-11), (np.float32, 1e-4)):
        kw = dict(n_iter_max=6, tol=0, random_state=4, chunk_size=9)
        a = peekcore.cp_als(x.astype(dtype), rank, kernel="native", **kw)
        b = peekcore.cp_als(x.astype(dtype), rank, kernel="torch", **kw)
        assert ref.rel_error(a.weights, b.weights) < tol


def test_gram_init_is_good_and_seeded(rng, kernel):
    shape, rank = (80, 10, 8), 3
    x, planted = ref.low_rank(rng, shape, rank, noise=0.05)
    m = peekcore.cp_als(x, rank, n_iter_max=1, init="gram", kernel=kernel)
    r = peekcore.cp_als(x, rank, n_iter_max=1, init="random", kernel=kernel)
    assert m.metadata["init"] == "gram"
    assert m.fit > r.fit  # the eigenvector start beats a random one after one pass
    # random init is reproducible from the seed
    r2 = peekcore.cp_als(x, rank, n_iter_max=1, init="random", kernel=kernel)
    np.testing.assert_array_equal(r.weights, r2.weights)


def test_stops_on_tolerance_and_records_history(rng, kernel):
    shape, rank = (30, 6, 5), 2
    x, _ = ref.low_rank(rng, shape, rank)
    m = peekcore.cp_als(x, rank, n_iter_max=500, tol=1e-6, kernel=kernel)
    assert m.history.converged and m.history.stop_reason == "tol"
    assert m.history.n_iter < 500
    assert len(m.history.seconds) == m.history.n_iter
    m2 = peekcore.cp_als(x, rank, n_iter_max=3, tol=0, kernel=kernel)
    assert not m2.history.converged and m2.history.stop_reason == "n_iter_max"


def test_normalized_output(rng, kernel):
    shape, rank = (30, 6, 5), 4
    x, _ = ref.low_rank(rng, shape, rank, noise=0.3)
    m = peekcore.cp_als(x, rank, n_iter_max=10, kernel=kernel)
    assert np.all(np.diff(m.weights) <= 0)
    for f in m.factors:
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, rtol=1e-12)
    for f in m.factors[1:]:
        assert np.all(np.sum(f**3, axis=0) >= 0)


def test_callback_can_stop(rng, kernel):
    x, _ = ref.low_rank(rng, (20, 5, 4), 2, noise=0.2)
    seen = []

    def cb(info):
        seen.append(info.iteration)
        return info.iteration == 3

    m = peekcore.cp_als(x, 2, n_iter_max=50, tol=0, callback=cb, kernel=kernel)
    assert seen == [1, 2, 3] and m.history.stop_reason == "callback"


def test_custom_chunk_source(rng, kernel):
    x, _ = ref.low_rank(rng, (26, 5, 4), 2, noise=0.2)

    class Uneven:
        shape = x.shape
        dtype = "float64"

        def chunks(self, chunk_size):
            for lo, hi in ((0, 3), (3, 20), (20, 26)):
                yield x[lo:hi]

    kw = dict(n_iter_max=5, tol=0, random_state=0, kernel=kernel)
    a = peekcore.cp_als(Uneven(), 2, **kw)
    b = peekcore.cp_als(x, 2, **kw)
    assert ref.rel_error(a.weights, b.weights) < 1e-12


_THREADS_SCRIPT = """
import numpy as np, sys
sys.path.insert(0, {tests!r})
import reference as ref
import peekcore
from peekcore.model import CPModel, normalize_factors
rng = np.random.default_rng(3)
shape, rank = (40, 9, 7), 4
x, _ = ref.low_rank(rng, shape, rank, noise=0.2)
init = CPModel(np.ones(rank), [rng.random((n, rank)) + 0.1 for n in shape])

def err(model, want):
    w, f = normalize_factors(want)
    return max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(model.factors, f))


kw = dict(n_iter_max=8, tol=0, init=init, kernel="native")
errs = [err(peekcore.cp_als(x, rank, **kw), ref.als(x, init.factors, n_iter=8))]
xp = np.abs(x)  # HALS, and two models stacked in one pass (a sweep)
errs.append(err(peekcore.ncp_hals(xp, rank, sweeps=2, **kw), ref.hals(xp, init.factors, 8, 2)))
sweep = peekcore.rank_sweep(x, [2, 3], n_iter_max=8, tol=0, kernel="native")
for r in (2, 3):
    alone = peekcore.cp_als(x, r, n_iter_max=8, tol=0, kernel="native")
    errs.append(err(sweep.model(r), [alone.factors[0] * alone.weights, *alone.factors[1:]]))
print(max(errs))
"""


@pytest.mark.slow  # a fresh interpreter per team: 10-14 s each
@pytest.mark.parametrize(
    "env",
    [
        {"OMP_NUM_THREADS": "3"},  # more threads than cores, uneven column split
        {"OMP_NUM_THREADS": "2", "OMP_THREAD_LIMIT": "1"},  # the team is smaller than asked
        {"OMP_NUM_THREADS": "3", "PEEKCORE_CPU_KERNELS": "blas"},  # CPUs without AVX-512
    ],
    ids=["3threads", "team-smaller-than-asked", "blas-kernels"],
)
def test_native_pass_is_exact_for_any_team(env):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = _THREADS_SCRIPT.format(tests=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-10


# ------------------------------------------- the native pass merges trailing modes


def test_trailing_modes_are_merged_where_the_leading_rows_allow():
    from peekcore.kernels.native import MIN_LEADING_ROWS, trailing_start

    assert MIN_LEADING_ROWS == 64
    assert trailing_start([256, 196]) == 1  # 3-way: nothing to merge
    assert trailing_start([256, 14, 14]) == 1  # C x (H*W)
    assert trailing_start([8, 9, 3, 4]) == 2  # (8*9) x (3*4)
    assert trailing_start([3, 64, 64]) == 2  # 3 rows are too few to share: C*H x W
    assert trailing_start([2, 3, 4]) == 2  # never enough rows: the last mode alone
    # a wide machine keeps 4 rows per thread: 64 x 56 x 56 on 128 threads
    assert trailing_start([64, 56, 56], threads=2) == 1
    assert trailing_start([64, 56, 56], threads=128) == 2


def test_khatri_rao_orders_rows_like_a_row_major_reshape(rng):
    from peekcore.kernels.base import khatri_rao

    fs = [torch.from_numpy(rng.standard_normal((n, 3))) for n in (2, 4, 5)]
    got = khatri_rao(fs)
    want = np.einsum("ir,jr,kr->ijkr", *(f.numpy() for f in fs)).reshape(-1, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-15)


@pytest.mark.parametrize(
    ("shape", "min_rows"),
    [
        ((23, 70, 3, 4), 64),  # real rule: 70 x (3*4)
        ((19, 65, 2, 3, 2), 64),  # real rule: 65 x (2*3*2), three modes merged
        ((21, 4, 3, 5, 2), 2),  # forced: 4 x (3*5*2)
        ((21, 4, 3, 5, 2), 12),  # forced: (4*3) x (5*2)
    ],
    ids=["4way", "5way", "5way-merge3", "5way-merge2"],
)
@pytest.mark.parametrize("method", ["cp_als", "ncp_hals"])
def test_merged_trailing_modes_give_the_same_fit(monkeypatch, rng, shape, min_rows, method):
    """The native pass on merged modes against the torch reference pass (float64)."""
    import peekcore.kernels.native as native

    if "native" not in peekcore.kernels.names():
        pytest.skip("native extension not built")
    monkeypatch.setattr(native, "MIN_LEADING_ROWS", min_rows)
    rule = native.trailing_start  # the grouping as on one thread, whatever this machine has
    monkeypatch.setattr(native, "trailing_start", lambda dims, threads=1: rule(dims, 1))
    assert native.trailing_start(list(shape[1:])) < len(shape) - 2  # something is merged
    x = np.abs(ref.low_rank(rng, shape, 3, noise=0.2)[0])
    fit = getattr(peekcore, method)
    kw = dict(n_iter_max=8, tol=0, random_state=2, chunk_size=7)
    got = fit(x, 3, kernel="native", **kw)
    want = fit(x, 3, kernel="torch", **kw)
    ref.assert_model_close(got, want.weights, want.factors, 1e-10)
    # half storage through the merged path: as float32 of the same values
    half = fit(torch.from_numpy(x).half(), 3, kernel="native", **kw)
    same = fit(torch.from_numpy(x).half().float(), 3, kernel="native", **kw)
    assert ref.rel_error(half.weights, same.weights) < 1e-5


@pytest.mark.parametrize(
    ("shape", "rank"),
    [((29, 7, 131), 8), ((29, 7, 67), 3), ((29, 7, 67), 1), ((29, 7, 14), 8), ((29, 7, 14), 1)],
    ids=["narrow-r8", "narrow-r3", "narrow-r1", "wide-short-rows-r8", "narrow-short-rows-r1"],
)
def test_float32_pass_for_narrow_ranks_matches_dense_als(rng, shape, rank):
    """R <= 8 takes the narrow or the wide AVX-512 kernel by the length of the rows
    (``narrow_pays`` in csrc/cpu/cp_pass.cpp); both against dense float64 ALS."""
    if "native" not in peekcore.kernels.names():
        pytest.skip("native extension not built")
    x, _ = ref.low_rank(rng, shape, rank, noise=0.2)
    init = _random_init(rng, shape, rank)
    want = normalize_factors(ref.als(x, init.factors, n_iter=8))
    kw = dict(n_iter_max=8, tol=0, init=init, kernel="native", chunk_size=11)
    model = peekcore.cp_als(x.astype(np.float32), rank, **kw)
    ref.assert_model_close(model, *want, 1e-4)


def test_chunk_plan_for_natural_chunks():
    from peekcore.kernels import TorchKernel
    from peekcore.solvers.problem import plan_chunks, samples_per_chunk

    n, mib = 10_000, 1 << 20  # float32 256 x 1024: 1 MiB per sample
    pick = lambda **kw: samples_per_chunk(n, mib, budget=64 * mib, **kw)  # noqa: E731
    assert pick() == 64  # no natural chunk: the budget
    assert pick(natural=5) == 60  # the largest multiple in the budget
    assert pick(natural=5, alone_bytes=4 * mib) == 5  # big enough to read alone
    assert pick(natural=3, alone_bytes=4 * mib) == 63  # too small: grouped
    assert pick(natural=100, alone_bytes=4 * mib) == 100  # over the budget: one
    # the plan on the CPU: 64 MiB, natural chunks of 4 MiB read alone; an explicit
    # budget or chunk size wins over reading natural chunks alone
    source = types.SimpleNamespace(shape=(n, 256, 1024), dtype=np.dtype("float32"), chunk_size=5)
    cpu = TorchKernel("cpu")
    assert plan_chunks(source, cpu) == 5
    assert plan_chunks(source, cpu, max_chunk_bytes=32 * mib) == 30
    assert plan_chunks(source, cpu, chunk_size=7) == 7
    assert samples_per_chunk(12, mib, budget=64 * mib, natural=50, alone_bytes=mib) == 12


@pytest.mark.parametrize("kernel", ["native", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overfactored_float32_fit_is_real_and_reported_truly(kernel, seed):
    """A rank-2 tensor with 0.1% noise fitted at rank 8, accumulating in float32.

    Without a noise floor on the ALS Grams, float32 rounding in the nearly singular
    solves grew the components into pairs that cancel (weights of 1e8): the real
    fit fell to 0.79 while the residual formula, lost to cancellation, said 1.0.
    """
    rng = np.random.default_rng(100 + seed)
    x, _ = ref.low_rank(rng, (200, 16, 25), 2, 1e-3)
    x32, x64 = x.astype(np.float32), x.astype(np.float32).astype(np.float64)
    model = peekcore.cp_als(x32, 8, n_iter_max=100, tol=0.0, kernel=kernel, random_state=seed)
    actual = np.linalg.norm(x64 - model.reconstruct()) / np.linalg.norm(x64)
    best = peekcore.cp_als(x64, 8, n_iter_max=100, tol=0.0, random_state=seed)
    achievable = np.linalg.norm(x64 - best.reconstruct()) / np.linalg.norm(x64)
    assert achievable < 1.1e-3
    assert actual < 1.05 * achievable  # the float32 fit is as good as the float64 one
    reported = model.history.rel_error[-1]
    assert abs(reported - actual) < 0.1 * actual  # and says so to float32's resolution
    assert np.max(np.abs(model.weights)) < 1e4  # no cancelling giants


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x[:, ::-1],
        lambda x: x[::-1],
        lambda x: x[:, :, ::-2],
        lambda x: x.astype(">f8"),
        lambda x: x[::-1].astype(">f4"),
    ],
    ids=["flip-mode1", "flip-samples", "flip-step2", "big-endian", "big-endian-f4-flipped"],
)
def test_flipped_and_byte_swapped_arrays(rng, kernel, view):
    x, _ = ref.low_rank(rng, (21, 6, 10), 3, noise=0.2)
    data = view(x)
    plain = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("="))
    init = _random_init(rng, data.shape, 3)
    model = peekcore.cp_als(data, 3, n_iter_max=10, tol=0, init=init, kernel=kernel, chunk_size=5)
    if data.dtype.itemsize == 8:
        ref.assert_model_close(model, *normalize_factors(ref.als(plain, init.factors, 10)), 1e-10)
    # every path that reads the data (the Gram pass too) equals the fit of a plain copy
    for kw in (dict(init=init), dict(init="gram")):
        got = peekcore.cp_als(data, 3, n_iter_max=5, kernel=kernel, **kw)
        want = peekcore.cp_als(plain, 3, n_iter_max=5, kernel=kernel, **kw)
        for a, b in zip(got.factors, want.factors, strict=True):
            np.testing.assert_array_equal(a, b)
    hals = peekcore.ncp_hals(np.abs(data), 3, n_iter_max=5, kernel=kernel)
    assert np.isfinite(hals.fit)


@pytest.mark.parametrize("method", ["als", "hals"])
def test_rank_above_the_sample_count_matches_dense_reference(rng, kernel, method):
    # N = 4 < R = 6: the resident updates solve against A^T A (rank 4) times the other
    # resident Gram (Hadamard product), which is positive definite; nothing is underdetermined
    shape, rank = (4, 6, 7), 6
    x = rng.random(shape)
    init = _random_init(rng, shape, rank)
    if method == "als":
        want = ref.als(x, init.factors, n_iter=15)
        model = peekcore.cp_als(x, rank, n_iter_max=15, tol=0, init=init, kernel=kernel)
    else:
        want = ref.hals(x, init.factors, n_iter=15, sweeps=2)
        model = peekcore.ncp_hals(x, rank, n_iter_max=15, tol=0, init=init, sweeps=2, kernel=kernel)
    assert ref.rel_error(model.reconstruct(), ref.full(want)) < 1e-8
    assert abs(model.fit - ref.dense_fit(x, want)) < 1e-8


def test_cancelling_components_are_warned_about(monkeypatch):
    """The guard behind the noise floor: with it off, the over-factored float32 fit's
    residual goes clearly negative, and the user is told the fit is not real."""
    from peekcore.solvers import resident

    monkeypatch.setattr(resident, "NOISE_FLOOR_ULPS", 0.0)
    x, _ = ref.low_rank(np.random.default_rng(100), (200, 16, 25), 2, 1e-3)
    with pytest.warns(RuntimeWarning, match=r"rank 8, iteration \d+: the residual came out neg"):
        peekcore.cp_als(x.astype(np.float32), 8, n_iter_max=100, tol=0.0)
    monkeypatch.setattr(resident, "NOISE_FLOOR_ULPS", 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and with it on, nothing to warn about
        peekcore.cp_als(x.astype(np.float32), 8, n_iter_max=100, tol=0.0)


@pytest.mark.parametrize("fit", [peekcore.cp_als, peekcore.ncp_hals], ids=["als", "hals"])
def test_fit_options_show_in_the_signature_and_reach_the_fit(rng, fit):
    """cp_als and ncp_hals take FitOptions as **options: each shows in the signature
    with its default, a wrong name is refused as Python refuses a keyword, and
    a given option (not only a default) reaches the fit."""
    import dataclasses
    import inspect

    from peekcore.solvers.engine import FitOptions

    shown = inspect.signature(fit).parameters
    for field in dataclasses.fields(FitOptions):
        assert shown[field.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert shown[field.name].default == field.default
    assert ("sweeps" in shown) == (fit is peekcore.ncp_hals)
    x = rng.random((20, 5, 4))
    with pytest.raises(TypeError, match=rf"{fit.__name__}\(\) got an unexpected .* 'n_iter'"):
        fit(x, 2, n_iter=3)
    m = fit(x, 2, n_iter_max=3, tol=0, random_state=7)
    assert m.history.n_iter == 3 and m.history.stop_reason == "n_iter_max"
    assert m.metadata["random_state"] == 7
