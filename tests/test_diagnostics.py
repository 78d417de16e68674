"""Diagnostics from pass statistics: fit, core consistency, FMS, stability, degeneracy, rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch

import peekcore
from peekcore.diagnostics import (
    RankChoice,
    choose_rank,
    congruence,
    core_consistencies,
    core_consistency,
    degeneracy,
    factor_match_score,
    fit_scores,
    least_squares_core,
    stability,
)
from peekcore.model import CPModel, normalize_factors

# ------------------------------------------------------------------ dense references


def statistics(x: np.ndarray, sample_factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a pass gives: ``T = X x_0 A^T`` (R x I_1 x ... x I_d) and ``A^T A``."""
    return np.tensordot(sample_factor, x, axes=([0], [0])), sample_factor.T @ sample_factor


def model_statistics(x: np.ndarray, model: CPModel):
    """Pass statistics of a fitted model, weights absorbed into mode 0."""
    a = model.factors[0] * model.weights
    t, ata = statistics(x, a)
    return t, ata, model.factors[1:]


def unit_columns(model: CPModel) -> list[np.ndarray]:
    """Factors with the weights absorbed into mode 0 (resident columns unit norm)."""
    return [model.factors[0] * model.weights, *model.factors[1:]]


# ------------------------------------------------------------------- core consistency


@pytest.mark.parametrize("shape", [(9, 4, 5), (7, 3, 4, 3)])
def test_least_squares_core_matches_kronecker_lstsq(rng, shape):
    """Any factors (arbitrary scales, not a CP fit), any data: the core of the statistics
    equals the brute-force Kronecker least squares."""
    rank = 3
    x = rng.standard_normal(shape)
    factors = [rng.standard_normal((n, rank)) * rng.uniform(0.2, 5, rank) for n in shape]
    t, ata = statistics(x, factors[0])
    g = least_squares_core(t, ata, factors[1:])
    want = ref.core_dense(x, factors)
    assert g.shape == (rank,) * len(shape)
    np.testing.assert_allclose(g, want, rtol=0, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("normalization", ["bro-kiers", "core-norm"])
@pytest.mark.parametrize(
    ("shape", "planted", "rank"),
    [((20, 6, 5), 3, 3), ((20, 6, 5), 3, 4), ((12, 4, 5, 3), 2, 2), ((12, 4, 5, 3), 2, 3)],
)
def test_core_consistency_matches_dense(rng, normalization, shape, planted, rank):
    """Fitted models at and above the planted rank: statistics and dense agree to 1e-8.

    Above the planted rank a fit can turn degenerate and its factors ill-conditioned;
    then the dense least squares is the less accurate side (its error grows like
    eps x cond of the Kronecker matrix; checked once against 50-digit arithmetic:
    statistics 1e-13, Kronecker lstsq 2e-6 relative at cond 1.4e11), so the
    tolerance widens to ``1e-15 x cond`` there.
    """
    x, _ = ref.low_rank(rng, shape, planted, noise=0.1)
    model = peekcore.cp_als(x, rank, n_iter_max=30, tol=0, random_state=1)
    t, ata, resident = model_statistics(x, model)
    got = core_consistency(t, ata, resident, normalization)
    want = ref.core_consistency_dense(x, unit_columns(model), normalization)
    cond = np.prod([np.linalg.cond(f) for f in unit_columns(model)])
    assert got == pytest.approx(want, rel=max(1e-8, 1e-15 * cond), abs=1e-8)
    # the same from A without weights, the weights passed apart
    t0, ata0 = statistics(x, model.factors[0])
    got_w = core_consistency(t0, ata0, resident, normalization, weights=model.weights)
    assert got_w == pytest.approx(got, rel=1e-9, abs=1e-9)
    # both normalizations from one core (what rank_sweep scores with)
    both = core_consistencies(t0, ata0, resident, weights=model.weights)
    assert both[normalization] == pytest.approx(want, rel=max(1e-8, 1e-15 * cond), abs=1e-8)


@pytest.mark.parametrize("normalization", ["bro-kiers", "core-norm"])
@pytest.mark.parametrize("shape", [(10, 5, 6), (8, 4, 3, 5), (6, 3, 4, 3, 3)])
def test_core_consistency_is_100_for_an_exact_cp_model(rng, normalization, shape):
    rank = 3
    x, factors = ref.low_rank(rng, shape, rank)
    d = rng.uniform(0.1, 10, rank)  # any column scale, the model unchanged
    factors[0], factors[1] = factors[0] / d, factors[1] * d
    t, ata = statistics(x, factors[0])
    value, g = core_consistency(t, ata, factors[1:], normalization, return_core=True)
    assert value == pytest.approx(100.0, abs=1e-8)
    identity = np.zeros((rank,) * len(shape))
    identity[(np.arange(rank),) * len(shape)] = 1.0
    np.testing.assert_allclose(g, identity, atol=1e-10)


def test_core_consistency_does_not_depend_on_where_the_scale_sits(rng):
    """Scaling resident columns (compensated in mode 0) changes the raw core, not CORCONDIA."""
    x, _ = ref.low_rank(rng, (15, 5, 6), 3, noise=0.2)
    model = peekcore.cp_als(x, 4, n_iter_max=20, random_state=0)
    t, ata, resident = model_statistics(x, model)
    ref_value = core_consistency(t, ata, resident)
    d1, d2 = rng.uniform(0.1, 10, 4), rng.uniform(0.1, 10, 4)
    a = model.factors[0] * model.weights / (d1 * d2)
    t2, ata2 = statistics(x, a)
    scaled = [resident[0] * d1, resident[1] * d2]
    assert core_consistency(t2, ata2, scaled) == pytest.approx(ref_value, rel=1e-9)
    assert not np.allclose(
        least_squares_core(t2, ata2, scaled), least_squares_core(t, ata, resident)
    )


def test_core_consistency_survives_rank_deficient_factors(rng):
    """A repeated component makes the Kronecker matrix rank deficient: both sides take the
    minimum-norm core (pseudo-inverses), so they still agree."""
    x, factors = ref.low_rank(rng, (12, 5, 4), 2, noise=0.1)
    factors = [np.column_stack([f, f[:, :1]]) for f in factors]
    t, ata = statistics(x, factors[0])
    g = least_squares_core(t, ata, factors[1:])
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, ref.core_dense(x, factors), atol=1e-8)
    assert math.isfinite(core_consistency(t, ata, factors[1:]))


