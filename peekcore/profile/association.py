"""Association of a rank measure with a quality value (test accuracy) across checkpoints.

:func:`associate` gives Spearman's rho and Kendall's tau (as
``scipy.stats.spearmanr`` and ``kendalltau``: average ranks, tau-b for ties),
two-sided permutation p-values for both and a bootstrap interval for rho.
:func:`holm` adjusts the p-values of a family of associations (Holm's
step-down method, which controls the family-wise error rate), and
:func:`summarize` turns a family into one plain-language verdict per layer and
one overall.

Points that share a training seed are not independent (checkpoints along one
run). With ``groups`` (the seed, say):

- the permutation test permutes the measure **within** each group only, so it
  asks whether, inside a training run, the measure tracks quality; differences
  between runs (one seed better than another on both) are held fixed and are
  no evidence;
- the bootstrap resamples **whole groups** with replacement (a cluster
  bootstrap), so the interval reflects the variation between runs, when there
  are at least ``MIN_CLUSTERS`` (10) groups. With fewer, a cluster bootstrap has
  too few distinct resamples to mean anything (3 groups give 10), so the points
  are resampled **within** each group instead (a stratified bootstrap), which,
  like the permutation test, holds the groups fixed: the interval then leaves
  out the variation between runs, and ``extra["ci_method"]`` says so.
- when every group holds one point (separate runs, one checkpoint each) there
  is nothing to permute within a group; such runs are independent, so the
  points are tested as if ungrouped, and ``extra["groups"]`` says so;
- a within-group permutation has only ``prod(size_g!)`` distinct orderings
  (``extra["orderings"]``); when ``2 / orderings`` exceeds ``1 - level`` no
  data could be significant, and the verdict says the test has no power.

Pooled over layers (``layer="all"``), pass the layer (or the pair layer and
seed) as ``groups``: the permutation is then within layer, because measures of
different layers live on different scales and pooling them under a joint
permutation would compare them with each other. :func:`associate_pooled` does this.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from ..errors import InvalidArgumentError

__all__ = [
    "MIN_CLUSTERS",
    "MIN_POINTS",
    "Association",
    "associate",
    "associate_pooled",
    "holm",
    "summarize",
]

#: Fewer points than this and the verdict says the test has no power.
MIN_POINTS = 6
#: Groups a cluster bootstrap needs; with fewer, points are resampled within groups.
MIN_CLUSTERS = 10

_MEASURE_NAMES = {
    "autoten": "AutoTen rank",
    "fit_elbow": "fit-elbow rank",
    "stable": "stable rank",
    "class_components": "number of class-selective components",
    "ev_area": "explained-variance area",
}


@dataclass
class Association:
    """The association of one measure with quality, in one layer or pooled.

    Attributes
    ----------
    layer : str
        The layer, or ``"all"`` when pooled.
    measure : str
    rho, tau : float
        Spearman's rho and Kendall's tau-b of (quality, measure); nan when undefined.
    p_value : float
        Two-sided permutation p-value of rho (the verdict's).
    tau_p_value : float
        Two-sided permutation p-value of tau, from the same kind of
        permutations (within groups when there are groups); not adjusted.
    ci : tuple of float
        ``(low, high)`` bootstrap interval for rho at ``level``.
    n : int
        Points used (pairs with a NaN dropped).
    p_adjusted : float
        ``p_value`` after Holm's correction across the family given to
        :func:`holm` or :func:`summarize` (equal to ``p_value`` for one test).
    verdict : str
        One plain-language sentence.
    n_dropped : int
        Points dropped because the measure or the quality was NaN.
    n_groups : int
        Groups the permutation and bootstrap respected (``n`` when ungrouped).
    n_permutations, n_boot : int
        Resamples used; ``exact`` is True when every permutation was enumerated.
    exact : bool
    level : float
    reason : str
        Why the statistics are nan, or ``""``.
    quality_name : str
    extra : dict
        ``ci_method`` (how the interval was made), ``orderings`` (distinct
        orderings the permutation can draw), ``groups`` (a note when groups
        were set aside).
    """

    layer: str
    measure: str
    rho: float
    tau: float
    p_value: float
    ci: tuple[float, float]
    n: int
    p_adjusted: float = math.nan
    verdict: str = ""
    n_dropped: int = 0
    n_groups: int = 0
    n_permutations: int = 0
    n_boot: int = 0
    exact: bool = False
    level: float = 0.95
    reason: str = ""
    quality_name: str = "accuracy"
    tau_p_value: float = math.nan
    extra: dict = field(default_factory=dict)

    @property
    def significant(self) -> bool:
        """Whether the adjusted p-value is below ``1 - level``."""
        p = self.p_adjusted if math.isfinite(self.p_adjusted) else self.p_value
        return bool(self.n >= MIN_POINTS and math.isfinite(p) and p < 1.0 - self.level)

    @property
    def conclusive(self) -> bool:
        """Significant, and the bootstrap interval agrees: it excludes zero (or is undefined).

        The permutation test and the bootstrap interval answer with different
        methods; on few points they can disagree (p < 0.05 while the interval
        includes 0). Only then is a direction stated in the verdict.
        """
        low, high = self.ci
        spans = math.isfinite(low) and math.isfinite(high) and low <= 0.0 <= high
        return self.significant and not spans

    def to_dict(self) -> dict:
        """A JSON-ready record (``ci`` as ``[low, high]``; nan stays nan)."""
        out = asdict(self)
        out["ci"] = [float(self.ci[0]), float(self.ci[1])]
        return out


# ------------------------------------------------------------------ statistics


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (nan where either row is constant)."""
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of ``x`` (``P x n``) with ``y`` (``n``), as scipy.

    ``tau_b = S / sqrt(U_x U_y)``: ``S`` sums ``sign(x_j - x_i) sign(y_j - y_i)``
    over pairs ``i < j``, ``U`` counts the untied pairs. Rows are done in chunks
    of at most 2**22 pair signs (32 MiB).
    """
    x = np.atleast_2d(x)
    n = x.shape[-1]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    sy = np.sign(y[None, :] - y[:, None])[upper]  # pairs
    out = np.empty(x.shape[0])
    step = max(1, 2**22 // max(int(upper.sum()), 1))
    for lo in range(0, x.shape[0], step):
        rows = x[lo : lo + step]
        sx = np.sign(rows[:, None, :] - rows[:, :, None])[:, upper]  # chunk x pairs
        den = np.sqrt((sx != 0).sum(axis=1) * float((sy != 0).sum()))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + step] = np.where(den > 0, (sx @ sy) / np.where(den > 0, den, 1), np.nan)
    return out


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis: Pearson of average ranks (as scipy)."""
    return _pearson_rows(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


def _group_codes(groups: Any, n: int) -> np.ndarray:
    if groups is None:
        return np.zeros(n, dtype=np.int64)
    g = np.asarray(groups, dtype=object) if not isinstance(groups, np.ndarray) else groups
    if g.shape[:1] != (n,):
        raise InvalidArgumentError(f"groups must hold one group per point ({n}), got {g.shape}")
    if g.ndim > 1:  # rows of a 2-D array (layer, seed) are one group each
        g = np.array(["\x1f".join(map(str, row)) for row in g])
    return np.unique(g.astype(str), return_inverse=True)[1].reshape(-1)


def _p_from_null(null: np.ndarray, observed: float, n_resamples: int) -> float:
    """Two-sided Monte Carlo p-value, as ``scipy.stats.permutation_test`` computes it."""
    gamma = abs(observed) * np.finfo(np.float64).eps * 100
    less = (np.sum(null <= observed + gamma) + 1.0) / (n_resamples + 1.0)
    greater = (np.sum(null >= observed - gamma) + 1.0) / (n_resamples + 1.0)
    return float(min(1.0, 2.0 * min(less, greater)))


def _within_group_permutations(
    codes: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_permutations x n`` index arrays, each permuting points only within their group."""
    n = codes.size
    base = np.argsort(codes, kind="stable")  # positions grouped by group
    # sorting by (group, random key) shuffles each group's block independently
    keys = codes[base][None, :] + rng.random((n_permutations, n))
    shuffled = base[np.argsort(keys, axis=1)]
    perm = np.empty((n_permutations, n), dtype=np.int64)
    perm[:, base] = shuffled
    return perm


def _permutation_p(
    q: np.ndarray,
    v: np.ndarray,
    codes: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    rows: Any = _pearson_rows,
) -> tuple[float, bool]:
    """Two-sided permutation p-value of Spearman's rho (``rows=_kendall_rows``: Kendall's
    tau), and whether it was exact."""
    rq, rv = stats.rankdata(q), stats.rankdata(v)
    if codes.max() == 0:  # no groups: scipy's test (exact when n! <= n_permutations)

        def statistic(x: np.ndarray, axis: int = -1) -> np.ndarray:
            x = np.moveaxis(x, axis, -1)
            return rows(x.reshape(-1, x.shape[-1]), rq).reshape(x.shape[:-1])

        res = stats.permutation_test(
            (rv,),
            statistic,
            permutation_type="pairings",
            vectorized=True,
            n_resamples=n_permutations,
            alternative="two-sided",
            rng=rng,
        )
        return float(res.pvalue), math.factorial(v.size) <= n_permutations
    observed = float(rows(rv[None, :], rq)[0])
    null = rows(rv[_within_group_permutations(codes, n_permutations, rng)], rq)
    return _p_from_null(null, observed, n_permutations), False


def _within_group_resamples(
    members: list[np.ndarray], n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_boot x n`` indices: each group's points drawn with replacement from that group."""
    return np.concatenate([m[rng.integers(0, m.size, (n_boot, m.size))] for m in members], axis=1)


def _bootstrap_ci(
    q: np.ndarray,
    v: np.ndarray,
    codes: np.ndarray,
    n_boot: int,
    level: float,
    rng: np.random.Generator,
) -> tuple[tuple[float, float], str]:
    """Bootstrap interval for rho: pairs (BCa, scipy), or with groups a percentile
    interval over whole groups (``MIN_CLUSTERS`` or more) or points within groups."""
    if codes.max() == 0:

        def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
            return _spearman_rows(np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1))

        with warnings.catch_warnings():
            # resamples with a constant side have no rho; handled below
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.bootstrap(
                (q, v),
                statistic,
                paired=True,
                vectorized=True,
                n_resamples=n_boot,
                confidence_level=level,
                method="BCa",
                rng=rng,
            )
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        if all(math.isfinite(c) for c in ci):
            return ci, "BCa, pairs resampled"
        draws = res.bootstrap_distribution
        how = "percentile, pairs resampled (BCa undefined: some resamples had a constant side)"
    else:
        members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
        if len(members) >= MIN_CLUSTERS:
            draws = np.empty(n_boot)
            for b in range(n_boot):
                chosen = rng.integers(0, len(members), len(members))
                pick = np.concatenate([members[g] for g in chosen])
                draws[b] = _spearman_rows(q[pick], v[pick])
            how = f"percentile, whole groups resampled ({len(members)} groups)"
        else:
            pick = _within_group_resamples(members, n_boot, rng)
            draws = _spearman_rows(q[pick], v[pick])
            how = (
                f"percentile, points resampled within each of {len(members)} groups (fewer "
                f"than {MIN_CLUSTERS} groups for a cluster bootstrap; variation between "
                "groups not included)"
            )
    draws = draws[np.isfinite(draws)]
    if draws.size < max(10, n_boot // 2):
        return (math.nan, math.nan), how + "; too few resamples with a defined rho"
    alpha = 1.0 - level
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high)), how


