"""Plain float64 numpy references (dense tensors, einsum MTTKRP) for the tests."""

from __future__ import annotations

import string

import numpy as np


def mttkrp(x: np.ndarray, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """Dense MTTKRP by einsum: ``I_mode x R``."""
    letters = string.ascii_lowercase[: x.ndim]
    operands = [x]
    subs = [letters]
    for k, f in enumerate(factors):
        if k != mode:
            operands.append(f)
            subs.append(letters[k] + "z")
    return np.einsum(",".join(subs) + "->" + letters[mode] + "z", *operands, optimize=True)


def gram_except(factors: list[np.ndarray], mode: int) -> np.ndarray:
    g = np.ones((factors[0].shape[1],) * 2)
    for k, f in enumerate(factors):
        if k != mode:
            g = g * (f.T @ f)
    return g


def als(x: np.ndarray, factors: list[np.ndarray], n_iter: int) -> list[np.ndarray]:
    """Textbook CP-ALS: modes updated in order 0, 1, ..., d each iteration."""
    factors = [np.array(f, dtype=np.float64) for f in factors]
    for _ in range(n_iter):
        for mode in range(x.ndim):
            m = mttkrp(x, factors, mode)
            factors[mode] = np.linalg.solve(gram_except(factors, mode), m.T).T
    return factors


def hals(x: np.ndarray, factors: list[np.ndarray], n_iter: int, sweeps: int) -> list[np.ndarray]:
    """Nonnegative CP by HALS: modes in order, ``sweeps`` column sweeps per mode."""
    factors = [np.array(f, dtype=np.float64) for f in factors]
    for _ in range(n_iter):
        for mode in range(x.ndim):
            m = mttkrp(x, factors, mode)
            g = gram_except(factors, mode)
            f = factors[mode]
            for _ in range(sweeps):
                for r in range(f.shape[1]):
                    if g[r, r] > 0:
                        f[:, r] = np.maximum(0, f[:, r] + (m[:, r] - f @ g[:, r]) / g[r, r])
    return factors


def full(factors: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    rank = factors[0].shape[1]
    w = np.ones(rank) if weights is None else weights
    letters = string.ascii_lowercase[: len(factors)]
    subs = ",".join(c + "z" for c in letters) + ",z->" + letters
    return np.einsum(subs, *factors, w, optimize=True)


def dense_fit(x: np.ndarray, factors: list[np.ndarray], weights: np.ndarray | None = None) -> float:
    return 1.0 - np.linalg.norm(x - full(factors, weights)) / np.linalg.norm(x)


def low_rank(rng: np.random.Generator, shape: tuple[int, ...], rank: int, noise: float = 0.0):
    """A random rank-``rank`` tensor plus relative Gaussian noise, and its factors."""
    factors = [rng.standard_normal((n, rank)) for n in shape]
    x = full(factors)
    if noise:
        e = rng.standard_normal(shape)
        x = x + noise * np.linalg.norm(x) / np.linalg.norm(e) * e
    return x, factors


def core_dense(x: np.ndarray, factors: list[np.ndarray]) -> np.ndarray:
    """Least-squares Tucker core by brute force: ``vec(X) = (F_d ⊗ ... ⊗ F_1 ⊗ F_0) vec(G)``.

    ``vec`` stacks mode 0 fastest (column-major, ``order="F"``), which is the
    unfolding that matches the Kronecker product in this order.
    """
    kron = factors[0]
    for f in factors[1:]:
        kron = np.kron(f, kron)
    g, *_ = np.linalg.lstsq(kron, x.reshape(-1, order="F"), rcond=None)
    rank = factors[0].shape[1]
    return g.reshape((rank,) * len(factors), order="F")


def core_consistency_dense(
    x: np.ndarray, factors: list[np.ndarray], normalization: str = "bro-kiers"
) -> float:
    """CORCONDIA from the dense tensor and the factors as given (no rescaling)."""
    g = core_dense(x, factors)
    s = np.zeros_like(g)
    s[(np.arange(g.shape[0]),) * g.ndim] = 1.0
    err = np.sum((g - s) ** 2)
    denom = g.shape[0] if normalization == "bro-kiers" else np.sum(g**2)
    return float(100 * (1 - err / denom))


def rel_error(got, want) -> float:
    """``||got - want|| / ||want||`` in float64, for numpy arrays or tensors on any device."""

    def as64(a):
        if hasattr(a, "detach"):  # a torch tensor
            a = a.detach().double().cpu().numpy()
        return np.asarray(a, dtype=np.float64)

    got, want = as64(got), as64(want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def assert_model_close(model, weights, factors, tol: float) -> None:
    """A fitted model's weights and every factor within ``tol`` relative error (float64)
    of the given ones: a dense reference's, normalized first with
    :func:`peekcore.model.normalize_factors`, or another model's."""
    assert rel_error(model.weights, weights) < tol
    for got, want in zip(model.factors, factors, strict=True):
        assert rel_error(got, want) < tol