def test_core_consistency_is_high_at_the_planted_rank(rng):
    x, _ = ref.low_rank(rng, (30, 8, 7), 3, noise=0.05)
    model = peekcore.cp_als(x, 3, n_iter_max=200, init="gram")
    assert core_consistency(*model_statistics(x, model)) > 90


def _folded(x: np.ndarray, factors: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The 3-way view N x I_1 x (I_2 ... I_d): trailing modes merged (row-major), their
    factors merged by a column-wise Kronecker product in the same order."""
    rank = factors[0].shape[1]
    merged = factors[2]
    for f in factors[3:]:
        merged = np.einsum("ir,jr->ijr", merged, f).reshape(-1, rank)
    return x.reshape(x.shape[0], x.shape[1], -1), [factors[0], factors[1], merged]


@pytest.mark.parametrize("normalization", ["bro-kiers", "core-norm"])
@pytest.mark.parametrize("rank", [5, 6, 8])
def test_core_consistency_merges_resident_modes_smaller_than_the_rank(rng, normalization, rank):
    """R > 4 = I_2 = I_3: the true factors of a noise-free model give 100 (the 4-way
    least-squares core is not identifiable along the 4-long modes, it gave 68, 48, 24
    bro-kiers), computed on the folded N x C x 16 view; and any factors on noisy data
    match the dense core consistency of that view."""
    x, factors = ref.low_rank(rng, (200, 16, 4, 4), rank)
    t, ata = statistics(x, factors[0])
    value, g = core_consistency(t, ata, factors[1:], normalization, return_core=True)
    assert value == pytest.approx(100, abs=1e-6)
    assert g.shape == (rank,) * 3
    # the dense references on fewer samples (a 40 * 256 x R^3 Kronecker least squares)
    shape = (40, 16, 4, 4)
    x, factors = ref.low_rank(rng, shape, rank)
    t, ata = statistics(x, factors[0])
    x3, f3 = _folded(x, factors)
    assert ref.core_consistency_dense(x3, f3, normalization) == pytest.approx(100, abs=1e-6)
    assert core_consistency(t, ata, factors[1:], normalization) == pytest.approx(100, abs=1e-6)
    # noisy data, factors that are not the model: the merged core is the dense one
    y, _ = ref.low_rank(rng, shape, rank, noise=0.3)
    guess = [f + 0.5 * rng.standard_normal(f.shape) for f in factors]
    w = rng.uniform(0.5, 2, rank)
    t, ata = statistics(y, guess[0])
    got = core_consistencies(t, ata, guess[1:], weights=w)[normalization]
    y3, g3 = _folded(y, guess)
    norms = [np.linalg.norm(f, axis=0) for f in g3[1:]]
    unit = [g3[0] * w * norms[0] * norms[1], g3[1] / norms[0], g3[2] / norms[1]]
    want = ref.core_consistency_dense(y3, unit, normalization)
    assert got == pytest.approx(want, rel=1e-8, abs=1e-8)
    assert math.isfinite(want) and want < 99  # not the identity: the comparison says something


def test_core_consistency_merges_only_what_it_must(rng):
    """N x 8 x 2 x 8 at R = 5: only the 2-long mode needs a neighbour (N x 8 x 16, 4-way
    structure kept where it can be); the dense core of that view agrees."""
    rank = 5
    x, factors = ref.low_rank(rng, (30, 8, 2, 8), rank, noise=0.2)
    guess = [f + 0.3 * rng.standard_normal(f.shape) for f in factors]
    t, ata = statistics(x, guess[0])
    value, g = core_consistency(t, ata, guess[1:], return_core=True)
    assert g.shape == (rank,) * 3
    merged = np.einsum("ir,jr->ijr", guess[2], guess[3]).reshape(-1, rank)
    view = [guess[0], guess[1], merged]
    norms = [np.linalg.norm(f, axis=0) for f in view[1:]]
    unit = [view[0] * norms[0] * norms[1], view[1] / norms[0], view[2] / norms[1]]
    want = ref.core_consistency_dense(x.reshape(30, 8, 16), unit)
    assert value == pytest.approx(want, rel=1e-8, abs=1e-8)


def test_core_consistency_is_nan_when_no_view_identifies_the_core(rng):
    """3 x 2 x 2 resident modes at R = 5: no two adjacent groups reach 5 entries."""
    rank = 5
    x, factors = ref.low_rank(rng, (40, 3, 2, 2), rank)
    t, ata = statistics(x, factors[0])
    with pytest.warns(RuntimeWarning, match="core consistency is undefined at rank 5"):
        value, g = core_consistency(t, ata, factors[1:], return_core=True)
    assert math.isnan(value) and g is None
    with pytest.warns(RuntimeWarning, match="not identifiable"):
        both = core_consistencies(t, ata, factors[1:])
    assert all(math.isnan(v) for v in both.values())
    # at R = 3 the view N x 3 x 4 exists
    x3, f3 = ref.low_rank(rng, (40, 3, 2, 2), 3)
    t3, ata3 = statistics(x3, f3[0])
    assert core_consistency(t3, ata3, f3[1:]) == pytest.approx(100, abs=1e-6)


def test_core_consistency_rejects_bad_statistics(rng):
    t = rng.standard_normal((3, 4, 5))
    ata = np.eye(3)
    b, c = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    with pytest.raises(ValueError, match="ata must be R x R = 3 x 3"):
        core_consistency(t, np.eye(2), [b, c])
    with pytest.raises(ValueError, match="resident factor 2 has 6 rows but t has 5"):
        core_consistency(t, ata, [b, rng.standard_normal((6, 3))])
    with pytest.raises(ValueError, match="resident factor 1 must have R = 3 columns"):
        core_consistency(t, ata, [rng.standard_normal((4, 2)), c])
    with pytest.raises(ValueError, match="needs 2 resident factors, got 1"):
        core_consistency(t, ata, [b])
    with pytest.raises(ValueError, match="order >= 3"):
        core_consistency(t[:, :, 0], ata, [b])
    with pytest.raises(ValueError, match="weights must have shape"):
        core_consistency(t, ata, [b, c], weights=np.ones(4))
    with pytest.raises(ValueError, match="normalization must be one of"):
        core_consistency(t, ata, [b, c], "bro")
    with pytest.raises(ValueError, match="t holds NaN"):
        core_consistency(np.full_like(t, np.nan), ata, [b, c])
    with pytest.raises(ValueError, match="ata must be R x R"):
        least_squares_core(t, np.eye(4), [b, c])


# ------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("shape", [(20, 6, 5), (10, 4, 3, 5)])
def test_fit_scores_match_the_dense_residual(rng, shape):
    x, _ = ref.low_rank(rng, shape, 3, noise=0.2)
    model = peekcore.cp_als(x, 3, n_iter_max=15, random_state=2)
    t0, ata0 = statistics(x, model.factors[0])
    scores = fit_scores(t0, ata0, model.factors[1:], np.sum(x**2), weights=model.weights)
    resid = x - model.reconstruct()
    assert scores.residual_sq == pytest.approx(np.sum(resid**2), rel=1e-9)
    assert scores.fit == pytest.approx(ref.dense_fit(x, model.factors, model.weights), rel=1e-9)
    assert scores.fit == pytest.approx(model.fit, rel=1e-9)
    assert scores.rel_error == pytest.approx(1 - scores.fit)
    assert scores.explained_variance == pytest.approx(1 - np.sum(resid**2) / np.sum(x**2))
    # weights absorbed into mode 0 give the same numbers
    t, ata, resident = model_statistics(x, model)
    assert fit_scores(t, ata, resident, np.sum(x**2)).fit == pytest.approx(scores.fit, rel=1e-12)


def test_fit_scores_rejects_bad_input(rng):
    t = rng.standard_normal((2, 3, 4))
    b, c = rng.standard_normal((3, 2)), rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match="norm_x_sq must be positive"):
        fit_scores(t, np.eye(2), [b, c], 0.0)
    with pytest.raises(ValueError, match="resident factor 1 has 4 rows"):
        fit_scores(t, np.eye(2), [c, c], 1.0)


# ------------------------------------------------------- factor match score, stability


def test_factor_match_score_is_one_for_identical_models(rng):
    factors = [rng.standard_normal((n, 4)) for n in (9, 5, 6)]
    model = CPModel(*normalize_factors(factors))
    assert factor_match_score(model, model) == pytest.approx(1.0)
    assert factor_match_score(factors, model) == pytest.approx(1.0)  # raw vs normalized


def test_factor_match_score_is_invariant_to_permutation_and_scaling(rng):
    factors = [rng.standard_normal((n, 4)) for n in (9, 5, 6, 3)]
    perm = np.array([3, 1, 0, 2])
    # rescale each component across modes without changing it (products of scales = 1)
    s = [rng.uniform(0.2, 5, 4) * rng.choice([-1, 1], 4) for _ in range(3)]
    s.append(1 / (s[0] * s[1] * s[2]))
    other = [(f * si)[:, perm] for f, si in zip(factors, s, strict=True)]
    score, match = factor_match_score(factors, other, return_permutation=True)
    assert score == pytest.approx(1.0)
    np.testing.assert_array_equal(other[0][:, match], factors[0] * s[0])  # match inverts perm
    # without the weight penalty any column scaling is invariant
    arbitrary = [f * rng.uniform(0.1, 10, 4) for f in other]
    assert factor_match_score(factors, arbitrary, consider_weights=False) == pytest.approx(1.0)
    assert factor_match_score(factors, arbitrary) < 1.0


def _fms_brute_force(fa, wa, fb, wb) -> float:
    """Best mean over every injective matching of a's components into b's, plain float64."""
    import itertools

    def unit(fs, w):
        norms = np.prod([np.linalg.norm(f, axis=0) for f in fs], axis=0) * np.abs(w)
        return [f / np.linalg.norm(f, axis=0) for f in fs], norms

    ua, la = unit(fa, wa)
    ub, lb = unit(fb, wb)
    best = -1.0
    for cols in itertools.permutations(range(fb[0].shape[1]), fa[0].shape[1]):
        total = 0.0
        for r, c in enumerate(cols):
            cos = np.prod([abs(a[:, r] @ b[:, c]) for a, b in zip(ua, ub, strict=True)])
            total += cos * (1 - abs(la[r] - lb[c]) / max(la[r], lb[c]))
        best = max(best, total / len(cols))
    return best


def test_factor_match_score_with_different_numbers_of_components(rng):
    """R_a < R_b: every component of a is matched, b's extras are ignored (Tomasi and Bro;
    Tensor Toolbox score). R_a > R_b used to give a perfect 1.0 with R_b matches: now an
    error, since a's extra components have no match."""
    shape = (8, 5, 6)
    small = [rng.standard_normal((n, 3)) for n in shape]
    extra = [rng.standard_normal((n, 2)) for n in shape]
    perm = np.array([4, 0, 3, 1, 2])
    large = [np.column_stack([f, e])[:, perm] for f, e in zip(small, extra, strict=True)]
    score, match = factor_match_score(small, large, return_permutation=True)
    assert score == pytest.approx(1.0)
    assert match.shape == (3,)
    np.testing.assert_array_equal(large[0][:, match], small[0])
    # noisy copies and weights: the Hungarian matching equals the brute-force optimum
    wa, wb = rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 5)
    noisy = [f + 0.3 * rng.standard_normal(f.shape) for f in large]
    got = factor_match_score(small, noisy, weights_a=wa, weights_b=wb)
    assert got == pytest.approx(_fms_brute_force(small, wa, noisy, wb), rel=1e-12)
    with pytest.raises(ValueError, match=r"model_a has more components \(5\) than model_b \(3\)"):
        factor_match_score(large, small)
    with pytest.raises(ValueError, match="more components"):
        factor_match_score(CPModel(np.ones(5), large), CPModel(np.ones(3), small))
    with pytest.raises(ValueError, match="different shapes"):
        factor_match_score(small, [f[:4] for f in large])