def _orderings(codes: np.ndarray) -> int:
    """Distinct orderings the permutation test can draw: ``prod(size_g!)`` over groups.

    An upper bound (tied values give fewer), capped at ``10**9`` so that it
    stays a small number in saved files. The two-sided p-value cannot fall
    below about ``2 / orderings``.
    """
    total = 1
    for k in np.bincount(codes):
        total *= math.factorial(min(int(k), 13))  # 13! > 10**9: no need for more
        if total >= 10**9:
            return 10**9
    return total


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _paired(
    quality: Any, values: Any, groups: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Checked float pairs with NaN pairs dropped, their group codes, and how many were dropped."""
    try:
        q = np.asarray(quality, dtype=np.float64).reshape(-1)
        v = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"quality and values must be numbers (NaN for a missing value): {err}"
        ) from err
    if q.shape != v.shape:
        raise InvalidArgumentError(
            f"quality and values must pair up: {q.size} quality values, {v.size} measure values"
        )
    codes = _group_codes(groups, q.size)
    keep = np.isfinite(q) & np.isfinite(v)
    codes = np.unique(codes[keep], return_inverse=True)[1].reshape(-1)
    return q[keep], v[keep], codes, int((~keep).sum())


def _undefined(q: np.ndarray, v: np.ndarray, what: str, quality_name: str) -> str:
    """Why rho is undefined for these points, or ``""``."""
    if q.size < 3:
        return f"only {q.size} point{'s' if q.size != 1 else ''} with defined values"
    if np.ptp(v) == 0:
        return f"the {what} is the same ({v[0]:g}) at every point"
    if np.ptp(q) == 0:
        return f"the {quality_name} is the same ({q[0]:g}) at every point"
    return ""


def associate(
    quality: Any,
    values: Any,
    *,
    layer: str,
    measure: str,
    groups: Any = None,
    n_permutations: int = 2000,
    n_boot: int = 2000,
    random_state: int | np.random.Generator = 0,
    level: float = 0.95,
    quality_name: str = "accuracy",
) -> Association:
    """Rank association of one measure with quality across checkpoints.

    Parameters
    ----------
    quality : array
        ``n`` quality values (test accuracy, ...), one per point.
    values : array
        ``n`` values of the measure at the same points; pairs where either is NaN
        are dropped (``n`` reports the points used, ``n_dropped`` the others).
    layer, measure : str
        Labels carried into the result and the verdict.
    groups : array, optional
        ``n`` group labels (the training seed; rows of a 2-D array, e.g.
        ``(layer, seed)``, are one label each): the permutation is within
        groups and the bootstrap resamples whole groups, or points within
        groups when there are fewer than ``MIN_CLUSTERS`` (module docstring).
    n_permutations : int
        At least 2000; all permutations are used when there are fewer
        (no groups).
    n_boot : int
        Bootstrap resamples: pairs with BCa (``scipy.stats.bootstrap``)
        without groups, a percentile interval with groups.
    random_state : int or numpy.random.Generator
        Seeds the permutations and the bootstrap.
    level : float
        Confidence level of the interval; the verdict calls a link significant
        when the (adjusted) p-value is below ``1 - level``.
    quality_name : str
        What quality is, for the verdict.

    Returns
    -------
    Association
        With ``p_adjusted = p_value`` (a family of one; see :func:`holm`). When
        rho is undefined (fewer than 3 points, or a side constant) the
        statistics are nan and ``reason`` says why.
    """
    q, v, codes, n_dropped = _paired(quality, values, groups)
    notes = {}
    if groups is not None and codes.size and np.bincount(codes).max() == 1:
        # separate runs, one point each: a within-group permutation would permute nothing
        # (p = 1 whatever the data); independent runs are exchangeable, so permute freely
        codes = np.zeros_like(codes)
        notes["groups"] = "every group holds one point (independent runs): tested ungrouped"
    n_permutations = _check_positive_int(n_permutations, "n_permutations", 2000)
    n_boot = _check_positive_int(n_boot, "n_boot", 100)
    if not 0.5 < float(level) < 1.0:
        raise InvalidArgumentError(f"level must be in (0.5, 1), e.g. 0.95, got {level}")
    n = int(q.size)
    base = Association(
        layer=str(layer),
        measure=str(measure),
        rho=math.nan,
        tau=math.nan,
        p_value=math.nan,
        ci=(math.nan, math.nan),
        n=n,
        n_dropped=n_dropped,
        n_groups=int(codes.max() + 1) if n else 0,
        n_permutations=n_permutations,
        n_boot=n_boot,
        level=float(level),
        quality_name=quality_name,
    )
    reason = _undefined(q, v, _MEASURE_NAMES.get(measure, measure), quality_name)
    if reason:
        result = replace(base, reason=reason + ", so rho is undefined")
        result.verdict = _verdict(result)
        return result
    rng = np.random.default_rng(random_state)
    rho = float(stats.spearmanr(q, v).statistic)
    tau = float(stats.kendalltau(q, v).statistic)
    p, exact = _permutation_p(q, v, codes, n_permutations, rng)
    ci, how = _bootstrap_ci(q, v, codes, n_boot, float(level), rng)
    tau_p, _ = _permutation_p(q, v, codes, n_permutations, rng, _kendall_rows)
    result = replace(
        base,
        rho=rho,
        tau=tau,
        p_value=p,
        tau_p_value=tau_p,
        p_adjusted=p,
        ci=ci,
        exact=exact,
        extra={"ci_method": how, "orderings": _orderings(codes), **notes},
    )
    result.verdict = _verdict(result)
    return result


def associate_pooled(
    quality: Any,
    values: Any,
    layers: Any,
    *,
    measure: str,
    seeds: Any = None,
    **kwargs: Any,
) -> Association:
    """:func:`associate` over the points of every layer (``layer="all"``).

    The permutation is within layer (within layer and seed when ``seeds`` is
    given and some (layer, seed) holds several points), and the bootstrap
    resamples whole (layer[, seed]) groups.

    Parameters
    ----------
    quality, values : array
        ``n`` points, all layers together.
    layers : array
        ``n`` layer names.
    measure : str
    seeds : array, optional
        ``n`` training seeds.
    **kwargs
        Passed to :func:`associate`.
    """
    layers = np.asarray(layers).astype(str)
    groups = layers
    if seeds is not None:
        pairs = np.stack([layers, np.asarray(seeds).astype(str)], 1)
        # one point per (layer, seed) leaves nothing to permute within: then within layer
        if np.unique(pairs, axis=0).shape[0] < pairs.shape[0]:
            groups = pairs
    return associate(quality, values, layer="all", measure=measure, groups=groups, **kwargs)


# ------------------------------------------------------------------ verdicts


def holm(associations: list[Association]) -> list[Association]:
    """The associations with Holm-adjusted p-values across the family.

    Holm's step-down method: sort the ``m`` defined p-values, multiply the
    ``i``-th smallest by ``m - i + 1``, and make the sequence monotone (capped
    at 1). It controls the family-wise error rate without assuming
    independence. Undefined (nan) p-values take no part and stay nan. The
    verdicts are rewritten from the adjusted p-values.
    """
    p = np.array([a.p_value for a in associations], dtype=np.float64)
    defined = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(p.size, math.nan)
    order = defined[np.argsort(p[defined], kind="stable")]
    m = order.size
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        adjusted[j] = running
    out = []
    for a, pa in zip(associations, adjusted, strict=True):
        b = replace(a, p_adjusted=float(pa))
        b.verdict = _verdict(b)
        out.append(b)
    return out


def _fmt_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _numbers(a: Association) -> str:
    low, high = a.ci
    ci = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else ""
    p = f"p {_fmt_p(a.p_value)}"
    if math.isfinite(a.p_adjusted) and abs(a.p_adjusted - a.p_value) > 1e-12:
        p += f" (Holm-adjusted p {_fmt_p(a.p_adjusted)})"  # never "0.000"
    return f"rho = {a.rho:.2f}{ci}, {p}, n = {a.n}"


def _powerless(a: Association) -> bool:
    """Not significant, and the permutation could never have made it so (too few orderings)."""
    return not a.significant and 2.0 / a.extra.get("orderings", math.inf) > 1.0 - a.level


def _verdict(a: Association) -> str:
    what = _MEASURE_NAMES.get(a.measure, a.measure)
    head = f"{a.layer}: "
    if a.n < MIN_POINTS:
        # say where the other points went: 8 checkpoints reading "0 points" is a puzzle
        lost = f" ({a.n_dropped} more with no value, NaN)" if a.n_dropped else ""
        return (
            head + f"{a.n} point{'s' if a.n != 1 else ''}{lost} for the {what}: too few for the "
            f"test to have any power (at least {MIN_POINTS} needed), so no conclusion"
        )
    if a.reason:
        return head + f"no test of the {what}: {a.reason}"
    if a.conclusive:
        way = "rises" if a.rho > 0 else "falls"
        return head + f"the {what} {way} as {a.quality_name} rises, {_numbers(a)}"
    orderings = a.extra.get("orderings", math.inf)
    if _powerless(a):
        return head + (
            f"no test of the {what}: the permutation within {a.n_groups} groups has only "
            f"{orderings} distinct orderings, so p cannot fall below about {2.0 / orderings:.2f}: "
            f"the test has no power here, so no conclusion ({_numbers(a)})"
        )
    if a.significant:  # the permutation test and the interval disagree: no direction
        return head + (
            f"inconclusive for the {what} and {a.quality_name}: the permutation test is below "
            f"{1.0 - a.level:.2g} but the {a.level:.0%} interval for rho includes zero, so "
            f"neither a link nor its direction is established ({_numbers(a)})"
        )
    return (
        head + f"no evidence of a link between the {what} and {a.quality_name} at this sample "
        f"size ({_numbers(a)})"
    )


def summarize(
    associations: list[Association], *, quality_name: str = "accuracy"
) -> tuple[dict[str, str], str]:
    """One verdict per layer and one overall, Holm-adjusted across the whole family.

    Parameters
    ----------
    associations : list of Association
        Every (layer, measure) test, pooled ones (``layer="all"``) included:
        they form one family for Holm's correction.
    quality_name : str

    Returns
    -------
    per_layer : dict
        ``{layer: sentence}`` for every layer other than ``"all"``: the
        significant links, or that there is no evidence (or no power).
    overall : str
        From the pooled associations when there are any, else from all. With
        pooled ones, it goes on to name the per-layer links that survive the
        correction (or says there are none), so that "no evidence" pooled over
        layers is never read as "no evidence in any layer".
    """
    family = holm([replace(a, quality_name=quality_name) for a in associations])
    layers: dict[str, list[Association]] = {}
    for a in family:
        layers.setdefault(a.layer, []).append(a)
    per_layer = {
        name: _layer_verdict(name, items) for name, items in layers.items() if name != "all"
    }
    pooled = layers.get("all")
    overall = _layer_verdict("all layers" if pooled else "overall", pooled or family)
    if pooled and per_layer:
        hits = [v for name, v in per_layer.items() if any(a.significant for a in layers[name])]
        overall += ". Per layer, after the same correction: " + (
            "; ".join(hits) if hits else "no layer shows a link either"
        )
    return per_layer, overall


def _layer_verdict(name: str, items: list[Association]) -> str:
    if not items:
        return f"{name}: no associations to judge"
    hits = [a for a in items if a.significant]
    if hits:
        if len({a.layer for a in hits}) == 1:  # one layer: name it once
            head = f"{hits[0].layer}: "
            return head + "; ".join(a.verdict.removeprefix(head) for a in hits)
        return "; ".join(a.verdict for a in hits)
    if all(a.n < MIN_POINTS for a in items):
        n = max(a.n for a in items)
        return (
            f"{name}: at most {n} points per measure, too few for the tests to have any power "
            f"(at least {MIN_POINTS} needed): no conclusion"
        )
    tested = [a for a in items if math.isfinite(a.p_value)]
    if not tested:
        return f"{name}: no measure could be tested ({items[0].reason})"
    if all(_powerless(a) for a in tested):
        return (
            f"{name}: too few distinct orderings within groups for any test to reach "
            f"p < {1.0 - tested[0].level:.2g} (for example: {tested[0].verdict}): no conclusion"
        )
    strongest = min(tested, key=lambda a: a.p_value)
    what = _MEASURE_NAMES.get(strongest.measure, strongest.measure)
    return (
        f"{name}: no evidence of a link between any of the {len(items)} rank measures and "
        f"{strongest.quality_name} at this sample size (strongest: the {what}, "
        f"{_numbers(strongest)})"
    )
