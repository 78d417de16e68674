"""Model diagnostics: fit, core consistency, factor match, stability, degeneracy.

Everything that looks at the data does so through the statistics of one pass
(shared/DESIGN.md), never through the dense tensor. For a CP model
``X ≈ sum_r a_r ∘ b_r ∘ c_r ∘ ...`` with sample factor ``A`` (``N x R``, mode 0)
and resident factors ``B, C, ...`` (``I_k x R``), a pass gives

- ``t = X x_0 A^T``, shape ``R x I_1 x ... x I_d`` (``d >= 2``),
- ``ata = A^T A``, shape ``R x R``,
- ``norm_x_sq = ||X||^2``.

``t`` and ``ata`` must come from the same ``A`` (the same scale); separate
component weights, as a :class:`~peekcore.model.CPModel` carries after
normalization, are passed as ``weights`` and absorbed into mode 0.

The rank choice (:func:`choose_rank`, :class:`RankChoice`, ``RANK_RULES``) lives
in :mod:`peekcore.rank_choice` and is importable from here as well.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .errors import DataError, InvalidArgumentError
from .kernels.base import khatri_rao
from .model import CPModel
from .rank_choice import RANK_RULES, RankChoice, choose_rank

__all__ = [
    "CORE_NORMALIZATIONS",
    "core_consistencies",
    "FitScores",
    "RANK_RULES",
    "RankChoice",
    "choose_rank",
    "congruence",
    "core_consistency",
    "degeneracy",
    "factor_match_score",
    "fit_scores",
    "least_squares_core",
    "stability",
]

#: Names accepted by :func:`core_consistency`'s ``normalization``.
CORE_NORMALIZATIONS = ("bro-kiers", "core-norm")


# --------------------------------------------------------------------------- models


def _unpack(model: Any, weights: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
    if isinstance(model, CPModel):
        return model.weights, model.factors
    if len(model) == 2 and isinstance(model[1], list | tuple):  # (weights, factors), CPTensor
        return np.asarray(model[0], dtype=np.float64), [np.asarray(f) for f in model[1]]
    factors = [np.asarray(f, dtype=np.float64) for f in model]
    w = np.ones(factors[0].shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    return w, factors


def congruence(factors_a: list[np.ndarray], factors_b: list[np.ndarray]) -> np.ndarray:
    """Product over modes of the cosines between components.

    Parameters
    ----------
    factors_a, factors_b : list of ndarray
        ``I_m x R_a`` and ``I_m x R_b`` factor matrices, one per mode, same modes.

    Returns
    -------
    ndarray
        ``R_a x R_b``: entry ``(r, s)`` is ``prod_m cos(a_m[:, r], b_m[:, s])``
        (zero columns count as cosine 0).
    """
    out = np.ones((factors_a[0].shape[1], factors_b[0].shape[1]))
    for fa, fb in zip(factors_a, factors_b, strict=True):
        na = np.linalg.norm(fa, axis=0)
        nb = np.linalg.norm(fb, axis=0)
        out = out * ((fa / np.where(na > 0, na, 1)).T @ (fb / np.where(nb > 0, nb, 1)))
    return out


def factor_match_score(
    model_a: Any,
    model_b: Any,
    *,
    weights_a: np.ndarray | None = None,
    weights_b: np.ndarray | None = None,
    consider_weights: bool = True,
    return_permutation: bool = False,
) -> float | tuple[float, np.ndarray]:
    """Factor match score between two CP models after optimal component matching.

    Each pair of components scores the absolute product over modes of the
    cosines between their columns, times ``1 - |w_a - w_b| / max(w_a, w_b)``
    when ``consider_weights`` (weights are the products of column norms). The
    assignment maximizing the total score is found by the Hungarian method, and
    the mean score over the matched pairs is returned: 1 for identical models,
    invariant to permutation and scaling of components.

    Every component of ``model_a`` is matched, so ``model_a`` must not have more
    components than ``model_b`` (``R_a <= R_b``, else ``ValueError``); the
    components of ``model_b`` left unmatched are ignored and the mean is over
    the ``R_a`` pairs. This is the convention of Tomasi and Bro (2006) and of
    the Tensor Toolbox's ``score`` (the model with more components, e.g. an
    overfactored fit, is the one whose extra components are ignored): compare
    a fit against a smaller reference as ``factor_match_score(reference, fit)``.

    Parameters
    ----------
    model_a, model_b : CPModel, (weights, factors) or list of factor matrices
        Models of the same shape (factors ``I_m x R_a`` and ``I_m x R_b``);
        ``model_b`` may have more components, not fewer.
    weights_a, weights_b : ndarray, optional
        ``R_a`` and ``R_b`` weights when plain factor lists are given.
    consider_weights : bool
        Include the weight penalty.
    return_permutation : bool
        Also return, for each component of ``model_a``, its match in ``model_b``.

    Returns
    -------
    float, or (float, ndarray)
        The score in ``[0, 1]``; the permutation has shape ``R_a``.

    Raises
    ------
    InvalidArgumentError
        When the models differ in order or mode sizes, or ``R_a > R_b``.
    """
    wa, fa = _unpack(model_a, weights_a)
    wb, fb = _unpack(model_b, weights_b)
    if len(fa) != len(fb):
        raise InvalidArgumentError(f"models have different orders ({len(fa)} and {len(fb)})")
    sizes_a, sizes_b = [f.shape[0] for f in fa], [f.shape[0] for f in fb]
    if sizes_a != sizes_b:
        raise InvalidArgumentError(f"models have different shapes ({sizes_a} and {sizes_b})")
    rank_a, rank_b = fa[0].shape[1], fb[0].shape[1]
    if rank_a > rank_b:
        raise InvalidArgumentError(
            f"model_a has more components ({rank_a}) than model_b ({rank_b}): every component "
            "of model_a needs a match in model_b (extra components of model_b are ignored), so "
            "pass the model with more components as model_b"
        )
    score = np.abs(congruence(fa, fb))
    if consider_weights:
        na = wa * np.prod([np.linalg.norm(f, axis=0) for f in fa], axis=0)
        nb = wb * np.prod([np.linalg.norm(f, axis=0) for f in fb], axis=0)
        na, nb = np.abs(na), np.abs(nb)
        top = np.maximum(na[:, None], nb[None, :])
        score = score * (1 - np.abs(na[:, None] - nb[None, :]) / np.where(top > 0, top, 1))
    rows, cols = linear_sum_assignment(-score)
    value = float(score[rows, cols].mean())
    if return_permutation:
        perm = np.empty(len(rows), dtype=np.int64)
        perm[rows] = cols
        return value, perm
    return value


def degeneracy(
    model: Any, *, weights: np.ndarray | None = None, return_pair: bool = False
) -> float | tuple[float, tuple[int, int]]:
    """The most negative congruence between two components of one model.

    The congruence of components ``r`` and ``s`` is the product over all modes
    (the sample mode included) of the cosines between their columns, times the
    signs of their weights. Two-factor degeneracies (diverging components that
    cancel each other) show as values near -1; a healthy model stays well
    above (a common flag is below -0.8).

    Parameters
    ----------
    model : CPModel, (weights, factors) or list of factor matrices
        Factors ``I_m x R``, mode 0 the samples.
    weights : ndarray, optional
        ``R`` weights when a plain factor list is given.
    return_pair : bool
        Also return the pair ``(r, s)``, ``r < s``, attaining the minimum.

    Returns
    -------
    float, or (float, (int, int))
        The minimum over pairs ``r != s`` of the congruence, in ``[-1, 1]``;
        nan (and the pair ``(-1, -1)``) for a model with fewer than two components.
    """
    w, factors = _unpack(model, weights)
    rank = factors[0].shape[1]
    if rank < 2:
        return (math.nan, (-1, -1)) if return_pair else math.nan
    sign = np.where(np.asarray(w) < 0, -1.0, 1.0)
    c = congruence(factors, factors) * np.outer(sign, sign)
    r, s = np.triu_indices(rank, k=1)
    k = int(np.argmin(c[r, s]))
    value = float(c[r[k], s[k]])
    return (value, (int(r[k]), int(s[k]))) if return_pair else value


def stability(
    models: Sequence[Any],
    fits: Sequence[float] | None = None,
    *,
    fit_tol: float | None = None,
    consider_weights: bool = True,
) -> float:
    """Stability of one rank: mean factor match score of replicates against the best one.

    The replicate with the highest fit is the reference; the score is the mean
    :func:`factor_match_score` of the other replicates against it. 1 when they
    all find the same components (up to permutation and scaling). With
    ``fit_tol``, only replicates whose fit is within ``fit_tol`` of the best
    take part: replicates stuck in a clearly worse local minimum then say
    nothing about the rank, while solutions of (nearly) equal fit that
    disagree, the mark of a rank that is too high, still lower the score.

    Parameters
    ----------
    models : sequence of CPModel, (weights, factors) or factor lists
        Replicates (e.g. random restarts) of one rank: factors ``I_m x R``, all alike.
    fits : sequence of float, optional
        Fit of each replicate; default each ``CPModel``'s :attr:`~CPModel.fit`.
    fit_tol : float, optional
        Compare only replicates with ``fit >= best_fit - fit_tol`` (default all).
    consider_weights : bool
        Passed to :func:`factor_match_score`.

    Returns
    -------
    float
        In ``[0, 1]``; nan when no other replicate takes part.
    """
    models = list(models)
    if fits is None:
        if not all(isinstance(m, CPModel) for m in models):
            raise InvalidArgumentError("fits are required unless every replicate is a CPModel")
        fits = [m.fit for m in models]
    fits = np.asarray(fits, dtype=np.float64)
    if fits.shape != (len(models),):
        raise InvalidArgumentError(f"got {fits.size} fits for {len(models)} replicates")
    unpacked = [_unpack(m, None) for m in models]
    shapes = {tuple(f.shape for f in fs) for _, fs in unpacked}
    if len(shapes) > 1:
        raise InvalidArgumentError(f"replicates differ in shape or rank: {sorted(shapes)}")
    if len(models) == 0 or np.all(np.isnan(fits)):
        return math.nan
    best = int(np.nanargmax(fits))
    others = [i for i in range(len(models)) if i != best and not np.isnan(fits[i])]
    if fit_tol is not None:
        others = [i for i in others if fits[i] >= fits[best] - fit_tol]
    if not others:
        return math.nan
    scores = [
        factor_match_score(unpacked[i], unpacked[best], consider_weights=consider_weights)
        for i in others
    ]
    return float(np.mean(scores))


# ----------------------------------------------------------------- pass statistics


def _check_statistics(
    t: Any, ata: Any, resident_factors: Sequence[Any], weights: Any = None
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    t = np.asarray(t, dtype=np.float64)
    ata = np.asarray(ata, dtype=np.float64)
    factors = [np.asarray(f, dtype=np.float64) for f in resident_factors]
    if t.ndim < 3:
        raise InvalidArgumentError(
            f"t must be R x I_1 x ... x I_d with d >= 2 (a tensor of order >= 3), got shape "
            f"{t.shape}"
        )
    rank = t.shape[0]
    if ata.shape != (rank, rank):
        raise InvalidArgumentError(
            f"ata must be R x R = {rank} x {rank} to match t, got shape {ata.shape}"
        )
    if len(factors) != t.ndim - 1:
        raise InvalidArgumentError(
            f"t of shape {t.shape} needs {t.ndim - 1} resident factors, got {len(factors)}"
        )
    for k, f in enumerate(factors, start=1):
        if f.ndim != 2 or f.shape[1] != rank:
            raise InvalidArgumentError(
                f"resident factor {k} must have R = {rank} columns (shape I_{k} x R), got shape "
                f"{f.shape}"
            )
        if f.shape[0] != t.shape[k]:
            raise InvalidArgumentError(
                f"resident factor {k} has {f.shape[0]} rows but t has {t.shape[k]} entries "
                f"along mode {k}"
            )
    if weights is None:
        w = np.ones(rank)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (rank,):
            raise InvalidArgumentError(f"weights must have shape ({rank},), got {w.shape}")
    for name, arr in (("t", t), ("ata", ata), ("weights", w), *(("a factor", f) for f in factors)):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{name} holds NaN or Inf")
    return t, 0.5 * (ata + ata.T), factors, w


@dataclass(frozen=True)
class FitScores:
    """How well a CP model fits the data, from the statistics of a pass.

    Attributes
    ----------
    fit : float
        ``1 - ||X - M|| / ||X||`` (the solvers' ``history.fit``).
    rel_error : float
        ``||X - M|| / ||X||``.
    explained_variance : float
        ``1 - ||X - M||^2 / ||X||^2``: the share of the (uncentered) sum of
        squares the model explains.
    residual_sq : float
        ``||X - M||^2`` (clipped at 0 against rounding).
    """

    fit: float
    rel_error: float
    explained_variance: float
    residual_sq: float


def fit_scores(
    t: Any,
    ata: Any,
    resident_factors: Sequence[Any],
    norm_x_sq: float,
    *,
    weights: Any = None,
) -> FitScores:
    """Fit and explained variance of a CP model from the statistics of a pass.

    ``||X - M||^2 = ||X||^2 - 2 <X, M> + ||M||^2`` with
    ``<X, M> = sum_r w_r t[r] x_1 b_r x_2 c_r ...`` and
    ``||M||^2 = sum (w w^T) * A^T A * B^T B * C^T C ...`` (elementwise products).

    Parameters
    ----------
    t : ndarray
        ``R x I_1 x ... x I_d``, ``X x_0 A^T``.
    ata : ndarray
        ``R x R``, ``A^T A`` for the same ``A``.
    resident_factors : sequence of ndarray
        ``I_k x R`` for ``k = 1..d``.
    norm_x_sq : float
        ``||X||^2`` (positive).
    weights : ndarray, optional
        ``R`` weights multiplying the components (default ones).

    Returns
    -------
    FitScores
    """
    t, ata, factors, w = _check_statistics(t, ata, resident_factors, weights)
    norm_x_sq = float(norm_x_sq)
    if not norm_x_sq > 0 or not math.isfinite(norm_x_sq):
        raise InvalidArgumentError(f"norm_x_sq must be positive and finite, got {norm_x_sq}")
    v = t
    for f in factors:  # contract mode 1 with the matching column, keeping r
        v = np.einsum("ri...,ir->r...", v, f)
    inner = float(w @ v)
    g = np.outer(w, w) * ata
    for f in factors:
        g = g * (f.T @ f)
    resid = max(norm_x_sq - 2.0 * inner + float(g.sum()), 0.0)
    rel = math.sqrt(resid / norm_x_sq)
    return FitScores(
        fit=1.0 - rel, rel_error=rel, explained_variance=1.0 - resid / norm_x_sq, residual_sq=resid
    )


def least_squares_core(t: Any, ata: Any, resident_factors: Sequence[Any]) -> np.ndarray:
    """The least-squares Tucker core for fixed CP factors, from the statistics of a pass.

    ``G = X x_0 A^+ x_1 B^+ x_2 C^+ ...`` minimizes ``||X - G x_0 A x_1 B x_2 C ...||``
    (the minimum-norm minimizer when a factor is rank deficient, as it always
    is when ``R`` exceeds the mode's size; :func:`core_consistency` then merges
    modes, this function does not). Following
    Papalexakis and Faloutsos (ICASSP 2015) the dense tensor is never needed:
    ``X x_0 A^+ = (A^T A)^+ T`` since ``A^+ = (A^T A)^+ A^T``, and the other
    mode products act on the small ``R x I_1 x ... x I_d`` tensor. The factors
    are used as given (no normalization); see :func:`core_consistency`.

    Parameters
    ----------
    t : ndarray
        ``R x I_1 x ... x I_d`` (``d >= 2``), ``X x_0 A^T``.
    ata : ndarray
        ``R x R``, ``A^T A`` for the same ``A``.
    resident_factors : sequence of ndarray
        ``I_k x R`` for ``k = 1..d``.

    Returns
    -------
    ndarray
        ``R x R x ... x R`` (order ``d + 1``) float64 core.
    """
    t, ata, factors, _ = _check_statistics(t, ata, resident_factors)
    return _core(t, ata, factors)


def _core(
    t: np.ndarray, ata: np.ndarray, factors: list[np.ndarray], scale: np.ndarray | None = None
) -> np.ndarray:
    """``G`` of :func:`least_squares_core`, with mode 0 of ``t`` and ``ata`` scaled by ``scale``.

    The mode products commute, so the resident modes shrink ``t`` first (the
    largest first: each product costs R x the current size) and the sample
    mode's scale and ``(A^T A)^+`` act on the ``R x ... x R`` result, never on
    the ``R x I_1 x ... x I_d`` statistics.
    """
    rank = t.shape[0]
    g = t
    for k in sorted(range(1, g.ndim), key=lambda k: -g.shape[k]):
        pinv = np.linalg.pinv(factors[k - 1])  # R x I_k
        g = np.moveaxis(np.tensordot(pinv, g, axes=([1], [k])), 0, k)
    if scale is not None:
        ata = np.outer(scale, scale) * ata
        g = scale.reshape((rank,) + (1,) * (g.ndim - 1)) * g
    return (np.linalg.pinv(ata, hermitian=True) @ g.reshape(rank, -1)).reshape(g.shape)


def core_consistency(
    t: Any,
    ata: Any,
    resident_factors: Sequence[Any],
    normalization: str = "bro-kiers",
    *,
    weights: Any = None,
    return_core: bool = False,
    n_samples: int | None = None,
) -> float | tuple[float, np.ndarray]:
    """Core consistency (CORCONDIA, Bro and Kiers 2003) from the statistics of a pass.

    The resident factors' columns are scaled to unit norm and their norms, with
    ``weights``, are absorbed into the sample mode (``A -> A diag(w * norms)``,
    so ``t`` and ``ata`` are rescaled to match); then the least-squares Tucker
    core ``G`` of the CP factors is computed (:func:`least_squares_core`). For
    a perfect trilinear (multilinear) model ``G`` is the superdiagonal identity
    ``S``. The result does not depend on how the scale of each component is
    spread over the modes.

    **Ranks above a resident mode's size.** With ``R > I_k`` the factor of
    mode ``k`` (``I_k x R``) has rank at most ``I_k < R``: the least-squares
    core is not identifiable along that mode (the minimum-norm core is far
    from ``S`` even for the true factors of a noise-free model), so the value
    would say nothing about the rank. Then the core is taken of the same model
    viewed with adjacent resident modes merged: the resident modes are grouped,
    in order, into consecutive runs, a run closing as soon as the product of its
    sizes reaches ``R`` (a last run that stays below ``R`` joins the run before
    it). A run of modes ``k..l`` becomes one mode of size ``I_k * ... * I_l``:
    ``t`` is reshaped (row-major, ``R x I_1 x ... x (I_k ... I_l) x ...``) and its
    factor is the column-wise Khatri-Rao product of the run's factors, the last
    mode fastest, which matches that reshape. Modes already of size ``>= R``
    stay apart unless a smaller mode next to them needs them. E.g. an
    ``N x C x 4 x 4`` layer at ``R = 5..16`` (``C >= R``) is scored as the 3-way
    ``N x C x 16`` model, ``N x C x 7 x 7`` maps at ``R = 8..49`` as
    ``N x C x 49``. The merged view is still an exact CP model of the same
    components (the true factors of a noise-free model still give ``S``), it
    only stops testing the multilinearity between the merged modes. When the
    resident modes cannot form two runs of at least ``R`` entries each (fewer
    than two would leave a matrix, whose core is never unique), the value is
    nan with a ``RuntimeWarning``; :func:`choose_rank` takes nan as no
    evidence. Nothing changes when every resident mode has at least ``R``
    entries. The sample mode cannot be merged (the statistics hold ``X`` only
    through ``t``): with ``R`` above the number of samples ``N`` (given as
    ``n_samples``) ``A`` has rank at most ``N < R`` and the value is nan too.

    Normalizations (both computed from the core ``G`` of the model, merged as
    above when needed, ``S`` the superdiagonal identity of the same order):

    - ``"bro-kiers"``: ``100 * (1 - sum (G - S)^2 / R)`` (``R = sum S^2``), as
      in Bro and Kiers; unbounded below, 100 at best.
    - ``"core-norm"``: ``100 * (1 - sum (G - S)^2 / sum G^2)``, relative to the
      core's own size; also 100 at best.

    Values near 100 say the CP structure is appropriate; values that collapse
    (to 50 and below, often negative) say the rank is too high.

    Parameters
    ----------
    t : ndarray
        ``R x I_1 x ... x I_d`` (``d >= 2``), ``X x_0 A^T`` with the sample factor
        ``A`` (``N x R``) that produced ``ata``.
    ata : ndarray
        ``R x R``, ``A^T A``.
    resident_factors : sequence of ndarray
        ``I_k x R`` for ``k = 1..d`` (any column scale).
    normalization : {"bro-kiers", "core-norm"}
        See above.
    weights : ndarray, optional
        ``R`` weights multiplying the components (e.g. ``CPModel.weights`` when
        ``A`` is ``CPModel.factors[0]``); default ones.
    return_core : bool
        Also return the core ``G`` of the normalized model: ``R x ... x R`` of
        order ``d + 1``, or of order ``1 +`` the number of merged runs when
        modes were merged (see above); None when the value is nan.
    n_samples : int, optional
        ``N``, the rows of ``A``: ranks above it give nan (see above).

    Returns
    -------
    float, or (float, ndarray or None)
        nan (with a ``RuntimeWarning``) when ``R`` is too large for the resident
        modes even merged (see above).
    """
    if normalization not in CORE_NORMALIZATIONS:
        raise InvalidArgumentError(
            f"normalization must be one of {CORE_NORMALIZATIONS}, got {normalization!r}"
        )
    t, ata, factors, w = _check_statistics(t, ata, resident_factors, weights)
    g = _normalized_core(t, ata, factors, w, n_samples)
    value = math.nan if g is None else _consistencies(g)[normalization]
    return (value, g) if return_core else value


def _merged_runs(sizes: Sequence[int], rank: int) -> list[list[int]] | None:
    """Consecutive runs of resident modes (indices into ``sizes``), each of ``>= rank`` entries.

    Every mode on its own when all are ``>= rank``; else a run closes as soon as
    its product reaches ``rank`` and a last short run joins the one before (the
    most runs, hence the most structure, any grouping into consecutive runs of
    ``>= rank`` entries can keep). None when fewer than two runs can be formed.
    """
    if all(n >= rank for n in sizes):
        return [[k] for k in range(len(sizes))]
    runs: list[list[int]] = []
    run: list[int] = []
    for k in range(len(sizes)):
        run.append(k)
        if math.prod(sizes[i] for i in run) >= rank:
            runs.append(run)
            run = []
    if run and runs:
        runs[-1].extend(run)
    return runs if len(runs) >= 2 else None


def _merged_view(
    t: np.ndarray, factors: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """``t`` and the resident factors with adjacent modes merged so each has ``>= R`` entries.

    See :func:`core_consistency`; None (with a ``RuntimeWarning``) when no such
    view of order 3 or more exists.
    """
    rank, sizes = t.shape[0], t.shape[1:]
    runs = _merged_runs(sizes, rank)
    if runs is None:
        warnings.warn(
            f"core consistency is undefined at rank {rank}: the resident modes "
            f"{'x'.join(map(str, sizes))} cannot be merged into two or more adjacent groups "
            f"of at least {rank} entries each, so the least-squares core is not identifiable; "
            "returning nan",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    if len(runs) == len(sizes):
        return t, factors
    merged = [math.prod(sizes[i] for i in run) for run in runs]
    return t.reshape(rank, *merged), [khatri_rao([factors[i] for i in run]) for run in runs]


def _normalized_core(
    t: np.ndarray,
    ata: np.ndarray,
    factors: list[np.ndarray],
    w: np.ndarray,
    n_samples: int | None = None,
) -> np.ndarray | None:
    """The least-squares core after unit-norm resident columns (scales absorbed into ``A``).

    Taken of the merged view (:func:`_merged_view`) when ``R`` exceeds a
    resident mode's size; None when that view does not exist, or when ``R``
    exceeds ``n_samples`` (with a ``RuntimeWarning``).
    """
    rank = t.shape[0]
    if n_samples is not None and rank > n_samples:
        warnings.warn(
            f"core consistency is undefined at rank {rank}: the sample factor has "
            f"{n_samples} rows, so its rank is below {rank} and the least-squares core is "
            "not identifiable; returning nan",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    view = _merged_view(t, factors)
    if view is None:
        return None
    t, factors = view
    scale = w.copy()
    unit = []
    for f in factors:
        norms = np.linalg.norm(f, axis=0)
        unit.append(f / np.where(norms > 0, norms, 1.0))
        scale = scale * norms
    return _core(t, ata, unit, scale)


def _consistencies(g: np.ndarray) -> dict[str, float]:
    """Core consistency of core ``g`` (``R x ... x R``) in each of ``CORE_NORMALIZATIONS``."""
    rank = g.shape[0]
    diff = g.copy()
    diff[(np.arange(rank),) * g.ndim] -= 1.0
    err = float(np.sum(diff**2))
    total = float(np.sum(g**2))
    return {
        "bro-kiers": 100.0 * (1.0 - err / rank),
        "core-norm": 100.0 * (1.0 - err / total) if total > 0 else -math.inf,
    }


def core_consistencies(
    t: Any,
    ata: Any,
    resident_factors: Sequence[Any],
    *,
    weights: Any = None,
    n_samples: int | None = None,
) -> dict[str, float]:
    """:func:`core_consistency` in every normalization, from one core.

    Parameters
    ----------
    t, ata, resident_factors, weights
        As for :func:`core_consistency`.

    Returns
    -------
    dict
        ``{"bro-kiers": value, "core-norm": value}`` (both nan, with one
        ``RuntimeWarning``, when the rank is too large for the resident modes).
    """
    t, ata, factors, w = _check_statistics(t, ata, resident_factors, weights)
    g = _normalized_core(t, ata, factors, w, n_samples)
    if g is None:
        return dict.fromkeys(CORE_NORMALIZATIONS, math.nan)
    return _consistencies(g)