def test_stability_of_replicates(rng):
    factors = [rng.standard_normal((n, 3)) for n in (10, 5, 6)]
    same = CPModel(*normalize_factors(factors))
    perm = CPModel(same.weights[[2, 0, 1]], [f[:, [2, 0, 1]] for f in same.factors])
    assert stability([same, perm, same], fits=[0.9, 0.9, 0.9]) == pytest.approx(1.0)
    other = CPModel(*normalize_factors([rng.standard_normal((n, 3)) for n in (10, 5, 6)]))
    low = stability([same, other], fits=[0.9, 0.8])
    assert low < 0.5
    # fit_tol: a replicate stuck in a worse minimum does not count against the rank
    assert stability([same, same, other], fits=[0.9, 0.9, 0.5], fit_tol=0.01) == pytest.approx(1.0)
    assert math.isnan(stability([same, other], fits=[0.9, 0.5], fit_tol=0.01))
    assert math.isnan(stability([same], fits=[0.9]))
    with pytest.raises(ValueError, match="differ in shape or rank"):
        stability([same, CPModel(*normalize_factors([f[:, :2] for f in factors]))], [1, 1])
    with pytest.raises(ValueError, match="fits are required"):
        stability([factors, factors])
    with pytest.raises(ValueError, match="got 1 fits for 2 replicates"):
        stability([same, same], fits=[1.0])


