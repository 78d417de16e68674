"""``peekcore.CP``: CP and nonnegative CP as a scikit-learn transformer.

The samples are mode 0; each sample is a tensor (``I_1 x ... x I_d``), or a
flat row that ``sample_shape`` folds into one. A plain matrix
(``n_samples x n_features``, no ``sample_shape``) gets a 2-way CP, a rank-R
matrix factorization ``X ≈ A B^T`` (the solvers fit it as ``n x f x 1``).
``fit`` runs :func:`peekcore.cp_als` or :func:`peekcore.ncp_hals`;
``transform`` gives new samples' rows of the sample factor against the fitted
resident factors (``components_``).

scikit-learn stays optional, and constructing or fitting ``CP`` on arrays does
not import it. Its own conventions come from its own code, imported when
used: tags, ``set_output`` (``TransformerMixin``), ``get_feature_names_out``
(``ClassNamePrefixFeaturesOutMixin``), ``feature_names_in_`` of a DataFrame
(``validate_data``), and output containers once scikit-learn is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from typing import Any

import numpy as np

from ._extras import require
from .errors import DataError, InvalidArgumentError, InvalidTypeError, NotFittedError
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
        64 pixels); ``None``: ``X`` is already ``n x I_1 x ... x I_d``, or a
        plain ``n x f`` matrix, which gets a 2-way CP (a rank-R matrix
        factorization ``X ≈ A B^T``, ``rank <= min(n, f)``; the same subspace
        as a truncated SVD for ``nonnegative=False``).
    n_iter_max, tol, init, random_state, sweeps, chunk_size, dtype, device :
        As for :func:`peekcore.cp_als` / :func:`peekcore.ncp_hals` (``sweeps``
        for the nonnegative model only).

    Attributes
    ----------
    components_ : list of ndarray
        Resident factors, ``I_m x rank`` with unit columns (one, ``f x rank``,
        for a plain matrix).
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
    feature_names_in_ : ndarray of str
        Column names, when fitted on a DataFrame whose columns are all strings
        (with scikit-learn installed).
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
                raise InvalidArgumentError(
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

    # ------------------------------------------------------------ scikit-learn's conventions

    # The output key that scikit-learn's set_output configures (TransformerMixin's
    # set_output is offered where this holds "transform" and get_feature_names_out exists).
    _sklearn_auto_wrap_output_keys = frozenset({"transform"})

    def __sklearn_tags__(self):  # called by scikit-learn only, which is then loaded
        from sklearn.base import BaseEstimator, TransformerMixin

        class _Like(TransformerMixin, BaseEstimator):
            pass

        tags = _Like().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.three_d_array = True  # n x I_1 x ... x I_d sample tensors
        tags.transformer_tags.preserves_dtype = ["float64"]
        if self.nonnegative:
            tags.input_tags.positive_only = True
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "components_")

    @property
    def _n_features_out(self) -> int:
        """Features ``transform`` gives (the rank); AttributeError before ``fit``."""
        return int(self.components_[0].shape[1])

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of ``transform``'s features: ``cp0`` ... ``cp{rank-1}``.

        scikit-learn's ``ClassNamePrefixFeaturesOutMixin`` (needs scikit-learn).

        Parameters
        ----------
        input_features : array-like of str, optional
            Checked against ``feature_names_in_`` / ``n_features_in_`` only.

        Returns
        -------
        ndarray of str
            ``rank`` names, the class name lowercased and the component index.
        """
        base = require("sklearn.base", "demo", "CP.get_feature_names_out", "scikit-learn")
        return base.ClassNamePrefixFeaturesOutMixin.get_feature_names_out(self, input_features)

    def set_output(self, *, transform: str | None = None) -> CP:
        """Container of ``transform`` / ``fit_transform``'s output (``"pandas"``, ``"polars"``).

        scikit-learn's ``TransformerMixin.set_output`` (needs scikit-learn); a
        DataFrame output has the columns of :meth:`get_feature_names_out` and
        the input DataFrame's index.

        Parameters
        ----------
        transform : {"default", "pandas", "polars"}, optional
            ``None`` leaves the setting as it is.

        Returns
        -------
        CP
            ``self``.
        """
        base = require("sklearn.base", "demo", "CP.set_output", "scikit-learn")
        return base.TransformerMixin.set_output(self, transform=transform)

    def _check_feature_names(self, x: Any, *, reset: bool) -> None:
        """Record (``reset``) or compare ``feature_names_in_``, scikit-learn's way.

        Only where names are involved (``x`` a DataFrame, or a fit on one), so
        arrays never import scikit-learn; without scikit-learn no names are kept.
        """
        if not hasattr(x, "columns") and not hasattr(self, "feature_names_in_"):
            return
        try:
            from sklearn.utils.validation import validate_data
        except ImportError:
            return
        # skip_check_array: _samples converts X; ensure_2d=False skips validate_data's
        # n_features_in_ (shape[1], not the values per sample of a tensor X)
        validate_data(self, x, reset=reset, skip_check_array=True, ensure_2d=False)

    def _container(self, out: np.ndarray, x: Any) -> Any:
        """``out`` in the container set_output / set_config(transform_output=) asks for."""
        if "sklearn" not in sys.modules:  # neither can have run: the default, an ndarray
            return out
        from sklearn.utils._set_output import _wrap_data_with_container

        return _wrap_data_with_container("transform", out, x, self)

    # ------------------------------------------------------------ data

    def _samples(self, x: Any, fitted: bool) -> np.ndarray:
        """``X`` as ``n x I_1 x ... x I_d`` or ``n x f`` (a view where possible), checked."""
        arr = _real_array(x)
        if arr.ndim < 2:
            raise InvalidArgumentError(
                f"X has shape {arr.shape}, but CP needs samples along a first axis. Reshape "
                "your data: X.reshape(-1, 1) for one feature, X.reshape(1, -1) for one sample"
            )
        n_values = math.prod(arr.shape[1:])
        if n_values == 0:
            raise DataError(
                f"X has 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required: "
                "each sample needs at least one value"
            )
        if fitted and n_values != self.n_features_in_:
            raise InvalidArgumentError(
                f"X has {n_values} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input (X's samples have shape "
                f"{arr.shape[1:]}; the model was fitted on samples of shape {self._sample_shape})"
            )
        if self.sample_shape is not None:
            shape = tuple(int(n) for n in self.sample_shape)
            if math.prod(shape) != n_values:
                raise InvalidArgumentError(
                    f"X has shape {arr.shape}: each sample must hold prod(sample_shape="
                    f"{shape}) = {math.prod(shape)} values; fix sample_shape or X"
                )
            arr = arr.reshape((arr.shape[0], *shape))
        if fitted:
            if arr.shape[1:] != self._sample_shape:
                raise InvalidArgumentError(
                    f"X's samples have shape {arr.shape[1:]}, the model was fitted on "
                    f"{self._sample_shape}"
                )
            # fit checks in its first pass; here a NaN would make every row NaN (one lstsq)
            rows = arr.reshape(len(arr), n_values)  # -1 fails for 0 samples
            bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
            if len(bad):
                raise DataError(
                    f"X holds NaN or Inf in {len(bad)} sample(s), the first at sample {bad[0]}: "
                    "clean or drop those samples (e.g. np.nan_to_num) before transform"
                )
        return arr

    @property
    def _sample_shape(self) -> tuple[int, ...]:
        """The fitted samples' shape (``(f,)`` for a matrix)."""
        return tuple(int(f.shape[0]) for f in self.components_)

    def _check_fit_data(self, arr: np.ndarray) -> None:
        """What the estimator can say more plainly than the solver: matrix rank, signs."""
        if len(arr) == 0:
            raise DataError(f"X has 0 samples (shape={arr.shape}); fit needs at least one")
        if arr.ndim == 2 and isinstance(self.rank, int | np.integer):
            n, f = arr.shape
            if self.rank > min(n, f):
                raise InvalidArgumentError(
                    f"rank {self.rank} is too high for X of shape {arr.shape}, {n} sample(s) x "
                    f"{f} feature(s): a matrix without sample_shape gets a 2-way CP (a rank-R "
                    "matrix factorization X ≈ A B^T), whose rank is at most min(n_samples, "
                    f"n_features) = {min(n, f)}; choose rank <= {min(n, f)}, or pass "
                    "sample_shape= to fold each row into a tensor"
                )
        if self.nonnegative and arr.size:
            low = float(np.min(arr))  # NaN (then caught by the solver's pass) is not < 0
            if low < 0:
                raise DataError(
                    f"Negative values in data passed to {type(self).__name__}(nonnegative=True)"
                    f" (the smallest is {low:.4g}): use nonnegative=False for signed data, "
                    "or factor nonnegative data (e.g. activations after a ReLU)"
                )

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet: call fit(X) before using it"
            )

    # ------------------------------------------------------------ fit and transform

    def fit(self, X: Any, y: Any = None) -> CP:
        """Fit the CP model to ``X`` (``n x ...``); ``y`` is ignored."""
        self._fit(X)
        return self

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        """Fit and return the training samples' features (the sample factor times the weights).

        Returns
        -------
        ndarray
            ``n_samples x rank`` (a DataFrame where :meth:`set_output` asks).
        """
        return self._container(self._fit(X), X)

    def _fit(self, x: Any) -> np.ndarray:
        """Fit; the training samples' features, ``n x rank``."""
        self._check_feature_names(x, reset=True)
        arr = self._samples(x, fitted=False)
        self._check_fit_data(arr)
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
        data = arr[:, :, None] if arr.ndim == 2 else arr  # a matrix as n x f x 1 (a view)
        if self.nonnegative:
            model = ncp_hals(data, self.rank, sweeps=self.sweeps, **kwargs)
        else:
            model = cp_als(data, self.rank, **kwargs)
        if arr.ndim == 2:
            model = _matrix_model(model)
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
            ``n_samples x rank`` (a DataFrame where :meth:`set_output` asks).
        """
        self._check_fitted()
        self._check_feature_names(X, reset=False)  # first: other columns may be other counts
        arr = self._samples(X, fitted=True)
        m, g = self._normal_equations(arr)
        return self._container(solve_sample_rows(m, g, nonnegative=self.nonnegative), X)

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Samples from features: ``n x rank`` -> ``n x I_1 x ... x I_d``.

        Flat rows (``n x prod(I)``) when the model folds rows (``sample_shape``),
        ``n x f`` for a model of a matrix.
        """
        self._check_fitted()
        a = np.asarray(X, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != self.rank:
            raise InvalidArgumentError(
                f"expected features of shape (n, {self.rank}), got {a.shape}"
            )
        model = CPModel(np.ones(self.rank), [a, *self.components_])
        out = model.reconstruct()
        return out.reshape(len(a), -1) if self.sample_shape is not None else out


def _real_array(x: Any) -> np.ndarray:
    """``x`` as a real ndarray (a view where possible); floats kept, other numbers float64."""
    if hasattr(x, "toarray") and hasattr(x, "nnz"):  # scipy.sparse: asarray gives an object
        raise InvalidTypeError(
            f"X is a sparse {type(x).__name__}; CP needs dense samples: pass X.toarray()"
        )
    if hasattr(x, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        x = x.detach().cpu()
        arr = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype.kind == "c":
        raise DataError(
            f"Complex data not supported: X has dtype {arr.dtype}; CP factors real data: "
            "pass X.real, np.abs(X), or the real and imaginary parts as separate features"
        )
    if arr.dtype.kind == "O":  # numbers in an object array (pandas' mixed columns)
        try:
            return arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise InvalidTypeError(
                f"X has dtype object and an entry that is not a number: {err}"
            ) from err
    if arr.dtype.kind not in "fiub":
        raise InvalidTypeError(f"X must hold numbers, got dtype {arr.dtype}")
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def _matrix_model(model: CPModel) -> CPModel:
    """The ``n x f x 1`` fit of a matrix as the 2-way model it is.

    The singleton mode's entries are +-1 (unit columns of length one); they are
    folded into ``B`` so that ``X ≈ A diag(w) B^T`` exactly as before.
    """
    a, b, c = model.factors
    metadata = {**model.metadata, "shape": [int(a.shape[0]), int(b.shape[0])]}
    return CPModel(model.weights, [a, b * c[0]], model.history, metadata)


def _is_default(value: Any, default: Any) -> bool:
    """Whether a parameter holds its default; an array (``sample_shape=np.array(...)``),
    whose ``==`` is elementwise, never does."""
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, ValueError):  # an array's truth value is ambiguous
        return False
