"""``peekcore.CP``: CP and nonnegative CP as a scikit-learn-style transformer.

The samples are mode 0; each sample is a tensor (``I_1 x ... x I_d``), or a
flat row that ``sample_shape`` folds into one, so that 2-D feature matrices
(``n_samples x n_features``) work inside a scikit-learn ``Pipeline``.
``fit`` runs :func:`peekcore.cp_als` or :func:`peekcore.ncp_hals`;
``transform`` gives new samples' rows of the sample factor against the fitted
resident factors (``components_``). scikit-learn is not imported unless it
asks for the estimator's tags (it is then already loaded).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import numpy as np

from .errors import DataError
from .model import CPModel, solve_sample_rows
from .solvers import cp_als, ncp_hals

__all__ = ["CP"]

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclasses.dataclass(eq=False, repr=False)
class CP:
    """CP decomposition of a batch of sample tensors, as a transformer.

    ``X ≈ sum_r a_r ∘ c_{1,r} ∘ ... ∘ c_{d,r}``: the rows of ``A``
    (``n_samples x rank``) are the features; the resident factors ``c_m``
    (unit columns) are ``components_``.

    Parameters
    ----------
    rank : int
        Number of components (features).
    nonnegative : bool
        Nonnegative CP (HALS) and nonnegative ``transform``; the data must be
        nonnegative.
    sample_shape : tuple of int, optional
        Shape each sample row is folded into (e.g. ``(8, 8)`` for the digits'
        64 pixels); ``None``: ``X`` is already ``n x I_1 x ... x I_d`` with
        ``d >= 2``.
    n_iter_max, tol, init, random_state, sweeps, chunk_size, dtype, device :
        As for :func:`peekcore.cp_als` / :func:`peekcore.ncp_hals` (``sweeps``
        for the nonnegative model only).

    Attributes
    ----------
    components_ : list of ndarray
        Resident factors, ``I_m x rank`` with unit columns.
    weights_ : ndarray
        ``rank`` component weights of the fit (folded into the sample rows).
    model_ : CPModel
        The fitted model.
    n_iter_ : int
        Iterations run.
    reconstruction_err_ : float
        ``||X - model||_F`` of the training data at the end of the fit.
    n_features_in_ : int
        Values per sample.
    """

    # The constructor's parameters. scikit-learn's rule is that ``__init__`` only
    # stores them, as given; the dataclass writes that ``__init__`` (``rank``
    # positional or keyword, the rest keyword-only), and get_params, set_params,
    # clone and repr read the names and defaults back from its signature (a
    # subclass's ``__init__`` may add parameters).
    rank: int = 2
    _: dataclasses.KW_ONLY
    nonnegative: bool = False
    sample_shape: tuple[int, ...] | None = None
    n_iter_max: int = 100
    tol: float = 1e-8
    init: Any = "random"
    random_state: int | None = 0
    sweeps: int = 5
    chunk_size: int | None = None
    dtype: Any = None
    device: str = "cpu"

    # ------------------------------------------------------------ parameters

    @classmethod
    def _param_defaults(cls) -> dict[str, Any]:
        """Each constructor parameter and its default, in order.

        Read from ``__init__``'s signature (the dataclass's, or a subclass's own
        ``__init__`` with parameters of its own, as scikit-learn reads them),
        plus the fields a subclass's ``**kwargs`` passes on.
        """
        params = inspect.signature(cls.__init__).parameters.values()
        named = {p.name: p.default for p in params if p.name != "self" and p.kind in _NAMED}
        if any(p.kind == p.VAR_KEYWORD for p in params):
            for f in dataclasses.fields(cls):
                named.setdefault(f.name, f.default)
        return named

    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._param_defaults())

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters (scikit-learn's convention; nothing nested)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> CP:
        """Set constructor parameters; unknown names are refused."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; valid: {valid}"
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = self._param_defaults()
        shown = [
            f"{n}={v!r}"
            for n, v in self.get_params().items()
            if n == "rank" or not _is_default(v, defaults[n])
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self):  # called by scikit-learn only, which is then loaded
        from sklearn.base import BaseEstimator, TransformerMixin

        class _Like(TransformerMixin, BaseEstimator):
            pass

        tags = _Like().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.transformer_tags.preserves_dtype = ["float64"]
        if self.nonnegative:
            tags.input_tags.positive_only = True
        return tags

    # ------------------------------------------------------------ data

    def _samples(self, x: Any, fitted: bool) -> np.ndarray:
        """``X`` as ``n x I_1 x ... x I_d`` (a view where possible), checked."""
        if hasattr(x, "toarray") and hasattr(x, "nnz"):  # scipy.sparse: asarray gives an object
            raise TypeError(
                f"X is a sparse {type(x).__name__}; CP needs dense samples: pass X.toarray()"
            )
        if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
            x = x.detach().cpu()
            arr = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
        else:
            arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise TypeError(f"X must hold numbers, got dtype {arr.dtype}")
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        if self.sample_shape is not None:
            shape = tuple(int(n) for n in self.sample_shape)
            if arr.ndim < 2 or math.prod(arr.shape[1:]) != math.prod(shape):
                raise ValueError(
                    f"X has shape {arr.shape}: each sample must hold prod(sample_shape="
                    f"{shape}) = {math.prod(shape)} values; fix sample_shape or X"
                )
            arr = arr.reshape((arr.shape[0], *shape))
        elif arr.ndim < 3:
            raise ValueError(
                f"X has shape {arr.shape}, a matrix: pass sample_shape= to fold each row into a "
                "tensor (e.g. sample_shape=(8, 8) for 64 pixels), or X as n x I_1 x ... x I_d"
            )
        if fitted:
            want = tuple(f.shape[0] for f in self.components_)
            if arr.shape[1:] != want:
                raise ValueError(
                    f"X's samples have shape {arr.shape[1:]}, the model was fitted on {want}"
                )
            # fit checks in its first pass; here a NaN would make every row NaN (one lstsq)
            rows = arr.reshape(len(arr), math.prod(arr.shape[1:]))  # -1 fails for 0 samples
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            if len(bad):
                raise DataError(
                    f"X holds NaN or Inf in {len(bad)} sample(s), the first at sample {bad[0]}: "
                    "clean or drop those samples (e.g. np.nan_to_num) before transform"
                )
        return arr

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise AttributeError(
                f"this {type(self).__name__} is not fitted yet: call fit(X) before using it"
            )

    # ------------------------------------------------------------ fit and transform

    def fit(self, X: Any, y: Any = None) -> CP:
        """Fit the CP model to ``X`` (``n x ...``); ``y`` is ignored."""
        self.fit_transform(X)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> np.ndarray:
        """Fit and return the training samples' features (the sample factor times the weights).

        Returns
        -------
        ndarray
            ``n_samples x rank``.
        """
        arr = self._samples(X, fitted=False)
        kwargs = {
            "n_iter_max": self.n_iter_max,
            "tol": self.tol,
            "init": self.init,
            "random_state": self.random_state,
            "chunk_size": self.chunk_size,
            "dtype": self.dtype,
            "device": self.device,
            "progress": False,
        }
        if self.nonnegative:
            model = ncp_hals(arr, self.rank, sweeps=self.sweeps, **kwargs)
        else:
            model = cp_als(arr, self.rank, **kwargs)
        self.model_: CPModel = model
        self.weights_ = model.weights.copy()
        self.components_ = [f.copy() for f in model.factors[1:]]
        self.n_iter_ = model.history.n_iter
        norm = math.sqrt(sum(float(np.sum(np.square(c, dtype=np.float64))) for c in arr))
        self.reconstruction_err_ = model.history.rel_error[-1] * norm
        self.n_features_in_ = math.prod(arr.shape[1:])
        return model.factors[0] * model.weights

    def _normal_equations(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``M = X_(0) K`` (``n x R``) and ``G = K^T K`` (``R x R``), ``K`` the components' KR."""
        x = arr.reshape(arr.shape[0], math.prod(arr.shape[1:])).astype(np.float64, copy=False)
        kr = self.components_[0]
        for f in self.components_[1:]:  # row-major Khatri-Rao: the last mode fastest
            kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, f.shape[1])
        g = np.ones((self.rank, self.rank))
        for f in self.components_:
            g = g * (f.T @ f)
        return x @ kr, g

    def transform(self, X: Any) -> np.ndarray:
        """Features of new samples against the fitted components.

        Least squares ``min_a ||x - sum_r a_r c_{1,r} ∘ ... ||`` per sample, or
        nonnegative least squares for the nonnegative model (scipy's NNLS on the
        ``R x R`` normal equations' Cholesky factor, equivalent to the full
        problem).

        Returns
        -------
        ndarray
            ``n_samples x rank``.
        """
        self._check_fitted()
        arr = self._samples(X, fitted=True)
        m, g = self._normal_equations(arr)
        return solve_sample_rows(m, g, nonnegative=self.nonnegative)

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Samples from features: ``n x rank`` -> ``n x I_1 x ... x I_d``.

        Flat rows (``n x prod(I)``) when the model folds rows (``sample_shape``).
        """
        self._check_fitted()
        a = np.asarray(X, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.rank:
            raise ValueError(f"expected features of shape (n, {self.rank}), got {a.shape}")
        model = CPModel(np.ones(self.rank), [a, *self.components_])
        out = model.reconstruct()
        return out.reshape(len(a), -1) if self.sample_shape is not None else out


def _is_default(value: Any, default: Any) -> bool:
    """Whether a parameter holds its default; an array (``sample_shape=np.array(...)``),
    whose ``==`` is elementwise, never does."""
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, ValueError):  # an array's truth value is ambiguous
        return False