def test_stability_reads_the_fits_of_fitted_models(rng):
    x, _ = ref.low_rank(rng, (30, 8, 7), 2, noise=0.05)
    models = [
        peekcore.cp_als(x, 2, n_iter_max=100, init=init, random_state=s)
        for s, init in enumerate(["gram", "random", "random", "random"])
    ]
    assert stability(models, fit_tol=0.01) > 0.99  # the replicates that reach the best fit agree


# -------------------------------------------------------------------------- degeneracy


def test_degeneracy_finds_two_opposing_components(rng):
    factors = [rng.standard_normal((n, 3)) for n in (10, 6, 5)]
    assert degeneracy(factors) > -0.9
    eps = 1e-3
    for f in factors:  # component 2 nearly equal to component 0 in every mode ...
        f[:, 2] = f[:, 0] + eps * rng.standard_normal(f.shape[0])
    factors[0][:, 2] *= -1  # ... with the opposite sign: a two-factor degeneracy
    value, pair = degeneracy(factors, return_pair=True)
    assert value < -0.99
    assert pair == (0, 2)
    # the sign of a weight counts as the sign of its component
    assert degeneracy(factors, weights=np.array([1.0, 1.0, -1.0])) > -0.9
    # invariant to permutation and positive scaling
    p = [2, 0, 1]
    assert degeneracy([f[:, p] * 3 for f in factors]) == pytest.approx(value)
    assert math.isnan(degeneracy([f[:, :1] for f in factors]))


