"""The result of a fit: ``CPModel`` (weights, factors, history, metadata)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._io import load_npz, save_npz
from .errors import MissingDependencyError

__all__ = ["CPModel", "FitHistory", "normalize_factors", "solve_sample_rows"]

FORMAT_VERSION = 1


@dataclass
class FitHistory:
    """What happened during a fit, one entry per iteration.

    Attributes
    ----------
    fit : list of float
        ``1 - ||X - model|| / ||X||`` after each iteration.
    rel_error : list of float
        ``||X - model|| / ||X||`` after each iteration.
    seconds : list of float
        Wall time of each iteration (its pass and its resident updates).
    inner_sweeps : list of int
        HALS sweeps per row update (0 for ALS).
    reseeds : list of dict
        Dead components that were re-seeded: ``{"iteration", "mode", "component"}``.
    converged : bool
        Whether the fit stopped because the change in fit fell below ``tol``.
    stop_reason : str
        ``"tol"``, ``"n_iter_max"``, ``"callback"`` or ``""`` while running.
    init_seconds : float
        Time spent on initialization (including a Gram pass for ``init="gram"``).
    """

    fit: list[float] = field(default_factory=list)
    rel_error: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    inner_sweeps: list[int] = field(default_factory=list)
    reseeds: list[dict] = field(default_factory=list)
    converged: bool = False
    stop_reason: str = ""
    init_seconds: float = 0.0

    @property
    def n_iter(self) -> int:
        return len(self.fit)


def normalize_factors(
    factors: list[np.ndarray], weights: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Weights and unit-norm columns, deterministic signs, components sorted by weight.

    Sign rule: every non-sample factor's column has a nonnegative sum of cubes
    (its largest entries point up); the sample-mode factor (mode 0) absorbs the
    flips, so the model is unchanged. Zero columns keep weight 0.

    Parameters
    ----------
    factors : list of ndarray
        ``I_m x R`` each, mode 0 first.
    weights : ndarray, optional
        ``R`` weights multiplying the components (default ones).

    Returns
    -------
    weights : ndarray
        ``R``, nonincreasing.
    factors : list of ndarray
        Unit-norm columns (zero columns stay zero).
    """
    rank = factors[0].shape[1]
    w = np.ones(rank) if weights is None else np.asarray(weights, dtype=np.float64).copy()
    out = []
    for f in factors:
        f = np.array(f, dtype=np.float64, copy=True)
        norms = np.linalg.norm(f, axis=0)
        safe = np.where(norms > 0, norms, 1.0)
        out.append(f / safe)
        w = w * norms
    for m in range(1, len(out)):
        flip = np.sum(out[m] ** 3, axis=0) < 0
        out[m][:, flip] *= -1
        out[0][:, flip] *= -1
    neg = w < 0
    w[neg] *= -1
    out[0][:, neg] *= -1
    order = np.argsort(-w, kind="stable")
    return w[order], [f[:, order] for f in out]


def solve_sample_rows(mttkrp: np.ndarray, gram: np.ndarray, *, nonnegative: bool) -> np.ndarray:
    """Sample-factor rows of samples under fixed non-sample factors, from the normal equations.

    Least squares ``min_a ||x - sum_r a_r b_r ∘ c_r ∘ ...||`` per sample solves
    ``a G = m``; the nonnegative version runs scipy's NNLS on the ``R x R``
    Cholesky factor of ``G``, which has the same objective up to a constant
    (``||x - K a||^2 = ||L^T a - L^-1 m||^2 + const`` with ``G = L L^T``).

    Parameters
    ----------
    mttkrp : ndarray
        ``n x R``: each sample against the Khatri-Rao product of the factors.
    gram : ndarray
        ``R x R``: the Hadamard product of the factors' Grams.
    nonnegative : bool
        Solve under ``a >= 0``.

    Returns
    -------
    ndarray
        ``n x R`` float64.
    """
    m = np.asarray(mttkrp, dtype=np.float64)
    g = np.asarray(gram, dtype=np.float64)
    if not nonnegative:
        return np.linalg.lstsq(g, m.T, rcond=None)[0].T
    from scipy.linalg import cho_factor, solve_triangular
    from scipy.optimize import nnls

    rank = g.shape[0]
    chol, _ = cho_factor(g + 1e-14 * np.trace(g) * np.eye(rank), lower=True)  # ridge: G singular
    low = np.tril(chol)
    rhs = solve_triangular(low, m.T, lower=True).T  # n x R
    return np.stack([nnls(low.T, row)[0] for row in rhs]) if len(rhs) else rhs


