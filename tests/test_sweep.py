"""rank_sweep: shared passes equal separate fits; diagnostics; save/load; compression."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

import peekcore
from peekcore.diagnostics import factor_match_score
from peekcore.sweep import RankSweep, rank_sweep


def _planted(rng, shape, rank, noise=0.1):
    x, _ = ref.low_rank(rng, shape, rank, noise=noise)
    return x


@pytest.mark.parametrize("method", ["cp", "ncp"])
def test_sweep_models_equal_separate_fits(rng, kernel, method):
    x = np.abs(_planted(rng, (40, 7, 6), 3))
    kw = dict(n_iter_max=25, tol=1e-7, kernel=kernel)
    sweep = rank_sweep(x, [1, 2, 3], replicates=2, method=method, random_state=10, **kw)
    fit = peekcore.cp_als if method == "cp" else peekcore.ncp_hals
    for k, r in enumerate(sweep.ranks):
        for p in range(2):
            alone = fit(x, r, random_state=10 + p, **kw)
            together = sweep.models[k][p]
            assert together.history.n_iter == alone.history.n_iter
            np.testing.assert_allclose(together.weights, alone.weights, rtol=1e-9)
            for a, b in zip(together.factors, alone.factors, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
            assert sweep.fit[k, p] == pytest.approx(alone.fit, abs=1e-10)


def test_sweep_models_match_refits_to_a_tolerance_in_float32(rng, kernel):
    """What rank_sweep promises: replicate p of rank r is cp_als(..., random_state=seed + p)
    up to rounding. In float32 the stacked passes' rounding grows and the iteration counts
    differ (the stop test sits at the tolerance), so not bit for bit; at well-posed ranks
    (at or below the planted rank) the same model to a tolerance."""
    x = _planted(rng, (40, 10, 8), 3).astype(np.float32)
    kw = dict(n_iter_max=100, tol=1e-8, kernel=kernel)
    sweep = rank_sweep(x, [1, 2, 3], replicates=3, random_state=7, **kw)
    x64 = x.astype(np.float64)
    for k, r in enumerate(sweep.ranks):
        for p in range(3):
            alone = peekcore.cp_als(x, r, random_state=7 + p, **kw)
            together = sweep.models[k][p]
            assert together.fit == pytest.approx(alone.fit, abs=1e-4)
            assert sweep.fit[k, p] == pytest.approx(
                ref.dense_fit(x64, alone.factors, alone.weights), abs=1e-4
            )
            assert factor_match_score(together, alone) > 0.99, (r, p)


def test_diagnostics_match_the_models(rng):
    x = _planted(rng, (60, 9, 8), 3)
    sweep = rank_sweep(x, range(1, 6), replicates=3, n_iter_max=150, tol=1e-10)
    for k, row in enumerate(sweep.models):
        for p, m in enumerate(row):
            assert sweep.fit[k, p] == pytest.approx(
                ref.dense_fit(x, m.factors, m.weights), abs=1e-8
            )
            ev = 1 - np.linalg.norm(x - m.reconstruct()) ** 2 / np.linalg.norm(x) ** 2
            assert sweep.explained_variance[k, p] == pytest.approx(ev, abs=1e-8)
    k3 = sweep.ranks.index(3)
    assert sweep.corcondia[k3, sweep.best[k3]] > 90
    assert sweep.stability[k3] > 0.95
    assert sweep.chosen_rank == 3
    assert "rank 3" in sweep.choice_reason
    assert [row["rank"] for row in sweep.table()] == [1, 2, 3, 4, 5]


def test_sweep_on_four_way_data_finds_a_rank_above_the_spatial_size(rng):
    """N x C x 4 x 4 with planted rank 6 > 4: core consistency on the merged N x C x 16
    view stays near 100 at the planted rank (on the 4-way core it fell to 50 and below
    for the true model, and the sweep chose 4 or 5)."""
    x, _ = ref.low_rank(rng, (200, 16, 4, 4), 6, noise=0.01)
    sweep = rank_sweep(x, [4, 5, 6, 7], replicates=3, n_iter_max=60)
    k = sweep.ranks.index(6)
    assert sweep.corcondia[k, sweep.best[k]] > 95
    assert sweep.chosen_rank == 6, sweep.choice_reason


def test_save_load_roundtrip(tmp_path, rng):
    x = _planted(rng, (30, 6, 5), 2)
    sweep = rank_sweep(x, [1, 2, 3], replicates=2, n_iter_max=30)
    sweep.save(tmp_path / "s.npz")
    back = RankSweep.load(tmp_path / "s.npz")
    assert back.ranks == sweep.ranks and back.chosen_rank == sweep.chosen_rank
    np.testing.assert_array_equal(back.corcondia, sweep.corcondia)
    np.testing.assert_array_equal(back.model(2).factors[1], sweep.model(2).factors[1])
    assert back.model(2).history == sweep.model(2).history
    with pytest.raises(KeyError, match="not in this sweep"):
        back.model(9)


def test_compressed_sweep_refined_fit_close_to_exact(rng):
    x = _planted(rng, (300, 40, 30), 4, noise=0.1)
    kw = dict(replicates=3, n_iter_max=300, tol=1e-10)
    exact = rank_sweep(x, range(1, 7), **kw)
    small = rank_sweep(x, range(1, 7), compress=True, **kw)
    r = small.chosen_rank
    assert r == exact.chosen_rank == 4
    assert abs(small.model(r).fit - exact.model(r).fit) < 0.005
    c = small.compression
    assert 0.9 < c["captured_energy"] <= 1.0
    # exact ALS passes do not lower the fit; the compressed fit comes from the
    # statistics of the small sweep (rounding), hence the 1e-6
    assert c["chosen_fit_refined"] >= c["chosen_fit_compressed"] - 1e-6


def test_compressed_sweep_scores_are_exact_on_the_full_data(rng):
    # subspaces of 6 < 12, 10: the scores come from the projected tensor and ||X||^2
    x = _planted(rng, (150, 12, 10), 3, noise=0.2)
    sweep = rank_sweep(
        x,
        [1, 2, 3, 4],
        replicates=2,
        compress=True,
        compress_dims=6,
        refine_iters=0,
        n_iter_max=60,
    )
    assert sweep.compression["captured_energy"] < 0.999  # the projection loses something
    for k, row in enumerate(sweep.models):
        for p, m in enumerate(row):
            fit = ref.dense_fit(x, m.factors, m.weights)
            assert sweep.fit[k, p] == pytest.approx(fit, abs=1e-5)
            assert m.fit == pytest.approx(fit, abs=1e-5)
            ev = 1 - np.linalg.norm(x - m.reconstruct()) ** 2 / np.linalg.norm(x) ** 2
            assert sweep.explained_variance[k, p] == pytest.approx(ev, abs=1e-5)
            unit = [m.factors[0] * m.weights, *m.factors[1:]]
            dense = ref.core_consistency_dense(x, unit)
            assert sweep.corcondia[k, p] == pytest.approx(dense, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("data_dtype", ["float32", "float64"])
def test_compressed_sweep_runs_in_the_requested_dtype(rng, monkeypatch, data_dtype):
    """dtype="float64" (or float64 data) carries into the projected problem: the small
    sweep ran in float32 while the models recorded float64. In float64 every score equals
    the dense float64 one to rounding, far tighter than float32 statistics allow."""
    import peekcore.sweep as sweep_module

    seen = []
    prepare = sweep_module.prepare

    def spy(*args, **kw):
        problem = prepare(*args, **kw)
        seen.append(problem.settings.compute_dtype)
        return problem

    monkeypatch.setattr(sweep_module, "prepare", spy)
    x = _planted(rng, (120, 12, 10), 3, noise=0.2).astype(data_dtype)
    kw = dict(replicates=2, compress=True, compress_dims=6, refine_iters=0, n_iter_max=40)
    sweep = rank_sweep(x, [1, 2, 3, 4], dtype="float64", **kw)
    assert seen == [torch.float64, torch.float64]  # the full problem, the projected one
    x64 = x.astype(np.float64)
    for k, row in enumerate(sweep.models):
        for p, m in enumerate(row):
            assert m.metadata["compute_dtype"] == "float64"
            assert m.factors[0].dtype == np.float64
            fit = ref.dense_fit(x64, m.factors, m.weights)
            assert sweep.fit[k, p] == pytest.approx(fit, abs=1e-10)
            dense = ref.core_consistency_dense(x64, [m.factors[0] * m.weights, *m.factors[1:]])
            assert sweep.corcondia[k, p] == pytest.approx(dense, rel=1e-7, abs=1e-7)
    # float32 unless asked for (or float64 data): the small problem follows
    seen.clear()
    rank_sweep(x.astype(np.float32), [1, 2], **kw)
    assert seen == [torch.float32, torch.float32]


def test_compressed_sweep_refinement_is_cp_als_from_the_compressed_model(rng):
    """The refinement continues the chosen compressed model with exact passes, as
    cp_als from that model would, also on data the problem reads rescaled (it must
    not mix the scaled reading with a model in the data's units)."""
    x = _planted(rng, (120, 12, 10), 3, noise=0.2)
    kw = dict(replicates=2, compress=True, compress_dims=6, n_iter_max=15, tol=0)
    unrefined = rank_sweep(x, [2, 3, 4], refine_iters=0, **kw)
    sweep = rank_sweep(x, [2, 3, 4], refine_iters=3, **kw)
    r = sweep.chosen_rank
    k = sweep.ranks.index(r)
    b = int(sweep.best[k])
    start, refined = unrefined.models[k][b], sweep.models[k][b]
    alone = peekcore.cp_als(x, r, init=start, n_iter_max=3, tol=0, random_state=b)
    assert refined.history.n_iter == refined.metadata["n_iter_max"] == 3
    assert refined.metadata["random_state"] == b  # the replicate's seed (random_state 0 + b)
    assert refined.metadata["source"] == sweep.metadata["source"]
    np.testing.assert_allclose(refined.weights, alone.weights, rtol=1e-10)
    for got, want in zip(refined.factors, alone.factors, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert sweep.fit[k, b] == pytest.approx(ref.dense_fit(x, refined.factors, refined.weights))
    # 2^-300: outside float64's safe range, so the problem reads it times 2^300 (exact)
    tiny = rank_sweep(x * 2.0**-300, [2, 3, 4], refine_iters=3, **kw).models[k][b]
    np.testing.assert_array_equal(tiny.weights * 2.0**300, refined.weights)
    for got, want in zip(tiny.factors, refined.factors, strict=True):
        np.testing.assert_array_equal(got, want)
    for bad, err in ((-1, ValueError), (2.5, TypeError)):
        with pytest.raises(err, match="refine_iters must be"):
            rank_sweep(x, [1, 2], refine_iters=bad, **kw)


def test_bad_arguments(rng):
    x = _planted(rng, (20, 5, 4), 2)
    with pytest.raises(ValueError, match="ranks is empty"):
        rank_sweep(x, [])
    with pytest.raises(ValueError, match="distinct"):
        rank_sweep(x, [2, 2])
    with pytest.raises(ValueError, match="rank must be at least 1"):
        rank_sweep(x, [0, 1])
    with pytest.raises(ValueError, match="replicates would be identical"):
        rank_sweep(x, [1, 2], replicates=2, init="gram")
    with pytest.raises(ValueError, match="method='cp' only"):
        rank_sweep(np.abs(x), [1, 2], method="ncp", compress=True)
    with pytest.raises(ValueError, match="method must be"):
        rank_sweep(x, [1], method="tucker")


def test_sweep_scores_no_core_consistency_above_the_samples(rng):
    x, _ = ref.low_rank(rng, (5, 8, 9), 2, 0.01)
    with pytest.warns(RuntimeWarning, match="sample factor has 5 rows"):
        sweep = peekcore.rank_sweep(x, [2, 6], 1, n_iter_max=20)
    assert not np.isnan(sweep.corcondia[0]).any() and np.isnan(sweep.corcondia[1]).all()
    assert sweep.chosen_rank == 2