# ------------------------------------------------------------------------- rank choice


def test_choose_rank_takes_the_largest_rank_of_the_high_cluster():
    ranks = [1, 2, 3, 4, 5, 6]
    cc = [100, 99.5, 98, 96, -300, 20]
    fits = [0.3, 0.5, 0.7, 0.9, 0.901, 0.902]
    choice = choose_rank(ranks, cc, fits)
    assert isinstance(choice, RankChoice)
    assert choice.rank == 4
    assert choice.high_quality == (1, 2, 3, 4)
    assert "rank 4" in choice.reason and "high-quality cluster" in choice.reason
    # order of the input does not matter
    order = [3, 5, 0, 2, 4, 1]
    again = choose_rank([ranks[i] for i in order], [cc[i] for i in order], [fits[i] for i in order])
    assert again == choice


def test_choose_rank_stability_removes_spuriously_consistent_ranks():
    ranks = [1, 2, 3, 4, 5]
    cc = [100, 100, 99, 97, -50]
    fits = [0.4, 0.7, 0.9, 0.901, 0.902]
    assert choose_rank(ranks, cc, fits).rank == 4
    choice = choose_rank(ranks, cc, fits, [1.0, 0.6, 1.0, 0.7, 0.5])
    assert choice.rank == 3
    assert "unstable" in choice.reason
    # nan stability is no evidence: the rank stays
    assert choose_rank(ranks, cc, fits, [1, 1, 1, np.nan, 0.5]).rank == 4
    # a filter that would leave nothing is skipped
    skipped = choose_rank(ranks, cc, fits, [0.1] * 5)
    assert skipped.rank == 4 and "skipped" in skipped.reason


