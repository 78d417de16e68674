"""Rank measures of a sweep, their bootstrap, and their association with quality (issue #17)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import reference as ref
from scipy import stats

from peekcore import diagnostics as diag
from peekcore.errors import InvalidArgumentError
from peekcore.model import CPModel, FitHistory
from peekcore.profile import association as assoc
from peekcore.profile import measures as ms
from peekcore.sweep import rank_sweep

# ---------------------------------------------------------------- the rules by hand


def test_fit_elbow_rule():
    ranks = [1, 2, 3, 4, 5]
    fits = [0.5, 0.8, 0.9, 0.91, 0.92]  # gain 0.42; 95% of it: 0.899
    assert ms.fit_elbow(ranks, fits) == 3
    assert ms.fit_elbow(ranks, fits, fraction=0.5) == 2  # 0.71
    assert ms.fit_elbow(ranks, fits, fraction=1.0) == 5
    # order does not matter, nan fits are skipped, missing ranks are not invented
    assert ms.fit_elbow([8, 1, 4, 2], [0.92, 0.5, np.nan, 0.9]) == 2
    assert ms.fit_elbow([2, 3], [0.7, 0.7]) == 2  # no gain: the smallest rank
    assert math.isnan(ms.fit_elbow([1, 2], [np.nan, np.nan]))
    with pytest.raises(InvalidArgumentError, match="fraction"):
        ms.fit_elbow(ranks, fits, fraction=0.0)
    with pytest.raises(InvalidArgumentError, match="one value per rank"):
        ms.fit_elbow(ranks, fits[:3])


def test_ev_area_rule_and_missing_ranks():
    # ranks 1..3, EV(0) = 0; rank 2 missing: interpolated to 0.7
    assert ms.ev_area([1, 3], [0.5, 0.9]) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # rank 1 missing: between EV(0) = 0 and EV(2) = 0.8
    assert ms.ev_area([2, 4], [0.8, 1.0]) == pytest.approx((0.4 + 0.8 + 0.9 + 1.0) / 4)
    # a nan rank counts as missing; above the last defined rank the curve stays flat
    assert ms.ev_area([1, 2, 3], [0.6, np.nan, np.nan]) == pytest.approx(0.6)
    assert ms.ev_area([1, 2], [1.0, 1.0]) == 1.0
    assert ms.ev_area([1, 2], [-0.2, 1.3]) == pytest.approx(0.5)  # clipped to [0, 1]
    assert math.isnan(ms.ev_area([1, 2], [np.nan, np.nan]))


def test_stable_rank_rule():
    assert ms.stable_rank([1, 2, 3, 4, 5], [1.0, 0.95, np.nan, 0.92, 0.5]) == 4
    assert ms.stable_rank([1, 2, 3], [1.0, 0.95, 0.85], fms_threshold=0.96) == 1
    assert math.isnan(ms.stable_rank([1, 2], [np.nan, np.nan]))  # one replicate per rank
    assert math.isnan(ms.stable_rank([1, 2], [0.5, 0.4]))  # none stable: undefined, not 0


def _handmade_sweep(rng, labels=None):
    """A RankSweep-like object with random models and chosen numbers."""
    n, shape = 30, (30, 5, 4)
    ranks = [1, 2, 3]
    models = [
        [
            CPModel(np.ones(r), [rng.normal(size=(m, r)) for m in shape], FitHistory(), {})
            for _ in range(2)
        ]
        for r in ranks
    ]
    return SimpleNamespace(
        ranks=ranks,
        models=models,
        best=np.array([0, 1, 0]),
        fit=np.array([[0.5, 0.4], [0.6, 0.8], [0.81, 0.7]]),
        explained_variance=np.array([[0.75, 0.6], [0.8, 0.96], [0.97, 0.9]]),
        stability=np.array([1.0, 0.93, 0.6]),
        corcondia=np.full((3, 2), 100.0),
        chosen_rank=2,
        metadata={"rule": "autoten"},
        n=n,
    )


def test_measure_sweep_on_a_handmade_sweep(rng):
    sweep = _handmade_sweep(rng)
    out = ms.measure_sweep(sweep)
    assert tuple(out) == ms.MEASURES
    assert out["autoten"] == 2
    # best fits 0.5, 0.8, 0.81: target 0.5 + 0.95 * 0.31 = 0.7945
    assert out["fit_elbow"] == 2
    assert out["stable"] == 2
    assert math.isnan(out["class_components"])  # no labels: undefined, not 0
    assert out["ev_area"] == pytest.approx((0.75 + 0.96 + 0.97) / 3)
    assert ms.measure_sweep(sweep, fms_threshold=0.95)["stable"] == 1
    # data of one class: selectivity is undefined (nan, as in a bootstrap draw), not an error
    n = sweep.models[0][0].shape[0]
    one = ms.measure_sweep(sweep, labels=np.zeros(n, dtype=int))
    assert math.isnan(one["class_components"]) and one["ev_area"] == out["ev_area"]
    assert math.isnan(ms.ev_area([], []))  # no rank: undefined, as documented


# ---------------------------------------------------------------- class selectivity


def test_class_selective_rule():
    rng = np.random.default_rng(5)
    labels = np.repeat(["cat", "dog", "eel", "fox"], 25)  # codes 0..3
    is_c = lambda c: (labels == c).astype(float)  # noqa: E731
    columns = [
        is_c("cat") + 0.05 * rng.normal(size=100),  # selective for cat
        -2.0 * is_c("eel") + 0.05 * rng.normal(size=100),  # sign does not matter: eel
        np.ones(100),  # loads alike on all classes
        np.eye(100)[3],  # a single sample of cat: pure but covers 1 of 25
        1.0 + 0.5 * is_c("dog"),  # a bias with a bump: purity 2.25 / 5.25, corrected 0.24
        np.zeros(100),
    ]
    out = ms.class_selective(np.stack(columns, axis=1), labels)
    np.testing.assert_array_equal(out, [0, 2, -1, -1, -1, -1])
    # two classes: chance purity is 1/2, so energy 2:1 (corrected 1/3) is not selective
    # and 4:1 (corrected 0.6) is
    two = np.repeat([0, 1], 10)
    a = np.stack([np.where(two == 0, np.sqrt(2.0), 1.0), np.where(two == 0, 2.0, 1.0)], axis=1)
    np.testing.assert_array_equal(ms.class_selective(a, two), [-1, 0])
    with pytest.raises(InvalidArgumentError, match="two classes"):
        ms.class_selective(a, np.zeros(20))
    with pytest.raises(InvalidArgumentError, match="one class per sample"):
        ms.class_selective(a, two[:5])


def test_class_selectivity_with_counts_equals_repeated_rows():
    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, 80)
    a = 0.3 * rng.normal(size=(80, 6))
    a[np.arange(80), labels] += 1.0  # components 0-3 selective, 4-5 noise
    for _ in range(10):
        counts = rng.multinomial(80, np.full(80, 1 / 80))
        idx = np.repeat(np.arange(80), counts)
        np.testing.assert_array_equal(
            ms._selective(a, labels, 0.5, 0.5, counts), ms.class_selective(a[idx], labels[idx])
        )


def test_random_components_are_not_class_selective():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 10, 200)
    a = rng.normal(size=(200, 500))
    assert (ms.class_selective(a, labels) >= 0).mean() < 0.01
    assert (ms.class_selective(np.abs(a) ** 3, labels) >= 0).mean() < 0.01  # heavy tails


# ---------------------------------------------------------------- planted tensors


def _planted_classes(rng, rank, n=60, shape=(12, 10), noise=0.05):
    """Nonnegative rank-``rank`` data whose component r carries class r."""
    labels = np.arange(n) % rank
    a = 0.2 * np.abs(rng.normal(size=(n, rank)))
    a[np.arange(n), labels] += 1.0
    factors = [a] + [np.abs(rng.normal(size=(m, rank))) + 0.1 for m in shape]
    x = ref.full(factors)
    x = x + noise * np.linalg.norm(x) / math.sqrt(x.size) * rng.normal(size=x.shape)
    return x, labels


@pytest.fixture(scope="module", params=[2, 4])
def planted(request):
    rng = np.random.default_rng(100 + request.param)
    x, labels = _planted_classes(rng, request.param)
    sweep = rank_sweep(x, range(1, 7), replicates=3, n_iter_max=60, tol=1e-9, random_state=3)
    return request.param, x, labels, sweep


def test_measures_on_planted_tensors(planted):
    rank, x, labels, sweep = planted
    out = ms.measure_sweep(sweep, labels=labels)
    assert out["autoten"] == rank
    assert out["fit_elbow"] == rank
    assert out["stable"] == rank
    assert out["class_components"] == rank
    # ev_area against float64 explained variances of the best models, from dense reconstructions
    evs = []
    for k in range(len(sweep.ranks)):
        m = sweep.models[k][int(sweep.best[k])]
        evs.append(1 - np.sum((x - ref.full(m.factors, m.weights)) ** 2) / np.sum(x**2))
    assert out["ev_area"] == pytest.approx(ms.ev_area(sweep.ranks, evs), abs=1e-6)
    assert 0.5 < out["ev_area"] < 1


def test_sample_residuals_against_dense_reference(rng):
    x = rng.normal(size=(23, 4, 3, 5))

    class OddChunks:  # a chunk source that yields uneven chunks
        shape, dtype = x.shape, "float64"

        def chunks(self, chunk_size):
            for lo, hi in [(0, 7), (7, 8), (8, 23)]:
                yield x[lo:hi]

    models = [
        CPModel(rng.uniform(0.5, 2, r), [rng.normal(size=(m, r)) for m in x.shape])
        for r in (1, 3, 2)
    ]
    norms, resid = ms.sample_residuals(models, OddChunks())
    np.testing.assert_allclose(norms, np.sum(x.reshape(23, -1) ** 2, axis=1), rtol=1e-12)
    for j, m in enumerate(models):
        want = np.sum((x - ref.full(m.factors, m.weights)).reshape(23, -1) ** 2, axis=1)
        np.testing.assert_allclose(resid[:, j], want, rtol=1e-10, atol=1e-10)
    with pytest.raises(InvalidArgumentError, match="data the sweep was fitted on"):
        ms.sample_residuals(models, x[:, :3])


def test_bootstrap_identity_draw_equals_the_measures(planted):
    rank, x, labels, sweep = planted
    ctx = ms._context(sweep, x, labels, 0.95, 0.9)
    # the full-data fits from the per-sample residuals equal the sweep's
    fits = 1 - np.sqrt(ctx.residuals.sum(axis=0) / ctx.norms.sum())
    np.testing.assert_allclose(fits, sweep.fit, atol=1e-6)
    drawn = ms._draw(ctx, np.ones(x.shape[0], dtype=np.int64))
    point = ms.measure_sweep(sweep, labels=labels)
    for name in ms.MEASURES:
        assert drawn[name] == pytest.approx(point[name], abs=1e-6), name


def test_resampled_stability_equals_diagnostics_on_resampled_rows(rng):
    """The draws' factor match scores, computed from counts, equal diagnostics.stability
    on models whose sample factors are the resampled rows."""
    shape = (40, 6, 5)
    base = [rng.normal(size=(m, 3)) for m in shape]
    models = [
        CPModel(rng.uniform(0.5, 2, 3), [f + 0.3 * rng.normal(size=f.shape) for f in base])
        for _ in range(4)
    ]
    models[2].factors[0][:, 1] = 0.0  # a zero column scores 0 against everything
    reps = ms._Replicates.of(models)
    for _ in range(5):
        counts = rng.multinomial(40, np.full(40, 1 / 40))
        idx = np.repeat(np.arange(40), counts)
        resampled = [(m.weights, [m.factors[0][idx], *m.factors[1:]]) for m in models]
        near = np.array([0, 2, 3])
        fits = np.array([0.7, 0.9, 0.8])  # replicate 2 is the best of the three
        want = diag.stability([resampled[j] for j in near], fits=fits)
        assert reps.stability(counts, near, 2) == pytest.approx(want, abs=1e-12)


def test_bootstrap_draws(planted):
    rank, x, labels, sweep = planted
    draws = ms.bootstrap_measures(sweep, x, labels=labels, n_boot=40, random_state=1)
    assert tuple(draws) == ms.MEASURES
    assert all(v.shape == (40,) for v in draws.values())
    # a clean planted rank: the rank measures hardly move; ev_area varies around its value
    for name in ("autoten", "fit_elbow", "stable", "class_components"):
        assert np.mean(draws[name] == rank) >= 0.9, name
    point = ms.measure_sweep(sweep, labels=labels)["ev_area"]
    assert np.std(draws["ev_area"]) > 0
    assert abs(np.mean(draws["ev_area"]) - point) < 3 * np.std(draws["ev_area"])
    again = ms.bootstrap_measures(sweep, x, labels=labels, n_boot=40, random_state=1)
    for name in ms.MEASURES:
        np.testing.assert_array_equal(draws[name], again[name])
    no_labels = ms.bootstrap_measures(sweep, x, n_boot=3)
    assert np.isnan(no_labels["class_components"]).all()
    with pytest.raises(InvalidArgumentError, match="n_boot"):
        ms.bootstrap_measures(sweep, x, n_boot=0)


def test_bootstrap_ev_spread_matches_a_refit_free_reference(rng):
    """The draws of one model's explained variance have the spread of a plain
    resample-the-rows computation in float64."""
    x = rng.normal(size=(50, 4, 3))
    m = CPModel(np.ones(2), [rng.normal(size=(s, 2)) for s in x.shape])
    sweep = SimpleNamespace(
        ranks=[2],
        models=[[m]],
        best=np.array([0]),
        fit=np.array([[0.1]]),
        explained_variance=np.array([[0.1]]),
        stability=np.array([np.nan]),
        corcondia=np.array([[100.0]]),
        chosen_rank=2,
        metadata={},
    )
    draws = ms.bootstrap_measures(sweep, x, n_boot=30, random_state=4)["ev_area"]
    r = np.random.default_rng(4)
    full = ref.full(m.factors, m.weights)
    for b in range(30):
        counts = r.multinomial(50, np.full(50, 1 / 50))
        idx = np.repeat(np.arange(50), counts)
        ev = 1 - np.sum((x[idx] - full[idx]) ** 2) / np.sum(x[idx] ** 2)
        assert draws[b] == pytest.approx(np.clip(ev, 0, 1) / 2, abs=1e-10)  # ranks 1..2


# ---------------------------------------------------------------- association


def test_rho_and_tau_equal_scipy():
    rng = np.random.default_rng(0)
    q = rng.uniform(0.1, 0.99, 30)
    v = np.round(3 * q + rng.normal(size=30))  # integer ranks: ties
    v[[3, 17]] = np.nan
    a = assoc.associate(q, v, layer="act1", measure="stable")
    keep = ~np.isnan(v)
    assert a.rho == pytest.approx(stats.spearmanr(q[keep], v[keep]).statistic, abs=1e-12)
    assert a.tau == pytest.approx(stats.kendalltau(q[keep], v[keep]).statistic, abs=1e-12)
    assert (a.n, a.n_dropped) == (28, 2)
    assert a.ci[0] < a.rho < a.ci[1]
    # the permutation p-value equals scipy's test on the same generator
    res = stats.permutation_test(
        (v[keep],),
        lambda y: stats.spearmanr(q[keep], y).statistic,
        permutation_type="pairings",
        n_resamples=2000,
        rng=np.random.default_rng(0),
    )
    assert a.p_value == pytest.approx(res.pvalue)
    # small n: every permutation enumerated
    qk, vk = q[keep][:6], v[keep][:6]
    small = assoc.associate(qk, vk, layer="x", measure="m")
    assert small.exact
    exact = stats.permutation_test(
        (vk,), lambda y: stats.spearmanr(qk, y).statistic, permutation_type="pairings"
    )
    assert small.p_value == pytest.approx(exact.pvalue)


def test_constant_and_short_inputs_give_nan_with_a_reason():
    q = np.linspace(0.5, 0.9, 8)
    flat = assoc.associate(q, np.full(8, 2.0), layer="act1", measure="autoten")
    assert math.isnan(flat.rho) and math.isnan(flat.p_value) and math.isnan(flat.ci[0])
    assert "same (2) at every point" in flat.reason
    same_q = assoc.associate(np.ones(8), q, layer="act1", measure="autoten")
    assert "accuracy is the same" in same_q.reason
    short = assoc.associate([0.1, np.nan, 0.3], [1, 2, np.nan], layer="a", measure="m")
    assert short.n == 1 and math.isnan(short.rho)
    with pytest.raises(InvalidArgumentError, match="pair up"):
        assoc.associate([1, 2, 3], [1, 2], layer="a", measure="m")
    with pytest.raises(InvalidArgumentError, match="must be numbers"):
        assoc.associate(["high", "low", "mid"], [1, 2, 3], layer="a", measure="m")
    with pytest.raises(InvalidArgumentError, match="n_permutations"):
        assoc.associate(q, q, layer="a", measure="m", n_permutations=100)


@pytest.mark.slow
def test_permutation_p_is_uniform_under_the_null():
    rng = np.random.default_rng(2024)
    p = [
        assoc.associate(
            rng.normal(size=20),
            rng.normal(size=20),
            layer="a",
            measure="m",
            n_boot=100,
            random_state=i,
        ).p_value
        for i in range(300)
    ]
    assert stats.kstest(p, "uniform").pvalue > 0.01


def test_within_group_permutations_keep_groups():
    rng = np.random.default_rng(3)
    codes = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0])
    perms = assoc._within_group_permutations(codes, 500, rng)
    assert (np.sort(perms, axis=1) == np.arange(9)).all()  # each row a permutation
    assert (codes[perms] == codes).all()  # every point takes a value from its own group
    # and every reordering within a group happens: group 0 (4 points) sees all 24
    assert len({tuple(row[codes == 0]) for row in perms}) == 24


def test_grouped_bootstrap_resamples_within_groups_or_whole_groups():
    rng = np.random.default_rng(4)
    codes = np.array([1, 0, 2, 0, 1, 1, 2, 0, 0])
    members = [np.flatnonzero(codes == g) for g in range(3)]
    pick = assoc._within_group_resamples(members, 300, rng)
    assert pick.shape == (300, 9)
    # every resample keeps each group's size, drawing its points from that group
    assert (codes[pick] == np.sort(codes)).all()
    assert len({tuple(row) for row in pick}) > 250  # and the draws vary
    q = rng.normal(size=30)
    few = assoc.associate(
        q, q + rng.normal(size=30), layer="a", measure="m", groups=np.arange(30) % 3
    )
    assert "within each of 3 groups" in few.extra["ci_method"]
    many = assoc.associate(
        q, q + rng.normal(size=30), layer="a", measure="m", groups=np.arange(30) % 10
    )
    assert "whole groups resampled (10 groups)" in many.extra["ci_method"]
    assert many.ci[0] < many.rho < many.ci[1]


@pytest.mark.slow
def test_grouped_permutation_under_a_between_group_effect():
    """Seeds differ in both quality and the measure, with no link inside a seed: the
    grouped test keeps its level, the ungrouped one is fooled."""
    rng = np.random.default_rng(7)
    p_grouped, p_plain = [], []
    groups = np.repeat(np.arange(4), 6)
    for i in range(300):
        effect = rng.normal(size=4)[groups] * 3
        q, v = effect + rng.normal(size=24), effect + rng.normal(size=24)
        p_grouped.append(
            assoc.associate(
                q, v, layer="a", measure="m", groups=groups, n_boot=100, random_state=i
            ).p_value
        )
        if i < 50:
            p_plain.append(
                assoc.associate(q, v, layer="a", measure="m", n_boot=100, random_state=i).p_value
            )
    assert stats.kstest(p_grouped, "uniform").pvalue > 0.01
    assert np.mean(np.array(p_plain) < 0.05) > 0.5


@pytest.mark.slow
def test_bootstrap_interval_covers_a_planted_effect():
    """Bivariate normal with correlation r: Spearman's rho is (6 / pi) asin(r / 2)."""
    rng = np.random.default_rng(99)
    r, n, sims = 0.6, 40, 200
    truth = 6 / math.pi * math.asin(r / 2)
    cov = [[1, r], [r, 1]]
    hits = 0
    for i in range(sims):
        q, v = rng.multivariate_normal([0, 0], cov, size=n).T
        low, high = assoc.associate(q, v, layer="a", measure="m", random_state=i).ci
        hits += low <= truth <= high
    # nominal 0.95; binomial sd over 200 simulations is 0.015
    assert 0.9 <= hits / sims <= 0.99