@dataclass
class CPModel:
    """A CP model ``X ≈ sum_r w_r a_r ∘ b_r ∘ c_r ∘ ...``.

    Attributes
    ----------
    weights : ndarray
        ``R`` component weights, nonincreasing after a fit.
    factors : list of ndarray
        ``I_m x R`` float64 factor matrices; mode 0 is the sample mode.
    history : FitHistory
    metadata : dict
        Shape, rank, dtype, seed, chunking, solver and library versions.
    """

    weights: np.ndarray
    factors: list[np.ndarray]
    history: FitHistory = field(default_factory=FitHistory)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def fit(self) -> float:
        """Fit after the last iteration (nan before any)."""
        return self.history.fit[-1] if self.history.fit else float("nan")

    def __repr__(self) -> str:
        return (
            f"CPModel(shape={self.shape}, rank={self.rank}, fit={self.fit:.6f}, "
            f"n_iter={self.history.n_iter}, converged={self.history.converged})"
        )

    def reconstruct(self, samples: slice | range | None = None) -> np.ndarray:
        """Dense reconstruction of a range of samples.

        Parameters
        ----------
        samples : slice or range, optional
            Rows of the sample mode (default all: only sensible for small models).

        Returns
        -------
        ndarray
            ``(b, I_1, ..., I_d)`` float64.
        """
        a = self.factors[0][samples if samples is not None else slice(None)]
        out = a * self.weights
        for f in self.factors[1:]:
            out = np.einsum("...r,jr->...jr", out, f)
        return out.sum(axis=-1)

    def norm(self) -> float:
        """Frobenius norm of the model, from the Grams."""
        g = np.outer(self.weights, self.weights)
        for f in self.factors:
            g = g * (f.T @ f)
        return float(np.sqrt(max(g.sum(), 0.0)))

    def to_tensorly(self):
        """The model as a TensorLy ``CPTensor`` (weights, factors)."""
        try:
            from tensorly.cp_tensor import CPTensor
        except ImportError as err:
            raise MissingDependencyError(
                "to_tensorly() needs TensorLy: pip install tensorly"
            ) from err
        return CPTensor((self.weights.copy(), [f.copy() for f in self.factors]))

    @classmethod
    def from_tensorly(cls, cp_tensor: Any) -> CPModel:
        """A model from a TensorLy ``CPTensor`` or a ``(weights, factors)`` pair."""
        weights, factors = cp_tensor
        factors = [np.asarray(f, dtype=np.float64) for f in factors]
        if weights is None:
            weights = np.ones(factors[0].shape[1])
        return cls(np.asarray(weights, dtype=np.float64), factors)

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to an ``.npz`` file atomically (no partial file on failure)."""
        arrays = {"weights": self.weights}
        for i, f in enumerate(self.factors):
            arrays[f"factor_{i}"] = f
        header = {
            "format": "peekcore.CPModel",
            "version": FORMAT_VERSION,
            "n_factors": len(self.factors),
            "history": asdict(self.history),
            "metadata": self.metadata,
        }
        save_npz(path, arrays, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CPModel:
        """Read a model written by :meth:`save`."""
        header, data = load_npz(path, "peekcore.CPModel", "model")
        factors = [data[f"factor_{i}"] for i in range(header["n_factors"])]
        return cls(data["weights"], factors, FitHistory(**header["history"]), header["metadata"])