def test_choose_rank_rules_and_thresholds():
    ranks = [1, 2, 3, 4, 5, 6]
    cc = [100, 98, 10, 95, -20, 0]
    fits = [0.5, 0.7, 0.8, 0.9, 0.91, 0.92]
    assert choose_rank(ranks, cc, fits).rank == 4
    assert choose_rank(ranks, cc, fits, rule="first-drop").rank == 2
    assert choose_rank(ranks, cc, fits, rule="largest", threshold=5).rank == 4
    assert choose_rank(ranks, cc, fits, rule="largest", threshold=-30).rank == 6
    assert choose_rank(ranks, cc, fits, threshold=99).rank == 1
    # all values alike: one cluster, the largest rank above the threshold
    assert choose_rank([1, 2, 3], [99, 97, 96], [0.5, 0.6, 0.7]).rank == 3
    assert choose_rank([1, 2, 3], [100, 100, 100], [0.5, 0.6, 0.7]).rank == 3
    assert choose_rank([4], [100], [0.5]).rank == 4
    assert choose_rank([1, 2, 3], [100, np.nan, 90], [0.5, np.nan, 0.7]).rank == 3
    # a rank that adds no fit is not chosen
    assert choose_rank([1, 2, 3], [99, 97, 96], [0.5, 0.6, 0.6]).rank == 2
    assert choose_rank([1, 2, 3], [99, 97, 96], [0.5, 0.6, 0.62], min_fit_gain=0.05).rank == 2
    # nothing passes: the best core consistency, said so
    none = choose_rank([2, 3], [10, 20], [0.5, 0.6])
    assert none.rank == 3 and "no rank passed" in none.reason and none.high_quality == ()


