"""Model diagnostics computed from factors (rank diagnostics build on these)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from .model import CPModel

__all__ = ["factor_match_score", "congruence"]


def _unpack(model: Any, weights: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
    if isinstance(model, CPModel):
        return model.weights, model.factors
    if len(model) == 2 and isinstance(model[1], list | tuple):  # (weights, factors), CPTensor
        return np.asarray(model[0], dtype=np.float64), [np.asarray(f) for f in model[1]]
    factors = [np.asarray(f, dtype=np.float64) for f in model]
    w = np.ones(factors[0].shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    return w, factors


def congruence(factors_a: list[np.ndarray], factors_b: list[np.ndarray]) -> np.ndarray:
    """Product over modes of the cosines between components: ``R_a x R_b``."""
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

    Parameters
    ----------
    model_a, model_b : CPModel, (weights, factors) or list of factor matrices
        Models of the same shape; ``model_b`` may have more components.
    weights_a, weights_b : ndarray, optional
        Weights when plain factor lists are given.
    consider_weights : bool
        Include the weight penalty.
    return_permutation : bool
        Also return, for each component of ``model_a``, its match in ``model_b``.

    Returns
    -------
    float, or (float, ndarray)
    """
    wa, fa = _unpack(model_a, weights_a)
    wb, fb = _unpack(model_b, weights_b)
    if len(fa) != len(fb):
        raise ValueError(f"models have different orders ({len(fa)} and {len(fb)})")
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