def test_holm_adjustment():
    def a(p):
        return assoc.Association("l", "m", 0.5, 0.4, p, (0.1, 0.8), 20)

    out = assoc.holm([a(0.01), a(0.04), a(0.03), a(np.nan)])
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1, made monotone: 0.03, 0.06, 0.06
    np.testing.assert_allclose([o.p_adjusted for o in out[:3]], [0.03, 0.06, 0.06])
    assert math.isnan(out[3].p_adjusted)


def test_verdict_wording():
    rng = np.random.default_rng(1)
    q = rng.normal(size=27)
    strong = assoc.associate(q, -q + 0.5 * rng.normal(size=27), layer="act2", measure="stable")
    assert strong.verdict.startswith("act2: the stable rank falls as accuracy rises, rho = -")
    assert "n = 27" in strong.verdict and "p < 0.001" in strong.verdict
    rising = assoc.associate(q, q, layer="act2", measure="ev_area", quality_name="top-1")
    assert "explained-variance area rises as top-1 rises" in rising.verdict
    null = assoc.associate(q, rng.normal(size=27), layer="act1", measure="ev_area")
    assert not null.significant
    assert "no evidence of a link" in null.verdict and "at this sample size" in null.verdict
    few = assoc.associate(q[:5], q[:5], layer="act3", measure="autoten")
    assert "too few for the test to have any power" in few.verdict
    assert not few.significant  # even rho = 1 on 5 points says nothing
    gone = assoc.associate(q[:8], np.full(8, np.nan), layer="act3", measure="stable")
    assert gone.verdict.startswith("act3: 0 points (8 more with no value, NaN) for the stable")

    per_layer, overall = assoc.summarize([strong, null, few])
    assert per_layer["act2"].startswith("act2: the stable rank falls as accuracy rises")
    assert "no evidence of a link between any of the 1 rank measures" in per_layer["act1"]
    assert "no power" in per_layer["act3"] or "too few" in per_layer["act3"]
    assert "stable rank falls" in overall
    pooled = assoc.associate_pooled(
        np.r_[q, q], np.r_[-q, 5 - q], ["a"] * 27 + ["b"] * 27, measure="stable"
    )
    assert pooled.layer == "all" and pooled.n_groups == 2
    _, overall = assoc.summarize([strong, null, pooled])
    assert overall.startswith("all: the stable rank falls")
    # pooled "no evidence" goes on to name the layer links that survive the correction
    flat = assoc.associate_pooled(
        np.r_[q, q], rng.normal(size=54), ["a"] * 27 + ["b"] * 27, measure="ev_area"
    )
    _, overall = assoc.summarize([strong, null, flat])
    head, tail = overall.split(". Per layer, after the same correction: ")
    assert head.startswith("all layers: no evidence of a link")
    assert tail.startswith("act2: the stable rank falls") and "act1" not in tail
    _, overall = assoc.summarize([null, flat])
    assert overall.endswith("Per layer, after the same correction: no layer shows a link either")
    also = assoc.associate(q, q, layer="act2", measure="ev_area")
    per_layer, _ = assoc.summarize([strong, also])
    assert per_layer["act2"].count("act2") == 1  # the layer named once
    assert "stable rank falls" in per_layer["act2"] and "area rises" in per_layer["act2"]
    _, overall = assoc.summarize([few])
    assert "too few" in overall and "no conclusion" in overall