def test_choose_rank_accepts_a_custom_rule():
    def smallest(ranks, corcondia, fits, stability, high_quality):
        k = int(np.flatnonzero(high_quality)[0])
        return ranks[k], f"smallest good rank {ranks[k]}"

    choice = choose_rank([1, 2, 3], [100, 99, -5], [0.5, 0.8, 0.81], rule=smallest)
    assert choice == RankChoice(1, "smallest good rank 1", "smallest", (1, 2))


def test_choose_rank_takes_nan_core_consistency_as_no_evidence():
    """nan (a rank too large for the resident modes): not clustered, never judged high
    quality, does not end a first-drop run, listed in the reason."""
    ranks = [1, 2, 3, 4, 5, 6]
    cc = [100, 99, 98, 20, np.nan, np.nan]
    fits = [0.5, 0.7, 0.9, 0.91, 0.92, 0.93]
    choice = choose_rank(ranks, cc, fits)
    assert choice.rank == 3 and choice.high_quality == (1, 2, 3)
    assert "undefined (nan), not judged: 5, 6" in choice.reason
    # a nan inside the run of good ranks neither ends it nor gets chosen
    choice = choose_rank(
        [1, 2, 3, 4], [100, np.nan, 99, 10], [0.5, 0.6, 0.7, 0.8], rule="first-drop"
    )
    assert choice.rank == 3 and choice.high_quality == (1, 3)
    # no rank has a value: nothing to say about any, the smallest that passes the filters
    choice = choose_rank([2, 3, 4], [np.nan] * 3, [0.5, 0.6, 0.7], [0.5, 0.99, 0.98])
    assert choice.rank == 3
    assert "undefined (nan) for every rank" in choice.reason


def test_choose_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="no ranks"):
        choose_rank([], [], [])
    with pytest.raises(ValueError, match="distinct integers"):
        choose_rank([1, 1], [100, 100], [0.5, 0.6])
    with pytest.raises(ValueError, match=r"fits has shape \(1,\), expected \(2,\)"):
        choose_rank([1, 2], [100, 100], [0.5])
    with pytest.raises(ValueError, match="stability has shape"):
        choose_rank([1, 2], [100, 100], [0.5, 0.6], [1.0])
    with pytest.raises(ValueError, match="rule must be one of"):
        choose_rank([1, 2], [100, 100], [0.5, 0.6], rule="elbow")


def test_congruence_shape_and_values(rng):
    fa = [rng.standard_normal((n, 3)) for n in (5, 4)]
    fb = [rng.standard_normal((n, 2)) for n in (5, 4)]
    c = congruence(fa, fb)
    assert c.shape == (3, 2)
    cos = [
        (a / np.linalg.norm(a, axis=0)).T @ (b / np.linalg.norm(b, axis=0))
        for a, b in zip(fa, fb, strict=True)
    ]
    np.testing.assert_allclose(c, cos[0] * cos[1])