def test_verdict_states_no_direction_when_the_interval_spans_zero():
    """p below 0.05 but a bootstrap interval for rho that includes 0: the tests disagree."""
    q = [0.435, -0.197, -0.043, -2.492, -2.7, 0.337, 0.33]
    v = [1.741, 0.564, 0.187, -1.977, -3.587, 1.153, -0.34]
    a = assoc.associate(q, v, layer="L", measure="stable", random_state=26)
    low, high = a.ci
    assert a.significant and low < 0 < high  # the case: permutation p < 0.05, interval spans 0
    assert "rises" not in a.verdict and "falls" not in a.verdict
    assert "direction" in a.verdict and "includes zero" in a.verdict
    assert not a.conclusive
    per_layer, overall = assoc.summarize([a])
    for sentence in (per_layer["L"], overall):
        assert "rises" not in sentence and "falls" not in sentence
    # the same data with the interval excluding zero states the direction
    b = assoc.holm([dataclasses.replace(a, ci=(0.2, 0.95))])[0]
    assert b.conclusive and "the stable rank rises as accuracy rises" in b.verdict


def test_one_point_per_group_is_not_a_test_with_nothing_to_permute():
    """Separate runs with one checkpoint each: a within-group permutation permutes nothing
    (p = 1 whatever the data), so the points, independent runs, are permuted freely."""
    rng = np.random.default_rng(11)
    q = rng.normal(size=12)
    a = assoc.associate(q, q, layer="L", measure="stable", groups=np.arange(12))
    plain = assoc.associate(q, q, layer="L", measure="stable")
    assert a.p_value == plain.p_value < 0.001
    assert a.conclusive and "rises" in a.verdict
    assert "one point" in a.extra["groups"]
    # pooled: one point per (layer, seed) falls back to permuting within layer, not across
    layers = np.repeat(["a", "b"], 12)
    pooled = assoc.associate_pooled(
        np.r_[q, q], np.r_[q, 10 + q], layers, measure="stable", seeds=np.tile(np.arange(12), 2)
    )
    assert pooled.n_groups == 2 and pooled.p_value < 0.001


def test_verdict_says_when_too_few_within_group_orderings_exist():
    """Four groups of two points have 2**4 = 16 orderings: the two-sided p-value cannot
    fall below about 2 / 16, so even rho = 1 is no test, not "no evidence"."""
    q = np.arange(8.0)
    few = assoc.associate(q, q, layer="L", measure="stable", groups=np.arange(8) // 2)
    assert few.extra["orderings"] == 16 and not few.significant
    assert "no power" in few.verdict and "16 distinct" in few.verdict
    assert "no evidence" not in few.verdict
    per_layer, _ = assoc.summarize([few])
    assert "too few distinct orderings" in per_layer["L"] and "no evidence" not in per_layer["L"]
    q = np.arange(12.0)
    six = assoc.associate(q, q, layer="L", measure="stable", groups=np.arange(12) // 2)
    assert six.extra["orderings"] == 64  # 2 / 64 < 0.05: a test, the usual wording
    many = assoc.associate(q, q, layer="L", measure="stable", groups=np.arange(12) // 6)
    assert many.extra["orderings"] == math.factorial(6) ** 2
    pair = [dataclasses.replace(six, p_value=1e-5), dataclasses.replace(six, p_value=0.5)]
    tiny = assoc.holm(pair)[0]  # adjusted 2e-5: shown as such, never as "0.000"
    assert "(Holm-adjusted p < 0.001)" in tiny.verdict and "0.000" not in tiny.verdict


def test_tau_has_a_permutation_p_value_equal_to_scipy():
    rng = np.random.default_rng(21)
    # rows with ties, against scipy's tau-b
    x = rng.integers(0, 4, (50, 9)).astype(float)
    y = rng.integers(0, 3, 9).astype(float)
    want = [stats.kendalltau(row, y).statistic for row in x]
    np.testing.assert_allclose(assoc._kendall_rows(x, y), want, rtol=1e-12)
    # 6 distinct points: 720 permutations, enumerated; scipy's exact null of tau is the same
    q, v = rng.normal(size=6), rng.normal(size=6)
    v[:3] += 2 * q[:3]
    a = assoc.associate(q, v, layer="a", measure="m")
    assert a.exact
    exact = stats.kendalltau(q, v, method="exact").pvalue
    assert a.tau_p_value == pytest.approx(exact, rel=1e-9)
    # grouped: the same within-group machinery as rho, and saved in the record
    g = np.repeat(np.arange(3), 8)
    q, v = rng.normal(size=24), rng.normal(size=24)
    b = assoc.associate(q, q + v, layer="a", measure="m", groups=g)
    assert 0 < b.tau_p_value < 0.05 and b.to_dict()["tau_p_value"] == b.tau_p_value