# ------------------------------------------------------------- automatic rank choice


def rank_sweep(x: np.ndarray, ranks, rng: np.random.Generator, *, n_iter_max: int = 50):
    """Core consistency, fit and stability per rank, the way a sweep would score them.

    Three replicates per rank (one ``init="gram"``, two random); core consistency and
    fit of the best-fitting one; stability over the replicates within 0.01 of its fit.
    """
    corcondia, fits, stab = [], [], []
    for rank in ranks:
        models = [
            peekcore.cp_als(
                x,
                rank,
                n_iter_max=n_iter_max,
                tol=1e-7,
                init="gram" if i == 0 else "random",
                random_state=int(rng.integers(2**31)),
            )
            for i in range(3)
        ]
        best = max(models, key=lambda m: m.fit)
        t, ata, resident = model_statistics(x, best)
        corcondia.append(core_consistency(t, ata, resident))
        fits.append(fit_scores(t, ata, resident, np.sum(x**2)).fit)
        stab.append(stability(models, fit_tol=0.01))
    return corcondia, fits, stab


def planted_rank_trials(rng: np.random.Generator, planted=range(2, 9)) -> list[tuple[int, int]]:
    """(planted, chosen) for rank-``planted`` 40 x 15 x 12 tensors with 10% noise, ranks
    swept from 1 to ``planted + 2``, default :func:`choose_rank`."""
    out = []
    for rank in planted:
        x, _ = ref.low_rank(rng, (40, 15, 12), rank, noise=0.1)
        ranks = list(range(1, rank + 3))
        choice = choose_rank(ranks, *rank_sweep(x, ranks, rng))
        out.append((rank, choice.rank))
    return out


@pytest.fixture
def one_thread():
    """Hundreds of tiny fits: thread start-up costs more than it saves, so run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_automatic_rank_choice_recovers_the_planted_rank(rng, one_thread):
    """Planted ranks 2 to 8, 10% noise: the automatic choice finds the planted rank.

    Measured with this exact protocol (``planted_rank_trials``, generators seeded 0 to
    29, 7 planted ranks each): 209 of 210 tensors (99.5%); the one miss was a rank-7
    tensor where no replicate escaped a swamp at rank 7. Without the stability scores
    (core consistency and fit only) the rate falls to 140 of 210 (67%): models above
    the planted rank grown from the ``"gram"`` start often keep a core consistency
    near 100, and only their instability across replicates gives them away.
    This test runs 21 tensors (planted ranks 2 to 8, three times) and asserts at least
    19 hits (90%).
    """
    trials = [t for _ in range(3) for t in planted_rank_trials(rng)]
    hits = sum(planted == chosen for planted, chosen in trials)
    assert hits >= 19, trials


def test_core_consistency_is_nan_for_ranks_above_the_samples(rng):
    """With R > N the sample factor has rank N < R: the core is not identifiable and the
    true factors of a noise-free tensor scored 37-67 instead of 100 (4 x 20 x 20 at R = 6)."""
    x, factors = ref.low_rank(rng, (4, 20, 20), 6)
    a = factors[0]
    t = np.einsum("nr,nij->rij", a, x)
    with pytest.warns(RuntimeWarning, match="sample factor has 4 rows"):
        value = peekcore.diagnostics.core_consistency(t, a.T @ a, factors[1:], n_samples=4)
    assert math.isnan(value)
    # with enough samples the same check gives 100 for the true factors
    x, factors = ref.low_rank(rng, (12, 20, 20), 6)
    a = factors[0]
    t = np.einsum("nr,nij->rij", a, x)
    got = peekcore.diagnostics.core_consistency(t, a.T @ a, factors[1:], n_samples=12)
    assert got == pytest.approx(100.0, abs=1e-6)
